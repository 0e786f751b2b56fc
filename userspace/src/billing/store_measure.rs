//! The bars at 1000 CTs over a real month (April 2026: 8640 slots), a measurement, not
//! a test of behaviour. Run in release:
//! `cargo test --release -p berth --lib billing::store::measure -- --ignored --nocapture`
//! (`BILLING_MEASURE_CTS`, `BILLING_MEASURE_TICKS` scale it down; `BILLING_MEASURE_BULK=FILE`
//! keeps a copy of the bulk-written ledger there, and a later run with the same numbers starts
//! from it instead of writing it again, ~5 minutes at 1000 CTs).
//!
//! Ticking a month takes hours, so the month's first slots are written in bulk, row by row as
//! the ticks write them (a slot row per key and an aggregate row per complete hour, in slot
//! order across CTs, so pages fill as they do under ticks; totals summed), and only the
//! last `BILLING_MEASURE_TICKS` 30-second ticks (default a day) run for real, timed. Then the
//! billing gauges are refreshed after each of the last 120 ticks (as berthd does), `report
//! all` runs over the whole month, and the aggregate is rebuilt as a migration would.
use std::time::{Duration, Instant};

use rusqlite::params;

use super::super::testrng::Rng;
use super::super::{CounterKey, Direction, Family, P95Mode, SlotFlags};
use super::tests::{IN4, OUT4, OUT6, info, reading};
use super::*;
use crate::metrics::billing::BillingGauges;

/// 2026-04-01T00:00:00Z.
const APR1: i64 = 1_775_001_600;
const MONTH_SLOTS: i64 = 30 * 288;

/// CPU time of this thread (user + system). CLOCK_THREAD_CPUTIME_ID is exact; getrusage's
/// thread times are tick-sampled on this kernel and read 0 for sub-millisecond work.
fn cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn env(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// "min … median … max" of durations.
fn spread(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "min {:?}, median {:?}, max {:?} (n = {})",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1],
        v.len()
    )
}

/// "mean, p95, max" of per-tick CPU times.
fn tick_stats(mut v: Vec<Duration>) -> String {
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    v.sort();
    let over = v.iter().filter(|t| **t > Duration::from_millis(20)).count();
    format!(
        "mean {mean:?}, median {:?}, p95 {:?}, max {:?} over {} ticks; {over} over 20 ms",
        v[v.len() / 2],
        v[(v.len() * 95).div_ceil(100) - 1],
        v[v.len() - 1],
        v.len()
    )
}

/// Writes the month's first `bulk_slots` slots for every CT as ticks would (slot rows, the
/// aggregate's row of each complete hour, the period totals), adding them to `truth`.
fn bulk(
    l: &mut Ledger,
    ids: &[(i64, u32)],
    keys: &[CounterKey; 4],
    bulk_slots: i64,
    rng: &mut Rng,
    truth: &mut [[Counter; 4]],
) {
    l.conn
        .execute_batch("PRAGMA synchronous=OFF; PRAGMA cache_size=-131072;")
        .unwrap();
    // Per CT the rows of the hour being written: an hour's aggregate row is written when it is
    // complete, as the tick does (the last, partial hour is left to the ticks).
    let mut hour_rows: Vec<Vec<SlotRow>> = vec![Vec::new(); ids.len()];
    for s in 0..bulk_slots {
        let idx = slot_index(APR1) + s;
        let seq = s + 1;
        let tx = l.conn.transaction().unwrap();
        {
            let mut put_slot = tx
                .prepare_cached("INSERT INTO slot VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)")
                .unwrap();
            let mut put_hour = tx
                .prepare_cached("INSERT INTO slot_hour VALUES (?1, ?2, ?3)")
                .unwrap();
            for (n, &(id, ctid)) in ids.iter().enumerate() {
                let rows = &mut hour_rows[n];
                for (i, k) in keys.iter().enumerate() {
                    // A slot's worth of the ticks' deltas (10 × up to 40 MB).
                    let b = rng.below(400_000_000);
                    let c = Counter::new(b, b / 700);
                    let t = &mut truth[ctid as usize][i];
                    t.bytes += c.bytes;
                    t.packets += c.packets;
                    put_slot
                        .execute(params![id, idx, k.code(), b as i64, (b / 700) as i64, seq])
                        .unwrap();
                    rows.push(SlotRow {
                        slot_start: idx * SLOT_SECS,
                        key: *k,
                        counter: c,
                        flags: SlotFlags::empty(),
                        seq,
                    });
                }
                if (idx + 1) % agg::HOUR_SLOTS == 0 {
                    for (hour, v) in agg::hour_records(rows) {
                        put_hour.execute(params![id, hour, v]).unwrap();
                    }
                    rows.clear();
                }
            }
            tx.execute("INSERT INTO tick VALUES (?1, ?2)", [seq, idx])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    {
        let tx = l.conn.transaction().unwrap();
        {
            let mut put_total = tx
                .prepare("INSERT INTO total VALUES (?1, ?2, ?3, ?4, ?5)")
                .unwrap();
            for &(id, ctid) in ids {
                for (i, k) in keys.iter().enumerate() {
                    let t = truth[ctid as usize][i];
                    put_total
                        .execute(params![
                            id,
                            APR1,
                            k.code(),
                            t.bytes as i64,
                            t.packets as i64
                        ])
                        .unwrap();
                }
            }
        }
        tx.execute(
            "UPDATE meta SET v = ?1 WHERE k IN ('seq', 'agg')",
            [bulk_slots],
        )
        .unwrap();
        tx.commit().unwrap();
    }
}

#[test]
#[ignore = "measurement (minutes, ~1.5 GB of disk): run in release with --ignored --nocapture"]
fn month_of_1000_cts() {
    let cts = env("BILLING_MEASURE_CTS", 1000) as u32;
    let n_ticks = env("BILLING_MEASURE_TICKS", 2880).clamp(240, MONTH_SLOTS * 10);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut l = Ledger::open(&path, LedgerOptions::default()).unwrap();
    for n in 0..cts {
        l.register_ct(&info(n, n, APR1)).unwrap();
    }
    let keys = [
        IN4,
        OUT4,
        CounterKey::new(Direction::In, 0, Family::V6),
        OUT6,
    ];
    let mut ids: Vec<(i64, u32)> = l.cts.values().map(|s| (s.id, s.info.ctid)).collect();
    ids.sort();
    let mut rng = Rng::new(1);
    // (CT, key) → period total, over the bulk slots and the ticks.
    let mut truth = vec![[Counter::default(); 4]; cts as usize];

    // The bulk: the slots before the ticked ones (a tick every 30 s: 10 per slot).
    let bulk_slots = MONTH_SLOTS - (n_ticks + 9) / 10;
    let started = Instant::now();
    let saved = std::env::var_os("BILLING_MEASURE_BULK").map(std::path::PathBuf::from);
    let reuse = saved
        .as_ref()
        .filter(|p| p.exists())
        .map(|p| (p.clone(), p.with_extension("truth")));
    if let Some((db, truth_file)) = &reuse {
        drop(l);
        std::fs::copy(db, &path).unwrap();
        let _ = std::fs::remove_file(path.with_extension("db-wal"));
        let _ = std::fs::remove_file(path.with_extension("db-shm"));
        let t: Vec<u64> = std::fs::read_to_string(truth_file)
            .unwrap()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(
            t.len(),
            cts as usize * 8,
            "{} is of another size",
            db.display()
        );
        for (n, c) in t.chunks(8).enumerate() {
            for i in 0..4 {
                truth[n][i] = Counter::new(c[2 * i], c[2 * i + 1]);
            }
        }
        println!("bulk: reused {}", db.display());
    } else {
        bulk(&mut l, &ids, &keys, bulk_slots, &mut rng, &mut truth);
        drop(l);
        println!(
            "bulk: {cts} CTs × {bulk_slots} slots × 4 keys written in {:?}",
            started.elapsed()
        );
        if let Some(p) = &saved {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .unwrap();
            drop(conn);
            std::fs::copy(&path, p).unwrap();
            let t: Vec<String> = truth
                .iter()
                .flatten()
                .flat_map(|c| [c.bytes.to_string(), c.packets.to_string()])
                .collect();
            std::fs::write(p.with_extension("truth"), t.join(" ")).unwrap();
        }
    }
    // The ticks' own numbers (the bulk's stream differs when it was reused).
    let mut rng = Rng::new(2);

    // The ticks, the last 120 of them each followed by the gauges' refresh.
    let mut l = Ledger::open(&path, LedgerOptions::default()).unwrap();
    if let Ok(kb) = std::env::var("XCACHE") {
        l.conn
            .execute_batch(&format!("PRAGMA cache_size=-{kb}"))
            .unwrap();
    }
    let mut cum = vec![[0u64; 4]; cts as usize];
    let t0 = APR1 + bulk_slots * SLOT_SECS;
    let mut ticks = Vec::new();
    let mut gauge_new = Vec::new();
    let mut gauge_new_cpu = Vec::new();
    let mut gauge_old = Vec::new();
    let mut gauge_old_cpu = Vec::new();
    let mut gauge_state = CurrentPeriods::default();
    let mut first_refresh = None;
    let mut t = t0;
    for i in 0..n_ticks {
        t = t0 + 30 * (i + 1);
        let rs: Vec<CtReading> = (0..cts)
            .map(|n| {
                let c = &mut cum[n as usize];
                for v in c.iter_mut() {
                    *v += rng.below(40_000_000);
                }
                let c: Vec<_> = keys
                    .iter()
                    .zip(c.iter())
                    .map(|(k, b)| (*k, *b, *b / 700))
                    .collect();
                reading(n, t, 1, &c)
            })
            .collect();
        let before = cpu();
        l.tick(&rs).unwrap();
        ticks.push(cpu() - before);
        if i >= n_ticks - 120 {
            // As berthd: a fresh read-only connection, the state kept from the last tick.
            let (w, c) = (Instant::now(), cpu());
            let r = Ledger::open_read_only(&path).unwrap();
            let g = BillingGauges::advance(&r, &mut gauge_state, t).unwrap();
            let (w, c) = (w.elapsed(), cpu() - c);
            if first_refresh.is_none() {
                // The first refresh reads every slot so far (berthd's start).
                first_refresh = Some((w, c));
            } else {
                gauge_new.push(w);
                gauge_new_cpu.push(c);
            }
            if i % 30 == 0 {
                let (w, c) = (Instant::now(), cpu());
                let r = Ledger::open_read_only(&path).unwrap();
                let full = BillingGauges::read(&r, t).unwrap();
                gauge_old.push(w.elapsed());
                gauge_old_cpu.push(cpu() - c);
                assert_eq!(full, g, "the advanced gauges equal the full reports");
            }
        }
    }
    for (n, c) in cum.iter().enumerate() {
        for (i, v) in c.iter().enumerate() {
            truth[n][i].bytes += v;
            truth[n][i].packets += v / 700;
        }
    }
    drop(l);

    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let one = |q: &str| -> i64 { conn.query_row(q, [], |r| r.get(0)).unwrap_or(-1) };
    let rows = one("SELECT count(*) FROM slot");
    let file = one("PRAGMA page_count") * one("PRAGMA page_size");
    let table = |name: &str| {
        conn.query_row(
            "SELECT sum(pgsize) FROM dbstat WHERE name = ?1",
            [name],
            |r| r.get::<_, i64>(0),
        )
        .unwrap_or(-1)
    };
    let per_row = |b: i64| b as f64 / rows as f64;
    println!(
        "database: {rows} slot rows, file {file} bytes = {:.1} bytes per slot row (slot table {:.1}, slot_hour {:.1}, total {:.2}, tick {:.2})",
        per_row(file),
        per_row(table("slot")),
        per_row(table("slot_hour")),
        per_row(table("total")),
        per_row(table("tick")),
    );
    drop(conn);
    println!(
        "tick of {cts} CTs, CPU (thread CPU clock), the month's last {n_ticks} ticks: {}",
        tick_stats(ticks)
    );
    if let Some((w, c)) = first_refresh {
        println!("gauges, first refresh (reads the period so far): {w:?} wall, {c:?} CPU");
    }
    println!(
        "gauges after a tick, advanced: wall {}; CPU {}",
        spread(gauge_new),
        spread(gauge_new_cpu)
    );
    println!(
        "gauges after a tick, from report_all (before this change): wall {}; CPU {}",
        spread(gauge_old),
        spread(gauge_old_cpu)
    );

    // `billing report all` for the month, as the CLI runs it (a read-only ledger, opened each time).
    let now = APR1 + MONTH_SLOTS * SLOT_SECS;
    assert_eq!(t, now);
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    let mut last = Vec::new();
    for _ in 0..5 {
        let (w, c) = (Instant::now(), cpu());
        let r = Ledger::open_read_only(&path).unwrap();
        last = r.report_all(APR1 + 100, P95Mode::Max, None, now).unwrap();
        walls.push(w.elapsed());
        cpus.push(cpu() - c);
    }
    println!(
        "report_all for the month ({cts} CTs × {MONTH_SLOTS} slots): wall {}; CPU {}",
        spread(walls),
        spread(cpus)
    );
    assert_eq!(last.len(), cts as usize);
    for rep in &last {
        assert_eq!(rep.p95.n, MONTH_SLOTS as u64);
        assert_eq!(rep.p95.slots_present, MONTH_SLOTS as u64);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(
                rep.totals[k], truth[rep.ct.ctid as usize][i],
                "CT {}",
                rep.ct.ctid
            );
        }
    }
    let r = Ledger::open_read_only(&path).unwrap();
    let one_ct = &last[cts as usize / 2];
    let mut walls = Vec::new();
    for _ in 0..5 {
        let w = Instant::now();
        let got = r
            .report(&one_ct.ct.uuid, &one_ct.period, P95Mode::Max, None, now)
            .unwrap();
        walls.push(w.elapsed());
        assert_eq!(&got, one_ct);
    }
    println!("report of one CT for the month: wall {}", spread(walls));
    // The slot rows' answer (the path before the aggregate), for a few CTs: equal, and timed.
    {
        let _read = r.snapshot().unwrap();
        let w = Instant::now();
        let sample: Vec<&Report> = last.iter().step_by((cts as usize / 10).max(1)).collect();
        for rep in &sample {
            let slow = r
                .report_in(&rep.ct.uuid, &rep.period, P95Mode::Max, None, now, false)
                .unwrap();
            assert_eq!(&&slow, rep);
        }
        let per = w.elapsed() / sample.len() as u32;
        println!(
            "the same from the slot rows (before): {per:?} per CT, {:?} for {cts} CTs extrapolated",
            per * cts
        );
    }
    drop(r);

    // The migration: a ledger without a current aggregate, opened for writing.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE meta SET v = v - 1 WHERE k = 'agg'", [])
        .unwrap();
    drop(conn);
    let w = Instant::now();
    let l = Ledger::open(&path, LedgerOptions::default()).unwrap();
    println!(
        "rebuilding the aggregate from {rows} slot rows (the migration): {:?}",
        w.elapsed()
    );
    assert_eq!(
        l.report_all(APR1 + 100, P95Mode::Max, None, now).unwrap(),
        last
    );
}
