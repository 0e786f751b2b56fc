//! OS templates: the store, busybox/debootstrap builders, tarball import.
//!
//! A template named `debian-12` lives in `<store>/debian-12/`:
//! - `rootfs/`        the unpacked tree a CT's private area is copied from;
//! - `template.toml`  [`TemplateInfo`]: kind, origin, init path, the signal that powers its init off.
//!
//! Every operation that adds a template works in a `.`-prefixed scratch directory inside the store
//! (never listed, never a valid name) and renames it into place with `RENAME_NOREPLACE`, so a failed
//! import or build leaves the store as it was.

mod build;
mod copy;
mod fsutil;
mod import;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use build::{DebianInit, UnknownInit};
pub use copy::remove_tree_fast;
pub(crate) use fsutil::{detach_mounts_below, mounts};
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use import::extract_limited;
pub(crate) use import::{ExtractOpts, detect_init, extract_with, read_member};

/// File holding a template's metadata, next to its `rootfs/`.
pub const METADATA_FILE: &str = "template.toml";
/// Directory holding a template's tree.
pub const ROOTFS_DIR: &str = "rootfs";
/// Where Debian's busybox-static package installs the static binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "invalid template name {name:?}: {why} (use 1-64 characters from a-z A-Z 0-9 . _ -, not starting with '.')"
    )]
    InvalidName { name: String, why: &'static str },
    #[error("template {name:?} not found in {}", store.display())]
    NotFound { name: String, store: PathBuf },
    #[error("template {name:?} already exists in {}", store.display())]
    Exists { name: String, store: PathBuf },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("import {}: unsafe entry {entry:?}: {why}", archive.display())]
    UnsafeEntry {
        archive: PathBuf,
        entry: String,
        why: String,
    },
    #[error("import {}: corrupt or truncated archive: {why}", archive.display())]
    Corrupt { archive: PathBuf, why: String },
    #[error(
        "import {}: unknown compression {what} (supported: .tar, .tar.gz/.tgz, .tar.xz/.txz, .tar.zst/.tzst, .tar.lzo)",
        archive.display()
    )]
    UnknownCompression { archive: PathBuf, what: String },
    #[error(
        "import {}: entry {entry:?} would expand the archive to more than {limit} bytes, the space free in {}",
        archive.display(),
        dest.display()
    )]
    TooLarge {
        archive: PathBuf,
        entry: String,
        limit: u64,
        dest: PathBuf,
    },
    #[error("import {}: archive contains no files", archive.display())]
    EmptyArchive { archive: PathBuf },
    #[error("import {}: no /sbin/init in the archive, so it cannot boot as a system container", archive.display())]
    NoInit { archive: PathBuf },
    #[error("template metadata {}: {why}", path.display())]
    Metadata { path: PathBuf, why: String },
    #[error("{what}: {why}")]
    Command { what: String, why: String },
    #[error("{op} {}: {why}", path.display())]
    Refused {
        op: &'static str,
        path: PathBuf,
        why: String,
    },
}

pub type Result<T, E = TemplateError> = std::result::Result<T, E>;

/// Attaches the operation and the path to an `io::Error`.
pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io { op, path, source }
}

pub(crate) fn nix_err(op: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |e| TemplateError::Io {
        op,
        path,
        source: io::Error::from(e),
    }
}

/// How a template was made; decides nothing at run time but tells operators where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateKind {
    Busybox,
    Debian,
    Imported,
}

/// What `template.toml` holds; also what `berth template list` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateInfo {
    pub name: String,
    pub kind: TemplateKind,
    /// Unix seconds.
    pub created: u64,
    /// Where the tree came from: the archive path, the busybox version, the debootstrap suite + mirror.
    pub source: String,
    /// Absolute path of init inside the CT.
    #[serde(default = "default_init")]
    pub init: String,
    /// Signal name that makes this template's init power off (busybox init: SIGUSR2; sysvinit with a
    /// powerfail inittab entry: SIGPWR; systemd: SIGRTMIN+4).
    pub stop_signal: String,
    /// Bytes of regular files in the tree (hard links counted once).
    pub size: u64,
}

fn default_init() -> String {
    "/sbin/init".to_string()
}

impl TemplateInfo {
    /// The raw signal number of [`TemplateInfo::stop_signal`].
    pub fn stop_signal_number(&self) -> Result<i32> {
        signal_number(&self.stop_signal).ok_or_else(|| TemplateError::Metadata {
            path: PathBuf::from(METADATA_FILE),
            why: format!(
                "template {:?}: unknown stop_signal {:?}",
                self.name, self.stop_signal
            ),
        })
    }
}

fn signal_number(name: &str) -> Option<i32> {
    crate::signal::parse_signal(name).ok()
}

/// Checks a template name: `[a-zA-Z0-9._-]{1,64}`, not starting with '.' (scratch directories in
/// the store start with '.', and `.`/`..` must never be names).
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why| TemplateError::InvalidName {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > 64 {
        return Err(bad("longer than 64 characters"));
    }
    if name.starts_with('.') {
        return Err(bad("starts with '.'"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("contains a character other than a-z A-Z 0-9 . _ -"));
    }
    Ok(())
}

/// The pid in a scratch directory name `.{import,build,remove}-<name>-<pid>-<seq>`.
fn scratch_owner(file_name: &str) -> Option<u32> {
    let rest = [".import-", ".build-", ".remove-"]
        .iter()
        .find_map(|p| file_name.strip_prefix(p))?;
    let mut it = rest.rsplitn(3, '-');
    let (_seq, pid, _name) = (it.next()?, it.next()?, it.next()?);
    pid.parse().ok()
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The template store: `<berth root>/template`.
#[derive(Clone, Debug)]
pub struct TemplateStore {
    pub dir: PathBuf,
    busybox: PathBuf,
}

/// A scratch directory inside the store; removed on drop unless [`Scratch::commit`] moved it.
pub(crate) struct Scratch {
    pub path: PathBuf,
    done: bool,
}

impl Scratch {
    pub fn rootfs(&self) -> PathBuf {
        self.path.join(ROOTFS_DIR)
    }

    /// Writes the metadata and renames the scratch directory to `<store>/<name>` atomically;
    /// fails (changing nothing) if that name appeared meanwhile.
    pub fn commit(mut self, store: &TemplateStore, info: &TemplateInfo) -> Result<()> {
        let meta = self.path.join(METADATA_FILE);
        let text = toml::to_string(info).map_err(|e| TemplateError::Metadata {
            path: meta.clone(),
            why: e.to_string(),
        })?;
        fs::write(&meta, text).map_err(io_err("write template metadata", &meta))?;
        write_max_id(&self.path, tree_max_id(&self.rootfs())?)?;
        let dest = store.dir.join(&info.name);
        match nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &self.path,
            nix::fcntl::AT_FDCWD,
            &dest,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {
                self.done = true;
                Ok(())
            }
            Err(nix::errno::Errno::EEXIST) => Err(TemplateError::Exists {
                name: info.name.clone(),
                store: store.dir.clone(),
            }),
            Err(e) => Err(nix_err("rename template into place", &dest)(e)),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // debootstrap mounts /proc and /sys inside its target and may leave them behind when it
        // fails; detach those first, since remove_tree_fast refuses to descend into mounts.
        fsutil::detach_mounts_below(&self.path);
        if let Err(e) = remove_tree_fast(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove scratch directory");
        }
    }
}

impl TemplateStore {
    /// Opens (creating if needed) the store directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("create template store", &dir))?;
        Ok(Self {
            dir,
            busybox: PathBuf::from(DEFAULT_BUSYBOX),
        })
    }

    /// Uses another static busybox binary for [`TemplateStore::build_busybox`].
    pub fn with_busybox(mut self, binary: impl Into<PathBuf>) -> Self {
        self.busybox = binary.into();
        self
    }

    pub fn rootfs(&self, name: &str) -> PathBuf {
        self.dir.join(name).join(ROOTFS_DIR)
    }

    fn not_found(&self, name: &str) -> TemplateError {
        TemplateError::NotFound {
            name: name.to_string(),
            store: self.dir.clone(),
        }
    }

    pub(crate) fn ensure_absent(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        match fs::symlink_metadata(self.dir.join(name)) {
            Ok(_) => Err(TemplateError::Exists {
                name: name.to_string(),
                store: self.dir.clone(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("look up template", &self.dir.join(name))(e)),
        }
    }

    pub(crate) fn scratch(&self, purpose: &str, name: &str) -> Result<Scratch> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join(format!(".{purpose}-{name}-{}-{seq}", std::process::id()));
        fs::create_dir(&path).map_err(io_err("create scratch directory", &path))?;
        let scratch = Scratch { path, done: false };
        let rootfs = scratch.rootfs();
        fs::create_dir(&rootfs).map_err(io_err("create rootfs", &rootfs))?;
        fs::set_permissions(&rootfs, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(io_err("chmod rootfs", &rootfs))?;
        Ok(scratch)
    }

    /// Reads one template's metadata.
    pub fn get(&self, name: &str) -> Result<TemplateInfo> {
        validate_name(name)?;
        let meta = self.dir.join(name).join(METADATA_FILE);
        let text = match fs::read_to_string(&meta) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(name)),
            Err(e) => return Err(io_err("read template metadata", &meta)(e)),
        };
        let bad = |why: String| TemplateError::Metadata {
            path: meta.clone(),
            why,
        };
        let info: TemplateInfo = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if info.name != name {
            return Err(bad(format!(
                "names template {:?} but lives in directory {name:?}",
                info.name
            )));
        }
        if signal_number(&info.stop_signal).is_none() {
            return Err(bad(format!("unknown stop_signal {:?}", info.stop_signal)));
        }
        if !info.init.starts_with('/') {
            return Err(bad(format!("init {:?} is not an absolute path", info.init)));
        }
        let rootfs = self.rootfs(name);
        match fs::symlink_metadata(&rootfs) {
            Ok(m) if m.is_dir() => Ok(info),
            Ok(_) => Err(bad(format!("{} is not a directory", rootfs.display()))),
            Err(e) => Err(io_err("stat template rootfs", &rootfs)(e)),
        }
    }

    /// All templates, sorted by name. A damaged template is logged and left out rather than
    /// hiding every other one.
    pub fn list(&self) -> Result<Vec<TemplateInfo>> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list template store", &self.dir)(e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(io_err("list template store", &self.dir))?;
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue;
            }
            match self.get(&name) {
                Ok(info) => out.push(info),
                Err(e) => tracing::warn!(template = %name, error = %e, "skipping damaged template"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes a template. CTs already created from it keep their own copies.
    pub fn remove(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let dir = self.dir.join(name);
        if fs::symlink_metadata(&dir).is_err() {
            return Err(self.not_found(name));
        }
        // Rename first so a half-removed template never shows up in list() and the name is free
        // again at once.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let doomed = self.dir.join(format!(
            ".remove-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::rename(&dir, &doomed).map_err(io_err("remove template", &dir))?;
        remove_tree_fast(&doomed)
    }

    /// Removes scratch directories (`.import-*`, `.build-*`, `.remove-*`) left by berth processes
    /// that died mid-operation; those of live processes are left alone. Returns how many went.
    pub fn cleanup_stale(&self) -> Result<usize> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("list template store", &self.dir)(e)),
        };
        let mut removed = 0;
        for ent in rd {
            let ent = ent.map_err(io_err("list template store", &self.dir))?;
            let name = ent.file_name();
            let Some(pid) = name.to_str().and_then(scratch_owner) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let path = ent.path();
            fsutil::detach_mounts_below(&path);
            remove_tree_fast(&path)?;
            tracing::info!(path = %path.display(), pid, "removed stale template scratch directory");
            removed += 1;
        }
        Ok(removed)
    }

    /// Same as [`remove_tree_fast`], for callers that hold the store type.
    pub fn remove_tree_fast(path: &Path) -> Result<()> {
        remove_tree_fast(path)
    }

    /// Copies template `name` into a CT private area `dest` (which must not exist or be empty).
    /// With `shift = Some((uid_base, gid_base))` every owner is moved up by the bases, for CTs in
    /// a user namespace that maps 0 to those bases.
    pub fn instantiate(&self, name: &str, dest: &Path, shift: Option<(u32, u32)>) -> Result<()> {
        validate_name(name)?;
        let src = self.rootfs(name);
        match fs::symlink_metadata(&src) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(TemplateError::Metadata {
                    path: src,
                    why: "template rootfs is not a directory".into(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(name)),
            Err(e) => return Err(io_err("stat template rootfs", &src)(e)),
        }
        let size = self.get(name).ok().map(|i| i.size);
        copy::copy_tree(&src, dest, shift, size)
    }
}

/// Where a template records the highest uid or gid its tree uses (an unprivileged CT's range
/// must cover it), so create does not walk the whole tree each time.
const MAX_ID_FILE: &str = "max_id";

fn write_max_id(template_dir: &Path, max: u32) -> Result<()> {
    let p = template_dir.join(MAX_ID_FILE);
    let tmp = template_dir.join(".max_id.tmp");
    fs::write(&tmp, format!("{max}\n")).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &p).map_err(io_err("rename into place", &p))
}

/// The highest uid or gid of any entry below `root` (itself included), without following
/// symlinks.
pub(crate) fn tree_max_id(root: &Path) -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(root).map_err(io_err("stat", root))?;
    let mut max = md.uid().max(md.gid());
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in fs::read_dir(&dir).map_err(io_err("read directory", &dir))? {
            let ent = ent.map_err(io_err("read directory", &dir))?;
            let m = fs::symlink_metadata(ent.path()).map_err(io_err("stat", &ent.path()))?;
            max = max.max(m.uid()).max(m.gid());
            if m.is_dir() {
                stack.push(ent.path());
            }
        }
    }
    Ok(max)
}

impl TemplateStore {
    /// The highest uid or gid in template `name`'s tree: recorded when the template was made,
    /// or found (and recorded) now for a template made before berth recorded it.
    pub fn max_id(&self, name: &str) -> Result<u32> {
        self.get(name)?;
        let dir = self.dir.join(name);
        let p = dir.join(MAX_ID_FILE);
        if let Some(n) = fs::read_to_string(&p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Ok(n);
        }
        let max = tree_max_id(&self.rootfs(name))?;
        write_max_id(&dir, max)?;
        Ok(max)
    }
}

/// Sums the sizes of regular files below `root` (hard links once), without following symlinks.
pub(crate) fn tree_size(root: &Path) -> Result<u64> {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, seen: &mut HashSet<(u64, u64)>, total: &mut u64) -> Result<()> {
        for ent in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            let ent = ent.map_err(io_err("read directory", dir))?;
            let ft = ent.file_type().map_err(io_err("stat", &ent.path()))?;
            if ft.is_dir() {
                walk(&ent.path(), seen, total)?;
            } else if ft.is_file() {
                let m = ent.metadata().map_err(io_err("stat", &ent.path()))?;
                if m.nlink() == 1 || seen.insert((m.dev(), m.ino())) {
                    *total += m.len();
                }
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(root, &mut HashSet::new(), &mut total)?;
    Ok(total)
}

#[cfg(test)]
mod tests;
