//! netstat: per-CT traffic by network class.

use anyhow::Result;
use berth::datapath::Family;
use berth::{inventory, netstat};

use crate::Ctx;
use crate::cli::NetstatArgs;

pub fn netstat(ctx: &Ctx, a: &NetstatArgs) -> Result<()> {
    let family = if a.v4 {
        Some(Family::V4)
    } else if a.v6 {
        Some(Family::V6)
    } else {
        None
    };
    let out = inventory::netstat(
        &ctx.host,
        &ctx.pin_dir,
        a.ct.as_deref(),
        a.class,
        family,
        a.reset,
    )?;
    ctx.print(serde_json::to_value(&out)?, || {
        print!("{}", netstat::table(&out))
    });
    Ok(())
}
