//! Converting a stopped CT between privileged (no user namespace) and unprivileged (its own id
//! range), shifting the ownership of its private files to match.
//!
//! Crash-safe: the target mode and range go into a journal (`conf/<CTID>.convert`) before the
//! first chown, the config changes only after the last one, and the shift skips ids already on
//! the target side, so running the same conversion again finishes an interrupted one. While a
//! journal exists the CT will not mount or start, and gc keeps its id range.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::info;

use super::{CtError, Result, io_err, lock, running, state};
use crate::config::{CtConfig, Host, PrivateLayout, UserNs};
use crate::ctid::Ctid;
use crate::template::TemplateStore;
use crate::userns::{self, ShiftDirection};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Target {
    Privileged,
    Unprivileged,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    to: Target,
    /// The range being shifted into (unprivileged) or out of (privileged).
    range: UserNs,
}

pub(super) fn journal_path(host: &Host, ctid: Ctid) -> PathBuf {
    host.conf_dir().join(format!("{ctid}.convert"))
}

/// Refuses to use a CT whose conversion was interrupted (its files are half shifted).
pub(super) fn check_no_conversion(host: &Host, ctid: Ctid) -> Result<()> {
    if journal_path(host, ctid).exists() {
        return Err(CtError::Invalid {
            ctid,
            msg: format!(
                "a conversion was interrupted ({} exists): run `berth set {ctid} --privileged yes|no` again to finish it",
                journal_path(host, ctid).display()
            ),
        });
    }
    Ok(())
}

/// Whether an interrupted conversion holds CT `ctid`'s files (gc must keep its range).
pub fn conversion_pending(host: &Host, ctid: Ctid) -> bool {
    journal_path(host, ctid).exists()
}

fn read_journal(p: &Path, ctid: Ctid) -> Result<Option<Journal>> {
    match fs::read_to_string(p) {
        Ok(t) => toml::from_str(&t).map(Some).map_err(|e| CtError::Invalid {
            ctid,
            msg: format!("conversion journal {}: {}", p.display(), e.message()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(ctid, "read", p)(e)),
    }
}

/// Makes stopped CT `ctid` privileged (`privileged`) or unprivileged, shifting the owners of
/// its private files. Returns false when it already was.
pub fn set_privileged(host: &Host, ctid: Ctid, privileged: bool) -> Result<bool> {
    CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    // Read again under the lock: a start in between may have written it (its uuid).
    let mut cfg = CtConfig::load(host, ctid)?;
    if running(host, ctid).is_some() {
        return Err(CtError::Invalid {
            ctid,
            msg: "cannot change privileged mode while the CT runs: stop it first".into(),
        });
    }
    if state::is_mount_point(&host.root_dir(ctid)) {
        return Err(CtError::Invalid {
            ctid,
            msg: "cannot change privileged mode while the CT is mounted: `berth umount` it first"
                .into(),
        });
    }
    let target = if privileged {
        Target::Privileged
    } else {
        Target::Unprivileged
    };
    let jpath = journal_path(host, ctid);
    let journal = match read_journal(&jpath, ctid)? {
        Some(j) if j.to != target => {
            return Err(CtError::Invalid {
                ctid,
                msg: format!(
                    "an interrupted conversion to {:?} must finish first: run `berth set {ctid} --privileged {}`",
                    j.to,
                    if j.to == Target::Privileged {
                        "yes"
                    } else {
                        "no"
                    }
                ),
            });
        }
        Some(j) => j,
        None => {
            if cfg.userns.is_none() == privileged {
                return Ok(false);
            }
            let range = match cfg.userns {
                Some(u) => u,
                None => {
                    if cfg.layout == PrivateLayout::Overlay {
                        let store = TemplateStore::open(host.template_dir())?;
                        let max = store.max_id(&cfg.template)?;
                        if max >= userns::RANGE {
                            return Err(CtError::Invalid {
                                ctid,
                                msg: format!(
                                    "template {:?} has files owned by id {max}, which a CT's {} ids cannot map",
                                    cfg.template,
                                    userns::RANGE
                                ),
                            });
                        }
                    }
                    userns::allocate(host, ctid)?
                }
            };
            let j = Journal { to: target, range };
            let dir = direction(&j);
            // Everything must map before anything changes.
            if let Err(e) = userns::unmappable_ids(&shifted_tree(host, &cfg), dir) {
                if target == Target::Unprivileged {
                    let _ = userns::release(host, ctid, &range);
                }
                return Err(CtError::Invalid {
                    ctid,
                    msg: format!(
                        "{}: nothing was changed",
                        crate::error_chain::ErrorChain(&e)
                    ),
                });
            }
            let text = toml::to_string(&j).map_err(|e| CtError::Invalid {
                ctid,
                msg: format!("conversion journal: {e}"),
            })?;
            fs::write(&jpath, text).map_err(io_err(ctid, "write", &jpath))?;
            j
        }
    };
    let tree = shifted_tree(host, &cfg);
    let changed = userns::shift_tree(&tree, direction(&journal))?;
    cfg.userns = match journal.to {
        Target::Unprivileged => Some(journal.range),
        Target::Privileged => None,
    };
    cfg.save(host)?;
    fs::remove_file(&jpath).map_err(io_err(ctid, "remove", &jpath))?;
    if journal.to == Target::Privileged {
        userns::release(host, ctid, &journal.range)?;
    }
    info!(%ctid, privileged, changed, "converted");
    Ok(true)
}

fn direction(j: &Journal) -> ShiftDirection {
    match j.to {
        Target::Unprivileged => ShiftDirection::Into(j.range),
        Target::Privileged => ShiftDirection::OutOf(j.range),
    }
}

/// What holds the CT's own files: the overlay's upper layer (the template below is mapped at
/// mount time), or the whole copy.
fn shifted_tree(host: &Host, cfg: &CtConfig) -> PathBuf {
    let private = host.private_dir(cfg.ctid);
    match cfg.layout {
        PrivateLayout::Overlay => private.join("upper"),
        PrivateLayout::Copy => private,
    }
}
