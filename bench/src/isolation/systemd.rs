//! Part 3: a Debian 12 CT with systemd as init, unprivileged: `berth start` until `berth exec
//! <CT> -- systemctl is-system-running` prints `running` (polled), then a graceful `berth stop`.
//! Where this build cannot do that yet (no `--init` on `template build debian`, the template
//! does not build, init dies at start, systemd never answers), it prints "systemd: not
//! measurable: <reason>" and the rest of the benchmark stands.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Templates, UNPRIVILEGED, output, timed};
use crate::start::{Install, quiet};
use crate::stats::{ms, summarize};

const TEMPLATE: &str = "debian-systemd";
/// How long a boot may take before the benchmark gives up on it (the bar is 3 s).
const BOOT_LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

pub(super) fn run(inst: &Install, templates: &Templates<'_>, boots: usize) {
    println!("systemd: Debian 12 with systemd as init, unprivileged ({boots} boots)");
    if let Err(e) = measure(inst, templates, boots) {
        println!("systemd: not measurable: {e:#}");
    }
}

fn measure(inst: &Install, templates: &Templates<'_>, boots: usize) -> Result<()> {
    let help = output(&mut inst.cmd(&["template", "build", "debian", "--help"]))?;
    if !help.contains("--init") {
        bail!(
            "`berth template build debian` has no --init flag in this build (its Debian template boots sysvinit)"
        );
    }
    templates.provide(inst, TEMPLATE, &["--init", "systemd"])?;
    let mut to_running = Vec::with_capacity(boots);
    let mut start_cmd = Vec::with_capacity(boots);
    let mut stops = Vec::with_capacity(boots);
    for i in 0..boots {
        let ctid = (5000 + i).to_string();
        let mut create = vec!["create", &ctid, "--template", TEMPLATE];
        create.extend_from_slice(UNPRIVILEGED);
        quiet(&mut inst.cmd(&create))?;
        let res = boot(inst, &ctid);
        if res.is_err() {
            let _ = quiet(&mut inst.cmd(&["stop", "--fast", &ctid]));
        }
        let destroyed = quiet(&mut inst.cmd(&["destroy", &ctid]));
        let (start, running, stop) = res.with_context(|| format!("boot {} of CT {ctid}", i + 1))?;
        destroyed?;
        start_cmd.push(start);
        to_running.push(running);
        stops.push(stop);
    }
    let (s, r, t) = (
        summarize(start_cmd),
        summarize(to_running),
        summarize(stops),
    );
    println!(
        "  start → is-system-running = running: p50 {:.0} ms  (min {:.0}, max {:.0}); \
         `berth start` itself returned after p50 {:.0} ms; polled every {} ms via `berth exec`",
        ms(r.p50),
        ms(r.min),
        ms(r.max),
        ms(s.p50),
        POLL.as_millis()
    );
    println!(
        "  stop (graceful `berth stop`, the template's stop signal): p50 {:.0} ms  (min {:.0}, max {:.0})",
        ms(t.p50),
        ms(t.min),
        ms(t.max)
    );
    println!(
        "  bar: running <= 3 s: {}; stop <= 3 s: {}",
        crate::verdict(r.max <= Duration::from_secs(3)),
        crate::verdict(t.max <= Duration::from_secs(3))
    );
    Ok(())
}

/// start → running → stop of CT `ctid`: (start command, until running, stop command).
fn boot(inst: &Install, ctid: &str) -> Result<(Duration, Duration, Duration)> {
    let t0 = Instant::now();
    quiet(&mut inst.cmd(&["start", ctid])).context("berth start")?;
    let started = t0.elapsed();
    let running = loop {
        // is-system-running exits non-zero for every state but running; its stdout names it.
        let o = inst
            .cmd(&["exec", ctid, "--", "systemctl", "is-system-running"])
            .stdin(std::process::Stdio::null())
            .output()
            .context("spawn berth exec")?;
        let state = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        if state == "running" {
            break t0.elapsed();
        }
        // degraded is final: a unit failed, and systemd never goes back to running by itself.
        let over = state == "degraded" || t0.elapsed() > BOOT_LIMIT;
        let last = if state.is_empty() {
            String::from_utf8_lossy(&o.stderr).trim().to_owned()
        } else {
            state
        };
        if over {
            let failed = output(&mut inst.cmd(&[
                "exec",
                ctid,
                "--",
                "systemctl",
                "--failed",
                "--no-legend",
                "--plain",
            ]))
            .unwrap_or_default();
            bail!(
                "systemctl is-system-running did not say running (after {:.1} s, limit {} s; last: {last:?}; failed units: {:?})",
                t0.elapsed().as_secs_f64(),
                BOOT_LIMIT.as_secs(),
                failed.trim()
            );
        }
        std::thread::sleep(POLL);
    };
    let stop = timed(&mut inst.cmd(&["stop", ctid])).context("berth stop")?;
    Ok((started, running, stop))
}
