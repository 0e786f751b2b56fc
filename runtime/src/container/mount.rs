//! The CT's files on `root/<CTID>`: the bind or overlay mount of its private area.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::{CtError, Result, io_err, lock, lock_loaded, running, state};
use crate::config::{CtConfig, Host, PrivateLayout};
use crate::ctid::Ctid;
use crate::template::TemplateStore;
use crate::userns;

/// Overlay mount options are comma/colon separated: paths holding those cannot be passed.
pub(super) fn overlay_paths_ok(ctid: Ctid, paths: &[&Path]) -> Result<()> {
    for p in paths {
        let s = p.to_string_lossy();
        if s.contains([',', ':', '\\']) {
            return Err(CtError::Invalid {
                ctid,
                msg: format!(
                    "path {s} contains ',', ':' or '\\', which overlayfs options cannot carry: use another --root or `create --copy`"
                ),
            });
        }
    }
    Ok(())
}

/// Mounts the CT's files on `root/<CTID>`: a bind mount of the private area, or the overlay of
/// the private area's `upper` over the template. Returns false if it was mounted already.
pub(super) fn bind_private(host: &Host, cfg: &CtConfig) -> Result<bool> {
    let ctid = cfg.ctid;
    let root = host.root_dir(ctid);
    if state::is_mount_point(&root) {
        return Ok(false);
    }
    super::convert::check_no_conversion(host, ctid)?;
    let private = host.private_dir(ctid);
    if !private.is_dir() {
        return Err(CtError::Invalid {
            ctid,
            msg: format!("private area {} is missing", private.display()),
        });
    }
    fs::create_dir_all(&root).map_err(io_err(ctid, "create mount point", &root))?;
    match cfg.layout {
        PrivateLayout::Copy => mount(
            Some(&private),
            &root,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|errno| CtError::Sys {
            ctid,
            op: "bind-mount private area",
            errno,
        })?,
        PrivateLayout::Overlay => {
            let lower = TemplateStore::open(host.template_dir())?.rootfs(&cfg.template);
            if !lower.is_dir() {
                return Err(CtError::Invalid {
                    ctid,
                    msg: format!(
                        "template {:?} (its rootfs {}) is missing: the CT's files are an overlay over it",
                        cfg.template,
                        lower.display()
                    ),
                });
            }
            overlay_paths_ok(ctid, &[&lower, &private, &host.run])?;
            // An unprivileged CT sees the shared template through its id mapping: template
            // uid 0 is the CT's root. The staging mount only lives until the overlay holds
            // its own clone of it.
            let idmapped = match &cfg.userns {
                Some(u) => {
                    let ns = userns::userns_fd(u)?;
                    let at = idmap_staging(host, ctid);
                    Some(userns::IdmappedTree::attach(&lower, &ns, &at)?)
                }
                None => None,
            };
            let lower = idmapped.as_ref().map_or(lower.as_path(), |t| t.path());
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                private.join("upper").display(),
                private.join("work").display()
            );
            mount(
                Some("overlay"),
                &root,
                Some("overlay"),
                MsFlags::empty(),
                Some(opts.as_str()),
            )
            .map_err(|errno| CtError::Sys {
                ctid,
                op: "mount overlay of the private area over the template",
                errno,
            })?;
        }
    }
    // Nothing the host mounts under /var/lib/berth should leak into or out of a CT root.
    mount(
        None::<&str>,
        &root,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|errno| CtError::Sys {
        ctid,
        op: "make CT root private",
        errno,
    })?;
    Ok(true)
}

/// Where `bind_private` attaches an unprivileged CT's id-mapped template while it mounts the
/// overlay (and where a start killed at that moment leaves it, for gc).
pub(super) fn idmap_staging(host: &Host, ctid: Ctid) -> PathBuf {
    host.run.join(format!(".idmap-{ctid}"))
}

pub(super) fn unbind_private(host: &Host, ctid: Ctid) -> Result<()> {
    let root = host.root_dir(ctid);
    while state::is_mount_point(&root) {
        match umount2(&root, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(errno) => {
                return Err(CtError::Sys {
                    ctid,
                    op: "unmount CT root",
                    errno,
                });
            }
        }
    }
    Ok(())
}

pub fn mount_ct(host: &Host, ctid: Ctid) -> Result<()> {
    let (_lock, cfg) = lock_loaded(host, ctid)?;
    bind_private(host, &cfg)?;
    Ok(())
}

pub fn umount_ct(host: &Host, ctid: Ctid) -> Result<()> {
    CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    if running(host, ctid).is_some() {
        return Err(CtError::Running(ctid));
    }
    unbind_private(host, ctid)
}

/// Where to read and write the CT's files from the host: the mounted view when mounted,
/// otherwise the private area (for an overlay: its upper layer, reading through to the template).
pub(super) fn files_view(host: &Host, cfg: &CtConfig) -> (PathBuf, PathBuf) {
    let root = host.root_dir(cfg.ctid);
    if state::is_mount_point(&root) {
        return (root.clone(), root);
    }
    let private = host.private_dir(cfg.ctid);
    match cfg.layout {
        PrivateLayout::Copy => (private.clone(), private),
        PrivateLayout::Overlay => (
            host.template_dir().join(&cfg.template).join("rootfs"),
            private.join("upper"),
        ),
    }
}
