//! The soak (`cargo xtask soak --minutes N [--cts N]`): random lifecycle operations (create,
//! start, stop, restart, live and saved set, destroy, list, netstat) and traffic on a pool of
//! routed CTs, while berthd ticks into its ledger and is killed (SIGKILL or SIGTERM) and
//! restarted at random. Every command's result is checked against the model of what should
//! be; at the end the ledger equals the kernel's counters for every CT that ever lived (those
//! destroyed on the way by the bytes they had when they went), and nothing is left in the host
//! netns, the cgroups or the mounts. Not in the test command: it runs for minutes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use berth_tests::billing::{Berthd, Rng, kernel_bytes, ledger_report};
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, assert_same};

const FIRST_CT: u32 = 6100;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Ct {
    exists: bool,
    running: bool,
    uuid: Option<String>,
}

#[derive(Default, Debug)]
struct Tally {
    ops: BTreeMap<&'static str, u32>,
    pings_ok: u32,
    pings_failed: u32,
    berthd_kills: u32,
    berthd_terms: u32,
}

fn ip_of(i: usize) -> String {
    format!("192.0.2.{}", 100 + i)
}

fn ctid_of(i: usize) -> String {
    (FIRST_CT + i as u32).to_string()
}

#[test]
#[ignore = "soak: minutes long, run by `cargo xtask soak --minutes N`"]
fn soak() -> Result<()> {
    let minutes = env_u64("BERTH_SOAK_MINUTES", 1);
    let n_cts = env_u64("BERTH_SOAK_CTS", 50).clamp(1, 150) as usize;
    let topo = Topology::new();
    let before_net = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    let ledger = h.root.join("ledger/billing.db");
    let ledger_s = ledger.to_str().context("ledger path")?.to_owned();
    let d = Berthd::start(&h, &ledger, "10")?;
    d.wait_tick_end(0, Duration::from_secs(15))?;

    let mut rng = Rng::new("soak");
    let mut chaos_rng = Rng::new("soak berthd kills");
    let deadline = Instant::now() + Duration::from_secs(minutes * 60);
    let mut cts: Vec<Ct> = (0..n_cts).map(|_| Ct::default()).collect();
    // Bytes in/out of every destroyed CT, read from the kernel while it was stopped.
    let mut gone: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let tally = Mutex::new(Tally::default());
    let done = AtomicBool::new(false);

    let d = std::thread::scope(|s| -> Result<Berthd> {
        // berthd's life: killed or stopped at random times, restarted at once.
        let chaos = s.spawn(|| -> Result<Berthd> {
            let mut d = d;
            while !done.load(Ordering::Relaxed) {
                let wait = Duration::from_millis(3000 + chaos_rng.below(12_000));
                let until = Instant::now() + wait;
                while Instant::now() < until && !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if done.load(Ordering::Relaxed) {
                    break;
                }
                ensure!(d.alive(), "berthd died on its own");
                if chaos_rng.below(3) == 0 {
                    d.sigterm()?;
                    tally.lock().unwrap().berthd_terms += 1;
                } else {
                    d.kill()?;
                    tally.lock().unwrap().berthd_kills += 1;
                }
                d = Berthd::start(&h, &ledger, "10")?;
            }
            Ok(d)
        });

        let ops = (|| -> Result<()> {
            while Instant::now() < deadline {
                let i = rng.below(n_cts as u64) as usize;
                let id = ctid_of(i);
                let op = rng.below(10);
                if op == 9 {
                    let rows = h.list(&["-a"]);
                    let want = cts.iter().filter(|c| c.exists).count();
                    ensure!(
                        rows.len() == want,
                        "list shows {} CTs, {want} exist",
                        rows.len()
                    );
                    for r in &rows {
                        let ctid = r["ctid"].as_u64().context("ctid")? as u32;
                        let c = &cts[(ctid - FIRST_CT) as usize];
                        let status = if c.running { "running" } else { "stopped" };
                        ensure!(r["status"] == status, "CT {ctid}: {r} (model: {status})");
                    }
                    let _ = h.json(&["netstat"]);
                    *tally.lock().unwrap().ops.entry("list").or_default() += 1;
                    continue;
                }
                let c = &mut cts[i];
                let name = match (op, c.exists, c.running) {
                    (_, false, _) => {
                        h.ok(&["create", &id, "--ipadd", &ip_of(i)]);
                        c.exists = true;
                        c.uuid = h.status(&id)["uuid"].as_str().map(str::to_owned);
                        "create"
                    }
                    (0 | 1, true, false) => {
                        h.ok(&["start", &id]);
                        c.running = true;
                        // The start may have given an old CT its UUID.
                        c.uuid = h.status(&id)["uuid"].as_str().map(str::to_owned);
                        "start"
                    }
                    (2, true, true) => {
                        let fast = rng.below(2) == 0;
                        let mut a = vec!["stop", id.as_str()];
                        if fast {
                            a.push("--fast");
                        }
                        h.ok(&a);
                        c.running = false;
                        "stop"
                    }
                    (3, true, true) => {
                        h.ok(&["restart", &id]);
                        "restart"
                    }
                    (4, true, _) => {
                        let n = (64 + rng.below(512)).to_string();
                        let mut a = vec!["set", &id, "--numproc", &n];
                        if rng.below(2) == 0 || !c.running {
                            a.push("--save");
                        }
                        h.ok(&a);
                        let got = h.list_field(&id, "numproc.l");
                        ensure!(
                            got.as_u64() == n.parse().ok(),
                            "CT {id}: numproc {got} after set {n}"
                        );
                        "set"
                    }
                    (5..=7, true, true) => {
                        let (rc, _, _) = h.exec(
                            &id,
                            &[
                                "ping", "-c", "10", "-i", "0.01", "-s", "1200", "-W", "2", UPLINK4,
                            ],
                        );
                        let mut t = tally.lock().unwrap();
                        if rc == 0 {
                            t.pings_ok += 1;
                        } else {
                            t.pings_failed += 1;
                        }
                        "traffic"
                    }
                    (8, true, false) => {
                        let (i_b, o_b) = kernel_bytes(&h, &id);
                        if let Some(u) = c.uuid.take() {
                            let e = gone.entry(u).or_default();
                            e.0 += i_b;
                            e.1 += o_b;
                        }
                        h.ok(&["destroy", &id]);
                        c.exists = false;
                        "destroy"
                    }
                    _ => continue,
                };
                *tally.lock().unwrap().ops.entry(name).or_default() += 1;
            }
            Ok(())
        })();
        done.store(true, Ordering::Relaxed);
        let d = chaos.join().expect("chaos thread");
        ops?;
        d
    })?;
    let mut d = d;
    let t = tally.into_inner().unwrap();
    eprintln!("soak: {minutes} min, {n_cts} CTs: {t:?}");
    ensure!(t.pings_ok > 0, "no traffic went through: {t:?}");

    // The end: every CT stopped, its final bytes from the kernel, the last tick on SIGTERM.
    let mut want = gone;
    for (i, c) in cts.iter().enumerate() {
        if !c.exists {
            continue;
        }
        let id = ctid_of(i);
        if c.running {
            h.ok(&["stop", "--fast", &id]);
        }
        let (i_b, o_b) = kernel_bytes(&h, &id);
        if let Some(u) = &c.uuid {
            let e = want.entry(u.clone()).or_default();
            e.0 += i_b;
            e.1 += o_b;
        }
    }
    ensure!(d.alive(), "berthd died on its own");
    d.sigterm()?;
    let mut wrong = Vec::new();
    for (uuid, (k_in, k_out)) in &want {
        let o = h.run(&["billing", "--ledger", &ledger_s, "report", uuid, "--json"]);
        let (l_in, l_out) = if o.status.success() {
            let (_, i, o) = ledger_report(&h, &ledger_s, uuid)?;
            (i, o)
        } else {
            // A CT no tick saw (created and destroyed between two, or while berthd was down).
            let err = String::from_utf8_lossy(&o.stderr);
            ensure!(err.contains("is not registered"), "report {uuid}: {err}");
            (0, 0)
        };
        if (l_in, l_out) != (*k_in, *k_out) {
            wrong.push(format!(
                "{uuid}: ledger {l_in}/{l_out}, kernel {k_in}/{k_out}"
            ));
        }
    }
    eprintln!("soak: {} CT lives checked against the ledger", want.len());
    ensure!(wrong.is_empty(), "ledger != kernel:\n{}", wrong.join("\n"));

    for (i, c) in cts.iter().enumerate() {
        if c.exists {
            h.ok(&["destroy", &ctid_of(i)]);
        }
    }
    h.assert_clean();
    drop(h);
    assert_same(
        "host netns after the soak",
        &before_net,
        &topo.host.settled_snapshot(),
    );
    Ok(())
}
