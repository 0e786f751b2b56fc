// Own thin file layer instead of cgroups-rs 0.5.1: its v1 hierarchy and v2 root are found inside the
// crate (no fake mount roots for tests), its errors carry no path, and it cannot report "no memsw"/bfq.
//! A CT's cgroup: cgroup v1 (one hierarchy per controller, this host) and v2 (unified, modern
//! hosts) behind one trait, [`CgroupManager`].
//!
//! Paths are `<mount>/<parent>/<ctid>` in every hierarchy, the mounts taken from
//! /proc/self/mountinfo ([`Hierarchy::detect`]). The host hierarchies are never mounted, unmounted or
//! remounted here. Limits are OpenVZ-style ([`Resources`]); counters come back as [`Stats`].
//!
//! Kernel notes: since 6.x v1 memory is always hierarchical (memory.use_hierarchy is fixed at 1),
//! so limits of the parent bound every CT below it on both versions.

mod delegate;
mod error;
mod fsops;
mod hierarchy;
mod resources;
mod stats;
pub mod v1;
pub mod v2;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use delegate::{CtCgroupMount, CtCgroupView};
pub use error::{CgroupError, Result};
pub use hierarchy::{Controller, Hierarchy, V1Mounts};
pub use resources::{
    CFS_PERIOD_US, CPUUNITS_DEFAULT, CPUUNITS_MAX, CPUUNITS_MIN, IOWEIGHT_MAX, IOWEIGHT_MIN,
    Resources, cpuunits_to_shares, cpuunits_to_weight,
};
pub use stats::Stats;
use tracing::debug;
use v1::V1Cgroup;
use v2::V2Cgroup;

use crate::ctid::Ctid;

/// How long freeze() waits for every task to stop before giving up (and thawing again).
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Devices a CT may use (v1 devices cgroup; everything else is denied), with what they are.
pub const ALLOWED_DEVICES: [(&str, &str); 9] = [
    ("c 1:3 rwm", "/dev/null"),
    ("c 1:5 rwm", "/dev/zero"),
    ("c 1:7 rwm", "/dev/full"),
    ("c 1:8 rwm", "/dev/random"),
    ("c 1:9 rwm", "/dev/urandom"),
    ("c 5:0 rwm", "/dev/tty"),
    ("c 5:1 rwm", "/dev/console"),
    ("c 5:2 rwm", "/dev/ptmx"),
    ("c 136:* rwm", "/dev/pts/*"),
];

/// Operations on one CT's cgroup, the same for v1 and v2.
pub trait CgroupManager {
    /// Creates the cgroup (and its parents); idempotent. v1: one directory per controller
    /// hierarchy; cpuset levels get their parent's cpus/mems.
    fn create(&self) -> Result<()>;
    /// Applies the `Some` fields of `r` (validated first; a bad or unsupported setting writes
    /// nothing). Works on a running CT.
    fn apply(&self, r: &Resources) -> Result<()>;
    /// The files a freshly forked, single-threaded child writes "0" to (joining itself) before
    /// unshare(CLONE_NEWCGROUP), so the CT's cgroup namespace is rooted at its cgroup.
    fn join_self_files(&self) -> Vec<PathBuf>;
    /// The files a process entering the running CT (`exec`, `enter`) writes "0" to. v1: the
    /// CT's cgroups ([`CgroupManager::join_self_files`]). v2: the cgroup the CT's init is in,
    /// if that is below the CT's: once the CT's own init hands controllers to its children
    /// (systemd does, from its delegated cgroup), cgroup2's no-internal-processes rule refuses
    /// new members of the CT's top cgroup with EBUSY.
    fn enter_files(&self, init_pid: i32) -> Result<Vec<PathBuf>>;
    /// Moves a process (all its threads) into the cgroup.
    fn add_pid(&self, pid: i32) -> Result<()>;
    /// PIDs in the cgroup and the cgroups the CT created below it, sorted.
    fn pids(&self) -> Result<Vec<i32>>;
    fn freeze(&self) -> Result<()>;
    fn thaw(&self) -> Result<()>;
    fn is_frozen(&self) -> Result<bool>;
    /// SIGKILLs every process in the cgroup and waits until it is empty (a missing cgroup is
    /// empty).
    fn kill_all(&self, timeout: Duration) -> Result<()>;
    fn stats(&self) -> Result<Stats>;
    /// True while the cgroup directory exists in any hierarchy.
    fn exists(&self) -> bool;
    /// Removes the cgroup (child cgroups first) from every hierarchy; a missing directory counts
    /// as removed. Refuses, changing nothing, while processes remain.
    fn destroy(&self) -> Result<()>;
    /// v1: deny all devices, then allow [`ALLOWED_DEVICES`]. v2: no-op (needs a BPF program).
    fn setup_devices(&self) -> Result<()>;
    /// The cgroup's directories, one per distinct hierarchy.
    fn paths(&self) -> Vec<PathBuf>;
    /// Gives the CT's root (host ids `uid`/`gid` of its user namespace) the delegated cgroup:
    /// its directory and the files that move processes, never the limit files (see
    /// [`CtCgroupView`] and the `delegate` module). Called after `create`.
    fn delegate(&self, uid: u32, gid: u32) -> Result<()>;
    /// What the CT's init mounts at /sys/fs/cgroup.
    fn ct_view(&self) -> CtCgroupView;
}

/// A CT's cgroup on whichever hierarchy the host has.
#[derive(Clone, Debug)]
pub enum Cgroup {
    V1(V1Cgroup),
    V2(V2Cgroup),
}

impl Cgroup {
    fn inner(&self) -> &dyn CgroupManager {
        match self {
            Cgroup::V1(c) => c,
            Cgroup::V2(c) => c,
        }
    }

    pub fn is_v2(&self) -> bool {
        matches!(self, Cgroup::V2(_))
    }
}

impl CgroupManager for Cgroup {
    fn create(&self) -> Result<()> {
        self.inner().create()
    }
    fn apply(&self, r: &Resources) -> Result<()> {
        self.inner().apply(r)
    }
    fn join_self_files(&self) -> Vec<PathBuf> {
        self.inner().join_self_files()
    }
    fn enter_files(&self, init_pid: i32) -> Result<Vec<PathBuf>> {
        self.inner().enter_files(init_pid)
    }
    fn add_pid(&self, pid: i32) -> Result<()> {
        self.inner().add_pid(pid)
    }
    fn pids(&self) -> Result<Vec<i32>> {
        self.inner().pids()
    }
    fn freeze(&self) -> Result<()> {
        self.inner().freeze()
    }
    fn thaw(&self) -> Result<()> {
        self.inner().thaw()
    }
    fn is_frozen(&self) -> Result<bool> {
        self.inner().is_frozen()
    }
    fn kill_all(&self, timeout: Duration) -> Result<()> {
        self.inner().kill_all(timeout)
    }
    fn stats(&self) -> Result<Stats> {
        self.inner().stats()
    }
    fn exists(&self) -> bool {
        self.inner().exists()
    }
    fn destroy(&self) -> Result<()> {
        self.inner().destroy()
    }
    fn setup_devices(&self) -> Result<()> {
        self.inner().setup_devices()
    }
    fn paths(&self) -> Vec<PathBuf> {
        self.inner().paths()
    }
    fn delegate(&self, uid: u32, gid: u32) -> Result<()> {
        self.inner().delegate(uid, gid)
    }
    fn ct_view(&self) -> CtCgroupView {
        self.inner().ct_view()
    }
}

/// The values `apply` of some [`Resources`] would overwrite, read before it does
/// ([`Cgroup::save_limits`]), to be put back with [`Cgroup::restore_limits`] when a later step
/// of the same change fails.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedLimits {
    /// (dir, file, first line of its content), in the order `apply` writes them.
    files: Vec<(PathBuf, &'static str, String)>,
}

impl Cgroup {
    /// Reads what `apply(r)` would overwrite. Checks `r` like `apply` does (an unsupported
    /// setting is an error here, before anything is written).
    pub fn save_limits(&self, r: &Resources) -> Result<SavedLimits> {
        let plan = match self {
            Cgroup::V1(c) => c.plan(r)?,
            Cgroup::V2(c) => c.plan(r)?,
        };
        let mut files = Vec::with_capacity(plan.len());
        for w in plan {
            // Only the first line: io.weight and io.bfq.weight list per-device weights below
            // the "default N" that apply writes, and take one line per write.
            let value = fsops::read(&w.dir, w.file)?
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            files.push((w.dir, w.file, value));
        }
        Ok(SavedLimits { files })
    }

    /// Writes the saved values back, in reverse: that order keeps v1's memsw at or above the
    /// memory limit at every step, as `apply`'s own order does.
    pub fn restore_limits(&self, saved: &SavedLimits) -> Result<()> {
        let errors = saved
            .files
            .iter()
            .rev()
            .filter_map(|(dir, file, value)| fsops::write(dir, file, value).err())
            .collect();
        CgroupError::collect(errors)
    }
}

/// One planned write of `apply`; plans are checked completely before the first write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileWrite {
    pub dir: PathBuf,
    pub file: &'static str,
    pub value: String,
    /// The value as a person wrote it (1G rather than 1073741824), for error messages.
    pub shown: String,
}

impl FileWrite {
    fn new(dir: &Path, file: &'static str, value: impl ToString) -> Self {
        let value = value.to_string();
        Self {
            dir: dir.to_path_buf(),
            file,
            shown: value.clone(),
            value,
        }
    }

    fn shown(dir: &Path, file: &'static str, value: String, shown: String) -> Self {
        Self {
            dir: dir.to_path_buf(),
            file,
            value,
            shown,
        }
    }
}

impl Hierarchy {
    /// The CT's cgroup under `parent` on this hierarchy (nothing is created yet).
    pub fn open(&self, parent: &str, ctid: Ctid) -> Result<Cgroup> {
        Ok(match self {
            Hierarchy::V1(m) => Cgroup::V1(V1Cgroup::with_mounts(m.clone(), parent, ctid)?),
            Hierarchy::V2(root) => Cgroup::V2(V2Cgroup::with_mount(root, parent, ctid)?),
        })
    }

    /// Removes `parent` from every hierarchy if no CT cgroup (or task) is left in it.
    pub fn remove_parent_if_empty(&self, parent: &str) -> Result<()> {
        let comps = fsops::parent_components(parent)?;
        let errors = self
            .mount_roots()
            .iter()
            .filter_map(|root| fsops::remove_parent_dirs(root, &comps).err())
            .collect();
        CgroupError::collect(errors)
    }

    /// CTIDs that have a cgroup under `parent` in any hierarchy (names that are not CTIDs are
    /// ignored), sorted.
    pub fn list_ctids(&self, parent: &str) -> Result<Vec<Ctid>> {
        let comps = fsops::parent_components(parent)?;
        let mut out = Vec::new();
        // Names only: berthd lists every hierarchy at each scrape, and sorting 1000 full
        // paths per hierarchy (as `subdirs` does) was 6% of a scrape.
        for root in self.mount_roots() {
            let dir = comps.iter().fold(root, |p, c| p.join(c));
            for name in fsops::subdir_names(&dir)? {
                match name.to_str().map(str::parse) {
                    Some(Ok(ctid)) => out.push(ctid),
                    _ => debug!(path = %dir.join(&name).display(), "not a CT cgroup, skipped"),
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

/// Detects the host's hierarchy and returns the CT's cgroup at `<mount>/<parent>/<ctid>`.
pub fn open(parent: &str, ctid: Ctid) -> Result<Cgroup, CgroupError> {
    Hierarchy::detect()?.open(parent, ctid)
}

/// Removes an empty cgroup parent (e.g. a test's unique parent) from every hierarchy.
pub fn remove_parent_if_empty(parent: &str) -> Result<()> {
    Hierarchy::detect()?.remove_parent_if_empty(parent)
}

/// CTs that have a cgroup under `parent` (for garbage collection).
pub fn list_ctids(parent: &str) -> Result<Vec<Ctid>> {
    Hierarchy::detect()?.list_ctids(parent)
}
