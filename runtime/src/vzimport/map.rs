//! What each OpenVZ setting becomes in berth: MAP (carried exactly), APPROX (carried through a
//! stated rule) or DROP (no equivalent on a mainline kernel, with the reason).

use std::path::PathBuf;

use serde::Serialize;

use super::parse::{PAGE, Quantity, Setting, parse_bool, parse_pair};
use super::source::{Node, SourceCt, origin};
use super::{ImportError, map_net};
use crate::config::{CtConfig, PrivateLayout, validate_hostname};
use crate::ctid::{Ctid, validate_name};
use crate::net::NeighbourDevs;
use crate::size::Size;

/// The template name imported CTs carry: their files are their own copy, from no template here.
pub const IMPORTED_TEMPLATE: &str = "openvz-import";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Map,
    Approx,
    Drop,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Map => "MAP",
            Verdict::Approx => "APPROX",
            Verdict::Drop => "DROP",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub key: String,
    pub value: String,
    pub verdict: Verdict,
    /// The berth setting it became (`resources.memory = "1G"`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The rule (MAP/APPROX) or the reason (DROP).
    pub rule: String,
    /// `--strict` refuses the CT when this is dropped.
    pub matters: bool,
    /// `file:line` it was read from.
    pub source: String,
}

/// What importing one CT does and does not carry over.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ctid: u32,
    pub items: Vec<Item>,
    pub warnings: Vec<String>,
    /// Action scripts found for the CT: listed, not run, not carried.
    pub scripts: Vec<PathBuf>,
}

impl Report {
    /// The dropped settings `--strict` refuses to lose.
    pub fn strict_losses(&self) -> Vec<&Item> {
        self.items
            .iter()
            .filter(|i| i.matters && i.verdict == Verdict::Drop)
            .collect()
    }
}

/// Inputs of the mapping that are not in the config files.
#[derive(Debug, Clone, Default)]
pub struct MapOpts {
    /// CPUs of the source node, for a `CPULIMIT="N%"` (percent of the whole node).
    pub source_cpus: Option<u32>,
    /// Where `NAMESERVER="inherit"` / `SEARCHDOMAIN="inherit"` are resolved (default
    /// /etc/resolv.conf: the node the CT now runs on).
    pub resolv_conf: Option<PathBuf>,
}

/// The berth config an OpenVZ CT becomes (no UUID, id range or origin yet), and the report.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub cfg: CtConfig,
    pub report: Report,
}

/// Beancounters and other settings with no equivalent, and why.
const DROPPED: &[(&str, &str)] = &[
    (
        "KMEMSIZE",
        "kernel memory is charged to the CT's memory.max on cgroup v2; no separate limit",
    ),
    (
        "LOCKEDPAGES",
        "mlock is bounded by RLIMIT_MEMLOCK and memory.max; no per-CT beancounter",
    ),
    (
        "PRIVVMPAGES",
        "no virtual-memory accounting on mainline; memory.max bounds what is resident",
    ),
    (
        "SHMPAGES",
        "shared memory is charged to memory.max; the CT's ipc namespace has its own shm limits",
    ),
    (
        "NUMTCPSOCK",
        "no per-CT socket count on mainline (sockets are charged to memory.max)",
    ),
    (
        "NUMOTHERSOCK",
        "no per-CT socket count on mainline (sockets are charged to memory.max)",
    ),
    (
        "TCPSNDBUF",
        "socket buffers are charged to memory.max; per-netns tcp_wmem applies",
    ),
    (
        "TCPRCVBUF",
        "socket buffers are charged to memory.max; per-netns tcp_rmem applies",
    ),
    ("OTHERSOCKBUF", "socket buffers are charged to memory.max"),
    ("DGRAMRCVBUF", "socket buffers are charged to memory.max"),
    ("NUMFLOCK", "no per-CT file-lock count on mainline"),
    (
        "NUMPTY",
        "each CT has its own devpts instance; no per-CT pty count",
    ),
    (
        "NUMSIGINFO",
        "pending signals are bounded by RLIMIT_SIGPENDING",
    ),
    ("DCACHESIZE", "dentry cache is charged to memory.max"),
    (
        "NUMFILE",
        "open files are bounded by RLIMIT_NOFILE and fs.file-max",
    ),
    (
        "NUMIPTENT",
        "netfilter rules live in the CT's own netns; no count",
    ),
    (
        "OOMGUARPAGES",
        "no OOM guarantee on mainline; the kernel's OOM killer works per cgroup",
    ),
    ("AVNUMPROC", "a sizing hint with no effect of its own"),
    (
        "DISKINODES",
        "berth's disk quota limits blocks only (project quota on the private area)",
    ),
    (
        "QUOTATIME",
        "berth's disk quota is a hard limit without a grace time",
    ),
    (
        "QUOTAUGIDLIMIT",
        "second-level (per-user inside the CT) quotas are not offered",
    ),
    (
        "CPUMASK",
        "pinning to the source node's CPU numbers is not carried (the target's differ); CPUS bounds the CT",
    ),
    (
        "NODEMASK",
        "NUMA pinning to the source node's nodes is not carried",
    ),
    (
        "MEMINFO",
        "berth shows the kernel's /proc/meminfo; the CT's limits are in its cgroup files",
    ),
    (
        "IPTABLES",
        "every netfilter module is available in the CT's own network namespace",
    ),
    (
        "NETFILTER",
        "every netfilter module is available in the CT's own network namespace",
    ),
    ("IOLIMIT", "berth sets no io.max bandwidth limit"),
    ("IOPSLIMIT", "berth sets no io.max IOPS limit"),
    ("VERSION", "the config format's version; nothing to carry"),
    (
        "ORIGIN_SAMPLE",
        "the sample the CT was created from; its values are carried one by one",
    ),
    ("CONFIG_CUSTOMIZED", "a vzctl bookkeeping flag"),
    (
        "DISABLED",
        "berth has no disabled state; the CT is imported stopped, without onboot if it was off",
    ),
    ("VE_ROOT", "berth mounts every CT at <root>/root/<CTID>"),
    ("VE_LAYOUT", "the layout is detected from the private area"),
    (
        "LOCAL_UID",
        "berth allocates the CT's id range from its own pool",
    ),
    (
        "LOCAL_GID",
        "berth allocates the CT's id range from its own pool",
    ),
    ("HA_ENABLE", "no cluster HA manager"),
    ("HA_PRIO", "no cluster HA manager"),
    (
        "RATEBOUND",
        "berth's class rates are always ceilings (bounded)",
    ),
    ("UUID", "the imported CT gets a new identity"),
];

/// Node-wide keys of vz.conf that are the node's business, not a CT's: not reported.
const NODE_ONLY: &[&str] = &[
    "VE_PRIVATE",
    "VE_ROOT",
    "TRAFFIC_SHAPING",
    "NEIGHBOUR_DEVS",
    "IPV6",
    "BANDWIDTH",
    "TOTALRATE",
    "TEMPLATE",
    "CONFIGFILE",
    "DEF_OSTEMPLATE",
    "VE_LAYOUT",
];

/// Keys read elsewhere in the mapping (consumed by another key's rule).
const CONSUMED: &[&str] = &["VMGUARPAGES", "VE_PRIVATE"];

pub(super) struct Ctx<'a> {
    pub(super) node: &'a Node,
    pub(super) ct: &'a SourceCt,
    pub(super) opts: &'a MapOpts,
    pub(super) cfg: CtConfig,
    pub(super) items: Vec<Item>,
    pub(super) warnings: Vec<String>,
}

impl Ctx<'_> {
    pub(super) fn push(
        &mut self,
        key: &str,
        s: &Setting,
        verdict: Verdict,
        target: Option<String>,
        rule: impl Into<String>,
    ) {
        self.items.push(Item {
            key: key.to_string(),
            value: s.value.clone(),
            verdict,
            target,
            rule: rule.into(),
            matters: false,
            source: origin(s),
        });
    }

    pub(super) fn drop_item(
        &mut self,
        key: &str,
        s: &Setting,
        why: impl Into<String>,
        matters: bool,
    ) {
        self.push(key, s, Verdict::Drop, None, why);
        self.items.last_mut().expect("pushed").matters = matters;
    }

    pub(super) fn get(&self, key: &str) -> Option<Setting> {
        self.node.setting(self.ct, key)
    }
}

pub(super) fn bad(s: &Setting, key: &str, msg: impl Into<String>) -> ImportError {
    ImportError::Parse(s.error(key, msg))
}

/// Maps one CT's settings (see the module docs). A malformed value is an error naming the
/// file, line and key; nothing is guessed.
pub fn map_ct(node: &Node, ct: &SourceCt, opts: &MapOpts) -> Result<Mapped, ImportError> {
    let ctid = Ctid::new(ct.ctid)
        .map_err(|e| ImportError::Invalid(format!("OpenVZ CTID {}: {e}", ct.ctid)))?;
    let mut cfg = CtConfig::new(ctid, IMPORTED_TEMPLATE.into());
    cfg.layout = PrivateLayout::Copy;
    let mut c = Ctx {
        node,
        ct,
        opts,
        cfg,
        items: Vec::new(),
        warnings: Vec::new(),
    };
    // The CT's own keys, then the node's defaults for CT keys it does not set.
    let mut keys: Vec<(String, Setting)> = ct
        .conf
        .settings
        .iter()
        .map(|(k, s)| (k.clone(), s.clone()))
        .collect();
    for (k, s) in &node.global.settings {
        if !ct.conf.settings.contains_key(k) && !NODE_ONLY.contains(&k.as_str()) && is_ct_key(k) {
            keys.push((k.clone(), c.get(k).unwrap_or_else(|| s.clone())));
        }
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, s) in &keys {
        if CONSUMED.contains(&key.as_str()) && key != "VMGUARPAGES" {
            continue;
        }
        map_key(&mut c, key, s)?;
    }
    if !ct.names.is_empty() && ct.conf.get("NAME").is_none() {
        let s = Setting {
            value: ct.names.join(" "),
            file: node
                .conf_dir
                .parent()
                .unwrap_or(&node.conf_dir)
                .join("names"),
            line: 0,
        };
        map_name(&mut c, "names/", &s, &ct.names[0]);
    }
    if let Some(nd) = c.get("NEIGHBOUR_DEVS") {
        let v = nd.value.trim();
        c.cfg.net.neighbour_devs = if v.is_empty() || v == "detect" || v == "all" {
            NeighbourDevs::Detect
        } else {
            NeighbourDevs::List(v.split_whitespace().map(str::to_string).collect())
        };
        let verdict = if v == "all" {
            Verdict::Approx
        } else {
            Verdict::Map
        };
        let rule = if v == "all" {
            "`all` becomes `detect`: the device routing towards each address answers for it"
        } else {
            "host devices answering ARP/NDP for the CT's routed addresses"
        };
        c.push(
            "NEIGHBOUR_DEVS",
            &nd,
            verdict,
            Some(format!("net.neighbour_devs = {v:?}")),
            rule,
        );
    }
    for sc in &ct.scripts {
        c.warnings.push(format!(
            "action script {} is listed, not run or carried: redo what it does by hand",
            sc.display()
        ));
    }
    let mut cfg = c.cfg;
    if let Some(sh) = cfg.shaping.take() {
        cfg.shaping = sh.non_empty();
    }
    cfg.validate(&ct.conf.path)
        .map_err(|e| ImportError::Invalid(crate::error_chain::ErrorChain(&e).to_string()))?;
    Ok(Mapped {
        cfg,
        report: Report {
            ctid: ct.ctid,
            items: c.items,
            warnings: c.warnings,
            scripts: ct.scripts.clone(),
        },
    })
}

/// Keys the node's vz.conf may hold as defaults for every CT.
fn is_ct_key(k: &str) -> bool {
    matches!(
        k,
        "RATE"
            | "IPTABLES"
            | "NETFILTER"
            | "STOP_TIMEOUT"
            | "ONBOOT"
            | "CPUUNITS"
            | "IOPRIO"
            | "NAMESERVER"
            | "SEARCHDOMAIN"
            | "FEATURES"
            | "CAPABILITY"
    ) || DROPPED.iter().any(|(d, _)| *d == k) && !NODE_ONLY.contains(&k)
}

fn u64_of(s: &Setting, key: &str) -> Result<u64, ImportError> {
    s.value
        .trim()
        .parse()
        .map_err(|_| bad(s, key, format!("{:?} is not a whole number", s.value)))
}

fn map_name(c: &mut Ctx<'_>, key: &str, s: &Setting, name: &str) {
    match validate_name(name) {
        Ok(()) => {
            c.cfg.name = Some(name.to_string());
            c.push(
                key,
                s,
                Verdict::Map,
                Some(format!("name = {name:?}")),
                "the CT's name",
            );
        }
        Err(e) => c.drop_item(
            key,
            s,
            format!("{e}; set a valid one with `berth set <CT> --name N --save`"),
            false,
        ),
    }
}

fn map_key(c: &mut Ctx<'_>, key: &str, s: &Setting) -> Result<(), ImportError> {
    let v = s.value.trim();
    match key {
        "HOSTNAME" => match validate_hostname(v) {
            Ok(()) => {
                c.cfg.hostname = Some(v.to_string());
                c.push(
                    key,
                    s,
                    Verdict::Map,
                    Some(format!("hostname = {v:?}")),
                    "the CT's host name",
                );
            }
            Err(why) => c.drop_item(key, s, why, false),
        },
        "NAME" => map_name(c, key, s, v),
        "OSTEMPLATE" => c.push(
            key,
            s,
            Verdict::Map,
            Some(format!("imported.ostemplate = {v:?}")),
            "kept in the import note; the files are the CT's own copy",
        ),
        "ONBOOT" => {
            c.cfg.onboot = parse_bool(v).map_err(|m| bad(s, key, m))?;
            c.push(
                key,
                s,
                Verdict::Map,
                Some(format!("onboot = {}", c.cfg.onboot)),
                "started by `berth start --all-onboot` at boot",
            );
        }
        "BOOTORDER" => {
            let n = u32::try_from(u64_of(s, key)?).map_err(|_| bad(s, key, "out of range"))?;
            c.cfg.bootorder = Some(n);
            c.push(
                key,
                s,
                Verdict::Map,
                Some(format!("bootorder = {n}")),
                "higher starts first, unset last",
            );
        }
        "STOP_TIMEOUT" => {
            let n = u32::try_from(u64_of(s, key)?).map_err(|_| bad(s, key, "out of range"))?;
            c.cfg.stop_timeout = n;
            c.push(
                key,
                s,
                Verdict::Map,
                Some(format!("stop_timeout = {n}")),
                "seconds stop waits for init",
            );
        }
        "IP_ADDRESS" => map_net::map_ips(c, key, s)?,
        "NETIF" => map_net::map_netif(c, key, s)?,
        "NAMESERVER" | "SEARCHDOMAIN" => map_net::map_resolv(c, key, s)?,
        "PHYSPAGES" => map_memory(c, key, s)?,
        "SWAPPAGES" => {
            let (_, l) = parse_pair(v).map_err(|m| bad(s, key, m))?;
            match l.bytes(PAGE) {
                Some(b) => {
                    c.cfg.resources.swap = Some(Size::Bytes(b));
                    c.push(
                        key,
                        s,
                        Verdict::Map,
                        Some(format!("resources.swap = \"{}\"", Size::Bytes(b))),
                        "limit in 4 KiB pages → bytes",
                    );
                }
                None => c.push(key, s, Verdict::Map, None, "unlimited: no swap limit"),
            }
        }
        "VMGUARPAGES" => {
            // Consumed by PHYSPAGES for pre-VSwap configs; reported here for VSwap ones.
            if !is_pre_vswap(c)? {
                c.drop_item(
                    key,
                    s,
                    "a memory guarantee; berth sets no memory.low",
                    false,
                );
            } else if c.get("PHYSPAGES").is_none() {
                memory_from_guarantee(c)?;
            }
        }
        "NUMPROC" => {
            let (b, l) = parse_pair(v).map_err(|m| bad(s, key, m))?;
            match l.in_units(1) {
                Some(n) => {
                    c.cfg.resources.numproc = Some(n);
                    let (verdict, rule) = if b == l {
                        (Verdict::Map, "pids.max")
                    } else {
                        (
                            Verdict::Approx,
                            "pids.max = the limit; the barrier has no equivalent",
                        )
                    };
                    c.push(
                        key,
                        s,
                        verdict,
                        Some(format!("resources.numproc = {n}")),
                        rule,
                    );
                }
                None => c.push(key, s, Verdict::Map, None, "unlimited: no pids limit"),
            }
        }
        "CPUUNITS" => {
            let n = u64_of(s, key)?;
            c.cfg.resources.cpuunits = Some(n);
            c.push(
                key,
                s,
                Verdict::Map,
                Some(format!("resources.cpuunits = {n}")),
                "same units (cpu.weight derived as for `set --cpuunits`)",
            );
        }
        "CPULIMIT" => map_cpulimit(c, key, s)?,
        "CPUS" => {
            let n = u32::try_from(u64_of(s, key)?).map_err(|_| bad(s, key, "out of range"))?;
            if n > 0 {
                c.cfg.resources.cpus = Some(n);
            }
            c.push(
                key,
                s,
                Verdict::Map,
                (n > 0).then(|| format!("resources.cpus = {n}")),
                "number of CPUs (cpu.max)",
            );
        }
        "DISKSPACE" => {
            let (b, l) = parse_pair(v).map_err(|m| bad(s, key, m))?;
            match l.bytes(1024) {
                Some(bytes) => {
                    c.cfg.resources.diskspace = Some(Size::Bytes(bytes));
                    let target = Some(format!("resources.diskspace = \"{}\"", Size::Bytes(bytes)));
                    if b == l {
                        c.push(key, s, Verdict::Map, target, "KiB → bytes (project quota)");
                    } else {
                        c.push(key, s, Verdict::Approx, target, "the limit in KiB → bytes; the barrier (a soft limit with grace) has no equivalent");
                    }
                }
                None => c.push(key, s, Verdict::Map, None, "unlimited: no disk quota"),
            }
        }
        "IOPRIO" => {
            let p = u64_of(s, key)?;
            if p > 7 {
                return Err(bad(s, key, "IOPRIO must be 0..7"));
            }
            let w = (100.0 * 2f64.powi(p as i32 - 4))
                .round()
                .clamp(10.0, 1000.0) as u32;
            c.cfg.resources.ioweight = Some(w);
            c.push(key, s, Verdict::Approx, Some(format!("resources.ioweight = {w}")), "ioweight = 100 × 2^(IOPRIO−4), at least 10 (IOPRIO 4, the default, is io.weight's default 100)");
        }
        "RATE" => map_net::map_rate(c, key, s)?,
        "CAPABILITY" => {
            let on = v
                .split_whitespace()
                .any(|t| t.to_ascii_lowercase().ends_with(":on"));
            c.drop_item(key, s, "berth gives every CT the same capability set (OpenVZ's default minus nothing a CT may need); extra ones are not granted", on);
        }
        "FEATURES" => {
            let on = v
                .split_whitespace()
                .any(|t| t.to_ascii_lowercase().ends_with(":on"));
            c.drop_item(
                key,
                s,
                "OpenVZ kernel features (sysfs, nfs, ppp, ipgre ...) are not switches on mainline",
                on,
            );
        }
        "DEVICES" | "DEVNODES" => {
            c.drop_item(
                key,
                s,
                "berth gives CTs no host devices (its /dev is a tmpfs with the basic nodes)",
                !v.is_empty(),
            );
        }
        _ => {
            if let Some((_, why)) = DROPPED.iter().find(|(d, _)| *d == key) {
                c.drop_item(key, s, *why, false);
            } else {
                c.drop_item(key, s, "unknown to the importer", false);
            }
        }
    }
    Ok(())
}

fn is_pre_vswap(c: &Ctx<'_>) -> Result<bool, ImportError> {
    // VSwap CTs have a PHYSPAGES limit; older ones are unlimited there and use VMGUARPAGES.
    let Some(p) = c.get("PHYSPAGES") else {
        return Ok(true);
    };
    let (_, l) = parse_pair(&p.value).map_err(|m| bad(&p, "PHYSPAGES", m))?;
    Ok(l == Quantity::Unlimited || l.in_units(PAGE) == Some(0))
}

fn map_memory(c: &mut Ctx<'_>, key: &str, s: &Setting) -> Result<(), ImportError> {
    let (_, l) = parse_pair(&s.value).map_err(|m| bad(s, key, m))?;
    if !is_pre_vswap(c)? {
        let b = l.bytes(PAGE).expect("limited");
        c.cfg.resources.memory = Some(Size::Bytes(b));
        c.push(
            key,
            s,
            Verdict::Map,
            Some(format!("resources.memory = \"{}\"", Size::Bytes(b))),
            "VSwap RAM limit in 4 KiB pages → bytes (memory.max)",
        );
        return Ok(());
    }
    if c.get("VMGUARPAGES").is_none() {
        c.push(key, s, Verdict::Map, None, "unlimited: no memory limit");
        return Ok(());
    }
    c.push(
        key,
        s,
        Verdict::Approx,
        None,
        "pre-VSwap config: no RAM limit here; memory comes from VMGUARPAGES",
    );
    memory_from_guarantee(c)
}

/// A pre-VSwap CT's memory: the VMGUARPAGES barrier, with a warning.
fn memory_from_guarantee(c: &mut Ctx<'_>) -> Result<(), ImportError> {
    let g = c.get("VMGUARPAGES").expect("checked by the caller");
    let (gb, _) = parse_pair(&g.value).map_err(|m| bad(&g, "VMGUARPAGES", m))?;
    match gb.bytes(PAGE) {
        Some(b) if b > 0 => {
            c.cfg.resources.memory = Some(Size::Bytes(b));
            c.push("VMGUARPAGES", &g, Verdict::Approx, Some(format!("resources.memory = \"{}\"", Size::Bytes(b))), "pre-VSwap: memory.max = the VMGUARPAGES barrier (the memory the CT was guaranteed)");
            c.warnings.push(format!(
                "pre-VSwap config: memory set to the VMGUARPAGES guarantee ({}); PRIVVMPAGES and the other beancounters are not enforced — check the CT's memory",
                Size::Bytes(b)
            ));
        }
        _ => {
            c.push(
                "VMGUARPAGES",
                &g,
                Verdict::Drop,
                None,
                "unlimited guarantee: no memory limit could be derived",
            );
            c.warnings.push(
                "pre-VSwap config without a VMGUARPAGES barrier: the CT has no memory limit".into(),
            );
        }
    }
    Ok(())
}

fn map_cpulimit(c: &mut Ctx<'_>, key: &str, s: &Setting) -> Result<(), ImportError> {
    let v = s.value.trim();
    if let Some(pct) = v.strip_suffix('%') {
        let p: f64 = pct
            .trim()
            .parse()
            .map_err(|_| bad(s, key, format!("{v:?} is not a percentage")))?;
        let Some(n) = c.opts.source_cpus else {
            return Err(bad(
                s,
                key,
                format!(
                    "{v:?} is a share of the source node's CPUs: give their number with --source-cpus N"
                ),
            ));
        };
        let one_cpu = (p * f64::from(n)).round() as u32;
        if one_cpu > 0 {
            c.cfg.resources.cpulimit = Some(one_cpu);
        }
        c.push(
            key,
            s,
            Verdict::Approx,
            Some(format!("resources.cpulimit = {one_cpu}")),
            format!("{p}% of the source node's {n} CPUs = {one_cpu}% of one CPU"),
        );
        return Ok(());
    }
    if v.ends_with(['m', 'M']) {
        c.drop_item(
            key,
            s,
            "a limit in MHz depends on the source node's clock; set --cpulimit in % of one CPU",
            true,
        );
        return Ok(());
    }
    let n = u32::try_from(u64_of(s, key)?).map_err(|_| bad(s, key, "out of range"))?;
    if n > 0 {
        c.cfg.resources.cpulimit = Some(n);
    }
    c.push(
        key,
        s,
        Verdict::Map,
        (n > 0).then(|| format!("resources.cpulimit = {n}")),
        "percent of one CPU (cpu.max)",
    );
    Ok(())
}
