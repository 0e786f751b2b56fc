//! Privileged end-to-end tests of berth's CT networking (routed venet-style and bridged veth).
//! Every namespace is the test's own, including "the host" and the upstream router; see
//! `berth_tests::net` for the topology. Run: `cargo test -p berth-tests --test net -- --test-threads=1`.

use std::net::IpAddr;
use std::time::Duration;

use berth_runtime::Ctid;
use berth_runtime::error_chain::ErrorChain;
use berth_runtime::net::inspect::{Snapshot, port_vlans};
use berth_runtime::net::{
    AddrHolder, AddrSelection, BridgedIface, Iface, LinkTeardown, NeighbourDevs, NetConfig,
    NetError, NetState, RoutedIface, add_addrs, add_netif, addr_owner_check, del_addrs, del_netif,
    setup, teardown,
};
use berth_tests::net::{Capture, Ns, Topology, UPLINK4, UPLINK6, assert_same, wait_for};
use berth_tests::skip::skip;

fn ct(n: u32) -> Ctid {
    Ctid::new(n).unwrap()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn routed(addrs: &[&str]) -> NetConfig {
    NetConfig {
        ifaces: vec![Iface::Routed(RoutedIface { addrs: ips(addrs) })],
        ..Default::default()
    }
}

fn bridged_iface(n: u8) -> BridgedIface {
    let mut b = BridgedIface::new("eth0");
    b.bridge = Some("br0".into());
    b.addrs = vec![
        format!("198.51.100.{n}/24").parse().unwrap(),
        format!("2001:db8:2::{n}/64").parse().unwrap(),
    ];
    b.gateway4 = Some("198.51.100.1".parse().unwrap());
    b.gateway6 = Some("2001:db8:2::1".parse().unwrap());
    b
}

fn bridged(n: u8) -> NetConfig {
    NetConfig {
        ifaces: vec![Iface::Bridged(bridged_iface(n))],
        ..Default::default()
    }
}

fn has(set: &std::collections::BTreeSet<String>, needle: &str) -> bool {
    set.iter().any(|l| l.contains(needle))
}

fn clean_teardown(state: &NetState, host: &mut berth_runtime::net::HostNet) {
    let errs = teardown(state, host, LinkTeardown::Delete);
    assert!(errs.is_empty(), "teardown errors: {errs:?}");
}

#[test]
fn routed_and_bridged_end_to_end() {
    let topo = Topology::new();
    let host_before = topo.host.snapshot();
    let uplink_before = topo.uplink.snapshot();
    let mut host = topo.hostnet();

    let specs = [
        (101, routed(&["192.0.2.101", "2001:db8:1::101"])),
        (102, routed(&["192.0.2.102", "2001:db8:1::102"])),
        (201, bridged(11)),
        (202, bridged(12)),
    ];
    let mut cts = Vec::new();
    for (id, cfg) in &specs {
        let ns = Ns::new();
        let st = setup(ct(*id), ns.fd(), cfg, &mut host)
            .unwrap_or_else(|e| panic!("setup CT {id}: {}", ErrorChain(&e)));
        // The state is what the lifecycle persists and `status --json` shows.
        let json = serde_json::to_string(&st).unwrap();
        assert_eq!(serde_json::from_str::<NetState>(&json).unwrap(), st);
        cts.push((*id, ns, st));
    }

    // Read back the routed CT exactly as specified.
    let c101 = cts[0].1.snapshot();
    assert!(
        has(&c101.links, "venet0 veth up noarp"),
        "{:#?}",
        c101.links
    );
    assert_eq!(cts[0].2.ifaces[0].host_mac, cts[0].2.ifaces[0].ct_mac);
    assert!(
        c101.addrs.contains("venet0 192.0.2.101/32"),
        "{:#?}",
        c101.addrs
    );
    assert!(
        c101.addrs.contains("venet0 2001:db8:1::101/128"),
        "{:#?}",
        c101.addrs
    );
    assert!(c101.addrs.contains("lo 127.0.0.1/8"));
    let main: Vec<&String> = c101
        .routes
        .iter()
        .filter(|r| r.contains("table 254 "))
        .collect();
    assert!(
        main.iter()
            .any(|r| r.starts_with("inet table 254 default/0")
                && r.contains("via 169.254.0.1 dev venet0 onlink")),
        "{main:#?}"
    );
    assert!(
        main.iter()
            .any(|r| r.starts_with("inet6 table 254 default/0")
                && r.contains("via fe80::1 dev venet0 onlink")),
        "{main:#?}"
    );
    // No IPv4 route other than the default: the CT's addresses are /32, no on-link subnet.
    assert_eq!(
        main.iter().filter(|r| r.starts_with("inet ")).count(),
        1,
        "{main:#?}"
    );

    let h = topo.host.snapshot();
    for (id, a4, a6) in [
        (101, "192.0.2.101", "2001:db8:1::101"),
        (102, "192.0.2.102", "2001:db8:1::102"),
    ] {
        let dev = format!("venet{id}");
        assert!(
            has(&h.links, &format!("{dev} veth up noarp")),
            "{:#?}",
            h.links
        );
        // A pure L3 point-to-point link: no address at all on the host end.
        assert!(!has(&h.addrs, &format!("{dev} ")), "{:#?}", h.addrs);
        assert!(
            h.routes.iter().any(|r| r.starts_with(&format!(
                "inet table 254 {a4}/32 type Unicast proto Static scope Link dev {dev}"
            ))),
            "{:#?}",
            h.routes
        );
        assert!(
            h.routes
                .iter()
                .any(|r| r.starts_with(&format!("inet6 table 254 {a6}/128 "))
                    && r.ends_with(&format!("dev {dev}"))),
            "{:#?}",
            h.routes
        );
        // `detect`: the proxy entries sit on the device routing towards the address (up0).
        assert!(h.proxy.contains(&format!("{a4} dev up0")), "{:#?}", h.proxy);
        assert!(h.proxy.contains(&format!("{a6} dev up0")), "{:#?}", h.proxy);
    }
    assert_eq!(h.proxy.len(), 4, "{:#?}", h.proxy);
    for id in [201, 202] {
        assert!(
            has(&h.links, &format!("veth{id}.0 veth up mtu 1500 master br0")),
            "{:#?}",
            h.links
        );
    }
    let c201 = cts[2].1.snapshot();
    assert!(
        c201.addrs.contains("eth0 198.51.100.11/24"),
        "{:#?}",
        c201.addrs
    );
    assert!(
        c201.addrs.contains("eth0 2001:db8:2::11/64"),
        "{:#?}",
        c201.addrs
    );
    assert!(has(
        &c201.routes,
        "default/0 type Unicast proto Static scope Universe via 198.51.100.1 dev eth0"
    ));
    assert_eq!(
        cts[2].2.ifaces[0].ct_mac.unwrap().to_string(),
        "02:00:00:00:00:c9"
    );
    assert_eq!(
        cts[2].2.ifaces[0].host_mac.unwrap().to_string(),
        "fe:00:00:00:00:c9"
    );

    // Connectivity, IPv4 and IPv6.
    let (r1, r2, b1, b2) = (&cts[0].1, &cts[1].1, &cts[2].1, &cts[3].1);
    let checks: [(&str, &Ns, &str); 14] = [
        ("routed CT -> routed CT v4", r1, "192.0.2.102"),
        ("routed CT -> routed CT v6", r1, "2001:db8:1::102"),
        ("routed CT -> uplink v4", r1, UPLINK4),
        ("routed CT -> uplink v6", r1, UPLINK6),
        ("uplink -> routed CT v4", &topo.uplink, "192.0.2.102"),
        ("uplink -> routed CT v6", &topo.uplink, "2001:db8:1::102"),
        ("bridged CT -> bridged CT v4", b1, "198.51.100.12"),
        ("bridged CT -> bridged CT v6", b1, "2001:db8:2::12"),
        ("bridged CT -> uplink v4", b2, UPLINK4),
        ("bridged CT -> uplink v6", b2, UPLINK6),
        ("uplink -> bridged CT v4", &topo.uplink, "198.51.100.11"),
        ("bridged CT -> routed CT v4", b1, "192.0.2.101"),
        ("routed CT -> bridged CT v6", r2, "2001:db8:2::12"),
        ("host -> routed CT v4", &topo.host, "192.0.2.101"),
    ];
    for (what, from, to) in checks {
        assert!(from.ping(to), "{what}: ping {to} failed");
    }

    for (id, _ns, st) in &cts {
        let errs = teardown(st, &mut host, LinkTeardown::Delete);
        assert!(errs.is_empty(), "teardown CT {id}: {errs:?}");
    }
    drop(cts);
    assert_same(
        "host netns after teardown",
        &host_before,
        &topo.host.snapshot(),
    );
    // The uplink's neighbour cache is not part of the snapshot; its links/addrs/routes are.
    assert_same(
        "uplink netns after teardown",
        &uplink_before,
        &topo.uplink.snapshot(),
    );
}

#[test]
fn duplicate_address_refused_nothing_changed() {
    let topo = Topology::new();
    let mut host = topo.hostnet();
    let (ns1, ns2) = (Ns::new(), Ns::new());
    let cfg1 = routed(&["192.0.2.101", "2001:db8:1::101"]);
    let st1 = setup(ct(101), ns1.fd(), &cfg1, &mut host).unwrap();

    let host_before = topo.host.settled_snapshot();
    let ct_before = ns2.snapshot();
    // Held by a running CT (its host route to venet101).
    let err = setup(
        ct(102),
        ns2.fd(),
        &routed(&["192.0.2.150", "192.0.2.101"]),
        &mut host,
    )
    .unwrap_err();
    assert!(
        matches!(&err, NetError::AddressInUse { holder: AddrHolder::Ct(c), .. } if *c == ct(101)),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("address 192.0.2.101 is already assigned to CT 101"),
        "{err}"
    );
    let err = setup(ct(102), ns2.fd(), &routed(&["2001:db8:1::101"]), &mut host).unwrap_err();
    assert!(
        matches!(
            err,
            NetError::AddressInUse {
                holder: AddrHolder::Ct(_),
                ..
            }
        ),
        "{err:?}"
    );
    // Held by the host itself.
    let err = setup(ct(102), ns2.fd(), &routed(&["192.0.2.2"]), &mut host).unwrap_err();
    assert!(
        matches!(&err, NetError::AddressInUse { holder: AddrHolder::Host, dev: Some(d), .. } if d == "up0"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("192.0.2.2 is already assigned to the host (interface up0)"),
        "{err}"
    );
    let err = setup(ct(102), ns2.fd(), &routed(&["2001:db8:1::2"]), &mut host).unwrap_err();
    assert!(
        matches!(
            err,
            NetError::AddressInUse {
                holder: AddrHolder::Host,
                ..
            }
        ),
        "{err:?}"
    );

    assert_same(
        "host netns after refused setups",
        &host_before,
        &topo.host.snapshot(),
    );
    let ct_after = ns2.snapshot();
    assert!(!has(&ct_after.links, "venet0"), "{:#?}", ct_after.links);
    assert_eq!(
        ct_before
            .addrs
            .iter()
            .filter(|a| !a.starts_with("lo "))
            .count(),
        0
    );
    assert_eq!(
        ct_after
            .addrs
            .iter()
            .filter(|a| !a.starts_with("lo "))
            .count(),
        0
    );

    // Config-level check (covers stopped CTs too).
    let cfg3 = bridged(30);
    let all = [(ct(101), &cfg1), (ct(103), &cfg3)];
    let err = addr_owner_check(ct(102), &ips(&["198.51.100.30"]), all, &mut host).unwrap_err();
    assert!(
        err.to_string()
            .contains("198.51.100.30 is already assigned to CT 103"),
        "{err}"
    );
    addr_owner_check(ct(101), &ips(&["192.0.2.101"]), all, &mut host).unwrap();
    addr_owner_check(ct(102), &ips(&["192.0.2.160"]), all, &mut host).unwrap();
    let err = addr_owner_check(ct(102), &ips(&["198.51.100.1"]), all, &mut host).unwrap_err();
    assert!(
        err.to_string().contains("the host (interface br0)"),
        "{err}"
    );

    clean_teardown(&st1, &mut host);
}

#[test]
fn live_ipadd_ipdel_netif_add_del() {
    let topo = Topology::new();
    let host_before = topo.host.snapshot();
    let mut host = topo.hostnet();
    let ns = Ns::new();
    let cfg = routed(&["192.0.2.101"]);
    let mut st = setup(ct(101), ns.fd(), &cfg, &mut host).unwrap();
    assert!(topo.uplink.ping("192.0.2.101"));

    // --ipadd: a second IPv4 and the CT's first IPv6 (adds the v6 gateway and default route).
    add_addrs(
        ct(101),
        ns.fd(),
        &cfg,
        &ips(&["192.0.2.111", "2001:db8:1::111"]),
        &mut host,
        &mut st,
    )
    .unwrap();
    assert!(
        topo.uplink.ping("192.0.2.111"),
        "new v4 address unreachable"
    );
    assert!(
        topo.uplink.ping("2001:db8:1::111"),
        "new v6 address unreachable"
    );
    let err = add_addrs(
        ct(101),
        ns.fd(),
        &cfg,
        &ips(&["192.0.2.111"]),
        &mut host,
        &mut st,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("already has address 192.0.2.111"),
        "{err}"
    );
    assert_eq!(st.routed().unwrap().addrs.len(), 3);

    // --ipdel one address: gone from CT, host route and proxy table.
    let errs = del_addrs(
        ct(101),
        Some(ns.fd()),
        &AddrSelection::Some(ips(&["192.0.2.101"])),
        &mut host,
        &mut st,
    )
    .unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    let h = topo.host.snapshot();
    assert!(
        !has(&h.routes, "192.0.2.101/32") && !has(&h.proxy, "192.0.2.101 "),
        "{h:#?}"
    );
    assert!(!ns.snapshot().addrs.contains("venet0 192.0.2.101/32"));
    assert!(topo.uplink.ping("192.0.2.111"));
    let err = del_addrs(
        ct(101),
        Some(ns.fd()),
        &AddrSelection::Some(ips(&["192.0.2.101"])),
        &mut host,
        &mut st,
    )
    .unwrap_err();
    assert!(matches!(err, NetError::NoSuchAddr { .. }), "{err:?}");

    // --ipdel all.
    let errs = del_addrs(
        ct(101),
        Some(ns.fd()),
        &AddrSelection::All,
        &mut host,
        &mut st,
    )
    .unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    let h = topo.host.snapshot();
    assert!(h.proxy.is_empty(), "{:#?}", h.proxy);
    assert!(
        !has(&h.routes, "dev venet101")
            || h.routes
                .iter()
                .filter(|r| r.contains("dev venet101"))
                .all(|r| r.contains("fe80") || r.contains("ff00") || r.contains("169.254.0.1")),
        "{:#?}",
        h.routes
    );

    // --netif_add / --netif_del on the running CT.
    let mut b = bridged_iface(21);
    b.name = "eth1".into();
    // venet0 already holds the IPv6 default route: a second one is refused, nothing left.
    let host_mid = topo.host.settled_snapshot();
    let err = add_netif(ct(101), ns.fd(), &b, &mut host, &mut st).unwrap_err();
    assert!(
        err.to_string().contains("already has a default route"),
        "{err}"
    );
    assert_same("host after refused netif", &host_mid, &topo.host.snapshot());
    assert!(!has(&ns.snapshot().links, "eth1"));
    b.gateway6 = None;
    add_netif(ct(101), ns.fd(), &b, &mut host, &mut st).unwrap();
    assert!(has(
        &topo.host.snapshot().links,
        "veth101.1 veth up mtu 1500 master br0"
    ));
    assert!(
        ns.ping("198.51.100.1"),
        "bridged interface added live does not work"
    );
    let err = add_netif(ct(101), ns.fd(), &b, &mut host, &mut st).unwrap_err();
    assert!(err.to_string().contains("configured twice"), "{err}");
    let errs = del_netif(ct(101), Some("eth1"), &mut host, &mut st).unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    assert!(!has(&topo.host.snapshot().links, "veth101.1"));
    assert!(!has(&ns.snapshot().links, "eth1"));
    assert!(matches!(
        del_netif(ct(101), Some("eth1"), &mut host, &mut st),
        Err(NetError::NoSuchIface { .. })
    ));

    // --ipadd on a CT that has no routed interface any more creates venet again.
    clean_teardown(&st, &mut host);
    let mut st = NetState::new(ct(101));
    add_addrs(
        ct(101),
        ns.fd(),
        &cfg,
        &ips(&["192.0.2.101"]),
        &mut host,
        &mut st,
    )
    .unwrap();
    assert!(topo.uplink.ping("192.0.2.101"));
    clean_teardown(&st, &mut host);
    assert_same(
        "host netns after live changes",
        &host_before,
        &topo.host.snapshot(),
    );
}

#[test]
fn failed_setup_rolls_back() {
    let topo = Topology::new();
    let mut host = topo.hostnet();
    let host_before = topo.host.snapshot();
    let ns = Ns::new();

    // Bridge missing: the routed part already done must be undone.
    let mut cfg = routed(&["192.0.2.101", "2001:db8:1::101"]);
    let mut b = bridged_iface(11);
    (b.gateway4, b.gateway6) = (None, None);
    b.bridge = Some("nosuchbr".into());
    cfg.ifaces.push(Iface::Bridged(b.clone()));
    let err = setup(ct(101), ns.fd(), &cfg, &mut host).unwrap_err();
    assert!(matches!(err, NetError::BridgeNotFound { .. }), "{err:?}");
    assert!(
        err.to_string().contains("bridge nosuchbr does not exist"),
        "{err}"
    );
    assert_same(
        "host after missing bridge",
        &host_before,
        &topo.host.snapshot(),
    );
    assert!(!has(&ns.snapshot().links, "venet0"));

    // Not a bridge.
    b.bridge = Some("up0".into());
    let err = setup(
        ct(101),
        ns.fd(),
        &NetConfig {
            ifaces: vec![Iface::Bridged(b)],
            ..Default::default()
        },
        &mut host,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("up0 is not a bridge (it is veth)"),
        "{err}"
    );

    // Neighbour device missing.
    let mut cfg = routed(&["192.0.2.101"]);
    cfg.neighbour_devs = NeighbourDevs::List(vec!["nosuchdev".into()]);
    let err = setup(ct(101), ns.fd(), &cfg, &mut host).unwrap_err();
    assert!(
        err.to_string()
            .contains("neighbour device nosuchdev does not exist"),
        "{err}"
    );
    assert_same(
        "host after missing neighbour dev",
        &host_before,
        &topo.host.snapshot(),
    );

    // Host interface name taken.
    topo.host.ip("link add venet101 type bridge");
    let err = setup(ct(101), ns.fd(), &routed(&["192.0.2.101"]), &mut host).unwrap_err();
    assert!(
        err.to_string()
            .contains("interface venet101 already exists in the host netns"),
        "{err}"
    );
    topo.host.ip("link del venet101");

    // CT interface name taken.
    ns.ip("link add eth0 type bridge");
    let err = setup(ct(201), ns.fd(), &bridged(11), &mut host).unwrap_err();
    assert!(
        err.to_string()
            .contains("interface eth0 already exists in CT 201's netns"),
        "{err}"
    );
    assert_same(
        "host after name clashes",
        &host_before,
        &topo.host.snapshot(),
    );

    // Invalid configuration changes nothing and says why.
    let err = setup(ct(101), ns.fd(), &routed(&["224.0.0.1"]), &mut host).unwrap_err();
    assert!(
        err.to_string().contains("224.0.0.1 is a multicast"),
        "{err}"
    );
}

#[test]
fn bridged_vlan_mac_mtu() {
    let topo = Topology::new();
    let mut host = topo.hostnet();
    let out = topo.host.run(
        "ip",
        &[
            "link",
            "add",
            "brv",
            "type",
            "bridge",
            "vlan_filtering",
            "1",
        ],
    );
    let vlan_ok = out.status.success();
    if !vlan_ok {
        skip(
            "bridged VLAN port check",
            &format!(
                "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
        topo.host.ip("link add brv type bridge");
    }
    topo.host.ip("link set brv up");
    let ns = Ns::new();
    let mut b = BridgedIface::new("eth0");
    b.bridge = Some("brv".into());
    b.vlan = vlan_ok.then_some(10);
    b.mtu = Some(1400);
    b.mac = Some("02:11:22:33:44:55".parse().unwrap());
    let cfg = NetConfig {
        ifaces: vec![Iface::Bridged(b.clone())],
        ..Default::default()
    };
    let st = setup(ct(301), ns.fd(), &cfg, &mut host).unwrap();
    if vlan_ok {
        let port = st.ifaces[0].host_ifindex;
        let vlans = port_vlans(&mut topo.host.netlink(), port).unwrap();
        let vids: Vec<(u16, u16)> = vlans.iter().map(|v| (v.vid, v.flags.bits())).collect();
        // BRIDGE_VLAN_INFO_PVID (2) | BRIDGE_VLAN_INFO_UNTAGGED (4); the default PVID 1 removed.
        assert_eq!(vids, vec![(10, 6)], "{vlans:?}");
    }
    let h = topo.host.snapshot();
    assert!(
        has(&h.links, "veth301.0 veth up mtu 1400 master brv"),
        "{:#?}",
        h.links
    );
    let l = Snapshot::take(&mut ns.netlink()).unwrap();
    assert!(has(&l.links, "eth0 veth down mtu 1400"), "{:#?}", l.links);
    assert_eq!(ns.mac("eth0"), "02:11:22:33:44:55");
    assert_eq!(topo.host.mac("veth301.0"), "fe:00:00:00:01:2d");
    clean_teardown(&st, &mut host);

    // VLAN on a bridge without VLAN filtering is refused with the fix in the message.
    b.bridge = Some("br0".into());
    b.vlan = Some(10);
    let cfg = NetConfig {
        ifaces: vec![Iface::Bridged(b)],
        ..Default::default()
    };
    let before = topo.host.snapshot();
    let err = setup(ct(301), ns.fd(), &cfg, &mut host).unwrap_err();
    assert!(err.to_string().contains("vlan_filtering 1"), "{err}");
    assert_same("host after refused VLAN", &before, &topo.host.snapshot());
    topo.host.ip("link del brv");
}

#[test]
fn dad_probe_and_announcements() {
    let topo = Topology::new();
    let mut host = topo.hostnet();
    let host_before = topo.host.snapshot();
    let ns = Ns::new();
    let up1_mac = topo.uplink.mac("up1");

    // The uplink uses 192.0.2.1 / 2001:db8:1::1: the probe must find it and change nothing.
    for addr in [UPLINK4, UPLINK6] {
        let mut cfg = routed(&[addr]);
        cfg.arp_probe = true;
        let err = setup(ct(101), ns.fd(), &cfg, &mut host).unwrap_err();
        match &err {
            NetError::DuplicateOnLink { dev, mac, .. } => {
                assert_eq!(dev, "up0");
                assert_eq!(mac, &up1_mac);
            }
            other => panic!("expected DuplicateOnLink for {addr}, got {other:?}"),
        }
        assert_same(
            "host after failed probe",
            &host_before,
            &topo.host.snapshot(),
        );
    }

    // A free address passes the probe; with announcements on, the uplink sees a gratuitous ARP
    // and an unsolicited NA carrying the host's up0 MAC.
    let cap = Capture::open(&topo.uplink, "up1");
    let mut cfg = routed(&["192.0.2.120", "2001:db8:1::120"]);
    cfg.arp_probe = true;
    cfg.gratuitous_arp = true;
    let st = setup(ct(101), ns.fd(), &cfg, &mut host).unwrap();
    let up0_mac: Vec<u8> = {
        topo.host
            .mac("up0")
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    };
    let frames = cap.frames(Duration::from_millis(300));
    let garp = frames.iter().any(|f| {
        f.len() >= 42
            && f[12..14] == [8, 6]
            && f[22..28] == up0_mac[..]
            && f[28..32] == [192, 0, 2, 120]
            && f[38..42] == [192, 0, 2, 120]
    });
    let target6: std::net::Ipv6Addr = "2001:db8:1::120".parse().unwrap();
    let na = frames.iter().any(|f| {
        f.len() >= 86
            && f[12..14] == [0x86, 0xdd]
            && f[54] == 136
            && f[62..78] == target6.octets()
            && f[80..86] == up0_mac[..]
    });
    assert!(garp, "no gratuitous ARP seen among {} frames", frames.len());
    assert!(na, "no unsolicited NA seen among {} frames", frames.len());
    assert!(topo.uplink.ping("192.0.2.120"));
    clean_teardown(&st, &mut host);
    assert_same("host after probe test", &host_before, &topo.host.snapshot());
}

#[test]
fn sysctls_set_when_missing() {
    let topo = Topology::bare();
    let mut host = topo.hostnet();
    let ns = Ns::new();
    let st = setup(
        ct(101),
        ns.fd(),
        &routed(&["192.0.2.101", "2001:db8:1::101"]),
        &mut host,
    )
    .unwrap();
    for key in [
        "net.ipv4.conf.all.forwarding",
        "net.ipv6.conf.all.forwarding",
        "net.ipv6.conf.up0.proxy_ndp",
    ] {
        let out = topo.host.run("sysctl", &["-n", key]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{key}");
    }
    assert!(topo.uplink.ping("2001:db8:1::101"));
    clean_teardown(&st, &mut host);
}

#[test]
fn teardown_by_dropping_netns_and_from_config() {
    let topo = Topology::new();
    let mut host = topo.hostnet();
    let host_before = topo.host.snapshot();

    // NetnsExit: proxies removed by teardown, veths (and their routes) go with the namespaces.
    let mut cts = Vec::new();
    for i in 0..3u8 {
        let ns = Ns::new();
        let cfg = routed(&[
            &format!("192.0.2.{}", 110 + i),
            &format!("2001:db8:1::{}", 110 + i),
        ]);
        let st = setup(ct(110 + u32::from(i)), ns.fd(), &cfg, &mut host).unwrap();
        cts.push((ns, st));
    }
    for (_, st) in &cts {
        let errs = teardown(st, &mut host, LinkTeardown::NetnsExit);
        assert!(errs.is_empty(), "{errs:?}");
    }
    drop(cts);
    assert!(
        wait_for(Duration::from_secs(5), || topo.host.snapshot()
            == host_before),
        "host not clean after the CT namespaces were dropped: {:#?}",
        topo.host.snapshot().minus(&host_before)
    );

    // gc after a crash lost the state: teardown from what the configuration implies.
    let ns = Ns::new();
    let mut cfg = routed(&["192.0.2.101", "2001:db8:1::101"]);
    let mut b = bridged_iface(11);
    (b.gateway4, b.gateway6) = (None, None);
    cfg.ifaces.push(Iface::Bridged(b));
    let _lost = setup(ct(101), ns.fd(), &cfg, &mut host).unwrap();
    let errs = teardown(
        &NetState::expected(ct(101), &cfg),
        &mut host,
        LinkTeardown::Delete,
    );
    assert!(errs.is_empty(), "{errs:?}");
    assert_same(
        "host after gc-style teardown",
        &host_before,
        &topo.host.snapshot(),
    );
    // A second teardown finds nothing and reports nothing.
    let errs = teardown(
        &NetState::expected(ct(101), &cfg),
        &mut host,
        LinkTeardown::Delete,
    );
    assert!(errs.is_empty(), "{errs:?}");
}
