//! The current period of every live CT, advanced tick by tick for berthd's gauges: the same
//! totals and per-direction 95th as [`Ledger::report`] at `now`, without re-reading the period's
//! slots each time (a 1000-CT `report all` late in a month is ~1 s of CPU; berthd ticks every
//! 30 s).
//!
//! Why it stays exact: nothing is ever booked before a CT's checkpoint slot (book.rs), so the
//! slots before it are final. Those "settled" slots are kept sorted per direction; each call
//! reads only the slots from the last settled one on (normally the current slot, in the open
//! rows), settles what the checkpoint has passed, and takes the nearest rank of the union. A
//! new period, a changed billing day or time zone, or a clock step back starts the CT afresh.
use std::collections::{BTreeMap, HashMap};

use rusqlite::OptionalExtension;

use super::super::p95::{SlotWindow, bytes_to_bps};
use super::super::period::Period;
use super::super::{BillingError, Counter, CounterKey, SLOT_SECS};
use super::{CtInfo, Ledger, decode_open, slot_index};

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
        let mut out = Vec::with_capacity(self.cts.len());
        let mut live = std::collections::HashSet::with_capacity(self.cts.len());
        for s in self.cts.values().filter(|s| s.info.destroyed.is_none()) {
            let period = s.spec.period_of(now)?;
            let window = SlotWindow::new(period.start, period.end, s.info.created, now);
            let cp: Option<(i64, Vec<u8>, i64)> = self
                .conn
                .prepare_cached("SELECT slot, open, open_seq FROM checkpoint WHERE ct = ?1")
                .and_then(|mut st| {
                    st.query_row([s.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()
                })
                .map_err(self.sql(op))?;
            let (cp_slot, open) = match cp {
                None => (None, Vec::new()),
                Some((slot, blob, seq)) => (
                    Some(slot),
                    decode_open(&blob, seq).ok_or_else(|| {
                        self.corrupt(op, format!("CT id {}: bad open-slot blob", s.id))
                    })?,
                ),
            };
            let totals = self.totals_with(s, period.start, &open)?;
            let target = cp_slot.map_or(window.first, |c| c.clamp(window.first, window.end));
            live.insert(s.info.uuid.as_str());
            let t = state
                .cts
                .entry(s.info.uuid.clone())
                .or_insert_with(|| Track {
                    period,
                    first: window.first,
                    settled: window.first,
                    ins: Vec::new(),
                    outs: Vec::new(),
                });
            if t.period != period || t.first != window.first || t.settled > target {
                *t = Track {
                    period,
                    first: window.first,
                    settled: window.first,
                    ins: Vec::new(),
                    outs: Vec::new(),
                };
            }
            // The slots not settled yet, dense.
            let (lo, hi) = (slot_index(t.settled), slot_index(window.end));
            let series = self.series_in(s, lo, hi, &open, aggregate)?;
            let len = (hi - lo).max(0) as usize;
            let (mut din, mut dout) = (vec![0u64; len], vec![0u64; len]);
            for x in &series.samples {
                let i = ((x.start - t.settled) / SLOT_SECS) as usize;
                din[i] = din[i].saturating_add(x.in_bytes);
                dout[i] = dout[i].saturating_add(x.out_bytes);
            }
            let settle = ((target - t.settled) / SLOT_SECS) as usize;
            settle_into(&mut t.ins, &din[..settle]);
            settle_into(&mut t.outs, &dout[..settle]);
            t.settled = target;
            let n = window.len();
            let k = (95 * n).div_ceil(100) as usize;
            out.push(CurrentBill {
                ct: s.info.clone(),
                period,
                totals,
                n,
                in_bps: bytes_to_bps(kth_of_union(&t.ins, &mut din[settle..], k)),
                out_bps: bytes_to_bps(kth_of_union(&t.outs, &mut dout[settle..], k)),
            });
        }
        state.cts.retain(|u, _| live.contains(u.as_str()));
        out.sort_by(|a, b| (a.ct.ctid, &a.ct.uuid).cmp(&(b.ct.ctid, &b.ct.uuid)));
        Ok(out)
    }
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
