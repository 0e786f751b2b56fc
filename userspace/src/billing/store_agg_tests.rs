//! The per-slot aggregate and the gauges' incremental periods against the slot rows they
//! summarize: the same integers, tick after tick, through gaps, clock steps, a period edge in
//! the middle of an hour, pruning, a destroyed CT and a rebuild.
use super::super::book::Baseline;
use super::super::period::BillingAnchor;
use super::super::testrng::Rng;
use super::super::{CounterKey, Direction, Family, P95Mode};
use super::tests::{IN4, MAR1, OUT4, OUT6, info, reading, uuid};
use super::*;

const MODES: [P95Mode; 4] = [
    P95Mode::Max,
    P95Mode::PerDirection,
    P95Mode::Sum,
    P95Mode::MaxPerSlot,
];

/// Every CT's report in every mode, from the aggregate and from the slot rows: equal.
fn assert_aggregate_matches_rows(l: &Ledger, at: i64, now: i64) -> Vec<Report> {
    let _read = l.snapshot().unwrap();
    assert!(l.aggregate_current().unwrap());
    let mut all = Vec::new();
    for s in l.cts.values() {
        let period = s.spec.period_of(at).unwrap();
        for mode in MODES {
            let commit = Some(1_000_000);
            let fast = l
                .report_in(&s.info.uuid, &period, mode, commit, now, true)
                .unwrap();
            let rows = l
                .report_in(&s.info.uuid, &period, mode, commit, now, false)
                .unwrap();
            assert_eq!(fast, rows, "CT {} {mode:?}", s.info.uuid);
            all.push(fast);
        }
    }
    all
}

#[test]
fn aggregate_and_current_periods_equal_full_reports_tick_by_tick() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut w = Ledger::open(
        &path,
        LedgerOptions {
            retention_periods: 0,
        },
    )
    .unwrap();
    // A UTC period edge (MAR1) and Kathmandu's (Feb 28 18:15 UTC) fall inside the run.
    let start = MAR1 - 30000;
    for n in 0..5 {
        w.register_ct(&info(n, n, start - 600)).unwrap();
    }
    // Kathmandu (+05:45): its periods start at :15 UTC, inside an aggregate hour.
    let mut ktm = info(5, 5, start + 3000);
    ktm.anchor = BillingAnchor::Day(1);
    ktm.tz = "Asia/Kathmandu".into();
    w.register_ct(&ktm).unwrap();
    let keys = [
        IN4,
        OUT4,
        OUT6,
        CounterKey::new(Direction::In, 3, Family::V6),
    ];
    let mut rng = Rng::new(0xa99);
    let mut cum = [[0u64; 4]; 6];
    let mut state = CurrentPeriods::default();
    let mut t = start;
    let mut checked = 0;
    for i in 0..700 {
        // Mostly 30 s ticks, sometimes a gap of up to 40 minutes, once a clock step back.
        t += if i == 350 {
            -700
        } else if rng.below(15) == 0 {
            300 + rng.below(2100) as i64
        } else {
            30
        };
        let mut rs = Vec::new();
        for n in 0..6u32 {
            // A CT skipped now and then: its next reading spreads over the gap.
            if rng.below(25) == 0 || (n == 4 && i > 500) {
                continue;
            }
            let c = &mut cum[n as usize];
            for v in c.iter_mut() {
                // Zero deltas too (rows that are present but empty).
                *v += rng.below(4) * rng.below(3_000_000);
            }
            let c: Vec<_> = keys
                .iter()
                .zip(c.iter())
                .map(|(k, b)| (*k, *b, *b / 900))
                .collect();
            rs.push(reading(n, t, 1, &c));
        }
        w.tick(&rs).unwrap();
        if i == 520 {
            w.mark_destroyed(&uuid(4), t).unwrap();
        }
        // As berthd: a fresh read-only connection per tick, the state kept.
        let r = Ledger::open_read_only(&path).unwrap();
        let now = t + rng.below(20) as i64;
        let bills = r.current_periods(&mut state, now).unwrap();
        let full: Vec<Report> = r
            .report_all(now, P95Mode::PerDirection, None, now)
            .unwrap()
            .into_iter()
            .filter(|x| x.ct.destroyed.is_none())
            .collect();
        assert_eq!(bills.len(), full.len(), "tick {i}");
        for (b, f) in bills.iter().zip(&full) {
            assert_eq!(
                (&b.ct, b.period, &b.totals, b.n),
                (&f.ct, f.period, &f.totals, f.p95.n),
                "tick {i}"
            );
            assert_eq!(
                (Some(b.in_bps), Some(b.out_bps)),
                (f.p95.in_bps, f.p95.out_bps),
                "tick {i} CT {}",
                b.ct.uuid
            );
            checked += 1;
        }
        if i % 100 == 99 {
            assert_aggregate_matches_rows(&r, now, now);
        }
    }
    assert!(checked > 3000 && state.tracked() == 5, "{checked}");
    assert!(t > MAR1 + 3 * 3600, "the run crosses the period edges");
    // The window's slots were not all zero: the test compared real 95ths.
    let r = Ledger::open_read_only(&path).unwrap();
    let last = r
        .current_periods(&mut CurrentPeriods::default(), t)
        .unwrap();
    assert!(last.iter().all(|b| b.in_bps > 0 && b.out_bps > 0));

    // Pruning keeps the aggregate equal to the slot rows kept (Kathmandu's cut mid-hour).
    let before = assert_aggregate_matches_rows(&w, t, t);
    assert!(w.prune(t).unwrap() > 0);
    let after = assert_aggregate_matches_rows(&w, t, t);
    assert_eq!(before, after, "the current period is untouched");
    let cur = w.period_spec(&uuid(5)).unwrap().period_of(t).unwrap();
    assert_eq!(cur.start % 3600, 900, "{cur:?}");
    let hour = agg::hour_of(slot_index(cur.start));
    let cut: Vec<u8> = w
        .conn
        .query_row(
            "SELECT v FROM slot_hour WHERE ct = (SELECT id FROM ct WHERE ctid = 5) AND hour = ?1",
            [hour],
            |x| x.get(0),
        )
        .unwrap();
    assert!(!cut.is_empty());
    agg::decode(hour, &cut, |s| assert!(s.start >= cur.start)).unwrap();
    // The previous periods' reports: nothing left in either.
    assert_aggregate_matches_rows(&w, start + 3600, t);

    // A ledger written without the aggregate (or by an older berth: `agg` ≠ `seq`): readers
    // fall back to the slot rows, and opening it for writing rebuilds the same aggregate.
    let dump = |l: &Ledger| -> Vec<(i64, i64, Vec<u8>)> {
        let mut st = l
            .conn
            .prepare("SELECT ct, hour, v FROM slot_hour ORDER BY ct, hour")
            .unwrap();
        st.query_map([], |x| Ok((x.get(0)?, x.get(1)?, x.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let summed = |d: Vec<(i64, i64, Vec<u8>)>| {
        let mut m = BTreeMap::new();
        for (ct, h, v) in d {
            agg::decode(h, &v, |s| {
                let e = m.entry((ct, s.start)).or_insert((0u64, 0u64, 0u8));
                e.0 += s.in_bytes;
                e.1 += s.out_bytes;
                e.2 |= s.flags.0;
            })
            .unwrap();
        }
        m
    };
    let ticked = summed(dump(&w));
    w.conn
        .execute("UPDATE meta SET v = v - 1 WHERE k = 'agg'", [])
        .unwrap();
    drop(w);
    let r = Ledger::open_read_only(&path).unwrap();
    let fallback = r.report_all(t, P95Mode::Max, None, t).unwrap();
    let w = Ledger::open(&path, LedgerOptions::default()).unwrap();
    // The rebuild aggregates every complete hour, the ticks one CT in AGG_EVERY per tick: the
    // hours both have are equal.
    let rebuilt = summed(dump(&w));
    assert!(rebuilt.len() > ticked.len() / 2 && ticked.len() > 100);
    for (k, v) in &ticked {
        assert_eq!(rebuilt.get(k), Some(v), "{k:?}");
    }
    assert_eq!(w.report_all(t, P95Mode::Max, None, t).unwrap(), fallback);
    assert_aggregate_matches_rows(&w, t, t);
}

/// A brand-new ledger is current from the start, and a CT first read with `Baseline::Current`
/// (nothing booked) has a window of zeros.
#[test]
fn fresh_ledger_aggregate_is_current_and_empty_windows_are_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = Ledger::open(&dir.path().join("l.db"), LedgerOptions::default()).unwrap();
    w.register_ct(&info(1, 1, MAR1)).unwrap();
    let mut r0 = reading(1, MAR1 + 30, 1, &[(IN4, 500, 1)]);
    r0.first = Baseline::Current;
    w.tick(&[r0]).unwrap();
    let mut st = CurrentPeriods::default();
    let b = w.current_periods(&mut st, MAR1 + 40).unwrap();
    assert_eq!((b[0].n, b[0].in_bps, b[0].out_bps), (1, 0, 0));
    assert!(b[0].totals.is_empty());
    // Before the CT's creation: an empty window.
    let b = w.current_periods(&mut st, MAR1 - 10).unwrap();
    assert_eq!(b[0].n, 0);
    assert_aggregate_matches_rows(&w, MAR1, MAR1 + 40);
}
