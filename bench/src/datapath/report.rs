//! What the datapath benchmark measured, its bars and how it prints.

use std::fmt;

use berth::datapath::AttachMethod;
use berth_tests::bpf_stats::{HookStats, ProgStats};
use serde::Serialize;

use crate::verdict;

/// What to run (`cargo xtask bench datapath` options).
#[derive(Clone, Debug, Serialize)]
pub struct BenchOptions {
    /// Throughput runs per variant (with / without the programs) and direction; at least 5.
    pub runs: usize,
    /// Length of each throughput run (`iperf3 -t`).
    pub seconds: u32,
    /// Rounds of the cost measurement; each measures berth's programs, then the no-op, for
    /// `cost_seconds` of `iperf3 --bidir` each.
    pub cost_rounds: usize,
    pub cost_seconds: u32,
    /// Bars from issue #4.
    pub bar_ns: f64,
    pub bar_ratio: f64,
}

/// Issue #4's bars: per-packet cost per hook, and throughput with ÷ without the programs.
pub const BAR_NS: f64 = 100.0;
pub const BAR_RATIO: f64 = 0.98;

/// Per-packet cost of one hook.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct HookCost {
    /// berth's program: runs and ns/run as `bpf_stats` reports them.
    pub runs: u64,
    pub ns_per_run: f64,
    /// The no-op program on the same hook under the same load.
    pub noop_runs: u64,
    pub noop_ns_per_run: f64,
}

impl HookCost {
    /// berth's cost above what running any program costs.
    pub fn net_ns(&self) -> f64 {
        self.ns_per_run - self.noop_ns_per_run
    }
}

/// Throughput of one direction, Gbit/s per run, in the order run.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub direction: &'static str,
    pub with_programs: Vec<f64>,
    pub without_programs: Vec<f64>,
}

impl Throughput {
    pub fn median_with(&self) -> f64 {
        median(&self.with_programs)
    }

    pub fn median_without(&self) -> f64 {
        median(&self.without_programs)
    }

    /// Ratio of the medians (shown for reference).
    pub fn ratio_of_medians(&self) -> f64 {
        let base = self.median_without();
        if base > 0.0 {
            self.median_with() / base
        } else {
            0.0
        }
    }

    /// with ÷ without of each interleaved pair (the two runs made back to back).
    pub fn pair_ratios(&self) -> Vec<f64> {
        self.with_programs
            .iter()
            .zip(&self.without_programs)
            .map(|(w, wo)| if *wo > 0.0 { w / wo } else { 0.0 })
            .collect()
    }

    /// The figure the bar is checked on: the median of the paired ratios. The VM's speed
    /// drifts by more than the effect measured (±15 % between runs minutes apart), and a
    /// pair's two runs share the drift, so pairing removes most of it.
    pub fn ratio(&self) -> f64 {
        median(&self.pair_ratios())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cpus: usize,
    pub attach_method: AttachMethod,
    pub options: BenchOptions,
    /// What `bpf_stats` itself adds per run, without load (BPF_PROG_TEST_RUN).
    pub floor_probe: FloorProbe,
    pub from_ct: HookCost,
    pub to_ct: HookCost,
    /// The cost measurement round by round (the totals above sum them).
    pub rounds: Vec<CostRound>,
    pub throughput: Vec<Throughput>,
}

/// One round of the cost measurement: berth's programs and the no-op, each under the same
/// `cost_seconds` of load.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CostRound {
    pub berth: HookStats,
    pub noop: HookStats,
}

impl Report {
    /// The bar read literally: raw `run_time_ns / run_cnt` of both hooks.
    pub fn cost_pass_raw(&self) -> bool {
        [self.from_ct, self.to_ct]
            .iter()
            .all(|h| h.ns_per_run <= self.options.bar_ns)
    }

    /// The bar on the programs' own cost: raw minus the no-op floor measured alongside.
    pub fn cost_pass_net(&self) -> bool {
        [self.from_ct, self.to_ct]
            .iter()
            .all(|h| h.net_ns() <= self.options.bar_ns)
    }

    pub fn throughput_pass(&self) -> bool {
        self.throughput
            .iter()
            .all(|t| t.ratio() >= self.options.bar_ratio)
    }
}

/// What `bpf_stats` adds to every run, measured without load (see `floor.rs`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct FloorProbe {
    pub repeat: u32,
    /// ns per run, statistics off: the program alone (plus the loop's own overhead).
    pub noop_off_ns: f64,
    pub berth_off_ns: f64,
    /// ns per run, statistics on (BPF_PROG_TEST_RUN's own timing).
    pub noop_on_ns: f64,
    pub berth_on_ns: f64,
    /// run_time_ns / run_cnt that `bpf_stats` reports for the no-op's runs above.
    pub noop_stats_ns: f64,
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "berth datapath benchmark — kernel {}, {} CPUs, attach {:?}",
            self.kernel, self.cpus, self.attach_method
        )?;
        let fp = &self.floor_probe;
        writeln!(
            f,
            "\nbpf_stats instrumentation without load (BPF_PROG_TEST_RUN, {} runs, ns/run as the \
             kernel times the loop):",
            fp.repeat
        )?;
        writeln!(
            f,
            "  no-op: {:.1} stats off, {:.1} stats on (+{:.1}); bpf_stats reports {:.1} for it",
            fp.noop_off_ns,
            fp.noop_on_ns,
            fp.noop_on_ns - fp.noop_off_ns,
            fp.noop_stats_ns
        )?;
        writeln!(
            f,
            "  berth from_ct (TCP/IPv4 from the CT, hot caches): {:.1} stats off, {:.1} stats on",
            fp.berth_off_ns, fp.berth_on_ns
        )?;
        writeln!(
            f,
            "\nper-packet cost under iperf3 --bidir load (bpf_stats run_time_ns / run_cnt; \
             {} rounds × {} s each for berth and the no-op, interleaved ABBA)",
            o.cost_rounds, o.cost_seconds
        )?;
        writeln!(
            f,
            "  {:<20} {:>10} {:>14} {:>14} {:>16}",
            "hook", "runs", "berth ns/run", "no-op ns/run", "berth − no-op"
        )?;
        for (name, h) in [
            ("from_ct (ingress)", self.from_ct),
            ("to_ct (egress)", self.to_ct),
        ] {
            writeln!(
                f,
                "  {:<20} {:>10} {:>14.1} {:>14.1} {:>16.1}",
                name,
                h.runs,
                h.ns_per_run,
                h.noop_ns_per_run,
                h.net_ns()
            )?;
        }
        let spread = |pick: fn(&HookStats) -> ProgStats| {
            let nets: Vec<f64> = self
                .rounds
                .iter()
                .map(|r| pick(&r.berth).ns_per_run() - pick(&r.noop).ns_per_run())
                .collect();
            let min = nets.iter().copied().fold(f64::INFINITY, f64::min);
            let max = nets.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (min, max)
        };
        let (a, b) = spread(|h| h.from_ct);
        let (c, d) = spread(|h| h.to_ct);
        writeln!(
            f,
            "  berth − no-op per round: from_ct {a:.1}..{b:.1}, to_ct {c:.1}..{d:.1}"
        )?;
        writeln!(
            f,
            "  bar ≤ {:.0} ns per hook, raw run_time_ns/run_cnt: {}",
            o.bar_ns,
            verdict(self.cost_pass_raw())
        )?;
        writeln!(
            f,
            "  bar ≤ {:.0} ns per hook, net of the no-op floor:  {}",
            o.bar_ns,
            verdict(self.cost_pass_net())
        )?;
        writeln!(
            f,
            "\nsingle-stream TCP throughput (iperf3 -t {}, client/server pinned to CPUs 0/1, \
             {} runs per variant, interleaved ABBA; bar on the median of the paired ratios)",
            o.seconds, o.runs
        )?;
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        for t in &self.throughput {
            writeln!(
                f,
                "  {:<10} with {:>6.2} Gbit/s [{}]  without {:>6.2} Gbit/s [{}]",
                t.direction,
                t.median_with(),
                list(&t.with_programs),
                t.median_without(),
                list(&t.without_programs),
            )?;
            let ratios: Vec<String> = t.pair_ratios().iter().map(|r| format!("{r:.3}")).collect();
            writeln!(
                f,
                "  {:<10} paired ratios [{}]  median {:.3}  (ratio of medians {:.3})",
                "",
                ratios.join(" "),
                t.ratio(),
                t.ratio_of_medians()
            )?;
        }
        writeln!(
            f,
            "  bar ≥ {:.2} × without: {}",
            o.bar_ratio,
            verdict(self.throughput_pass())
        )?;
        writeln!(
            f,
            "\nresult: cost (raw) {}, cost (net of no-op) {}, throughput {}",
            verdict(self.cost_pass_raw()),
            verdict(self.cost_pass_net()),
            verdict(self.throughput_pass())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratio() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let t = Throughput {
            direction: "x",
            with_programs: vec![9.8, 10.0, 9.9, 1.0, 9.7],
            without_programs: vec![10.0, 10.1, 9.9, 10.0, 10.2],
        };
        assert!((t.ratio_of_medians() - 9.8 / 10.0).abs() < 1e-9);
        // Pairs: 0.98, 0.990, 1.0, 0.1 (the outlier), 0.951 → median 0.98.
        assert!((t.ratio() - 0.98).abs() < 1e-9);
        // Drift that hits both runs of a pair alike cancels out of the paired ratios.
        let drift = Throughput {
            direction: "x",
            with_programs: vec![10.0, 5.0, 10.0, 5.0, 10.0],
            without_programs: vec![10.0, 5.0, 10.0, 5.0, 10.0],
        };
        assert_eq!(drift.ratio(), 1.0);
    }
}
