//! The receiving host of a migration: `preflight` checks everything before anything changes and
//! makes room for the copy, `activate` installs the config and starts (or restores) the CT, and
//! `abort` removes a failed attempt's half-state (keeping the copied files for a retry unless
//! told to purge them). Only a CTID with an `incoming` mark is ever touched by `abort`.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

use super::{Result, remove_if_present, unix_now, write_json_atomic};
use crate::config::{ConfigError, CtConfig, Host, PrivateLayout};
use crate::container::state::RunState;
use crate::container::{CtError, NetHooks, checkpoint, io_err, running};
use crate::ctid::Ctid;
use crate::net::{HostNet, Iface};
use crate::template::TemplateStore;
use crate::userns;

/// A migration under way to this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingMark {
    pub uuid: Uuid,
    pub at: u64,
}

pub fn incoming_path(host: &Host, ctid: Ctid) -> PathBuf {
    host.root.join("incoming").join(format!("{ctid}.json"))
}

/// Where a live migration's CRIU images land.
pub fn images_dir(host: &Host, ctid: Ctid) -> PathBuf {
    host.root.join("incoming").join(format!("{ctid}.images"))
}

fn incoming(host: &Host, ctid: Ctid) -> Option<IncomingMark> {
    serde_json::from_slice(&fs::read(incoming_path(host, ctid)).ok()?).ok()
}

/// What `preflight` tells the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreflightReport {
    pub version: String,
    pub private_dir: PathBuf,
    pub images_dir: PathBuf,
    /// A previous attempt's copy is there: the passes only send what changed since.
    pub retry: bool,
    pub free_bytes: u64,
}

/// The config the source sent, checked as `load` checks a file.
pub fn parse_config(host: &Host, ctid: Ctid, text: &str) -> Result<CtConfig> {
    let path = host.conf_path(ctid);
    let cfg: CtConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.clone(),
        source: e,
    })?;
    if cfg.ctid != ctid {
        return Err(CtError::MigrateRefused {
            ctid,
            msg: format!("the config sent is CT {}'s", cfg.ctid),
        });
    }
    cfg.validate(&path)?;
    if cfg.uuid.is_none() {
        return Err(CtError::MigrateRefused {
            ctid,
            msg: "the config sent has no UUID".into(),
        });
    }
    Ok(cfg)
}

/// Checks that this host can take CT `cfg.ctid` (`need_bytes` of files; CRIU if `live`), then
/// marks the CTID incoming and creates the directories the copy goes to. A refusal changes
/// nothing.
pub fn preflight(
    host: &Host,
    cfg: &CtConfig,
    need_bytes: u64,
    live: bool,
) -> Result<PreflightReport> {
    let ctid = cfg.ctid;
    let uuid = cfg.uuid.expect("parse_config checked");
    let refuse = |msg: String| CtError::MigrateRefused { ctid, msg };
    match CtConfig::load(host, ctid) {
        Err(ConfigError::NotFound(_)) => {}
        Ok(c) if c.uuid == cfg.uuid => {
            return Err(refuse(format!(
                "CT {ctid} is already here (same UUID {uuid}): migrated before?"
            )));
        }
        Ok(_) => return Err(refuse(format!("CTID {ctid} is taken by another CT"))),
        Err(e) => return Err(refuse(format!("CTID {ctid} is taken (its config: {e})"))),
    }
    let mark = incoming(host, ctid);
    let private = host.private_dir(ctid);
    let retry = match &mark {
        Some(m) if m.uuid == uuid => true,
        Some(m) => {
            return Err(refuse(format!(
                "CTID {ctid} is being migrated here by another CT (UUID {})",
                m.uuid
            )));
        }
        None if private.exists() => {
            return Err(refuse(format!(
                "{} exists without a CT config (a leftover: remove it first)",
                private.display()
            )));
        }
        None => false,
    };
    let mut addrs: Vec<IpAddr> = Vec::new();
    for other in host.list_ctids()? {
        let Ok(oc) = CtConfig::load(host, other) else {
            continue;
        };
        if oc.uuid == cfg.uuid {
            return Err(refuse(format!("CT {other} here has the same UUID {uuid}")));
        }
        if let (Some(n), Some(on)) = (&cfg.name, &oc.name)
            && n == on
        {
            return Err(refuse(format!("the name {n:?} is used by CT {other} here")));
        }
    }
    addrs.extend(cfg.net.all_addrs());
    crate::container::set::check_addrs_free(host, ctid, &addrs)?;
    let mut hn = HostNet::current().map_err(|source| CtError::Net { ctid, source })?;
    for i in &cfg.net.ifaces {
        if let Iface::Bridged(b) = i
            && let Some(br) = &b.bridge
            && hn
                .netlink()
                .link_by_name(br)
                .map_err(|source| CtError::Net { ctid, source })?
                .is_none()
        {
            return Err(refuse(format!(
                "bridge {br} (of {}) does not exist",
                b.name
            )));
        }
    }
    if cfg.layout == PrivateLayout::Overlay {
        let store = TemplateStore::open(host.template_dir())?;
        if !store.rootfs(&cfg.template).is_dir() {
            return Err(refuse(format!(
                "template {:?} (the CT's overlay lower layer) is not installed here",
                cfg.template
            )));
        }
    }
    if let Some(u) = &cfg.userns {
        match userns::holder_of(host, u).map_err(|e| refuse(e.to_string()))? {
            Err(why) => return Err(refuse(why)),
            Ok(Some(holder)) if holder != ctid => {
                return Err(refuse(format!(
                    "its id range {}.. is held by CT {holder} here",
                    u.uid_base
                )));
            }
            Ok(_) => {}
        }
    }
    let free_bytes = free_bytes(&host.root).map_err(&refuse)?;
    let have = if retry { dir_bytes(&private) } else { 0 };
    // 5% and 64 MiB of slack: the copy's directories and the target's own growth meanwhile.
    let need = need_bytes.saturating_sub(have) + need_bytes / 20 + (64 << 20);
    if free_bytes < need {
        return Err(refuse(format!(
            "{} has {} MiB free, the CT needs about {} MiB",
            host.root.display(),
            free_bytes >> 20,
            need >> 20
        )));
    }
    if live {
        checkpoint::criu_available()
            .map_err(|reason| refuse(format!("live migration unavailable: {reason}")))?;
    }
    // Everything checked: from here on, this host has a migration in progress.
    write_json_atomic(
        ctid,
        &incoming_path(host, ctid),
        &IncomingMark {
            uuid,
            at: unix_now(),
        },
    )?;
    fs::create_dir_all(&private).map_err(io_err(ctid, "create", &private))?;
    let images = images_dir(host, ctid);
    if live {
        let _ = fs::remove_dir_all(&images);
        fs::create_dir_all(&images).map_err(io_err(ctid, "create", &images))?;
    }
    Ok(PreflightReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        private_dir: private,
        images_dir: images,
        retry,
        free_bytes,
    })
}

fn free_bytes(p: &Path) -> std::result::Result<u64, String> {
    let mut dir = p.to_path_buf();
    while !dir.exists() {
        if !dir.pop() {
            break;
        }
    }
    let s =
        nix::sys::statvfs::statvfs(&dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// Installs the config sent (`cfg_text`), claims the CT's id range, and starts the CT — or,
/// with `restore_dir`, restores it from the images there; with neither (`start = false`) the
/// CT stays stopped (the source's was). A failure takes the config and the claim back and keeps
/// the copied files and the incoming mark for a retry.
pub fn activate(
    host: &Host,
    ctid: Ctid,
    cfg_text: &str,
    start: bool,
    restore_dir: Option<&Path>,
    hooks: &mut dyn NetHooks,
) -> std::result::Result<Option<RunState>, Box<dyn std::error::Error + Send + Sync>> {
    let cfg = parse_config(host, ctid, cfg_text)?;
    let refuse = |msg: String| -> Box<dyn std::error::Error + Send + Sync> {
        CtError::MigrateRefused { ctid, msg }.into()
    };
    let Some(mark) = incoming(host, ctid) else {
        return Err(refuse(
            "no migration of it is under way here (no preflight)".into(),
        ));
    };
    if Some(mark.uuid) != cfg.uuid {
        return Err(refuse(format!(
            "the migration under way here is of UUID {}",
            mark.uuid
        )));
    }
    if host.conf_path(ctid).exists() {
        return Err(refuse(format!("CTID {ctid} is taken by another CT")));
    }
    if let Some(u) = &cfg.userns
        && !userns::claim(host, ctid, u)?
    {
        return Err(refuse(format!(
            "its id range {}.. is held by another CT here",
            u.uid_base
        )));
    }
    let undo = |host: &Host| {
        let _ = fs::remove_file(host.conf_path(ctid));
        if let Some(u) = &cfg.userns
            && let Err(e) = userns::release(host, ctid, u)
        {
            warn!(%ctid, error = %e, "rollback: release the id range");
        }
    };
    fs::create_dir_all(host.conf_dir())
        .and_then(|()| {
            let tmp = host.conf_path(ctid).with_extension("toml.tmp");
            fs::write(&tmp, cfg_text).and_then(|()| fs::rename(&tmp, host.conf_path(ctid)))
        })
        .map_err(|e| {
            undo(host);
            io_err(ctid, "write", &host.conf_path(ctid))(e)
        })?;
    let res: std::result::Result<Option<RunState>, Box<dyn std::error::Error + Send + Sync>> =
        match (restore_dir, start) {
            (Some(dir), _) => checkpoint::restore(host, ctid, Some(dir), hooks)
                .map(Some)
                .map_err(|e| Box::new(e) as _),
            (None, true) => crate::container::start(host, ctid, hooks)
                .map(Some)
                .map_err(|e| Box::new(e) as _),
            (None, false) => Ok(None),
        };
    match res {
        Ok(st) => {
            if let Some(ns) = st.as_ref().and_then(|s| s.net.as_ref())
                && !cfg.net.gratuitous_arp
            {
                // With the setting on, the host side's setup announced already.
                match HostNet::current() {
                    Ok(mut hn) => {
                        if let Err(e) = crate::net::announce_proxied(ns, &mut hn) {
                            warn!(%ctid, error = %crate::error_chain::ErrorChain(&e), "announcing the moved addresses");
                        }
                    }
                    Err(e) => {
                        warn!(%ctid, error = %crate::error_chain::ErrorChain(&e), "announcing the moved addresses")
                    }
                }
            }
            let _ = remove_if_present(ctid, &incoming_path(host, ctid));
            let _ = fs::remove_dir_all(images_dir(host, ctid));
            info!(%ctid, "migrated here");
            Ok(st)
        }
        Err(e) => {
            undo(host);
            Err(e)
        }
    }
}

/// What `abort` removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AbortReport {
    pub removed_config: bool,
    pub removed_files: bool,
}

/// Removes a failed migration's half-state: a config `activate` wrote (the CT must not run:
/// a running CT here means the migration went through), the images; with `purge` also the
/// copied files and the incoming mark. A CTID without an incoming mark is refused.
pub fn abort(host: &Host, ctid: Ctid, purge: bool) -> Result<AbortReport> {
    let Some(mark) = incoming(host, ctid) else {
        return Err(CtError::MigrateRefused {
            ctid,
            msg: "no migration of it is under way here: nothing to abort".into(),
        });
    };
    let mut rep = AbortReport::default();
    if let Ok(cfg) = CtConfig::load(host, ctid) {
        if cfg.uuid != Some(mark.uuid) {
            return Err(CtError::MigrateRefused {
                ctid,
                msg: "the CT here is another one than the migration's".into(),
            });
        }
        if running(host, ctid).is_some() {
            return Err(CtError::Running(ctid));
        }
        remove_if_present(ctid, &host.conf_path(ctid))?;
        if let Some(u) = &cfg.userns {
            let _ = userns::release(host, ctid, u);
        }
        rep.removed_config = true;
    }
    let _ = fs::remove_dir_all(images_dir(host, ctid));
    if purge {
        let private = host.private_dir(ctid);
        if private.exists() {
            TemplateStore::remove_tree_fast(&private)?;
            rep.removed_files = true;
        }
        remove_if_present(ctid, &incoming_path(host, ctid))?;
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Host, CtConfig) {
        let d = tempfile::tempdir().unwrap();
        let host = Host::new(Some(d.path().to_path_buf()), None, None).unwrap();
        let mut cfg = CtConfig::new(Ctid::new(101).unwrap(), "busybox".into());
        cfg.uuid = Some(Uuid::new_v4());
        (d, host, cfg)
    }

    #[test]
    fn the_config_sent_must_be_the_cts_and_carry_a_uuid() {
        let (_d, host, mut cfg) = setup();
        let text = toml::to_string(&cfg).unwrap();
        let e = parse_config(&host, Ctid::new(102).unwrap(), &text).unwrap_err();
        assert!(e.to_string().contains("the config sent is CT 101's"), "{e}");
        cfg.uuid = None;
        let e = parse_config(&host, cfg.ctid, &toml::to_string(&cfg).unwrap()).unwrap_err();
        assert!(e.to_string().contains("has no UUID"), "{e}");
    }

    #[test]
    fn preflight_refuses_a_taken_ctid_or_a_leftover_copy_and_changes_nothing() {
        let (_d, host, cfg) = setup();
        let mut other = cfg.clone();
        other.uuid = Some(Uuid::new_v4());
        fs::create_dir_all(host.conf_dir()).unwrap();
        other.save(&host).unwrap();
        let e = preflight(&host, &cfg, 0, false).unwrap_err().to_string();
        assert!(e.contains("CTID 101 is taken by another CT"), "{e}");
        fs::remove_file(host.conf_path(cfg.ctid)).unwrap();
        fs::create_dir_all(host.private_dir(cfg.ctid)).unwrap();
        let e = preflight(&host, &cfg, 0, false).unwrap_err().to_string();
        assert!(e.contains("exists without a CT config"), "{e}");
        assert!(!incoming_path(&host, cfg.ctid).exists());
    }

    #[test]
    fn abort_touches_only_a_ctid_with_a_migration_under_way() {
        let (_d, host, cfg) = setup();
        fs::create_dir_all(host.conf_dir()).unwrap();
        cfg.save(&host).unwrap();
        let e = abort(&host, cfg.ctid, true).unwrap_err().to_string();
        assert!(e.contains("no migration of it is under way"), "{e}");
        assert!(host.conf_path(cfg.ctid).exists());
    }
}
