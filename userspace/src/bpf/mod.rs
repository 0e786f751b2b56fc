//! The eBPF plumbing under both the datapath ([`crate::datapath`]) and the shaper
//! ([`crate::shaper`]): the one embedded object and its build fingerprint, bpffs checks, the
//! pin-directory lock, typed opening of pinned maps (read-write for the managers, read-only
//! for readers), load-or-open of a build's pinned programs with the sweep of older builds
//! ([`programs`]), attaching to tc hooks over TCX or clsact + cls_bpf ([`attach`]), and the raw
//! `bpf(2)` calls aya does not wrap ([`sys`]). Every failure is a [`BpfError`], which the
//! datapath's and the shaper's errors wrap.

pub mod attach;
pub mod btf;
mod error;
pub mod programs;
pub mod sys;

use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::Path,
};

use aya::maps::{Map, MapData};
pub use error::{BpfError, Result};
use tracing::info;

/// The eBPF object built by `build.rs` (empty when built with `AYA_BUILD_SKIP=1`). The
/// datapath and the shaper load their programs from this one object, so they share its maps'
/// definitions.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/berth-ebpf"));

/// The embedded object, or [`BpfError::NotBuilt`].
pub fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        return Err(BpfError::NotBuilt);
    }
    Ok(OBJECT)
}

/// Names the `progs/<build>` directory of this binary's programs: a binary with different
/// programs sees a directory it does not know and upgrades.
pub fn build_id() -> String {
    format!("{:016x}", fnv1a(OBJECT))
}

/// FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BpfError + use<> {
    let path = path.to_owned();
    move |source| BpfError::Io { op, path, source }
}

pub(crate) fn map_err(
    map: &'static str,
    path: &Path,
    op: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> BpfError + use<> {
    let path = path.to_owned();
    move |e| BpfError::Map {
        map,
        path,
        op,
        source: Box::new(e),
    }
}

pub(crate) fn prog_err(
    program: &'static str,
    op: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> BpfError {
    move |e| BpfError::Program {
        program,
        op,
        source: Box::new(e),
    }
}

/// aya reports a missing key as `KeyNotFound` from lookups but as a raw ENOENT from deletes.
pub(crate) fn not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Possible CPUs: the number of values of a per-CPU map entry.
pub(crate) fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(path, e)| io_err("reading", Path::new(path))(e))
}

/// Makes sure `pin_dir` is (or will be, once created) on a bpf filesystem; mounts bpffs at
/// `/sys/fs/bpf` when the pins go there and nothing is mounted yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    // The nearest existing ancestor tells which filesystem the pins would land on.
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if sys::is_bpffs(&probe).map_err(io_err("statfs", &probe))? {
        return Ok(());
    }
    let default_mount = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default_mount) && probe == default_mount {
        info!(path = %default_mount.display(), "bpffs not mounted; mounting it");
        sys::mount_bpffs(default_mount).map_err(|source| BpfError::MountBpffs {
            path: default_mount.to_owned(),
            source,
        })?;
        return Ok(());
    }
    Err(BpfError::NotBpffs {
        path: pin_dir.to_owned(),
    })
}

/// Creates every directory in `dirs` (and their parents).
pub fn create_dirs(dirs: &[&Path]) -> Result<()> {
    for d in dirs {
        fs::create_dir_all(d).map_err(io_err("creating", d))?;
    }
    Ok(())
}

/// An exclusive flock on a pin directory: load/upgrade and attach/detach of concurrent berth
/// processes serialise on it (bpffs directories support flock like any inode). Released on
/// drop.
pub struct PinLock(#[expect(dead_code, reason = "held for its Drop (unlock on close)")] File);

impl PinLock {
    pub fn take(dir: &Path) -> Result<Self> {
        let f = File::open(dir).map_err(io_err("opening", dir))?;
        // SAFETY: f is an open fd for the duration of the call.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err("locking", dir)(io::Error::last_os_error()));
        }
        Ok(Self(f))
    }
}

/// Unpins everything under `dir` (links, programs, maps), keeping `dir`. A missing `dir` is
/// fine. Unpinning the last reference to a TCX link detaches it.
pub fn remove_contents(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        let path = entry.path();
        if entry.file_type().map_err(io_err("stat", &path))?.is_dir() {
            remove_tree(&path)?;
        } else {
            fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
        }
    }
    Ok(())
}

/// [`remove_contents`] and `dir` itself.
pub fn remove_tree(dir: &Path) -> Result<()> {
    remove_contents(dir)?;
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", dir)(e)),
    }
}

/// How a pinned map is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// For the managers that edit maps.
    ReadWrite,
    /// For readers (berthd, read-only verbs): the kernel refuses any write through the fd.
    ReadOnly,
}

/// Opens the map `name` pinned in `maps_dir` as the typed map `T`, refusing a pin whose key or
/// value size differs from this build's (an incompatible berth created it).
pub fn open_map<T>(
    maps_dir: &Path,
    name: &'static str,
    key: usize,
    value: usize,
    access: Access,
) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = maps_dir.join(name);
    let data = match access {
        Access::ReadWrite => {
            MapData::from_pin(&path).map_err(map_err(name, &path, "opening pin"))?
        }
        Access::ReadOnly => {
            let fd = sys::obj_get_readonly(&path).map_err(io_err("opening read-only", &path))?;
            MapData::from_fd(fd).map_err(map_err(name, &path, "opening pin"))?
        }
    };
    let info = data.info().map_err(map_err(name, &path, "reading info"))?;
    let found = (info.key_size(), info.value_size());
    let expected = (key as u32, value as u32);
    if found != expected {
        return Err(BpfError::IncompatibleMap {
            map: name,
            path,
            found,
            expected,
        });
    }
    let map = Map::from_map_data(data).map_err(map_err(name, &path, "typing"))?;
    T::try_from(map).map_err(map_err(name, &path, "typing"))
}

/// Whether every map in `names` is pinned in `maps_dir` (a reader's "is there a datapath").
pub fn maps_pinned(maps_dir: &Path, names: &[&str]) -> bool {
    names.iter().all(|n| maps_dir.join(n).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_is_stable_fnv1a() {
        // Published FNV-1a 64 test vectors: the id must not change across Rust versions, or
        // every upgrade would look like a new build.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(build_id().len(), 16);
    }

    #[test]
    fn remove_tree_of_missing_dir_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nothing");
        remove_tree(&gone).unwrap();
        let nested = dir.path().join("a/b");
        fs::create_dir_all(&nested).unwrap();
        fs::write(nested.join("f"), b"x").unwrap();
        remove_tree(&dir.path().join("a")).unwrap();
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn maps_pinned_needs_every_map() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!maps_pinned(dir.path(), &["A"]));
        fs::write(dir.path().join("A"), b"").unwrap();
        assert!(maps_pinned(dir.path(), &["A"]));
        assert!(!maps_pinned(dir.path(), &["A", "B"]));
    }
}
