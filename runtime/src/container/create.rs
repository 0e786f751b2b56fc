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
use crate::userns;

/// Options of `berth create`: the template and layout, and the CT's initial settings.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    pub template: String,
    pub hostname: Option<String>,
    pub name: Option<String>,
    /// No user namespace: the CT's root is the host's root (`create --privileged`, for
    /// trusted workloads only). Every other CT gets its own id range from the host's pool.
    pub privileged: bool,
    /// Full copy instead of an overlay over the template (shifted into the CT's id range for an
    /// unprivileged CT).
    pub copy: bool,
    /// Routed (venet) addresses (`--ipadd`), refused when another CT or the host has one.
    pub ipadd: Vec<IpAddr>,
    /// Resource settings; `diskspace` is set on the new private area right away.
    pub resources: ResourceConfig,
    /// Traffic shaping, applied when the CT starts.
    pub shaping: Option<ShapingConfig>,
    /// Billing settings (`--billing-day`, `--tz`, `--commit`, `--classes`).
    pub billing: crate::billing::BillingConfig,
    /// Transfer quota (`--quota-*`), validated here; the ledger has no usage of a new CT.
    pub quota: crate::transfer_quota::QuotaConfig,
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
    opts.billing.validate().map_err(|e| CtError::Invalid {
        ctid,
        msg: e.to_string(),
    })?;
    opts.quota.validate().map_err(|e| CtError::Invalid {
        ctid,
        msg: e.to_string(),
    })?;
    let store = TemplateStore::open(host.template_dir())?;
    let tmpl = store.get(&opts.template)?;
    host.ensure_dirs()?;
    let _lock = lock(host, ctid)?;
    if host.conf_path(ctid).exists() {
        return Err(ConfigError::Exists(ctid).into());
    }
    // Until the config is whole, the marker tells gc that whatever exists of this CT is a
    // create's leftovers to roll back (a private area without a config, a claimed id range).
    let marker = host.creating_path(ctid);
    fs::write(&marker, b"").map_err(io_err(ctid, "write", &marker))?;
    crate::crash_point!("create.marker_written");
    let res = create_locked(host, ctid, opts, &store, &tmpl);
    if let Err(e) = fs::remove_file(&marker) {
        warn!(%ctid, path = %marker.display(), error = %e, "create: remove marker");
    }
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
    cfg.uuid = Some(uuid::Uuid::new_v4());
    cfg.name = opts.name.clone();
    cfg.hostname = opts.hostname.clone();
    cfg.init = tmpl.init.clone();
    cfg.stop_signal = tmpl.stop_signal.clone();
    cfg.resources = opts.resources.clone();
    cfg.shaping = opts.shaping.clone().and_then(ShapingConfig::non_empty);
    cfg.billing = opts.billing.clone();
    cfg.quota = opts.quota.clone();
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
    let mut claimed = None;
    if !opts.privileged {
        // The template is the lower layer of every overlay CT: its owners must fit the range.
        let max = store.max_id(&opts.template)?;
        if max >= userns::RANGE {
            return Err(CtError::Invalid {
                ctid,
                msg: format!(
                    "template {:?} has files owned by id {max}, which a CT's {} ids cannot map: use `create --privileged` or fix the template's owners",
                    opts.template,
                    userns::RANGE
                ),
            });
        }
        let u = userns::allocate(host, ctid).map_err(|e| match e {
            e @ userns::UsernsError::Io { .. } => CtError::AllocateIds { ctid, source: e },
            e => e.into(),
        })?;
        claimed = Some(u);
        cfg.userns = Some(u);
        crate::crash_point!("create.ids_claimed");
    }
    let res = create_private(host, ctid, opts, store, &mut cfg, &tmp);
    if res.is_err()
        && let Some(u) = claimed
        && let Err(e) = userns::release(host, ctid, &u)
    {
        warn!(%ctid, error = %crate::error_chain::ErrorChain(&e), "create: release id range");
    }
    res?;
    info!(%ctid, template = %opts.template, privileged = opts.privileged, layout = ?cfg.layout, "created");
    Ok(())
}

/// The private area (overlay upper or copy), the disk quota and the config; undone on failure.
fn create_private(
    host: &Host,
    ctid: Ctid,
    opts: &CreateOpts,
    store: &TemplateStore,
    cfg: &mut CtConfig,
    tmp: &Path,
) -> Result<()> {
    let private = host.private_dir(ctid);
    cfg.layout = if opts.copy {
        PrivateLayout::Copy
    } else if let Some(u) = &cfg.userns {
        match idmap_probe(&store.rootfs(&opts.template), u) {
            Ok(()) => PrivateLayout::Overlay,
            Err(e) => {
                warn!(%ctid, template = %opts.template, error = %crate::error_chain::ErrorChain(&e),
                    "the template's filesystem cannot be id-mapped: the CT gets a shifted copy of it");
                PrivateLayout::Copy
            }
        }
    } else {
        PrivateLayout::Overlay
    };
    let shift = cfg.userns.map(|u| (u.uid_base, u.gid_base));
    let mut quota_set = false;
    let res = (|| -> Result<()> {
        match cfg.layout {
            PrivateLayout::Copy => {
                store.instantiate(&opts.template, tmp, shift)?;
                if let Some(h) = &cfg.hostname {
                    write_hostname_files(ctid, tmp, tmp, h, None)?;
                }
            }
            PrivateLayout::Overlay => {
                overlay_paths_ok(ctid, &[&store.rootfs(&opts.template), &private])?;
                for d in [tmp.join("upper"), tmp.join("work")] {
                    fs::create_dir_all(&d).map_err(io_err(ctid, "create directory", &d))?;
                }
                // The merged root takes the upper directory's owner and mode: the template's
                // root directory's, shifted for an unprivileged CT.
                copy_up_attrs(
                    ctid,
                    &store.rootfs(&opts.template),
                    &tmp.join("upper"),
                    shift,
                )?;
                if let Some(h) = &cfg.hostname {
                    write_hostname_files(
                        ctid,
                        &store.rootfs(&opts.template),
                        &tmp.join("upper"),
                        h,
                        shift,
                    )?;
                }
            }
        }
        crate::crash_point!("create.private_copied");
        fs::rename(tmp, &private).map_err(io_err(ctid, "rename into place", &private))?;
        crate::crash_point!("create.private_renamed");
        if let Some(limit) = cfg.resources.diskspace {
            crate::quota::set_diskspace(&private, ctid.get(), limit)?;
            quota_set = true;
        }
        crate::crash_point!("create.quota_set");
        cfg.save_with(host, || crate::crash_point!("create.config_tmp_written"))?;
        crate::crash_point!("create.config_written");
        Ok(())
    })();
    if let Err(e) = res {
        if quota_set && let Err(qe) = crate::quota::clear_diskspace(&private, ctid.get()) {
            warn!(%ctid, error = %crate::error_chain::ErrorChain(&qe), "create: clear disk quota");
        }
        let _ = TemplateStore::remove_tree_fast(tmp);
        let _ = TemplateStore::remove_tree_fast(&private);
        let _ = fs::remove_file(host.conf_path(ctid));
        return Err(e);
    }
    Ok(())
}

/// Whether the template's filesystem takes an id-mapped mount with `u`'s mapping.
fn idmap_probe(rootfs: &Path, u: &UserNs) -> std::result::Result<(), userns::UsernsError> {
    let ns = userns::userns_fd(u)?;
    userns::idmap_supported(rootfs, &ns)
}

/// Gives `dst` the owner and mode of `src`, shifted by `shift`, as an overlay copy-up would.
pub(super) fn copy_up_attrs(
    ctid: Ctid,
    src: &Path,
    dst: &Path,
    shift: Option<(u32, u32)>,
) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = fs::symlink_metadata(src).map_err(io_err(ctid, "stat", src))?;
    let (ub, gb) = shift.unwrap_or((0, 0));
    std::os::unix::fs::lchown(dst, Some(md.uid() + ub), Some(md.gid() + gb))
        .map_err(io_err(ctid, "chown", dst))?;
    if !md.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(io_err(ctid, "chmod", dst))?;
    }
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
    shift: Option<(u32, u32)>,
) -> Result<()> {
    if !read_root.join("etc").is_dir() {
        return Ok(());
    }
    if read_root != write_root {
        let etc = write_root.join("etc");
        if etc.symlink_metadata().is_err() {
            fs::create_dir_all(&etc).map_err(io_err(ctid, "create directory", &etc))?;
            copy_up_attrs(ctid, &read_root.join("etc"), &etc, shift)?;
        }
        let hosts = etc.join("hosts");
        if hosts.symlink_metadata().is_err()
            && let Ok(text) = fs::read(read_root.join("etc/hosts"))
        {
            fs::write(&hosts, text).map_err(io_err(ctid, "copy up", &hosts))?;
            copy_up_attrs(ctid, &read_root.join("etc/hosts"), &hosts, shift)?;
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
