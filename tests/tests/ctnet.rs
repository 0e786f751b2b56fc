//! CT networking through the `berth` CLI: routed (venet) CTs booted by berth inside a "host"
//! network namespace of the test's own, reaching an "uplink" namespace by proxy ARP/NDP.

use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, UPLINK6, assert_same, wait_for};

fn ping_from(h: &TestHost, ct: &str, addr: &str) -> bool {
    // proxy answers can be delayed up to 0.8 s by the kernel (proxy_delay): allow a few tries
    wait_for(std::time::Duration::from_secs(6), || {
        h.exec(ct, &["ping", "-c", "1", "-W", "2", addr]).0 == 0
    })
}

fn sum_netstat(v: &serde_json::Value) -> (u64, u64) {
    v.as_array().unwrap().iter().fold((0, 0), |(i, o), r| {
        (
            i + r["in_bytes"].as_u64().unwrap(),
            o + r["out_bytes"].as_u64().unwrap(),
        )
    })
}

/// (tx_bytes, rx_bytes) of a host-side interface in the test's host namespace.
fn veth_stats(topo: &Topology, ifname: &str) -> (u64, u64) {
    let out = topo.host.run("ip", &["-s", "-j", "link", "show", ifname]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v[0]["stats64"];
    (
        s["tx"]["bytes"].as_u64().unwrap(),
        s["rx"]["bytes"].as_u64().unwrap(),
    )
}

#[test]
fn routed_cts_via_cli() {
    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    h.ok(&[
        "create",
        "201",
        "--ipadd",
        "192.0.2.201",
        "--ipadd",
        "2001:db8:1::201",
    ]);
    h.ok(&["create", "202", "--ipadd", "192.0.2.202"]);

    // an address another CT has, or the host has, is refused and nothing changes
    let err = h.fails(&["create", "203", "--ipadd", "192.0.2.201"]);
    assert!(err.contains("CT 201"), "{err}");
    assert!(!h.root.join("conf/203.toml").exists());
    let err = h.fails(&["set", "202", "--ipadd", "192.0.2.2", "--save"]);
    assert!(err.contains("host"), "{err}");
    let conf = std::fs::read_to_string(h.root.join("conf/202.toml")).unwrap();
    assert!(!conf.contains("192.0.2.2\""), "{conf}");

    h.ok(&["start", "201"]);
    h.ok(&["start", "202"]);
    let st = h.status("201");
    let ifc = &st["net"]["ifaces"][0];
    assert_eq!(ifc["host_ifname"], "venet201", "{st}");
    assert_eq!(ifc["ct_ifname"], "venet0");
    assert_eq!(ifc["mode"], "routed");
    let addrs = ifc["addrs"].to_string();
    assert!(
        addrs.contains("192.0.2.201/32") && addrs.contains("2001:db8:1::201/128"),
        "{addrs}"
    );

    // inside the CT: venet0 with the addresses, default routes onlink
    let (_, ip, _) = h.exec("201", &["ip", "addr", "show", "venet0"]);
    assert!(ip.contains("192.0.2.201/32"), "{ip}");
    let (_, routes, _) = h.exec("201", &["ip", "route"]);
    assert!(routes.contains("default via 169.254.0.1"), "{routes}");

    // Accounting baseline: the link comes up (and the kernel sends its first IPv6 RS/MLD
    // frames) just before the programs attach, so compare deltas from here.
    let n0 = sum_netstat(&h.json(&["netstat", "201"]));
    let s0 = veth_stats(&topo, "venet201");

    // CT -> uplink, uplink -> CT, CT <-> CT, IPv4 and IPv6
    assert!(
        ping_from(&h, "201", UPLINK4),
        "CT 201 cannot reach the uplink"
    );
    assert!(
        ping_from(&h, "201", UPLINK6),
        "CT 201 cannot reach the uplink over IPv6"
    );
    assert!(
        topo.uplink.ping("192.0.2.202"),
        "uplink cannot reach CT 202"
    );
    assert!(
        ping_from(&h, "202", "192.0.2.201"),
        "CT 202 cannot reach CT 201"
    );

    // eBPF accounting: the CT's counters equal the host-side veth's statistics (L2 bytes;
    // venet is NOARP, so nothing but the CT's IP traffic crosses it)
    let ns = h.json(&["netstat", "201"]);
    let (inb, outb) = sum_netstat(&ns);
    let (tx, rx) = veth_stats(&topo, "venet201");
    assert!(inb - n0.0 > 0 && outb - n0.1 > 0, "{ns}");
    assert_eq!(
        (inb - n0.0, outb - n0.1),
        (tx - s0.0, rx - s0.1),
        "netstat {ns} vs interface tx/rx (deltas)"
    );
    let listed = h.json(&["list", "-o", "ctid,traffic.in,traffic.out"]);
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ctid"] == 201)
        .unwrap()
        .clone();
    assert!(row["traffic.in"].as_u64().unwrap() >= inb, "{listed}");
    // --reset only moves the live view
    h.ok(&["netstat", "--reset"]);
    let (zi, zo) = sum_netstat(&h.json(&["netstat", "201"]));
    assert_eq!((zi, zo), (0, 0));
    std::fs::remove_file(h.root.join("run/netstat.baseline.json")).unwrap();
    // counters survive a restart of the CT (billing never resets)
    h.ok(&["restart", "201"]);
    let (ri, ro) = sum_netstat(&h.json(&["netstat", "201"]));
    assert!(
        ri >= inb && ro >= outb,
        "counters went backwards across restart"
    );

    // live --ipadd / --ipdel without restart
    let pid = h.status("202")["init_pid"].clone();
    h.ok(&["set", "202", "--ipadd", "192.0.2.212"]);
    assert!(
        topo.uplink.ping("192.0.2.212"),
        "live --ipadd not reachable"
    );
    h.ok(&["set", "202", "--ipdel", "192.0.2.212"]);
    assert!(
        !topo.uplink.ping("192.0.2.212"),
        "--ipdel address still answers"
    );
    assert_eq!(h.status("202")["init_pid"], pid, "set restarted the CT");
    // not saved: the config does not have it
    let conf = std::fs::read_to_string(h.root.join("conf/202.toml")).unwrap();
    assert!(!conf.contains("192.0.2.212"));

    // shaping through the CLI: live on the running CT, bad values change nothing
    let err = h.fails(&["set", "202", "--rate-in", "0", "--save"]);
    assert!(err.contains("--rate-in"), "{err}");
    let err = h.fails(&[
        "set",
        "202",
        "--rate-in",
        "10mbit",
        "--burst",
        "100b",
        "--save",
    ]);
    assert!(err.contains("--burst"), "{err}");
    let qd = |dev: &str| {
        String::from_utf8_lossy(&topo.host.run("tc", &["qdisc", "show", "dev", dev]).stdout)
            .into_owned()
    };
    assert!(!qd("venet202").contains("htb"), "shaped before any --rate");
    h.ok(&[
        "set",
        "202",
        "--rate-in",
        "10mbit",
        "--rate-out",
        "20mbit",
        "--save",
    ]);
    assert!(
        qd("venet202").contains("htb"),
        "no HTB on venet202: {}",
        qd("venet202")
    );
    let sh = h.json(&["shaper", "status", "202"]);
    assert_eq!(sh["backend"]["backend"], "htb", "{sh}");
    assert!(sh["configured"]["rate_in"].is_string(), "{sh}");
    assert!(sh["live"].is_object(), "{sh}");
    assert!(ping_from(&h, "202", UPLINK4), "shaped CT lost connectivity");
    h.ok(&[
        "set",
        "202",
        "--rate-in",
        "none",
        "--rate-out",
        "none",
        "--save",
    ]);
    assert!(!qd("venet202").contains("htb"), "HTB left after removal");
    h.ok(&["set", "202", "--rate-in", "5mbit", "--save"]);

    // resolv.conf and hostname files
    h.ok(&[
        "set",
        "201",
        "--nameserver",
        "192.0.2.53",
        "--searchdomain",
        "example.test",
        "--hostname",
        "ct201.example.test",
        "--save",
    ]);
    let (_, resolv, _) = h.exec("201", &["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("nameserver 192.0.2.53") && resolv.contains("example.test"),
        "{resolv}"
    );
    let (_, hn, _) = h.exec("201", &["hostname"]);
    assert_eq!(hn.trim(), "ct201.example.test");

    h.ok(&["stop", "201"]);
    h.ok(&["stop", "--fast", "202"]);
    h.ok(&["destroy", "201"]);
    h.ok(&["destroy", "202"]);
    h.assert_clean();
    // no interface, route, proxy entry or address left in the host namespace
    let after = topo.host.settled_snapshot();
    assert_same("host netns after stop+destroy", &before, &after);
}

#[test]
fn kill9_during_network_setup_then_gc() {
    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    h.ok(&[
        "create",
        "211",
        "--ipadd",
        "192.0.2.211",
        "--ipadd",
        "2001:db8:1::211",
    ]);
    for delay_us in [500u64, 1500, 3000, 6000] {
        let mut child = h.cmd(&["start", "211"]).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_micros(delay_us));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
        h.ok(&["gc"]);
        if h.status("211")["state"] == "running" {
            h.ok(&["stop", "--fast", "211"]);
        }
        h.assert_clean();
        let after = topo.host.settled_snapshot();
        assert_same(
            &format!("host netns after kill at {delay_us} µs + gc"),
            &before,
            &after,
        );
    }
    h.ok(&["destroy", "211"]);
}

/// Bridged CTs through the CLI, and anti-spoofing against what a CT's root can do inside:
/// a changed MAC (bridged, mac_filter) and a foreign source address (routed) are dropped and
/// counted, while legitimate traffic flows.
#[test]
fn bridged_ct_and_spoofing_from_inside() {
    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    h.ok(&["create", "221"]);
    h.ok(&["set", "221", "--netif_add", "eth0,,,,br0", "--save"]);
    h.ok(&["create", "222", "--ipadd", "192.0.2.222"]);
    h.ok(&["start", "221"]);
    h.ok(&["start", "222"]);
    let st = h.status("221");
    let ifc = &st["net"]["ifaces"][0];
    assert_eq!(ifc["host_ifname"], "veth221.0", "{st}");
    assert_eq!(ifc["mode"], "bridged");
    let link = topo.host.run("ip", &["-o", "link", "show", "veth221.0"]);
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("master br0"),
        "veth221.0 not on br0"
    );
    // Without static addresses in the config the CT configures eth0 itself (as its distro's
    // network scripts would): up, then an address.
    assert_eq!(h.exec("221", &["ip", "link", "set", "eth0", "up"]).0, 0);
    assert_eq!(
        h.exec(
            "221",
            &["ip", "addr", "add", "198.51.100.21/24", "dev", "eth0"]
        )
        .0,
        0
    );
    if !ping_from(&h, "221", "198.51.100.1") {
        panic!(
            "bridged CT cannot reach the host bridge\nCT: {}\nhost: {}\ndrops: {}\nstatus: {}",
            h.exec("221", &["ip", "addr"]).1,
            String::from_utf8_lossy(&topo.host.run("ip", &["-br", "link"]).stdout),
            h.json(&["list", "-o", "ctid,drops,traffic.in,traffic.out"]),
            h.status("221")
        );
    }

    let drops = |ct: &str| -> u64 {
        let v = h.json(&["list", "-o", "ctid,drops"]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|r| r["ctid"].as_u64().map(|c| c.to_string()).as_deref() == Some(ct))
            .map(|r| r["drops"].as_u64().unwrap())
            .unwrap()
    };
    // bridged: a new MAC inside the CT is refused by the datapath
    let d0 = drops("221");
    assert_eq!(
        h.exec(
            "221",
            &["ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"]
        )
        .0,
        0
    );
    assert!(
        !ping_from_once(&h, "221", "198.51.100.1"),
        "spoofed MAC got through"
    );
    assert!(drops("221") > d0, "spoofed MAC not counted");

    // routed: a foreign address added inside the CT cannot be used as a source
    let d0 = drops("222");
    assert_eq!(
        h.exec(
            "222",
            &["ip", "addr", "add", "192.0.2.99/32", "dev", "venet0"]
        )
        .0,
        0
    );
    assert!(
        h.exec(
            "222",
            &["ping", "-c", "2", "-W", "1", "-I", "192.0.2.99", UPLINK4]
        )
        .0 != 0,
        "spoofed source address got through"
    );
    assert!(drops("222") > d0, "spoofed source not counted");
    // legitimate traffic is untouched
    assert!(ping_from(&h, "222", UPLINK4));

    // A second interface added live without --save can be removed live again; the saved
    // config never sees it.
    h.ok(&["set", "221", "--netif_add", "eth1,,,,br0"]);
    let shown = |name: &str| {
        topo.host
            .run("ip", &["link", "show", name])
            .status
            .success()
    };
    assert!(shown("veth221.1"), "live --netif_add made no host end");
    h.ok(&["set", "221", "--netif_del", "eth1"]);
    assert!(!shown("veth221.1"), "live --netif_del left the host end");
    assert_ne!(h.exec("221", &["ip", "link", "show", "eth1"]).0, 0);
    h.ok(&["set", "221", "--netif_add", "eth1,,,,br0"]);
    h.ok(&["set", "221", "--netif_del", "all"]);
    assert!(
        !shown("veth221.0") && !shown("veth221.1"),
        "--netif_del all"
    );
    let conf = std::fs::read_to_string(h.root.join("conf/221.toml")).unwrap();
    assert!(!conf.contains("eth1"), "unsaved interface saved: {conf}");

    h.ok(&["stop", "--fast", "221"]);
    h.ok(&["stop", "--fast", "222"]);
    h.ok(&["destroy", "221"]);
    h.ok(&["destroy", "222"]);
    h.assert_clean();
    let after = topo.host.settled_snapshot();
    assert_same("host netns after bridged/spoof test", &before, &after);
}

/// Something outside the CT holds its netns across `stop` (here an open
/// /proc/<pid>/ns/net, as a debugging `nsenter` shell would): the veth cannot go with the
/// netns, but its host routes and proxy entries do, the addresses are free for another CT, and
/// the next start replaces the stale host end.
#[test]
fn stop_with_a_held_netns_leaves_no_route_and_restarts() {
    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    h.ok(&[
        "create",
        "231",
        "--ipadd",
        "192.0.2.231",
        "--ipadd",
        "2001:db8:1::231",
    ]);
    h.ok(&["start", "231"]);
    let pid = h.status("231")["init_pid"].as_i64().unwrap();
    let held = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    h.ok(&["stop", "--fast", "231"]);
    let routes = |fam: &str| {
        String::from_utf8_lossy(
            &topo
                .host
                .run("ip", &[fam, "route", "show", "table", "main"])
                .stdout,
        )
        .into_owned()
    };
    assert!(!routes("-4").contains("192.0.2.231"), "{}", routes("-4"));
    assert!(
        !routes("-6").contains("2001:db8:1::231"),
        "{}",
        routes("-6")
    );
    let proxies = String::from_utf8_lossy(&topo.host.run("ip", &["neigh", "show", "proxy"]).stdout)
        .into_owned();
    assert!(!proxies.contains("192.0.2.231"), "{proxies}");
    assert!(
        topo.host
            .run("ip", &["link", "show", "venet231"])
            .status
            .success(),
        "the held netns should keep its veth (else this test proves nothing)"
    );
    // The next start replaces the stale host end and works.
    h.ok(&["start", "231"]);
    assert!(ping_from(&h, "231", UPLINK4));
    h.ok(&["stop", "--fast", "231"]);
    drop(held);
    h.ok(&["destroy", "231"]);
    h.assert_clean();
    let gone = wait_for(std::time::Duration::from_secs(10), || {
        !topo
            .host
            .run("ip", &["link", "show", "venet231"])
            .status
            .success()
    });
    assert!(gone, "venet231 still there after the last reference went");
    let after = topo.host.settled_snapshot();
    assert_same("host netns after a held-netns stop", &before, &after);
}

fn ping_from_once(h: &TestHost, ct: &str, addr: &str) -> bool {
    h.exec(ct, &["ping", "-c", "2", "-W", "1", addr]).0 == 0
}
