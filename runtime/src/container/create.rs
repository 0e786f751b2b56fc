//! `create`: a CT's config and private area from a template (an overlay over it, or a copy),
//! with its initial settings, all or nothing.

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use tracing::{info, warn};

use super::mount::overlay_paths_ok;
use super::set::{SetOpts, check_addrs_free, merged_net};
use super::{CtError, Result, io_err, lock, net_err, resources_of};
use crate::config::{ConfigError, CtConfig, Host, PrivateLayout, ResourceConfig, UserNs};
use crate::ctid::{Ctid, validate_name};
use crate::net;
use crate::shaping::{DEFAULT_MTU, ShapingConfig};
use crate::template::{TemplateInfo, TemplateStore};

/// Options of `berth create`: the template and layout, and the CT's initial settings.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    pub template: String,
    pub hostname: Option<String>,
    pub name: Option<String>,
    pub userns: bool,
    /// Full copy instead of an overlay over the template (always with `userns`).
    pub copy: bool,
    /// Routed (venet) addresses (`--ipadd`), refused when another CT or the host has one.
    pub ipadd: Vec<IpAddr>,
    /// Resource settings; `diskspace` is set on the new private area right away.
    pub resources: ResourceConfig,
    /// Traffic shaping, applied when the CT starts.
    pub shaping: Option<ShapingConfig>,
}

/// Default user-namespace range for a CT: 65536 ids per CT above 1e6, by CTID, like LXC's
/// subordinate ranges but deterministic so a private area's ownership matches across hosts.
pub fn default_userns(ctid: Ctid) -> UserNs {
    let base = 1_000_000u64 + u64::from(ctid.get() % 60_000) * 65_536;
    UserNs {
        uid_base: base as u32,
        gid_base: base as u32,
        size: 65_536,
    }
}

/// Creates CT `ctid`. Everything is checked before anything is made; a failure on the way
/// leaves no config, private area or lock file behind.
pub fn create(host: &Host, ctid: Ctid, opts: &CreateOpts) -> Result<()> {
    if let Some(n) = &opts.name {
        validate_name(n).map_err(|e| CtError::Invalid {
            ctid,
            msg: e.to_string(),
        })?;
    }
    if let Some(h) = &opts.hostname {
        crate::config::validate_hostname(h).map_err(|msg| CtError::Invalid { ctid, msg })?;
    }
    resources_of(&opts.resources)
        .validate()
        .map_err(super::cg_err(ctid))?;
    if let Some(s) = &opts.shaping {
        s.validate(DEFAULT_MTU)
            .map_err(|source| CtError::Shaping { ctid, source })?;
    }
    let store = TemplateStore::open(host.template_dir())?;
    let tmpl = store.get(&opts.template)?;
    host.ensure_dirs()?;
    let _lock = lock(host, ctid)?;
    if host.conf_path(ctid).exists() {
        return Err(ConfigError::Exists(ctid).into());
    }
    let res = create_locked(host, ctid, opts, &store, &tmpl);
    if res.is_err() {
        // No CT came of it: its lock file goes too, as with destroy.
        let lock_path = host.lock_path(ctid);
        if let Err(e) = fs::remove_file(&lock_path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(%ctid, path = %lock_path.display(), error = %e, "create: remove lock file");
        }
    }
    res
}

/// `create` under the CT's lock, once it is known that no config exists.
fn create_locked(
    host: &Host,
    ctid: Ctid,
    opts: &CreateOpts,
    store: &TemplateStore,
    tmpl: &TemplateInfo,
) -> Result<()> {
    if let Some(n) = &opts.name {
        // Every other config must load: one that does not may hold the name (fail closed).
        for other in host.list_ctids()? {
            if CtConfig::load(host, other)?.name.as_deref() == Some(n) {
                return Err(ConfigError::NameTaken {
                    name: n.clone(),
                    ctid: other,
                }
                .into());
            }
        }
    }
    let private = host.private_dir(ctid);
    if private.exists() {
        return Err(CtError::Invalid {
            ctid,
            msg: format!(
                "private area {} exists without a config: remove it or run `berth gc`",
                private.display()
            ),
        });
    }
    let mut cfg = CtConfig::new(ctid, opts.template.clone());
    cfg.name = opts.name.clone();
    cfg.hostname = opts.hostname.clone();
    cfg.init = tmpl.init.clone();
    cfg.stop_signal = tmpl.stop_signal.clone();
    if opts.userns {
        cfg.userns = Some(default_userns(ctid));
    }
    cfg.resources = opts.resources.clone();
    cfg.shaping = opts.shaping.clone().and_then(ShapingConfig::non_empty);
    if !opts.ipadd.is_empty() {
        let add = SetOpts {
            ipadd: opts.ipadd.clone(),
            ..Default::default()
        };
        cfg.net = merged_net(ctid, &cfg.net, &add)?;
        check_addrs_free(host, ctid, &opts.ipadd)?;
    }
    // Copy into a hidden sibling and rename: a crash mid-copy leaves only `.N.tmp`, which gc removes.
    let tmp = host.root.join("private").join(format!(".{ctid}.tmp"));
    if tmp.exists() {
        TemplateStore::remove_tree_fast(&tmp)?;
    }
    // A user namespace needs ids shifted on disk, so those CTs get their own copy.
    cfg.layout = if opts.userns || opts.copy {
        PrivateLayout::Copy
    } else {
        PrivateLayout::Overlay
    };
    let shift = cfg.userns.map(|u| (u.uid_base, u.gid_base));
    let mut quota_set = false;
    let res = (|| -> Result<()> {
        match cfg.layout {
            PrivateLayout::Copy => {
                store.instantiate(&opts.template, &tmp, shift)?;
                if let Some(h) = &cfg.hostname {
                    write_hostname_files(ctid, &tmp, &tmp, h)?;
                }
            }
            PrivateLayout::Overlay => {
                overlay_paths_ok(ctid, &[&store.rootfs(&opts.template), &private])?;
                for d in [tmp.join("upper"), tmp.join("work")] {
                    fs::create_dir_all(&d).map_err(io_err(ctid, "create directory", &d))?;
                }
                if let Some(h) = &cfg.hostname {
                    write_hostname_files(
                        ctid,
                        &store.rootfs(&opts.template),
                        &tmp.join("upper"),
                        h,
                    )?;
                }
            }
        }
        fs::rename(&tmp, &private).map_err(io_err(ctid, "rename into place", &private))?;
        if let Some(limit) = cfg.resources.diskspace {
            crate::quota::set_diskspace(&private, ctid.get(), limit)?;
            quota_set = true;
        }
        cfg.save(host)?;
        Ok(())
    })();
    if let Err(e) = res {
        if quota_set && let Err(qe) = crate::quota::clear_diskspace(&private, ctid.get()) {
            warn!(%ctid, error = %crate::error_chain::ErrorChain(&qe), "create: clear disk quota");
        }
        let _ = TemplateStore::remove_tree_fast(&tmp);
        let _ = TemplateStore::remove_tree_fast(&private);
        let _ = fs::remove_file(host.conf_path(ctid));
        return Err(e);
    }
    info!(%ctid, template = %opts.template, "created");
    Ok(())
}

/// Writes /etc/hostname and the CT's line in /etc/hosts (through `net::write_hostname_files`,
/// which refuses a symlinked /etc). For a stopped overlay CT, `read_root` is the template: its
/// /etc/hosts is copied up into `write_root` first, as overlayfs would on a write.
pub fn write_hostname_files(
    ctid: Ctid,
    read_root: &Path,
    write_root: &Path,
    hostname: &str,
) -> Result<()> {
    if !read_root.join("etc").is_dir() {
        return Ok(());
    }
    if read_root != write_root {
        let etc = write_root.join("etc");
        fs::create_dir_all(&etc).map_err(io_err(ctid, "create directory", &etc))?;
        let hosts = etc.join("hosts");
        if hosts.symlink_metadata().is_err()
            && let Ok(text) = fs::read(read_root.join("etc/hosts"))
        {
            fs::write(&hosts, text).map_err(io_err(ctid, "copy up", &hosts))?;
        }
    }
    net::write_hostname_files(write_root, hostname).map_err(net_err(ctid))
}

/// Removes `template` from the host's store unless a CT's files are an overlay over it.
pub fn remove_template(host: &Host, name: &str) -> Result<()> {
    let store = TemplateStore::open(host.template_dir())?;
    let users = template_users(host, name)?;
    if !users.is_empty() {
        return Err(CtError::TemplateInUse {
            name: name.to_owned(),
            users,
        });
    }
    store.remove(name)?;
    Ok(())
}

/// CTs whose files are an overlay over `template` (it must not be removed under them).
pub fn template_users(host: &Host, template: &str) -> Result<Vec<Ctid>> {
    let mut out = Vec::new();
    for c in host.list_ctids()? {
        // A config that cannot be read may be an overlay CT's: refusing is the safe answer,
        // removing the template would pull the lower layer from under it.
        let cfg = CtConfig::load(host, c)?;
        if cfg.layout == PrivateLayout::Overlay && cfg.template == template {
            out.push(c);
        }
    }
    Ok(out)
}
