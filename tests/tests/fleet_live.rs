//! The fleet with a real node (issue 14): a berth root with a routed CT moving iperf3 traffic,
//! its berthd shipping live (`--ship-url`) into a private PostgreSQL next to a synthetic node's
//! ledger, the central bill equal to the node's own report to the byte; and the same berthd
//! scraped by Prometheus agents (`node` external labels) remote-writing to a receiving
//! Prometheus, where every query of the dashboard in dashboards/ runs and its key panels
//! answer per node.
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use berth_tests::berthd::{Prometheus, http_get, urlencode};
use berth_tests::billing::{Berthd, IperfServer, ct_netns, iperf_bidir};
use berth_tests::ct::TestHost;
use berth_tests::dashboard::{all_panels, dashboard_path, for_node_ct, variables};
use berth_tests::fleet::{
    SynthCt, bill_line, central_bill, central_totals, fill, total_lines, uuid,
};
use berth_tests::net::{Topology, UPLINK4, wait_for};
use berth_tests::pg::{self, Cluster};
use berth_tests::skip::skip;
use serde_json::Value;

const CT: &str = "4270";
const CT_IP: &str = "192.0.2.170";
const NODE: &str = "node-r";
/// A second agent's label for the same berthd: a second node whose CT has the same CTID, as
/// CTIDs are unique per node only.
const TWIN: &str = "node-r2";
const SYNTH: &str = "node-s";
const MAR1: i64 = 1_772_323_200; // 2026-03-01T00:00:00Z

/// Panels that must answer with the CT's series, each carrying the node label: the per-CT
/// rates, the billing row and the quota row.
const KEY_PANELS: [&str; 8] = [
    "Traffic by class and direction",
    "Packets by family",
    "Top talkers",
    "Billed this period",
    "95th percentile this period",
    "Billed bytes so far this period",
    "Quota used vs limits",
    "Quota state",
];

fn ship_cli(root: &Path, ledger: &Path, url: &str, node: &str) -> Result<Value> {
    let o = Command::new(berth_tests::ct::berth_bin())
        .arg("--root")
        .arg(root)
        .args(["--json", "billing", "--ledger"])
        .arg(ledger)
        .args(["ship", "--url", url, "--node", node, "--attempts", "2"])
        .stdin(Stdio::null())
        .output()?;
    let out = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.success(),
        "ship {node}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(out.lines().last().unwrap_or("")).with_context(|| out.to_string())
}

fn agent_config(
    node: &str,
    target: std::net::SocketAddr,
    receiver: std::net::SocketAddr,
) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  external_labels:\n    node: {node}\n\
         scrape_configs:\n  - job_name: berthd\n    static_configs:\n      - targets: ['{target}']\n\
         remote_write:\n  - url: http://{receiver}/api/v1/write\n    queue_config:\n      batch_send_deadline: 1s\n"
    )
}

/// The values the receiver holds for label `label` on series matching `selector` (what
/// Grafana's `label_values(selector, label)` asks).
fn label_values(p: &Prometheus, label: &str, selector: &str) -> Result<BTreeSet<String>> {
    let r = http_get(
        p.addr,
        &format!(
            "/api/v1/label/{label}/values?match[]={}",
            urlencode(selector)
        ),
        &[],
    )?;
    let v: Value = serde_json::from_str(&r.body).with_context(|| r.body.clone())?;
    ensure!(v["status"] == "success", "label values {label}: {}", r.body);
    Ok(v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

fn nodes_of(res: &[Value]) -> BTreeSet<String> {
    res.iter()
        .map(|s| s["metric"]["node"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Every query of every panel of the dashboard, its variables set to `node` and the CT, run
/// on the receiver: each must be valid, and the key panels must return the CT's series, all
/// of them labelled `node` (waiting up to `wait` for series a tick has not exported yet).
fn dashboard_on(receiver: &Prometheus, node: &str, wait: Duration) -> Result<usize> {
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(dashboard_path())?)?;
    let vars = variables(&dash);
    ensure!(
        vars.iter().any(|v| v == "node") && vars.iter().any(|v| v == "ctid"),
        "the dashboard's variables are {vars:?}: a central store needs a node variable"
    );
    let panels = all_panels(&dash)?;
    let mut keys_seen = BTreeSet::new();
    let mut queries = 0;
    for (row, p) in &panels {
        ensure!(!p.exprs.is_empty(), "panel {:?} has no query", p.title);
        let key = KEY_PANELS.iter().find(|k| p.title.starts_with(**k));
        for e in &p.exprs {
            ensure!(
                e.contains("$node"),
                "{row} / {}: {e} does not select the node",
                p.title
            );
            let q = for_node_ct(e, node, CT);
            ensure!(!q.contains('$'), "a variable left in {q}");
            // Valid or not, the first answer says (query() fails on an error status).
            let mut res = receiver
                .query(&q, None)
                .with_context(|| format!("{row} / {}", p.title))?;
            if key.is_some() {
                let t0 = Instant::now();
                while res.is_empty() && t0.elapsed() < wait {
                    std::thread::sleep(Duration::from_millis(500));
                    res = receiver.query(&q, None)?;
                }
                ensure!(
                    !res.is_empty(),
                    "{:?}: no series on the receiver for {q}",
                    p.title
                );
                for s in &res {
                    ensure!(
                        s["metric"]["node"] == node && s["metric"]["ctid"] == CT,
                        "{:?}: {q} gave {s} (want node {node}, CT {CT})",
                        p.title
                    );
                }
            }
            queries += 1;
        }
        if let Some(k) = key {
            keys_seen.insert(*k);
        }
    }
    ensure!(
        keys_seen.len() == KEY_PANELS.len(),
        "key panels found: {keys_seen:?} of {KEY_PANELS:?}"
    );
    Ok(queries)
}

#[test]
fn real_node_ships_live_and_the_dashboard_works_on_the_central_store() -> Result<()> {
    if pg::bin_dir().is_none() {
        skip(
            "fleet_live::real_node_ships_live_and_the_dashboard_works_on_the_central_store",
            "no PostgreSQL server in /usr/lib/postgresql (xtask/setup.sh installs `postgresql`)",
        );
        return Ok(());
    }
    let t_start = Instant::now();
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let tmp = tempfile::Builder::new()
        .prefix("berth-fleet-live-")
        .tempdir()?;
    let dir = tmp.path();
    let pgdir = dir.join("pg");
    std::fs::create_dir_all(&pgdir)?;
    let db = Cluster::start(&pgdir)?;
    let url = db.socket_url();

    // The synthetic node: March 2026, hourly readings, shipped by the CLI.
    let s_root = dir.join(SYNTH);
    std::fs::create_dir_all(&s_root)?;
    let s_ledger = s_root.join("billing.db");
    let synth: Vec<SynthCt> = (0..3)
        .map(|i| SynthCt {
            uuid: uuid(0x5e, i),
            ctid: 100 + i,
            tz: "UTC".into(),
            created: MAR1 - 86_400,
            from: MAR1 - 3600,
            to: MAR1 + 31 * 86_400 + 3600,
            destroy: false,
            classes: None,
        })
        .collect();
    let s_seq = fill(&s_ledger, &synth, SYNTH, |_| 3600)?;
    let s = ship_cli(&s_root, &s_ledger, &url, SYNTH)?;
    ensure!(s["acked_seq"] == s_seq, "synthetic node: {s}");

    // The real node: class 1 is the uplink (billed and counted by the quota).
    let ledger = h.root.join("billing.db");
    let classes = h.dir.path().join("networks_classes");
    std::fs::write(&classes, format!("1 {UPLINK4}/32\n"))?;
    h.ok(&["netclass", "load", classes.to_str().context("path")?]);
    let mut d = Berthd::start_with(
        &h,
        &ledger,
        "10",
        None,
        &["--ship-url", &url, "--node", NODE],
    )?;
    // The first tick books an empty node: the CT counts from 0 after it.
    d.wait_tick_end(0, Duration::from_secs(15))?;
    h.ok(&["create", CT, "--ipadd", CT_IP]);
    h.ok(&[
        "set",
        CT,
        "--quota-transfer",
        "50GB",
        "--quota-hard",
        "60GB",
        "--save",
    ]);
    h.ok(&["start", CT]);
    ensure!(
        wait_for(Duration::from_secs(6), || {
            h.exec(CT, &["ping", "-c", "1", "-W", "2", UPLINK4]).0 == 0
        }),
        "CT {CT} cannot reach the uplink"
    );
    let ct_uuid = h.status(CT)["uuid"].as_str().context("CT uuid")?.to_owned();

    let receiver = Prometheus::start_config(
        "global:\n  scrape_interval: 1s\n",
        &["--web.enable-remote-write-receiver"],
    )?;
    let _agent = Prometheus::start_config(
        &agent_config(NODE, d.addr, receiver.addr),
        &["--enable-feature=agent"],
    )?;
    let _twin = Prometheus::start_config(
        &agent_config(TWIN, d.addr, receiver.addr),
        &["--enable-feature=agent"],
    )?;

    // Both agents' first samples of the CT on the receiver before the traffic: its rates are
    // then the traffic's.
    let seen = || {
        receiver
            .query(
                &format!("berth_network_receive_bytes_total{{ctid=\"{CT}\"}}"),
                None,
            )
            .map(|r| nodes_of(&r).len() == 2)
            .unwrap_or(false)
    };
    ensure!(
        wait_for(Duration::from_secs(30), seen),
        "the receiver has no samples of CT {CT} from both agents"
    );
    let port = berth_tests::shaper::port();
    let server = IperfServer::in_netns(&ct_netns(&h, CT)?, port)?;
    let m = iperf_bidir(topo.uplink.fd(), CT_IP, port, 4, "20M")?;
    drop(server);
    ensure!(
        m.to_server > 2_000_000 && m.from_server > 2_000_000,
        "iperf3 moved {m:?}"
    );

    // All nodes: a panel keeps the nodes' CTs with the same CTID apart.
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(dashboard_path())?)?;
    let (_, traffic) = all_panels(&dash)?
        .into_iter()
        .find(|(_, p)| p.title.starts_with(KEY_PANELS[0]))
        .context("traffic panel")?;
    let q = for_node_ct(&traffic.exprs[0], ".*", CT);
    let both = BTreeSet::from([NODE.to_owned(), TWIN.to_owned()]);
    let mut res = Vec::new();
    wait_for(Duration::from_secs(15), || {
        res = receiver.query(&q, None).unwrap_or_default();
        nodes_of(&res) == both
            && res
                .iter()
                .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                .sum::<f64>()
                > 0.0
    });
    ensure!(nodes_of(&res) == both, "{q} with all nodes: {res:?}");
    // Each agent scrapes at its own instants: the two rates differ, both show the traffic.
    let rate = |node: &str| -> f64 {
        res.iter()
            .filter(|s| s["metric"]["node"] == node)
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    };
    ensure!(
        rate(NODE) > 0.0 && rate(TWIN) > 0.0,
        "receive rate per node: {res:?}"
    );

    // Shipped live: the CT's bytes reach the central database while berthd runs.
    let central_in = || -> i64 {
        db.psql(&format!(
            "SELECT coalesce(sum(bytes), 0) FROM berth_slot WHERE node = '{NODE}'
             AND ct_uuid = '{ct_uuid}' AND direction = 'in'"
        ))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
    };
    let t0 = Instant::now();
    while central_in() < m.to_server as i64 {
        ensure!(
            t0.elapsed() < Duration::from_secs(40),
            "berthd shipped {} B in of the CT's {} after {:?}",
            central_in(),
            m.to_server,
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "shipped live: {} B in after {:?}",
        central_in(),
        t0.elapsed()
    );

    // The dashboard on the central store, per node.
    let nodes = label_values(&receiver, "node", "berth_container_info")?;
    ensure!(
        nodes.contains(NODE) && nodes.contains(TWIN),
        "node variable's values: {nodes:?}"
    );
    let cts = label_values(
        &receiver,
        "ctid",
        &format!("berth_container_info{{node=~\"{NODE}\"}}"),
    )?;
    ensure!(cts.contains(CT), "ctid values on {NODE}: {cts:?}");
    let n = dashboard_on(&receiver, NODE, Duration::from_secs(30))?;
    eprintln!("dashboard: {n} queries valid on the receiver, key panels answer for {NODE}");
    // A final tick (SIGTERM), then what it booked shipped: central = the node's report.
    d.sigterm()?;
    let r = ship_cli(&h.root, &ledger, &url, NODE)?;
    ensure!(
        r["acked_seq"] == r["ledger_seq"],
        "after the final tick: {r}"
    );
    let ledger_s = ledger.to_str().context("ledger path")?;
    let mut matched = false;
    for _ in 0..3 {
        // The CT lives: its 95th counts slots up to now, on the node and in the view alike;
        // a slot boundary passing between the two reads shows as two different reports.
        let before = h.json(&["billing", "--ledger", ledger_s, "report", CT]);
        let bill = central_bill(&db, before["period"].as_str().context("period")?, &ct_uuid)?;
        let totals = central_totals(&db, before["period"].as_str().unwrap_or(""), &ct_uuid)?;
        let after = h.json(&["billing", "--ledger", ledger_s, "report", CT]);
        if before != after {
            continue;
        }
        ensure!(
            before["in_bytes"].as_u64() >= Some(m.to_server)
                && before["out_bytes"].as_u64() >= Some(m.from_server),
            "the node billed {}/{} for iperf3's {m:?}",
            before["in_bytes"],
            before["out_bytes"]
        );
        ensure!(
            bill == bill_line(&ct_uuid, &before),
            "real CT: central {bill} node {}",
            bill_line(&ct_uuid, &before)
        );
        ensure!(
            totals == total_lines(&ct_uuid, &before),
            "real CT totals: central {totals:?} node {:?}",
            total_lines(&ct_uuid, &before)
        );
        matched = true;
        break;
    }
    ensure!(matched, "the node's report kept changing");
    // The synthetic node beside it, unchanged by the real one.
    for c in &synth {
        let o = Command::new(berth_tests::ct::berth_bin())
            .arg("--root")
            .arg(&s_root)
            .args(["--json", "billing", "--ledger"])
            .arg(&s_ledger)
            .args(["report", &c.uuid, "--period", "2026-03"])
            .output()?;
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rep: Value = serde_json::from_slice(&o.stdout)?;
        ensure!(central_bill(&db, "2026-03", &c.uuid)? == bill_line(&c.uuid, &rep));
        ensure!(central_totals(&db, "2026-03", &c.uuid)? == total_lines(&c.uuid, &rep));
    }
    ensure!(
        db.psql("SELECT string_agg(node, ',' ORDER BY node) FROM berth_node")?
            == format!("{NODE},{SYNTH}")
    );
    h.ok(&["stop", "--fast", CT]);
    h.ok(&["destroy", CT]);
    eprintln!("fleet_live took {:?}", t_start.elapsed());
    Ok(())
}
