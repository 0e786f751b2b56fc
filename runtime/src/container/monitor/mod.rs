//! The per-CT monitor forked by `start`: it clones init, reports to `start` over a pipe, then
//! logs the console and reaps init.
//!
//! After the go-ahead the monitor tells `start` how init's first moments went (`MonitorMsg`):
//! `Failed` if init failed before its exec (init reports that on a pipe of the monitor's own,
//! which its exec closes unwritten), `Exited` if init ended within [`WATCH`] of its exec (with
//! the console's last output, logged before the report is sent), or `Settled` once the CT is
//! idle (see `settle`) or has lived through the window. An init that ends later is recorded in
//! `<run>/<CTID>.exit.json` for `status`, unless `stop` sent [`STOPPING`] first.

mod msg;
mod settle;

pub use msg::MonitorMsgError;
pub(super) use msg::{MonitorMsg, console_lines};

use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::init;
use super::state::{self, InitExit, LastExit};
use crate::config::UserNs;
use crate::ctid::Ctid;

/// How long after its exec an init that exits still fails the start.
pub(super) const WATCH: Duration = Duration::from_secs(1);
/// The first settle check after init's exec (busybox's boot, its rcS, takes 2–3 ms here).
const FIRST_LOOK: Duration = Duration::from_millis(1);
/// Gaps between checks while the CT is busy: a quarter of its age so far, within these bounds.
/// A look costs ~40 µs per task (five /proc files each); a finer grain competes for the CPU
/// with the very boot it waits for.
const MIN_GAP: Duration = Duration::from_micros(500);
const MAX_GAP: Duration = Duration::from_millis(25);
/// What `stop` sends the monitor before it makes init exit: that exit is no news for `status`.
pub(super) const STOPPING: Signal = Signal::SIGUSR1;
/// How much of this start's console output an `Exited` report carries.
const TAIL: usize = 8 << 10;
/// The console log is truncated when it passes this size.
const LOG_CAP: u64 = 1 << 20;

/// Where the monitor writes.
pub(super) struct Paths {
    pub console_log: PathBuf,
    pub last_exit: PathBuf,
}

/// The monitor: clones init, tells berth its PID, then logs the console and reaps init.
pub(super) fn monitor_main(
    ctid: Ctid,
    mut spec: init::InitSpec,
    paths: &Paths,
    ready_w: OwnedFd,
    go_r: OwnedFd,
    userns: Option<UserNs>,
) -> i32 {
    // No panics from here on: unwinding in this forked copy would run the parent's rollback.
    let fail = |error: String| {
        let _ = MonitorMsg::Failed { error }.send(&ready_w);
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
        let b = null.as_fd();
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
    if let Err(e) = init::own_console(&pty.slave, userns.as_ref()) {
        return fail(e);
    }
    // init reports a failure before its exec here; the exec closes it (O_CLOEXEC).
    let (err_r, err_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return fail(format!("pipe: {e}")),
    };
    spec.console = Some(console_path);
    spec.console_fd = Some(pty.slave.as_raw_fd());
    let keep = [
        ready_w.as_raw_fd(),
        go_r.as_raw_fd(),
        err_r.as_raw_fd(),
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
    // SIGCHLD (and `stop`'s notice) arrive on a signalfd so the monitor sleeps until there is
    // console output or init exits; the mask is inherited by the clone and undone in init
    // before exec.
    let mut chld = nix::sys::signal::SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.add(STOPPING);
    if let Err(e) = chld.thread_block() {
        return fail(format!("block SIGCHLD and {}: {e}", STOPPING.as_str()));
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
    let started = MonitorMsg::Started {
        init_pid: child.as_raw(),
    };
    if started.send(&ready_w).is_err() {
        let _ = kill(child, Signal::SIGKILL);
    }
    let _ = nix::fcntl::fcntl(
        &pty.master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let console = Console {
        master: pty.master,
        // Kept open so the master never hangs up while the CT lives: a CT whose processes all
        // close the console for a moment (systemd reopens it per message) is still logged after.
        slave: Some(pty.slave),
        log: fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.console_log)
            .ok(),
        tail: Vec::new(),
        open: true,
    };
    let mut m = Monitor {
        init: child,
        console,
        sfd,
        ready_w,
        phase: Phase::BeforeExec {
            err_r,
            err: Vec::new(),
        },
        stopping: false,
    };
    let exit = m.run().filter(|_| !m.stopping);
    if let (Some((exit, true)), Ok(at)) = (exit, SystemTime::now().duration_since(UNIX_EPOCH)) {
        let _ = LastExit {
            exit,
            at: at.as_secs(),
            boot_id: state::boot_id().unwrap_or_default(),
        }
        .write(&paths.last_exit);
    }
    0
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
    restore: &mut dyn FnMut(BorrowedFd<'_>, &std::path::Path) -> Result<i32, String>,
) -> i32 {
    let fail = |error: String| {
        let _ = MonitorMsg::Failed { error }.send(&ready_w);
        1
    };
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_name(
        &std::ffi::CString::new(format!("berth-mon {ctid}")).unwrap_or_default(),
    );
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
    let pty = match nix::pty::openpty(None, None) {
        Ok(p) => p,
        Err(e) => return fail(format!("open console pty: {e}")),
    };
    let console_path = match nix::unistd::ttyname(&pty.slave) {
        Ok(p) => p,
        Err(e) => return fail(format!("console pty name: {e}")),
    };
    if let Err(e) = init::own_console(&pty.slave, userns.as_ref()) {
        return fail(e);
    }
    init::close_fds_except(&[
        ready_w.as_raw_fd(),
        pty.master.as_raw_fd(),
        pty.slave.as_raw_fd(),
    ]);
    // Blocked before the restore: an init that dies at once still leaves its SIGCHLD queued
    // for the signalfd (CRIU's own exit queues one too, harmlessly).
    let mut chld = nix::sys::signal::SigSet::empty();
    chld.add(Signal::SIGCHLD);
    chld.add(STOPPING);
    if let Err(e) = chld.thread_block() {
        return fail(format!("block SIGCHLD and {}: {e}", STOPPING.as_str()));
    }
    let sfd = match nix::sys::signalfd::SignalFd::with_flags(
        &chld,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    ) {
        Ok(f) => f,
        Err(e) => return fail(format!("signalfd: {e}")),
    };
    let init_pid = match restore(pty.slave.as_fd(), &console_path) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let child = Pid::from_raw(init_pid);
    if (MonitorMsg::Started { init_pid }).send(&ready_w).is_err() {
        let _ = kill(child, Signal::SIGKILL);
    }
    let _ = nix::fcntl::fcntl(
        &pty.master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let console = Console {
        master: pty.master,
        slave: Some(pty.slave),
        log: fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.console_log)
            .ok(),
        tail: Vec::new(),
        open: true,
    };
    let mut m = Monitor {
        init: child,
        console,
        sfd,
        ready_w,
        phase: Phase::Reported { settled: true },
        stopping: false,
    };
    let exit = m.run().filter(|_| !m.stopping);
    if let (Some((exit, true)), Ok(at)) = (exit, SystemTime::now().duration_since(UNIX_EPOCH)) {
        let _ = LastExit {
            exit,
            at: at.as_secs(),
            boot_id: state::boot_id().unwrap_or_default(),
        }
        .write(&paths.last_exit);
    }
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

/// The console pty: copied to the log (truncated when it passes [`LOG_CAP`]) and, for this
/// start's report, to a tail buffer.
struct Console {
    master: OwnedFd,
    slave: Option<OwnedFd>,
    log: Option<fs::File>,
    tail: Vec<u8>,
    open: bool,
}

impl Console {
    /// Copies what the master has now (it is non-blocking). A hang-up or error ends logging.
    fn drain(&mut self) {
        let mut buf = [0u8; 8192];
        while self.open {
            match nix::unistd::read(&self.master, &mut buf) {
                Ok(n) if n > 0 => self.keep(&buf[..n]),
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => {}
                // 0 or EIO: every slave is closed (Linux returns the buffered output first).
                _ => self.open = false,
            }
        }
    }

    fn keep(&mut self, data: &[u8]) {
        if let Some(l) = self.log.as_mut() {
            let _ = l.write_all(data);
            if l.metadata().map(|m| m.len() > LOG_CAP).unwrap_or(false) {
                let _ = l.set_len(0);
            }
        }
        self.tail.extend_from_slice(data);
        if self.tail.len() > TAIL {
            self.tail.drain(..self.tail.len() - TAIL);
        }
    }
}

/// Where the report to `start` stands.
enum Phase {
    /// init has not exec'd yet; `err` collects what it sends before its exec or death.
    BeforeExec { err_r: OwnedFd, err: Vec<u8> },
    /// init exec'd at `since`: the next settle check is at `next`, `quiet` is the last quiet
    /// snapshot (a second equal one settles it).
    Watching {
        since: Instant,
        next: Instant,
        quiet: Option<settle::Quiet>,
    },
    /// `start` has its answer: `settled` (a later exit is recorded) or `Failed`.
    Reported { settled: bool },
}

struct Monitor {
    init: Pid,
    console: Console,
    sfd: nix::sys::signalfd::SignalFd,
    ready_w: OwnedFd,
    phase: Phase,
    /// `stop` said init's coming exit is its doing.
    stopping: bool,
}

impl Monitor {
    /// Logs the console, reports to `start`, and reaps init. Returns how init ended and
    /// whether that was after `start` was told it settled.
    fn run(&mut self) -> Option<(InitExit, bool)> {
        use nix::poll::{PollFd, PollFlags, ppoll};
        loop {
            let timeout = match &self.phase {
                Phase::Watching { next, .. } => Some(nix::sys::time::TimeSpec::from_duration(
                    next.saturating_duration_since(Instant::now()),
                )),
                _ => None,
            };
            let (sig, con, err) = {
                let mut fds = vec![PollFd::new(self.sfd.as_fd(), PollFlags::POLLIN)];
                let con_at = self.console.open.then(|| {
                    fds.push(PollFd::new(self.console.master.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                let err_at = match &self.phase {
                    Phase::BeforeExec { err_r, .. } => {
                        fds.push(PollFd::new(err_r.as_fd(), PollFlags::POLLIN));
                        Some(fds.len() - 1)
                    }
                    _ => None,
                };
                match ppoll(&mut fds, timeout, None) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(_) => return None,
                }
                let ready = |i: Option<usize>| {
                    i.and_then(|i| fds[i].revents())
                        .is_some_and(|r| !r.is_empty())
                };
                (ready(Some(0)), ready(con_at), ready(err_at))
            };
            if con {
                self.console.drain();
            }
            if err {
                self.read_err();
            }
            if sig {
                // stop's notice is queued before it signals init, so it is read here no later
                // than the SIGCHLD of that exit.
                while let Ok(Some(si)) = self.sfd.read_signal() {
                    if si.ssi_signo == STOPPING as u32 {
                        self.stopping = true;
                    }
                }
                if let Some(end) = self.reap() {
                    return end;
                }
            }
            self.check_settled();
        }
    }

    /// Reads what init sent on its pipe; at EOF, init has exec'd (nothing sent) or failed.
    fn read_err(&mut self) {
        let Phase::BeforeExec { err_r, err } = &mut self.phase else {
            return;
        };
        let mut buf = [0u8; 4096];
        match nix::unistd::read(&*err_r, &mut buf) {
            Ok(0) => {}
            Ok(n) => return err.extend_from_slice(&buf[..n]),
            Err(Errno::EINTR | Errno::EAGAIN) => return,
            Err(_) => {}
        }
        if err.is_empty() {
            let now = Instant::now();
            self.phase = Phase::Watching {
                since: now,
                next: now + FIRST_LOOK,
                quiet: None,
            };
        } else {
            let msg = MonitorMsg::decode(err).unwrap_or_else(|e| MonitorMsg::Failed {
                error: format!("bad report from the CT's init: {e}"),
            });
            self.report(msg, false);
        }
    }

    /// Reaps init if it exited (None: it still runs): logs the rest of the console, and tells
    /// `start` if it is still waiting.
    fn reap(&mut self) -> Option<Option<(InitExit, bool)>> {
        use nix::sys::wait::{WaitPidFlag, waitpid};
        let ws = match waitpid(self.init, Some(WaitPidFlag::WNOHANG)) {
            Ok(ws) => ws,
            Err(Errno::EINTR) => return None,
            // ECHILD: nothing left to wait for, and no status to tell.
            Err(_) => return Some(None),
        };
        let exit = InitExit::from_wait(ws)?;
        // init's death closed its end of the error pipe: what it sent is all there.
        while matches!(self.phase, Phase::BeforeExec { .. }) {
            self.read_err();
        }
        // Its pid namespace is empty now; with the monitor's slave closed too, the master
        // returns everything still buffered (n_tty flushes the pending input) and then EIO.
        self.console.slave = None;
        self.console.drain();
        let settled = match &self.phase {
            Phase::Watching { since, .. } => {
                let msg = MonitorMsg::Exited {
                    exit,
                    after_ms: ms(since.elapsed()),
                    console: String::from_utf8_lossy(&self.console.tail).into_owned(),
                };
                self.report(msg, false);
                false
            }
            Phase::Reported { settled } => *settled,
            Phase::BeforeExec { .. } => false,
        };
        Some(Some((exit, settled)))
    }

    fn check_settled(&mut self) {
        let Phase::Watching { since, next, quiet } = &mut self.phase else {
            return;
        };
        let now = Instant::now();
        if now < *next {
            return;
        }
        let elapsed = now - *since;
        if elapsed >= WATCH {
            let msg = MonitorMsg::Settled {
                after_ms: ms(elapsed),
                idle: false,
            };
            return self.report(msg, true);
        }
        match settle::snapshot(self.init.as_raw(), WATCH) {
            Some(q) if quiet.as_ref() == Some(&q) => {
                let msg = MonitorMsg::Settled {
                    after_ms: ms(elapsed),
                    idle: true,
                };
                self.report(msg, true);
            }
            Some(q) => {
                *quiet = Some(q);
                // Any gap works (see settle): the second look only has to come after the first.
                *next = now + Duration::from_micros(200);
            }
            None => {
                *quiet = None;
                // Frequent checks while a boot is short, fewer as it goes on.
                *next = now + (elapsed / 4).clamp(MIN_GAP, MAX_GAP);
            }
        }
    }

    fn report(&mut self, msg: MonitorMsg, settled: bool) {
        // start may be gone (killed): nobody to tell, the CT goes on.
        let _ = msg.send(&self.ready_w);
        self.phase = Phase::Reported { settled };
    }
}

fn ms(d: Duration) -> u32 {
    d.as_millis().try_into().unwrap_or(u32::MAX)
}
