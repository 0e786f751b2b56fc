//! `bench net`: routed CT network setup (issue 3's bars).
//!
//! Everything happens inside a throwaway "host" netns created here (nothing touches the real
//! host). Per CT: a new netns + venet veth pair (peer created in the CT netns) + one IPv4 and one
//! IPv6 address + host routes + proxy ARP/NDP entries on the host's uplink-facing device + CT
//! default routes. IPv4 addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range: 762
//! TEST-NET addresses are too few for 1000 CTs), IPv6 from 2001:db8::/32; no packet is sent.
//!
//! Measured: per-CT setup latency (p50/p99) and total for `--cts` CTs in-process; teardown of
//! all of them (proxy entries deleted, CT netns dropped so the kernel destroys the veths in one
//! batch); the same per-CT setup done with ip(8) commands for `--samples` CTs as the control;
//! and the kernel's floor: `--cts` bare netns + veth pairs (peer created in the netns, one queue
//! each, host end down, no address, route or proxy entry), which any implementation of the
//! setup has to pay.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use berth_runtime::Ctid;
use berth_runtime::net::{
    HostNet, Iface, LinkTeardown, NeighbourDevs, NetConfig, NetNsGuard, Netlink, RoutedIface,
    create_netns, inspect::Snapshot, setup, teardown, veth_request,
};
use clap::Args;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};

use crate::stats::{ms, quantile};

#[derive(Args)]
pub struct NetArgs {
    /// CTs set up in-process (and bare netns + veth pairs for the floor).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    cts: u32,
    /// CTs set up with ip(8), the control.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    samples: u32,
}

pub fn run(a: &NetArgs) -> Result<()> {
    crate::require_root("net", "network namespaces")?;
    crate::require_tool("ip", "install iproute2")?;
    let (cts, ip_cts) = (a.cts, a.samples);

    let host_ns = host_netns()?;
    let h = host_ns.as_fd();
    let mut host = HostNet::open(Some(h)).context("opening the bench host's network")?;
    let before = settled_snapshot(h)?;

    let setup = in_process(cts, h, &mut host)?;
    let down = teardown_all(setup.live, h, &mut host, &before)?;
    let floor = kernel_floor(cts, h)?;
    let ip_lat = ip_control(cts, ip_cts, h)?;
    // The ip(8)-made CTs' proxy entries and veths go with the throwaway host netns.
    drop(host);
    drop(host_ns);

    let lat = &setup.lat;
    let mut sorted = lat.clone();
    sorted.sort();
    let (p50, p99) = (quantile(&sorted, 0.5), quantile(&sorted, 0.99));
    let (ip50, ip99) = (quantile(&ip_lat, 0.5), quantile(&ip_lat, 0.99));
    let p50_of = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        ms(quantile(&v, 0.5))
    };
    let n = lat.len();
    let k = 200.min(n);
    println!(
        "berth netbench (routed: netns + veth + 1 IPv4 + 1 IPv6 + host routes + proxy ARP/NDP + CT routes)"
    );
    println!(
        "in-process setup, {cts} CTs: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms   [bars: p50 <= 1 ms, p99 <= 2 ms]",
        ms(p50),
        ms(p99),
        ms(sorted[n - 1])
    );
    println!(
        "  first 200 CTs: p50 {:.3} ms; last 200 CTs: p50 {:.3} ms; netns creation alone p50 {:.3} ms",
        p50_of(&lat[..k]),
        p50_of(&lat[n - k..]),
        ms(quantile(&setup.ns_only, 0.5))
    );
    println!(
        "  netns creation within setup: first 200 p50 {:.3} ms, last 200 p50 {:.3} ms",
        p50_of(&setup.ns_lat[..k]),
        p50_of(&setup.ns_lat[n - k..])
    );
    println!(
        "kernel floor, {cts} bare netns + veth pairs (no address/route/proxy/lo): p50 {:.3} ms, p99 {:.3} ms; berth p50 - floor p50 = {:.3} ms",
        ms(quantile(&floor, 0.5)),
        ms(quantile(&floor, 0.99)),
        ms(p50) - ms(quantile(&floor, 0.5))
    );
    println!(
        "total setup of {cts} CTs: {:.3} s   [bar <= 2 s]",
        setup.total.as_secs_f64()
    );
    println!(
        "teardown of {cts} CTs (proxy entries deleted, netns dropped): {:.3} s   [bar <= 0.5 s]; kernel finished destroying the veths after {:.3} s",
        down.total.as_secs_f64(),
        down.gone.as_secs_f64()
    );
    println!(
        "host netns after teardown: {} difference(s) from before {:?}",
        down.left.len(),
        down.left
    );
    println!(
        "ip(8) control, {ip_cts} CTs (14 commands each): p50 {:.3} ms, p99 {:.3} ms; ratio ip/berth p50 {:.1}x, p99 {:.1}x",
        ms(ip50),
        ms(ip99),
        ip50.as_secs_f64() / p50.as_secs_f64(),
        ip99.as_secs_f64() / p99.as_secs_f64()
    );
    Ok(())
}

fn addrs(i: u32) -> (Ipv4Addr, Ipv6Addr) {
    let n = i + 2; // 198.18.0.1 is the host's
    let v4 = Ipv4Addr::new(198, 18, (n >> 8) as u8, (n & 0xff) as u8);
    let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (n >> 16) as u16, n as u16);
    (v4, v6)
}

/// `ip ARGS` inside the namespace `ns`.
fn in_ns(ns: BorrowedFd<'_>, args: &[&str]) -> Result<()> {
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new("ip");
    cmd.args(args);
    // SAFETY: setns is async-signal-safe; the fd stays valid in the child until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The bench's own "host": a netns with an uplink-facing device holding the CT prefixes.
fn host_netns() -> Result<OwnedFd> {
    let host_ns = create_netns().context("creating the bench host's netns")?;
    let h = host_ns.as_fd();
    in_ns(h, &["link", "set", "lo", "up"])?;
    in_ns(
        h,
        &["link", "add", "up0", "type", "veth", "peer", "name", "up1"],
    )?;
    in_ns(h, &["addr", "add", "198.18.0.1/15", "dev", "up0"])?;
    in_ns(h, &["addr", "add", "2001:db8::1/32", "dev", "up0", "nodad"])?;
    in_ns(h, &["link", "set", "up1", "up"])?;
    in_ns(h, &["link", "set", "up0", "up"])?;
    // A routing host: forwarding on before the "before" snapshot (IPv6 adds anycast routes
    // when it is switched on, which would otherwise show up as a difference).
    let _g = NetNsGuard::enter(h).context("entering the bench host's netns")?;
    for k in [
        "ipv4/conf/all/forwarding",
        "ipv6/conf/all/forwarding",
        "ipv6/conf/up0/proxy_ndp",
    ] {
        let path = format!("/proc/sys/net/{k}");
        std::fs::write(&path, "1\n").with_context(|| format!("writing {path}"))?;
    }
    Ok(host_ns)
}

fn host_netlink(h: BorrowedFd<'_>) -> Result<Netlink> {
    Netlink::open_in(h, "bench host").context("opening netlink in the bench host")
}

fn snapshot(nl: &mut Netlink) -> Result<Snapshot> {
    Snapshot::take(nl).context("listing the bench host's links, addresses, routes")
}

/// The host's state once the kernel has finished its own follow-ups (link-locals,
/// forwarding anycast routes).
fn settled_snapshot(h: BorrowedFd<'_>) -> Result<Snapshot> {
    let mut nl = host_netlink(h)?;
    let mut before = snapshot(&mut nl)?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = snapshot(&mut nl)?;
        if now == before
            && ["dev up0", "dev up1"].iter().all(|d| {
                now.routes
                    .iter()
                    .any(|r| r.contains("fe80:") && r.contains("type Local") && r.ends_with(d))
            })
        {
            break;
        }
        before = now;
    }
    Ok(before)
}

struct InProcess {
    /// Per CT, in order: the whole setup, and the netns creation within it.
    lat: Vec<Duration>,
    ns_lat: Vec<Duration>,
    total: Duration,
    /// Netns creation alone, sorted (for the breakdown).
    ns_only: Vec<Duration>,
    live: Vec<(OwnedFd, berth_runtime::net::NetState)>,
}

fn in_process(cts: u32, h: BorrowedFd<'_>, host: &mut HostNet) -> Result<InProcess> {
    let mut lat = Vec::with_capacity(cts as usize);
    let mut ns_lat = Vec::with_capacity(cts as usize);
    let mut live = Vec::with_capacity(cts as usize);
    let t_all = Instant::now();
    for i in 0..cts {
        let ctid = Ctid::new(100 + i)?;
        let (v4, v6) = addrs(i);
        let cfg = NetConfig {
            ifaces: vec![Iface::Routed(RoutedIface {
                addrs: vec![IpAddr::V4(v4), IpAddr::V6(v6)],
            })],
            neighbour_devs: NeighbourDevs::Detect,
            ..Default::default()
        };
        let t = Instant::now();
        let ns = create_netns().context("creating a CT netns")?;
        let t_ns = t.elapsed();
        let st = setup(ctid, ns.as_fd(), &cfg, host)
            .with_context(|| format!("setting up CT {ctid}'s network"))?;
        lat.push(t.elapsed());
        ns_lat.push(t_ns);
        live.push((ns, st));
    }
    let total = t_all.elapsed();
    let mut ns_only = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let ns = create_netns().context("creating a netns")?;
        ns_only.push(t.elapsed());
        drop(ns);
    }
    ns_only.sort();

    let snap = snapshot(&mut host_netlink(h)?)?;
    let venets = snap.links.iter().filter(|l| l.starts_with("venet")).count();
    ensure!(venets == cts as usize, "{venets} venets for {cts} CTs");
    ensure!(
        snap.proxy.len() == 2 * cts as usize,
        "{} proxy entries for {cts} CTs, want two each",
        snap.proxy.len()
    );
    Ok(InProcess {
        lat,
        ns_lat,
        total,
        ns_only,
        live,
    })
}

struct Teardown {
    total: Duration,
    /// Until the kernel had destroyed the last venet.
    gone: Duration,
    /// Differences of the host netns from before the setup.
    left: Vec<String>,
}

/// Proxies deleted, netns dropped (the kernel destroys the veths in a batch).
fn teardown_all(
    live: Vec<(OwnedFd, berth_runtime::net::NetState)>,
    h: BorrowedFd<'_>,
    host: &mut HostNet,
    before: &Snapshot,
) -> Result<Teardown> {
    let t = Instant::now();
    for (ns, st) in live {
        let errs = teardown(&st, host, LinkTeardown::NetnsExit);
        ensure!(errs.is_empty(), "teardown: {errs:?}");
        drop(ns);
    }
    let total = t.elapsed();
    let mut nl = host_netlink(h)?;
    let gone = loop {
        let s = snapshot(&mut nl)?;
        if !s.links.iter().any(|l| l.starts_with("venet")) {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("venet links still present after 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let after = snapshot(&mut nl)?;
    Ok(Teardown {
        total,
        gone,
        left: after.minus(before),
    })
}

/// Netns + bare veth pair only, in the same host netns; sorted.
fn kernel_floor(cts: u32, h: BorrowedFd<'_>) -> Result<Vec<Duration>> {
    let mut floor = Vec::with_capacity(cts as usize);
    let mut floor_live = Vec::with_capacity(cts as usize);
    let mut hn = host_netlink(h)?;
    for i in 0..cts {
        let name = format!("vfloor{i}");
        let t = Instant::now();
        let ns = create_netns().context("creating a netns")?;
        let msg = veth_request(
            vec![LinkAttribute::IfName(name.clone())],
            vec![LinkAttribute::IfName("venet0".into())],
            ns.as_fd(),
            LinkFlags::Noarp,
            false,
        );
        hn.link_create(msg, &name)
            .with_context(|| format!("creating veth {name}"))?;
        floor.push(t.elapsed());
        floor_live.push(ns);
    }
    floor.sort();
    Ok(floor)
}

/// The same per-CT setup with ip(8), for CTs numbered after the in-process ones; sorted.
fn ip_control(cts: u32, ip_cts: u32, h: BorrowedFd<'_>) -> Result<Vec<Duration>> {
    let pid = std::process::id();
    let mut ip_lat = Vec::new();
    let mut ip_live = Vec::new();
    for i in 0..ip_cts {
        let (v4, v6) = addrs(cts + i);
        let name = format!("venet{}", 100 + cts + i);
        let t = Instant::now();
        let ns = create_netns().context("creating a CT netns")?;
        let nspath = format!("/proc/{pid}/fd/{}", ns.as_raw_fd());
        let (a4, a6) = (format!("{v4}/32"), format!("{v6}/128"));
        let (s4, s6) = (v4.to_string(), v6.to_string());
        let c = ns.as_fd();
        in_ns(
            h,
            &[
                "link", "add", &name, "type", "veth", "peer", "name", "venet0", "netns", &nspath,
            ],
        )?;
        in_ns(h, &["link", "set", &name, "up"])?;
        in_ns(h, &["addr", "add", "169.254.0.1/32", "dev", &name])?;
        in_ns(h, &["addr", "add", "fe80::1/64", "dev", &name, "nodad"])?;
        in_ns(c, &["link", "set", "lo", "up"])?;
        in_ns(c, &["link", "set", "venet0", "up"])?;
        in_ns(c, &["addr", "add", &a4, "dev", "venet0"])?;
        in_ns(c, &["addr", "add", &a6, "dev", "venet0", "nodad"])?;
        in_ns(
            c,
            &[
                "route",
                "add",
                "default",
                "via",
                "169.254.0.1",
                "dev",
                "venet0",
                "onlink",
            ],
        )?;
        in_ns(
            c,
            &[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "venet0", "onlink",
            ],
        )?;
        in_ns(h, &["route", "add", &a4, "dev", &name])?;
        in_ns(h, &["-6", "route", "add", &a6, "dev", &name])?;
        in_ns(h, &["neigh", "add", "proxy", &s4, "dev", "up0"])?;
        in_ns(h, &["neigh", "add", "proxy", &s6, "dev", "up0"])?;
        ip_lat.push(t.elapsed());
        ip_live.push(ns);
    }
    ip_lat.sort();
    Ok(ip_lat)
}
