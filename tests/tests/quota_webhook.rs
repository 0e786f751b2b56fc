//! HTTPS quota webhooks end to end: a routed CT's real traffic crosses a quota of a few MB,
//! berthd (with `--webhook-ca` of a private CA made here) posts the events over TLS and
//! checks the certificate and the host name; every event goes to the CT's webhook as saved
//! at delivery time.
//!
//! - The webhook first points at the CT itself, where its root serves HTTPS with a certificate
//!   of a CA of its own making: it gets nothing, `quota status` and the metrics show the
//!   certificate error, the events stay pending.
//! - Then at a receiver of the trusted CA whose certificate is for another name: nothing either.
//! - Then at the right receiver: the pending events arrive there, over HTTPS, once each.
//! - An event pending (the receiver answering 503) when the webhook is removed is abandoned,
//!   visibly, and never sent.
//!
//! Run: `cargo test -p berth-tests --test quota_webhook -- --test-threads=1`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use berth_tests::berthd::{http_get, parse_samples, value_of};
use berth_tests::billing::{Berthd, IperfServer, ct_netns, iperf_bidir};
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, wait_for};
use berth_tests::skip::skip;
use berth_tests::webhook::{Ca, Receiver, have_openssl, in_ns};
use serde_json::Value;

const CT: &str = "4381";
const CT_IP: &str = "192.0.2.181";

fn gauge(ns: BorrowedFd<'_>, d: &Berthd, name: &str) -> Result<Option<f64>> {
    let body = in_ns(ns, || Ok(http_get(d.addr, "/metrics", &[])?.body))?;
    Ok(value_of(&parse_samples(&body)?, name, &[]))
}

fn quota_status(h: &TestHost) -> Value {
    h.json(&["quota", "status", CT])
}

fn wait_status(h: &TestHost, what: &str, mut ok: impl FnMut(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    let done = wait_for(Duration::from_secs(25), || {
        last = quota_status(h);
        ok(&last)
    });
    ensure!(done, "{what}: {last}");
    Ok(last)
}

fn last_error(st: &Value) -> String {
    st["webhook_last_error"]["error"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn set_webhook(h: &TestHost, url: &str) {
    h.ok(&["set", CT, "--quota-webhook", url, "--save"]);
}

/// About 1.5 MB per second through the CT in each direction.
fn traffic(topo: &Topology, port: u16, secs: u32) -> Result<()> {
    let m = iperf_bidir(topo.uplink.fd(), CT_IP, port, secs, "12M")?;
    ensure!(
        m.to_server > 500_000 && m.from_server > 500_000,
        "iperf3 moved {m:?}"
    );
    Ok(())
}

#[test]
fn https_webhooks_verify_the_server_and_follow_the_saved_url() -> Result<()> {
    if !have_openssl() {
        skip(
            "quota_webhook",
            "no openssl command to make the test's private CAs",
        );
        return Ok(());
    }
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let ledger = h.root.join("billing.db");
    let classes = h.dir.path().join("networks_classes");
    std::fs::write(&classes, format!("1 {UPLINK4}/32\n"))?;
    h.ok(&["netclass", "load", classes.to_str().context("path")?]);

    let panel_ca = Ca::new("berth test panel CA")?;
    let ct_ca = Ca::new("a CA the CT made")?;
    let good = Receiver::start_tls(
        topo.host.fd(),
        &panel_ca.issue(&["DNS:localhost", "IP:127.0.0.1"])?,
    )?;
    let misnamed = Receiver::start_tls(topo.host.fd(), &panel_ca.issue(&["DNS:panel.invalid"])?)?;

    // A CA file that is not one stops berthd at start, naming it.
    let bad_ca = h.dir.path().join("not-a-ca.pem");
    std::fs::write(&bad_ca, "hello\n")?;
    let e = Berthd::start_with(
        &h,
        &ledger,
        "10",
        Some(topo.host.fd()),
        &[OsStr::new("--webhook-ca"), bad_ca.as_os_str()],
    )
    .err()
    .context("berthd started with a bad --webhook-ca")?;
    ensure!(format!("{e:#}").contains("not-a-ca.pem"), "{e:#}");

    h.ok(&["create", CT, "--ipadd", CT_IP]);
    h.ok(&["start", CT]);
    ensure!(
        wait_for(Duration::from_secs(6), || {
            h.exec(CT, &["ping", "-c", "1", "-W", "2", UPLINK4]).0 == 0
        }),
        "CT {CT} cannot reach the uplink"
    );
    // The CT's root serves HTTPS on its own address with a certificate for that address from
    // its own CA (what an attacker answering in the panel's place would have).
    let ct_ns = std::fs::File::open(ct_netns(&h, CT)?)?;
    let impostor = Receiver::start_on(
        ct_ns.as_fd(),
        CT_IP,
        Some(&ct_ca.issue(&[&format!("IP:{CT_IP}"), "DNS:localhost"])?),
    )?;
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
        &format!("https://{CT_IP}:{}/hook", impostor.port),
        "--save",
    ]);
    let ca = panel_ca.pem_path();
    let mut d = Berthd::start_with(
        &h,
        &ledger,
        "10",
        Some(topo.host.fd()),
        &[OsStr::new("--webhook-ca"), ca.as_os_str()],
    )?;
    d.wait_tick_end(0, Duration::from_secs(15))?;

    let port = berth_tests::shaper::port();
    let _server = IperfServer::in_netns(&ct_netns(&h, CT)?, port)?;
    // ~3 MB each way: over 4 MB counted both ways (throttled), under 9 MB.
    traffic(&topo, port, 2)?;
    let st = wait_status(&h, "untrusted certificate never reported", |s| {
        s["state"] == "throttled" && last_error(s).contains("certificate verify failed")
    })?;
    ensure!(st["webhook_pending"] == 3, "{st}");
    ensure!(
        wait_for(Duration::from_secs(10), || impostor.handshake_failures()
            >= 2),
        "berthd never retried the untrusted webhook"
    );
    ensure!(
        impostor.calls().is_empty(),
        "the CT got {:?}",
        impostor.events()
    );
    ensure!(
        wait_for(Duration::from_secs(5), || {
            gauge(topo.host.fd(), &d, "berth_quota_webhook_failing").ok() == Some(Some(3.0))
        }),
        "berth_quota_webhook_failing is not 3"
    );
    eprintln!("untrusted: {}", last_error(&st));

    // The trusted CA, the wrong name: refused on the host-name check.
    set_webhook(&h, &format!("https://localhost:{}/hook", misnamed.port));
    let st = wait_status(&h, "wrong-name certificate never reported", |s| {
        last_error(s).contains("hostname mismatch") && last_error(s).contains("localhost")
    })?;
    eprintln!("wrong name: {}", last_error(&st));
    ensure!(
        misnamed.calls().is_empty() && misnamed.handshake_failures() >= 1,
        "{:?}",
        misnamed.events()
    );

    // The right receiver: the three pending events arrive, each once.
    set_webhook(&h, &format!("https://localhost:{}/hook", good.port));
    ensure!(
        wait_for(Duration::from_secs(10), || good.calls().len() >= 3),
        "the fixed webhook got {:?}: {}",
        good.events(),
        quota_status(&h)
    );
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        good.events() == ["threshold_50", "threshold_100", "state_throttled"],
        "{:?}",
        good.events()
    );
    let uuid = st["uuid"].as_str().context("uuid")?.to_string();
    ensure!(
        good.calls()[2].0
            == format!(
                "{uuid}:{}:state_throttled",
                st["period"].as_str().unwrap_or("?")
            ),
        "{:?}",
        good.calls()
    );
    let st = quota_status(&h);
    ensure!(
        st["webhook_delivered"] == 3 && st["webhook_pending"] == 0 && st["webhook_abandoned"] == 0,
        "{st}"
    );
    ensure!(
        wait_for(Duration::from_secs(5), || {
            gauge(topo.host.fd(), &d, "berth_quota_webhook_failing").ok() == Some(Some(0.0))
        }),
        "berth_quota_webhook_failing stayed up"
    );
    ensure!(impostor.calls().is_empty() && misnamed.calls().is_empty());

    // Over the hard limit while the receiver answers 503: state_cut stays pending; then the
    // webhook is removed: the event is abandoned with the reason, never sent.
    good.failing.store(true, Ordering::SeqCst);
    // Right after a tick: the cut lands at the next one, after iperf3 finished (a cut in the
    // middle of its run would leave it waiting for its results forever).
    d.wait_tick_end(d.tick_ends(), Duration::from_secs(15))?;
    traffic(&topo, port, 2)?;
    let st = wait_status(&h, "state_cut never pending", |s| {
        s["state"] == "cut" && s["webhook_pending"] == 1 && last_error(s).contains("503")
    })?;
    ensure!(good.refused.load(Ordering::SeqCst) >= 1, "{st}");
    set_webhook(&h, "none");
    let st = wait_status(&h, "the event was never abandoned", |s| {
        s["webhook_abandoned"] == 1
    })?;
    ensure!(
        st["webhook_pending"] == 0
            && st["webhook_delivered"] == 3
            && st["webhook_last_abandoned"]["key"]
                == format!("{uuid}:{}:state_cut", st["period"].as_str().unwrap_or("?"))
            && st["webhook_last_abandoned"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no quota webhook")),
        "{st}"
    );
    let human = h.ok(&["quota", "status", CT]);
    ensure!(human.contains("1 abandoned"), "{human}");
    good.failing.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(3));
    ensure!(good.calls().len() == 3, "{:?}", good.events());
    ensure!(
        gauge(topo.host.fd(), &d, "berth_quota_webhook_backlog")? == Some(0.0)
            && gauge(topo.host.fd(), &d, "berth_quota_webhook_failing")? == Some(0.0),
        "outbox gauges after the abandon"
    );
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for (k, _) in good.calls() {
        *per_key.entry(k).or_default() += 1;
    }
    ensure!(per_key.values().all(|&n| n == 1), "{per_key:?}");
    d.sigterm()?;
    h.ok(&["stop", "--fast", CT]);
    Ok(())
}
