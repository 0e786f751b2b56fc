//! The per-CT monitor forked by `start`: it clones init, reports to `start` over a pipe, then
//! logs the console and reaps init. `MonitorMsg` is what travels on the report pipes.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
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
    if let Err(e) = init::own_console(&pty.slave, userns.as_ref()) {
        return fail(e);
    }
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
    let started = MonitorMsg::Started {
        init_pid: child.as_raw(),
    };
    if started.send(&ready_w).is_err() {
        let _ = kill(child, Signal::SIGKILL);
    }
    drop(ready_w);
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

/// A report to `start` on one of its pipes: from the monitor once init is cloned (or could not
/// be), and from the CT's init if it fails before its exec (which closes that pipe unwritten).
///
/// On the wire: a 4-byte little-endian body length, then the body: a kind byte and its payload
/// (`Started`: the PID as 4 little-endian bytes; `Failed`: UTF-8 text). The length lets `start`
/// read one message without waiting for EOF: init holds the monitor's pipe open until its exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MonitorMsg {
    /// init is cloned; its PID as the host sees it.
    Started { init_pid: i32 },
    /// The CT could not be started; what went wrong.
    Failed { error: String },
}

const KIND_STARTED: u8 = 1;
const KIND_FAILED: u8 = 2;
const HEADER: usize = 4;
/// A bound on the body so a garbage length cannot make `recv` allocate gigabytes.
const MAX_BODY: usize = 64 * 1024;

/// Why bytes on a report pipe are not a `MonitorMsg`.
#[derive(Debug, thiserror::Error)]
pub enum MonitorMsgError {
    #[error("no message: the pipe closed first")]
    Empty,
    #[error("message cut short: {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    #[error("message body of {0} bytes (must be 1 to {MAX_BODY})")]
    BadLength(u32),
    #[error("{0} bytes after the end of the message")]
    Trailing(usize),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("`started` message with a {0}-byte payload (must be 4)")]
    BadStarted(usize),
    #[error("init PID {0} is not a process ID")]
    BadPid(i32),
    #[error("error text is not UTF-8")]
    NotUtf8(#[source] std::str::Utf8Error),
    #[error("unexpected `started` message")]
    UnexpectedStarted,
    #[error("reading the pipe")]
    Read(#[source] io::Error),
}

type MsgResult<T> = std::result::Result<T, MonitorMsgError>;

impl MonitorMsg {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            MonitorMsg::Started { init_pid } => {
                body.push(KIND_STARTED);
                body.extend_from_slice(&init_pid.to_le_bytes());
            }
            MonitorMsg::Failed { error } => {
                body.push(KIND_FAILED);
                // Cut an overlong text at a character boundary rather than send a bad message.
                let mut end = error.len().min(MAX_BODY - 1);
                while !error.is_char_boundary(end) {
                    end -= 1;
                }
                body.extend_from_slice(&error.as_bytes()[..end]);
            }
        }
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes exactly one whole message.
    pub(super) fn decode(bytes: &[u8]) -> MsgResult<Self> {
        if bytes.is_empty() {
            return Err(MonitorMsgError::Empty);
        }
        let Some(header) = bytes.first_chunk::<HEADER>() else {
            return Err(MonitorMsgError::Truncated {
                got: bytes.len(),
                want: HEADER,
            });
        };
        let want = HEADER + body_len(*header)?;
        if bytes.len() < want {
            return Err(MonitorMsgError::Truncated {
                got: bytes.len(),
                want,
            });
        }
        if bytes.len() > want {
            return Err(MonitorMsgError::Trailing(bytes.len() - want));
        }
        let (kind, payload) = (bytes[HEADER], &bytes[HEADER + 1..]);
        match kind {
            KIND_STARTED => {
                let pid: [u8; 4] = payload
                    .try_into()
                    .map_err(|_| MonitorMsgError::BadStarted(payload.len()))?;
                let init_pid = i32::from_le_bytes(pid);
                if init_pid <= 0 {
                    return Err(MonitorMsgError::BadPid(init_pid));
                }
                Ok(MonitorMsg::Started { init_pid })
            }
            KIND_FAILED => {
                let error = std::str::from_utf8(payload).map_err(MonitorMsgError::NotUtf8)?;
                Ok(MonitorMsg::Failed {
                    error: error.to_owned(),
                })
            }
            k => Err(MonitorMsgError::UnknownKind(k)),
        }
    }

    /// Reads one message: its header, then as many bytes as it announces (no more, no EOF needed).
    pub(super) fn recv(r: &mut impl Read) -> MsgResult<Self> {
        let mut buf = vec![0u8; HEADER];
        let got = read_full(r, &mut buf)?;
        if got < HEADER {
            buf.truncate(got);
            return Self::decode(&buf);
        }
        let len = body_len([buf[0], buf[1], buf[2], buf[3]])?;
        buf.resize(HEADER + len, 0);
        let got = read_full(r, &mut buf[HEADER..])?;
        buf.truncate(HEADER + got);
        Self::decode(&buf)
    }

    /// Writes the whole message to a pipe (in one write when it fits PIPE_BUF, so atomically).
    pub(super) fn send(&self, fd: impl AsFd) -> nix::Result<()> {
        let buf = self.encode();
        let mut off = 0;
        while off < buf.len() {
            match nix::unistd::write(&fd, &buf[off..]) {
                Ok(n) => off += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn body_len(header: [u8; HEADER]) -> MsgResult<usize> {
    let len = u32::from_le_bytes(header);
    match usize::try_from(len) {
        Ok(n) if (1..=MAX_BODY).contains(&n) => Ok(n),
        _ => Err(MonitorMsgError::BadLength(len)),
    }
}

/// Fills `buf` unless EOF comes first; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> MsgResult<usize> {
    let mut off = 0;
    while off < buf.len() {
        match r.read(&mut buf[off..]) {
            Ok(0) => break,
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MonitorMsgError::Read(e)),
        }
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<MonitorMsg> {
        vec![
            MonitorMsg::Started { init_pid: 1 },
            MonitorMsg::Started { init_pid: 4242 },
            MonitorMsg::Started { init_pid: i32::MAX },
            MonitorMsg::Failed {
                error: String::new(),
            },
            MonitorMsg::Failed {
                error: "exec /sbin/init inside the CT: ENOENT: No such file or directory".into(),
            },
            MonitorMsg::Failed {
                error: "ünïcødé ✓ text".into(),
            },
        ]
    }

    #[test]
    fn roundtrip() {
        for m in samples() {
            let bytes = m.encode();
            assert_eq!(MonitorMsg::decode(&bytes).unwrap(), m);
            assert_eq!(MonitorMsg::recv(&mut bytes.as_slice()).unwrap(), m);
        }
    }

    #[test]
    fn recv_reads_one_message_at_a_time() {
        let all = samples();
        let stream: Vec<u8> = all.iter().flat_map(MonitorMsg::encode).collect();
        let mut r = stream.as_slice();
        for m in &all {
            assert_eq!(&MonitorMsg::recv(&mut r).unwrap(), m);
        }
        assert!(matches!(
            MonitorMsg::recv(&mut r),
            Err(MonitorMsgError::Empty)
        ));
    }

    #[test]
    fn roundtrip_over_a_pipe() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let m = MonitorMsg::Started { init_pid: 77 };
        m.send(&w).unwrap();
        // The writer stays open: recv must not wait for EOF.
        let mut f = fs::File::from(r);
        assert_eq!(MonitorMsg::recv(&mut f).unwrap(), m);
        drop(w);
        assert!(matches!(
            MonitorMsg::recv(&mut f),
            Err(MonitorMsgError::Empty)
        ));
    }

    #[test]
    fn overlong_error_is_cut_at_a_char_boundary() {
        let error = "é".repeat(MAX_BODY);
        let bytes = MonitorMsg::Failed {
            error: error.clone(),
        }
        .encode();
        assert!(bytes.len() <= HEADER + MAX_BODY);
        match MonitorMsg::decode(&bytes).unwrap() {
            MonitorMsg::Failed { error: got } => {
                assert!(!got.is_empty());
                assert!(error.starts_with(&got));
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn empty_input() {
        assert!(matches!(
            MonitorMsg::decode(&[]),
            Err(MonitorMsgError::Empty)
        ));
        assert!(matches!(
            MonitorMsg::recv(&mut io::empty()),
            Err(MonitorMsgError::Empty)
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for m in samples() {
            let bytes = m.encode();
            for cut in 1..bytes.len() {
                let part = &bytes[..cut];
                for res in [MonitorMsg::decode(part), MonitorMsg::recv(&mut &part[..])] {
                    match res {
                        Err(MonitorMsgError::Truncated { got, want }) => {
                            assert_eq!(got, cut);
                            assert!(want > got);
                        }
                        other => panic!("{m:?} cut at {cut}: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn trailing_bytes() {
        let mut bytes = MonitorMsg::Started { init_pid: 5 }.encode();
        bytes.extend_from_slice(b"xy");
        assert!(matches!(
            MonitorMsg::decode(&bytes),
            Err(MonitorMsgError::Trailing(2))
        ));
    }

    #[test]
    fn bad_lengths() {
        for len in [0u32, MAX_BODY as u32 + 1, u32::MAX] {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.push(KIND_FAILED);
            assert!(
                matches!(MonitorMsg::decode(&bytes), Err(MonitorMsgError::BadLength(l)) if l == len)
            );
            assert!(
                matches!(MonitorMsg::recv(&mut bytes.as_slice()), Err(MonitorMsgError::BadLength(l)) if l == len)
            );
        }
    }

    #[test]
    fn bad_bodies() {
        let frame = |body: &[u8]| {
            let mut b = (body.len() as u32).to_le_bytes().to_vec();
            b.extend_from_slice(body);
            b
        };
        assert!(matches!(
            MonitorMsg::decode(&frame(&[9, 1, 2])),
            Err(MonitorMsgError::UnknownKind(9))
        ));
        assert!(matches!(
            MonitorMsg::decode(&frame(&[KIND_STARTED, 1, 0])),
            Err(MonitorMsgError::BadStarted(2))
        ));
        assert!(matches!(
            MonitorMsg::decode(&frame(&[KIND_STARTED, 1, 0, 0, 0, 0])),
            Err(MonitorMsgError::BadStarted(5))
        ));
        for pid in [0i32, -1, i32::MIN] {
            let mut body = vec![KIND_STARTED];
            body.extend_from_slice(&pid.to_le_bytes());
            assert!(
                matches!(MonitorMsg::decode(&frame(&body)), Err(MonitorMsgError::BadPid(p)) if p == pid)
            );
        }
        assert!(matches!(
            MonitorMsg::decode(&frame(&[KIND_FAILED, 0xff, 0xfe])),
            Err(MonitorMsgError::NotUtf8(_))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A fixed xorshift stream: random lengths and bytes, some with a plausible header.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let n = (next() % 40) as usize;
            let mut bytes: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            if n >= HEADER && next() % 2 == 0 {
                let len = ((n - HEADER) as u32).saturating_sub((next() % 3) as u32);
                bytes[..HEADER].copy_from_slice(&len.to_le_bytes());
            }
            let _ = MonitorMsg::decode(&bytes);
            let _ = MonitorMsg::recv(&mut bytes.as_slice());
        }
    }

    #[test]
    fn errors_do_not_repeat_their_source() {
        let e = MonitorMsg::decode(&[1, 0, 0, 0, KIND_FAILED][..4]).unwrap_err();
        assert_eq!(e.to_string(), "message cut short: 4 of 5 bytes");
        let bad = [2u8, 0, 0, 0, KIND_FAILED, 0xff];
        let e = MonitorMsg::decode(&bad).unwrap_err();
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(!e.to_string().contains(&source));
    }
}
