//! What runs inside the freshly cloned CT init before it execs the CT's `/sbin/init`:
//! mounts, pivot_root, /dev, hostname, console, capabilities.
//!
//! Runs in a forked copy of a single-threaded process, so plain Rust (allocation included) is safe.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use caps::Capability;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, fchown};
use nix::unistd::{chdir, dup2_stderr, dup2_stdin, dup2_stdout, pivot_root, sethostname, setsid};

use crate::cgroups::CtCgroupView;
use crate::config::UserNs;

/// Capabilities removed from the CT's bounding set, like OpenVZ's defaults: no module loading,
/// no raw I/O, no clock setting, no MAC policy, no kernel log, no BPF/perf, no process accounting.
pub const DROPPED_CAPS: &[Capability] = &[
    Capability::CAP_SYS_MODULE,
    Capability::CAP_SYS_RAWIO,
    Capability::CAP_SYS_TIME,
    Capability::CAP_SYS_PACCT,
    Capability::CAP_MAC_ADMIN,
    Capability::CAP_MAC_OVERRIDE,
    Capability::CAP_SYSLOG,
    Capability::CAP_WAKE_ALARM,
    Capability::CAP_BLOCK_SUSPEND,
    Capability::CAP_AUDIT_CONTROL,
    Capability::CAP_AUDIT_READ,
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_CHECKPOINT_RESTORE,
];

/// Host paths masked with /dev/null (or an empty read-only tmpfs for dirs) inside the CT.
const MASKED: &[&str] = &[
    "proc/kcore",
    "proc/sysrq-trigger",
    "proc/timer_list",
    "proc/keys",
];

/// Everything the init child needs, prepared by the parent before clone.
pub struct InitSpec {
    pub rootfs: PathBuf,
    pub hostname: Option<String>,
    /// Host path of the console pty slave (bind-mounted onto /dev/console).
    pub console: Option<PathBuf>,
    pub console_fd: Option<RawFd>,
    pub init: String,
    pub userns: bool,
    /// Files the init writes "0" to, joining the CT's cgroups.
    pub join_cgroup: Vec<PathBuf>,
    /// The CT's own cgroups, mounted at /sys/fs/cgroup.
    pub cgroups: CtCgroupView,
    /// The CTs' seccomp filter, installed last before exec.
    pub seccomp: seccompiler::BpfProgram,
}

fn ctx<T, E: std::fmt::Display>(
    r: Result<T, E>,
    what: impl FnOnce() -> String,
) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

fn mnt(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    ctx(mount(src, target, fstype, flags, data), || {
        format!(
            "mount {} on {} ({flags:?})",
            src.or(fstype).unwrap_or("-"),
            target.display()
        )
    })
}

fn ensure_dir(p: &Path) -> Result<(), String> {
    ctx(fs::create_dir_all(p), || {
        format!("create directory {}", p.display())
    })
}

fn ensure_file(p: &Path) -> Result<(), String> {
    if p.symlink_metadata().is_err() {
        ctx(fs::write(p, b""), || {
            format!("create mount point {}", p.display())
        })?;
    }
    Ok(())
}

/// Mount setup inside the new mount namespace, ending in pivot_root into the CT root.
pub fn setup_rootfs(spec: &InitSpec) -> Result<(), String> {
    let root = &spec.rootfs;
    // Host / is usually shared (systemd); without this the CT's mounts would propagate back.
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    // pivot_root needs the new root to be a mount point in this namespace.
    mnt(
        Some(&root.to_string_lossy()),
        root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;

    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc = root.join("proc");
    ensure_dir(&proc)?;
    mnt(Some("proc"), &proc, Some("proc"), nosuid_nodev_noexec, None)?;
    // /proc/sys is read-only except net/, which belongs to the CT's own network namespace.
    let sys_ = proc.join("sys");
    mnt(
        Some(&sys_.to_string_lossy()),
        &sys_,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let sysnet = sys_.join("net");
    mnt(
        Some(&sysnet.to_string_lossy()),
        &sysnet,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    mnt(
        None,
        &sys_,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid_nodev_noexec,
        None,
    )?;

    let sys = root.join("sys");
    ensure_dir(&sys)?;
    // sysfs may only be mounted by the owner of the network namespace; with a user namespace we
    // own it too, since it was created in the same clone.
    mnt(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        nosuid_nodev_noexec | MsFlags::MS_RDONLY,
        None,
    )?;

    setup_cgroupfs(root, &spec.cgroups)?;
    setup_dev(spec)?;

    for d in ["run", "tmp"] {
        ensure_dir(&root.join(d))?;
    }
    mnt(
        Some("tmpfs"),
        &root.join("run"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755,size=64m"),
    )?;

    for m in MASKED {
        let p = root.join(m);
        if p.exists() {
            mnt(Some("/dev/null"), &p, None, MsFlags::MS_BIND, None)?;
        }
    }

    ctx(chdir(root.as_path()), || {
        format!("chdir {}", root.display())
    })?;
    // pivot_root(".", "."): stacks the old root on top of the new one, then detaching "."
    // removes the old root without needing a put_old directory inside the CT.
    ctx(pivot_root(".", "."), || {
        format!("pivot_root into {}", root.display())
    })?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detach old root".to_string()
    })?;
    ctx(chdir("/"), || "chdir /".to_string())?;
    Ok(())
}

/// /sys/fs/cgroup as LXC lays it out: on v1 a tmpfs with one directory per hierarchy, each a bind
/// of the CT's own cgroup there (read-only but for the delegated `name=systemd`), the tmpfs
/// read-only too; on v2 the CT's cgroup on /sys/fs/cgroup itself. Binds of the CT's directories
/// rather than fresh cgroup mounts: a v1 mount must name its hierarchy's exact controller set,
/// and a bind shows the same tree in the cgroup namespace either way.
fn setup_cgroupfs(root: &Path, view: &CtCgroupView) -> Result<(), String> {
    if view.mounts.is_empty() {
        return Ok(());
    }
    let base = root.join("sys/fs/cgroup");
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let bind = |m: &crate::cgroups::CtCgroupMount| {
        mnt(
            Some(&m.source.to_string_lossy()),
            &base.join(&m.target),
            None,
            MsFlags::MS_BIND,
            None,
        )
    };
    if !view.tmpfs {
        for m in &view.mounts {
            bind(m)?;
            if !m.writable {
                remount_ro(&base.join(&m.target))?;
            }
        }
        return Ok(());
    }
    mnt(
        Some("tmpfs"),
        &base,
        Some("tmpfs"),
        locked,
        Some("mode=755,size=64k,nr_inodes=256"),
    )?;
    for m in &view.mounts {
        ensure_dir(&base.join(&m.target))?;
    }
    for (name, target) in &view.links {
        let l = base.join(name);
        ctx(symlink(target, &l), || format!("symlink {}", l.display()))?;
    }
    for m in view.mounts.iter().filter(|m| !m.writable) {
        bind(m)?;
    }
    // One recursive mount_setattr makes the tmpfs and every read-only bind below it read-only:
    // a remount per bind was ~1 ms of each start here (20 mount calls under load).
    let below: Vec<PathBuf> = view
        .mounts
        .iter()
        .filter(|m| !m.writable)
        .map(|m| base.join(&m.target))
        .collect();
    remount_tree_ro(&base, &below)?;
    // Mounting onto a directory of a read-only filesystem is allowed.
    for m in view.mounts.iter().filter(|m| m.writable) {
        bind(m)?;
    }
    Ok(())
}

fn remount_ro(p: &Path) -> Result<(), String> {
    mnt(
        None,
        p,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
}

/// Read-only, nosuid, nodev, noexec for `p` and every mount below it (`below`): one
/// mount_setattr(2) (kernel ≥ 5.12), else a remount of each.
fn remount_tree_ro(p: &Path, below: &[PathBuf]) -> Result<(), String> {
    let path = CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("path {} contains NUL", p.display()))?;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY
            | libc::MOUNT_ATTR_NOSUID
            | libc::MOUNT_ATTR_NODEV
            | libc::MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: path is NUL-terminated and attr outlives the call, whose size argument matches.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(format!(
            "make {} read-only (mount_setattr): {e}",
            p.display()
        ));
    }
    for b in below {
        remount_ro(b)?;
    }
    // A tmpfs is its own superblock: MS_REMOUNT without MS_BIND changes it for every mount.
    mnt(
        None,
        p,
        None,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
}

/// Gives the console pty (a node of the host's devpts) to the CT's root: host root owns it
/// with mode 0620, and the CT's user namespace does not map host root, so without this the
/// CT's init cannot open /dev/console (systemd exits at once with EACCES, printing nothing).
pub fn own_console(slave: &impl AsRawFd, userns: Option<&UserNs>) -> Result<(), String> {
    let Some(u) = userns else {
        return Ok(());
    };
    // SAFETY: the fd is open for the duration of the call (borrowed from `slave`).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(slave.as_raw_fd()) };
    ctx(
        fchown(
            fd,
            Some(Uid::from_raw(u.uid_base)),
            Some(Gid::from_raw(u.gid_base)),
        ),
        || format!("chown the console pty to {}:{}", u.uid_base, u.gid_base),
    )
}

fn setup_dev(spec: &InitSpec) -> Result<(), String> {
    let dev = spec.rootfs.join("dev");
    ensure_dir(&dev)?;
    mnt(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k,nr_inodes=4096"),
    )?;
    const NODES: &[(&str, u64, u64)] = &[
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    for (name, maj, min) in NODES {
        let p = dev.join(name);
        if spec.userns {
            // mknod is refused inside a user namespace: bind the host's node instead.
            ensure_file(&p)?;
            mnt(
                Some(&format!("/dev/{name}")),
                &p,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        } else {
            ctx(
                mknod(
                    &p,
                    SFlag::S_IFCHR,
                    Mode::from_bits_truncate(0o666),
                    makedev(*maj, *min),
                ),
                || format!("mknod {}", p.display()),
            )?;
            // mknod honours the umask; the nodes must be world-usable.
            ctx(
                fs::set_permissions(&p, fs::Permissions::from_mode(0o666)),
                || format!("chmod {}", p.display()),
            )?;
        }
    }
    let pts = dev.join("pts");
    ensure_dir(&pts)?;
    mnt(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    ctx(symlink("pts/ptmx", dev.join("ptmx")), || {
        "symlink /dev/ptmx".into()
    })?;
    let shm = dev.join("shm");
    ensure_dir(&shm)?;
    mnt(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )?;
    for (l, t) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(symlink(t, dev.join(l)), || format!("symlink /dev/{l}"))?;
    }
    if let Some(console) = &spec.console {
        let p = dev.join("console");
        ensure_file(&p)?;
        mnt(
            Some(&console.to_string_lossy()),
            &p,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    Ok(())
}

/// Session, controlling terminal and stdio on the console.
pub fn setup_console(spec: &InitSpec) -> Result<(), String> {
    ctx(setsid(), || "setsid".into())?;
    if let Some(fd) = spec.console_fd {
        // SAFETY: TIOCSCTTY on a tty fd we own; arg 0 = do not steal from another session.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) };
        if rc != 0 {
            return Err(format!(
                "make console the controlling terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd stays open for the duration of the dup2 calls.
        let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        ctx(dup2_stdin(b), || "dup2 console to stdin".into())?;
        ctx(dup2_stdout(b), || "dup2 console to stdout".into())?;
        ctx(dup2_stderr(b), || "dup2 console to stderr".into())?;
        if fd > 2 {
            let _ = nix::unistd::close(fd);
        }
    }
    Ok(())
}

pub fn set_hostname(h: Option<&str>) -> Result<(), String> {
    if let Some(h) = h {
        ctx(sethostname(h), || format!("sethostname {h}"))?;
    }
    Ok(())
}

/// A CT without a configured hostname gets the one in its own /etc/hostname, as its boot
/// scripts would set it (busybox's rcS used to run `hostname -F`, an exec on every start).
/// Read inside the CT (after pivot_root), so a symlink there resolves in the CT's own tree;
/// a missing, oversized or malformed file leaves the hostname alone.
pub fn hostname_from_etc() {
    use std::io::Read;
    let Ok(f) = fs::File::open("/etc/hostname") else {
        return;
    };
    let mut s = String::new();
    if f.take(256).read_to_string(&mut s).is_err() {
        return;
    }
    let h = s.lines().next().unwrap_or("").trim();
    if crate::config::validate_hostname(h).is_ok() {
        let _ = sethostname(h);
    }
}

/// Brings up the CT's loopback interface (down in a new network namespace), which every CT
/// needs and which its boot scripts otherwise do with an `ip` exec on every start.
pub fn bring_up_loopback() -> Result<(), String> {
    // SAFETY: a plain socket and SIOCGIFFLAGS/SIOCSIFFLAGS ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!(
                "socket for loopback: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if rc == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(format!("bring up lo: {err}"));
        }
    }
    Ok(())
}

/// Drops the capabilities a CT must never have from the bounding set (inherited by every
/// descendant) and from the current sets.
pub fn drop_caps() -> Result<(), String> {
    for c in DROPPED_CAPS {
        // Older kernels do not know the newest capabilities (CAP_BPF/PERFMON: 5.8, CHECKPOINT_RESTORE: 5.9).
        if !caps::all().contains(c) {
            continue;
        }
        ctx(caps::drop(None, caps::CapSet::Bounding, *c), || {
            format!("drop {c} from bounding set")
        })?;
        for set in [
            caps::CapSet::Effective,
            caps::CapSet::Permitted,
            caps::CapSet::Inheritable,
        ] {
            ctx(caps::drop(None, set, *c), || format!("drop {c}"))?;
        }
    }
    caps::clear(None, caps::CapSet::Ambient).map_err(|e| format!("clear ambient caps: {e}"))?;
    Ok(())
}

/// Closes every fd above stderr except `keep` (so the CT inherits nothing of berth's).
pub fn close_fds_except(keep: &[RawFd]) {
    let Ok(rd) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        let _ = nix::unistd::close(fd);
    }
}

/// exec's the CT's init with a clean environment. Only returns on failure.
pub fn exec_init(spec: &InitSpec) -> String {
    let Ok(path) = CString::new(spec.init.as_str()) else {
        return format!("init path {:?} contains NUL", spec.init);
    };
    let env = [
        c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        c"TERM=linux",
        c"container=berth",
    ];
    let e = nix::unistd::execve(&path, &[&path], &env).unwrap_err();
    format!("exec {} inside the CT: {e}", spec.init)
}

/// Reads `n` bytes from a raw pipe fd; used to wait for the parent's go-ahead.
pub fn read_exact_fd(fd: RawFd, buf: &mut [u8]) -> Result<(), String> {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: buf is a valid writable slice.
        let n = unsafe { libc::read(fd, buf[off..].as_mut_ptr().cast(), buf.len() - off) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("read from parent: {e}"));
        }
        if n == 0 {
            return Err("parent went away before the CT could start".into());
        }
        off += n as usize;
    }
    Ok(())
}

pub fn fd_of<T: AsRawFd>(t: &T) -> RawFd {
    t.as_raw_fd()
}
