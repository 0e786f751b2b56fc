//! `bench checkpoint`: downtime of `berth checkpoint` + `berth restore` of a busybox CT whose
//! process holds 200 MB of anonymous memory, against CRIU alone dumping and restoring a plain
//! process tree holding the same memory (no namespaces, no berth), interleaved round by round
//! so both see the same machine. The downtime is from the start of `checkpoint` to the end of
//! `restore` (whole CLI processes, release build); CRIU's own dump time is printed next to it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::start::{Install, quiet};
use crate::stats::{ms, summarize};

#[derive(Args)]
pub struct CheckpointArgs {
    /// Measured rounds (after one warm-up round).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Anonymous memory the CT's process holds, in MiB.
    #[arg(long, default_value_t = 200)]
    mib: u64,
    /// Where the images go (default: a directory on /run, i.e. memory, as a live migration
    /// streams them; give a disk path to include writing them out).
    #[arg(long)]
    images: Option<PathBuf>,
}

const CT: &str = "901";

pub fn run(a: &CheckpointArgs) -> Result<()> {
    crate::require_root("checkpoint", "namespaces, cgroups, CRIU")?;
    let criu = berth_runtime::container::checkpoint::criu_available()
        .map_err(|e| anyhow::anyhow!("checkpoint benchmark: CRIU unavailable: {e}"))?;
    let bin = berth_tests::ct::bin_dir().join("berth");
    if !bin.exists() {
        bail!(
            "{} missing: `cargo xtask bench checkpoint` builds it",
            bin.display()
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("berth-bench-ckpt-")
        .tempdir()?;
    let inst = Install::new(&bin, tmp.path(), "");
    let images = a
        .images
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/berth-bench-ckpt-{}", std::process::id())));
    let res = rounds(&inst, &criu, &images, a);
    let _ = inst.cmd(&["stop", "--fast", CT]).output();
    let _ = inst.cmd(&["destroy", CT]).output();
    inst.cleanup();
    let _ = std::fs::remove_dir_all(&images);
    res
}

fn hog(mib: u64) -> String {
    // dd's buffer is filled from /dev/zero (every page written, so resident), then dd blocks
    // forever writing it into a pipe nobody reads.
    format!("dd if=/dev/zero bs={mib}M count=1 2>/dev/null | sleep 1000000")
}

fn rounds(inst: &Install, criu: &Path, images: &Path, a: &CheckpointArgs) -> Result<()> {
    quiet(&mut inst.cmd(&["template", "build", "busybox"]))?;
    quiet(&mut inst.cmd(&["create", CT, "--template", "busybox"]))?;
    let upper = inst.root.join("private").join(CT).join("upper/etc");
    std::fs::create_dir_all(&upper)?;
    let rc = upper.join("rc.local");
    std::fs::write(
        &rc,
        format!("#!/bin/sh\n({}) </dev/null >/dev/null 2>&1 &\n", hog(a.mib)),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o755))?;
    quiet(&mut inst.cmd(&["start", CT]))?;
    wait_resident(inst, a.mib)?;

    let (mut berth, mut dumps, mut control) = (Vec::new(), Vec::new(), Vec::new());
    let img = images.join("ct");
    let raw = images.join("raw");
    for round in 0..=a.rounds {
        let t0 = Instant::now();
        let out = inst
            .cmd(&[
                "checkpoint",
                CT,
                "--dir",
                img.to_str().unwrap_or_default(),
                "--json",
            ])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("berth checkpoint: {}", String::from_utf8_lossy(&out.stderr));
        }
        quiet(&mut inst.cmd(&["restore", CT, "--dir", img.to_str().unwrap_or_default()]))?;
        let down = t0.elapsed();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let dump = Duration::from_millis(v["dump_ms"].as_u64().unwrap_or(0));
        let bytes = v["bytes"].as_u64().unwrap_or(0);
        let c = raw_criu(criu, &raw, a.mib)?;
        println!(
            "round {round}{}: berth {:.0} ms (CRIU dump {:.0} ms, {} MiB of images), CRIU alone {:.0} ms",
            if round == 0 { " (warm-up)" } else { "" },
            ms(down),
            ms(dump),
            bytes >> 20,
            ms(c)
        );
        if round > 0 {
            berth.push(down);
            dumps.push(dump);
            control.push(c);
        }
    }
    let (b, d, c) = (summarize(berth), summarize(dumps), summarize(control));
    println!(
        "checkpoint+restore of a busybox CT holding {} MiB, {} rounds:",
        a.mib, a.rounds
    );
    println!(
        "  berth (CLI to CLI): p50 {:.0} ms  min {:.0}  max {:.0}",
        ms(b.p50),
        ms(b.min),
        ms(b.max)
    );
    println!(
        "    of which CRIU dump: p50 {:.0} ms  min {:.0}  max {:.0}",
        ms(d.p50),
        ms(d.min),
        ms(d.max)
    );
    println!(
        "  control, CRIU alone on a plain process tree: p50 {:.0} ms  min {:.0}  max {:.0}",
        ms(c.p50),
        ms(c.min),
        ms(c.max)
    );
    println!(
        "  ratio berth / control (p50): {:.2}",
        b.p50.as_secs_f64() / c.p50.as_secs_f64()
    );
    Ok(())
}

/// Waits until the CT's memory cgroup holds the hog.
fn wait_resident(inst: &Install, mib: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used: u64 = berth_tests::ct::cgroup_roots()
            .iter()
            .flat_map(|r| {
                let d = r.join(&inst.cg_parent).join(CT);
                ["memory.usage_in_bytes", "memory.current"].map(|f| d.join(f))
            })
            .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
            .unwrap_or(0);
        if used >= mib << 20 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the CT's process did not get {mib} MiB resident (cgroup has {used} bytes)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CRIU alone: dump (which ends the tree) and restore a session of its own holding `mib` MiB.
fn raw_criu(criu: &Path, dir: &Path, mib: u64) -> Result<Duration> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let child = Command::new("setsid")
        .args(["sh", "-c", &hog(mib)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn the control's process tree")?;
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tree_rss_kib(pid) < mib << 10 {
        if Instant::now() > deadline {
            bail!("the control's process did not get {mib} MiB resident");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The tree's PIDs must be free again for the restore: the dumped tasks' orphans come to
    // this process (a subreaper) to be reaped at once, not to a PID 1 that may reap late.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let mut pids = vec![pid];
    pids.extend(
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok()),
    );
    let pidfile = dir.join("pid");
    let t0 = Instant::now();
    let dumped = quiet(
        Command::new(criu)
            .args(["dump", "-t", &pid.to_string(), "-D"])
            .arg(dir)
            .args(["-o", "dump.log"]),
    );
    // The dumped shell was our child: reap it (CRIU killed it).
    let mut child = child;
    let _ = child.wait();
    dumped?;
    reap_until_gone(&pids)?;
    quiet(
        Command::new(criu)
            .args(["restore", "-d", "-D"])
            .arg(dir)
            .args(["-o", "restore.log", "--pidfile"])
            .arg(&pidfile),
    )?;
    let took = t0.elapsed();
    // The restored tree keeps its PIDs and its own process group.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    reap_until_gone(&pids)?;
    Ok(took)
}

/// Reaps this process's children until none of `pids` exists any more.
fn reap_until_gone(pids: &[i32]) -> Result<()> {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        while let Ok(ws) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if ws == nix::sys::wait::WaitStatus::StillAlive {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the control's processes {pids:?} did not go away");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Resident KiB of `pid` and its children (one level: sh, dd, sleep).
fn tree_rss_kib(pid: i32) -> u64 {
    let rss = |p: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let kids =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    rss(&pid.to_string()) + kids.split_whitespace().map(rss).sum::<u64>()
}
