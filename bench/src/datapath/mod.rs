//! `bench datapath`: per-packet cost of both hooks under iperf3 load, from the kernel's own
//! run-time statistics (`bpf_stats`: the kernel adds up `run_time_ns` and `run_cnt` of every
//! program while enabled), and single-stream TCP throughput with and without the programs.
//! Everything runs in two network namespaces it creates (a "host" and a "CT" joined by a veth
//! pair) and a private pin directory, all removed afterwards.
//!
//! `bpf_stats` times each run between two `sched_clock()` reads around the program's indirect
//! call, so even a program that does nothing shows a cost; on a VM with retpolines and SRSO
//! that floor is ~100 ns under load. The benchmark therefore also measures the no-op program
//! (`berth_noop`) on the same hooks under the same load, interleaved with the real programs,
//! and reports both the raw figure and the cost net of that floor.

mod floor;
mod report;
pub mod test_run;
mod topology;

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions},
};
use berth::datapath::{
    AttachMethod, Datapath, DatapathConfig, IfaceConfig, parse_networks_classes,
};
use berth_tests::bpf_stats::{self, HookStats, ProgStats};
use clap::Args;
use tracing::info;

use report::{BAR_NS, BAR_RATIO, BenchOptions, CostRound, HookCost, Report, Throughput};
use topology::{CT_V4, CT_V6, Topology};

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

impl DatapathArgs {
    fn options(&self) -> Result<BenchOptions> {
        if self.runs < 5 {
            bail!(
                "--runs {}: the bar needs at least 5 runs per variant",
                self.runs
            );
        }
        if self.seconds == 0 || self.cost_seconds == 0 || self.cost_rounds == 0 {
            bail!("--seconds, --cost-seconds and --cost-rounds must be at least 1");
        }
        Ok(BenchOptions {
            runs: self.runs,
            seconds: self.seconds,
            cost_rounds: self.cost_rounds,
            cost_seconds: self.cost_seconds,
            bar_ns: BAR_NS,
            bar_ratio: BAR_RATIO,
        })
    }
}

pub fn run(a: &DatapathArgs) -> Result<()> {
    let opts = a.options()?;
    crate::require_root("datapath", "network namespaces, eBPF")?;
    crate::require_tool("ip", "install iproute2")?;
    crate::require_tool("iperf3", "xtask/setup.sh installs it")?;
    let report = run_bench(&opts)?;
    println!("\n{report}");
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

const BENCH_CTID: u32 = 4_000_001;
/// A typical OpenVZ table: a few local networks, everything else class 1. The host side
/// (10.201.0.1) matches only the /0, so the IPv4 scan passes every entry (its worst case).
const BENCH_CLASSES: &str = "\
0 192.0.2.0/24
0 198.51.100.0/24
2 203.0.113.0/24
1 0.0.0.0/0
0 2001:db8::/32
1 ::/0
";

/// berth's programs on one interface of the benchmark's host.
struct Hooked {
    dp: Datapath,
    ifindex: u32,
    cfg: IfaceConfig,
}

impl Hooked {
    fn attach(&mut self) -> Result<()> {
        Ok(self.dp.attach(self.ifindex, self.cfg)?)
    }

    fn detach(&mut self) -> Result<()> {
        Ok(self.dp.detach(self.ifindex)?)
    }
}

fn run_bench(opts: &BenchOptions) -> Result<Report> {
    let mut topo = Topology::create()?;
    let in_host = topo.pair.host.enter()?;
    let dp = Datapath::open_or_load(&topo.pin_dir)?;
    let method = dp.attach_method();
    let ifindex = topo.pair.host.ifindex(topo.host_if())?;
    let ct_mac = topo.pair.ct_mac()?;
    let ctid = berth_runtime::Ctid::new(BENCH_CTID)?;
    let mut cfg = IfaceConfig::routed(ctid, ct_mac);
    cfg.mac_filter = true;
    let mut h = Hooked { dp, ifindex, cfg };
    h.dp.load_classes(&parse_networks_classes(BENCH_CLASSES)?)?;
    h.dp.set_config(DatapathConfig::default())?;
    let addrs: Vec<IpAddr> = [CT_V4, CT_V6]
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    h.dp.set_ct_addrs(ctid, &addrs)?;
    h.attach()?;
    topo.start_server()?;

    // One no-op instance per hook, so that each hook's floor is its own.
    let noop_paths = [
        topo.pin_dir.join("bench-noop-ingress"),
        topo.pin_dir.join("bench-noop-egress"),
    ];
    let mut noops = [
        berth_tests::datapath::load_noop(&h.dp, &noop_paths[0])?,
        berth_tests::datapath::load_noop(&h.dp, &noop_paths[1])?,
    ];
    let floor_probe = floor::test_run_floor(&h.dp, &noops[0], ifindex, ct_mac)?;
    let rounds = cost_rounds(&mut h, &topo, &mut noops, method, opts)?;
    drop(noops);
    for p in &noop_paths {
        let _ = std::fs::remove_file(p);
    }
    let berth = rounds.iter().fold(HookStats::default(), |a, r| a + r.berth);
    let noop = rounds.iter().fold(HookStats::default(), |a, r| a + r.noop);
    let cost = |b: ProgStats, n: ProgStats| HookCost {
        runs: b.run_cnt,
        ns_per_run: b.ns_per_run(),
        noop_runs: n.run_cnt,
        noop_ns_per_run: n.ns_per_run(),
    };
    // Leave the programs attached for the throughput phase's first state change.
    h.attach()?;
    let throughput = throughput(&mut h, &topo, opts)?;

    // The counters saw the traffic: a sanity check that the measured programs did work.
    let counted: u64 =
        h.dp.counters()?
            .iter()
            .filter(|r| r.ctid == BENCH_CTID)
            .map(|r| r.packets)
            .sum();
    ensure!(
        counted > 0,
        "the datapath's programs counted nothing during the benchmark"
    );
    drop(h);
    drop(in_host);
    let report = Report {
        kernel: kernel_release(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        attach_method: method,
        options: opts.clone(),
        floor_probe,
        from_ct: cost(berth.from_ct, noop.from_ct),
        to_ct: cost(berth.to_ct, noop.to_ct),
        rounds,
        throughput,
    };
    drop(topo);
    Ok(report)
}

/// Per-packet cost: per round, berth's programs and then the no-op alone on the same hooks
/// (the floor is measured on the hook berth uses: TCX link or cls_bpf filter).
fn cost_rounds(
    h: &mut Hooked,
    topo: &Topology,
    noops: &mut [SchedClassifier; 2],
    method: AttachMethod,
    opts: &BenchOptions,
) -> Result<Vec<CostRound>> {
    let host_if = topo.host_if();
    let noop_opts = || match method {
        AttachMethod::Tcx => TcAttachOptions::TcxOrder(LinkOrder::first()),
        AttachMethod::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
    };
    let attach_ctx = || format!("attaching the no-op reference program to {host_if}");
    let load = || topo.iperf(&["-t", &opts.cost_seconds.to_string(), "--bidir"]);
    let mut rounds = Vec::new();
    for round in 0..opts.cost_rounds {
        // ABBA: drift over the measurement hits berth and the no-op alike.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut this = CostRound::default();
        for berth_phase in order {
            if berth_phase {
                h.attach()?;
                let (res, stats) = bpf_stats::measure(&h.dp, load)?;
                res?;
                this.berth = stats;
                continue;
            }
            h.detach()?;
            if method == AttachMethod::Netlink {
                // EEXIST when berth's attach left it in place.
                let _ = tc::qdisc_add_clsact(host_if);
            }
            let [noop_in, noop_eg] = &mut *noops;
            let a = noop_in
                .attach_with_options(host_if, TcAttachType::Ingress, noop_opts())
                .with_context(attach_ctx)?;
            let b = noop_eg
                .attach_with_options(host_if, TcAttachType::Egress, noop_opts())
                .with_context(attach_ctx)?;
            let read = |i: &SchedClassifier, e: &SchedClassifier| -> Result<HookStats> {
                Ok(HookStats {
                    from_ct: bpf_stats::prog_stats(i, berth_common::program_names::NOOP)?,
                    to_ct: bpf_stats::prog_stats(e, berth_common::program_names::NOOP)?,
                })
            };
            let guard = bpf_stats::enable_stats()?;
            let before = read(noop_in, noop_eg)?;
            let res = load();
            let after = read(noop_in, noop_eg)?;
            drop(guard);
            noop_in.detach(a).with_context(attach_ctx)?;
            noop_eg.detach(b).with_context(attach_ctx)?;
            res?;
            this.noop = after.since(before);
        }
        info!(
            round,
            from_ct_ns = this.berth.from_ct.ns_per_run(),
            to_ct_ns = this.berth.to_ct.ns_per_run(),
            "cost round done"
        );
        rounds.push(this);
    }
    Ok(rounds)
}

/// Throughput both ways, with and without the programs, interleaved ABBA so that drift
/// (thermal, neighbours) hits both alike.
fn throughput(h: &mut Hooked, topo: &Topology, opts: &BenchOptions) -> Result<Vec<Throughput>> {
    let secs = opts.seconds.to_string();
    let mut out = Vec::new();
    for (direction, extra) in [("CT → host", None), ("host → CT", Some("-R"))] {
        let mut t = Throughput {
            direction,
            with_programs: Vec::new(),
            without_programs: Vec::new(),
        };
        for i in 0..opts.runs {
            let order = if i % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for with in order {
                if with {
                    h.attach()?;
                } else {
                    h.detach()?;
                }
                let mut args = vec!["-t", secs.as_str()];
                args.extend(extra);
                let gbps = topo.iperf(&args)?;
                if with {
                    t.with_programs.push(gbps);
                } else {
                    t.without_programs.push(gbps);
                }
            }
        }
        out.push(t);
    }
    Ok(out)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(runs: usize) -> DatapathArgs {
        DatapathArgs {
            runs,
            seconds: 4,
            cost_rounds: 6,
            cost_seconds: 3,
            json: None,
        }
    }

    #[test]
    fn too_few_runs_is_refused() {
        let err = args(3).options().unwrap_err();
        assert!(err.to_string().contains("at least 5 runs"), "{err}");
        let opts = args(5).options().unwrap();
        assert_eq!((opts.bar_ns, opts.bar_ratio), (100.0, 0.98));
    }
}
