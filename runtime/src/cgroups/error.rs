//! The one error type of the cgroup layer: every variant names the operation and the cgroup path;
//! an I/O cause is the `#[source]`, not part of the message.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::error_chain::ErrorChain;
use crate::size::Size;

pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A read, write, mkdir or rmdir failed; `op` says which file and value, `path` is the cgroup dir.
    #[error("{op} in {path}")]
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
    /// Best-effort teardown reports every failure, not only the first. A list has no single
    /// source, so the message carries each failure with its causes.
    #[error("{}", .0.iter().map(|e| ErrorChain(e).to_string()).collect::<Vec<_>>().join("; "))]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain::assert_causes_not_repeated;

    fn enoent(file: &str, dir: &str) -> CgroupError {
        CgroupError::io(
            format!("read {file}"),
            dir,
            io::Error::from_raw_os_error(libc::ENOENT),
        )
    }

    #[test]
    fn io_prints_its_cause_once() {
        let e = enoent("memory.max", "/sys/fs/cgroup/berth/101");
        assert_causes_not_repeated(&e);
        assert_eq!(e.to_string(), "read memory.max in /sys/fs/cgroup/berth/101");
        assert_eq!(
            ErrorChain(&e).to_string(),
            "read memory.max in /sys/fs/cgroup/berth/101: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn multiple_keeps_each_cause() {
        let e = CgroupError::collect(vec![
            enoent("a", "/cg/1"),
            CgroupError::Missing {
                op: "destroy",
                path: "/cg/2".into(),
            },
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "read a in /cg/1: No such file or directory (os error 2); destroy /cg/2: the cgroup \
             does not exist"
        );
    }
}
