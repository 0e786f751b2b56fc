//! Read-only reports on a host's CTs: `list`'s field table and values, traffic totals from the
//! eBPF counters, live shaping and the netstat view. The `berth` CLI prints them; the panel API
//! will serve the same calls.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use berth_runtime::Ctid;
use berth_runtime::cgroups::Stats;
use berth_runtime::config::{ConfigError, CtConfig, Host};
use berth_runtime::container::{self, CtError, State, Status};
use serde_json::{Value, json};

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

/// `list`'s fields and what each holds.
pub const FIELDS: &[(&str, &str)] = &[
    ("ctid", "container ID"),
    (
        "uuid",
        "the CT's identity, never reused (null: made by an older berth, not started since)",
    ),
    ("name", "name set with --name"),
    ("hostname", "host name"),
    ("status", "running, suspended, mounted or stopped"),
    ("template", "template the CT was created from"),
    (
        "privileged",
        "yes: no user namespace, the CT's root is the host's root",
    ),
    (
        "uid_base",
        "host uid of the CT's root (its id range's start)",
    ),
    ("init_pid", "host PID of the CT's init"),
    ("numproc", "processes and threads in the CT"),
    ("numproc.l", "process limit (--numproc)"),
    ("memory.usage", "memory in use, bytes"),
    ("memory.limit", "memory limit, bytes"),
    ("memory.failcnt", "times the memory limit was hit"),
    ("oom_kills", "processes killed by the OOM killer"),
    ("cpu.usage", "CPU time used, seconds"),
    ("cpu.throttled", "periods the CPU limit throttled the CT"),
    ("cpulimit", "CPU limit, percent of one CPU"),
    ("cpuunits", "CPU weight"),
    ("diskspace", "disk quota"),
    ("ip", "routed and static addresses"),
    (
        "traffic.in",
        "bytes delivered to the CT, all classes (eBPF counters: never reset while the CT exists, from 0 for a new CT)",
    ),
    ("traffic.out", "bytes sent by the CT, all classes"),
    ("packets.in", "packets delivered to the CT"),
    ("packets.out", "packets sent by the CT"),
    ("drops", "packets dropped by anti-spoofing, all reasons"),
    (
        "quota.limit",
        "transfer quota of the period, bytes, top-ups included (as of berthd's last tick; else the configured one)",
    ),
    ("quota.hard", "hard transfer limit of the period, bytes"),
    (
        "quota.used",
        "bytes counted against the quota this period (as of berthd's last tick)",
    ),
    (
        "quota.state",
        "normal, warned, throttled, cut, suspended or stopped (berthd's last tick)",
    ),
];

/// The fields of a listing that names none.
pub const DEFAULT_FIELDS: &str = "ctid,numproc,status,ip,hostname";

/// The fields of a comma-separated list, each checked against [`FIELDS`].
pub fn parse_fields(spec: &str) -> Result<Vec<&str>> {
    let fields: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(f) = fields.iter().find(|f| !FIELDS.iter().any(|(n, _)| n == *f)) {
        return Err(InventoryError::UnknownField(f.to_string()));
    }
    Ok(fields)
}

/// One CT's traffic totals over all classes and families.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
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

fn needs_traffic(field: &str) -> bool {
    field.starts_with("traffic.") || field.starts_with("packets.") || field == "drops"
}

/// The value of field `f` for one CT (null where the CT has none, e.g. stats of a stopped CT).
pub fn field(
    f: &str,
    st: &Status,
    cfg: &CtConfig,
    stats: Option<&Stats>,
    traffic: Option<Traffic>,
) -> Result<Value> {
    let r = &cfg.resources;
    let t = traffic.unwrap_or_default();
    Ok(match f {
        "traffic.in" => json!(t.in_bytes),
        "traffic.out" => json!(t.out_bytes),
        "packets.in" => json!(t.in_packets),
        "packets.out" => json!(t.out_packets),
        "drops" => json!(t.drops),
        "ctid" => json!(st.ctid),
        "uuid" => json!(st.uuid),
        "name" => json!(st.name),
        "hostname" => json!(st.hostname),
        "status" => json!(st.state),
        "template" => json!(st.template),
        "privileged" => json!(st.privileged),
        "uid_base" => json!(st.userns.map(|u| u.uid_base)),
        "init_pid" => json!(st.init_pid),
        "numproc" => json!(stats.map(|s| s.numproc)),
        "numproc.l" => json!(r.numproc),
        "memory.usage" => json!(stats.map(|s| s.memory_usage)),
        "memory.limit" => json!(stats.and_then(|s| s.memory_limit)),
        "memory.failcnt" => json!(stats.map(|s| s.memory_failcnt)),
        "oom_kills" => json!(stats.map(|s| s.oom_kills)),
        "cpu.usage" => json!(stats.map(|s| s.cpu_usage_ns as f64 / 1e9)),
        "cpu.throttled" => json!(stats.map(|s| s.nr_throttled)),
        "cpulimit" => json!(r.cpulimit),
        "cpuunits" => json!(r.cpuunits),
        "diskspace" => json!(r.diskspace.map(|d| d.to_string())),
        "ip" => json!(
            cfg.net
                .all_addrs()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => return Err(InventoryError::UnknownField(other.to_string())),
    })
}

/// A `quota.*` field: berthd's last evaluation, else (limits) the config's values.
fn quota_field(f: &str, cfg: &CtConfig, q: Option<&crate::quota::status::CtQuotaStatus>) -> Value {
    let st = q.and_then(|q| q.state.as_ref());
    match f {
        "limit" => json!(st.map(|s| s.soft).or(cfg.quota.transfer.map(|b| b.0))),
        "hard" => json!(st.and_then(|s| s.hard).or(cfg.quota.hard.map(|b| b.0))),
        "used" => json!(st.map(|s| s.used)),
        _ => json!(st.map(|s| s.state.as_str())),
    }
}

/// One row of `fields` values per CT, in CTID order: running and suspended CTs, or all with
/// `all`. A CT whose status cannot be read is skipped with a warning.
pub fn rows(host: &Host, all: bool, fields: &[&str], pin_dir: &Path) -> Result<Vec<Vec<Value>>> {
    let traffic = if fields.iter().any(|f| needs_traffic(f)) {
        Some(traffic_by_ct(pin_dir)?)
    } else {
        None
    };
    let quota = if fields.iter().any(|f| f.starts_with("quota.")) {
        crate::quota::status::open(&crate::quota::status::default_ledger(host))
            .map_err(|e| InventoryError::Quota(Box::new(e)))?
    } else {
        None
    };
    let mut rows = Vec::new();
    for ctid in host.list_ctids()? {
        let st = match container::status(host, ctid) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%ctid, error = %ErrorChain(&e), "skipping CT");
                continue;
            }
        };
        if !all && !matches!(st.state, State::Running | State::Suspended) {
            continue;
        }
        let cfg = CtConfig::load(host, ctid)?;
        let stats = container::stats(host, ctid).ok().flatten();
        let t = traffic.as_ref().and_then(|t| t.get(&ctid.get()).copied());
        let q = match &quota {
            Some(store) if fields.iter().any(|f| f.starts_with("quota.")) => Some(
                crate::quota::status::of_ct(Some(store), &cfg)
                    .map_err(|e| InventoryError::Quota(Box::new(e)))?,
            ),
            _ => None,
        };
        rows.push(
            fields
                .iter()
                .map(|f| match f.strip_prefix("quota.") {
                    Some(qf) => Ok(quota_field(qf, &cfg, q.as_ref())),
                    None => field(f, &st, &cfg, stats.as_ref(), t),
                })
                .collect::<Result<_>>()?,
        );
    }
    Ok(rows)
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

/// A CT's status with its live shaping.
#[derive(Debug)]
pub struct CtStatus {
    pub status: Status,
    /// Only a running (or suspended) CT has live shaping.
    pub shaping: Option<ShapingReport>,
    /// Why the live shaping could not be read, if so.
    pub shaping_error: Option<String>,
}

/// CT `ctid`'s status. Reading its live shaping needs the bpffs pins (root), and a failure
/// there must not hide the rest of the status: it lands in `shaping_error`.
pub fn status(host: &Host, pin_dir: &Path, ctid: Ctid) -> Result<CtStatus> {
    let status = container::status(host, ctid)?;
    let mut shaping_error = None;
    let shaping = if matches!(status.state, State::Running | State::Suspended) {
        match ct_shaping(pin_dir, ctid) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("reading CT {ctid}'s shaping: {}", ErrorChain(&e));
                tracing::warn!("{msg}");
                shaping_error = Some(msg);
                None
            }
        }
    } else {
        None
    };
    Ok(CtStatus {
        status,
        shaping,
        shaping_error,
    })
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
    let rows = match DatapathView::open_pinned(pin_dir)? {
        Some(dp) => dp.counters()?,
        None => Vec::new(),
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
    Ok(aggregate(
        &rows,
        &shaping,
        &filter,
        &Baseline::load(&base_path),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_trimmed_and_checked() {
        assert_eq!(
            parse_fields(" ctid, ,traffic.in,ip ").unwrap(),
            ["ctid", "traffic.in", "ip"]
        );
        assert_eq!(
            parse_fields(DEFAULT_FIELDS).unwrap(),
            ["ctid", "numproc", "status", "ip", "hostname"]
        );
        let e = parse_fields("ctid,bogus").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown field \"bogus\" (see `berth list -L`)"
        );
    }

    #[test]
    fn only_traffic_fields_read_the_counters() {
        let traffic: Vec<_> = FIELDS
            .iter()
            .map(|(f, _)| *f)
            .filter(|f| needs_traffic(f))
            .collect();
        assert_eq!(
            traffic,
            [
                "traffic.in",
                "traffic.out",
                "packets.in",
                "packets.out",
                "drops"
            ]
        );
    }
}
