//! Network namespace handles and the RAII guard that enters one on the current thread.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sched::{CloneFlags, setns, unshare};

use super::error::NetError;

const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

fn ns_err(op: impl Into<String>, e: impl Into<std::io::Error>) -> NetError {
    NetError::Netns {
        op: op.into(),
        source: e.into(),
    }
}

/// Opens the calling thread's current network namespace.
pub fn current_netns() -> Result<OwnedFd, NetError> {
    File::open(THREAD_NETNS)
        .map(OwnedFd::from)
        .map_err(|e| ns_err(format!("open {THREAD_NETNS}"), e))
}

/// Puts the calling thread into `target`'s network namespace and puts it back on drop.
///
/// setns(CLONE_NEWNET) is per thread, so the guard is `!Send`: it must be dropped on the thread
/// that created it. Never hold one across an `.await`. Restoring in `Drop` (rather than at the end
/// of a block) keeps an early `?` return from leaving the thread in the wrong namespace.
pub struct NetNsGuard {
    saved: OwnedFd,
    _not_send: PhantomData<*const ()>,
}

impl NetNsGuard {
    pub fn enter(target: BorrowedFd<'_>) -> Result<Self, NetError> {
        let saved = current_netns()?;
        setns(target, CloneFlags::CLONE_NEWNET)
            .map_err(|e| ns_err("setns into target netns", e))?;
        Ok(Self {
            saved,
            _not_send: PhantomData,
        })
    }

    /// Moves the thread into a brand-new network namespace; returns the guard and the new netns.
    pub fn enter_new() -> Result<(Self, OwnedFd), NetError> {
        let saved = current_netns()?;
        let guard = Self {
            saved,
            _not_send: PhantomData,
        };
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| ns_err("unshare(CLONE_NEWNET)", e))?;
        let new = current_netns()?;
        Ok((guard, new))
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(self.saved.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Carrying on would configure (or tear down) the wrong namespace's network with
            // root privileges; there is no safe way to continue on this thread.
            tracing::error!(error = %e, "cannot restore the thread's network namespace; aborting");
            std::process::abort();
        }
    }
}

/// Creates a new, empty network namespace (only `lo`, down) and returns a handle to it. The
/// namespace lives as long as this fd or any process inside it.
pub fn create_netns() -> Result<OwnedFd, NetError> {
    let (_guard, fd) = NetNsGuard::enter_new()?;
    Ok(fd)
}

/// Runs `f` with the thread inside `netns` (when given), restoring the namespace afterwards.
pub(crate) fn within<T>(
    netns: Option<BorrowedFd<'_>>,
    f: impl FnOnce() -> Result<T, NetError>,
) -> Result<T, NetError> {
    let _guard = match netns {
        Some(fd) => Some(NetNsGuard::enter(fd)?),
        None => None,
    };
    f()
}
