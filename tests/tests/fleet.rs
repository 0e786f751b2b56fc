//! The fleet (issue 14): two nodes' ledgers shipped into a real PostgreSQL (a private cluster
//! started by the test), the shipper SIGKILLed and the database stopped `-m immediate` mid-stream,
//! then the central views against each node's own `berth billing report --json`, to the byte,
//! and a full replay that writes nothing.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use berth::billing::{Direction, Ledger, P95Mode, PeriodSpec, SlotSample, SlotWindow, p95::p95};
use berth::datapath::{Datapath, IfaceConfig};
use berth_tests::berthd::{Berthd, BerthdArgs, Prometheus, berthd_bin, value_of};
use berth_tests::ct::TestHost;
use berth_tests::datapath::{Pair, PinDir, udp_bind};
use berth_tests::fleet::{
    SynthCt, bill_line, central_bill, central_totals, fill, total_lines, uuid,
};
use berth_tests::pg::{self, Cluster};
use berth_tests::skip::skip;
use serde_json::Value;

const MAR1: i64 = 1_772_323_200; // 2026-03-01T00:00:00Z
const APR1: i64 = MAR1 + 31 * 86_400;
const MARCH: &str = "2026-03";
const MOVE: i64 = MAR1 + 11 * 86_400 + 10 * 3600; // 2026-03-12T10:00Z

struct Node {
    name: &'static str,
    root: PathBuf,
    ledger: PathBuf,
    seq: i64,
}

fn berth(n: &Node, args: &[&str]) -> Command {
    let mut c = Command::new(berth_tests::ct::berth_bin());
    c.arg("--root")
        .arg(&n.root)
        .arg("--json")
        .arg("billing")
        .arg("--ledger")
        .arg(&n.ledger)
        .args(args)
        .stdin(Stdio::null());
    c
}

fn run(n: &Node, args: &[&str]) -> Result<(bool, String, String)> {
    let o = berth(n, args).output()?;
    Ok((
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    ))
}

fn ship(n: &Node, url: &str, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["ship", "--url", url, "--node", n.name];
    args.extend_from_slice(extra);
    let (ok, out, err) = run(n, &args)?;
    ensure!(ok, "ship {}: {err}", n.name);
    serde_json::from_str(out.lines().last().unwrap_or("")).with_context(|| out.clone())
}

fn spawn_ship(n: &Node, url: &str, extra: &[&str], log: &Path) -> Result<Child> {
    let mut args = vec!["ship", "--url", url, "--node", n.name];
    args.extend_from_slice(extra);
    Ok(berth(n, &args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?)
}

fn kill(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn acked(db: &Cluster, node: &str) -> i64 {
    db.psql(&format!(
        "SELECT last_seq FROM berth_node WHERE node = '{node}'"
    ))
    .ok()
    .and_then(|s| s.parse().ok())
    .unwrap_or(0)
}

fn wait_acked(db: &Cluster, node: &Node, timeout: Duration, log: Option<&Path>) -> Result<()> {
    let t0 = Instant::now();
    while acked(db, node.name) < node.seq {
        ensure!(
            t0.elapsed() < timeout,
            "node {} acked {} of {} after {timeout:?}; its shipper logged:\n{}\nthe server logged:\n{}",
            node.name,
            acked(db, node.name),
            node.seq,
            log.map_or_else(|| "(on the test's stderr)".to_string(), tail),
            tail(&db.dir.join("server.log"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The last lines of a log, for a failure message.
fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| format!("({}: {e})", p.display()));
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The node's reports of March, keyed by UUID.
fn reports(n: &Node) -> Result<BTreeMap<String, Value>> {
    let (ok, out, err) = run(n, &["report", "all", "--period", "2026-03"])?;
    ensure!(ok, "report {}: {err}", n.name);
    let v: Value = serde_json::from_str(&out)?;
    Ok(v.as_array()
        .context("report all is an array")?
        .iter()
        .map(|r| (r["ct_uuid"].as_str().unwrap_or("").to_string(), r.clone()))
        .collect())
}

fn node_cts(node: u32, ids: std::ops::Range<u32>) -> Vec<SynthCt> {
    ids.map(|i| SynthCt {
        uuid: uuid(node, i),
        ctid: 100 + i,
        // One CT in Berlin: its March is 28 Feb 23:00Z – 31 Mar 22:00Z (DST on 29 March).
        tz: if i % 4 == 1 { "Europe/Berlin" } else { "UTC" }.to_string(),
        created: MAR1 - 86_400,
        from: MAR1 - 3600,
        to: APR1 + 3600,
        destroy: false,
        classes: (i % 4 == 2).then(|| vec![1]),
    })
    .collect()
}

#[test]
fn two_nodes_ship_through_kills_and_replay_to_the_byte() -> Result<()> {
    if pg::bin_dir().is_none() {
        skip(
            "fleet::two_nodes_ship_through_kills_and_replay_to_the_byte",
            "no PostgreSQL server in /usr/lib/postgresql (xtask/setup.sh installs `postgresql`)",
        );
        return Ok(());
    }
    let tmp = tempfile::Builder::new().prefix("berth-fleet-").tempdir()?;
    let dir = tmp.path();
    let moved = uuid(0xab, 99);
    let mv = |from, to, destroy| SynthCt {
        uuid: moved.clone(),
        ctid: 199,
        tz: "UTC".into(),
        created: MAR1 - 86_400,
        from,
        to,
        destroy,
        classes: None,
    };
    // 5-minute readings for the first four days, hourly after (gaps spread evenly over the
    // slots, flagged estimated): every slot of March has bytes, at ~1/4 of the ticks.
    let step = |t: i64| if t < MAR1 + 4 * 86_400 { 300 } else { 3600 };
    let mut nodes = Vec::new();
    for (k, name) in ["node-a", "node-b"].into_iter().enumerate() {
        let root = dir.join(name);
        std::fs::create_dir_all(&root)?;
        let ledger = root.join("billing.db");
        let mut cts = node_cts(k as u32 + 1, 0..6);
        // A CT that moved from node A to node B on 12 March.
        cts.push(if k == 0 {
            mv(MAR1 - 3600, MOVE, true)
        } else {
            mv(MOVE, APR1 + 3600, false)
        });
        let seq = fill(&ledger, &cts, name, step)?;
        nodes.push(Node {
            name,
            root,
            ledger,
            seq,
        });
    }
    let (a, b) = (&nodes[0], &nodes[1]);

    // Bad input names the problem and ships nothing.
    let (ok, _, err) = run(a, &["ship", "--url", "postgresql://u@h/d?sslmode=bogus"])?;
    ensure!(!ok && err.contains("sslmode \"bogus\""), "{err}");
    let pgdir = dir.join("pg");
    std::fs::create_dir_all(&pgdir)?;
    let db = Cluster::start(&pgdir)?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (ok, _, err) = run(
        a,
        &[
            "ship",
            "--url",
            &format!("postgresql://berth@127.0.0.1:{closed}/postgres?sslmode=disable"),
            "--attempts",
            "2",
        ],
    )?;
    ensure!(
        !ok && err.contains("connecting to the central database")
            && err.contains("failed 2 times; nothing was lost")
            && err.contains("retrying"),
        "{err}"
    );
    // verify-full against a certificate the server's is not signed by.
    let other = dir.join("other.crt");
    let o = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(dir.join("other.key"))
        .arg("-out")
        .arg(&other)
        .output()?;
    ensure!(o.status.success());
    let wrong = db
        .tls_url()
        .replace(&db.cert.display().to_string(), &other.display().to_string());
    let (ok, _, err) = run(b, &["ship", "--url", &wrong, "--attempts", "1"])?;
    ensure!(
        !ok && err.contains("connecting to the central database"),
        "{err}"
    );
    // None of them got as far as the schema.
    ensure!(db.psql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'berth%'")? == "0");

    // Node A over the unix socket, small pages, SIGKILLed mid-stream.
    let sock = db.socket_url();
    let mut s = spawn_ship(a, &sock, &["--page-rows", "2000"], &dir.join("a1.log"))?;
    let t0 = Instant::now();
    while acked(&db, a.name) == 0 {
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "node A never acked: {}",
            std::fs::read_to_string(dir.join("a1.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    kill(&mut s);
    let mid = acked(&db, a.name);
    ensure!(
        0 < mid && mid < a.seq,
        "the SIGKILL came too late: acked {mid} of {}",
        a.seq
    );

    // Both nodes following (B over TLS with a password), the database crashed under them.
    let mut fa = spawn_ship(
        a,
        &sock,
        &["--follow", "--interval", "1", "--page-rows", "2000"],
        &dir.join("a2.log"),
    )?;
    let tls = db.tls_url();
    let mut fb = spawn_ship(
        b,
        &tls,
        &["--follow", "--interval", "1", "--page-rows", "2000"],
        &dir.join("b.log"),
    )?;
    let t0 = Instant::now();
    while acked(&db, b.name) == 0 {
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "node B never acked"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let during = (acked(&db, a.name), acked(&db, b.name));
    db.pg_stop("immediate")?;
    std::thread::sleep(Duration::from_secs(3));
    db.pg_start()?;
    let crashed_mid = during.1 < b.seq;
    wait_acked(&db, a, Duration::from_secs(300), Some(&dir.join("a2.log")))?;
    wait_acked(&db, b, Duration::from_secs(300), Some(&dir.join("b.log")))?;
    kill(&mut fa);
    kill(&mut fb);
    let logs =
        std::fs::read_to_string(dir.join("a2.log"))? + &std::fs::read_to_string(dir.join("b.log"))?;
    ensure!(
        logs.contains("shipping the ledger failed; nothing is lost, retrying"),
        "no retry logged while the database was down: {logs}"
    );
    eprintln!("acked at the crash {during:?}, B mid-stream: {crashed_mid}");

    // Central = each node's own report, to the byte.
    let ra = reports(a)?;
    let rb = reports(b)?;
    let mut compared = 0;
    for r in [&ra, &rb] {
        for (u, rep) in r.iter().filter(|(u, _)| **u != moved) {
            ensure!(
                central_bill(&db, MARCH, u)? == bill_line(u, rep),
                "bill of {u}: central {} node {}",
                central_bill(&db, MARCH, u)?,
                bill_line(u, rep)
            );
            ensure!(
                central_totals(&db, MARCH, u)? == total_lines(u, rep),
                "totals of {u}"
            );
            compared += 1;
        }
    }
    ensure!(compared == 12, "{compared} CTs compared");
    // The moved CT: totals are the two nodes' summed; its 95th is over the slots summed across
    // the nodes first, over its whole March (its lifetime on both).
    let mut sum: BTreeMap<(String, u64, String), (u64, u64)> = BTreeMap::new();
    for r in [&ra[&moved], &rb[&moved]] {
        for t in r["totals"].as_array().context("totals")? {
            let e = sum
                .entry((
                    t["direction"].as_str().unwrap_or("").to_string(),
                    t["class"].as_u64().unwrap_or(99),
                    t["family"].as_str().unwrap_or("").to_string(),
                ))
                .or_default();
            e.0 += t["bytes"].as_u64().unwrap_or(0);
            e.1 += t["packets"].as_u64().unwrap_or(0);
        }
    }
    let want: Vec<String> = sum
        .iter()
        .map(|((d, c, f), (b, p))| format!("{moved}|{d}|{c}|{f}|{b}|{p}"))
        .collect();
    ensure!(
        central_totals(&db, MARCH, &moved)? == want,
        "moved CT's totals"
    );
    let spec = PeriodSpec::new(berth::billing::BillingAnchor::Day(1), "UTC", MAR1 - 86_400)?;
    let march = spec.parse("2026-03")?;
    let mut samples = Vec::new();
    for n in [a, b] {
        let l = Ledger::open_read_only(&n.ledger)?;
        for r in l.slots(&moved, march.start, march.end)? {
            let mut s = SlotSample {
                start: r.slot_start,
                ..SlotSample::default()
            };
            match r.key.direction {
                Direction::In => s.in_bytes = r.counter.bytes,
                Direction::Out => s.out_bytes = r.counter.bytes,
            }
            samples.push(s);
        }
    }
    let w = SlotWindow::new(march.start, march.end, MAR1 - 86_400, APR1 + 86_400);
    let p = p95(&samples, w, P95Mode::Max, None);
    let (in_b, out_b) = sum.iter().fold((0, 0), |acc, ((d, _, _), (b, _))| {
        if d == "in" {
            (acc.0 + b, acc.1)
        } else {
            (acc.0, acc.1 + b)
        }
    });
    let want = format!(
        "{moved}|{in_b}|{out_b}|{}|{}|{}|{}|{}",
        p.n,
        p.slot_bytes,
        p.bps,
        p.in_bps.unwrap_or(0),
        p.out_bps.unwrap_or(0)
    );
    ensure!(
        central_bill(&db, MARCH, &moved)? == want,
        "moved CT: central {} want {want}",
        central_bill(&db, MARCH, &moved)?
    );
    ensure!(p.n == 31 * 288 && p.slot_bytes > 0, "{p:?}");

    // Every row of both ledgers once; a full replay writes none.
    let mut rows = 0;
    for n in [a, b] {
        rows += Ledger::open_read_only(&n.ledger)?
            .slots_after_seq(0, u32::MAX)?
            .len();
    }
    let count = || db.psql("SELECT count(*) FROM berth_slot");
    ensure!(
        count()? == rows.to_string(),
        "{} central rows, {rows} in the ledgers",
        count()?
    );
    for (n, url) in [(a, &sock), (b, &tls)] {
        let r = ship(n, url, &["--replay"])?;
        ensure!(
            r["rows_written"] == 0 && r["acked_seq"] == n.seq,
            "replay of {}: {r}",
            n.name
        );
    }
    ensure!(count()? == rows.to_string());
    ensure!(
        db.psql("SELECT max(version) FROM berth_schema_migrations")? == "1",
        "schema version"
    );
    Ok(())
}

/// berthd --ship-url: shipped after its ticks on its own thread, the lag and failures in
/// /metrics, a database crash retried without a lost row.
#[test]
fn berthd_ships_after_ticks_and_exports_its_lag() -> Result<()> {
    if pg::bin_dir().is_none() {
        skip(
            "fleet::berthd_ships_after_ticks_and_exports_its_lag",
            "no PostgreSQL server in /usr/lib/postgresql (xtask/setup.sh installs `postgresql`)",
        );
        return Ok(());
    }
    let tmp = tempfile::Builder::new()
        .prefix("berth-fleet-d-")
        .tempdir()?;
    let dir = tmp.path();
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    let ledger = root.join("billing.db");
    let seq = fill(&ledger, &node_cts(7, 0..3), "node-d", |_| 3600)?;
    let pgdir = dir.join("pg");
    std::fs::create_dir_all(&pgdir)?;
    let db = Cluster::start(&pgdir)?;
    let args = BerthdArgs {
        root: root.clone(),
        run_dir: Some(dir.join("run")),
        cgroup_parent: format!("berth-fleet-{}", std::process::id()),
        bpffs: dir.join("no-bpffs"),
    };
    let url = db.socket_url();
    let extra = [
        "--ship-url",
        url.as_str(),
        "--node",
        "node-d",
        "--tick",
        "10",
    ];
    let d = Berthd::start_bin_with(&berthd_bin(), &args, 0, &extra)?;
    let node = Node {
        name: "node-d",
        root: root.clone(),
        ledger: ledger.clone(),
        seq,
    };
    // berthd ticks too (its ledger's seq may pass the fill's): at least the fill is shipped.
    wait_acked(&db, &node, Duration::from_secs(60), None)?;
    let metric = |name: &str| -> Result<Option<f64>> {
        let (_, s) = d.scrape()?;
        Ok(value_of(&s, name, &[]))
    };
    let t0 = Instant::now();
    while metric("berth_billing_ship_lag_seq")? != Some(0.0) {
        ensure!(t0.elapsed() < Duration::from_secs(60), "lag never 0");
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(metric("berth_billing_ship_acked_seq")? >= Some(seq as f64));
    ensure!(metric("berth_billing_ship_failures_total")? == Some(0.0));
    db.pg_stop("immediate")?;
    let t0 = Instant::now();
    while metric("berth_billing_ship_failures_total")? == Some(0.0) {
        ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "no failed round while the database is down"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    db.pg_start()?;
    let t0 = Instant::now();
    while metric("berth_billing_ship_lag_seq")? != Some(0.0) {
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "lag not 0 after the restart"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.kill()?;
    let rows = Ledger::open_read_only(&ledger)?
        .slots_after_seq(0, u32::MAX)?
        .len();
    ensure!(db.psql("SELECT count(*) FROM berth_slot")? == rows.to_string());
    let replay = ship(&node, &url, &["--replay"])?;
    ensure!(replay["rows_written"] == 0, "{replay}");
    Ok(())
}

fn args_for(h: &TestHost, pin: &Path) -> BerthdArgs {
    BerthdArgs {
        root: h.root.clone(),
        run_dir: None,
        cgroup_parent: h.cgroup_parent.clone(),
        bpffs: pin.to_owned(),
    }
}

/// The metrics path across nodes: a Prometheus agent scrapes berthd with `external_labels:
/// {node: …}` and remote_writes to a second Prometheus (the remote-write receiver standing in
/// for Thanos Receive, Mimir or VictoriaMetrics); PromQL on the receiver sees the CT's rate
/// with the node label.
#[test]
fn prometheus_agent_remote_writes_ct_rates_with_the_node_label() -> Result<()> {
    const PPS: u64 = 500;
    const PAYLOAD: usize = 972;
    let h = TestHost::new();
    h.ok(&["create", "104", "--name", "fleetct"]);
    h.ok(&["start", "104"]);
    let pin = PinDir::new();
    let pair = Pair::new_down()?;
    pair.host
        .ip(&["addr", "add", "10.83.0.1/24", "dev", &pair.host_if])?;
    pair.ct
        .ip(&["addr", "add", "10.83.0.2/24", "dev", &pair.ct_if])?;
    {
        let _in_host = pair.host.enter()?;
        let mut dp = Datapath::open_or_load(&pin.path)?;
        dp.attach(
            pair.host.ifindex(&pair.host_if)?,
            IfaceConfig::routed(berth_tests::ct(104), pair.ct_mac()?),
        )?;
        dp.set_ct_addrs(berth_tests::ct(104), &["10.83.0.2".parse()?])?;
    }
    pair.up()?;
    let _sink = udp_bind(&pair.host, "10.83.0.1:9000".parse()?)?;
    let src = udp_bind(&pair.ct, "10.83.0.2:0".parse()?)?;
    let d = Berthd::start(&args_for(&h, &pin.path), 0)?;
    let receiver = Prometheus::start_config(
        "global:\n  scrape_interval: 1s\n",
        &["--web.enable-remote-write-receiver"],
    )?;
    let agent_cfg = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  external_labels:\n    node: node-x\n\
         scrape_configs:\n  - job_name: berthd\n    static_configs:\n      - targets: ['{}']\n\
         remote_write:\n  - url: http://{}/api/v1/write\n    queue_config:\n      batch_send_deadline: 1s\n",
        d.addr, receiver.addr
    );
    let agent = Prometheus::start_config(&agent_cfg, &["--enable-feature=agent"])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sending = stop.clone();
    let sender = std::thread::spawn(move || -> Result<()> {
        let buf = vec![0x5au8; PAYLOAD];
        let start = Instant::now();
        let mut i = 0u64;
        while !sending.load(std::sync::atomic::Ordering::Relaxed)
            && start.elapsed() < Duration::from_secs(90)
        {
            let due = start + Duration::from_micros(i * 1_000_000 / PPS);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            src.send_to(&buf, "10.83.0.1:9000".parse::<std::net::SocketAddr>()?)?;
            i += 1;
        }
        Ok(())
    });
    let q = r#"sum by (node) (rate(berth_network_transmit_bytes_total{ctid="104",family="ipv4",node="node-x"}[10s]))"#;
    let t0 = Instant::now();
    let got = loop {
        let r = receiver.query(q, None)?;
        if let Some(one) = r.first()
            && one["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        {
            break one.clone();
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "receiver has no rate with node=node-x: {r:?}\nagent log:\n{}\nreceiver log:\n{}",
            agent.log(),
            receiver.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    ensure!(got["metric"]["node"] == "node-x", "{got}");
    // The first rate seen may have a window reaching back before the first scrape: measure
    // once the whole 10 s window lies in the traffic.
    std::thread::sleep(Duration::from_secs(12));
    let r = receiver.query(q, None)?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().expect("sender thread")?;
    let rate: f64 = r
        .first()
        .and_then(|o| o["value"][1].as_str())
        .context("rate gone")?
        .parse()?;
    // 500 frames/s of 1014 bytes (UDP 8 + IPv4 20 + Ethernet 14 on 972): the rate of the
    // series the agent forwarded, within the window's sampling error.
    let want = (PPS * (PAYLOAD as u64 + 42)) as f64;
    ensure!(
        (rate - want).abs() < want * 0.25,
        "rate {rate} vs {want} B/s"
    );
    // The series keeps berthd's own labels next to the node's.
    let series = receiver.query(
        r#"berth_network_transmit_bytes_total{ctid="104",node="node-x",job="berthd"}"#,
        None,
    )?;
    ensure!(!series.is_empty(), "no raw series on the receiver");
    drop(agent);
    drop(d);
    h.ok(&["stop", "104", "--fast"]);
    h.ok(&["destroy", "104"]);
    Ok(())
}
