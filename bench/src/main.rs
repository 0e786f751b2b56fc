//! berth's benchmarks, each printing ratios against a control measured in the same run. Run
//! them with `cargo xtask bench <name> [options]`, which builds this binary and berth's release
//! binaries first and points `BERTH_BIN_DIR` at them (the benchmarks driving the CLI or berthd
//! run those). All need root; everything they create lives in namespaces, cgroups and pin
//! directories of their own and is removed afterwards.

mod api;
mod checkpoint;
mod datapath;
mod density;
mod import;
mod isolation;
mod metrics;
mod migrate;
mod net;
mod quota;
mod shaper;
mod ship;
mod start;
mod stats;
mod testbed;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth-bench",
    about = "berth's benchmarks (cargo xtask bench <name>)"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// create → start → stop → destroy of a busybox CT, berth vs crun on the same rootfs.
    Start(start::StartArgs),
    /// Unprivileged CTs (issue 12's bars): create from the Debian template (time, new disk),
    /// busybox create→start→stop→destroy vs crun with a user namespace, systemd boot and stop.
    Isolation(isolation::IsolationArgs),
    /// Network setup per CT (in-process netlink vs ip(8)) and 1000 CTs up and down.
    Net(net::NetArgs),
    /// eBPF datapath: per-packet cost under iperf3 load (bpf_stats) and single-stream
    /// throughput with vs without the programs.
    Datapath(datapath::DatapathArgs),
    /// eBPF datapath probe: ns per run of each program on one frame under BPF_PROG_TEST_RUN
    /// (managed and unmanaged interface, and the no-op program).
    DatapathTestRun(datapath::test_run::TestRunArgs),
    /// Shaper: iperf3 goodput vs a hand-made HTB, isolation, pps accuracy, ping p99 under load.
    Shaper(shaper::ShaperArgs),
    /// Shaper probe: cost of one HTB class dump, what a scrape pays per shaped direction.
    ShaperClassDump(shaper::ClassDumpArgs),
    /// berthd /metrics with 1000 synthetic CTs: p50/p99 scrape time, RSS, series per CT.
    Metrics(metrics::MetricsArgs),
    /// Metrics probe: building and encoding the exposition of 1000 CTs in-process.
    MetricsEncode(metrics::EncodeArgs),
    /// Fleet: 1000 CTs × one day of slots shipped into a private PostgreSQL, and a full replay.
    Ship(ship::ShipArgs),
    /// Transfer quotas: the quota action delay against the tick (iperf3 crossing a quota, the
    /// throttle read back from tc) and duplicate webhooks over 5 berthd restarts.
    Quota(quota::QuotaArgs),
    /// Testbed: `up`/`down` of 2 routed + 2 bridged CTs with berthd vs plain namespaces, and
    /// concurrent `berth testbed run`s vs a single one.
    Testbed(testbed::TestbedArgs),
    /// berthd's panel API: 200 concurrent GET /v1/cts over 1000 CTs (p99), and create+start
    /// through the API vs the CLI.
    Api(api::ApiArgs),
    /// OpenVZ import: a 1 GiB simfs private area vs cp -a, and the dry run of 100 configs.
    Import(import::ImportArgs),
    /// Checkpoint + restore downtime of a busybox CT holding 200 MB of anonymous memory, vs
    /// CRIU alone on a plain process tree holding the same.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Density: N running routed busybox CTs: host memory per CT (monitor PSS + kernel),
    /// start p50 of the first and last 100, stop of all, /metrics p99 at that size.
    Density(density::DensityArgs),
    /// Migration downtime between two namespaced hosts over ssh: offline with 1 GiB of files
    /// (10 MiB changing), live with 200 MiB of memory, vs a restart / checkpoint in place.
    Migrate(migrate::MigrateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Progress (per-round figures) at info; the results go to stdout.
    let filter = std::env::var("BERTH_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_target(false)
        .init();
    let res = match cli.bench {
        Bench::Start(a) => start::run(&a),
        Bench::Isolation(a) => isolation::run(&a),
        Bench::Net(a) => net::run(&a),
        Bench::Datapath(a) => datapath::run(&a),
        Bench::DatapathTestRun(a) => datapath::test_run::run(&a),
        Bench::Shaper(a) => shaper::run(&a),
        Bench::ShaperClassDump(a) => shaper::class_dump(&a),
        Bench::Metrics(a) => metrics::run(&a),
        Bench::MetricsEncode(a) => metrics::encode(&a),
        Bench::Ship(a) => ship::run(&a),
        Bench::Quota(a) => quota::run(&a),
        Bench::Testbed(a) => testbed::run(&a),
        Bench::Import(a) => import::run(&a),
        Bench::Checkpoint(a) => checkpoint::run(&a),
        Bench::Migrate(a) => migrate::run(&a),
        Bench::Api(a) => api::run(&a),
        Bench::Density(a) => density::run(&a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fails unless running as root; `needs` says what for.
fn require_root(bench: &str, needs: &str) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the {bench} benchmark needs root ({needs})");
    }
    Ok(())
}

/// Fails unless `tool` is an executable in PATH.
fn require_tool(tool: &str, hint: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{tool} not found in PATH ({hint})");
    }
    Ok(())
}

/// "PASS" or "FAIL", as every benchmark prints its bars.
fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}
