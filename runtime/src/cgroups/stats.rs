//! Counters read from a CT's cgroup, and parsers for the kernel's stat file formats.

use std::collections::HashMap;

use serde::Serialize;

/// A snapshot of a CT's cgroup counters. Fields a hierarchy does not provide stay 0 / `None`.
/// Limits are `None` when unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Tasks (processes + threads) in the CT: `pids.current`.
    pub numproc: u64,
    pub numproc_limit: Option<u64>,
    /// Forks refused because of `pids.max` (`pids.events` max).
    pub numproc_failcnt: u64,
    /// Most tasks at once since the cgroup was made: `pids.peak` (kernels that have it).
    pub numproc_peak: Option<u64>,
    /// Bytes charged: v1 `memory.usage_in_bytes`, v2 `memory.current`.
    pub memory_usage: u64,
    pub memory_limit: Option<u64>,
    /// Most bytes charged at once: v1 `memory.max_usage_in_bytes`, v2 `memory.peak`.
    pub memory_peak: Option<u64>,
    /// Where reclaim starts (OpenVZ's barrier): v1 `memory.soft_limit_in_bytes`, v2
    /// `memory.high`; `None` when unset.
    pub memory_barrier: Option<u64>,
    /// Times usage hit the limit: v1 `memory.failcnt` + `memory.memsw.failcnt`, v2 `memory.events`
    /// max. Kernel 6.18 leaves memsw.failcnt at 0 even when memsw refuses charges (measured), so
    /// a v1 CT held by its swap limit shows no failures there; `oom_kills` still counts.
    pub memory_failcnt: u64,
    /// usage − inactive_file, as cAdvisor computes `container_memory_working_set_bytes`.
    pub memory_working_set: u64,
    /// Page cache: v1 `total_cache`, v2 `file`.
    pub memory_cache: u64,
    /// Anonymous memory: v1 `total_rss`, v2 `anon`.
    pub memory_rss: u64,
    /// Swap in use: v1 memsw usage − memory usage, v2 `memory.swap.current`.
    pub swap_usage: u64,
    /// Swap allowed on top of RAM: v1 memsw limit − memory limit, v2 `memory.swap.max`.
    pub swap_limit: Option<u64>,
    /// Most swap in use at once: v1 memsw peak − memory peak (an estimate: the two peaks
    /// need not coincide), v2 `memory.swap.peak`.
    pub swap_peak: Option<u64>,
    /// Processes killed by the OOM killer inside the CT.
    pub oom_kills: u64,
    pub cpu_usage_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    /// CFS bandwidth periods elapsed / throttled, and the time spent throttled.
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
    pub cpu_quota_us: Option<i64>,
    pub cpu_period_us: u64,
    pub blkio_read_bytes: u64,
    pub blkio_write_bytes: u64,
    pub blkio_read_ios: u64,
    pub blkio_write_ios: u64,
    pub frozen: bool,
}

/// `key value` lines (memory.stat, cpu.stat, memory.events, pids.events, oom_control).
/// Lines that are not `word number` are skipped: kernels add fields over time.
pub(crate) fn flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k, v))
        })
        .collect()
}

/// Byte/op totals over all devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct IoTotals {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ios: u64,
    pub write_ios: u64,
}

/// v1 `blkio.*io_service_bytes*` / `*io_serviced*`: `MAJ:MIN Read N` lines plus a `Total N` line.
/// Returns (read, write) summed over devices.
pub(crate) fn blkio_v1_read_write(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let [_dev, op, n] = f[..]
            && let Ok(n) = n.parse::<u64>()
        {
            match op {
                "Read" => r = r.saturating_add(n),
                "Write" => w = w.saturating_add(n),
                _ => {}
            }
        }
    }
    (r, w)
}

/// v2 `io.stat`: `MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N`, summed over devices.
pub(crate) fn io_stat_v2(text: &str) -> IoTotals {
    let mut t = IoTotals::default();
    for l in text.lines() {
        for kv in l.split_whitespace().skip(1) {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse::<u64>() else { continue };
            let slot = match k {
                "rbytes" => &mut t.read_bytes,
                "wbytes" => &mut t.write_bytes,
                "rios" => &mut t.read_ios,
                "wios" => &mut t.write_ios,
                _ => continue,
            };
            *slot = slot.saturating_add(v);
        }
    }
    t
}

/// v1 reports "no limit" as PAGE_COUNTER_MAX × page size (9223372036854771712 with 4K pages);
/// anything from 2^62 up is treated as unlimited, whatever the page size.
pub(crate) fn v1_limit(v: u64) -> Option<u64> {
    (v < 1 << 62).then_some(v)
}

/// v2 limits: a number or `max`. `None` = max, `Some(Err)` for garbage is reported by the caller.
pub(crate) fn v2_limit(s: &str) -> Result<Option<u64>, ()> {
    match s.trim() {
        "max" => Ok(None),
        n => n.parse().map(Some).map_err(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_keyed() {
        let m = flat_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\nbogus\nx y\n");
        assert_eq!(m.get("oom_kill"), Some(&3));
        assert_eq!(m.get("under_oom"), Some(&0));
        assert_eq!(m.get("x"), None);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn parses_blkio_v1() {
        let t = "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n8:0 Discard 0\n\
                 8:0 Total 12288\n8:16 Read 1\n8:16 Write 2\nTotal 12291\n";
        assert_eq!(blkio_v1_read_write(t), (4097, 8194));
        assert_eq!(blkio_v1_read_write("Total 0\n"), (0, 0));
    }

    #[test]
    fn parses_io_stat_v2() {
        let t = "8:0 rbytes=1000 wbytes=2000 rios=3 wios=4 dbytes=0 dios=0\n\
                 253:1 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n";
        assert_eq!(
            io_stat_v2(t),
            IoTotals {
                read_bytes: 1010,
                write_bytes: 2020,
                read_ios: 4,
                write_ios: 6
            }
        );
        assert_eq!(io_stat_v2(""), IoTotals::default());
    }

    #[test]
    fn limits() {
        assert_eq!(v1_limit(9_223_372_036_854_771_712), None);
        assert_eq!(v1_limit(1 << 30), Some(1 << 30));
        assert_eq!(v2_limit("max\n"), Ok(None));
        assert_eq!(v2_limit("4096\n"), Ok(Some(4096)));
        assert_eq!(v2_limit("x"), Err(()));
    }
}
