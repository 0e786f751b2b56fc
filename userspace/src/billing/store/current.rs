//! The current period of every live CT, advanced tick by tick for berthd's gauges: the same
//! totals and per-direction 95th as [`Ledger::report`] at `now`, without re-reading the period's
//! slots each time (a 1000-CT `report all` late in a month is ~1 s of CPU; berthd ticks every
//! 30 s).
//!
//! Why it stays exact: nothing is ever booked before a CT's checkpoint slot (book.rs), so the
//! slots before it are final. Those "settled" slots are kept sorted per direction. Each call
//! reads every checkpoint in one scan, settles the slots the checkpoint has passed since (once
//! per 5-minute slot: a query or two), takes the rest (at or after the checkpoint slot: only in
//! the open rows) from the checkpoint, and takes the nearest rank of the union; the totals are
//! one query per CT. A new period, a changed billing day or time zone, or a clock step back
//! starts the CT afresh.
use std::collections::{BTreeMap, HashMap};

use super::super::p95::{SlotSample, SlotWindow, bytes_to_bps};
use super::super::period::Period;
use super::super::{BillingError, Counter, CounterKey, SLOT_SECS};
use super::{CtInfo, Ledger, Series, SlotRow, decode_open, slot_index};

/// What [`Ledger::current_periods`] keeps between calls (start with `default()`).
#[derive(Debug, Default)]
pub struct CurrentPeriods {
    cts: HashMap<String, Track>,
}

#[cfg(test)]
impl CurrentPeriods {
    pub(crate) fn tracked(&self) -> usize {
        self.cts.len()
    }
}

#[derive(Debug)]
struct Track {
    period: Period,
    /// The class filter the slots were summed with (a change starts over).
    classes: Option<Vec<u8>>,
    /// First slot of the window.
    first: i64,
    /// Slots `[first, settled)` are final and in `ins`/`outs` (sorted, missing slots as 0).
    settled: i64,
    ins: Vec<u64>,
    outs: Vec<u64>,
}

/// One live CT's current-period bill: what `report(.., P95Mode::PerDirection, None, now)` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentBill {
    pub ct: CtInfo,
    pub period: Period,
    pub totals: BTreeMap<CounterKey, Counter>,
    /// Slots in the window.
    pub n: u64,
    /// The inbound and outbound 95th, bits/s.
    pub in_bps: u64,
    pub out_bps: u64,
}

impl Ledger {
    /// Every CT not destroyed, for the period holding `now` in its own terms, sorted by CTID
    /// then UUID. `state` must be used with one ledger file only.
    pub fn current_periods(
        &self,
        state: &mut CurrentPeriods,
        now: i64,
    ) -> Result<Vec<CurrentBill>, BillingError> {
        let op = "reading the checkpoints";
        let _read = self.snapshot()?;
        let aggregate = self.aggregate_current()?;
        // Every checkpoint in one scan (within the snapshot: the ledger's load may be older).
        let mut cps: HashMap<i64, (i64, Vec<SlotRow>)> = HashMap::with_capacity(self.cts.len());
        {
            let mut st = self
                .conn
                .prepare_cached("SELECT ct, slot, open, open_seq FROM checkpoint")
                .map_err(self.sql(op))?;
            let mut rows = st.query([]).map_err(self.sql(op))?;
            while let Some(r) = rows.next().map_err(self.sql(op))? {
                let (id, slot, seq): (i64, i64, i64) = (
                    r.get(0).map_err(self.sql(op))?,
                    r.get(1).map_err(self.sql(op))?,
                    r.get(3).map_err(self.sql(op))?,
                );
                let blob = r
                    .get_ref(2)
                    .and_then(|v| Ok(v.as_blob()?))
                    .map_err(self.sql(op))?;
                let open = decode_open(blob, seq)
                    .ok_or_else(|| self.corrupt(op, format!("CT id {id}: bad open-slot blob")))?;
                cps.insert(id, (slot, open));
            }
        }
        let mut out = Vec::with_capacity(self.cts.len());
        let mut live = std::collections::HashSet::with_capacity(self.cts.len());
        for s in self.cts.values().filter(|s| s.info.destroyed.is_none()) {
            let period = s.spec.period_of(now)?;
            let window = SlotWindow::new(period.start, period.end, s.info.created, now);
            let (cp_slot, open) = match cps.get(&s.id) {
                Some((slot, open)) => (Some(*slot), open.as_slice()),
                None => (None, &[][..]),
            };
            let totals = self.totals_with(s, period.start, open)?;
            // Without a checkpoint nothing was ever booked: no rows, all slots 0.
            let target = cp_slot.map_or(window.first, |c| c.clamp(window.first, window.end));
            live.insert(s.info.uuid.as_str());
            let fresh = || Track {
                period,
                classes: s.info.classes.clone(),
                first: window.first,
                settled: window.first,
                ins: Vec::new(),
                outs: Vec::new(),
            };
            let t = state.cts.entry(s.info.uuid.clone()).or_insert_with(fresh);
            if t.period != period
                || t.first != window.first
                || t.settled > target
                || t.classes != s.info.classes
            {
                *t = fresh();
            }
            // The slots the checkpoint has passed since: from the aggregate, slot and open rows.
            if t.settled < target {
                let series = self.series_in(
                    s,
                    slot_index(t.settled),
                    slot_index(target),
                    open,
                    aggregate,
                )?;
                let (din, dout) = dense(&series.samples, t.settled, target);
                settle_into(&mut t.ins, &din);
                settle_into(&mut t.outs, &dout);
                t.settled = target;
            }
            // The rest are at or after the checkpoint slot, so only in the open rows (a flush
            // moves the rows before it).
            let from = open.partition_point(|o| o.slot_start < target);
            let mut rest = Series::default();
            rest.push_rows(&open[from..], &s.info);
            let (mut din, mut dout) = dense(&rest.samples, target, window.end);
            let n = window.len();
            let k = (95 * n).div_ceil(100) as usize;
            out.push(CurrentBill {
                ct: s.info.clone(),
                period,
                totals,
                n,
                in_bps: bytes_to_bps(kth_of_union(&t.ins, &mut din, k)),
                out_bps: bytes_to_bps(kth_of_union(&t.outs, &mut dout, k)),
            });
        }
        state.cts.retain(|u, _| live.contains(u.as_str()));
        out.sort_by(|a, b| (a.ct.ctid, &a.ct.uuid).cmp(&(b.ct.ctid, &b.ct.uuid)));
        Ok(out)
    }
}

/// Per-slot inbound and outbound bytes of `[from, to)` (slot starts), missing slots as 0.
fn dense(samples: &[SlotSample], from: i64, to: i64) -> (Vec<u64>, Vec<u64>) {
    let len = ((to - from) / SLOT_SECS).max(0) as usize;
    let (mut din, mut dout) = (vec![0u64; len], vec![0u64; len]);
    for x in samples.iter().filter(|x| from <= x.start && x.start < to) {
        let i = ((x.start - from) / SLOT_SECS) as usize;
        din[i] = din[i].saturating_add(x.in_bytes);
        dout[i] = dout[i].saturating_add(x.out_bytes);
    }
    (din, dout)
}

/// Adds `new` to the sorted `sorted`.
fn settle_into(sorted: &mut Vec<u64>, new: &[u64]) {
    if new.len() > 8 {
        sorted.extend_from_slice(new);
        sorted.sort_unstable();
    } else {
        for v in new {
            let at = sorted.partition_point(|x| x <= v);
            sorted.insert(at, *v);
        }
    }
}

/// The `k`-th smallest (1-based) of `a` (sorted) and `b` together; 0 when `k` is 0. `b` is
/// reordered. The k smallest take `j` values from `b` and `k − j` from `a`: the right `j` is the
/// one where neither side's next value is smaller than the other's last taken.
fn kth_of_union(a: &[u64], b: &mut [u64], k: usize) -> u64 {
    if k == 0 {
        return 0;
    }
    debug_assert!(k <= a.len() + b.len());
    b.sort_unstable();
    let lo = k.saturating_sub(a.len());
    let hi = k.min(b.len());
    for j in lo..=hi {
        let i = k - j;
        let b_fits = j == 0 || i == a.len() || b[j - 1] <= a[i];
        let a_fits = i == 0 || j == b.len() || a[i - 1] <= b[j];
        if b_fits && a_fits {
            let from_a = if i > 0 { a[i - 1] } else { 0 };
            let from_b = if j > 0 { b[j - 1] } else { 0 };
            return from_a.max(from_b);
        }
    }
    unreachable!("a partition of the k smallest always exists (k ≤ |a| + |b|)")
}

#[cfg(test)]
mod tests {
    use super::super::super::testrng::Rng;
    use super::*;

    #[test]
    fn kth_of_union_equals_sorting_both() {
        let mut rng = Rng::new(3);
        for round in 0..2000u64 {
            let na = rng.below(40) as usize;
            let nb = rng.below(6) as usize;
            // Few distinct values: duplicates across both sides.
            let range = 1 + round % 7;
            let mut a: Vec<u64> = (0..na).map(|_| rng.below(range)).collect();
            a.sort_unstable();
            let mut b: Vec<u64> = (0..nb).map(|_| rng.below(range)).collect();
            let mut all: Vec<u64> = a.iter().chain(&b).copied().collect();
            all.sort_unstable();
            for k in 0..=all.len() {
                let want = if k == 0 { 0 } else { all[k - 1] };
                assert_eq!(kth_of_union(&a, &mut b, k), want, "{a:?} {b:?} k={k}");
            }
        }
    }

    #[test]
    fn settle_into_keeps_order() {
        let mut v = vec![1, 5, 9];
        settle_into(&mut v, &[5, 0, 10]);
        assert_eq!(v, [0, 1, 5, 5, 9, 10]);
        settle_into(&mut v, &[3; 9]);
        assert_eq!(v.len(), 15);
        assert!(v.is_sorted());
    }
}
