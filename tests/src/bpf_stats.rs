//! The kernel's run-time statistics of BPF programs (`BPF_ENABLE_STATS`, the mechanism behind
//! `sysctl kernel.bpf_stats_enabled=1`: while enabled, the kernel adds up `run_time_ns` and
//! `run_cnt` of every program). The datapath benchmark measures per-packet cost with them; the
//! tests use them to see which program ran.

use std::os::fd::OwnedFd;

use anyhow::{Context, Result};
use aya::programs::SchedClassifier;
use berth::datapath::Datapath;
use berth_common::program_names;
use serde::Serialize;

/// Keeps run-time statistics enabled while alive (they cost a few ns per run, so only for
/// measurements).
pub struct StatsGuard(
    #[expect(dead_code, reason = "held for its Drop (closing disables)")] OwnedFd,
);

pub fn enable_stats() -> Result<StatsGuard> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map(StatsGuard)
        .map_err(|e| e.io_error)
        .context("enabling BPF run-time stats (BPF_ENABLE_STATS)")
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

impl std::ops::Add for ProgStats {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            run_cnt: self.run_cnt + other.run_cnt,
            run_time_ns: self.run_time_ns + other.run_time_ns,
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

impl std::ops::Add for HookStats {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            from_ct: self.from_ct + other.from_ct,
            to_ct: self.to_ct + other.to_ct,
        }
    }
}

/// Current cumulative statistics of one program (`name` for the error).
pub fn prog_stats(p: &SchedClassifier, name: &str) -> Result<ProgStats> {
    let info = p
        .info()
        .with_context(|| format!("reading the info of program {name}"))?;
    Ok(ProgStats {
        run_cnt: info.run_count(),
        run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
    })
}

/// Current cumulative statistics of the datapath's two programs.
pub fn hook_stats(dp: &Datapath) -> Result<HookStats> {
    let (from, to) = dp.programs();
    Ok(HookStats {
        from_ct: prog_stats(from, program_names::FROM_CT)?,
        to_ct: prog_stats(to, program_names::TO_CT)?,
    })
}

/// Runs `load` with statistics enabled and returns what the datapath's programs spent
/// meanwhile.
pub fn measure<T>(dp: &Datapath, load: impl FnOnce() -> T) -> Result<(T, HookStats)> {
    let guard = enable_stats()?;
    let before = hook_stats(dp)?;
    let out = load();
    let after = hook_stats(dp)?;
    drop(guard);
    Ok((out, after.since(before)))
}
