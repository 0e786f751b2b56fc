//! Helpers for template and private-area tests: tree snapshots to compare copies, a tmpfs mount
//! guard, and a store in a throwaway directory.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use berth_runtime::template::TemplateStore;

/// What a copy must preserve about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub target: Option<PathBuf>,
    pub rdev: u64,
    /// Index of the hard-link group (paths sharing an inode share it), else None.
    pub link_group: Option<usize>,
}

/// Every path below a root (relative), with its [`Node`]. Directory mtimes are included, so a
/// copy that sets them before filling the directory shows up as a difference.
pub fn snapshot(root: &Path) -> Result<BTreeMap<PathBuf, Node>> {
    let mut out = BTreeMap::new();
    let mut groups: HashMap<(u64, u64), usize> = HashMap::new();
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<PathBuf, Node>,
        groups: &mut HashMap<(u64, u64), usize>,
    ) -> Result<()> {
        let mut ents: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("read {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        ents.sort_by_key(|e| e.file_name());
        for e in ents {
            let p = e.path();
            let m = fs::symlink_metadata(&p)?;
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_file() {
                'f'
            } else if ft.is_fifo() {
                'p'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else {
                's'
            };
            let link_group = (kind == 'f' && m.nlink() > 1).then(|| {
                let n = groups.len();
                *groups.entry((m.dev(), m.ino())).or_insert(n)
            });
            out.insert(
                p.strip_prefix(root)?.to_path_buf(),
                Node {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    size: if kind == 'f' { m.len() } else { 0 },
                    target: ft.is_symlink().then(|| fs::read_link(&p)).transpose()?,
                    rdev: m.rdev(),
                    link_group,
                },
            );
            if ft.is_dir() {
                walk(root, &p, out, groups)?;
            }
        }
        Ok(())
    }
    walk(root, root, &mut out, &mut groups)?;
    Ok(out)
}

/// Panics with the first few differences between two snapshots.
pub fn assert_same_tree(a: &BTreeMap<PathBuf, Node>, b: &BTreeMap<PathBuf, Node>) {
    let mut diffs = Vec::new();
    for (p, na) in a {
        match b.get(p) {
            None => diffs.push(format!("{}: missing in copy", p.display())),
            Some(nb) if nb != na => diffs.push(format!("{}: {na:?} vs {nb:?}", p.display())),
            _ => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        diffs.push(format!("{}: only in copy", p.display()));
    }
    assert!(
        diffs.is_empty(),
        "{} differences, first: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(5)]
    );
}

/// A tmpfs mounted on a directory we created; unmounted in Drop.
pub struct TmpfsMount {
    pub path: PathBuf,
}

impl TmpfsMount {
    pub fn new(path: &Path) -> Result<Self> {
        fs::create_dir_all(path)?;
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=16m"),
        )
        .with_context(|| format!("mount tmpfs on {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("unmount {}: {e}", self.path.display());
        }
    }
}

/// True if `path` or anything below it is a mount point in this namespace.
pub fn has_mounts_below(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp.starts_with(prefix.as_ref()))
}

/// A template store in a fresh temporary directory (removed on drop).
pub struct TestStore {
    pub tmp: tempfile::TempDir,
    pub store: TemplateStore,
}

impl TestStore {
    /// In `$BERTH_TEST_TMPDIR`, else /var/tmp rather than /tmp: /tmp is tmpfs on many hosts,
    /// which would hide how copies behave on the disk filesystems CT private areas live on.
    pub fn new() -> Result<Self> {
        let parent = std::env::var_os("BERTH_TEST_TMPDIR").unwrap_or_else(|| "/var/tmp".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!("berth-tmpl-{}-", std::process::id()))
            .tempdir_in(parent)?;
        let store = TemplateStore::open(tmp.path().join("template"))?;
        Ok(Self { tmp, store })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Names in the store directory, including any scratch leftovers.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.store.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}
