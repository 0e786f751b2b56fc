//! Booking: turning successive cumulative counter readings into per-slot additions. Pure logic,
//! no I/O: the store applies a [`Booking`] and its new [`Checkpoint`] in one transaction, so a
//! crash anywhere re-derives the same delta from the last committed checkpoint.
//!
//! Rules (issue 13):
//! - a reading at `t` closes the interval `(t − tick, t]`, so it books into the slot holding
//!   `t − 1` (a reading exactly on a slot boundary belongs to the slot it ends);
//! - a new epoch (counters recreated: host reboot, pinned maps removed) counts from 0;
//! - same epoch and a counter went down: delta 0, the old checkpoint value is kept, the slot is
//!   flagged `counter_anomaly` — never taken as a wrap (2^64 bytes at 100 Gbit/s is 47 years);
//! - a gap (several slots since the checkpoint's) spreads the delta evenly over the slots after
//!   the checkpoint's up to the reading's, `floor(D/n)` each, the remainder on the last, flagged
//!   `estimated`: never dropped;
//! - a clock step backwards books into the checkpoint's slot (flagged `clock_step`), never into
//!   an older one.
use std::collections::BTreeMap;

use super::{Counter, CounterKey, SLOT_SECS, SlotFlags, slot_of};

/// One read of a CT's cumulative counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// Wall-clock time of the read (Unix seconds).
    pub at: i64,
    /// Counter generation: changes whenever the counters restart from 0.
    pub epoch: u64,
    pub counters: BTreeMap<CounterKey, Counter>,
}

/// The last counter values applied to the ledger, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub at: i64,
    pub epoch: u64,
    /// The newest slot booked into: nothing is ever booked before it.
    pub slot: i64,
    pub counters: BTreeMap<CounterKey, Counter>,
}

/// What the first reading of a CT without a checkpoint counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// The counters were created with the CT (its epoch is known): everything is its traffic.
    Zero,
    /// Counters of unknown history (first install of the ledger on a running node): only what
    /// comes after this reading is booked.
    Current,
}

/// Bytes and packets to add to one slot row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAdd {
    pub slot_start: i64,
    pub key: CounterKey,
    pub delta: Counter,
    pub flags: SlotFlags,
}

/// The outcome of one reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    /// Additions, possibly zero-delta ones that only carry a flag (an anomaly).
    pub adds: Vec<SlotAdd>,
    pub checkpoint: Checkpoint,
    /// Keys whose counter went down within the epoch.
    pub anomalies: Vec<CounterKey>,
    pub new_epoch: bool,
    pub clock_step: bool,
    /// Slots the delta was spread over when more than one (a gap).
    pub gap_slots: u64,
}

/// The slot a reading at `at` books into when the clock is sane.
pub fn reading_slot(at: i64) -> i64 {
    slot_of(at - 1)
}

/// Books `reading` against `prev` (the last committed checkpoint, if any).
pub fn book(prev: Option<&Checkpoint>, reading: &Reading, baseline: Baseline) -> Booking {
    let slot = reading_slot(reading.at);
    let Some(prev) = prev else {
        let adds = match baseline {
            Baseline::Zero => reading
                .counters
                .iter()
                .filter(|(_, c)| c.bytes != 0 || c.packets != 0)
                .map(|(k, c)| SlotAdd {
                    slot_start: slot,
                    key: *k,
                    delta: *c,
                    flags: SlotFlags::empty(),
                })
                .collect(),
            Baseline::Current => Vec::new(),
        };
        return Booking {
            adds,
            checkpoint: Checkpoint {
                at: reading.at,
                epoch: reading.epoch,
                slot,
                counters: reading.counters.clone(),
            },
            anomalies: Vec::new(),
            new_epoch: false,
            clock_step: false,
            gap_slots: 0,
        };
    };

    let clock_step = slot < prev.slot;
    let target = slot.max(prev.slot);
    let new_epoch = reading.epoch != prev.epoch;
    let n = ((target - prev.slot) / SLOT_SECS).max(1) as u64;
    let first = if n > 1 { prev.slot + SLOT_SECS } else { target };
    let mut flags = SlotFlags::empty();
    if clock_step {
        flags = flags.union(SlotFlags::CLOCK_STEP);
    }
    if new_epoch {
        flags = flags.union(SlotFlags::NEW_EPOCH);
    }
    if n > 1 {
        flags = flags.union(SlotFlags::ESTIMATED);
    }

    let mut counters = if new_epoch {
        BTreeMap::new()
    } else {
        prev.counters.clone()
    };
    let mut adds = Vec::new();
    let mut anomalies = Vec::new();
    for (key, cur) in &reading.counters {
        let old = counters.get(key).copied().unwrap_or_default();
        if cur.bytes < old.bytes || cur.packets < old.packets {
            anomalies.push(*key);
            adds.push(SlotAdd {
                slot_start: target,
                key: *key,
                delta: Counter::default(),
                flags: flags.union(SlotFlags::COUNTER_ANOMALY),
            });
            continue;
        }
        counters.insert(*key, *cur);
        let delta = Counter::new(cur.bytes - old.bytes, cur.packets - old.packets);
        if delta == Counter::default() {
            continue;
        }
        spread(&mut adds, *key, delta, first, n, flags);
    }
    Booking {
        adds,
        checkpoint: Checkpoint {
            at: reading.at,
            epoch: reading.epoch,
            slot: target,
            counters,
        },
        anomalies,
        new_epoch,
        clock_step,
        gap_slots: if n > 1 { n } else { 0 },
    }
}

/// `delta` over `n` slots from `first`: `floor(D/n)` each, the remainder on the last.
fn spread(
    adds: &mut Vec<SlotAdd>,
    key: CounterKey,
    delta: Counter,
    first: i64,
    n: u64,
    flags: SlotFlags,
) {
    let each = Counter::new(delta.bytes / n, delta.packets / n);
    for i in 0..n {
        let d = if i + 1 == n {
            Counter::new(
                delta.bytes - each.bytes * (n - 1),
                delta.packets - each.packets * (n - 1),
            )
        } else {
            each
        };
        if d == Counter::default() {
            continue;
        }
        adds.push(SlotAdd {
            slot_start: first + i as i64 * SLOT_SECS,
            key,
            delta: d,
            flags,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Direction, Family};
    use super::*;

    const IN4: CounterKey = CounterKey {
        direction: Direction::In,
        class: 0,
        family: Family::V4,
    };
    const OUT6: CounterKey = CounterKey {
        direction: Direction::Out,
        class: 1,
        family: Family::V6,
    };

    fn reading(at: i64, epoch: u64, c: &[(CounterKey, u64, u64)]) -> Reading {
        Reading {
            at,
            epoch,
            counters: c
                .iter()
                .map(|(k, b, p)| (*k, Counter::new(*b, *p)))
                .collect(),
        }
    }

    fn sum(adds: &[SlotAdd], key: CounterKey) -> Counter {
        adds.iter()
            .filter(|a| a.key == key)
            .fold(Counter::default(), |s, a| {
                Counter::new(s.bytes + a.delta.bytes, s.packets + a.delta.packets)
            })
    }

    #[test]
    fn first_reading_baselines() {
        let r = reading(1000, 1, &[(IN4, 500, 5), (OUT6, 0, 0)]);
        let b = book(None, &r, Baseline::Zero);
        assert_eq!(
            b.adds,
            vec![SlotAdd {
                slot_start: 900,
                key: IN4,
                delta: Counter::new(500, 5),
                flags: SlotFlags::empty()
            }]
        );
        assert_eq!(b.checkpoint.slot, 900);
        let b = book(None, &r, Baseline::Current);
        assert!(b.adds.is_empty());
        assert_eq!(b.checkpoint.counters, r.counters);
    }

    #[test]
    fn normal_ticks_and_boundary_reading() {
        let cp = book(None, &reading(270, 1, &[(IN4, 100, 1)]), Baseline::Zero).checkpoint;
        // A reading at exactly 300 closes (270, 300]: slot 0.
        let b = book(
            Some(&cp),
            &reading(300, 1, &[(IN4, 150, 2)]),
            Baseline::Zero,
        );
        assert_eq!(
            b.adds,
            vec![SlotAdd {
                slot_start: 0,
                key: IN4,
                delta: Counter::new(50, 1),
                flags: SlotFlags::empty()
            }]
        );
        let b2 = book(
            Some(&b.checkpoint),
            &reading(330, 1, &[(IN4, 170, 3), (OUT6, 9, 1)]),
            Baseline::Zero,
        );
        assert_eq!(b2.adds.len(), 2);
        assert!(
            b2.adds
                .iter()
                .all(|a| a.slot_start == 300 && a.flags == SlotFlags::empty())
        );
        assert_eq!(sum(&b2.adds, OUT6), Counter::new(9, 1)); // a key appearing counts from 0
        assert_eq!(b2.gap_slots, 0);
    }

    #[test]
    fn new_epoch_counts_from_zero() {
        let cp = book(
            None,
            &reading(100, 1, &[(IN4, 1_000_000, 1000), (OUT6, 5, 1)]),
            Baseline::Zero,
        )
        .checkpoint;
        let b = book(Some(&cp), &reading(130, 2, &[(IN4, 40, 1)]), Baseline::Zero);
        assert!(b.new_epoch && b.anomalies.is_empty());
        assert_eq!(
            b.adds,
            vec![SlotAdd {
                slot_start: 0,
                key: IN4,
                delta: Counter::new(40, 1),
                flags: SlotFlags::NEW_EPOCH
            }]
        );
        // The old epoch's keys are gone from the checkpoint.
        assert_eq!(b.checkpoint.counters.len(), 1);
        assert_eq!(b.checkpoint.epoch, 2);
    }

    #[test]
    fn counter_down_in_same_epoch_is_an_anomaly_not_a_wrap() {
        let cp = book(
            None,
            &reading(100, 1, &[(IN4, 1000, 10), (OUT6, 50, 5)]),
            Baseline::Zero,
        )
        .checkpoint;
        let b = book(
            Some(&cp),
            &reading(130, 1, &[(IN4, 900, 11), (OUT6, 60, 6)]),
            Baseline::Zero,
        );
        assert_eq!(b.anomalies, vec![IN4]);
        assert_eq!(sum(&b.adds, IN4), Counter::default());
        assert!(
            b.adds
                .iter()
                .any(|a| a.key == IN4 && a.flags.contains(SlotFlags::COUNTER_ANOMALY))
        );
        assert_eq!(sum(&b.adds, OUT6), Counter::new(10, 1));
        // The old value is kept: when the counter comes back past it only the excess counts.
        assert_eq!(b.checkpoint.counters[&IN4], Counter::new(1000, 10));
        let b2 = book(
            Some(&b.checkpoint),
            &reading(160, 1, &[(IN4, 1200, 12)]),
            Baseline::Zero,
        );
        assert_eq!(sum(&b2.adds, IN4), Counter::new(200, 2));
        // A key missing from a reading keeps its checkpoint within the epoch.
        assert_eq!(b2.checkpoint.counters[&OUT6], Counter::new(60, 6));
    }

    #[test]
    fn gap_spreads_evenly_with_remainder_on_last() {
        let cp = book(None, &reading(290, 1, &[(IN4, 0, 0)]), Baseline::Zero).checkpoint;
        assert_eq!(cp.slot, 0);
        // Down until 1210: slots 300, 600, 900, 1200 → 4 slots.
        let b = book(
            Some(&cp),
            &reading(1210, 1, &[(IN4, 1003, 7)]),
            Baseline::Zero,
        );
        assert_eq!(b.gap_slots, 4);
        let got: Vec<(i64, u64, u64)> = b
            .adds
            .iter()
            .map(|a| (a.slot_start, a.delta.bytes, a.delta.packets))
            .collect();
        assert_eq!(
            got,
            vec![(300, 250, 1), (600, 250, 1), (900, 250, 1), (1200, 253, 4)]
        );
        assert!(b.adds.iter().all(|a| a.flags == SlotFlags::ESTIMATED));
        // Fewer bytes than slots: zero slots are not emitted, the sum is still exact.
        let b = book(Some(&cp), &reading(1210, 1, &[(IN4, 2, 0)]), Baseline::Zero);
        assert_eq!(
            b.adds
                .iter()
                .map(|a| (a.slot_start, a.delta.bytes))
                .collect::<Vec<_>>(),
            vec![(1200, 2)]
        );
    }

    #[test]
    fn clock_step_back_never_rewrites_an_older_slot() {
        let cp = book(None, &reading(10_000, 1, &[(IN4, 100, 1)]), Baseline::Zero).checkpoint;
        let b = book(
            Some(&cp),
            &reading(5_000, 1, &[(IN4, 150, 2)]),
            Baseline::Zero,
        );
        assert!(b.clock_step);
        assert_eq!(
            b.adds,
            vec![SlotAdd {
                slot_start: 9900,
                key: IN4,
                delta: Counter::new(50, 1),
                flags: SlotFlags::CLOCK_STEP
            }]
        );
        assert_eq!(b.checkpoint.slot, 9900);
        // Time catches up: normal again, never before 9900.
        let b2 = book(
            Some(&b.checkpoint),
            &reading(10_100, 1, &[(IN4, 160, 3)]),
            Baseline::Zero,
        );
        assert_eq!(b2.adds[0].slot_start, 9900);
        assert!(!b2.clock_step);
    }

    /// Property: with a fixed-seed generator driving ticks, gaps, clock steps, anomalies and
    /// epoch changes, the slot sum of every key within every epoch equals the counter's advance
    /// (its running maximum minus its start) exactly, and no addition lands before the slot of
    /// the checkpoint it was booked against.
    #[test]
    fn property_slot_sums_equal_counter_advance() {
        let mut rng = super::super::testrng::Rng::new(0xb111);
        for _round in 0..200 {
            let keys = [IN4, OUT6];
            let mut epoch = 1u64;
            let mut t = 1_800_000_000 + rng.below(300) as i64;
            let mut truth: BTreeMap<CounterKey, Counter> = BTreeMap::new(); // the kernel's counters
            let mut max: BTreeMap<CounterKey, Counter> = BTreeMap::new(); // running max this epoch
            let mut booked: BTreeMap<CounterKey, Counter> = BTreeMap::new(); // slot sums this epoch
            let mut cp: Option<Checkpoint> = None;
            for _step in 0..60 {
                match rng.below(20) {
                    0 => t -= rng.below(3000) as i64,           // clock step back
                    1 => t += 300 * (2 + rng.below(50) as i64), // gap
                    _ => t += 30,
                }
                if rng.below(25) == 0 {
                    // Counters recreated: the ledger must start this epoch from 0.
                    let before = max.clone();
                    assert_eq!(
                        booked,
                        before
                            .into_iter()
                            .filter(|(_, c)| *c != Counter::default())
                            .collect()
                    );
                    epoch += 1;
                    truth.clear();
                    max.clear();
                    booked.clear();
                }
                for k in keys {
                    let c = truth.entry(k).or_default();
                    if rng.below(30) == 0 && c.bytes > 10 {
                        // A bogus lower read (anomaly); the kernel value itself stays.
                        continue;
                    }
                    c.bytes += rng.below(5_000_000);
                    c.packets += rng.below(4000);
                }
                let mut r = Reading {
                    at: t,
                    epoch,
                    counters: truth.clone(),
                };
                let anomalous = rng.below(30) == 0;
                if anomalous {
                    let c = r.counters.get_mut(&IN4).unwrap();
                    c.bytes /= 2;
                }
                let b = book(cp.as_ref(), &r, Baseline::Zero);
                if let Some(p) = &cp {
                    assert!(b.adds.iter().all(|a| a.slot_start >= p.slot));
                    assert!(b.checkpoint.slot >= p.slot);
                }
                assert!(b.adds.iter().all(|a| a.slot_start <= b.checkpoint.slot));
                for a in &b.adds {
                    let s = booked.entry(a.key).or_default();
                    s.bytes += a.delta.bytes;
                    s.packets += a.delta.packets;
                }
                for (k, c) in &r.counters {
                    let m = max.entry(*k).or_default();
                    if c.bytes >= m.bytes && c.packets >= m.packets {
                        *m = *c;
                    }
                }
                booked.retain(|_, c| *c != Counter::default());
                let expect: BTreeMap<_, _> = max
                    .iter()
                    .filter(|(_, c)| **c != Counter::default())
                    .map(|(k, c)| (*k, *c))
                    .collect();
                assert_eq!(booked, expect, "epoch {epoch} at {t}");
                cp = Some(b.checkpoint);
            }
        }
    }
}
