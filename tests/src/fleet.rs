//! Synthetic ledgers for the fleet tests and the shipping benchmark: CTs booked through the
//! library (`Ledger::tick`) with pseudo-random traffic, no kernel involved.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use berth::billing::{
    Baseline, BillingAnchor, Counter, CounterKey, CtInfo, CtReading, Direction, Family, Ledger,
    LedgerOptions, Reading,
};

use crate::billing::Rng;

/// One synthetic CT: booked from `from` to `to` (Unix seconds) on this ledger.
#[derive(Debug, Clone)]
pub struct SynthCt {
    pub uuid: String,
    pub ctid: u32,
    pub tz: String,
    pub created: i64,
    pub from: i64,
    pub to: i64,
    /// Marked destroyed at `to`.
    pub destroy: bool,
    pub classes: Option<Vec<u8>>,
}

/// The counters every synthetic CT has.
pub fn keys() -> [CounterKey; 3] {
    [
        CounterKey::new(Direction::In, 1, Family::V4),
        CounterKey::new(Direction::Out, 1, Family::V4),
        CounterKey::new(Direction::In, 0, Family::V6),
    ]
}

/// Books `cts` into a new ledger at `path`: a reading every `step(t)` seconds over each CT's
/// range, increments drawn from `seed`. Returns the ledger's seq.
pub fn fill(path: &Path, cts: &[SynthCt], seed: &str, step: impl Fn(i64) -> i64) -> Result<i64> {
    let mut l = Ledger::open(path, LedgerOptions::default())?;
    let mut rng = Rng::new(seed);
    for c in cts {
        let mut info = CtInfo::new(
            c.uuid.clone(),
            c.ctid,
            BillingAnchor::Day(1),
            c.tz.clone(),
            c.created,
        );
        info.classes = c.classes.clone();
        l.register_ct(&info)?;
    }
    let mut counters: Vec<BTreeMap<CounterKey, Counter>> = cts
        .iter()
        .map(|_| {
            keys()
                .into_iter()
                .map(|k| (k, Counter::default()))
                .collect()
        })
        .collect();
    let start = cts.iter().map(|c| c.from).min().unwrap_or(0);
    let end = cts.iter().map(|c| c.to).max().unwrap_or(0);
    let mut t = start;
    while t <= end {
        let mut readings = Vec::new();
        for (i, c) in cts.iter().enumerate() {
            if t < c.from || t > c.to {
                continue;
            }
            if t > c.from {
                // Bursty: most slots a few MB, some 50× that.
                for v in counters[i].values_mut() {
                    let burst = if rng.below(20) == 0 { 50 } else { 1 };
                    v.bytes += (1 + rng.below(3_000_000)) * burst;
                    v.packets += 1 + rng.below(3000);
                }
            }
            readings.push(CtReading {
                uuid: c.uuid.clone(),
                reading: Reading {
                    at: t,
                    epoch: 1,
                    counters: counters[i].clone(),
                },
                first: Baseline::Zero,
            });
        }
        l.tick(&readings)?;
        t += step(t);
    }
    for c in cts.iter().filter(|c| c.destroy) {
        l.mark_destroyed(&c.uuid, c.to)?;
    }
    Ok(l.seq())
}

/// A UUID for synthetic CT `n` of node `node`.
pub fn uuid(node: u32, n: u32) -> String {
    format!("{node:08x}-{:04x}-4000-8000-{n:012x}", n & 0xffff)
}
