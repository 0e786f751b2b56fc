//! The per-CT monitor forked by `start` (or `restore`): it clones init (or has CRIU restore it)
//! and reports its PID over a pipe, then hands off to the serving loop (`serve`) that logs the
//! console and reaps init. The handoff execs the small `berth-mon` binary installed next to
//! `berth` (see `exec`), so a running CT costs a process of a few hundred kB instead of a
//! copy-on-write fork of the CLI with its datapath loaded.
//!
//! After the go-ahead the monitor tells `start` how init's first moments went (`MonitorMsg`):
//! `Failed` if init failed before its exec (init reports that on a pipe of the monitor's own,
//! which its exec closes unwritten), `Exited` if init ended within [`WATCH`] of its exec (with
//! the console's last output, logged before the report is sent), or `Settled` once the CT is
//! idle (see `settle`) or has lived through the window. An init that ends later is recorded in
//! `<run>/<CTID>.exit.json` for `status`, unless `stop` sent [`STOPPING`] first.

pub mod exec;
mod msg;
mod serve;
mod settle;

pub use msg::MonitorMsgError;
pub(super) use msg::{MonitorMsg, console_lines};

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::init;
use crate::config::UserNs;
use crate::ctid::Ctid;
use exec::MonitorExe;
use serve::Served;

/// How long after its exec an init that exits still fails the start.
pub(super) const WATCH: Duration = Duration::from_secs(1);
/// What `stop` sends the monitor before it makes init exit: that exit is no news for `status`.
pub(super) const STOPPING: Signal = Signal::SIGUSR1;

/// Where the monitor writes.
pub(super) struct Paths {
    pub console_log: PathBuf,
    pub last_exit: PathBuf,
}

/// The monitor's name in /proc/PID/comm, which `stop` checks before it signals a recorded PID.
pub(crate) fn comm_name(ctid: Ctid) -> String {
    format!("berth-mon {ctid}")
}

/// What `prepare_run` set up: the CT's console.
struct Prologue {
    master: OwnedFd,
    slave: OwnedFd,
    console_path: PathBuf,
}

/// The part of a monitor's start shared by `start` and `restore`: a session and name of its
/// own, stdio off the CLI's, a console pty owned by the CT's root, and SIGCHLD/[`STOPPING`]
/// blocked (before init exists, so its exit is never missed: the signals stay pending, across
/// the exec into `berth-mon` too, until the serving loop's signalfd reads them).
fn prepare_run(ctid: Ctid, userns: Option<&UserNs>) -> Result<Prologue, String> {
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_name(&std::ffi::CString::new(comm_name(ctid)).unwrap_or_default());
    // The monitor outlives the CLI: it must not hold the CLI's stdio (a caller reading
    // `berth start` output to EOF would hang) nor its CT lock (flock is per open file).
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let b = null.as_fd();
        let _ = nix::unistd::dup2_stdin(b);
        let _ = nix::unistd::dup2_stdout(b);
        let _ = nix::unistd::dup2_stderr(b);
    }
    let pty = nix::pty::openpty(None, None).map_err(|e| format!("open console pty: {e}"))?;
    let console_path =
        nix::unistd::ttyname(&pty.slave).map_err(|e| format!("console pty name: {e}"))?;
    init::own_console(&pty.slave, userns)?;
    let mut chld = nix::sys::signal::SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.add(STOPPING);
    chld.thread_block()
        .map_err(|e| format!("block SIGCHLD and {}: {e}", STOPPING.as_str()))?;
    Ok(Prologue {
        master: pty.master,
        slave: pty.slave,
        console_path,
    })
}

/// The monitor: clones init, tells berth its PID, then hands off to the serving loop.
pub(super) fn monitor_main(
    ctid: Ctid,
    mut spec: init::InitSpec,
    paths: &Paths,
    ready_w: OwnedFd,
    go_r: OwnedFd,
    userns: Option<UserNs>,
    exe: Option<MonitorExe>,
) -> i32 {
    // No panics from here on: unwinding in this forked copy would run the parent's rollback.
    let fail = |error: String| {
        let _ = MonitorMsg::Failed { error }.send(&ready_w);
        1
    };
    let p = match prepare_run(ctid, userns.as_ref()) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // init reports a failure before its exec here; the exec closes it (O_CLOEXEC).
    let (err_r, err_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return fail(format!("pipe: {e}")),
    };
    spec.console = Some(p.console_path.clone());
    spec.console_fd = Some(p.slave.as_raw_fd());
    let mut keep = vec![
        ready_w.as_raw_fd(),
        go_r.as_raw_fd(),
        err_r.as_raw_fd(),
        err_w.as_raw_fd(),
        p.master.as_raw_fd(),
        p.slave.as_raw_fd(),
    ];
    keep.extend(exe.as_ref().map(|e| e.as_raw_fd()));
    init::close_fds_except(&keep);

    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    if userns.is_some() {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    let go_fd = go_r.as_raw_fd();
    let err_fd = err_w.as_raw_fd();
    let mut stack = vec![0u8; 256 * 1024];
    let child = {
        let spec = &spec;
        let cb = Box::new(move || init_main(spec, go_fd, err_fd));
        // SAFETY: clone without CLONE_VM gives the child its own copy of memory, like fork; the
        // monitor is single-threaded.
        unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }
    };
    let child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("clone CT init with {flags:?}: {e}")),
    };
    drop(go_r);
    drop(err_w);
    serve_started(ctid, paths, p, ready_w, Some(err_r), exe, child)
}

/// Reports init's PID to `start`/`restore` (killing init if nobody listens any more), then
/// serves the CT, in `berth-mon` when there is one.
fn serve_started(
    ctid: Ctid,
    paths: &Paths,
    p: Prologue,
    ready_w: OwnedFd,
    err_r: Option<OwnedFd>,
    exe: Option<MonitorExe>,
    child: Pid,
) -> i32 {
    let started = MonitorMsg::Started {
        init_pid: child.as_raw(),
    };
    if started.send(&ready_w).is_err() {
        let _ = kill(child, Signal::SIGKILL);
    }
    exec::hand_off(
        ctid,
        exe,
        Served {
            init: child,
            master: p.master,
            slave: p.slave,
            ready_w,
            err_r,
            console_log: paths.console_log.clone(),
            last_exit: paths.last_exit.clone(),
        },
    )
}

/// The monitor of a CT restored from a checkpoint: the same console logging and reaping as
/// after a start, but init comes from `restore` (CRIU restoring the tree as this process's
/// child, `--restore-sibling`) instead of a clone. `restore` gets the new console's slave and
/// its path and returns init's host PID; its error is reported to `berth restore` as `Failed`.
pub(super) fn adopt_main(
    ctid: Ctid,
    paths: &Paths,
    ready_w: OwnedFd,
    userns: Option<UserNs>,
    exe: Option<MonitorExe>,
    restore: &mut dyn FnMut(BorrowedFd<'_>, &std::path::Path) -> Result<i32, String>,
) -> i32 {
    let fail = |error: String| {
        let _ = MonitorMsg::Failed { error }.send(&ready_w);
        1
    };
    let p = match prepare_run(ctid, userns.as_ref()) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let mut keep = vec![
        ready_w.as_raw_fd(),
        p.master.as_raw_fd(),
        p.slave.as_raw_fd(),
    ];
    keep.extend(exe.as_ref().map(|e| e.as_raw_fd()));
    init::close_fds_except(&keep);
    let init_pid = match restore(p.slave.as_fd(), &p.console_path) {
        Ok(pid) => pid,
        Err(e) => return fail(e),
    };
    serve_started(ctid, paths, p, ready_w, None, exe, Pid::from_raw(init_pid))
}

/// In the cloned init: wait for the go-ahead, build the CT's view of the world, exec init.
fn init_main(spec: &init::InitSpec, go_fd: RawFd, err_fd: RawFd) -> isize {
    let res = (|| -> Result<(), String> {
        let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
        let mut b = [0u8; 1];
        init::read_exact_fd(go_fd, &mut b)?;
        let _ = nix::unistd::close(go_fd);
        // Still single-threaded and on the host's paths: join the CT's cgroups ourselves (the
        // cheap single-thread migration, see join_self_files), then root a cgroup namespace there.
        for f in &spec.join_cgroup {
            fs::write(f, b"0").map_err(|e| format!("join cgroup {}: {e}", f.display()))?;
        }
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| format!("unshare cgroup namespace: {e}"))?;
        if spec.userns {
            nix::unistd::setgroups(&[]).ok();
            nix::unistd::setresgid(0.into(), 0.into(), 0.into())
                .map_err(|e| format!("setgid 0 in user namespace: {e}"))?;
            nix::unistd::setresuid(0.into(), 0.into(), 0.into())
                .map_err(|e| format!("setuid 0 in user namespace: {e}"))?;
        }
        init::set_hostname(spec.hostname.as_deref())?;
        init::setup_rootfs(spec)?;
        if spec.hostname.is_none() {
            init::hostname_from_etc();
        }
        init::bring_up_loopback()?;
        init::setup_console(spec)?;
        init::drop_caps()?;
        init::close_fds_except(&[err_fd]);
        super::seccomp::install(&spec.seccomp)?;
        Err(init::exec_init(spec))
    })();
    if let Err(error) = res {
        // SAFETY: err_fd is the report pipe's write end, open in this process until _exit.
        let fd = unsafe { BorrowedFd::borrow_raw(err_fd) };
        let _ = MonitorMsg::Failed { error }.send(fd);
    }
    // SAFETY: exiting the forked child without running the parent's destructors.
    unsafe { libc::_exit(127) }
}
