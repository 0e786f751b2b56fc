//! One tick: book every CT's reading and commit checkpoints (with the open rows), flushed slot
//! rows and their totals together.
use std::collections::BTreeMap;

use rusqlite::params;

use super::super::book::{Checkpoint, book};
use super::super::period::Period;
use super::super::{BillingError, Counter, CounterKey};
use super::{
    CtReading, FLUSH_EVERY, Ledger, MAX_OPEN, SlotRow, TickSummary, agg, encode_counters,
    encode_open, slot_index, sql_err,
};

/// One CT's outcome of a tick, written in the transaction and applied to memory after it.
struct Booked<'a> {
    id: i64,
    uuid: &'a str,
    checkpoint: Checkpoint,
    open: Vec<SlotRow>,
    open_seq: i64,
    /// Closed rows moved to the slot table this tick.
    flushed: Vec<SlotRow>,
    /// (period start, key) → delta of the flushed rows.
    totals: Vec<(i64, CounterKey, Counter)>,
    /// Hours `[from, to)` to aggregate from the slot rows (after this CT's slot writes).
    aggregate: Option<(i64, i64)>,
    period: Option<Period>,
}

impl Ledger {
    /// Books one reading per CT in one transaction. Unknown CTs and a CT read twice are rejected
    /// before anything is written. The in-memory state changes only after the commit succeeded,
    /// so a failed tick can simply be repeated with fresh readings.
    pub fn tick(&mut self, readings: &[CtReading]) -> Result<TickSummary, BillingError> {
        let mut seen = std::collections::HashSet::with_capacity(readings.len());
        for r in readings {
            self.state(&r.uuid)?;
            // A second reading would be booked against the same stale checkpoint: counted twice.
            if !seen.insert(r.uuid.as_str()) {
                return Err(BillingError::DuplicateReading(r.uuid.clone()));
            }
        }
        let seq = self.seq + 1;
        let mut summary = TickSummary {
            seq,
            ..TickSummary::default()
        };
        let mut booked: Vec<Booked<'_>> = Vec::with_capacity(readings.len());
        for r in readings {
            let state = &self.cts[&r.uuid];
            let b = book(state.checkpoint.as_ref(), &r.reading, r.first);
            summary.slot_rows += b.adds.len() as u64;
            summary.anomalies += b.anomalies.len() as u64;
            summary.estimated_slots += b.gap_slots;
            summary.clock_steps += u64::from(b.clock_step);
            summary.new_epochs += u64::from(b.new_epoch);
            let mut merged: BTreeMap<(i64, CounterKey), SlotRow> = state
                .open
                .iter()
                .map(|o| ((o.slot_start, o.key), *o))
                .collect();
            for a in &b.adds {
                let o = merged.entry((a.slot_start, a.key)).or_insert(SlotRow {
                    slot_start: a.slot_start,
                    key: a.key,
                    counter: Counter::default(),
                    flags: a.flags,
                    seq,
                });
                o.counter.bytes += a.delta.bytes;
                o.counter.packets += a.delta.packets;
                o.flags = o.flags.union(a.flags);
            }
            let mut open: Vec<SlotRow> = merged.into_values().collect();
            let open_seq = if b.adds.is_empty() {
                state.open_seq
            } else {
                seq
            };
            for o in &mut open {
                o.seq = open_seq;
            }
            // Nothing is ever booked before the checkpoint's slot: older open rows are closed.
            let flush = (state.id + seq).rem_euclid(FLUSH_EVERY) == 0 || open.len() > MAX_OPEN;
            let mut flushed = Vec::new();
            if flush {
                let cut = open.partition_point(|o| o.slot_start < b.checkpoint.slot);
                flushed = open.drain(..cut).collect();
            }
            let mut totals: BTreeMap<(i64, CounterKey), Counter> = BTreeMap::new();
            let mut period = state.period;
            for f in &flushed {
                let p = match period {
                    Some(p) if p.contains(f.slot_start) => p,
                    _ => state.spec.period_of(f.slot_start)?,
                };
                period = Some(p);
                let t = totals.entry((p.start, f.key)).or_default();
                t.bytes += f.counter.bytes;
                t.packets += f.counter.packets;
            }
            let mut aggregate = None;
            if (state.id + seq).rem_euclid(agg::AGG_EVERY) == 0 {
                let from = self
                    .agg_next
                    .get(&state.id)
                    .copied()
                    .unwrap_or(agg::NO_HOUR);
                let to = agg::complete_before(Some(b.checkpoint.slot), &open);
                if to > from {
                    aggregate = Some((from, to));
                }
            }
            booked.push(Booked {
                id: state.id,
                uuid: r.uuid.as_str(),
                checkpoint: b.checkpoint,
                open,
                open_seq,
                flushed,
                totals: totals.into_iter().map(|((p, k), c)| (p, k, c)).collect(),
                aggregate,
                period,
            });
        }

        let path = &self.path;
        let tx = self
            .conn
            .transaction()
            .map_err(sql_err(path, "starting a tick"))?;
        {
            let mut put_checkpoint = tx
                .prepare_cached(
                    "INSERT INTO checkpoint (ct, epoch, at, slot, counters, open, open_seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (ct) DO UPDATE SET epoch = excluded.epoch, at = excluded.at,
                       slot = excluded.slot, counters = excluded.counters, open = excluded.open,
                       open_seq = excluded.open_seq",
                )
                .map_err(sql_err(path, "preparing the checkpoint upsert"))?;
            let mut put_slot = tx
                .prepare_cached(
                    "INSERT INTO slot (ct, slot, key, bytes, packets, flags, seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (ct, slot, key) DO UPDATE SET bytes = bytes + excluded.bytes,
                       packets = packets + excluded.packets, flags = flags | excluded.flags,
                       seq = excluded.seq",
                )
                .map_err(sql_err(path, "preparing the slot upsert"))?;
            let mut put_total = tx
                .prepare_cached(
                    "INSERT INTO total (ct, period_start, key, bytes, packets) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (ct, period_start, key) DO UPDATE SET
                       bytes = bytes + excluded.bytes, packets = packets + excluded.packets",
                )
                .map_err(sql_err(path, "preparing the totals upsert"))?;
            let mut min_slot: Option<i64> = None;
            for (done, b) in booked.iter().enumerate() {
                #[cfg(test)]
                if self.fail_after == Some(done) {
                    return Err(BillingError::Corrupt {
                        path: path.clone(),
                        op: "a tick",
                        detail: "injected failure".to_string(),
                    });
                }
                let _ = done;
                let cp = &b.checkpoint;
                put_checkpoint
                    .execute(params![
                        b.id,
                        cp.epoch as i64,
                        cp.at,
                        cp.slot,
                        encode_counters(&cp.counters),
                        encode_open(&b.open),
                        b.open_seq
                    ])
                    .map_err(sql_err(path, "writing a checkpoint"))?;
                if done == 0 {
                    berth_runtime::crash_point!("ledger.tick.mid_write");
                }
                for f in &b.flushed {
                    let idx = slot_index(f.slot_start);
                    min_slot = Some(min_slot.map_or(idx, |m| m.min(idx)));
                    put_slot
                        .execute(params![
                            b.id,
                            idx,
                            f.key.code(),
                            f.counter.bytes as i64,
                            f.counter.packets as i64,
                            f.flags.0,
                            seq
                        ])
                        .map_err(sql_err(path, "writing a slot"))?;
                }
                for (p, k, c) in &b.totals {
                    put_total
                        .execute(params![b.id, p, k.code(), c.bytes as i64, c.packets as i64])
                        .map_err(sql_err(path, "writing a period total"))?;
                }
                if let Some((from, to)) = b.aggregate {
                    agg::aggregate(&tx, path, b.id, from, to)?;
                }
            }
            if let Some(min_slot) = min_slot {
                tx.execute(
                    "INSERT INTO tick (seq, min_slot) VALUES (?1, ?2)",
                    [seq, min_slot],
                )
                .map_err(sql_err(path, "recording the tick"))?;
            }
            // `agg` moves with `seq`: this berth keeps the aggregate (store/agg.rs).
            tx.execute("UPDATE meta SET v = ?1 WHERE k IN ('seq', 'agg')", [seq])
                .map_err(sql_err(path, "advancing the sequence"))?;
        }
        tx.commit().map_err(sql_err(path, "committing a tick"))?;
        berth_runtime::crash_point!("ledger.tick.after_commit");
        self.seq = seq;
        for b in booked {
            if let Some(state) = self.cts.get_mut(b.uuid) {
                state.checkpoint = Some(b.checkpoint);
                state.open = b.open;
                state.open_seq = b.open_seq;
                if b.period.is_some() {
                    state.period = b.period;
                }
                if let Some((_, to)) = b.aggregate {
                    self.agg_next.insert(b.id, to);
                }
            }
        }
        Ok(summary)
    }
}
