//! `bench migrate`: the downtime `berth migrate` prints (freeze → running on the target)
//! between two "hosts" on this machine (network namespaces with installations of their own,
//! the target's sshd started here; see `berth_tests::migrate`), release build:
//! - offline, a busybox CT with 1 GiB of files of which 10 MiB change while the copy passes
//!   run; control: a restart of the same CT in place (`stop --fast` + `start`), the downtime
//!   a hoster has without migration.
//! - live, a busybox CT holding 200 MiB of anonymous memory; control: `checkpoint` + `restore`
//!   of it on one host (the same CRIU work without the transfer).
//!
//! Rounds alternate migration and control on the same machine state.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;

use berth_tests::ct::TestHost;
use berth_tests::migrate::{Bed, missing_tools};

use crate::stats::{ms, summarize};

#[derive(Args)]
pub struct MigrateArgs {
    /// Measured rounds of each kind.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Files of the offline CT, in MiB.
    #[arg(long, default_value_t = 1024)]
    files_mib: u64,
    /// MiB changed while the passes run.
    #[arg(long, default_value_t = 10)]
    change_mib: u64,
    /// Anonymous memory of the live CT, in MiB.
    #[arg(long, default_value_t = 200)]
    mem_mib: u64,
    /// Skip the live half (no CRIU here).
    #[arg(long)]
    offline_only: bool,
}

pub fn run(a: &MigrateArgs) -> Result<()> {
    crate::require_root("migrate", "namespaces, cgroups, sshd, CRIU")?;
    if let Some(why) = missing_tools() {
        bail!("migrate benchmark: {why}");
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load before: {}", load.trim());
    offline(a)?;
    if !a.offline_only {
        match berth_runtime::container::checkpoint::criu_available() {
            Ok(_) => live(a)?,
            Err(e) => println!("live: skipped, CRIU unavailable: {e}"),
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load after: {}", load.trim());
    Ok(())
}

fn ok(h: &TestHost, args: &[&str]) -> Result<String> {
    let o = h.run(args);
    if !o.status.success() {
        bail!(
            "berth {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn migrate(bed: &Bed, ct: &str, extra: &[&str]) -> Result<serde_json::Value> {
    let mut e = vec!["--json", "--remove-source"];
    e.extend_from_slice(extra);
    let o = bed.migrate(ct, &e);
    if !o.status.success() {
        bail!("migrate: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// Starts and removes a CT on the target first: a node that takes migrations has its datapath
/// loaded already, and the first start of a fresh installation would add that load to the
/// measured downtime.
fn warm_target(bed: &Bed) -> Result<()> {
    ok(&bed.dst, &["create", "959", "--ipadd", "192.0.2.99"])?;
    ok(&bed.dst, &["start", "959"])?;
    ok(&bed.dst, &["stop", "--fast", "959"])?;
    ok(&bed.dst, &["destroy", "959"])?;
    Ok(())
}

fn rc_local(h: &TestHost, ct: &str, body: &str) -> Result<()> {
    let rc = h.root.join("private").join(ct).join("upper/etc/rc.local");
    std::fs::create_dir_all(rc.parent().unwrap())?;
    std::fs::write(&rc, format!("#!/bin/sh\n{body}\n"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Fills `dir` with `mib` MiB in 8 MiB files of data rsync cannot skip (not zeros).
fn fill(dir: &std::path::Path, mib: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut block = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    for i in 0..mib.div_ceil(8) {
        block[..8].copy_from_slice(&i.to_le_bytes());
        std::fs::write(dir.join(format!("f{i:04}")), &block)?;
    }
    Ok(())
}

fn offline(a: &MigrateArgs) -> Result<()> {
    let (mut down, mut control) = (Vec::new(), Vec::new());
    let ct = "951";
    for round in 1..=a.rounds {
        let bed = Bed::new();
        warm_target(&bed)?;
        ok(&bed.src, &["create", ct, "--ipadd", "192.0.2.95"])?;
        let data = bed.src.root.join("private").join(ct).join("upper/data");
        fill(&data, a.files_mib)?;
        // The change: once the passes have begun, a process rewrites change_mib MiB.
        rc_local(
            &bed.src,
            ct,
            &format!(
                "(sleep 2; dd if=/dev/urandom of=/data/changed bs=1M count={} 2>/dev/null) \
                 </dev/null >/dev/null 2>&1 &",
                a.change_mib
            ),
        )?;
        ok(&bed.src, &["start", ct])?;
        let t = Instant::now();
        ok(&bed.src, &["stop", "--fast", ct])?;
        ok(&bed.src, &["start", ct])?;
        let c = t.elapsed();
        let t = Instant::now();
        let r = migrate(&bed, ct, &[])?;
        let total = t.elapsed();
        let d = Duration::from_millis(r["downtime_ms"].as_u64().unwrap_or(0));
        println!(
            "offline round {round}: downtime {:.0} ms ({} passes, steps {}, final pass {} KiB, \
             whole command {:.1} s); control restart in place {:.0} ms",
            ms(d),
            r["passes"],
            r["steps_ms"],
            r["final_bytes"].as_u64().unwrap_or(0) >> 10,
            total.as_secs_f64(),
            ms(c)
        );
        down.push(d);
        control.push(c);
        let _ = bed.dst.run(&["stop", "--fast", ct]);
        let _ = bed.dst.run(&["destroy", ct]);
    }
    report(
        &format!(
            "offline migration, {} MiB of files, {} MiB changed during the passes (bar ≤ 2000 ms)",
            a.files_mib, a.change_mib
        ),
        "restart in place",
        down,
        control,
    );
    Ok(())
}

fn live(a: &MigrateArgs) -> Result<()> {
    let (mut down, mut control) = (Vec::new(), Vec::new());
    let ct = "952";
    for round in 1..=a.rounds {
        let bed = Bed::shared_cgroups();
        warm_target(&bed)?;
        ok(&bed.src, &["create", ct, "--ipadd", "192.0.2.96"])?;
        rc_local(
            &bed.src,
            ct,
            &format!(
                "(dd if=/dev/zero bs={}M count=1 2>/dev/null | sleep 1000000) \
                 </dev/null >/dev/null 2>&1 &",
                a.mem_mib
            ),
        )?;
        ok(&bed.src, &["start", ct])?;
        std::thread::sleep(Duration::from_secs(2));
        let dir = bed.src.root.join("dump").join("bench");
        let t = Instant::now();
        ok(
            &bed.src,
            &["checkpoint", ct, "--dir", dir.to_str().unwrap_or_default()],
        )?;
        ok(
            &bed.src,
            &["restore", ct, "--dir", dir.to_str().unwrap_or_default()],
        )?;
        let c = t.elapsed();
        let r = migrate(&bed, ct, &["--live"])?;
        let d = Duration::from_millis(r["downtime_ms"].as_u64().unwrap_or(0));
        println!(
            "live round {round}: downtime {:.0} ms (steps {}); control checkpoint + restore in \
             place {:.0} ms",
            ms(d),
            r["steps_ms"],
            ms(c)
        );
        down.push(d);
        control.push(c);
        let _ = bed.dst.run(&["stop", "--fast", ct]);
        let _ = bed.dst.run(&["destroy", ct]);
    }
    report(
        &format!(
            "live migration, {} MiB of anonymous memory (bar ≤ 1500 ms)",
            a.mem_mib
        ),
        "checkpoint + restore in place",
        down,
        control,
    );
    Ok(())
}

fn report(what: &str, control_name: &str, down: Vec<Duration>, control: Vec<Duration>) {
    let (d, c) = (summarize(down), summarize(control));
    println!("{what}:");
    println!(
        "  downtime: p50 {:.0} ms  min {:.0}  max {:.0}",
        ms(d.p50),
        ms(d.min),
        ms(d.max)
    );
    println!(
        "  control, {control_name}: p50 {:.0} ms  min {:.0}  max {:.0}",
        ms(c.p50),
        ms(c.min),
        ms(c.max)
    );
    println!(
        "  ratio migration / control (p50): {:.2}",
        d.p50.as_secs_f64() / c.p50.as_secs_f64()
    );
}
