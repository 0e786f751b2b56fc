//! Per-CT billing settings end to end: `[billing]` set with `create`/`set --save`, read by
//! berthd's ledger at its ticks, and shown and applied by `berth billing report`: the period
//! from the billing day and time zone (checked against GNU date and the system's zoneinfo, not
//! the tz database berth bundles), the commit rate with the slots over it, the class filter on
//! real traffic in two network classes, and a change of billing day that waits for the current
//! period to end. Bad values change neither the config nor the ledger.
//! Run: `cargo test -p berth-tests --test billing_settings -- --test-threads=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use berth_tests::billing::Berthd;
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, wait_for};
use serde_json::Value;

/// The host's own address on the uplink: traffic to it is class 0 (no class entry matches).
const HOST4: &str = "192.0.2.2";

/// GNU date in `tz` (the system's zoneinfo): `args` and the output, trimmed.
fn date(tz: &str, args: &[&str]) -> Result<String> {
    let o = Command::new("date")
        .args(args)
        .env("TZ", tz)
        .env("LC_ALL", "C")
        .output()
        .context("running date")?;
    ensure!(o.status.success(), "date {args:?}: {o:?}");
    Ok(String::from_utf8(o.stdout)?.trim().to_owned())
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Local midnight of billing day `day` (clamped) in year-month, in `tz`: Unix seconds.
fn period_start(tz: &str, y: i32, m: u32, day: u32) -> Result<i64> {
    let d = day.min(days_in_month(y, m));
    Ok(date(
        tz,
        &["-d", &format!("{y:04}-{m:02}-{d:02} 00:00:00"), "+%s"],
    )?
    .parse()?)
}

/// The period holding `now` for billing day `day` in `tz`, worked out month by month from
/// the local calendar: (label, start, end) with start and end as RFC 3339 with the offset.
fn expected_period(tz: &str, day: u32, now: i64) -> Result<(String, String, String)> {
    let local = date(tz, &["-d", &format!("@{now}"), "+%Y %m"])?;
    let mut it = local.split(' ');
    let (mut y, mut m): (i32, u32) = (
        it.next().context("year")?.parse()?,
        it.next().context("month")?.parse()?,
    );
    if now < period_start(tz, y, m, day)? {
        (y, m) = if m == 1 { (y - 1, 12) } else { (y, m - 1) };
    }
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let (s, e) = (period_start(tz, y, m, day)?, period_start(tz, ny, nm, day)?);
    let rfc = |t: i64| date(tz, &["-d", &format!("@{t}"), "+%Y-%m-%dT%H:%M:%S%:z"]);
    Ok((format!("{y:04}-{m:02}"), rfc(s)?, rfc(e)?))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The nearest-rank 95th (k = ⌈95·n/100⌉) of per-slot bytes padded with zeros to `n` slots,
/// in bit/s rounded down, and how many slots exceed `commit` bit/s, for the classes in
/// `billed`, mode max: worked out here from the slot rows alone.
fn p95_of_slots(rows: &[Value], billed: &[u64], n: usize, commit: u64) -> Result<(u64, u64)> {
    let mut per: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in rows {
        if !billed.contains(&r["class"].as_u64().context("class")?) {
            continue;
        }
        let slot = r["slot_start"].as_str().context("slot_start")?.to_owned();
        let b = r["bytes"].as_u64().context("bytes")?;
        let e = per.entry(slot).or_default();
        match r["direction"].as_str() {
            Some("in") => e.0 += b,
            Some("out") => e.1 += b,
            d => bail!("direction {d:?}"),
        }
    }
    ensure!(per.len() <= n, "{} slots with rows, n = {n}", per.len());
    let bps = |b: u64| b * 8 / 300;
    let over = per
        .values()
        .filter(|(i, o)| bps(*i.max(o)) > commit)
        .count() as u64;
    let rank = |mut v: Vec<u64>| {
        v.resize(n, 0);
        v.sort_unstable();
        let k = (95 * n).div_ceil(100);
        if k == 0 { 0 } else { v[k - 1] }
    };
    let i = rank(per.values().map(|p| p.0).collect());
    let o = rank(per.values().map(|p| p.1).collect());
    Ok((bps(i.max(o)), over))
}

/// Total bytes of a report's `totals` per (billed or not).
fn totals_by_billed(report: &Value) -> Result<(u64, u64)> {
    let mut sums = (0, 0);
    for t in report["totals"].as_array().context("totals")? {
        let b = t["bytes"].as_u64().context("bytes")?;
        match t["billed"].as_bool() {
            Some(true) => sums.0 += b,
            Some(false) => sums.1 += b,
            None => bail!("no billed in {t}"),
        }
    }
    Ok(sums)
}

/// CT 4270 is billed on day 31 in Berlin with a commit rate and only class 1 (traffic to the
/// uplink); CT 4271 on day 15 in UTC, changed to day 1 while berthd knows it.
#[test]
fn settings_shape_period_commit_and_classes() -> Result<()> {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let ledger = h.root.join("ledger/billing.db");
    let ledger_s = ledger.to_str().context("ledger path")?.to_owned();
    let classes = h.dir.path().join("networks_classes");
    std::fs::write(&classes, format!("1 {UPLINK4}/32\n"))?;
    h.ok(&["netclass", "load", classes.to_str().context("path")?]);

    h.ok(&["create", "4270", "--ipadd", "192.0.2.170"]);
    h.ok(&[
        "set",
        "4270",
        "--billing-day",
        "31",
        "--tz",
        "europe/berlin",
        "--commit",
        "100M",
        "--classes",
        "1",
        "--save",
    ]);
    let conf: toml::Value =
        toml::from_str(&std::fs::read_to_string(h.root.join("conf/4270.toml"))?)?;
    let b = &conf["billing"];
    ensure!(
        b["billing_day"].as_integer() == Some(31)
            && b["tz"].as_str() == Some("Europe/Berlin")
            && b["commit"].as_str() == Some("100mbit")
            && b["classes"].as_array().map(Vec::len) == Some(1),
        "{conf}"
    );
    h.ok(&["create", "4271", "--billing-day", "15", "--tz", "UTC"]);
    h.ok(&["start", "4270"]);
    ensure!(
        wait_for(Duration::from_secs(6), || {
            h.exec("4270", &["ping", "-c", "1", "-W", "2", UPLINK4]).0 == 0
        }),
        "CT 4270 cannot reach the uplink"
    );

    let mut d = Berthd::start(&h, &ledger, "10")?;
    // The first tick runs at once: both CTs are registered with their settings.
    let report_args = ["billing", "--ledger", &ledger_s, "report", "4270", "--json"];
    ensure!(
        wait_for(Duration::from_secs(8), || h
            .run(&report_args)
            .status
            .success()),
        "CT 4270 not in the ledger after berthd's first tick"
    );
    let r = h.json(&["billing", "--ledger", &ledger_s, "report", "4270"]);
    ensure!(
        r["commit_bits_per_second"] == 100_000_000u64 && r["billing_day"] == "31",
        "{r}"
    );
    // Class 0 (to the host) carries more than class 1 (to the uplink), in one 5-minute slot
    // or two: the filter visibly changes the billed bytes and the 95th.
    let (c0, _, e0) = h.exec(
        "4270",
        &[
            "ping", "-c", "25", "-i", "0.2", "-s", "1400", "-W", "2", HOST4,
        ],
    );
    let (c1, _, e1) = h.exec(
        "4270",
        &[
            "ping", "-c", "10", "-i", "0.2", "-s", "900", "-W", "2", UPLINK4,
        ],
    );
    ensure!(c0 == 0 && c1 == 0, "pings failed: {e0} {e1}");
    h.ok(&["set", "4270", "--commit", "100", "--save"]);
    h.ok(&["set", "4271", "--billing-day", "1", "--save"]);
    // Two ticks (10 s apart) see the changes; the final one runs at SIGTERM.
    std::thread::sleep(Duration::from_secs(12));
    d.sigterm()?;

    let now = unix_now();
    let r = h.json(&["billing", "--ledger", &ledger_s, "report", "4270"]);
    let (label, start, end) = expected_period("Europe/Berlin", 31, now)?;
    ensure!(
        r["billing_day"] == "31"
            && r["tz"] == "Europe/Berlin"
            && r["period"] == label.as_str()
            && r["period_start"] == start.as_str()
            && r["period_end"] == end.as_str()
            && r["next_settings"].is_null(),
        "period {label} {start}–{end}: {r}"
    );
    ensure!(
        r["commit_bits_per_second"] == 100 && r["classes"] == serde_json::json!([1]),
        "{r}"
    );
    let (billed, unbilled) = totals_by_billed(&r)?;
    let (i, o) = (
        r["in_bytes"].as_u64().context("in")?,
        r["out_bytes"].as_u64().context("out")?,
    );
    ensure!(
        i + o == billed && billed > 0 && unbilled > billed,
        "billed {billed} (in {i} out {o}), not billed {unbilled}: {r}"
    );
    for t in r["totals"].as_array().context("totals")? {
        ensure!(
            t["billed"] == (t["class"] == 1),
            "class {} billed {}",
            t["class"],
            t["billed"]
        );
    }
    let slots = h.json(&["billing", "--ledger", &ledger_s, "slots", "4270"]);
    let rows = slots.as_array().context("slots")?;
    let n = r["p95"]["n"].as_u64().context("n")? as usize;
    let (p95, over) = p95_of_slots(rows, &[1], n, 100)?;
    let (p95_all, _) = p95_of_slots(rows, &[0, 1], n, 100)?;
    ensure!(
        r["p95"]["bits_per_second"] == p95 && r["p95"]["slots_over_commit"] == over,
        "95th {p95} bit/s, {over} slots over 100 bit/s worked out from the slots: {r}"
    );
    ensure!(
        over >= 1 && p95_all > p95,
        "over {over}, 95th all {p95_all} vs {p95}"
    );

    // The CSV report carries the commit rate, the slots over it and what is billed.
    let csv = h.ok(&["billing", "--ledger", &ledger_s, "report", "4270", "--csv"]);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().context("header")?.split(',').collect();
    ensure!(
        header.ends_with(&[
            "billed",
            "commit_bits_per_second",
            "slots_over_commit",
            "layer",
            "basis"
        ]),
        "{header:?}"
    );
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        ensure!(
            f[f.len() - 5] == (f[4] == "1").to_string()
                && f[f.len() - 4] == "100"
                && f[f.len() - 3] == over.to_string()
                && f[f.len() - 1] == "delivered",
            "{l}"
        );
    }

    // The auditor's recompute: with the filter and the commit rate given again it gives the
    // report's numbers; without the filter, every class.
    let export = h.dir.path().join("4270.csv");
    std::fs::write(
        &export,
        h.ok(&["billing", "--ledger", &ledger_s, "slots", "4270", "--csv"]),
    )?;
    let export_s = export.to_str().context("path")?;
    let re = h.json(&[
        "billing",
        "recompute",
        export_s,
        "--commit",
        "100",
        "--classes",
        "1",
    ]);
    ensure!(
        re["p95"] == r["p95"] && re["in_bytes"] == r["in_bytes"] && re["period"] == r["period"],
        "recompute {re} vs report {r}"
    );
    let re_all = h.json(&["billing", "recompute", export_s]);
    let all_bytes =
        re_all["in_bytes"].as_u64().context("in")? + re_all["out_bytes"].as_u64().context("out")?;
    ensure!(
        all_bytes == billed + unbilled && re_all["p95"]["bits_per_second"] == p95_all,
        "recompute of every class {re_all}: {billed}+{unbilled}, 95th {p95_all}"
    );

    // 4271: the change to day 1 waits for the end of its day-15 period.
    let r = h.json(&["billing", "--ledger", &ledger_s, "report", "4271"]);
    let (label, start, end) = expected_period("UTC", 15, now)?;
    ensure!(
        r["billing_day"] == "15"
            && r["tz"] == "UTC"
            && r["period"] == label.as_str()
            && r["period_start"] == start.as_str()
            && r["period_end"] == end.as_str(),
        "period {label} {start}–{end}: {r}"
    );
    let next = &r["next_settings"];
    ensure!(
        next["billing_day"] == "1" && next["tz"] == "UTC" && next["from"] == end.as_str(),
        "next settings from {end}: {r}"
    );
    Ok(())
}

/// Every file of the ledger's directory (the database, its WAL and shared memory) with its
/// bytes.
fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        out.insert(p.clone(), std::fs::read(&p)?);
    }
    Ok(out)
}

/// billing_day 0 or 32, an unknown time zone, a bad commit rate or class list, to `set`,
/// `create` or `recompute`: a clear error naming the problem, and neither the CT's config nor
/// the ledger changes (a refused `create` leaves no config).
#[test]
fn bad_settings_change_nothing() -> Result<()> {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let ledger = h.root.join("ledger/billing.db");
    let ledger_s = ledger.to_str().context("ledger path")?.to_owned();
    h.ok(&[
        "create",
        "4280",
        "--billing-day",
        "31",
        "--tz",
        "Europe/Berlin",
    ]);
    let mut d = Berthd::start(&h, &ledger, "10")?;
    ensure!(
        wait_for(Duration::from_secs(5), || ledger.exists()),
        "no ledger"
    );
    std::thread::sleep(Duration::from_secs(1));
    d.sigterm()?;
    let conf = h.root.join("conf/4280.toml");
    let conf_before = std::fs::read(&conf)?;
    let ledger_dir = ledger.parent().context("ledger dir")?;
    let db_before = std::fs::read(&ledger)?;
    // A reader creates the empty WAL and its shared-memory index next to the database (SQLite
    // does for a WAL database in a writable directory): taken after the first read.
    let report_before = h.json(&["billing", "--ledger", &ledger_s, "report", "4280"]);
    ensure!(report_before["billing_day"] == "31", "{report_before}");
    let ledger_before = snapshot(ledger_dir)?;

    for (args, want) in [
        (
            &["--billing-day", "0"][..],
            "--billing-day \"0\": billing day 0 is out of range",
        ),
        (
            &["--billing-day", "32"],
            "--billing-day \"32\": billing day 32 is out of range",
        ),
        (
            &["--billing-day", "first"],
            "--billing-day \"first\": expected a day",
        ),
        (
            &["--tz", "Mars/Olympus"],
            "--tz \"Mars/Olympus\": unknown time zone",
        ),
        (
            &["--commit", "100X"],
            "--commit \"100X\": unknown unit \"x\"",
        ),
        (
            &["--commit", "0"],
            "--commit \"0\": a rate must be greater than zero",
        ),
        (
            &["--classes", "16"],
            "--classes \"16\": class 16 does not exist",
        ),
        // A good value next to a bad one: nothing of the set is saved.
        (
            &["--billing-day", "5", "--tz", "Nowhere/Atlantis"],
            "unknown time zone",
        ),
    ] {
        let mut a = vec!["set", "4280"];
        a.extend_from_slice(args);
        a.push("--save");
        let err = h.fails(&a);
        ensure!(err.contains(want), "{args:?}: {err}");
        ensure!(
            std::fs::read(&conf)? == conf_before,
            "{args:?} changed the config"
        );
    }
    // Without --save: berthd reads only the saved config.
    let err = h.fails(&["set", "4280", "--billing-day", "5"]);
    ensure!(err.contains("--save"), "{err}");
    ensure!(std::fs::read(&conf)? == conf_before, "changed the config");

    let err = h.fails(&["create", "4281", "--billing-day", "32"]);
    ensure!(err.contains("billing day 32 is out of range"), "{err}");
    let err = h.fails(&["create", "4281", "--tz", "Mars/Olympus"]);
    ensure!(err.contains("unknown time zone"), "{err}");
    ensure!(
        !h.root.join("conf/4281.toml").exists(),
        "create left a config"
    );
    ensure!(
        !h.root.join("private/4281").exists(),
        "create left a private area"
    );

    let export = h.dir.path().join("4280.csv");
    std::fs::write(
        &export,
        h.ok(&["billing", "--ledger", &ledger_s, "slots", "4280", "--csv"]),
    )?;
    let export_s = export.to_str().context("path")?;
    for (args, want) in [
        (
            &["--billing-day", "32", "--tz", "UTC"][..],
            "billing day 32 is out of range",
        ),
        (
            &["--billing-day", "1", "--tz", "Mars/Olympus"],
            "unknown time zone \"Mars/Olympus\"",
        ),
        (&["--commit", "fast"], "--commit \"fast\""),
        (&["--classes", "1,1"], "class 1 is listed twice"),
    ] {
        let mut a = vec!["billing", "recompute", export_s];
        a.extend_from_slice(args);
        let err = h.fails(&a);
        ensure!(err.contains(want), "{args:?}: {err}");
    }

    let after = snapshot(ledger_dir)?;
    let changed: Vec<_> = after
        .iter()
        .filter(|(p, b)| ledger_before.get(*p) != Some(*b))
        .map(|(p, b)| (p.clone(), b.len()))
        .collect();
    ensure!(
        changed.is_empty() && after.len() == ledger_before.len(),
        "the ledger's files changed: {changed:?}, before {:?}",
        ledger_before
            .iter()
            .map(|(p, b)| (p, b.len()))
            .collect::<Vec<_>>()
    );
    ensure!(std::fs::read(&ledger)? == db_before, "the database changed");
    let report_after = h.json(&["billing", "--ledger", &ledger_s, "report", "4280"]);
    ensure!(
        report_after["billing_day"] == "31" && report_after["tz"] == "Europe/Berlin",
        "{report_after}"
    );
    Ok(())
}
