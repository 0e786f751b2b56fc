//! File operations on cgroupfs with errors that name the file, the value and the cgroup dir.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::debug;

use super::error::{CgroupError, Result};

/// Writes `value` to `dir/file` in one write(2), as cgroupfs requires. Never creates the file:
/// on cgroupfs a missing file means a missing controller, which callers report as such.
pub(crate) fn try_write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    let path = dir.join(file);
    debug!(path = %path.display(), value, "cgroup write");
    // O_TRUNC is a no-op on cgroupfs (kernfs ignores the size change); it matters for fake trees.
    let mut f = OpenOptions::new().write(true).truncate(true).open(&path)?;
    f.write_all(value.as_bytes())
}

pub(crate) fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    write_shown(dir, file, value, value)
}

/// Like [`write`], with `shown` (e.g. `1G` for 1073741824) in the error message.
pub(crate) fn write_shown(dir: &Path, file: &str, value: &str, shown: &str) -> Result<()> {
    try_write(dir, file, value)
        .map_err(|e| CgroupError::io(format!("write {file} = {shown}"), dir, e))
}

pub(crate) fn read(dir: &Path, file: &str) -> Result<String> {
    fs::read_to_string(dir.join(file)).map_err(|e| CgroupError::io(format!("read {file}"), dir, e))
}

/// `None` when the file does not exist (controller absent, or the cgroup went away).
pub(crate) fn read_opt(dir: &Path, file: &str) -> Result<Option<String>> {
    match fs::read_to_string(dir.join(file)) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CgroupError::io(format!("read {file}"), dir, e)),
    }
}

pub(crate) fn parse_u64(dir: &Path, file: &str, content: &str) -> Result<u64> {
    content.trim().parse().map_err(|_| CgroupError::Parse {
        file: file.to_string(),
        path: dir.to_path_buf(),
        content: content.to_string(),
        why: "expected an unsigned number",
    })
}

pub(crate) fn parse_i64(dir: &Path, file: &str, content: &str) -> Result<i64> {
    content.trim().parse().map_err(|_| CgroupError::Parse {
        file: file.to_string(),
        path: dir.to_path_buf(),
        content: content.to_string(),
        why: "expected a number",
    })
}

pub(crate) fn read_u64(dir: &Path, file: &str) -> Result<u64> {
    parse_u64(dir, file, &read(dir, file)?)
}

pub(crate) fn read_u64_opt(dir: &Path, file: &str) -> Result<Option<u64>> {
    read_opt(dir, file)?
        .map(|s| parse_u64(dir, file, &s))
        .transpose()
}

/// mkdir that accepts an existing directory (create is idempotent).
pub(crate) fn mkdir(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {
            debug!(path = %dir.display(), "cgroup created");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::io("mkdir", dir, e)),
    }
}

/// Child cgroups of `dir` (a CT may create its own below its cgroup); missing dir → none.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CgroupError::io("list child cgroups", dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| CgroupError::io("list child cgroups", dir, e))?;
        let is_dir = ent
            .file_type()
            .map_err(|e| CgroupError::io("stat child cgroup", ent.path(), e))?
            .is_dir();
        if is_dir {
            out.push(ent.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Names of the child cgroups of `dir`, unsorted; missing dir → none.
pub(crate) fn subdir_names(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CgroupError::io("list child cgroups", dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| CgroupError::io("list child cgroups", dir, e))?;
        let is_dir = ent
            .file_type()
            .map_err(|e| CgroupError::io("stat child cgroup", ent.path(), e))?
            .is_dir();
        if is_dir {
            out.push(ent.file_name());
        }
    }
    Ok(out)
}

/// `dir` and every cgroup below it, children before parents (the order rmdir needs).
pub(crate) fn tree_postorder(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for sub in subdirs(dir)? {
        out.extend(tree_postorder(&sub)?);
    }
    out.push(dir.to_path_buf());
    Ok(out)
}

/// PIDs in `dir/cgroup.procs` and in every child cgroup's.
pub(crate) fn procs_in_tree(dir: &Path) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for d in tree_postorder(dir)? {
        let Some(text) = read_opt(&d, "cgroup.procs")? else {
            continue;
        };
        for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let pid = l.parse::<i32>().map_err(|_| CgroupError::Parse {
                file: "cgroup.procs".into(),
                path: d.clone(),
                content: text.clone(),
                why: "expected one PID per line",
            })?;
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// SIGKILL to each PID; ESRCH (already gone) is fine.
pub(crate) fn sigkill(pids: &[i32]) {
    for &p in pids {
        match kill(Pid::from_raw(p), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => debug!(pid = p, error = %e, "SIGKILL failed"),
        }
    }
}

/// Calls `done` until it returns true (→ true) or `timeout` passes (→ false). The wait starts
/// at 100 µs and doubles up to 10 ms: freezing or emptying a small CT takes well under a
/// millisecond, and stop/start latency is a measured bar.
pub(crate) fn poll_until(
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_micros(100);
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(10));
    }
}

/// Removes `dir` and its child cgroups, deepest first. NotFound = already done. A cgroup whose
/// last task is still in do_exit() can answer EBUSY for a moment after cgroup.procs went empty,
/// so EBUSY is retried briefly before it is reported.
pub(crate) fn rmdir_tree(dir: &Path) -> Result<()> {
    for d in tree_postorder(dir)? {
        let mut tries = 0;
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => {
                    debug!(path = %d.display(), "cgroup removed");
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 60 => {
                    tries += 1;
                    thread::sleep(Duration::from_micros(100 << tries.min(7)));
                }
                Err(e) => return Err(CgroupError::io("rmdir", &d, e)),
            }
        }
    }
    Ok(())
}

/// Validates a cgroup parent such as `berth` or `berth/tests`: relative, components of
/// `[A-Za-z0-9._-]`, no `.`/`..`.
pub(crate) fn parent_components(parent: &str) -> Result<Vec<String>> {
    let bad = |why| CgroupError::BadParent {
        parent: parent.to_string(),
        why,
    };
    if parent.is_empty() {
        return Err(bad("empty"));
    }
    if parent.starts_with('/') {
        return Err(bad("must be relative to the cgroup mount (no leading /)"));
    }
    let mut out = Vec::new();
    for c in parent.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(bad("empty, . or .. path component"));
        }
        if c.len() > 255 {
            return Err(bad("path component longer than 255 bytes"));
        }
        if !c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad("use [A-Za-z0-9._-] and / between components"));
        }
        out.push(c.to_string());
    }
    Ok(out)
}

/// rmdir `<root>/<parent>` and then each of its ancestors inside `parent`, stopping quietly at the
/// first one that still has children or tasks (EBUSY / ENOTEMPTY).
pub(crate) fn remove_parent_dirs(root: &Path, comps: &[String]) -> Result<()> {
    for n in (1..=comps.len()).rev() {
        let dir = comps[..n].iter().fold(root.to_path_buf(), |p, c| p.join(c));
        match fs::remove_dir(&dir) {
            Ok(()) => debug!(path = %dir.display(), "cgroup parent removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENOTEMPTY)) => {
                debug!(path = %dir.display(), "cgroup parent not empty, kept");
                return Ok(());
            }
            Err(e) => return Err(CgroupError::io("rmdir parent", &dir, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_validation() {
        assert_eq!(parent_components("berth").unwrap(), ["berth"]);
        assert_eq!(
            parent_components("berth/test-1_2.x").unwrap(),
            ["berth", "test-1_2.x"]
        );
        for bad in ["", "/berth", "a//b", "a/../b", ".", "a b", "a/", "x\0"] {
            let e = parent_components(bad).unwrap_err();
            assert!(
                e.to_string().starts_with("invalid cgroup parent"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn write_never_creates_files() {
        let t = tempfile::tempdir().unwrap();
        let e = write(t.path(), "memory.max", "1").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(
            e.to_string(),
            format!("write memory.max = 1 in {}", t.path().display())
        );
        assert!(!t.path().join("memory.max").exists());
    }

    #[test]
    fn procs_and_removal_walk_child_cgroups() {
        let t = tempfile::tempdir().unwrap();
        let ct = t.path().join("101");
        fs::create_dir_all(ct.join("init.scope/x")).unwrap();
        fs::write(ct.join("cgroup.procs"), "5\n3\n").unwrap();
        fs::write(ct.join("init.scope/cgroup.procs"), "7\n3\n").unwrap();
        assert_eq!(procs_in_tree(&ct).unwrap(), [3, 5, 7]);
        assert_eq!(
            tree_postorder(&ct).unwrap(),
            [ct.join("init.scope/x"), ct.join("init.scope"), ct.clone()]
        );
        assert!(procs_in_tree(&t.path().join("nope")).unwrap().is_empty());
        fs::write(ct.join("cgroup.procs"), "abc\n").unwrap();
        assert!(
            procs_in_tree(&ct)
                .unwrap_err()
                .to_string()
                .starts_with("parse cgroup.procs in")
        );
    }

    #[test]
    fn parent_removal_stops_at_non_empty() {
        let t = tempfile::tempdir().unwrap();
        let comps = vec!["a".to_string(), "b".to_string()];
        fs::create_dir_all(t.path().join("a/b")).unwrap();
        fs::create_dir_all(t.path().join("a/other")).unwrap();
        remove_parent_dirs(t.path(), &comps).unwrap();
        assert!(!t.path().join("a/b").exists());
        assert!(t.path().join("a/other").exists());
        fs::remove_dir(t.path().join("a/other")).unwrap();
        remove_parent_dirs(t.path(), &comps).unwrap();
        assert!(!t.path().join("a").exists());
    }
}
