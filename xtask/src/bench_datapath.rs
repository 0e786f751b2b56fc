//! `cargo xtask bench datapath`: the issue-4 benchmark of the eBPF datapath — per-packet cost
//! of both hooks under iperf3 load (`bpf_stats` run_time_ns / run_cnt, with a no-op program's
//! floor measured alongside) and single-stream TCP throughput with vs without the programs
//! (interleaved, medians). The work is `berth::datapath::bench::run_datapath_bench`; xtask
//! does not link berth (that would build the eBPF object into xtask), so it runs the
//! privileged test entry `bench_datapath`, which calls it and prints the report.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::{cargo, nix_is_root, run};

#[derive(Args)]
pub struct DatapathArgs {
    /// Throughput runs per variant (with / without the programs) and direction (≥ 5).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Rounds of the cost measurement (berth and the no-op, ABBA).
    #[arg(long, default_value_t = 6)]
    cost_rounds: usize,
    /// Seconds of iperf3 --bidir load per cost phase.
    #[arg(long, default_value_t = 3)]
    cost_seconds: u32,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run_bench(a: DatapathArgs) -> Result<()> {
    if !nix_is_root() {
        bail!("the datapath benchmark needs root (network namespaces, eBPF)");
    }
    if a.runs < 5 {
        bail!(
            "--runs {}: the bar needs at least 5 runs per variant",
            a.runs
        );
    }
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "berth-tests",
        "--test",
        "datapath",
        "bench_datapath",
        "--",
        "--ignored",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("BERTH_BENCH_RUNS", a.runs.to_string())
    .env("BERTH_BENCH_SECONDS", a.seconds.to_string())
    .env("BERTH_BENCH_COST_ROUNDS", a.cost_rounds.to_string())
    .env("BERTH_BENCH_COST_SECONDS", a.cost_seconds.to_string());
    if let Some(p) = &a.json {
        let p = std::path::absolute(p)?;
        cmd.env("BERTH_BENCH_JSON", p);
    }
    run(&mut cmd)
}
