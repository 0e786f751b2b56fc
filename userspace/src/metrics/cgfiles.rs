//! A scrape-time reader of CT cgroup counters that keeps each CT's counter files open and
//! re-reads them with `pread` at offset 0.
//!
//! Why not `Cgroup::stats()`: it resolves a path, checks sizes and tests 8 directories per
//! CT, ~170 syscalls per CT and scrape; with 1000 CTs that was 230 ms per scrape. A kept-open
//! cgroup file costs one `pread` (kernfs regenerates a seq_file from its first record when
//! the position is 0), so a CT costs ~25 syscalls here (counters, `cgroup.procs` and the
//! walk for child cgroups).
//!
//! Kernel memory: every open cgroup file pins a `kernfs_open_file` plus its seq_file buffer,
//! ~4.6 KB (kernel 6.18). Only the counter files, which change between scrapes, stay open
//! (16 on v1, 10 on v2: ~74 MB at 1000 v1 CTs). Limits change only on `berth set` and are
//! re-read (open, read, close) when older than [`LIMITS_MAX_AGE`], so a changed limit shows
//! within that time; at scrape intervals above it they are read at every scrape.
//!
//! Invalidation: once a cgroup directory is removed its kernfs nodes are deactivated and a
//! read through an old descriptor fails with ENODEV, so a read error drops the CT's files
//! and they are opened again by path once (a CT restarted between two scrapes has a new
//! cgroup with the same path). A file missing when the CT's files are opened (no swap
//! accounting, controller not enabled) stays missing until they are opened again.

use std::{
    fs::{self, File},
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use berth_runtime::cgroups::{Cgroup, Controller, Stats};

/// How long limits read from the cgroup are reused.
pub const LIMITS_MAX_AGE: Duration = Duration::from_secs(10);

/// First size of the read buffer; it grows when a file fills it.
const BUF_START: usize = 64 * 1024;

/// The counter files kept open, per hierarchy version. Index = position in these lists.
const V1_COUNTERS: [(Controller, &str); 16] = [
    (Controller::Pids, "pids.current"),
    (Controller::Pids, "pids.events"),
    (Controller::Memory, "memory.usage_in_bytes"),
    (Controller::Memory, "memory.failcnt"),
    (Controller::Memory, "memory.memsw.failcnt"),
    (Controller::Memory, "memory.oom_control"),
    (Controller::Memory, "memory.stat"),
    (Controller::Memory, "memory.memsw.usage_in_bytes"),
    (Controller::Cpuacct, "cpuacct.usage"),
    (Controller::Cpuacct, "cpuacct.usage_user"),
    (Controller::Cpuacct, "cpuacct.usage_sys"),
    (Controller::Cpu, "cpu.stat"),
    (
        Controller::Blkio,
        "blkio.throttle.io_service_bytes_recursive",
    ),
    (Controller::Blkio, "blkio.throttle.io_serviced_recursive"),
    (Controller::Freezer, "freezer.state"),
    (Controller::Pids, "cgroup.procs"),
];
const V1_LIMITS: [(Controller, &str); 5] = [
    (Controller::Pids, "pids.max"),
    (Controller::Memory, "memory.limit_in_bytes"),
    (Controller::Memory, "memory.memsw.limit_in_bytes"),
    (Controller::Cpu, "cpu.cfs_quota_us"),
    (Controller::Cpu, "cpu.cfs_period_us"),
];
const V2_COUNTERS: [&str; 10] = [
    "pids.current",
    "pids.events",
    "memory.current",
    "memory.events",
    "memory.stat",
    "memory.swap.current",
    "cpu.stat",
    "io.stat",
    "cgroup.events",
    "cgroup.procs",
];
const V2_LIMITS: [&str; 4] = ["pids.max", "memory.max", "memory.swap.max", "cpu.max"];

/// One counter file: its path (for errors and reopening) and the descriptor, `None` when the
/// cgroup has no such file.
#[derive(Debug)]
struct Counter {
    path: PathBuf,
    file: Option<File>,
}

/// Limits as exported; `None` = unlimited or not provided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Limits {
    numproc: Option<u64>,
    memory: Option<u64>,
    /// v1: memory + swap (memsw) raw; v2: swap alone.
    swap: Option<u64>,
    cpu_quota_us: Option<i64>,
    cpu_period_us: u64,
}

/// One CT's open counter files and cached limits.
#[derive(Debug)]
pub struct CtFiles {
    v2: bool,
    counters: Vec<Counter>,
    /// Paths of the limit files.
    limit_paths: Vec<PathBuf>,
    limits: Limits,
    limits_at: Instant,
    /// The directory whose `cgroup.procs` tree counts the CT's processes, kept open for its
    /// link count.
    procs_dir: Option<(PathBuf, File)>,
}

/// The reused read buffer of one worker.
#[derive(Debug)]
pub struct Buf(Vec<u8>);

impl Default for Buf {
    fn default() -> Self {
        Self(vec![0; BUF_START])
    }
}

impl Buf {
    /// The whole content of a kept-open file, read from offset 0.
    ///
    /// seq_file hands out a single-record file (every counter file) in one read when it fits
    /// the buffer, so a read shorter than the buffer is the whole file. Multi-record files
    /// (`cgroup.procs`) stop at seq_file's internal page, so `multi` reads to EOF.
    fn read_all(&mut self, f: &File, multi: bool) -> io::Result<&str> {
        let mut len = 0;
        loop {
            if len == self.0.len() {
                self.0.resize(self.0.len() * 2, 0);
            }
            let n = f.read_at(&mut self.0[len..], len as u64)?;
            len += n;
            if n == 0 || (!multi && len < self.0.len()) {
                break;
            }
        }
        std::str::from_utf8(&self.0[..len])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

fn open_opt(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_opt(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn err_at(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

fn parse_num<T: std::str::FromStr>(path: &Path, text: &str) -> Result<T, String> {
    text.trim()
        .parse()
        .map_err(|_| err_at(path, format_args!("not a number: {:?}", text.trim())))
}

/// The value of `key` in a `key value` file; 0 when absent (kernels add and drop fields).
/// A substring search for the key rather than splitting every line: v1 `memory.stat` has ~70
/// lines of which three are wanted.
fn keyed(text: &str, key: &str) -> u64 {
    let b = text.as_bytes();
    let mut from = 0;
    while let Some(i) = text[from..].find(key) {
        let at = from + i;
        let end = at + key.len();
        if (at == 0 || b[at - 1] == b'\n') && b.get(end) == Some(&b' ') {
            let value = text[end + 1..].split('\n').next().unwrap_or("");
            return value.trim().parse().unwrap_or(0);
        }
        from = end;
    }
    0
}

/// v1 blkio `MAJ:MIN Read N` lines summed over devices: (read, write).
fn blkio_v1(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for l in text.lines() {
        let mut it = l.split_whitespace();
        let (Some(_dev), Some(op), Some(n), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match op {
            "Read" => r = r.saturating_add(n),
            "Write" => w = w.saturating_add(n),
            _ => {}
        }
    }
    (r, w)
}

/// v2 `io.stat` summed over devices: (rbytes, wbytes, rios, wios).
fn io_stat(text: &str) -> [u64; 4] {
    let mut t = [0u64; 4];
    for kv in text.lines().flat_map(|l| l.split_whitespace().skip(1)) {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let i = match k {
            "rbytes" => 0,
            "wbytes" => 1,
            "rios" => 2,
            "wios" => 3,
            _ => continue,
        };
        if let Ok(v) = v.parse::<u64>() {
            t[i] = t[i].saturating_add(v);
        }
    }
    t
}

/// v1 "no limit" is PAGE_COUNTER_MAX × page size; anything from 2^62 is unlimited.
fn v1_limit(v: u64) -> Option<u64> {
    (v < 1 << 62).then_some(v)
}

fn v2_limit(path: &Path, text: &str) -> Result<Option<u64>, String> {
    match text.trim() {
        "max" => Ok(None),
        _ => parse_num(path, text).map(Some),
    }
}

impl CtFiles {
    /// Opens the counter files of `cg`. `None` when the hierarchy is one this reader does not
    /// handle (v1 without the pids controller), which the caller reads the slow way.
    pub fn open(cg: &Cgroup) -> Result<Option<Self>, String> {
        let (v2, counters, limit_paths, procs_dir) = match cg {
            Cgroup::V1(v1) => {
                let Some(pids) = v1.dir(Controller::Pids) else {
                    return Ok(None);
                };
                let at = |(c, f): &(Controller, &str)| v1.dir(*c).map(|d| d.join(f));
                let counters = V1_COUNTERS.iter().map(at).collect::<Vec<_>>();
                let limits = V1_LIMITS.iter().map(at).collect::<Vec<_>>();
                (false, counters, limits, Some(pids))
            }
            Cgroup::V2(v2) => {
                let d = v2.dir();
                let counters = V2_COUNTERS.iter().map(|f| Some(d.join(f))).collect();
                let limits = V2_LIMITS.iter().map(|f| Some(d.join(f))).collect();
                (true, counters, limits, Some(d))
            }
        };
        let counters = counters
            .into_iter()
            .map(|p| {
                // A controller the host does not mount: an empty path that never opens.
                let path = p.unwrap_or_default();
                let file = if path.as_os_str().is_empty() {
                    None
                } else {
                    open_opt(&path).map_err(|e| err_at(&path, e))?
                };
                Ok(Counter { path, file })
            })
            .collect::<Result<Vec<_>, String>>()?;
        // The CT's own directory must exist: `cgroup.procs` is in every cgroup.
        let procs = counters.last().expect("cgroup.procs is listed");
        if procs.file.is_none() {
            return Err(err_at(&procs.path, "no such cgroup"));
        }
        let limit_paths = limit_paths
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        let procs_dir = match procs_dir {
            Some(d) => {
                let f = File::open(&d).map_err(|e| err_at(&d, e))?;
                Some((d, f))
            }
            None => None,
        };
        let mut me = Self {
            v2,
            counters,
            limit_paths,
            limits: Limits::default(),
            limits_at: Instant::now(),
            procs_dir,
        };
        me.limits = me.read_limits()?;
        Ok(Some(me))
    }

    fn read_limits(&self) -> Result<Limits, String> {
        let read = |i: usize| -> Result<Option<String>, String> {
            let p: &Path = &self.limit_paths[i];
            if p.as_os_str().is_empty() {
                return Ok(None);
            }
            read_opt(p).map_err(|e| err_at(p, e))
        };
        let p = |i: usize| -> &Path { &self.limit_paths[i] };
        let mut l = Limits::default();
        if self.v2 {
            if let Some(t) = read(0)? {
                l.numproc = v2_limit(p(0), &t)?;
            }
            if let Some(t) = read(1)? {
                l.memory = v2_limit(p(1), &t)?;
            }
            if let Some(t) = read(2)? {
                l.swap = v2_limit(p(2), &t)?;
            }
            if let Some(t) = read(3)? {
                let mut it = t.split_whitespace();
                let (quota, period) = (it.next().unwrap_or("max"), it.next().unwrap_or("0"));
                l.cpu_quota_us = match quota {
                    "max" => None,
                    q => Some(parse_num(p(3), q)?),
                };
                l.cpu_period_us = parse_num(p(3), period)?;
            }
        } else {
            if let Some(t) = read(0)?
                && t.trim() != "max"
            {
                l.numproc = Some(parse_num(p(0), &t)?);
            }
            if let Some(t) = read(1)? {
                l.memory = v1_limit(parse_num(p(1), &t)?);
            }
            // Raw memsw limit; the swap share is computed against the memory limit.
            if let Some(t) = read(2)? {
                l.swap = Some(parse_num(p(2), &t)?);
            }
            if let Some(t) = read(3)? {
                let q: i64 = parse_num(p(3), &t)?;
                l.cpu_quota_us = (q >= 0).then_some(q);
            }
            if let Some(t) = read(4)? {
                l.cpu_period_us = parse_num(p(4), &t)?;
            }
        }
        Ok(l)
    }

    /// Reads every counter. An error means the cgroup is gone or was replaced. The freeze
    /// state only tells a running CT's state (suspended or not), so it is read only when
    /// `running`; otherwise `frozen` stays false.
    pub fn read(&mut self, buf: &mut Buf, running: bool) -> Result<(Stats, u64), String> {
        if self.limits_at.elapsed() >= LIMITS_MAX_AGE {
            self.limits = self.read_limits()?;
            self.limits_at = Instant::now();
        }
        let mut s = Stats::default();
        let processes = self.processes(buf)?;
        if self.v2 {
            self.read_v2(buf, &mut s, processes)?;
        } else {
            self.read_v1(buf, &mut s)?;
        }
        let (i, frozen): (usize, fn(&str) -> bool) = if self.v2 {
            (8, |t| keyed(t, "frozen") == 1)
        } else {
            (14, |t| t.trim() == "FROZEN")
        };
        if running {
            s.frozen = self.with(buf, i, |_, t| Ok(frozen(t)))?.unwrap_or(false);
        }
        Ok((s, processes))
    }

    /// Runs `f` on counter `i`'s content, if the cgroup has that file.
    fn with<T>(
        &self,
        buf: &mut Buf,
        i: usize,
        f: impl FnOnce(&Path, &str) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        let c = &self.counters[i];
        let Some(file) = &c.file else { return Ok(None) };
        let text = buf.read_all(file, false).map_err(|e| err_at(&c.path, e))?;
        f(&c.path, text).map(Some)
    }

    fn read_v1(&self, buf: &mut Buf, s: &mut Stats) -> Result<(), String> {
        let num = |p: &Path, t: &str| parse_num::<u64>(p, t);
        let l = self.limits;
        s.numproc = self.with(buf, 0, num)?.unwrap_or(0);
        s.numproc_limit = l.numproc;
        s.numproc_failcnt = self.with(buf, 1, |_, t| Ok(keyed(t, "max")))?.unwrap_or(0);
        s.memory_usage = self.with(buf, 2, num)?.unwrap_or(0);
        s.memory_limit = l.memory;
        // A failed charge is counted once, at the counter that refused it (memsw or memory).
        s.memory_failcnt =
            self.with(buf, 3, num)?.unwrap_or(0) + self.with(buf, 4, num)?.unwrap_or(0);
        s.oom_kills = self
            .with(buf, 5, |_, t| Ok(keyed(t, "oom_kill")))?
            .unwrap_or(0);
        let usage = s.memory_usage;
        if let Some((cache, rss, ws)) = self.with(buf, 6, |_, t| {
            Ok((
                keyed(t, "total_cache"),
                keyed(t, "total_rss"),
                usage.saturating_sub(keyed(t, "total_inactive_file")),
            ))
        })? {
            (s.memory_cache, s.memory_rss, s.memory_working_set) = (cache, rss, ws);
        }
        if let Some(memsw) = self.with(buf, 7, num)? {
            s.swap_usage = memsw.saturating_sub(usage);
        }
        if let (Some(sw), Some(m)) = (l.swap, l.memory) {
            s.swap_limit = v1_limit(sw).map(|sw| sw.saturating_sub(m));
        }
        s.cpu_usage_ns = self.with(buf, 8, num)?.unwrap_or(0);
        s.cpu_user_ns = self.with(buf, 9, num)?.unwrap_or(0);
        s.cpu_system_ns = self.with(buf, 10, num)?.unwrap_or(0);
        if let Some((p, t, ns)) = self.with(buf, 11, |_, t| {
            Ok((
                keyed(t, "nr_periods"),
                keyed(t, "nr_throttled"),
                keyed(t, "throttled_time"),
            ))
        })? {
            (s.nr_periods, s.nr_throttled, s.throttled_ns) = (p, t, ns);
        }
        s.cpu_quota_us = l.cpu_quota_us;
        s.cpu_period_us = l.cpu_period_us;
        if let Some(rw) = self.with(buf, 12, |_, t| Ok(blkio_v1(t)))? {
            (s.blkio_read_bytes, s.blkio_write_bytes) = rw;
        }
        if let Some(rw) = self.with(buf, 13, |_, t| Ok(blkio_v1(t)))? {
            (s.blkio_read_ios, s.blkio_write_ios) = rw;
        }
        Ok(())
    }

    fn read_v2(&self, buf: &mut Buf, s: &mut Stats, processes: u64) -> Result<(), String> {
        let num = |p: &Path, t: &str| parse_num::<u64>(p, t);
        let l = self.limits;
        // Without the pids controller the count of thread groups stands in, as in
        // `Cgroup::stats`.
        s.numproc = self.with(buf, 0, num)?.unwrap_or(processes);
        s.numproc_limit = l.numproc;
        s.numproc_failcnt = self.with(buf, 1, |_, t| Ok(keyed(t, "max")))?.unwrap_or(0);
        s.memory_usage = self.with(buf, 2, num)?.unwrap_or(0);
        s.memory_limit = l.memory;
        if let Some((f, o)) =
            self.with(buf, 3, |_, t| Ok((keyed(t, "max"), keyed(t, "oom_kill"))))?
        {
            (s.memory_failcnt, s.oom_kills) = (f, o);
        }
        let usage = s.memory_usage;
        if let Some((cache, rss, ws)) = self.with(buf, 4, |_, t| {
            Ok((
                keyed(t, "file"),
                keyed(t, "anon"),
                usage.saturating_sub(keyed(t, "inactive_file")),
            ))
        })? {
            (s.memory_cache, s.memory_rss, s.memory_working_set) = (cache, rss, ws);
        }
        s.swap_usage = self.with(buf, 5, num)?.unwrap_or(0);
        s.swap_limit = l.swap;
        if let Some(v) = self.with(buf, 6, |_, t| {
            let us = |k| keyed(t, k).saturating_mul(1000);
            Ok([
                us("usage_usec"),
                us("user_usec"),
                us("system_usec"),
                us("throttled_usec"),
                keyed(t, "nr_periods"),
                keyed(t, "nr_throttled"),
            ])
        })? {
            [
                s.cpu_usage_ns,
                s.cpu_user_ns,
                s.cpu_system_ns,
                s.throttled_ns,
                s.nr_periods,
                s.nr_throttled,
            ] = v;
        }
        s.cpu_quota_us = l.cpu_quota_us;
        s.cpu_period_us = l.cpu_period_us;
        if let Some(t) = self.with(buf, 7, |_, t| Ok(io_stat(t)))? {
            [
                s.blkio_read_bytes,
                s.blkio_write_bytes,
                s.blkio_read_ios,
                s.blkio_write_ios,
            ] = t;
        }
        Ok(())
    }

    /// Thread groups in the CT: lines of the kept-open `cgroup.procs`, plus those of the
    /// cgroups below (a CT running systemd makes its own; they come and go, so they are
    /// read by path).
    fn processes(&self, buf: &mut Buf) -> Result<u64, String> {
        let c = self.counters.last().expect("cgroup.procs is listed");
        let Some(file) = &c.file else { return Ok(0) };
        let text = buf.read_all(file, true).map_err(|e| err_at(&c.path, e))?;
        let mut n = text.lines().filter(|l| !l.is_empty()).count() as u64;
        if let Some((dir, f)) = &self.procs_dir {
            // kernfs gives a directory 2 + its subdirectories as link count, refreshed at
            // every stat: one fstat instead of listing the directory when, as usually, the
            // CT made no cgroups of its own.
            let links = f.metadata().map_err(|e| err_at(dir, e))?.nlink();
            if links > 2 {
                n += count_procs_below(dir).map_err(|e| err_at(dir, e))?;
            }
        }
        Ok(n)
    }
}

/// Lines of `cgroup.procs` in the cgroups below `dir`. A cgroup removed while walking
/// counts as empty.
fn count_procs_below(dir: &Path) -> io::Result<u64> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let sub = entry.path();
        n += match fs::read_to_string(sub.join("cgroup.procs")) {
            Ok(s) => s.lines().filter(|l| !l.is_empty()).count() as u64,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        n += count_procs_below(&sub)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_what_is_exported() {
        assert_eq!(
            keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"),
            3
        );
        assert_eq!(keyed("bogus\nx y\n", "x"), 0);
        let stat = "cache 1\nrss 2\nrss_huge 3\ntotal_cache 10\ntotal_rss_huge 30\n\
                    total_rss 20\ntotal_inactive_file 5";
        assert_eq!(keyed(stat, "total_cache"), 10);
        assert_eq!(keyed(stat, "total_rss"), 20);
        assert_eq!(keyed(stat, "rss"), 2);
        assert_eq!(keyed(stat, "total_inactive_file"), 5);
        assert_eq!(keyed(stat, "cache"), 1);
        assert_eq!(keyed("file_mapped 7\nfile 9\n", "file"), 9);
        let t = "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Total 12288\n8:16 Read 1\n\
                 8:16 Write 2\nTotal 12291\n";
        assert_eq!(blkio_v1(t), (4097, 8194));
        let t = "8:0 rbytes=1000 wbytes=2000 rios=3 wios=4 dbytes=0 dios=0\n\
                 253:1 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n";
        assert_eq!(io_stat(t), [1010, 2020, 4, 6]);
        assert_eq!(v1_limit(9_223_372_036_854_771_712), None);
        assert_eq!(v2_limit(Path::new("x"), "max\n"), Ok(None));
        assert!(v2_limit(Path::new("x"), "garbage").is_err());
    }

    /// Real kernel: a recreated cgroup (a CT restart) makes the old descriptors fail, so the
    /// caller opens the files again; limits come from the new cgroup.
    #[test]
    fn recreated_cgroup_fails_old_descriptors() {
        use berth_runtime::{
            Ctid,
            cgroups::{CgroupManager, Hierarchy},
        };
        let hierarchy = Hierarchy::detect().unwrap();
        let parent = format!("berth-cgfiles-{}", std::process::id());
        let cg = hierarchy.open(&parent, Ctid::new(4242).unwrap()).unwrap();
        cg.create().unwrap();
        let mut buf = Buf::default();
        let mut files = CtFiles::open(&cg)
            .unwrap()
            .expect("pids controller present");
        let (stats, procs) = files.read(&mut buf, true).unwrap();
        assert_eq!((stats.numproc, procs), (0, 0));
        cg.destroy().unwrap();
        cg.create().unwrap();
        let err = files.read(&mut buf, true).unwrap_err();
        let mut again = CtFiles::open(&cg).unwrap().unwrap();
        assert!(
            again.read(&mut buf, true).is_ok(),
            "old files failed with {err}"
        );
        cg.destroy().unwrap();
        hierarchy.remove_parent_if_empty(&parent).unwrap();
        assert!(hierarchy.list_ctids(&parent).unwrap().is_empty());
    }

    #[test]
    fn reads_whole_files_through_a_reused_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let big = "1\n".repeat(BUF_START);
        fs::write(&p, &big).unwrap();
        let f = File::open(&p).unwrap();
        let mut buf = Buf::default();
        assert_eq!(buf.read_all(&f, false).unwrap().len(), big.len());
        fs::write(dir.path().join("g"), "42\n").unwrap();
        let g = File::open(dir.path().join("g")).unwrap();
        assert_eq!(buf.read_all(&g, true).unwrap(), "42\n");
    }
}
