//! `berth billing ship`: the ledger into the central PostgreSQL (berth::fleet), once or
//! following; one JSON line per round on stdout.
use berth::clock::unix_now as now;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth::fleet::{ConnInfo, ShipOptions, ShipStatus, Shipper, backoff, default_node};
use serde_json::json;

use crate::cli::ShipArgs;

pub fn ship(ledger: &Path, a: ShipArgs) -> Result<()> {
    let info: ConnInfo = a.url.parse().context("--url")?;
    let node = a.node.unwrap_or_else(default_node);
    let mut shipper = Shipper::new(
        info,
        ShipOptions {
            node: node.clone(),
            page_rows: a.page_rows,
        },
    )?;
    if !ledger.exists() {
        bail!(
            "no billing ledger at {} (berthd writes it)",
            ledger.display()
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let status = ShipStatus::default();
        let mut replay = a.replay;
        let mut attempts = 0u64;
        loop {
            if replay {
                match shipper.rewind(0).await {
                    Ok(()) => replay = false,
                    Err(e) => {
                        attempts += 1;
                        if !a.follow && attempts >= a.attempts {
                            return Err(anyhow::Error::new(e).context("rewinding for --replay"));
                        }
                        tokio::time::sleep(backoff(attempts)).await;
                        continue;
                    }
                }
            }
            match shipper.round(ledger, &status, now()).await {
                Ok(s) => {
                    attempts = 0;
                    println!(
                        "{}",
                        json!({
                            "node": node,
                            "acked_seq": s.acked_seq,
                            "ledger_seq": s.ledger_seq,
                            "lag_seq": status.lag(),
                            "pages": s.pages,
                            "rows_sent": s.rows_sent,
                            "rows_written": s.rows_written,
                        })
                    );
                    if !a.follow {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_secs(a.interval)).await;
                }
                Err(e) => {
                    attempts += 1;
                    if !a.follow && attempts >= a.attempts {
                        return Err(anyhow::Error::new(e).context(format!(
                            "shipping to {} failed {attempts} times; nothing was lost (the ledger keeps every row)",
                            shipper.target()
                        )));
                    }
                    tokio::time::sleep(backoff(attempts)).await;
                }
            }
        }
    })
}
