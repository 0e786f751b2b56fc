//! `bench testbed`: issue 15's bars. `up` and `down` of 2 routed + 2 bridged berth CTs with
//! berthd (bars ≤ 1 s and ≤ 0.5 s), against the same shape built of plain namespaces (the
//! control: what the testbed itself costs without berth); then 8 concurrent `berth testbed
//! run`s of one topology against a single run (bar: all pass, wall time ≤ 3×).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_testbed::{Options, Testbed};
use clap::Args;

use crate::stats::{ms, summarize};

mod impair;

#[derive(Args)]
pub struct TestbedArgs {
    /// Measured up/down cycles of each topology (after one warm-up).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Concurrent runs in the parallel part.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..))]
    parallel: u64,
    /// Only the impairment bars (delay RTT, exact loss with accounting).
    #[arg(long)]
    impair_only: bool,
    /// Also the impairment bars after the others.
    #[arg(long)]
    impair: bool,
}

const PREAMBLE: &str = r#"
[uplink]
prefixes = ["198.51.100.0/24", "2001:db8:2::/64"]
[[bridge]]
name = "br0"
addrs = ["198.51.100.1/24", "2001:db8:2::1/64"]
"#;

/// 2 routed + 2 bridged nodes of `kind`, a ping from each to the uplink.
fn topology(kind: &str) -> String {
    let mut t = String::new();
    if kind == "ct" {
        t.push_str("berthd = true\n");
    }
    t.push_str(PREAMBLE);
    for (i, name) in ["r1", "r2"].iter().enumerate() {
        let ctid = if kind == "ct" {
            format!("ctid = {}\n", 101 + i)
        } else {
            String::new()
        };
        t.push_str(&format!(
            "[[node]]\nname = \"{name}\"\nkind = \"{kind}\"\n{ctid}addrs = [\"192.0.2.{n}\", \"2001:db8:1::{n}\"]\n",
            n = 101 + i
        ));
    }
    for (i, name) in ["b1", "b2"].iter().enumerate() {
        let ctid = if kind == "ct" {
            format!("ctid = {}\n", 201 + i)
        } else {
            String::new()
        };
        t.push_str(&format!(
            "[[node]]\nname = \"{name}\"\nkind = \"{kind}\"\nmode = \"bridged\"\nbridge = \"br0\"\n{ctid}addrs = [\"198.51.100.{n}/24\", \"2001:db8:2::{n}/64\"]\n",
            n = 21 + i
        ));
    }
    for name in ["r1", "r2", "b1", "b2"] {
        t.push_str(&format!(
            "[[check]]\nkind = \"ping\"\nfrom = \"{name}\"\nto = \"uplink\"\n"
        ));
    }
    t
}

pub fn run(a: &TestbedArgs) -> Result<()> {
    crate::require_root("testbed", "namespaces, cgroups, mounts")?;
    let bin = berth_tests::ct::bin_dir().join("berth");
    if !bin.exists() {
        bail!(
            "{} missing: `cargo xtask bench testbed` builds it",
            bin.display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("berth-bench-testbed-")
        .tempdir()?;
    let opts = Options {
        berth_bin: bin.clone(),
        state_dir: dir.path().join("state"),
        rootless: false,
    };
    if a.impair_only {
        return impair::run(&opts, dir.path(), a.rounds);
    }
    let mut up_down = Vec::new();
    for kind in ["ct", "netns"] {
        let file = dir.path().join(format!("{kind}.toml"));
        std::fs::write(&file, topology(kind))?;
        let (up, down) = cycles(&file, &opts, a.rounds as usize)?;
        up_down.push((kind, up, down));
    }
    println!(
        "testbed up/down, 2 routed + 2 bridged nodes ({} rounds):",
        a.rounds
    );
    for (kind, up, down) in &up_down {
        let (u, d) = (summarize(up.clone()), summarize(down.clone()));
        println!(
            "  {kind:5}: up p50 {:7.1} ms (min {:.1}, max {:.1})   down p50 {:6.1} ms (min {:.1}, max {:.1})",
            ms(u.p50),
            ms(u.min),
            ms(u.max),
            ms(d.p50),
            ms(d.min),
            ms(d.max)
        );
    }
    let (u, d) = (
        summarize(up_down[0].1.clone()).p50,
        summarize(up_down[0].2.clone()).p50,
    );
    println!(
        "  CTs with berthd: up {:.0} ms (bar 1000: {}), down {:.0} ms (bar 500: {}); the CTs cost {:.1}× the namespaces' up",
        ms(u),
        verdict(u <= Duration::from_secs(1)),
        ms(d),
        verdict(d <= Duration::from_millis(500)),
        ms(u) / ms(summarize(up_down[1].1.clone()).p50)
    );

    // Interleaved rounds, medians compared: one single run's luck (a neighbour answering late,
    // another process's burst on the shared CPUs) would otherwise decide the ratio.
    let file = dir.path().join("ct.toml");
    let (mut singles, mut manys) = (Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        singles.push(runs(&bin, &opts, &file, 1)?);
        manys.push(runs(&bin, &opts, &file, a.parallel as usize)?);
    }
    let (single, many) = (summarize(singles), summarize(manys));
    let ratio = many.p50.as_secs_f64() / single.p50.as_secs_f64();
    println!(
        "testbed run (up + 4 pings + down, CTs with berthd), {} rounds: single p50 {:.0} ms ({:.0}–{:.0}), {} concurrent p50 {:.0} ms wall ({:.0}–{:.0}): {ratio:.2}× (bar ≤ 3×: {})",
        a.rounds,
        ms(single.p50),
        ms(single.min),
        ms(single.max),
        a.parallel,
        ms(many.p50),
        ms(many.min),
        ms(many.max),
        verdict(ratio <= 3.0)
    );
    println!(
        "  load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    if a.impair {
        impair::run(&opts, dir.path(), a.rounds)?;
    }
    Ok(())
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Times `up` and `down` of `file`, one warm-up then `rounds`.
fn cycles(file: &Path, opts: &Options, rounds: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for i in 0..=rounds {
        let t = Instant::now();
        let tb = Testbed::up(file, opts).with_context(|| format!("up {}", file.display()))?;
        let u = t.elapsed();
        let t = Instant::now();
        tb.down().context("down")?;
        let d = t.elapsed();
        if i > 0 {
            up.push(u);
            down.push(d);
        }
    }
    Ok((up, down))
}

/// Wall time of `n` concurrent `berth testbed run`s of `file`; every one must pass.
fn runs(bin: &PathBuf, opts: &Options, file: &Path, n: usize) -> Result<Duration> {
    let t = Instant::now();
    let children = (0..n)
        .map(|_| {
            Command::new(bin)
                .args(["testbed", "run", "--json"])
                .arg(file)
                .env(berth_testbed::STATE_ENV, &opts.state_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawn berth testbed run")
        })
        .collect::<Result<Vec<_>>>()?;
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "a run did not pass ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(t.elapsed())
}
