//! The built-in checks, run by the supervisor against the live testbed. Traffic comes from the
//! host's own tools (ping, iperf3) run in the nodes' network namespaces — a CT's too, so its
//! packets cross its veth, berth's hooks and its shaper like the CT's own would.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::Value;

use crate::build::{Built, host_ifname};
use crate::report::{CheckResult, Results, Status};
use crate::supervisor::Handle;
use crate::topology::{Check, CheckKind, Family, Kind, Mode, kind_name, rate_between};

/// A foreign source address for the spoof check (TEST-NET-3; no node may have it).
const SPOOF_SRC: &str = "203.0.113.254";

pub fn run_all(b: &Built, h: &Handle) -> Results {
    let checks = b.topo.checks.iter().map(|c| run_one(b, c)).collect();
    Results {
        run_id: h.run_id.clone(),
        topology: b.topo.file.display().to_string(),
        topology_hash: b.topo.hash.clone(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        berth_version: env!("CARGO_PKG_VERSION").to_owned(),
        checks,
    }
}

pub(crate) struct Outcome {
    pub(crate) status: Status,
    pub(crate) expected: String,
    pub(crate) actual: String,
    pub(crate) attempts: u32,
    pub(crate) reason: Option<String>,
}

pub(crate) fn skipped(expected: &str, why: &str) -> Outcome {
    Outcome {
        status: Status::Skipped,
        expected: expected.into(),
        actual: "-".into(),
        attempts: 0,
        reason: Some(why.into()),
    }
}

fn run_one(b: &Built, c: &Check) -> CheckResult {
    let t0 = Instant::now();
    let ebpf = matches!(
        c.kind,
        CheckKind::Accounting | CheckKind::Spoof | CheckKind::Loss
    );
    let o = match c.kind {
        _ if b.rootless && ebpf => skipped("-", crate::ROOTLESS_NO_EBPF),
        CheckKind::Ping => ping(b, c),
        CheckKind::Rate => rate(b, c),
        CheckKind::Accounting => accounting(b, c),
        CheckKind::Spoof => spoof(b, c),
        CheckKind::Loss => crate::impair::loss_check(b, c),
    };
    tracing::info!(check = %c.name, ms = t0.elapsed().as_millis() as u64, "check done");
    CheckResult {
        name: c.name.clone(),
        kind: kind_name(c.kind).into(),
        status: o.status,
        expected: o.expected,
        actual: o.actual,
        attempts: o.attempts,
        duration_ms: t0.elapsed().as_millis() as u64,
        reason: o.reason,
    }
}

pub(crate) fn addr_of(b: &Built, node: &str, fam: Family) -> Option<IpAddr> {
    b.topo
        .addrs_of(node)
        .iter()
        .find(|a| {
            matches!(
                (fam, a),
                (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
            )
        })
        .map(|a| a.addr())
}

/// One reply within 2 s, probing every 200 ms: a first probe lost to neighbour discovery costs
/// 200 ms, not a 1 s timeout and another ping.
pub(crate) fn ping_ok(b: &Built, from: &str, to: IpAddr, extra: &[&str]) -> bool {
    let t = to.to_string();
    let mut args = vec!["-n", "-q", "-c", "1", "-i", "0.2", "-w", "2"];
    args.extend_from_slice(extra);
    args.push(&t);
    b.run(from, "ping", &args)
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn ping(b: &Built, c: &Check) -> Outcome {
    let expect = if c.expect_reach { "reach" } else { "no reach" };
    let mut actual = Vec::new();
    let mut attempts = 0;
    let mut ok = true;
    for fam in &c.families {
        let Some(to) = addr_of(b, &c.to, *fam) else {
            return skipped(expect, &format!("`{}` has no {fam:?} address", c.to));
        };
        // ping_ok probes for 2 s: a second try only for reaching (a slow neighbour).
        let tries = if c.expect_reach { 2 } else { 1 };
        let mut reached = false;
        for _ in 0..tries {
            attempts += 1;
            if ping_ok(b, &c.from, to, &[]) {
                reached = true;
                break;
            }
        }
        actual.push(format!(
            "{fam:?}:{}",
            if reached { "reach" } else { "no reach" }
        ));
        ok &= reached == c.expect_reach;
    }
    let fams: Vec<String> = c
        .families
        .iter()
        .map(|f| format!("{f:?}:{expect}"))
        .collect();
    Outcome {
        status: if ok { Status::Pass } else { Status::Fail },
        expected: fams.join(" "),
        actual: actual.join(" "),
        attempts,
        reason: (!ok).then(|| format!("{} -> {}", c.from, c.to)),
    }
}

/// Receiver-side goodput of one iperf3 TCP run from `c.from` to `c.to` (iperf3's sender-side
/// figure counts what sat in socket buffers, over-reporting a shaped link).
fn iperf(b: &Built, c: &Check, to: IpAddr) -> Result<f64, String> {
    let port = "5201";
    let t = to.to_string();
    let mut server = b
        .cmd(&c.to, "iperf3", &["-s", "-1", "-B", &t, "-p", port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start iperf3 server: {e}"))?;
    let secs = c.seconds.to_string();
    let end = Instant::now() + Duration::from_secs(3);
    let result = loop {
        let out = b
            .run(
                &c.from,
                "iperf3",
                &["-c", &t, "-p", port, "-t", &secs, "-J", "-O", "1"],
            )
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            break Ok(bps);
        }
        let last = v["error"].as_str().unwrap_or("no result").to_owned();
        // The server may not listen yet.
        if Instant::now() > end || !last.contains("connect") {
            break Err(format!("iperf3: {last}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = server.kill();
    let _ = server.wait();
    result
}

fn rate(b: &Built, c: &Check) -> Outcome {
    let want = rate_between(&b.topo, &c.from, &c.to).unwrap_or(0) as f64;
    let expected = format!("{:.2} Mbit/s ±{:.0}%", want / 1e6, c.tolerance * 100.0);
    let Some(fam) = c.families.first() else {
        return skipped(&expected, "no address family in common");
    };
    let Some(to) = addr_of(b, &c.to, *fam) else {
        return skipped(&expected, &format!("`{}` has no {fam:?} address", c.to));
    };
    let mut attempts = 0;
    let mut actual = String::from("-");
    let mut reason = None;
    for _ in 0..2 {
        attempts += 1;
        match iperf(b, c, to) {
            Ok(bps) => {
                actual = format!("{:.2} Mbit/s", bps / 1e6);
                if ((bps - want) / want).abs() <= c.tolerance {
                    return Outcome {
                        status: Status::Pass,
                        expected,
                        actual,
                        attempts,
                        reason: None,
                    };
                }
                reason = Some(format!(
                    "goodput {:+.0}% off the configured rate",
                    (bps - want) / want * 100.0
                ));
            }
            Err(e) => reason = Some(e),
        }
    }
    Outcome {
        status: Status::Fail,
        expected,
        actual,
        attempts,
        reason,
    }
}

/// (in, out) bytes berth counted for `ctid`, over every class and family.
fn berth_counters(b: &Built, ctid: u32) -> Result<(u64, u64), String> {
    let out = b
        .berth
        .ok(b.host_pid(), &["netstat", &ctid.to_string(), "--json"])
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("netstat JSON: {e}"))?;
    let rows = v.as_array().ok_or("netstat JSON is not a list")?;
    Ok(rows.iter().fold((0, 0), |(i, o), r| {
        (
            i + r["in_bytes"].as_u64().unwrap_or(0),
            o + r["out_bytes"].as_u64().unwrap_or(0),
        )
    }))
}

/// (tx, rx) bytes of the host side of a node.
fn iface_counters(b: &Built, ifname: &str) -> Result<(u64, u64), String> {
    let out = b
        .run("host", "ip", &["-s", "-j", "link", "show", ifname])
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("ip -j: {e}"))?;
    let s = &v[0]["stats64"];
    match (s["tx"]["bytes"].as_u64(), s["rx"]["bytes"].as_u64()) {
        (Some(t), Some(r)) => Ok((t, r)),
        _ => Err(format!("no counters for {ifname}")),
    }
}

fn ct_of<'a>(b: &'a Built, c: &Check) -> Result<(&'a crate::topology::Node, u32), &'static str> {
    let n = b.topo.node(&c.from).ok_or("no such node")?;
    match (n.kind, n.ctid) {
        (Kind::Ct, Some(id)) => Ok((n, id)),
        _ => Err("needs a berth CT node (kind = \"ct\"): plain namespaces have no berth datapath"),
    }
}

/// A pair of byte counters.
type InOut = (u64, u64);

fn accounting(b: &Built, c: &Check) -> Outcome {
    let expected = "berth in/out = host veth tx/rx (delta)".to_owned();
    let (n, ctid) = match ct_of(b, c) {
        Ok(x) => x,
        Err(why) => return skipped(&expected, why),
    };
    let Some(to) = c.families.first().and_then(|f| addr_of(b, &c.to, *f)) else {
        return skipped(&expected, "no target address");
    };
    let ifname = host_ifname(n);
    let size = "1000";
    let count = c.count.to_string();
    let mut attempts = 0;
    let mut last = (String::from("-"), None);
    // Background frames (neighbour discovery) may land between the two reads: retry.
    while attempts < 3 {
        attempts += 1;
        let snap = || -> Result<(InOut, InOut), String> {
            Ok((berth_counters(b, ctid)?, iface_counters(b, &ifname)?))
        };
        let r = (|| {
            let (b0, i0) = snap()?;
            let t = to.to_string();
            let sent = b
                .run(
                    &c.from,
                    "ping",
                    &[
                        "-n", "-q", "-c", &count, "-i", "0.05", "-s", size, "-W", "1", &t,
                    ],
                )
                .map_err(|e| e.to_string())?;
            if !sent.status.success() {
                return Err(format!("ping {t} from {} lost packets", c.from));
            }
            let (b1, i1) = snap()?;
            Ok(((b1.0 - b0.0, b1.1 - b0.1), (i1.0 - i0.0, i1.1 - i0.1)))
        })();
        match r {
            Ok((berth, iface)) => {
                let actual = format!("in {} out {}", berth.0, berth.1);
                let min = u64::from(c.count) * 1000;
                if berth == iface && berth.1 >= min {
                    return Outcome {
                        status: Status::Pass,
                        expected: format!("in {} out {}", iface.0, iface.1),
                        actual,
                        attempts,
                        reason: None,
                    };
                }
                last = (
                    actual,
                    Some(format!(
                        "host veth {ifname}: tx {} rx {}; sent {min}+ bytes",
                        iface.0, iface.1
                    )),
                );
            }
            Err(e) => last = ("-".into(), Some(e)),
        }
    }
    Outcome {
        status: Status::Fail,
        expected,
        actual: last.0,
        attempts,
        reason: last.1,
    }
}

fn drops(b: &Built, ctid: u32) -> Result<u64, String> {
    let out = b
        .berth
        .ok(b.host_pid(), &["list", "-o", "ctid,drops", "--json"])
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    v["cts"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["ctid"].as_u64() == Some(u64::from(ctid)))
        })
        .and_then(|r| r["traffic"]["drops"].as_u64())
        .ok_or_else(|| format!("no drops for CT {ctid}"))
}

fn spoof(b: &Built, c: &Check) -> Outcome {
    let expected = format!("{} dropped, 0 answered", c.count);
    let (n, ctid) = match ct_of(b, c) {
        Ok(x) => x,
        Err(why) => return skipped(&expected, why),
    };
    if n.mode != Mode::Routed {
        return skipped(&expected, "the spoof check covers routed CTs only so far");
    }
    let Some(to) = addr_of(b, &c.to, Family::V4) else {
        return skipped(&expected, "target has no IPv4 address");
    };
    // As the CT's root could: a foreign address on its own interface, used as the source.
    let add = b.run(
        &c.from,
        "ip",
        &["addr", "add", &format!("{SPOOF_SRC}/32"), "dev", "venet0"],
    );
    if !add.map(|o| o.status.success()).unwrap_or(false) {
        return Outcome {
            status: Status::Fail,
            expected,
            actual: "-".into(),
            attempts: 1,
            reason: Some("could not add the foreign address".into()),
        };
    }
    let r = (|| -> Result<(u64, bool), String> {
        let d0 = drops(b, ctid)?;
        let t = to.to_string();
        let count = c.count.to_string();
        let out = b
            .run(
                &c.from,
                "ping",
                &[
                    "-n", "-q", "-c", &count, "-i", "0.05", "-W", "1", "-I", SPOOF_SRC, &t,
                ],
            )
            .map_err(|e| e.to_string())?;
        let answered = out.status.success();
        Ok((drops(b, ctid)? - d0, answered))
    })();
    let _ = b.run(
        &c.from,
        "ip",
        &["addr", "del", &format!("{SPOOF_SRC}/32"), "dev", "venet0"],
    );
    match r {
        Ok((d, answered)) => {
            let ok = d == u64::from(c.count) && !answered;
            Outcome {
                status: if ok { Status::Pass } else { Status::Fail },
                expected,
                actual: format!(
                    "{d} dropped, {}",
                    if answered { "answered" } else { "0 answered" }
                ),
                attempts: 1,
                reason: (!ok).then(|| format!("source {SPOOF_SRC} from CT {ctid}")),
            }
        }
        Err(e) => Outcome {
            status: Status::Fail,
            expected,
            actual: "-".into(),
            attempts: 1,
            reason: Some(e),
        },
    }
}
