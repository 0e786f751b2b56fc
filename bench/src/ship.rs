//! `ship`: issue 14's bar for the fleet shipper. A node's ledger with `--cts` CTs × `--slots`
//! 5-minute slots (3 counters each: in/out of class 1 over IPv4, in of class 0 over IPv6),
//! booked through the library, shipped by the real `berth billing ship` into a private
//! PostgreSQL (Debian's binaries, initdb into a temporary directory, unix socket, fsync on),
//! a fresh database per round; then a full replay (`--replay`) that must write 0 rows.
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use berth::billing::Ledger;
use berth_tests::fleet::{SynthCt, fill, uuid};
use berth_tests::pg::{self, Cluster};

use crate::{require_root, verdict};

#[derive(clap::Args)]
pub struct ShipArgs {
    /// CTs in the ledger.
    #[arg(long, default_value_t = 1000)]
    cts: u32,
    /// 5-minute slots per CT (288: one day).
    #[arg(long, default_value_t = 288)]
    slots: u32,
    /// Rounds, each into a fresh database.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// A control: another `berth` binary (an earlier build) shipping the same ledger in each
    /// round too, the order alternating, so a change is measured against it under the same load.
    #[arg(long)]
    control_bin: Option<std::path::PathBuf>,
}

const BAR_SECS: f64 = 10.0;
const DAY0: i64 = 1_772_323_200; // 2026-03-01T00:00:00Z

fn ship(
    bin: &std::path::Path,
    ledger: &std::path::Path,
    url: &str,
    replay: bool,
) -> Result<(f64, serde_json::Value)> {
    let mut c = Command::new(bin);
    c.arg("--root")
        .arg(ledger.parent().context("ledger dir")?)
        .args(["billing", "--ledger"])
        .arg(ledger)
        .args([
            "ship",
            "--url",
            url,
            "--node",
            "bench-node",
            "--attempts",
            "1",
        ])
        .stdin(Stdio::null());
    if replay {
        c.arg("--replay");
    }
    let t0 = Instant::now();
    let o = c.output()?;
    let secs = t0.elapsed().as_secs_f64();
    ensure!(
        o.status.success(),
        "berth billing ship: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let v = serde_json::from_str(out.lines().last().unwrap_or("")).context("ship's JSON line")?;
    Ok((secs, v))
}

pub fn run(a: &ShipArgs) -> Result<()> {
    require_root("ship", "initdb and the server run as the postgres user")?;
    pg::bin_dir().context("no PostgreSQL server in /usr/lib/postgresql (xtask/setup.sh)")?;
    let tmp = tempfile::Builder::new()
        .prefix("berth-bench-ship-")
        .tempdir()?;
    let ledger = tmp.path().join("node/billing.db");
    std::fs::create_dir_all(ledger.parent().context("dir")?)?;
    let end = DAY0 + i64::from(a.slots) * 300;
    let cts: Vec<SynthCt> = (0..a.cts)
        .map(|i| SynthCt {
            uuid: uuid(0xbe, i),
            ctid: 100 + i,
            tz: "UTC".into(),
            created: DAY0 - 86_400,
            from: DAY0,
            to: end,
            destroy: false,
            classes: None,
        })
        .collect();
    let t0 = Instant::now();
    let seq = fill(&ledger, &cts, "bench ship", |_| 300)?;
    let booked = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let rows = Ledger::open_read_only(&ledger)?
        .slots_after_seq(0, u32::MAX)?
        .len();
    // What the shipper's ledger side costs at least: the whole feed in one read.
    let read = t1.elapsed().as_secs_f64();
    println!(
        "ledger: {} CTs × {} slots, {rows} slot rows, seq {seq} (booked in {booked:.1} s; the whole feed read in {read:.2} s)",
        a.cts, a.slots,
    );
    let pgdir = tmp.path().join("pg");
    std::fs::create_dir_all(&pgdir)?;
    let db = Cluster::start(&pgdir)?;
    let bin = berth_tests::ct::berth_bin();
    let mut times = Vec::new();
    let mut control = Vec::new();
    let mut replays = Vec::new();
    let mut floors = Vec::new();
    let mut dup_ok = true;
    let mut fresh = 0;
    for r in 1..=a.rounds {
        let mut runs = vec![(&bin, "", &mut times)];
        if let Some(c) = &a.control_bin {
            runs.push((c, "control ", &mut control));
            if r % 2 == 0 {
                runs.reverse();
            }
        }
        for (bin, what, out) in runs {
            fresh += 1;
            let name = format!("ship{fresh}");
            db.psql(&format!("CREATE DATABASE {name}"))?;
            let url = db
                .socket_url()
                .replace("dbname=postgres", &format!("dbname={name}"));
            let (secs, v) = ship(bin, &ledger, &url, false)?;
            ensure!(v["acked_seq"] == seq, "round {r}: {v}");
            let count = || psql_in(&db, &name, "SELECT count(*) FROM berth_slot");
            let before = count()?;
            let (rsecs, rv) = ship(bin, &ledger, &url, true)?;
            let after = count()?;
            let ok = before == rows.to_string() && after == before && rv["rows_written"] == 0;
            dup_ok &= ok;
            println!(
                "round {r}: {what}ship {secs:.2} s ({:.0} rows/s, written {}), replay {rsecs:.2} s: written {}, rows {before} → {after} {}",
                rows as f64 / secs,
                v["rows_written"],
                rv["rows_written"],
                if ok {
                    "(0 duplicates)"
                } else {
                    "(DUPLICATES or missing rows)"
                }
            );
            out.push(secs);
            if what.is_empty() {
                replays.push(rsecs);
                let f = floor(&db, &name)?;
                println!(
                    "round {r}: floor: the same rows COPYed by the server itself into an empty table with berth_slot's keys: {f:.2} s (ship / floor = {:.2})",
                    secs / f
                );
                floors.push(f);
            }
            db.psql(&format!("DROP DATABASE {name}"))?;
        }
    }
    if !control.is_empty() {
        let (m, c) = (median(&times), median(&control));
        println!(
            "control: median {c:.2} s (min {:.2}, max {:.2}); this build / control = {:.2}",
            control.iter().copied().fold(f64::INFINITY, f64::min),
            control.iter().copied().fold(0.0, f64::max),
            m / c
        );
    }
    let mut s = times.clone();
    s.sort_by(f64::total_cmp);
    let med = median(&times);
    let (lo, hi) = (s[0], s[s.len() - 1]);
    println!(
        "ship: median {med:.2} s, min {lo:.2}, max {hi:.2}, spread {:.0} % over {} rounds; bar ≤ {BAR_SECS} s: {}",
        (hi - lo) / med * 100.0,
        times.len(),
        verdict(hi <= BAR_SECS)
    );
    let fm = median(&floors);
    println!(
        "floor: median {fm:.2} s (min {:.2}, max {:.2}); ship / floor = {:.2}",
        floors.iter().copied().fold(f64::INFINITY, f64::min),
        floors.iter().copied().fold(0.0, f64::max),
        med / fm
    );
    println!("full replay inserts 0 duplicates: {}", verdict(dup_ok));
    drop(db);
    Ok(())
}

fn psql_in(db: &Cluster, dbname: &str, sql: &str) -> Result<String> {
    let o = Command::new(db.bin.join("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(&db.sock)
        .args(["-p", &db.port.to_string(), "-U", pg::USER, "-d", dbname])
        .args(["-c", sql])
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        o.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// What this disk and server take at best to make the shipped rows durable: the server COPYs
/// them from its own file into an empty table with berth_slot's keys and indexes, in one
/// transaction, no client, no conflict checks. A shipper cannot beat it; its ratio to the
/// ship time is what the shipper itself adds.
fn floor(db: &Cluster, dbname: &str) -> Result<f64> {
    let dump = db.dir.join(format!("{dbname}.copy"));
    psql_in(
        db,
        dbname,
        &format!(
            "COPY berth_slot TO '{}' (FORMAT binary); CREATE TABLE floor (LIKE berth_slot INCLUDING ALL)",
            dump.display()
        ),
    )?;
    let t0 = Instant::now();
    psql_in(
        db,
        dbname,
        &format!("COPY floor FROM '{}' (FORMAT binary)", dump.display()),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    std::fs::remove_file(&dump)?;
    Ok(secs)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}
