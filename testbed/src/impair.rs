//! Impairments of a node's link, each way: loss by `berth_impair` (an eBPF classifier, see
//! `berth_common::impair`) on the egress of both ends, delay by a [`DelayLine`] in a namespace
//! of its own between the node and the host. Also the `loss` check, which sends numbered UDP
//! datagrams across the lossy link and tells exactly which had to be lost.
//!
//! The classifier goes on the egress of the node's own interface (node -> host) and of the
//! host-side interface (host -> node), at cls_bpf priority 1: ahead of berth's datapath on a
//! CT's host-side interface, so berth never counts a packet the impairment drops and the
//! accounting check still balances.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use berth_common::impair::{ImpairConfig, ImpairStats, dropped_between, threshold};

use crate::build::{Built, host_ifname, in_netns, ip_batch, sysctl};
use crate::checks::{Outcome, addr_of, ping_ok, skipped};
use crate::delay::{DelayLine, in_netns_thread};
use crate::report::Status;
use crate::topology::{Check, Mode, Node};
use crate::{Error, Result};

/// Pins of the classifiers' counters, in the supervisor's private bpffs.
const PIN_DIR: &str = "/sys/fs/bpf/testbed-impair";

/// A direction of a node's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Node -> host: the node's own interface's egress.
    Out,
    /// Host -> node: the host-side interface's egress.
    In,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Out => "out",
            Way::In => "in",
        }
    }
}

/// The classifier's configuration for one way of `n`'s link (each way its own seed).
pub fn config(n: &Node, way: Way) -> ImpairConfig {
    let i = &n.impair;
    ImpairConfig {
        every: i.loss_every.unwrap_or(0),
        threshold: i.loss.map(threshold).unwrap_or(0),
        seed: match way {
            Way::Out => i.seed,
            Way::In => i.seed ^ 0x5bd1_e995_5bd1_e995,
        },
    }
}

fn pin(node: &str, way: Way) -> PathBuf {
    PathBuf::from(PIN_DIR).join(format!("{node}-{}", way.name()))
}

/// The node's own interface.
fn node_dev(n: &Node) -> &'static str {
    match n.mode {
        Mode::Routed => "venet0",
        Mode::Bridged => "eth0",
    }
}

/// Holders for the delay lines' namespaces, IPv6 off before their interfaces exist.
pub fn delay_namespaces(built: &mut Built) -> Result<()> {
    let nodes: Vec<Node> = built
        .topo
        .nodes
        .iter()
        .filter(|n| n.impair.delay.is_some())
        .cloned()
        .collect();
    for n in nodes {
        let h = crate::build::holder()?;
        let pid = h.id() as i32;
        built.holders.push(h);
        let what = format!("the delay line of {}", n.name);
        sysctl(
            pid,
            &what,
            &[
                "net.ipv6.conf.all.disable_ipv6=1".into(),
                "net.ipv6.conf.default.disable_ipv6=1".into(),
            ],
        )?;
        let node_pid = built.pids[&n.name];
        ip_batch(
            pid,
            &what,
            &[
                "link set lo up".into(),
                format!(
                    "link add d0 type veth peer name {} netns {node_pid}",
                    node_dev(&n)
                ),
                "link set d0 up".into(),
            ],
        )?;
        built.delay_pids.insert(n.name.clone(), pid);
    }
    Ok(())
}

/// The host's `ip` line making the host side of a plain namespace node: to the node itself,
/// or to the host side (`d1`) of its delay line.
pub fn host_link(built: &Built, n: &Node, hif: &str, dev: &str, node_pid: i32) -> String {
    match built.delay_pids.get(&n.name) {
        Some(d) => format!("link add {hif} type veth peer name d1 netns {d}"),
        None => format!("link add {hif} type veth peer name {dev} netns {node_pid}"),
    }
}

/// Starts the delay lines and attaches the loss classifiers (after the CTs are up: a CT's
/// host-side interface exists only then).
pub fn start(built: &mut Built) -> Result<()> {
    let nodes = built.topo.nodes.clone();
    for n in &nodes {
        if let (Some(delay), Some(pid)) = (n.impair.delay, built.delay_pids.get(&n.name)) {
            let what = format!("the delay line of {}", n.name);
            ip_batch(*pid, &what, &["link set d1 up".into()])?;
            let line = DelayLine::start(*pid, "d0", "d1", delay, n.impair.jitter, n.impair.seed)?;
            built.delay_lines.push(line);
        }
        if n.impair.lossy() {
            let (host, node) = (built.host_pid(), built.pid(&n.name));
            attach(
                built,
                node,
                node_dev(n),
                &pin(&n.name, Way::Out),
                config(n, Way::Out),
            )?;
            attach(
                built,
                host,
                &host_ifname(n),
                &pin(&n.name, Way::In),
                config(n, Way::In),
            )?;
        }
    }
    Ok(())
}

fn attach(
    built: &Built,
    pid: i32,
    dev: &str,
    pin: &std::path::Path,
    cfg: ImpairConfig,
) -> Result<()> {
    let mut c = std::process::Command::new(&built.berth.bin);
    c.args(["testbed", "__impair", "--dev", dev, "--pin"])
        .arg(pin)
        .args([
            "--every",
            &cfg.every.to_string(),
            "--threshold",
            &cfg.threshold.to_string(),
            "--seed",
            &cfg.seed.to_string(),
        ])
        .stdin(Stdio::null());
    in_netns(&mut c, pid);
    let out = c
        .output()
        .map_err(Error::io("run berth testbed __impair"))?;
    crate::build::checked(&format!("attach the loss impairment to {dev}"), out).map(|_| ())
}

/// The counters of the classifier on one way of `node`'s link.
pub fn stats(built: &Built, node: &str, way: Way) -> Result<ImpairStats, String> {
    let out = std::process::Command::new(&built.berth.bin)
        .args(["testbed", "__impair", "--stats", "--pin"])
        .arg(pin(node, way))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run berth testbed __impair --stats: {e}"))?;
    let text = crate::build::checked("read the loss counters", out).map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("loss counters: {e}"))?;
    Ok(ImpairStats {
        seen: v["seen"].as_u64().unwrap_or(0),
        dropped: v["dropped"].as_u64().unwrap_or(0),
    })
}

/// The lossy hooks between `from` and `to`: the sender's way out, the receiver's way in.
fn hooks(built: &Built, c: &Check) -> Vec<(String, Way, ImpairConfig)> {
    let mut h = Vec::new();
    if let Some(n) = built.topo.node(&c.from).filter(|n| n.impair.lossy()) {
        h.push((n.name.clone(), Way::Out, config(n, Way::Out)));
    }
    if let Some(n) = built.topo.node(&c.to).filter(|n| n.impair.lossy()) {
        h.push((n.name.clone(), Way::In, config(n, Way::In)));
    }
    h
}

/// The most a frame waits in delay lines between `from` and `to`.
fn path_delay(built: &Built, c: &Check) -> Duration {
    [&c.from, &c.to]
        .iter()
        .filter_map(|n| built.topo.node(n))
        .map(|n| n.impair.delay.unwrap_or_default() + n.impair.jitter)
        .sum()
}

/// Sends `count` numbered datagrams from `from` to `to:port`; how many distinct ones arrived.
fn udp_run(built: &Built, c: &Check, to: IpAddr, count: u32) -> Result<u64, String> {
    let (from_pid, to_pid) = (built.pid(&c.from), built.pid(&c.to));
    let rx = in_netns_thread(to_pid, move || UdpSocket::bind(SocketAddr::new(to, 0)))
        .map_err(|e| e.to_string())?;
    let buf: libc::c_int = 32 << 20;
    // SAFETY: setsockopt with a pointer to a local int; a failure leaves the default size.
    unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&buf as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    rx.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| e.to_string())?;
    let dst = rx.local_addr().map_err(|e| e.to_string())?;
    let unspec: IpAddr = if to.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let tx = in_netns_thread(from_pid, move || {
        let s = UdpSocket::bind(SocketAddr::new(unspec, 0))?;
        s.connect(dst)?;
        Ok(s)
    })
    .map_err(|e| e.to_string())?;
    let done = Arc::new(AtomicBool::new(false));
    let idle = Duration::from_millis(300) + path_delay(built, c) * 2;
    let done2 = done.clone();
    let reader = std::thread::spawn(move || {
        let mut got = vec![false; count as usize];
        let mut last = Instant::now();
        let mut b = [0u8; 64];
        loop {
            match rx.recv(&mut b) {
                Ok(n) if n >= 4 => {
                    let i = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
                    if let Some(g) = got.get_mut(i) {
                        *g = true;
                    }
                    last = Instant::now();
                }
                _ => {
                    if done2.load(Ordering::Relaxed) && last.elapsed() > idle {
                        break;
                    }
                }
            }
        }
        got.iter().filter(|g| **g).count() as u64
    });
    let mut payload = [0u8; 64];
    for i in 0..count {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        // A datagram the sender's stack refused (a full queue) never reached the link: send it
        // again, each is counted once.
        let mut tries = 0;
        while tx.send(&payload).is_err() && tries < 100 {
            tries += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        // Paced: bursts of 100, so no queue on the way overflows.
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    done.store(true, Ordering::Relaxed);
    reader
        .join()
        .map_err(|_| "the UDP reader panicked".to_owned())
}

/// One round of the loss check.
struct Tally {
    /// Datagrams that did not arrive.
    lost: u64,
    /// Datagrams the impairment had to drop, by their numbers on the hooks.
    want: u64,
    /// What the hooks counted as dropped.
    dropped: u64,
    /// Each hook's packet numbers before and after.
    seen: Vec<(u64, u64)>,
}

/// `loss`: exactly the datagrams the configured impairment picks are lost, no other.
pub(crate) fn loss_check(b: &Built, c: &Check) -> Outcome {
    let m = u64::from(c.count);
    let expected_text = "the datagrams the impairment picks, exactly".to_owned();
    let Some(to) = c.families.first().and_then(|f| addr_of(b, &c.to, *f)) else {
        return skipped(&expected_text, "no target address");
    };
    let hooks = hooks(b, c);
    let mut attempts = 0;
    let mut last = (expected_text.clone(), "-".to_owned(), None);
    while attempts < 3 {
        attempts += 1;
        // Neighbours resolved first: datagrams queued behind an unresolved neighbour are
        // dropped beyond its small queue, a loss the impairment did not make.
        let _ = (0..3).any(|_| ping_ok(b, &c.from, to, &[]));
        let r = (|| -> Result<Tally, String> {
            let s0: Vec<ImpairStats> = hooks
                .iter()
                .map(|(n, w, _)| stats(b, n, *w))
                .collect::<Result<_, _>>()?;
            let received = udp_run(b, c, to, c.count)?;
            let s1: Vec<ImpairStats> = hooks
                .iter()
                .map(|(n, w, _)| stats(b, n, *w))
                .collect::<Result<_, _>>()?;
            let mut want = 0;
            let mut dropped = 0;
            let mut seen = Vec::new();
            for (((_, _, cfg), a), z) in hooks.iter().zip(&s0).zip(&s1) {
                want += dropped_between(cfg, a.seen, z.seen);
                dropped += z.dropped - a.dropped;
                seen.push((a.seen, z.seen));
            }
            Ok(Tally {
                lost: m - received,
                want,
                dropped,
                seen,
            })
        })();
        match r {
            Ok(Tally {
                lost,
                want,
                dropped,
                seen,
            }) => {
                let expected = format!("{want} of {m} lost");
                let actual = format!("{lost} of {m} lost ({dropped} dropped by the impairment)");
                // Another packet crossing a hook meanwhile moves the numbering: try again.
                let clean = seen.iter().all(|(a, z)| z - a == m);
                if clean && lost == want && dropped == want {
                    return Outcome {
                        status: Status::Pass,
                        expected,
                        actual,
                        attempts,
                        reason: None,
                    };
                }
                let why = if clean {
                    "the losses differ from the impairment's".to_owned()
                } else {
                    format!("other packets crossed the lossy hooks: numbered {seen:?}")
                };
                last = (expected, actual, Some(why));
            }
            Err(e) => last.2 = Some(e),
        }
    }
    Outcome {
        status: Status::Fail,
        expected: last.0,
        actual: last.1,
        attempts,
        reason: last.2,
    }
}
