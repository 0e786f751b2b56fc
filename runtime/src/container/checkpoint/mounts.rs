//! Which of a CT's mounts come from outside it, and where they come from on the host.
//!
//! CRIU restores a mount namespace from its own images, but it cannot recreate a bind of a host
//! file or directory (berth binds /dev/null over masked /proc files, the host's device nodes
//! into unprivileged CTs, the CT's cgroups under /sys/fs/cgroup and the console pty onto
//! /dev/console): those must be declared external at dump and given a host source at restore.
//! A mount is external when its superblock is also mounted in berth's own mount namespace; its
//! host source is then that host mount's mount point joined with the rest of the CT mount's root.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One line of `/proc/<pid>/mountinfo`, the fields used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MountLine {
    /// `major:minor` of the superblock.
    pub dev: String,
    /// The path inside the superblock that is mounted (a bind's source).
    pub root: PathBuf,
    pub mountpoint: PathBuf,
    pub fstype: String,
}

/// Parses mountinfo text; lines that do not parse are skipped (the kernel's format is fixed).
pub(super) fn parse(text: &str) -> Vec<MountLine> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split_whitespace().collect();
            let fstype = post.split_whitespace().next()?;
            Some(MountLine {
                dev: f.get(2)?.to_string(),
                root: PathBuf::from(unescape(f.get(3)?)),
                mountpoint: PathBuf::from(unescape(f.get(4)?)),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where an external mount's source is at restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A host path (the same on restore: berth recreates the CT's cgroups under the same
    /// names, and device nodes do not move).
    Host(PathBuf),
    /// The console pty, which the restoring monitor opens anew.
    Console,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct External {
    /// CRIU's name for it in the images.
    pub key: String,
    /// Where it is mounted inside the CT.
    pub mountpoint: PathBuf,
    pub source: Source,
}

/// The CT's mounts that come from the host (`ct`: the CT init's mountinfo, paths as the CT sees
/// them; `host`: berth's own). `Err` names a mount whose host source cannot be found.
pub(super) fn externals(ct: &[MountLine], host: &[MountLine]) -> Result<Vec<External>, String> {
    let mut out = Vec::new();
    for m in ct {
        // The CT's root is the restore's --root, not a mount of its own in the images.
        if m.mountpoint == Path::new("/") {
            continue;
        }
        let same_sb: Vec<&MountLine> = host.iter().filter(|h| h.dev == m.dev).collect();
        if same_sb.is_empty() {
            continue;
        }
        let key = format!("berth{}", out.len());
        if m.mountpoint == Path::new("/dev/console") {
            out.push(External {
                key,
                mountpoint: m.mountpoint.clone(),
                source: Source::Console,
            });
            continue;
        }
        // The host mount showing the most of the superblock (shortest root) that covers it.
        let src = same_sb
            .iter()
            .filter_map(|h| {
                let rest = m.root.strip_prefix(&h.root).ok()?;
                Some((h.root.components().count(), h.mountpoint.join(rest)))
            })
            .min_by_key(|(depth, _)| *depth)
            .map(|(_, p)| p)
            .ok_or_else(|| {
                format!(
                    "the CT's mount at {} ({} {}) comes from the host, but no host mount shows \
                     its source",
                    m.mountpoint.display(),
                    m.fstype,
                    m.root.display()
                )
            })?;
        out.push(External {
            key,
            mountpoint: m.mountpoint.clone(),
            source: Source::Host(src),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw
24 23 0:21 / /dev/pts rw shared:3 - devpts devpts rw,mode=600,ptmxmode=000
30 22 0:27 / /sys/fs/cgroup/memory rw shared:9 - cgroup cgroup rw,memory
31 22 0:28 /sub /mnt/x\\040y rw shared:10 - tmpfs tmpfs rw
";
    const CT: &str = "\
100 90 8:1 /var/lib/berth/root/101 / rw master:1 - ext4 /dev/sda1 rw
101 100 0:60 / /proc rw,nosuid - proc proc rw
102 101 0:5 /null /proc/kcore rw - devtmpfs udev rw
103 100 0:61 / /dev rw - tmpfs tmpfs rw
104 103 0:21 /3 /dev/console rw - devpts devpts rw
105 103 0:62 / /dev/pts rw - devpts devpts rw,newinstance
106 100 0:27 /berth/101 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
107 100 0:28 /sub/a /opt/a rw - tmpfs tmpfs rw
";

    #[test]
    fn finds_the_host_binds_and_their_sources() {
        let ext = externals(&parse(CT), &parse(HOST)).unwrap();
        let got: Vec<(&str, &Source)> = ext
            .iter()
            .map(|e| (e.mountpoint.to_str().unwrap(), &e.source))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/proc/kcore", &Source::Host("/dev/null".into())),
                ("/dev/console", &Source::Console),
                (
                    "/sys/fs/cgroup/memory",
                    &Source::Host("/sys/fs/cgroup/memory/berth/101".into())
                ),
                ("/opt/a", &Source::Host("/mnt/x y/a".into())),
            ]
        );
        let keys: Vec<&str> = ext.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["berth0", "berth1", "berth2", "berth3"]);
    }

    #[test]
    fn a_host_superblock_without_a_covering_mount_is_named() {
        let ct = parse("107 100 0:28 /other /opt/b rw - tmpfs tmpfs rw\n");
        let err = externals(&ct, &parse(HOST)).unwrap_err();
        assert!(err.contains("/opt/b"), "{err}");
    }
}
