use super::super::book::{Baseline, Reading};
use super::super::period::BillingAnchor;
use super::super::{Counter, CounterKey, Direction, Family, P95Mode, SlotFlags};
use super::*;

pub(super) const IN4: CounterKey = CounterKey {
    direction: Direction::In,
    class: 0,
    family: Family::V4,
};
pub(super) const OUT4: CounterKey = CounterKey {
    direction: Direction::Out,
    class: 0,
    family: Family::V4,
};
pub(super) const OUT6: CounterKey = CounterKey {
    direction: Direction::Out,
    class: 1,
    family: Family::V6,
};

/// 2026-03-01T00:00:00Z.
pub(super) const MAR1: i64 = 1_772_323_200;

pub(super) fn uuid(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

pub(super) fn info(n: u32, ctid: u32, created: i64) -> CtInfo {
    CtInfo {
        uuid: uuid(n),
        ctid,
        anchor: BillingAnchor::Day(1),
        tz: "UTC".into(),
        created,
        destroyed: None,
        commit_bps: None,
        classes: None,
        history: Vec::new(),
    }
}

pub(super) fn reading(n: u32, at: i64, epoch: u64, c: &[(CounterKey, u64, u64)]) -> CtReading {
    CtReading {
        uuid: uuid(n),
        reading: Reading {
            at,
            epoch,
            counters: c
                .iter()
                .map(|(k, b, p)| (*k, Counter::new(*b, *p)))
                .collect(),
        },
        first: Baseline::Zero,
    }
}

fn open(dir: &tempfile::TempDir) -> Ledger {
    Ledger::open(&dir.path().join("ledger.db"), LedgerOptions::default()).unwrap()
}

fn slot_sum(l: &Ledger, n: u32, key: CounterKey) -> Counter {
    l.slots(&uuid(n), i64::MIN / 2, i64::MAX / 2)
        .unwrap()
        .iter()
        .filter(|r| r.key == key)
        .fold(Counter::default(), |s, r| {
            Counter::new(s.bytes + r.counter.bytes, s.packets + r.counter.packets)
        })
}

#[test]
fn opens_in_wal_with_synchronous_full_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(&dir);
    let mode: String = l
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let sync: i64 = l
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!((mode.as_str(), sync), ("wal", 2));
    drop(l);
    let l = open(&dir);
    assert_eq!(l.seq(), 0);
}

#[test]
fn ticks_book_slots_and_totals() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&info(1, 100, MAR1)).unwrap();
    let t = MAR1 + 30;
    let s = l
        .tick(&[reading(1, t, 7, &[(IN4, 1000, 10), (OUT4, 0, 0)])])
        .unwrap();
    assert_eq!((s.seq, s.slot_rows), (1, 1));
    l.tick(&[reading(1, t + 30, 7, &[(IN4, 1500, 12), (OUT4, 300, 3)])])
        .unwrap();
    l.tick(&[reading(1, t + 300, 7, &[(IN4, 1600, 13), (OUT4, 300, 3)])])
        .unwrap();
    let rows = l.slots(&uuid(1), MAR1, MAR1 + 3600).unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|r| (r.slot_start - MAR1, r.key, r.counter.bytes, r.seq))
        .collect();
    assert_eq!(
        got,
        vec![(0, IN4, 1500, 3), (0, OUT4, 300, 3), (300, IN4, 100, 3)]
    );
    let totals = l.totals(&uuid(1), MAR1).unwrap();
    assert_eq!(totals[&IN4], Counter::new(1600, 13));
    assert_eq!(totals[&OUT4], Counter::new(300, 3));
    // The checkpoint survives a reopen.
    drop(l);
    let l = open(&dir);
    assert_eq!(
        l.checkpoint(&uuid(1)).unwrap().unwrap().counters[&IN4],
        Counter::new(1600, 13)
    );
    assert_eq!(l.seq(), 3);
}

/// A tick that fails after writing some CTs (the connection's transaction is dropped, as in a
/// crash before COMMIT) leaves nothing behind; reopening and ticking again counts every byte
/// exactly once.
#[test]
fn failed_tick_rolls_back_and_retick_does_not_double_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    for n in 1..=3 {
        l.register_ct(&info(n, 100 + n, MAR1)).unwrap();
    }
    let r1: Vec<_> = (1..=3)
        .map(|n| reading(n, MAR1 + 30, 1, &[(IN4, 1000 * u64::from(n), 1)]))
        .collect();
    l.tick(&r1).unwrap();
    let r2: Vec<_> = (1..=3)
        .map(|n| reading(n, MAR1 + 60, 1, &[(IN4, 5000 * u64::from(n), 9)]))
        .collect();
    l.fail_after = Some(2); // CTs 1 and 2 are written inside the transaction, then it fails
    assert!(l.tick(&r2).is_err());
    assert_eq!(l.seq(), 1);
    // The same Ledger retries fine (its caches were not advanced)...
    l.fail_after = Some(1);
    assert!(l.tick(&r2).is_err());
    drop(l);
    // ...and so does a fresh process.
    let mut l = open(&dir);
    assert_eq!(l.seq(), 1);
    for n in 1..=3 {
        assert_eq!(
            l.totals(&uuid(n), MAR1).unwrap()[&IN4].bytes,
            1000 * u64::from(n)
        );
    }
    let r3: Vec<_> = (1..=3)
        .map(|n| reading(n, MAR1 + 90, 1, &[(IN4, 6000 * u64::from(n), 10)]))
        .collect();
    l.tick(&r3).unwrap();
    for n in 1..=3 {
        assert_eq!(
            l.totals(&uuid(n), MAR1).unwrap()[&IN4],
            Counter::new(6000 * u64::from(n), 10)
        );
        assert_eq!(slot_sum(&l, n, IN4), Counter::new(6000 * u64::from(n), 10));
    }
}

/// Many reopen/tick cycles with failures injected at fixed-seed random points: slots and totals
/// equal the counter advance to the byte.
#[test]
fn random_failures_and_reopens_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = super::super::testrng::Rng::new(99);
    let mut l = open(&dir);
    for n in 1..=4 {
        l.register_ct(&info(n, n, MAR1)).unwrap();
    }
    let mut truth = [0u64; 4];
    let mut t = MAR1;
    for _ in 0..150 {
        t += if rng.below(10) == 0 {
            300 * (1 + rng.below(6) as i64)
        } else {
            30
        };
        for v in &mut truth {
            *v += rng.below(10_000_000);
        }
        let rs: Vec<_> = (1..=4u32)
            .map(|n| reading(n, t, 1, &[(OUT6, truth[n as usize - 1], 0)]))
            .collect();
        match rng.below(4) {
            0 => {
                l.fail_after = Some(rng.below(4) as usize);
                assert!(l.tick(&rs).is_err());
            }
            1 => {
                drop(l);
                l = open(&dir);
                l.tick(&rs).unwrap();
            }
            _ => {
                l.fail_after = None;
                l.tick(&rs).unwrap();
            }
        }
        l.fail_after = None;
    }
    let rs: Vec<_> = (1..=4u32)
        .map(|n| reading(n, t + 30, 1, &[(OUT6, truth[n as usize - 1], 0)]))
        .collect();
    l.tick(&rs).unwrap();
    for n in 1..=4u32 {
        let total: u64 = l
            .totals(&uuid(n), MAR1)
            .unwrap()
            .values()
            .map(|c| c.bytes)
            .sum();
        assert_eq!(total, truth[n as usize - 1]);
        assert_eq!(slot_sum(&l, n, OUT6).bytes, truth[n as usize - 1]);
    }
}

#[test]
fn ctid_reuse_keeps_separate_totals() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&info(1, 4243, MAR1)).unwrap();
    l.tick(&[reading(1, MAR1 + 30, 1, &[(IN4, 6_147_411, 100)])])
        .unwrap();
    l.mark_destroyed(&uuid(1), MAR1 + 40).unwrap();
    // Same CTID, new UUID, new counters (a new epoch of its own): starts at 0.
    l.register_ct(&info(2, 4243, MAR1 + 50)).unwrap();
    l.tick(&[reading(2, MAR1 + 60, 2, &[(IN4, 70, 1)])])
        .unwrap();
    assert_eq!(
        l.totals(&uuid(1), MAR1).unwrap()[&IN4],
        Counter::new(6_147_411, 100)
    );
    assert_eq!(l.totals(&uuid(2), MAR1).unwrap()[&IN4], Counter::new(70, 1));
    drop(l);
    let l = open(&dir);
    assert_eq!(l.ct(&uuid(1)).unwrap().destroyed, Some(MAR1 + 40));
    let reports = l
        .report_all(MAR1 + 100, P95Mode::Max, None, MAR1 + 100)
        .unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(
        reports.iter().map(|r| r.ct.ctid).collect::<Vec<_>>(),
        vec![4243, 4243]
    );
    assert_eq!(reports[0].window.len(), 1); // destroyed in its first slot
}

#[test]
fn bad_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&info(1, 1, MAR1)).unwrap();
    let mut bad = info(2, 2, MAR1);
    bad.tz = "Nowhere/Atlantis".into();
    assert!(matches!(
        l.register_ct(&bad),
        Err(BillingError::TimeZone { .. })
    ));
    bad.tz = "UTC".into();
    bad.anchor = BillingAnchor::Day(32);
    assert!(matches!(
        l.register_ct(&bad),
        Err(BillingError::BillingDay(32))
    ));
    bad.anchor = BillingAnchor::Day(1);
    bad.uuid = "not-a-uuid".into();
    assert!(matches!(l.register_ct(&bad), Err(BillingError::Uuid(_))));
    // A tick naming an unknown CT writes nothing, not even the known CT's reading.
    let e = l
        .tick(&[
            reading(1, MAR1 + 30, 1, &[(IN4, 5, 1)]),
            reading(9, MAR1 + 30, 1, &[(IN4, 5, 1)]),
        ])
        .unwrap_err();
    assert!(e.to_string().contains(&uuid(9)));
    assert_eq!(l.seq(), 0);
    assert!(l.checkpoint(&uuid(1)).unwrap().is_none());
    let e = l
        .tick(&[
            reading(1, MAR1 + 30, 1, &[(IN4, 5, 1)]),
            reading(1, MAR1 + 31, 1, &[(IN4, 6, 1)]),
        ])
        .unwrap_err();
    assert!(matches!(e, BillingError::DuplicateReading(_)));
    assert_eq!(l.seq(), 0);
    let n: i64 = l
        .conn
        .query_row("SELECT count(*) FROM ct", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    assert!(matches!(
        l.report(
            &uuid(7),
            &l.period_spec(&uuid(1)).unwrap().parse("2026-03").unwrap(),
            P95Mode::Max,
            None,
            MAR1
        ),
        Err(BillingError::UnknownCt(_))
    ));
}

/// A gap across a period boundary: the spread bytes land in each period's totals by slot.
#[test]
fn gap_across_period_boundary_splits_totals() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&info(1, 1, MAR1 - 86400)).unwrap();
    // Last reading in the last slot of February, the next one 4 slots into March.
    l.tick(&[reading(1, MAR1 - 10, 1, &[(IN4, 0, 0)])]).unwrap();
    l.tick(&[reading(1, MAR1 + 4 * 300 + 10, 1, &[(IN4, 5003, 5)])])
        .unwrap();
    let feb = l.totals(&uuid(1), MAR1 - 28 * 86400).unwrap();
    let mar = l.totals(&uuid(1), MAR1).unwrap();
    assert!(feb.is_empty());
    assert_eq!(mar[&IN4], Counter::new(5003, 5));
    let rows = l.slots(&uuid(1), MAR1, MAR1 + 3600).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.counter.bytes).collect::<Vec<_>>(),
        vec![1000, 1000, 1000, 1000, 1003]
    );
    assert!(rows.iter().all(|r| r.flags.contains(SlotFlags::ESTIMATED)));
    // Berlin billing: midnight local is 23:00 UTC, so the first slot after 23:00 UTC on Feb 28 is March's.
    let mut b = info(2, 2, MAR1 - 86400);
    b.tz = "Europe/Berlin".into();
    l.register_ct(&b).unwrap();
    l.tick(&[reading(2, MAR1 - 3600 - 10, 1, &[(IN4, 0, 0)])])
        .unwrap();
    l.tick(&[reading(2, MAR1 - 3600 + 290, 1, &[(IN4, 77, 1)])])
        .unwrap();
    let p = l.period_spec(&uuid(2)).unwrap().parse("2026-03").unwrap();
    assert_eq!(p.start, MAR1 - 3600);
    assert_eq!(l.totals(&uuid(2), p.start).unwrap()[&IN4].bytes, 77);
}

#[test]
fn report_counts_missing_slots_as_zero_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&info(1, 1, MAR1)).unwrap();
    // 40 slots in the window (now = MAR1 + 40·300); traffic in 10 of them, 1 MB each, out.
    let mut v = 0;
    for i in 0..10 {
        v += 1_000_000;
        l.tick(&[reading(1, MAR1 + i * 300 + 150, 1, &[(OUT4, v, 1)])])
            .unwrap();
    }
    let p = l.period_spec(&uuid(1)).unwrap().parse("2026-03").unwrap();
    let r = l
        .report(&uuid(1), &p, P95Mode::Max, Some(20_000), MAR1 + 40 * 300)
        .unwrap();
    assert_eq!(
        (r.p95.n, r.p95.slots_present, r.p95.slots_over_commit),
        (40, 10, 10)
    );
    // k = 38 of 40 sorted: 30 zeros then 10 × 1 MB → 1 MB.
    assert_eq!(r.p95.slot_bytes, 1_000_000);
    assert_eq!(r.p95.out_bps, Some(26_666));
    assert_eq!(r.p95.in_bps, Some(0));
    assert_eq!(r.totals[&OUT4].bytes, 10_000_000);
    // With 200 slots only 10 nonzero (5 %): the 95th is 0.
    let r = l
        .report(&uuid(1), &p, P95Mode::Max, None, MAR1 + 200 * 300)
        .unwrap();
    assert_eq!((r.p95.n, r.p95.bps), (200, 0));
}

#[test]
fn prune_keeps_current_and_n_previous_periods_and_all_totals() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(
        &dir.path().join("l.db"),
        LedgerOptions {
            retention_periods: 1,
        },
    )
    .unwrap();
    l.register_ct(&info(1, 1, MAR1 - 90 * 86400)).unwrap();
    let spec = l.period_spec(&uuid(1)).unwrap().clone();
    let months = ["2025-12", "2026-01", "2026-02", "2026-03"];
    let mut v = 0;
    for m in months {
        let p = spec.parse(m).unwrap();
        v += 100;
        l.tick(&[reading(1, p.start + 100, 1, &[(IN4, v, 1)])])
            .unwrap();
    }
    let deleted = l.prune(MAR1 + 1000).unwrap();
    assert_eq!(deleted, 2);
    let kept: Vec<i64> = l
        .slots(&uuid(1), 0, i64::MAX / 2)
        .unwrap()
        .iter()
        .map(|r| r.slot_start)
        .collect();
    assert_eq!(kept, vec![spec.parse("2026-02").unwrap().start, MAR1]);
    for m in months {
        assert_eq!(
            l.totals(&uuid(1), spec.parse(m).unwrap().start).unwrap()[&IN4].bytes,
            100,
            "{m}"
        );
    }
}

#[test]
fn slot_feed_after_seq() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&info(1, 1, MAR1)).unwrap();
    l.register_ct(&info(2, 2, MAR1)).unwrap();
    l.tick(&[
        reading(1, MAR1 + 30, 1, &[(IN4, 10, 1)]),
        reading(2, MAR1 + 30, 1, &[(IN4, 20, 1)]),
    ])
    .unwrap();
    l.tick(&[reading(1, MAR1 + 60, 1, &[(IN4, 15, 2)])])
        .unwrap();
    let all = l.slots_after_seq(0, 100).unwrap();
    // CT 1's row was changed by tick 2: it appears once, with seq 2 and its full value.
    assert_eq!(
        all.iter()
            .map(|(u, r)| (u.clone(), r.seq, r.counter.bytes))
            .collect::<Vec<_>>(),
        vec![(uuid(2), 1, 20), (uuid(1), 2, 15)]
    );
    assert_eq!(l.slots_after_seq(1, 100).unwrap().len(), 1);
    assert_eq!(l.slots_after_seq(0, 1).unwrap().len(), 1);
    assert!(l.slots_after_seq(2, 100).unwrap().is_empty());
    l.tick(&[
        reading(1, MAR1 + 90, 1, &[(IN4, 16, 3)]),
        reading(2, MAR1 + 90, 1, &[(IN4, 21, 2)]),
    ])
    .unwrap();
    // An older slot written by a later tick (a gap spread) is found too.
    l.tick(&[reading(2, MAR1 + 1300, 1, &[(IN4, 421, 6)])])
        .unwrap();
    let feed = l.slots_after_seq(3, 100).unwrap();
    assert_eq!(
        feed.iter()
            .map(|(u, r)| (u.clone(), r.slot_start - MAR1, r.seq))
            .collect::<Vec<_>>(),
        vec![
            (uuid(2), 0, 4),
            (uuid(2), 300, 4),
            (uuid(2), 600, 4),
            (uuid(2), 900, 4),
            (uuid(2), 1200, 4)
        ]
    );
    // CT 1's open row was last changed by tick 3, CT 2's by tick 4: a limit of 1 gives tick 3.
    let page = l.slots_after_seq(2, 1).unwrap();
    assert_eq!(page.iter().map(|(_, r)| r.seq).collect::<Vec<_>>(), vec![3]);
    // After pruning the tick records, an old after_seq still sees every kept row.
    l.conn
        .execute("DELETE FROM tick WHERE seq < 4", [])
        .unwrap();
    assert_eq!(l.slots_after_seq(0, 100).unwrap().len(), 6);
}

/// A shipper pulling the feed in small pages at random moments, upserting what it gets, ends
/// with exactly the ledger's slot rows (flushed and open alike), across reopens.
#[test]
fn feed_replay_reproduces_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = super::super::testrng::Rng::new(5);
    let mut l = open(&dir);
    for n in 1..=3 {
        l.register_ct(&info(n, n, MAR1)).unwrap();
    }
    let mut shipped: BTreeMap<(String, i64, CounterKey), (Counter, SlotFlags)> = BTreeMap::new();
    let mut after = 0;
    let mut truth = [0u64; 3];
    let mut t = MAR1;
    for _ in 0..200 {
        t += if rng.below(15) == 0 {
            300 * (2 + rng.below(4) as i64)
        } else {
            30 + rng.below(40) as i64
        };
        let mut rs = Vec::new();
        for n in 1..=3u32 {
            if rng.below(5) == 0 {
                continue; // this CT is not read this tick
            }
            truth[n as usize - 1] += rng.below(1000);
            let v = truth[n as usize - 1];
            rs.push(reading(n, t, 1, &[(IN4, v, 1), (OUT6, v / 3, 1)]));
        }
        l.tick(&rs).unwrap();
        if rng.below(10) == 0 {
            drop(l);
            l = open(&dir);
        }
        if rng.below(3) == 0 {
            loop {
                let page = l.slots_after_seq(after, 1 + rng.below(5) as u32).unwrap();
                let Some(last) = page.last() else { break };
                after = last.1.seq;
                for (u, r) in page {
                    shipped.insert((u, r.slot_start, r.key), (r.counter, r.flags));
                }
            }
        }
    }
    loop {
        let page = l.slots_after_seq(after, 7).unwrap();
        let Some(last) = page.last() else { break };
        after = last.1.seq;
        for (u, r) in page {
            shipped.insert((u, r.slot_start, r.key), (r.counter, r.flags));
        }
    }
    let mut want = BTreeMap::new();
    for n in 1..=3 {
        for r in l.slots(&uuid(n), 0, i64::MAX / 2).unwrap() {
            want.insert((uuid(n), r.slot_start, r.key), (r.counter, r.flags));
        }
        assert_eq!(slot_sum(&l, n, IN4).bytes, truth[n as usize - 1]);
        assert_eq!(
            l.totals(&uuid(n), MAR1).unwrap()[&IN4].bytes,
            truth[n as usize - 1]
        );
    }
    let flushed: i64 = l
        .conn
        .query_row("SELECT count(*) FROM slot", [], |r| r.get(0))
        .unwrap();
    assert!(
        flushed > 100,
        "the test must exercise flushed rows too ({flushed})"
    );
    assert_eq!(shipped, want);
}

/// A second process (the CLI) reading while berthd ticks: its numbers follow the writer's
/// commits exactly, although rows move from the checkpoints' open rows to the slot table.
#[test]
fn concurrent_reader_sees_each_byte_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = open(&dir);
    for n in 1..=4 {
        w.register_ct(&info(n, n, MAR1)).unwrap();
    }
    let r = open(&dir);
    let mut v = 0u64;
    for i in 1..=60i64 {
        v += 1000;
        let rs: Vec<_> = (1..=4)
            .map(|n| reading(n, MAR1 + 70 * i, 1, &[(IN4, v, i as u64)]))
            .collect();
        w.tick(&rs).unwrap();
        for n in 1..=4 {
            assert_eq!(r.totals(&uuid(n), MAR1).unwrap()[&IN4].bytes, v, "tick {i}");
            assert_eq!(slot_sum(&r, n, IN4).bytes, v, "tick {i}");
        }
    }
    let reports = r.report_all(MAR1, P95Mode::Sum, None, MAR1 + 4200).unwrap();
    assert!(reports.iter().all(|x| x.totals[&IN4].bytes == v));
    let flushed: i64 = r
        .conn
        .query_row("SELECT count(*) FROM slot", [], |x| x.get(0))
        .unwrap();
    assert!(flushed > 0);
}

#[test]
fn counter_blob_round_trips_and_rejects_garbage() {
    let c: BTreeMap<_, _> = [
        (IN4, Counter::new(u64::MAX, 1)),
        (OUT6, Counter::new(0, u64::MAX)),
    ]
    .into_iter()
    .collect();
    assert_eq!(decode_counters(&encode_counters(&c)), Some(c));
    assert_eq!(decode_counters(&[0; 17]), None);
    let open = vec![SlotRow {
        slot_start: MAR1,
        key: OUT6,
        counter: Counter::new(u64::MAX, 3),
        flags: SlotFlags(5),
        seq: 9,
    }];
    assert_eq!(decode_open(&encode_open(&open), 9), Some(open));
    assert_eq!(decode_open(&[0; 22], 0), None);
}
