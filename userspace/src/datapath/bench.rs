//! Per-packet cost of the datapath programs, from the kernel's own run-time statistics
//! (`BPF_ENABLE_STATS`, the mechanism behind `sysctl kernel.bpf_stats_enabled=1`): the kernel
//! adds up `run_time_ns` and `run_cnt` for every program while statistics are enabled.

use std::os::fd::OwnedFd;

use berth_common::program_names;
use serde::Serialize;

use super::{Datapath, DatapathError, Result};

/// Keeps run-time statistics enabled while alive (they cost a few ns per run, so only for
/// measurements).
pub struct StatsGuard(
    #[expect(dead_code, reason = "held for its Drop (closing disables)")] OwnedFd,
);

pub fn enable_stats() -> Result<StatsGuard> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map(StatsGuard)
        .map_err(|e| DatapathError::Io {
            op: "enabling BPF run-time stats (BPF_ENABLE_STATS)",
            path: "/proc/sys/kernel/bpf_stats_enabled".into(),
            source: e.io_error,
        })
}

/// Cumulative statistics of one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProgStats {
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

impl ProgStats {
    /// Statistics accumulated since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            run_cnt: self.run_cnt.saturating_sub(earlier.run_cnt),
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
        }
    }

    /// Average cost per run (per packet: each skb is one run), ns.
    pub fn ns_per_run(self) -> f64 {
        if self.run_cnt == 0 {
            0.0
        } else {
            self.run_time_ns as f64 / self.run_cnt as f64
        }
    }
}

/// Statistics of both hooks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HookStats {
    /// `berth_from_ct`, host-side ingress.
    pub from_ct: ProgStats,
    /// `berth_to_ct`, host-side egress.
    pub to_ct: ProgStats,
}

impl HookStats {
    pub fn since(self, earlier: Self) -> Self {
        Self {
            from_ct: self.from_ct.since(earlier.from_ct),
            to_ct: self.to_ct.since(earlier.to_ct),
        }
    }
}

impl Datapath {
    /// Current cumulative run statistics of the two programs.
    pub fn hook_stats(&self) -> Result<HookStats> {
        let (from, to) = self.programs();
        let read = |p: &aya::programs::SchedClassifier, name: &'static str| -> Result<ProgStats> {
            let info = p.info().map_err(|e| DatapathError::Program {
                program: name,
                op: "reading info",
                source: Box::new(e),
            })?;
            Ok(ProgStats {
                run_cnt: info.run_count(),
                run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            })
        };
        Ok(HookStats {
            from_ct: read(from, program_names::FROM_CT)?,
            to_ct: read(to, program_names::TO_CT)?,
        })
    }

    /// Runs `load` with statistics enabled and returns what the programs spent meanwhile.
    pub fn measure<T>(&self, load: impl FnOnce() -> T) -> Result<(T, HookStats)> {
        let guard = enable_stats()?;
        let before = self.hook_stats()?;
        let out = load();
        let after = self.hook_stats()?;
        drop(guard);
        Ok((out, after.since(before)))
    }
}
