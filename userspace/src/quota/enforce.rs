//! What a quota state does to a CT, applied idempotently (berthd calls [`apply`] every tick
//! with each CT's current state):
//!
//! - `Throttle`: a runtime overlay on the CT's shaping, each total rate the lower of the plan's
//!   and the throttle's; never written into the CT's config. The overlay lives in the pinned
//!   `QUOTA` map, so a `set --rate-*` or a start while throttled shapes with it too (the
//!   shaping hooks consult it), and lifting it re-applies the configured rates exactly.
//! - `Cut`: the datapath drops the CT's IP traffic beyond class 0, both ways, reason `quota`
//!   (see `berth_common::FLAG_QUOTA_CUT`); a CT started while cut comes up cut.
//! - `Suspend`: the CT is frozen (its cgroup), thawed when the quota lifts.
//! - `Stop`: the CT is stopped (and stays stopped when the quota lifts).
//! - `Normal`: everything the quota did is undone.

use std::path::Path;

use berth_common::QuotaOverlay;
use berth_runtime::config::{ConfigError, CtConfig, Host};
use berth_runtime::shaping::{Rate, ShapingConfig};
use berth_runtime::{Ctid, container};
use tracing::info;

use crate::datapath::{Datapath, DatapathError};
use crate::lifecycle_hooks::DatapathHooks;
use crate::shaper::{Shaper, ShaperError};

/// A quota state's effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    Normal,
    Throttle {
        rate_in: Option<Rate>,
        rate_out: Option<Rate>,
    },
    Cut,
    Suspend,
    Stop,
}

/// Why an enforcement could not be applied; each names the CT.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("quota of CT {ctid}: the datapath")]
    Datapath {
        ctid: Ctid,
        #[source]
        source: DatapathError,
    },
    #[error("quota of CT {ctid}: shaping")]
    Shaper {
        ctid: Ctid,
        #[source]
        source: Box<ShaperError>,
    },
    #[error("quota of CT {ctid}: {what}")]
    Ct {
        ctid: Ctid,
        what: &'static str,
        #[source]
        source: Box<container::CtError>,
    },
    #[error("quota of CT {ctid}: reading its config")]
    Config {
        ctid: Ctid,
        #[source]
        source: ConfigError,
    },
}

/// `base` with the throttle of `overlay` on top: each total rate the lower of the two.
/// `None` when neither shapes anything.
pub fn throttled(
    base: Option<&ShapingConfig>,
    overlay: Option<&QuotaOverlay>,
) -> Option<ShapingConfig> {
    let mut cfg = base.cloned().unwrap_or_default();
    if let Some(o) = overlay {
        let lower = |have: Option<Rate>, bps: u64| match (have, Rate::from_bps(bps)) {
            (Some(h), Some(t)) => Some(if t.bits_per_sec() < h.bits_per_sec() {
                t
            } else {
                h
            }),
            (h, t) => h.or(t),
        };
        if o.throttle_in_bps != 0 {
            cfg.rate_in = lower(cfg.rate_in, o.throttle_in_bps);
        }
        if o.throttle_out_bps != 0 {
            cfg.rate_out = lower(cfg.rate_out, o.throttle_out_bps);
        }
    }
    (!cfg.is_empty()).then_some(cfg)
}

fn overlay_of(e: &Enforcement, prev: Option<&QuotaOverlay>) -> Option<QuotaOverlay> {
    let bps = |r: Option<Rate>| r.map_or(0, Rate::bits_per_sec);
    let o = match *e {
        Enforcement::Normal | Enforcement::Stop => return None,
        Enforcement::Throttle { rate_in, rate_out } => QuotaOverlay {
            throttle_in_bps: bps(rate_in),
            throttle_out_bps: bps(rate_out),
            ..QuotaOverlay::default()
        },
        Enforcement::Cut => QuotaOverlay {
            cut: 1,
            ..QuotaOverlay::default()
        },
        Enforcement::Suspend => QuotaOverlay {
            // Kept from an earlier apply: the quota froze it (a CT frozen by its operator
            // before is not ours to thaw).
            suspended: prev.map_or(0, |p| p.suspended),
            ..QuotaOverlay::default()
        },
    };
    Some(o)
}

/// Applies `e` to CT `ctid` (its host-side interfaces in the current network namespace, the
/// datapath pinned at `pin_dir`). Idempotent; only what changed since the last call is done.
pub fn apply(host: &Host, pin_dir: &Path, ctid: Ctid, e: &Enforcement) -> Result<(), EnforceError> {
    let dp_err = |source| EnforceError::Datapath { ctid, source };
    let mut dp = Datapath::open_or_load(pin_dir).map_err(dp_err)?;
    let prev = dp.quota_overlay(ctid).map_err(dp_err)?;
    let mut want = overlay_of(e, prev.as_ref());
    let running = container::running(host, ctid).is_some();
    if let Some(w) = want.as_mut()
        && *e == Enforcement::Suspend
        && running
        && w.suspended == 0
    {
        match container::suspend(host, ctid) {
            Ok(()) => w.suspended = 1,
            Err(source) => {
                return Err(EnforceError::Ct {
                    ctid,
                    what: "freezing it",
                    source: Box::new(source),
                });
            }
        }
        info!(%ctid, "quota: CT frozen");
    }
    if prev.is_some_and(|p| p.suspended != 0) && *e != Enforcement::Suspend && running {
        container::resume(host, ctid).map_err(|source| EnforceError::Ct {
            ctid,
            what: "thawing it",
            source: Box::new(source),
        })?;
        info!(%ctid, "quota: CT thawed");
    }
    if prev != want {
        dp.set_quota_overlay(ctid, want).map_err(dp_err)?;
    }
    let throttle = |o: Option<&QuotaOverlay>| o.map(|o| (o.throttle_in_bps, o.throttle_out_bps));
    if throttle(prev.as_ref()) != throttle(want.as_ref()) {
        reshape(host, pin_dir, &dp, ctid, want.as_ref())?;
    }
    if *e == Enforcement::Stop && running {
        let mut hooks = DatapathHooks::new(Some(pin_dir.to_path_buf()));
        container::stop(host, ctid, false, &mut hooks).map_err(|source| EnforceError::Ct {
            ctid,
            what: "stopping it",
            source: Box::new(source),
        })?;
        info!(%ctid, "quota: CT stopped");
    }
    Ok(())
}

/// Shapes the CT's attached interfaces with its configured shaping and `overlay`'s throttle.
fn reshape(
    host: &Host,
    pin_dir: &Path,
    dp: &Datapath,
    ctid: Ctid,
    overlay: Option<&QuotaOverlay>,
) -> Result<(), EnforceError> {
    let cfg = CtConfig::load(host, ctid).map_err(|source| EnforceError::Config { ctid, source })?;
    let base = cfg.shaping.as_ref().filter(|s| !s.is_empty());
    let eff = throttled(base, overlay);
    let ifaces: Vec<u32> = dp
        .attached()
        .map_err(|source| EnforceError::Datapath { ctid, source })?
        .into_iter()
        .filter(|a| a.config.ctid == ctid && a.ifname.is_some())
        .map(|a| a.ifindex)
        .collect();
    if ifaces.is_empty() {
        return Ok(());
    }
    let sh_err = |source| EnforceError::Shaper {
        ctid,
        source: Box::new(source),
    };
    let mut sh = Shaper::open(pin_dir).map_err(sh_err)?;
    for ifindex in ifaces {
        match &eff {
            Some(c) => sh.apply(ctid, ifindex, c).map_err(sh_err)?,
            None => sh.remove(ctid, ifindex).map_err(sh_err)?,
        }
    }
    info!(%ctid, throttle = ?overlay.map(|o| (o.throttle_in_bps, o.throttle_out_bps)), "quota: shaping re-applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(bps: u64) -> Option<Rate> {
        Rate::from_bps(bps)
    }

    #[test]
    fn throttle_takes_the_lower_rate_and_lifting_restores_the_plan() {
        let plan = ShapingConfig {
            rate_in: rate(100_000_000),
            rate_out: rate(5_000_000),
            ..ShapingConfig::default()
        };
        let t = QuotaOverlay {
            throttle_in_bps: 10_000_000,
            throttle_out_bps: 10_000_000,
            ..QuotaOverlay::default()
        };
        let eff = throttled(Some(&plan), Some(&t)).unwrap();
        assert_eq!(eff.rate_in, rate(10_000_000));
        // The plan's own rate is lower: it stays.
        assert_eq!(eff.rate_out, rate(5_000_000));
        assert_eq!(throttled(Some(&plan), None), Some(plan.clone()));
        // No plan: the throttle alone; neither: nothing to shape.
        let only = throttled(None, Some(&t)).unwrap();
        assert_eq!(
            (only.rate_in, only.rate_out),
            (rate(10_000_000), rate(10_000_000))
        );
        assert_eq!(throttled(None, None), None);
        assert_eq!(
            throttled(
                None,
                Some(&QuotaOverlay {
                    cut: 1,
                    ..Default::default()
                })
            ),
            None
        );
    }

    #[test]
    fn overlays_of_each_state() {
        assert_eq!(overlay_of(&Enforcement::Normal, None), None);
        assert_eq!(overlay_of(&Enforcement::Stop, None), None);
        assert_eq!(overlay_of(&Enforcement::Cut, None).unwrap().cut, 1);
        let t = overlay_of(
            &Enforcement::Throttle {
                rate_in: rate(1_000_000),
                rate_out: None,
            },
            None,
        )
        .unwrap();
        assert_eq!(
            (t.cut, t.throttle_in_bps, t.throttle_out_bps),
            (0, 1_000_000, 0)
        );
        let frozen = QuotaOverlay {
            suspended: 1,
            ..Default::default()
        };
        assert_eq!(
            overlay_of(&Enforcement::Suspend, Some(&frozen))
                .unwrap()
                .suspended,
            1
        );
    }
}
