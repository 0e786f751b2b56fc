//! What a quota state does to a real routed CT (`berth::quota::enforce::apply`, which berthd
//! calls every tick): cut (IP traffic beyond class 0 dropped both ways with reason `quota`,
//! class 0 still passing, a restart coming up cut), throttle (the lower of the plan's and the
//! throttle's rates, never written to the config; a `set --rate-*` while throttled changes the
//! base; lifting restores the plan exactly), suspend (frozen, thawed on lifting) and stop.
//! Run: `cargo test -p berth-tests --test quota_enforce -- --test-threads=1`.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use berth::datapath::{DatapathView, DropReason};
use berth::quota::enforce::{Enforcement, apply};
use berth::shaper::{Rate, Shaper};
use berth_runtime::Ctid;
use berth_runtime::config::Host;
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, wait_for};

const CT: &str = "4280";
const CT_ADDR: &str = "192.0.2.181";
/// In class 1 (everything but the uplink router, which is class 0: "the node's networks").
const FAR: &str = "203.0.113.9";

/// Runs `f` on a thread inside the test's host namespace (where the CT's host side is).
fn in_host<T: Send>(host: BorrowedFd<'_>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let fd = host.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on this thread only, with an fd that outlives the scope.
            ensure!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0, "setns");
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    })
}

fn enforce(h: &TestHost, host_ns: BorrowedFd<'_>, e: Enforcement) -> Result<()> {
    let host = Host::new(Some(h.root.clone()), None, Some(h.cgroup_parent.clone()))?;
    let pin = h.bpffs.clone();
    in_host(host_ns, move || {
        apply(&host, &pin, Ctid::new(CT.parse()?)?, &e)?;
        Ok(())
    })
}

fn pings(h: &TestHost, to: &str) -> bool {
    h.exec(CT, &["ping", "-c", "1", "-W", "1", to]).0 == 0
}

fn quota_drops(pin: &Path) -> Result<u64> {
    let v = DatapathView::open_pinned(pin)?.context("no datapath")?;
    Ok(v.drops()?
        .iter()
        .filter(|r| r.ctid == CT.parse::<u32>().unwrap_or(0) && r.reason == DropReason::Quota)
        .map(|r| r.packets)
        .sum())
}

/// The CT's shaped rates (in, out) as the kernel has them.
fn rates(h: &TestHost, host_ns: BorrowedFd<'_>) -> Result<(Option<Rate>, Option<Rate>)> {
    let pin = h.bpffs.clone();
    in_host(host_ns, move || {
        let st = Shaper::open(&pin)?.status(Ctid::new(CT.parse()?)?)?;
        let i = st.interfaces.first().context("not shaped")?;
        Ok((i.config.rate_in, i.config.rate_out))
    })
}

fn mbit(n: u64) -> Option<Rate> {
    Rate::from_bps(n * 1_000_000)
}

#[test]
fn cut_throttle_suspend_and_stop_act_and_lift() -> Result<()> {
    let topo = Topology::new();
    topo.uplink.ip(&format!("addr add {FAR}/32 dev lo"));
    topo.host.ip(&format!("route add {FAR}/32 via {UPLINK4}"));
    let h = TestHost::new().in_netns(topo.host.fd());
    let classes = h.dir.path().join("classes");
    std::fs::write(&classes, format!("0 {UPLINK4}/32\n1 0.0.0.0/0\n1 ::/0\n"))?;
    h.ok(&["netclass", "load", classes.to_str().context("path")?]);
    h.ok(&["create", CT, "--ipadd", CT_ADDR]);
    h.ok(&["start", CT]);
    ensure!(
        wait_for(Duration::from_secs(6), || pings(&h, UPLINK4)
            && pings(&h, FAR)),
        "CT {CT} cannot reach {UPLINK4} and {FAR}"
    );
    let ns = topo.host.fd();

    // Cut: class 0 passes, the rest is dropped (counted as `quota`), both ways.
    enforce(&h, ns, Enforcement::Cut)?;
    ensure!(pings(&h, UPLINK4), "class 0 is cut too");
    ensure!(!pings(&h, FAR), "class 1 still passes while cut");
    let d = quota_drops(&h.bpffs)?;
    ensure!(d >= 1, "no quota drops counted");
    // Inbound too: the far end's ping to the CT dies on the host side.
    let far_ping = topo
        .uplink
        .run("ping", &["-c", "1", "-W", "1", "-I", FAR, CT_ADDR]);
    ensure!(
        !far_ping.status.success(),
        "inbound class 1 passes while cut"
    );
    ensure!(
        quota_drops(&h.bpffs)? > d,
        "inbound drop not counted as quota"
    );
    // Idempotent, and a restart comes up cut.
    enforce(&h, ns, Enforcement::Cut)?;
    h.ok(&["stop", "--fast", CT]);
    h.ok(&["start", CT]);
    ensure!(
        wait_for(Duration::from_secs(6), || pings(&h, UPLINK4)),
        "class 0 after restart"
    );
    ensure!(!pings(&h, FAR), "a restart lifted the cut");
    enforce(&h, ns, Enforcement::Normal)?;
    ensure!(pings(&h, FAR), "lifting the cut did not restore class 1");

    // Throttle over a plan of 50 Mbit/s each way: the lower rates; the config stays as it was.
    h.ok(&[
        "set",
        CT,
        "--rate-in",
        "50mbit",
        "--rate-out",
        "50mbit",
        "--save",
    ]);
    let conf = h.root.join("conf").join(format!("{CT}.toml"));
    let saved = std::fs::read(&conf)?;
    let throttle = Enforcement::Throttle {
        rate_in: mbit(5),
        rate_out: mbit(5),
    };
    enforce(&h, ns, throttle)?;
    ensure!(rates(&h, ns)? == (mbit(5), mbit(5)), "{:?}", rates(&h, ns)?);
    ensure!(
        std::fs::read(&conf)? == saved,
        "the throttle was written to the config"
    );
    // A plan change while throttled changes the base: the lower one wins.
    h.ok(&["set", CT, "--rate-in", "2mbit", "--save"]);
    ensure!(rates(&h, ns)? == (mbit(2), mbit(5)), "{:?}", rates(&h, ns)?);
    enforce(&h, ns, throttle)?;
    ensure!(rates(&h, ns)? == (mbit(2), mbit(5)), "{:?}", rates(&h, ns)?);
    enforce(&h, ns, Enforcement::Normal)?;
    ensure!(
        rates(&h, ns)? == (mbit(2), mbit(50)),
        "lifting did not restore the plan: {:?}",
        rates(&h, ns)?
    );

    // Suspend freezes, lifting thaws.
    enforce(&h, ns, Enforcement::Suspend)?;
    ensure!(h.status(CT)["status"] == "suspended", "{}", h.status(CT));
    enforce(&h, ns, Enforcement::Suspend)?;
    enforce(&h, ns, Enforcement::Normal)?;
    ensure!(h.status(CT)["status"] == "running", "{}", h.status(CT));
    ensure!(pings(&h, FAR), "not back after the thaw");

    // Stop stops.
    enforce(&h, ns, Enforcement::Stop)?;
    ensure!(h.status(CT)["status"] == "stopped", "{}", h.status(CT));
    enforce(&h, ns, Enforcement::Normal)?;
    h.ok(&["destroy", CT]);
    Ok(())
}
