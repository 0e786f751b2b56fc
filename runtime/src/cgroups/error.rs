//! The one error type of the cgroup layer: every variant names the operation and the cgroup path.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::size::Size;

pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A read, write, mkdir or rmdir failed; `op` says which file and value, `path` is the cgroup dir.
    #[error("{op} in {path}: {source}")]
    Io {
        op: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cgroup v1 answers EBUSY when it cannot reclaim down to a lowered limit.
    #[error(
        "write {file} = {limit} in {path}: the CT uses {usage} now and the kernel could not reclaim \
         down to the new limit (Device or resource busy); free memory inside the CT or choose a \
         limit above its usage"
    )]
    MemoryBelowUsage {
        file: &'static str,
        path: PathBuf,
        limit: Size,
        usage: Size,
    },
    /// The host kernel or hierarchy lacks what the setting needs.
    #[error("unsupported: {what}")]
    Unsupported { what: String },
    /// A resource value outside its range; `flag` is the CLI/config name of the setting.
    #[error("invalid --{flag} {value}: {why}")]
    Invalid {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error("invalid cgroup parent {parent:?}: {why}")]
    BadParent { parent: String, why: &'static str },
    #[error("parse {file} in {path}: {why} (content {content:?})")]
    Parse {
        file: String,
        path: PathBuf,
        content: String,
        why: &'static str,
    },
    #[error("no usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    #[error("{op} {path}: the cgroup does not exist")]
    Missing { op: &'static str, path: PathBuf },
    #[error("{op} {path}: {} process(es) still inside (pids {pids:?})", pids.len())]
    Busy {
        op: &'static str,
        path: PathBuf,
        pids: Vec<i32>,
    },
    #[error("{op} {path}: timed out after {after:?}: {detail}")]
    Timeout {
        op: &'static str,
        path: PathBuf,
        after: Duration,
        detail: String,
    },
    /// Best-effort teardown reports every failure, not only the first.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Multiple(Vec<CgroupError>),
}

impl CgroupError {
    pub(crate) fn io(op: impl Into<String>, path: impl Into<PathBuf>, source: io::Error) -> Self {
        CgroupError::Io {
            op: op.into(),
            path: path.into(),
            source,
        }
    }

    /// Folds collected teardown errors: none → Ok, one → itself, more → [`CgroupError::Multiple`].
    pub(crate) fn collect(mut errors: Vec<CgroupError>) -> Result<()> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(CgroupError::Multiple(errors)),
        }
    }

    /// The errno behind an I/O failure, if this is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            CgroupError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
