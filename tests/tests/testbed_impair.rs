//! berth testbed impairments (issue 15) on this kernel, which has no netem: loss by the
//! `berth_impair` classifier is exact (every Nth, or a seeded fraction that repeats), berth's
//! accounting still balances on a lossy CT link, and the userspace delay line gives the RTT it
//! was asked for while carrying ICMP, UDP and TCP (checksum-offloaded and GSO frames) intact.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use berth_testbed::{Options, Testbed};
use berth_tests::ct::berth_bin;
use serde_json::Value;

/// A routed CT losing every 100th IP packet each way, and a plain namespace losing a seeded 2%.
const LOSSY: &str = r#"
[uplink]
prefixes = ["198.51.100.0/24", "2001:db8:2::/64"]
[[node]]
name = "r1"
kind = "ct"
ctid = 101
addrs = ["192.0.2.101", "2001:db8:1::101"]
link = { loss_every = 100 }
[[node]]
name = "n1"
addrs = ["192.0.2.11"]
link = { loss = 0.02, seed = 42 }
[[check]]
name = "r1-loss"
kind = "loss"
node = "r1"
count = 10000
family = "4"
[[check]]
name = "r1-accounting"
kind = "accounting"
node = "r1"
count = 50
family = "4"
[[check]]
name = "n1-loss"
kind = "loss"
node = "n1"
count = 5000
[[check]]
name = "uplink-reaches-r1"
kind = "ping"
from = "uplink"
to = "r1"
"#;

/// 20 ms each way on `a`'s link, 5 ms ± 2 ms on `j`'s.
const DELAYED: &str = r#"
[uplink]
prefixes = ["198.51.100.0/24"]
[[node]]
name = "a"
addrs = ["192.0.2.10", "2001:db8:1::10"]
link = { delay = "20ms" }
[[node]]
name = "j"
addrs = ["192.0.2.12"]
link = { delay = "5ms", jitter = "2ms" }
[[check]]
kind = "ping"
from = "a"
to = "uplink"
[[check]]
kind = "ping"
from = "uplink"
to = "j"
"#;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(test: &str) -> Option<Env> {
        if !berth_tests::skip::require_tools(test, &["iperf3", "nsenter", "ping", "tc"]) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-testbed-impair-")
            .tempdir()
            .expect("tempdir");
        Some(Env { dir })
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write topology");
        p
    }

    fn options(&self) -> Options {
        Options {
            berth_bin: berth_bin(),
            state_dir: self.dir.path().join("state"),
            rootless: false,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(berth_bin())
            .arg("testbed")
            .args(args)
            .env("BERTH_TESTBED_STATE", self.dir.path().join("state"))
            .stdin(Stdio::null())
            .output()
            .expect("spawn berth testbed")
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn check<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {v:#}"))
}

#[test]
fn loss_is_exact_and_accounting_still_balances() {
    let Some(env) = Env::new("loss_is_exact_and_accounting_still_balances") else {
        return;
    };
    let file = env.file("lossy.toml", LOSSY);
    let tb = Testbed::up(&file, &env.options()).expect("up");
    let id = tb.handle.run_id.clone();
    let f = file.to_str().unwrap();
    let out = env.cli(&["check", f, "--run", &id, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    println!("{v:#}");
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    let r1 = check(&v, "r1-loss");
    assert!(
        r1["actual"]
            .as_str()
            .unwrap()
            .starts_with("100 of 10000 lost (100 dropped"),
        "{r1:#}"
    );
    // The seeded fraction: the same seed loses the same datagrams, near 2%.
    let n1 = check(&v, "n1-loss");
    let lost: u64 = n1["actual"]
        .as_str()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((50..=150).contains(&lost), "{n1:#}");
    assert_eq!(check(&v, "r1-accounting")["status"], "pass");

    // The fault: the classifier off the CT's own interface. The datagrams all arrive, the
    // loss check fails, and only it.
    let del = tb
        .net_command(
            "r1",
            &[
                "tc", "filter", "del", "dev", "venet0", "egress", "pref", "1",
            ],
        )
        .unwrap()
        .output()
        .expect("tc");
    assert!(del.status.success(), "{}", text(&del.stderr));
    let out = env.cli(&["check", f, "--run", &id, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("check --json");
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    for c in v["checks"].as_array().unwrap() {
        let want = if c["name"] == "r1-loss" {
            "fail"
        } else {
            "pass"
        };
        assert_eq!(c["status"], want, "{c:#}");
    }
    tb.down().expect("down");
}

/// Median RTT (ms) of `count` pings from `node` to `to`.
fn rtt_median(tb: &Testbed, node: &str, to: &str, count: u32) -> f64 {
    let out = tb
        .net_command(
            node,
            &[
                "ping",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.05",
                "-W",
                "2",
                to,
            ],
        )
        .unwrap()
        .output()
        .expect("ping");
    assert!(out.status.success(), "ping {to}: {}", text(&out.stdout));
    let mut rtts: Vec<f64> = text(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(rtts.len() as u32 >= count - 1, "{}", text(&out.stdout));
    rtts.sort_by(f64::total_cmp);
    rtts[rtts.len() / 2]
}

#[test]
fn a_20ms_delay_each_way_gives_a_40ms_rtt_and_carries_tcp() {
    let Some(env) = Env::new("a_20ms_delay_each_way_gives_a_40ms_rtt") else {
        return;
    };
    let file = env.file("delayed.toml", DELAYED);
    let tb = Testbed::up(&file, &env.options()).expect("up");
    let v4 = rtt_median(&tb, "a", "192.0.2.1", 40);
    let v6 = rtt_median(&tb, "a", "2001:db8:1::1", 20);
    let j = rtt_median(&tb, "uplink", "192.0.2.12", 40);
    println!("RTT medians: a v4 {v4:.2} ms, a v6 {v6:.2} ms, j (5 ms ± 2 ms each way) {j:.2} ms");
    assert!((38.0..=42.0).contains(&v4), "v4 RTT median {v4} ms");
    assert!((38.0..=42.0).contains(&v6), "v6 RTT median {v6} ms");
    assert!((8.0..=12.0).contains(&j), "jittered RTT median {j} ms");
    // The host's own stack has no delay: the testbed's host answers at once.
    let host = rtt_median(&tb, "uplink", "192.0.2.2", 10);
    assert!(host < 5.0, "uplink to host {host} ms");

    // TCP through the line: offloaded checksums and GSO frames must arrive valid.
    let server = tb
        .net_command(
            "uplink",
            &["iperf3", "-s", "-1", "-B", "192.0.2.1", "-p", "5210"],
        )
        .unwrap()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    let mut got = None;
    for _ in 0..20 {
        let out = tb
            .net_command(
                "a",
                &["iperf3", "-c", "192.0.2.1", "-p", "5210", "-t", "2", "-J"],
            )
            .unwrap()
            .output()
            .expect("iperf3 -c");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(b) = v["end"]["sum_received"]["bytes"].as_u64() {
            got = Some(b);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut server = server;
    let _ = server.kill();
    let _ = server.wait();
    let got = got.expect("iperf3 never connected through the delay line");
    println!("TCP through a 40 ms RTT delay line: {got} bytes in 2 s");
    assert!(got > 1_000_000, "only {got} bytes arrived");
    tb.down().expect("down");
}
