//! Real-kernel tests of the eBPF datapath (needs root, bpffs, kernel with TCX or clsact).
//! Each test pins under its own `/sys/fs/bpf/berth-test-<pid>x<n>` and works in namespaces it
//! creates; teardown is asserted. Run:
//! `cargo test -p berth-tests --test datapath -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use berth::datapath::{
    AttachMethod, ByteLayer, Datapath, DatapathConfig, Direction, DropReason, Family, IfaceConfig,
    parse_networks_classes,
};
use berth_tests::datapath::{
    CT_MAC, HOST_MAC, Netns, Pair, PinDir, VERDICT_DROP, VERDICT_PASS, arp, eth, ipv4, ipv6,
    nd_solicit, skb_ctx, test_run, wire_len,
};

/// Interfaces are gone with their namespaces; pins with the directory; the programs with the
/// last reference (the kernel frees links and programs asynchronously, after an RCU grace
/// period and the namespace's cleanup work, so wait a little).
fn assert_clean(pin: &Path, prog_ids: (u32, u32)) -> Result<()> {
    ensure!(!pin.exists(), "{} left behind", pin.display());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = Vec::new();
        for info in aya::programs::loaded_programs() {
            let id = info?.id();
            if id == prog_ids.0 || id == prog_ids.1 {
                left.push(id);
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "programs {left:?} still loaded after 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Toolchain proof: the aya-built object loads, attaches to a veth with TCX and counts.
#[test]
fn loads_attaches_and_counts_ping() -> Result<()> {
    let pin = PinDir::new();
    let pair = Pair::new()?;
    pair.host
        .ip(&["addr", "add", "10.77.0.1/24", "dev", &pair.host_if])?;
    pair.ct
        .ip(&["addr", "add", "10.77.0.2/24", "dev", &pair.ct_if])?;
    let ids;
    {
        let _in_host = pair.host.enter()?;
        let mut dp = Datapath::open_or_load(&pin.path)?;
        ensure!(
            dp.attach_method() == AttachMethod::Tcx,
            "kernel 6.18 has TCX"
        );
        ids = dp.program_ids()?;
        let ifindex = pair.host.ifindex(&pair.host_if)?;
        let mut cfg = IfaceConfig::routed(4242, pair.ct_mac()?);
        cfg.mac_filter = true;
        dp.attach(ifindex, cfg)?;
        dp.set_ct_addrs(4242, &["10.77.0.2".parse()?])?;
        pair.ct
            .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.1"])?;
        let rows = dp.counters()?;
        let v4_out: u64 = rows
            .iter()
            .filter(|r| r.ctid == 4242 && r.dir == Direction::Out && r.family == Family::V4)
            .map(|r| r.packets)
            .sum();
        let v4_in: u64 = rows
            .iter()
            .filter(|r| r.ctid == 4242 && r.dir == Direction::In && r.family == Family::V4)
            .map(|r| r.packets)
            .sum();
        ensure!(v4_out >= 3 && v4_in >= 3, "counters: {rows:?}");
        ensure!(dp.drops()?.is_empty(), "drops: {:?}", dp.drops()?);
    }
    let path = pin.path.clone();
    drop(pin);
    drop(pair);
    assert_clean(&path, ids)
}

// ---- BPF_PROG_TEST_RUN: verdicts and counters on synthetic frames -------------------------

const CT: u32 = 101;
const CT_V4: [u8; 4] = [10, 0, 0, 2];
const LO: u32 = 1;

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

type CounterModel = BTreeMap<(u32, Direction, u8, Family), (u64, u64)>;
type DropModel = BTreeMap<(u32, Direction, DropReason), (u64, u64)>;

enum Expect {
    Pass { class: u8, family: Family },
    Drop(DropReason),
}

/// Runs every synthetic case against the loaded programs, keeping a model of what the
/// counters must be and comparing the whole maps after every packet.
struct Unit {
    dp: Datapath,
    counters: CounterModel,
    drops: DropModel,
    layer: ByteLayer,
}

impl Unit {
    fn run(
        &mut self,
        what: &str,
        dir: Direction,
        frame: &[u8],
        gso_segs: u32,
        expect: Expect,
    ) -> Result<()> {
        let (from_ct, to_ct) = self.dp.programs();
        let prog = if dir == Direction::Out {
            from_ct
        } else {
            to_ct
        };
        let ctx = skb_ctx(0, gso_segs, if gso_segs > 0 { 1000 } else { 0 });
        let verdict = test_run(prog, frame, Some(&ctx)).with_context(|| what.to_owned())?;
        let len = wire_len(frame);
        match expect {
            Expect::Pass { class, family } => {
                ensure!(
                    verdict == VERDICT_PASS,
                    "{what}: verdict {verdict}, want pass"
                );
                let bytes = match self.layer {
                    ByteLayer::L2 => len,
                    ByteLayer::L3 => len - 14,
                };
                let e = self.counters.entry((CT, dir, class, family)).or_default();
                e.0 += bytes;
                e.1 += u64::from(gso_segs.max(1));
            }
            Expect::Drop(reason) => {
                ensure!(
                    verdict == VERDICT_DROP,
                    "{what}: verdict {verdict}, want drop"
                );
                let e = self.drops.entry((CT, dir, reason)).or_default();
                e.0 += 1;
                e.1 += len;
            }
        }
        let got: CounterModel = self
            .dp
            .counters()?
            .into_iter()
            .map(|r| ((r.ctid, r.dir, r.class, r.family), (r.bytes, r.packets)))
            .collect();
        ensure!(
            got == self.counters,
            "{what}: counters {got:?}\nwant {:?}",
            self.counters
        );
        let got: DropModel = self
            .dp
            .drops()?
            .into_iter()
            .map(|r| ((r.ctid, r.dir, r.reason), (r.packets, r.bytes)))
            .collect();
        ensure!(
            got == self.drops,
            "{what}: drops {got:?}\nwant {:?}",
            self.drops
        );
        Ok(())
    }
}

#[test]
fn prog_test_run_verdicts_and_counters() -> Result<()> {
    use Direction::{In, Out};
    use DropReason::*;
    use Expect::{Drop, Pass};
    use Family::{Other, V4, V6};

    let pin = PinDir::new();
    let ns = Netns::new("bdu")?;
    let _in_ns = ns.enter()?;
    let dp = Datapath::open_or_load(&pin.path)?;
    let ids = dp.program_ids()?;
    let mut u = Unit {
        dp,
        counters: BTreeMap::new(),
        drops: BTreeMap::new(),
        layer: ByteLayer::L2,
    };
    // BPF_PROG_TEST_RUN runs the program on the calling thread's namespace's loopback: make
    // `lo` the CT's interface.
    u.dp.attach(LO, IfaceConfig::routed(CT, CT_MAC))?;
    u.dp.set_ct_addrs(CT, &["10.0.0.2".parse()?, "2001:db8::2".parse()?])?;
    u.dp.load_classes(&parse_networks_classes(
        "0 192.0.2.0/24\n2 198.51.100.0/24\n5 198.51.100.128/25\n3 2001:db8:1::/48\n",
    )?)?;
    u.dp.set_config(DatapathConfig {
        byte_layer: ByteLayer::L2,
        default_class: 7,
    })?;
    let ll = v6("fe80::2");
    let ct6 = v6("2001:db8::2");

    // Routed, from the CT: classes by destination, longest prefix wins, default otherwise.
    u.run(
        "v4 class 0",
        Out,
        &ipv4(CT_MAC, CT_V4, [192, 0, 2, 9], 100, 0),
        0,
        Pass {
            class: 0,
            family: V4,
        },
    )?;
    u.run(
        "v4 class 2",
        Out,
        &ipv4(CT_MAC, CT_V4, [198, 51, 100, 9], 10, 0),
        0,
        Pass {
            class: 2,
            family: V4,
        },
    )?;
    u.run(
        "v4 class 5 (/25 beats /24)",
        Out,
        &ipv4(CT_MAC, CT_V4, [198, 51, 100, 200], 10, 0),
        0,
        Pass {
            class: 5,
            family: V4,
        },
    )?;
    u.run(
        "v4 default class",
        Out,
        &ipv4(CT_MAC, CT_V4, [203, 0, 113, 1], 10, 0),
        0,
        Pass {
            class: 7,
            family: V4,
        },
    )?;
    u.run(
        "v6 class 3",
        Out,
        &ipv6(CT_MAC, ct6, v6("2001:db8:1::5"), 17, 30),
        0,
        Pass {
            class: 3,
            family: V6,
        },
    )?;
    u.run(
        "v6 default class",
        Out,
        &ipv6(CT_MAC, ct6, v6("2001:db8:2::1"), 17, 30),
        0,
        Pass {
            class: 7,
            family: V6,
        },
    )?;
    u.run(
        "GSO: 5 segments",
        Out,
        &ipv4(CT_MAC, CT_V4, [192, 0, 2, 9], 1400, 0),
        5,
        Pass {
            class: 0,
            family: V4,
        },
    )?;
    // Fragments: addresses are in every fragment's header; no L4 parsing, nothing misread.
    u.run(
        "first fragment",
        Out,
        &ipv4(CT_MAC, CT_V4, [192, 0, 2, 9], 64, 0x2000),
        0,
        Pass {
            class: 0,
            family: V4,
        },
    )?;
    u.run(
        "non-first fragment",
        Out,
        &ipv4(CT_MAC, CT_V4, [192, 0, 2, 9], 3, 0x0010),
        0,
        Pass {
            class: 0,
            family: V4,
        },
    )?;
    u.run(
        "spoofed fragment",
        Out,
        &ipv4(CT_MAC, [10, 0, 0, 3], [192, 0, 2, 9], 3, 0x0010),
        0,
        Drop(SpoofedIp),
    )?;
    // Neighbour discovery and ARP.
    u.run(
        "ND from link-local",
        Out,
        &nd_solicit(CT_MAC, ll, v6("fe80::1")),
        0,
        Pass {
            class: 7,
            family: V6,
        },
    )?;
    u.run(
        "DAD from ::",
        Out,
        &nd_solicit(CT_MAC, [0; 16], ct6),
        0,
        Pass {
            class: 7,
            family: V6,
        },
    )?;
    u.run(
        "ARP from own address",
        Out,
        &arp(CT_MAC, CT_V4, [10, 0, 0, 1]),
        0,
        Pass {
            class: 7,
            family: Other,
        },
    )?;
    u.run(
        "ARP probe (0.0.0.0)",
        Out,
        &arp(CT_MAC, [0; 4], CT_V4),
        0,
        Pass {
            class: 7,
            family: Other,
        },
    )?;
    // Anti-spoofing.
    u.run(
        "spoofed v4",
        Out,
        &ipv4(CT_MAC, [10, 0, 0, 3], [192, 0, 2, 9], 10, 0),
        0,
        Drop(SpoofedIp),
    )?;
    u.run(
        "spoofed v6",
        Out,
        &ipv6(CT_MAC, v6("2001:db8::3"), v6("2001:db8:1::5"), 17, 0),
        0,
        Drop(SpoofedIp),
    )?;
    u.run(
        "v6 :: to a unicast address",
        Out,
        &ipv6(CT_MAC, [0; 16], v6("2001:db8:1::5"), 58, 8),
        0,
        Drop(SpoofedIp),
    )?;
    u.run(
        "spoofed ARP sender",
        Out,
        &arp(CT_MAC, [10, 0, 0, 99], [10, 0, 0, 1]),
        0,
        Drop(SpoofedIp),
    )?;
    u.run(
        "non-IP (routed)",
        Out,
        &eth(HOST_MAC, CT_MAC, 0x88b5)
            .into_iter()
            .chain([0u8; 46])
            .collect::<Vec<_>>(),
        0,
        Drop(NonIp),
    )?;
    // Truncated and invalid headers.
    // (Truncated IPv4/IPv6 frames cannot go through BPF_PROG_TEST_RUN: it refuses frames
    // whose ethertype promises an IP header it cannot pull, EINVAL. The end-to-end test sends
    // them from a packet socket instead.)
    let mut bad_ihl = ipv4(CT_MAC, CT_V4, [192, 0, 2, 9], 20, 0);
    bad_ihl[14] = 0x44;
    u.run("IPv4 ihl 4", Out, &bad_ihl, 0, Drop(Malformed))?;
    let mut short_arp = arp(CT_MAC, CT_V4, [10, 0, 0, 1]);
    short_arp.truncate(14 + 20);
    u.run("truncated ARP", Out, &short_arp, 0, Drop(Malformed))?;
    let mut wrong_version = ipv6(CT_MAC, ct6, v6("2001:db8:1::5"), 17, 8);
    wrong_version[14] = 0x40;
    u.run(
        "IPv6 ethertype, version 4",
        Out,
        &wrong_version,
        0,
        Drop(Malformed),
    )?;

    // Routed, to the CT: classes by source; only the CT's addresses are delivered.
    u.run(
        "to CT v4 class 0",
        In,
        &ipv4(HOST_MAC, [192, 0, 2, 9], CT_V4, 50, 0),
        0,
        Pass {
            class: 0,
            family: V4,
        },
    )?;
    u.run(
        "to CT v6 class 3",
        In,
        &ipv6(HOST_MAC, v6("2001:db8:1::5"), ct6, 6, 50),
        0,
        Pass {
            class: 3,
            family: V6,
        },
    )?;
    u.run(
        "to CT all-nodes multicast",
        In,
        &ipv6(HOST_MAC, v6("fe80::1"), v6("ff02::1"), 58, 8),
        0,
        Pass {
            class: 7,
            family: V6,
        },
    )?;
    u.run(
        "to CT link-local",
        In,
        &ipv6(HOST_MAC, v6("fe80::1"), ll, 58, 8),
        0,
        Pass {
            class: 7,
            family: V6,
        },
    )?;
    u.run(
        "to CT ARP",
        In,
        &arp(HOST_MAC, [10, 0, 0, 1], CT_V4),
        0,
        Pass {
            class: 7,
            family: Other,
        },
    )?;
    u.run(
        "to CT wrong v4 dst",
        In,
        &ipv4(HOST_MAC, [192, 0, 2, 9], [10, 0, 0, 3], 50, 0),
        0,
        Drop(BadDst),
    )?;
    u.run(
        "to CT wrong v6 dst",
        In,
        &ipv6(HOST_MAC, v6("2001:db8:1::5"), v6("2001:db8::3"), 6, 50),
        0,
        Drop(BadDst),
    )?;
    u.run(
        "to CT non-IP",
        In,
        &eth(CT_MAC, HOST_MAC, 0x88b5)
            .into_iter()
            .chain([0u8; 46])
            .collect::<Vec<_>>(),
        0,
        Drop(NonIp),
    )?;

    // L3 byte layer.
    u.dp.set_config(DatapathConfig {
        byte_layer: ByteLayer::L3,
        default_class: 7,
    })?;
    u.layer = ByteLayer::L3;
    u.run(
        "L3 bytes",
        Out,
        &ipv4(CT_MAC, CT_V4, [192, 0, 2, 9], 100, 0),
        0,
        Pass {
            class: 0,
            family: V4,
        },
    )?;
    u.dp.set_config(DatapathConfig {
        byte_layer: ByteLayer::L2,
        default_class: 7,
    })?;
    u.layer = ByteLayer::L2;

    // Bridged with mac_filter: the source MAC is policed, addresses are not...
    u.dp.attach(LO, IfaceConfig::bridged(CT, CT_MAC))?;
    let other_mac = [0x02, 0, 0, 0, 0, 0x99];
    u.run(
        "bridged spoofed MAC",
        Out,
        &ipv4(other_mac, CT_V4, [192, 0, 2, 9], 10, 0),
        0,
        Drop(SpoofedMac),
    )?;
    u.run(
        "bridged spoofed MAC (ARP)",
        Out,
        &arp(other_mac, CT_V4, [10, 0, 0, 1]),
        0,
        Drop(SpoofedMac),
    )?;
    u.run(
        "bridged foreign IP passes",
        Out,
        &ipv4(CT_MAC, [10, 0, 0, 3], [192, 0, 2, 9], 10, 0),
        0,
        Pass {
            class: 0,
            family: V4,
        },
    )?;
    u.run(
        "bridged non-IP passes",
        Out,
        &eth(HOST_MAC, CT_MAC, 0x88b5)
            .into_iter()
            .chain([0u8; 46])
            .collect::<Vec<_>>(),
        0,
        Pass {
            class: 7,
            family: Other,
        },
    )?;
    u.run(
        "bridged any dst delivered",
        In,
        &ipv4(HOST_MAC, [192, 0, 2, 9], [10, 0, 0, 3], 10, 0),
        0,
        Pass {
            class: 0,
            family: V4,
        },
    )?;
    // ...unless ip_filter is on.
    let mut cfg = IfaceConfig::bridged(CT, CT_MAC);
    cfg.ip_filter = true;
    u.dp.attach(LO, cfg)?;
    u.run(
        "bridged ip_filter spoofed IP",
        Out,
        &ipv4(CT_MAC, [10, 0, 0, 3], [192, 0, 2, 9], 10, 0),
        0,
        Drop(SpoofedIp),
    )?;
    u.run(
        "bridged ip_filter own IP",
        Out,
        &ipv4(CT_MAC, CT_V4, [192, 0, 2, 9], 10, 0),
        0,
        Pass {
            class: 0,
            family: V4,
        },
    )?;
    u.run(
        "bridged ip_filter non-IP",
        Out,
        &eth(HOST_MAC, CT_MAC, 0x88b5)
            .into_iter()
            .chain([0u8; 46])
            .collect::<Vec<_>>(),
        0,
        Drop(NonIp),
    )?;

    // Interfaces not in IFACES are not ours: untouched, uncounted.
    u.dp.detach(LO)?;
    let (from_ct, _) = u.dp.programs();
    let v = test_run(
        from_ct,
        &ipv4(other_mac, [10, 9, 9, 9], [192, 0, 2, 9], 10, 0),
        None,
    )?;
    ensure!(v == VERDICT_PASS, "unmanaged interface: verdict {v}");
    ensure!(
        u.dp.drops()?.iter().map(|d| d.packets).sum::<u64>()
            == u.drops.values().map(|d| d.0).sum::<u64>()
    );

    // Removing the CT keeps its counters (billing) and forgets its addresses.
    u.dp.remove_ct(CT)?;
    ensure!(u.dp.ct_addrs(CT)?.is_empty());
    ensure!(!u.dp.counters()?.is_empty());

    drop(u);
    drop(_in_ns);
    let path = pin.path.clone();
    drop(pin);
    drop(ns);
    assert_clean(&path, ids)
}
