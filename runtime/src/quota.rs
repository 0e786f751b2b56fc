//! `--diskspace`: per-CT disk limits with project quotas (ext4, xfs, f2fs).
//!
//! A CT's private area is tagged with project id = CTID (`FS_IOC_FSSETXATTR`, with
//! `FS_XFLAG_PROJINHERIT` on directories so new files inherit it), and the project gets block
//! limits with `quotactl(Q_SETQUOTA, PRJQUOTA)`. Where the filesystem cannot do this the caller gets
//! [`QuotaError::Unsupported`] saying why — never a silent no-op, since a hoster would sell a limit
//! that is not there.
//!
//! quotactl_fd(2) (Linux 5.14) is used so no block device path is needed (`/dev/root` often does
//! not exist in the mount namespace); older kernels fall back to quotactl(2) with the device from
//! mountinfo.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::statfs::{
    BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, F2FS_SUPER_MAGIC, FsType, NFS_SUPER_MAGIC,
    OVERLAYFS_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC,
};

use crate::size::Size;

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("--diskspace unsupported on {fs} at {}: {why}", path.display())]
    Unsupported {
        path: PathBuf,
        fs: String,
        why: String,
    },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk quota of CT {ctid} at {}: {op}", path.display())]
    Quotactl {
        op: &'static str,
        ctid: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--diskspace for CT 0 at {}: project 0 means \"no project\"", path.display())]
    ProjectZero { path: PathBuf },
}

pub type Result<T, E = QuotaError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> QuotaError {
    let path = path.to_path_buf();
    move |source| QuotaError::Io { op, path, source }
}

const PRJQUOTA: u32 = 2;
/// Quota block size of the Q_GETQUOTA/Q_SETQUOTA interface (QIF_DQBLKSIZE), whatever the fs uses.
const QIF_DQBLKSIZE: u64 = 1024;
/// Q_XGETQSTATV: the versioned state query, answered by XFS and by the VFS quota code (ext4, f2fs).
const Q_XGETQSTATV: u32 = ((b'X' as u32) << 8) + 8;
const FS_QSTATV_VERSION1: i8 = 1;
const FS_QUOTA_PDQ_ACCT: u16 = 1 << 4;
const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;

/// `struct fsxattr` from linux/fs.h.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FsXattr {
    pub fsx_xflags: u32,
    pub fsx_extsize: u32,
    pub fsx_nextents: u32,
    pub fsx_projid: u32,
    pub fsx_cowextsize: u32,
    pub fsx_pad: [u8; 8],
}

nix::ioctl_read!(fs_ioc_fsgetxattr, b'X', 31, FsXattr);
nix::ioctl_write_ptr!(fs_ioc_fssetxattr, b'X', 32, FsXattr);

/// `struct fs_qfilestatv` from linux/dqblk_xfs.h.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FsQfilestatv {
    qfs_ino: u64,
    qfs_nblks: u64,
    qfs_nextents: u32,
    qfs_pad: u32,
}

/// `struct fs_quota_statv` from linux/dqblk_xfs.h.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FsQuotaStatv {
    qs_version: i8,
    qs_pad1: u8,
    qs_flags: u16,
    qs_incoredqs: u32,
    qs_uquota: FsQfilestatv,
    qs_gquota: FsQfilestatv,
    qs_pquota: FsQfilestatv,
    qs_btimelimit: i32,
    qs_itimelimit: i32,
    qs_rtbtimelimit: i32,
    qs_bwarnlimit: u16,
    qs_iwarnlimit: u16,
    qs_rtbwarnlimit: u16,
    qs_pad3: u16,
    qs_pad4: u32,
    qs_pad2: [u64; 7],
}

fn qcmd(cmd: u32, kind: u32) -> u32 {
    (cmd << 8) | (kind & 0xff)
}

/// The filesystem holding a private area, with a handle for quotactl.
struct Target {
    path: PathBuf,
    dir: File,
    fs: String,
    /// Block device from mountinfo, for kernels without quotactl_fd.
    device: Option<PathBuf>,
}

impl Target {
    fn open(path: &Path) -> Result<Self> {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err("open private area", path))?;
        let st = nix::sys::statfs::fstatfs(&dir)
            .map_err(|e| io_err("statfs", path)(io::Error::from(e)))?;
        let magic = st.filesystem_type();
        let dev = dir.metadata().map_err(io_err("stat", path))?.dev();
        let (maj, min) = (libc::major(dev), libc::minor(dev));
        let mount = crate::template::mounts()
            .ok()
            .and_then(|ms| ms.into_iter().rev().find(|m| m.dev == (maj, min)));
        let fs = mount
            .as_ref()
            .map(|m| m.fstype.clone())
            .unwrap_or_else(|| fs_name(magic).to_string());
        let device = mount
            .as_ref()
            .map(|m| PathBuf::from(&m.source))
            .filter(|p| p.is_absolute());
        let t = Target {
            path: path.to_path_buf(),
            dir,
            fs,
            device,
        };
        // ext2, ext3 and ext4 share one magic; ext2/3 are told apart by the mount's type below.
        if ![EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, F2FS_SUPER_MAGIC].contains(&magic) {
            let why = if magic == BTRFS_SUPER_MAGIC {
                "btrfs has no project quotas (it limits subvolumes with qgroups)"
            } else if magic == TMPFS_MAGIC {
                "tmpfs has no project quotas (only user and group quotas, since Linux 6.6)"
            } else {
                "this filesystem has no project quotas (use ext4 or xfs)"
            };
            return Err(t.unsupported(why.to_string()));
        }
        if t.fs == "ext2" || t.fs == "ext3" {
            return Err(t.unsupported("project quotas need ext4".into()));
        }
        Ok(t)
    }

    fn unsupported(&self, why: String) -> QuotaError {
        QuotaError::Unsupported {
            path: self.path.clone(),
            fs: self.fs.clone(),
            why,
        }
    }

    fn enable_hint(&self) -> &'static str {
        match self.fs.as_str() {
            "ext4" => {
                "project quota not enabled (format with -O quota,project or run tune2fs -O quota,project, then mount with prjquota)"
            }
            "xfs" => "project quota not enabled (mount with prjquota)",
            _ => "project quota not enabled (mount with prjquota)",
        }
    }

    /// quotactl on this filesystem: quotactl_fd where the kernel has it, else by device.
    fn quotactl(&self, cmd: u32, id: u32, addr: *mut libc::c_void) -> io::Result<()> {
        let cmd = qcmd(cmd, PRJQUOTA);
        // SAFETY: `addr` points to the struct the command expects (caller's contract); the fd is open.
        let r = unsafe {
            libc::syscall(
                libc::SYS_quotactl_fd,
                self.dir.as_raw_fd() as libc::c_uint,
                cmd as libc::c_uint,
                id as libc::c_int,
                addr,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOSYS) {
            return Err(err);
        }
        let Some(dev) = &self.device else {
            return Err(err);
        };
        let c = std::ffi::CString::new(dev.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: as above; `c` is a NUL-terminated device path.
        let r = unsafe {
            libc::quotactl(
                cmd as libc::c_int,
                c.as_ptr(),
                id as libc::c_int,
                addr.cast(),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Fails with Unsupported unless project quotas are accounted and (where the filesystem says)
    /// enforced here. Q_GETINFO answers ESRCH when project quota is off and ENOSYS when the
    /// filesystem has no quota operations at all (tmpfs without CONFIG_TMPFS_QUOTA). ext4 without
    /// the quota feature lacks Q_XGETQSTATV (ENOSYS, seen on 6.18), so that query, which tells
    /// accounting-only apart from enforcing, is only trusted when it answers.
    fn check_enforced(&self) -> Result<()> {
        // Room for struct if_dqinfo (u64 bgrace, u64 igrace, u32 flags, u32 valid).
        let mut info = [0u64; 3];
        if let Err(e) = self.quotactl(libc::Q_GETINFO as u32, 0, info.as_mut_ptr().cast()) {
            let why = match e.raw_os_error() {
                Some(libc::ENOSYS) => format!(
                    "{} has no quota support in this kernel{}",
                    self.fs,
                    match self.fs.as_str() {
                        "xfs" => " (needs CONFIG_XFS_QUOTA)",
                        "ext4" => " (needs CONFIG_QUOTA and CONFIG_QFMT_V2)",
                        _ => "",
                    }
                ),
                Some(libc::ESRCH) => self.enable_hint().to_string(),
                _ => format!("{} (querying quota state: {e})", self.enable_hint()),
            };
            return Err(self.unsupported(why));
        }
        let mut st = FsQuotaStatv {
            qs_version: FS_QSTATV_VERSION1,
            ..Default::default()
        };
        match self.quotactl(Q_XGETQSTATV, 0, (&raw mut st).cast()) {
            Ok(()) if st.qs_flags & FS_QUOTA_PDQ_ACCT == 0 => {
                Err(self.unsupported(self.enable_hint().to_string()))
            }
            Ok(()) if st.qs_flags & FS_QUOTA_PDQ_ENFD == 0 => Err(self.unsupported(
                "project quota is accounted but not enforced (mount with prjquota, or quotaon -P)"
                    .into(),
            )),
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "Q_XGETQSTATV unavailable; relying on Q_GETINFO");
                Ok(())
            }
        }
    }

    fn set_limits(&self, ctid: u32, bytes: u64) -> Result<()> {
        let blocks = bytes.div_ceil(QIF_DQBLKSIZE);
        // SAFETY: dqblk is plain old data; all-zero is a valid value.
        let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
        q.dqb_bhardlimit = blocks;
        q.dqb_bsoftlimit = blocks;
        q.dqb_valid = libc::QIF_BLIMITS;
        self.quotactl(libc::Q_SETQUOTA as u32, ctid, (&raw mut q).cast())
            .map_err(|source| QuotaError::Quotactl {
                op: "set block limit",
                ctid,
                path: self.path.clone(),
                source,
            })
    }
}

fn fs_name(magic: FsType) -> &'static str {
    [
        (EXT4_SUPER_MAGIC, "ext4"),
        (XFS_SUPER_MAGIC, "xfs"),
        (F2FS_SUPER_MAGIC, "f2fs"),
        (TMPFS_MAGIC, "tmpfs"),
        (BTRFS_SUPER_MAGIC, "btrfs"),
        (OVERLAYFS_SUPER_MAGIC, "overlayfs"),
        (NFS_SUPER_MAGIC, "nfs"),
    ]
    .into_iter()
    .find(|(m, _)| *m == magic)
    .map_or("an unknown filesystem", |(_, n)| n)
}

/// Project id and PROJINHERIT flag of a file or directory.
pub fn project_id(path: &Path) -> Result<(u32, bool)> {
    let f = open_nofollow(path)?;
    let mut x = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills a struct fsxattr; `f` is open.
    unsafe { fs_ioc_fsgetxattr(f.as_raw_fd(), &mut x) }
        .map_err(|e| io_err("read project id of", path)(io::Error::from(e)))?;
    Ok((x.fsx_projid, x.fsx_xflags & FS_XFLAG_PROJINHERIT != 0))
}

fn open_nofollow(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("open", path))
}

fn set_project(f: &File, path: &Path, id: u32, dir: bool) -> Result<()> {
    let mut x = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills a struct fsxattr; `f` is open.
    unsafe { fs_ioc_fsgetxattr(f.as_raw_fd(), &mut x) }
        .map_err(|e| io_err("read project id of", path)(io::Error::from(e)))?;
    let want_flags = if dir {
        x.fsx_xflags | FS_XFLAG_PROJINHERIT
    } else {
        x.fsx_xflags
    };
    if x.fsx_projid == id && x.fsx_xflags == want_flags {
        return Ok(());
    }
    x.fsx_projid = id;
    x.fsx_xflags = want_flags;
    // SAFETY: FS_IOC_FSSETXATTR reads a struct fsxattr; `f` is open.
    unsafe { fs_ioc_fssetxattr(f.as_raw_fd(), &x) }
        .map_err(|e| io_err("set project id of", path)(io::Error::from(e)))?;
    Ok(())
}

/// Tags `root` and everything below it (same filesystem only, symlinks not followed) with project
/// `id`, directories also with PROJINHERIT. Symlinks, devices and fifos cannot be opened for the
/// ioctl; they take no data blocks (a long symlink's one block stays with its old project).
pub fn set_project_tree(root: &Path, id: u32) -> Result<()> {
    let rootdev = fs::symlink_metadata(root)
        .map_err(io_err("stat", root))?
        .dev();
    fn walk(dir: &Path, id: u32, dev: u64) -> Result<()> {
        let f = open_nofollow(dir)?;
        set_project(&f, dir, id, true)?;
        for ent in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            let ent = ent.map_err(io_err("read directory", dir))?;
            let ft = ent.file_type().map_err(io_err("stat", &ent.path()))?;
            let p = ent.path();
            if ft.is_dir() {
                let m = fs::symlink_metadata(&p).map_err(io_err("stat", &p))?;
                if m.dev() != dev {
                    tracing::debug!(path = %p.display(), "not tagging a different filesystem");
                    continue;
                }
                walk(&p, id, dev)?;
            } else if ft.is_file() {
                let f = open_nofollow(&p)?;
                set_project(&f, &p, id, false)?;
            }
        }
        Ok(())
    }
    walk(root, id, rootdev)
}

/// Limits CT `ctid`'s private area to `limit` (soft = hard). `Size::Unlimited` keeps accounting
/// (for [`diskspace_usage`]) without a limit. Checks support first and changes nothing if the
/// filesystem cannot enforce it.
pub fn set_diskspace(private: &Path, ctid: u32, limit: Size) -> Result<()> {
    if ctid == 0 {
        return Err(QuotaError::ProjectZero {
            path: private.to_path_buf(),
        });
    }
    let t = Target::open(private)?;
    t.check_enforced()?;
    // Once the top directory carries the project with PROJINHERIT, everything created below
    // inherits it, and ext4/xfs refuse (EXDEV) renames and links into it from other projects, so
    // the walk only needs to run the first time.
    match project_id(private)? {
        (id, true) if id == ctid => {}
        _ => set_project_tree(private, ctid)?,
    }
    t.set_limits(ctid, limit.bytes().unwrap_or(0))?;
    tracing::info!(ctid, path = %private.display(), %limit, "disk quota set");
    Ok(())
}

/// Bytes used by CT `ctid`'s project and its limit.
pub fn diskspace_usage(private: &Path, ctid: u32) -> Result<(u64, Size)> {
    let t = Target::open(private)?;
    t.check_enforced()?;
    // SAFETY: dqblk is plain old data; all-zero is a valid value.
    let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
    t.quotactl(libc::Q_GETQUOTA as u32, ctid, (&raw mut q).cast())
        .map_err(|source| QuotaError::Quotactl {
            op: "read usage",
            ctid,
            path: private.to_path_buf(),
            source,
        })?;
    let limit = match q.dqb_bhardlimit {
        0 => Size::Unlimited,
        b => Size::Bytes(b.saturating_mul(QIF_DQBLKSIZE)),
    };
    Ok((q.dqb_curspace, limit))
}

/// Removes CT `ctid`'s limit. The files keep their project id, which costs nothing and keeps
/// usage accounted if a limit is set again.
pub fn clear_diskspace(private: &Path, ctid: u32) -> Result<()> {
    let t = Target::open(private)?;
    t.check_enforced()?;
    t.set_limits(ctid, 0)?;
    tracing::info!(ctid, path = %private.display(), "disk quota cleared");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain::{ErrorChain, assert_causes_not_repeated};

    #[test]
    fn struct_layouts_match_the_kernel() {
        // Sizes from linux/fs.h and linux/dqblk_xfs.h on x86_64.
        assert_eq!(std::mem::size_of::<FsXattr>(), 28);
        assert_eq!(std::mem::size_of::<FsQuotaStatv>(), 160);
        assert_eq!(
            qcmd(libc::Q_SETQUOTA as u32, PRJQUOTA) as i32,
            0x8000_0802u32 as i32
        );
    }

    #[test]
    fn tmpfs_is_unsupported() {
        // /dev/shm is tmpfs on every Linux host berth targets.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let err = set_diskspace(dir.path(), 101, Size::Bytes(10 << 20)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, QuotaError::Unsupported { .. }), "{msg}");
        assert!(
            msg.contains("--diskspace unsupported on tmpfs at /dev/shm/"),
            "{msg}"
        );
    }

    #[test]
    fn missing_private_area_names_the_path() {
        let err = diskspace_usage(Path::new("/nonexistent/berth/private/7"), 7).unwrap_err();
        assert!(
            matches!(&err, QuotaError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
        assert_causes_not_repeated(&err);
        assert_eq!(
            ErrorChain(&err).to_string(),
            "open private area /nonexistent/berth/private/7: No such file or directory (os error 2)"
        );
    }
}
