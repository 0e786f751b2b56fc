//! gc: clean what a killed berth left behind.

use anyhow::{Result, bail};
use berth_runtime::container;

use crate::Ctx;

pub fn gc(ctx: &mut Ctx) -> Result<()> {
    let rep = container::gc(&ctx.host, &mut ctx.hooks)?;
    ctx.print(serde_json::to_value(&rep)?, || {
        println!(
            "cleaned {} CT(s), {} orphan cgroup(s), {} partial create(s)",
            rep.cleaned.len(),
            rep.orphan_cgroups.len(),
            rep.partial_creates.len()
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
