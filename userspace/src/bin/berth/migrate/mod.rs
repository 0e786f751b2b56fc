//! `berth migrate <CT> [user@]HOST`: preflight on the target, copy passes while the CT runs,
//! then the switch — offline: freeze, final pass, kill, start there; `--live`: CRIU dump, final
//! pass, images sent, restore there — and the source kept as `migrated` (or removed). A
//! failure after the switch began brings the source back (thawed, restored or restarted) and
//! takes the target's half-state away, keeping its copy of the files for a retry.

mod remote;
pub mod target;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use berth_runtime::Ctid;
use berth_runtime::container::{self, checkpoint as ckpt, migrate as mig};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::Ctx;
use crate::cli::MigrateArgs;
use remote::Remote;

/// How long each step of the switch took (ms), for the report.
type Steps = Vec<(&'static str, u64)>;

fn since(t: &mut Instant) -> u64 {
    let ms = t.elapsed().as_millis() as u64;
    *t = Instant::now();
    ms
}

/// A pass that sends less than this is the last one worth making while the CT runs.
const SMALL_DELTA: u64 = 1 << 20;

struct Plan<'a> {
    ctid: Ctid,
    cfg_text: String,
    remote: &'a Remote,
    private: PathBuf,
    target_private: PathBuf,
    target_images: PathBuf,
    progress: bool,
}

pub fn migrate(ctx: &mut Ctx, a: &MigrateArgs) -> Result<()> {
    let ctid = ctx.resolve(&a.ct)?;
    let (_cfg, was_running) = mig::prepare(&ctx.host, ctid)?;
    if a.live {
        if !was_running {
            bail!(
                "CT {ctid} is not running: --live moves a running CT (migrate it without --live)"
            );
        }
        ckpt::criu_available().map_err(|r| anyhow!("live migration unavailable: {r}"))?;
    }
    let remote = Remote::new(&a.dest, &a.ssh_opts, &a.remote_berth, &ctx.host.run)?;
    remote.connect()?;
    let cfg_text = std::fs::read_to_string(ctx.host.conf_path(ctid))
        .with_context(|| format!("reading {}", ctx.host.conf_path(ctid).display()))?;
    let private = ctx.host.private_dir(ctid);
    let bytes = du(&private);
    let mut args = vec![
        "preflight".to_string(),
        ctid.to_string(),
        "--bytes".into(),
        bytes.to_string(),
    ];
    if a.live {
        args.push("--live".into());
    }
    let pre = remote.target(&args, Some(cfg_text.as_bytes()))?;
    let path_of = |k: &str| -> Result<PathBuf> {
        pre[k]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("the target's preflight answered no {k}: {pre}"))
    };
    let ours = env!("CARGO_PKG_VERSION");
    if pre["version"].as_str() != Some(ours) {
        let _ = abort_target(&remote, ctid, false);
        bail!(
            "the target runs berth {} and this host {ours}: migrate between equal versions",
            pre["version"]
        );
    }
    let plan = Plan {
        ctid,
        cfg_text,
        remote: &remote,
        private,
        target_private: path_of("private_dir")?,
        target_images: path_of("images_dir")?,
        progress: !ctx.quiet && !ctx.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    ctx.notice(format!(
        "CT {ctid}: {} MiB of files to {}{}",
        bytes >> 20,
        a.dest,
        if pre["retry"] == true {
            " (a previous attempt's copy is there)"
        } else {
            ""
        }
    ));

    let passes = match copy_passes(&plan, a.max_passes, was_running) {
        Ok(p) => p,
        Err(e) => {
            let _ = abort_target(&remote, ctid, false);
            return Err(e.context("copying the CT's files (the CT runs on here)"));
        }
    };
    let t0 = Instant::now();
    let switched = if !was_running {
        switch_stopped(ctx, &plan)
    } else if a.live {
        switch_live(ctx, &plan)
    } else {
        switch_offline(ctx, &plan)
    };
    let (final_bytes, steps) = switched?;
    let downtime = t0.elapsed();
    let mark = mig::finish_source(&ctx.host, ctid, &a.dest, a.live, &mut ctx.hooks)
        .context("the CT runs on the target; recording it here")?;
    if a.remove_source {
        container::destroy(&ctx.host, ctid, &mut ctx.hooks)
            .context("the CT runs on the target; removing this host's copy")?;
    }
    let ms = downtime.as_millis() as u64;
    info!(%ctid, to = %a.dest, downtime_ms = ms, passes, "migrated");
    let how = if a.live { "live" } else { "offline" };
    ctx.print(
        json!({
            "ctid": ctid,
            "to": a.dest,
            "mode": how,
            "uuid": mark.uuid,
            "running": was_running,
            "passes": passes,
            "final_bytes": final_bytes,
            "dump_ms": steps.iter().find(|(n, _)| *n == "dump").map(|(_, ms)| *ms),
            "steps_ms": steps.iter().map(|(n, ms)| (n.to_string(), Value::from(*ms))).collect::<serde_json::Map<_, _>>(),
            "downtime_ms": if was_running { Value::from(ms) } else { Value::Null },
            "source": if a.remove_source { "removed" } else { "migrated" },
        }),
        || {
            if was_running {
                let detail: Vec<String> =
                    steps.iter().map(|(n, ms)| format!("{n} {ms}")).collect();
                println!(
                    "CT {ctid} migrated to {} ({how}): downtime {ms} ms ({}), {passes} passes",
                    a.dest,
                    detail.join(", ")
                );
            } else {
                println!("CT {ctid} (stopped) moved to {} in {passes} passes", a.dest);
            }
        },
    );
    Ok(())
}

/// Copies while the CT runs until a pass sends little, sends no less than the one before, or
/// `max` passes were made. A stopped CT needs one pass.
fn copy_passes(plan: &Plan, max: u32, running: bool) -> Result<u32> {
    let mut last = u64::MAX;
    let mut n = 0;
    while n < max {
        n += 1;
        let t = Instant::now();
        let sent = plan
            .remote
            .rsync(&plan.private, &plan.target_private, plan.progress)?;
        info!(ctid = %plan.ctid, pass = n, sent, ms = t.elapsed().as_millis() as u64, "copy pass");
        if !running || sent < SMALL_DELTA || sent >= last {
            break;
        }
        last = sent;
    }
    Ok(n)
}

fn abort_target(remote: &Remote, ctid: Ctid, purge: bool) -> Result<Value> {
    let mut args = vec!["abort".to_string(), ctid.to_string()];
    if purge {
        args.push("--purge".into());
    }
    let r = remote.target(&args, None);
    if let Err(e) = &r {
        warn!(%ctid, error = %format!("{e:#}"), "cleaning the target's half-state");
    }
    r
}

fn activate(plan: &Plan, mode: &str) -> Result<Value> {
    let mut args = vec!["activate".to_string(), plan.ctid.to_string()];
    match mode {
        "restore" => {
            args.push("--restore".into());
        }
        "none" => args.push("--no-start".into()),
        _ => {}
    }
    plan.remote.target(&args, Some(plan.cfg_text.as_bytes()))
}

fn switch_stopped(ctx: &Ctx, plan: &Plan) -> Result<(u64, Steps)> {
    // Nothing ran during the copy, unless someone started the CT meanwhile.
    if container::running(&ctx.host, plan.ctid).is_some() {
        bail!(
            "CT {} was started during the copy: migrate it again",
            plan.ctid
        );
    }
    let sent = plan
        .remote
        .rsync(&plan.private, &plan.target_private, false)?;
    if let Err(e) = activate(plan, "none") {
        let _ = abort_target(plan.remote, plan.ctid, false);
        return Err(e);
    }
    Ok((sent, Vec::new()))
}

/// Offline: freeze, final pass, kill while frozen (a frozen CT writes nothing, so the copy is
/// its last state), start on the target.
fn switch_offline(ctx: &mut Ctx, plan: &Plan) -> Result<(u64, Steps)> {
    let host = ctx.host.clone();
    let ctid = plan.ctid;
    let mut t = Instant::now();
    let mut steps = Steps::new();
    mig::freeze(&host, ctid)?;
    steps.push(("freeze", since(&mut t)));
    let sent = match plan
        .remote
        .rsync(&plan.private, &plan.target_private, false)
    {
        Ok(s) => s,
        Err(e) => {
            let back = mig::thaw(&host, ctid);
            let _ = abort_target(plan.remote, ctid, false);
            return Err(with_source_state(
                e.context("final copy"),
                back.map_err(Into::into),
            ));
        }
    };
    steps.push(("final_copy", since(&mut t)));
    if let Err(e) = container::kill_frozen(&host, ctid, &mut ctx.hooks) {
        let back = if container::running(&host, ctid).is_some() {
            mig::thaw(&host, ctid).map_err(Into::into)
        } else {
            container::start(&host, ctid, &mut ctx.hooks)
                .map(drop)
                .map_err(Into::into)
        };
        let _ = abort_target(plan.remote, ctid, false);
        return Err(with_source_state(
            anyhow::Error::new(e).context("stopping the CT here"),
            back,
        ));
    }
    steps.push(("stop", since(&mut t)));
    if let Err(e) = activate(plan, "start") {
        let _ = abort_target(plan.remote, ctid, false);
        let back = container::start(&host, ctid, &mut ctx.hooks)
            .map(drop)
            .map_err(Into::into);
        return Err(with_source_state(
            e.context("starting it on the target"),
            back,
        ));
    }
    steps.push(("start_on_target", since(&mut t)));
    Ok((sent, steps))
}

/// Live: CRIU dumps the CT (it stops here with the dump), the files and the images go over,
/// the target restores it.
fn switch_live(ctx: &mut Ctx, plan: &Plan) -> Result<(u64, Steps)> {
    let host = ctx.host.clone();
    let ctid = plan.ctid;
    let dir = host.root.join("dump").join(format!("{ctid}.migrate"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut t = Instant::now();
    let mut steps = Steps::new();
    let opts = ckpt::CheckpointOpts {
        dir: Some(dir.clone()),
        keep_running: false,
    };
    if let Err(e) = ckpt::checkpoint(&host, ctid, &opts, &mut ctx.hooks) {
        let _ = abort_target(plan.remote, ctid, false);
        let back = if container::running(&host, ctid).is_some() {
            Ok(())
        } else {
            container::start(&host, ctid, &mut ctx.hooks)
                .map(drop)
                .map_err(Into::into)
        };
        return Err(with_source_state(
            anyhow::Error::new(e).context("dumping the CT"),
            back,
        ));
    }
    steps.push(("dump", since(&mut t)));
    let sent = plan
        .remote
        .rsync(&plan.private, &plan.target_private, false)
        .context("final copy")
        .and_then(|s| {
            steps.push(("final_copy", since(&mut t)));
            plan.remote
                .rsync(&dir, &plan.target_images, false)
                .context("sending the images")
                .map(|i| s + i)
        })
        .and_then(|s| {
            steps.push(("images", since(&mut t)));
            activate(plan, "restore").map(|_| s)
        });
    match sent {
        Ok(s) => {
            steps.push(("restore_on_target", since(&mut t)));
            let _ = std::fs::remove_dir_all(&dir);
            Ok((s, steps))
        }
        Err(e) => {
            let _ = abort_target(plan.remote, ctid, false);
            let back = ckpt::restore(&host, ctid, Some(&dir), &mut ctx.hooks)
                .map(drop)
                .map_err(anyhow::Error::new);
            Err(with_source_state(e, back))
        }
    }
}

/// The migration's error, saying whether the source runs again.
fn with_source_state(e: anyhow::Error, back: Result<()>) -> anyhow::Error {
    match back {
        Ok(()) => e.context("migration failed; the CT runs here again"),
        Err(b) => e.context(format!(
            "migration failed, and the CT could not be brought back here: {b:#}"
        )),
    }
}

/// Bytes of the files under `p` (what the target must have room for).
fn du(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += std::os::unix::fs::MetadataExt::blocks(&m) * 512;
            }
        }
    }
    total
}
