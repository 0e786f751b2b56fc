//! Transfer quotas end to end: a routed CT's real traffic (iperf3 with the uplink) against a
//! quota of a few MB with notify thresholds; berthd's ledger ticks move it normal → throttled
//! (iperf3 goodput at the throttle rate, within the shaper's bars) → cut (the uplink dropped
//! with reason `quota`, class 0 still reachable) → normal at the next billing period (the test
//! clock of debug builds moved past the period's end, see `berth::clock`), and a webhook
//! receiver started here on 127.0.0.1 gets exactly one POST per event, across restarts of
//! berthd (SIGKILL and SIGTERM) in every state it reaches.
//! Run: `cargo test -p berth-tests --test quota_limits -- --test-threads=1`.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use berth::datapath::{DatapathView, DropReason};
use berth_tests::berthd::{http_get, parse_samples, value_of};
use berth_tests::billing::{Berthd, IperfServer, ct_netns, iperf_bidir};
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, wait_for};
use berth_tests::shaper::within;
use berth_tests::webhook::{Receiver, in_ns};
use serde_json::Value;

const CT: &str = "4380";
const CT_IP: &str = "192.0.2.180";
/// The host's own address on the uplink link: not in the class table, so class 0.
const HOST4: &str = "192.0.2.2";
const THROTTLE_BPS: f64 = 8e6;

fn scrape(ns: BorrowedFd<'_>, d: &Berthd) -> Result<Vec<berth_tests::berthd::Sample>> {
    let body = in_ns(ns, || Ok(http_get(d.addr, "/metrics", &[])?.body))?;
    parse_samples(&body)
}

fn quota_status(h: &TestHost) -> Value {
    h.json(&["quota", "status", CT])
}

/// Waits for berthd's stored state to be `state` and the enforcement it applied for it
/// `enforced` (stored right after the state), over at most a few ticks.
fn wait_state(h: &TestHost, state: &str, enforced: &str) -> Result<Value> {
    let mut last = Value::Null;
    let ok = wait_for(Duration::from_secs(40), || {
        last = quota_status(h);
        last["state"] == state && last["enforced"] == enforced
    });
    ensure!(ok, "quota state never became {state}: {last}");
    Ok(last)
}

fn wait_calls(r: &Receiver, n: usize) -> Result<()> {
    ensure!(
        wait_for(Duration::from_secs(15), || r.calls().len() >= n),
        "webhook got {:?}, expected {n} calls",
        r.events()
    );
    Ok(())
}

/// Moves about 1.5 MB per second through the CT in each direction (iperf3 --bidir at 12 Mbit/s).
fn traffic(topo: &Topology, secs: u32) -> Result<()> {
    let m = iperf_bidir(topo.uplink.fd(), CT_IP, PORT.with(|p| *p), secs, "12M")?;
    ensure!(
        m.to_server > 500_000 && m.from_server > 500_000,
        "iperf3 moved {m:?}"
    );
    Ok(())
}

thread_local! {
    static PORT: u16 = berth_tests::shaper::port();
}

/// TCP goodput (bit/s) from the uplink into the CT, or from the CT (`reverse`), for `secs`.
fn goodput(topo: &Topology, secs: u32, reverse: bool) -> Result<f64> {
    let port = PORT.with(|p| *p).to_string();
    let secs = secs.to_string();
    let mut args = vec!["-c", CT_IP, "-p", &port, "-t", &secs, "-J"];
    if reverse {
        args.push("-R");
    }
    let out = topo.uplink.run("iperf3", &args);
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3: {}", String::from_utf8_lossy(&out.stderr)))?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .with_context(|| format!("iperf3 result: {v}"))
}

fn pings(h: &TestHost, to: &str) -> bool {
    h.exec(CT, &["ping", "-c", "1", "-W", "1", to]).0 == 0
}

fn quota_drops(h: &TestHost) -> Result<u64> {
    let v = DatapathView::open_pinned(&h.bpffs)?.context("no datapath")?;
    Ok(v.drops()?
        .iter()
        .filter(|r| r.ctid == CT.parse::<u32>().unwrap_or(0) && r.reason == DropReason::Quota)
        .map(|r| r.packets)
        .sum())
}

#[test]
fn quota_states_webhooks_once_across_restarts() -> Result<()> {
    let clock = tempfile::NamedTempFile::new()?;
    // SAFETY: first thing in this test binary's only test: no other thread reads the
    // environment yet; every berth and berthd started below inherits it.
    unsafe { std::env::set_var("BERTH_TEST_CLOCK_FILE", clock.path()) };
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    // berth's default ledger path, which `set`'s usage check and `quota` read too.
    let ledger = h.root.join("billing.db");
    let classes = h.dir.path().join("networks_classes");
    // Class 1: the uplink (counted: the quota's default is every class but 0).
    std::fs::write(&classes, format!("1 {UPLINK4}/32\n"))?;
    h.ok(&["netclass", "load", classes.to_str().context("path")?]);
    let hook = Receiver::start(topo.host.fd())?;
    let url = format!("http://127.0.0.1:{}/hook", hook.port);

    h.ok(&["create", CT, "--ipadd", CT_IP]);
    // Bad input is refused, naming it, and changes nothing.
    for (args, why) in [
        (
            vec!["--quota-transfer", "4MB", "--quota-hard", "3MB"],
            "--quota-hard",
        ),
        (
            vec!["--quota-transfer", "4MB", "--quota-hard-action", "explode"],
            "--quota-hard-action \"explode\"",
        ),
        (
            vec!["--quota-transfer", "4MB", "--quota-count", "sum"],
            "--quota-count \"sum\"",
        ),
        (vec!["--quota-transfer", "4XB"], "--quota-transfer \"4XB\""),
        (
            vec!["--quota-transfer", "4MB", "--quota-webhook", "ftp://x/"],
            "--quota-webhook",
        ),
    ] {
        let mut a = vec!["set", CT];
        a.extend(args);
        a.push("--save");
        let e = h.fails(&a);
        ensure!(e.contains(why), "{a:?}: {e}");
    }
    ensure!(
        !std::fs::read_to_string(h.root.join(format!("conf/{CT}.toml")))?.contains("[quota]"),
        "a refused set wrote the quota"
    );
    h.ok(&[
        "set",
        CT,
        "--quota-transfer",
        "4MB",
        "--quota-count",
        "both",
        "--quota-throttle",
        "8mbit",
        "--quota-hard",
        "20MB",
        "--quota-hard-action",
        "cut",
        "--quota-notify",
        "50,100",
        "--quota-webhook",
        &url,
        "--save",
    ]);
    h.ok(&["start", CT]);
    ensure!(
        wait_for(Duration::from_secs(6), || {
            h.exec(CT, &["ping", "-c", "1", "-W", "2", UPLINK4]).0 == 0
        }),
        "CT {CT} cannot reach the uplink"
    );
    // Live only is no quota: berthd reads the saved config.
    let e = h.fails(&["set", CT, "--quota-transfer", "5MB"]);
    ensure!(e.contains("add --save"), "{e}");
    let mut d = Berthd::start_in(&h, &ledger, "10", Some(topo.host.fd()))?;
    d.wait_tick_end(0, Duration::from_secs(15))?;
    let st = wait_state(&h, "normal", "normal")?;
    ensure!(
        st["limit_bytes"] == 4_000_000 && st["hard_limit_bytes"] == 20_000_000,
        "{st}"
    );
    ensure!(st["enforced"] == "normal", "{st}");

    let port = PORT.with(|p| *p);
    let _server = IperfServer::in_netns(&ct_netns(&h, CT)?, port)?;
    // ~3 MB each way: over 4 MB counted both ways, under 9 MB.
    traffic(&topo, 2)?;
    let crossed = Instant::now();
    let st = wait_state(&h, "throttled", "throttle")?;
    // The crossing happened during the traffic; the state follows at the next tick.
    eprintln!(
        "throttled {:?} after the traffic ended (tick 10 s)",
        crossed.elapsed()
    );
    ensure!(
        crossed.elapsed() < Duration::from_secs(12),
        "state too late"
    );
    ensure!(st["enforced"] == "throttle", "{st}");
    let used = st["used_bytes"].as_u64().context("used")?;
    ensure!((4_000_000..20_000_000).contains(&used), "{st}");
    wait_calls(&hook, 3)?;
    ensure!(
        hook.events() == ["threshold_50", "threshold_100", "state_throttled"],
        "{:?}",
        hook.events()
    );
    let (key, body) = &hook.calls()[2];
    let uuid = st["uuid"].as_str().context("uuid")?;
    let period = st["period"].as_str().context("period")?;
    ensure!(*key == format!("{uuid}:{period}:state_throttled"), "{key}");
    ensure!(
        body["ct_uuid"] == uuid
            && body["ctid"] == 4380
            && body["period"] == period
            && body["used_bytes"].as_u64().is_some()
            && body["limit_bytes"] == 4_000_000,
        "{body}"
    );

    // status and list show berthd's evaluation.
    let status = h.status(CT);
    ensure!(
        status["quota"]["state"] == "throttled"
            && status["quota"]["used_bytes"]
                .as_u64()
                .is_some_and(|u| u >= used),
        "{status}"
    );
    let rows = h.list(&["-o", "ctid,quota.used,quota.limit,quota.state"]);
    let row = &rows[0]["quota"];
    ensure!(
        row["state"] == "throttled"
            && row["used_bytes"].as_u64().is_some_and(|u| u >= used)
            && row["limit_bytes"] == 4_000_000,
        "{rows:?}"
    );

    // A quota below what the CT used this period (the ledger's count) is refused.
    let e = h.fails(&["set", CT, "--quota-transfer", "2MB", "--save"]);
    ensure!(
        e.contains("--quota-transfer 2MB: below what CT 4380 already used in period"),
        "{e}"
    );
    ensure!(
        std::fs::read_to_string(h.root.join(format!("conf/{CT}.toml")))?
            .contains("transfer = \"4MB\""),
        "the refused set changed the config"
    );

    // SIGKILL in the throttled state: the state is kept, nothing is sent again.
    let since = st["since"].clone();
    d.kill()?;
    let mut d = Berthd::start_in(&h, &ledger, "10", Some(topo.host.fd()))?;
    d.wait_tick_end(1, Duration::from_secs(25))?;
    let st = quota_status(&h);
    ensure!(st["state"] == "throttled" && st["since"] == since, "{st}");
    std::thread::sleep(Duration::from_secs(2));
    ensure!(hook.calls().len() == 3, "{:?}", hook.events());
    let samples = scrape(topo.host.fd(), &d)?;
    let l = [("ctid", CT), ("uuid", uuid)];
    ensure!(
        value_of(&samples, "berth_quota_limit_bytes", &l) == Some(4e6),
        "limit gauge"
    );
    ensure!(
        value_of(
            &samples,
            "berth_quota_state",
            &[l[0], l[1], ("state", "throttled")]
        ) == Some(1.0)
            && value_of(
                &samples,
                "berth_quota_state",
                &[l[0], l[1], ("state", "normal")]
            ) == Some(0.0),
        "state gauge"
    );
    ensure!(
        value_of(&samples, "berth_quota_webhook_backlog", &[]) == Some(0.0),
        "backlog gauge"
    );

    // Throttled means the throttle rate on the wire, both ways (~4 MB each: under the hard
    // limit still).
    within(
        goodput(&topo, 4, false)?,
        THROTTLE_BPS,
        "throttled, into the CT",
    )?;
    within(
        goodput(&topo, 4, true)?,
        THROTTLE_BPS,
        "throttled, from the CT",
    )?;
    ensure!(
        quota_status(&h)["state"] == "throttled",
        "{}",
        quota_status(&h)
    );

    // Over the hard limit while the webhook answers 503: the event stays queued, retried,
    // reported in status and metrics, and delivered once the receiver is back.
    hook.failing.store(true, Ordering::SeqCst);
    let crossing = Instant::now();
    while quota_status(&h)["state"] != "cut" && crossing.elapsed() < Duration::from_secs(40) {
        // The cut may land during a run (which then fails): the state below is what counts.
        if let Err(e) = traffic(&topo, 2) {
            eprintln!("traffic while crossing the hard limit: {e:#}");
        }
    }
    let st = wait_state(&h, "cut", "cut")?;
    ensure!(st["enforced"] == "cut", "{st}");
    // Cut: the uplink (class 1) is dropped with reason `quota`; the node (class 0) answers.
    let before = quota_drops(&h)?;
    ensure!(!pings(&h, UPLINK4), "the uplink is reachable while cut");
    ensure!(quota_drops(&h)? > before, "no drop counted as quota");
    ensure!(pings(&h, HOST4), "class 0 is cut too");
    ensure!(
        wait_for(Duration::from_secs(10), || hook
            .refused
            .load(Ordering::SeqCst)
            >= 2),
        "no retry of the refused event: {} refused, {:?} delivered, {}",
        hook.refused.load(Ordering::SeqCst),
        hook.events(),
        quota_status(&h)
    );
    let st = quota_status(&h);
    ensure!(
        st["webhook_pending"] == 1
            && st["webhook_last_error"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("503")),
        "{st}"
    );
    let samples = scrape(topo.host.fd(), &d)?;
    ensure!(
        value_of(&samples, "berth_quota_webhook_failing", &[]) == Some(1.0)
            && value_of(&samples, "berth_quota_webhook_backlog", &[]) == Some(1.0),
        "outbox gauges while failing"
    );
    hook.failing.store(false, Ordering::SeqCst);
    wait_calls(&hook, 4)?;
    ensure!(hook.events()[3] == "state_cut", "{:?}", hook.events());
    // SIGTERM (a final tick) in the cut state, and back.
    d.sigterm()?;
    let mut d = Berthd::start_in(&h, &ledger, "10", Some(topo.host.fd()))?;
    d.wait_tick_end(1, Duration::from_secs(25))?;
    ensure!(quota_status(&h)["state"] == "cut", "{}", quota_status(&h));

    // The next billing period: the clock moved a minute past this period's end. The next tick
    // books in the new period, which starts from 0 used: normal, the cut lifted.
    let old = quota_status(&h);
    let end = old["period_end"].as_i64().context("period_end")?;
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    std::fs::write(clock.path(), (end - real + 60).to_string())?;
    let moved = Instant::now();
    let st = wait_state(&h, "normal", "normal")?;
    eprintln!("normal {:?} after the period rollover", moved.elapsed());
    ensure!(
        st["period"] != old["period"]
            && st["limit_bytes"] == 4_000_000
            && st["used_bytes"].as_u64().is_some_and(|u| u < 1_000_000),
        "not a fresh period: {st} (was {old}); is BERTH_BIN_DIR a debug build (the test clock)?"
    );
    ensure!(
        wait_for(Duration::from_secs(6), || pings(&h, UPLINK4)),
        "the uplink is still cut in the new period"
    );
    wait_calls(&hook, 5)?;
    let (key, body) = &hook.calls()[4];
    ensure!(
        *key == format!(
            "{uuid}:{}:state_normal",
            st["period"].as_str().unwrap_or("?")
        ) && body["period"] == st["period"],
        "{key} {body}"
    );
    // SIGKILL in the new period's normal state: nothing is sent again.
    d.kill()?;
    let mut d = Berthd::start_in(&h, &ledger, "10", Some(topo.host.fd()))?;
    d.wait_tick_end(1, Duration::from_secs(25))?;
    ensure!(
        quota_status(&h)["state"] == "normal",
        "{}",
        quota_status(&h)
    );

    // A top-up of 40 MB in the new period: the limit moves, the state stays normal.
    let t = h.json(&["quota", "topup", CT, "40MB"]);
    ensure!(
        t["topup_bytes"] == 40_000_000 && t["period"] == st["period"],
        "{t}"
    );
    ensure!(
        wait_for(Duration::from_secs(25), || quota_status(&h)["limit_bytes"]
            == 44_000_000),
        "{}",
        quota_status(&h)
    );
    d.sigterm()?;
    let d = Berthd::start_in(&h, &ledger, "10", Some(topo.host.fd()))?;
    d.wait_tick_end(1, Duration::from_secs(25))?;
    ensure!(
        quota_status(&h)["state"] == "normal",
        "{}",
        quota_status(&h)
    );
    std::thread::sleep(Duration::from_secs(2));
    let events = hook.events();
    ensure!(
        events
            == [
                "threshold_50",
                "threshold_100",
                "state_throttled",
                "state_cut",
                "state_normal"
            ],
        "{events:?}"
    );
    // Exactly one POST per key.
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for (k, _) in hook.calls() {
        *per_key.entry(k).or_default() += 1;
    }
    ensure!(per_key.values().all(|&n| n == 1), "{per_key:?}");
    eprintln!(
        "{} POSTs answered 503 and retried, {} events delivered once each",
        hook.refused.load(Ordering::SeqCst),
        per_key.len()
    );
    let st = quota_status(&h);
    ensure!(
        st["webhook_delivered"] == 5 && st["webhook_pending"] == 0,
        "{st}"
    );
    drop(d);
    h.ok(&["stop", "--fast", CT]);
    Ok(())
}
