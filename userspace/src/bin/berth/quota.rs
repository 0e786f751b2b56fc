//! quota: the `--quota-*` flags of create and set, `quota status` and `quota topup`. The state
//! is berthd's (in the ledger's file); the CLI reads it, and writes only a top-up.

use anyhow::{Context, Result, bail};
use berth::billing::{Ledger, Period};
use berth::clock::unix_now;
use berth::quota::status::{self, CtQuotaStatus};
use berth::quota::store::QuotaStore;
use berth::quota::used_bytes;
use berth_runtime::Ctid;
use berth_runtime::config::CtConfig;
use berth_runtime::transfer_quota::{
    Bytes, Count, HardAction, QuotaChange, QuotaConfig, parse_classes, parse_notify,
    parse_optional_bytes, parse_optional_webhook, parse_throttle,
};
use serde_json::{Value, json};

use crate::Ctx;
use crate::cli::{QuotaArgs, QuotaCmd, QuotaFlags};

/// The quota flags as typed values, each checked on its own (the library checks the merge).
pub fn quota_flags(f: &QuotaFlags) -> Result<QuotaChange> {
    Ok(QuotaChange {
        transfer: f
            .transfer
            .as_deref()
            .map(|s| parse_optional_bytes("--quota-transfer", s))
            .transpose()?,
        count: f
            .count
            .as_deref()
            .map(|s| Count::parse("--quota-count", s))
            .transpose()?,
        classes: f
            .classes
            .as_deref()
            .map(|s| parse_classes("--quota-classes", s))
            .transpose()?,
        throttle: f
            .throttle
            .as_deref()
            .map(|s| parse_throttle("--quota-throttle", s))
            .transpose()?,
        hard: f
            .hard
            .as_deref()
            .map(|s| parse_optional_bytes("--quota-hard", s))
            .transpose()?,
        hard_action: f
            .hard_action
            .as_deref()
            .map(|s| HardAction::parse("--quota-hard-action", s))
            .transpose()?,
        notify: f
            .notify
            .as_deref()
            .map(|s| parse_notify("--quota-notify", s))
            .transpose()?,
        webhook: f
            .webhook
            .as_deref()
            .map(|s| parse_optional_webhook("--quota-webhook", s))
            .transpose()?,
    })
}

/// What the CT used in its current period as `q` counts it, and the period's top-ups; `None`
/// while the ledger does not know the CT (no ledger, or berthd has not seen it yet).
fn usage(ctx: &Ctx, cfg: &CtConfig, q: &QuotaConfig) -> Result<Option<(Period, u64, u64)>> {
    let path = status::default_ledger(&ctx.host);
    let Some(uuid) = cfg.uuid.map(|u| u.to_string()) else {
        return Ok(None);
    };
    if !path.exists() {
        return Ok(None);
    }
    let ledger = Ledger::open_read_only(&path)?;
    if ledger.ct(&uuid).is_err() {
        return Ok(None);
    }
    let period = ledger.period_spec(&uuid)?.period_of(unix_now())?;
    let used = used_bytes(q, &ledger.totals(&uuid, period.start)?);
    let topup = match status::open(&path)? {
        Some(s) => s.topup(&uuid, period.start)?,
        None => 0,
    };
    Ok(Some((period, used, topup)))
}

/// Refuses a quota (transfer or hard limit, with this period's top-ups) below what the CT
/// already used in the current period. Only the limits this change sets (or recounts, with
/// `count`/`classes`) are checked: a CT over its quota must still get a new webhook or
/// throttle rate.
pub fn check_against_ledger(ctx: &Ctx, ctid: Ctid, change: &QuotaChange) -> Result<()> {
    let cfg = CtConfig::load(&ctx.host, ctid)?;
    let merged = change.merge(&cfg.quota)?;
    let Some(t) = merged.transfer else {
        return Ok(());
    };
    let recount = change.count.is_some() || change.classes.is_some();
    let limits = [
        ("--quota-transfer", Some(t), change.transfer.is_some()),
        ("--quota-hard", merged.hard, change.hard.is_some()),
    ];
    if !limits.iter().any(|(_, _, set)| *set) && !recount {
        return Ok(());
    }
    let Some((period, used, topup)) = usage(ctx, &cfg, &merged)? else {
        return Ok(());
    };
    for (flag, limit, set) in limits {
        if let Some(l) = limit
            && (set || recount)
            && l.0.saturating_add(topup) < used
        {
            bail!(
                "{flag} {l}: below what CT {ctid} already used in period {} ({used} bytes counted{}); nothing changed",
                period.label(),
                if topup > 0 {
                    format!(", with {topup} bytes topped up")
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

pub fn quota(ctx: &Ctx, a: QuotaArgs) -> Result<()> {
    let path = a
        .ledger
        .clone()
        .unwrap_or_else(|| status::default_ledger(&ctx.host));
    match a.cmd {
        QuotaCmd::Status { ct } => {
            let rows: Vec<CtQuotaStatus> = match &ct {
                Some(c) => {
                    let ctid = ctx.resolve(c)?;
                    let cfg = CtConfig::load(&ctx.host, ctid)?;
                    let store = status::open(&path)?;
                    vec![status::of_ct(store.as_ref(), &cfg)?]
                }
                None => status::all(&ctx.host, &path)?,
            };
            let backlog = match status::open(&path)? {
                Some(s) => s.backlog()?,
                None => 0,
            };
            let v = match &ct {
                Some(_) => rows[0].json(),
                None => json!({
                    "cts": rows.iter().map(CtQuotaStatus::json).collect::<Vec<Value>>(),
                    "webhook_backlog": backlog,
                }),
            };
            ctx.print(v, || {
                if rows.is_empty() {
                    println!("no CT has a transfer quota");
                }
                for r in &rows {
                    println!("{}", r.human());
                }
                if ct.is_none() {
                    println!("webhook backlog: {backlog} events");
                }
            });
        }
        QuotaCmd::Topup { ct, size } => {
            let add = Bytes::parse("quota topup SIZE", &size)?;
            let ctid = ctx.resolve(&ct)?;
            let cfg = CtConfig::load(&ctx.host, ctid)?;
            if cfg.quota.transfer.is_none() {
                bail!("CT {ctid} has no transfer quota to top up (set one with --quota-transfer)");
            }
            let Some(uuid) = cfg.uuid.map(|u| u.to_string()) else {
                bail!("CT {ctid} has no UUID yet (start it once): the ledger knows CTs by UUID");
            };
            if !path.exists() {
                bail!(
                    "no billing ledger at {}: berthd keeps the quota state there",
                    path.display()
                );
            }
            let ledger = Ledger::open_read_only(&path)?;
            if ledger.ct(&uuid).is_err() {
                bail!(
                    "CT {ctid} ({uuid}) is not in the ledger {} yet: berthd registers it at its next tick",
                    path.display()
                );
            }
            let period = ledger.period_spec(&uuid)?.period_of(unix_now())?;
            let mut store = QuotaStore::open(&path)
                .with_context(|| format!("opening the quota tables of {}", path.display()))?;
            let total = store.add_topup(&uuid, period.start, add.0)?;
            ctx.print(
                json!({"ctid": ctid.get(), "uuid": uuid, "period": period.label(), "added_bytes": add.0, "topup_bytes": total}),
                || {
                    println!(
                        "CT {ctid}: {add} added to period {} ({total} bytes topped up this period; berthd applies it at its next tick)",
                        period.label()
                    )
                },
            );
        }
    }
    Ok(())
}
