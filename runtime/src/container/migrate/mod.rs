//! Migration between hosts: what the source keeps (the `migrated` mark, the ledger's close) and,
//! in [`target`], what the receiving host checks and does. The transport (ssh, rsync) is the
//! CLI's; this module only touches the host it runs on.
//!
//! - `<root>/migrated/<CTID>.json` on the source: the CT went to another host at `at`. Its
//!   config and files stay until `destroy` (or `migrate --remove-source`), it cannot be
//!   started or restored (the CT runs elsewhere under the same UUID), and the ledger treats it
//!   as gone: its counters were retired into `retired/<UUID>.json` when it left.
//! - `<root>/incoming/<CTID>.json` on the target: a migration of the CT with that UUID is under
//!   way (or failed and may be retried). Only such a CTID's files are ever removed by
//!   `abort`; the mark goes once the CT runs here.

pub mod target;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{CtError, NetHooks, cg_err, cgroup, ensure_uuid, io_err, lock_loaded, running};
use crate::cgroups::CgroupManager;
use crate::config::{CtConfig, Host};
use crate::ctid::Ctid;

type Result<T, E = CtError> = std::result::Result<T, E>;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The source's record that a CT left for another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigratedMark {
    pub uuid: Option<Uuid>,
    /// The destination as given to `migrate` (`[user@]HOST`).
    pub to: String,
    /// Unix time the CT started running there.
    pub at: u64,
    /// `live` or `offline`.
    pub how: String,
}

pub fn migrated_path(host: &Host, ctid: Ctid) -> PathBuf {
    host.root.join("migrated").join(format!("{ctid}.json"))
}

/// The mark of a CT that migrated away, if it did. A mark that cannot be read still says so
/// (fail closed: starting a CT that runs elsewhere would fork it).
pub fn migrated(host: &Host, ctid: Ctid) -> Option<MigratedMark> {
    let p = migrated_path(host, ctid);
    match fs::read(&p) {
        Ok(b) => Some(serde_json::from_slice(&b).unwrap_or_else(|e| MigratedMark {
            uuid: None,
            to: format!("another host ({} unreadable: {e})", p.display()),
            at: 0,
            how: String::new(),
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(MigratedMark {
            uuid: None,
            to: format!("another host ({} unreadable: {e})", p.display()),
            at: 0,
            how: String::new(),
        }),
    }
}

fn write_json_atomic(ctid: Ctid, path: &Path, v: &impl Serialize) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(ctid, "create directory", dir))?;
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(v).expect("plain struct"))
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(io_err(ctid, "write", path))
}

fn remove_if_present(ctid: Ctid, path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(ctid, "remove", path)(e)),
    }
}

/// What the source knows before a migration starts: the config (with its UUID, assigned now
/// if an older berth made the CT) and whether the CT runs.
pub fn prepare(host: &Host, ctid: Ctid) -> Result<(CtConfig, bool)> {
    CtConfig::load(host, ctid)?;
    if let Some(m) = migrated(host, ctid) {
        return Err(CtError::Migrated { ctid, to: m.to });
    }
    ensure_uuid(host, ctid)?;
    let cfg = CtConfig::load(host, ctid)?;
    let run = running(host, ctid).is_some();
    if run && cgroup(host, ctid)?.is_frozen().unwrap_or(false) {
        return Err(CtError::Suspended(ctid));
    }
    Ok((cfg, run))
}

/// Freezes a running CT for the final copy (refuses one that is not running, or frozen).
pub fn freeze(host: &Host, ctid: Ctid) -> Result<()> {
    let (_lock, _cfg) = lock_loaded(host, ctid)?;
    if running(host, ctid).is_none() {
        return Err(CtError::NotRunning(ctid));
    }
    let cg = cgroup(host, ctid)?;
    if cg.is_frozen().unwrap_or(false) {
        return Err(CtError::Suspended(ctid));
    }
    cg.freeze().map_err(cg_err(ctid))
}

/// Thaws a CT a failed migration froze.
pub fn thaw(host: &Host, ctid: Ctid) -> Result<()> {
    let (_lock, _cfg) = lock_loaded(host, ctid)?;
    if running(host, ctid).is_none() {
        return Err(CtError::NotRunning(ctid));
    }
    cgroup(host, ctid)?.thaw().map_err(cg_err(ctid))
}

/// The CT runs on `to` now: marks it migrated here, then closes its booking on this host (its
/// counters are retired under its UUID as `destroy` retires them, so this node's ledger bills
/// it up to now and the target's from now on).
pub fn finish_source(
    host: &Host,
    ctid: Ctid,
    to: &str,
    live: bool,
    hooks: &mut dyn NetHooks,
) -> Result<MigratedMark> {
    let (_lock, cfg) = lock_loaded(host, ctid)?;
    let mark = MigratedMark {
        uuid: cfg.uuid,
        to: to.to_string(),
        at: unix_now(),
        how: if live { "live" } else { "offline" }.into(),
    };
    write_json_atomic(ctid, &migrated_path(host, ctid), &mark)?;
    if let Some(uuid) = cfg.uuid {
        hooks
            .retire(ctid, uuid, &cfg.billing, &host.retired_counters_path(uuid))
            .map_err(super::hook_err(ctid))?;
    }
    Ok(mark)
}

/// Forgets the mark (`destroy` of a migrated CT).
pub(crate) fn clear_migrated(host: &Host, ctid: Ctid) -> Result<()> {
    remove_if_present(ctid, &migrated_path(host, ctid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_round_trips_and_a_damaged_one_still_counts() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::new(Some(d.path().to_path_buf()), None, None).unwrap();
        let ctid = Ctid::new(101).unwrap();
        assert_eq!(migrated(&host, ctid), None);
        let m = MigratedMark {
            uuid: Some(Uuid::new_v4()),
            to: "root@198.51.100.2".into(),
            at: 5,
            how: "live".into(),
        };
        write_json_atomic(ctid, &migrated_path(&host, ctid), &m).unwrap();
        assert_eq!(migrated(&host, ctid), Some(m));
        fs::write(migrated_path(&host, ctid), b"{").unwrap();
        assert!(migrated(&host, ctid).unwrap().to.contains("unreadable"));
        clear_migrated(&host, ctid).unwrap();
        clear_migrated(&host, ctid).unwrap();
    }
}
