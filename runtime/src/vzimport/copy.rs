//! Copying an OpenVZ simfs private area into a berth CT: numeric owners (shifted into the CT's
//! id range for an unprivileged CT, POSIX ACL entries included), modes, times, hard links,
//! extended attributes, holes of sparse files, device nodes and fifos.
//!
//! The source may belong to a CT whose root was (or still is) an attacker, so the walk never
//! follows a symlink: every step is relative to an open directory fd, opened with O_NOFOLLOW,
//! and a directory on another filesystem (a mount inside the private area) is refused.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use xattr::FileExt;

use super::ImportError;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

const ACL_ACCESS: &str = "system.posix_acl_access";
const ACL_DEFAULT: &str = "system.posix_acl_default";

/// What a copy did.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyStats {
    pub entries: u64,
    pub bytes: u64,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> ImportError + 'a {
    move |e| ImportError::Io {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

fn ioe<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImportError + 'a {
    move |source| ImportError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Shifts one id by `base`, refusing what the CT's range cannot hold.
pub fn shift_id(id: u32, base: u32, path: &Path) -> Result<u32, ImportError> {
    if id >= crate::userns::RANGE {
        return Err(ImportError::Invalid(format!(
            "{}: owned by id {id}, which an unprivileged CT's {} ids cannot map; import with --privileged or fix the owner on the source",
            path.display(),
            crate::userns::RANGE
        )));
    }
    Ok(base + id)
}

/// Rewrites the ids of a POSIX ACL xattr (version 2: a 4-byte header, then 8-byte entries of
/// tag, perm, id; only ACL_USER (2) and ACL_GROUP (8) carry an id).
pub fn shift_acl(value: &[u8], shift: (u32, u32), path: &Path) -> Result<Vec<u8>, ImportError> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) {
        return Err(ImportError::Invalid(format!(
            "{}: malformed POSIX ACL ({} bytes)",
            path.display(),
            value.len()
        )));
    }
    let mut out = value.to_vec();
    for e in out[4..].chunks_exact_mut(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let base = match tag {
            2 => shift.0,
            8 => shift.1,
            _ => continue,
        };
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        e[4..8].copy_from_slice(&shift_id(id, base, path)?.to_le_bytes());
    }
    Ok(out)
}

/// Rewrites a `security.capability` xattr for a CT whose root is host uid `root`: a v2 value
/// (no owner, honoured only where host root is root) becomes v3 owned by the CT's root, a v3
/// value's root id is shifted; without this, file capabilities (ping's cap_net_raw, ...)
/// would be ignored inside the CT.
pub fn shift_fscaps(value: &[u8], root: u32, path: &Path) -> Result<Vec<u8>, ImportError> {
    const REV_MASK: u32 = 0xff00_0000;
    const REV2: u32 = 0x0200_0000;
    const REV3: u32 = 0x0300_0000;
    let bad = || {
        ImportError::Invalid(format!(
            "{}: malformed security.capability ({} bytes)",
            path.display(),
            value.len()
        ))
    };
    let magic = u32::from_le_bytes(value.get(..4).ok_or_else(bad)?.try_into().expect("4 bytes"));
    match (magic & REV_MASK, value.len()) {
        (REV2, 20) => {
            let mut out = value.to_vec();
            out[..4].copy_from_slice(&(REV3 | (magic & !REV_MASK)).to_le_bytes());
            out.extend(root.to_le_bytes());
            Ok(out)
        }
        (REV3, 24) => {
            let id = u32::from_le_bytes(value[20..24].try_into().expect("4 bytes"));
            let mut out = value.to_vec();
            out[20..24].copy_from_slice(&shift_id(id, root, path)?.to_le_bytes());
            Ok(out)
        }
        _ => Err(bad()),
    }
}

/// An xattr's value as the CT's id range needs it (ACL ids, file capability owner).
pub fn shift_xattr(
    name: &str,
    value: Vec<u8>,
    shift: Option<(u32, u32)>,
    path: &Path,
) -> Result<Vec<u8>, ImportError> {
    match (shift, name) {
        (Some(s), ACL_ACCESS | ACL_DEFAULT) => shift_acl(&value, s, path),
        (Some((u, _)), "security.capability") => shift_fscaps(&value, u, path),
        _ => Ok(value),
    }
}

struct Copier<'a> {
    shift: Option<(u32, u32)>,
    root_dev: u64,
    links: HashMap<(u64, u64), PathBuf>,
    src: PathBuf,
    dst: PathBuf,
    stats: CopyStats,
    progress: Option<&'a mut dyn FnMut(CopyStats)>,
}

fn times(st: &libc::stat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(st.st_atime, st.st_atime_nsec),
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )
}

impl Copier<'_> {
    fn owner(&self, st: &libc::stat) -> Result<(u32, u32), ImportError> {
        match self.shift {
            None => Ok((st.st_uid, st.st_gid)),
            Some((u, g)) => Ok((
                shift_id(st.st_uid, u, &self.src)?,
                shift_id(st.st_gid, g, &self.src)?,
            )),
        }
    }

    fn xattr_value(&self, name: &OsStr, v: Vec<u8>) -> Result<Vec<u8>, ImportError> {
        match name.to_str() {
            Some(n) => shift_xattr(n, v, self.shift, &self.src),
            None => Ok(v),
        }
    }

    /// Owner, mode, xattrs (after chown, which clears file capabilities), times, on an open fd.
    fn finish_fd(&self, fd: OwnedFd, src: &File, st: &libc::stat) -> Result<(), ImportError> {
        let (u, g) = self.owner(st)?;
        nix::unistd::fchown(&fd, Some(Uid::from_raw(u)), Some(Gid::from_raw(g)))
            .map_err(io("chown", &self.dst))?;
        nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(st.st_mode & 0o7777))
            .map_err(io("chmod", &self.dst))?;
        let f = File::from(fd);
        for name in src.list_xattr().map_err(ioe("list xattrs of", &self.src))? {
            let Some(v) = src
                .get_xattr(&name)
                .map_err(ioe("read xattr of", &self.src))?
            else {
                continue;
            };
            let v = self.xattr_value(&name, v)?;
            f.set_xattr(&name, &v)
                .map_err(ioe("set xattr on", &self.dst))?;
        }
        let (a, m) = times(st);
        nix::sys::stat::futimens(&f, &a, &m).map_err(io("set times", &self.dst))
    }

    /// The same by name for nodes that are not opened (symlinks, devices, fifos): xattrs go
    /// through /proc/self/fd/<dir>/<name> with the l* calls, which never follow the last
    /// component.
    fn finish_at(
        &self,
        sdir: &OwnedFd,
        ddir: &OwnedFd,
        name: &CStr,
        st: &libc::stat,
    ) -> Result<(), ImportError> {
        let (u, g) = self.owner(st)?;
        nix::unistd::fchownat(
            ddir,
            name,
            Some(Uid::from_raw(u)),
            Some(Gid::from_raw(g)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io("chown", &self.dst))?;
        let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if !is_link {
            nix::sys::stat::fchmodat(
                ddir,
                name,
                Mode::from_bits_truncate(st.st_mode & 0o7777),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(io("chmod", &self.dst))?;
            let n = OsStr::from_bytes(name.to_bytes());
            let sp = Path::new(&format!("/proc/self/fd/{}", sdir.as_raw_fd())).join(n);
            let dp = Path::new(&format!("/proc/self/fd/{}", ddir.as_raw_fd())).join(n);
            for x in xattr::list(&sp).map_err(ioe("list xattrs of", &self.src))? {
                if let Some(v) = xattr::get(&sp, &x).map_err(ioe("read xattr of", &self.src))? {
                    let v = self.xattr_value(&x, v)?;
                    xattr::set(&dp, &x, &v).map_err(ioe("set xattr on", &self.dst))?;
                }
            }
        }
        let (a, m) = times(st);
        nix::sys::stat::utimensat(ddir, name, &a, &m, UtimensatFlags::NoFollowSymlink)
            .map_err(io("set times", &self.dst))
    }

    fn copy_dir(&mut self, src: OwnedFd, dst: &OwnedFd) -> Result<(), ImportError> {
        let sfd = src.try_clone().map_err(ioe("dup", &self.src))?;
        let mut dir = Dir::from_fd(src).map_err(io("read directory", &self.src))?;
        for ent in dir.iter() {
            let ent = ent.map_err(io("read directory", &self.src))?;
            let name = ent.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            let os = OsStr::from_bytes(name.to_bytes());
            self.src.push(os);
            self.dst.push(os);
            let r = self.copy_entry(&sfd, dst, name);
            self.src.pop();
            self.dst.pop();
            r?;
        }
        Ok(())
    }

    fn copy_entry(
        &mut self,
        sdir: &OwnedFd,
        ddir: &OwnedFd,
        name: &CStr,
    ) -> Result<(), ImportError> {
        let st = nix::sys::stat::fstatat(sdir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(io("stat", &self.src))?;
        self.stats.entries += 1;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if st.st_dev != self.root_dev {
                    return Err(ImportError::Invalid(format!(
                        "{} is a mount point inside the private area: unmount it first",
                        self.src.display()
                    )));
                }
                nix::sys::stat::mkdirat(ddir, name, Mode::from_bits_truncate(0o700))
                    .map_err(io("create directory", &self.dst))?;
                let s = nix::fcntl::openat(sdir, name, DIR_FLAGS, Mode::empty())
                    .map_err(io("open directory", &self.src))?;
                let d = nix::fcntl::openat(ddir, name, DIR_FLAGS, Mode::empty())
                    .map_err(io("open directory", &self.dst))?;
                let sf = File::from(s.try_clone().map_err(ioe("dup", &self.src))?);
                let d2 = d.try_clone().map_err(ioe("dup", &self.dst))?;
                self.copy_dir(s, &d)?;
                self.finish_fd(d2, &sf, &st)
            }
            libc::S_IFREG => self.copy_file(sdir, ddir, name, &st),
            libc::S_IFLNK => {
                let target =
                    nix::fcntl::readlinkat(sdir, name).map_err(io("read symlink", &self.src))?;
                nix::unistd::symlinkat(target.as_os_str(), ddir, name)
                    .map_err(io("create symlink", &self.dst))?;
                self.finish_at(sdir, ddir, name, &st)
            }
            libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK => {
                let kind = SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT);
                nix::sys::stat::mknodat(
                    ddir,
                    name,
                    kind,
                    Mode::from_bits_truncate(0o600),
                    st.st_rdev,
                )
                .map_err(io("create node", &self.dst))?;
                self.finish_at(sdir, ddir, name, &st)
            }
            _ => {
                tracing::debug!(path = %self.src.display(), "not copying a socket");
                Ok(())
            }
        }
    }

    fn copy_file(
        &mut self,
        sdir: &OwnedFd,
        ddir: &OwnedFd,
        name: &CStr,
        st: &libc::stat,
    ) -> Result<(), ImportError> {
        let key = (st.st_dev, st.st_ino);
        if st.st_nlink > 1
            && let Some(first) = self.links.get(&key)
        {
            return nix::unistd::linkat(AT_FDCWD, first, ddir, name, AtFlags::empty())
                .map_err(io("create hard link", &self.dst));
        }
        let from = nix::fcntl::openat(
            sdir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io("open", &self.src))?;
        let to = nix::fcntl::openat(
            ddir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(io("create", &self.dst))?;
        let len = u64::try_from(st.st_size).unwrap_or(0);
        let from = File::from(from);
        self.copy_sparse(&from, &to, len)?;
        self.finish_fd(to, &from, st)?;
        if st.st_nlink > 1 {
            self.links.insert(key, self.dst.clone());
        }
        self.stats.bytes += len;
        if let Some(p) = self.progress.as_mut() {
            p(self.stats);
        }
        Ok(())
    }

    /// Copies bytes `start..end` of `from` to the same place in `to` with pread/pwrite.
    fn copy_range_rw(
        &self,
        from: &File,
        to: &OwnedFd,
        start: u64,
        end: u64,
    ) -> Result<(), ImportError> {
        use std::os::unix::fs::FileExt as _;
        let to = File::from(to.try_clone().map_err(ioe("dup", &self.dst))?);
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = start;
        while pos < end {
            let want = usize::try_from(end - pos)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = from
                .read_at(&mut buf[..want], pos)
                .map_err(ioe("read", &self.src))?;
            if n == 0 {
                return Ok(()); // the source shrank while copying
            }
            to.write_all_at(&buf[..n], pos)
                .map_err(ioe("write", &self.dst))?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Copies the data ranges SEEK_DATA/SEEK_HOLE report, leaving holes as holes, then sets the
    /// length (a trailing hole).
    fn copy_sparse(&self, from: &File, to: &OwnedFd, len: u64) -> Result<(), ImportError> {
        nix::unistd::ftruncate(to, len as i64).map_err(io("set length", &self.dst))?;
        let fd = from.as_fd();
        let mut pos: i64 = 0;
        let end = len as i64;
        while pos < end {
            let data = match nix::unistd::lseek(fd, pos, nix::unistd::Whence::SeekData) {
                Ok(d) => d,
                Err(Errno::ENXIO) => break, // only a hole is left
                Err(e) => return Err(io("seek", &self.src)(e)),
            };
            let hole = nix::unistd::lseek(fd, data, nix::unistd::Whence::SeekHole)
                .map_err(io("seek", &self.src))?
                .min(end);
            let mut off_in = data;
            let mut off_out = data;
            while off_in < hole {
                let want = usize::try_from(hole - off_in)
                    .unwrap_or(usize::MAX)
                    .min(1 << 30);
                // SAFETY: both fds are open; the offsets are ours and advanced by the kernel.
                let r = unsafe {
                    libc::copy_file_range(
                        from.as_raw_fd(),
                        &mut off_in,
                        to.as_raw_fd(),
                        &mut off_out,
                        want,
                        0,
                    )
                };
                if r < 0 {
                    let e = Errno::last();
                    if e == Errno::EINTR {
                        continue;
                    }
                    // Another filesystem type (a ploop image's ext4 onto the berth root's
                    // xfs, say): the kernel will not copy across, so copy through memory.
                    if matches!(
                        e,
                        Errno::EXDEV | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL
                    ) {
                        self.copy_range_rw(from, to, off_in as u64, hole as u64)?;
                        break;
                    }
                    return Err(io("copy file data", &self.dst)(e));
                }
                if r == 0 {
                    return Ok(()); // the source shrank while copying
                }
            }
            pos = hole;
        }
        Ok(())
    }
}

/// Copies the tree `src` into the new directory `dst` (its parent must exist, `dst` must not).
/// `progress` is called after each regular file with the running totals. On failure the
/// caller removes `dst`.
pub fn copy_private(
    src: &Path,
    dst: &Path,
    shift: Option<(u32, u32)>,
    progress: Option<&mut dyn FnMut(CopyStats)>,
) -> Result<CopyStats, ImportError> {
    let st = nix::sys::stat::lstat(src).map_err(io("stat", src))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(ImportError::Invalid(format!(
            "private area {} is not a directory",
            src.display()
        )));
    }
    nix::unistd::mkdir(dst, Mode::from_bits_truncate(0o700)).map_err(io("create", dst))?;
    let mut c = Copier {
        shift,
        root_dev: st.st_dev,
        links: HashMap::new(),
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
        stats: CopyStats::default(),
        progress,
    };
    let s = nix::fcntl::openat(AT_FDCWD, src, DIR_FLAGS, Mode::empty())
        .map_err(io("open directory", src))?;
    let d = nix::fcntl::openat(AT_FDCWD, dst, DIR_FLAGS, Mode::empty())
        .map_err(io("open directory", dst))?;
    let sf = File::from(s.try_clone().map_err(ioe("dup", src))?);
    let d2 = d.try_clone().map_err(ioe("dup", dst))?;
    c.copy_dir(s, &d)?;
    c.finish_fd(d2, &sf, &st)?;
    Ok(c.stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_ids_shift_and_unmappable_ones_are_named() {
        // header, USER_OBJ, USER 1001, GROUP 2000, MASK, OTHER
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, id) in [
            (1u16, u32::MAX),
            (2, 1001),
            (8, 2000),
            (0x10, u32::MAX),
            (0x20, u32::MAX),
        ] {
            v.extend(tag.to_le_bytes());
            v.extend(7u16.to_le_bytes());
            v.extend(id.to_le_bytes());
        }
        let out = shift_acl(&v, (100_000, 200_000), Path::new("f")).unwrap();
        let id =
            |i: usize| u32::from_le_bytes(out[4 + i * 8 + 4..4 + i * 8 + 8].try_into().unwrap());
        assert_eq!(id(0), u32::MAX);
        assert_eq!(id(1), 101_001);
        assert_eq!(id(2), 202_000);
        assert_eq!(id(3), u32::MAX);
        let mut big = v.clone();
        big[4 + 8 + 4..4 + 8 + 8].copy_from_slice(&70_000u32.to_le_bytes());
        let e = shift_acl(&big, (1, 1), Path::new("/p/f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/p/f") && e.contains("70000"), "{e}");
        assert!(shift_acl(&v[..7], (1, 1), Path::new("f")).is_err());
    }

    #[test]
    fn file_capabilities_get_the_cts_root_as_owner() {
        // v2, effective, cap_net_raw (bit 13) permitted.
        let mut v2 = 0x0200_0001u32.to_le_bytes().to_vec();
        v2.extend((1u32 << 13).to_le_bytes());
        v2.extend([0u8; 12]);
        let v3 = shift_fscaps(&v2, 100_000, Path::new("ping")).unwrap();
        assert_eq!(v3.len(), 24);
        assert_eq!(u32::from_le_bytes(v3[..4].try_into().unwrap()), 0x0300_0001);
        assert_eq!(&v3[4..20], &v2[4..20]);
        assert_eq!(u32::from_le_bytes(v3[20..].try_into().unwrap()), 100_000);
        let again = shift_fscaps(
            &v3[..20]
                .iter()
                .copied()
                .chain(7u32.to_le_bytes())
                .collect::<Vec<_>>(),
            100_000,
            Path::new("p"),
        )
        .unwrap();
        assert_eq!(u32::from_le_bytes(again[20..].try_into().unwrap()), 100_007);
        assert!(shift_fscaps(&v2[..10], 1, Path::new("p")).is_err());
    }
}
