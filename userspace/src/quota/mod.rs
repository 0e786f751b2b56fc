//! Transfer quotas (issue 14): the state machine berthd runs at every ledger tick on a CT's
//! current-period totals, its persistence next to the ledger, and the webhook outbox.
//!
//! - [`evaluate`] (pure): the state (normal → warned → throttled → cut/suspended/stopped) and the
//!   notify thresholds crossed, from the bytes used and the limits (the config's plus this
//!   period's top-ups).
//! - [`store::QuotaStore`]: tables in the ledger's SQLite file (`quota_state`, `quota_topup`,
//!   `quota_outbox`, created if missing: an additive migration the billing schema does not
//!   know about); one transaction per tick writes every CT's state with its new outbox rows.
//! - [`engine`]: one tick for every CT with a `[quota]`, then the enforcement call.
//! - [`webhook`]: delivery of the outbox over HTTP with retry and backoff; a row is marked
//!   delivered only after a 2xx, so a restart resends at most what was not acknowledged, and an
//!   event is one row by its key `uuid:period:event`, so it is never queued twice.
use std::collections::BTreeMap;

use berth_runtime::transfer_quota::{Count, HardAction, QuotaConfig, SoftAction};

use crate::billing::{Counter, CounterKey, Direction};

pub mod enforce;
pub mod engine;
pub mod status;
pub mod store;
pub mod webhook;

/// Where a CT stands in its period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    Normal,
    /// A notify threshold below 100 % was crossed, or the soft limit with no soft action.
    Warned,
    /// Over the soft limit: the throttle rate is overlaid on the CT's shaping.
    Throttled,
    /// Over the hard limit with `hard_action = cut`: dropped in eBPF except class 0.
    Cut,
    /// Over the hard limit with `hard_action = suspend`: frozen.
    Suspended,
    /// Over the hard limit with `hard_action = stop`.
    Stopped,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Normal,
        State::Warned,
        State::Throttled,
        State::Cut,
        State::Suspended,
        State::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Normal => "normal",
            State::Warned => "warned",
            State::Throttled => "throttled",
            State::Cut => "cut",
            State::Suspended => "suspended",
            State::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A CT's limits for the current period: its config's plus the period's top-ups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub soft: u64,
    pub hard: Option<u64>,
    pub soft_action: SoftAction,
    pub hard_action: HardAction,
    /// Percent of `soft`, sorted.
    pub notify: Vec<u16>,
}

impl Limits {
    /// `None` when the config has no transfer quota.
    pub fn of(cfg: &QuotaConfig, topup: u64) -> Option<Limits> {
        let soft = cfg.transfer?.0;
        let mut notify = cfg.notify().to_vec();
        notify.sort_unstable();
        Some(Limits {
            soft: soft.saturating_add(topup),
            hard: cfg.hard.map(|h| h.0.saturating_add(topup)),
            soft_action: cfg.soft_action(),
            hard_action: cfg.hard_action(),
            notify,
        })
    }
}

/// The bytes a quota counts from a period's totals: its classes, its direction(s).
pub fn used_bytes(cfg: &QuotaConfig, totals: &BTreeMap<CounterKey, Counter>) -> u64 {
    let (mut inb, mut outb) = (0u64, 0u64);
    for (k, c) in totals {
        if !cfg.counts_class(k.class) {
            continue;
        }
        match k.direction {
            Direction::In => inb = inb.saturating_add(c.bytes),
            Direction::Out => outb = outb.saturating_add(c.bytes),
        }
    }
    match cfg.count() {
        Count::In => inb,
        Count::Out => outb,
        Count::Both => inb.saturating_add(outb),
        Count::Max => inb.max(outb),
    }
}

/// What [`evaluate`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub state: State,
    /// The notify thresholds (percent) `used` is at or over.
    pub crossed: Vec<u16>,
}

/// The state for `used` bytes under `limits`; the hard limit wins over the soft one.
pub fn evaluate(limits: &Limits, used: u64) -> Evaluation {
    let at = |pct: u16| u128::from(used) * 100 >= u128::from(limits.soft) * u128::from(pct);
    let crossed: Vec<u16> = limits.notify.iter().copied().filter(|&p| at(p)).collect();
    let hard_state = match limits.hard_action {
        HardAction::Cut => Some(State::Cut),
        HardAction::Suspend => Some(State::Suspended),
        HardAction::Stop => Some(State::Stopped),
        HardAction::None => None,
    };
    let hard = limits.hard.filter(|&h| used >= h).and(hard_state);
    let state = if let Some(s) = hard {
        s
    } else if used >= limits.soft {
        match limits.soft_action {
            SoftAction::Throttle => State::Throttled,
            SoftAction::None => State::Warned,
        }
    } else if !crossed.is_empty() {
        State::Warned
    } else {
        State::Normal
    };
    Evaluation { state, crossed }
}

/// The events a tick queues: each crossed threshold (`threshold_80`), and a state change
/// (`state_throttled`). `prev` is the stored state (of any period: a reset to normal at a new
/// period is a change too). Their keys make each one once per period.
pub fn events(prev: Option<State>, ev: &Evaluation) -> Vec<String> {
    let mut out: Vec<String> = ev
        .crossed
        .iter()
        .map(|p| format!("threshold_{p}"))
        .collect();
    if prev.unwrap_or(State::Normal) != ev.state {
        out.push(format!("state_{}", ev.state.as_str()));
    }
    out
}

/// The idempotency key of an event.
pub fn event_key(uuid: &str, period: &str, event: &str) -> String {
    format!("{uuid}:{period}:{event}")
}

/// What berthd asks the enforcement to do for a state.
pub fn enforcement(cfg: &QuotaConfig, state: State) -> enforce::Enforcement {
    match state {
        State::Normal | State::Warned => enforce::Enforcement::Normal,
        State::Throttled => enforce::Enforcement::Throttle {
            rate_in: cfg.throttle_rate_in,
            rate_out: cfg.throttle_rate_out,
        },
        State::Cut => enforce::Enforcement::Cut,
        State::Suspended => enforce::Enforcement::Suspend,
        State::Stopped => enforce::Enforcement::Stop,
    }
}

#[cfg(test)]
mod tests;
