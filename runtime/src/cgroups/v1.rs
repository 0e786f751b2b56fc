//! cgroup v1: one directory per controller hierarchy, `<mount>/<parent>/<ctid>` in each.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::delegate::{CtCgroupMount, CtCgroupView, DELEGATED_V1, chown_delegated, mount_name};
use super::error::{CgroupError, Result};
use super::hierarchy::{Controller, V1Mounts};
use super::resources::{CFS_PERIOD_US, Resources, cpuunits_to_shares};
use super::stats::{Stats, blkio_v1_read_write, flat_keyed, v1_limit};
use super::{ALLOWED_DEVICES, CgroupManager, FREEZE_TIMEOUT, FileWrite, fsops};
use crate::ctid::Ctid;
use crate::error_chain::ErrorChain;
use crate::size::Size;

const MEM_LIMIT: &str = "memory.limit_in_bytes";
const MEMSW_LIMIT: &str = "memory.memsw.limit_in_bytes";
/// Weight files in preference order: CFQ's (kernels < 5.0) and BFQ's. Every existing one is written.
const BLKIO_WEIGHT_FILES: [&str; 2] = ["blkio.weight", "blkio.bfq.weight"];

/// A CT's cgroup on a v1 (or hybrid) host.
#[derive(Clone, Debug)]
pub struct V1Cgroup {
    mounts: V1Mounts,
    parent: Vec<String>,
    ctid: Ctid,
}

/// v1 spells "no limit" as -1 for memory and quota files.
fn v1_value(limit: Option<u64>) -> (String, String) {
    match limit {
        Some(b) => (b.to_string(), Size::Bytes(b).to_string()),
        None => ("-1".into(), "unlimited".into()),
    }
}

/// a ≤ b with `None` = unlimited.
fn le(a: Option<u64>, b: Option<u64>) -> bool {
    match (a, b) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(a), Some(b)) => a <= b,
    }
}

/// memory + swap for memsw; unlimited if either is, or if the sum leaves the kernel's range.
fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    a?.checked_add(b?).and_then(v1_limit)
}

impl V1Cgroup {
    /// A CT cgroup under the given controller mounts (from [`super::Hierarchy`], or a fake tree
    /// in tests).
    pub fn with_mounts(mounts: V1Mounts, parent: &str, ctid: Ctid) -> Result<Self> {
        Ok(Self {
            mounts,
            parent: fsops::parent_components(parent)?,
            ctid,
        })
    }

    pub fn ctid(&self) -> Ctid {
        self.ctid
    }

    /// `<mount>/<parent>/<ctid>` for a controller, `None` if the host does not mount it.
    pub fn dir(&self, c: Controller) -> Option<PathBuf> {
        self.mounts.get(c).map(|m| self.under(m))
    }

    /// `<name=systemd mount>/<parent>/<ctid>`, the cgroup delegated to an unprivileged CT.
    pub fn systemd_dir(&self) -> Option<PathBuf> {
        self.mounts.systemd().map(|m| self.under(m))
    }

    fn under(&self, mount: &Path) -> PathBuf {
        let mut p = mount.to_path_buf();
        p.extend(&self.parent);
        p.push(self.ctid.to_string());
        p
    }

    /// Each distinct directory once (co-mounted controllers share one).
    fn unique_dirs(&self) -> Vec<PathBuf> {
        self.mounts
            .unique_mounts()
            .iter()
            .map(|m| self.under(m))
            .collect()
    }

    /// The directory shown in errors about the cgroup as a whole.
    fn primary_dir(&self) -> PathBuf {
        [Controller::Memory, Controller::Pids, Controller::Cpu]
            .into_iter()
            .find_map(|c| self.dir(c))
            .or_else(|| self.unique_dirs().into_iter().next())
            .unwrap_or_default()
    }

    /// The controller's existing directory, or why it cannot be used.
    fn need(&self, c: Controller, op: &'static str, setting: &str) -> Result<PathBuf> {
        let dir = self.dir(c).ok_or_else(|| CgroupError::Unsupported {
            what: format!("{setting} needs the v1 {c} controller, which this host does not mount"),
        })?;
        if !dir.is_dir() {
            return Err(CgroupError::Missing { op, path: dir });
        }
        Ok(dir)
    }

    /// Everything `apply` would write, in order, after validation and support checks: an error
    /// here means nothing was written.
    pub(crate) fn plan(&self, r: &Resources) -> Result<Vec<FileWrite>> {
        r.validate()?;
        let mut out = Vec::new();
        if r.memory.is_some() || r.swap.is_some() {
            let dir = self.need(Controller::Memory, "apply", "--memory/--swap")?;
            self.plan_memory(&dir, r, &mut out)?;
        }
        if r.cpuunits.is_some() || r.touches_quota() {
            let dir = self.need(Controller::Cpu, "apply", "--cpuunits/--cpulimit/--cpus")?;
            if let Some(u) = r.cpuunits {
                out.push(FileWrite::new(&dir, "cpu.shares", cpuunits_to_shares(u)));
            }
            if r.touches_quota() {
                out.push(FileWrite::new(&dir, "cpu.cfs_period_us", CFS_PERIOD_US));
                let quota = r
                    .cpu_quota_us()
                    .map_or_else(|| "-1".to_string(), |q| q.to_string());
                out.push(FileWrite::new(&dir, "cpu.cfs_quota_us", quota));
            }
        }
        if let Some(n) = r.numproc {
            let dir = self.need(Controller::Pids, "apply", "--numproc")?;
            let v = if n == 0 {
                "max".to_string()
            } else {
                n.to_string()
            };
            out.push(FileWrite::new(&dir, "pids.max", v));
        }
        if let Some(w) = r.ioweight {
            let dir = self.need(Controller::Blkio, "apply", "--ioweight")?;
            let files: Vec<&str> = BLKIO_WEIGHT_FILES
                .into_iter()
                .filter(|f| dir.join(f).exists())
                .collect();
            if files.is_empty() {
                return Err(CgroupError::Unsupported {
                    what: format!(
                        "--ioweight: neither blkio.weight nor blkio.bfq.weight exists in {} \
                         (no weight-aware I/O scheduler: load the bfq module)",
                        dir.display()
                    ),
                });
            }
            out.extend(files.into_iter().map(|f| FileWrite::new(&dir, f, w)));
        }
        Ok(out)
    }

    /// memsw = memory + swap must stay ≥ memory.limit at every moment (the kernel refuses either
    /// write otherwise), so memsw goes first when the new memory limit exceeds the current memsw.
    fn plan_memory(&self, dir: &Path, r: &Resources, out: &mut Vec<FileWrite>) -> Result<()> {
        let has_memsw = dir.join(MEMSW_LIMIT).exists();
        if r.swap.is_some() && !has_memsw {
            return Err(CgroupError::Unsupported {
                what: format!(
                    "--swap: no memsw ({MEMSW_LIMIT} is absent in {}: kernel without swap \
                     accounting, boot with swapaccount=1)",
                    dir.display()
                ),
            });
        }
        let m0 = v1_limit(fsops::read_u64(dir, MEM_LIMIT)?);
        let new_m = r.memory.map_or(m0, Size::bytes);
        let limit_write = r.memory.map(|_| {
            let (v, shown) = v1_value(new_m);
            FileWrite::shown(dir, MEM_LIMIT, v, shown)
        });
        if !has_memsw {
            out.extend(limit_write);
            return Ok(());
        }
        let s0 = v1_limit(fsops::read_u64(dir, MEMSW_LIMIT)?);
        let new_s = match (r.swap, s0, m0) {
            (Some(sw), _, _) => add(new_m, sw.bytes()),
            // Only memory changes: keep the swap amount the CT had (memsw − memory).
            (None, Some(s0), Some(m0)) => add(new_m, Some(s0.saturating_sub(m0))),
            (None, _, _) => None,
        };
        let memsw_write = (r.swap.is_some() || new_s != s0).then(|| {
            let (v, shown) = v1_value(new_s);
            FileWrite::shown(dir, MEMSW_LIMIT, v, shown)
        });
        if le(new_m, s0) {
            out.extend(limit_write);
            out.extend(memsw_write);
        } else {
            out.extend(memsw_write);
            out.extend(limit_write);
        }
        Ok(())
    }

    fn execute(&self, writes: &[FileWrite]) -> Result<()> {
        for w in writes {
            match fsops::try_write(&w.dir, w.file, &w.value) {
                Ok(()) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && (w.file == MEM_LIMIT || w.file == MEMSW_LIMIT) =>
                {
                    let usage_file = if w.file == MEM_LIMIT {
                        "memory.usage_in_bytes"
                    } else {
                        "memory.memsw.usage_in_bytes"
                    };
                    let usage = fsops::read_u64(&w.dir, usage_file)?;
                    return Err(CgroupError::MemoryBelowUsage {
                        file: w.file,
                        path: w.dir.clone(),
                        limit: w.value.parse().map_or(Size::Unlimited, Size::Bytes),
                        usage: Size::Bytes(usage),
                    });
                }
                Err(e) => {
                    return Err(CgroupError::io(
                        format!("write {} = {}", w.file, w.shown),
                        &w.dir,
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// mkdir each level below the mount; cpuset dirs start with empty cpus/mems, in which no task
    /// may run (ENOSPC on join), so each level gets its parent's.
    fn create_in(&self, mount: &Path, cpuset: bool) -> Result<()> {
        let mut cur = mount.to_path_buf();
        let ctid = self.ctid.to_string();
        for comp in self.parent.iter().chain(std::iter::once(&ctid)) {
            let next = cur.join(comp);
            fsops::mkdir(&next)?;
            if cpuset {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if fsops::read(&next, f)?.trim().is_empty() {
                        let from_parent = fsops::read(&cur, f)?;
                        let v = from_parent.trim();
                        if !v.is_empty() {
                            fsops::write(&next, f, v)?;
                        }
                    }
                }
            }
            cur = next;
        }
        Ok(())
    }

    fn freeze_within(&self, timeout: Duration) -> Result<()> {
        let dir = self.need(Controller::Freezer, "freeze", "freeze")?;
        fsops::write(&dir, "freezer.state", "FROZEN")?;
        let frozen = fsops::poll_until(timeout, || {
            Ok(fsops::read(&dir, "freezer.state")?.trim() == "FROZEN")
        })?;
        if frozen {
            return Ok(());
        }
        // Leave the CT running rather than half-frozen.
        fsops::write(&dir, "freezer.state", "THAWED")?;
        Err(CgroupError::Timeout {
            op: "freeze",
            path: dir,
            after: timeout,
            detail:
                "freezer.state stayed FREEZING (a task in uninterruptible sleep?); thawed again"
                    .into(),
        })
    }

    fn read_stats(&self) -> Result<Stats> {
        let mut s = Stats::default();
        match self.dir(Controller::Pids) {
            Some(d) => {
                s.numproc = fsops::read_u64_opt(&d, "pids.current")?.unwrap_or(0);
                s.numproc_limit = match fsops::read_opt(&d, "pids.max")? {
                    Some(v) if v.trim() != "max" => Some(fsops::parse_u64(&d, "pids.max", &v)?),
                    _ => None,
                };
                s.numproc_peak = fsops::read_u64_opt(&d, "pids.peak")?;
                if let Some(ev) = fsops::read_opt(&d, "pids.events")? {
                    s.numproc_failcnt = flat_keyed(&ev).get("max").copied().unwrap_or(0);
                }
            }
            None => s.numproc = self.pids()?.len() as u64,
        }
        if let Some(d) = self.dir(Controller::Memory) {
            s.memory_usage = fsops::read_u64_opt(&d, "memory.usage_in_bytes")?.unwrap_or(0);
            let limit = fsops::read_u64_opt(&d, MEM_LIMIT)?;
            s.memory_limit = limit.and_then(v1_limit);
            s.memory_peak = fsops::read_u64_opt(&d, "memory.max_usage_in_bytes")?;
            s.memory_barrier =
                fsops::read_u64_opt(&d, "memory.soft_limit_in_bytes")?.and_then(v1_limit);
            // A failed charge is counted once, at the counter that refused it: memsw (tried
            // first) or memory. Their sum is "times the CT hit its memory limits".
            s.memory_failcnt = fsops::read_u64_opt(&d, "memory.failcnt")?.unwrap_or(0)
                + fsops::read_u64_opt(&d, "memory.memsw.failcnt")?.unwrap_or(0);
            if let Some(oc) = fsops::read_opt(&d, "memory.oom_control")? {
                s.oom_kills = flat_keyed(&oc).get("oom_kill").copied().unwrap_or(0);
            }
            if let Some(st) = fsops::read_opt(&d, "memory.stat")? {
                let st = flat_keyed(&st);
                let get = |k| st.get(k).copied().unwrap_or(0);
                s.memory_cache = get("total_cache");
                s.memory_rss = get("total_rss");
                s.memory_working_set = s.memory_usage.saturating_sub(get("total_inactive_file"));
            }
            if let Some(memsw) = fsops::read_u64_opt(&d, "memory.memsw.usage_in_bytes")? {
                s.swap_usage = memsw.saturating_sub(s.memory_usage);
            }
            if let (Some(sw), Some(m)) = (
                fsops::read_u64_opt(&d, "memory.memsw.max_usage_in_bytes")?,
                s.memory_peak,
            ) {
                s.swap_peak = Some(sw.saturating_sub(m));
            }
            if let (Some(sw), Some(m)) = (fsops::read_u64_opt(&d, MEMSW_LIMIT)?, s.memory_limit) {
                s.swap_limit = v1_limit(sw).map(|sw| sw.saturating_sub(m));
            }
        }
        if let Some(d) = self.dir(Controller::Cpuacct) {
            s.cpu_usage_ns = fsops::read_u64_opt(&d, "cpuacct.usage")?.unwrap_or(0);
            s.cpu_user_ns = fsops::read_u64_opt(&d, "cpuacct.usage_user")?.unwrap_or(0);
            s.cpu_system_ns = fsops::read_u64_opt(&d, "cpuacct.usage_sys")?.unwrap_or(0);
        }
        if let Some(d) = self.dir(Controller::Cpu) {
            if let Some(st) = fsops::read_opt(&d, "cpu.stat")? {
                let st = flat_keyed(&st);
                let get = |k| st.get(k).copied().unwrap_or(0);
                s.nr_periods = get("nr_periods");
                s.nr_throttled = get("nr_throttled");
                s.throttled_ns = get("throttled_time");
            }
            if let Some(q) = fsops::read_opt(&d, "cpu.cfs_quota_us")? {
                let q = fsops::parse_i64(&d, "cpu.cfs_quota_us", &q)?;
                s.cpu_quota_us = (q >= 0).then_some(q);
            }
            s.cpu_period_us = fsops::read_u64_opt(&d, "cpu.cfs_period_us")?.unwrap_or(0);
        }
        if let Some(d) = self.dir(Controller::Blkio) {
            // The throttle files count all I/O of the cgroup whether or not throttling is set.
            if let Some(t) = fsops::read_opt(&d, "blkio.throttle.io_service_bytes_recursive")? {
                (s.blkio_read_bytes, s.blkio_write_bytes) = blkio_v1_read_write(&t);
            }
            if let Some(t) = fsops::read_opt(&d, "blkio.throttle.io_serviced_recursive")? {
                (s.blkio_read_ios, s.blkio_write_ios) = blkio_v1_read_write(&t);
            }
        }
        if let Some(d) = self.dir(Controller::Freezer) {
            s.frozen = fsops::read_opt(&d, "freezer.state")?.is_some_and(|v| v.trim() == "FROZEN");
        }
        Ok(s)
    }
}

impl CgroupManager for V1Cgroup {
    fn create(&self) -> Result<()> {
        let cpuset_mount = self.mounts.get(Controller::Cpuset);
        for m in self.mounts.unique_mounts() {
            self.create_in(&m, cpuset_mount == Some(m.as_path()))?;
        }
        Ok(())
    }

    fn apply(&self, r: &Resources) -> Result<()> {
        let plan = self.plan(r)?;
        self.execute(&plan)
    }

    /// `tasks`, not `cgroup.procs`: moving only the calling thread ("0" written by a
    /// single-threaded process) skips the global cgroup_threadgroup_rwsem (kernel 5.19,
    /// "cgroup: Optimize single thread migration"), whose write side waits for an RCU grace
    /// period — 10-14 ms per start on this 6.18 host with cgroup.procs.
    fn join_self_files(&self) -> Vec<PathBuf> {
        self.unique_dirs()
            .into_iter()
            .map(|d| d.join("tasks"))
            .collect()
    }

    /// v1 has no rule against processes beside child cgroups: the CT's top cgroups do.
    fn enter_files(&self, _init_pid: i32) -> Result<Vec<PathBuf>> {
        Ok(self.join_self_files())
    }

    fn add_pid(&self, pid: i32) -> Result<()> {
        for d in self.unique_dirs() {
            fsops::write(&d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    fn pids(&self) -> Result<Vec<i32>> {
        let mut all = Vec::new();
        for d in self.unique_dirs() {
            all.extend(fsops::procs_in_tree(&d)?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    fn freeze(&self) -> Result<()> {
        self.freeze_within(FREEZE_TIMEOUT)
    }

    fn thaw(&self) -> Result<()> {
        let dir = self.need(Controller::Freezer, "thaw", "thaw")?;
        fsops::write(&dir, "freezer.state", "THAWED")
    }

    fn is_frozen(&self) -> Result<bool> {
        let dir = self.need(Controller::Freezer, "read freezer state", "freeze")?;
        Ok(fsops::read(&dir, "freezer.state")?.trim() == "FROZEN")
    }

    /// Frozen tasks cannot fork, so one SIGKILL round over a frozen cgroup reaches every task;
    /// v1-frozen tasks only act on the signal once thawed. Without a freezer, kill until empty.
    fn kill_all(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        // The usual case after init exited: its pid namespace took every task with it.
        if self.pids()?.is_empty() {
            return Ok(());
        }
        let froze = match self.dir(Controller::Freezer) {
            Some(d) if d.is_dir() => match self.freeze_within(timeout.min(FREEZE_TIMEOUT)) {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %ErrorChain(&e), "kill_all: freezing failed, killing without freeze");
                    false
                }
            },
            _ => false,
        };
        fsops::sigkill(&self.pids()?);
        if froze {
            self.thaw()?;
        }
        let empty = fsops::poll_until(timeout.saturating_sub(start.elapsed()), || {
            let left = self.pids()?;
            fsops::sigkill(&left);
            Ok(left.is_empty())
        })?;
        if empty {
            debug!(ctid = %self.ctid, elapsed = ?start.elapsed(), "cgroup emptied");
            return Ok(());
        }
        Err(CgroupError::Timeout {
            op: "kill all processes in",
            path: self.primary_dir(),
            after: timeout,
            detail: format!("still inside: pids {:?}", self.pids()?),
        })
    }

    fn stats(&self) -> Result<Stats> {
        if !self.exists() {
            return Err(CgroupError::Missing {
                op: "stats",
                path: self.primary_dir(),
            });
        }
        self.read_stats()
    }

    fn exists(&self) -> bool {
        self.unique_dirs().iter().any(|d| d.is_dir())
    }

    fn destroy(&self) -> Result<()> {
        let pids = self.pids()?;
        if !pids.is_empty() {
            return Err(CgroupError::Busy {
                op: "destroy",
                path: self.primary_dir(),
                pids,
            });
        }
        let errors = self
            .unique_dirs()
            .iter()
            .filter_map(|d| fsops::rmdir_tree(d).err())
            .collect();
        CgroupError::collect(errors)
    }

    fn setup_devices(&self) -> Result<()> {
        let dir = self.need(Controller::Devices, "setup devices", "device filtering")?;
        fsops::write(&dir, "devices.deny", "a")?;
        for (rule, _what) in ALLOWED_DEVICES {
            fsops::write(&dir, "devices.allow", rule)?;
        }
        Ok(())
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.unique_dirs()
    }

    fn delegate(&self, uid: u32, gid: u32) -> Result<()> {
        match self.systemd_dir() {
            Some(d) => chown_delegated(&d, &DELEGATED_V1, uid, gid),
            None => Ok(()),
        }
    }

    fn ct_view(&self) -> CtCgroupView {
        let mut v = CtCgroupView {
            tmpfs: true,
            ..Default::default()
        };
        let systemd = self.mounts.systemd();
        for m in self.mounts.unique_mounts() {
            let writable = Some(m.as_path()) == systemd;
            // systemd looks for its hierarchy at /sys/fs/cgroup/systemd whatever the host calls it.
            let name = if writable {
                Some("systemd".to_string())
            } else {
                mount_name(&m)
            };
            let Some(target) = name else {
                debug!(mount = %m.display(), "cgroup mount without a usable name, not shown in CTs");
                continue;
            };
            v.mounts.push(CtCgroupMount {
                source: self.under(&m),
                target,
                writable,
            });
        }
        for (c, m) in self.mounts.iter() {
            if let Some(name) = mount_name(m)
                && name != c.name()
            {
                v.links.push((c.name().to_string(), name));
            }
        }
        v.mounts.sort_by(|a, b| a.target.cmp(&b.target));
        v
    }
}
