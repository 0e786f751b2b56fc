//! One quota tick, after the ledger's: for every CT with a `[quota]` and a UUID the ledger
//! knows, the used bytes of its current period (its billing day and zone, from the ledger),
//! the state, the events, one transaction storing them; then the enforcement of each state.
use std::collections::HashSet;
use std::path::Path;

use berth_runtime::config::{CtConfig, Host};
use berth_runtime::transfer_quota::QuotaConfig;
use berth_runtime::{Ctid, error_chain::ErrorChain};
use tracing::{debug, info, warn};

use super::store::{OutboxRow, QuotaStore, QuotaStoreError, StateRow};
use super::{Limits, State, enforce, enforcement, evaluate, event_key, events, used_bytes};
use crate::billing::{BillingError, Ledger, Period};

#[derive(Debug, thiserror::Error)]
pub enum QuotaTickError {
    #[error(transparent)]
    Store(#[from] QuotaStoreError),
    #[error("quota tick: listing the CT configs")]
    Configs(#[source] berth_runtime::config::ConfigError),
}

/// A CT's quota as of a tick (the gauges of /metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtQuota {
    pub ctid: u32,
    pub uuid: String,
    pub used: u64,
    pub soft: u64,
    pub hard: Option<u64>,
    pub state: State,
}

/// What a tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaTick {
    pub cts: Vec<CtQuota>,
    /// Events queued by this tick.
    pub queued: usize,
    /// Undelivered events with a webhook, after the tick.
    pub backlog: u64,
}

/// The JSON a webhook receives.
pub fn event_body(key: &str, event: &str, row: &StateRow, limit_of_event: u64, at: i64) -> String {
    serde_json::json!({
        "key": key,
        "event": event,
        "ct_uuid": row.uuid,
        "ctid": row.ctid,
        "period": row.period,
        "period_start": row.period_start,
        "period_end": row.period_end,
        "state": row.state.as_str(),
        "used_bytes": row.used,
        "limit_bytes": limit_of_event,
        "hard_limit_bytes": row.hard,
        "at": at,
    })
    .to_string()
}

struct Planned {
    ctid: Ctid,
    cfg: QuotaConfig,
    row: StateRow,
}

/// How a tick enforces a state: berthd's calls [`enforce::apply`] (see [`apply_with`]); the
/// error is the cause's chain as text (stored for `quota status`).
pub type Enforcer<'a> = dyn FnMut(Ctid, &enforce::Enforcement) -> Result<(), String> + 'a;

/// The enforcer of berthd: [`enforce::apply`] on `host`'s CTs with the datapath at `pin_dir`.
pub fn apply_with<'a>(
    host: &'a Host,
    pin_dir: &'a Path,
) -> impl FnMut(Ctid, &enforce::Enforcement) -> Result<(), String> + 'a {
    move |ctid, e| {
        enforce::apply(host, pin_dir, ctid, e).map_err(|err| ErrorChain(&err).to_string())
    }
}

/// One tick at `now`: evaluates, stores, then enforces. A CT whose ledger rows cannot be read
/// is skipped with a warning (the others go on); a failed store fails the tick (retried at
/// the next one: nothing was written, and the events are derived again).
pub fn tick(
    store: &mut QuotaStore,
    ledger: &Ledger,
    host: &Host,
    enforcer: &mut Enforcer<'_>,
    now: i64,
) -> Result<QuotaTick, QuotaTickError> {
    let mut planned = Vec::new();
    let mut outbox = Vec::new();
    let prev_rows = store.states()?;
    for ctid in host.list_ctids().map_err(QuotaTickError::Configs)? {
        let cfg = match CtConfig::load(host, ctid) {
            Ok(c) => c,
            Err(e) => {
                warn!(%ctid, error = %ErrorChain(&e), "quota: skipping a CT whose config does not load");
                continue;
            }
        };
        let Some(uuid) = cfg.uuid.map(|u| u.to_string()) else {
            continue;
        };
        if cfg.quota.transfer.is_none() || ledger.ct(&uuid).is_err() {
            continue;
        }
        let read = || -> Result<(Period, u64), BillingError> {
            let period = ledger.period_spec(&uuid)?.period_of(now)?;
            let totals = ledger.totals(&uuid, period.start)?;
            Ok((period, used_bytes(&cfg.quota, &totals)))
        };
        let (period, used) = match read() {
            Ok(v) => v,
            Err(e) => {
                warn!(%ctid, %uuid, error = %ErrorChain(&e), "quota: reading the CT's period totals from the ledger failed; skipped this tick");
                continue;
            }
        };
        let topup = store.topup(&uuid, period.start)?;
        let Some(limits) = Limits::of(&cfg.quota, topup) else {
            continue;
        };
        let ev = evaluate(&limits, used);
        let prev = prev_rows.iter().find(|r| r.uuid == uuid);
        let label = period.label();
        let row = StateRow {
            uuid: uuid.clone(),
            ctid: ctid.get(),
            period: label.clone(),
            period_start: period.start,
            period_end: period.end,
            state: ev.state,
            used,
            soft: limits.soft,
            hard: limits.hard,
            since: match prev {
                Some(p) if p.state == ev.state && p.period_start == period.start => p.since,
                _ => now,
            },
            updated: now,
            enforced: None,
            enforce_error: None,
        };
        for e in events(prev.map(|p| p.state), &ev) {
            let key = event_key(&uuid, &label, &e);
            let limit = if ev.state == State::Cut
                || ev.state == State::Suspended
                || ev.state == State::Stopped
            {
                limits.hard.unwrap_or(limits.soft)
            } else {
                limits.soft
            };
            outbox.push(OutboxRow {
                body: event_body(&key, &e, &row, limit, now),
                key,
                uuid: uuid.clone(),
                ctid: ctid.get(),
                event: e,
                url: cfg.quota.webhook.clone(),
            });
        }
        if prev.map(|p| p.state) != Some(ev.state) {
            info!(%ctid, %uuid, period = %label, used, soft = limits.soft, hard = ?limits.hard, state = ev.state.as_str(), "quota state");
        }
        planned.push(Planned {
            ctid,
            cfg: cfg.quota,
            row,
        });
    }
    let rows: Vec<StateRow> = planned.iter().map(|p| p.row.clone()).collect();
    let queued = store.commit_tick(&rows, &outbox, now)?;
    for p in &planned {
        let e = enforcement(&p.cfg, p.row.state);
        apply(store, enforcer, p.ctid, &p.row.uuid, &e)?;
    }
    // A stored state without a quota any more (removed from the config, or the CT destroyed or
    // its UUID replaced): lifted once, then forgotten.
    let live: HashSet<&str> = rows.iter().map(|r| r.uuid.as_str()).collect();
    for old in prev_rows.iter().filter(|r| !live.contains(r.uuid.as_str())) {
        if let Ok(ctid) = Ctid::new(old.ctid)
            && CtConfig::load(host, ctid)
                .ok()
                .and_then(|c| c.uuid)
                .is_some_and(|u| u.to_string() == old.uuid)
        {
            apply(
                store,
                enforcer,
                ctid,
                &old.uuid,
                &enforce::Enforcement::Normal,
            )?;
        }
        debug!(uuid = %old.uuid, ctid = old.ctid, "quota removed: state forgotten");
        store.remove_state(&old.uuid)?;
    }
    Ok(QuotaTick {
        cts: rows
            .iter()
            .map(|r| CtQuota {
                ctid: r.ctid,
                uuid: r.uuid.clone(),
                used: r.used,
                soft: r.soft,
                hard: r.hard,
                state: r.state,
            })
            .collect(),
        queued,
        backlog: store.backlog()?,
    })
}

fn enforcement_name(e: &enforce::Enforcement) -> &'static str {
    match e {
        enforce::Enforcement::Normal => "normal",
        enforce::Enforcement::Throttle { .. } => "throttle",
        enforce::Enforcement::Cut => "cut",
        enforce::Enforcement::Suspend => "suspend",
        enforce::Enforcement::Stop => "stop",
    }
}

fn apply(
    store: &mut QuotaStore,
    enforcer: &mut Enforcer<'_>,
    ctid: Ctid,
    uuid: &str,
    e: &enforce::Enforcement,
) -> Result<(), QuotaStoreError> {
    let name = enforcement_name(e);
    match enforcer(ctid, e) {
        Ok(()) => store.set_enforced(uuid, Ok(name)),
        Err(msg) => {
            warn!(%ctid, enforcement = name, error = %msg, "quota enforcement failed (retried next tick)");
            store.set_enforced(uuid, Err(&msg))
        }
    }
}
