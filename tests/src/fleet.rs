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

/// A node's report (`berth billing report --json`) in the spelling of the central
/// `berth_monthly_bill` view's row.
pub fn bill_line(uuid: &str, r: &serde_json::Value) -> String {
    let p = &r["p95"];
    format!(
        "{uuid}|{}|{}|{}|{}|{}|{}|{}",
        r["in_bytes"],
        r["out_bytes"],
        p["n"],
        p["slot_bytes"],
        p["bits_per_second"],
        p["in_bits_per_second"],
        p["out_bits_per_second"]
    )
}

/// A node's report's totals in the spelling of the central `berth_monthly_totals` rows.
pub fn total_lines(uuid: &str, r: &serde_json::Value) -> Vec<String> {
    r["totals"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| {
                    format!(
                        "{uuid}|{}|{}|{}|{}|{}",
                        t["direction"].as_str().unwrap_or(""),
                        t["class"],
                        t["family"].as_str().unwrap_or(""),
                        t["bytes"],
                        t["packets"]
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The central bill of `uuid` for `period` (`YYYY-MM`), as [`bill_line`] spells it.
pub fn central_bill(db: &crate::pg::Cluster, period: &str, uuid: &str) -> Result<String> {
    db.psql(&format!(
        "SELECT ct_uuid, in_bytes, out_bytes, n, slot_bytes, bits_per_second, in_bits_per_second,
                out_bits_per_second
         FROM berth_monthly_bill WHERE period = '{period}' AND ct_uuid = '{uuid}'"
    ))
}

/// The central totals of `uuid` for `period`, as [`total_lines`] spells them.
pub fn central_totals(db: &crate::pg::Cluster, period: &str, uuid: &str) -> Result<Vec<String>> {
    Ok(db
        .psql(&format!(
            "SELECT ct_uuid, direction, class, family, bytes, packets FROM berth_monthly_totals
             WHERE period = '{period}' AND ct_uuid = '{uuid}'
             ORDER BY direction, class, family"
        ))?
        .lines()
        .map(str::to_string)
        .collect())
}
