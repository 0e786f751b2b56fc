//! The resource settings of a CT in OpenVZ terms, their ranges, and how they map onto cgroup values.

use serde::{Deserialize, Serialize};

use super::error::{CgroupError, Result};
use crate::size::Size;

/// CFS period used for every quota: 100 ms, the kernel default, fine-grained enough for 1% steps.
pub const CFS_PERIOD_US: u64 = 100_000;
/// Smallest memory limit accepted; below this not even a shell starts and the CT only OOM-loops.
pub const MEMORY_MIN: u64 = 1 << 20;
pub const CPUUNITS_MIN: u64 = 8;
pub const CPUUNITS_MAX: u64 = 500_000;
/// OpenVZ's default cpuunits; maps to the kernel defaults (v1 shares 1024, v2 weight 100).
pub const CPUUNITS_DEFAULT: u64 = 1000;
/// The kernel's NR_CPUS upper bound; also bounds cpulimit (percent of one CPU) at 100 × this.
pub const CPUS_MAX: u32 = 8192;
/// PID_MAX_LIMIT on 64-bit kernels: pids.max above it can never be reached.
pub const NUMPROC_MAX: u64 = 4 * 1024 * 1024;
pub const IOWEIGHT_MIN: u32 = 10;
pub const IOWEIGHT_MAX: u32 = 1000;
/// v1 cpu.shares bounds (MIN_SHARES / MAX_SHARES in kernel/sched).
const SHARES_MIN: u64 = 2;
const SHARES_MAX: u64 = 1 << 18;
/// v2 cpu.weight bounds.
const WEIGHT_MIN: u64 = 1;
const WEIGHT_MAX: u64 = 10_000;

/// Resource settings for [`super::CgroupManager::apply`]. Every field is optional: `None` leaves the
/// kernel value as it is.
///
/// `cpulimit` and `cpus` feed one kernel knob (the CFS quota): the quota is
/// `min(cpulimit %, cpus × 100 %)`, 0 meaning "no limit from this setting". When either is `Some`,
/// the quota is recomputed from both and a `None` partner counts as unlimited, so callers pass both
/// (the CT config's values) whenever one of them changes. `cpus` does not pin CPUs (cpuset): pinning
/// every CT to CPUs 0..N would pile them onto the same cores.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// RAM limit. v1 `memory.limit_in_bytes`, v2 `memory.max`.
    pub memory: Option<Size>,
    /// Swap on top of RAM. v1 `memory.memsw.limit_in_bytes` = memory + swap; v2 `memory.swap.max`.
    /// On v1, changing only `memory` keeps the current swap amount (memsw moves with memory).
    pub swap: Option<Size>,
    /// OpenVZ cpuunits 8..=500000 (default 1000). v1 `cpu.shares` = units × 1.024 (capped at the
    /// kernel's 262144); v2 `cpu.weight` = units / 10 (1..=10000, so units above 100000 saturate).
    pub cpuunits: Option<u64>,
    /// Percent of one CPU, 0 = unlimited. v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, v2 `cpu.max`.
    pub cpulimit: Option<u32>,
    /// Number of CPUs the CT may keep busy, 0 = unlimited: caps the quota at N × 100 %.
    pub cpus: Option<u32>,
    /// Task limit (processes + threads), 0 = unlimited. `pids.max`.
    pub numproc: Option<u64>,
    /// Block I/O weight 10..=1000 (100 = default share). v1 `blkio.weight` and/or
    /// `blkio.bfq.weight`; v2 `io.weight` and/or `io.bfq.weight` — every one that exists is written.
    pub ioweight: Option<u32>,
}

fn invalid(flag: &'static str, value: impl ToString, why: impl Into<String>) -> CgroupError {
    CgroupError::Invalid {
        flag,
        value: value.to_string(),
        why: why.into(),
    }
}

impl Resources {
    /// Checks every range; the error names the setting (`--memory`, `--cpuunits`, …).
    pub fn validate(&self) -> Result<()> {
        if let Some(Size::Bytes(b)) = self.memory
            && b < MEMORY_MIN
        {
            return Err(invalid(
                "memory",
                Size::Bytes(b),
                "must be at least 1M (or unlimited)",
            ));
        }
        if let Some(u) = self.cpuunits
            && !(CPUUNITS_MIN..=CPUUNITS_MAX).contains(&u)
        {
            return Err(invalid(
                "cpuunits",
                u,
                format!(
                    "must be from {CPUUNITS_MIN} to {CPUUNITS_MAX} (default {CPUUNITS_DEFAULT})"
                ),
            ));
        }
        if let Some(l) = self.cpulimit
            && u64::from(l) > 100 * u64::from(CPUS_MAX)
        {
            return Err(invalid(
                "cpulimit",
                l,
                format!(
                    "must be a percentage of one CPU from 0 (unlimited) to {}",
                    100 * u64::from(CPUS_MAX)
                ),
            ));
        }
        if let Some(c) = self.cpus
            && c > CPUS_MAX
        {
            return Err(invalid(
                "cpus",
                c,
                format!("must be a CPU count from 0 (unlimited) to {CPUS_MAX}"),
            ));
        }
        if let Some(n) = self.numproc
            && n > NUMPROC_MAX
        {
            return Err(invalid(
                "numproc",
                n,
                format!("must be from 0 (unlimited) to {NUMPROC_MAX} (the kernel's PID limit)"),
            ));
        }
        if let Some(w) = self.ioweight
            && !(IOWEIGHT_MIN..=IOWEIGHT_MAX).contains(&w)
        {
            return Err(invalid(
                "ioweight",
                w,
                format!("must be from {IOWEIGHT_MIN} to {IOWEIGHT_MAX} (100 = default share)"),
            ));
        }
        Ok(())
    }

    /// True when the CFS quota has to be (re)written.
    pub(crate) fn touches_quota(&self) -> bool {
        self.cpulimit.is_some() || self.cpus.is_some()
    }

    /// The CFS quota in µs per [`CFS_PERIOD_US`], `None` = unlimited. See the type docs for the rule.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        let from_limit = self
            .cpulimit
            .filter(|&l| l > 0)
            .map(|l| u64::from(l) * CFS_PERIOD_US / 100);
        let from_cpus = self
            .cpus
            .filter(|&c| c > 0)
            .map(|c| u64::from(c) * CFS_PERIOD_US);
        match (from_limit, from_cpus) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// cpuunits → v1 cpu.shares: 1000 → 1024 (both defaults), linear, clamped to the kernel range.
pub fn cpuunits_to_shares(units: u64) -> u64 {
    (units.saturating_mul(1024) / 1000).clamp(SHARES_MIN, SHARES_MAX)
}

/// cpuunits → v2 cpu.weight: 1000 → 100 (both defaults), linear (rounded), clamped to 1..=10000.
/// Linear keeps the ratios between CTs exact for 10..=100000 units, which covers real configs.
pub fn cpuunits_to_weight(units: u64) -> u64 {
    (units.saturating_add(5) / 10).clamp(WEIGHT_MIN, WEIGHT_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_accepts_defaults_and_edges() {
        Resources::default().validate().unwrap();
        Resources {
            memory: Some(Size::Bytes(MEMORY_MIN)),
            swap: Some(Size::Bytes(0)),
            cpuunits: Some(8),
            cpulimit: Some(0),
            cpus: Some(0),
            numproc: Some(0),
            ioweight: Some(10),
        }
        .validate()
        .unwrap();
        Resources {
            memory: Some(Size::Unlimited),
            swap: Some(Size::Unlimited),
            cpuunits: Some(500_000),
            cpulimit: Some(819_200),
            cpus: Some(8192),
            numproc: Some(NUMPROC_MAX),
            ioweight: Some(1000),
        }
        .validate()
        .unwrap();
    }

    fn err_of(r: Resources) -> String {
        r.validate().unwrap_err().to_string()
    }

    #[test]
    fn validate_names_the_flag() {
        let e = err_of(Resources {
            memory: Some(Size::Bytes(4096)),
            ..Default::default()
        });
        assert_eq!(e, "invalid --memory 4K: must be at least 1M (or unlimited)");
        let e = err_of(Resources {
            cpuunits: Some(7),
            ..Default::default()
        });
        assert_eq!(
            e,
            "invalid --cpuunits 7: must be from 8 to 500000 (default 1000)"
        );
        assert!(
            err_of(Resources {
                cpuunits: Some(500_001),
                ..Default::default()
            })
            .starts_with("invalid --cpuunits 500001:")
        );
        assert!(
            err_of(Resources {
                cpulimit: Some(819_201),
                ..Default::default()
            })
            .starts_with("invalid --cpulimit 819201:")
        );
        assert!(
            err_of(Resources {
                cpus: Some(8193),
                ..Default::default()
            })
            .starts_with("invalid --cpus 8193:")
        );
        assert!(
            err_of(Resources {
                numproc: Some(NUMPROC_MAX + 1),
                ..Default::default()
            })
            .starts_with("invalid --numproc 4194305:")
        );
        assert_eq!(
            err_of(Resources {
                ioweight: Some(5),
                ..Default::default()
            }),
            "invalid --ioweight 5: must be from 10 to 1000 (100 = default share)"
        );
    }

    #[test]
    fn cpu_mappings() {
        assert_eq!(cpuunits_to_shares(1000), 1024);
        assert_eq!(cpuunits_to_shares(8), 8);
        assert_eq!(cpuunits_to_shares(500), 512);
        assert_eq!(cpuunits_to_shares(500_000), 262_144);
        assert_eq!(cpuunits_to_weight(1000), 100);
        assert_eq!(cpuunits_to_weight(8), 1);
        assert_eq!(cpuunits_to_weight(250), 25);
        assert_eq!(cpuunits_to_weight(100_000), 10_000);
        assert_eq!(cpuunits_to_weight(500_000), 10_000);
    }

    #[test]
    fn quota_combines_cpulimit_and_cpus() {
        let q = |cpulimit, cpus| {
            Resources {
                cpulimit,
                cpus,
                ..Default::default()
            }
            .cpu_quota_us()
        };
        assert_eq!(q(None, None), None);
        assert_eq!(q(Some(0), Some(0)), None);
        assert_eq!(q(Some(50), None), Some(50_000));
        assert_eq!(q(None, Some(2)), Some(200_000));
        assert_eq!(q(Some(150), Some(1)), Some(100_000));
        assert_eq!(q(Some(150), Some(2)), Some(150_000));
        assert_eq!(q(Some(0), Some(1)), Some(100_000));
        assert_eq!(q(Some(1), None), Some(1_000));
    }
}
