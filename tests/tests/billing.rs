//! The billing ledger end to end: berthd ticking a routed CT's real traffic (iperf3 both ways
//! between the CT and the uplink) into its ledger while it is SIGKILLed 20 times at random
//! moments and restarted, then the CLI's report against the kernel counters, and the auditor's
//! recompute of the slot export against the report.
//! Run: `cargo test -p berth-tests --test billing -- --test-threads=1`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use berth_tests::berthd::{Prometheus, http_get, parse_samples, value_of};
use berth_tests::billing::{
    Berthd, IperfServer, LogLine, Moved, Rng, billing_row_answers, counters_map_id, ct_netns,
    iperf_bidir, kernel_bytes, ledger_report,
};
use berth_tests::billing_graph::{SvgChart, png_red_rows, well_formed};
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, wait_for};
use serde_json::Value;

/// `GET path` as JSON, with its status.
fn get_json(addr: SocketAddr, path: &str) -> Result<(u16, Value)> {
    let r = http_get(addr, path, &[])?;
    ensure!(
        r.header("content-type") == Some("application/json"),
        "{path}: content type {:?}",
        r.header("content-type")
    );
    let v = serde_json::from_str(&r.body).with_context(|| format!("{path}: {}", r.body))?;
    Ok((r.status, v))
}

/// A CT's rows of `/v1/billing/slots` without the CT fields, sorted: comparable with
/// `berth billing slots --json`.
fn feed_rows_of(rows: &[Value], uuid: &str) -> Vec<String> {
    let mut out: Vec<String> = rows
        .iter()
        .filter(|r| r["ct_uuid"] == uuid)
        .map(|r| {
            let mut r = r.clone();
            if let Some(m) = r.as_object_mut() {
                m.remove("ct_uuid");
                m.remove("ctid");
            }
            r.to_string()
        })
        .collect();
    out.sort();
    out
}

/// The CLI's report (and slots) of `ct` and berthd's answers for it (the endpoints and the
/// billing gauges of /metrics), compared.
fn reports_match(
    h: &TestHost,
    addr: SocketAddr,
    ledger_s: &str,
    ct: &str,
    uuid: &str,
) -> Result<(Value, Value, Value)> {
    let cli = h.json(&["billing", "--ledger", ledger_s, "report", ct]);
    let cli_all = h.json(&["billing", "--ledger", ledger_s, "report", "all"]);
    let cli_pd = h.json(&[
        "billing",
        "--ledger",
        ledger_s,
        "report",
        ct,
        "--mode",
        "per-direction",
    ]);
    let cli_slots = h.json(&["billing", "--ledger", ledger_s, "slots", ct]);
    let period = cli["period"].as_str().context("period")?.to_owned();

    let (st, v) = get_json(addr, &format!("/v1/billing/report?ct={ct}"))?;
    ensure!(
        st == 200 && v == cli,
        "report by CTID ({st}): {v} vs CLI {cli}"
    );
    let (st, v) = get_json(
        addr,
        &format!("/v1/billing/report?ct={uuid}&period={period}"),
    )?;
    ensure!(
        st == 200 && v == cli,
        "report by UUID ({st}): {v} vs CLI {cli}"
    );
    let (st, v) = get_json(
        addr,
        &format!("/v1/billing/report?ct={ct}&mode=per-direction"),
    )?;
    ensure!(
        st == 200 && v == cli_pd,
        "per-direction ({st}): {v} vs CLI {cli_pd}"
    );
    let (st, v) = get_json(addr, "/v1/billing/report?ct=all")?;
    ensure!(
        st == 200 && v == cli_all && v.as_array().map(Vec::len) == Some(1) && v[0] == cli,
        "report all ({st}): {v} vs CLI {cli_all}"
    );

    // The gauges of the tick that ran at berthd's start: the per-direction report's totals
    // by direction and class, and its two 95ths.
    let samples = parse_samples(&http_get(addr, "/metrics", &[])?.body)?;
    let mut want = std::collections::BTreeMap::<(String, String), u64>::new();
    for t in cli_pd["totals"].as_array().context("totals")? {
        let k = (
            t["direction"].as_str().context("direction")?.to_owned(),
            t["class"].to_string(),
        );
        *want.entry(k).or_default() += t["bytes"].as_u64().context("bytes")?;
    }
    ensure!(!want.is_empty(), "no totals: {cli_pd}");
    let n_bytes = samples
        .iter()
        .filter(|s| s.name == "berth_billing_period_bytes")
        .count();
    ensure!(n_bytes == want.len(), "{n_bytes} byte gauges for {want:?}");
    for ((d, c), b) in &want {
        let got = value_of(
            &samples,
            "berth_billing_period_bytes",
            &[("ctid", ct), ("uuid", uuid), ("direction", d), ("class", c)],
        );
        ensure!(
            got == Some(*b as f64),
            "period bytes {d}/{c}: {got:?} vs {b}"
        );
    }
    for d in ["in", "out"] {
        let cli_v = cli_pd["p95"][format!("{d}_bits_per_second")].as_u64();
        let got = value_of(
            &samples,
            "berth_billing_p95_bytes_per_second",
            &[("ctid", ct), ("uuid", uuid), ("direction", d)],
        );
        ensure!(
            cli_v.is_some() && got.map(|g| g * 8.0) == cli_v.map(|v| v as f64),
            "95th {d}: {got:?} vs CLI {cli_v:?}"
        );
    }
    Ok((cli, cli_pd, cli_slots))
}

/// berthd's billing endpoints answer what the CLI prints, bad queries get a 400 naming the
/// parameter, an unknown CT a 404, and the slot feed pages by `next_after_seq` without losing
/// or repeating a row.
fn http_matches_the_cli(h: &TestHost, ledger: &Path, ct: &str, uuid: &str) -> Result<()> {
    let ledger_s = ledger.to_str().context("ledger path")?;
    // A long tick: after the first one (at once) nothing changes the ledger while we compare.
    let mut d = Berthd::start(h, ledger, "300")?;
    let addr = d.addr;
    d.wait_tick_end(0, Duration::from_secs(10))?;
    // A report counts the slots elapsed until now: a 5-minute boundary between the CLI's and
    // berthd's answer changes it, so one retry.
    let mut tries = 0;
    let (cli, cli_pd, cli_slots) = loop {
        tries += 1;
        match reports_match(h, addr, ledger_s, ct, uuid) {
            Ok(got) => break got,
            Err(e) if tries < 2 => eprintln!("retrying the report comparison: {e:#}"),
            Err(e) => return Err(e),
        }
    };
    ensure!(cli["ctid"].as_u64() == ct.parse().ok(), "{cli}");
    // The dashboard's billing row, its queries run by a real Prometheus scraping this berthd.
    let prom = Prometheus::start(&[addr], "1s")?;
    let series = billing_row_answers(&prom, ct, &cli, &cli_pd)
        .with_context(|| format!("prometheus log:\n{}", prom.log()))?;
    eprintln!("dashboard billing row: {series} series equal the CLI's numbers");
    drop(prom);

    for (q, param) in [
        ("/v1/billing/report?ct=4260&mode=p99", "mode"),
        ("/v1/billing/report?ct=4260&period=2026-13", "period"),
        ("/v1/billing/report?period=2026-12", "ct"),
        ("/v1/billing/report?ct=4260&bogus=1", "bogus"),
        ("/v1/billing/slots?after_seq=-3", "after_seq"),
        ("/v1/billing/slots?limit=0", "limit"),
    ] {
        let (st, v) = get_json(addr, q)?;
        ensure!(st == 400 && v["parameter"] == param, "{q}: {st} {v}");
        ensure!(
            v["error"].as_str().is_some_and(|e| e.contains(param)),
            "{q}: {v}"
        );
    }
    let (st, v) = get_json(addr, "/v1/billing/report?ct=4999")?;
    ensure!(
        st == 404 && v["error"].as_str().is_some_and(|e| e.contains("4999")),
        "{st} {v}"
    );

    let (st, all) = get_json(addr, "/v1/billing/slots?after_seq=0&limit=100000")?;
    ensure!(st == 200, "slots: {st} {all}");
    let rows = all["rows"].as_array().context("rows")?;
    let mut cli_rows: Vec<String> = cli_slots
        .as_array()
        .context("CLI slots")?
        .iter()
        .map(Value::to_string)
        .collect();
    cli_rows.sort();
    ensure!(!cli_rows.is_empty(), "no slot rows");
    ensure!(
        feed_rows_of(rows, uuid) == cli_rows,
        "feed {rows:?} vs CLI {cli_rows:?}"
    );
    ensure!(rows.iter().all(|r| r["ctid"].as_u64() == ct.parse().ok()));
    let last = all["next_after_seq"].as_i64().context("next_after_seq")?;
    ensure!(
        rows.last().and_then(|r| r["seq"].as_i64()) == Some(last),
        "{all}"
    );
    let (_, tail) = get_json(addr, &format!("/v1/billing/slots?after_seq={last}"))?;
    ensure!(
        tail["rows"].as_array().is_some_and(Vec::is_empty) && tail["next_after_seq"] == last,
        "nothing after the last seq: {tail}"
    );
    // Page by page (a page never splits a tick's rows): the same rows, none twice.
    let (mut after, mut paged, mut pages) = (0i64, Vec::new(), 0);
    loop {
        let (st, p) = get_json(
            addr,
            &format!("/v1/billing/slots?after_seq={after}&limit=1"),
        )?;
        ensure!(st == 200, "page after {after}: {st} {p}");
        let got = p["rows"].as_array().context("rows")?;
        if got.is_empty() {
            break;
        }
        ensure!(got.iter().all(|r| r["seq"].as_i64() > Some(after)), "{p}");
        after = p["next_after_seq"].as_i64().context("next_after_seq")?;
        paged.extend(got.iter().cloned());
        pages += 1;
        ensure!(pages < 10_000, "paging does not end");
    }
    ensure!(feed_rows_of(&paged, uuid) == cli_rows, "paged feed differs");
    eprintln!("slot feed: {} rows, {pages} pages of limit=1", paged.len());
    d.sigterm()?;
    Ok(())
}

/// `berth billing graph` writes an SVG and a PNG of the same picture: the SVG's 95th line sits
/// at the report's 95th (mode max) as its own y axis labels read, its label says the value,
/// and the PNG has its full-width red line on the same row. An unknown CT, or an output that is
/// neither .svg nor .png, writes nothing.
fn graph_shows_the_95th_at_its_value(h: &TestHost, ledger_s: &str) -> Result<()> {
    let (svg_f, png_f) = (h.dir.path().join("4260.svg"), h.dir.path().join("4260.PNG"));
    let svg_s = svg_f.to_str().context("svg path")?;
    let png_s = png_f.to_str().context("png path")?;
    // The 95th counts the slots until now: a 5-minute boundary between the report and the
    // graphs can move it, so one retry.
    let mut tries = 0;
    let (svg, png, bps) = loop {
        tries += 1;
        let report = h.json(&["billing", "--ledger", ledger_s, "report", "4260"]);
        let out = h.ok(&[
            "billing", "--ledger", ledger_s, "graph", "4260", "-o", svg_s,
        ]);
        let out_png = h.ok(&[
            "billing", "--ledger", ledger_s, "graph", "4260", "-o", png_s,
        ]);
        let svg = std::fs::read_to_string(&svg_f)?;
        let bps = report["p95"]["bits_per_second"].as_u64().context("95th")?;
        let label = format!("95th percentile (max): {bps} bit/s");
        if svg.contains(&label) && out.contains(&label) && out_png.contains(&label) {
            break (svg, std::fs::read(&png_f)?, bps);
        }
        ensure!(tries < 2, "no {label:?} in the SVG or in {out:?}");
    };
    ensure!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
    well_formed(&svg)?;
    ensure!(
        svg.contains("inbound") && svg.contains("outbound"),
        "legend"
    );
    let chart = SvgChart::read(&svg)?;
    let (v, per_px) = chart.value_at(chart.p95_y)?;
    ensure!(
        (v - bps as f64).abs() <= per_px,
        "the 95th line at y {} reads {v:.0} bit/s on the axis ({per_px:.0} per pixel), the \
         report says {bps}",
        chart.p95_y
    );
    eprintln!(
        "graph: 95th line at y {} = {v:.0} bit/s by the axis labels ({per_px:.0} bit/s a pixel), \
         report {bps}",
        chart.p95_y
    );
    ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let (size, rows) = png_red_rows(&png)?;
    ensure!(size == (1200, 500), "PNG of {size:?}");
    ensure!(
        rows == [chart.p95_y as u32],
        "PNG red rows {rows:?}, the SVG's line at {}",
        chart.p95_y
    );

    for (ct, name) in [("4999", "none.svg"), ("4260", "x.jpg"), ("4260", "noext")] {
        let f = h.dir.path().join(name);
        let f_s = f.to_str().context("path")?;
        let err = h.fails(&["billing", "--ledger", ledger_s, "graph", ct, "-o", f_s]);
        let named = if ct == "4999" { ct } else { ".svg or .png" };
        ensure!(err.contains(named) && !f.exists(), "{name}: {err}");
    }
    Ok(())
}

const KILLS: u32 = 20;
/// berthd's tick in this test: the shortest it accepts.
const TICK: Duration = Duration::from_secs(10);
const CT_IP: &str = "192.0.2.160";
/// Per direction: enough to make every tick's delta large, little CPU on a shared machine.
const IPERF_RATE: &str = "40M";

/// Where the kills landed.
#[derive(Debug, Default)]
struct Kills {
    total: u32,
    /// Inside berthd's start-up tick, before its commit (the ledger unchanged by it).
    before_commit: u32,
    /// Inside the start-up tick after its commit (the gauges' read not yet done).
    after_commit: u32,
    /// Inside a later (periodic) tick.
    later_tick: u32,
    /// Between ticks.
    between: u32,
    /// From the listen line to the start-up tick's end, for the ticks that ended.
    startup_end_ms: Vec<f64>,
}

impl std::fmt::Display for Kills {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ms = self.startup_end_ms.clone();
        ms.sort_by(f64::total_cmp);
        write!(
            f,
            "{} kills: {} inside a tick before its commit, {} inside a tick after its commit, \
             {} inside a periodic tick, {} between ticks; start-up tick ended {ms:.1?} ms \
             after the listen line",
            self.total, self.before_commit, self.after_commit, self.later_tick, self.between
        )
    }
}

/// The ledger's bytes of `ct` (both directions), 0 while berthd has not booked the CT yet.
fn ledger_bytes(h: &TestHost, ledger: &str, ct: &str) -> Result<u64> {
    let o = h.run(&["billing", "--ledger", ledger, "report", ct, "--json"]);
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        ensure!(err.contains(ct), "billing report {ct}: {err}");
        return Ok(0);
    }
    let v: Value = serde_json::from_slice(&o.stdout)?;
    Ok(v["in_bytes"].as_u64().context("in_bytes")?
        + v["out_bytes"].as_u64().context("out_bytes")?)
}

/// SIGKILLs berthd `n` times and restarts it after each kill. Even kills aim at the tick berthd
/// runs at start: a random offset from its listen line below the earliest end of that tick seen
/// so far (a tick takes ~3 ms and ends ~5 ms after the listen line in the debug build; a kill at
/// a random moment of a 10 s tick period would hardly ever hit one). Odd kills fall anywhere in
/// the first 11 s (a periodic tick included). Each kill is
/// classified by berthd's tick log up to its death and by whether the ledger changed.
fn kill_repeatedly(
    h: &TestHost,
    ledger: &str,
    mut d: Berthd,
    rng: &mut Rng,
    n: u32,
) -> Result<(Berthd, Kills)> {
    let mut k = Kills::default();
    let mut booked = ledger_bytes(h, ledger, "4260")?;
    for i in 0..n {
        // The earliest end seen so far: a kill before it is inside the start-up tick.
        let window_us = (k.startup_end_ms.iter().copied().fold(5.0, f64::min) * 1e3) as u64;
        let wait = if i % 2 == 0 {
            Duration::from_micros(rng.below(window_us))
        } else {
            Duration::from_millis(300 + rng.below(10_700))
        };
        std::thread::sleep((d.listening + wait).saturating_duration_since(Instant::now()));
        let since = d.listening.elapsed();
        let lines = d.kill()?;
        k.total += 1;
        let ends: Vec<&LogLine> = lines.iter().filter(|l| l.is_tick_end()).collect();
        if let Some(first) = ends.first() {
            let ms = first
                .at
                .saturating_duration_since(d.listening)
                .as_secs_f64()
                * 1e3;
            k.startup_end_ms.push(ms);
        }
        let now_booked = ledger_bytes(h, ledger, "4260")?;
        ensure!(
            now_booked >= booked,
            "the ledger lost bytes: {now_booked} after {booked}"
        );
        // tokio's interval ticks at once and then every TICK from the ticker's spawn, just
        // before the listen line.
        let begun = 1 + (since.as_millis() / TICK.as_millis()) as usize;
        let class = match ends.len() {
            e if e >= begun => {
                k.between += 1;
                "between ticks"
            }
            0 if now_booked == booked => {
                k.before_commit += 1;
                "in the start-up tick, before its commit"
            }
            0 => {
                k.after_commit += 1;
                "in the start-up tick, after its commit"
            }
            _ => {
                k.later_tick += 1;
                "in a periodic tick"
            }
        };
        let took: Vec<Duration> = ends.iter().filter_map(|l| l.tick_took()).collect();
        eprintln!(
            "kill {i}: {:.1} ms after the listen line, {class} (ticks took {took:?})",
            since.as_secs_f64() * 1e3
        );
        booked = now_booked;
        std::thread::sleep(Duration::from_millis(rng.below(1_000)));
        d = Berthd::start(h, Path::new(ledger), &TICK.as_secs().to_string())?;
    }
    Ok((d, k))
}

/// Real traffic through a routed CT while berthd is killed (SIGKILL) at random moments and
/// restarted; after the final SIGTERM the ledger's totals equal the kernel's counters to the
/// byte (the CT was created after berthd's first tick, so everything it counted is billed),
/// and `recompute` of the slot export gives the report's totals and 95th.
#[test]
fn ledger_survives_sigkills_exact_to_the_byte() -> Result<()> {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let ledger = h.root.join("ledger/billing.db");
    let ledger_s = ledger.to_str().context("ledger path")?.to_owned();
    let mut d = Berthd::start(&h, &ledger, "10")?;
    // The first tick runs at once and books an empty node: a CT seen after it counts from 0.
    d.wait_tick_end(0, Duration::from_secs(10))?;
    let missing = h.fails(&["billing", "--ledger", "/nonexistent/x.db", "report", "all"]);
    ensure!(
        missing.contains("no ledger at /nonexistent/x.db: is berthd running with --ledger?"),
        "{missing}"
    );
    ensure!(
        !Path::new("/nonexistent/x.db").exists(),
        "the CLI created a ledger"
    );

    h.ok(&["create", "4260", "--ipadd", "192.0.2.160"]);
    h.ok(&["start", "4260"]);
    ensure!(
        wait_for(Duration::from_secs(6), || {
            h.exec("4260", &["ping", "-c", "1", "-W", "2", UPLINK4]).0 == 0
        }),
        "CT 4260 cannot reach the uplink"
    );

    let netns = ct_netns(&h, "4260")?;
    let port = berth_tests::shaper::port();
    let server = IperfServer::in_netns(&netns, port)?;
    let stop = AtomicBool::new(false);
    let mut rng = Rng::new("billing kill test");
    let t0 = Instant::now();
    let (d_after, kills) = std::thread::scope(|s| -> Result<(Berthd, Kills)> {
        let traffic = s.spawn(|| -> Result<(u32, Moved)> {
            let (mut runs, mut moved) = (0u32, Moved::default());
            while !stop.load(Ordering::Relaxed) {
                // Short runs: the traffic ends soon after the kills do.
                let m = iperf_bidir(topo.uplink.fd(), CT_IP, port, 2, IPERF_RATE)?;
                ensure!(m.to_server > 0 && m.from_server > 0, "iperf3 moved {m:?}");
                moved.to_server += m.to_server;
                moved.from_server += m.from_server;
                runs += 1;
            }
            Ok((runs, moved))
        });
        let r = kill_repeatedly(&h, &ledger_s, d, &mut rng, KILLS);
        stop.store(true, Ordering::Relaxed);
        let (runs, moved) = traffic.join().expect("traffic thread")?;
        eprintln!(
            "iperf3: {runs} runs, {} B to the CT and {} B from it, in {:?}",
            moved.to_server,
            moved.from_server,
            t0.elapsed()
        );
        r
    })?;
    d = d_after;
    drop(server);
    eprintln!("{kills}");
    ensure!(kills.total == KILLS, "{kills}");
    // The kills aimed at the start-up tick must sometimes hit it before its commit, or this
    // test would not show that an interrupted tick loses nothing.
    ensure!(
        kills.before_commit >= 1,
        "no kill landed inside a tick: {kills}"
    );

    // No traffic after this: the CT's counters are final (its slot is kept while it exists).
    h.ok(&["stop", "--fast", "4260"]);
    let (k_in, k_out) = kernel_bytes(&h, "4260");
    ensure!(
        k_in > 100_000 && k_out > 100_000,
        "too little traffic counted: {k_in}/{k_out}"
    );
    d.sigterm()?;

    let report = h.json(&["billing", "--ledger", &ledger_s, "report", "4260"]);
    let (l_in, l_out) = (
        report["in_bytes"].as_u64().context("in_bytes")?,
        report["out_bytes"].as_u64().context("out_bytes")?,
    );
    ensure!(
        (l_in, l_out) == (k_in, k_out),
        "ledger {l_in}/{l_out} vs kernel {k_in}/{k_out}: {report}"
    );
    eprintln!("kernel {k_in}/{k_out} bytes in/out; report {report}");
    let flags = report["flags"].as_str().context("flags")?;
    ensure!(!flags.contains("counter_anomaly"), "{report}");

    let uuid = report["ct_uuid"].as_str().context("ct_uuid")?.to_owned();
    let table = h.ok(&["billing", "--ledger", &ledger_s, "report", "all"]);
    ensure!(
        table.lines().count() == 2
            && table.contains(&uuid)
            && table.contains(&format!(" {k_in} "))
            && table.contains(&format!(" {k_out} ")),
        "{table}"
    );
    let rcsv = h.ok(&["billing", "--ledger", &ledger_s, "report", "all", "--csv"]);
    let rbytes: u64 = rcsv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(6)
                .and_then(|b| b.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    ensure!(rbytes == k_in + k_out, "report CSV sums {rbytes}: {rcsv}");
    let csv = h.ok(&["billing", "--ledger", &ledger_s, "slots", "4260", "--csv"]);
    let file = h.dir.path().join("slots.csv");
    std::fs::write(&file, &csv)?;
    let file_s = file.to_str().context("csv path")?;
    let re = h.json(&["billing", "recompute", file_s]);
    for k in ["ct_uuid", "period", "in_bytes", "out_bytes", "totals"] {
        ensure!(
            re[k] == report[k],
            "recompute {k}: {} vs {}",
            re[k],
            report[k]
        );
    }
    ensure!(
        re["p95"]["bits_per_second"] == report["p95"]["bits_per_second"],
        "recompute 95th {} vs report {}",
        re["p95"],
        report["p95"]
    );
    let by_slot: u64 = csv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(14)
                .and_then(|b| b.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    ensure!(by_slot == k_in + k_out, "slot rows sum {by_slot}");

    // Bad input: clear errors, the ledger untouched.
    let before = std::fs::read(&ledger)?;
    let bad_mode = h.fails(&[
        "billing", "--ledger", &ledger_s, "report", "4260", "--mode", "p99",
    ]);
    ensure!(
        bad_mode.contains("unknown 95th-percentile mode"),
        "{bad_mode}"
    );
    let bad_period = h.fails(&[
        "billing", "--ledger", &ledger_s, "report", "4260", "--period", "2026-13",
    ]);
    ensure!(bad_period.contains("bad billing period"), "{bad_period}");
    let unknown = h.fails(&["billing", "--ledger", &ledger_s, "report", "4999"]);
    ensure!(unknown.contains("4999"), "{unknown}");
    let cut = &csv[..csv.len() - csv.lines().last().map_or(0, |l| l.len() + 1)];
    std::fs::write(&file, cut)?;
    let truncated = h.fails(&["billing", "recompute", file_s]);
    ensure!(truncated.contains("billing CSV"), "{truncated}");
    ensure!(
        std::fs::read(&ledger)? == before,
        "a failed command changed the ledger"
    );
    http_matches_the_cli(&h, &ledger, "4260", &uuid)?;
    graph_shows_the_95th_at_its_value(&h, &ledger_s)?;

    // Destroyed while berthd is down (killed after the CT's last traffic): the next berthd books
    // the final counters from the retired record and closes the CT's lifetime.
    d = Berthd::start(&h, &ledger, "10")?;
    h.ok(&["start", "4260"]);
    let (code, _, err) = h.exec(
        "4260",
        &[
            "ping", "-c", "40", "-i", "0.02", "-s", "1200", "-W", "1", UPLINK4,
        ],
    );
    ensure!(code == 0, "ping: {err}");
    d.kill()?;
    h.ok(&["stop", "--fast", "4260"]);
    let (f_in, f_out) = kernel_bytes(&h, "4260");
    ensure!(f_in >= k_in + 40 * 1200, "{f_in} after {k_in}");
    h.ok(&["destroy", "4260"]);
    let record: Value = serde_json::from_slice(&std::fs::read(
        h.root.join("retired").join(format!("{uuid}.json")),
    )?)?;
    let retired_at = record["retired_at"].as_u64().context("retired_at")?;
    // Destroyed seconds before berthd comes back: its lifetime ends at the destroy.
    std::thread::sleep(Duration::from_secs(2));
    d = Berthd::start(&h, &ledger, "10")?;
    d.sigterm()?;
    let fin = h.json(&["billing", "--ledger", &ledger_s, "report", &uuid]);
    ensure!(
        (fin["in_bytes"].as_u64(), fin["out_bytes"].as_u64()) == (Some(f_in), Some(f_out)),
        "destroyed CT: ledger {}/{} vs kernel {f_in}/{f_out}",
        fin["in_bytes"],
        fin["out_bytes"]
    );
    let expected = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{retired_at}"),
            "+%Y-%m-%dT%H:%M:%S+00:00",
        ])
        .output()?;
    let expected = String::from_utf8(expected.stdout)?;
    ensure!(
        fin["destroyed"].as_str() == Some(expected.trim()),
        "lifetime should end at the destroy ({}): {fin}",
        expected.trim()
    );
    Ok(())
}

/// Two iperf3 runs' worth of traffic through a running CT, both ways.
fn traffic_through(h: &TestHost, topo: &Topology, ct: &str, ip: &str) -> Result<()> {
    let port = berth_tests::shaper::port();
    let _server = IperfServer::in_netns(&ct_netns(h, ct)?, port)?;
    let m = iperf_bidir(topo.uplink.fd(), ip, port, 2, IPERF_RATE)?;
    ensure!(
        m.to_server > 1_000_000 && m.from_server > 1_000_000,
        "iperf3 moved {m:?}"
    );
    Ok(())
}

/// A host reboot empties bpffs: the pinned maps are gone and the next start creates them anew,
/// counting from 0. Twice here: the pins removed while berthd runs (it ticks through the gap),
/// and a reboot proper (berthd stopped with its final tick, pins removed, berthd started again).
/// Each time the `COUNTERS` map is a new one (a new epoch); the ledger then holds exactly the
/// sum of the three generations' counters (nothing booked twice, nothing booked lost), flagged
/// `new_epoch` and without an anomaly.
#[test]
fn pinned_maps_removed_new_epoch_nothing_lost_or_doubled() -> Result<()> {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let ledger = h.root.join("billing.db");
    let ledger_s = ledger.to_str().context("ledger path")?.to_owned();
    let (ct, ip) = ("4261", "192.0.2.161");
    let mut d = Berthd::start(&h, &ledger, "10")?;
    d.wait_tick_end(0, Duration::from_secs(10))?;
    h.ok(&["create", ct, "--ipadd", ip]);

    let mut want = (0u64, 0u64);
    let mut ids = Vec::new();
    for generation in 0..3 {
        h.ok(&["start", ct]);
        ids.push(counters_map_id(&h.bpffs)?);
        traffic_through(&h, &topo, ct, ip)?;
        // Stopped: the counters are final for this generation (kept while the CT exists).
        h.ok(&["stop", "--fast", ct]);
        let (k_in, k_out) = kernel_bytes(&h, ct);
        want = (want.0 + k_in, want.1 + k_out);
        eprintln!(
            "generation {generation}: map {}, kernel {k_in}/{k_out}",
            ids[generation]
        );
        match generation {
            0 => {
                // Booked by a tick, then the pins go while berthd runs; it ticks without them.
                let n = d.tick_ends();
                d.wait_tick_end(n, TICK * 2)?;
                let (_, l_in, l_out) = ledger_report(&h, &ledger_s, ct)?;
                ensure!(
                    (l_in, l_out) == want,
                    "booked {l_in}/{l_out}, kernel {want:?}"
                );
                std::fs::remove_dir_all(&h.bpffs)?;
                let n = d.tick_ends();
                d.wait_tick_end(n, TICK * 2)?;
                let (_, l_in, l_out) = ledger_report(&h, &ledger_s, ct)?;
                ensure!(
                    (l_in, l_out) == want,
                    "without pins {l_in}/{l_out}, want {want:?}"
                );
            }
            1 => {
                // A reboot: berthd's final tick at shutdown, the pins gone, berthd back.
                d.sigterm()?;
                std::fs::remove_dir_all(&h.bpffs)?;
                d = Berthd::start(&h, &ledger, "10")?;
                d.wait_tick_end(0, Duration::from_secs(10))?;
            }
            _ => {}
        }
    }
    d.sigterm()?;
    ensure!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "the COUNTERS map was not re-created: ids {ids:?}"
    );
    let (report, l_in, l_out) = ledger_report(&h, &ledger_s, ct)?;
    ensure!(
        (l_in, l_out) == want,
        "ledger {l_in}/{l_out} vs the generations' sum {want:?}: {report}"
    );
    let flags = report["flags"].as_str().context("flags")?;
    ensure!(
        flags.contains("new_epoch") && !flags.contains("counter_anomaly"),
        "flags {flags:?}: {report}"
    );
    eprintln!("3 generations (maps {ids:?}): ledger {l_in}/{l_out} = their sum");
    Ok(())
}
