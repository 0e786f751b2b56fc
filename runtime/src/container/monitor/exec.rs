//! The handoff from the forked monitor to `berth-mon`: the forked copy of the CLI (its heap,
//! its loaded datapath) execs the small binary once init is cloned, passing the serving loop's
//! descriptors inherited and the rest on the command line.
//!
//! `berth-mon` runs as root next to every CT, so only a binary no CT and no non-root user can
//! replace is exec'd: the one in the running `berth`'s own directory, that directory and the
//! file owned by root and writable by nobody else, opened once and exec'd through that open
//! descriptor (no path lookup between the check and the exec). Anything else, or no such
//! file, and the forked monitor serves the CT itself, as before.

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::serve::{Served, serve};
use crate::ctid::Ctid;

/// The monitor binary's file name, looked for next to the running binary.
pub const MONITOR_BIN: &str = "berth-mon";

/// The monitor binary, open and checked: exec'd through this descriptor.
pub struct MonitorExe(OwnedFd);

impl AsRawFd for MonitorExe {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl MonitorExe {
    /// `berth-mon` next to the running binary, if it is there and trustworthy. A present but
    /// untrusted one is logged (the CT still starts, under the in-process monitor).
    pub fn locate() -> Option<Self> {
        let dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
        match Self::open_in(&dir) {
            Ok(exe) => Some(exe),
            Err(Untrusted::Absent) => {
                debug!(dir = %dir.display(), "no {MONITOR_BIN}; the monitor stays a fork of berth");
                None
            }
            Err(e) => {
                warn!(dir = %dir.display(), reason = %e, "not using {MONITOR_BIN}");
                None
            }
        }
    }

    /// Opens `dir/berth-mon` if the directory and the file are root's and writable by no one
    /// else; the file must be a regular executable file.
    pub fn open_in(dir: &Path) -> Result<Self, Untrusted> {
        let d = nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|_| Untrusted::Absent)?;
        check_owner(
            &fs::File::from(d.try_clone().map_err(|_| Untrusted::Absent)?),
            dir,
        )?;
        let f = nix::fcntl::openat(
            &d,
            MONITOR_BIN,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| match e {
            nix::errno::Errno::ENOENT => Untrusted::Absent,
            // O_NOFOLLOW on a symlink: whoever may change its target is not checked.
            e => Untrusted::Open(e),
        })?;
        let file = fs::File::from(f);
        let path = dir.join(MONITOR_BIN);
        let meta = file.metadata().map_err(|_| Untrusted::Absent)?;
        if !meta.is_file() || meta.mode() & 0o100 == 0 {
            return Err(Untrusted::NotExecutable(path));
        }
        check_owner(&file, &path)?;
        Ok(Self(file.into()))
    }
}

fn check_owner(f: &fs::File, path: &Path) -> Result<(), Untrusted> {
    let m = f.metadata().map_err(|_| Untrusted::Absent)?;
    if m.uid() != 0 {
        return Err(Untrusted::NotRoots(path.to_path_buf(), m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(Untrusted::Writable(path.to_path_buf(), m.mode() & 0o7777));
    }
    Ok(())
}

/// Why `berth-mon` is not used.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    #[error("not found")]
    Absent,
    #[error("open: {0}")]
    Open(nix::errno::Errno),
    #[error("{0} is not an executable regular file")]
    NotExecutable(PathBuf),
    #[error("{0} is owned by uid {1}, not root")]
    NotRoots(PathBuf, u32),
    #[error("{0} is writable by group or others (mode {1:o})")]
    Writable(PathBuf, u32),
}

/// Hands the serving loop to `berth-mon` if there is one, else serves here. Returns the
/// monitor's exit code (only when serving here or when the exec failed).
pub(super) fn hand_off(ctid: Ctid, exe: Option<MonitorExe>, s: Served) -> i32 {
    if let Some(exe) = exe {
        // Only returns if the exec failed: the descriptors are still ours, serve them here.
        exec_monitor(ctid, &exe, &s);
    }
    serve(s)
}

fn exec_monitor(ctid: Ctid, exe: &MonitorExe, s: &Served) {
    let mut fds = vec![s.ready_w.as_fd(), s.master.as_fd(), s.slave.as_fd()];
    fds.extend(s.err_r.as_ref().map(|f| f.as_fd()));
    for fd in fds {
        if fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).is_err() {
            return;
        }
    }
    let num = |fd: RawFd| OsString::from(fd.to_string());
    let args: Vec<OsString> = vec![
        MONITOR_BIN.into(),
        ctid.to_string().into(),
        num(s.init.as_raw()),
        num(s.ready_w.as_raw_fd()),
        num(s.master.as_raw_fd()),
        num(s.slave.as_raw_fd()),
        s.err_r
            .as_ref()
            .map_or_else(|| "-".into(), |f| num(f.as_raw_fd())),
        s.console_log.clone().into_os_string(),
        s.last_exit.clone().into_os_string(),
    ];
    let Ok(args) = args
        .into_iter()
        .map(|a| CString::new(a.into_vec()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let env: [CString; 0] = [];
    let _ = nix::unistd::fexecve(&exe.0, &args, &env);
    for fd in [s.ready_w.as_fd(), s.master.as_fd(), s.slave.as_fd()] {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

/// Why `berth-mon`'s command line was refused.
#[derive(Debug, thiserror::Error)]
#[error("berth-mon: {0} (it is started by berth, not by hand)")]
pub struct BadArgs(String);

/// `berth-mon CTID INIT_PID READY_FD MASTER_FD SLAVE_FD ERR_FD|- CONSOLE_LOG LAST_EXIT`: the
/// serving loop of the CT's monitor, on descriptors inherited from the forked monitor.
pub fn berth_mon_main(args: &[OsString]) -> Result<i32, BadArgs> {
    let [_, ctid, init, ready, master, slave, err, log, last] = args else {
        return Err(BadArgs(format!(
            "expected 8 arguments, got {}",
            args.len().saturating_sub(1)
        )));
    };
    let text = |a: &OsString, what: &str| {
        a.to_str()
            .ok_or_else(|| BadArgs(format!("{what} is not UTF-8")))
            .map(str::to_owned)
    };
    let ctid: Ctid = text(ctid, "CTID")?
        .parse()
        .map_err(|e| BadArgs(format!("CTID: {e}")))?;
    let init: i32 = text(init, "INIT_PID")?
        .parse()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| BadArgs(format!("INIT_PID {init:?} is not a PID")))?;
    let ready = inherited(ready, "READY_FD")?;
    let master = inherited(master, "MASTER_FD")?;
    let slave = inherited(slave, "SLAVE_FD")?;
    let err_r = if err.as_os_str() == OsStr::new("-") {
        None
    } else {
        Some(inherited(err, "ERR_FD")?)
    };
    let mut nums = vec![ready.as_raw_fd(), master.as_raw_fd(), slave.as_raw_fd()];
    nums.extend(err_r.as_ref().map(|f| f.as_raw_fd()));
    nums.sort_unstable();
    if nums.windows(2).any(|w| w[0] == w[1]) {
        // Two owners of one descriptor would close it twice: leak them all instead.
        std::mem::forget((ready, master, slave, err_r));
        return Err(BadArgs("a descriptor is named twice".into()));
    }
    let _ = nix::sys::prctl::set_name(&CString::new(super::comm_name(ctid)).unwrap_or_default());
    Ok(serve(Served {
        init: Pid::from_raw(init),
        master,
        slave,
        ready_w: ready,
        err_r,
        console_log: PathBuf::from(log),
        last_exit: PathBuf::from(last),
    }))
}

/// Takes ownership of an inherited descriptor named on the command line (and makes it
/// close-on-exec again).
fn inherited(a: &OsString, what: &str) -> Result<OwnedFd, BadArgs> {
    let fd: RawFd = a
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| BadArgs(format!("{what} {a:?} is not a descriptor number above 2")))?;
    // SAFETY: F_GETFD only queries the flags of a descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(BadArgs(format!("{what} {fd} is not open")));
    }
    // SAFETY: the descriptor is open (checked above) and nothing else in this process owns it:
    // berth-mon opened nothing before reading its command line.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    Ok(owned)
}
