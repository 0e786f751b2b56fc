//! An OpenVZ node's configuration as `berth import vz` finds it: `vz.conf`, the CTs'
//! `CTID.conf`, `names/`, `networks_classes` and the action scripts (listed, never run).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::ImportError;
use super::parse::{self, ParseError, Setting, VzFile};

/// Default places on an OpenVZ node.
pub const DEFAULT_CONF_DIR: &str = "/etc/vz/conf";
pub const DEFAULT_VZ_CONF: &str = "/etc/vz/vz.conf";

/// Action scripts vzctl runs around a CT's life (`CTID.mount`, `vps.start`, ...).
const SCRIPT_KINDS: [&str; 6] = ["mount", "umount", "start", "stop", "premount", "postumount"];

/// The node-wide part: global defaults, names, network classes.
#[derive(Debug, Clone)]
pub struct Node {
    pub conf_dir: PathBuf,
    pub global: VzFile,
    /// CTID → names pointing at its config in `names/`.
    pub names: BTreeMap<u32, Vec<String>>,
    /// `networks_classes` next to the conf directory: its path and text.
    pub classes: Option<(PathBuf, String)>,
}

/// One CT's config with what belongs to it on the node.
#[derive(Debug, Clone)]
pub struct SourceCt {
    pub ctid: u32,
    pub conf: VzFile,
    pub names: Vec<String>,
    /// Action scripts found for it (its own and the global `vps.*`).
    pub scripts: Vec<PathBuf>,
}

fn read(path: &Path) -> Result<String, ImportError> {
    fs::read_to_string(path).map_err(|source| ImportError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

impl Node {
    /// Reads the node: `vz_conf` must exist when given; the default one may be absent (a bare
    /// conf directory copied off a node).
    pub fn open(conf_dir: &Path, vz_conf: Option<&Path>) -> Result<Self, ImportError> {
        let meta = fs::metadata(conf_dir).map_err(|source| ImportError::Io {
            op: "open conf directory",
            path: conf_dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(ImportError::Invalid(format!(
                "conf directory {} is not a directory",
                conf_dir.display()
            )));
        }
        let global = match vz_conf {
            Some(p) => parse::parse(p, &read(p)?, None)?,
            None => {
                let p = Path::new(DEFAULT_VZ_CONF);
                match fs::read_to_string(p) {
                    Ok(t) => parse::parse(p, &t, None)?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => VzFile::default(),
                    Err(source) => {
                        return Err(ImportError::Io {
                            op: "read",
                            path: p.to_path_buf(),
                            source,
                        });
                    }
                }
            }
        };
        let base = conf_dir.parent().unwrap_or(Path::new("/"));
        let mut names: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let names_dir = base.join("names");
        if let Ok(rd) = fs::read_dir(&names_dir) {
            for ent in rd.flatten() {
                // A name is a symlink to the CT's config; only its file name is read.
                let Ok(target) = fs::read_link(ent.path()) else {
                    continue;
                };
                let ctid = target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".conf"))
                    .and_then(|n| n.parse::<u32>().ok());
                if let (Some(c), Some(n)) = (ctid, ent.file_name().to_str()) {
                    names.entry(c).or_default().push(n.to_string());
                }
            }
        }
        for v in names.values_mut() {
            v.sort();
        }
        let classes_path = base.join("networks_classes");
        let classes = fs::read_to_string(&classes_path)
            .ok()
            .map(|t| (classes_path, t));
        Ok(Self {
            conf_dir: conf_dir.to_path_buf(),
            global,
            names,
            classes,
        })
    }

    /// A node with no conf directory (an archive carried off it): only `vz_conf`, if given.
    pub fn bare(vz_conf: Option<&Path>) -> Result<Self, ImportError> {
        let global = match vz_conf {
            Some(p) => parse::parse(p, &read(p)?, None)?,
            None => VzFile::default(),
        };
        Ok(Self {
            conf_dir: PathBuf::from(DEFAULT_CONF_DIR),
            global,
            names: BTreeMap::new(),
            classes: None,
        })
    }

    /// Every `CTID.conf` in the conf directory (not `0.conf`, the host's), sorted.
    pub fn ctids(&self) -> Result<Vec<u32>, ImportError> {
        let rd = fs::read_dir(&self.conf_dir).map_err(|source| ImportError::Io {
            op: "read directory",
            path: self.conf_dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for ent in rd.flatten() {
            let name = ent.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".conf"))
                .and_then(|n| n.parse::<u32>().ok())
                && n != 0
            {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads `CTID.conf` from the conf directory.
    pub fn load_ct(&self, ctid: u32) -> Result<SourceCt, ImportError> {
        let path = self.conf_dir.join(format!("{ctid}.conf"));
        let text = read(&path)?;
        self.ct_from_text(ctid, &path, &text)
    }

    /// A CT's config from text read elsewhere (an archive's `etc/vzdump/vps.conf`).
    pub fn ct_from_text(
        &self,
        ctid: u32,
        path: &Path,
        text: &str,
    ) -> Result<SourceCt, ImportError> {
        let conf = parse::parse(path, text, Some(ctid))?;
        let mut scripts = Vec::new();
        for kind in SCRIPT_KINDS {
            for stem in [ctid.to_string(), "vps".to_string()] {
                let p = self.conf_dir.join(format!("{stem}.{kind}"));
                if p.exists() {
                    scripts.push(p);
                }
            }
        }
        Ok(SourceCt {
            ctid,
            conf,
            names: self.names.get(&ctid).cloned().unwrap_or_default(),
            scripts,
        })
    }

    /// The CT's setting of `key`, else the node's default from `vz.conf` (with `$VEID`
    /// expanded for this CT).
    pub fn setting(&self, ct: &SourceCt, key: &str) -> Option<Setting> {
        ct.conf.get(key).cloned().or_else(|| {
            self.global.get(key).map(|s| Setting {
                value: parse::expand_veid(&s.value, ct.ctid),
                ..s.clone()
            })
        })
    }
}

/// Where a setting was written, for the report.
pub fn origin(s: &Setting) -> String {
    format!("{}:{}", s.file.display(), s.line)
}

impl From<ParseError> for ImportError {
    fn from(e: ParseError) -> Self {
        ImportError::Parse(e)
    }
}
