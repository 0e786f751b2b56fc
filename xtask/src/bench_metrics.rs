//! `cargo xtask bench metrics`: the issue-5 benchmark of berthd — 1000 synthetic running CTs
//! (configs, run states naming a live stand-in init, cgroups with limits under a unique
//! parent, counter slots and drop rows in a private pinned datapath), 200 sequential scrapes
//! of a release berthd: p50/p99 response time and collect time, berthd's CPU time per scrape
//! and the CPU other work used meanwhile (the machine is shared), peak RSS, series per CT. The work is the privileged test entry `bench_metrics`
//! (tests/tests/berthd.rs); xtask builds release berthd and runs it (xtask does not link berth,
//! which would build the eBPF object into xtask). Everything it creates is removed and checked.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::{cargo, nix_is_root, run, workspace_root};

#[derive(Args)]
pub struct MetricsArgs {
    /// Synthetic CTs (at most the datapath's 1024 counter slots).
    #[arg(long, default_value_t = 1000)]
    cts: usize,
    /// Sequential scrapes measured (after 3 warm-up scrapes).
    #[arg(long, default_value_t = 200)]
    scrapes: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run_bench(a: MetricsArgs) -> Result<()> {
    if !nix_is_root() {
        bail!("the metrics benchmark needs root (cgroups, bpffs)");
    }
    if a.cts == 0 || a.cts > 1024 {
        bail!(
            "--cts {}: between 1 and 1024 (the datapath's counter slots)",
            a.cts
        );
    }
    if a.scrapes < 100 {
        bail!("--scrapes {}: a p99 needs at least 100", a.scrapes);
    }
    run(cargo().args(["build", "--release", "-p", "berth", "--bin", "berthd"]))?;
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "berth-tests",
        "--test",
        "berthd",
        "bench_metrics",
        "--",
        "--ignored",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("BERTH_BIN_DIR", workspace_root().join("target/release"))
    .env("BERTH_BENCH_CTS", a.cts.to_string())
    .env("BERTH_BENCH_SCRAPES", a.scrapes.to_string());
    if let Some(p) = &a.json {
        cmd.env("BERTH_BENCH_JSON", std::path::absolute(p)?);
    }
    run(&mut cmd)
}
