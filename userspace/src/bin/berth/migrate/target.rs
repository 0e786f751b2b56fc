//! `berth migrate-target`: the target's half of `migrate`, run over ssh by the source. Every
//! answer is one JSON line on stdout (the source runs it with --json).

use std::io::Read;

use anyhow::{Context, Result, anyhow};
use berth_runtime::Ctid;
use berth_runtime::container::migrate::target as tgt;
use serde_json::json;

use crate::Ctx;
use crate::cli::MigrateTargetCmd;

fn stdin_text() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the CT's config from stdin")?;
    Ok(s)
}

fn ctid_of(s: &str) -> Result<Ctid> {
    s.parse().map_err(|e| anyhow!("CTID {s:?}: {e}"))
}

pub fn run(ctx: &mut Ctx, cmd: MigrateTargetCmd) -> Result<()> {
    match cmd {
        MigrateTargetCmd::Preflight { ctid, bytes, live } => {
            let ctid = ctid_of(&ctid)?;
            let cfg = tgt::parse_config(&ctx.host, ctid, &stdin_text()?)?;
            let r = tgt::preflight(&ctx.host, &cfg, bytes, live)?;
            ctx.print(serde_json::to_value(&r).expect("plain struct"), || {
                println!(
                    "CT {ctid} can come here: files into {}",
                    r.private_dir.display()
                )
            });
        }
        MigrateTargetCmd::Activate {
            ctid,
            restore,
            no_start,
            dir,
        } => {
            let ctid = ctid_of(&ctid)?;
            let text = stdin_text()?;
            let images = dir.unwrap_or_else(|| tgt::images_dir(&ctx.host, ctid));
            let restore_dir = restore.then_some(images.as_path());
            let st = tgt::activate(
                &ctx.host,
                ctid,
                &text,
                !no_start,
                restore_dir,
                &mut ctx.hooks,
            )
            .map_err(|e| anyhow!(berth_runtime::error_chain::ErrorChain(&*e).to_string()))?;
            let pid = st.as_ref().map(|s| s.init_pid);
            ctx.print(
                json!({"ctid": ctid, "running": st.is_some(), "init_pid": pid}),
                || println!("CT {ctid} is here now"),
            );
        }
        MigrateTargetCmd::Abort { ctid, purge } => {
            let ctid = ctid_of(&ctid)?;
            let r = tgt::abort(&ctx.host, ctid, purge)?;
            ctx.print(serde_json::to_value(&r).expect("plain struct"), || {
                println!("CT {ctid}: migration aborted")
            });
        }
    }
    Ok(())
}
