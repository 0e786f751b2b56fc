//! Transfer quotas end to end: a routed CT's real traffic (iperf3 with the uplink) against a
//! quota of a few MB with notify thresholds; berthd's ledger ticks move it normal → throttled
//! → cut, a top-up back to warned, and a webhook receiver started here on 127.0.0.1 gets
//! exactly one POST per event, across a SIGKILL and a SIGTERM restart of berthd in a state.
//! (What each state enforces in the datapath is the enforcement's own test; here the state
//! berthd stored, and that it reached the enforcement call, are read from `quota status`.)
//! Run: `cargo test -p berth-tests --test quota_limits -- --test-threads=1`.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use berth_tests::berthd::{http_get, parse_samples, value_of};
use berth_tests::billing::{Berthd, IperfServer, ct_netns, iperf_bidir};
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, wait_for};
use berth_tests::webhook::{Receiver, in_ns};
use serde_json::Value;

const CT: &str = "4380";
const CT_IP: &str = "192.0.2.180";

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

#[test]
fn quota_states_webhooks_once_across_restarts() -> Result<()> {
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
        "50mbit",
        "--quota-hard",
        "9MB",
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
        st["limit_bytes"] == 4_000_000 && st["hard_limit_bytes"] == 9_000_000,
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
    ensure!((4_000_000..9_000_000).contains(&used), "{st}");
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
    let rows = h.json(&["list", "-o", "ctid,quota.used,quota.limit,quota.state"]);
    let row = &rows[0];
    ensure!(
        row["quota.state"] == "throttled"
            && row["quota.used"].as_u64().is_some_and(|u| u >= used)
            && row["quota.limit"] == 4_000_000,
        "{rows}"
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

    // Over the hard limit while the webhook answers 503: the event stays queued, retried,
    // reported in status and metrics, and delivered once the receiver is back.
    hook.failing.store(true, Ordering::SeqCst);
    traffic(&topo, 2)?;
    let st = wait_state(&h, "cut", "cut")?;
    ensure!(st["enforced"] == "cut", "{st}");
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
    let d = Berthd::start_in(&h, &ledger, "10", Some(topo.host.fd()))?;
    d.wait_tick_end(1, Duration::from_secs(25))?;
    ensure!(quota_status(&h)["state"] == "cut", "{}", quota_status(&h));

    // A top-up of 40 MB: the limits move, the CT (~12 MB) is back under its 50 % of 44 MB.
    let t = h.json(&["quota", "topup", CT, "40MB"]);
    ensure!(t["topup_bytes"] == 40_000_000, "{t}");
    let st = wait_state(&h, "normal", "normal")?;
    ensure!(
        st["limit_bytes"] == 44_000_000 && st["enforced"] == "normal",
        "{st}"
    );
    wait_calls(&hook, 5)?;
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
