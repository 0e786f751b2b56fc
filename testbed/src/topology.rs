//! The topology file (TOML): what a testbed is made of and which checks it runs. Parsing is
//! strict (`deny_unknown_fields`) and every error names the file, the line and the key, so a
//! broken file is refused before anything is created.
//!
//! ```toml
//! berthd = true                       # run berthd on the testbed's host (default false)
//! [uplink]                            # the upstream router namespace
//! addrs = ["192.0.2.1/24", "2001:db8:1::1/64"]
//! prefixes = ["198.51.100.0/24", "2001:db8:2::/64"]   # routed to the host
//! [host]                              # the namespace berth and the CTs' host sides live in
//! addrs = ["192.0.2.2/24", "2001:db8:1::2/64"]
//! [[bridge]]
//! name = "br0"
//! addrs = ["198.51.100.1/24", "2001:db8:2::1/64"]
//! [[node]]
//! name = "a"                          # [a-z0-9-], at most 12 characters
//! kind = "ct"                         # "ct" (a real berth CT) or "netns" (a plain namespace)
//! mode = "routed"                     # "routed" or "bridged" (then `bridge = "br0"`)
//! ctid = 101                          # CTs only
//! addrs = ["192.0.2.101", "2001:db8:1::101"]
//! link = { rate = "10mbit" }          # shaping both ways (see "Impairments" below)
//! [[check]]
//! kind = "ping"                       # ping | rate | accounting | spoof | loss
//! from = "a"
//! to = "uplink"
//! ```
//!
//! Impairments (this kernel has no netem), keys of `link`, each way of the node's link:
//! `loss_every = 100` drops every 100th IP packet, `loss = 0.01` a seeded fraction (`seed`,
//! default 1) — both by an eBPF classifier, exact and repeatable; `delay = "20ms"` with an
//! optional `jitter = "2ms"` (plain namespace nodes) holds frames in a userspace delay line.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// Names the testbed gives its own namespaces; nodes may not take them.
pub const HOST: &str = "host";
pub const UPLINK: &str = "uplink";

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("read topology {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `file:line:column: message`; the message names the key.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    berthd: bool,
    uplink: Option<NetSpec>,
    host: Option<HostSpec>,
    #[serde(default, rename = "bridge")]
    bridges: Vec<BridgeSpec>,
    #[serde(default, rename = "node")]
    nodes: Vec<NodeSpec>,
    #[serde(default, rename = "check")]
    checks: Vec<CheckSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetSpec {
    #[serde(default)]
    addrs: Vec<Spanned<String>>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSpec {
    #[serde(default)]
    addrs: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BridgeSpec {
    name: Spanned<String>,
    #[serde(default)]
    addrs: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSpec {
    name: Spanned<String>,
    #[serde(default)]
    kind: Kind,
    #[serde(default)]
    mode: Mode,
    ctid: Option<Spanned<u32>>,
    #[serde(default)]
    addrs: Vec<Spanned<String>>,
    bridge: Option<Spanned<String>>,
    link: Option<LinkSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkSpec {
    rate: Option<Spanned<String>>,
    loss_every: Option<Spanned<u32>>,
    loss: Option<Spanned<f64>>,
    seed: Option<Spanned<u64>>,
    delay: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
}

/// A flat struct rather than an enum tagged by `kind`: serde's tagged enums buffer their
/// content, which loses the spans the error messages need.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckSpec {
    kind: Spanned<CheckKind>,
    name: Option<String>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    node: Option<Spanned<String>>,
    family: Option<Spanned<String>>,
    expect: Option<Spanned<String>>,
    tolerance: Option<Spanned<f64>>,
    seconds: Option<Spanned<u32>>,
    count: Option<Spanned<u32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Netns,
    Ct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Routed,
    Bridged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Ping,
    Rate,
    Accounting,
    Spoof,
    Loss,
}

/// A validated topology.
#[derive(Debug, Clone)]
pub struct Topology {
    pub file: PathBuf,
    /// FNV-1a 64 of the file's bytes, hex: tells runs of different versions apart.
    pub hash: String,
    pub berthd: bool,
    pub uplink_addrs: Vec<IpNet>,
    pub uplink_prefixes: Vec<IpNet>,
    pub host_addrs: Vec<IpNet>,
    pub bridges: Vec<Bridge>,
    pub nodes: Vec<Node>,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone)]
pub struct Bridge {
    pub name: String,
    pub addrs: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub kind: Kind,
    pub mode: Mode,
    pub ctid: Option<u32>,
    pub addrs: Vec<IpNet>,
    pub bridge: Option<String>,
    /// Shaping rate both ways, as written (tc units) and in bit/s.
    pub rate: Option<(String, u64)>,
    pub impair: Impair,
}

/// A link's impairments, each way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Impair {
    /// Drop every Nth IP packet.
    pub loss_every: Option<u32>,
    /// Drop a seeded fraction of the IP packets.
    pub loss: Option<f64>,
    pub seed: u64,
    pub delay: Option<std::time::Duration>,
    pub jitter: std::time::Duration,
}

impl Impair {
    pub fn lossy(&self) -> bool {
        self.loss_every.is_some() || self.loss.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub kind: CheckKind,
    pub from: String,
    pub to: String,
    pub families: Vec<Family>,
    /// Ping: whether the target must answer.
    pub expect_reach: bool,
    pub tolerance: f64,
    pub seconds: u32,
    pub count: u32,
}

impl Topology {
    pub fn from_file(path: &Path) -> Result<Topology, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Topology::parse(&text, path)
    }

    /// Parses `text`; `file` only names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Topology, TopologyError> {
        let v = Validator { text, file };
        let spec: FileSpec = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            v.err(at, e.message().trim_end().to_owned())
        })?;
        v.topology(spec)
    }

    /// What an unprivileged user can build of this topology: CT nodes as plain namespaces,
    /// no berthd, no eBPF loss (the checks needing them report skipped).
    pub fn make_rootless(&mut self) {
        self.berthd = false;
        for n in &mut self.nodes {
            n.kind = Kind::Netns;
            n.ctid = None;
            n.impair.loss_every = None;
            n.impair.loss = None;
        }
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Addresses of any named endpoint: a node, the uplink or the host.
    pub fn addrs_of(&self, name: &str) -> Vec<IpNet> {
        match name {
            UPLINK => self.uplink_addrs.clone(),
            HOST => self.host_addrs.clone(),
            n => self.node(n).map(|n| n.addrs.clone()).unwrap_or_default(),
        }
    }
}

struct Validator<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Validator<'_> {
    fn err(&self, at: usize, message: String) -> TopologyError {
        let before = &self.text[..at.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        TopologyError::Invalid {
            file: self.file.to_owned(),
            line,
            column,
            message,
        }
    }

    fn spanned_err<T>(
        &self,
        s: &Spanned<T>,
        key: &str,
        why: impl std::fmt::Display,
    ) -> TopologyError {
        self.err(s.span().start, format!("key `{key}`: {why}"))
    }

    fn nets(
        &self,
        list: &[Spanned<String>],
        key: &str,
        host_len: bool,
    ) -> Result<Vec<IpNet>, TopologyError> {
        list.iter()
            .map(|s| {
                let raw = s.get_ref().as_str();
                if host_len && let Ok(a) = raw.parse::<IpAddr>() {
                    return Ok(IpNet::from(a));
                }
                raw.parse::<IpNet>().map_err(|_| {
                    self.spanned_err(
                        s,
                        key,
                        format!(
                            "`{raw}` is not an address with a prefix length (e.g. 192.0.2.1/24)"
                        ),
                    )
                })
            })
            .collect()
    }

    fn topology(&self, spec: FileSpec) -> Result<Topology, TopologyError> {
        let (uplink_addrs, uplink_prefixes) = match &spec.uplink {
            Some(u) => (
                self.nets(&u.addrs, "uplink.addrs", false)?,
                self.nets(&u.prefixes, "uplink.prefixes", false)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        let uplink_addrs = if uplink_addrs.is_empty() {
            vec![net("192.0.2.1/24"), net("2001:db8:1::1/64")]
        } else {
            uplink_addrs
        };
        let host_addrs = match &spec.host {
            Some(h) if !h.addrs.is_empty() => self.nets(&h.addrs, "host.addrs", false)?,
            _ => vec![net("192.0.2.2/24"), net("2001:db8:1::2/64")],
        };
        let mut bridges = Vec::new();
        for b in &spec.bridges {
            check_ifname(b.name.get_ref(), 15)
                .map_err(|w| self.spanned_err(&b.name, "bridge.name", w))?;
            if bridges.iter().any(|x: &Bridge| &x.name == b.name.get_ref())
                || matches!(b.name.get_ref().as_str(), "up0" | "lo")
            {
                return Err(self.spanned_err(
                    &b.name,
                    "bridge.name",
                    format!("`{}` is taken", b.name.get_ref()),
                ));
            }
            bridges.push(Bridge {
                name: b.name.get_ref().clone(),
                addrs: self.nets(&b.addrs, "bridge.addrs", false)?,
            });
        }
        let mut nodes: Vec<Node> = Vec::new();
        for n in &spec.nodes {
            let name = n.name.get_ref().clone();
            check_ifname(&name, 12).map_err(|w| self.spanned_err(&n.name, "node.name", w))?;
            if name == HOST || name == UPLINK || nodes.iter().any(|x| x.name == name) {
                return Err(self.spanned_err(&n.name, "node.name", format!("`{name}` is taken")));
            }
            let ctid = match (&n.ctid, n.kind) {
                (Some(c), Kind::Ct) => {
                    let id = *c.get_ref();
                    if id == 0 || nodes.iter().any(|x| x.ctid == Some(id)) {
                        return Err(self.spanned_err(
                            c,
                            "node.ctid",
                            format!("{id} is 0 or taken"),
                        ));
                    }
                    Some(id)
                }
                (Some(c), Kind::Netns) => {
                    return Err(self.spanned_err(
                        c,
                        "node.ctid",
                        "only `kind = \"ct\"` nodes have a CTID",
                    ));
                }
                (None, Kind::Ct) => {
                    return Err(self.spanned_err(
                        &n.name,
                        "node.ctid",
                        format!("CT node `{name}` needs a ctid"),
                    ));
                }
                (None, Kind::Netns) => None,
            };
            let bridge = match (n.mode, &n.bridge) {
                (Mode::Bridged, Some(b)) => {
                    if !bridges.iter().any(|x| &x.name == b.get_ref()) {
                        return Err(self.spanned_err(
                            b,
                            "node.bridge",
                            format!("no bridge named `{}`", b.get_ref()),
                        ));
                    }
                    Some(b.get_ref().clone())
                }
                (Mode::Bridged, None) => {
                    return Err(self.spanned_err(
                        &n.name,
                        "node.bridge",
                        format!("bridged node `{name}` needs a bridge"),
                    ));
                }
                (Mode::Routed, Some(b)) => {
                    return Err(self.spanned_err(
                        b,
                        "node.bridge",
                        "only `mode = \"bridged\"` nodes sit on a bridge",
                    ));
                }
                (Mode::Routed, None) => None,
            };
            let addrs = self.nets(&n.addrs, "node.addrs", n.mode == Mode::Routed)?;
            let mut rate = None;
            let mut impair = Impair::default();
            if let Some(l) = &n.link {
                impair = self.impair(l, n.kind)?;
                if let Some(r) = &l.rate {
                    let bps = parse_rate(r.get_ref())
                        .map_err(|w| self.spanned_err(r, "node.link.rate", w))?;
                    rate = Some((r.get_ref().clone(), bps));
                }
            }
            nodes.push(Node {
                name,
                kind: n.kind,
                mode: n.mode,
                ctid,
                addrs,
                bridge,
                rate,
                impair,
            });
        }
        let mut topo = Topology {
            file: self.file.to_owned(),
            hash: fnv64(self.text.as_bytes()),
            berthd: spec.berthd,
            uplink_addrs,
            uplink_prefixes,
            host_addrs,
            bridges,
            nodes,
            checks: Vec::new(),
        };
        for (i, c) in spec.checks.iter().enumerate() {
            let chk = self.check(&topo, c, i)?;
            topo.checks.push(chk);
        }
        Ok(topo)
    }

    fn impair(&self, l: &LinkSpec, kind: Kind) -> Result<Impair, TopologyError> {
        let mut i = Impair {
            seed: l.seed.as_ref().map(|s| *s.get_ref()).unwrap_or(1),
            ..Impair::default()
        };
        if let Some(e) = &l.loss_every {
            if *e.get_ref() < 2 {
                return Err(self.spanned_err(e, "node.link.loss_every", "must be 2 or more"));
            }
            i.loss_every = Some(*e.get_ref());
        }
        if let Some(f) = &l.loss {
            if !(0.0..1.0).contains(f.get_ref()) {
                return Err(self.spanned_err(f, "node.link.loss", "must be in 0..1"));
            }
            i.loss = Some(*f.get_ref());
        }
        if let Some(d) = &l.delay {
            if kind == Kind::Ct {
                return Err(self.spanned_err(
                    d,
                    "node.link.delay",
                    "a delay line goes on plain namespace nodes only (`kind = \"netns\"`)",
                ));
            }
            let v = parse_duration(d.get_ref())
                .map_err(|w| self.spanned_err(d, "node.link.delay", w))?;
            if v > std::time::Duration::from_secs(10) {
                return Err(self.spanned_err(d, "node.link.delay", "at most 10s"));
            }
            i.delay = Some(v);
        }
        if let Some(j) = &l.jitter {
            let Some(delay) = i.delay else {
                return Err(self.spanned_err(j, "node.link.jitter", "needs `delay`"));
            };
            let v = parse_duration(j.get_ref())
                .map_err(|w| self.spanned_err(j, "node.link.jitter", w))?;
            if v > delay {
                return Err(self.spanned_err(j, "node.link.jitter", "larger than `delay`"));
            }
            i.jitter = v;
        }
        Ok(i)
    }

    fn endpoint(
        &self,
        topo: &Topology,
        s: &Option<Spanned<String>>,
        key: &str,
        at: usize,
        nodes_only: bool,
    ) -> Result<String, TopologyError> {
        let Some(s) = s else {
            return Err(self.err(at, format!("key `{key}`: missing")));
        };
        let n = s.get_ref();
        let known = topo.node(n).is_some() || (!nodes_only && (n == UPLINK || n == HOST));
        if !known {
            return Err(self.spanned_err(s, key, format!("no node named `{n}`")));
        }
        Ok(n.clone())
    }

    fn check(&self, topo: &Topology, c: &CheckSpec, i: usize) -> Result<Check, TopologyError> {
        let kind = *c.kind.get_ref();
        let at = c.kind.span().start;
        let (from, to) = match kind {
            CheckKind::Ping | CheckKind::Rate => (
                self.endpoint(topo, &c.from, "check.from", at, false)?,
                self.endpoint(topo, &c.to, "check.to", at, false)?,
            ),
            CheckKind::Accounting | CheckKind::Spoof | CheckKind::Loss => {
                if let Some(f) = &c.from {
                    return Err(self.spanned_err(
                        f,
                        "check.from",
                        "this check takes `node` (and `to`)",
                    ));
                }
                let node = self.endpoint(topo, &c.node, "check.node", at, true)?;
                let to = match &c.to {
                    Some(_) => self.endpoint(topo, &c.to, "check.to", at, false)?,
                    None => UPLINK.to_owned(),
                };
                (node, to)
            }
        };
        let families = match c.family.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None | Some((_, "both")) => vec![Family::V4, Family::V6],
            Some((_, "4")) => vec![Family::V4],
            Some((_, "6")) => vec![Family::V6],
            Some((f, other)) => {
                return Err(self.spanned_err(
                    f,
                    "check.family",
                    format!("`{other}`: expected \"4\", \"6\" or \"both\""),
                ));
            }
        };
        let expect_reach = match c.expect.as_ref().map(|e| (e, e.get_ref().as_str())) {
            None | Some((_, "reach")) => true,
            Some((_, "none")) => false,
            Some((e, other)) => {
                return Err(self.spanned_err(
                    e,
                    "check.expect",
                    format!("`{other}`: expected \"reach\" or \"none\""),
                ));
            }
        };
        let target_has = |fam: Family| {
            topo.addrs_of(&to).iter().any(|a| {
                matches!(
                    (fam, a),
                    (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
                )
            })
        };
        let families: Vec<Family> = match kind {
            CheckKind::Ping if c.family.is_some() => families,
            _ => families.into_iter().filter(|f| target_has(*f)).collect(),
        };
        if let Some(f) = families.iter().find(|f| !target_has(**f)) {
            return Err(self.err(
                at,
                format!("key `check.family`: `{to}` has no {f:?} address"),
            ));
        }
        if kind == CheckKind::Rate && rate_between(topo, &from, &to).is_none() {
            return Err(self.err(
                at,
                format!("key `check.kind`: a rate check needs `link.rate` on `{from}` or `{to}`"),
            ));
        }
        if kind == CheckKind::Loss && !topo.node(&from).is_some_and(|n| n.impair.lossy()) {
            return Err(self.err(
                at,
                format!("key `check.kind`: a loss check needs `link.loss_every` or `link.loss` on `{from}`"),
            ));
        }
        let max_count = if kind == CheckKind::Loss {
            100_000
        } else {
            1000
        };
        let tolerance = match &c.tolerance {
            Some(t) if !(0.0..1.0).contains(t.get_ref()) => {
                return Err(self.spanned_err(t, "check.tolerance", "must be in 0..1"));
            }
            Some(t) => *t.get_ref(),
            None => 0.15,
        };
        let name = c
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}-{from}-{to}", i + 1, kind_name(kind)));
        Ok(Check {
            name,
            kind,
            from,
            to,
            families,
            expect_reach,
            tolerance,
            seconds: c
                .seconds
                .as_ref()
                .map(|s| *s.get_ref())
                .unwrap_or(2)
                .clamp(1, 60),
            count: c
                .count
                .as_ref()
                .map(|s| *s.get_ref())
                .unwrap_or(if kind == CheckKind::Loss { 1000 } else { 5 })
                .clamp(1, max_count),
        })
    }
}

pub fn kind_name(k: CheckKind) -> &'static str {
    match k {
        CheckKind::Ping => "ping",
        CheckKind::Rate => "rate",
        CheckKind::Accounting => "accounting",
        CheckKind::Spoof => "spoof",
        CheckKind::Loss => "loss",
    }
}

/// The configured rate limiting traffic from `from` to `to` (bit/s): the sender's link, else
/// the receiver's.
pub fn rate_between(topo: &Topology, from: &str, to: &str) -> Option<u64> {
    let r = |n: &str| topo.node(n).and_then(|n| n.rate.as_ref().map(|r| r.1));
    match (r(from), r(to)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn net(s: &str) -> IpNet {
    s.parse().expect("built-in default address")
}

fn check_ifname(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty()
        || name.len() > max
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "`{name}`: use 1..={max} characters of a-z, 0-9 and -"
        ));
    }
    Ok(())
}

/// tc's rate units: `bit`, `kbit`, `mbit`, `gbit` (bits, powers of 1000) and `bps`, `kbps`,
/// `mbps`, `gbps` (bytes).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a rate like 10mbit"))?;
    let mult = match unit {
        "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => {
            return Err(format!(
                "`{s}`: unit must be one of bit, kbit, mbit, gbit, bps, kbps, mbps, gbps"
            ));
        }
    };
    let bps = (n * mult) as u64;
    if bps < 8_000 {
        return Err(format!("`{s}` is below 8kbit"));
    }
    Ok(bps)
}

/// `20ms`, `1.5ms`, `500us`, `1s`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 20ms"))?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        _ => return Err(format!("`{s}`: unit must be one of s, ms, us")),
    };
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn fnv64(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests;
