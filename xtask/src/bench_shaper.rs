//! `cargo xtask bench shaper`: the issue-6 benchmark of the shaper — iperf3 TCP goodput,
//! retransmits and the ratio to a hand-made tc HTB on the same veth in the same run (10, 100,
//! 1000 Mbit/s, both directions, bridged — CT and peer on a test bridge — and routed), isolation from a neighbour's 5x UDP flood, packet-rate limit
//! accuracy, ping p99 under load. Prints PASS/FAIL per bar. The work runs in the privileged
//! test entry `bench_shaper` (xtask does not link berth: that would build the eBPF object
//! into xtask); all traffic stays in namespaces it creates.

use anyhow::{Result, bail};
use clap::Args;

use crate::{cargo, nix_is_root, run as run_cmd};

#[derive(Args)]
pub struct ShaperArgs {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
}

pub fn run(a: ShaperArgs) -> Result<()> {
    if !nix_is_root() {
        bail!("the shaper benchmark needs root (network namespaces, eBPF, tc)");
    }
    if a.seconds < 2 {
        bail!("--seconds {}: at least 2", a.seconds);
    }
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--release",
        "-p",
        "berth-tests",
        "--test",
        "shaper",
        "bench_shaper",
        "--",
        "--ignored",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("BERTH_BENCH_SECONDS", a.seconds.to_string());
    run_cmd(&mut cmd)
}
