//! status: a CT's state, init PID (or how init ended on its own) and live shaping.

use anyhow::Result;
use berth::inventory;
use serde_json::json;

use crate::Ctx;

pub fn status(ctx: &Ctx, ct: &str) -> Result<()> {
    let ctid = ctx.resolve(ct)?;
    let r = inventory::status(&ctx.host, &ctx.pin_dir, ctid)?;
    let mut v = serde_json::to_value(&r.status)?;
    if let Some(e) = &r.shaping_error {
        v["shaping_error"] = json!(e);
    }
    v["shaping"] = serde_json::to_value(&r.shaping)?;
    // The quota with berthd's last evaluation (null: none configured).
    let cfg = berth_runtime::config::CtConfig::load(&ctx.host, ctid)?;
    let quota = if cfg.quota.is_empty() {
        None
    } else {
        let store = berth::quota::status::open(&berth::quota::status::default_ledger(&ctx.host))?;
        Some(berth::quota::status::of_ct(store.as_ref(), &cfg)?)
    };
    v["quota"] = quota.as_ref().map_or(serde_json::Value::Null, |q| q.json());
    ctx.print(v, || {
        let detail = match (&r.status.init_pid, &r.status.last_exit) {
            (Some(p), _) => format!(" (init PID {p})"),
            (None, Some(e)) => format!(" (init {})", e.exit),
            (None, None) => String::new(),
        };
        println!("CT {ctid} {}{detail}", r.status.state);
        match &r.status.uuid {
            Some(u) => println!("uuid: {u}"),
            None => println!("uuid: none yet (made by an older berth; the next start assigns one)"),
        }
        match &r.status.userns {
            Some(u) => println!(
                "unprivileged: CT ids 0..{} are host ids {}..{}",
                u.size,
                u.uid_base,
                u64::from(u.uid_base) + u64::from(u.size)
            ),
            None => println!("privileged: the CT's root is root on the host"),
        }
        if let Some(s) = &r.shaping {
            println!("{}", s.human());
        }
        if let Some(q) = &quota {
            println!("{}", q.human());
        }
    });
    Ok(())
}
