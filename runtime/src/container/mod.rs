//! The CT lifecycle: create, start, stop, destroy, mount, suspend, set, status, gc.
//!
//! Start clones the CT's init in new pid/mnt/uts/ipc/net/cgroup (+user) namespaces from a small
//! per-CT monitor process. The monitor holds the console pty (logging it to
//! `<run>/<CTID>.console.log`) and reaps init; berth itself exits once init has exec'd, so the CT
//! keeps running with no berth command alive.

pub mod checkpoint;
pub mod exec;
pub mod init;
pub mod migrate;
pub mod state;

mod adding;
mod convert;
mod create;
mod gc;
mod gc_files;
mod hooks;
mod monitor;
mod mount;
pub mod passwd;
pub mod seccomp;
pub(crate) mod set;
mod set_undo;
mod start;
mod stop;

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::cgroups::{self, CgroupManager, Resources};
use crate::config::{ConfigError, CtConfig, Host, ResourceConfig};
use crate::ctid::Ctid;
use crate::lock::{CtLock, LockError};
use crate::net::{NetError, NetState};
use crate::shaping::ShapingError;
use state::RunState;

pub use convert::{conversion_pending, set_privileged};
pub use create::{CreateOpts, create, remove_template, template_users, write_hostname_files};
pub use gc::{GcReport, gc};
pub use hooks::{HookError, NetGc, NetHooks, NoHooks};
pub use monitor::MonitorMsgError;
pub use monitor::exec::{BadArgs, MONITOR_BIN, MonitorExe, Untrusted, berth_mon_main};
pub use mount::{mount_ct, umount_ct};
pub use set::{SetOpts, set};
pub use start::start;
pub use stop::{destroy, kill_frozen, restart, resume, stop, suspend};

/// How long a command waits for another command on the same CT to finish, unless
/// `BERTH_LOCK_TIMEOUT` (whole seconds, 0..=3600) says otherwise: a panel that would rather
/// fail fast with "locked" than queue sets it low.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

fn lock_timeout() -> Duration {
    let Ok(v) = std::env::var("BERTH_LOCK_TIMEOUT") else {
        return LOCK_TIMEOUT;
    };
    match v.trim().parse::<u64>() {
        Ok(s) if s <= 3600 => Duration::from_secs(s),
        _ => {
            tracing::warn!(value = %v, "BERTH_LOCK_TIMEOUT: expected whole seconds 0..=3600; waiting the default 60 s");
            LOCK_TIMEOUT
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CtError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("CT {ctid}")]
    Cgroup {
        ctid: Ctid,
        #[source]
        source: cgroups::CgroupError,
    },
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    #[error(
        "template {name} is in use by CT(s) {}: their files are an overlay over it",
        ctid_list(users)
    )]
    TemplateInUse { name: String, users: Vec<Ctid> },
    #[error(transparent)]
    Quota(#[from] crate::quota::QuotaError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Userns(#[from] crate::userns::UsernsError),
    /// The id pool's own files could not be read or written (a full disk, say); pool errors
    /// that already name the CT (exhausted, overlapping) stay [`CtError::Userns`].
    #[error("CT {ctid}: allocate an id range")]
    AllocateIds {
        ctid: Ctid,
        #[source]
        source: crate::userns::UsernsError,
    },
    #[error("CT {ctid}: {op} {path}")]
    Io {
        ctid: Ctid,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CT {ctid}: {op}: {errno}")]
    Sys {
        ctid: Ctid,
        op: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("CT {0} is not running")]
    NotRunning(Ctid),
    #[error("CT {0} is already running")]
    AlreadyRunning(Ctid),
    #[error("CT {0} is running: stop it first")]
    Running(Ctid),
    #[error("CT {0} is suspended: resume it first")]
    Suspended(Ctid),
    #[error("CT {ctid} failed to start: {msg}")]
    StartFailed { ctid: Ctid, msg: String },
    #[error(
        "CT {ctid} failed to start: its init {init} {exit} {after_ms} ms after its exec{}",
        console_text(console)
    )]
    InitDied {
        ctid: Ctid,
        init: String,
        exit: state::InitExit,
        after_ms: u32,
        /// The console's last lines.
        console: Vec<String>,
    },
    #[error("CT {ctid} failed to start: bad report from {from}")]
    StartReport {
        ctid: Ctid,
        from: &'static str,
        #[source]
        source: MonitorMsgError,
    },
    #[error("CT {ctid}: {msg}")]
    Invalid { ctid: Ctid, msg: String },
    /// The CT left for another host; this copy only waits to be destroyed.
    #[error(
        "CT {ctid} was migrated to {to} and runs there (`berth destroy {ctid}` removes this copy)"
    )]
    Migrated { ctid: Ctid, to: String },
    /// A migration's target cannot take the CT; nothing was changed on it.
    #[error("CT {ctid}: this host cannot take it: {msg}")]
    MigrateRefused { ctid: Ctid, msg: String },
    #[error("CT {0} is stopped: use --save to change its stored config")]
    NeedSave(Ctid),
    #[error("CT {ctid}")]
    Net {
        ctid: Ctid,
        #[source]
        source: NetError,
    },
    #[error("CT {ctid}")]
    Hook {
        ctid: Ctid,
        #[source]
        source: HookError,
    },
    #[error("CT {ctid}")]
    Shaping {
        ctid: Ctid,
        #[source]
        source: ShapingError,
    },
}

type Result<T, E = CtError> = std::result::Result<T, E>;

fn ctid_list(ctids: &[Ctid]) -> String {
    let ids: Vec<String> = ctids.iter().map(Ctid::to_string).collect();
    ids.join(", ")
}

fn console_text(lines: &[String]) -> String {
    if lines.is_empty() {
        return "; it printed nothing on the console".into();
    }
    let mut s = String::from("; the console's last lines:");
    for l in lines {
        s.push_str("\n    ");
        s.push_str(l);
    }
    s
}

fn io_err<'a>(
    ctid: Ctid,
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CtError + 'a {
    move |source| CtError::Io {
        ctid,
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn cg_err(ctid: Ctid) -> impl FnOnce(cgroups::CgroupError) -> CtError {
    move |source| CtError::Cgroup { ctid, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Suspended,
    Mounted,
    Stopped,
    /// Stopped here because it runs on another host now (`migrate`).
    Migrated,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Suspended => "suspended",
            State::Mounted => "mounted",
            State::Stopped => "stopped",
            State::Migrated => "migrated",
        })
    }
}

/// What `berth status --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub ctid: Ctid,
    /// `None` for a CT made by an older berth until its next `start` or `set` assigns one
    /// (`status` only reads).
    pub uuid: Option<uuid::Uuid>,
    pub name: Option<String>,
    pub hostname: Option<String>,
    pub template: String,
    pub state: State,
    pub init_pid: Option<i32>,
    /// No user namespace: the CT's root is the host's root.
    pub privileged: bool,
    /// The CT's id range on the host (unprivileged CTs).
    pub userns: Option<crate::config::UserNs>,
    /// `overlay` (over the template) or `copy`.
    pub layout: crate::config::PrivateLayout,
    pub config_path: PathBuf,
    pub root_path: PathBuf,
    pub private_path: PathBuf,
    pub console_log: PathBuf,
    /// How init ended when it exited on its own after `start` (stopped CTs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<state::LastExit>,
    /// Interfaces with host-side names, addresses and mode (as set up when running, as
    /// configured otherwise).
    pub net: NetState,
}

fn cgroup(host: &Host, ctid: Ctid) -> Result<cgroups::Cgroup> {
    cgroups::open(&host.cgroup_parent, ctid).map_err(cg_err(ctid))
}

fn resources_of(r: &ResourceConfig) -> Resources {
    Resources {
        memory: r.memory,
        swap: r.swap,
        cpuunits: r.cpuunits,
        cpulimit: r.cpulimit,
        cpus: r.cpus,
        numproc: r.numproc,
        ioweight: r.ioweight,
    }
}

/// The live run state, if the CT's init is running.
pub fn running(host: &Host, ctid: Ctid) -> Option<RunState> {
    RunState::read(&host.state_path(ctid))
        .ok()
        .flatten()
        .filter(RunState::alive)
}

/// Whether a CT that does not run is mounted: its root is a mount point that is not one a
/// start made for an init that has died since (that CT is stopped; its next start or stop
/// cleans the mount up).
pub fn mounted(host: &Host, ctid: Ctid) -> bool {
    state::is_mount_point(&host.root_dir(ctid))
        && !RunState::read(&host.state_path(ctid))
            .ok()
            .flatten()
            .is_some_and(|s| s.mounted_by_start)
}

pub fn status(host: &Host, ctid: Ctid) -> Result<Status> {
    let cfg = CtConfig::load(host, ctid)?;
    let run = running(host, ctid);
    let state = match &run {
        Some(_) => {
            if cgroup(host, ctid)?.is_frozen().unwrap_or(false) {
                State::Suspended
            } else {
                State::Running
            }
        }
        None if migrate::migrated(host, ctid).is_some() => State::Migrated,
        None if mounted(host, ctid) => State::Mounted,
        None => State::Stopped,
    };
    let last_exit = match state {
        State::Stopped => state::LastExit::read(&state::LastExit::path(&host.run, ctid)),
        _ => None,
    };
    Ok(Status {
        ctid,
        uuid: cfg.uuid,
        name: cfg.name,
        hostname: cfg.hostname,
        template: cfg.template,
        state,
        init_pid: run.as_ref().map(|r| r.init_pid),
        privileged: cfg.userns.is_none(),
        userns: cfg.userns,
        layout: cfg.layout,
        net: run
            .and_then(|r| r.net)
            .unwrap_or_else(|| NetState::expected(ctid, &cfg.net)),
        config_path: host.conf_path(ctid),
        root_path: host.root_dir(ctid),
        private_path: host.private_dir(ctid),
        console_log: host.console_log_path(ctid),
        last_exit,
    })
}

/// The CT's UUID, assigned and saved first if its config predates UUIDs. Only under the CT's
/// lock: the config is re-read here, so a change saved by another command since the caller
/// loaded it is kept.
fn ensure_uuid(host: &Host, ctid: Ctid) -> Result<uuid::Uuid> {
    let mut cfg = CtConfig::load(host, ctid)?;
    if let Some(u) = cfg.uuid {
        return Ok(u);
    }
    let u = uuid::Uuid::new_v4();
    cfg.uuid = Some(u);
    cfg.save(host)?;
    tracing::info!(%ctid, uuid = %u, "CT had no UUID (made by an older berth): assigned one");
    Ok(u)
}

fn lock(host: &Host, ctid: Ctid) -> Result<CtLock> {
    fs::create_dir_all(&host.run).map_err(io_err(ctid, "create run directory", &host.run))?;
    Ok(CtLock::acquire(&host.lock_path(ctid), lock_timeout())?)
}

/// The CT's lock and its config as read under it. The config is read first only to refuse an
/// unknown CT before a lock file is made for it; a copy read before the lock is stale once a
/// concurrent `set --save` commits, and acting on it loses that change.
fn lock_loaded(host: &Host, ctid: Ctid) -> Result<(CtLock, CtConfig)> {
    CtConfig::load(host, ctid)?;
    let l = lock(host, ctid)?;
    Ok((l, CtConfig::load(host, ctid)?))
}

fn net_err(ctid: Ctid) -> impl FnOnce(NetError) -> CtError {
    move |source| CtError::Net { ctid, source }
}

fn hook_err(ctid: Ctid) -> impl FnOnce(HookError) -> CtError {
    move |source| CtError::Hook { ctid, source }
}

fn open_ns(ctid: Ctid, pid: i32) -> Result<OwnedFd> {
    let p = PathBuf::from(format!("/proc/{pid}/ns/net"));
    fs::File::open(&p)
        .map(OwnedFd::from)
        .map_err(io_err(ctid, "open network namespace", &p))
}

/// Resource counters of a running CT (`list -o`, berthd).
pub fn stats(host: &Host, ctid: Ctid) -> Result<Option<cgroups::Stats>> {
    if running(host, ctid).is_none() {
        return Ok(None);
    }
    cgroup(host, ctid)?.stats().map(Some).map_err(cg_err(ctid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message names the operation and object; the cause comes only through `source`.
    #[test]
    fn messages_leave_the_cause_to_source() {
        let ctid = Ctid::new(101).unwrap();
        let errs = [
            io_err(ctid, "write", Path::new("/x"))(io::Error::other("disk on fire")),
            cg_err(ctid)(cgroups::CgroupError::Io {
                op: "write memory.max".into(),
                path: "/sys/fs/cgroup/berth/101".into(),
                source: io::Error::other("disk on fire"),
            }),
            CtError::StartReport {
                ctid,
                from: "the monitor",
                source: MonitorMsgError::BadPid(-1),
            },
            hook_err(ctid)(HookError::new(
                "shape",
                "venet101",
                io::Error::other("disk on fire"),
            )),
        ];
        for e in errs {
            let source = std::error::Error::source(&e).expect("a source").to_string();
            let msg = e.to_string();
            assert!(msg.starts_with("CT 101"), "{msg}");
            assert!(
                !msg.contains(&source),
                "{msg:?} repeats its source {source:?}"
            );
        }
        let e = io_err(ctid, "write", Path::new("/x"))(io::Error::other("boom"));
        assert_eq!(e.to_string(), "CT 101: write /x");
    }

    #[test]
    fn init_died_names_the_ct_the_exit_and_the_console() {
        let ctid = Ctid::new(101).unwrap();
        let e = CtError::InitDied {
            ctid,
            init: "/sbin/init".into(),
            exit: state::InitExit::Exited { code: 3 },
            after_ms: 12,
            console: vec!["first".into(), "boom".into()],
        };
        assert_eq!(
            e.to_string(),
            "CT 101 failed to start: its init /sbin/init exited with status 3 12 ms after its \
             exec; the console's last lines:\n    first\n    boom"
        );
        let e = CtError::InitDied {
            ctid,
            init: "/bin/x".into(),
            exit: state::InitExit::Killed {
                signal: libc::SIGSEGV,
                core_dumped: false,
            },
            after_ms: 0,
            console: vec![],
        };
        assert_eq!(
            e.to_string(),
            "CT 101 failed to start: its init /bin/x was killed by SIGSEGV 0 ms after its exec; \
             it printed nothing on the console"
        );
    }
}
