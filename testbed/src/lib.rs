//! berth testbed: network topologies of real berth CTs and plain namespaces, built from a TOML
//! file, checked (reachability, shaping, accounting, spoofing) and torn down — even when
//! whoever built them is SIGKILLed.
//!
//! Every testbed lives under one **supervisor**, PID 1 of its own pid and mount namespaces
//! (see [`supervisor`]). The nodes' namespaces are held by processes of that pid namespace
//! only, and the berth installation (root, run dir, bpffs pins) sits on mounts of that mount
//! namespace only, so when the supervisor dies, however it dies, the kernel frees all of it.
//! What the kernel does not free — the CTs' cgroups — is under one cgroup parent per run,
//! named by a lease file that [`gc`] reads. Inside the namespaces every name is fixed (`up0`,
//! `br0`, CTIDs, addresses), so concurrent runs of one topology do not clash; only the cgroup
//! parent and the run directory carry the short run id.
//!
//! [`Testbed::up`] is the library entry point (berth's own tests use it); the
//! `berth testbed` CLI is a thin layer over it.

pub mod build;
pub mod checks;
pub mod client;
pub mod delay;
pub mod impair;
pub mod report;
pub mod supervisor;
pub mod topology;

use std::path::{Path, PathBuf};

pub use client::{Testbed, gc, list_runs, run};
pub use report::{CheckResult, Results, Status};
pub use topology::{Topology, TopologyError};

/// Where runs keep their lease, handle and control socket unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/berth-testbed";
/// Overrides [`DEFAULT_STATE_DIR`] (tests give every run set a directory of its own).
pub const STATE_ENV: &str = "BERTH_TESTBED_STATE";
/// Prefix of the per-run cgroup parent, the only host-global name a run makes.
pub const CGROUP_PREFIX: &str = "berth-tb-";

/// Exit codes of `berth testbed`.
pub mod exit {
    pub const PASS: u8 = 0;
    pub const CHECK_FAILED: u8 = 1;
    pub const SETUP: u8 = 2;
    pub const SKIPPED: u8 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: {message}")]
    Failed { op: String, message: String },
}

impl Error {
    pub fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let op = op.into();
        move |source| Error::Io { op, source }
    }

    pub fn failed(op: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Failed {
            op: op.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach berth and where runs keep their state.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `berth` binary: the supervisor is `berth testbed __supervise`, CTs are its verbs.
    pub berth_bin: PathBuf,
    pub state_dir: PathBuf,
    /// Run as an unprivileged user: the supervisor also gets a user namespace of its own (see
    /// [`supervisor`]); CT nodes become plain namespaces and eBPF-based checks are skipped.
    pub rootless: bool,
}

impl Options {
    /// `berth_bin`, with the state directory from `BERTH_TESTBED_STATE` or the default.
    pub fn new(berth_bin: impl Into<PathBuf>) -> Options {
        Options {
            berth_bin: berth_bin.into(),
            state_dir: default_state_dir(),
            rootless: false,
        }
    }
}

/// `BERTH_TESTBED_STATE`, else [`DEFAULT_STATE_DIR`] for root, else a directory of the user's
/// (`$XDG_RUNTIME_DIR/berth-testbed`, or `/tmp/berth-testbed-<uid>`).
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(STATE_ENV) {
        return PathBuf::from(d);
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from(DEFAULT_STATE_DIR);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("berth-testbed"),
        None => PathBuf::from(format!("/tmp/berth-testbed-{uid}")),
    }
}

/// Why eBPF-based checks and impairments do not run in rootless mode.
pub const ROOTLESS_NO_EBPF: &str =
    "rootless mode: eBPF needs CAP_BPF in the initial user namespace (run as root)";

/// The files of one run, in `<state>/<run id>/`.
#[derive(Debug, Clone)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(state: &Path, id: &str) -> RunDir {
        RunDir(state.join(id))
    }
    pub fn lease(&self) -> PathBuf {
        self.0.join("lease.json")
    }
    pub fn handle(&self) -> PathBuf {
        self.0.join("handle.json")
    }
    pub fn ctl(&self) -> PathBuf {
        self.0.join("ctl.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("supervisor.log")
    }
    /// Mount point of the run's private tmpfs (berth's root and run dir); empty on the host.
    pub fn mnt(&self) -> PathBuf {
        self.0.join("mnt")
    }
}

/// A short random run id (6 hex digits): only host-global names carry it.
pub fn new_run_id() -> String {
    let mut b = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    format!("{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}

pub fn cgroup_parent(run_id: &str) -> String {
    format!("{CGROUP_PREFIX}{run_id}")
}
