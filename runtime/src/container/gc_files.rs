//! `gc`'s file half: creates killed midway (their `<conf>/<CTID>.creating` marker) and the run
//! and config files a killed command left (half-written `.tmp` files, state, exit records,
//! console logs and lock files of CTs that do not exist).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{GcReport, Result, io_err, lock};
use crate::config::Host;
use crate::ctid::Ctid;
use crate::template::TemplateStore;

/// The CTID a file in the run or conf directory belongs to (`<CTID>.<suffix>`), and the suffix.
fn owner(name: &str) -> Option<(Ctid, &str)> {
    let (id, rest) = name.split_once('.')?;
    Some((id.parse().ok()?, rest))
}

fn remove_file(ctid: Ctid, p: &Path) -> Result<bool> {
    match fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(ctid, "remove", p)(e)),
    }
}

/// Rolls back every create (or OpenVZ import) that died before its config was whole: the
/// private area, its scratch copies, the marker. Its id range goes with gc's release of
/// ranges without a CT; its lock file with [`stale_files`].
pub(super) fn rollback_creates(host: &Host, rep: &mut GcReport) {
    let Ok(rd) = fs::read_dir(host.conf_dir()) else {
        return;
    };
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some((ctid, "creating")) = name.to_str().and_then(owner) else {
            continue;
        };
        match rollback_create(host, ctid) {
            Ok(true) => rep.rolled_back_creates.push(ctid),
            Ok(false) => {}
            Err(e) => rep.errors.push(super::gc::error_chain(&e)),
        }
    }
}

fn rollback_create(host: &Host, ctid: Ctid) -> Result<bool> {
    // A create still running holds the lock; once we have it, it finished or died.
    let _lock = lock(host, ctid)?;
    let marker = host.creating_path(ctid);
    if !marker.exists() {
        return Ok(false);
    }
    let whole = host.conf_path(ctid).exists();
    if !whole {
        let private = host.root.join("private");
        for p in [
            private.join(format!(".{ctid}.tmp")),
            // An OpenVZ ploop import's scratch mount point.
            private.join(format!(".{ctid}")),
            host.private_dir(ctid),
        ] {
            if fs::symlink_metadata(&p).is_ok() {
                crate::template::detach_mounts_below(&p);
                TemplateStore::remove_tree_fast(&p)?;
            }
        }
    }
    // With a config the CT is whole: only the marker was left.
    remove_file(ctid, &marker)?;
    Ok(!whole)
}

/// Removes what killed commands left in the run and conf directories: `.tmp` files (a write
/// that never got renamed into place), and the state, exit, console and lock files of CTs that
/// have no config. Each under the CT's lock, so nothing a live command is writing goes. Runs
/// after gc's release of id ranges, which decides on the CTs that still hold one.
pub(super) fn stale_files(host: &Host, known: &[Ctid], rep: &mut GcReport) {
    let mut found: Vec<(Ctid, PathBuf)> = Vec::new();
    let mut unknown: Vec<Ctid> = Vec::new();
    for dir in [host.run.clone(), host.conf_dir()] {
        let Ok(rd) = fs::read_dir(&dir) else {
            continue;
        };
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some((ctid, suffix)) = name.to_str().and_then(owner) else {
                continue;
            };
            // Its lock file goes too, even one this pass makes by locking it.
            if !known.contains(&ctid) {
                unknown.push(ctid);
            }
            let orphan = dir == host.run && !known.contains(&ctid);
            let tmp = suffix.ends_with(".tmp");
            if tmp || (orphan && matches!(suffix, "state.json" | "exit.json" | "console.log")) {
                found.push((ctid, ent.path()));
            }
        }
    }
    let gone = |ctid| !host.conf_path(ctid).exists() && !host.creating_path(ctid).exists();
    for (ctid, path) in found {
        let res = (|| -> Result<bool> {
            let _lock = lock(host, ctid)?;
            // Re-checked under the lock: a create may have made the CT since the listing.
            let tmp = path.extension().is_some_and(|x| x == "tmp");
            if !tmp && !gone(ctid) {
                return Ok(false);
            }
            remove_file(ctid, &path)
        })();
        match res {
            Ok(true) => rep.stale_files.push(path),
            Ok(false) => {}
            Err(e) => rep.errors.push(super::gc::error_chain(&e)),
        }
    }
    // Lock files last (taking a lock above made one): removing it ends the CT's last trace.
    unknown.sort_unstable();
    unknown.dedup();
    for ctid in unknown {
        let path = host.lock_path(ctid);
        let res = (|| -> Result<bool> {
            let _lock = lock(host, ctid)?;
            if !gone(ctid) {
                return Ok(false);
            }
            remove_file(ctid, &path)
        })();
        match res {
            Ok(true) => rep.stale_files.push(path),
            Ok(false) => {}
            Err(e) => rep.errors.push(super::gc::error_chain(&e)),
        }
    }
}
