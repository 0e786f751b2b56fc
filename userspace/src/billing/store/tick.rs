//! One tick: book every CT's reading and commit checkpoints, slots and totals together.
use std::collections::BTreeMap;

use rusqlite::params;

use super::super::book::{Booking, book};
use super::super::period::Period;
use super::super::{BillingError, Counter, CounterKey};
use super::{CtReading, Ledger, TickSummary, encode_counters, slot_index, sql_err};

/// One CT's booking in a tick: its id, UUID, booking, (period start, key, delta) totals and the
/// period its last addition fell in.
type Booked<'a> = (
    i64,
    &'a str,
    Booking,
    Vec<(i64, CounterKey, Counter)>,
    Option<Period>,
);

impl Ledger {
    /// Books one reading per CT in one transaction. Unknown CTs are rejected before anything is
    /// written. The in-memory checkpoints change only after the commit succeeded, so a failed
    /// tick can simply be repeated with fresh readings.
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
        // Booked first (pure), written second: per CT its id, booking and the periods it touched.
        let mut booked: Vec<Booked<'_>> = Vec::with_capacity(readings.len());
        for r in readings {
            let state = &self.cts[&r.uuid];
            let b = book(state.checkpoint.as_ref(), &r.reading, r.first);
            let mut totals: BTreeMap<(i64, CounterKey), Counter> = BTreeMap::new();
            let mut period = state.period;
            for a in &b.adds {
                if a.delta == Counter::default() {
                    continue;
                }
                let p = match period {
                    Some(p) if p.contains(a.slot_start) => p,
                    _ => state.spec.period_of(a.slot_start)?,
                };
                period = Some(p);
                let t = totals.entry((p.start, a.key)).or_default();
                t.bytes += a.delta.bytes;
                t.packets += a.delta.packets;
            }
            summary.slot_rows += b.adds.len() as u64;
            summary.anomalies += b.anomalies.len() as u64;
            summary.estimated_slots += b.gap_slots;
            summary.clock_steps += u64::from(b.clock_step);
            summary.new_epochs += u64::from(b.new_epoch);
            let totals = totals.into_iter().map(|((p, k), c)| (p, k, c)).collect();
            booked.push((state.id, r.uuid.as_str(), b, totals, period));
        }

        let tx = self
            .conn
            .transaction()
            .map_err(sql_err(&self.path, "starting a tick"))?;
        {
            let mut put_checkpoint = tx
                .prepare_cached(
                    "INSERT INTO checkpoint (ct, epoch, at, slot, counters) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (ct) DO UPDATE SET epoch = excluded.epoch, at = excluded.at,
                       slot = excluded.slot, counters = excluded.counters",
                )
                .map_err(sql_err(&self.path, "preparing the checkpoint upsert"))?;
            let mut put_slot = tx
                .prepare_cached(
                    "INSERT INTO slot (ct, slot, key, bytes, packets, flags, seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (ct, slot, key) DO UPDATE SET bytes = bytes + excluded.bytes,
                       packets = packets + excluded.packets, flags = flags | excluded.flags,
                       seq = excluded.seq",
                )
                .map_err(sql_err(&self.path, "preparing the slot upsert"))?;
            let mut put_total = tx
                .prepare_cached(
                    "INSERT INTO total (ct, period_start, key, bytes, packets) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (ct, period_start, key) DO UPDATE SET
                       bytes = bytes + excluded.bytes, packets = packets + excluded.packets",
                )
                .map_err(sql_err(&self.path, "preparing the totals upsert"))?;
            for (done, (id, _, b, totals, _)) in booked.iter().enumerate() {
                #[cfg(test)]
                if self.fail_after == Some(done) {
                    return Err(BillingError::Corrupt {
                        path: self.path.clone(),
                        op: "a tick",
                        detail: "injected failure".to_string(),
                    });
                }
                let _ = done;
                let cp = &b.checkpoint;
                put_checkpoint
                    .execute(params![
                        id,
                        cp.epoch as i64,
                        cp.at,
                        cp.slot,
                        encode_counters(&cp.counters)
                    ])
                    .map_err(sql_err(&self.path, "writing a checkpoint"))?;
                for a in &b.adds {
                    put_slot
                        .execute(params![
                            id,
                            slot_index(a.slot_start),
                            a.key.code(),
                            a.delta.bytes as i64,
                            a.delta.packets as i64,
                            a.flags.0,
                            seq
                        ])
                        .map_err(sql_err(&self.path, "writing a slot"))?;
                }
                for (p, k, c) in totals {
                    put_total
                        .execute(params![id, p, k.code(), c.bytes as i64, c.packets as i64])
                        .map_err(sql_err(&self.path, "writing a period total"))?;
                }
            }
            let min_slot = booked
                .iter()
                .flat_map(|(_, _, b, _, _)| b.adds.iter().map(|a| slot_index(a.slot_start)))
                .min();
            if let Some(min_slot) = min_slot {
                tx.execute(
                    "INSERT INTO tick (seq, min_slot) VALUES (?1, ?2)",
                    [seq, min_slot],
                )
                .map_err(sql_err(&self.path, "recording the tick"))?;
            }
            tx.execute("UPDATE meta SET v = ?1 WHERE k = 'seq'", [seq])
                .map_err(sql_err(&self.path, "advancing the sequence"))?;
        }
        tx.commit()
            .map_err(sql_err(&self.path, "committing a tick"))?;
        self.seq = seq;
        for (_, uuid, b, _, period) in booked {
            if let Some(state) = self.cts.get_mut(uuid) {
                state.checkpoint = Some(b.checkpoint);
                if period.is_some() {
                    state.period = period;
                }
            }
        }
        Ok(summary)
    }
}
