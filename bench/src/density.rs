//! `bench density`: N running routed busybox CTs (issue 19's density bars), in a network and
//! mount namespace of the benchmark's own (the start benchmark's setup: a veth end as the
//! uplink, v1 cgroup hierarchies only).
//!
//! Per-CT host overhead = the CT's monitor (the sum of /proc/PID/smaps_rollup `Pss` over the
//! monitors, divided by N) + the kernel memory the N CTs added: the delta of /proc/meminfo's
//! `SUnreclaim + KernelStack + PageTables + Percpu` between before the first measured start
//! and after the last, divided by N (reclaimable slab, dentries and inodes mostly, moves with
//! the other work on a shared machine and is shown apart). The same sum is read again after
//! `stop --all --fast` (and the kernel's deferred netns cleanup): what it gave back per CT is
//! the second, independent estimate. A warm-up CT runs first so that the datapath's fixed cost
//! (programs and maps, loaded once) is not charged to the CTs.
//!
//! Also: `berth start` p50 of the first and last 100 CTs (first/last 10 % below 1000), the
//! time of `berth stop --all --fast`, and berthd's `/metrics` p99 with all N running.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use berth_tests::berthd::{Berthd, BerthdArgs};
use clap::Args;

use crate::start::{Install, hide_unified_cgroup2, quiet};
use crate::stats::{ms, quantile};
use crate::verdict;

#[derive(Args)]
pub struct DensityArgs {
    /// Running CTs to measure.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=16000))]
    cts: u32,
    /// Sequential `/metrics` scrapes with all CTs running.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    scrapes: u32,
}

const MEM_BAR_KB: f64 = 1024.0;
const START_GROWTH_BAR: f64 = 1.3;
const STOP_ALL_BAR: Duration = Duration::from_secs(10);
const SCRAPE_P99_BAR_MS: f64 = 50.0;
const CTID_BASE: u32 = 10_000;
const WARMUP_CTID: &str = "9999";

/// /proc/meminfo, kB by field.
fn meminfo() -> Result<BTreeMap<String, i64>> {
    let s = std::fs::read_to_string("/proc/meminfo")?;
    Ok(s.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_string(), v.split_whitespace().next()?.parse().ok()?))
        })
        .collect())
}

/// The kernel memory that goes with a CT and not with the page cache: kB.
const KERNEL: [&str; 4] = ["SUnreclaim", "KernelStack", "PageTables", "Percpu"];

fn kernel_kb(m: &BTreeMap<String, i64>) -> i64 {
    KERNEL.iter().map(|k| m.get(*k).copied().unwrap_or(0)).sum()
}

fn used_kb(m: &BTreeMap<String, i64>) -> i64 {
    m.get("MemTotal").copied().unwrap_or(0) - m.get("MemAvailable").copied().unwrap_or(0)
}

fn field(m: &BTreeMap<String, i64>, k: &str) -> i64 {
    m.get(k).copied().unwrap_or(0)
}

/// A process's proportional set size, kB.
fn pss_kb(pid: i32) -> Result<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("smaps_rollup of {pid}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no Pss in {pid}'s smaps_rollup"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn ctid(i: u32) -> String {
    (CTID_BASE + i).to_string()
}

/// 198.18.0.0/15 minus the uplink's 198.18.0.1: 250 CTs per /24.
fn addr(i: u32) -> String {
    format!("198.18.{}.{}", 1 + i / 250, 2 + i % 250)
}

pub fn run(a: &DensityArgs) -> Result<()> {
    crate::require_root("density", "namespaces, cgroups, mounts")?;
    let bin = berth_tests::ct::bin_dir().join("berth");
    ensure!(
        bin.exists(),
        "{} missing: `cargo xtask bench density` builds it (or set BERTH_BIN_DIR)",
        bin.display()
    );
    let mon = berth_tests::ct::bin_dir().join("berth-mon");
    println!(
        "berth-mon next to berth: {}",
        if mon.exists() {
            "yes"
        } else {
            "NO (forked monitors)"
        }
    );
    hide_unified_cgroup2()?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare netns")?;
    quiet(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    quiet(Command::new("ip").args(["link", "add", "up0", "type", "veth", "peer", "name", "up1"]))?;
    quiet(Command::new("ip").args(["link", "set", "up1", "up"]))?;
    quiet(Command::new("ip").args(["addr", "add", "198.18.0.1/15", "dev", "up0"]))?;
    quiet(Command::new("ip").args(["link", "set", "up0", "up"]))?;
    let tmp = tempfile::Builder::new()
        .prefix("berth-bench-density-")
        .tempdir()?;
    let inst = Install::new(&bin, tmp.path(), "-density");
    let res = measure(&inst, a);
    // Whatever happened: nothing of ours runs or stays.
    let _ = quiet(&mut inst.cmd(&["stop", "--all", "--fast"]));
    let _ = quiet(&mut inst.cmd(&["gc"]));
    inst.cleanup();
    res
}

fn measure(inst: &Install, a: &DensityArgs) -> Result<()> {
    let n = a.cts;
    quiet(&mut inst.cmd(&["template", "build", "busybox"]))?;
    quiet(&mut inst.cmd(&[
        "create",
        WARMUP_CTID,
        "--template",
        "busybox",
        "--ipadd",
        "198.19.255.254",
    ]))?;
    quiet(&mut inst.cmd(&["start", WARMUP_CTID]))?;
    // Creates first, untimed: only the starts are measured, and only they add kernel state.
    for i in 0..n {
        quiet(&mut inst.cmd(&[
            "create",
            &ctid(i),
            "--template",
            "busybox",
            "--ipadd",
            &addr(i),
        ]))?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = meminfo()?;
    let load0 = loadavg();
    let mut starts = Vec::with_capacity(n as usize);
    let t_all = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        quiet(&mut inst.cmd(&["start", &ctid(i)]))?;
        starts.push(t.elapsed());
        if (i + 1) % 100 == 0 {
            eprintln!("{} started ({:.0} s)", i + 1, t_all.elapsed().as_secs_f64());
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = meminfo()?;
    let load1 = loadavg();

    let (mut mon_pss, mut init_pss, mut berth_mon) = (0i64, 0i64, 0u32);
    for i in 0..n {
        let (init, monitor) = pids(&inst.run_dir, &ctid(i))?;
        mon_pss += pss_kb(monitor)?;
        init_pss += pss_kb(init)?;
        if std::fs::read_link(format!("/proc/{monitor}/exe"))
            .is_ok_and(|e| e.file_name().is_some_and(|f| f == "berth-mon"))
        {
            berth_mon += 1;
        }
    }
    let nf = f64::from(n);
    let mon_kb = mon_pss as f64 / nf;
    let kern_kb = (kernel_kb(&after) - kernel_kb(&before)) as f64 / nf;

    // berthd at this size.
    let d = Berthd::start(
        &BerthdArgs {
            root: inst.root.clone(),
            run_dir: Some(inst.run_dir.clone()),
            cgroup_parent: inst.cg_parent.clone(),
            bpffs: inst.pin_dir.clone(),
        },
        0,
    )?;
    for _ in 0..3 {
        d.get("/metrics", &[])?;
    }
    let mut scrapes = Vec::with_capacity(a.scrapes as usize);
    for _ in 0..a.scrapes {
        let t = Instant::now();
        let r = d.get("/metrics", &[])?;
        scrapes.push(ms(t.elapsed()));
        ensure!(r.status == 200, "/metrics: HTTP {}", r.status);
    }
    d.kill()?;
    scrapes.sort_by(f64::total_cmp);

    let before_stop = meminfo()?;
    let t = Instant::now();
    quiet(&mut inst.cmd(&["stop", "--all", "--fast"]))?;
    let stop_all = t.elapsed();
    // The kernel frees network namespaces from a workqueue, after the stop returns.
    std::thread::sleep(Duration::from_secs(5));
    let after_stop = meminfo()?;
    let freed_kb = (kernel_kb(&before_stop) - kernel_kb(&after_stop)) as f64 / nf;
    let still: Vec<u32> = (0..n)
        .filter(|i| {
            inst.run_dir
                .join(format!("{}.state.json", ctid(*i)))
                .exists()
        })
        .collect();
    ensure!(
        still.is_empty(),
        "{} CTs still have run state after stop --all",
        still.len()
    );

    // Control, same run: some of the CTs again under the forked monitor (berth without a
    // berth-mon next to it), the monitor this replaced.
    let control = control_monitor_pss(inst, n.min(30))?;

    let k = if n >= 1000 { 100 } else { (n / 10).max(1) } as usize;
    let mut first: Vec<Duration> = starts[..k].to_vec();
    let mut last: Vec<Duration> = starts[starts.len() - k..].to_vec();
    first.sort();
    last.sort();
    let (p_first, p_last) = (quantile(&first, 0.5), quantile(&last, 0.5));
    let growth = p_last.as_secs_f64() / p_first.as_secs_f64();
    let per_ct = mon_kb + kern_kb;
    let delta = |f: &str| (field(&after, f) - field(&before, f)) as f64 / nf;

    println!(
        "BENCH density: {n} running routed busybox CTs (IPv4 only), berth-mon monitors: {berth_mon}/{n}"
    );
    println!("  load average: {load0} before starts, {load1} after");
    println!(
        "  monitor PSS {mon_kb:.0} kB/CT (CT init PSS {:.0} kB/CT, not counted)",
        init_pss as f64 / nf
    );
    println!(
        "  kernel (Δ SUnreclaim+KernelStack+PageTables+Percpu) {kern_kb:.0} kB/CT: SUnreclaim {:.0}, KernelStack {:.0}, PageTables {:.0}, Percpu {:.0}; freed at stop {freed_kb:.0} kB/CT",
        delta("SUnreclaim"),
        delta("KernelStack"),
        delta("PageTables"),
        delta("Percpu"),
    );
    println!(
        "  for reference: Δ SReclaimable {:.0} kB/CT, Δ (MemTotal-MemAvailable) {:.0} kB/CT",
        delta("SReclaimable"),
        (used_kb(&after) - used_kb(&before)) as f64 / nf
    );
    println!(
        "  host overhead {per_ct:.0} kB/CT (bar ≤ {MEM_BAR_KB:.0}): {}",
        verdict(per_ct <= MEM_BAR_KB)
    );
    println!(
        "  start p50 first {k}: {:.1} ms, last {k}: {:.1} ms, ratio {growth:.2} (bar ≤ {START_GROWTH_BAR}): {}",
        ms(p_first),
        ms(p_last),
        verdict(growth <= START_GROWTH_BAR)
    );
    println!(
        "  stop --all --fast of {} CTs: {:.2} s (bar ≤ {} s): {}",
        n + 1,
        stop_all.as_secs_f64(),
        STOP_ALL_BAR.as_secs(),
        verdict(stop_all <= STOP_ALL_BAR)
    );
    if let Some((c, kb)) = control {
        println!(
            "  control: forked monitor (no berth-mon) PSS {kb:.0} kB/CT over {c} CTs; berth-mon/forked {:.2}",
            mon_kb / kb
        );
    }
    let p99 = quantile(&scrapes, 0.99);
    println!(
        "  /metrics over {} scrapes: p50 {:.1} ms, p99 {p99:.1} ms (bar ≤ {SCRAPE_P99_BAR_MS} ms): {}",
        scrapes.len(),
        quantile(&scrapes, 0.5),
        verdict(p99 <= SCRAPE_P99_BAR_MS)
    );
    Ok(())
}

/// A running CT's init and monitor PIDs, from its run state.
fn pids(run_dir: &Path, ct: &str) -> Result<(i32, i32)> {
    let p = run_dir.join(format!("{ct}.state.json"));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
        .with_context(|| format!("parse {}", p.display()))?;
    let get = |k: &str| {
        v[k].as_i64()
            .map(|x| x as i32)
            .with_context(|| format!("{}: no {k}", p.display()))
    };
    Ok((get("init_pid")?, get("monitor_pid")?))
}

/// Starts the first `c` (stopped) CTs with a `berth` that has no `berth-mon` next to it and
/// returns their monitors' mean PSS, kB; stops them again. None if `c` is 0.
fn control_monitor_pss(inst: &Install, c: u32) -> Result<Option<(u32, f64)>> {
    if c == 0 {
        return Ok(None);
    }
    let dir = tempfile::Builder::new()
        .prefix("berth-bench-density-fork-")
        .tempdir()?;
    let bin = dir.path().join("berth");
    std::fs::hard_link(&inst.bin, &bin)
        .or_else(|_| std::fs::copy(&inst.bin, &bin).map(|_| ()))
        .context("berth into the control's directory")?;
    let fork = Install {
        bin,
        root: inst.root.clone(),
        run_dir: inst.run_dir.clone(),
        pin_dir: inst.pin_dir.clone(),
        cg_parent: inst.cg_parent.clone(),
    };
    let mut sum = 0i64;
    let res = (|| {
        for i in 0..c {
            quiet(&mut fork.cmd(&["start", &ctid(i)]))?;
            let (_, monitor) = pids(&inst.run_dir, &ctid(i))?;
            let exe = std::fs::read_link(format!("/proc/{monitor}/exe"))?;
            ensure!(
                exe.file_name().is_some_and(|f| f == "berth"),
                "control monitor runs {}",
                exe.display()
            );
            sum += pss_kb(monitor)?;
        }
        Ok(())
    })();
    let _ = quiet(&mut fork.cmd(&["stop", "--all", "--fast"]));
    res?;
    Ok(Some((c, sum as f64 / f64::from(c))))
}
