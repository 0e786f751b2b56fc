//! `quota`: issue 14's bars for transfer quotas, on a routed CT with real iperf3 traffic and
//! the real berthd (release build) at its default 30 s ledger tick (`--tick N` for a quick run).
//!
//! (a) The quota action delay: from the end of the traffic that crossed the soft limit to the
//!     moment the throttle is in the kernel (an HTB class of the CT at the throttle rate, read
//!     with `tc class show` in the host netns every 50 ms); bar ≤ 1 tick. Also the lift after
//!     a top-up (from the `quota topup` command to the class gone), for information.
//! (b) 5 restarts of berthd (SIGKILL and SIGTERM alternately; in the throttled state, once
//!     with the events still pending because the receiver answered 503, and in the lifted
//!     state) with an HTTPS webhook receiver (a private CA, `--webhook-ca`) counting the POSTs
//!     it acknowledged per idempotency key; bar 0 duplicates.
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use berth_tests::billing::{Berthd, IperfServer, LogLine, ct_netns, iperf_bidir};
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, UPLINK4, wait_for};
use berth_tests::webhook::{Ca, Receiver};

use crate::stats::quantile;
use crate::{require_root, require_tool, verdict};

#[derive(clap::Args)]
pub struct QuotaArgs {
    /// berthd's ledger tick in seconds (its default is 30; 10–300).
    #[arg(long, default_value_t = 30)]
    tick: u64,
    /// Soft-limit crossings measured (a top-up lifts the throttle between two).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

const CT: &str = "4390";
const CT_IP: &str = "192.0.2.190";
/// The throttle, as `tc` prints it.
const THROTTLE: &str = "5mbit";
const THROTTLE_TC: &str = "rate 5Mbit";
const RESTARTS: usize = 5;

/// HTB classes at the throttle rate on the host netns' interfaces.
fn throttled_classes(topo: &Topology) -> Result<usize> {
    let links = topo.host.run("ip", &["-o", "link", "show"]);
    ensure!(links.status.success(), "ip link show failed");
    let mut n = 0;
    for l in String::from_utf8_lossy(&links.stdout).lines() {
        let Some(name) = l
            .split(':')
            .nth(1)
            .map(|s| s.trim().split('@').next().unwrap_or(""))
        else {
            continue;
        };
        if name.is_empty() || name == "lo" {
            continue;
        }
        let o = topo.host.run("tc", &["class", "show", "dev", name]);
        n += String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|c| c.contains(THROTTLE_TC))
            .count();
    }
    Ok(n)
}

/// Polls until `want(classes)` holds; the time it took.
fn wait_kernel(topo: &Topology, limit: Duration, want: impl Fn(usize) -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if want(throttled_classes(topo)?) {
            return Ok(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the kernel state did not change within {limit:?}")
}

/// What a restart of berthd needs.
struct Env<'a> {
    h: &'a TestHost,
    topo: &'a Topology,
    tick: String,
    ca: std::path::PathBuf,
}

impl Env<'_> {
    fn berthd(&self) -> Result<Berthd> {
        Berthd::start_with(
            self.h,
            &self.h.root.join("billing.db"),
            &self.tick,
            Some(self.topo.host.fd()),
            &[OsStr::new("--webhook-ca"), self.ca.as_os_str()],
        )
    }

    /// The `log.len()`-th restart: SIGKILL and SIGTERM alternately; the new berthd and the old
    /// one's stderr.
    fn restart(
        &self,
        d: &mut Berthd,
        log: &mut Vec<String>,
        state: &str,
    ) -> Result<(Berthd, Vec<LogLine>)> {
        let (kind, lines) = if log.len().is_multiple_of(2) {
            ("SIGKILL", d.kill()?)
        } else {
            ("SIGTERM", d.sigterm()?)
        };
        log.push(format!("{kind} while {state}"));
        Ok((self.berthd()?, lines))
    }
}

/// Where the crossing fell between berthd's ticks: its `quota tick` lines (written after the
/// evaluation and the enforcement) before and after the traffic's end, as offsets from it.
fn tick_offsets(lines: &[LogLine], ended: Instant) -> String {
    let ticks: Vec<Instant> = lines
        .iter()
        .filter(|l| l.text.contains(" quota tick "))
        .map(|l| l.at)
        .collect();
    let before = ticks.iter().rev().find(|&&t| t <= ended);
    let after = ticks.iter().find(|&&t| t > ended);
    match (before, after) {
        (Some(b), Some(a)) => format!(
            "quota ticks ended {:.1} s before and {:.1} s after the traffic's end ({:.1} s apart)",
            (ended - *b).as_secs_f64(),
            (*a - ended).as_secs_f64(),
            (*a - *b).as_secs_f64()
        ),
        (None, Some(a)) => format!(
            "next quota tick ended {:.1} s after the traffic's end",
            (*a - ended).as_secs_f64()
        ),
        _ => "no quota tick line around the crossing".into(),
    }
}

fn secs_list(v: &[Duration]) -> String {
    v.iter()
        .map(|d| format!("{:.1}", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run(a: &QuotaArgs) -> Result<()> {
    require_root("quota", "namespaces, CTs and the datapath")?;
    require_tool("iperf3", "apt-get install iperf3")?;
    require_tool("tc", "apt-get install iproute2")?;
    require_tool(
        "openssl",
        "apt-get install openssl (the receiver's private CA)",
    )?;
    ensure!(
        (10..=300).contains(&a.tick) && a.rounds >= 3,
        "--tick 10–300 and --rounds ≥ 3 (5 restarts)"
    );
    let tick = a.tick.to_string();
    let tick_d = Duration::from_secs(a.tick);
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    let classes = h.dir.path().join("networks_classes");
    std::fs::write(&classes, format!("1 {UPLINK4}/32\n"))?;
    h.ok(&["netclass", "load", classes.to_str().context("path")?]);
    let ca = Ca::new("berth bench panel CA")?;
    let hook = Receiver::start_tls(
        topo.host.fd(),
        &ca.issue(&["DNS:localhost", "IP:127.0.0.1"])?,
    )?;
    h.ok(&["create", CT, "--ipadd", CT_IP]);
    h.ok(&["start", CT]);
    ensure!(
        wait_for(Duration::from_secs(6), || {
            h.exec(CT, &["ping", "-c", "1", "-W", "2", UPLINK4]).0 == 0
        }),
        "CT {CT} cannot reach the uplink"
    );
    h.ok(&[
        "set",
        CT,
        "--quota-transfer",
        "4MB",
        "--quota-count",
        "both",
        "--quota-throttle",
        THROTTLE,
        "--quota-notify",
        "50,100",
        "--quota-webhook",
        &format!("https://localhost:{}/hook", hook.port),
        "--save",
    ]);
    let env = Env {
        h: &h,
        topo: &topo,
        tick: tick.clone(),
        ca: ca.pem_path(),
    };
    let mut d = env.berthd()?;
    d.wait_tick_end(0, tick_d + Duration::from_secs(15))?;
    let port = berth_tests::shaper::port();
    let _server = IperfServer::in_netns(&ct_netns(&h, CT)?, port)?;
    ensure!(
        throttled_classes(&topo)? == 0,
        "throttled before any traffic"
    );

    let (mut delays, mut lifts, mut restarts) = (Vec::new(), Vec::new(), Vec::new());
    let wait_limit = tick_d * 3 + Duration::from_secs(10);
    for round in 0..a.rounds as usize {
        // The first crossing's events meet a receiver answering 503: the restart after it
        // happens with them pending.
        hook.failing.store(round == 0, Ordering::SeqCst);
        // Right after a tick: the crossing is booked at the next one, after the traffic.
        d.wait_tick_end(d.tick_ends(), tick_d + Duration::from_secs(15))?;
        // ~3 MB each way at 12 Mbit/s for 2 s: over the limit (4 MB, then 2 MB above the use).
        let m = iperf_bidir(topo.uplink.fd(), CT_IP, port, 2, "12M")?;
        ensure!(
            m.to_server > 500_000 && m.from_server > 500_000,
            "iperf3 moved {m:?}"
        );
        let ended = Instant::now();
        let delay = wait_kernel(&topo, wait_limit, |n| n > 0).with_context(|| {
            format!(
                "round {round}: no throttle after iperf3 moved {m:?}; quota status {}",
                h.json(&["quota", "status", CT])
            )
        })?;
        delays.push(delay);
        eprintln!(
            "round {round}: throttle in the kernel {:.2} s after the traffic ended",
            delay.as_secs_f64()
        );
        if round == 0 {
            ensure!(
                wait_for(Duration::from_secs(10), || hook
                    .refused
                    .load(Ordering::SeqCst)
                    > 0),
                "no webhook attempt while throttled"
            );
        }
        if restarts.len() < RESTARTS {
            let state = if round == 0 {
                "throttled, events pending"
            } else {
                "throttled"
            };
            let (nd, lines) = env.restart(&mut d, &mut restarts, state)?;
            d = nd;
            eprintln!("round {round}: {}", tick_offsets(&lines, ended));
        }
        hook.failing.store(false, Ordering::SeqCst);
        if round + 1 == a.rounds as usize {
            break;
        }
        // Just enough to lift: the limit 2 MB above what was used, so the next round crosses.
        let st = h.json(&["quota", "status", CT]);
        let (used, limit) = (
            st["used_bytes"].as_u64().context("used_bytes")?,
            st["limit_bytes"].as_u64().context("limit_bytes")?,
        );
        let topup = (used + 2_000_000).saturating_sub(limit).max(1_000_000);
        let t0 = Instant::now();
        h.ok(&["quota", "topup", CT, &format!("{topup}B")]);
        let lift = wait_kernel(&topo, wait_limit, |n| n == 0).with_context(|| {
            format!(
                "round {round}: the top-up did not lift; quota status {}",
                h.json(&["quota", "status", CT])
            )
        })?;
        eprintln!("round {round}: topped up {topup} bytes (used {used}, limit {limit})");
        eprintln!(
            "round {round}: throttle lifted {:.2} s after the top-up ({:?} in total)",
            lift.as_secs_f64(),
            t0.elapsed()
        );
        lifts.push(lift);
        if restarts.len() < RESTARTS {
            d = env.restart(&mut d, &mut restarts, "lifted (warned)")?.0;
        }
    }
    // Every event delivered, then a little more for a late duplicate to show.
    let drained = wait_for(Duration::from_secs(30), || {
        h.json(&["quota", "status", CT])["webhook_pending"] == 0
    });
    std::thread::sleep(Duration::from_secs(3));
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for (k, _) in hook.calls() {
        *per_key.entry(k).or_default() += 1;
    }
    let dups: usize = per_key.values().map(|n| n - 1).sum();
    let st = h.json(&["quota", "status", CT]);
    d.sigterm()?;
    h.ok(&["stop", "--fast", CT]);

    let mut sorted = delays.clone();
    sorted.sort();
    let (p50, max) = (quantile(&sorted, 0.5), sorted[sorted.len() - 1]);
    let ratio = max.as_secs_f64() / tick_d.as_secs_f64();
    println!(
        "quota bench: tick {} s, {} crossings, throttle {THROTTLE}",
        a.tick,
        delays.len()
    );
    println!(
        "  (a) quota action delay (traffic end → HTB class at the throttle rate), s: {}",
        secs_list(&delays)
    );
    println!(
        "      min {:.1}  p50 {:.1}  max {:.1} s = {:.2} tick (bar ≤ 1 tick): {}",
        sorted[0].as_secs_f64(),
        p50.as_secs_f64(),
        max.as_secs_f64(),
        ratio,
        verdict(ratio <= 1.0)
    );
    if !lifts.is_empty() {
        let mut l = lifts.clone();
        l.sort();
        println!(
            "      lift after a top-up, s: {} (max {:.2} tick)",
            secs_list(&lifts),
            l[l.len() - 1].as_secs_f64() / tick_d.as_secs_f64()
        );
    }
    println!("  (b) {} restarts: {}", restarts.len(), restarts.join(", "));
    println!(
        "      webhook: {} keys, {} POSTs acknowledged, {} answered 503, duplicates {} (bar 0): {}",
        per_key.len(),
        per_key.values().sum::<usize>(),
        hook.refused.load(Ordering::SeqCst),
        dups,
        verdict(dups == 0 && drained && restarts.len() == RESTARTS && !per_key.is_empty())
    );
    println!("      events: {:?}", hook.events());
    ensure!(drained, "events still pending at the end: {st}");
    Ok(())
}
