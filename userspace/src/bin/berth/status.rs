//! status: a CT's state, init PID (or how init ended on its own), identity, shaping and quota.

use anyhow::Result;
use berth::exit_codes::SCHEMA_VERSION;
use berth::inventory;
use serde_json::json;

use crate::Ctx;

pub fn status(ctx: &Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    let v = inventory::view(&ctx.host, &ctx.pin_dir, ctid)?;
    if ctx.json {
        println!("{}", json!({"schema_version": SCHEMA_VERSION, "ct": v}));
        return Ok(());
    }
    let detail = match (&v.init_pid, &v.last_exit) {
        (Some(p), _) => format!(" (init PID {p})"),
        (None, Some(e)) => format!(" (init {})", e.exit),
        (None, None) => String::new(),
    };
    println!("CT {ctid} {}{detail}", v.status);
    match &v.uuid {
        Some(u) => println!("uuid: {u}"),
        None => println!("uuid: none yet (made by an older berth; the next start assigns one)"),
    }
    match &v.userns {
        Some(u) => println!(
            "unprivileged: CT ids 0..{} are host ids {}..{}",
            u.size,
            u.uid_base,
            u64::from(u.uid_base) + u64::from(u.size)
        ),
        None => println!("privileged: the CT's root is root on the host"),
    }
    if let Some(s) = &v.shaping {
        println!("{}", s.human());
    }
    if v.quota.is_some() {
        // The quota's own human lines: the same reads `quota status` makes.
        let cfg = berth_runtime::config::CtConfig::load(&ctx.host, ctid)?;
        let store = berth::quota::status::open(&berth::quota::status::default_ledger(&ctx.host))?;
        println!(
            "{}",
            berth::quota::status::of_ct(store.as_ref(), &cfg)?.human()
        );
    }
    Ok(())
}
