//! The CT object: what `berth list --json`, `berth status --json` (and the panel API) print for
//! one CT, and the `list` fields that are columns of it. One shape everywhere: snake_case keys
//! without dots, arrays for lists, `null` for unset; README "JSON output" documents it.
//!
//! Limits and counters of a running CT are read live from its cgroup, so a `set` without
//! `--save` shows; a stopped CT shows its config.

use std::path::{Path, PathBuf};

use berth_runtime::Ctid;
use berth_runtime::cgroups::Stats;
use berth_runtime::config::{CtConfig, Host, PrivateLayout, UserNs};
use berth_runtime::container::state::LastExit;
use berth_runtime::container::{self, State, Status};
use berth_runtime::net::NetState;
use berth_runtime::size::Size;
use serde::Serialize;
use serde_json::Value;

use crate::inventory::{InventoryError, Result, Traffic};
use crate::shaper::report::ShapingReport;

mod fields;
pub use fields::{
    DEFAULT_FIELDS, DEFAULT_NAME_FIELDS, FIELDS, Field, Kind, field, need_of, parse_fields, subset,
};

/// A UBC-style resource (vzlist's `.m .b .l .f` suffixes): held now, most held, barrier,
/// limit, failures. `null` where the kernel keeps no such counter or nothing is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Counted {
    pub held: Option<u64>,
    pub maxheld: Option<u64>,
    pub barrier: Option<u64>,
    pub limit: Option<u64>,
    pub failcnt: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cpu {
    /// CPU time used, seconds.
    pub usage_seconds: Option<f64>,
    /// CFS periods the limit throttled the CT in.
    pub throttled_periods: Option<u64>,
    /// The CPU limit in percent of one CPU: the cgroup's quota when running (the smaller of
    /// --cpulimit and --cpus), the config's --cpulimit otherwise; `null`: unlimited.
    pub limit_percent: Option<u64>,
    /// CPU weight (OpenVZ units), from the config.
    pub units: Option<u64>,
    /// CPUs the CT may use, from the config.
    pub cpus: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Paths {
    pub config: PathBuf,
    pub root: PathBuf,
    pub private: PathBuf,
    pub console_log: PathBuf,
}

/// One CT as every JSON output shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CtView {
    pub ctid: Ctid,
    /// `null` for a CT made by an older berth until its next start assigns one.
    pub uuid: Option<uuid::Uuid>,
    pub name: Option<String>,
    pub hostname: Option<String>,
    pub status: State,
    pub template: String,
    /// No user namespace: the CT's root is the host's root.
    pub privileged: bool,
    /// Host uid of the CT's root (its id range's start); `null` when privileged.
    pub uid_base: Option<u32>,
    pub userns: Option<UserNs>,
    pub layout: PrivateLayout,
    pub init_pid: Option<i32>,
    /// Routed and static addresses, as configured.
    pub ip: Vec<String>,
    /// Processes and threads.
    pub numproc: Counted,
    /// Memory, bytes (every value of it).
    pub memory: Counted,
    /// Swap on top of memory, bytes.
    pub swap: Counted,
    pub oom_kills: Option<u64>,
    pub cpu: Cpu,
    /// The disk quota (hard limit), bytes; `null`: none.
    pub diskspace_limit_bytes: Option<u64>,
    /// eBPF traffic totals, all classes (never reset while the CT exists).
    pub traffic: Traffic,
    /// The transfer quota and berthd's last evaluation of it; `null`: none configured.
    pub quota: Option<Value>,
    /// Interfaces (host-side names, addresses, mode): as set up when running, as configured
    /// otherwise.
    pub net: NetState,
    /// Live shaping (running CTs only).
    pub shaping: Option<ShapingReport>,
    /// Why the live shaping could not be read, if so.
    pub shaping_error: Option<String>,
    /// How init ended when it exited on its own after `start` (stopped CTs only).
    pub last_exit: Option<LastExit>,
    pub paths: Paths,
}

/// What a view reads besides the config and the cgroup: each costs a look at the datapath's
/// pins or the ledger, so a listing that shows none of it reads none of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    pub traffic: bool,
    pub quota: bool,
    pub shaping: bool,
}

impl Need {
    pub const ALL: Need = Need {
        traffic: true,
        quota: true,
        shaping: true,
    };

    /// What either needs.
    pub fn or(self, o: Need) -> Need {
        Need {
            traffic: self.traffic || o.traffic,
            quota: self.quota || o.quota,
            shaping: self.shaping || o.shaping,
        }
    }
}

/// Shared reads of one listing (the datapath counters and the quota ledger, opened once).
pub struct Reader<'a> {
    host: &'a Host,
    pin_dir: &'a Path,
    need: Need,
    traffic: std::collections::HashMap<u32, Traffic>,
    quota: Option<crate::quota::store::QuotaStore>,
}

impl<'a> Reader<'a> {
    pub fn new(host: &'a Host, pin_dir: &'a Path, need: Need) -> Result<Self> {
        let traffic = if need.traffic {
            crate::inventory::traffic_by_ct(pin_dir)?
        } else {
            Default::default()
        };
        let quota = if need.quota {
            crate::quota::status::open(&crate::quota::status::default_ledger(host))
                .map_err(|e| InventoryError::Quota(Box::new(e)))?
        } else {
            None
        };
        Ok(Self {
            host,
            pin_dir,
            need,
            traffic,
            quota,
        })
    }

    /// CT `ctid`'s view.
    pub fn view(&self, ctid: Ctid) -> Result<CtView> {
        let st = container::status(self.host, ctid)?;
        let cfg = CtConfig::load(self.host, ctid)?;
        let stats = container::stats(self.host, ctid).ok().flatten();
        let quota = if self.need.quota && !cfg.quota.is_empty() {
            let q = crate::quota::status::of_ct(self.quota.as_ref(), &cfg)
                .map_err(|e| InventoryError::Quota(Box::new(e)))?;
            Some(quota_json(&q))
        } else {
            None
        };
        let (shaping, shaping_error) =
            if self.need.shaping && matches!(st.state, State::Running | State::Suspended) {
                match crate::inventory::ct_shaping(self.pin_dir, ctid) {
                    Ok(s) => (s, None),
                    Err(e) => {
                        let msg = format!(
                            "reading CT {ctid}'s shaping: {}",
                            berth_runtime::error_chain::ErrorChain(&e)
                        );
                        tracing::warn!("{msg}");
                        (None, Some(msg))
                    }
                }
            } else {
                (None, None)
            };
        let traffic = self.traffic.get(&ctid.get()).copied().unwrap_or_default();
        Ok(build(
            st,
            &cfg,
            stats.as_ref(),
            traffic,
            quota,
            shaping,
            shaping_error,
        ))
    }
}

/// The quota object, with the limits falling back to the configured ones before berthd's
/// first evaluation (so a new quota shows at once).
fn quota_json(q: &crate::quota::status::CtQuotaStatus) -> Value {
    let mut v = q.json();
    for (live, cfg) in [
        ("limit_bytes", "transfer_bytes"),
        ("hard_limit_bytes", "hard_bytes"),
    ] {
        if v[live].is_null() {
            v[live] = v[cfg].clone();
        }
    }
    v
}

fn bytes(s: Option<Size>) -> Option<u64> {
    match s {
        Some(Size::Bytes(b)) => Some(b),
        _ => None,
    }
}

/// 0 means "none" in the config's numproc and cpulimit.
fn nonzero<T: Into<u64>>(v: Option<T>) -> Option<u64> {
    v.map(Into::into).filter(|&n| n > 0)
}

fn build(
    st: Status,
    cfg: &CtConfig,
    stats: Option<&Stats>,
    traffic: Traffic,
    quota: Option<Value>,
    shaping: Option<ShapingReport>,
    shaping_error: Option<String>,
) -> CtView {
    let r = &cfg.resources;
    let numproc = match stats {
        Some(s) => Counted {
            held: Some(s.numproc),
            maxheld: s.numproc_peak,
            barrier: s.numproc_limit,
            limit: s.numproc_limit,
            failcnt: Some(s.numproc_failcnt),
        },
        None => Counted {
            barrier: nonzero(r.numproc),
            limit: nonzero(r.numproc),
            ..Counted::default()
        },
    };
    let memory = match stats {
        Some(s) => Counted {
            held: Some(s.memory_usage),
            maxheld: s.memory_peak,
            barrier: s.memory_barrier.or(s.memory_limit),
            limit: s.memory_limit,
            failcnt: Some(s.memory_failcnt),
        },
        None => Counted {
            barrier: bytes(r.memory),
            limit: bytes(r.memory),
            ..Counted::default()
        },
    };
    let swap = match stats {
        Some(s) => Counted {
            held: Some(s.swap_usage),
            maxheld: s.swap_peak,
            barrier: s.swap_limit,
            limit: s.swap_limit,
            failcnt: None,
        },
        None => Counted {
            barrier: bytes(r.swap),
            limit: bytes(r.swap),
            ..Counted::default()
        },
    };
    let limit_percent = match stats {
        Some(s) => s
            .cpu_quota_us
            .filter(|&q| q > 0 && s.cpu_period_us > 0)
            .map(|q| (q as u64 * 100).div_ceil(s.cpu_period_us)),
        None => nonzero(r.cpulimit),
    };
    CtView {
        ctid: st.ctid,
        uuid: st.uuid,
        name: st.name,
        hostname: st.hostname,
        status: st.state,
        template: st.template,
        privileged: st.privileged,
        uid_base: st.userns.map(|u| u.uid_base),
        userns: st.userns,
        layout: st.layout,
        init_pid: st.init_pid,
        ip: cfg.net.all_addrs().map(|a| a.to_string()).collect(),
        numproc,
        memory,
        swap,
        oom_kills: stats.map(|s| s.oom_kills),
        cpu: Cpu {
            usage_seconds: stats.map(|s| s.cpu_usage_ns as f64 / 1e9),
            throttled_periods: stats.map(|s| s.nr_throttled),
            limit_percent,
            units: r.cpuunits,
            cpus: r.cpus,
        },
        diskspace_limit_bytes: bytes(r.diskspace),
        traffic,
        quota,
        net: st.net,
        shaping,
        shaping_error,
        last_exit: st.last_exit,
        paths: Paths {
            config: st.config_path,
            root: st.root_path,
            private: st.private_path,
            console_log: st.console_log,
        },
    }
}
