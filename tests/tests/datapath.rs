//! Real-kernel tests of the eBPF datapath (needs root, bpffs, kernel with TCX or clsact).
//! Each test pins under its own `/sys/fs/bpf/berth-test-<pid>x<n>` and works in namespaces it
//! creates; teardown is asserted. Run:
//! `cargo test -p berth-tests --test datapath -- --test-threads=1`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use berth::datapath::{AttachMethod, Datapath, Direction, Family, IfaceConfig};
use berth_tests::datapath::{Pair, PinDir};

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
