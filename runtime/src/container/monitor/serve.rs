//! The monitor's serving loop, run by `berth-mon` after the exec handoff (or in the forked
//! monitor itself when there is no trustworthy `berth-mon`): it logs the console, tells
//! `start` how init's first moments went, reaps init and records a later exit for `status`.

use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use super::{MonitorMsg, STOPPING, WATCH, settle};
use crate::container::state::{self, InitExit, LastExit};

/// The first settle check after init's exec (busybox's boot, its rcS, takes 2–3 ms here).
const FIRST_LOOK: Duration = Duration::from_millis(1);
/// Gaps between checks while the CT is busy: a quarter of its age so far, within these bounds.
/// A look costs ~40 µs per task (five /proc files each); a finer grain competes for the CPU
/// with the very boot it waits for.
const MIN_GAP: Duration = Duration::from_micros(500);
const MAX_GAP: Duration = Duration::from_millis(25);
/// How much of this start's console output an `Exited` report carries.
const TAIL: usize = 8 << 10;
/// The console log is truncated when it passes this size.
const LOG_CAP: u64 = 1 << 20;

/// Everything the serving loop needs, whether it runs in the forked monitor or in `berth-mon`
/// (which gets the descriptors inherited and the rest on its command line, see `exec`).
pub(crate) struct Served {
    pub init: Pid,
    /// The console pty's master (non-blocking) and slave.
    pub master: OwnedFd,
    pub slave: OwnedFd,
    /// Where reports to `start`/`restore` go.
    pub ready_w: OwnedFd,
    /// init's pre-exec error pipe; None when init is already past its exec (a restore).
    pub err_r: Option<OwnedFd>,
    pub console_log: PathBuf,
    pub last_exit: PathBuf,
}

/// Runs the loop until init is reaped, then records an exit that came after the CT was
/// reported started and that `stop` did not announce. SIGCHLD and [`STOPPING`] must already
/// be blocked (they stay blocked, and pending, across the exec into `berth-mon`).
pub(crate) fn serve(s: Served) -> i32 {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.add(STOPPING);
    // Blocking again is harmless and covers a `berth-mon` started some other way.
    if mask.thread_block().is_err() {
        return 1;
    }
    let Ok(sfd) = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
    else {
        return 1;
    };
    let _ = nix::fcntl::fcntl(
        &s.master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let console = Console {
        master: s.master,
        // Kept open so the master never hangs up while the CT lives: a CT whose processes all
        // close the console for a moment (systemd reopens it per message) is still logged after.
        slave: Some(s.slave),
        log: fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.console_log)
            .ok(),
        tail: Vec::new(),
        open: true,
    };
    let phase = match s.err_r {
        Some(err_r) => Phase::BeforeExec {
            err_r,
            err: Vec::new(),
        },
        None => Phase::Reported { settled: true },
    };
    let mut m = Monitor {
        init: s.init,
        console,
        sfd,
        ready_w: s.ready_w,
        phase,
        stopping: false,
    };
    let exit = m.run().filter(|_| !m.stopping);
    if let (Some((exit, true)), Ok(at)) = (exit, SystemTime::now().duration_since(UNIX_EPOCH)) {
        let _ = LastExit {
            exit,
            at: at.as_secs(),
            boot_id: state::boot_id().unwrap_or_default(),
        }
        .write(&s.last_exit);
    }
    0
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
