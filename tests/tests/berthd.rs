//! berthd end to end: the real daemon over real CTs (the berth binary), a datapath pinned
//! under a private bpffs directory counting real traffic between test namespaces, promtool
//! on the output and on the shipped rules, and the Debian package's Prometheus scraping it.
//! Run: `cargo test -p berth-tests --test berthd -- --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use berth::datapath::{Datapath, IfaceConfig};
use berth::metrics::defs;
use berth_tests::berthd::{
    Berthd, BerthdArgs, Prometheus, Sample, free_port, parse_samples, promtool, unix_now, value_of,
};
use berth_tests::ct;
use berth_tests::ct::TestHost;
use berth_tests::datapath::{Pair, PinDir, ipv4, send_raw, udp_bind};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn args(h: &TestHost, pin: &Path) -> BerthdArgs {
    BerthdArgs {
        root: h.root.clone(),
        run_dir: None,
        cgroup_parent: h.cgroup_parent.clone(),
        bpffs: pin.to_owned(),
    }
}

/// A veth pair whose host side carries the datapath as CT `ctid`'s interface, with the CT
/// end at `prefix.2` and the host end at `prefix.1` (/24).
fn traffic_pair(pin: &Path, ctid: u32, prefix: &str) -> Result<Pair> {
    let pair = Pair::new_down()?;
    pair.host.ip(&[
        "addr",
        "add",
        &format!("{prefix}.1/24"),
        "dev",
        &pair.host_if,
    ])?;
    pair.ct
        .ip(&["addr", "add", &format!("{prefix}.2/24"), "dev", &pair.ct_if])?;
    {
        let _in_host = pair.host.enter()?;
        let mut dp = Datapath::open_or_load(pin)?;
        dp.attach(
            pair.host.ifindex(&pair.host_if)?,
            IfaceConfig::routed(ct(ctid), pair.ct_mac()?),
        )?;
        let addr: IpAddr = format!("{prefix}.2").parse()?;
        dp.set_ct_addrs(ct(ctid), &[addr])?;
    }
    pair.up()?;
    Ok(pair)
}

fn ct_series(samples: &[Sample], ctid: &str) -> Vec<String> {
    samples
        .iter()
        .filter(|s| s.label("ctid") == Some(ctid))
        .map(Sample::series)
        .collect()
}

/// Names a PromQL expression refers to that look like berthd's (`berth_`/`container_`),
/// recording-rule names (with a colon) excluded.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut cur = String::new();
    let mut in_string = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_string = !in_string;
            cur.clear();
            continue;
        }
        if in_string {
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            cur.push(c);
        } else {
            if (cur.starts_with("berth_") || cur.starts_with("container_")) && !cur.contains(':') {
                out.insert(cur.clone());
            }
            cur.clear();
        }
    }
    out
}

/// Every `"expr"` string of a Grafana dashboard's panels.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

#[test]
fn dashboards_and_rules_use_only_exported_metrics() -> Result<()> {
    let dir = workspace().join("dashboards");
    let exported: BTreeSet<&str> = defs::ALL.iter().map(|d| d.name).collect();
    let mut exprs = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not JSON", path.display()))?;
                let before = exprs.len();
                dashboard_exprs(&v, &mut exprs);
                ensure!(exprs.len() > before, "{}: no queries", path.display());
                files += 1;
            }
            Some("yml" | "yaml") => {
                promtool(&["check", "rules", &path.to_string_lossy()], None)?;
                for line in text.lines() {
                    let l = line.trim_start().trim_start_matches("- ");
                    if let Some(e) = l.strip_prefix("expr:") {
                        exprs.push(e.trim().trim_matches(|c| c == '|' || c == '>').to_owned());
                    }
                }
                files += 1;
            }
            _ => {}
        }
    }
    ensure!(
        files >= 2,
        "expected a dashboard and a rules file in {}",
        dir.display()
    );
    // Multi-line rule expressions continue on the following lines: scan whole files too.
    let mut used = BTreeSet::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yml" | "yaml")
        ) {
            used.extend(metric_names(&std::fs::read_to_string(&path)?));
        }
    }
    for e in &exprs {
        used.extend(metric_names(e));
    }
    let unknown: Vec<&String> = used
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    ensure!(unknown.is_empty(), "not exported by berthd: {unknown:?}");
    ensure!(used.len() >= 10, "dashboards use only {used:?}");
    Ok(())
}

#[test]
fn promtool_accepts_the_output_and_destroyed_cts_vanish() -> Result<()> {
    let h = TestHost::new();
    h.ok(&[
        "create",
        "101",
        "--name",
        "web",
        "--hostname",
        "web.example.com",
    ]);
    h.ok(&["create", "102"]);
    h.ok(&["start", "101"]);
    let pin = PinDir::new();
    let pair = traffic_pair(&pin.path, 101, "10.81.0")?;
    pair.ct
        .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.81.0.1"])?;
    // A spoofed source address: dropped and counted.
    let spoofed = ipv4(pair.ct_mac()?, [10, 81, 0, 99], [10, 81, 0, 1], 64, 0);
    send_raw(&pair.ct, pair.ct.ifindex(&pair.ct_if)?, &spoofed)?;

    let d = Berthd::start(&args(&h, &pin.path), 0)?;
    let (text, s) = d.scrape()?;
    promtool(&["check", "metrics"], Some(&text))?;
    let v = |n, l: &[(&str, &str)]| value_of(&s, n, l);
    ensure!(
        v(
            "berth_container_state",
            &[("ctid", "101"), ("state", "running")]
        ) == Some(1.0)
    );
    ensure!(
        v(
            "berth_container_state",
            &[("ctid", "102"), ("state", "stopped")]
        ) == Some(1.0)
    );
    ensure!(
        v(
            "berth_container_info",
            &[
                ("ctid", "101"),
                ("name", "web"),
                ("hostname", "web.example.com"),
                ("template", "busybox")
            ]
        ) == Some(1.0)
    );
    let mem = v(
        "container_memory_usage_bytes",
        &[("ctid", "101"), ("name", "web")],
    );
    ensure!(
        mem.is_some_and(|m| m > 0.0),
        "memory of 101: {mem:?}\n{text}"
    );
    ensure!(v("container_processes", &[("ctid", "101")]).is_some_and(|p| p >= 1.0));
    ensure!(v("container_threads", &[("ctid", "101")]).is_some_and(|p| p >= 1.0));
    ensure!(v("container_cpu_usage_seconds_total", &[("ctid", "101")]).is_some());
    ensure!(v("container_start_time_seconds", &[("ctid", "101")]).is_some());
    ensure!(
        v("container_memory_usage_bytes", &[("ctid", "102")]).is_none(),
        "a stopped CT has no cgroup series"
    );
    let tx = v(
        "berth_network_transmit_packets_total",
        &[("ctid", "101"), ("family", "ipv4")],
    );
    ensure!(tx.is_some_and(|p| p >= 3.0), "pings out: {tx:?}");
    let rx = v(
        "berth_network_receive_packets_total",
        &[("ctid", "101"), ("family", "ipv4")],
    );
    ensure!(rx.is_some_and(|p| p >= 3.0), "replies in: {rx:?}");
    ensure!(
        v(
            "berth_network_drops_total",
            &[
                ("ctid", "101"),
                ("direction", "transmit"),
                ("reason", "spoofed_ip")
            ]
        ) == Some(1.0)
    );
    ensure!(
        v(
            "container_network_transmit_packets_dropped_total",
            &[("ctid", "101"), ("name", "web")]
        ) == Some(1.0)
    );
    ensure!(v("berth_exporter_source_up", &[("source", "datapath")]) == Some(1.0));
    ensure!(
        s.iter()
            .all(|x| x.label("ctid").is_none_or(|c| c == "101" || c == "102")),
        "series of unknown CTs"
    );

    // OpenMetrics when asked for it.
    let om = d.get(
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )],
    )?;
    ensure!(
        om.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text; version=1.0.0")),
        "{:?}",
        om.headers
    );
    ensure!(om.body.ends_with("# EOF\n"));
    ensure!(
        om.body
            .contains("# TYPE berth_network_transmit_bytes counter\n")
    );
    ensure!(parse_samples(&om.body)?.len() == s.len() || !om.body.is_empty());
    ensure!(d.get("/nope", &[])?.status == 404);

    // Stopped: cgroup series go, traffic totals stay.
    h.ok(&["stop", "--fast", "101"]);
    let (_, s) = d.scrape()?;
    ensure!(value_of(&s, "container_memory_usage_bytes", &[("ctid", "101")]).is_none());
    ensure!(
        value_of(
            &s,
            "berth_container_state",
            &[("ctid", "101"), ("state", "stopped")]
        ) == Some(1.0)
    );
    ensure!(
        value_of(
            &s,
            "berth_network_transmit_packets_total",
            &[("ctid", "101"), ("family", "ipv4")]
        ) >= tx
    );
    // Destroyed: every series of the CT goes, though the maps keep its totals.
    h.ok(&["destroy", "101"]);
    let (_, s) = d.scrape()?;
    let left = ct_series(&s, "101");
    ensure!(left.is_empty(), "series of destroyed CT 101: {left:?}");
    ensure!(!ct_series(&s, "102").is_empty());

    drop(d);
    drop(pair);
    let pin_path = pin.path.clone();
    drop(pin);
    ensure!(!pin_path.exists(), "{} left", pin_path.display());
    h.ok(&["destroy", "102"]);
    h.assert_clean();
    Ok(())
}

/// Shaping as berthd exports it: a routed CT in a test "host" namespace, shaped live through
/// the CLI; berthd, running in that namespace, shows the configured rates read back from the
/// kernel (10mbit = 1 250 000 bytes/s), the packet-rate limit and the shaper's counters, and
/// the series go when the shaping is removed.
#[test]
fn shaping_settings_and_counters_are_exported() -> Result<()> {
    use berth_runtime::net::NetNsGuard;
    use berth_tests::net::{Topology, UPLINK4, assert_same, wait_for};

    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    h.ok(&[
        "create",
        "231",
        "--ipadd",
        "192.0.2.231",
        "--name",
        "shaped",
    ]);
    h.ok(&["start", "231"]);
    let outcome = (|| -> Result<()> {
        let _in_host = NetNsGuard::enter(topo.host.fd())?;
        let d = Berthd::start(&args(&h, &h.bpffs), 0)?;
        let (_, s) = d.scrape()?;
        ensure!(
            !s.iter().any(|x| x.name.starts_with("berth_shaping_")),
            "shaping series before any --rate"
        );
        ensure!(value_of(&s, "berth_exporter_source_up", &[("source", "shaper")]) == Some(1.0));

        h.ok(&[
            "set",
            "231",
            "--rate-out",
            "10mbit",
            "--class-rate",
            "1:2mbit:4mbit",
            "--pps-in",
            "5000",
        ]);
        // Some traffic through the shaped CT (the uplink answers).
        let pinged = wait_for(Duration::from_secs(6), || {
            h.exec("231", &["ping", "-c", "3", "-i", "0.2", "-W", "2", UPLINK4])
                .0
                == 0
        });
        ensure!(pinged, "the shaped CT lost connectivity");
        let (text, s) = d.scrape()?;
        promtool(&["check", "metrics"], Some(&text))?;
        let v = |n, l: &[(&str, &str)]| value_of(&s, n, l);
        let rate = |dir, class| {
            v(
                "berth_shaping_rate_bytes",
                &[("ctid", "231"), ("direction", dir), ("class", class)],
            )
        };
        ensure!(
            rate("transmit", "all") == Some(1_250_000.0),
            "transmit total: {:?}\n{text}",
            rate("transmit", "all")
        );
        ensure!(rate("transmit", "1") == Some(500_000.0), "{text}");
        // Receive: a class rate without a total.
        ensure!(rate("receive", "1") == Some(250_000.0), "{text}");
        ensure!(rate("receive", "all").is_none(), "{text}");
        ensure!(
            v(
                "berth_shaping_pps_limit",
                &[("ctid", "231"), ("direction", "receive")]
            ) == Some(5000.0),
            "{text}"
        );
        ensure!(
            v(
                "berth_shaping_pps_limit",
                &[("ctid", "231"), ("direction", "transmit")]
            )
            .is_none()
        );
        for dir in ["receive", "transmit"] {
            ensure!(
                v(
                    "berth_shaping_overlimits_total",
                    &[("ctid", "231"), ("direction", dir)]
                )
                .is_some(),
                "{dir} overlimits\n{text}"
            );
            ensure!(
                v(
                    "berth_shaping_dropped_packets_total",
                    &[("ctid", "231"), ("direction", dir), ("reason", "queue")]
                )
                .is_some(),
                "{dir} queue drops\n{text}"
            );
        }
        ensure!(
            v(
                "berth_shaping_dropped_packets_total",
                &[("ctid", "231"), ("direction", "receive"), ("reason", "pps")]
            ) == Some(0.0),
            "{text}"
        );
        // The pings went through the shaper's queues: the transmit direction sent them.
        ensure!(v("berth_exporter_source_up", &[("source", "shaper")]) == Some(1.0));

        h.ok(&[
            "set",
            "231",
            "--rate-out",
            "none",
            "--class-rate",
            "1:none:none",
            "--pps-in",
            "none",
        ]);
        let (_, s) = d.scrape()?;
        let left: Vec<String> = s
            .iter()
            .filter(|x| x.name.starts_with("berth_shaping_"))
            .map(Sample::series)
            .collect();
        ensure!(left.is_empty(), "shaping series after removal: {left:?}");
        d.kill()
    })();
    h.ok(&["stop", "--fast", "231"]);
    h.ok(&["destroy", "231"]);
    h.assert_clean();
    outcome?;
    let after = topo.host.settled_snapshot();
    assert_same("host netns after the shaped CT", &before, &after);
    Ok(())
}

/// Counter series (the `_total` ones) and their values.
fn counters(samples: &[Sample]) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|s| s.name.ends_with("_total"))
        .map(|s| (s.series(), s.value))
        .collect()
}

#[test]
fn prometheus_scrapes_per_ct_rates_and_berthd_restarts_move_no_counter() -> Result<()> {
    const PPS: u64 = 1000;
    const PAYLOAD: usize = 972;
    // UDP 8 + IPv4 20 + Ethernet 14: the datapath counts L2 frames by default.
    const FRAME: u64 = PAYLOAD as u64 + 42;
    const SECONDS: u64 = 26;

    let h = TestHost::new();
    h.ok(&["create", "103", "--name", "talker"]);
    h.ok(&["start", "103"]);
    let pin = PinDir::new();
    let pair = traffic_pair(&pin.path, 103, "10.82.0")?;
    let _sink = udp_bind(&pair.host, "10.82.0.1:9000".parse()?)?;
    let src = udp_bind(&pair.ct, "10.82.0.2:0".parse()?)?;

    let port = free_port()?;
    let a = args(&h, &pin.path);
    let mut d = Berthd::start(&a, port)?;
    let prom = Prometheus::start(&[SocketAddr::from(([127, 0, 0, 1], port))], "1s")?;

    // Paced against an absolute schedule, so the rate is PPS × FRAME whatever the hiccups.
    let sender = std::thread::spawn(move || -> Result<(f64, f64)> {
        let to: SocketAddr = "10.82.0.1:9000".parse()?;
        let buf = vec![0x5au8; PAYLOAD];
        let start = Instant::now();
        let t0 = unix_now();
        for i in 0..PPS * SECONDS {
            let due = start + Duration::from_micros(i * 1_000_000 / PPS);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            src.send_to(&buf, to).context("send")?;
        }
        Ok((t0, unix_now()))
    });

    std::thread::sleep(Duration::from_secs(8));
    let (_, before) = d.scrape()?;
    // A crash mid-traffic, a gap of two scrape intervals, a new berthd on the same port.
    d.kill()?;
    std::thread::sleep(Duration::from_secs(2));
    d = Berthd::start(&a, port)?;
    let restarted_at = unix_now();
    let (_, after) = d.scrape()?;
    let (b, n) = (counters(&before), counters(&after));
    for (series, old) in &b {
        let new = n
            .get(series)
            .with_context(|| format!("{series} gone after restart"))?;
        ensure!(new >= old, "{series} went back: {old} -> {new}");
    }

    let (t0, t1) = sender.join().expect("sender thread")?;
    std::thread::sleep(Duration::from_secs(3));
    let at = t1 - 2.0;
    // The rate window lies inside the sending period, after the restart.
    ensure!(
        at - 10.0 > t0 && at - 10.0 > restarted_at,
        "window [{}, {at}] vs sending from {t0}, restart at {restarted_at}",
        at - 10.0
    );
    let rate = prom
        .value(
            r#"sum(rate(berth_network_transmit_bytes_total{ctid="103",family="ipv4"}[10s]))"#,
            Some(at),
        )?
        .with_context(|| format!("no rate; prometheus log:\n{}", prom.log()))?;
    let want = (PPS * FRAME) as f64;
    ensure!(
        (rate - want).abs() / want < 0.1,
        "per-CT transmit rate {rate:.0} B/s, sent {want:.0} B/s"
    );
    let pps = prom
        .value(
            r#"sum(rate(container_network_transmit_packets_total{ctid="103",name="talker"}[10s]))"#,
            Some(at),
        )?
        .context("no packet rate")?;
    ensure!(
        (pps - PPS as f64).abs() / (PPS as f64) < 0.1,
        "packet rate {pps:.0}/s, sent {PPS}/s"
    );
    let resets = prom.value(
        r#"sum(resets(berth_network_transmit_bytes_total{ctid="103"}[2m]))"#,
        None,
    )?;
    ensure!(
        resets == Some(0.0),
        "counter resets across the restart: {resets:?}"
    );
    let gap = prom.value(r#"min_over_time(up{job="berthd"}[2m])"#, None)?;
    ensure!(
        gap == Some(0.0),
        "the restart should show as a failed scrape: {gap:?}"
    );
    let mem = prom.value(
        r#"container_memory_usage_bytes{ctid="103",name="talker"}"#,
        None,
    )?;
    ensure!(
        mem.is_some_and(|m| m > 0.0),
        "cgroup series of CT 103: {mem:?}"
    );
    let cpu = prom.value(r#"container_cpu_usage_seconds_total{ctid="103"}"#, None)?;
    ensure!(cpu.is_some(), "cpu series of CT 103");
    let running = prom.value(r#"berth_container_state{ctid="103",state="running"}"#, None)?;
    ensure!(running == Some(1.0));

    let prom_dir = prom.dir.path().to_owned();
    drop(prom);
    ensure!(!prom_dir.exists(), "{} left", prom_dir.display());
    drop(d);
    drop(pair);
    let pin_path = pin.path.clone();
    drop(pin);
    ensure!(!pin_path.exists(), "{} left", pin_path.display());
    h.ok(&["stop", "--fast", "103"]);
    h.ok(&["destroy", "103"]);
    h.assert_clean();
    Ok(())
}
