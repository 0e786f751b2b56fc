//! The per-slot aggregate the 95th is read from: per CT and UTC hour one `slot_hour` row whose
//! blob holds, per slot of the hour, the inbound and outbound bytes summed over classes and
//! families and the union of the rows' flags. A month's 95th then reads 720 short rows per CT
//! instead of ~35,000 slot rows (a 1000-CT `report all` for a month took ~7 s that way).
//!
//! An hour is aggregated once it is complete: it ended before the CT's checkpoint slot (nothing
//! is ever booked before that, book.rs) and none of its rows is still open. The tick does it in
//! its transaction, from the hour's slot rows, for one CT in [`AGG_EVERY`] per tick (staggered
//! by CT id like the flush): appending each flushed slot to its hour instead dirtied one more
//! page per flushing CT and cost ~40 % more tick CPU. Readers take the aggregate for the hours it
//! has (a complete prefix of each CT's hours with rows) and the slot rows after the last one.
//! `meta.agg` holds the tick sequence the aggregate is current at; the writer advances it with
//! `meta.seq`. A ledger last written by a berth without the aggregate (or none yet) has
//! `agg ≠ seq`: opening it for writing rebuilds the table from the slot rows, and readers use
//! the slot rows alone until then.
use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};

use super::super::{Direction, SLOT_SECS, SlotFlags};
use super::{Ledger, SlotRow, slot_index, sql_err};
use crate::billing::BillingError;

/// A CT aggregates its complete hours on the ticks where `(id + seq) % AGG_EVERY == 0` (a
/// multiple of the flush stagger, so its closed rows were flushed in the same tick).
pub(super) const AGG_EVERY: i64 = 40;
/// Below every hour a CT can have (nothing aggregated yet); `× HOUR_SLOTS` does not overflow.
pub(super) const NO_HOUR: i64 = i64::MIN / 64;

/// Slots per aggregate row: one UTC hour (12 × 18 bytes stays well inside a page).
pub(super) const HOUR_SLOTS: i64 = 12;
/// One record: slot offset in the hour (u8), inbound bytes, outbound bytes (u64 LE), flags (u8).
const REC: usize = 18;

/// One slot of the aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SlotSum {
    pub start: i64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub flags: SlotFlags,
}

pub(super) fn hour_of(slot_index: i64) -> i64 {
    slot_index.div_euclid(HOUR_SLOTS)
}

/// The aggregate records of `rows` (sorted by slot), grouped by hour: `(hour, records)`.
pub(super) fn hour_records(rows: &[SlotRow]) -> Vec<(i64, Vec<u8>)> {
    let mut out: Vec<(i64, Vec<u8>)> = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let start = rows[i].slot_start;
        let mut sum = SlotSum {
            start,
            in_bytes: 0,
            out_bytes: 0,
            flags: SlotFlags::empty(),
        };
        while i < rows.len() && rows[i].slot_start == start {
            add_row(&mut sum, &rows[i]);
            i += 1;
        }
        let idx = slot_index(start);
        let hour = hour_of(idx);
        match out.last_mut() {
            Some((h, v)) if *h == hour => encode(v, idx, &sum),
            _ => {
                let mut v = Vec::with_capacity(REC);
                encode(&mut v, idx, &sum);
                out.push((hour, v));
            }
        }
    }
    out
}

fn add_row(sum: &mut SlotSum, r: &SlotRow) {
    match r.key.direction {
        Direction::In => sum.in_bytes = sum.in_bytes.saturating_add(r.counter.bytes),
        Direction::Out => sum.out_bytes = sum.out_bytes.saturating_add(r.counter.bytes),
    }
    sum.flags = sum.flags.union(r.flags);
}

fn encode(v: &mut Vec<u8>, idx: i64, s: &SlotSum) {
    v.push(idx.rem_euclid(HOUR_SLOTS) as u8);
    v.extend_from_slice(&s.in_bytes.to_le_bytes());
    v.extend_from_slice(&s.out_bytes.to_le_bytes());
    v.push(s.flags.0);
}

/// Calls `f` for each record of the row of `hour`; `None` for a malformed blob.
pub(super) fn decode(hour: i64, blob: &[u8], mut f: impl FnMut(SlotSum)) -> Option<()> {
    if !blob.len().is_multiple_of(REC) {
        return None;
    }
    for r in blob.chunks_exact(REC) {
        let off = i64::from(r[0]);
        if off >= HOUR_SLOTS {
            return None;
        }
        f(SlotSum {
            start: (hour * HOUR_SLOTS + off) * SLOT_SECS,
            in_bytes: u64::from_le_bytes(r[1..9].try_into().ok()?),
            out_bytes: u64::from_le_bytes(r[9..17].try_into().ok()?),
            flags: SlotFlags(r[17]),
        });
    }
    Some(())
}

/// The records of `blob` from slot offset `from_off` on (a prune cut inside an hour).
pub(super) fn keep_from(blob: &[u8], from_off: i64) -> Option<Vec<u8>> {
    if !blob.len().is_multiple_of(REC) {
        return None;
    }
    Some(
        blob.chunks_exact(REC)
            .filter(|r| i64::from(r[0]) >= from_off)
            .flatten()
            .copied()
            .collect(),
    )
}

/// Writes the aggregate rows of `[from, to)` hours of CT `id` from its slot rows (replacing
/// any: aggregating an hour twice gives the same row). Returns the slot rows read.
pub(super) fn aggregate(
    conn: &Connection,
    path: &std::path::Path,
    id: i64,
    from: i64,
    to: i64,
) -> Result<u64, BillingError> {
    let op = "aggregating closed hours";
    let mut read = conn
        .prepare_cached(
            "SELECT slot, key, bytes, packets, flags FROM slot
             WHERE ct = ?1 AND slot >= ?2 AND slot < ?3 ORDER BY slot, key",
        )
        .map_err(sql_err(path, op))?;
    let mut rows = read
        .query(params![id, from * HOUR_SLOTS, to * HOUR_SLOTS])
        .map_err(sql_err(path, op))?;
    let mut got = Vec::new();
    while let Some(r) = rows.next().map_err(sql_err(path, op))? {
        let g = |i| r.get::<_, i64>(i).map_err(sql_err(path, op));
        let (slot, k, b, p, f) = (g(0)?, g(1)?, g(2)?, g(3)?, g(4)?);
        got.push(
            super::query::row(slot, k, b, p, f, 0).ok_or_else(|| BillingError::Corrupt {
                path: path.to_path_buf(),
                op,
                detail: format!("CT id {id}: bad key {k} or flags {f}"),
            })?,
        );
    }
    let mut put = conn
        .prepare_cached(
            "INSERT INTO slot_hour (ct, hour, v) VALUES (?1, ?2, ?3)
             ON CONFLICT (ct, hour) DO UPDATE SET v = excluded.v",
        )
        .map_err(sql_err(path, op))?;
    for (hour, v) in hour_records(&got) {
        put.execute(params![id, hour, v])
            .map_err(sql_err(path, op))?;
    }
    Ok(got.len() as u64)
}

/// The first hour of a CT not complete: the checkpoint slot's, or an earlier open row's.
pub(super) fn complete_before(checkpoint_slot: Option<i64>, open: &[SlotRow]) -> i64 {
    let cp = checkpoint_slot.map_or(NO_HOUR, |s| hour_of(slot_index(s)));
    open.first()
        .map_or(cp, |o| cp.min(hour_of(slot_index(o.slot_start))))
}

impl Ledger {
    /// Loads where each CT's aggregate stands, rebuilding it from the slot rows unless it is
    /// current at `seq` (the migration of a ledger written without it). Returns the slot rows
    /// read by a rebuild.
    pub(super) fn ensure_aggregate(&mut self) -> Result<Option<u64>, BillingError> {
        let op = "building the per-slot aggregate";
        let path = self.path.clone();
        let agg: Option<i64> = self
            .conn
            .query_row("SELECT v FROM meta WHERE k = 'agg'", [], |r| r.get(0))
            .optional()
            .map_err(sql_err(&path, op))?;
        if agg == Some(self.seq) {
            let mut last = self
                .conn
                .prepare("SELECT max(hour) FROM slot_hour WHERE ct = ?1")
                .map_err(sql_err(&path, op))?;
            let mut next = HashMap::with_capacity(self.cts.len());
            for s in self.cts.values() {
                let h: Option<i64> = last
                    .query_row([s.id], |r| r.get(0))
                    .map_err(sql_err(&path, op))?;
                next.insert(s.id, h.map_or(NO_HOUR, |h| h + 1));
            }
            drop(last);
            self.agg_next = next;
            return Ok(None);
        }
        let tx = self.conn.transaction().map_err(sql_err(&path, op))?;
        tx.execute("DELETE FROM slot_hour", [])
            .map_err(sql_err(&path, op))?;
        let mut n = 0;
        let mut next = HashMap::with_capacity(self.cts.len());
        for s in self.cts.values() {
            let to = complete_before(s.checkpoint.as_ref().map(|c| c.slot), &s.open);
            n += aggregate(&tx, &path, s.id, NO_HOUR, to)?;
            next.insert(s.id, to);
        }
        tx.execute(
            "INSERT INTO meta (k, v) VALUES ('agg', ?1) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            [self.seq],
        )
        .map_err(sql_err(&path, op))?;
        tx.commit().map_err(sql_err(&path, op))?;
        self.agg_next = next;
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::{Counter, CounterKey, Family};
    use super::*;

    #[test]
    fn records_sum_directions_per_slot_and_round_trip() {
        let k = |d, c, f| CounterKey::new(d, c, f);
        let row = |slot: i64, key, bytes, flags| SlotRow {
            slot_start: slot * SLOT_SECS,
            key,
            counter: Counter::new(bytes, 1),
            flags: SlotFlags(flags),
            seq: 0,
        };
        // Slots 11 and 12 straddle an hour; slot 12 saturates inbound.
        let rows = [
            row(11, k(Direction::In, 0, Family::V4), 5, 0),
            row(11, k(Direction::In, 1, Family::V6), 7, 1),
            row(11, k(Direction::Out, 0, Family::V4), 3, 4),
            row(12, k(Direction::In, 0, Family::V4), u64::MAX, 0),
            row(12, k(Direction::In, 0, Family::V6), 9, 0),
        ];
        let recs = hour_records(&rows);
        assert_eq!(recs.iter().map(|(h, _)| *h).collect::<Vec<_>>(), [0, 1]);
        let mut got = Vec::new();
        for (h, v) in &recs {
            decode(*h, v, |s| got.push(s)).unwrap();
        }
        let sum = |slot: i64, i, o, f| SlotSum {
            start: slot * SLOT_SECS,
            in_bytes: i,
            out_bytes: o,
            flags: SlotFlags(f),
        };
        assert_eq!(got, [sum(11, 12, 3, 5), sum(12, u64::MAX, 0, 0)]);
        assert_eq!(decode(0, &recs[0].1[..17], |_| ()), None);
        let mut bad = recs[0].1.clone();
        bad[0] = 12;
        assert_eq!(decode(0, &bad, |_| ()), None);
        // Slot -1 (before 1970) lands at offset 11 of hour -1.
        let neg = hour_records(&[row(-1, k(Direction::Out, 0, Family::V4), 1, 0)]);
        assert_eq!(neg[0].0, -1);
        let mut got = Vec::new();
        decode(neg[0].0, &neg[0].1, |s| got.push(s)).unwrap();
        assert_eq!(got, [sum(-1, 0, 1, 0)]);
    }

    #[test]
    fn keep_from_drops_the_records_before_the_cut() {
        let k = CounterKey::new(Direction::In, 0, Family::V4);
        let rows: Vec<SlotRow> = (24..36)
            .map(|s| SlotRow {
                slot_start: s * SLOT_SECS,
                key: k,
                counter: Counter::new(s as u64, 1),
                flags: SlotFlags::empty(),
                seq: 0,
            })
            .collect();
        let (h, v) = hour_records(&rows).remove(0);
        let kept = keep_from(&v, 5).unwrap();
        let mut got = Vec::new();
        decode(h, &kept, |s| got.push(s.in_bytes)).unwrap();
        assert_eq!(got, (29..36).collect::<Vec<u64>>());
    }
}
