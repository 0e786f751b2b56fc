//! Helpers for the cgroup tests: a CT cgroup under a unique parent, processes started inside it
//! (the way the lifecycle does: the forked child joins before exec), and a teardown check.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use berth_runtime::Ctid;
use berth_runtime::cgroups::{Cgroup, CgroupManager, Hierarchy, v2::V2Cgroup};

pub const BUSYBOX: &str = "/bin/busybox";
pub const CTID: u32 = 101;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// `berth-test-<pid>-<n>`: unique per process and call.
pub fn unique_parent() -> String {
    format!(
        "berth-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cgroup2 mount point, wherever it is (pure v2: /sys/fs/cgroup; hybrid: .../unified).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Waits until `f` holds, up to `timeout`.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A created CT cgroup under its own parent. Processes are started only through it, so
/// everything inside is ours; [`TestCgroup::finish`] kills them, removes the cgroup and checks
/// that no directory is left in any hierarchy. Drop does the same, best effort, on a failed test.
pub struct TestCgroup {
    pub cg: Cgroup,
    pub parent: String,
    /// Parent dirs (one per hierarchy) whose removal finish() checks.
    parent_dirs: Vec<PathBuf>,
    /// The hierarchy the cgroup lives in (removes the parent again).
    hierarchy: Hierarchy,
    children: Vec<Child>,
    done: bool,
}

impl TestCgroup {
    /// On the host's hierarchy (v1 here, v2 on unified hosts).
    pub fn new() -> Result<Self> {
        let hierarchy = Hierarchy::detect()?;
        let parent = unique_parent();
        let cg = hierarchy.open(&parent, Ctid::new(CTID)?)?;
        Self::with(cg, parent, hierarchy)
    }

    /// In the cgroup2 hierarchy even on a v1 host (hybrid hosts mount it without
    /// controllers, which still has cgroup.procs/freeze/kill/events).
    pub fn new_v2(mount: &Path) -> Result<Self> {
        let parent = unique_parent();
        let cg = Cgroup::V2(V2Cgroup::with_mount(mount, &parent, Ctid::new(CTID)?)?);
        Self::with(cg, parent, Hierarchy::V2(mount.to_path_buf()))
    }

    fn with(cg: Cgroup, parent: String, hierarchy: Hierarchy) -> Result<Self> {
        let parent_dirs = cg
            .paths()
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        let t = Self {
            cg,
            parent,
            parent_dirs,
            hierarchy,
            children: Vec::new(),
            done: false,
        };
        t.cg.create().context("create cgroup")?;
        Ok(t)
    }

    /// A command whose process joins the cgroup between fork and exec, by writing "0" to each
    /// cgroup.procs (as the CT's init does before unshare(CLONE_NEWCGROUP)).
    pub fn command(&self, argv: &[&str]) -> Command {
        let files: Vec<CString> = self
            .cg
            .join_self_files()
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()).expect("path without NUL"))
            .collect();
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        // SAFETY: the closure runs in the forked child and only calls open/write/close, which are
        // async-signal-safe; the CStrings were allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                for f in &files {
                    let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if n != 1 {
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    /// Starts `busybox sh -c script` inside the cgroup; returns its PID.
    pub fn spawn_sh(&mut self, script: &str) -> Result<i32> {
        self.spawn(&[BUSYBOX, "sh", "-c", script])
    }

    pub fn spawn(&mut self, argv: &[&str]) -> Result<i32> {
        let child = self
            .command(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {argv:?} in the cgroup"))?;
        let pid = i32::try_from(child.id())?;
        self.children.push(child);
        Ok(pid)
    }

    /// Reaps our direct children that have exited (killed ones included).
    pub fn reap(&mut self) {
        self.children
            .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }

    /// CPU time used by the cgroup over `wall`, as a fraction of one CPU.
    pub fn cpu_share_over(&self, wall: Duration) -> Result<f64> {
        let a = self.cg.stats()?.cpu_usage_ns;
        let t = Instant::now();
        thread::sleep(wall);
        let b = self.cg.stats()?.cpu_usage_ns;
        let el = t.elapsed();
        Ok((b - a) as f64 / el.as_nanos() as f64)
    }

    /// Kills everything inside, removes the cgroup and its parent, and checks that no directory
    /// is left in any hierarchy.
    pub fn finish(mut self) -> Result<()> {
        self.done = true;
        self.teardown()?;
        for p in self.cg.paths().iter().chain(&self.parent_dirs) {
            ensure!(!p.exists(), "{} left behind", p.display());
        }
        ensure!(!self.cg.exists(), "cgroup still exists");
        Ok(())
    }

    fn teardown(&mut self) -> Result<()> {
        if self.cg.exists() {
            self.cg.kill_all(Duration::from_secs(10))?;
        }
        for c in &mut self.children {
            // Everything in the cgroup is dead now; wait() only reaps.
            c.wait()?;
        }
        self.children.clear();
        self.cg.destroy()?;
        self.hierarchy.remove_parent_if_empty(&self.parent)?;
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.teardown()
        {
            eprintln!("cgroup test cleanup of {}: {e:#}", self.parent);
        }
    }
}
