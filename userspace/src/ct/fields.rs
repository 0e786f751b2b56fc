//! `list`'s fields: vzlist-style names and headers, each a value of the [`CtView`] JSON.
//!
//! [`CtView`]: super::CtView

use serde_json::Value;

use super::Need;
use crate::inventory::{InventoryError, Result};

/// How a human view shows a field's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Left-aligned text.
    Text,
    /// Right-aligned count.
    Count,
    /// Right-aligned size, human-readable (raw in JSON).
    Bytes,
    /// Right-aligned seconds, two decimals.
    Seconds,
}

/// One `list` field: its name (vzlist style, dots for suffixes), column header, where its
/// value sits in the [`CtView`] JSON, and what it holds.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub header: &'static str,
    pub path: &'static [&'static str],
    pub kind: Kind,
    pub doc: &'static str,
}

impl Field {
    /// The field's value in a view's JSON (`null` if absent).
    pub fn value<'v>(&self, view: &'v Value) -> &'v Value {
        self.path
            .iter()
            .try_fold(view, |v, k| v.get(k))
            .unwrap_or(&Value::Null)
    }

    /// What the field needs read beyond config and cgroup.
    pub fn need(&self) -> Need {
        Need {
            traffic: self.path[0] == "traffic",
            quota: self.path[0] == "quota",
            shaping: self.path[0] == "shaping",
        }
    }
}

const fn f(
    name: &'static str,
    header: &'static str,
    path: &'static [&'static str],
    kind: Kind,
    doc: &'static str,
) -> Field {
    Field {
        name,
        header,
        path,
        kind,
        doc,
    }
}

use Kind::{Bytes, Count, Seconds, Text};

/// Every `list` field.
pub const FIELDS: &[Field] = &[
    f("ctid", "CTID", &["ctid"], Count, "container ID"),
    f(
        "uuid",
        "UUID",
        &["uuid"],
        Text,
        "the CT's identity, never reused (- : made by an older berth, not started since)",
    ),
    f("name", "NAME", &["name"], Text, "name set with --name"),
    f("hostname", "HOSTNAME", &["hostname"], Text, "host name"),
    f(
        "status",
        "STATUS",
        &["status"],
        Text,
        "running, suspended, mounted, stopped or migrated",
    ),
    f(
        "template",
        "OSTEMPLATE",
        &["template"],
        Text,
        "template the CT was created from",
    ),
    f(
        "privileged",
        "PRIVILEGED",
        &["privileged"],
        Text,
        "yes: no user namespace, the CT's root is the host's root",
    ),
    f(
        "layout",
        "LAYOUT",
        &["layout"],
        Text,
        "overlay (over the template) or copy",
    ),
    f(
        "uid_base",
        "UID_BASE",
        &["uid_base"],
        Count,
        "host uid of the CT's root (its id range's start)",
    ),
    f(
        "init_pid",
        "INIT_PID",
        &["init_pid"],
        Count,
        "host PID of the CT's init",
    ),
    f(
        "ip",
        "IP_ADDR",
        &["ip"],
        Text,
        "routed and static addresses",
    ),
    f(
        "numproc",
        "NPROC",
        &["numproc", "held"],
        Count,
        "processes and threads in the CT",
    ),
    f(
        "numproc.m",
        "NPROC.M",
        &["numproc", "maxheld"],
        Count,
        "most processes and threads at once (pids.peak)",
    ),
    f(
        "numproc.b",
        "NPROC.B",
        &["numproc", "barrier"],
        Count,
        "process barrier (= the limit: the pids controller has one)",
    ),
    f(
        "numproc.l",
        "NPROC.L",
        &["numproc", "limit"],
        Count,
        "process limit (--numproc; live when running)",
    ),
    f(
        "numproc.f",
        "NPROC.F",
        &["numproc", "failcnt"],
        Count,
        "forks refused at the limit",
    ),
    f(
        "memory",
        "MEMORY",
        &["memory", "held"],
        Bytes,
        "memory in use",
    ),
    f(
        "memory.m",
        "MEMORY.M",
        &["memory", "maxheld"],
        Bytes,
        "most memory in use at once",
    ),
    f(
        "memory.b",
        "MEMORY.B",
        &["memory", "barrier"],
        Bytes,
        "where reclaim starts (soft limit / memory.high; else the limit)",
    ),
    f(
        "memory.l",
        "MEMORY.L",
        &["memory", "limit"],
        Bytes,
        "memory limit (--memory; live when running)",
    ),
    f(
        "memory.f",
        "MEMORY.F",
        &["memory", "failcnt"],
        Count,
        "times the memory limit was hit",
    ),
    f("swap", "SWAP", &["swap", "held"], Bytes, "swap in use"),
    f(
        "swap.m",
        "SWAP.M",
        &["swap", "maxheld"],
        Bytes,
        "most swap in use at once",
    ),
    f(
        "swap.b",
        "SWAP.B",
        &["swap", "barrier"],
        Bytes,
        "swap barrier (= the limit)",
    ),
    f(
        "swap.l",
        "SWAP.L",
        &["swap", "limit"],
        Bytes,
        "swap allowed on top of memory (--swap; live when running)",
    ),
    f(
        "oom_kills",
        "OOM_KILLS",
        &["oom_kills"],
        Count,
        "processes killed by the OOM killer",
    ),
    f(
        "cpu.usage",
        "CPU_USAGE",
        &["cpu", "usage_seconds"],
        Seconds,
        "CPU time used, seconds",
    ),
    f(
        "cpu.throttled",
        "CPU_THROTTLED",
        &["cpu", "throttled_periods"],
        Count,
        "periods the CPU limit throttled the CT",
    ),
    f(
        "cpulimit",
        "CPULIM",
        &["cpu", "limit_percent"],
        Count,
        "CPU limit, percent of one CPU (live when running)",
    ),
    f("cpuunits", "CPUUNI", &["cpu", "units"], Count, "CPU weight"),
    f(
        "cpus",
        "CPUS",
        &["cpu", "cpus"],
        Count,
        "CPUs the CT may use",
    ),
    f(
        "diskspace.h",
        "DQBLOCKS.H",
        &["diskspace_limit_bytes"],
        Bytes,
        "disk quota (--diskspace)",
    ),
    f(
        "traffic.in",
        "TRAFFIC.IN",
        &["traffic", "in_bytes"],
        Bytes,
        "bytes delivered to the CT, all classes (eBPF counters: never reset while the CT exists, from 0 for a new CT)",
    ),
    f(
        "traffic.out",
        "TRAFFIC.OUT",
        &["traffic", "out_bytes"],
        Bytes,
        "bytes sent by the CT, all classes",
    ),
    f(
        "packets.in",
        "PACKETS.IN",
        &["traffic", "in_packets"],
        Count,
        "packets delivered to the CT",
    ),
    f(
        "packets.out",
        "PACKETS.OUT",
        &["traffic", "out_packets"],
        Count,
        "packets sent by the CT",
    ),
    f(
        "drops",
        "DROPS",
        &["traffic", "drops"],
        Count,
        "packets dropped by anti-spoofing, all reasons",
    ),
    f(
        "quota.limit",
        "QUOTA.LIMIT",
        &["quota", "limit_bytes"],
        Bytes,
        "transfer quota of the period, top-ups included (as of berthd's last tick; else the configured one)",
    ),
    f(
        "quota.hard",
        "QUOTA.HARD",
        &["quota", "hard_limit_bytes"],
        Bytes,
        "hard transfer limit of the period",
    ),
    f(
        "quota.used",
        "QUOTA.USED",
        &["quota", "used_bytes"],
        Bytes,
        "bytes counted against the quota this period (as of berthd's last tick)",
    ),
    f(
        "quota.state",
        "QUOTA.STATE",
        &["quota", "state"],
        Text,
        "normal, warned, throttled, cut, suspended or stopped (berthd's last tick)",
    ),
];

/// The fields of a listing that names none (vzlist's).
pub const DEFAULT_FIELDS: &str = "ctid,numproc,status,ip,hostname";
/// `list -n`: the name instead of the host name.
pub const DEFAULT_NAME_FIELDS: &str = "ctid,numproc,status,ip,name";

/// The fields of a comma-separated list, each checked against [`FIELDS`].
pub fn parse_fields(spec: &str) -> Result<Vec<&'static Field>> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(field)
        .collect()
}

/// The field named `name`.
pub fn field(name: &str) -> Result<&'static Field> {
    FIELDS
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| InventoryError::UnknownField(name.to_string()))
}

/// What every field of `fields` needs, together.
pub fn need_of(fields: &[&Field]) -> Need {
    fields.iter().fold(Need::default(), |a, f| a.or(f.need()))
}

/// The part of a view's JSON that `fields` cover, keys nested as in the full object
/// (`list -o numproc.l --json` → `{"numproc": {"limit": …}}`).
pub fn subset(view: &Value, fields: &[&Field]) -> Value {
    let mut out = serde_json::Map::new();
    for f in fields {
        let (last, parents) = f.path.split_last().expect("a path has a key");
        let mut obj = &mut out;
        for k in parents {
            obj = obj
                .entry((*k).to_string())
                .or_insert_with(|| Value::Object(Default::default()))
                .as_object_mut()
                .expect("paths hold objects");
        }
        obj.insert((*last).to_string(), f.value(view).clone());
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_are_unique_trimmed_and_checked() {
        for f in FIELDS {
            assert_eq!(FIELDS.iter().filter(|g| g.name == f.name).count(), 1);
            assert!(!f.path.iter().any(|k| k.contains('.')), "{}", f.name);
        }
        let names: Vec<_> = parse_fields(" ctid, ,traffic.in,ip ")
            .unwrap()
            .iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["ctid", "traffic.in", "ip"]);
        let e = parse_fields("ctid,bogus").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown field \"bogus\" (see `berth list -L`)"
        );
    }

    #[test]
    fn only_traffic_fields_read_the_counters() {
        let fs = parse_fields("ctid,numproc.l,quota.state").unwrap();
        assert_eq!(
            need_of(&fs),
            Need {
                traffic: false,
                quota: true,
                shaping: false
            }
        );
        let traffic: Vec<_> = FIELDS
            .iter()
            .filter(|f| f.need().traffic)
            .map(|f| f.name)
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

    #[test]
    fn subset_nests_like_the_full_object() {
        let view = json!({"ctid": 5, "numproc": {"held": 3, "limit": 64}, "ip": ["192.0.2.1"]});
        let fs = parse_fields("ctid,numproc.l,numproc,ip,quota.used").unwrap();
        assert_eq!(
            subset(&view, &fs),
            json!({"ctid": 5, "numproc": {"limit": 64, "held": 3}, "ip": ["192.0.2.1"],
                   "quota": {"used_bytes": null}})
        );
    }
}
