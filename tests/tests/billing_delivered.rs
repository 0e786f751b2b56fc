//! Billing counts what was delivered: a routed CT shaped to 5 Mbit/s each way and flooded
//! far above it, in both directions. The shaper's queues drop most of the flood after the
//! accounting programs counted it; the `kfree_skb` program takes those drops back
//! (`UNDELIVERED`), so counted − undelivered equals what left the queues, to the byte: the
//! host-side veth's transmitted bytes (to the CT) and the IFB's (from the CT). The ledger
//! bills exactly that. And a CT root that drops inbound traffic itself, inside its own
//! namespace, with a queue of its own, is still billed for it.
//! Run: `cargo test -p berth-tests --test billing_delivered -- --test-threads=1`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use berth::datapath::{ByteLayer, DatapathView, Direction};
use berth_tests::billing::Berthd;
use berth_tests::ct::TestHost;
use berth_tests::net::{Ns, Topology, UPLINK4, wait_for};
use berth_tests::shaper::udp_flood;

const CT: &str = "4270";
const CT_ADDR: &str = "192.0.2.170";

/// (bytes, packets) an interface of `ns` transmitted.
fn tx_of(ns: &Ns, ifname: &str) -> Result<(u64, u64)> {
    let out = ns.run("ip", &["-j", "-s", "link", "show", "dev", ifname]);
    ensure!(out.status.success(), "ip -s link show {ifname}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let tx = &v[0]["stats64"]["tx"];
    Ok((
        tx["bytes"].as_u64().context("tx bytes")?,
        tx["packets"].as_u64().context("tx packets")?,
    ))
}

/// Counted and undelivered bytes of the CT in one direction, from the pinned maps.
fn billed_parts(pin: &Path, dir: Direction) -> Result<(u64, u64, ByteLayer)> {
    let view = DatapathView::open_pinned(pin)?.context("no datapath pinned")?;
    let ctid: u32 = CT.parse()?;
    // Undelivered first: every drop it holds is in the counters read after it.
    let und: u64 = view
        .undelivered()?
        .iter()
        .filter(|r| r.ctid == ctid && r.dir == dir)
        .map(|r| r.bytes)
        .sum();
    let counted: u64 = view
        .counters()?
        .iter()
        .filter(|r| r.ctid == ctid && r.dir == dir)
        .map(|r| r.bytes)
        .sum();
    Ok((counted, und, view.config()?.byte_layer))
}

/// Bytes at the datapath's layer of what an interface transmitted.
fn at_layer((bytes, packets): (u64, u64), layer: ByteLayer) -> u64 {
    match layer {
        ByteLayer::L2 => bytes,
        ByteLayer::L3 => bytes - 14 * packets,
    }
}

/// One quiet reading (the interface's counter did not move while the maps were read):
/// (counted − undelivered, undelivered, what the interface sent at the datapath's layer).
fn quiet_reading(host: &Ns, pin: &Path, ifname: &str, dir: Direction) -> Result<(u64, u64, u64)> {
    for _ in 0..50 {
        let before = tx_of(host, ifname)?;
        let (counted, und, layer) = billed_parts(pin, dir)?;
        let after = tx_of(host, ifname)?;
        if before == after {
            return Ok((counted - und, und, at_layer(after, layer)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{ifname} never went quiet")
}

/// The offset between billed and sent before the test's traffic.
fn delivered_base(host: &Ns, pin: &Path, ifname: &str, dir: Direction) -> Result<i128> {
    let (billed, _, sent) = quiet_reading(host, pin, ifname, dir)?;
    Ok(i128::from(billed) - i128::from(sent))
}

/// Counted − undelivered against what left the queue since `base`; returns (billed,
/// undelivered).
fn delivered_matches(
    host: &Ns,
    pin: &Path,
    ifname: &str,
    dir: Direction,
    base: i128,
) -> Result<(u64, u64)> {
    let mut last = String::new();
    for _ in 0..20 {
        let (billed, und, sent) = quiet_reading(host, pin, ifname, dir)?;
        if i128::from(billed) - i128::from(sent) == base {
            return Ok((billed, und));
        }
        last = format!(
            "{dir:?}: counted − undelivered {und} = {billed}, {ifname} sent {sent}, offset \
             before the traffic {base}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("never equal: {last}")
}

fn ct_netns(h: &TestHost) -> Result<std::fs::File> {
    let pid = h.status(CT)["init_pid"]
        .as_u64()
        .context("status has no init_pid")?;
    std::fs::File::open(format!("/proc/{pid}/ns/net")).context("opening the CT's netns")
}

/// Runs a host tool inside the CT's network namespace (as the CT's root could, with the
/// same netlink calls).
fn in_ct(netns: BorrowedFd<'_>, prog: &str, args: &[&str]) -> Result<()> {
    in_ct_output(netns, prog, args).map(drop)
}

fn in_ct_output(netns: BorrowedFd<'_>, prog: &str, args: &[&str]) -> Result<Vec<u8>> {
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new(prog);
    cmd.args(args);
    // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output()?;
    ensure!(out.status.success(), "{prog} {args:?}: {out:?}");
    Ok(out.stdout)
}

/// The CT's own interface (routed: `venet0`).
fn ct_ifname(netns: BorrowedFd<'_>) -> Result<String> {
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new("ip");
    cmd.args(["-j", "link", "show"]);
    // SAFETY: as in `in_ct`.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&cmd.output()?.stdout)?;
    v.as_array()
        .context("ip -j link")?
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .find(|n| *n != "lo" && !n.starts_with("sink"))
        .map(str::to_owned)
        .context("the CT has no interface")
}

/// `n` datagrams of `len` bytes at `pps`, from `ns` to `dst`.
fn paced(ns: BorrowedFd<'_>, dst: SocketAddr, len: usize, pps: u32, n: u32) -> Result<()> {
    let ns = ns.try_clone_to_owned()?;
    std::thread::spawn(move || -> Result<()> {
        // SAFETY: plain syscall on an fd we own; only this thread moves.
        ensure!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0);
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        let buf = vec![0xa5u8; len];
        let t0 = Instant::now();
        for i in 0..n {
            let due = t0 + Duration::from_secs_f64(f64::from(i) / f64::from(pps));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = sock.send_to(&buf, dst);
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender panicked"))?
}

/// A flood from the CT. A UDP socket's send buffer holds its packets until they leave the
/// IFB's queue (the skb keeps its socket across the veth), so one socket is paced at the
/// shaped rate and never overflows the 4 MiB queue: 64 non-blocking sockets do.
fn flood_from_ct(ns: BorrowedFd<'_>, dst: SocketAddr) -> Result<u64> {
    let ns = ns.try_clone_to_owned()?;
    std::thread::spawn(move || -> Result<u64> {
        // SAFETY: plain syscall on an fd we own; only this thread moves.
        ensure!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0);
        let socks = (0..64)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?;
        let buf = vec![0xa5u8; 1200];
        let end = Instant::now() + Duration::from_secs(3);
        let mut ok = 0u64;
        while Instant::now() < end {
            for s in &socks {
                if s.send_to(&buf, dst).is_ok() {
                    ok += 1;
                }
            }
        }
        Ok(ok)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender panicked"))?
}

#[test]
fn a_flooded_shaped_ct_is_billed_what_was_delivered() -> Result<()> {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let ledger = h.root.join("ledger/billing.db");
    let ledger_s = ledger.to_str().context("ledger path")?.to_owned();
    let mut d = Berthd::start(&h, &ledger, "10")?;
    std::thread::sleep(Duration::from_secs(2));

    h.ok(&["create", CT, "--ipadd", CT_ADDR]);
    h.ok(&["start", CT]);
    h.ok(&["set", CT, "--rate-in", "5mbit", "--rate-out", "5mbit"]);
    ensure!(
        wait_for(Duration::from_secs(6), || {
            h.exec(CT, &["ping", "-c", "1", "-W", "2", UPLINK4]).0 == 0
        }),
        "CT {CT} cannot reach the uplink"
    );
    let links = topo.host.run("ip", &["-j", "link", "show"]);
    let links: serde_json::Value = serde_json::from_slice(&links.stdout)?;
    let links = links.as_array().context("ip -j link")?;
    let host = links
        .iter()
        .find(|l| l["ifname"].as_str().is_some_and(|n| n.contains(CT)))
        .with_context(|| format!("no host-side interface of CT {CT}: {links:?}"))?;
    let host_if = host["ifname"].as_str().context("ifname")?.to_owned();
    // The shaper names the IFB of a non-`veth` interface after its ifindex.
    let ifb = format!("ifb-{}", host["ifindex"].as_u64().context("ifindex")?);
    tx_of(&topo.host, &ifb).context("the CT has no IFB: is it shaped out?")?;
    let netns = ct_netns(&h)?;

    // Before `set` shaped the CT, its first packets (IPv6 neighbour discovery) were counted
    // without passing an IFB: compare what happens from here on.
    let base_in = delivered_base(&topo.host, &h.bpffs, &host_if, Direction::In)?;
    let base_out = delivered_base(&topo.host, &h.bpffs, &ifb, Direction::Out)?;

    // Far above the rate both ways: the queues drop most of it.
    let to_ct: SocketAddr = format!("{CT_ADDR}:9").parse()?;
    let to_uplink: SocketAddr = format!("{UPLINK4}:9").parse()?;
    let sent_in = udp_flood(topo.uplink.fd(), to_ct, 1200, Duration::from_secs(3))?;
    let sent_out = flood_from_ct(netns.as_fd(), to_uplink)?;
    eprintln!("flooded {sent_in} datagrams in, {sent_out} out");

    let (billed_in, und_in) =
        delivered_matches(&topo.host, &h.bpffs, &host_if, Direction::In, base_in)?;
    let (billed_out, und_out) =
        delivered_matches(&topo.host, &h.bpffs, &ifb, Direction::Out, base_out)?;
    eprintln!(
        "in: billed {billed_in}, undelivered {und_in}; out: billed {billed_out}, undelivered {und_out}"
    );
    // 3 s at 5 Mbit/s is ~1.9 MB; the flood was far more.
    ensure!(
        und_in > 5 * billed_in.min(2_500_000) / 2 && und_out > 5 * billed_out.min(2_500_000) / 2,
        "the flood was hardly dropped: in {und_in}/{billed_in}, out {und_out}/{billed_out}"
    );

    // The CT's root drops inbound traffic itself: everything arriving on eth0 is redirected
    // into a queue of its own that passes 8 kbit/s. Those drops happen in its namespace, on
    // its device: still billed (they were delivered to it). Sent well below the CT's rate,
    // so the host's queue drops nothing.
    let nsfd = netns.as_fd();
    let ct_if = ct_ifname(nsfd)?;
    in_ct(
        nsfd,
        "ip",
        &["link", "add", "sink0", "type", "veth", "peer", "sink1"],
    )?;
    in_ct(nsfd, "ip", &["link", "set", "sink0", "up"])?;
    in_ct(nsfd, "ip", &["link", "set", "sink1", "up"])?;
    in_ct(
        nsfd,
        "tc",
        &[
            "qdisc", "add", "dev", "sink0", "root", "tbf", "rate", "8kbit", "burst", "1600",
            "limit", "1600",
        ],
    )?;
    in_ct(nsfd, "tc", &["qdisc", "add", "dev", &ct_if, "clsact"])?;
    in_ct(
        nsfd,
        "tc",
        &[
            "filter", "add", "dev", &ct_if, "ingress", "protocol", "ip", "u32", "match", "u32",
            "0", "0", "action", "mirred", "egress", "redirect", "dev", "sink0",
        ],
    )?;
    let (_, und_before, _) = billed_parts(&h.bpffs, Direction::In)?;
    paced(topo.uplink.fd(), to_ct, 1000, 300, 600)?;
    let tbf = in_ct_output(nsfd, "tc", &["-s", "-j", "qdisc", "show", "dev", "sink0"])?;
    let tbf: serde_json::Value = serde_json::from_slice(&tbf)?;
    let ct_drops = tbf[0]["drops"].as_u64().context("tbf drops")?;
    ensure!(
        ct_drops > 400,
        "the CT's own queue dropped only {ct_drops} of 600"
    );
    let (billed_in2, und_in2) =
        delivered_matches(&topo.host, &h.bpffs, &host_if, Direction::In, base_in)?;
    ensure!(
        und_in2 == und_before,
        "drops inside the CT were taken off its bill: undelivered {und_before} → {und_in2}"
    );
    ensure!(
        billed_in2 >= billed_in + 600 * 986,
        "the CT was not billed what reached it: {billed_in} → {billed_in2}"
    );

    // The ledger bills the same: after the CT stops, its counters are final.
    h.ok(&["stop", "--fast", CT]);
    let (c_in, u_in, _) = billed_parts(&h.bpffs, Direction::In)?;
    let (c_out, u_out, _) = billed_parts(&h.bpffs, Direction::Out)?;
    d.sigterm()?;
    let report = h.json(&["billing", "--ledger", &ledger_s, "report", CT]);
    let (l_in, l_out) = (
        report["in_bytes"].as_u64().context("in_bytes")?,
        report["out_bytes"].as_u64().context("out_bytes")?,
    );
    ensure!(
        (l_in, l_out) == (c_in - u_in, c_out - u_out),
        "ledger {l_in}/{l_out} vs delivered {}/{} (counted {c_in}/{c_out}): {report}",
        c_in - u_in,
        c_out - u_out
    );
    eprintln!("ledger {l_in}/{l_out} = delivered; counted {c_in}/{c_out}");
    // The report says what its bytes are.
    let (_, _, layer) = billed_parts(&h.bpffs, Direction::In)?;
    let layer = if layer == ByteLayer::L3 { "l3" } else { "l2" };
    ensure!(
        report["layer"] == layer && report["basis"] == "delivered",
        "layer/basis: {report}"
    );
    let csv = h.ok(&["billing", "--ledger", &ledger_s, "report", CT, "--csv"]);
    let header = csv.lines().next().context("empty CSV")?;
    ensure!(header.ends_with(",layer,basis"), "{header}");
    ensure!(
        csv.lines()
            .skip(1)
            .all(|l| l.ends_with(&format!(",{layer},delivered"))),
        "{csv}"
    );
    h.ok(&["destroy", CT]);
    Ok(())
}
