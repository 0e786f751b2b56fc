//! Id-mapped mounts (`mount_setattr(MOUNT_ATTR_IDMAP)`, Linux ≥ 5.12): an unprivileged CT's
//! overlay gets the shared template as a lower layer seen through the CT's id mapping, so
//! template uid 0 is the CT's root (host uid `uid_base`) without a shifted copy per CT.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};

use super::{Result, UsernsError, io_err};
use crate::config::UserNs;

fn sys(op: impl Into<String>) -> impl FnOnce(Errno) -> UsernsError {
    let op = op.into();
    move |source| UsernsError::Sys { op, source }
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| UsernsError::Sys {
        op: format!("path {} contains NUL", p.display()),
        source: Errno::EINVAL,
    })
}

/// A user namespace with `u`'s mapping, as an fd (the mapping is all an idmapped mount needs
/// from it). A short-lived child unshares it; berth writes its maps and keeps the ns fd.
pub fn userns_fd(u: &UserNs) -> Result<OwnedFd> {
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let (done_r, done_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    // SAFETY: the child only makes raw system calls (async-signal-safe) and _exits, so forking
    // is sound even if the caller has other threads.
    let child = match unsafe { nix::unistd::fork() }.map_err(sys("fork id-map helper"))? {
        nix::unistd::ForkResult::Child => unsafe {
            // The parent's ends: holding done_w here would keep the read below from seeing EOF.
            libc::close(done_w.as_raw_fd());
            libc::close(ready_r.as_raw_fd());
            let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
            let b = [u8::from(ok)];
            libc::write(ready_w.as_raw_fd(), b.as_ptr().cast(), 1);
            let mut x = [0u8; 1];
            libc::read(done_r.as_raw_fd(), x.as_mut_ptr().cast(), 1);
            libc::_exit(0)
        },
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop((ready_w, done_r));
    let res = (|| {
        let mut b = [0u8; 1];
        let n = nix::unistd::read(&ready_r, &mut b).map_err(sys("read id-map helper"))?;
        if n != 1 || b[0] != 1 {
            return Err(UsernsError::Sys {
                op: "unshare a user namespace for an id-mapped mount".into(),
                source: Errno::EPERM,
            });
        }
        for (file, base) in [("uid_map", u.uid_base), ("gid_map", u.gid_base)] {
            let p = PathBuf::from(format!("/proc/{child}/{file}"));
            fs::write(&p, format!("0 {base} {}\n", u.size)).map_err(io_err("write", &p))?;
        }
        let p = PathBuf::from(format!("/proc/{child}/ns/user"));
        Ok(OwnedFd::from(
            fs::File::open(&p).map_err(io_err("open", &p))?,
        ))
    })();
    drop(done_w);
    let _ = nix::sys::wait::waitpid(child, None);
    res
}

/// A detached clone of a directory tree with an id mapping applied, attached at a staging
/// directory for as long as it is needed as an overlay layer. Overlayfs takes a private clone
/// of each layer when it is mounted (ovl_get_layers → clone_private_mount), so the staging
/// mount can go as soon as the overlay is up; dropping this detaches it and removes the dir.
pub struct IdmappedTree {
    at: PathBuf,
}

impl IdmappedTree {
    /// Clones `src`, maps it through `userns`, and attaches it at `at` (created, must not exist
    /// as a mount already).
    pub fn attach(src: &Path, userns: &OwnedFd, at: &Path) -> Result<Self> {
        let tree = open_tree_clone(src)?;
        set_idmap(&tree, userns, src)?;
        // A start killed while the staging mount was up left it there.
        detach_all(at);
        fs::create_dir_all(at).map_err(io_err("create directory", at))?;
        let target = cpath(at)?;
        // SAFETY: move_mount with an fd we own and a NUL-terminated path.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if rc != 0 {
            let _ = fs::remove_dir(at);
            return Err(sys(format!(
                "attach id-mapped {} at {}",
                src.display(),
                at.display()
            ))(Errno::last()));
        }
        Ok(Self {
            at: at.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.at
    }
}

impl Drop for IdmappedTree {
    fn drop(&mut self) {
        remove_staging(&self.at);
    }
}

fn detach_all(at: &Path) {
    // Each umount removes the top mount; EINVAL once nothing is mounted there.
    for _ in 0..16 {
        if umount2(at, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// Detaches whatever is mounted at a staging directory and removes it (idempotent: gc calls it
/// for what a killed start left).
pub fn remove_staging(at: &Path) -> bool {
    if fs::symlink_metadata(at).is_err() {
        return false;
    }
    detach_all(at);
    let _ = fs::remove_dir(at);
    true
}

fn open_tree_clone(src: &Path) -> Result<OwnedFd> {
    let p = cpath(src)?;
    // SAFETY: open_tree with a NUL-terminated path; the result is a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            p.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(sys(format!("clone mount of {}", src.display()))(
            Errno::last(),
        ));
    }
    // SAFETY: fd is a fresh descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn set_idmap(tree: &OwnedFd, userns: &OwnedFd, src: &Path) -> Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr on our detached tree fd with a correctly sized mount_attr.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(sys(format!(
            "id-map a mount of {} (the filesystem must support id-mapped mounts)",
            src.display()
        ))(Errno::last()));
    }
    Ok(())
}

/// Whether `src`'s filesystem takes id-mapped mounts (ext4, xfs, btrfs, tmpfs on this kernel;
/// not every filesystem does). Tried on a throwaway detached clone: nothing is attached.
pub fn idmap_supported(src: &Path, userns: &OwnedFd) -> Result<()> {
    let tree = open_tree_clone(src)?;
    set_idmap(&tree, userns, src)
}
