//! Copying a template into a CT private area, and removing private areas.
//!
//! This is on the create path of the create→start→stop→destroy budget, so it avoids work:
//! regular files are reflinked (FICLONE) where the filesystem shares extents (btrfs, xfs with
//! reflink) and otherwise copied in the kernel with copy_file_range (no user-space buffer);
//! ownership is only changed when it differs from what a fresh file gets anyway.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag};
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
    /// Paths of the directories being copied, for error messages and hard links only: all
    /// file operations are relative to open directory fds (no repeated path walks).
    src: PathBuf,
    dst: PathBuf,
    /// File bytes copied, reported as progress.
    task: crate::progress::Task,
}

fn stat_times(st: &libc::stat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(st.st_atime, st.st_atime_nsec),
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl Copier {
    fn owner(&self, st: &libc::stat, path: &Path) -> Result<(u32, u32)> {
        let (uid, gid) = (st.st_uid, st.st_gid);
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

    /// Owner, then mode (chown clears set-id bits), then times, all through an open fd.
    fn finish_fd(&self, fd: &OwnedFd, st: &libc::stat, path: &Path) -> Result<()> {
        let owner = self.owner(st, path)?;
        if owner != (self.euid, self.egid) {
            nix::unistd::fchown(
                fd,
                Some(Uid::from_raw(owner.0)),
                Some(Gid::from_raw(owner.1)),
            )
            .map_err(nix_err("chown", path))?;
        }
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(st.st_mode & 0o7777))
            .map_err(nix_err("chmod", path))?;
        let (a, m) = stat_times(st);
        nix::sys::stat::futimens(fd, &a, &m).map_err(nix_err("set times", path))
    }

    /// Same for a node that cannot be opened (symlink, device, fifo), by name in `dir`.
    fn finish_at(&self, dir: &OwnedFd, name: &CStr, st: &libc::stat, path: &Path) -> Result<()> {
        let owner = self.owner(st, path)?;
        if owner != (self.euid, self.egid) {
            nix::unistd::fchownat(
                dir,
                name,
                Some(Uid::from_raw(owner.0)),
                Some(Gid::from_raw(owner.1)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(nix_err("chown", path))?;
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            nix::sys::stat::fchmodat(
                dir,
                name,
                Mode::from_bits_truncate(st.st_mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(nix_err("chmod", path))?;
        }
        let (a, m) = stat_times(st);
        nix::sys::stat::utimensat(dir, name, &a, &m, UtimensatFlags::NoFollowSymlink)
            .map_err(nix_err("set times", path))
    }

    /// Copies the entries of the open directory `src` into the open directory `dst`.
    fn copy_dir(&mut self, src: OwnedFd, dst: &OwnedFd) -> Result<()> {
        let mut dir = Dir::from_fd(src).map_err(nix_err("read directory", &self.src))?;
        let src_fd = dir
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err("dup", &self.src))?;
        for ent in dir.iter() {
            let ent = ent.map_err(nix_err("read directory", &self.src))?;
            let name = ent.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let os = OsStr::from_bytes(bytes);
            self.src.push(os);
            self.dst.push(os);
            let r = self.copy_entry(&src_fd, dst, name);
            self.src.pop();
            self.dst.pop();
            r?;
        }
        Ok(())
    }

    fn copy_entry(&mut self, src_dir: &OwnedFd, dst_dir: &OwnedFd, name: &CStr) -> Result<()> {
        let st = nix::sys::stat::fstatat(src_dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(nix_err("stat", &self.src))?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if st.st_dev != self.root_dev {
                    return Err(TemplateError::Refused {
                        op: "copy template",
                        path: self.src.clone(),
                        why: "is a mount point inside the template; unmount it".into(),
                    });
                }
                nix::sys::stat::mkdirat(dst_dir, name, Mode::from_bits_truncate(0o700))
                    .map_err(nix_err("create directory", &self.dst))?;
                let s = nix::fcntl::openat(src_dir, name, DIR_FLAGS, Mode::empty())
                    .map_err(nix_err("open directory", &self.src))?;
                let d = nix::fcntl::openat(dst_dir, name, DIR_FLAGS, Mode::empty())
                    .map_err(nix_err("open directory", &self.dst))?;
                self.copy_dir(s, &d)?;
                let path = self.dst.clone();
                self.finish_fd(&d, &st, &path)
            }
            libc::S_IFREG => self.copy_file(src_dir, dst_dir, name, &st),
            libc::S_IFLNK => {
                let target = nix::fcntl::readlinkat(src_dir, name)
                    .map_err(nix_err("read symlink", &self.src))?;
                nix::unistd::symlinkat(target.as_os_str(), dst_dir, name)
                    .map_err(nix_err("create symlink", &self.dst))?;
                self.finish_at(dst_dir, name, &st, &self.dst)
            }
            libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK => {
                let kind = SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT);
                nix::sys::stat::mknodat(
                    dst_dir,
                    name,
                    kind,
                    Mode::from_bits_truncate(0o600),
                    st.st_rdev,
                )
                .map_err(nix_err("create node", &self.dst))?;
                self.finish_at(dst_dir, name, &st, &self.dst)
            }
            _ => {
                tracing::debug!(path = %self.src.display(), "not copying socket");
                Ok(())
            }
        }
    }

    fn copy_file(
        &mut self,
        src_dir: &OwnedFd,
        dst_dir: &OwnedFd,
        name: &CStr,
        st: &libc::stat,
    ) -> Result<()> {
        let key = (st.st_dev, st.st_ino);
        if st.st_nlink > 1
            && let Some(first) = self.links.get(&key)
        {
            // linkat without AT_SYMLINK_FOLLOW: `first` is a regular file we created.
            return nix::unistd::linkat(AT_FDCWD, first, dst_dir, name, AtFlags::empty())
                .map_err(nix_err("create hard link", &self.dst));
        }
        let from = nix::fcntl::openat(
            src_dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(nix_err("open", &self.src))?;
        let to = nix::fcntl::openat(
            dst_dir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(nix_err("create", &self.dst))?;
        let len = u64::try_from(st.st_size).unwrap_or(0);
        if len > 0 {
            let dst = self.dst.clone();
            self.copy_data(&File::from(from), &to, len, &dst)?;
            self.task.advance(len);
        }
        self.finish_fd(&to, st, &self.dst)?;
        if st.st_nlink > 1 {
            self.links.insert(key, self.dst.clone());
        }
        Ok(())
    }

    fn copy_data(&mut self, from: &File, to: &OwnedFd, len: u64, dst: &Path) -> Result<()> {
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
        let mut out = File::from(to.try_clone().map_err(io_err("dup", dst))?);
        io::copy(&mut &*from, &mut out).map_err(io_err("copy file data", dst))?;
        Ok(())
    }
}

/// Copies the tree `src` to `dest` preserving modes, owners (shifted if asked), times, symlinks,
/// device nodes and hard links within the tree. `dest` must not exist or be an empty directory;
/// on failure whatever was copied is removed again.
/// `total` is the tree's size in bytes if known (for the progress report).
pub(crate) fn copy_tree(
    src: &Path,
    dest: &Path,
    shift: Option<(u32, u32)>,
    total: Option<u64>,
) -> Result<()> {
    let root_st = nix::sys::stat::lstat(src).map_err(nix_err("stat", src))?;
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
        root_dev: root_st.st_dev,
        links: HashMap::new(),
        try_clone: true,
        try_cfr: true,
        src: src.to_path_buf(),
        dst: dest.to_path_buf(),
        task: crate::progress::Task::start(&format!("copying {}", src.display()), total),
    };
    let res = (|| {
        let s = nix::fcntl::openat(AT_FDCWD, src, DIR_FLAGS, Mode::empty())
            .map_err(nix_err("open directory", src))?;
        let d = nix::fcntl::openat(AT_FDCWD, dest, DIR_FLAGS, Mode::empty())
            .map_err(nix_err("open directory", dest))?;
        c.copy_dir(s, &d)?;
        c.finish_fd(&d, &root_st, dest)
    })();
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
