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

    // Accounting baseline (the programs attach before the link comes up, so the totals match
    // from the first frame too: tests/tests/identity.rs); deltas from here.
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
    let listed = h.list(&["-o", "ctid,traffic.in,traffic.out"]);
    let row = listed.iter().find(|r| r["ctid"] == 201).unwrap().clone();
    assert!(
        row["traffic"]["in_bytes"].as_u64().unwrap() >= inb,
        "{listed:?}"
    );
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
    // The human view is text with a class table, not JSON.
    let text = h.ok(&["shaper", "status", "202"]);
    assert!(text.starts_with("backend: htb"), "{text}");
    assert!(!text.contains('{'), "JSON in the text view: {text}");
    assert!(
        text.contains("configured: rate_in=10mbit rate_out=20mbit"),
        "{text}"
    );
    let class_rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.first().is_some_and(|d| *d == "in" || *d == "out"))
        .collect();
    assert!(
        class_rows
            .iter()
            .any(|r| r[0] == "in" && r.contains(&"10mbit")),
        "{text}"
    );
    assert!(
        class_rows
            .iter()
            .any(|r| r[0] == "out" && r.contains(&"20mbit")),
        "{text}"
    );
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
        if h.status("211")["status"] == "running" {
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

    let drops = |ct: &str| -> u64 { h.list_field(ct, "drops").as_u64().unwrap() };
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
    // netstat names each drop's reason, in JSON and in its table.
    for (ct, reason) in [("221", "spoofed_mac"), ("222", "spoofed_ip")] {
        let rows = h.json(&["netstat", ct]);
        let n = rows[0]["drops"][reason].as_u64().unwrap_or(0);
        assert!(n > 0, "netstat {ct}: no {reason} drops: {rows}");
        let table = h.ok(&["netstat", ct]);
        // (more may have been dropped since the JSON read: the reason is what is checked)
        assert!(table.contains(&format!("{reason}=")), "{table}");
    }
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

/// What a failed `set` must leave exactly as it was, read from the kernel and the files.
#[derive(Debug, PartialEq, Eq)]
struct CtView {
    memory_limit: String,
    /// The CT's own netns: links, addresses, routes.
    ct_net: berth_runtime::net::inspect::Snapshot,
    hostname: String,
    etc: Vec<(String, Option<Vec<u8>>)>,
    qdiscs: String,
    state_file: Vec<u8>,
    config: Vec<u8>,
}

fn ct_view(h: &TestHost, topo: &Topology, ctid: &str) -> CtView {
    use std::os::fd::AsFd;
    let pid = h.status(ctid)["init_pid"].as_i64().expect("running");
    let memory_limit = berth_tests::ct::cgroup_roots()
        .into_iter()
        .map(|r| r.join(&h.cgroup_parent).join(ctid))
        .flat_map(|d| [d.join("memory.limit_in_bytes"), d.join("memory.max")])
        .find_map(|f| std::fs::read_to_string(f).ok())
        .expect("the CT's memory limit file");
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    let ct_net = || {
        let mut nl = berth_runtime::net::Netlink::open_in(ns.as_fd(), "CT").unwrap();
        berth_runtime::net::inspect::Snapshot::take(&mut nl).unwrap()
    };
    let mut snap = ct_net();
    assert!(
        wait_for(std::time::Duration::from_secs(5), || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let now = ct_net();
            std::mem::replace(&mut snap, now.clone()) == now
        }),
        "CT {ctid}'s netns did not settle"
    );
    let etc = ["hostname", "hosts", "resolv.conf"]
        .into_iter()
        .map(|f| {
            let p = h.root.join("root").join(ctid).join("etc").join(f);
            (f.to_string(), std::fs::read(p).ok())
        })
        .collect();
    CtView {
        memory_limit,
        ct_net: snap,
        hostname: h.exec(ctid, &["hostname"]).1,
        etc,
        qdiscs: String::from_utf8_lossy(
            &topo
                .host
                .run("tc", &["qdisc", "show", "dev", &format!("venet{ctid}")])
                .stdout,
        )
        .into_owned(),
        state_file: std::fs::read(h.root.join(format!("run/{ctid}.state.json"))).unwrap(),
        config: std::fs::read(h.root.join(format!("conf/{ctid}.toml"))).unwrap(),
    }
}

/// A `set` whose shaping step fails changes nothing: the memory limit, the CT's addresses (in
/// the CT and on the host), the run state and the config are as before. Only the shaper is
/// broken: `shaper` in the pin directory is a file (a pinned map linked there), so the shaper
/// cannot make its directory while the datapath's pins work.
#[test]
fn set_whose_shaping_fails_changes_nothing() {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    h.ok(&["create", "241", "--ipadd", "192.0.2.241"]);
    h.ok(&["set", "241", "--memory", "64M", "--save"]);
    h.ok(&["start", "241"]);
    let host_before = topo.host.settled_snapshot();
    let map = std::fs::read_dir(h.bpffs.join("maps"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_file())
        .expect("a pinned datapath map");
    std::fs::hard_link(&map, h.bpffs.join("shaper")).unwrap();
    let before = ct_view(&h, &topo, "241");
    for save in [false, true] {
        let mut args = vec![
            "set",
            "241",
            "--memory",
            "128M",
            "--ipadd",
            "192.0.2.242",
            "--rate-out",
            "10mbit",
        ];
        if save {
            args.push("--save");
        }
        let err = h.fails(&args);
        assert!(err.contains("shaper"), "{err}");
        assert_eq!(ct_view(&h, &topo, "241"), before, "berth {args:?}");
        assert_same(
            &format!("host netns after berth {args:?}"),
            &host_before,
            &topo.host.settled_snapshot(),
        );
    }
    assert!(ping_from(&h, "241", UPLINK4), "the CT lost its address");
    assert!(
        !topo.uplink.ping("192.0.2.242"),
        "a rolled-back address answers"
    );

    // With the shaper working again the same change goes through.
    std::fs::remove_file(h.bpffs.join("shaper")).unwrap();
    h.ok(&[
        "set",
        "241",
        "--memory",
        "128M",
        "--ipadd",
        "192.0.2.242",
        "--rate-out",
        "10mbit",
    ]);
    let after = ct_view(&h, &topo, "241");
    assert_eq!(after.memory_limit.trim(), (128u64 << 20).to_string());
    // Traffic from the CT is shaped on its IFB, not on venet241 itself.
    let sh = h.json(&["shaper", "status", "241"]);
    assert!(sh["live"].to_string().contains("10mbit"), "{sh}");
    assert!(
        topo.uplink.ping("192.0.2.242"),
        "live --ipadd not reachable"
    );
    h.ok(&["stop", "--fast", "241"]);
    h.ok(&["destroy", "241"]);
    h.assert_clean();
}

/// A `set` that fails at its last live step (the run state file cannot be written: its
/// temporary name is taken by a directory) undoes every step before it: addresses, shaping,
/// cgroup limits, the hostname and the /etc files.
#[test]
fn set_failing_at_the_run_state_undoes_every_step() {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    h.ok(&[
        "create",
        "243",
        "--ipadd",
        "192.0.2.243",
        "--hostname",
        "ct243.test",
    ]);
    h.ok(&["start", "243"]);
    h.ok(&["set", "243", "--memory", "96M", "--rate-in", "20mbit"]);
    let host_before = topo.host.settled_snapshot();
    let before = ct_view(&h, &topo, "243");
    assert!(before.qdiscs.contains("htb"), "{}", before.qdiscs);
    let tmp = h.root.join("run/243.state.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let err = h.fails(&[
        "set",
        "243",
        "--memory",
        "160M",
        "--ipadd",
        "192.0.2.244",
        "--ipdel",
        "192.0.2.243",
        "--rate-in",
        "none",
        "--rate-out",
        "30mbit",
        "--hostname",
        "other.test",
        "--nameserver",
        "192.0.2.53",
        "--save",
    ]);
    assert!(err.contains("write state"), "{err}");
    assert_eq!(ct_view(&h, &topo, "243"), before);
    assert_same(
        "host netns after a failed set",
        &host_before,
        &topo.host.settled_snapshot(),
    );
    assert!(ping_from(&h, "243", UPLINK4), "the CT lost its address");
    let sh = h.json(&["shaper", "status", "243"]);
    assert!(sh["live"].to_string().contains("20mbit"), "{sh}");
    std::fs::remove_dir(&tmp).unwrap();
    h.ok(&["stop", "--fast", "243"]);
    h.ok(&["destroy", "243"]);
    h.assert_clean();
}

/// `create` with an address another CT (or the host) has, or with a bad initial setting,
/// leaves nothing behind: no config, private area, mount point, cgroup or lock file.
#[test]
fn create_with_a_taken_address_leaves_nothing() {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    h.ok(&["create", "251", "--ipadd", "192.0.2.251"]);
    let files = || {
        let mut v: Vec<String> = Vec::new();
        for d in ["conf", "private", "root", "run"] {
            if let Ok(rd) = std::fs::read_dir(h.root.join(d)) {
                v.extend(
                    rd.flatten()
                        .map(|e| format!("{d}/{}", e.file_name().to_string_lossy())),
                );
            }
        }
        v.sort();
        v
    };
    let before = (files(), h.cgroup_dirs());
    for (args, needle) in [
        (vec!["create", "252", "--ipadd", "192.0.2.251"], "CT 251"),
        (
            vec![
                "create",
                "252",
                "--ipadd",
                "192.0.2.252",
                "--ipadd",
                "192.0.2.251",
            ],
            "CT 251",
        ),
        (vec!["create", "252", "--ipadd", "192.0.2.2"], "host"),
        (
            vec![
                "create",
                "252",
                "--ipadd",
                "192.0.2.252",
                "--ipadd",
                "192.0.2.252",
            ],
            "192.0.2.252",
        ),
        (vec!["create", "252", "--ipadd", "127.0.0.1"], "127.0.0.1"),
    ] {
        let err = h.fails(&args);
        assert!(err.contains(needle), "berth {args:?}: {err}");
        assert_eq!(
            (files(), h.cgroup_dirs()),
            before,
            "berth {args:?} left something"
        );
    }
    // The address is still free for a CT that may have it.
    h.ok(&["create", "252", "--ipadd", "192.0.2.252"]);
    h.ok(&["destroy", "252"]);
    h.ok(&["destroy", "251"]);
    h.assert_clean();
}
