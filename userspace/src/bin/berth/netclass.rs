//! netclass load / list: the datapath's network-class table.

use anyhow::{Context, Result};
use berth::datapath::{Datapath, DatapathView, parse_networks_classes};
use serde_json::{Value, json};

use crate::Ctx;
use crate::cli::NetclassCmd;

pub fn netclass(ctx: &Ctx, c: NetclassCmd) -> Result<()> {
    match c {
        NetclassCmd::Load { file } => {
            let mut dp = Datapath::open_or_load(&ctx.pin_dir)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let entries =
                parse_networks_classes(&text).with_context(|| format!("{}", file.display()))?;
            dp.load_classes(&entries)?;
            ctx.print(json!({"loaded": entries.len()}), || {
                println!("{} class entries loaded", entries.len())
            });
        }
        NetclassCmd::List => {
            // Read-only: no pinned datapath means no class table yet, not a reason to load one.
            let entries = match DatapathView::open_pinned(&ctx.pin_dir)? {
                Some(dp) => dp.classes()?,
                None => Vec::new(),
            };
            let v: Vec<Value> = entries
                .iter()
                .map(|e| json!({"class": e.class, "net": e.net.to_string()}))
                .collect();
            ctx.print(Value::Array(v), || {
                for e in &entries {
                    println!("{} {}", e.class, e.net);
                }
            });
        }
    }
    Ok(())
}
