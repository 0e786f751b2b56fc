//! Which per-CT files of a directory changed since the last scrape (inotify), so that the
//! files berthd caches by content — CT configs and run states — are not even `stat`ed when
//! nothing happened: at 1000 CTs the two `stat`s per CT were ~10% of a scrape.
//!
//! What counts as a change: a file created, deleted, renamed into or out of the directory,
//! or closed after writing (berth writes both kinds of file to a temporary name and renames
//! it into place; an editor or `echo >>` closes the file). Plain writes are not watched: the
//! run directory also holds the CTs' console logs, written all the time.
//!
//! When events may have been lost the answer is "everything changed": at the first scrape,
//! when the kernel's queue overflowed, when the directory was replaced or could not be
//! watched (not there yet, inotify unavailable), and every [`FULL_PASS`] as a safety net for
//! filesystems that do not deliver events (network filesystems).

use std::{
    collections::BTreeSet,
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::debug;

/// Everything is looked at anew at least this often.
pub const FULL_PASS: Duration = Duration::from_secs(60);

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// What changed in a watched directory since the last [`DirWatch::changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Anything may have changed: look at every file.
    All,
    /// The CTIDs whose file (named `<ctid><suffix>`) changed.
    Some(BTreeSet<u32>),
}

impl Changes {
    pub fn contains(&self, ctid: u32) -> bool {
        match self {
            Changes::All => true,
            Changes::Some(s) => s.contains(&ctid),
        }
    }
}

/// An inotify watch on one directory of `<ctid><suffix>` files.
#[derive(Debug)]
pub struct DirWatch {
    dir: PathBuf,
    suffix: String,
    inotify: Option<OwnedFd>,
    /// The watch descriptor while the directory is watched.
    wd: Option<i32>,
    last_full: Option<Instant>,
}

impl DirWatch {
    /// Watches `dir` for files named `<ctid><suffix>` (e.g. `101.toml`). Nothing fails here:
    /// without inotify every call reports [`Changes::All`].
    pub fn new(dir: PathBuf, suffix: impl Into<String>) -> Self {
        // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        let inotify = if fd < 0 {
            debug!(dir = %dir.display(), error = %io::Error::last_os_error(), "no inotify; configs and run states are checked at every scrape");
            None
        } else {
            // SAFETY: fd was just returned by inotify_init1 and is owned by nobody else.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Self {
            dir,
            suffix: suffix.into(),
            inotify,
            wd: None,
            last_full: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the next [`Self::changes`] report [`Changes::All`] (the caller could not act
    /// on this one's answer).
    pub fn force_full(&mut self) {
        self.last_full = None;
    }

    /// What changed since the last call.
    pub fn changes(&mut self) -> Changes {
        let Some(fd) = &self.inotify else {
            return Changes::All;
        };
        let fd = fd.as_raw_fd();
        let mut all = self.last_full.is_none_or(|t| t.elapsed() >= FULL_PASS);
        let mut ctids = BTreeSet::new();
        if self.wd.is_some() {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // SAFETY: buf is writable for its length; fd is our inotify descriptor.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    // EAGAIN: drained. Any other error: assume the worst.
                    let e = io::Error::last_os_error();
                    if n < 0 && e.kind() != io::ErrorKind::WouldBlock {
                        debug!(dir = %self.dir.display(), error = %e, "reading inotify events");
                        all = true;
                    }
                    break;
                }
                self.parse(&buf[..n as usize], &mut all, &mut ctids);
            }
        }
        if self.wd.is_none() && self.add_watch(fd) {
            // Newly watched: what happened before is unknown.
            all = true;
        }
        if self.wd.is_none() {
            all = true;
        }
        if all {
            self.last_full = Some(Instant::now());
            Changes::All
        } else {
            Changes::Some(ctids)
        }
    }

    fn add_watch(&mut self, fd: i32) -> bool {
        let Ok(path) = CString::new(self.dir.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: path is NUL-terminated; fd is our inotify descriptor.
        let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), MASK) };
        if wd < 0 {
            // Usually ENOENT: the directory appears with the first CT (config) or start.
            return false;
        }
        self.wd = Some(wd);
        true
    }

    /// Events of one read: `struct inotify_event` records, each followed by its name.
    fn parse(&mut self, mut buf: &[u8], all: &mut bool, ctids: &mut BTreeSet<u32>) {
        const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
        while buf.len() >= HEAD {
            let u32_at = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap_or([0; 4]));
            let wd = u32_at(0) as i32;
            let mask = u32_at(4);
            let len = u32_at(12) as usize;
            let Some(name) = buf.get(HEAD..HEAD + len) else {
                *all = true;
                return;
            };
            let rest = &buf[HEAD + len..];
            if mask & libc::IN_Q_OVERFLOW != 0 {
                *all = true;
            }
            // Events of a watch given up before (a replaced directory) are stale.
            if mask & libc::IN_Q_OVERFLOW == 0 && Some(wd) != self.wd {
                buf = rest;
                continue;
            }
            if mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                // The directory went away or was replaced: watch again (by path) next time.
                if mask & libc::IN_IGNORED != 0 {
                    self.wd = None;
                } else if let (Some(fd), Some(wd)) = (&self.inotify, self.wd.take()) {
                    // SAFETY: removing our own watch; an already gone watch only fails.
                    unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
                }
                *all = true;
            }
            let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
            if let Some(c) = self.ctid_of(name) {
                ctids.insert(c);
            }
            buf = rest;
        }
    }

    /// `101` for `101<suffix>`.
    fn ctid_of(&self, name: &[u8]) -> Option<u32> {
        let stem = name.strip_suffix(self.suffix.as_bytes())?;
        std::str::from_utf8(stem).ok()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_ctids_of_changed_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("conf");
        let mut w = DirWatch::new(d.clone(), ".toml");
        assert_eq!(w.changes(), Changes::All, "not there yet");
        std::fs::create_dir(&d).unwrap();
        assert_eq!(w.changes(), Changes::All, "newly watched");
        assert_eq!(w.changes(), Changes::Some(BTreeSet::new()));

        std::fs::write(d.join("101.toml.tmp"), "x").unwrap();
        std::fs::rename(d.join("101.toml.tmp"), d.join("101.toml")).unwrap();
        std::fs::write(d.join("102.toml"), "y").unwrap();
        std::fs::write(d.join("notes.txt"), "z").unwrap();
        assert_eq!(w.changes(), Changes::Some([101, 102].into()));
        assert_eq!(w.changes(), Changes::Some(BTreeSet::new()));

        // Written in place and left open: not a change until closed.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join("102.toml"))
            .unwrap();
        f.write_all(b"more").unwrap();
        assert_eq!(w.changes(), Changes::Some(BTreeSet::new()));
        drop(f);
        assert_eq!(w.changes(), Changes::Some([102].into()));

        std::fs::remove_file(d.join("101.toml")).unwrap();
        assert!(w.changes().contains(101));

        // The directory replaced: everything again.
        std::fs::rename(&d, dir.path().join("old")).unwrap();
        std::fs::create_dir(&d).unwrap();
        assert_eq!(w.changes(), Changes::All);
        assert_eq!(w.changes(), Changes::Some(BTreeSet::new()));
        std::fs::write(d.join("7.toml"), "").unwrap();
        assert_eq!(w.changes(), Changes::Some([7].into()));
    }
}
