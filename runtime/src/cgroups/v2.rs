//! cgroup v2: one directory `<mount>/<parent>/<ctid>` in the unified hierarchy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::delegate::{CtCgroupMount, CtCgroupView, DELEGATED_V2, chown_delegated};
use super::error::{CgroupError, Result};
use super::resources::{CFS_PERIOD_US, Resources, cpuunits_to_weight};
use super::stats::{Stats, flat_keyed, io_stat_v2, v2_limit};
use super::{CgroupManager, FREEZE_TIMEOUT, FileWrite, fsops};
use crate::ctid::Ctid;
use crate::error_chain::ErrorChain;
use crate::size::Size;

/// Controllers enabled for the CT in each ancestor's cgroup.subtree_control (when available).
/// cpuset is left off: an empty v2 cpuset inherits its parent's CPUs, which is what berth wants.
const WANTED: [&str; 4] = ["cpu", "io", "memory", "pids"];

/// A CT's cgroup on a unified (v2) host.
#[derive(Clone, Debug)]
pub struct V2Cgroup {
    mount: PathBuf,
    parent: Vec<String>,
    ctid: Ctid,
}

fn v2_value(limit: Option<u64>) -> (String, String) {
    match limit {
        Some(b) => (b.to_string(), Size::Bytes(b).to_string()),
        None => ("max".into(), "unlimited".into()),
    }
}

/// Controllers listed in a space-separated cgroup file; a missing file lists none.
fn listed(dir: &Path, file: &str) -> Result<Vec<String>> {
    Ok(fsops::read_opt(dir, file)?
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

/// Turns on the wanted controllers for the children of `dir`.
fn enable_controllers(dir: &Path) -> Result<()> {
    let available = listed(dir, "cgroup.controllers")?;
    let enabled = listed(dir, "cgroup.subtree_control")?;
    for c in WANTED {
        if !available.iter().any(|a| a == c) || enabled.iter().any(|e| e == c) {
            continue;
        }
        let value = format!("+{c}");
        fsops::try_write(dir, "cgroup.subtree_control", &value).map_err(|e| {
            let op = if e.raw_os_error() == Some(libc::EBUSY) {
                // The "no internal processes" rule: a non-root cgroup with tasks of its own
                // cannot hand controllers to children.
                format!(
                    "write cgroup.subtree_control = {value} (this cgroup holds processes; v2 \
                     allows enabling controllers only in cgroups without their own tasks)"
                )
            } else {
                format!("write cgroup.subtree_control = {value}")
            };
            CgroupError::io(op, dir, e)
        })?;
    }
    Ok(())
}

impl V2Cgroup {
    /// A CT cgroup under a cgroup2 mount (from [`super::Hierarchy`], or a fake tree in tests).
    pub fn with_mount(mount: impl Into<PathBuf>, parent: &str, ctid: Ctid) -> Result<Self> {
        Ok(Self {
            mount: mount.into(),
            parent: fsops::parent_components(parent)?,
            ctid,
        })
    }

    pub fn ctid(&self) -> Ctid {
        self.ctid
    }

    /// `<mount>/<parent>/<ctid>`.
    pub fn dir(&self) -> PathBuf {
        let mut p = self.mount.clone();
        p.extend(&self.parent);
        p.push(self.ctid.to_string());
        p
    }

    /// The cgroup `/proc/<pid>/cgroup` text puts its process in, if it is the CT's cgroup or
    /// below it (what the CT's init did with its delegated subtree); else the CT's cgroup.
    pub(crate) fn cgroup_of(&self, proc_cgroup: &str) -> PathBuf {
        let dir = self.dir();
        proc_cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|rel| self.mount.join(rel.trim().trim_start_matches('/')))
            .filter(|p| {
                p.starts_with(&dir)
                    && p.components()
                        .all(|c| !matches!(c, std::path::Component::ParentDir))
            })
            .unwrap_or(dir)
    }

    fn existing_dir(&self, op: &'static str) -> Result<PathBuf> {
        let dir = self.dir();
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(CgroupError::Missing { op, path: dir })
        }
    }

    fn need_file(dir: &Path, file: &str, setting: &str, why: &str) -> Result<()> {
        if dir.join(file).exists() {
            return Ok(());
        }
        Err(CgroupError::Unsupported {
            what: format!("{setting}: {file} is absent in {} ({why})", dir.display()),
        })
    }

    /// Everything `apply` would write, in order; an error here means nothing was written.
    pub(crate) fn plan(&self, r: &Resources) -> Result<Vec<FileWrite>> {
        r.validate()?;
        let dir = self.existing_dir("apply")?;
        let not_enabled = |c: &str| {
            format!(
                "the {c} controller is not enabled for this cgroup: not in its parent's cgroup.subtree_control"
            )
        };
        let mut out = Vec::new();
        if let Some(m) = r.memory {
            Self::need_file(&dir, "memory.max", "--memory", &not_enabled("memory"))?;
            let (v, shown) = v2_value(m.bytes());
            out.push(FileWrite::shown(&dir, "memory.max", v, shown));
        }
        if let Some(sw) = r.swap {
            Self::need_file(
                &dir,
                "memory.swap.max",
                "--swap",
                "kernel without swap accounting, or the memory controller is not enabled",
            )?;
            let (v, shown) = v2_value(sw.bytes());
            out.push(FileWrite::shown(&dir, "memory.swap.max", v, shown));
        }
        if let Some(u) = r.cpuunits {
            Self::need_file(&dir, "cpu.weight", "--cpuunits", &not_enabled("cpu"))?;
            out.push(FileWrite::new(&dir, "cpu.weight", cpuunits_to_weight(u)));
        }
        if r.touches_quota() {
            Self::need_file(&dir, "cpu.max", "--cpulimit/--cpus", &not_enabled("cpu"))?;
            let quota = r
                .cpu_quota_us()
                .map_or_else(|| "max".to_string(), |q| q.to_string());
            out.push(FileWrite::new(
                &dir,
                "cpu.max",
                format!("{quota} {CFS_PERIOD_US}"),
            ));
        }
        if let Some(n) = r.numproc {
            Self::need_file(&dir, "pids.max", "--numproc", &not_enabled("pids"))?;
            let v = if n == 0 {
                "max".to_string()
            } else {
                n.to_string()
            };
            out.push(FileWrite::new(&dir, "pids.max", v));
        }
        if let Some(w) = r.ioweight {
            // io.weight belongs to blk-iocost, io.bfq.weight to BFQ; which one acts depends on the
            // disk's scheduler, so every one present is written.
            let mut any = false;
            for (file, value) in [
                ("io.weight", format!("default {w}")),
                ("io.bfq.weight", w.to_string()),
            ] {
                if dir.join(file).exists() {
                    out.push(FileWrite::new(&dir, file, value));
                    any = true;
                }
            }
            if !any {
                return Err(CgroupError::Unsupported {
                    what: format!(
                        "--ioweight: neither io.weight nor io.bfq.weight exists in {} (io \
                         controller not enabled, or no weight-aware I/O scheduler: load bfq)",
                        dir.display()
                    ),
                });
            }
        }
        Ok(out)
    }

    fn freeze_within(&self, timeout: Duration) -> Result<()> {
        let dir = self.existing_dir("freeze")?;
        fsops::write(&dir, "cgroup.freeze", "1")?;
        if fsops::poll_until(timeout, || self.is_frozen())? {
            return Ok(());
        }
        fsops::write(&dir, "cgroup.freeze", "0")?;
        Err(CgroupError::Timeout {
            op: "freeze",
            path: dir,
            after: timeout,
            detail: "cgroup.events never reported frozen 1; thawed again".into(),
        })
    }

    fn read_stats(&self, d: &Path) -> Result<Stats> {
        let mut s = Stats::default();
        let limit = |file: &str| -> Result<Option<u64>> {
            match fsops::read_opt(d, file)? {
                None => Ok(None),
                Some(v) => v2_limit(&v).map_err(|()| CgroupError::Parse {
                    file: file.into(),
                    path: d.to_path_buf(),
                    content: v.clone(),
                    why: "expected a number or max",
                }),
            }
        };
        let keyed = |file: &str| -> Result<Option<String>> { fsops::read_opt(d, file) };
        s.numproc = match fsops::read_u64_opt(d, "pids.current")? {
            Some(n) => n,
            None => self.pids()?.len() as u64,
        };
        s.numproc_limit = limit("pids.max")?;
        s.numproc_peak = fsops::read_u64_opt(d, "pids.peak")?;
        if let Some(ev) = keyed("pids.events")? {
            s.numproc_failcnt = flat_keyed(&ev).get("max").copied().unwrap_or(0);
        }
        s.memory_usage = fsops::read_u64_opt(d, "memory.current")?.unwrap_or(0);
        s.memory_limit = limit("memory.max")?;
        s.memory_peak = fsops::read_u64_opt(d, "memory.peak")?;
        s.memory_barrier = limit("memory.high")?;
        if let Some(ev) = keyed("memory.events")? {
            let ev = flat_keyed(&ev);
            s.memory_failcnt = ev.get("max").copied().unwrap_or(0);
            s.oom_kills = ev.get("oom_kill").copied().unwrap_or(0);
        }
        if let Some(st) = keyed("memory.stat")? {
            let st = flat_keyed(&st);
            let get = |k| st.get(k).copied().unwrap_or(0);
            s.memory_cache = get("file");
            s.memory_rss = get("anon");
            s.memory_working_set = s.memory_usage.saturating_sub(get("inactive_file"));
        }
        s.swap_usage = fsops::read_u64_opt(d, "memory.swap.current")?.unwrap_or(0);
        s.swap_limit = limit("memory.swap.max")?;
        s.swap_peak = fsops::read_u64_opt(d, "memory.swap.peak")?;
        if let Some(st) = keyed("cpu.stat")? {
            let st = flat_keyed(&st);
            let ns = |k| st.get(k).copied().unwrap_or(0).saturating_mul(1000);
            s.cpu_usage_ns = ns("usage_usec");
            s.cpu_user_ns = ns("user_usec");
            s.cpu_system_ns = ns("system_usec");
            s.throttled_ns = ns("throttled_usec");
            s.nr_periods = st.get("nr_periods").copied().unwrap_or(0);
            s.nr_throttled = st.get("nr_throttled").copied().unwrap_or(0);
        }
        if let Some(max) = keyed("cpu.max")? {
            let mut it = max.split_whitespace();
            let (quota, period) = (it.next().unwrap_or("max"), it.next().unwrap_or("0"));
            s.cpu_quota_us = match quota {
                "max" => None,
                q => Some(fsops::parse_i64(d, "cpu.max", q)?),
            };
            s.cpu_period_us = fsops::parse_u64(d, "cpu.max", period)?;
        }
        if let Some(io) = keyed("io.stat")? {
            let t = io_stat_v2(&io);
            s.blkio_read_bytes = t.read_bytes;
            s.blkio_write_bytes = t.write_bytes;
            s.blkio_read_ios = t.read_ios;
            s.blkio_write_ios = t.write_ios;
        }
        if let Some(ev) = keyed("cgroup.events")? {
            s.frozen = flat_keyed(&ev).get("frozen") == Some(&1);
        }
        Ok(s)
    }
}

impl CgroupManager for V2Cgroup {
    fn create(&self) -> Result<()> {
        let mut cur = self.mount.clone();
        for comp in &self.parent {
            enable_controllers(&cur)?;
            cur.push(comp);
            fsops::mkdir(&cur)?;
        }
        // The CT's own subtree_control is left to the CT (its init may run its own hierarchy).
        enable_controllers(&cur)?;
        fsops::mkdir(&self.dir())
    }

    fn apply(&self, r: &Resources) -> Result<()> {
        for w in self.plan(r)? {
            fsops::write_shown(&w.dir, w.file, &w.value, &w.shown)?;
        }
        Ok(())
    }

    fn join_self_files(&self) -> Vec<PathBuf> {
        vec![self.dir().join("cgroup.procs")]
    }

    fn enter_files(&self, init_pid: i32) -> Result<Vec<PathBuf>> {
        let p = PathBuf::from(format!("/proc/{init_pid}/cgroup"));
        let text = std::fs::read_to_string(&p)
            .map_err(|e| CgroupError::io("read the CT init's cgroup", &p, e))?;
        Ok(vec![self.cgroup_of(&text).join("cgroup.procs")])
    }

    fn add_pid(&self, pid: i32) -> Result<()> {
        fsops::write(&self.dir(), "cgroup.procs", &pid.to_string())
    }

    fn pids(&self) -> Result<Vec<i32>> {
        fsops::procs_in_tree(&self.dir())
    }

    fn freeze(&self) -> Result<()> {
        self.freeze_within(FREEZE_TIMEOUT)
    }

    fn thaw(&self) -> Result<()> {
        fsops::write(&self.existing_dir("thaw")?, "cgroup.freeze", "0")
    }

    fn is_frozen(&self) -> Result<bool> {
        let ev = fsops::read(&self.existing_dir("read freezer state")?, "cgroup.events")?;
        Ok(flat_keyed(&ev).get("frozen") == Some(&1))
    }

    /// cgroup.kill (kernel ≥ 5.14) kills the whole subtree atomically, racing no fork. Older
    /// kernels: freeze, SIGKILL (v2 lets fatal signals through to frozen tasks), thaw.
    fn kill_all(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let dir = self.dir();
        if !dir.is_dir() {
            // Nothing can run in a cgroup that does not exist (same as v1).
            return Ok(());
        }
        if dir.join("cgroup.kill").exists() {
            fsops::write(&dir, "cgroup.kill", "1")?;
        } else {
            let froze = match self.freeze_within(timeout.min(FREEZE_TIMEOUT)) {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %ErrorChain(&e), "kill_all: freezing failed, killing without freeze");
                    false
                }
            };
            fsops::sigkill(&self.pids()?);
            if froze {
                self.thaw()?;
            }
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
            path: dir,
            after: timeout,
            detail: format!("still inside: pids {:?}", self.pids()?),
        })
    }

    fn stats(&self) -> Result<Stats> {
        let d = self.existing_dir("stats")?;
        self.read_stats(&d)
    }

    fn exists(&self) -> bool {
        self.dir().is_dir()
    }

    fn destroy(&self) -> Result<()> {
        let pids = self.pids()?;
        if !pids.is_empty() {
            return Err(CgroupError::Busy {
                op: "destroy",
                path: self.dir(),
                pids,
            });
        }
        fsops::rmdir_tree(&self.dir())
    }

    /// v2 has no devices.* files: device access is filtered by a BPF_PROG_TYPE_CGROUP_DEVICE
    /// program attached to the cgroup. berth does not attach one yet, so on v2 the CT's device
    /// access is bounded only by what its /dev contains and by capabilities.
    fn setup_devices(&self) -> Result<()> {
        debug!(
            path = %self.dir().display(),
            "cgroup v2: device filtering needs a BPF cgroup-device program; none attached"
        );
        Ok(())
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.dir()]
    }

    fn delegate(&self, uid: u32, gid: u32) -> Result<()> {
        chown_delegated(&self.dir(), &DELEGATED_V2, uid, gid)
    }

    fn ct_view(&self) -> CtCgroupView {
        CtCgroupView {
            tmpfs: false,
            mounts: vec![CtCgroupMount {
                source: self.dir(),
                target: String::new(),
                writable: true,
            }],
            links: Vec::new(),
        }
    }
}
