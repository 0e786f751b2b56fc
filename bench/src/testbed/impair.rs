//! `bench testbed --impair-only`: issue 15's impairment bars on this kernel (no netem).
//! Delay: 20 ms each way on a namespace node's link, ping RTT median 40 ± 2 ms, against the
//! same topology without delay measured in the same run (the control: what the path costs
//! by itself). Loss: `loss_every = 100` on a berth CT, exactly 100 of 10,000 UDP datagrams
//! lost and the accounting check still balancing, `rounds` times.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth_testbed::{Options, Testbed};
use serde_json::Value;

use super::verdict;
use crate::stats::{ms, summarize};

fn delayed(delay: Option<&str>) -> String {
    let link = delay
        .map(|d| format!("link = {{ delay = \"{d}\" }}\n"))
        .unwrap_or_default();
    format!("[[node]]\nname = \"a\"\naddrs = [\"192.0.2.10\"]\n{link}")
}

const LOSSY: &str = r#"
[[node]]
name = "r1"
kind = "ct"
ctid = 101
addrs = ["192.0.2.101"]
link = { loss_every = 100 }
[[check]]
name = "loss"
kind = "loss"
node = "r1"
count = 10000
[[check]]
name = "accounting"
kind = "accounting"
node = "r1"
count = 50
"#;

/// RTTs of `count` pings from node `a` to the uplink.
fn rtts(tb: &Testbed, count: u32) -> Result<Vec<Duration>> {
    let out = tb
        .net_command(
            "a",
            &[
                "ping",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.02",
                "-W",
                "2",
                "192.0.2.1",
            ],
        )?
        .output()
        .context("ping")?;
    let v: Vec<Duration> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|m| Duration::from_secs_f64(m / 1e3))
        .collect();
    if v.len() < count as usize / 2 {
        bail!("ping: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(v)
}

pub fn run(opts: &Options, dir: &Path, rounds: u64) -> Result<()> {
    println!("testbed impairments (no netem on this kernel: eBPF loss, userspace delay line):");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("  load average: {}", load.trim());
    let mut medians = Vec::new();
    for (name, delay) in [("control", None), ("delay", Some("20ms"))] {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, delayed(delay))?;
        let tb = Testbed::up(&file, opts).with_context(|| format!("up {name}"))?;
        let mut all = Vec::new();
        let mut per_round = Vec::new();
        for _ in 0..rounds {
            let r = rtts(&tb, 100)?;
            per_round.push(summarize(r.clone()).p50);
            all.extend(r);
        }
        tb.down()?;
        let s = summarize(all);
        println!(
            "  {name:7}: ping RTT over {rounds}×100: median {:.2} ms (p90 {:.2}, min {:.2}, max {:.2}); round medians {}",
            ms(s.p50),
            ms(s.p90),
            ms(s.min),
            ms(s.max),
            per_round
                .iter()
                .map(|d| format!("{:.2}", ms(*d)))
                .collect::<Vec<_>>()
                .join(" ")
        );
        medians.push(s.p50);
    }
    let m = ms(medians[1]);
    println!(
        "  20 ms each way: RTT median {m:.2} ms, {:.2} ms over the control's {:.2} ms (bar 40 ± 2 ms: {})",
        m - ms(medians[0]),
        ms(medians[0]),
        verdict((38.0..=42.0).contains(&m))
    );

    let file = dir.join("lossy.toml");
    std::fs::write(&file, LOSSY)?;
    let mut exact = 0;
    for round in 1..=rounds {
        let out = Command::new(&opts.berth_bin)
            .args(["testbed", "run", "--json"])
            .arg(&file)
            .env(berth_testbed::STATE_ENV, &opts.state_dir)
            .stdin(Stdio::null())
            .output()
            .context("berth testbed run")?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "berth testbed run: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let c = |n: &str| {
            v["checks"]
                .as_array()
                .and_then(|a| a.iter().find(|c| c["name"] == n).cloned())
                .unwrap_or(Value::Null)
        };
        let (loss, acct) = (c("loss"), c("accounting"));
        let ok = loss["status"] == "pass"
            && acct["status"] == "pass"
            && loss["actual"]
                .as_str()
                .is_some_and(|a| a.starts_with("100 of 10000 lost"));
        exact += usize::from(ok);
        println!(
            "  loss_every = 100, round {round}: {} [{}]; accounting {} [{}]",
            loss["actual"].as_str().unwrap_or("-"),
            loss["status"].as_str().unwrap_or("-"),
            acct["actual"].as_str().unwrap_or("-"),
            acct["status"].as_str().unwrap_or("-")
        );
    }
    println!(
        "  exactly 100 of 10,000 lost with accounting matching: {exact}/{rounds} rounds (bar: all: {})",
        verdict(exact as u64 == rounds)
    );
    Ok(())
}
