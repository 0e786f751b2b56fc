//! gc: clean what a killed berth left behind.

use anyhow::{Result, bail};
use berth_runtime::container;

use crate::Ctx;

pub fn gc(ctx: &mut Ctx) -> Result<()> {
    let rep = container::gc(&ctx.host, &mut ctx.hooks)?;
    ctx.print(serde_json::to_value(&rep)?, || {
        println!(
            "cleaned {} CT(s), {} orphan cgroup(s), {} partial create(s), {} rolled-back create(s), {} stale file(s), {} template scratch dir(s), {} datapath and {} shaper interface(s)",
            rep.cleaned.len(),
            rep.orphan_cgroups.len(),
            rep.partial_creates.len(),
            rep.rolled_back_creates.len(),
            rep.stale_files.len(),
            rep.template_scratch,
            rep.datapath.detached.len(),
            rep.datapath.unshaped.len(),
        );
        for e in &rep.errors {
            eprintln!("berth: gc: {e}");
        }
    });
    if !rep.errors.is_empty() {
        bail!("gc finished with {} error(s)", rep.errors.len());
    }
    Ok(())
}
