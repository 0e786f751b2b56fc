//! `cargo xtask demo --stop`: everything `cargo xtask demo` made, taken down again — its
//! berthd (by the PID the demo recorded, nothing found by name), the demo CTs, the busybox
//! template, the `berth-demo` network namespace and, when the root holds no CT any more, the
//! datapath's pins, berth's parent cgroups and the root itself if the demo made it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{DEMO_NETNS, workspace_root};

/// Where the demo records the PID of the berthd it started (in the root).
pub const BERTHD_PID: &str = "berthd.pid";

/// What the demo makes under its root besides CTs.
const DEMO_FILES: &[&str] = &["berthd.log", BERTHD_PID];

/// Marks a root the demo created: only such a root is removed whole (with berthd's ledger);
/// in a root that existed before, the ledger is the hoster's and stays.
pub const OWN_ROOT: &str = ".berth-demo-root";

/// The datapath pins of an installation with the default --bpffs (what the demo uses).
const PIN_DIR: &str = "/sys/fs/bpf/berth/v2";

fn berth_bin(debug: bool) -> PathBuf {
    let t = workspace_root().join("target");
    let (first, second) = if debug {
        ("debug", "release")
    } else {
        ("release", "debug")
    };
    let p = t.join(first).join("berth");
    if p.exists() {
        p
    } else {
        t.join(second).join("berth")
    }
}

pub fn stop(root: &Path, debug: bool) -> Result<()> {
    let bin = berth_bin(debug);
    anyhow::ensure!(
        bin.exists(),
        "{} missing: nothing to stop with (build it first)",
        bin.display()
    );
    stop_berthd(root)?;

    let netns = PathBuf::from(format!("/run/netns/{DEMO_NETNS}"));
    // In the demo's namespace, as the demo ran them: the CTs' host sides live there.
    let berth = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("--root").arg(root).args(args);
        if netns.exists() {
            crate::enter_netns(&mut c, netns.clone());
        }
        eprintln!("xtask: berth {}", args.join(" "));
        c.status()
            .with_context(|| format!("run {}", bin.display()))
            .map(|s| s.success())
    };
    for (ctid, name) in [("101", "demo1"), ("102", "demo2")] {
        let conf = root.join("conf").join(format!("{ctid}.toml"));
        let Ok(text) = std::fs::read_to_string(&conf) else {
            continue;
        };
        // Only the demo's own CTs: a CT 101 the hoster made is left alone.
        if !text.contains(&format!("name = \"{name}\"")) {
            eprintln!("xtask: CT {ctid} is not the demo's ({name}): left alone");
            continue;
        }
        berth(&["stop", "--fast", ctid])?;
        anyhow::ensure!(berth(&["destroy", ctid])?, "destroy CT {ctid} failed");
    }
    // In use by CTs of the hoster's own: kept (berth refuses, and says so).
    let _ = berth(&["template", "remove", "busybox"])?;
    let _ = berth(&["gc"])?;

    if netns.exists() {
        crate::run(Command::new("ip").args(["netns", "del", DEMO_NETNS]))?;
    }
    let cts_left = std::fs::read_dir(root.join("conf"))
        .map(|rd| {
            rd.flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "toml"))
        })
        .unwrap_or(false);
    if cts_left {
        eprintln!(
            "xtask: {} still holds CTs: datapath pins and the root are kept",
            root.display()
        );
        return Ok(());
    }
    // berth's parent cgroup (the default `berth`) under every hierarchy: rmdir only, which
    // the kernel refuses while any CT cgroup is still inside.
    let mut parents = vec![PathBuf::from("/sys/fs/cgroup/berth")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        parents.extend(rd.flatten().map(|e| e.path().join("berth")));
    }
    for p in parents.iter().filter(|p| p.is_dir()) {
        if let Err(e) = std::fs::remove_dir(p) {
            eprintln!("xtask: cgroup {} kept: {e}", p.display());
        }
    }
    if Path::new(PIN_DIR).exists() {
        std::fs::remove_dir_all(PIN_DIR).with_context(|| format!("remove {PIN_DIR}"))?;
        // The parent `berth` directory, if the demo's version was all it held.
        let _ = std::fs::remove_dir(Path::new(PIN_DIR).parent().expect("a parent"));
    }
    if root.join(OWN_ROOT).exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("remove {}", root.display()))?;
    } else {
        for f in DEMO_FILES {
            let _ = std::fs::remove_file(root.join(f));
        }
        remove_empty_tree(root);
        if root.exists() {
            eprintln!(
                "xtask: {} existed before the demo: its ledger and other files are kept",
                root.display()
            );
        }
    }
    eprintln!("xtask: demo stopped and removed");
    Ok(())
}

/// Ends the berthd the demo started, if that PID still is a berthd of this root.
fn stop_berthd(root: &Path) -> Result<()> {
    let pid_file = root.join(BERTHD_PID);
    let Ok(text) = std::fs::read_to_string(&pid_file) else {
        return Ok(());
    };
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{}: not a PID", pid_file.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.first().is_some_and(|a| a.ends_with(b"berthd"))
        && args.windows(2).any(|w| {
            w[0] == b"--root" && Path::new(std::str::from_utf8(w[1]).unwrap_or("")) == root
        });
    if !ours {
        eprintln!("xtask: PID {pid} is no longer the demo's berthd");
        return Ok(());
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    eprintln!("xtask: stopping berthd (PID {pid})");
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let t0 = Instant::now();
    while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Removes `dir` and its subdirectories if they hold no file at all.
fn remove_empty_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
