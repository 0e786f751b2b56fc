//! Which cgroup hierarchies this host has, read from /proc/self/mountinfo (never assumed).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use super::error::{CgroupError, Result};
use super::fsops;

/// The v1 controllers berth uses. Others (hugetlb, net_cls, perf_event, …) are left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Cpu,
    Cpuacct,
    Cpuset,
    Memory,
    Devices,
    Freezer,
    Blkio,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 8] = [
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Cpuset,
        Controller::Memory,
        Controller::Devices,
        Controller::Freezer,
        Controller::Blkio,
        Controller::Pids,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Devices => "devices",
            Controller::Freezer => "freezer",
            Controller::Blkio => "blkio",
            Controller::Pids => "pids",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Mount point of each v1 controller (co-mounted controllers, `cpu,cpuacct`, share one path),
/// and of the controller-less `name=systemd` hierarchy when the host has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct V1Mounts {
    controllers: BTreeMap<Controller, PathBuf>,
    systemd: Option<PathBuf>,
}

impl V1Mounts {
    pub fn new(mounts: impl IntoIterator<Item = (Controller, PathBuf)>) -> Self {
        Self {
            controllers: mounts.into_iter().collect(),
            systemd: None,
        }
    }

    /// With the `name=systemd` hierarchy mounted at `mount`: a CT gets a cgroup there too, which
    /// is the one delegated to an unprivileged CT's root (a systemd init tracks its units in it).
    pub fn with_systemd(mut self, mount: impl Into<PathBuf>) -> Self {
        self.systemd = Some(mount.into());
        self
    }

    pub fn get(&self, c: Controller) -> Option<&Path> {
        self.controllers.get(&c).map(PathBuf::as_path)
    }

    /// The `name=systemd` hierarchy's mount point, if the host has one.
    pub fn systemd(&self) -> Option<&Path> {
        self.systemd.as_deref()
    }

    /// The controllers and their mount points (not the `name=systemd` hierarchy).
    pub fn iter(&self) -> impl Iterator<Item = (Controller, &Path)> {
        self.controllers.iter().map(|(c, p)| (*c, p.as_path()))
    }

    pub fn is_empty(&self) -> bool {
        self.controllers.is_empty()
    }

    /// Distinct mount points, each once even when several controllers share it, the
    /// `name=systemd` hierarchy included: a CT has a directory in each.
    pub fn unique_mounts(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.controllers.values().cloned().collect();
        v.extend(self.systemd.clone());
        v.sort();
        v.dedup();
        v
    }
}

/// Which cgroup version the host runs CTs under, and where its hierarchies are mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// Legacy or hybrid: one hierarchy per controller (a cgroup2 mount may exist beside them).
    V1(V1Mounts),
    /// Unified: every controller lives in the cgroup2 hierarchy mounted here.
    V2(PathBuf),
}

/// One cgroup or cgroup2 line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CgroupMount {
    mount_point: PathBuf,
    v2: bool,
    super_opts: Vec<String>,
}

/// mountinfo escapes space, tab, newline and backslash in paths as `\ooo` octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Format (proc(5)): `id parent maj:min root mount_point opts [optional...] - fstype source super_opts`.
fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let _source = r.next()?;
            let super_opts = r.next().unwrap_or("");
            let v2 = match fstype {
                "cgroup" => false,
                "cgroup2" => true,
                _ => return None,
            };
            Some(CgroupMount {
                mount_point: PathBuf::from(unescape(mount_point)),
                v2,
                super_opts: super_opts.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

impl Hierarchy {
    /// Reads /proc/self/mountinfo.
    pub fn detect() -> Result<Hierarchy> {
        let text = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| CgroupError::io("read mountinfo", "/proc/self/mountinfo", e))?;
        Self::from_mountinfo(&text)
    }

    /// Decides by where the memory controller lives: a controller is bound to exactly one
    /// hierarchy, so a cgroup2 mount listing `memory` in cgroup.controllers means a unified host;
    /// otherwise any v1 controller mount means legacy/hybrid (this host: v1 + a hugetlb-only
    /// cgroup2 at /sys/fs/cgroup/unified). A lone cgroup2 without controllers still counts as v2.
    pub fn from_mountinfo(mountinfo: &str) -> Result<Hierarchy> {
        let mounts = cgroup_mounts(mountinfo);
        let v2_mounts: Vec<&CgroupMount> = mounts.iter().filter(|m| m.v2).collect();
        for m in &v2_mounts {
            let controllers =
                fsops::read_opt(&m.mount_point, "cgroup.controllers")?.unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                return Ok(Hierarchy::V2(m.mount_point.clone()));
            }
        }
        let mut v1 = BTreeMap::new();
        let mut systemd = None;
        for m in mounts.iter().filter(|m| !m.v2) {
            for c in m.super_opts.iter().filter_map(|o| Controller::from_name(o)) {
                // The same hierarchy may be bind-mounted twice; the first mount is the host's.
                v1.entry(c).or_insert_with(|| m.mount_point.clone());
            }
            if systemd.is_none() && m.super_opts.iter().any(|o| o == "name=systemd") {
                systemd = Some(m.mount_point.clone());
            }
        }
        if !v1.is_empty() {
            return Ok(Hierarchy::V1(V1Mounts {
                controllers: v1,
                systemd,
            }));
        }
        // Prefer the conventional place if several controller-less cgroup2 mounts exist.
        let pick = v2_mounts
            .iter()
            .find(|m| m.mount_point == Path::new("/sys/fs/cgroup"))
            .or(v2_mounts.first());
        match pick {
            Some(m) => Ok(Hierarchy::V2(m.mount_point.clone())),
            None => Err(CgroupError::NoHierarchy(
                "/proc/self/mountinfo lists no cgroup or cgroup2 mount".into(),
            )),
        }
    }

    /// Mount points a CT's cgroup has a directory under (each once).
    pub fn mount_roots(&self) -> Vec<PathBuf> {
        match self {
            Hierarchy::V1(m) => m.unique_mounts(),
            Hierarchy::V2(p) => vec![p.clone()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host's mountinfo, with the cgroup2 mount moved into `unified` (a fake dir).
    fn hybrid(unified: &Path) -> String {
        format!(
            "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / {} rw,relatime - cgroup2 cgroup2 rw
90 35 0:32 / /mnt/mem\\040copy rw,relatime - cgroup cgroup rw,memory
",
            unified.display()
        )
    }

    #[test]
    fn hybrid_host_is_v1_with_co_mounted_cpu() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let Hierarchy::V1(m) = Hierarchy::from_mountinfo(&hybrid(t.path())).unwrap() else {
            panic!("expected v1");
        };
        let cpu = Path::new("/sys/fs/cgroup/cpu,cpuacct");
        assert_eq!(m.get(Controller::Cpu), Some(cpu));
        assert_eq!(m.get(Controller::Cpuacct), Some(cpu));
        assert_eq!(
            m.get(Controller::Memory),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(m.iter().count(), 8);
        // name=systemd is not a controller, but a hierarchy CTs get a cgroup in; cpu,cpuacct
        // counted once.
        assert_eq!(m.systemd(), Some(Path::new("/sys/fs/cgroup/systemd")));
        assert_eq!(m.unique_mounts().len(), 8);
    }

    #[test]
    fn unified_host_is_v2() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cg 2");
        fs::create_dir(&root).unwrap();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let mi = format!(
            "25 1 0:23 / {} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
            root.display().to_string().replace(' ', "\\040")
        );
        assert_eq!(Hierarchy::from_mountinfo(&mi).unwrap(), Hierarchy::V2(root));
    }

    #[test]
    fn v2_without_memory_beside_v1_is_v1() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let mi = format!(
            "41 31 0:38 / {} rw - cgroup2 cgroup2 rw\n\
             35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
            t.path().display()
        );
        assert!(matches!(
            Hierarchy::from_mountinfo(&mi).unwrap(),
            Hierarchy::V1(_)
        ));
    }

    #[test]
    fn no_cgroups_is_an_error() {
        let e = Hierarchy::from_mountinfo("22 1 0:21 / /proc rw - proc proc rw\n").unwrap_err();
        assert!(e.to_string().contains("no cgroup or cgroup2 mount"), "{e}");
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
    }
}
