//! The per-CT monitor forked by `start`: it clones init, reports to `start` over a pipe, then
//! logs the console and reaps init.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::init;
use crate::config::UserNs;
use crate::ctid::Ctid;

/// The monitor: clones init, tells berth its PID, then logs the console and reaps init.
pub(super) fn monitor_main(
    ctid: Ctid,
    mut spec: init::InitSpec,
    log_path: &Path,
    ready_w: OwnedFd,
    go_r: OwnedFd,
    err_w: OwnedFd,
    userns: Option<UserNs>,
) -> i32 {
    // No panics from here on: unwinding in this forked copy would run the parent's rollback.
    let fail = |msg: String| {
        let mut buf = 0i32.to_ne_bytes().to_vec();
        buf.extend_from_slice(msg.as_bytes());
        let _ = nix::unistd::write(&ready_w, &buf);
        1
    };
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_name(
        &std::ffi::CString::new(format!("berth-mon {ctid}")).unwrap_or_default(),
    );
    // The monitor outlives the CLI: it must not hold the CLI's stdio (a caller reading
    // `berth start` output to EOF would hang) nor its CT lock (flock is per open file).
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let b = std::os::fd::AsFd::as_fd(&null);
        let _ = nix::unistd::dup2_stdin(b);
        let _ = nix::unistd::dup2_stdout(b);
        let _ = nix::unistd::dup2_stderr(b);
    }
    let pty = match nix::pty::openpty(None, None) {
        Ok(p) => p,
        Err(e) => return fail(format!("open console pty: {e}")),
    };
    let console_path = match nix::unistd::ttyname(&pty.slave) {
        Ok(p) => p,
        Err(e) => return fail(format!("console pty name: {e}")),
    };
    spec.console = Some(console_path);
    spec.console_fd = Some(pty.slave.as_raw_fd());
    let keep = [
        ready_w.as_raw_fd(),
        go_r.as_raw_fd(),
        err_w.as_raw_fd(),
        pty.master.as_raw_fd(),
        pty.slave.as_raw_fd(),
    ];
    init::close_fds_except(&keep);

    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    if userns.is_some() {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    // SIGCHLD arrives on a signalfd so the monitor sleeps until there is console output or init
    // exits; the mask is inherited by the clone and undone in init before exec.
    let mut chld = nix::sys::signal::SigSet::empty();
    chld.add(Signal::SIGCHLD);
    if let Err(e) = chld.thread_block() {
        return fail(format!("block SIGCHLD: {e}"));
    }
    let sfd = match nix::sys::signalfd::SignalFd::with_flags(
        &chld,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    ) {
        Ok(f) => f,
        Err(e) => return fail(format!("signalfd: {e}")),
    };
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
    drop(pty.slave);
    {
        let mut f = fs::File::from(ready_w);
        if f.write_all(&child.as_raw().to_ne_bytes()).is_err() {
            let _ = kill(child, Signal::SIGKILL);
        }
    }
    console_loop(child, pty.master, sfd, log_path);
    0
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
        init::setup_console(spec)?;
        init::drop_caps()?;
        init::close_fds_except(&[err_fd]);
        Err(init::exec_init(spec))
    })();
    if let Err(msg) = res {
        // SAFETY: writing a byte buffer to a pipe fd we hold.
        unsafe { libc::write(err_fd, msg.as_ptr().cast(), msg.len()) };
    }
    // SAFETY: exiting the forked child without running the parent's destructors.
    unsafe { libc::_exit(127) }
}

/// Copies console output to the log (capped: truncated when it passes 1 MiB) until init exits.
fn console_loop(child: Pid, master: OwnedFd, sfd: nix::sys::signalfd::SignalFd, log_path: &Path) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use std::os::fd::AsFd;
    const CAP: u64 = 1 << 20;
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .ok();
    let mut master_open = true;
    let mut buf = [0u8; 8192];
    let mut copy = |master: &OwnedFd, log: &mut Option<fs::File>| -> bool {
        match nix::unistd::read(master, &mut buf) {
            Ok(n) if n > 0 => {
                if let Some(l) = log.as_mut() {
                    let _ = l.write_all(&buf[..n]);
                    if l.metadata().map(|m| m.len() > CAP).unwrap_or(false) {
                        let _ = l.set_len(0);
                    }
                }
                true
            }
            _ => false,
        }
    };
    loop {
        let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        if master_open {
            fds.push(PollFd::new(master.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
        let sig = fds[0].revents().unwrap_or(PollFlags::empty());
        let con = fds
            .get(1)
            .and_then(|f| f.revents())
            .unwrap_or(PollFlags::empty());
        if con.contains(PollFlags::POLLIN) {
            if !copy(&master, &mut log) {
                master_open = false;
            }
        } else if con.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            master_open = false;
        }
        if sig.contains(PollFlags::POLLIN) {
            while let Ok(Some(_)) = sfd.read_signal() {}
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                _ => {
                    while master_open && copy(&master, &mut log) {}
                    break;
                }
            }
        }
    }
}
