//! Copying a template into a CT private area, and removing private areas.
//!
//! This is on the create path of the create→start→stop→destroy budget, so it avoids work:
//! regular files are reflinked (FICLONE) where the filesystem shares extents (btrfs, xfs with
//! reflink) and otherwise copied in the kernel with copy_file_range (no user-space buffer);
//! ownership is only changed when it differs from what a fresh file gets anyway.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use super::fsutil::mount_points_below;
use super::{Result, TemplateError, io_err, nix_err};

struct Copier {
    shift: Option<(u32, u32)>,
    euid: u32,
    egid: u32,
    root_dev: u64,
    /// (dev, ino) of multiply-linked files already copied → their copy, to recreate hard links.
    links: HashMap<(u64, u64), PathBuf>,
    /// Cleared after the first FICLONE the filesystem refuses, so ext4 pays for one failed ioctl.
    try_clone: bool,
    /// Cleared when copy_file_range is unavailable between these two filesystems.
    try_cfr: bool,
}

fn times(m: &fs::Metadata) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(m.atime(), m.atime_nsec()),
        TimeSpec::new(m.mtime(), m.mtime_nsec()),
    )
}

impl Copier {
    fn owner(&self, m: &fs::Metadata, path: &Path) -> Result<(u32, u32)> {
        let (uid, gid) = (m.uid(), m.gid());
        let Some((ub, gb)) = self.shift else {
            return Ok((uid, gid));
        };
        // u32::MAX is "leave unchanged" to chown(2), so it is not a usable id either.
        match (uid.checked_add(ub), gid.checked_add(gb)) {
            (Some(u), Some(g)) if u != u32::MAX && g != u32::MAX => Ok((u, g)),
            _ => Err(TemplateError::Refused {
                op: "shift owner",
                path: path.to_path_buf(),
                why: format!("{uid}:{gid} shifted by {ub}:{gb} overflows 32-bit ids"),
            }),
        }
    }

    fn chown(&self, path: &Path, owner: (u32, u32), follow: bool) -> Result<()> {
        if owner == (self.euid, self.egid) {
            return Ok(());
        }
        let flag = if follow {
            nix::fcntl::AtFlags::empty()
        } else {
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW
        };
        nix::unistd::fchownat(
            AT_FDCWD,
            path,
            Some(Uid::from_raw(owner.0)),
            Some(Gid::from_raw(owner.1)),
            flag,
        )
        .map_err(nix_err("chown", path))
    }

    /// Owner, then mode (chown clears set-id bits), then times (both change ctime, not mtime).
    fn finish(&self, path: &Path, m: &fs::Metadata) -> Result<()> {
        let owner = self.owner(m, path)?;
        self.chown(path, owner, true)?;
        fs::set_permissions(path, fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(io_err("chmod", path))?;
        let (a, mt) = times(m);
        nix::sys::stat::utimensat(AT_FDCWD, path, &a, &mt, UtimensatFlags::FollowSymlink)
            .map_err(nix_err("set times", path))
    }

    fn copy_dir(&mut self, src: &Path, dst: &Path) -> Result<()> {
        for ent in fs::read_dir(src).map_err(io_err("read directory", src))? {
            let ent = ent.map_err(io_err("read directory", src))?;
            let s = ent.path();
            let d = dst.join(ent.file_name());
            let m = fs::symlink_metadata(&s).map_err(io_err("stat", &s))?;
            let ft = m.file_type();
            if ft.is_dir() {
                if m.dev() != self.root_dev {
                    return Err(TemplateError::Refused {
                        op: "copy template",
                        path: s,
                        why: "is a mount point inside the template; unmount it".into(),
                    });
                }
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&d)
                    .map_err(io_err("create directory", &d))?;
                self.copy_dir(&s, &d)?;
                self.finish(&d, &m)?;
            } else if ft.is_file() {
                self.copy_file(&s, &d, &m)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&s).map_err(io_err("read symlink", &s))?;
                std::os::unix::fs::symlink(&target, &d).map_err(io_err("create symlink", &d))?;
                let owner = self.owner(&m, &s)?;
                self.chown(&d, owner, false)?;
                let (a, mt) = times(&m);
                nix::sys::stat::utimensat(AT_FDCWD, &d, &a, &mt, UtimensatFlags::NoFollowSymlink)
                    .map_err(nix_err("set times", &d))?;
            } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
                let kind = SFlag::from_bits_truncate(m.mode() & libc::S_IFMT);
                nix::sys::stat::mknod(&d, kind, Mode::from_bits_truncate(0o600), m.rdev())
                    .map_err(nix_err("create node", &d))?;
                self.finish(&d, &m)?;
            } else {
                tracing::debug!(path = %s.display(), "not copying socket");
            }
        }
        Ok(())
    }

    fn copy_file(&mut self, src: &Path, dst: &Path, m: &fs::Metadata) -> Result<()> {
        let key = (m.dev(), m.ino());
        if m.nlink() > 1 {
            if let Some(first) = self.links.get(&key) {
                return fs::hard_link(first, dst).map_err(io_err("create hard link", dst));
            }
        }
        let from = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
            .map_err(io_err("open", src))?;
        let to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dst)
            .map_err(io_err("create", dst))?;
        if m.len() > 0 {
            self.copy_data(&from, &to, m.len(), dst)?;
        }
        let owner = self.owner(m, src)?;
        if owner != (self.euid, self.egid) {
            nix::unistd::fchown(
                &to,
                Some(Uid::from_raw(owner.0)),
                Some(Gid::from_raw(owner.1)),
            )
            .map_err(nix_err("chown", dst))?;
        }
        to.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(io_err("chmod", dst))?;
        let (a, mt) = times(m);
        nix::sys::stat::futimens(&to, &a, &mt).map_err(nix_err("set times", dst))?;
        if m.nlink() > 1 {
            self.links.insert(key, dst.to_path_buf());
        }
        Ok(())
    }

    fn copy_data(&mut self, from: &File, to: &File, len: u64, dst: &Path) -> Result<()> {
        if self.try_clone {
            // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
            let r = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
            if r == 0 {
                return Ok(());
            }
            match Errno::last() {
                Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY => {
                    self.try_clone = false
                }
                e => return Err(nix_err("clone file", dst)(e)),
            }
        }
        let mut done = 0u64;
        if self.try_cfr {
            while done < len {
                let want = usize::try_from(len - done)
                    .unwrap_or(usize::MAX)
                    .min(1 << 30);
                // SAFETY: both fds are open; null offsets mean "use and advance the file offsets".
                let r = unsafe {
                    libc::copy_file_range(
                        from.as_raw_fd(),
                        std::ptr::null_mut(),
                        to.as_raw_fd(),
                        std::ptr::null_mut(),
                        want,
                        0,
                    )
                };
                let r = if r < 0 {
                    Err(Errno::last())
                } else {
                    Ok(r as usize)
                };
                match r {
                    Ok(0) => break, // source shrank while copying; copy what there is
                    Ok(n) => done += n as u64,
                    Err(Errno::EINTR) => {}
                    Err(Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL)
                        if done == 0 =>
                    {
                        self.try_cfr = false;
                        break;
                    }
                    Err(e) => return Err(nix_err("copy file data", dst)(e)),
                }
            }
            if self.try_cfr {
                return Ok(());
            }
        }
        io::copy(&mut &*from, &mut &*to).map_err(io_err("copy file data", dst))?;
        Ok(())
    }
}

/// Copies the tree `src` to `dest` preserving modes, owners (shifted if asked), times, symlinks,
/// device nodes and hard links within the tree. `dest` must not exist or be an empty directory;
/// on failure whatever was copied is removed again.
pub(crate) fn copy_tree(src: &Path, dest: &Path, shift: Option<(u32, u32)>) -> Result<()> {
    let root_meta = fs::symlink_metadata(src).map_err(io_err("stat", src))?;
    let created = match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dest)
                .map_err(io_err("create private area", dest))?;
            true
        }
        Err(e) => return Err(io_err("stat", dest)(e)),
        Ok(m) if !m.is_dir() => {
            return Err(TemplateError::Refused {
                op: "create private area",
                path: dest.to_path_buf(),
                why: "exists and is not a directory".into(),
            });
        }
        Ok(_) => {
            let mut rd = fs::read_dir(dest).map_err(io_err("read directory", dest))?;
            if rd.next().is_some() {
                return Err(TemplateError::Refused {
                    op: "create private area",
                    path: dest.to_path_buf(),
                    why: "exists and is not empty".into(),
                });
            }
            // A set-gid directory would hand its group to everything created inside, and the
            // skip-chown shortcut relies on new files getting our own ids.
            fs::set_permissions(dest, fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod", dest))?;
            false
        }
    };
    let mut c = Copier {
        shift,
        euid: nix::unistd::geteuid().as_raw(),
        egid: nix::unistd::getegid().as_raw(),
        root_dev: root_meta.dev(),
        links: HashMap::new(),
        try_clone: true,
        try_cfr: true,
    };
    let res = c
        .copy_dir(src, dest)
        .and_then(|()| c.finish(dest, &root_meta));
    if let Err(e) = res {
        let cleanup = if created {
            remove_tree_fast(dest)
        } else {
            remove_contents(dest)
        };
        if let Err(ce) = cleanup {
            tracing::warn!(path = %dest.display(), error = %ce, "could not clean up partial copy");
        }
        return Err(e);
    }
    Ok(())
}

fn remove_contents(dir: &Path) -> Result<()> {
    for ent in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let ent = ent.map_err(io_err("read directory", dir))?;
        remove_tree_fast(&ent.path())?;
    }
    Ok(())
}

/// Removes `path` and everything below it without following symlinks. Refuses (removing
/// nothing) if a mount point is at or below `path`: deleting a CT's private area must never
/// reach into a bind-mounted host directory. A missing `path` is success.
pub fn remove_tree_fast(path: &Path) -> Result<()> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    if !m.is_dir() {
        return fs::remove_file(path).map_err(io_err("remove", path));
    }
    let canon = path.canonicalize().map_err(io_err("resolve", path))?;
    let mounts = mount_points_below(&canon).map_err(io_err("read mountinfo for", path))?;
    if let Some(mp) = mounts.first() {
        return Err(TemplateError::Refused {
            op: "remove tree",
            path: path.to_path_buf(),
            why: format!("{} is a mount point; unmount it first", mp.display()),
        });
    }
    // std's remove_dir_all walks with openat/unlinkat and never follows symlinks (the
    // CVE-2022-21658 fix); the mountinfo check above covers what it would cross into.
    fs::remove_dir_all(path).map_err(io_err("remove tree", path))
}
