//! The 95th percentile of a CT's 5-minute rates over a billing period, by nearest rank: every
//! slot of the period within the CT's lifetime counts, a slot without a row counts as 0 (counting
//! only stored rows, as LibreNMS does, inflates the bill), the values are sorted ascending and the
//! k-th is taken with k = ⌈95·n/100⌉ — never interpolated (Prometheus' `quantile_over_time` is).
use std::str::FromStr;

use super::{BillingError, SLOT_SECS};

/// How the inbound and outbound series make one billed 95th.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum P95Mode {
    /// The larger of the inbound and the outbound 95th (the usual transit contract).
    #[default]
    Max,
    /// Inbound and outbound 95th reported separately; the billed value is their maximum.
    PerDirection,
    /// The 95th of in+out per slot.
    Sum,
    /// The 95th of max(in, out) per slot.
    MaxPerSlot,
}

impl P95Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            P95Mode::Max => "max",
            P95Mode::PerDirection => "per-direction",
            P95Mode::Sum => "sum",
            P95Mode::MaxPerSlot => "max-per-slot",
        }
    }
}

impl FromStr for P95Mode {
    type Err = BillingError;
    fn from_str(s: &str) -> Result<P95Mode, BillingError> {
        match s {
            "max" => Ok(P95Mode::Max),
            "per-direction" => Ok(P95Mode::PerDirection),
            "sum" => Ok(P95Mode::Sum),
            "max-per-slot" => Ok(P95Mode::MaxPerSlot),
            _ => Err(BillingError::Mode(s.to_string())),
        }
    }
}

/// The bytes of one slot (all classes and families the bill covers, summed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotSample {
    /// Slot start (Unix seconds, a multiple of 300).
    pub start: i64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Part of the slot's bytes was spread over a gap.
    pub estimated: bool,
}

/// The slots a 95th is taken over: `[first, end)` slot starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotWindow {
    pub first: i64,
    pub end: i64,
}

impl SlotWindow {
    /// Slots of `[max(start, created), min(end, until))`, where `until` is the earlier of now and
    /// the CT's destruction. A slot the CT lived in for part of counts whole: it holds its bytes.
    pub fn new(start: i64, end: i64, created: i64, until: i64) -> SlotWindow {
        let lo = start.max(created);
        let hi = end.min(until);
        let first = super::slot_of(lo);
        let end = if hi <= lo {
            first
        } else {
            (hi + SLOT_SECS - 1).div_euclid(SLOT_SECS) * SLOT_SECS
        };
        SlotWindow { first, end }
    }

    pub fn len(&self) -> u64 {
        ((self.end - self.first) / SLOT_SECS) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, slot: i64) -> bool {
        self.first <= slot && slot < self.end
    }
}

/// The result of a 95th computation. Rates are bits/s: bytes·8/300, rounded down (integer
/// arithmetic, so a bill never rounds up past what was carried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P95Report {
    pub mode: P95Mode,
    /// Slots in the window (missing ones count as 0).
    pub n: u64,
    /// Slots with a stored row.
    pub slots_present: u64,
    /// Slots whose bytes were (partly) estimated over a gap.
    pub slots_estimated: u64,
    /// Slots whose billed rate (in+out for `sum`, else the larger direction) exceeds the commit.
    pub slots_over_commit: u64,
    /// Inbound 95th (all modes but `sum` and `max-per-slot`).
    pub in_bps: Option<u64>,
    pub out_bps: Option<u64>,
    /// The billed 95th.
    pub bps: u64,
    /// The billed 95th as bytes in one slot (exact; `bps` derives from it).
    pub slot_bytes: u64,
}

/// Rate of `bytes` in one 300-second slot, in bits/s, rounded down.
pub fn bytes_to_bps(bytes: u64) -> u64 {
    (u128::from(bytes) * 8 / SLOT_SECS as u128) as u64
}

/// Nearest-rank 95th of `values` (reordered): the k-th smallest, k = ⌈95·n/100⌉; 0 if empty.
pub fn nearest_rank(values: &mut [u64]) -> u64 {
    let n = values.len() as u64;
    if n == 0 {
        return 0;
    }
    let k = (95 * n).div_ceil(100);
    let (_, kth, _) = values.select_nth_unstable(k as usize - 1);
    *kth
}

/// The 95th of `samples` over `window`. Samples outside the window are ignored; a slot listed
/// twice is summed (several classes or families booked separately).
pub fn p95(
    samples: &[SlotSample],
    window: SlotWindow,
    mode: P95Mode,
    commit_bps: Option<u64>,
) -> P95Report {
    let n = window.len() as usize;
    let mut ins = vec![0u64; n];
    let mut outs = vec![0u64; n];
    let mut present = vec![false; n];
    let mut estimated = vec![false; n];
    for s in samples.iter().filter(|s| window.contains(s.start)) {
        let i = ((s.start - window.first) / SLOT_SECS) as usize;
        ins[i] = ins[i].saturating_add(s.in_bytes);
        outs[i] = outs[i].saturating_add(s.out_bytes);
        present[i] = true;
        estimated[i] |= s.estimated;
    }
    let per_slot: Vec<u64> = match mode {
        P95Mode::Sum => ins
            .iter()
            .zip(&outs)
            .map(|(a, b)| a.saturating_add(*b))
            .collect(),
        _ => ins.iter().zip(&outs).map(|(a, b)| *a.max(b)).collect(),
    };
    let slots_over_commit = match commit_bps {
        Some(c) => per_slot.iter().filter(|b| bytes_to_bps(**b) > c).count() as u64,
        None => 0,
    };
    let (in_b, out_b, billed) = match mode {
        P95Mode::Max | P95Mode::PerDirection => {
            let i = nearest_rank(&mut ins);
            let o = nearest_rank(&mut outs);
            (Some(i), Some(o), i.max(o))
        }
        P95Mode::Sum | P95Mode::MaxPerSlot => {
            let mut v = per_slot;
            (None, None, nearest_rank(&mut v))
        }
    };
    P95Report {
        mode,
        n: n as u64,
        slots_present: present.iter().filter(|p| **p).count() as u64,
        slots_estimated: estimated.iter().filter(|e| **e).count() as u64,
        slots_over_commit,
        in_bps: in_b.map(bytes_to_bps),
        out_bps: out_b.map(bytes_to_bps),
        bps: bytes_to_bps(billed),
        slot_bytes: billed,
    }
}

#[cfg(test)]
mod tests {
    use super::super::period::{BillingAnchor, PeriodSpec};
    use super::super::testrng::Rng;
    use super::*;

    #[test]
    fn nearest_rank_small_cases() {
        assert_eq!(nearest_rank(&mut []), 0);
        assert_eq!(nearest_rank(&mut [7]), 7);
        // n = 20: k = 19 → the 19th smallest; the top 1 (5 %) is dropped.
        let mut v: Vec<u64> = (1..=20).rev().collect();
        assert_eq!(nearest_rank(&mut v), 19);
        // n = 21: k = ceil(19.95) = 20.
        let mut v: Vec<u64> = (1..=21).collect();
        assert_eq!(nearest_rank(&mut v), 20);
        // n = 100: k = 95.
        let mut v: Vec<u64> = (1..=100).collect();
        assert_eq!(nearest_rank(&mut v), 95);
    }

    #[test]
    fn shuffled_ramp_gives_the_rank_computed_by_counting() {
        let mut rng = Rng::new(0x5eed);
        for n in [1u64, 2, 19, 20, 21, 99, 100, 101, 288, 8928, 8940] {
            // Ramp 1..=n bytes·1000 shuffled: the k-th smallest is k·1000.
            let mut v: Vec<u64> = (1..=n).map(|i| i * 1000).collect();
            rng.shuffle(&mut v);
            // Independent k: the smallest k with k·100 ≥ 95·n.
            let k = (1..=n).find(|k| k * 100 >= 95 * n).unwrap();
            assert_eq!(nearest_rank(&mut v), k * 1000, "n={n}");
        }
    }

    #[test]
    fn rates_round_down() {
        assert_eq!(bytes_to_bps(0), 0);
        assert_eq!(bytes_to_bps(37), 0); // 296/300
        assert_eq!(bytes_to_bps(38), 1); // 304/300
        assert_eq!(bytes_to_bps(3_750_000_000), 100_000_000); // 100 Mbit/s
        assert_eq!(
            bytes_to_bps(u64::MAX),
            (u128::from(u64::MAX) * 8 / 300) as u64
        );
    }

    #[test]
    fn mode_parse_round_trips() {
        for m in [
            P95Mode::Max,
            P95Mode::PerDirection,
            P95Mode::Sum,
            P95Mode::MaxPerSlot,
        ] {
            assert_eq!(m.as_str().parse::<P95Mode>().unwrap(), m);
        }
        assert!(matches!(
            "p95".parse::<P95Mode>(),
            Err(BillingError::Mode(_))
        ));
    }

    /// Every mode against answers computed by sorting full vectors, with the slots shuffled and
    /// a third of them missing (they must count as 0).
    #[test]
    fn each_mode_on_a_shuffled_series_with_missing_slots() {
        let mut rng = Rng::new(42);
        let window = SlotWindow {
            first: 600_000,
            end: 600_000 + 2000 * SLOT_SECS,
        };
        let mut full_in = vec![0u64; 2000];
        let mut full_out = vec![0u64; 2000];
        let mut samples = Vec::new();
        for i in 0..2000usize {
            if i % 3 == 0 {
                continue;
            }
            let (a, b) = (rng.below(1_000_000_000), rng.below(3_000_000_000));
            full_in[i] = a;
            full_out[i] = b;
            samples.push(SlotSample {
                start: window.first + i as i64 * SLOT_SECS,
                in_bytes: a,
                out_bytes: b,
                estimated: i % 7 == 1,
            });
        }
        // A sample outside the window is ignored.
        samples.push(SlotSample {
            start: window.end,
            in_bytes: u64::MAX / 4,
            out_bytes: 0,
            estimated: true,
        });
        rng.shuffle(&mut samples);
        let kth = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[(95 * v.len()).div_ceil(100) - 1]
        };
        let pin = kth(full_in.clone());
        let pout = kth(full_out.clone());
        let psum = kth(full_in.iter().zip(&full_out).map(|(a, b)| a + b).collect());
        let pmax = kth(full_in
            .iter()
            .zip(&full_out)
            .map(|(a, b)| *a.max(b))
            .collect());
        let commit = 50_000_000u64;
        let over = |v: Vec<u64>| v.iter().filter(|b| **b * 8 / 300 > commit).count() as u64;

        let r = p95(&samples, window, P95Mode::Max, Some(commit));
        assert_eq!((r.n, r.slots_present), (2000, 1333));
        assert_eq!(
            r.slots_estimated,
            (0..2000).filter(|i| i % 3 != 0 && i % 7 == 1).count() as u64
        );
        assert_eq!(r.in_bps, Some(pin * 8 / 300));
        assert_eq!(r.out_bps, Some(pout * 8 / 300));
        assert_eq!(r.slot_bytes, pin.max(pout));
        assert_eq!(
            r.slots_over_commit,
            over(
                full_in
                    .iter()
                    .zip(&full_out)
                    .map(|(a, b)| *a.max(b))
                    .collect()
            )
        );
        let r = p95(&samples, window, P95Mode::PerDirection, None);
        assert_eq!(
            (r.in_bps, r.out_bps, r.bps),
            (
                Some(pin * 8 / 300),
                Some(pout * 8 / 300),
                pin.max(pout) * 8 / 300
            )
        );
        assert_eq!(r.slots_over_commit, 0);
        let r = p95(&samples, window, P95Mode::Sum, Some(commit));
        assert_eq!((r.slot_bytes, r.in_bps), (psum, None));
        assert_eq!(
            r.slots_over_commit,
            over(full_in.iter().zip(&full_out).map(|(a, b)| a + b).collect())
        );
        let r = p95(&samples, window, P95Mode::MaxPerSlot, None);
        assert_eq!(r.slot_bytes, pmax);
        // The per-slot maximum never bills less than the larger of the two 95ths.
        assert!(pmax >= pin.max(pout));
    }

    #[test]
    fn window_clips_to_lifetime() {
        let w = SlotWindow::new(0, 86400, 1000, 2000);
        assert_eq!((w.first, w.end, w.len()), (900, 2100, 4));
        assert!(SlotWindow::new(0, 86400, 90000, 100000).is_empty());
        assert_eq!(SlotWindow::new(0, 86400, -5, i64::MAX).len(), 288);
    }

    /// A billing day 31 in Berlin: the February period has 12 slots fewer than 31 days, the
    /// September one 12 more, and the rank follows n.
    #[test]
    fn dst_periods_change_n_and_the_rank() {
        let spec = PeriodSpec::new(BillingAnchor::Day(31), "Europe/Berlin", 0).unwrap();
        for (label, n) in [("2026-02", 31 * 288 - 12), ("2026-09", 31 * 288 + 12)] {
            let p = spec.parse(label).unwrap();
            let w = SlotWindow::new(p.start, p.end, 0, i64::MAX);
            assert_eq!(w.len(), n as u64, "{label}");
            // Slot i carries i+1 bytes inbound: the k-th smallest is k.
            let mut samples: Vec<SlotSample> = (0..n)
                .map(|i| SlotSample {
                    start: w.first + i * SLOT_SECS,
                    in_bytes: i as u64 + 1,
                    out_bytes: 0,
                    estimated: false,
                })
                .collect();
            Rng::new(7).shuffle(&mut samples);
            let k = (1..=n as u64).find(|k| k * 100 >= 95 * n as u64).unwrap();
            let r = p95(&samples, w, P95Mode::Max, None);
            assert_eq!((r.n, r.slot_bytes), (n as u64, k), "{label}");
        }
    }
}
