//! Periods across a change of billing day or time zone ([`PeriodSpec::with_history`]); the
//! expected boundaries are written out by hand.
use super::*;

fn utc(s: &str) -> i64 {
    s.parse::<Timestamp>().unwrap().as_second()
}

fn changed(old: (BillingAnchor, &str), new: (BillingAnchor, &str), at: &str) -> (PeriodSpec, i64) {
    let before = PeriodSpec::new(old.0, old.1, 0).unwrap();
    let until = before.change_takes_effect(utc(at)).unwrap();
    let h = [AnchorChange {
        until,
        anchor: old.0,
        tz: old.1.into(),
    }];
    (
        PeriodSpec::with_history(&h, new.0, new.1, 0).unwrap(),
        until,
    )
}

fn bounds(spec: &PeriodSpec, label: &str) -> (i64, i64) {
    let p = spec.parse(label).unwrap();
    assert_eq!(p.label(), label);
    (p.start, p.end)
}

/// Every instant in one period, periods back to back, each name once, `parse` finds each.
fn assert_tiles(spec: &PeriodSpec, from: &str, months: usize) {
    let mut p = spec.period_of(utc(from)).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..months {
        assert!(p.start < p.end, "{p:?}");
        assert!(seen.insert(p.label()), "{} twice", p.label());
        assert_eq!(spec.parse(&p.label()).unwrap(), p);
        assert_eq!(spec.period_of(p.start).unwrap(), p);
        assert_eq!(spec.period_of(p.end - 1).unwrap(), p);
        let n = spec.next(&p).unwrap();
        assert_eq!(n.start, p.end);
        assert_eq!(spec.prev(&n).unwrap(), p);
        p = n;
    }
}

#[test]
fn day_1_to_15_keeps_the_current_period_and_lengthens_the_next() {
    let (spec, until) = changed(
        (BillingAnchor::Day(1), "UTC"),
        (BillingAnchor::Day(15), "UTC"),
        "2026-01-10T12:00:00Z",
    );
    assert_eq!(until, utc("2026-02-01T00:00:00Z"));
    assert_eq!(
        bounds(&spec, "2025-12"),
        (utc("2025-12-01T00:00:00Z"), utc("2026-01-01T00:00:00Z"))
    );
    assert_eq!(
        bounds(&spec, "2026-01"),
        (utc("2026-01-01T00:00:00Z"), utc("2026-02-01T00:00:00Z"))
    );
    // 15 Jan–15 Feb would reuse the name 2026-01: the first new period is named 2026-02.
    assert_eq!(
        bounds(&spec, "2026-02"),
        (utc("2026-02-01T00:00:00Z"), utc("2026-03-15T00:00:00Z"))
    );
    assert_eq!(
        bounds(&spec, "2026-03"),
        (utc("2026-03-15T00:00:00Z"), utc("2026-04-15T00:00:00Z"))
    );
    assert_eq!(spec.billing_day(), 15);
    assert_eq!(
        spec.settings_at(utc("2026-01-31T23:59:59Z")),
        (BillingAnchor::Day(1), "UTC")
    );
    assert_eq!(spec.settings_at(until), (BillingAnchor::Day(15), "UTC"));
    assert_tiles(&spec, "2025-06-01T00:00:00Z", 30);
}

#[test]
fn day_15_to_1_gives_a_short_period() {
    let (spec, until) = changed(
        (BillingAnchor::Day(15), "UTC"),
        (BillingAnchor::Day(1), "UTC"),
        "2026-01-20T00:00:00Z",
    );
    assert_eq!(until, utc("2026-02-15T00:00:00Z"));
    assert_eq!(
        bounds(&spec, "2026-01"),
        (utc("2026-01-15T00:00:00Z"), utc("2026-02-15T00:00:00Z"))
    );
    assert_eq!(
        bounds(&spec, "2026-02"),
        (utc("2026-02-15T00:00:00Z"), utc("2026-03-01T00:00:00Z"))
    );
    assert_eq!(
        bounds(&spec, "2026-03"),
        (utc("2026-03-01T00:00:00Z"), utc("2026-04-01T00:00:00Z"))
    );
    assert_tiles(&spec, "2025-06-01T00:00:00Z", 30);
}

/// UTC day 1 to Berlin day 31 during December: December stays UTC, the first Berlin period
/// starts at 1 Jan 00:00 UTC (01:00 in Berlin) and ends at the end of Berlin's "2027-01"
/// (28 Feb 00:00 CET, 23:00 UTC the day before), which crosses no DST change.
#[test]
fn utc_day_1_to_berlin_day_31() {
    let (spec, until) = changed(
        (BillingAnchor::Day(1), "UTC"),
        (BillingAnchor::Day(31), "Europe/Berlin"),
        "2026-12-05T08:00:00Z",
    );
    assert_eq!(until, utc("2027-01-01T00:00:00Z"));
    assert_eq!(
        bounds(&spec, "2026-12"),
        (utc("2026-12-01T00:00:00Z"), utc("2027-01-01T00:00:00Z"))
    );
    assert_eq!(
        bounds(&spec, "2027-01"),
        (utc("2027-01-01T00:00:00Z"), utc("2027-02-27T23:00:00Z"))
    );
    // Day 31 clamped to 31 Mar; 31 Mar is after the DST change (CEST, +02:00).
    assert_eq!(
        bounds(&spec, "2027-02"),
        (utc("2027-02-27T23:00:00Z"), utc("2027-03-30T22:00:00Z"))
    );
    assert_eq!(
        spec.rfc3339(utc("2027-02-27T23:00:00Z")).unwrap(),
        "2027-02-28T00:00:00+01:00"
    );
    assert_eq!(
        spec.rfc3339(utc("2026-12-31T23:00:00Z")).unwrap(),
        "2026-12-31T23:00:00+00:00"
    );
    assert_tiles(&spec, "2026-01-01T00:00:00Z", 36);
}

/// A change made in the first minute of a period still waits for that period to end.
#[test]
fn a_change_at_a_period_start_waits_a_whole_period() {
    let (spec, until) = changed(
        (BillingAnchor::Day(1), "UTC"),
        (BillingAnchor::Day(1), "Asia/Tokyo"),
        "2026-03-01T00:00:00Z",
    );
    assert_eq!(until, utc("2026-04-01T00:00:00Z"));
    // Tokyo's April starts 9 hours before UTC's: the first Tokyo period is April, from
    // UTC's midnight to Tokyo's 1 May.
    assert_eq!(
        bounds(&spec, "2026-04"),
        (utc("2026-04-01T00:00:00Z"), utc("2026-04-30T15:00:00Z"))
    );
    assert_tiles(&spec, "2025-01-01T00:00:00Z", 30);
}

/// Several changes in a row, also to anniversary, still tile time with unique names.
#[test]
fn several_changes_tile_time() {
    let created = utc("2025-11-17T10:00:00Z");
    let mut history = Vec::new();
    let mut cur = (BillingAnchor::Day(31), "America/New_York".to_string());
    for (at, next) in [
        ("2026-01-20T00:00:00Z", (BillingAnchor::Day(5), "UTC")),
        (
            "2026-03-02T00:00:00Z",
            (BillingAnchor::Anniversary, "Pacific/Kiritimati"),
        ),
        (
            "2026-07-30T00:00:00Z",
            (BillingAnchor::Day(29), "Pacific/Pago_Pago"),
        ),
        (
            "2026-08-30T00:00:00Z",
            (BillingAnchor::Day(1), "Europe/Berlin"),
        ),
    ] {
        let before = PeriodSpec::with_history(&history, cur.0, &cur.1, created).unwrap();
        let until = before.change_takes_effect(utc(at)).unwrap();
        assert!(until > utc(at));
        // Everything before the change keeps its period.
        let old = before.period_of(utc(at)).unwrap();
        history.push(AnchorChange {
            until,
            anchor: cur.0,
            tz: cur.1.clone(),
        });
        cur = (next.0, next.1.to_string());
        let after = PeriodSpec::with_history(&history, cur.0, &cur.1, created).unwrap();
        assert_eq!(after.period_of(utc(at)).unwrap(), old);
        assert_tiles(&after, "2025-10-01T00:00:00Z", 24);
    }
}
