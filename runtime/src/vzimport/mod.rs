//! `berth import vz`: OpenVZ (vzctl 3/4, kernel 2.6.32) containers onto berth.
//!
//! - [`parse`] reads `CTID.conf` / `vz.conf` as vzctl does, never through a shell;
//! - [`source`] finds a node's configs, names, network classes and action scripts;
//! - [`map`] turns each setting into berth's with a MAP / APPROX / DROP verdict;
//! - [`copy`] copies a simfs private area, [`plan`] and [`import`] put it together: everything
//!   is read and checked first, then the CT is made in a hidden scratch directory and renamed
//!   into place, so bad input leaves nothing behind.

pub mod copy;
pub(crate) mod lzop;
pub mod map;
mod map_net;
pub mod parse;
pub mod pax;
pub mod ploop;
pub mod source;

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tracing::warn;

use crate::config::{ConfigError, CtConfig, Host, ImportOrigin};
use crate::ctid::Ctid;
use crate::error_chain::ErrorChain;
use crate::lock::CtLock;
use crate::net::Iface;
use crate::template::{self, TemplateStore};
use crate::userns;

pub use copy::{CopyStats, copy_private, shift_acl, shift_fscaps, shift_xattr};
pub use map::{Item, MapOpts, Mapped, Report, Verdict, map_ct};
pub use parse::ParseError;
pub use source::{Node, SourceCt};

/// Where vzdump keeps the CT's config inside its archive.
pub const VZDUMP_CONF: &str = "etc/vzdump/vps.conf";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Parse(ParseError),
    #[error("{0}")]
    Invalid(String),
    #[error("{}: ploop image ({}): {why}", path.display(), ploop::DESCRIPTOR)]
    Ploop { path: PathBuf, why: String },
    #[error("{}: unknown private area layout: {why}", path.display())]
    UnknownLayout { path: PathBuf, why: String },
    #[error(
        "CT {ctid}: --strict: these settings would be lost: {}",
        keys.join(", ")
    )]
    Strict { ctid: u32, keys: Vec<String> },
    #[error("import CT {ctid}")]
    Template {
        ctid: u32,
        #[source]
        source: template::TemplateError,
    },
    #[error("import CT {ctid}")]
    Ct {
        ctid: u32,
        #[source]
        source: Box<crate::container::CtError>,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Userns(#[from] userns::UsernsError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(transparent)]
    Quota(#[from] crate::quota::QuotaError),
}

/// Where the CT's files come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "lowercase")]
pub enum FilesFrom {
    /// A simfs private area (a plain directory tree).
    Simfs(PathBuf),
    /// A vzdump archive (`vzdump-openvz-CTID-*.tar[.gz|.lzo]`).
    Archive(PathBuf),
    /// A ploop private area's one delta (`root.hdd/<image>`).
    Ploop(PathBuf),
}

/// Everything `import` will do for one CT, checked, with nothing changed yet.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mapped: Mapped,
    pub files: FilesFrom,
    /// The config file it was read from.
    pub config: String,
    pub ostemplate: Option<String>,
}

impl Plan {
    pub fn ctid(&self) -> u32 {
        self.mapped.report.ctid
    }
}

/// The layout of the private area at `path`: simfs (the tree itself) or ploop (its one
/// delta), or an error naming why neither.
pub fn detect_layout(path: &Path) -> Result<FilesFrom, ImportError> {
    let meta = fs::symlink_metadata(path).map_err(|source| ImportError::Io {
        op: "open private area",
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ImportError::UnknownLayout {
            path: path.to_path_buf(),
            why: "not a directory".into(),
        });
    }
    if fs::symlink_metadata(path.join(ploop::DESCRIPTOR)).is_ok() {
        return ploop::single_delta(path).map(FilesFrom::Ploop);
    }
    if ["etc", "sbin", "bin", "usr"]
        .iter()
        .any(|d| fs::symlink_metadata(path.join(d)).is_ok())
    {
        return Ok(FilesFrom::Simfs(path.to_path_buf()));
    }
    Err(ImportError::UnknownLayout {
        path: path.to_path_buf(),
        why: "neither root.hdd/DiskDescriptor.xml (ploop) nor an OS tree (etc/, sbin/, bin/, usr/: simfs)"
            .into(),
    })
}

fn strict_check(report: &Report, strict: bool) -> Result<(), ImportError> {
    let losses = report.strict_losses();
    if strict && !losses.is_empty() {
        return Err(ImportError::Strict {
            ctid: report.ctid,
            keys: losses
                .iter()
                .map(|i| format!("{}={:?} ({})", i.key, i.value, i.rule))
                .collect(),
        });
    }
    Ok(())
}

/// Plans the import of `ctid` from the node's conf directory; `private` overrides VE_PRIVATE.
pub fn plan(
    node: &Node,
    ctid: u32,
    private: Option<&Path>,
    opts: &MapOpts,
    strict: bool,
) -> Result<Plan, ImportError> {
    let ct = node.load_ct(ctid)?;
    let mut mapped = map_ct(node, &ct, opts)?;
    let path = match private {
        Some(p) => p.to_path_buf(),
        None => {
            let s = node.setting(&ct, "VE_PRIVATE").ok_or_else(|| {
                ImportError::Invalid(format!(
                    "CT {ctid}: neither {} nor the node's vz.conf sets VE_PRIVATE: give --private PATH",
                    ct.conf.path.display()
                ))
            })?;
            mapped.report.items.push(Item {
                key: "VE_PRIVATE".into(),
                value: s.value.clone(),
                verdict: Verdict::Map,
                target: Some(format!("private/{ctid}")),
                rule: "the private area is copied into the CT's own".into(),
                matters: false,
                source: source::origin(&s),
            });
            PathBuf::from(s.value)
        }
    };
    let files = detect_layout(&path)?;
    strict_check(&mapped.report, strict)?;
    Ok(Plan {
        ostemplate: ct.conf.get("OSTEMPLATE").map(|s| s.value.clone()),
        config: ct.conf.path.display().to_string(),
        mapped,
        files,
    })
}

/// Plans the import of a vzdump archive of CT `ctid`: its config is read from inside it.
pub fn plan_archive(
    node: &Node,
    ctid: u32,
    archive: &Path,
    opts: &MapOpts,
    strict: bool,
) -> Result<Plan, ImportError> {
    let terr = |source| ImportError::Template { ctid, source };
    let text = template::read_member(archive, Path::new(VZDUMP_CONF), 1 << 20)
        .map_err(terr)?
        .ok_or_else(|| {
            ImportError::Invalid(format!(
                "{}: no ./{VZDUMP_CONF} inside: not a vzdump archive of an OpenVZ CT",
                archive.display()
            ))
        })?;
    let text = String::from_utf8(text).map_err(|_| {
        ImportError::Invalid(format!(
            "{}: ./{VZDUMP_CONF} is not text",
            archive.display()
        ))
    })?;
    let conf_name = PathBuf::from(format!("{}:{VZDUMP_CONF}", archive.display()));
    let ct = node.ct_from_text(ctid, &conf_name, &text)?;
    let mapped = map_ct(node, &ct, opts)?;
    strict_check(&mapped.report, strict)?;
    Ok(Plan {
        ostemplate: ct.conf.get("OSTEMPLATE").map(|s| s.value.clone()),
        config: conf_name.display().to_string(),
        mapped,
        files: FilesFrom::Archive(archive.to_path_buf()),
    })
}

/// Options of the import itself.
#[derive(Default)]
pub struct ImportRun<'a> {
    /// No user namespace (the CT's root is the host's).
    pub privileged: bool,
    /// Called while the files are copied.
    pub progress: Option<&'a mut dyn FnMut(CopyStats)>,
}

/// Makes the berth CT the plan describes: all or nothing.
pub fn import(host: &Host, plan: &Plan, run: ImportRun<'_>) -> Result<CtConfig, ImportError> {
    let ctid = Ctid::new(plan.ctid())
        .map_err(|e| ImportError::Invalid(format!("CTID {}: {e}", plan.ctid())))?;
    host.ensure_dirs()?;
    let lock_path = host.lock_path(ctid);
    let lock = CtLock::acquire(&lock_path, crate::container::LOCK_TIMEOUT)?;
    if host.conf_path(ctid).exists() {
        return Err(ConfigError::Exists(ctid).into());
    }
    // As at create: gc rolls back what exists of the CT while the marker does.
    let marker = host.creating_path(ctid);
    fs::write(&marker, b"").map_err(|source| ImportError::Io {
        op: "write",
        path: marker.clone(),
        source,
    })?;
    let res = import_locked(host, ctid, plan, run);
    if let Err(e) = fs::remove_file(&marker) {
        warn!(%ctid, error = %e, "import: remove marker");
    }
    drop(lock);
    if res.is_err()
        && let Err(e) = fs::remove_file(&lock_path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(%ctid, error = %e, "import: remove lock file");
    }
    res
}

fn import_locked(
    host: &Host,
    ctid: Ctid,
    plan: &Plan,
    run: ImportRun<'_>,
) -> Result<CtConfig, ImportError> {
    let mut cfg = plan.mapped.cfg.clone();
    let cterr = |e: crate::container::CtError| ImportError::Ct {
        ctid: ctid.get(),
        source: Box::new(e),
    };
    if let Some(n) = &cfg.name {
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
    let addrs: Vec<IpAddr> = cfg
        .net
        .ifaces
        .iter()
        .filter_map(|i| match i {
            Iface::Routed(r) => Some(r.addrs.clone()),
            Iface::Bridged(_) => None,
        })
        .flatten()
        .collect();
    if !addrs.is_empty() {
        crate::container::set::check_addrs_free(host, ctid, &addrs).map_err(cterr)?;
    }
    let private = host.private_dir(ctid);
    if fs::symlink_metadata(&private).is_ok() {
        return Err(ImportError::Invalid(format!(
            "CT {ctid}: private area {} exists without a config: remove it or run `berth gc`",
            private.display()
        )));
    }
    let tmp = host.root.join("private").join(format!(".{ctid}.tmp"));
    let terr = |source| ImportError::Template {
        ctid: ctid.get(),
        source,
    };
    TemplateStore::remove_tree_fast(&tmp).map_err(terr)?;
    let claimed = if run.privileged {
        None
    } else {
        Some(userns::allocate(host, ctid)?)
    };
    cfg.userns = claimed;
    let mut quota_set = false;
    let res = (|| -> Result<(), ImportError> {
        let shift = claimed.map(|u| (u.uid_base, u.gid_base));
        let src = match &plan.files {
            FilesFrom::Simfs(p) => {
                copy_private(p, &tmp, shift, run.progress)?;
                p.clone()
            }
            FilesFrom::Archive(a) => {
                fs::create_dir(&tmp).map_err(|source| ImportError::Io {
                    op: "create",
                    path: tmp.clone(),
                    source,
                })?;
                let opts = template::ExtractOpts {
                    shift,
                    devices: true,
                    xattrs: true,
                    sparse: true,
                };
                template::extract_with(a, &tmp, opts).map_err(terr)?;
                a.clone()
            }
            FilesFrom::Ploop(image) => {
                // The private area is the directory holding root.hdd/.
                let area = image
                    .parent()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("/"));
                let scratch = host.root.join("private").join(format!(".{ctid}"));
                ploop::import_image(area, image, &scratch, &tmp, shift, run.progress)?;
                area.to_path_buf()
            }
        };
        let (init, stop_signal) = template::detect_init(&tmp, &src).map_err(terr)?;
        cfg.init = init;
        cfg.stop_signal = stop_signal;
        cfg.uuid = Some(uuid::Uuid::new_v4());
        cfg.imported = Some(ImportOrigin {
            from: "openvz".into(),
            source_ctid: ctid.get(),
            config: plan.config.clone(),
            private: src.display().to_string(),
            ostemplate: plan.ostemplate.clone(),
            at: template::now_unix(),
        });
        crate::crash_point!("vzimport.private_copied");
        fs::rename(&tmp, &private).map_err(|source| ImportError::Io {
            op: "rename into place",
            path: private.clone(),
            source,
        })?;
        crate::crash_point!("vzimport.private_renamed");
        if let Some(limit) = cfg.resources.diskspace {
            crate::quota::set_diskspace(&private, ctid.get(), limit)?;
            quota_set = true;
        }
        cfg.validate(&host.conf_path(ctid))?;
        cfg.save(host)?;
        crate::crash_point!("vzimport.config_written");
        Ok(())
    })();
    if let Err(e) = res {
        if quota_set && let Err(qe) = crate::quota::clear_diskspace(&private, ctid.get()) {
            warn!(%ctid, error = %ErrorChain(&qe), "import: clear disk quota");
        }
        for p in [&tmp, &private] {
            if let Err(re) = TemplateStore::remove_tree_fast(p) {
                warn!(%ctid, error = %ErrorChain(&re), "import: remove partial private area");
            }
        }
        let _ = fs::remove_file(host.conf_path(ctid));
        if let Some(u) = claimed
            && let Err(ue) = userns::release(host, ctid, &u)
        {
            warn!(%ctid, error = %ErrorChain(&ue), "import: release id range");
        }
        return Err(e);
    }
    tracing::info!(%ctid, privileged = run.privileged, "imported from OpenVZ");
    Ok(cfg)
}
