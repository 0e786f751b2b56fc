//! `gc`: what a killed berth left behind.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::mount::idmap_staging;
use super::stop::cleanup_stopped;
use super::{NetGc, NetHooks, Result, cg_err, cgroup, lock, running};
use crate::cgroups::{self, CgroupManager};
use crate::config::{ConfigError, CtConfig, Host};
use crate::ctid::Ctid;
use crate::template::TemplateStore;
use crate::userns::{self, Holder};

/// What `berth gc` cleaned.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub cleaned: Vec<Ctid>,
    pub orphan_cgroups: Vec<Ctid>,
    pub partial_creates: Vec<PathBuf>,
    /// Id ranges whose CT is gone (a create killed after claiming one).
    pub released_id_ranges: Vec<PathBuf>,
    /// Creates (and OpenVZ imports) killed before their config was whole, rolled back.
    pub rolled_back_creates: Vec<Ctid>,
    /// Half-written `.tmp` files, and run files (state, exit, console, lock) of CTs that are gone.
    pub stale_files: Vec<PathBuf>,
    /// Template store scratch directories of imports and builds that died.
    pub template_scratch: usize,
    /// CTs whose live address add a killed `set` left in flight was taken back.
    pub address_adds: Vec<Ctid>,
    /// Datapath and shaper state (link pins, map entries, IFBs) of interfaces that are gone.
    pub datapath: NetGc,
    pub errors: Vec<String>,
}

/// Cleans what a `kill -9` of berth mid start/stop/create left behind: stale state files,
/// cgroups (with their processes) of CTs that are not running, start's mounts, half-copied
/// private areas. Running CTs are left alone.
pub fn gc(host: &Host, hooks: &mut dyn NetHooks) -> Result<GcReport> {
    let mut rep = GcReport::default();
    super::gc_files::rollback_creates(host, &mut rep);
    let known = host.list_ctids()?;
    for &ctid in &known {
        let _lock = match lock(host, ctid) {
            Ok(l) => l,
            Err(e) => {
                rep.errors.push(error_chain(&e));
                continue;
            }
        };
        if userns::remove_staging(&idmap_staging(host, ctid)) {
            rep.cleaned.push(ctid);
        }
        match super::adding::recover(host, ctid, hooks) {
            Ok(true) => rep.address_adds.push(ctid),
            Ok(false) => {}
            Err(e) => rep.errors.push(error_chain(&e)),
        }
        if running(host, ctid).is_some() {
            continue;
        }
        match cleanup_stopped(host, ctid, false, hooks) {
            Ok(true) => rep.cleaned.push(ctid),
            Ok(false) => {}
            Err(e) => rep.errors.push(error_chain(&e)),
        }
    }
    match cgroups::list_ctids(&host.cgroup_parent) {
        Ok(list) => {
            for ctid in list {
                if known.contains(&ctid) {
                    continue;
                }
                let r = cgroup(host, ctid).and_then(|cg| {
                    cg.kill_all(Duration::from_secs(10))
                        .and_then(|_| cg.destroy())
                        .map_err(cg_err(ctid))
                });
                match r {
                    Ok(()) => rep.orphan_cgroups.push(ctid),
                    Err(e) => rep.errors.push(error_chain(&e)),
                }
            }
        }
        Err(e) => rep.errors.push(error_chain(&e)),
    }
    // Staging mounts of CTs destroyed since (their lock is gone with them).
    if let Ok(rd) = fs::read_dir(&host.run) {
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some(ctid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(".idmap-"))
                .and_then(|n| n.parse::<Ctid>().ok())
            else {
                continue;
            };
            if !known.contains(&ctid) && userns::remove_staging(&ent.path()) {
                rep.cleaned.push(ctid);
            }
        }
    }
    let released = crate::userns::gc_allocations(host, |ctid| {
        let Ok(_lock) = lock(host, ctid) else {
            return Holder::Unknown;
        };
        if super::conversion_pending(host, ctid) {
            return Holder::Unknown;
        }
        match CtConfig::load(host, ctid) {
            Ok(cfg) => Holder::Holds(cfg.userns),
            Err(ConfigError::NotFound(_)) => {
                // lock() made a lock file for a CT that does not exist; create removes its own too.
                let _ = fs::remove_file(host.lock_path(ctid));
                Holder::Gone
            }
            Err(_) => Holder::Unknown,
        }
    });
    match released {
        Ok(r) => rep.released_id_ranges = r,
        Err(e) => rep.errors.push(error_chain(&e)),
    }
    super::gc_files::stale_files(host, &known, &mut rep);
    match TemplateStore::open(host.template_dir()).and_then(|s| s.cleanup_stale()) {
        Ok(n) => rep.template_scratch = n,
        Err(e) => rep.errors.push(error_chain(&e)),
    }
    // After the CTs' own teardown above: what their links' deletion left in the datapath.
    let live: Vec<(u32, String)> = known
        .iter()
        .filter_map(|&c| running(host, c))
        .filter_map(|st| st.net)
        .flat_map(|n| n.ifaces)
        .map(|i| (i.host_ifindex, i.host_ifname))
        .collect();
    match hooks.gc(&live) {
        Ok(n) => rep.datapath = n,
        Err(e) => rep.errors.push(error_chain(&e)),
    }
    let pdir = host.root.join("private");
    if let Ok(rd) = fs::read_dir(&pdir) {
        for ent in rd.flatten() {
            let name = ent.file_name();
            let n = name.to_string_lossy();
            // One with a marker belongs to a create that is still running (a dead one's was
            // rolled back above).
            let live = n
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".tmp"))
                .and_then(|n| n.parse::<Ctid>().ok())
                .is_some_and(|c| host.creating_path(c).exists());
            if n.starts_with('.') && n.ends_with(".tmp") && !live {
                let p = ent.path();
                match TemplateStore::remove_tree_fast(&p) {
                    Ok(()) => rep.partial_creates.push(p),
                    Err(e) => rep.errors.push(error_chain(&e)),
                }
            }
        }
    }
    Ok(rep)
}

pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error_chain::ErrorChain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::CtError;

    #[test]
    fn error_chain_joins_every_cause_once() {
        let e = CtError::Io {
            ctid: Ctid::new(7).unwrap(),
            op: "remove",
            path: "/var/lib/berth/private/7".into(),
            source: std::io::Error::other("busy"),
        };
        assert_eq!(
            error_chain(&e),
            "CT 7: remove /var/lib/berth/private/7: busy"
        );
    }
}
