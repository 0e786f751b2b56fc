//! The billing ledger end to end: berthd ticking a routed CT's real traffic into its ledger
//! while it is SIGKILLed at random moments and restarted, then the CLI's report against the
//! kernel counters, and the auditor's recompute of the slot export against the report.
//! Run: `cargo test -p berth-tests --test billing -- --test-threads=1`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use berth_tests::berthd::{berthd_bin, http_get, parse_samples, value_of};
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, wait_for};
use serde_json::Value;

/// berthd with the ledger at `ledger`, ticking every 10 s (the shortest tick it accepts).
fn start_berthd(h: &TestHost, ledger: &Path) -> Result<Child> {
    Ok(start_berthd_ticking(h, ledger, "10")?.0)
}

/// berthd ticking every `tick` seconds, and the address it serves on.
fn start_berthd_ticking(h: &TestHost, ledger: &Path, tick: &str) -> Result<(Child, SocketAddr)> {
    let mut child = Command::new(berthd_bin())
        .args(["--listen", "127.0.0.1:0", "--tick", tick, "--root"])
        .arg(&h.root)
        .arg("--cgroup-parent")
        .arg(&h.cgroup_parent)
        .arg("--bpffs")
        .arg(&h.bpffs)
        .arg("--ledger")
        .arg(ledger)
        .env_remove("BERTH_ROOT")
        .env_remove("BERTH_RUN_DIR")
        .env_remove("BERTH_BPFFS")
        .env(
            "BERTH_LOG",
            std::env::var("BERTHD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning berthd")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("berthd stdout")?)
        .read_line(&mut line)
        .context("reading berthd's listen line")?;
    if !line.starts_with("berthd listening on") {
        let _ = child.kill();
        let _ = child.wait();
        bail!("berthd did not start: {line:?}");
    }
    let addr = line
        .trim()
        .strip_prefix("berthd listening on http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in {line:?}"))?;
    Ok((child, addr))
}

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
) -> Result<(Value, Value)> {
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
    Ok((cli, cli_slots))
}

/// berthd's billing endpoints answer what the CLI prints, bad queries get a 400 naming the
/// parameter, an unknown CT a 404, and the slot feed pages by `next_after_seq` without losing
/// or repeating a row.
fn http_matches_the_cli(h: &TestHost, ledger: &Path, ct: &str, uuid: &str) -> Result<()> {
    let ledger_s = ledger.to_str().context("ledger path")?;
    // A long tick: after the first one (at once) nothing changes the ledger while we compare.
    let (mut d, addr) = start_berthd_ticking(h, ledger, "300")?;
    std::thread::sleep(Duration::from_secs(2));
    // A report counts the slots elapsed until now: a 5-minute boundary between the CLI's and
    // berthd's answer changes it, so one retry.
    let mut tries = 0;
    let (cli, cli_slots) = loop {
        tries += 1;
        match reports_match(h, addr, ledger_s, ct, uuid) {
            Ok(got) => break got,
            Err(e) if tries < 2 => eprintln!("retrying the report comparison: {e:#}"),
            Err(e) => return Err(e),
        }
    };
    ensure!(cli["ctid"].as_u64() == ct.parse().ok(), "{cli}");

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
    sigterm_and_wait(&mut d)
}

/// Tags balance and there is one root element: the structure of an XML document (no XML parser
/// among the dependencies).
fn well_formed(doc: &str) -> Result<()> {
    let mut stack: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut rest = doc.trim();
    while let Some(lt) = rest.find('<') {
        let gt = rest[lt..].find('>').context("unclosed tag")? + lt;
        let tag = &rest[lt + 1..gt];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop();
            ensure!(open == Some(name.trim()), "</{name}> closes {open:?}");
        } else if !tag.starts_with('?') && !tag.starts_with('!') {
            let name = tag.split_whitespace().next().context("empty tag")?;
            roots += usize::from(stack.is_empty());
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        rest = &rest[gt + 1..];
    }
    ensure!(
        stack.is_empty() && roots == 1 && rest.trim().is_empty(),
        "{stack:?}, {roots} roots"
    );
    Ok(())
}

/// `berth billing graph` writes an SVG whose 95th label is the report's (mode max); an
/// unknown CT writes nothing.
fn graph_is_an_svg_with_the_95th(h: &TestHost, ledger_s: &str) -> Result<()> {
    let file = h.dir.path().join("4260.svg");
    let file_s = file.to_str().context("svg path")?;
    // The 95th counts the slots until now: a 5-minute boundary between the report and the
    // graph can move it, so one retry.
    let mut tries = 0;
    let svg = loop {
        tries += 1;
        let report = h.json(&["billing", "--ledger", ledger_s, "report", "4260"]);
        let out = h.ok(&[
            "billing", "--ledger", ledger_s, "graph", "4260", "-o", file_s,
        ]);
        let svg = std::fs::read_to_string(&file)?;
        let bps = report["p95"]["bits_per_second"].as_u64().context("95th")?;
        let label = format!("95th percentile (max): {bps} bit/s");
        if svg.contains(&label) && out.contains(&label) {
            break svg;
        }
        ensure!(tries < 2, "no {label:?} in the SVG or in {out:?}");
    };
    ensure!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
    well_formed(&svg)?;
    ensure!(
        svg.contains("inbound") && svg.contains("outbound"),
        "legend"
    );
    let none = h.dir.path().join("none.svg");
    let none_s = none.to_str().context("svg path")?;
    let err = h.fails(&[
        "billing", "--ledger", ledger_s, "graph", "4999", "-o", none_s,
    ]);
    ensure!(err.contains("4999") && !none.exists(), "{err}");
    Ok(())
}

/// A small xorshift seeded from the clock: the kill moments differ from run to run (printed, so
/// a failing run can be told apart).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("billing test seed {seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The CT's kernel counters (`berth netstat`), summed over classes and families.
fn kernel_bytes(h: &TestHost, ct: &str) -> (u64, u64) {
    let v = h.json(&["netstat", ct]);
    v.as_array()
        .expect("netstat rows")
        .iter()
        .fold((0, 0), |(i, o), r| {
            (
                i + r["in_bytes"].as_u64().expect("in_bytes"),
                o + r["out_bytes"].as_u64().expect("out_bytes"),
            )
        })
}

fn sigterm_and_wait(child: &mut Child) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) on our own child's PID, which we have not reaped yet.
    ensure!(unsafe { libc::kill(pid, libc::SIGTERM) } == 0, "SIGTERM");
    let status = child.wait()?;
    ensure!(status.success(), "berthd exited with {status} on SIGTERM");
    Ok(())
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
    let mut d = start_berthd(&h, &ledger)?;
    // The first tick runs at once and books an empty node: a CT seen after it counts from 0.
    std::thread::sleep(Duration::from_secs(2));
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

    let stop = AtomicBool::new(false);
    let mut rng = Rng::new();
    let kills = std::thread::scope(|s| -> Result<u32> {
        let traffic = s.spawn(|| {
            let mut rounds = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let (code, _, err) = h.exec(
                    "4260",
                    &[
                        "ping", "-c", "50", "-i", "0.02", "-s", "1000", "-W", "1", UPLINK4,
                    ],
                );
                assert!(code == 0, "ping: {err}");
                rounds += 1;
            }
            rounds
        });
        let mut kills = 0;
        let t0 = Instant::now();
        while kills < 4 {
            // Up to a tick between restart and kill: some kills land mid-tick, some between.
            std::thread::sleep(Duration::from_millis(500 + rng.below(9_500)));
            d.kill()?;
            d.wait()?;
            kills += 1;
            std::thread::sleep(Duration::from_millis(rng.below(3_000)));
            d = start_berthd(&h, &ledger)?;
        }
        // One more tick after the last restart, then the traffic ends.
        std::thread::sleep(Duration::from_secs(11));
        stop.store(true, Ordering::Relaxed);
        let rounds = traffic.join().expect("traffic thread");
        eprintln!("{kills} kills, {rounds} ping rounds in {:?}", t0.elapsed());
        Ok(kills)
    })?;
    ensure!(kills >= 3);

    // No traffic after this: the CT's counters are final (its slot is kept while it exists).
    h.ok(&["stop", "--fast", "4260"]);
    let (k_in, k_out) = kernel_bytes(&h, "4260");
    ensure!(
        k_in > 100_000 && k_out > 100_000,
        "too little traffic counted: {k_in}/{k_out}"
    );
    sigterm_and_wait(&mut d)?;

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
    graph_is_an_svg_with_the_95th(&h, &ledger_s)?;

    // Destroyed while berthd is down (killed after the CT's last traffic): the next berthd books
    // the final counters from the retired record and closes the CT's lifetime.
    d = start_berthd(&h, &ledger)?;
    h.ok(&["start", "4260"]);
    let (code, _, err) = h.exec(
        "4260",
        &[
            "ping", "-c", "40", "-i", "0.02", "-s", "1200", "-W", "1", UPLINK4,
        ],
    );
    ensure!(code == 0, "ping: {err}");
    d.kill()?;
    d.wait()?;
    h.ok(&["stop", "--fast", "4260"]);
    let (f_in, f_out) = kernel_bytes(&h, "4260");
    ensure!(f_in >= k_in + 40 * 1200, "{f_in} after {k_in}");
    h.ok(&["destroy", "4260"]);
    d = start_berthd(&h, &ledger)?;
    sigterm_and_wait(&mut d)?;
    let fin = h.json(&["billing", "--ledger", &ledger_s, "report", &uuid]);
    ensure!(
        (fin["in_bytes"].as_u64(), fin["out_bytes"].as_u64()) == (Some(f_in), Some(f_out)),
        "destroyed CT: ledger {}/{} vs kernel {f_in}/{f_out}",
        fin["in_bytes"],
        fin["out_bytes"]
    );
    ensure!(fin["destroyed"].is_string(), "not marked destroyed: {fin}");
    Ok(())
}
