//! `checkpoint` and `restore`: the whole CT (its pid/mount/uts/ipc/net/cgroup/user namespaces,
//! console, established TCP connections) dumped by CRIU and restored under a new monitor.
//!
//! CRIU runs as host root on the CT's init. What it cannot see as part of the CT is declared
//! external: berth's binds of host paths (see `mounts`), and the console pty, which the
//! restoring monitor replaces with a new one (`--inherit-fd`). The CT's network namespace is
//! dumped with its CT-side interfaces; on restore berth first builds the host side exactly as
//! `start` does (routes, proxy entries, datapath attached before the link is up, shaping) in a
//! staging namespace, moves the CT ends out to the host under temporary names, and CRIU moves
//! them into the restored namespace (`--external netdev[…]`) with their dumped ifindex and MAC.
//! The restored init is made the new monitor's child (`--restore-sibling`), so it is logged,
//! reaped and stopped like a started one. Limits come from the config, counters continue under
//! the CT's UUID (the datapath keys them by CTID and UUID, not by interface).

mod mounts;
mod restore;

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::state::{self, LastExit};
use super::stop::cleanup_stopped;
use super::{CtError, NetHooks, cgroup, lock_loaded, running};
use crate::cgroups::CgroupManager;
use crate::config::{CtConfig, Host};
use crate::ctid::Ctid;

pub use mounts::{External, Source};
pub use restore::restore;

/// The file in an image directory that says which CT it holds and how to restore it.
pub const META_FILE: &str = "berth-checkpoint.json";
const META_VERSION: u32 = 1;
const DUMP_LOG: &str = "dump.log";
const RESTORE_LOG: &str = "restore.log";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// CRIU cannot be had here: nothing was changed.
    #[error("{op} unavailable: {reason}")]
    Unavailable { op: &'static str, reason: String },
    #[error(transparent)]
    Ct(#[from] CtError),
    #[error("CT {ctid}: {op} failed: {msg} (log: {})", log.display())]
    Criu {
        ctid: Ctid,
        op: &'static str,
        msg: String,
        log: PathBuf,
    },
    #[error("CT {ctid}: {} {msg}", dir.display())]
    Images {
        ctid: Ctid,
        dir: PathBuf,
        msg: String,
    },
    #[error("CT {ctid}: cannot checkpoint: {msg}")]
    Unsupported { ctid: Ctid, msg: String },
    #[error("CT {ctid}: {op} {}", path.display())]
    Io {
        ctid: Ctid,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

fn io_err<'a>(
    ctid: Ctid,
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        ctid,
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The CRIU binary to use: `BERTH_CRIU` if set (a path), else the one setup installs into
/// /usr/local, else the packaged one, else `criu` on PATH.
fn criu_path() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_CRIU") {
        return PathBuf::from(p);
    }
    for p in ["/usr/local/sbin/criu", "/usr/sbin/criu"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("criu")
}

/// A CRIU that passes `criu check` on this kernel, or why there is none.
pub fn criu_available() -> Result<PathBuf, String> {
    let bin = criu_path();
    let out = Command::new(&bin)
        .arg("check")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}: {e} (xtask/setup.sh installs CRIU)",
                bin.display()
            )
        })?;
    if out.status.success() {
        return Ok(bin);
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output");
    Err(format!(
        "`{} check` fails on this kernel: {}",
        bin.display(),
        last.trim()
    ))
}

/// [`criu_available`], remembered in the run directory for this boot and this CRIU binary:
/// `criu check` takes ~0.3 s here, which a restore would otherwise add to the CT's downtime.
fn require_criu(host: &Host, op: &'static str) -> Result<PathBuf> {
    let bin = criu_path();
    let stamp = fs::metadata(&bin)
        .ok()
        .map(|m| {
            format!(
                "{} {} {} {}\n",
                state::boot_id().unwrap_or_default(),
                bin.display(),
                m.len(),
                m.mtime()
            )
        })
        .filter(|_| bin.is_absolute());
    let cache = host.run.join("criu-check.ok");
    if let Some(s) = &stamp
        && fs::read_to_string(&cache).ok().as_deref() == Some(s.as_str())
    {
        return Ok(bin);
    }
    let bin = criu_available().map_err(|reason| CheckpointError::Unavailable { op, reason })?;
    if let Some(s) = stamp {
        let _ = fs::create_dir_all(&host.run).and_then(|()| fs::write(&cache, s));
    }
    Ok(bin)
}

/// Where `checkpoint` puts a CT's images unless told otherwise (`<root>/dump/<CTID>`).
pub fn default_dir(host: &Host, ctid: Ctid) -> PathBuf {
    host.root.join("dump").join(ctid.to_string())
}

/// Whether `dir` (default: the CT's default directory) holds a checkpoint.
pub fn has_checkpoint(host: &Host, ctid: Ctid, dir: Option<&Path>) -> bool {
    let d = dir.map_or_else(|| default_dir(host, ctid), Path::to_path_buf);
    d.join(META_FILE).is_file()
}

/// What `checkpoint` records next to CRIU's images.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    version: u32,
    ctid: u32,
    uuid: Option<uuid::Uuid>,
    /// Unix time of the dump.
    at: u64,
    /// CRIU's id of the console pty (`tty[rdev:dev]`), replaced by the new one at restore.
    console: Option<String>,
    mounts: Vec<External>,
    /// The CT-side names of the dumped interfaces, in berth's order.
    netdevs: Vec<String>,
    /// Whether the CT still runs (a `--keep-running` checkpoint).
    left_running: bool,
}

impl Meta {
    fn read(ctid: Ctid, dir: &Path) -> Result<Self> {
        let p = dir.join(META_FILE);
        let bad = |msg: String| CheckpointError::Images {
            ctid,
            dir: dir.to_path_buf(),
            msg,
        };
        let b = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(bad(format!("holds no checkpoint (no {META_FILE})")));
            }
            Err(e) => return Err(bad(format!("cannot be read: {e}"))),
        };
        let m: Meta = serde_json::from_slice(&b)
            .map_err(|e| bad(format!("holds a damaged checkpoint ({META_FILE}: {e})")))?;
        if m.version != META_VERSION {
            return Err(bad(format!(
                "holds a checkpoint of format {} (this berth reads {META_VERSION})",
                m.version
            )));
        }
        if m.ctid != ctid.get() {
            return Err(bad(format!(
                "holds a checkpoint of CT {}, not {ctid}",
                m.ctid
            )));
        }
        for f in ["inventory.img", "pstree.img"] {
            if !dir.join(f).is_file() {
                return Err(bad(format!("holds a damaged checkpoint ({f} is missing)")));
            }
        }
        Ok(m)
    }
}

/// What a finished checkpoint reports.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointReport {
    pub ctid: Ctid,
    pub dir: PathBuf,
    /// From the start of CRIU's dump to its end: the CT is frozen this long.
    pub dump_ms: u64,
    /// The size of the images.
    pub bytes: u64,
    pub left_running: bool,
}

/// CRIU's last error lines in `log`, for the message.
fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let errs: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .collect();
    let pick = if errs.is_empty() {
        text.lines().rev().take(2).collect::<Vec<_>>()
    } else {
        errs.into_iter().rev().take(2).collect()
    };
    let mut v: Vec<String> = pick.iter().map(|l| l.trim().to_string()).collect();
    v.reverse();
    if v.is_empty() {
        "CRIU wrote no log".into()
    } else {
        v.join("; ")
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Removes CRIU's images and berth's record from `dir` (logs stay for the curious), and the
/// directory itself when that leaves it empty.
fn remove_images(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if n.ends_with(".img") || n == META_FILE || n == "restore.pid" {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Options of [`checkpoint`].
#[derive(Debug, Clone, Default)]
pub struct CheckpointOpts {
    /// Image directory (default: [`default_dir`]).
    pub dir: Option<PathBuf>,
    /// Dump and let the CT go on running (a snapshot); otherwise it stops with the dump.
    pub keep_running: bool,
}

/// Dumps a running CT with CRIU into an image directory. Without `keep_running` the CT is
/// stopped by the dump and its host side torn down as by `stop` (counters stay).
pub fn checkpoint(
    host: &Host,
    ctid: Ctid,
    opts: &CheckpointOpts,
    hooks: &mut dyn NetHooks,
) -> Result<CheckpointReport> {
    CtConfig::load(host, ctid).map_err(CtError::from)?;
    let criu = require_criu(host, "checkpoint")?;
    let (_lock, cfg) = lock_loaded(host, ctid)?;
    let Some(st) = running(host, ctid) else {
        return Err(CtError::NotRunning(ctid).into());
    };
    if cgroup(host, ctid)?.is_frozen().unwrap_or(false) {
        return Err(CtError::Suspended(ctid).into());
    }
    let dir = opts.dir.clone().unwrap_or_else(|| default_dir(host, ctid));
    if dir.join(META_FILE).exists() {
        return Err(CheckpointError::Images {
            ctid,
            dir,
            msg: "already holds a checkpoint: restore it, or remove it first".into(),
        });
    }
    let pid = st.init_pid;
    let ct_mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).map_err(io_err(
        ctid,
        "read",
        Path::new("init's mountinfo"),
    ))?;
    let host_mounts = fs::read_to_string("/proc/self/mountinfo").map_err(io_err(
        ctid,
        "read",
        Path::new("/proc/self/mountinfo"),
    ))?;
    let ext = mounts::externals(&mounts::parse(&ct_mounts), &mounts::parse(&host_mounts))
        .map_err(|msg| CheckpointError::Unsupported { ctid, msg })?;
    let console = fs::metadata(format!("/proc/{pid}/root/dev/console"))
        .ok()
        .filter(|m| m.rdev() != 0)
        .map(|m| format!("tty[{:x}:{:x}]", m.rdev(), m.dev()));
    let netdevs: Vec<String> = st
        .net
        .as_ref()
        .map(|n| n.ifaces.iter().map(|i| i.ct_ifname.clone()).collect())
        .unwrap_or_default();

    fs::create_dir_all(&dir).map_err(io_err(ctid, "create image directory", &dir))?;
    let meta = Meta {
        version: META_VERSION,
        ctid: ctid.get(),
        uuid: cfg.uuid,
        at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        console: console.clone(),
        mounts: ext.clone(),
        netdevs,
        left_running: opts.keep_running,
    };

    let mut cmd = Command::new(&criu);
    cmd.arg("dump")
        .arg("-t")
        .arg(pid.to_string())
        .arg("-D")
        .arg(&dir)
        .args(["-o", DUMP_LOG, "-v4"])
        .args(common_args());
    if let Some(c) = &console {
        cmd.arg("--external").arg(c);
    }
    for e in &ext {
        cmd.arg("--external")
            .arg(format!("mnt[{}]:{}", e.mountpoint.display(), e.key));
    }
    if opts.keep_running {
        cmd.arg("--leave-running");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let status = cmd.status().map_err(io_err(ctid, "run", criu.as_path()))?;
    let dump_ms = t0.elapsed().as_millis() as u64;
    let log = dir.join(DUMP_LOG);
    if !status.success() {
        remove_images(&dir);
        // CRIU resumes the tree when a dump fails; a CT it could not resume would look
        // stopped now, so say so rather than claim it runs on.
        let msg = format!("criu dump {status}: {}", log_tail(&log));
        if running(host, ctid).is_none() {
            warn!(%ctid, "the CT's init is gone after a failed dump");
        }
        return Err(CheckpointError::Criu {
            ctid,
            op: "checkpoint",
            msg,
            log,
        });
    }
    let mp = dir.join(META_FILE);
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    fs::write(
        &tmp,
        serde_json::to_vec_pretty(&meta).expect("meta serializes"),
    )
    .and_then(|()| fs::rename(&tmp, &mp))
    .map_err(io_err(ctid, "write", &mp))?;
    let bytes = dir_bytes(&dir);
    if !opts.keep_running {
        finish_stopped(host, ctid, &st, hooks)?;
    }
    info!(%ctid, dir = %dir.display(), dump_ms, bytes, keep_running = opts.keep_running, "checkpointed");
    Ok(CheckpointReport {
        ctid,
        dir,
        dump_ms,
        bytes,
        left_running: opts.keep_running,
    })
}

/// Options both dump and restore need alike.
fn common_args() -> [&'static str; 4] {
    [
        "--tcp-established",
        "--file-locks",
        "--manage-cgroups=soft",
        "--network-lock=nftables",
    ]
}

/// After a dump that ended the CT: waits for init and its monitor to be gone, then tears the
/// host side down as `stop` does.
fn finish_stopped(
    host: &Host,
    ctid: Ctid,
    st: &state::RunState,
    hooks: &mut dyn NetHooks,
) -> Result<()> {
    if let Ok(fd) = state::pidfd_open(st.init_pid) {
        state::wait_pidfd(&fd, Duration::from_secs(10));
    }
    // The monitor reaps init and records its SIGKILL as an exit of its own; that record is
    // removed once the monitor is done writing it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && process_lives(st.monitor_pid) {
        std::thread::sleep(Duration::from_millis(5));
    }
    cleanup_stopped(host, ctid, false, hooks)?;
    let exit = LastExit::path(&host.run, ctid);
    match fs::remove_file(&exit) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(ctid, "remove", &exit)(e)),
    }
}

/// Alive and not a zombie (a monitor whose parent is gone may wait a while to be reaped).
fn process_lives(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|c| c != 'Z' && c != 'X'),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_names_the_operation_and_the_reason() {
        let e = CheckpointError::Unavailable {
            op: "checkpoint",
            reason: "`criu check` fails on this kernel: vdso".into(),
        };
        assert_eq!(
            e.to_string(),
            "checkpoint unavailable: `criu check` fails on this kernel: vdso"
        );
    }

    #[test]
    fn meta_refuses_another_cts_or_a_damaged_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let ctid = Ctid::new(101).unwrap();
        let e = Meta::read(ctid, d.path()).unwrap_err().to_string();
        assert!(e.contains("holds no checkpoint"), "{e}");
        fs::write(d.path().join(META_FILE), b"{not json").unwrap();
        let e = Meta::read(ctid, d.path()).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
        let m = Meta {
            version: META_VERSION,
            ctid: 102,
            uuid: None,
            at: 0,
            console: None,
            mounts: vec![],
            netdevs: vec![],
            left_running: false,
        };
        fs::write(d.path().join(META_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        let e = Meta::read(ctid, d.path()).unwrap_err().to_string();
        assert!(e.contains("of CT 102, not 101"), "{e}");
        let m = Meta { ctid: 101, ..m };
        fs::write(d.path().join(META_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        let e = Meta::read(ctid, d.path()).unwrap_err().to_string();
        assert!(e.contains("inventory.img is missing"), "{e}");
    }
}
