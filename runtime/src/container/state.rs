//! Run state of a CT: which process is its init, and how to tell it is still the same process.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::shaping::ShapingConfig;

/// Written to `<run>/<CTID>.state.json` once the CT's init has exec'd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Host PID of the CT's init (PID 1 inside).
    pub init_pid: i32,
    /// `/proc/<pid>/stat` start time (clock ticks since boot): tells a reused PID apart.
    pub init_starttime: u64,
    /// Host PID of the monitor that holds the console and reaps init.
    pub monitor_pid: i32,
    /// Kernel boot id when started: a state file from before a reboot is stale.
    pub boot_id: String,
    /// Unix time of the start.
    pub started_at: u64,
    /// Whether `start` bind-mounted the private area (so `stop` unmounts it again).
    pub mounted_by_start: bool,
    /// What the network setup made (interfaces, addresses, proxy entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::NetState>,
    /// The shaping `set` applied live (None: the config's, as applied at start; an empty one:
    /// none), so the next unsaved `set` builds on it instead of on the saved settings.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "live_shaping"
    )]
    pub shaping: Option<ShapingConfig>,
}

/// A state file whose shaping cannot be read still says which init runs (a CT that runs must
/// never look stopped): the shaping counts as the config's then.
fn live_shaping<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ShapingConfig>, D::Error> {
    let Some(v) = Option::<serde_json::Value>::deserialize(d)? else {
        return Ok(None);
    };
    match serde_json::from_value(v) {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            tracing::warn!(error = %e, "run state: unreadable live shaping, using the config's");
            Ok(None)
        }
    }
}

impl RunState {
    pub fn read(path: &Path) -> io::Result<Option<Self>> {
        match fs::read(path) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        fs::rename(&tmp, path)
    }

    /// True when the recorded init still runs (same PID, same start time, same boot).
    pub fn alive(&self) -> bool {
        boot_id().as_deref() == Some(self.boot_id.as_str())
            && proc_starttime(self.init_pid) == Some(self.init_starttime)
    }
}

/// How the CT's init ended, as its parent (the monitor) reaped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitExit {
    Exited { code: i32 },
    Killed { signal: i32, core_dumped: bool },
}

impl InitExit {
    pub fn from_wait(ws: nix::sys::wait::WaitStatus) -> Option<Self> {
        use nix::sys::wait::WaitStatus;
        match ws {
            WaitStatus::Exited(_, code) => Some(Self::Exited { code }),
            WaitStatus::Signaled(_, sig, core_dumped) => Some(Self::Killed {
                signal: sig as i32,
                core_dumped,
            }),
            _ => None,
        }
    }
}

impl std::fmt::Display for InitExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Exited { code } => write!(f, "exited with status {code}"),
            Self::Killed {
                signal,
                core_dumped,
            } => {
                match nix::sys::signal::Signal::try_from(signal) {
                    Ok(s) => write!(f, "was killed by {}", s.as_str())?,
                    Err(_) if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal) => {
                        write!(f, "was killed by SIGRTMIN+{}", signal - libc::SIGRTMIN())?
                    }
                    Err(_) => write!(f, "was killed by signal {signal}")?,
                }
                if core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// Written by the monitor to `<run>/<CTID>.exit.json` when init ends on its own after `start`
/// returned (a failure during start is `start`'s error instead); `stop` and the next `start`
/// remove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    #[serde(flatten)]
    pub exit: InitExit,
    /// Unix time init was reaped.
    pub at: u64,
    /// Kernel boot id then: an exit from before a reboot is not reported.
    pub boot_id: String,
}

impl LastExit {
    pub fn path(run: &Path, ctid: crate::ctid::Ctid) -> std::path::PathBuf {
        run.join(format!("{ctid}.exit.json"))
    }

    /// The recorded exit of this boot, if any (an unreadable file counts as none).
    pub fn read(path: &Path) -> Option<Self> {
        let st: Self = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
        (boot_id().as_deref() == Some(st.boot_id.as_str())).then_some(st)
    }

    pub fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        fs::rename(&tmp, path)
    }

    /// Removes the record; a missing one is fine.
    pub fn remove(path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Field 22 of /proc/<pid>/stat. The comm field may hold spaces and parens, so parse after the last ')'.
pub fn proc_starttime(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    // rest starts at field 3 (state); starttime is field 22 → index 19.
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.first() == Some(&"Z") {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// A pidfd for a process that is not our child: poll() says readable when it exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits up to `timeout` for the process behind `pidfd` to exit. Returns true if it did.
pub fn wait_pidfd(pidfd: &OwnedFd, timeout: std::time::Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Whether `path` is the root of a mount (statx STATX_ATTR_MOUNT_ROOT, Linux ≥ 5.8).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statx writes into the zeroed struct we own; path is NUL-terminated.
    unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let rc = libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BASIC_STATS,
            &mut stx,
        );
        rc == 0
            && stx.stx_attributes_mask & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0
            && stx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_starttime_and_mounts() {
        let me = std::process::id() as i32;
        assert!(proc_starttime(me).is_some());
        assert!(proc_starttime(i32::MAX).is_none());
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
    }

    #[test]
    fn state_roundtrip_and_liveness() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("1.state.json");
        assert_eq!(RunState::read(&p).unwrap(), None);
        let me = std::process::id() as i32;
        let st = RunState {
            init_pid: me,
            init_starttime: proc_starttime(me).unwrap(),
            monitor_pid: me,
            boot_id: boot_id().unwrap(),
            started_at: 0,
            mounted_by_start: true,
            net: None,
            shaping: None,
        };
        st.write(&p).unwrap();
        let back = RunState::read(&p).unwrap().unwrap();
        assert!(back.alive());
        let stale = RunState {
            init_starttime: st.init_starttime + 1,
            ..st
        };
        assert!(!stale.alive());
    }

    #[test]
    fn init_exit_texts() {
        assert_eq!(
            InitExit::Exited { code: 3 }.to_string(),
            "exited with status 3"
        );
        let segv = InitExit::Killed {
            signal: libc::SIGSEGV,
            core_dumped: false,
        };
        assert_eq!(segv.to_string(), "was killed by SIGSEGV");
        let core = InitExit::Killed {
            signal: libc::SIGABRT,
            core_dumped: true,
        };
        assert_eq!(core.to_string(), "was killed by SIGABRT (core dumped)");
        let rt = InitExit::Killed {
            signal: libc::SIGRTMIN() + 4,
            core_dumped: false,
        };
        assert_eq!(rt.to_string(), "was killed by SIGRTMIN+4");
        let odd = InitExit::Killed {
            signal: 200,
            core_dumped: false,
        };
        assert_eq!(odd.to_string(), "was killed by signal 200");
    }

    #[test]
    fn init_exit_from_wait_status() {
        use nix::sys::wait::WaitStatus;
        let pid = nix::unistd::Pid::from_raw(5);
        assert_eq!(
            InitExit::from_wait(WaitStatus::Exited(pid, 1)),
            Some(InitExit::Exited { code: 1 })
        );
        assert_eq!(
            InitExit::from_wait(WaitStatus::Signaled(
                pid,
                nix::sys::signal::Signal::SIGKILL,
                false
            )),
            Some(InitExit::Killed {
                signal: libc::SIGKILL,
                core_dumped: false
            })
        );
        assert_eq!(InitExit::from_wait(WaitStatus::StillAlive), None);
    }

    #[test]
    fn last_exit_roundtrip_and_stale_boot() {
        let dir = tempfile::tempdir().unwrap();
        let ctid = crate::ctid::Ctid::new(7).unwrap();
        let p = LastExit::path(dir.path(), ctid);
        assert!(p.ends_with("7.exit.json"));
        assert_eq!(LastExit::read(&p), None);
        LastExit::remove(&p).unwrap();
        let e = LastExit {
            exit: InitExit::Killed {
                signal: libc::SIGSEGV,
                core_dumped: true,
            },
            at: 1_700_000_000,
            boot_id: boot_id().unwrap(),
        };
        e.write(&p).unwrap();
        assert_eq!(LastExit::read(&p), Some(e.clone()));
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains(r#""killed":"#), "{text}");
        LastExit {
            boot_id: "another boot".into(),
            ..e
        }
        .write(&p)
        .unwrap();
        assert_eq!(LastExit::read(&p), None);
        fs::write(&p, b"{not json").unwrap();
        assert_eq!(LastExit::read(&p), None);
        LastExit::remove(&p).unwrap();
        assert!(!p.exists());
    }

    /// A state file written when the live shaping was a TOML table (turned into JSON) reads
    /// into the typed shaping; an unreadable shaping does not hide the init.
    #[test]
    fn old_state_files_with_shaping_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("1.state.json");
        let old = r#"{"init_pid":4242,"init_starttime":77,"monitor_pid":4241,"boot_id":"b","started_at":1700000000,"mounted_by_start":true,"shaping":{"burst":"64kb","class":[{"class":1,"rate_in":"1gbit"},{"class":3,"rate_out":"20mbit"}],"pps_in":1000,"pps_out":2000,"rate_in":"10mbit","rate_out":"1500kbit"}}"#;
        fs::write(&p, old).unwrap();
        let st = RunState::read(&p).unwrap().unwrap();
        assert_eq!(st.init_pid, 4242);
        let sh = st.shaping.clone().unwrap();
        assert_eq!(sh.rate_in.unwrap().to_string(), "10mbit");
        assert_eq!(sh.burst, Some(crate::Size::Bytes(64 << 10)));
        assert_eq!(sh.classes.len(), 2);
        assert_eq!(sh.pps_in, Some(1000));
        // What it writes back reads the same.
        st.write(&p).unwrap();
        assert_eq!(RunState::read(&p).unwrap().unwrap(), st);
        // "Removed live" was an empty table.
        fs::write(&p, old.replace(r#""shaping":{"#, r#""shaping":{},"x":{"#)).unwrap();
        let st = RunState::read(&p).unwrap().unwrap();
        assert_eq!(st.shaping, Some(ShapingConfig::default()));
        fs::write(&p, old.replace("10mbit", "fast")).unwrap();
        let st = RunState::read(&p).unwrap().unwrap();
        assert_eq!((st.init_pid, st.shaping), (4242, None));
    }
}
