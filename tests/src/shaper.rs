//! Helpers for the shaper tests and benchmark: routed and bridged topologies of throwaway
//! namespaces (a "host", two "CTs", and for bridged a peer on the bridge), iperf3 and ping
//! runs inside them, and checks that nothing of the shaper is left on an interface.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd, BorrowedFd},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use berth::shaper::{Rate, ShapingConfig};

use crate::datapath::{Netns, run, unique};

/// `s` (e.g. "10mbit") as a rate; panics on a typo in a test or benchmark.
pub fn rate(s: &str) -> Rate {
    Rate::parse("test", s).expect("a valid rate")
}

/// The same rate in and out.
pub fn both(r: &str) -> ShapingConfig {
    ShapingConfig {
        rate_in: Some(rate(r)),
        rate_out: Some(rate(r)),
        ..Default::default()
    }
}

/// One "CT": a namespace with `ct_if` (address `ip`/24), joined by a veth to `host_if` in the
/// host namespace. `gw` is the address of the CT's traffic partner: the host side of its /24
/// (routed), or the peer on the bridge (bridged).
pub struct Ct {
    pub ns: Netns,
    pub host_if: String,
    pub ct_if: String,
    pub ip: String,
    pub gw: String,
    pub ifindex: u32,
}

/// Two CTs `a` and `b` on a "host" namespace. Routed: the host routes between them and is
/// their traffic partner. Bridged: their host-side veths are ports of a bridge in the host
/// namespace, and the partner is a third namespace on the same bridge (`peer`), so traffic
/// crosses the bridge's forwarding path like a bridged CT's traffic to its LAN. Every address
/// lives in these namespaces only.
pub struct Topo {
    pub host: Netns,
    pub a: Ct,
    pub b: Ct,
    /// Bridged only: the partner's namespace (its host-side port is not shaped).
    pub peer: Option<Ct>,
    /// Bridged only: the bridge in `host`.
    pub bridge: Option<String>,
}

impl Topo {
    /// The routed topology.
    pub fn new() -> Result<Self> {
        let host = Netns::new("bsh")?;
        host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let a = Self::ct(&host, 1)?;
        let b = Self::ct(&host, 2)?;
        Ok(Self {
            host,
            a,
            b,
            peer: None,
            bridge: None,
        })
    }

    /// The bridged topology: `a` (10.78.0.2) and `b` (10.78.0.3) and the partner (10.78.0.1)
    /// on one bridge.
    pub fn bridged() -> Result<Self> {
        let host = Netns::new("bsh")?;
        let br = unique("sbr");
        host.ip(&["link", "add", &br, "type", "bridge"])?;
        host.ip(&["link", "set", &br, "up"])?;
        let peer = Self::port(&host, &br, "10.78.0.1", "")?;
        let a = Self::port(&host, &br, "10.78.0.2", &peer.ip)?;
        let b = Self::port(&host, &br, "10.78.0.3", &peer.ip)?;
        Ok(Self {
            host,
            a,
            b,
            peer: Some(peer),
            bridge: Some(br),
        })
    }

    /// The namespace of the CTs' traffic partner (what `Ct::gw` is an address of).
    pub fn partner(&self) -> &str {
        match &self.peer {
            Some(p) => &p.ns.name,
            None => &self.host.name,
        }
    }

    pub fn mode(&self) -> &'static str {
        if self.peer.is_some() {
            "bridged"
        } else {
            "routed"
        }
    }

    fn ct(host: &Netns, n: u8) -> Result<Ct> {
        let ns = Netns::new(&format!("bs{n}"))?;
        let host_if = unique("sh");
        let ct_if = unique("sc");
        host.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ct_if, "netns", &ns.name,
        ])?;
        let gw = format!("10.77.{n}.1");
        let ip = format!("10.77.{n}.2");
        host.ip(&["addr", "add", &format!("{gw}/24"), "dev", &host_if])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &ct_if])?;
        host.ip(&["link", "set", &host_if, "up"])?;
        ns.ip(&["link", "set", &ct_if, "up"])?;
        ns.ip(&["route", "add", "default", "via", &gw])?;
        let ifindex = host.ifindex(&host_if)?;
        Ok(Ct {
            ns,
            host_if,
            ct_if,
            ip,
            gw,
            ifindex,
        })
    }

    /// A namespace whose veth's host end is a port of `br`.
    fn port(host: &Netns, br: &str, ip: &str, partner: &str) -> Result<Ct> {
        let ns = Netns::new("bsp")?;
        let host_if = unique("sh");
        let ct_if = unique("sc");
        host.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ct_if, "netns", &ns.name,
        ])?;
        host.ip(&["link", "set", &host_if, "master", br])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &ct_if])?;
        host.ip(&["link", "set", &host_if, "up"])?;
        ns.ip(&["link", "set", &ct_if, "up"])?;
        let ifindex = host.ifindex(&host_if)?;
        Ok(Ct {
            ns,
            host_if,
            ct_if,
            ip: ip.to_owned(),
            gw: partner.to_owned(),
            ifindex,
        })
    }
}

/// An iperf3 server (one test, `-1`) in the namespace named `ns` on `port`.
pub struct Server(Child);

impl Server {
    pub fn start(ns: &str, port: u16) -> Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "iperf3", "-s", "-1", "-p"])
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning iperf3 -s")?;
        // Wait until it listens.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "ss",
                    "-Hltn",
                    &format!("sport = :{port}"),
                ],
            )?;
            if !out.trim().is_empty() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "iperf3 server did not start on {port}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Self(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A port unlikely to clash with another test process (namespaces are private anyway).
pub fn port() -> u16 {
    let n = PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    20_000 + (std::process::id() % 2000) as u16 * 10 + n % 10
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Iperf {
    /// Payload bits per second the receiver got.
    pub goodput_bps: f64,
    pub retransmits: u64,
    /// Segments sent (bytes / MSS), for the retransmit ratio.
    pub segments: u64,
    /// UDP: packets the receiver got, and lost.
    pub packets: u64,
    pub lost: u64,
}

/// Options of one iperf3 client run.
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub secs: u32,
    /// UDP at this rate (e.g. "50M"), else TCP.
    pub udp_rate: Option<String>,
    /// Datagram/write length.
    pub len: Option<u32>,
    /// Bind the client to this address.
    pub bind: Option<String>,
    pub extra: Vec<String>,
}

/// Runs an iperf3 client in `client` against `server_ip:port` (a [`Server`] must run there).
pub fn iperf(client: &str, server_ip: &str, port: u16, r: &Run) -> Result<Iperf> {
    let mut args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        client.to_owned(),
        "iperf3".into(),
        "-c".into(),
        server_ip.into(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        r.secs.to_string(),
        "-J".into(),
    ];
    if let Some(rate) = &r.udp_rate {
        args.extend(["-u".into(), "-b".into(), rate.clone()]);
    }
    if let Some(l) = r.len {
        args.extend(["-l".into(), l.to_string()]);
    }
    if let Some(b) = &r.bind {
        args.extend(["-B".into(), b.clone()]);
    }
    args.extend(r.extra.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = Command::new("ip")
        .args(&refs)
        .output()
        .context("running iperf3")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 JSON: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let f = |p: &str| end.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
    let u = |p: &str| end.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    if r.udp_rate.is_some() {
        let packets = u("/sum/packets");
        let lost = u("/sum/lost_packets");
        return Ok(Iperf {
            goodput_bps: f("/sum/bits_per_second") * (1.0 - f("/sum/lost_percent") / 100.0),
            packets: packets.saturating_sub(lost),
            lost,
            ..Default::default()
        });
    }
    let mss = v
        .pointer("/start/tcp_mss_default")
        .and_then(Value::as_u64)
        .unwrap_or(1448)
        .max(1);
    Ok(Iperf {
        goodput_bps: f("/sum_received/bits_per_second"),
        retransmits: u("/sum_sent/retransmits"),
        segments: u("/sum_sent/bytes") / mss,
        ..Default::default()
    })
}

/// Goodput of a TCP run of CT `a` towards the CT (`in`) or from it (`out`).
pub fn tcp(t: &Topo, dir: &str, secs: u32) -> Result<Iperf> {
    let p = port();
    let r = Run {
        secs,
        ..Default::default()
    };
    if dir == "in" {
        let _s = Server::start(&t.a.ns.name, p)?;
        iperf(t.partner(), &t.a.ip, p, &r)
    } else {
        let _s = Server::start(t.partner(), p)?;
        iperf(&t.a.ns.name, &t.a.gw, p, &r)
    }
}

/// Round-trip times (ms) of `count` pings every `interval` seconds.
pub fn ping_rtts(from: &str, to: &str, count: u32, interval: &str) -> Result<Vec<f64>> {
    let out = Command::new("ip")
        .args(["netns", "exec", from, "ping", "-n", "-i", interval, "-c"])
        .arg(count.to_string())
        .arg(to)
        .output()
        .context("running ping")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

/// The `q`-quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `tc qdisc show` / `tc class show` of `dev` in `ns`.
pub fn tc_show(ns: &Netns, what: &str, dev: &str) -> Result<String> {
    run("tc", &["-n", &ns.name, what, "show", "dev", dev])
}

/// Fails when `dev` still carries an HTB or fq qdisc, a class, or a shaper tc filter, or `ns`
/// still has an IFB.
pub fn assert_no_shaping(ns: &Netns, dev: &str) -> Result<()> {
    let q = tc_show(ns, "qdisc", dev)?;
    ensure!(
        !q.contains("htb") && !q.contains("fifo") && !q.contains("qdisc fq "),
        "qdisc left on {dev}: {q}"
    );
    let c = tc_show(ns, "class", dev)?;
    ensure!(c.trim().is_empty(), "classes left on {dev}: {c}");
    for hook in ["ingress", "egress"] {
        let f =
            run("tc", &["-n", &ns.name, "filter", "show", "dev", dev, hook]).unwrap_or_default();
        // The datapath's own filters (cls_bpf attach) may stay; none of the shaper's may.
        ensure!(
            !f.contains("berth_shape"),
            "shaper {hook} filter left on {dev}: {f}"
        );
    }
    let links = ns.ip(&["-d", "link", "show"])?;
    ensure!(!links.contains("ifb"), "IFB left in {}: {links}", ns.name);
    Ok(())
}

/// Sends `len`-byte UDP datagrams to `dst` as fast as one thread can for `dur`, from inside
/// the network namespace `ns` (e.g. a CT's `/proc/<pid>/ns/net`, or a test namespace), and
/// returns how many the kernel took. Errors of single sends (a full queue, ICMP errors) are
/// expected and ignored: the point is to exceed a rate.
pub fn udp_flood(ns: BorrowedFd<'_>, dst: SocketAddr, len: usize, dur: Duration) -> Result<u64> {
    let ns = ns.try_clone_to_owned().context("dup netns fd")?;
    thread::spawn(move || -> Result<u64> {
        // setns is per thread: only this short-lived thread moves.
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns into the flood's netns: {}",
                std::io::Error::last_os_error()
            );
        }
        let bind: SocketAddr = if dst.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let sock = UdpSocket::bind(bind).context("binding the flood's socket")?;
        let buf = vec![0x5au8; len];
        let end = Instant::now() + dur;
        let mut sent = 0;
        while Instant::now() < end {
            for _ in 0..64 {
                if sock.send_to(&buf, dst).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
}

/// The shaping bar: TCP goodput 94–100 % of the configured rate.
pub fn within(goodput: f64, rate_bps: f64, what: &str) -> Result<()> {
    let ratio = goodput / rate_bps;
    eprintln!(
        "{what}: {:.2} Mbit/s = {:.1} % of the rate",
        goodput / 1e6,
        ratio * 100.0
    );
    ensure!(
        (0.94..=1.0).contains(&ratio),
        "{what}: goodput {:.2} Mbit/s is {:.1} % of {:.0} Mbit/s (bar: 94–100 %)",
        goodput / 1e6,
        ratio * 100.0,
        rate_bps / 1e6
    );
    Ok(())
}
