//! Reading the ledger back: slots, totals, reports, the sequence feed, and retention.
use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};

use super::super::p95::P95Mode;
use super::super::period::Period;
use super::super::{BillingError, Counter, CounterKey, SLOT_SECS, SlotFlags};
use super::agg;
use super::{
    CtState, Ledger, Report, Series, SlotRow, decode_open, report_from, slot_index, sql_err,
};

pub(super) fn row(
    slot: i64,
    key: i64,
    bytes: i64,
    packets: i64,
    flags: i64,
    seq: i64,
) -> Option<SlotRow> {
    Some(SlotRow {
        slot_start: slot * SLOT_SECS,
        key: CounterKey::from_code(u16::try_from(key).ok()?)?,
        counter: Counter::new(bytes as u64, packets as u64),
        flags: SlotFlags(u8::try_from(flags).ok()?),
        seq,
    })
}

impl Ledger {
    /// One read transaction: a reader in another process (the CLI) sees one committed state,
    /// never a row both in a checkpoint's open rows and, flushed meanwhile, in the slot table.
    pub(super) fn snapshot(&self) -> Result<rusqlite::Transaction<'_>, BillingError> {
        self.conn
            .unchecked_transaction()
            .map_err(self.sql("starting a read"))
    }

    /// A CT's open rows as committed (the writer's memory holds the same; a reader's may be
    /// older).
    fn open_rows(&self, id: i64) -> Result<(Vec<SlotRow>, i64), BillingError> {
        let op = "reading open slot rows";
        let got: Option<(Vec<u8>, i64)> = self
            .conn
            .prepare_cached("SELECT open, open_seq FROM checkpoint WHERE ct = ?1")
            .map_err(self.sql(op))?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(self.sql(op))?;
        match got {
            None => Ok((Vec::new(), 0)),
            Some((blob, seq)) => decode_open(&blob, seq)
                .map(|rows| (rows, seq))
                .ok_or_else(|| self.corrupt(op, format!("CT id {id}: bad open-slot blob"))),
        }
    }

    /// The slot rows of a CT overlapping `[from, to)`, oldest first.
    pub fn slots(&self, uuid: &str, from: i64, to: i64) -> Result<Vec<SlotRow>, BillingError> {
        let _read = self.snapshot()?;
        self.slots_in(uuid, from, to)
    }

    fn slots_in(&self, uuid: &str, from: i64, to: i64) -> Result<Vec<SlotRow>, BillingError> {
        let state = self.state(uuid)?;
        let (lo, hi) = slot_range(from, to);
        let mut out = self.table_slots(state, lo, hi)?;
        // Open rows are never in the table too: they are newer than every flushed slot.
        let (open, _) = self.open_rows(state.id)?;
        out.extend(
            open.into_iter()
                .filter(|o| o.slot_start >= lo * SLOT_SECS && o.slot_start < hi * SLOT_SECS),
        );
        Ok(out)
    }

    /// The slot table's rows of slot indexes `[lo, hi)`, by slot and key.
    fn table_slots(&self, state: &CtState, lo: i64, hi: i64) -> Result<Vec<SlotRow>, BillingError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT slot, key, bytes, packets, flags, seq FROM slot
                 WHERE ct = ?1 AND slot >= ?2 AND slot < ?3 ORDER BY slot, key",
            )
            .map_err(self.sql("reading slots"))?;
        let rows = stmt
            .query_map(params![state.id, lo, hi], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .map_err(self.sql("reading slots"))?;
        let mut out = Vec::new();
        for r in rows {
            let (s, k, b, p, f, q) = r.map_err(self.sql("reading slots"))?;
            out.push(row(s, k, b, p, f, q).ok_or_else(|| {
                self.corrupt(
                    "reading slots",
                    format!("CT {}: bad key {k} or flags {f}", state.info.uuid),
                )
            })?);
        }
        Ok(out)
    }

    /// Slot rows changed by ticks after `after_seq` (a CT's open rows carry the seq of the tick
    /// that last changed any of them), in (seq, CT id, slot, key) order: the feed
    /// a fleet shipper pulls (`GET /v1/billing/slots?after_seq=N`). At most `limit` rows, except
    /// that one tick's rows are never split, so the last row's seq is the next `after_seq`. A row
    /// changed again later reappears with its new seq and its full value (an idempotent upsert).
    pub fn slots_after_seq(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(String, SlotRow)>, BillingError> {
        let op = "reading the slot feed";
        let _read = self.snapshot()?;
        let (min_slot, oldest): (Option<i64>, Option<i64>) = self
            .conn
            .query_row(
                "SELECT (SELECT min(min_slot) FROM tick WHERE seq > ?1), (SELECT min(seq) FROM tick)",
                [after_seq],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.sql(op))?;
        // No tick record after `after_seq`: only open rows can have changed.
        let mut min_slot = min_slot.unwrap_or(i64::MAX);
        if oldest.is_some_and(|o| after_seq + 1 < o) {
            // Tick records before `oldest` were pruned with their slots: look at every row kept.
            min_slot = i64::MIN;
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT slot, key, bytes, packets, flags, seq FROM slot
                 WHERE ct = ?1 AND slot >= ?2 AND seq > ?3",
            )
            .map_err(self.sql(op))?;
        let mut out: Vec<(i64, String, SlotRow)> = Vec::new();
        for s in self.cts.values() {
            let rows = stmt
                .query_map(params![s.id, min_slot, after_seq], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .map_err(self.sql(op))?;
            for r in rows {
                let (sl, k, b, p, f, q) = r.map_err(self.sql(op))?;
                let slot = row(sl, k, b, p, f, q).ok_or_else(|| {
                    self.corrupt(op, format!("CT {}: bad key {k} or flags {f}", s.info.uuid))
                })?;
                out.push((s.id, s.info.uuid.clone(), slot));
            }
            let (open, open_seq) = self.open_rows(s.id)?;
            if open_seq > after_seq {
                out.extend(open.into_iter().map(|o| (s.id, s.info.uuid.clone(), o)));
            }
        }
        out.sort_by_key(|(id, _, r)| (r.seq, *id, r.slot_start, r.key.code()));
        if let Some(cut) = out.get(limit as usize).map(|(_, _, r)| r.seq) {
            // Keep whole ticks: drop the tick the limit falls in, unless it is the first one.
            let start = out
                .iter()
                .position(|(_, _, r)| r.seq == cut)
                .unwrap_or(out.len());
            let end = if start == 0 {
                out.iter()
                    .position(|(_, _, r)| r.seq != cut)
                    .unwrap_or(out.len())
            } else {
                start
            };
            out.truncate(end);
        }
        Ok(out.into_iter().map(|(_, u, r)| (u, r)).collect())
    }

    /// The exact totals of a CT for the period starting at `period_start`.
    pub fn totals(
        &self,
        uuid: &str,
        period_start: i64,
    ) -> Result<BTreeMap<CounterKey, Counter>, BillingError> {
        let _read = self.snapshot()?;
        self.totals_in(uuid, period_start)
    }

    fn totals_in(
        &self,
        uuid: &str,
        period_start: i64,
    ) -> Result<BTreeMap<CounterKey, Counter>, BillingError> {
        let state = self.state(uuid)?;
        let (open, _) = self.open_rows(state.id)?;
        self.totals_with(state, period_start, &open)
    }

    /// The totals table's rows plus the open rows of the period.
    pub(super) fn totals_with(
        &self,
        state: &CtState,
        period_start: i64,
        open: &[SlotRow],
    ) -> Result<BTreeMap<CounterKey, Counter>, BillingError> {
        let uuid = &state.info.uuid;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, bytes, packets FROM total WHERE ct = ?1 AND period_start = ?2",
            )
            .map_err(self.sql("reading totals"))?;
        let rows = stmt
            .query_map(params![state.id, period_start], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(self.sql("reading totals"))?;
        let mut out: BTreeMap<CounterKey, Counter> = BTreeMap::new();
        for r in rows {
            let (k, b, p) = r.map_err(self.sql("reading totals"))?;
            let key = u16::try_from(k)
                .ok()
                .and_then(CounterKey::from_code)
                .ok_or_else(|| self.corrupt("reading totals", format!("CT {uuid}: bad key {k}")))?;
            out.insert(key, Counter::new(b as u64, p as u64));
        }
        // Open rows are sorted by slot: the period lookup (time zone arithmetic) runs once per
        // distinct slot, not per row.
        let mut last: Option<(i64, bool)> = None;
        for o in open {
            if o.counter == Counter::default() {
                continue;
            }
            let inside = match last {
                Some((slot, inside)) if slot == o.slot_start => inside,
                _ => state.spec.period_of(o.slot_start)?.start == period_start,
            };
            last = Some((o.slot_start, inside));
            if inside {
                let t = out.entry(o.key).or_default();
                t.bytes += o.counter.bytes;
                t.packets += o.counter.packets;
            }
        }
        Ok(out)
    }

    /// Whether `slot_hour` sums every slot row: its writer keeps `meta.agg` at `meta.seq`
    /// (read in the caller's snapshot).
    pub(super) fn aggregate_current(&self) -> Result<bool, BillingError> {
        self.conn
            .prepare_cached(
                "SELECT (SELECT v FROM meta WHERE k = 'agg') IS (SELECT v FROM meta WHERE k = 'seq')",
            )
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(self.sql("reading the aggregate's state"))
    }

    /// The per-slot series of slot indexes `[lo, hi)`: the aggregate's hours and the slot rows
    /// after its last one (or, while the aggregate is not current, the slot rows alone), plus
    /// the open rows.
    pub(super) fn series_in(
        &self,
        state: &CtState,
        lo: i64,
        hi: i64,
        open: &[SlotRow],
        aggregate: bool,
    ) -> Result<Series, BillingError> {
        let op = "reading the per-slot aggregate";
        let mut series = Series::with_capacity((hi - lo).clamp(0, 1 << 16) as usize);
        let mut rows_from = lo;
        // The aggregate sums every class: a CT billed for some classes only is read from its
        // slot rows.
        let aggregate = aggregate && state.info.classes.is_none();
        if aggregate && lo < hi {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT hour, v FROM slot_hour WHERE ct = ?1 AND hour >= ?2 AND hour <= ?3",
                )
                .map_err(self.sql(op))?;
            let mut rows = stmt
                .query(params![state.id, agg::hour_of(lo), agg::hour_of(hi - 1)])
                .map_err(self.sql(op))?;
            let (from, to) = (lo * SLOT_SECS, hi * SLOT_SECS);
            while let Some(r) = rows.next().map_err(self.sql(op))? {
                let hour: i64 = r.get(0).map_err(self.sql(op))?;
                let blob = r
                    .get_ref(1)
                    .and_then(|v| Ok(v.as_blob()?))
                    .map_err(self.sql(op))?;
                agg::decode(hour, blob, |s| {
                    if from <= s.start && s.start < to {
                        series.push_sum(s);
                    }
                })
                .ok_or_else(|| {
                    self.corrupt(
                        op,
                        format!("CT {}: bad aggregate of hour {hour}", state.info.uuid),
                    )
                })?;
                // The aggregated hours are a prefix of the hours with rows: an hour after the
                // last one read is either not aggregated yet or has no rows.
                rows_from = rows_from.max((hour + 1) * agg::HOUR_SLOTS);
            }
        }
        if rows_from < hi {
            series.push_rows(&self.table_slots(state, rows_from, hi)?, &state.info);
        }
        let (from, to) = (lo * SLOT_SECS, hi * SLOT_SECS);
        let first = open.partition_point(|o| o.slot_start < from);
        let n = open[first..].partition_point(|o| o.slot_start < to);
        series.push_rows(&open[first..first + n], &state.info);
        Ok(series)
    }

    /// The bill of a CT for `period`: exact totals (kept for good) and the 95th over the slots
    /// (available while the slots are retained), as of `now`.
    pub fn report(
        &self,
        uuid: &str,
        period: &Period,
        mode: P95Mode,
        commit_bps: Option<u64>,
        now: i64,
    ) -> Result<Report, BillingError> {
        let _read = self.snapshot()?;
        let aggregate = self.aggregate_current()?;
        self.report_in(uuid, period, mode, commit_bps, now, aggregate)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn report_in(
        &self,
        uuid: &str,
        period: &Period,
        mode: P95Mode,
        commit_bps: Option<u64>,
        now: i64,
        aggregate: bool,
    ) -> Result<Report, BillingError> {
        let state = self.state(uuid)?;
        let (open, _) = self.open_rows(state.id)?;
        let totals = self.totals_with(state, period.start, &open)?;
        let (lo, hi) = slot_range(period.start, period.end);
        let series = self.series_in(state, lo, hi, &open, aggregate)?;
        Ok(report_from(
            state.info.clone(),
            *period,
            totals,
            &series,
            mode,
            commit_bps,
            now,
        ))
    }

    /// The bill of every CT for the period holding `at` in each CT's own terms (billing day and
    /// time zone), sorted by CTID then UUID.
    pub fn report_all(
        &self,
        at: i64,
        mode: P95Mode,
        commit_bps: Option<u64>,
        now: i64,
    ) -> Result<Vec<Report>, BillingError> {
        let _read = self.snapshot()?;
        let aggregate = self.aggregate_current()?;
        let mut out = Vec::with_capacity(self.cts.len());
        for s in self.cts.values() {
            let period = s.spec.period_of(at)?;
            out.push(self.report_in(&s.info.uuid, &period, mode, commit_bps, now, aggregate)?);
        }
        out.sort_by(|a, b| (a.ct.ctid, &a.ct.uuid).cmp(&(b.ct.ctid, &b.ct.uuid)));
        Ok(out)
    }

    /// Deletes slot rows older than the current period (as of `now`) and the
    /// `retention_periods` before it, per CT in its own terms. Totals stay. Returns rows deleted.
    pub fn prune(&mut self, now: i64) -> Result<u64, BillingError> {
        let mut cutoffs = Vec::with_capacity(self.cts.len());
        for s in self.cts.values() {
            let mut p = s.spec.period_of(now)?;
            for _ in 0..self.options.retention_periods {
                p = s.spec.prev(&p)?;
            }
            cutoffs.push((s.id, p.start));
        }
        let path = &self.path;
        let oldest_kept = cutoffs.iter().map(|(_, start)| slot_index(*start)).min();
        let tx = self
            .conn
            .transaction()
            .map_err(sql_err(path, "pruning slots"))?;
        let mut deleted = 0u64;
        if let Some(oldest) = oldest_kept {
            tx.execute("DELETE FROM tick WHERE min_slot < ?1", [oldest])
                .map_err(sql_err(path, "pruning tick records"))?;
        }
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM slot WHERE ct = ?1 AND slot < ?2")
                .map_err(sql_err(path, "pruning slots"))?;
            let op = "pruning the per-slot aggregate";
            let mut hours = tx
                .prepare_cached("DELETE FROM slot_hour WHERE ct = ?1 AND hour < ?2")
                .map_err(sql_err(path, op))?;
            let mut cut_hour = tx
                .prepare_cached("SELECT v FROM slot_hour WHERE ct = ?1 AND hour = ?2")
                .map_err(sql_err(path, op))?;
            let mut put_hour = tx
                .prepare_cached("UPDATE slot_hour SET v = ?3 WHERE ct = ?1 AND hour = ?2")
                .map_err(sql_err(path, op))?;
            for (id, start) in cutoffs {
                // A period start between slot boundaries keeps the slot it falls in.
                let cut = slot_index(start);
                let n = stmt
                    .execute(params![id, cut])
                    .map_err(sql_err(path, "pruning slots"))?;
                deleted += n as u64;
                // The aggregate keeps exactly the slots kept (a period edge inside an hour:
                // time zones at :30 and :45 offsets).
                let hour = agg::hour_of(cut);
                hours
                    .execute(params![id, hour])
                    .map_err(sql_err(path, op))?;
                let off = cut - hour * agg::HOUR_SLOTS;
                if off > 0 {
                    let blob: Option<Vec<u8>> = cut_hour
                        .query_row(params![id, hour], |r| r.get(0))
                        .optional()
                        .map_err(sql_err(path, op))?;
                    if let Some(blob) = blob {
                        let kept =
                            agg::keep_from(&blob, off).ok_or_else(|| BillingError::Corrupt {
                                path: path.clone(),
                                op,
                                detail: format!("CT id {id}: bad aggregate of hour {hour}"),
                            })?;
                        put_hour
                            .execute(params![id, hour, kept])
                            .map_err(sql_err(path, op))?;
                    }
                }
            }
        }
        tx.commit().map_err(sql_err(path, "pruning slots"))?;
        Ok(deleted)
    }
}

/// Slot indexes `[lo, hi)` of the instants `[from, to)`. The slot holding `from` counts, as in
/// `SlotWindow`: a period edge off the 5-minute grid (historic local mean time) shares its slot.
fn slot_range(from: i64, to: i64) -> (i64, i64) {
    (
        from.div_euclid(SLOT_SECS),
        (to + SLOT_SECS - 1).div_euclid(SLOT_SECS),
    )
}
