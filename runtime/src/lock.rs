//! Per-CT lock: commands on one CT serialize; different CTs proceed in parallel.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("open lock file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CT is busy: another berth command holds {path} (waited {waited:?})")]
    Busy { path: PathBuf, waited: Duration },
}

/// An exclusive flock on `<run>/<CTID>.lock`, released on drop or when the process dies (even by
/// SIGKILL), so a killed berth never leaves a CT locked.
#[derive(Debug)]
pub struct CtLock {
    _flock: Flock<File>,
}

impl CtLock {
    pub fn acquire(path: &Path, timeout: Duration) -> Result<Self, LockError> {
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(|source| LockError::Open {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let start = Instant::now();
        let mut file = open()?;
        let mut backoff = Duration::from_millis(1);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Ok(Self { _flock: flock }),
                Err((f, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                    if start.elapsed() >= timeout {
                        return Err(LockError::Busy {
                            path: path.to_path_buf(),
                            waited: start.elapsed(),
                        });
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                    file = f;
                }
                Err((_, errno)) => {
                    return Err(LockError::Open {
                        path: path.to_path_buf(),
                        source: io::Error::from(errno),
                    });
                }
            }
        }
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self._flock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain::{ErrorChain, assert_causes_not_repeated};

    #[test]
    fn exclusive_then_released() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("101.lock");
        let a = CtLock::acquire(&p, Duration::ZERO).unwrap();
        let e = CtLock::acquire(&p, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(e, LockError::Busy { .. }), "{e}");
        drop(a);
        CtLock::acquire(&p, Duration::ZERO).unwrap();
    }

    #[test]
    fn open_failure_prints_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no-run-dir/101.lock");
        let e = CtLock::acquire(&p, Duration::ZERO).unwrap_err();
        assert_causes_not_repeated(&e);
        assert_eq!(
            ErrorChain(&e).to_string(),
            format!(
                "open lock file {}: No such file or directory (os error 2)",
                p.display()
            )
        );
    }
}
