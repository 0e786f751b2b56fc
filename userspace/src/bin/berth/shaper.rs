//! shaper status: the host's shaping backend, and a CT's configured and live shaping.

use anyhow::Result;
use berth_runtime::config::CtConfig;
use berth_runtime::container;
use serde_json::json;

use crate::Ctx;
use crate::cli::ShaperCmd;

pub fn shaper(ctx: &Ctx, c: ShaperCmd) -> Result<()> {
    match c {
        ShaperCmd::Status { ct } => status(ctx, ct.as_deref()),
    }
}

fn status(ctx: &Ctx, ct: Option<&str>) -> Result<()> {
    let backend = berth::shaper::backend_status()?;
    let mut v = json!({ "backend": backend });
    if let Some(ct) = ct {
        let ctid = ctx.resolve(ct)?;
        let cfg = CtConfig::load(&ctx.host, ctid)?;
        v["ctid"] = json!(ctid);
        v["configured"] = json!(cfg.active_shaping());
        if container::running(&ctx.host, ctid).is_some() {
            let live = berth::shaper::read_status(&ctx.pin_dir, ctid)?;
            v["live"] = serde_json::to_value(&live)?;
        }
    }
    ctx.print(v.clone(), || {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
    });
    Ok(())
}
