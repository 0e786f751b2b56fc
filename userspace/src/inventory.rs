//! Read-only reports on a host's CTs: `list`'s field table and values, traffic totals from the
//! eBPF counters, live shaping and the netstat view. The `berth` CLI prints them; the panel API
//! will serve the same calls.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use berth_runtime::Ctid;
use berth_runtime::config::{ConfigError, Host};
use berth_runtime::container::{CtError, State};

use crate::ct::{CtView, Need, Reader};
pub use crate::ct::{DEFAULT_FIELDS, DEFAULT_NAME_FIELDS, FIELDS, Field, parse_fields};

use crate::datapath::{DatapathError, DatapathView, Direction, Family};
use crate::netstat::{Baseline, CtShapingSummary, Filter, NetstatRow, aggregate};
use crate::shaper::ShaperError;
use crate::shaper::report::{ShapingReader, ShapingReport};
use berth_runtime::error_chain::ErrorChain;

/// Every error of this module: those of the layers below pass through unchanged.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("unknown field {0:?} (see `berth list -L`)")]
    UnknownField(String),
    #[error("invalid pattern {pattern:?}: {why}")]
    BadPattern { pattern: String, why: &'static str },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ct(#[from] CtError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// Boxed: the shaper's error is large and every call here would carry its size.
    #[error(transparent)]
    Shaper(Box<ShaperError>),
    #[error(transparent)]
    Quota(Box<crate::quota::store::QuotaStoreError>),
    #[error("create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write {}", path.display())]
    WriteBaseline {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<ShaperError> for InventoryError {
    fn from(e: ShaperError) -> Self {
        Self::Shaper(Box::new(e))
    }
}

pub type Result<T, E = InventoryError> = std::result::Result<T, E>;

/// One CT's traffic totals over all classes and families.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    /// Packets dropped by anti-spoofing, all reasons.
    pub drops: u64,
}

/// Every counted CT's [`Traffic`], read once per listing.
/// The pins are opened read-only; no datapath pinned (an empty or absent pin directory) means
/// nothing was counted yet: every CT reads zero.
pub fn traffic_by_ct(pin_dir: &Path) -> Result<HashMap<u32, Traffic>> {
    let mut m: HashMap<u32, Traffic> = HashMap::new();
    let Some(dp) = DatapathView::open_pinned(pin_dir)? else {
        return Ok(m);
    };
    for r in dp.counters()? {
        let t = m.entry(r.ctid).or_default();
        match r.dir {
            Direction::In => {
                t.in_bytes += r.bytes;
                t.in_packets += r.packets;
            }
            Direction::Out => {
                t.out_bytes += r.bytes;
                t.out_packets += r.packets;
            }
        }
    }
    for d in dp.drops()? {
        m.entry(d.ctid).or_default().drops += d.packets;
    }
    Ok(m)
}

/// Which CTs a listing shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Which {
    /// Running and suspended CTs (vzlist's default).
    #[default]
    Running,
    /// Every CT (`-a`).
    All,
    /// Stopped and mounted CTs (`-S`).
    Stopped,
}

/// A listing's selection: explicit CTs (shown whatever their state, as vzlist does), else
/// [`Which`]; then shell patterns (`*`, `?`) on the host name, the name and interface names.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub cts: Vec<String>,
    pub which: Which,
    pub hostname: Option<String>,
    pub name: Option<String>,
    pub netif: Option<String>,
}

/// The views of the selected CTs, in CTID order. Unless named explicitly, a CT whose status
/// cannot be read is skipped with a warning.
pub fn list(host: &Host, pin_dir: &Path, sel: &Selection, need: Need) -> Result<Vec<CtView>> {
    for p in [&sel.hostname, &sel.name, &sel.netif].into_iter().flatten() {
        check_pattern(p)?;
    }
    let reader = Reader::new(host, pin_dir, need)?;
    let explicit = !sel.cts.is_empty();
    let ctids: Vec<Ctid> = if explicit {
        let mut v = sel
            .cts
            .iter()
            .map(|c| host.resolve(c))
            .collect::<Result<Vec<_>, _>>()?;
        v.sort();
        v.dedup();
        v
    } else {
        host.list_ctids()?
    };
    let mut out = Vec::new();
    for ctid in ctids {
        let view = match reader.view(ctid) {
            Ok(v) => v,
            Err(e) if !explicit => {
                tracing::warn!(%ctid, error = %ErrorChain(&e), "skipping CT");
                continue;
            }
            Err(e) => return Err(e),
        };
        let running = matches!(view.status, State::Running | State::Suspended);
        let shown = explicit
            || match sel.which {
                Which::Running => running,
                Which::All => true,
                Which::Stopped => !running,
            };
        let ifnames: Vec<&str> = view
            .net
            .ifaces
            .iter()
            .flat_map(|i| [i.ct_ifname.as_str(), i.host_ifname.as_str()])
            .collect();
        let matches = |pat: &Option<String>, vals: &[&str]| {
            pat.as_deref()
                .is_none_or(|p| vals.iter().any(|v| glob(p, v)))
        };
        if shown
            && matches(
                &sel.hostname,
                view.hostname
                    .as_slice()
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .as_slice(),
            )
            && matches(
                &sel.name,
                view.name
                    .as_slice()
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .as_slice(),
            )
            && matches(&sel.netif, &ifnames)
        {
            out.push(view);
        }
    }
    Ok(out)
}

/// CT `ctid`'s view with everything read (`status`).
pub fn view(host: &Host, pin_dir: &Path, ctid: Ctid) -> Result<CtView> {
    Reader::new(host, pin_dir, Need::ALL)?.view(ctid)
}

fn check_pattern(p: &str) -> Result<()> {
    if p.is_empty() || p.len() > 256 || p.chars().any(char::is_control) {
        return Err(InventoryError::BadPattern {
            pattern: p.to_string(),
            why: "use 1-256 printable characters, `*` and `?` as wildcards",
        });
    }
    Ok(())
}

/// Shell-style match of `text` against `pat`: `*` any run, `?` any one character.
pub fn glob(pat: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen and the text position it was tried at: backtrack there on a mismatch.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// CT `ctid`'s live shaping, read without loading anything; `None` when it is not shaped.
pub fn ct_shaping(pin_dir: &Path, ctid: Ctid) -> Result<Option<ShapingReport>> {
    Ok(match ShapingReader::open(pin_dir)? {
        Some(mut r) => r.read(ctid)?,
        None => None,
    })
}

/// Each shaped CT's rates and drops (only `only` when given), read without loading anything.
pub fn shaping_summaries(
    pin_dir: &Path,
    only: Option<Ctid>,
) -> Result<BTreeMap<u32, CtShapingSummary>> {
    let mut out = BTreeMap::new();
    let Some(mut reader) = ShapingReader::open(pin_dir)? else {
        return Ok(out);
    };
    for ctid in reader.shaped_cts() {
        if only.is_some_and(|c| c != ctid) {
            continue;
        }
        if let Some(r) = reader.read(ctid)? {
            out.insert(ctid.get(), CtShapingSummary::from(&r));
        }
    }
    Ok(out)
}

/// The netstat view: per-(CT, class) traffic since the last reset, with each shaped CT's
/// shaping. `ct` (a CTID or name), `class` and `family` narrow it; `reset` first makes the
/// current counters the new zero (billing totals and the kernel counters are untouched).
pub fn netstat(
    host: &Host,
    pin_dir: &Path,
    ct: Option<&str>,
    class: Option<u8>,
    family: Option<Family>,
    reset: bool,
) -> Result<Vec<NetstatRow>> {
    // Read-only: a host without a pinned datapath has counted nothing (no rows), and
    // reading must not create one.
    let (rows, drops) = match DatapathView::open_pinned(pin_dir)? {
        Some(dp) => (dp.counters()?, dp.drops()?),
        None => (Vec::new(), Vec::new()),
    };
    let only = ct.map(|c| host.resolve(c)).transpose()?;
    let shaping = shaping_summaries(pin_dir, only)?;
    let base_path = host.run.join("netstat.baseline.json");
    if reset {
        std::fs::create_dir_all(&host.run).map_err(|source| InventoryError::CreateDir {
            path: host.run.clone(),
            source,
        })?;
        Baseline::save(&rows, &shaping, &base_path).map_err(|source| {
            InventoryError::WriteBaseline {
                path: base_path.clone(),
                source,
            }
        })?;
    }
    let filter = Filter {
        ctid: only.map(Ctid::get),
        class,
        family,
    };
    let mut out = aggregate(&rows, &shaping, &filter, &Baseline::load(&base_path));
    crate::netstat::add_drops(&mut out, &drops);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_the_shell() {
        assert!(glob("web*", "web01.example.com"));
        assert!(glob("*.example.com", "web01.example.com"));
        assert!(glob("web??", "web01"));
        assert!(!glob("web??", "web1"));
        assert!(glob("a*b*c", "aXXbYbZc"));
        assert!(!glob("a*b*c", "aXXbYbZ"));
        assert!(glob("*", ""));
        assert!(!glob("x", ""));
        assert!(glob("exact", "exact"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(check_pattern("").is_err());
        assert!(check_pattern("web-*.example.com").is_ok());
        assert!(check_pattern("a\nb").is_err());
        assert!(check_pattern("a\u{7}").is_err());
        assert!(check_pattern(&"x".repeat(257)).is_err());
    }
}
