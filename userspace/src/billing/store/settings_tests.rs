use super::super::super::book::{Baseline, Reading};
use super::super::super::{Counter, CounterKey, Direction, Family, P95Mode};
use super::super::{CtReading, LedgerOptions};
use super::*;

/// 2026-03-01T00:00:00Z.
const MAR1: i64 = 1_772_323_200;
const APR1: i64 = MAR1 + 31 * 86400;
const UUID: &str = "5e771165-0000-4000-8000-000000000001";

fn key(direction: Direction, class: u8) -> CounterKey {
    CounterKey::new(direction, class, Family::V4)
}

fn open(dir: &tempfile::TempDir) -> Ledger {
    Ledger::open(&dir.path().join("l.db"), LedgerOptions::default()).unwrap()
}

fn reading(at: i64, c: &[(CounterKey, u64)]) -> CtReading {
    CtReading {
        uuid: UUID.into(),
        reading: Reading {
            at,
            epoch: 1,
            counters: c.iter().map(|(k, b)| (*k, Counter::new(*b, 1))).collect(),
        },
        first: Baseline::Zero,
    }
}

fn ct(created: i64) -> CtInfo {
    CtInfo::new(
        UUID.into(),
        101,
        BillingAnchor::Day(1),
        "UTC".into(),
        created,
    )
}

/// A change of billing day mid-March: March keeps its bounds and its bytes; the first period
/// under day 15 runs 1 Apr–15 May (April's name is the first one after March's); the history
/// survives a reopen and a read-only open.
#[test]
fn a_change_applies_from_the_end_of_the_current_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&ct(MAR1)).unwrap();
    let k = key(Direction::In, 0);
    l.tick(&[reading(MAR1 + 30, &[(k, 0)])]).unwrap();
    l.tick(&[reading(MAR1 + 5 * 86400, &[(k, 1000)])]).unwrap();
    let now = MAR1 + 10 * 86400;
    let from = l
        .change_anchor(UUID, BillingAnchor::Day(15), "UTC", now)
        .unwrap();
    assert_eq!(from, Some(APR1));
    // Ticks after the change: still March until 1 Apr, then the new period.
    l.tick(&[reading(APR1 - 60, &[(k, 1500)])]).unwrap();
    l.tick(&[reading(APR1 + 20 * 86400, &[(k, 1800)])]).unwrap();
    let check = |l: &Ledger| {
        let spec = l.period_spec(UUID).unwrap();
        let mar = spec.parse("2026-03").unwrap();
        assert_eq!((mar.start, mar.end), (MAR1, APR1));
        let apr = spec.parse("2026-04").unwrap();
        let may15 = APR1 + (30 + 14) * 86400;
        assert_eq!((apr.start, apr.end), (APR1, may15));
        assert_eq!(spec.parse("2026-05").unwrap().start, may15);
        let mar_total = l.totals(UUID, MAR1).unwrap();
        let apr_total = l.totals(UUID, APR1).unwrap();
        assert_eq!(mar_total[&k].bytes, 1500);
        assert_eq!(apr_total[&k].bytes, 300);
        let info = l.ct(UUID).unwrap();
        assert_eq!(
            (info.anchor, info.tz.as_str()),
            (BillingAnchor::Day(15), "UTC")
        );
        assert_eq!(
            info.history,
            vec![AnchorChange {
                until: APR1,
                anchor: BillingAnchor::Day(1),
                tz: "UTC".into()
            }]
        );
        let r = l.report(UUID, &apr, P95Mode::Max, None, may15).unwrap();
        assert_eq!(r.p95.n, (44 * 86400 / 300) as u64);
    };
    check(&l);
    drop(l);
    check(&open(&dir));
    check(&Ledger::open_read_only(&dir.path().join("l.db")).unwrap());
}

/// A second change before the first took effect replaces it; changing back cancels it.
#[test]
fn a_pending_change_is_replaced_or_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&ct(MAR1)).unwrap();
    let now = MAR1 + 86400;
    l.change_anchor(UUID, BillingAnchor::Day(15), "UTC", now)
        .unwrap();
    let from = l
        .change_anchor(UUID, BillingAnchor::Day(20), "Europe/Berlin", now + 60)
        .unwrap();
    assert_eq!(from, Some(APR1));
    let info = l.ct(UUID).unwrap().clone();
    assert_eq!(info.history.len(), 1);
    assert_eq!(info.history[0].anchor, BillingAnchor::Day(1));
    assert_eq!(info.tz, "Europe/Berlin");
    let back = l
        .change_anchor(UUID, BillingAnchor::Day(1), "UTC", now + 120)
        .unwrap();
    assert_eq!(back, None);
    let info = l.ct(UUID).unwrap().clone();
    assert!(info.history.is_empty(), "{info:?}");
    let rows: i64 = l
        .conn
        .query_row("SELECT count(*) FROM ct_anchor", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    // After the change took effect, a further one keeps it as history.
    l.change_anchor(UUID, BillingAnchor::Day(15), "UTC", now)
        .unwrap();
    let later = l
        .change_anchor(UUID, BillingAnchor::Day(1), "UTC", APR1 + 86400)
        .unwrap();
    assert_eq!(later, Some(APR1 + (30 + 14) * 86400));
    assert_eq!(l.ct(UUID).unwrap().history.len(), 2);
}

#[test]
fn bad_settings_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&ct(MAR1)).unwrap();
    let e = l
        .change_anchor(UUID, BillingAnchor::Day(1), "Nowhere/Atlantis", MAR1)
        .unwrap_err();
    assert!(matches!(e, BillingError::TimeZone { .. }), "{e}");
    let e = l
        .change_anchor(UUID, BillingAnchor::Day(32), "UTC", MAR1)
        .unwrap_err();
    assert!(matches!(e, BillingError::BillingDay(32)), "{e}");
    let mut moved = ct(MAR1);
    moved.anchor = BillingAnchor::Day(9);
    assert!(matches!(
        l.register_ct(&moved),
        Err(BillingError::AnchorChange(_))
    ));
    let mut bad = ct(MAR1);
    for c in [vec![], vec![1, 1], vec![16]] {
        bad.classes = Some(c);
        assert!(matches!(l.register_ct(&bad), Err(BillingError::Classes(_))));
    }
    bad.classes = None;
    bad.commit_bps = Some(u64::MAX);
    assert!(matches!(l.register_ct(&bad), Err(BillingError::Commit(_))));
    let info = l.ct(UUID).unwrap();
    assert_eq!(info, &ct(MAR1));
    let stored: (String, String, Option<i64>, Option<String>) = l
        .conn
        .query_row(
            "SELECT billing_day, tz, commit_bps, classes FROM ct",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(stored, ("1".into(), "UTC".into(), None, None));
}

/// The commit rate and the class filter: the 95th covers the billed classes only, the slots
/// over the commit rate are counted, and both survive a reopen.
#[test]
fn commit_rate_and_class_filter_shape_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = open(&dir);
    l.register_ct(&ct(MAR1)).unwrap();
    let (c0, c1) = (key(Direction::Out, 0), key(Direction::Out, 1));
    // Ten slots: class 0 carries 3,750,000 bytes (100 kbit/s) in each, class 1 1,500,000
    // bytes (40 kbit/s) in the first eight and 7,500,000 (200 kbit/s) in the last two.
    let mut t = MAR1 + 10;
    let (mut b0, mut b1) = (0u64, 0u64);
    l.tick(&[reading(t, &[(c0, 0), (c1, 0)])]).unwrap();
    for i in 0..10 {
        b0 += 3_750_000;
        b1 += if i < 8 { 1_500_000 } else { 7_500_000 };
        t += 300;
        l.tick(&[reading(t, &[(c0, b0), (c1, b1)])]).unwrap();
    }
    // Slot 0 holds the first reading only (nothing booked), slots 1–10 the ten deltas.
    let now = MAR1 + 3300;
    let p = l.period_spec(UUID).unwrap().period_of(now).unwrap();
    let all = l.report(UUID, &p, P95Mode::Max, None, now).unwrap();
    assert_eq!(all.p95.n, 11);
    // Every class: 0, 140 kbit/s in 8 slots, 300 kbit/s in 2; rank ⌈10.45⌉ = 11: 300 kbit/s.
    assert_eq!(all.p95.bps, 300_000);
    assert_eq!(all.commit_bps, None);
    assert_eq!(all.p95.slots_over_commit, 0);

    let mut info = l.ct(UUID).unwrap().clone();
    info.commit_bps = Some(150_000);
    info.classes = Some(vec![0]);
    l.register_ct(&info).unwrap();
    let check = |l: &Ledger| {
        let r = l.report(UUID, &p, P95Mode::Max, None, now).unwrap();
        assert_eq!(r.commit_bps, Some(150_000));
        assert_eq!(r.p95.bps, 100_000, "class 1 is not billed");
        assert_eq!(r.p95.slots_over_commit, 0);
        // Totals keep every class; the billed sums are class 0's.
        assert_eq!(r.totals[&c1].bytes, b1);
        assert_eq!(super::super::super::json::direction_sums(&r), (0, b0));
        // An explicit commit rate overrides the CT's.
        let r = l.report(UUID, &p, P95Mode::Max, Some(99_999), now).unwrap();
        assert_eq!((r.commit_bps, r.p95.slots_over_commit), (Some(99_999), 10));
    };
    check(&l);
    drop(l);
    let mut l = open(&dir);
    check(&l);
    info.classes = Some(vec![0, 1]);
    l.register_ct(&info).unwrap();
    let r = l.report(UUID, &p, P95Mode::Max, None, now).unwrap();
    assert_eq!((r.p95.bps, r.p95.slots_over_commit), (300_000, 2));
}

/// A ledger written by the schema-1 code (no settings columns, no history table) is read as
/// is by a read-only reader, and migrated by the writer with every booked byte kept.
#[test]
fn a_version_1_ledger_is_read_and_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let k = key(Direction::In, 0);
    {
        let mut l = open(&dir);
        l.register_ct(&ct(MAR1)).unwrap();
        l.tick(&[reading(MAR1 + 30, &[(k, 0)])]).unwrap();
        l.tick(&[reading(MAR1 + 630, &[(k, 777)])]).unwrap();
        l.conn
            .execute_batch(
                "ALTER TABLE ct DROP COLUMN commit_bps;
                 ALTER TABLE ct DROP COLUMN classes;
                 DROP TABLE ct_anchor;
                 UPDATE meta SET v = 1 WHERE k = 'schema';",
            )
            .unwrap();
    }
    let ro = Ledger::open_read_only(&path).unwrap();
    assert_eq!(ro.ct(UUID).unwrap(), &ct(MAR1));
    assert_eq!(ro.totals(UUID, MAR1).unwrap()[&k].bytes, 777);
    drop(ro);
    let mut l = open(&dir);
    let v: i64 = l
        .conn
        .query_row("SELECT v FROM meta WHERE k = 'schema'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 2);
    assert_eq!(l.totals(UUID, MAR1).unwrap()[&k].bytes, 777);
    let mut info = ct(MAR1);
    info.commit_bps = Some(1_000_000);
    l.register_ct(&info).unwrap();
    l.change_anchor(UUID, BillingAnchor::Day(31), "Europe/Berlin", MAR1 + 700)
        .unwrap();
    drop(l);
    let l = open(&dir);
    assert_eq!(l.ct(UUID).unwrap().commit_bps, Some(1_000_000));
    assert_eq!(l.ct(UUID).unwrap().history.len(), 1);
}
