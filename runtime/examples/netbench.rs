//! Benchmark of routed CT network setup (issue 3's bars). Run as root:
//! `cargo run --release -p berth-runtime --example netbench -- [CTS] [IP_CTS]`
//!
//! Everything happens inside a throwaway "host" netns created here (nothing touches the real
//! host). Per CT: a new netns + venet veth pair (peer created in the CT netns) + one IPv4 and one
//! IPv6 address + host routes + proxy ARP/NDP entries on the host's uplink-facing device + CT
//! default routes. IPv4 addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range: 762
//! TEST-NET addresses are too few for 1000 CTs), IPv6 from 2001:db8::/32; no packet is sent.
//!
//! Measured: per-CT setup latency (p50/p99) and total for CTS CTs in-process; teardown of all of
//! them (proxy entries deleted, CT netns dropped so the kernel destroys the veths in one batch);
//! the same per-CT setup done with ip(8) commands for IP_CTS CTs as the control; and the kernel's
//! floor: CTS bare netns + veth pairs (peer created in the netns, one queue each, host end
//! down, no address, route or proxy entry), which any implementation of the setup has to pay.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_runtime::Ctid;
use berth_runtime::net::{
    HostNet, Iface, LinkTeardown, NeighbourDevs, NetConfig, Netlink, RoutedIface, create_netns,
    inspect::Snapshot, setup, teardown, veth_request,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags};

fn addrs(i: u32) -> (Ipv4Addr, Ipv6Addr) {
    let n = i + 2; // 198.18.0.1 is the host's
    let v4 = Ipv4Addr::new(198, 18, (n >> 8) as u8, (n & 0xff) as u8);
    let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (n >> 16) as u16, n as u16);
    (v4, v6)
}

fn in_ns(ns: BorrowedFd<'_>, args: &[&str]) {
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
    let out = cmd.output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cts: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let ip_cts: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200);

    // The bench's own "host": a netns with an uplink-facing device holding the CT prefixes.
    let host_ns: OwnedFd = create_netns().expect("create host netns");
    let h = host_ns.as_fd();
    in_ns(h, &["link", "set", "lo", "up"]);
    in_ns(
        h,
        &["link", "add", "up0", "type", "veth", "peer", "name", "up1"],
    );
    in_ns(h, &["addr", "add", "198.18.0.1/15", "dev", "up0"]);
    in_ns(h, &["addr", "add", "2001:db8::1/32", "dev", "up0", "nodad"]);
    in_ns(h, &["link", "set", "up1", "up"]);
    in_ns(h, &["link", "set", "up0", "up"]);
    {
        // A routing host: forwarding on before the "before" snapshot (IPv6 adds anycast routes
        // when it is switched on, which would otherwise show up as a difference).
        let _g = berth_runtime::net::NetNsGuard::enter(h).unwrap();
        for k in [
            "ipv4/conf/all/forwarding",
            "ipv6/conf/all/forwarding",
            "ipv6/conf/up0/proxy_ndp",
        ] {
            std::fs::write(format!("/proc/sys/net/{k}"), "1\n").expect("sysctl");
        }
    }
    let mut host = HostNet::open(Some(h)).expect("host side");
    // Let the kernel finish its own follow-ups (link-locals, forwarding anycast routes) first.
    let mut nl0 = Netlink::open_in(h, "bench host").unwrap();
    let mut before = Snapshot::take(&mut nl0).unwrap();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = Snapshot::take(&mut nl0).unwrap();
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

    // ---- in-process setup ----------------------------------------------------------------
    let mut lat = Vec::with_capacity(cts as usize);
    let mut ns_lat = Vec::with_capacity(cts as usize);
    let mut live = Vec::with_capacity(cts as usize);
    let t_all = Instant::now();
    for i in 0..cts {
        let ctid = Ctid::new(100 + i).unwrap();
        let (v4, v6) = addrs(i);
        let cfg = NetConfig {
            ifaces: vec![Iface::Routed(RoutedIface {
                addrs: vec![IpAddr::V4(v4), IpAddr::V6(v6)],
            })],
            neighbour_devs: NeighbourDevs::Detect,
            ..Default::default()
        };
        let t = Instant::now();
        let ns = create_netns().expect("create CT netns");
        let t_ns = t.elapsed();
        let st = setup(ctid, ns.as_fd(), &cfg, &mut host).expect("setup");
        lat.push(t.elapsed());
        ns_lat.push(t_ns);
        live.push((ns, st));
    }
    let total_setup = t_all.elapsed();
    let mut sorted = lat.clone();
    sorted.sort();
    let (p50, p99) = (pct(&sorted, 0.5), pct(&sorted, 0.99));
    // Netns creation alone (part of the above), for the breakdown.
    let mut ns_only = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let ns = create_netns().unwrap();
        ns_only.push(t.elapsed());
        drop(ns);
    }
    ns_only.sort();

    let snap = Snapshot::take(&mut Netlink::open_in(h, "bench host").unwrap()).unwrap();
    let venets = snap.links.iter().filter(|l| l.starts_with("venet")).count();
    assert_eq!(venets, cts as usize, "every CT has its venet");
    assert_eq!(
        snap.proxy.len(),
        2 * cts as usize,
        "two proxy entries per CT"
    );

    // ---- teardown: proxies deleted, netns dropped (kernel destroys the veths in a batch) ---
    let t = Instant::now();
    for (ns, st) in live.drain(..) {
        let errs = teardown(&st, &mut host, LinkTeardown::NetnsExit);
        assert!(errs.is_empty(), "{errs:?}");
        drop(ns);
    }
    let total_teardown = t.elapsed();
    let mut nl = Netlink::open_in(h, "bench host").unwrap();
    let gone = loop {
        let s = Snapshot::take(&mut nl).unwrap();
        if !s.links.iter().any(|l| l.starts_with("venet")) {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(60) {
            panic!("venet links still present after 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let after = Snapshot::take(&mut nl).unwrap();
    let left: Vec<String> = after.minus(&before);

    // ---- floor: netns + bare veth pair only, in the same host netns ------------------------
    let mut floor = Vec::with_capacity(cts as usize);
    let mut floor_live = Vec::with_capacity(cts as usize);
    let mut hn = Netlink::open_in(h, "bench host").unwrap();
    for i in 0..cts {
        let name = format!("vfloor{i}");
        let t = Instant::now();
        let ns = create_netns().expect("create netns");
        let msg = veth_request(
            vec![LinkAttribute::IfName(name.clone())],
            vec![LinkAttribute::IfName("venet0".into())],
            ns.as_fd(),
            LinkFlags::Noarp,
            false,
        );
        hn.link_create(msg, &name).expect("create veth");
        floor.push(t.elapsed());
        floor_live.push(ns);
    }
    floor.sort();
    drop(floor_live);

    // ---- control: the same per-CT setup with ip(8) ---------------------------------------
    let pid = std::process::id();
    let mut ip_lat = Vec::new();
    let mut ip_live = Vec::new();
    for i in 0..ip_cts {
        let (v4, v6) = addrs(cts + i);
        let name = format!("venet{}", 100 + cts + i);
        let t = Instant::now();
        let ns = create_netns().unwrap();
        let nspath = format!("/proc/{pid}/fd/{}", ns.as_raw_fd());
        let (a4, a6) = (format!("{v4}/32"), format!("{v6}/128"));
        let (s4, s6) = (v4.to_string(), v6.to_string());
        let c = ns.as_fd();
        in_ns(
            h,
            &[
                "link", "add", &name, "type", "veth", "peer", "name", "venet0", "netns", &nspath,
            ],
        );
        in_ns(h, &["link", "set", &name, "up"]);
        in_ns(h, &["addr", "add", "169.254.0.1/32", "dev", &name]);
        in_ns(h, &["addr", "add", "fe80::1/64", "dev", &name, "nodad"]);
        in_ns(c, &["link", "set", "lo", "up"]);
        in_ns(c, &["link", "set", "venet0", "up"]);
        in_ns(c, &["addr", "add", &a4, "dev", "venet0"]);
        in_ns(c, &["addr", "add", &a6, "dev", "venet0", "nodad"]);
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
        );
        in_ns(
            c,
            &[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "venet0", "onlink",
            ],
        );
        in_ns(h, &["route", "add", &a4, "dev", &name]);
        in_ns(h, &["-6", "route", "add", &a6, "dev", &name]);
        in_ns(h, &["neigh", "add", "proxy", &s4, "dev", "up0"]);
        in_ns(h, &["neigh", "add", "proxy", &s6, "dev", "up0"]);
        ip_lat.push(t.elapsed());
        ip_live.push(ns);
    }
    ip_lat.sort();
    drop(ip_live);
    // The ip(8)-made CTs' proxy entries and veths go with the throwaway host netns.
    drop(host);
    drop(host_ns);

    let (ip50, ip99) = (pct(&ip_lat, 0.5), pct(&ip_lat, 0.99));
    println!(
        "berth netbench (routed: netns + veth + 1 IPv4 + 1 IPv6 + host routes + proxy ARP/NDP + CT routes)"
    );
    println!(
        "in-process setup, {cts} CTs: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms   [bars: p50 <= 1 ms, p99 <= 2 ms]",
        ms(p50),
        ms(p99),
        ms(*sorted.last().unwrap())
    );
    println!(
        "  first 200 CTs: p50 {:.3} ms; last 200 CTs: p50 {:.3} ms; netns creation alone p50 {:.3} ms",
        ms({
            let mut v = lat[..200.min(lat.len())].to_vec();
            v.sort();
            pct(&v, 0.5)
        }),
        ms({
            let mut v = lat[lat.len().saturating_sub(200)..].to_vec();
            v.sort();
            pct(&v, 0.5)
        }),
        ms(pct(&ns_only, 0.5))
    );
    let p50_of = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        ms(pct(&v, 0.5))
    };
    let n = lat.len();
    let k = 200.min(n);
    println!(
        "  netns creation within setup: first 200 p50 {:.3} ms, last 200 p50 {:.3} ms",
        p50_of(&ns_lat[..k]),
        p50_of(&ns_lat[n - k..])
    );
    println!(
        "kernel floor, {cts} bare netns + veth pairs (no address/route/proxy/lo): p50 {:.3} ms, p99 {:.3} ms; berth p50 - floor p50 = {:.3} ms",
        ms(pct(&floor, 0.5)),
        ms(pct(&floor, 0.99)),
        ms(p50) - ms(pct(&floor, 0.5))
    );
    println!(
        "total setup of {cts} CTs: {:.3} s   [bar <= 2 s]",
        total_setup.as_secs_f64()
    );
    println!(
        "teardown of {cts} CTs (proxy entries deleted, netns dropped): {:.3} s   [bar <= 0.5 s]; kernel finished destroying the veths after {:.3} s",
        total_teardown.as_secs_f64(),
        gone.as_secs_f64()
    );
    println!(
        "host netns after teardown: {} difference(s) from before {left:?}",
        left.len()
    );
    println!(
        "ip(8) control, {ip_cts} CTs (14 commands each): p50 {:.3} ms, p99 {:.3} ms; ratio ip/berth p50 {:.1}x, p99 {:.1}x",
        ms(ip50),
        ms(ip99),
        ip50.as_secs_f64() / p50.as_secs_f64(),
        ip99.as_secs_f64() / p99.as_secs_f64()
    );
}
