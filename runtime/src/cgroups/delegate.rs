//! What a CT sees of its cgroup and what its root may change there.
//!
//! A CT's init runs its own cgroup tree below the CT's cgroup (systemd puts every unit in a
//! child cgroup), so the CT's root must own that one directory, the way LXC and the kernel's
//! cgroup-v2 "Delegation Containment" rules describe it: the directory (to mkdir/rmdir below
//! it) and the files that move processes (and, on v2, that hand controllers to its children).
//! The limit files (memory.*, pids.max, cpu.*) stay owned by host root, which the CT's user
//! namespace does not map, so the CT cannot raise the limits the host set on its cgroup; the
//! cgroup namespace roots every cgroup mount the CT makes at its own cgroup, so it cannot name
//! (nor move a process into) anything above it.
//!
//! - v1 (legacy/hybrid hosts): only the controller-less `name=systemd` hierarchy is delegated.
//!   The controller hierarchies are mounted read-only for reading usage; a systemd init skips
//!   controllers it cannot create cgroups in. The host's cgroup2 mount (hybrid) is not shown:
//!   systemd then runs in legacy mode, which needs no unified cgroup. Joining one would cost
//!   every start a `cgroup.procs` migration (cgroup2 has no single-thread `tasks` file), whose
//!   cgroup_threadgroup_rwsem write waits for an RCU grace period: 5–13 ms measured here.
//! - v2: the CT's cgroup directory with `cgroup.procs`, `cgroup.threads` and
//!   `cgroup.subtree_control`, mounted on /sys/fs/cgroup itself.

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};

use super::error::{CgroupError, Result};

/// Files of the delegated v1 cgroup the CT's root gets (besides the directory).
pub(crate) const DELEGATED_V1: [&str; 2] = ["tasks", "cgroup.procs"];
/// Files of the delegated v2 cgroup the CT's root gets (Documentation/admin-guide/cgroup-v2.rst,
/// "Model of Delegation").
pub(crate) const DELEGATED_V2: [&str; 3] =
    ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"];

/// One bind mount the CT's init makes of its own cgroup in one hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtCgroupMount {
    /// The CT's cgroup directory on the host.
    pub source: PathBuf,
    /// Where it appears, relative to the CT's /sys/fs/cgroup ("" = /sys/fs/cgroup itself).
    pub target: String,
    /// Read-write (the delegated hierarchy) or read-only (the host's controllers).
    pub writable: bool,
}

/// What the CT's init mounts at /sys/fs/cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtCgroupView {
    /// v1: a tmpfs holds one directory per hierarchy (made read-only once populated). v2: no
    /// tmpfs, the cgroup is mounted on /sys/fs/cgroup.
    pub tmpfs: bool,
    pub mounts: Vec<CtCgroupMount>,
    /// `(name, target)` symlinks in the tmpfs: `cpu` → `cpu,cpuacct` where those are co-mounted.
    pub links: Vec<(String, String)>,
}

/// The last component of a mount point, if it is usable as a directory name in the CT.
pub(crate) fn mount_name(mount: &Path) -> Option<String> {
    let n = mount.file_name()?.to_str()?;
    (!n.is_empty() && n != "." && n != "..").then(|| n.to_string())
}

/// chown of the cgroup directory and `files` in it to the CT's root.
pub(crate) fn chown_delegated(dir: &Path, files: &[&str], uid: u32, gid: u32) -> Result<()> {
    let op = || format!("delegate to the CT's root (chown to {uid}:{gid})");
    chown(dir, Some(uid), Some(gid)).map_err(|e| CgroupError::io(op(), dir, e))?;
    for f in files {
        let p = dir.join(f);
        chown(&p, Some(uid), Some(gid)).map_err(|e| CgroupError::io(op(), &p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::cgroups::v1::V1Cgroup;
    use crate::cgroups::v2::V2Cgroup;
    use crate::cgroups::{CgroupManager, Controller, V1Mounts};
    use crate::ctid::Ctid;

    fn owner(p: &Path) -> (u32, u32) {
        let m = fs::metadata(p).unwrap();
        (m.uid(), m.gid())
    }

    /// A v1 host like this one: cpu and cpuacct co-mounted here (to see the links), memory and
    /// pids apart, name=systemd.
    fn fake_v1(t: &Path) -> V1Mounts {
        let mut m = Vec::new();
        for (c, d) in [
            (Controller::Cpu, "cpu,cpuacct"),
            (Controller::Cpuacct, "cpu,cpuacct"),
            (Controller::Memory, "memory"),
            (Controller::Pids, "pids"),
        ] {
            m.push((c, t.join(d)));
        }
        V1Mounts::new(m).with_systemd(t.join("systemd"))
    }

    #[test]
    fn v1_view_delegates_only_name_systemd() {
        let t = tempfile::tempdir().unwrap();
        let cg = V1Cgroup::with_mounts(fake_v1(t.path()), "berth", Ctid::new(7).unwrap()).unwrap();
        let v = cg.ct_view();
        assert!(v.tmpfs);
        let got: Vec<(String, bool)> = v
            .mounts
            .iter()
            .map(|m| (m.target.clone(), m.writable))
            .collect();
        assert_eq!(
            got,
            [
                ("cpu,cpuacct".to_string(), false),
                ("memory".to_string(), false),
                ("pids".to_string(), false),
                ("systemd".to_string(), true),
            ]
        );
        assert_eq!(v.mounts[3].source, t.path().join("systemd/berth/7"));
        assert_eq!(
            v.links,
            [
                ("cpu".to_string(), "cpu,cpuacct".to_string()),
                ("cpuacct".to_string(), "cpu,cpuacct".to_string())
            ]
        );
    }

    #[test]
    fn v1_without_name_systemd_delegates_nothing() {
        let t = tempfile::tempdir().unwrap();
        let m = V1Mounts::new([(Controller::Memory, t.path().join("memory"))]);
        let cg = V1Cgroup::with_mounts(m, "berth", Ctid::new(7).unwrap()).unwrap();
        assert!(cg.ct_view().mounts.iter().all(|m| !m.writable));
        // Nothing to chown, so nothing fails even though no directory exists.
        cg.delegate(1_000_000, 1_000_000).unwrap();
    }

    #[test]
    fn v1_delegate_chowns_the_systemd_cgroup_and_its_process_files_only() {
        let t = tempfile::tempdir().unwrap();
        let mounts = fake_v1(t.path());
        let cg = V1Cgroup::with_mounts(mounts, "berth", Ctid::new(7).unwrap()).unwrap();
        let sd = t.path().join("systemd/berth/7");
        let mem = t.path().join("memory/berth/7");
        for d in [&sd, &mem] {
            fs::create_dir_all(d).unwrap();
        }
        for f in ["tasks", "cgroup.procs", "notify_on_release"] {
            fs::write(sd.join(f), "").unwrap();
        }
        fs::write(mem.join("memory.limit_in_bytes"), "").unwrap();
        cg.delegate(1_000_000, 1_000_001).unwrap();
        let ct = (1_000_000, 1_000_001);
        assert_eq!(owner(&sd), ct);
        assert_eq!(owner(&sd.join("tasks")), ct);
        assert_eq!(owner(&sd.join("cgroup.procs")), ct);
        assert_eq!(owner(&sd.join("notify_on_release")), (0, 0));
        assert_eq!(owner(&mem), (0, 0));
        assert_eq!(owner(&mem.join("memory.limit_in_bytes")), (0, 0));
        assert_eq!(owner(&t.path().join("systemd/berth")), (0, 0));
    }

    #[test]
    fn v2_delegates_the_ct_cgroup_mounted_on_sys_fs_cgroup() {
        let t = tempfile::tempdir().unwrap();
        let cg = V2Cgroup::with_mount(t.path(), "berth", Ctid::new(9).unwrap()).unwrap();
        let d = t.path().join("berth/9");
        fs::create_dir_all(&d).unwrap();
        for f in DELEGATED_V2.iter().chain(&["memory.max", "pids.max"]) {
            fs::write(d.join(f), "").unwrap();
        }
        let v = cg.ct_view();
        assert_eq!(
            v,
            CtCgroupView {
                tmpfs: false,
                mounts: vec![CtCgroupMount {
                    source: d.clone(),
                    target: String::new(),
                    writable: true,
                }],
                links: vec![],
            }
        );
        cg.delegate(2_000_000, 2_000_000).unwrap();
        let ct = (2_000_000, 2_000_000);
        assert_eq!(owner(&d), ct);
        for f in DELEGATED_V2 {
            assert_eq!(owner(&d.join(f)), ct, "{f}");
        }
        assert_eq!(owner(&d.join("memory.max")), (0, 0));
        assert_eq!(owner(&d.join("pids.max")), (0, 0));
    }

    #[test]
    fn v2_entering_joins_the_init_s_cgroup_inside_the_ct_only() {
        let t = tempfile::tempdir().unwrap();
        let cg = V2Cgroup::with_mount(t.path(), "berth", Ctid::new(9).unwrap()).unwrap();
        let d = t.path().join("berth/9");
        assert_eq!(
            cg.cgroup_of("0::/berth/9/init.scope\n"),
            d.join("init.scope")
        );
        assert_eq!(cg.cgroup_of("0::/berth/9\n"), d);
        // Outside the CT (or nonsense): the CT's own cgroup, never anything else.
        for text in [
            "0::/\n",
            "0::/berth/90/x\n",
            "0::/berth/9/../../x\n",
            "",
            "1:cpu:/x\n",
        ] {
            assert_eq!(cg.cgroup_of(text), d, "{text:?}");
        }
        // v1 joins the CT's top cgroups, init wherever it is.
        let m = V1Mounts::new([(Controller::Memory, t.path().join("memory"))]);
        let v1 = V1Cgroup::with_mounts(m, "berth", Ctid::new(9).unwrap()).unwrap();
        assert_eq!(v1.enter_files(1).unwrap(), v1.join_self_files());
    }

    #[test]
    fn delegate_of_a_missing_cgroup_names_the_directory() {
        let t = tempfile::tempdir().unwrap();
        let cg = V2Cgroup::with_mount(t.path(), "berth", Ctid::new(9).unwrap()).unwrap();
        let e = cg.delegate(1, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "delegate to the CT's root (chown to 1:1) in {}",
                t.path().join("berth/9").display()
            )
        );
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
