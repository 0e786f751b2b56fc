//! Shifting the ownership of a private area when a stopped CT changes mode.
//!
//! Resumable by construction: an id already on the target side of the shift is left as it is,
//! so a conversion killed halfway is finished by running it again (ids below 65536 and ids of
//! the CT's range never overlap, because every pool starts above 65536).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{RANGE, Result, UsernsError, io_err};
use crate::config::UserNs;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShiftDirection {
    /// Privileged → unprivileged: id x (< 65536) becomes base + x.
    Into(UserNs),
    /// Unprivileged → privileged: id base + x becomes x.
    OutOf(UserNs),
}

impl ShiftDirection {
    /// The new id, `Some(id)` unchanged when already shifted, `None` when it cannot be mapped.
    fn map(&self, id: u32, uid: bool) -> Option<u32> {
        match *self {
            ShiftDirection::Into(u) => {
                let base = if uid { u.uid_base } else { u.gid_base };
                if id < RANGE.min(u.size) {
                    Some(base + id)
                } else if (base..base + u.size).contains(&id) {
                    Some(id)
                } else {
                    None
                }
            }
            ShiftDirection::OutOf(u) => {
                let base = if uid { u.uid_base } else { u.gid_base };
                if (base..base + u.size).contains(&id) {
                    Some(id - base)
                } else if id < RANGE {
                    Some(id)
                } else {
                    None
                }
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            ShiftDirection::Into(u) => format!(
                "into the CT's range {}..{} (only ids below {} map)",
                u.uid_base,
                u64::from(u.uid_base) + u64::from(u.size),
                u.size
            ),
            ShiftDirection::OutOf(u) => format!(
                "out of the CT's range {}..{}",
                u.uid_base,
                u64::from(u.uid_base) + u64::from(u.size)
            ),
        }
    }
}

/// Every entry under `root` (itself included), depth first, without following symlinks or
/// crossing into other filesystems.
fn walk(root: &Path, mut f: impl FnMut(&Path, &fs::Metadata) -> Result<()>) -> Result<()> {
    let top = fs::symlink_metadata(root).map_err(io_err("stat", root))?;
    let dev = top.dev();
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).map_err(io_err("stat", &p))?;
        f(&p, &md)?;
        if md.is_dir() && md.dev() == dev {
            for e in fs::read_dir(&p).map_err(io_err("read directory", &p))? {
                stack.push(e.map_err(io_err("read directory", &p))?.path());
            }
        }
    }
    Ok(())
}

/// The first entry under `root` whose owner cannot be shifted `dir` (nothing is changed).
pub fn unmappable_ids(root: &Path, dir: ShiftDirection) -> Result<()> {
    walk(root, |p, md| {
        if dir.map(md.uid(), true).is_none() || dir.map(md.gid(), false).is_none() {
            return Err(UsernsError::Unmappable {
                path: p.to_path_buf(),
                uid: md.uid(),
                gid: md.gid(),
                how: dir.describe(),
            });
        }
        Ok(())
    })
}

/// Shifts the owner of every entry under `root` (check with [`unmappable_ids`] first). Modes
/// are put back after the chown, which clears set-id bits. Returns how many entries changed.
pub fn shift_tree(root: &Path, dir: ShiftDirection) -> Result<u64> {
    let mut changed = 0;
    walk(root, |p, md| {
        let (Some(uid), Some(gid)) = (dir.map(md.uid(), true), dir.map(md.gid(), false)) else {
            return Err(UsernsError::Unmappable {
                path: p.to_path_buf(),
                uid: md.uid(),
                gid: md.gid(),
                how: dir.describe(),
            });
        };
        if (uid, gid) == (md.uid(), md.gid()) {
            return Ok(());
        }
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(io_err("chown", p))?;
        if !md.file_type().is_symlink() && md.mode() & 0o6000 != 0 {
            fs::set_permissions(p, fs::Permissions::from_mode(md.mode() & 0o7777))
                .map_err(io_err("chmod", p))?;
        }
        changed += 1;
        Ok(())
    })?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const U: UserNs = UserNs {
        uid_base: 1_000_000,
        gid_base: 2_000_000,
        size: RANGE,
    };

    #[test]
    fn maps_both_ways_and_is_idempotent() {
        let into = ShiftDirection::Into(U);
        assert_eq!(into.map(0, true), Some(1_000_000));
        assert_eq!(into.map(0, false), Some(2_000_000));
        assert_eq!(into.map(65_535, true), Some(1_065_535));
        assert_eq!(into.map(1_000_005, true), Some(1_000_005));
        assert_eq!(into.map(70_000, true), None);
        let out = ShiftDirection::OutOf(U);
        assert_eq!(out.map(1_000_000, true), Some(0));
        assert_eq!(out.map(2_000_033, false), Some(33));
        assert_eq!(out.map(33, false), Some(33));
        assert_eq!(out.map(3_000_000, true), None);
    }

    #[test]
    fn shifts_a_tree_and_back() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("t");
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/passwd"), "x").unwrap();
        fs::write(r.join("suid"), "x").unwrap();
        std::os::unix::fs::lchown(r.join("suid"), Some(5), Some(6)).unwrap();
        fs::set_permissions(r.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        symlink("etc/passwd", r.join("link")).unwrap();
        unmappable_ids(&r, ShiftDirection::Into(U)).unwrap();
        assert_eq!(shift_tree(&r, ShiftDirection::Into(U)).unwrap(), 5);
        let md = fs::symlink_metadata(r.join("suid")).unwrap();
        assert_eq!((md.uid(), md.gid()), (1_000_005, 2_000_006));
        assert_eq!(md.mode() & 0o7777, 0o4755);
        assert_eq!(
            fs::symlink_metadata(r.join("link")).unwrap().uid(),
            1_000_000
        );
        // Again: nothing left to change (a killed conversion resumes like this).
        assert_eq!(shift_tree(&r, ShiftDirection::Into(U)).unwrap(), 0);
        assert_eq!(shift_tree(&r, ShiftDirection::OutOf(U)).unwrap(), 5);
        assert_eq!(fs::symlink_metadata(r.join("suid")).unwrap().uid(), 5);
        std::os::unix::fs::lchown(r.join("etc/passwd"), Some(70_000), None).unwrap();
        let e = unmappable_ids(&r, ShiftDirection::Into(U))
            .unwrap_err()
            .to_string();
        assert!(e.contains("passwd") && e.contains("70000"), "{e}");
    }
}
