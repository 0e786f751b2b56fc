//! `berth exec` / `berth enter`: run a command inside a running CT's namespaces and cgroup.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::sched::{CloneFlags, setns};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};

use super::{CtError, Result, cg_err, cgroup, running};
use crate::cgroups::CgroupManager;
use crate::config::{CtConfig, Host};
use crate::ctid::Ctid;

/// Namespaces joined, in order: user first (it grants the rights for the others), mnt before
/// the chdir, pid last (it only applies to children).
const NAMESPACES: &[(&str, CloneFlags)] = &[
    ("user", CloneFlags::CLONE_NEWUSER),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("mnt", CloneFlags::CLONE_NEWNS),
    ("pid", CloneFlags::CLONE_NEWPID),
];

struct Target {
    ns: Vec<(CloneFlags, OwnedFd)>,
    cgroup_procs: Vec<fs::File>,
    userns: bool,
    /// The CTs' seccomp filter, compiled before the fork (the child only installs it).
    seccomp: seccompiler::BpfProgram,
}

fn open_target(host: &Host, ctid: Ctid) -> Result<(Target, i32)> {
    let cfg = CtConfig::load(host, ctid)?;
    let st = running(host, ctid).ok_or(CtError::NotRunning(ctid))?;
    let pid = st.init_pid;
    let mut ns = Vec::new();
    for (name, flag) in NAMESPACES {
        if *name == "user" && cfg.userns.is_none() {
            continue;
        }
        let p = format!("/proc/{pid}/ns/{name}");
        let f = fs::File::open(&p).map_err(super::io_err(ctid, "open namespace", Path::new(&p)))?;
        ns.push((*flag, OwnedFd::from(f)));
    }
    let cg = cgroup(host, ctid)?;
    let mut cgroup_procs = Vec::new();
    for p in cg.enter_files(pid).map_err(cg_err(ctid))? {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(super::io_err(ctid, "open", &p))?;
        cgroup_procs.push(f);
    }
    if cg.is_frozen().unwrap_or(false) {
        return Err(CtError::Suspended(ctid));
    }
    let _ = cg_err;
    Ok((
        Target {
            ns,
            cgroup_procs,
            userns: cfg.userns.is_some(),
            seccomp: super::seccomp::filter()?,
        },
        pid,
    ))
}

/// In a forked child: join the CT and become its root. Errors are returned as text because the
/// child reports them on stderr before `_exit`.
fn enter_ct(t: &mut Target) -> std::result::Result<(), String> {
    for f in &mut t.cgroup_procs {
        f.write_all(b"0")
            .map_err(|e| format!("join CT cgroup: {e}"))?;
    }
    for (flag, fd) in &t.ns {
        if *flag == CloneFlags::CLONE_NEWPID {
            continue;
        }
        setns(fd.as_fd(), *flag).map_err(|e| format!("setns {flag:?}: {e}"))?;
    }
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    if t.userns {
        nix::unistd::setgroups(&[]).ok();
        nix::unistd::setresgid(0.into(), 0.into(), 0.into()).map_err(|e| format!("setgid: {e}"))?;
        nix::unistd::setresuid(0.into(), 0.into(), 0.into()).map_err(|e| format!("setuid: {e}"))?;
    }
    super::init::drop_caps()?;
    // Last: what runs in the CT runs under the CT's filter, like its init.
    super::seccomp::install(&t.seccomp)?;
    Ok(())
}

fn exec_argv(argv: &[String], term: Option<&str>) -> String {
    let Ok(args) = argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<std::result::Result<Vec<_>, _>>()
    else {
        return "argument contains NUL".into();
    };
    let mut env = vec![
        c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        c"HOME=/root".to_owned(),
        c"container=berth".to_owned(),
    ];
    if let Some(t) = term.and_then(|t| CString::new(format!("TERM={t}")).ok()) {
        env.push(t);
    }
    let e = nix::unistd::execvpe(&args[0], &args, &env).unwrap_err();
    format!("exec {}: {e}", argv[0])
}

fn exit_code(ws: WaitStatus) -> i32 {
    match ws {
        WaitStatus::Exited(_, c) => c,
        WaitStatus::Signaled(_, s, _) => 128 + s as i32,
        _ => 1,
    }
}

/// Runs `argv` in the CT with berth's stdin/stdout/stderr; returns the command's exit code
/// (128+N when killed by signal N, 127 when it could not be executed).
pub fn exec(host: &Host, ctid: Ctid, argv: &[String]) -> Result<i32> {
    if argv.is_empty() {
        return Err(CtError::Invalid {
            ctid,
            msg: "exec needs a command".into(),
        });
    }
    let (mut t, _) = open_target(host, ctid)?;
    run_in_ct(ctid, &mut t, |t| {
        if let Err(e) = enter_ct(t) {
            return e;
        }
        exec_argv(argv, std::env::var("TERM").ok().as_deref())
    })
}

fn run_in_ct(ctid: Ctid, t: &mut Target, child: impl FnOnce(&mut Target) -> String) -> Result<i32> {
    let pid = spawn_in_ct(ctid, t, child)?;
    // Ctrl-C reaches the whole foreground process group; the CT command decides.
    // SAFETY: setting a signal disposition to SIG_IGN.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        )
    };
    wait_child(ctid, pid)
}

/// Forks a child that joins the CT and runs `child` (which execs, or returns an error text).
/// Must be called while berth is single-threaded. setns(CLONE_NEWPID) only affects children
/// and forbids creating threads afterwards, so an intermediate process does it: it forks the
/// CT command and exits with its status; berth itself never changes namespace.
fn spawn_in_ct(
    ctid: Ctid,
    t: &mut Target,
    child: impl FnOnce(&mut Target) -> String,
) -> Result<nix::unistd::Pid> {
    // SAFETY: single-threaded at this point; the child execs or _exits.
    match unsafe { fork() }.map_err(|errno| CtError::Sys {
        ctid,
        op: "fork",
        errno,
    })? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            let code = (|| -> std::result::Result<i32, String> {
                if let Some((_, fd)) = t.ns.iter().find(|(f, _)| *f == CloneFlags::CLONE_NEWPID) {
                    setns(fd.as_fd(), CloneFlags::CLONE_NEWPID)
                        .map_err(|e| format!("join pid namespace: {e}"))?;
                }
                // SAFETY: this intermediate process is single-threaded.
                match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
                    ForkResult::Child => {
                        let msg = child(t);
                        let _ = writeln!(std::io::stderr(), "berth: CT {ctid}: {msg}");
                        // SAFETY: leave the forked child without running the parent's destructors.
                        unsafe { libc::_exit(127) }
                    }
                    ForkResult::Parent { child } => {
                        // Signals for the command reach it directly (same process group).
                        let _ = unsafe {
                            nix::sys::signal::signal(
                                nix::sys::signal::SIGINT,
                                nix::sys::signal::SigHandler::SigIgn,
                            )
                        };
                        wait_child(ctid, child).map_err(|e| e.to_string())
                    }
                }
            })();
            let code = code.unwrap_or_else(|msg| {
                let _ = writeln!(std::io::stderr(), "berth: CT {ctid}: {msg}");
                127
            });
            // SAFETY: leave the forked intermediate without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
    }
}

fn wait_child(ctid: Ctid, child: nix::unistd::Pid) -> Result<i32> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(ws) => return Ok(exit_code(ws)),
            Err(errno) => {
                return Err(CtError::Sys {
                    ctid,
                    op: "wait for command",
                    errno,
                });
            }
        }
    }
}

/// `berth enter`: an interactive login shell on a pty of the CT's own devpts instance (so
/// `tty` and job control work inside), the terminal in raw mode. Without a terminal on stdin
/// it runs the shell with plain stdio.
pub fn enter(host: &Host, ctid: Ctid) -> Result<i32> {
    let shell: Vec<String> = vec!["/bin/sh".into(), "-l".into()];
    let stdin = std::io::stdin();
    if !nix::unistd::isatty(stdin.as_fd()).unwrap_or(false) {
        return exec(host, ctid, &shell);
    }
    let (mut t, init_pid) = open_target(host, ctid)?;
    let (master, slave) = ct_pty(ctid, init_pid)?;
    let mut size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills, TIOCSWINSZ reads the struct we own.
    unsafe {
        libc::ioctl(stdin.as_raw_fd(), libc::TIOCGWINSZ, &mut size);
        libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size);
    }
    let term = std::env::var("TERM").ok();
    let pid = spawn_in_ct(ctid, &mut t, |t| {
        if let Err(e) = enter_ct(t) {
            return e;
        }
        if let Err(e) = nix::unistd::setsid() {
            return format!("setsid: {e}");
        }
        // SAFETY: TIOCSCTTY on our pty slave.
        unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
        let _ = nix::unistd::dup2_stdin(&slave);
        let _ = nix::unistd::dup2_stdout(&slave);
        let _ = nix::unistd::dup2_stderr(&slave);
        exec_argv(&shell, term.as_deref())
    })?;
    // The shell holds the slave now; once it (and its children) exit, reading the master
    // returns EIO and the output pump ends.
    drop(slave);
    let saved = nix::sys::termios::tcgetattr(stdin.as_fd()).ok();
    if let Some(s) = &saved {
        let mut raw = s.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ =
            nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &raw);
    }
    let to_pty = master.try_clone().map_err(|e| CtError::Io {
        ctid,
        op: "dup pty",
        path: "ptmx".into(),
        source: e,
    })?;
    // Detached: it blocks in read(stdin) until the user types or stdin closes; the process
    // exits without waiting for it.
    std::thread::spawn(move || {
        let mut m = fs::File::from(to_pty);
        let mut buf = [0u8; 4096];
        let mut inp = std::io::stdin();
        while let Ok(n) = inp.read(&mut buf) {
            if n == 0 || m.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let out = std::thread::spawn(move || {
        let mut m = fs::File::from(master);
        let mut o = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = m.read(&mut buf) {
            if n == 0 || o.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = o.flush();
        }
    });
    let code = wait_child(ctid, pid);
    let _ = out.join();
    if let Some(s) = &saved {
        let _ = nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, s);
    }
    code
}

/// A pty pair from the CT's own devpts instance (opened through /proc/<init>/root), with the
/// peer opened by TIOCGPTPEER (Linux 4.13) so no path lookup in the CT's tree is trusted.
fn ct_pty(ctid: Ctid, init_pid: i32) -> Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let p = std::path::PathBuf::from(format!("/proc/{init_pid}/root/dev/pts/ptmx"));
    let master = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&p)
        .map_err(super::io_err(ctid, "open the CT's pty multiplexer", &p))?;
    let unlock: libc::c_int = 0;
    // SAFETY: ioctls on the fd we just opened; TIOCSPTLCK reads an int we own.
    let slave = unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock);
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY,
        )
    };
    if slave < 0 {
        return Err(CtError::Io {
            ctid,
            op: "open pty peer",
            path: p,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh fd returned by the kernel.
    Ok((OwnedFd::from(master), unsafe {
        OwnedFd::from_raw_fd(slave)
    }))
}

/// Runs `f` in the UTS namespace of a running CT, on a thread of its own so the calling
/// thread's namespaces stay put.
fn in_uts<T: Send + 'static>(
    ctid: Ctid,
    init_pid: i32,
    op: &'static str,
    f: impl FnOnce() -> nix::Result<T> + Send + 'static,
) -> Result<T> {
    let p = format!("/proc/{init_pid}/ns/uts");
    let ns = fs::File::open(&p).map_err(super::io_err(ctid, "open namespace", Path::new(&p)))?;
    std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWUTS)?;
        f()
    })
    .join()
    .unwrap_or(Err(nix::errno::Errno::EIO))
    .map_err(|errno| CtError::Sys { ctid, op, errno })
}

/// Sets the hostname of a running CT (its UTS namespace) without a restart.
pub fn set_hostname_live(ctid: Ctid, init_pid: i32, hostname: &str) -> Result<()> {
    let h = hostname.to_string();
    in_uts(ctid, init_pid, "set hostname in CT", move || {
        nix::unistd::sethostname(&h)
    })
}

/// The hostname a running CT has now (its UTS namespace), e.g. to put it back.
pub fn hostname_live(ctid: Ctid, init_pid: i32) -> Result<String> {
    in_uts(ctid, init_pid, "read hostname in CT", || {
        Ok(nix::unistd::gethostname()?.to_string_lossy().into_owned())
    })
}
