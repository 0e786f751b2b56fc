use super::super::book::{Baseline, Reading};
use super::super::store::{CtReading, LedgerOptions};
use super::super::testrng::Rng;
use super::*;

const IN4: CounterKey = CounterKey {
    direction: Direction::In,
    class: 0,
    family: Family::V4,
};
const OUT4: CounterKey = CounterKey {
    direction: Direction::Out,
    class: 0,
    family: Family::V4,
};
const OUT6: CounterKey = CounterKey {
    direction: Direction::Out,
    class: 2,
    family: Family::V6,
};
const UUID: &str = "0c5e4a2e-1f3b-4c6d-8e9f-a0b1c2d3e4f5";

/// A Berlin CT billed on day 31, ticked around the March DST change with gaps, an anomaly and a
/// clock step and a three-week outage; returns the ledger, its February period and the report time.
fn berlin_ledger(dir: &tempfile::TempDir) -> (Ledger, Period, i64) {
    let mut l = Ledger::open(&dir.path().join("l.db"), LedgerOptions::default()).unwrap();
    let spec = PeriodSpec::new(BillingAnchor::Day(31), "Europe/Berlin", 0).unwrap();
    let p = spec.parse("2026-02").unwrap();
    let ct = CtInfo {
        uuid: UUID.into(),
        ctid: 4243,
        anchor: BillingAnchor::Day(31),
        tz: "Europe/Berlin".into(),
        created: p.start + 3 * 86400 + 17,
        destroyed: None,
        commit_bps: None,
        classes: None,
        history: Vec::new(),
    };
    l.register_ct(&ct).unwrap();
    let mut rng = Rng::new(31);
    let mut c = [0u64; 3];
    let keys = [IN4, OUT4, OUT6];
    // From the creation to a day past the DST change (29 March 01:00 UTC), 60 s ticks.
    let dst = 1_774_746_000;
    let mut t = ct.created + 60;
    while t < dst + 86400 {
        for (i, v) in c.iter_mut().enumerate() {
            *v += rng.below(if i == 2 { 1000 } else { 90_000_000 });
        }
        let mut counters: BTreeMap<_, _> = keys
            .iter()
            .zip(c)
            .map(|(k, v)| (*k, Counter::new(v, v / 900)))
            .collect();
        if rng.below(500) == 0 {
            counters.insert(IN4, Counter::new(1, 1)); // an anomaly
        }
        let at = if rng.below(700) == 0 { t - 4000 } else { t }; // a clock step
        l.tick(&[CtReading {
            uuid: UUID.into(),
            reading: Reading {
                at,
                epoch: 9,
                counters,
            },
            first: Baseline::Zero,
        }])
        .unwrap();
        t += match rng.below(300) {
            0 => 300 * (2 + rng.below(20) as i64), // berthd down
            _ => 60 + rng.below(5) as i64,
        };
        if t > ct.created + 86400 && t < dst - 6 * 3600 {
            // Down for most of the month (spread, estimated), which keeps the debug test fast.
            t = dst - 6 * 3600;
        }
    }
    (l, p, p.end)
}

fn export(l: &Ledger, p: &Period, now: i64) -> String {
    let mut buf = Vec::new();
    l.export_csv(&mut buf, UUID, p, "l3", now).unwrap();
    String::from_utf8(buf).unwrap()
}

#[test]
fn recompute_matches_the_store_report_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (l, p, now) = berlin_ledger(&dir);
    let csv = export(&l, &p, now);
    assert!(csv.starts_with(&(HEADER.join(",") + "\n")));
    for mode in [
        P95Mode::Max,
        P95Mode::PerDirection,
        P95Mode::Sum,
        P95Mode::MaxPerSlot,
    ] {
        let stored = l.report(UUID, &p, mode, Some(1_000_000), now).unwrap();
        let re = recompute(csv.as_bytes(), mode, Some(1_000_000), None).unwrap();
        assert_eq!(re.period, stored.period);
        assert_eq!(re.window, stored.window);
        assert_eq!(re.totals, stored.totals);
        assert_eq!(re.p95, stored.p95, "{mode:?}");
        assert_eq!(re.flags, stored.flags);
        assert_eq!((re.ct.uuid.as_str(), re.ct.ctid), (UUID, 4243));
    }
    let r = l.report(UUID, &p, P95Mode::Max, None, now).unwrap();
    // The window starts at the creation's slot and the period has the DST-short day.
    assert_eq!(
        r.window.first,
        super::super::slot_of(p.start + 3 * 86400 + 17)
    );
    assert_eq!(p.slot_count(), 31 * 288 - 12);
    assert!(r.p95.slots_estimated > 0 && r.p95.bps > 0);
    assert!(r.flags.contains(SlotFlags::ESTIMATED) && r.flags.contains(SlotFlags::COUNTER_ANOMALY));
    // Totals equal the sum of the exported integers, byte for byte.
    let rows = l.slots(UUID, p.start, p.end).unwrap();
    let out4: u64 = rows
        .iter()
        .filter(|r| r.key == OUT4)
        .map(|r| r.counter.bytes)
        .sum();
    assert_eq!(r.totals[&OUT4].bytes, out4);
}

#[test]
fn rows_round_trip_to_the_same_integers() {
    let dir = tempfile::tempdir().unwrap();
    let (l, p, now) = berlin_ledger(&dir);
    let csv = export(&l, &p, now);
    let rows = l.slots(UUID, p.start, p.end).unwrap();
    let mut rdr = ::csv::Reader::from_reader(csv.as_bytes());
    let mut n = 0;
    for (rec, row) in rdr.records().zip(&rows) {
        let rec = rec.unwrap();
        assert_eq!(
            rec[10].parse::<Timestamp>().unwrap().as_second(),
            row.slot_start
        );
        assert_eq!(
            (&rec[11], rec[12].parse::<u8>().unwrap(), &rec[13]),
            (
                row.key.direction.as_str(),
                row.key.class,
                row.key.family.as_str()
            )
        );
        assert_eq!(
            (
                rec[14].parse::<u64>().unwrap(),
                rec[15].parse::<u64>().unwrap()
            ),
            (row.counter.bytes, row.counter.packets)
        );
        assert_eq!(SlotFlags::parse_names(&rec[16]), Some(row.flags));
        assert_eq!(&rec[6], "2026-02-28T00:00:00+01:00");
        assert_eq!(&rec[7], "2026-03-31T00:00:00+02:00");
        n += 1;
    }
    assert_eq!(n, rows.len());
}

#[test]
fn override_recomputes_in_other_terms() {
    let dir = tempfile::tempdir().unwrap();
    let (l, p, now) = berlin_ledger(&dir);
    let csv = export(&l, &p, now);
    // In UTC on day 1 the rows from 28 February fall in February's period, the rest in March's:
    // recomputing counts the rows of the period holding the exported start only.
    let re = recompute(
        csv.as_bytes(),
        P95Mode::Max,
        None,
        Some((BillingAnchor::Day(1), "UTC")),
    )
    .unwrap();
    assert_eq!(re.period.label(), "2026-02");
    assert_eq!(re.period.end, 1_772_323_200);
    let rows = l.slots(UUID, re.period.start, re.period.end).unwrap();
    let want: u64 = rows
        .iter()
        .filter(|r| r.key == IN4)
        .map(|r| r.counter.bytes)
        .sum();
    assert_eq!(re.totals.get(&IN4).map_or(0, |c| c.bytes), want);
    assert!(matches!(
        recompute(
            csv.as_bytes(),
            P95Mode::Max,
            None,
            Some((BillingAnchor::Day(1), "Bad/Zone"))
        ),
        Err(BillingError::TimeZone { .. })
    ));
}

fn err_line(csv: &str) -> (Option<u64>, String) {
    let e = recompute(csv.as_bytes(), P95Mode::Max, None, None).unwrap_err();
    let line = match &e {
        BillingError::CsvLine { line, .. } | BillingError::CsvRead { line, .. } => Some(*line),
        _ => None,
    };
    (line, e.to_string())
}

#[test]
fn corrupt_or_truncated_csv_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let (l, p, now) = berlin_ledger(&dir);
    let csv = export(&l, &p, now);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines.len() > 100);
    let last = lines.len() as u64;
    // Cut inside the last row: a short record.
    let cut = &csv[..csv.len() - 9];
    let (line, msg) = err_line(cut);
    assert_eq!(line, Some(last), "{msg}");
    // Cut inside the last field (the row count): it disagrees with the other rows.
    let cut = &csv[..csv.len() - 2];
    assert_eq!(err_line(cut).0, Some(last));
    // Cut between rows: the count is unmet.
    let cut: String = lines[..lines.len() - 5]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    let (line, msg) = err_line(&cut);
    assert_eq!(line, Some(last - 5));
    assert!(msg.contains("truncated"), "{msg}");
    // A corrupt number, flag, direction or time on line 40.
    for (col, bad) in [
        (14, "12x"),
        (16, "estimated|bogus"),
        (11, "sideways"),
        (10, "2026-02-30T00:00:00Z"),
        (0, "another-uuid"),
        (15, "-1"),
    ] {
        let mut ls: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let mut f: Vec<String> = ls[39].split(',').map(String::from).collect();
        f[col] = bad.to_string();
        ls[39] = f.join(",");
        let (line, msg) = err_line(&(ls.join("\n") + "\n"));
        assert_eq!(line, Some(40), "column {col}: {msg}");
    }
    // A duplicated row.
    let mut ls: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    ls[40] = ls[39].clone();
    let (line, msg) = err_line(&(ls.join("\n") + "\n"));
    assert_eq!(line, Some(41), "{msg}");
    // Wrong header, header only, empty.
    assert_eq!(err_line(&csv.replacen("ct_uuid", "uuid", 1)).0, Some(1));
    assert!(matches!(
        recompute(lines[0].as_bytes(), P95Mode::Max, None, None),
        Err(BillingError::CsvEmpty(_))
    ));
    assert!(recompute(&b""[..], P95Mode::Max, None, None).is_err());
}

/// The first period after a change of billing day and time zone (UTC day 1 → Berlin day 31,
/// made in March: April runs from 1 Apr 00:00 UTC to Berlin's 31 May, 30 May 22:00 UTC), and a
/// class filter: the export recomputes to the store's numbers, with the filter given again.
#[test]
fn recompute_of_a_period_after_a_change_with_a_class_filter() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(&dir.path().join("l.db"), LedgerOptions::default()).unwrap();
    let mar1 = 1_772_323_200;
    let apr1 = mar1 + 31 * 86400;
    let mut ct = CtInfo::new(UUID.into(), 7, BillingAnchor::Day(1), "UTC".into(), mar1);
    ct.classes = Some(vec![2]);
    ct.commit_bps = Some(1000);
    l.register_ct(&ct).unwrap();
    let mut rng = Rng::new(5);
    let mut c = [0u64; 3];
    let mut t = mar1 + 20;
    let mut changed = None;
    while t < apr1 + 62 * 86400 {
        for v in &mut c {
            *v += rng.below(100_000);
        }
        let counters = [IN4, OUT4, OUT6]
            .iter()
            .zip(c)
            .map(|(k, v)| (*k, Counter::new(v, v / 100)))
            .collect();
        l.tick(&[CtReading {
            uuid: UUID.into(),
            reading: Reading {
                at: t,
                epoch: 1,
                counters,
            },
            first: Baseline::Zero,
        }])
        .unwrap();
        if changed.is_none() && t > mar1 + 9 * 86400 {
            changed = l
                .change_anchor(UUID, BillingAnchor::Day(31), "Europe/Berlin", t)
                .unwrap();
        }
        t += if rng.below(10) == 0 { 86400 } else { 300 };
    }
    assert_eq!(changed, Some(apr1));
    let p = l.period_spec(UUID).unwrap().parse("2026-04").unwrap();
    assert_eq!((p.start, p.end), (apr1, 1_780_178_400));
    let now = t;
    let csv = export(&l, &p, now);
    let line2 = csv.lines().nth(1).unwrap();
    assert!(
        line2.contains(
            ",31,Europe/Berlin,2026-04,2026-04-01T02:00:00+02:00,2026-05-31T00:00:00+02:00,"
        ),
        "{line2}"
    );
    let stored = l.report(UUID, &p, P95Mode::Max, None, now).unwrap();
    assert_eq!(stored.commit_bps, Some(1000));
    let unfiltered = recompute(csv.as_bytes(), P95Mode::Max, Some(1000), None).unwrap();
    let re = recompute_with(
        csv.as_bytes(),
        P95Mode::Max,
        Some(1000),
        None,
        Some(vec![2]),
    )
    .unwrap();
    assert_eq!(re.period, stored.period);
    assert_eq!(re.totals, stored.totals);
    assert_eq!(re.p95, stored.p95);
    // Class 2 (OUT6) carries a third of the bytes: the filter changes the 95th.
    assert!(
        unfiltered.p95.bps > re.p95.bps,
        "{:?} {:?}",
        unfiltered.p95,
        re.p95
    );
    assert_eq!(
        super::super::json::direction_sums(&re),
        (0, stored.totals[&OUT6].bytes)
    );
}
