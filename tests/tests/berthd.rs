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
    Berthd, BerthdArgs, Prometheus, Sample, cpu_seconds, free_port, machine_busy_seconds,
    parse_samples, promtool, rss, unix_now, value_of,
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

// ---- benchmark: `cargo xtask bench metrics` ------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn env_or(k: &str, default: usize) -> Result<usize> {
    match std::env::var(k) {
        Ok(v) => v.parse().with_context(|| format!("{k}={v}")),
        Err(_) => Ok(default),
    }
}

/// 1000 synthetic CTs (configs, run states, cgroups with limits, counter slots and drop rows
/// in a private pinned datapath), berthd (from `BERTH_BIN_DIR`, release when run by xtask),
/// 200 sequential scrapes: client-side and collect times, RSS, series per CT.
///
/// The CTs count as running, as on a host in service: each has a run-state file naming a live
/// init (one `sleep` started here stands in for all of them; berthd only checks that it
/// lives), so berthd reads run states and freezer states as it would for real CTs. Their
/// cgroups hold no tasks.
#[test]
#[ignore = "benchmark: cargo xtask bench metrics"]
fn bench_metrics() -> Result<()> {
    use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
    use berth_common::{
        CounterValue, DIR_IN, DIR_OUT, DROP_SPOOFED_IP, DropKey, DropValue, SlotCounters,
        map_names, slot_row,
    };
    use berth_runtime::cgroups::{CgroupManager, Hierarchy, Resources};
    use berth_runtime::config::{CtConfig, Host};
    use berth_runtime::container::state::{self, RunState};

    let n = env_or("BERTH_BENCH_CTS", 1000)?;
    let scrapes = env_or("BERTH_BENCH_SCRAPES", 200)?;
    ensure!(
        n as u32 <= berth_common::capacity::SLOTS,
        "at most {} CTs",
        berth_common::capacity::SLOTS
    );
    let dir = tempfile::Builder::new()
        .prefix("berth-bench-metrics-")
        .tempdir()?;
    let parent = format!("berth-bench-metrics-{}", std::process::id());
    let host = Host::new(Some(dir.path().join("root")), None, Some(parent.clone()))?;
    host.ensure_dirs()?;
    let hierarchy = Hierarchy::detect()?;
    let ctids: Vec<u32> = (1..=n as u32).map(|i| 10_000 + i).collect();

    let t = Instant::now();
    let mut init = std::process::Command::new("sleep")
        .arg("infinity")
        .spawn()
        .context("spawning the stand-in init")?;
    let init_pid = init.id() as i32;
    // From JSON: optional fields keep their defaults whatever the struct gains.
    let run: RunState = serde_json::from_value(serde_json::json!({
        "init_pid": init_pid,
        "init_starttime": state::proc_starttime(init_pid).context("stand-in init start time")?,
        "monitor_pid": init_pid,
        "boot_id": state::boot_id().context("boot id")?,
        "started_at": unix_now() as u64,
        "mounted_by_start": false,
    }))?;
    let mut cgroups = Vec::new();
    let res = Resources {
        memory: Some("512M".parse()?),
        numproc: Some(4096),
        cpulimit: Some(50),
        ..Resources::default()
    };
    let result = (|| -> Result<()> {
        for &c in &ctids {
            let ctid = berth_runtime::Ctid::new(c)?;
            let mut cfg = CtConfig::new(ctid, "busybox".into());
            cfg.name = Some(format!("ct{c}"));
            cfg.hostname = Some(format!("ct{c}.example.com"));
            cfg.save(&host)?;
            run.write(&host.state_path(ctid))?;
            let cg = hierarchy.open(&parent, ctid)?;
            cg.create()?;
            cgroups.push(cg.clone());
            cg.apply(&res)?;
        }
        Ok(())
    })();
    let setup_cg = t.elapsed();
    let pin = PinDir::new();
    let outcome = result.and_then(|()| {
        Datapath::open_or_load(&pin.path)?;
        let maps = pin.path.join("maps");
        let nr_cpus = aya::util::nr_cpus().map_err(|(p, e)| anyhow::anyhow!("{p}: {e}"))?;
        let mut slots: Array<MapData, u32> =
            Array::try_from(aya::maps::Map::Array(MapData::from_pin(maps.join(map_names::SLOT_CTIDS))?))?;
        let mut counters: PerCpuArray<MapData, SlotCounters> = PerCpuArray::try_from(
            aya::maps::Map::PerCpuArray(MapData::from_pin(maps.join(map_names::COUNTERS))?),
        )?;
        let mut drops: PerCpuHashMap<MapData, DropKey, DropValue> = PerCpuHashMap::try_from(
            aya::maps::Map::PerCpuHashMap(MapData::from_pin(maps.join(map_names::DROPS))?),
        )?;
        for (slot, &c) in ctids.iter().enumerate() {
            let mut v = SlotCounters::default();
            // IPv4 and IPv6, both directions, class 0; IPv4 class 1 out.
            for (dir, fam, class) in [
                (DIR_IN, 1, 0),
                (DIR_OUT, 1, 0),
                (DIR_IN, 2, 0),
                (DIR_OUT, 2, 0),
                (DIR_OUT, 1, 1),
            ] {
                v.rows[slot_row(dir, fam, class)] = CounterValue {
                    bytes: 1_000_000 + u64::from(c),
                    packets: 1000 + u64::from(c),
                };
            }
            counters.set(slot as u32, PerCpuValues::try_from(vec![v; nr_cpus])?, 0)?;
            slots.set(slot as u32, c, 0)?;
            if c % 10 == 0 {
                let key = DropKey {
                    ctid: c,
                    dir: DIR_OUT,
                    reason: DROP_SPOOFED_IP,
                    _pad: [0; 2],
                };
                let val = DropValue {
                    packets: 3,
                    bytes: 300,
                };
                drops.insert(key, PerCpuValues::try_from(vec![val; nr_cpus])?, 0)?;
            }
        }

        let d = Berthd::start(
            &BerthdArgs {
                root: host.root.clone(),
                run_dir: None,
                cgroup_parent: parent.clone(),
                bpffs: pin.path.clone(),
            },
            0,
        )?;
        let (_, (rss_idle, _)) = ((), rss(d.pid())?);
        for _ in 0..3 {
            d.scrape()?;
        }
        let cpu_before = cpu_seconds(d.pid())?;
        let me_before = cpu_seconds(std::process::id())?;
        let busy_before = machine_busy_seconds()?;
        let t_scrapes = Instant::now();
        let mut client = Vec::with_capacity(scrapes);
        let mut collect = Vec::with_capacity(scrapes);
        let mut last = Vec::new();
        for _ in 0..scrapes {
            let t = Instant::now();
            let r = d.get("/metrics", &[])?;
            client.push(t.elapsed().as_secs_f64() * 1e3);
            ensure!(r.status == 200);
            let line = r
                .body
                .lines()
                .find(|l| l.starts_with("berth_exporter_collect_duration_seconds "))
                .context("no collect duration")?;
            collect.push(line.rsplit(' ').next().unwrap_or("0").parse::<f64>()? * 1e3);
            last = r.body.into_bytes();
        }
        // CPU time per scrape: what other work on the machine cannot inflate much.
        let berthd_cpu = cpu_seconds(d.pid())? - cpu_before;
        let cpu_ms = berthd_cpu * 1e3 / scrapes as f64;
        // Everything else that ran meanwhile (other builds and tests on a shared machine, and
        // kernel threads, some working for berthd: loopback TCP, cgroup pidlist cleanup), in
        // CPUs: berthd competes with it for the machine's two.
        let others = (machine_busy_seconds()? - busy_before)
            - berthd_cpu
            - (cpu_seconds(std::process::id())? - me_before);
        let others_cpus = (others / t_scrapes.elapsed().as_secs_f64()).max(0.0);
        let (rss_now, hwm) = rss(d.pid())?;
        let body = String::from_utf8(last)?;
        let samples = parse_samples(&body)?;
        let per_ct = samples.iter().filter(|s| s.label("ctid").is_some()).count() as f64 / n as f64;
        client.sort_by(f64::total_cmp);
        collect.sort_by(f64::total_cmp);
        let report = serde_json::json!({
            "cts": n,
            "scrapes": scrapes,
            "cgroup_setup_s": setup_cg.as_secs_f64(),
            "response_bytes": body.len(),
            "series_total": samples.len(),
            "series_per_ct": per_ct,
            "scrape_ms": {"p50": percentile(&client, 0.5), "p99": percentile(&client, 0.99), "max": client[client.len() - 1]},
            "collect_ms": {"p50": percentile(&collect, 0.5), "p99": percentile(&collect, 0.99)},
            "berthd_cpu_ms_per_scrape": cpu_ms,
            "other_work_cpus": others_cpus,
            "rss_mb": {"idle": rss_idle as f64 / 1048576.0, "after": rss_now as f64 / 1048576.0, "peak": hwm as f64 / 1048576.0},
        });
        println!("BENCH berthd metrics: {}", serde_json::to_string_pretty(&report)?);
        if let Ok(p) = std::env::var("BERTH_BENCH_JSON") {
            std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
        }
        ensure!(
            percentile(&client, 0.99) <= 50.0,
            "bar: /metrics p99 {:.1} ms > 50 ms",
            percentile(&client, 0.99)
        );
        ensure!(hwm <= 50 << 20, "bar: berthd peak RSS {} MB > 50 MB", hwm >> 20);
        ensure!(per_ct >= 30.0, "series per CT {per_ct}");
        d.kill()
    });

    let _ = init.kill();
    let _ = init.wait();
    for cg in &cgroups {
        cg.destroy()?;
    }
    hierarchy.remove_parent_if_empty(&parent)?;
    let left: Vec<PathBuf> = hierarchy
        .mount_roots()
        .iter()
        .map(|r| r.join(&parent))
        .filter(|p| p.exists())
        .collect();
    let pin_path = pin.path.clone();
    drop(pin);
    outcome?;
    ensure!(left.is_empty(), "cgroups left: {left:?}");
    ensure!(!pin_path.exists(), "{} left", pin_path.display());
    Ok(())
}
