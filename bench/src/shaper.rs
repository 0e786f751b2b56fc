//! `bench shaper`: iperf3 TCP goodput, retransmits and the ratio to a hand-made tc HTB on the
//! same veth in the same run (10, 100, 1000 Mbit/s, both directions, bridged — CT and peer on
//! a test bridge — and routed), isolation from a neighbour's 5x UDP flood, packet-rate limit
//! accuracy, ping p99 under load. Prints PASS/FAIL per bar; all traffic stays in namespaces it
//! creates. `bench shaper-class-dump`: what a scrape pays per shaped direction.

use std::{thread, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use berth::shaper::{Shaper, ShapingConfig};
use berth_runtime::net::{NetNsGuard, Netlink};
use berth_tests::{
    ct,
    datapath::PinDir,
    shaper::{Run, Server, Topo, assert_no_shaping, both, iperf, ping_rtts, port, quantile, tcp},
};
use clap::Args;

use crate::verdict;

#[derive(Args)]
pub struct ShaperArgs {
    /// Seconds per iperf3 run (≥ 2).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..))]
    seconds: u32,
    /// Rates of the goodput table, Mbit/s.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    rates: Vec<u32>,
}

/// A hand-made HTB like an operator would write with tc(8): on the host veth egress (in), and
/// ingress → mirred → IFB → HTB (out). Returns the IFB name.
fn hand_made_htb(t: &Topo, mbit: u32) -> Result<(String, bool)> {
    let ns = &t.host.name;
    let dev = &t.a.host_if;
    let ifb = berth_tests::datapath::unique("hifb");
    let r = format!("{mbit}mbit");
    let tc = |args: &[&str]| {
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        berth_tests::datapath::run("tc", &full)
    };
    tc(&[
        "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1",
    ])?;
    tc(&[
        "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &r,
    ])?;
    t.host.ip(&["link", "add", &ifb, "type", "ifb"])?;
    t.host.ip(&["link", "set", &ifb, "up"])?;
    tc(&[
        "qdisc", "add", "dev", &ifb, "root", "handle", "1:", "htb", "default", "1",
    ])?;
    tc(&[
        "class", "add", "dev", &ifb, "parent", "1:", "classid", "1:1", "htb", "rate", &r,
    ])?;
    // The datapath's cls_bpf filters (the default attach) live in a clsact qdisc, which
    // excludes a classic ingress qdisc: the control's redirect joins clsact at its own pref.
    let had_clsact = tc(&["qdisc", "show", "dev", dev])?.contains("clsact");
    if !had_clsact {
        tc(&["qdisc", "add", "dev", dev, "clsact"])?;
    }
    tc(&[
        "filter", "add", "dev", dev, "ingress", "pref", HAND_PREF, "protocol", "all", "u32",
        "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", &ifb,
    ])?;
    Ok((ifb, had_clsact))
}

/// The hand-made control's filter priority on clsact ingress.
const HAND_PREF: &str = "40000";

fn remove_hand_made(t: &Topo, (ifb, had_clsact): &(String, bool)) -> Result<()> {
    let ns = &t.host.name;
    let dev = &t.a.host_if;
    let tc = |args: &[&str]| {
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        berth_tests::datapath::run("tc", &full)
    };
    let _ = tc(&["qdisc", "del", "dev", dev, "root"]);
    let _ = tc(&["filter", "del", "dev", dev, "ingress", "pref", HAND_PREF]);
    if !had_clsact {
        let _ = tc(&["qdisc", "del", "dev", dev, "clsact"]);
    }
    t.host.ip(&["link", "del", ifb])?;
    Ok(())
}

/// The goodput table's rows of one topology: berth vs a hand-made HTB on the same veth, each
/// rate and direction. Returns the number of rows failing a bar.
fn goodput_rows(t: &Topo, sh: &mut Shaper, secs: u32, rates: &[u32]) -> Result<usize> {
    let mut fails = 0;
    for &mbit in rates {
        let rate_bps = f64::from(mbit) * 1e6;
        for dir in ["in", "out"] {
            sh.apply(ct(201), t.a.ifindex, &both(&format!("{mbit}mbit")))?;
            let b = tcp(t, dir, secs)?;
            sh.remove(ct(201), t.a.ifindex)?;
            let ifb = hand_made_htb(t, mbit)?;
            let h = tcp(t, dir, secs)?;
            remove_hand_made(t, &ifb)?;
            let pct = b.goodput_bps / rate_bps;
            let retr = b.retransmits as f64 / b.segments.max(1) as f64;
            let vs = b.goodput_bps / h.goodput_bps;
            let ok = pct >= 0.94 && retr <= 0.001 && vs >= 0.98;
            fails += usize::from(!ok);
            println!(
                "| {} | {mbit} Mbit | {dir} | {:.2} Mbit/s | {:.1} % | {}/{} ({:.3} %) | {:.2} Mbit/s ({} retr) | {:.3} | goodput≥94 % {} · retr≤0.1 % {} · ≥0.98×hand {} |",
                t.mode(),
                b.goodput_bps / 1e6,
                pct * 100.0,
                b.retransmits,
                b.segments,
                retr * 100.0,
                h.goodput_bps / 1e6,
                h.retransmits,
                vs,
                verdict(pct >= 0.94),
                verdict(retr <= 0.001),
                verdict(vs >= 0.98),
            );
        }
    }
    Ok(fails)
}

pub fn run(a: &ShaperArgs) -> Result<()> {
    crate::require_root("shaper", "network namespaces, eBPF, tc")?;
    crate::require_tool("iperf3", "xtask/setup.sh installs it")?;
    let secs = a.seconds;
    let mut fails = 0;
    println!(
        "\n## TCP goodput ({secs} s per run, payload bits/s ÷ configured rate; bridged: CT and peer on one bridge)"
    );
    println!(
        "| topology | rate | dir | berth goodput | % of rate | retrans/segs | hand-made HTB | berth/hand | bars |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    {
        let tb = Topo::bridged()?;
        let pin = PinDir::new();
        let _g = tb.host.enter()?;
        let mut sh = Shaper::open(&pin.path)?;
        fails += goodput_rows(&tb, &mut sh, secs, &a.rates)?;
        assert_no_shaping(&tb.host, &tb.a.host_if)?;
    }
    let t = Topo::new()?;
    let pin = PinDir::new();
    let _g = t.host.enter()?;
    let mut sh = Shaper::open(&pin.path)?;
    println!("backend: {:?}", sh.backend_status());
    fails += goodput_rows(&t, &mut sh, secs, &a.rates)?;

    // Isolation: both CTs shaped to 10 Mbit/s out; a floods UDP at 5x, b's TCP is measured.
    println!("\n## Isolation (both CTs 10 Mbit/s out; CT a sends UDP at 50 Mbit/s)");
    sh.apply(ct(201), t.a.ifindex, &both("10mbit"))?;
    sh.apply(ct(202), t.b.ifindex, &both("10mbit"))?;
    let solo = {
        let p = port();
        let _s = Server::start(&t.host.name, p)?;
        iperf(
            &t.b.ns.name,
            &t.b.gw,
            p,
            &Run {
                secs,
                ..Default::default()
            },
        )?
    };
    let (pu, pt) = (port(), port());
    let _su = Server::start(&t.host.name, pu)?;
    let _st = Server::start(&t.host.name, pt)?;
    let (a_ns, a_gw) = (t.a.ns.name.clone(), t.a.gw.clone());
    let flood = thread::spawn(move || {
        iperf(
            &a_ns,
            &a_gw,
            pu,
            &Run {
                secs: secs + 1,
                udp_rate: Some("50M".into()),
                ..Default::default()
            },
        )
    });
    thread::sleep(Duration::from_millis(500));
    let busy = iperf(
        &t.b.ns.name,
        &t.b.gw,
        pt,
        &Run {
            secs,
            ..Default::default()
        },
    )?;
    let f = flood.join().unwrap()?;
    let pct = busy.goodput_bps / 10e6;
    // Goodput of a full-size TCP frame is at most 1448/1514 = 95.6 % of the L2 rate, so "within
    // 5 % of its rate" is judged against the neighbour's own goodput without the flood, and
    // the goodput bar (94 % of the rate) must hold as well.
    let ok = busy.goodput_bps >= 0.95 * solo.goodput_bps && pct >= 0.94;
    fails += usize::from(!ok);
    println!(
        "neighbour TCP: {:.2} Mbit/s under the flood vs {:.2} alone ({:.1} % of alone, {:.1} % of the rate); flood delivered {:.2} Mbit/s — within 5 % of its unflooded goodput: {}",
        busy.goodput_bps / 1e6,
        solo.goodput_bps / 1e6,
        busy.goodput_bps / solo.goodput_bps * 100.0,
        pct * 100.0,
        f.goodput_bps / 1e6,
        verdict(ok)
    );
    sh.remove(ct(202), t.b.ifindex)?;

    // Packet-rate limit with small UDP packets (64-byte payload), 3x over the limit.
    println!("\n## Packet-rate limit (64-byte UDP at ~3x the limit, CT a → CT b)");
    for limit in [10_000u64, 50_000] {
        sh.apply(
            ct(201),
            t.a.ifindex,
            &ShapingConfig {
                pps_out: Some(limit),
                ..Default::default()
            },
        )?;
        let p = port();
        let _s = Server::start(&t.b.ns.name, p)?;
        let offered = format!("{}", limit * 3 * 64 * 8);
        let r = iperf(
            &t.a.ns.name,
            &t.b.ip,
            p,
            &Run {
                secs,
                udp_rate: Some(offered),
                len: Some(64),
                ..Default::default()
            },
        )?;
        let got = r.packets as f64 / f64::from(secs);
        let err = got / limit as f64 - 1.0;
        let ok = err.abs() <= 0.05;
        fails += usize::from(!ok);
        println!(
            "limit {limit} pps: received {got:.0} pps ({:+.2} %), {} dropped by the limit or lost — within 5 %: {}",
            err * 100.0,
            r.lost,
            verdict(ok)
        );
    }

    // Latency under load: 4 TCP flows saturate the CT's 10 Mbit/s in; ping alongside.
    println!("\n## Latency under load (10 Mbit/s, 4 TCP flows to the CT)");
    sh.apply(ct(201), t.a.ifindex, &both("10mbit"))?;
    let p = port();
    let _s = Server::start(&t.a.ns.name, p)?;
    let (h, ip) = (t.host.name.clone(), t.a.ip.clone());
    let load = thread::spawn(move || {
        iperf(
            &h,
            &ip,
            p,
            &Run {
                secs: secs + 1,
                extra: vec!["-P".into(), "4".into()],
                ..Default::default()
            },
        )
    });
    thread::sleep(Duration::from_millis(1000));
    let n = secs * 20 - 20;
    let rtts = ping_rtts(&t.host.name, &t.a.ip, n, "0.05")?;
    let l = load.join().unwrap()?;
    let p99 = quantile(&rtts, 0.99);
    let ok = p99 <= 50.0 && rtts.len() as u32 >= n * 95 / 100;
    fails += usize::from(!ok);
    println!(
        "ping p50 {:.2} ms, p99 {p99:.2} ms, max {:.2} ms ({} of {n} replies) with {:.2} Mbit/s of TCP: p99 ≤ 50 ms {}",
        quantile(&rtts, 0.5),
        rtts.last().copied().unwrap_or(f64::NAN),
        rtts.len(),
        l.goodput_bps / 1e6,
        verdict(ok)
    );
    sh.remove(ct(201), t.a.ifindex)?;
    assert_no_shaping(&t.host, &t.a.host_if)?;
    assert_no_shaping(&t.host, &t.b.host_if)?;
    println!("\n{} bar(s) failed", fails);
    ensure!(fails == 0, "{fails} bar(s) failed");
    Ok(())
}

#[derive(Args)]
pub struct ClassDumpArgs {
    /// Class dumps timed.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    dumps: u32,
}

/// Cost of what a scrape does per shaped direction: one class dump of an HTB laid out like the
/// shaper's (total, group, two leaves), in a throwaway namespace.
pub fn class_dump(a: &ClassDumpArgs) -> Result<()> {
    crate::require_root("shaper-class-dump", "a network namespace, tc")?;
    let (_guard, _fd) = NetNsGuard::enter_new().context("entering a new network namespace")?;
    // Children inherit this thread's namespace.
    let cmd = |tool: &str, args: &str| -> Result<()> {
        let st = std::process::Command::new(tool)
            .args(args.split_whitespace())
            .status()
            .with_context(|| format!("running {tool}"))?;
        ensure!(st.success(), "{tool} {args}: {st}");
        Ok(())
    };
    cmd("ip", "link add vt0 type veth peer name vt1")?;
    cmd("tc", "qdisc add dev vt0 root handle 1: htb default 100")?;
    cmd(
        "tc",
        "class add dev vt0 parent 1: classid 1:1 htb rate 10mbit",
    )?;
    cmd(
        "tc",
        "class add dev vt0 parent 1:1 classid 1:10 htb rate 10mbit",
    )?;
    cmd(
        "tc",
        "class add dev vt0 parent 1:10 classid 1:100 htb rate 5mbit ceil 10mbit",
    )?;
    cmd(
        "tc",
        "class add dev vt0 parent 1:10 classid 1:200 htb rate 5mbit ceil 10mbit",
    )?;
    // SAFETY: a NUL-terminated literal; if_nametoindex only reads it.
    let ifindex = unsafe { libc::if_nametoindex(c"vt0".as_ptr()) };
    if ifindex == 0 {
        bail!("vt0: {}", std::io::Error::last_os_error());
    }
    let mut nl = Netlink::open_current("bench netns").context("opening netlink")?;
    let t = std::time::Instant::now();
    for _ in 0..a.dumps {
        let n = berth::shaper::tc::classes(&mut nl, ifindex)
            .context("dumping vt0's classes")?
            .len();
        ensure!(n == 4, "{n} classes on vt0, want 4");
    }
    println!(
        "class dump: {:?} each ({} dumps of an HTB with 4 classes)",
        t.elapsed() / a.dumps,
        a.dumps
    );
    Ok(())
}
