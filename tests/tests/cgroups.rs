//! Real-kernel tests of berth's cgroup layer (needs root). Each test works under its own parent
//! `berth-test-<pid>-<n>`, starts its processes inside it, and checks that teardown left no
//! directory in any hierarchy. Run: `cargo test -p berth-tests --test cgroups -- --test-threads=1`.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Result, ensure};
use berth_runtime::cgroups::{self, CgroupError, CgroupManager, Controller, Hierarchy, Resources};
use berth_runtime::{Ctid, Size};
use berth_tests::cgroups::{BUSYBOX, CTID, TestCgroup, cgroup2_mount, unique_parent, wait_for};
use berth_tests::skip::skip;

const BUSY_LOOP: &str = "while :; do :; done";

fn is_v1() -> bool {
    matches!(Hierarchy::detect(), Ok(Hierarchy::V1(_)))
}

#[test]
fn create_makes_a_directory_in_every_hierarchy() -> Result<()> {
    let t = TestCgroup::new()?;
    let hierarchy = Hierarchy::detect()?;
    let roots = hierarchy.mount_roots();
    let paths = t.cg.paths();
    ensure!(paths.len() == roots.len(), "{paths:?} vs {roots:?}");
    for (p, root) in paths.iter().zip(&roots) {
        ensure!(p.is_dir(), "{} missing", p.display());
        ensure!(
            *p == root.join(&t.parent).join(CTID.to_string()),
            "{} not <mount>/<parent>/<ctid>",
            p.display()
        );
    }
    // Idempotent.
    t.cg.create()?;
    if let Hierarchy::V1(m) = &hierarchy {
        // A cpuset cgroup starts with no CPUs; create() gave it the parent's.
        let cs = m.get(Controller::Cpuset).expect("cpuset mounted");
        let cpus = std::fs::read_to_string(cs.join(&t.parent).join("101/cpuset.cpus"))?;
        let root_cpus = std::fs::read_to_string(cs.join("cpuset.cpus"))?;
        ensure!(
            cpus == root_cpus && !cpus.trim().is_empty(),
            "cpuset.cpus {cpus:?}"
        );
    }
    t.finish()
}

#[test]
fn memory_limit_oom_kills_the_allocator() -> Result<()> {
    let t = TestCgroup::new()?;
    // Without active swap on the host, memory alone bounds the CT. With swap, --swap 0 makes
    // memsw the refusing counter, and kernel 6.18 does not count memsw.failcnt (measured).
    let host_swaps = std::fs::read_to_string("/proc/swaps")?.lines().count() > 1;
    t.cg.apply(&Resources {
        memory: Some(Size::Bytes(32 << 20)),
        swap: host_swaps.then_some(Size::Bytes(0)),
        ..Default::default()
    })?;
    let before = t.cg.stats()?;
    ensure!(before.memory_limit == Some(32 << 20), "{before:?}");
    // dd reads 64M from /dev/zero into one buffer: every page gets charged.
    let status = t
        .command(&[
            BUSYBOX,
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=64M",
            "count=1",
        ])
        .stderr(Stdio::null())
        .status()?;
    ensure!(
        status.signal() == Some(libc::SIGKILL),
        "dd past the limit was not OOM-killed: {status:?}"
    );
    let after = t.cg.stats()?;
    println!(
        "oom: oom_kills {} -> {}, failcnt {} -> {}",
        before.oom_kills, after.oom_kills, before.memory_failcnt, after.memory_failcnt
    );
    ensure!(after.oom_kills > before.oom_kills, "{after:?}");
    ensure!(
        host_swaps || after.memory_failcnt > before.memory_failcnt,
        "{after:?}"
    );
    // A small allocation under the limit still works.
    let ok = t
        .command(&[
            BUSYBOX,
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=8M",
            "count=1",
        ])
        .stderr(Stdio::null())
        .status()?;
    ensure!(ok.success(), "8M under a 32M limit failed: {ok:?}");
    t.finish()
}

#[test]
fn numproc_limit_makes_fork_fail_with_eagain() -> Result<()> {
    let t = TestCgroup::new()?;
    t.cg.apply(&Resources {
        numproc: Some(5),
        ..Default::default()
    })?;
    // The shell is task 1; sleeps 1-4 fit, the 5th fork must fail.
    let out = t
        .command(&[
            BUSYBOX,
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8; do /bin/busybox sleep 60 >/dev/null 2>&1 & echo started $i; done",
        ])
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("numproc: stdout {stdout:?} stderr {stderr:?}");
    ensure!(
        stderr.contains("Resource temporarily unavailable"),
        "fork past pids.max did not fail with EAGAIN: {stderr:?}"
    );
    ensure!(stdout.lines().count() == 4, "expected 4 forks: {stdout:?}");
    let s = t.cg.stats()?;
    ensure!(s.numproc == 4 && s.numproc_limit == Some(5), "{s:?}");
    ensure!(s.numproc_failcnt >= 1, "{s:?}");
    t.finish()
}

#[test]
fn cpulimit_50_holds_within_20_percent() -> Result<()> {
    let mut t = TestCgroup::new()?;
    // Two busy loops want 200 %; high cpuunits keeps other load on the host from starving them.
    t.cg.apply(&Resources {
        cpuunits: Some(100_000),
        cpulimit: Some(50),
        ..Default::default()
    })?;
    t.spawn_sh(BUSY_LOOP)?;
    t.spawn_sh(BUSY_LOOP)?;
    std::thread::sleep(Duration::from_millis(300));
    let share = t.cpu_share_over(Duration::from_secs(2))?;
    let s = t.cg.stats()?;
    println!(
        "cpulimit=50: measured {:.1} % of one CPU over 2 s (throttled {}/{} periods)",
        share * 100.0,
        s.nr_throttled,
        s.nr_periods
    );
    ensure!((0.40..=0.60).contains(&share), "cpu share {share:.3}");
    ensure!(
        s.nr_throttled > 0 && s.cpu_quota_us == Some(50_000),
        "{s:?}"
    );
    t.finish()
}

#[test]
fn live_apply_takes_effect_on_running_processes() -> Result<()> {
    let mut t = TestCgroup::new()?;
    t.cg.apply(&Resources {
        cpuunits: Some(100_000),
        cpulimit: Some(50),
        ..Default::default()
    })?;
    t.spawn_sh(BUSY_LOOP)?;
    t.spawn_sh(BUSY_LOOP)?;
    std::thread::sleep(Duration::from_millis(300));
    let at50 = t.cpu_share_over(Duration::from_secs(1))?;
    t.cg.apply(&Resources {
        cpulimit: Some(20),
        cpus: Some(0),
        memory: Some(Size::Bytes(256 << 20)),
        numproc: Some(50),
        ..Default::default()
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let at20 = t.cpu_share_over(Duration::from_secs(2))?;
    println!(
        "live apply: {:.1} % at cpulimit=50 -> {:.1} % at cpulimit=20",
        at50 * 100.0,
        at20 * 100.0
    );
    ensure!((0.16..=0.24).contains(&at20), "after live apply: {at20:.3}");
    let s = t.cg.stats()?;
    ensure!(s.cpu_quota_us == Some(20_000), "{s:?}");
    ensure!(s.memory_limit == Some(256 << 20), "{s:?}");
    ensure!(s.numproc_limit == Some(50) && s.numproc >= 2, "{s:?}");
    // --cpus caps the quota: 1 CPU with cpulimit 150 → 100 %.
    t.cg.apply(&Resources {
        cpulimit: Some(150),
        cpus: Some(1),
        numproc: Some(0),
        memory: Some(Size::Unlimited),
        ..Default::default()
    })?;
    let s = t.cg.stats()?;
    ensure!(s.cpu_quota_us == Some(100_000), "{s:?}");
    ensure!(
        s.numproc_limit.is_none() && s.memory_limit.is_none(),
        "{s:?}"
    );
    let capped = t.cpu_share_over(Duration::from_secs(1))?;
    println!("cpus=1 cpulimit=150: {:.1} %", capped * 100.0);
    ensure!(capped <= 1.2, "cpus=1 let {capped:.2} CPUs through");
    t.finish()
}

#[test]
fn lowering_memory_below_usage_is_a_readable_error() -> Result<()> {
    if !is_v1() {
        skip(
            "lowering_memory_below_usage_is_a_readable_error",
            "v2 memory.max reclaims or OOM-kills instead of failing with EBUSY",
        );
        return Ok(());
    }
    let mut t = TestCgroup::new()?;
    // dd holds its 40M buffer while blocked writing into a pipe nobody reads.
    t.spawn_sh("/bin/busybox dd if=/dev/zero bs=40M count=1 2>/dev/null | /bin/busybox sleep 60")?;
    ensure!(
        wait_for(Duration::from_secs(10), || t
            .cg
            .stats()
            .is_ok_and(|s| s.memory_usage > 38 << 20)),
        "dd never charged 40M"
    );
    let e =
        t.cg.apply(&Resources {
            memory: Some(Size::Bytes(8 << 20)),
            ..Default::default()
        })
        .unwrap_err();
    println!("EBUSY: {e}");
    ensure!(matches!(e, CgroupError::MemoryBelowUsage { .. }), "{e:?}");
    ensure!(
        e.to_string()
            .starts_with("write memory.limit_in_bytes = 8M in /"),
        "{e}"
    );
    // Nothing was lowered: the limit is still unlimited and the process lives.
    let s = t.cg.stats()?;
    ensure!(s.memory_limit.is_none() && s.numproc == 3, "{s:?}");
    t.finish()
}

#[test]
fn swap_sets_memsw_to_memory_plus_swap() -> Result<()> {
    let t = TestCgroup::new()?;
    let r = Resources {
        memory: Some(Size::Bytes(128 << 20)),
        swap: Some(Size::Bytes(64 << 20)),
        ..Default::default()
    };
    match t.cg.apply(&r) {
        Ok(()) => {}
        Err(CgroupError::Unsupported { what }) => {
            skip("swap_sets_memsw_to_memory_plus_swap", &what);
            return t.finish();
        }
        Err(e) => return Err(e.into()),
    }
    let s = t.cg.stats()?;
    ensure!(
        s.memory_limit == Some(128 << 20) && s.swap_limit == Some(64 << 20),
        "{s:?}"
    );
    // Raising memory keeps the swap amount.
    t.cg.apply(&Resources {
        memory: Some(Size::Bytes(512 << 20)),
        ..Default::default()
    })?;
    let s = t.cg.stats()?;
    ensure!(
        s.memory_limit == Some(512 << 20) && s.swap_limit == Some(64 << 20),
        "{s:?}"
    );
    t.finish()
}

#[test]
fn freeze_stops_and_thaw_resumes() -> Result<()> {
    let mut t = TestCgroup::new()?;
    // High cpuunits: the thawed loop must get CPU even while the host is busy.
    t.cg.apply(&Resources {
        cpuunits: Some(100_000),
        ..Default::default()
    })?;
    t.spawn_sh(BUSY_LOOP)?;
    std::thread::sleep(Duration::from_millis(200));
    ensure!(!t.cg.is_frozen()?);
    t.cg.freeze()?;
    ensure!(t.cg.is_frozen()? && t.cg.stats()?.frozen);
    let frozen = t.cpu_share_over(Duration::from_millis(500))?;
    t.cg.thaw()?;
    ensure!(!t.cg.is_frozen()?);
    let thawed = t.cpu_share_over(Duration::from_millis(500))?;
    println!(
        "freeze: {:.2} % CPU frozen, {:.1} % thawed",
        frozen * 100.0,
        thawed * 100.0
    );
    ensure!(frozen < 0.01, "frozen cgroup used {frozen:.3} CPU");
    ensure!(thawed > 0.3, "thawed cgroup used only {thawed:.3} CPU");
    t.finish()
}

#[test]
fn kill_all_leaves_no_process() -> Result<()> {
    let mut t = TestCgroup::new()?;
    t.spawn_sh("for i in 1 2 3 4 5; do /bin/busybox sleep 300 & done; wait")?;
    // Forks continuously: kill_all must not lose a race against new children.
    t.spawn_sh("while :; do /bin/busybox true; done")?;
    t.spawn(&[BUSYBOX, "sleep", "300"])?;
    ensure!(
        wait_for(Duration::from_secs(5), || t
            .cg
            .pids()
            .is_ok_and(|p| p.len() >= 8)),
        "processes did not start: {:?}",
        t.cg.pids()?
    );
    let started = t.cg.pids()?;
    let begin = std::time::Instant::now();
    t.cg.kill_all(Duration::from_secs(10))?;
    println!(
        "kill_all: {} processes gone in {:?}",
        started.len(),
        begin.elapsed()
    );
    ensure!(t.cg.pids()?.is_empty());
    for p in started {
        // Gone, or at most a zombie waiting for its parent (us or init) to reap it.
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        ensure!(
            status.is_empty() || status.contains("State:\tZ"),
            "pid {p} survived: {status}"
        );
    }
    ensure!(!t.cg.is_frozen()?, "kill_all left the cgroup frozen");
    t.finish()
}

#[test]
fn destroy_refuses_while_processes_remain() -> Result<()> {
    let mut t = TestCgroup::new()?;
    let pid = t.spawn(&[BUSYBOX, "sleep", "300"])?;
    let e = t.cg.destroy().unwrap_err();
    println!("destroy with a process inside: {e}");
    ensure!(
        matches!(&e, CgroupError::Busy { pids, .. } if pids == &[pid]),
        "{e:?}"
    );
    ensure!(
        t.cg.paths().iter().all(|p| p.is_dir()),
        "destroy removed something"
    );
    t.finish()
}

#[test]
fn devices_allow_only_the_basic_set() -> Result<()> {
    if !is_v1() {
        skip(
            "devices_allow_only_the_basic_set",
            "v2 device filtering needs a BPF cgroup-device program (not attached by berth)",
        );
        return Ok(());
    }
    let t = TestCgroup::new()?;
    t.cg.setup_devices()?;
    let dev =
        t.cg.paths()
            .into_iter()
            .find(|p| p.join("devices.list").exists())
            .expect("devices hierarchy");
    let list = std::fs::read_to_string(dev.join("devices.list"))?;
    let mut got: Vec<&str> = list.lines().collect();
    got.sort_unstable();
    let mut want: Vec<&str> = cgroups::ALLOWED_DEVICES.iter().map(|(r, _)| *r).collect();
    want.sort_unstable();
    ensure!(got == want, "devices.list {got:?}");
    let sh = |script: &str| {
        t.command(&[BUSYBOX, "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
    };
    let ok = sh("echo x > /dev/null && /bin/busybox head -c 4 /dev/urandom > /dev/null")?;
    ensure!(ok.status.success(), "{ok:?}");
    // /dev/kmsg is c 1:11: not in the list.
    let denied = sh("/bin/busybox head -c 1 /dev/kmsg")?;
    let err = String::from_utf8_lossy(&denied.stderr);
    println!("devices: /dev/kmsg -> {err:?}");
    ensure!(
        !denied.status.success() && err.contains("Operation not permitted"),
        "{denied:?}"
    );
    t.finish()
}

#[test]
fn stats_reflect_settings_and_serialize() -> Result<()> {
    let mut t = TestCgroup::new()?;
    t.cg.apply(&Resources {
        memory: Some(Size::Bytes(64 << 20)),
        cpulimit: Some(30),
        numproc: Some(50),
        ..Default::default()
    })?;
    t.spawn(&[BUSYBOX, "sleep", "300"])?;
    t.spawn_sh("/bin/busybox dd if=/dev/zero of=/dev/null bs=1M count=200")?;
    std::thread::sleep(Duration::from_millis(300));
    let s = t.cg.stats()?;
    println!("stats: {}", serde_json::to_string(&s)?);
    ensure!(s.memory_limit == Some(64 << 20), "{s:?}");
    ensure!(
        s.cpu_quota_us == Some(30_000) && s.cpu_period_us == 100_000,
        "{s:?}"
    );
    ensure!(s.numproc_limit == Some(50) && s.numproc >= 1, "{s:?}");
    ensure!(
        s.memory_usage > 0 && s.memory_working_set <= s.memory_usage,
        "{s:?}"
    );
    ensure!(s.cpu_usage_ns > 0, "{s:?}");
    let json = serde_json::to_value(&s)?;
    ensure!(json["memory_limit"] == 64 << 20);
    t.finish()
}

#[test]
fn list_ctids_and_remove_parent() -> Result<()> {
    let hierarchy = Hierarchy::detect()?;
    let parent = unique_parent();
    let a = hierarchy.open(&parent, Ctid::new(7)?)?;
    let b = hierarchy.open(&parent, Ctid::new(1001)?)?;
    a.create()?;
    b.create()?;
    ensure!(cgroups::list_ctids(&parent)? == [Ctid::new(7)?, Ctid::new(1001)?]);
    // Not empty yet: kept.
    cgroups::remove_parent_if_empty(&parent)?;
    ensure!(a.paths()[0].parent().is_some_and(|p| p.is_dir()));
    a.destroy()?;
    b.destroy()?;
    // Destroying twice is fine.
    a.destroy()?;
    ensure!(cgroups::list_ctids(&parent)?.is_empty());
    cgroups::remove_parent_if_empty(&parent)?;
    for root in hierarchy.mount_roots() {
        ensure!(
            !root.join(&parent).exists(),
            "{} left",
            root.join(&parent).display()
        );
    }
    Ok(())
}

/// The v2 code path against the real kernel even on a v1/hybrid host: the cgroup2 hierarchy
/// (controller-less there) still has cgroup.procs, cgroup.freeze, cgroup.kill and cgroup.events.
#[test]
fn v2_core_files_in_the_cgroup2_hierarchy() -> Result<()> {
    let Some(mount) = cgroup2_mount() else {
        skip("v2_core_files_in_the_cgroup2_hierarchy", "no cgroup2 mount");
        return Ok(());
    };
    let mut t = TestCgroup::new_v2(&mount)?;
    t.spawn_sh(BUSY_LOOP)?;
    let pid = t.spawn(&[BUSYBOX, "sleep", "300"])?;
    ensure!(t.cg.pids()?.contains(&pid), "{:?}", t.cg.pids()?);
    let cg_line = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    ensure!(
        cg_line.contains(&format!("0::/{}/{CTID}", t.parent))
            || cg_line.contains(&format!("/{}/{CTID}\n", t.parent)),
        "{cg_line}"
    );
    t.cg.freeze()?;
    ensure!(t.cg.is_frozen()?);
    t.cg.thaw()?;
    ensure!(!t.cg.is_frozen()?);
    if !mount.join("cgroup.controllers").exists()
        || !std::fs::read_to_string(mount.join("cgroup.controllers"))?.contains("memory")
    {
        let e =
            t.cg.apply(&Resources {
                memory: Some(Size::Bytes(64 << 20)),
                ..Default::default()
            })
            .unwrap_err();
        println!("v2 without the memory controller: {e}");
        ensure!(
            e.to_string()
                .starts_with("unsupported: --memory: memory.max is absent")
        );
    }
    let s = t.cg.stats()?;
    ensure!(s.numproc == 2, "{s:?}");
    t.cg.kill_all(Duration::from_secs(10))?;
    ensure!(t.cg.pids()?.is_empty());
    t.finish()
}

#[test]
fn v2_unified_host_enables_controllers_for_the_ct() -> Result<()> {
    let Hierarchy::V2(root) = Hierarchy::detect()? else {
        skip(
            "v2_unified_host_enables_controllers_for_the_ct",
            "host is cgroup v1/hybrid (memory controller bound to v1); needs a unified v2 host",
        );
        return Ok(());
    };
    let t = TestCgroup::new()?;
    let enabled = std::fs::read_to_string(root.join(&t.parent).join("cgroup.subtree_control"))?;
    for c in ["cpu", "memory", "pids"] {
        ensure!(enabled.contains(c), "{c} not enabled: {enabled:?}");
    }
    t.cg.apply(&Resources {
        memory: Some(Size::Bytes(64 << 20)),
        swap: Some(Size::Bytes(0)),
        cpulimit: Some(50),
        numproc: Some(10),
        ..Default::default()
    })?;
    let dir = &t.cg.paths()[0];
    ensure!(std::fs::read_to_string(dir.join("memory.max"))?.trim() == (64u64 << 20).to_string());
    ensure!(std::fs::read_to_string(dir.join("cpu.max"))?.trim() == "50000 100000");
    ensure!(std::fs::read_to_string(dir.join("pids.max"))?.trim() == "10");
    t.finish()
}
