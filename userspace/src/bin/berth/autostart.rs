//! start --all-onboot / stop --all: the boot unit's verbs. Each CT is started or stopped by a
//! `berth start|stop <CTID>` child of its own, so the CTs of one level run in parallel with
//! nothing shared between them; a CT that fails does not hold up the others.

use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use berth_runtime::Ctid;
use berth_runtime::autostart;
use serde_json::json;

use crate::Ctx;

/// Runs `berth <verb> <CTID> [extra]` for every CT of a level at once; returns the failures.
fn run_level(ctx: &Ctx, verb: &str, level: &[Ctid], extra: &[&str]) -> Result<Vec<(Ctid, String)>> {
    let exe = std::env::current_exe().context("find the berth binary")?;
    let mut kids = Vec::new();
    for &c in level {
        let child = Command::new(&exe)
            .arg("--root")
            .arg(&ctx.host.root)
            .arg("--run-dir")
            .arg(&ctx.host.run)
            .arg("--cgroup-parent")
            .arg(&ctx.host.cgroup_parent)
            .arg("--bpffs")
            .arg(&ctx.pin_dir)
            .arg(verb)
            .arg(c.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {} {verb} {c}", exe.display()))?;
        kids.push((c, child));
    }
    let mut failed = Vec::new();
    for (c, child) in kids {
        let out = child
            .wait_with_output()
            .with_context(|| format!("wait for {verb} {c}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            failed.push((c, err));
        }
    }
    Ok(failed)
}

fn finish(ctx: &Ctx, verb: &str, done: Vec<Ctid>, failed: Vec<(Ctid, String)>) -> Result<u8> {
    let code = u8::from(!failed.is_empty());
    ctx.print(
        json!({
            verb: done,
            "failed": failed.iter().map(|(c, e)| json!({"ctid": c, "error": e})).collect::<Vec<_>>(),
        }),
        || {
            for c in &done {
                println!("CT {c} {verb}");
            }
            for (c, e) in &failed {
                println!("CT {c} failed: {e}");
            }
        },
    );
    Ok(code)
}

pub fn start_all_onboot(ctx: &Ctx) -> Result<u8> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for level in autostart::start_levels(&ctx.host)? {
        let todo: Vec<Ctid> = level
            .into_iter()
            .filter(|c| berth_runtime::container::running(&ctx.host, *c).is_none())
            .collect();
        let f = run_level(ctx, "start", &todo, &[])?;
        done.extend(todo.iter().filter(|c| !f.iter().any(|(x, _)| x == *c)));
        failed.extend(f);
    }
    finish(ctx, "started", done, failed)
}

pub fn stop_all(ctx: &Ctx, fast: bool) -> Result<u8> {
    let running: Vec<Ctid> = ctx
        .host
        .list_ctids()?
        .into_iter()
        .filter(|c| berth_runtime::container::running(&ctx.host, *c).is_some())
        .collect();
    let extra: &[&str] = if fast { &["--fast"] } else { &[] };
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for level in autostart::stop_levels(&ctx.host, &running)? {
        let f = run_level(ctx, "stop", &level, extra)?;
        done.extend(level.iter().filter(|c| !f.iter().any(|(x, _)| x == *c)));
        failed.extend(f);
    }
    finish(ctx, "stopped", done, failed)
}
