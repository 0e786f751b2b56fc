//! User namespaces of unprivileged CTs: the host's id pool and its allocations (`pool.rs`),
//! id-mapped mounts that let CTs share a template (`idmap.rs`), and shifting a private area's
//! ownership when a stopped CT changes mode (`shift.rs`).

mod idmap;
mod pool;
mod shift;

use std::io;
use std::path::PathBuf;

pub use idmap::{IdmappedTree, idmap_supported, remove_staging, userns_fd};
pub use pool::{Holder, HostIds, IdPool, allocate, claim, gc_allocations, holder_of, release};
pub use shift::{ShiftDirection, shift_tree, unmappable_ids};

use crate::ctid::Ctid;

/// Ids per CT: a whole 16-bit range, so every uid and gid a distribution uses maps.
pub const RANGE: u32 = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("host config {path}: {msg}")]
    BadPool { path: PathBuf, msg: String },
    #[error(
        "CT {ctid}: the id pool ({start}..{end}, {ranges} ranges of {RANGE}) is exhausted: every range is allocated (raise [userns] pool_size in {conf})"
    )]
    Exhausted {
        ctid: Ctid,
        start: u64,
        end: u64,
        ranges: u64,
        conf: PathBuf,
    },
    #[error(
        "CT {ctid}: ids {base}..{end} of the id pool overlap host {what}: the pool must not hold ids the host uses (move [userns] pool_start in {conf})"
    )]
    OverlapsHost {
        ctid: Ctid,
        base: u64,
        end: u64,
        what: String,
        conf: PathBuf,
    },
    #[error("{op}")]
    Sys {
        op: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{path}: owner {uid}:{gid} cannot be shifted {how}")]
    Unmappable {
        path: PathBuf,
        uid: u32,
        gid: u32,
        how: String,
    },
}

pub type Result<T> = std::result::Result<T, UsernsError>;

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> UsernsError {
    let path = path.into();
    move |source| UsernsError::Io { op, path, source }
}
