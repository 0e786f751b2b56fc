//! A throwaway berth installation per test: temporary root, unique cgroup parent, the real
//! `berth` binary, and a check that nothing was left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Directory holding the built `berth` binary: `BERTH_BIN_DIR` (set by `cargo xtask test`) or
/// the workspace's target/debug.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("BERTH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

pub fn berth_bin() -> PathBuf {
    let p = bin_dir().join("berth");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p berth` (cargo xtask test does)",
        p.display()
    );
    p
}

/// v1 hierarchies (or the v2 root) where per-CT cgroups appear.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return out;
    };
    for l in mi.lines() {
        let Some((pre, post)) = l.split_once(" - ") else {
            continue;
        };
        let fstype = post.split_whitespace().next().unwrap_or("");
        if (fstype == "cgroup" || fstype == "cgroup2")
            && let Some(mp) = pre.split_whitespace().nth(4)
        {
            out.push(PathBuf::from(mp));
        }
    }
    out
}

pub struct TestHost {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub cgroup_parent: String,
    bin: PathBuf,
    /// Network namespace berth runs in (the test's stand-in for the host), if not the current.
    netns: Option<std::os::fd::OwnedFd>,
    /// The datapath's bpffs pin directory for this installation.
    pub bpffs: PathBuf,
}

impl Default for TestHost {
    fn default() -> Self {
        Self::new()
    }
}

impl TestHost {
    /// A new installation with the busybox template built.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// The same with the berth root at `root` (for example on a small filesystem of the
    /// test's own); the rest of the test's files stay in a temporary directory.
    pub fn new_at(root: PathBuf) -> Self {
        Self::build(Some(root))
    }

    fn build(root: Option<PathBuf>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .expect("tempdir");
        let root = root.unwrap_or_else(|| dir.path().join("root"));
        let cgroup_parent = format!(
            "berth-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/{cgroup_parent}"));
        let h = Self {
            dir,
            root,
            cgroup_parent,
            bin: berth_bin(),
            netns: None,
            bpffs,
        };
        h.ok(&["template", "build", "busybox"]);
        h
    }

    /// Runs every berth command of this installation inside `netns` (setns in the child, so
    /// bpffs stays visible, unlike `ip netns exec`): the CTs' host-side interfaces, routes and
    /// proxy entries then live in a namespace of the test's own.
    pub fn in_netns(mut self, netns: std::os::fd::BorrowedFd<'_>) -> Self {
        self.netns = Some(netns.try_clone_to_owned().expect("dup netns fd"));
        self
    }

    /// Runs this installation's commands with the `berth` binary at `bin` (for example a
    /// copy in a directory of the test's own, next to other companion binaries).
    pub fn with_bin(mut self, bin: PathBuf) -> Self {
        self.bin = bin;
        self
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root")
            .arg(&self.root)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(args)
            .env_remove("BERTH_ROOT");
        self.in_ns(c)
    }

    /// One of the vzctl/vzlist entry points (`tool`, built next to berth) on this
    /// installation: vzctl has no flags for it, so it comes through berth's environment.
    pub fn compat(&self, tool: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join(tool));
        c.args(args)
            .env("BERTH_BIN", &self.bin)
            .env("BERTH_ROOT", &self.root)
            .env("BERTH_CGROUP_PARENT", &self.cgroup_parent)
            .env("BERTH_BPFFS", &self.bpffs);
        self.in_ns(c)
    }

    fn in_ns(&self, mut c: Command) -> Command {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        c.env_remove("BERTH_RUN_DIR").stdin(Stdio::null());
        if let Some(fd) = &self.netns {
            let fd = fd.as_raw_fd();
            // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec.
            unsafe {
                c.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("spawn berth")
    }

    /// Runs berth, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "berth {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs berth, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "berth {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("berth {args:?}: bad JSON {e}: {out}"))
    }

    /// Exit code of `berth exec <ct> -- argv...`, with its stdout.
    pub fn exec(&self, ct: &str, argv: &[&str]) -> (i32, String, String) {
        let mut a = vec!["exec", ct, "--"];
        a.extend_from_slice(argv);
        let o = self.run(&a);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// `status --json`'s CT object.
    pub fn status(&self, ct: &str) -> serde_json::Value {
        let v = self.json(&["status", ct]);
        assert_eq!(v["schema_version"], 1, "{v}");
        v["ct"].clone()
    }

    /// The CT objects of `list --json` with `args`.
    pub fn list(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut a = vec!["list"];
        a.extend_from_slice(args);
        let v = self.json(&a);
        assert_eq!(v["schema_version"], 1, "{v}");
        v["cts"]
            .as_array()
            .unwrap_or_else(|| panic!("berth {a:?}: no cts array: {v}"))
            .clone()
    }

    /// CT `ct`'s value of one `list` field (`list <ct> -o <field> --json`): the one leaf of the
    /// object, whatever its nesting.
    pub fn list_field(&self, ct: &str, field: &str) -> serde_json::Value {
        let rows = self.list(&[ct, "-o", field]);
        assert_eq!(rows.len(), 1, "list {ct}: {rows:?}");
        let mut v = &rows[0];
        while let Some(o) = v.as_object() {
            assert_eq!(o.len(), 1, "list {ct} -o {field}: {}", rows[0]);
            v = o.values().next().unwrap();
        }
        v.clone()
    }

    /// Every cgroup directory this installation owns, in any hierarchy.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        cgroup_roots()
            .into_iter()
            .map(|r| r.join(&self.cgroup_parent))
            .flat_map(|p| {
                let mut v = Vec::new();
                if let Ok(rd) = std::fs::read_dir(&p) {
                    for e in rd.flatten() {
                        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                            v.push(e.path());
                        }
                    }
                }
                v
            })
            .collect()
    }

    /// Mounts below this installation's root.
    pub fn mounts(&self) -> Vec<String> {
        let root = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|mp| mp.starts_with(&root))
            .collect()
    }

    /// Asserts no CT cgroup, mount or process is left.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.cgroup_dirs(),
            Vec::<PathBuf>::new(),
            "leftover cgroups"
        );
        assert_eq!(self.mounts(), Vec::<String>::new(), "leftover mounts");
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Best effort even after a failed assertion: stop what runs, then drop our cgroup parents.
        if let Ok(rd) = std::fs::read_dir(self.root.join("conf")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().replace(".toml", "");
                let _ = self.run(&["stop", "--fast", &n]);
                let _ = self.run(&["umount", &n]);
            }
        }
        let _ = self.run(&["gc"]);
        for r in cgroup_roots() {
            let _ = std::fs::remove_dir(r.join(&self.cgroup_parent));
        }
        if self.bpffs.exists() {
            let _ = std::fs::remove_dir_all(&self.bpffs);
        }
    }
}
