//! /proc/self/mountinfo, for refusing to delete through mounts and for finding a filesystem's device.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo, the fields berth needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// `major:minor` of the filesystem (same as `st_dev` of files on it).
    pub dev: (u32, u32),
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 5 || fields.len() < sep + 4 {
            continue;
        }
        let Some((maj, min)) = fields[2].split_once(':') else {
            continue;
        };
        let (Ok(maj), Ok(min)) = (maj.parse(), min.parse()) else {
            continue;
        };
        out.push(MountEntry {
            dev: (maj, min),
            mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
            fstype: fields[sep + 1].to_string(),
            source: String::from_utf8_lossy(&unescape(fields[sep + 2])).into_owned(),
            super_options: fields[sep + 3].to_string(),
        });
    }
    out
}

pub(crate) fn mounts() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Mount points at or below `path` in this mount namespace, deepest first. `path` should be
/// canonical (mountinfo paths are).
pub(crate) fn mount_points_below(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(path))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    Ok(v)
}

/// Lazily detaches every mount at or below `path` (best effort, logged).
pub(crate) fn detach_mounts_below(path: &Path) {
    let Ok(canon) = path.canonicalize() else {
        return;
    };
    let Ok(points) = mount_points_below(&canon) else {
        return;
    };
    for p in points {
        match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => tracing::info!(mount = %p.display(), "detached leftover mount"),
            Err(e) => {
                tracing::warn!(mount = %p.display(), error = %e, "could not detach leftover mount")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:45 / /var/lib/berth rw shared:5 master:2 - ext4 /dev/vdb1 rw,prjquota\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[1].source, "/dev/vdb1");
        assert_eq!(m[1].super_options, "rw,prjquota");
    }
}
