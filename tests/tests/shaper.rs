//! Shaper end to end: routed and bridged topologies of throwaway namespaces (a "host" routing
//! between two "CTs", or bridging them to a peer), the shaper applied on the host-side veths,
//! real TCP/UDP traffic with iperf3; both attach methods (TCX, clsact + cls_bpf); the EDT
//! program and the packet-rate bucket under BPF_PROG_TEST_RUN.
//! Run as root: `cargo test -p berth-tests --test shaper -- --test-threads=1`.

use std::{thread, time::Duration};

use anyhow::{Result, ensure};
use aya::{
    maps::{Map, MapData, PerCpuHashMap},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use berth::{
    datapath::{AttachMethod, ClassEntry, Datapath, Direction, IfaceConfig},
    shaper::{ClassRate, Rate, Shaper, ShapingConfig, Size},
};
use berth_common::{
    DIR_IN, DropValue,
    shaper::{
        DROP_HORIZON, DROP_PPS, EDT_TOTAL, EdtSlot, EdtState, PPS_IN, PpsBucket, ShapeIface,
        map_names as shaper_maps,
    },
};
use berth_tests::ct;
use berth_tests::{
    datapath::{PinDir, VERDICT_DROP, VERDICT_PASS},
    shaper::{
        Run, Server, Topo, assert_no_shaping, both, iperf, ping_rtts, port, quantile, rate,
        tc_show, tcp, within,
    },
};

#[test]
fn ten_mbit_each_direction_then_removal_restores_full_speed() -> Result<()> {
    let t = Topo::new()?;
    let pin = PinDir::new();
    let _g = t.host.enter()?;
    let mut sh = Shaper::open(&pin.path)?;
    sh.apply(ct(101), t.a.ifindex, &both("10mbit"))?;

    let st = sh.status(ct(101))?;
    ensure!(st.interfaces.len() == 1, "{st:?}");
    let cfg = &st.interfaces[0].config;
    ensure!(
        cfg.rate_in == Some(rate("10mbit")) && cfg.rate_out == Some(rate("10mbit")),
        "{cfg:?}"
    );
    ensure!(st.interfaces[0].ifb.is_some(), "no IFB reported: {st:?}");

    let i = tcp(&t, "in", 5)?;
    within(i.goodput_bps, 10e6, "in")?;
    let o = tcp(&t, "out", 5)?;
    within(o.goodput_bps, 10e6, "out")?;
    for (d, r) in [("in", i), ("out", o)] {
        ensure!(
            r.retransmits as f64 <= 0.001 * r.segments as f64,
            "{d}: {} retransmits of {} segments",
            r.retransmits,
            r.segments
        );
    }

    sh.remove(ct(101), t.a.ifindex)?;
    assert_no_shaping(&t.host, &t.a.host_if)?;
    ensure!(sh.status(ct(101))?.interfaces.is_empty());
    let i = tcp(&t, "in", 2)?;
    let o = tcp(&t, "out", 2)?;
    eprintln!(
        "unshaped: in {:.0} Mbit/s, out {:.0} Mbit/s",
        i.goodput_bps / 1e6,
        o.goodput_bps / 1e6
    );
    ensure!(
        i.goodput_bps > 200e6 && o.goodput_bps > 200e6,
        "not full speed after removal"
    );
    drop(sh);
    Shaper::unload_all(&pin.path)?;
    ensure!(!pin.path.join("shaper").exists());
    Ok(())
}

fn check_ten_mbit_both_ways(t: &Topo, secs: u32) -> Result<()> {
    let i = tcp(t, "in", secs)?;
    within(i.goodput_bps, 10e6, &format!("{} in", t.mode()))?;
    let o = tcp(t, "out", secs)?;
    within(o.goodput_bps, 10e6, &format!("{} out", t.mode()))?;
    for (d, r) in [("in", i), ("out", o)] {
        ensure!(
            r.retransmits as f64 <= 0.001 * r.segments as f64,
            "{} {d}: {} retransmits of {} segments",
            t.mode(),
            r.retransmits,
            r.segments
        );
    }
    Ok(())
}

#[test]
fn bridged_ct_ten_mbit_each_direction() -> Result<()> {
    let t = Topo::bridged()?;
    let pin = PinDir::new();
    let _g = t.host.enter()?;
    let mut sh = Shaper::open(&pin.path)?;
    sh.apply(ct(111), t.a.ifindex, &both("10mbit"))?;
    check_ten_mbit_both_ways(&t, 5)?;
    sh.remove(ct(111), t.a.ifindex)?;
    assert_no_shaping(&t.host, &t.a.host_if)?;
    // Still bridged after teardown: the port is in the bridge and traffic flows.
    let master = t.host.ip(&["-o", "link", "show", &t.a.host_if])?;
    ensure!(
        master.contains(t.bridge.as_deref().unwrap_or("?")),
        "{master}"
    );
    let i = tcp(&t, "in", 2)?;
    ensure!(i.goodput_bps > 200e6, "not full speed after removal: {i:?}");
    Ok(())
}

/// The cls_bpf fallback, chosen through the API: the datapath's accounting filter and the
/// shaper's filters share clsact; the shaper's run last (classification reaches HTB, the
/// redirect reaches the IFB), the accounting still counts both directions, and removing the
/// shaper leaves the datapath's filters alone.
#[test]
fn cls_bpf_attach_shapes_after_accounting_and_tears_down() -> Result<()> {
    let t = Topo::new()?;
    let pin = PinDir::new();
    let _g = t.host.enter()?;
    let mac = {
        let s =
            t.a.ns
                .exec(&["cat", &format!("/sys/class/net/{}/address", t.a.ct_if)])?;
        berth_tests::datapath::parse_mac(s.trim())?
    };
    let mut dp = Datapath::open_or_load_with(&pin.path, AttachMethod::Netlink)?;
    dp.attach(t.a.ifindex, IfaceConfig::bridged(ct(112), mac))?;
    let mut sh = Shaper::open_with(&pin.path, AttachMethod::Netlink)?;
    sh.apply(ct(112), t.a.ifindex, &both("10mbit"))?;
    // Applying again (a live change) replaces our filters instead of stacking them.
    sh.apply(ct(112), t.a.ifindex, &both("10mbit"))?;
    for hook in ["ingress", "egress"] {
        let f = berth_tests::datapath::run(
            "tc",
            &[
                "-n",
                &t.host.name,
                "filter",
                "show",
                "dev",
                &t.a.host_if,
                hook,
            ],
        )?;
        ensure!(
            f.lines().filter(|l| l.contains("berth_shape")).count() == 1,
            "{hook}: one shaper filter expected: {f}"
        );
        let prio = |name: &str| -> Option<u32> {
            f.lines()
                .find(|l| l.contains(name))?
                .split_whitespace()
                .skip_while(|w| *w != "pref")
                .nth(1)?
                .parse()
                .ok()
        };
        let (acct, shape) = (
            prio("berth_from_ct").or(prio("berth_to_ct")),
            prio("berth_shape"),
        );
        ensure!(
            matches!((acct, shape), (Some(a), Some(s)) if a < s),
            "{hook}: accounting must run before the shaper: {f}"
        );
    }
    let before = dp.counters()?;
    check_ten_mbit_both_ways(&t, 4)?;
    let sum = |rows: &[berth::datapath::CounterRow], d: Direction| -> u64 {
        rows.iter()
            .filter(|r| r.ctid == 112 && r.dir == d)
            .map(|r| r.bytes)
            .sum()
    };
    let after = dp.counters()?;
    for d in [Direction::In, Direction::Out] {
        let counted = sum(&after, d) - sum(&before, d);
        ensure!(
            counted > 4_000_000,
            "accounting missed traffic {d:?}: {counted} bytes"
        );
    }
    let st = sh.status(ct(112))?;
    let bulk_bytes: u64 = st.interfaces[0]
        .classes
        .iter()
        .filter(|c| c.role == "bulk")
        .map(|c| c.bytes)
        .sum();
    ensure!(
        bulk_bytes > 8_000_000,
        "HTB leaves saw {bulk_bytes} bytes: the classification did not reach them"
    );
    sh.remove(ct(112), t.a.ifindex)?;
    assert_no_shaping(&t.host, &t.a.host_if)?;
    let f = berth_tests::datapath::run(
        "tc",
        &[
            "-n",
            &t.host.name,
            "filter",
            "show",
            "dev",
            &t.a.host_if,
            "ingress",
        ],
    )?;
    ensure!(
        f.contains("berth_from_ct"),
        "the datapath's filter went with the shaper's: {f}"
    );
    dp.detach(t.a.ifindex)?;
    Ok(())
}

/// The pinned shaper program `file` (`to_ct`, `edt`) of the pin directory.
fn pinned_prog(pin: &std::path::Path, file: &str) -> Result<SchedClassifier> {
    let progs = pin.join("shaper/progs");
    for e in std::fs::read_dir(&progs)? {
        let p = e?.path().join(file);
        if p.exists() {
            return Ok(SchedClassifier::from_pin(&p)?);
        }
    }
    anyhow::bail!("no pinned {file} under {}", progs.display())
}

fn pinned_map(pin: &PinDir, name: &str) -> Result<MapData> {
    Ok(MapData::from_pin(pin.path.join("shaper/maps").join(name))?)
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns()`.
fn mono_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: t is a valid timespec for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// (verdict, skb->tstamp after the program) of one run on loopback (ifindex 1).
fn edt_run(prog: &SchedClassifier, frame: &[u8]) -> Result<(u32, u64)> {
    let ctx_in = berth_tests::datapath::skb_ctx(0, 0, 0);
    let mut ctx_out = vec![0u8; ctx_in.len()];
    let mut out = vec![0u8; frame.len() + 256];
    let res = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx_in),
        ctx_out: Some(&mut ctx_out),
        ..TestRunOptions::new()
    })?;
    // struct __sk_buff: tstamp at offset 152.
    let ts = u64::from_ne_bytes(ctx_out[152..160].try_into()?);
    Ok((res.return_value, ts))
}

fn drops_of(pin: &PinDir, ctid: u32, dir: u8, reason: u8) -> Result<(u64, u64)> {
    let m: PerCpuHashMap<MapData, u64, DropValue> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(pinned_map(pin, shaper_maps::DROPS)?))?;
    let key = u64::from(ctid) | u64::from(dir) << 32 | u64::from(reason) << 40;
    Ok(match m.get(&key, 0) {
        Ok(v) => v
            .iter()
            .fold((0, 0), |(p, b), x| (p + x.packets, b + x.bytes)),
        Err(_) => (0, 0),
    })
}

/// The EDT backend's program (its qdisc half needs sch_fq, which this kernel lacks): departure
/// times follow the configured rate exactly while backlogged, a packet long past its slot
/// leaves at once, one beyond the horizon is dropped and counted, and a class with a slower
/// rate of its own spaces its packets by that rate.
#[test]
fn edt_program_stamps_departures_at_the_rate() -> Result<()> {
    let ns = berth_tests::datapath::Netns::new("bse")?;
    let pin = PinDir::new();
    let _g = ns.enter()?;
    let sh = Shaper::open(&pin.path)?;
    println!("backend here: {:?}", sh.backend_status());
    let prog = pinned_prog(&pin.path, "edt")?;
    let mut edt: aya::maps::HashMap<MapData, u32, EdtState> =
        aya::maps::HashMap::try_from(Map::HashMap(pinned_map(&pin, shaper_maps::EDT)?))?;
    let frame =
        berth_tests::datapath::ipv4([2, 0, 0, 0, 0, 1], [10, 1, 0, 2], [10, 1, 0, 1], 966, 0);
    let len = frame.len() as u64;
    ensure!(len == 1000, "frame of {len} bytes");
    // 1 Mbit/s = 8000 ns per byte: 8 ms per frame; horizon 50 ms.
    let cost = 8_000_000u64;
    let mut st = EdtState {
        ctid: 4242,
        dir: DIR_IN,
        flags: EDT_TOTAL,
        horizon_ns: 50_000_000,
        ..Default::default()
    };
    st.slots[0] = EdtSlot::for_rate(1_000_000);
    edt.insert(1, st, 0)?;

    let t0 = mono_ns();
    let mut deps = Vec::new();
    for _ in 0..7 {
        let (v, ts) = edt_run(&prog, &frame)?;
        ensure!(v == VERDICT_PASS, "verdict {v}");
        deps.push(ts);
    }
    let t1 = mono_ns();
    ensure!(
        (t0..=t1).contains(&deps[0]),
        "first packet delayed: {} ns after the burst began",
        deps[0] - t0
    );
    for (i, d) in deps.iter().enumerate() {
        ensure!(
            *d == deps[0] + i as u64 * cost,
            "packet {i} departs at +{} ns, expected +{}",
            d - deps[0],
            i as u64 * cost
        );
    }
    // The 8th would leave 56 ms after its arrival: beyond the 50 ms horizon.
    let (v, _) = edt_run(&prog, &frame)?;
    ensure!(v == VERDICT_DROP, "beyond the horizon: verdict {v}");
    ensure!(
        drops_of(&pin, 4242, DIR_IN, DROP_HORIZON)? == (1, len),
        "horizon drop not counted"
    );

    // Long after the backlog drained: no delay.
    thread::sleep(Duration::from_millis(120));
    let before = mono_ns();
    let (v, ts) = edt_run(&prog, &frame)?;
    let after = mono_ns();
    ensure!(v == VERDICT_PASS, "verdict {v}");
    ensure!(
        (before..=after).contains(&ts),
        "a packet far past its slot was delayed by {} ns",
        ts.saturating_sub(after)
    );

    // Class 0 (every address here) at 500 kbit/s under a 1 Mbit/s total: 16 ms spacing.
    st.own = 1;
    st.slots[1] = EdtSlot::for_rate(500_000);
    st.slots[0].t_next = 0;
    edt.insert(1, st, 0)?;
    let a = edt_run(&prog, &frame)?.1;
    let b = edt_run(&prog, &frame)?.1;
    ensure!(b - a == 2 * cost, "class spacing {} ns", b - a);
    edt.remove(&1)?;
    drop(sh);
    Shaper::unload_all(&pin.path)?;
    Ok(())
}

/// The packet-rate bucket is charged with compare-and-swap: two CPUs hammering one bucket
/// through BPF_PROG_TEST_RUN get the rate between them, not each (a plain read-modify-write
/// let both pass on the same slot).
#[test]
fn pps_bucket_holds_with_two_cpus_racing() -> Result<()> {
    let pin = PinDir::new();
    let sh = Shaper::open(&pin.path)?;
    let mut ifaces: aya::maps::HashMap<MapData, u32, ShapeIface> =
        aya::maps::HashMap::try_from(Map::HashMap(pinned_map(&pin, shaper_maps::IFACES)?))?;
    let mut pps: aya::maps::HashMap<MapData, u64, PpsBucket> =
        aya::maps::HashMap::try_from(Map::HashMap(pinned_map(&pin, shaper_maps::PPS)?))?;
    // Loopback (ifindex 1) of this process's namespace: test runs send nothing anywhere.
    ifaces.insert(
        1,
        ShapeIface {
            ctid: 4243,
            flags: PPS_IN,
            ..Default::default()
        },
        0,
    )?;
    let rate = 2000u64;
    pps.insert(
        1u64,
        PpsBucket {
            tat: 0,
            interval_ns: 1_000_000_000 / rate,
            tolerance_ns: 0,
            rate,
        },
        0,
    )?;
    let frame =
        berth_tests::datapath::ipv4([2, 0, 0, 0, 0, 1], [10, 1, 0, 2], [10, 1, 0, 1], 18, 0);
    let repeat = 1_000_000u32;
    let workers: Vec<_> = (0..2)
        .map(|cpu| {
            let path = pin.path.clone();
            let frame = frame.clone();
            thread::spawn(
                move || -> Result<(std::time::Instant, std::time::Instant)> {
                    let mut set = nix::sched::CpuSet::new();
                    set.set(cpu)?;
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
                    let prog = pinned_prog(&path, "to_ct")?;
                    let mut out = vec![0u8; frame.len() + 256];
                    let ctx = berth_tests::datapath::skb_ctx(0, 0, 0);
                    let start = std::time::Instant::now();
                    prog.test_run(TestRunOptions {
                        data_in: Some(&frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(&ctx),
                        repeat,
                        ..TestRunOptions::new()
                    })?;
                    Ok((start, std::time::Instant::now()))
                },
            )
        })
        .collect();
    let mut spans = Vec::new();
    for w in workers {
        spans.push(w.join().unwrap()?);
    }
    // Every packet ran between the first start and the last end.
    let first = spans.iter().map(|s| s.0).min().unwrap();
    let last = spans.iter().map(|s| s.1).max().unwrap();
    let secs = (last - first).as_secs_f64();
    let overlap = (spans.iter().map(|s| s.1).min().unwrap())
        .saturating_duration_since(spans.iter().map(|s| s.0).max().unwrap())
        .as_secs_f64();
    let (dropped, _) = drops_of(&pin, 4243, DIR_IN, DROP_PPS)?;
    let passed = 2 * u64::from(repeat) - dropped;
    let allowed = rate as f64 * secs;
    println!(
        "{passed} of {} passed in {secs:.3} s ({overlap:.3} s on both CPUs at once) at {rate} pps (allowed {allowed:.0})",
        2 * repeat
    );
    ensure!(
        overlap > 0.5 * secs,
        "the two runs hardly overlapped ({overlap:.3} of {secs:.3} s)"
    );
    ensure!(secs > 0.05, "runs too short to judge ({secs:.3} s)");
    ensure!(
        passed as f64 <= allowed * 1.01 + 2.0,
        "{passed} packets passed a {rate} pps bucket in {secs:.3} s"
    );
    ensure!(
        // Loose: a busy machine takes the CPUs away from both runs at times (nothing then
        // arrives to pass); the bar that matters is the upper one.
        passed as f64 >= allowed * 0.5,
        "only {passed} passed in {secs:.3} s at {rate} pps"
    );
    drop(sh);
    Ok(())
}

#[test]
fn live_rate_change_keeps_the_connection() -> Result<()> {
    let t = Topo::new()?;
    let pin = PinDir::new();
    let _g = t.host.enter()?;
    let mut sh = Shaper::open(&pin.path)?;
    sh.apply(ct(102), t.a.ifindex, &both("10mbit"))?;
    let p = port();
    let _s = Server::start(&t.a.ns.name, p)?;
    let host = t.host.name.clone();
    let ip = t.a.ip.clone();
    // One 8 s connection; the rate goes 10 → 40 Mbit/s after 3 s.
    let client = thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &host,
                "iperf3",
                "-c",
                &ip,
                "-p",
                &p.to_string(),
                "-t",
                "8",
                "-J",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    thread::sleep(Duration::from_secs(3));
    sh.apply(ct(102), t.a.ifindex, &both("40mbit"))?;
    let json: serde_json::Value = serde_json::from_str(&client.join().unwrap())?;
    ensure!(json.get("error").is_none(), "connection broke: {json}");
    let iv: Vec<f64> = json["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6)
        .collect();
    eprintln!("per-second Mbit/s: {iv:?}");
    ensure!(iv.len() >= 8, "{iv:?}");
    // Single 1 s intervals swing with TCP's reaction to the 4 MiB queue (seen: 7.3 then 10.9);
    // two-second means are what the rate promises. Right after slow start fills the queue
    // the sender backs off below the rate for a while (seen in CI: 8.3 then 7.3 after a 20
    // Mbit/s first second): the lower bound only checks that shaping did not collapse.
    let before = (iv[1] + iv[2]) / 2.0;
    let after = (iv[5] + iv[6]) / 2.0;
    ensure!(before < 11.0 && before > 6.5, "before the change: {iv:?}");
    ensure!(after > 35.0 && after < 41.0, "after the change: {iv:?}");
    ensure!(sh.status(ct(102))?.interfaces[0].config.rate_in == Some(rate("40mbit")));
    sh.remove(ct(102), t.a.ifindex)?;
    assert_no_shaping(&t.host, &t.a.host_if)?;
    Ok(())
}

#[test]
fn per_class_rates_hold_independently() -> Result<()> {
    let t = Topo::new()?;
    let pin = PinDir::new();
    let _g = t.host.enter()?;
    // Class 1 = traffic with peers in 10.77.9.0/24 (a second host address).
    t.host.ip(&["addr", "add", "10.77.9.1/32", "dev", "lo"])?;
    t.a.ns
        .ip(&["route", "add", "10.77.9.0/24", "via", &t.a.gw])?;
    // TCX here (the default is clsact + cls_bpf): shaping over TCX links stays covered.
    let mut dp = Datapath::open_or_load_with(&pin.path, AttachMethod::Tcx)?;
    dp.load_classes(&[ClassEntry {
        class: 1,
        net: "10.77.9.0/24".parse()?,
    }])?;
    let mut sh = Shaper::open_with(&pin.path, AttachMethod::Tcx)?;
    let cfg = ShapingConfig {
        classes: vec![
            ClassRate {
                class: 0,
                rate_in: Some(rate("8mbit")),
                rate_out: None,
            },
            ClassRate {
                class: 1,
                rate_in: Some(rate("24mbit")),
                rate_out: None,
            },
        ],
        ..Default::default()
    };
    sh.apply(ct(103), t.a.ifindex, &cfg)?;
    let (p0, p1) = (port(), port());
    let _s0 = Server::start(&t.a.ns.name, p0)?;
    let _s1 = Server::start(&t.a.ns.name, p1)?;
    let (host0, host1, ip0, ip1) = (
        t.host.name.clone(),
        t.host.name.clone(),
        t.a.ip.clone(),
        t.a.ip.clone(),
    );
    let c0 = thread::spawn(move || {
        berth_tests::shaper::iperf(
            &host0,
            &ip0,
            p0,
            &Run {
                secs: 5,
                bind: Some("10.77.1.1".into()),
                ..Default::default()
            },
        )
    });
    let c1 = thread::spawn(move || {
        berth_tests::shaper::iperf(
            &host1,
            &ip1,
            p1,
            &Run {
                secs: 5,
                bind: Some("10.77.9.1".into()),
                ..Default::default()
            },
        )
    });
    let r0 = c0.join().unwrap();
    let r1 = c1.join().unwrap();
    let (r0, r1) = (r0?, r1?);
    within(r0.goodput_bps, 8e6, "class 0 (alongside class 1)")?;
    within(r1.goodput_bps, 24e6, "class 1 (alongside class 0)")?;
    sh.remove(ct(103), t.a.ifindex)?;
    assert_no_shaping(&t.host, &t.a.host_if)?;
    Ok(())
}

#[test]
fn bad_rates_are_rejected_and_change_nothing() -> Result<()> {
    let t = Topo::new()?;
    let pin = PinDir::new();
    let _g = t.host.enter()?;
    let mut sh = Shaper::open(&pin.path)?;
    let good = both("10mbit");
    sh.apply(ct(104), t.a.ifindex, &good)?;
    let before = (
        tc_show(&t.host, "class", &t.a.host_if)?,
        sh.status(ct(104))?.interfaces[0].config.clone(),
    );

    for (text, flag) in [
        ("0", "--rate-in"),
        ("-10mbit", "--rate-in"),
        ("lots", "--rate-in"),
        ("10qbit", "--rate-in"),
    ] {
        let e = Rate::parse("--rate-in", text).unwrap_err();
        ensure!(e.flag == flag && e.to_string().contains(flag), "{e}");
    }
    let small_burst = ShapingConfig {
        burst: Some(Size::from_bytes(1000)),
        ..both("20mbit")
    };
    let e = sh
        .apply(ct(104), t.a.ifindex, &small_burst)
        .unwrap_err()
        .to_string();
    ensure!(e.contains("--burst"), "{e}");
    let zero_pps = ShapingConfig {
        pps_in: Some(0),
        ..both("20mbit")
    };
    let e = sh
        .apply(ct(104), t.a.ifindex, &zero_pps)
        .unwrap_err()
        .to_string();
    ensure!(e.contains("--pps-in"), "{e}");
    ensure!(toml::from_str::<ShapingConfig>("rate_in = \"-1mbit\"").is_err());

    let after = (
        tc_show(&t.host, "class", &t.a.host_if)?,
        sh.status(ct(104))?.interfaces[0].config.clone(),
    );
    // Class listings carry no counters without -s: identical means unchanged.
    ensure!(before == after, "state changed:\n{before:?}\n{after:?}");
    sh.remove(ct(104), t.a.ifindex)?;
    assert_no_shaping(&t.host, &t.a.host_if)?;
    Ok(())
}

#[test]
fn ct_to_ct_traffic_is_shaped_and_pps_limits_hold() -> Result<()> {
    let t = Topo::new()?;
    let pin = PinDir::new();
    let _g = t.host.enter()?;
    let mut sh = Shaper::open(&pin.path)?;
    sh.apply(
        ct(105),
        t.a.ifindex,
        &ShapingConfig {
            rate_out: Some(rate("10mbit")),
            ..Default::default()
        },
    )?;
    let p = port();
    let _s = Server::start(&t.b.ns.name, p)?;
    let r = iperf(
        &t.a.ns.name,
        &t.b.ip,
        p,
        &Run {
            secs: 4,
            ..Default::default()
        },
    )?;
    within(r.goodput_bps, 10e6, "CT a → CT b")?;

    // 64-byte UDP at ~3x the packet limit: what arrives is the limit.
    sh.apply(
        ct(105),
        t.a.ifindex,
        &ShapingConfig {
            pps_out: Some(5000),
            ..Default::default()
        },
    )?;
    let p = port();
    let _s = Server::start(&t.b.ns.name, p)?;
    let r = iperf(
        &t.a.ns.name,
        &t.b.ip,
        p,
        &Run {
            secs: 4,
            udp_rate: Some("8M".into()),
            len: Some(64),
            ..Default::default()
        },
    )?;
    let pps = r.packets as f64 / 4.0;
    eprintln!("pps limit 5000: received {pps:.0}/s, lost {}", r.lost);
    ensure!(
        (pps / 5000.0 - 1.0).abs() <= 0.05,
        "received {pps:.0} packets/s against a limit of 5000"
    );
    let st = sh.status(ct(105))?;
    let drops = st.interfaces[0]
        .drops
        .iter()
        .find(|d| d.reason == "pps" && d.dir == berth::datapath::Direction::Out)
        .map_or(0, |d| d.packets);
    ensure!(drops > 0, "no pps drops counted: {st:?}");
    sh.remove(ct(105), t.a.ifindex)?;
    assert_no_shaping(&t.host, &t.a.host_if)?;
    Ok(())
}

#[test]
fn ping_stays_fast_through_a_saturated_ct() -> Result<()> {
    let t = Topo::new()?;
    let pin = PinDir::new();
    let _g = t.host.enter()?;
    let mut sh = Shaper::open(&pin.path)?;
    sh.apply(ct(106), t.a.ifindex, &both("10mbit"))?;
    let p = port();
    let _s = Server::start(&t.a.ns.name, p)?;
    let host = t.host.name.clone();
    let ip = t.a.ip.clone();
    let load = thread::spawn(move || {
        berth_tests::shaper::iperf(
            &host,
            &ip,
            p,
            &Run {
                secs: 6,
                extra: vec!["-P".into(), "4".into()],
                ..Default::default()
            },
        )
    });
    thread::sleep(Duration::from_secs(1));
    let rtts = ping_rtts(&t.host.name, &t.a.ip, 80, "0.05")?;
    let l = load.join().unwrap()?;
    let p99 = quantile(&rtts, 0.99);
    eprintln!(
        "ping under load: p50 {:.2} ms p99 {p99:.2} ms ({} replies); load {:.2} Mbit/s",
        quantile(&rtts, 0.5),
        rtts.len(),
        l.goodput_bps / 1e6
    );
    ensure!(rtts.len() >= 76, "pings lost: {} of 80", 80 - rtts.len());
    ensure!(
        p99 <= 50.0,
        "ping p99 {p99:.1} ms through a saturated 10 Mbit/s CT"
    );
    sh.remove(ct(106), t.a.ifindex)?;
    assert_no_shaping(&t.host, &t.a.host_if)?;
    Ok(())
}

/// `status` and `netstat` of a CT booted by the `berth` CLI show the shaping the kernel
/// enforces (not just what the config says) and its counters; removing the rates removes
/// the fields, removing everything removes the `shaping` object.
#[test]
fn cli_status_and_netstat_show_rates_and_drops() -> Result<()> {
    use std::os::fd::AsFd;

    use berth_tests::{
        ct::TestHost,
        net::{Topology, UPLINK4},
        shaper::udp_flood,
    };
    use serde_json::Value;

    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    let (ct, ip) = ("211", "192.0.2.211");
    h.ok(&["create", ct, "--ipadd", ip]);
    h.ok(&["start", ct]);
    let st = h.status(ct);
    ensure!(st["shaping"].is_null(), "unshaped CT has shaping: {st}");

    // Unsaved changes build on each other (the run state keeps the live settings), and
    // --save then stores the sum of them.
    h.ok(&["set", ct, "--rate-out", "10mbit"]);
    h.ok(&["set", ct, "--rate-in", "20mbit"]);
    let sh = h.status(ct)["shaping"].clone();
    ensure!(
        sh["in"]["rate_bps"] == 20_000_000_u64 && sh["out"]["rate_bps"] == 10_000_000_u64,
        "second unsaved set dropped the first: {sh}"
    );
    h.ok(&["set", ct, "--pps-in", "1000", "--save"]);
    let conf = std::fs::read_to_string(h.root.join(format!("conf/{ct}.toml")))?;
    ensure!(
        conf.contains("rate_in") && conf.contains("rate_out") && conf.contains("pps_in"),
        "saved config lacks the live settings: {conf}"
    );
    let sh = h.status(ct)["shaping"].clone();
    eprintln!("shaping: {sh}");
    ensure!(sh["backend"] == "htb", "{sh}");
    ensure!(sh["in"]["rate_bps"] == 20_000_000_u64, "{sh}");
    ensure!(sh["in"]["rate"] == "20mbit", "{sh}");
    ensure!(sh["out"]["rate_bps"] == 10_000_000_u64, "{sh}");
    ensure!(sh["in"]["pps_limit"] == 1000, "{sh}");
    ensure!(sh["out"]["pps_limit"].is_null(), "{sh}");
    // The default burst: 2 ms at the rate, at least 16 KiB.
    ensure!(sh["in"]["burst_bytes"] == 16384, "{sh}");
    ensure!(sh["interfaces"][0]["ifname"] == "venet211", "{sh}");
    ensure!(sh["interfaces"][0]["ifb"].is_string(), "{sh}");

    // Well above both rates, both ways: 1 s of full-size UDP from the uplink to the CT and
    // from the CT to the uplink (nothing listens; the kernel drops them at the end).
    let pid = h.status(ct)["init_pid"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("no init PID"))?;
    let ct_ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let to_ct = udp_flood(
        topo.uplink.fd(),
        format!("{ip}:9").parse()?,
        1400,
        Duration::from_secs(1),
    )?;
    let from_ct = udp_flood(
        ct_ns.as_fd(),
        format!("{UPLINK4}:9").parse()?,
        1400,
        Duration::from_secs(1),
    )?;
    // An open handle keeps the CT's netns, and with it its veth, alive past `stop`.
    drop(ct_ns);
    eprintln!("flooded {to_ct} datagrams to the CT, {from_ct} from it");
    let st = h.status(ct);
    let sh = &st["shaping"];
    eprintln!("after the floods: {sh}");
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    ensure!(n(&sh["out"]["overlimits"]) > 0, "no overlimits out: {sh}");
    ensure!(n(&sh["out"]["sent_packets"]) > 0, "nothing sent out: {sh}");
    // Traffic to the CT meets the 1000 pps limit before the 20 Mbit/s queue.
    ensure!(n(&sh["in"]["pps_drops"]) > 0, "no pps drops in: {sh}");
    ensure!(n(&sh["in"]["sent_packets"]) > 0, "nothing sent in: {sh}");
    // The settings did not move with the load.
    ensure!(sh["out"]["rate_bps"] == 10_000_000_u64, "{sh}");
    let drops = n(&sh["in"]["pps_drops"])
        + n(&sh["in"]["queue_drops"])
        + n(&sh["out"]["pps_drops"])
        + n(&sh["out"]["queue_drops"]);

    let human = h.ok(&["status", ct]);
    ensure!(
        human.contains("shaping: htb on venet211")
            && human.contains("in: rate 20mbit")
            && human.contains("out: rate 10mbit")
            && human.contains("pps 1000"),
        "{human}"
    );

    let rows = h.json(&["netstat", ct]);
    let rows = rows.as_array().cloned().unwrap_or_default();
    ensure!(!rows.is_empty(), "no netstat rows for CT {ct}");
    for r in &rows {
        ensure!(r["rate_in_bps"] == 20_000_000_u64, "{r}");
        ensure!(r["rate_out_bps"] == 10_000_000_u64, "{r}");
        // Counters only grow between the two reads.
        ensure!(
            n(&r["shaping_drops"]) >= drops && drops > 0,
            "{r} vs {drops}"
        );
    }
    let table = h.ok(&["netstat", ct]);
    ensure!(
        table.contains("RATE-IN") && table.contains("20mbit") && table.contains("10mbit"),
        "{table}"
    );

    // Rates removed, the packet-rate limit stays: the rate fields are gone.
    h.ok(&[
        "set",
        ct,
        "--rate-in",
        "none",
        "--rate-out",
        "none",
        "--save",
    ]);
    let sh = h.status(ct)["shaping"].clone();
    for d in ["in", "out"] {
        let o = sh[d].as_object().ok_or_else(|| anyhow::anyhow!("{sh}"))?;
        ensure!(
            !o.contains_key("rate_bps")
                && !o.contains_key("rate")
                && !o.contains_key("burst_bytes"),
            "{d}: {sh}"
        );
    }
    ensure!(sh["in"]["pps_limit"] == 1000, "{sh}");
    ensure!(
        sh["backend"].is_null(),
        "nothing is queued, yet a backend: {sh}"
    );
    for r in h
        .json(&["netstat", ct])
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        ensure!(
            r["rate_in_bps"].is_null() && r["rate_out_bps"].is_null(),
            "{r}"
        );
    }

    // Nothing left: no shaping object at all.
    h.ok(&["set", ct, "--pps-in", "none", "--save"]);
    let st = h.status(ct);
    ensure!(st["shaping"].is_null(), "{st}");
    ensure!(
        !h.ok(&["status", ct]).contains("shaping"),
        "human status still shows shaping"
    );

    h.ok(&["stop", "--fast", ct]);
    h.ok(&["destroy", ct]);
    h.assert_clean();
    let after = topo.host.settled_snapshot();
    berth_tests::net::assert_same("host netns after stop+destroy", &before, &after);
    Ok(())
}
