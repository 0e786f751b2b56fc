//! checkpoint, restore, and `suspend --dump` / `resume` of a dumped CT (vzctl chkpnt/restore).

use std::path::PathBuf;

use anyhow::Result;
use berth_runtime::container::{self, checkpoint as ckpt};
use serde_json::json;

use crate::Ctx;

pub fn checkpoint(ctx: &mut Ctx, ct: &str, dir: Option<PathBuf>, keep_running: bool) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    let opts = ckpt::CheckpointOpts { dir, keep_running };
    let r = ckpt::checkpoint(&ctx.host, ctid, &opts, &mut ctx.hooks)?;
    ctx.print(
        json!({
            "ctid": ctid,
            "status": if r.left_running { "running" } else { "stopped" },
            "dir": r.dir,
            "dump_ms": r.dump_ms,
            "bytes": r.bytes,
        }),
        || {
            println!(
                "CT {ctid} checkpointed into {} ({} ms, {} bytes){}",
                r.dir.display(),
                r.dump_ms,
                r.bytes,
                if r.left_running {
                    "; still running"
                } else {
                    "; stopped"
                }
            )
        },
    );
    Ok(())
}

pub fn restore(ctx: &mut Ctx, ct: &str, dir: Option<PathBuf>) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    let st = ckpt::restore(&ctx.host, ctid, dir.as_deref(), &mut ctx.hooks)?;
    ctx.print(
        json!({"ctid": ctid, "status": "running", "init_pid": st.init_pid, "restored": true}),
        || println!("CT {ctid} restored (init PID {})", st.init_pid),
    );
    Ok(())
}

/// `suspend --dump`: a checkpoint into the CT's default directory that stops the CT.
pub fn suspend_dump(ctx: &mut Ctx, ct: &str) -> Result<()> {
    checkpoint(ctx, ct, None, false)
}

/// `resume`: restores a CT that `suspend --dump` stopped; thaws a frozen one otherwise.
pub fn resume(ctx: &mut Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    if container::running(&ctx.host, ctid).is_none() && ckpt::has_checkpoint(&ctx.host, ctid, None)
    {
        return restore(ctx, ct, None);
    }
    crate::lifecycle::resume(ctx, ct)
}
