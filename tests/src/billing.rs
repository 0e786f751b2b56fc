//! Helpers for the billing ledger's end-to-end tests: berthd with a ledger and its tick log,
//! the kernel's counters of a CT, a seeded random source, and iperf3 between a CT's network
//! namespace and the uplink's.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::berthd::berthd_bin;
use crate::ct::TestHost;

/// A line berthd wrote on stderr and when the test read it.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub at: Instant,
    pub text: String,
}

impl LogLine {
    /// The end of a tick: berthd's `billing tick` debug line (written after the commit and the
    /// gauges' read).
    pub fn is_tick_end(&self) -> bool {
        self.text.contains(" billing tick ") && self.text.contains("took=")
    }

    /// The tick's own duration (the commit, without the gauges), from `took=…`.
    pub fn tick_took(&self) -> Option<Duration> {
        let v = self.text.split("took=").nth(1)?.split_whitespace().next()?;
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?);
        let n: f64 = num.parse().ok()?;
        let secs = match unit {
            "s" => n,
            "ms" => n / 1e3,
            "µs" | "us" => n / 1e6,
            "ns" => n / 1e9,
            _ => return None,
        };
        Some(Duration::from_secs_f64(secs))
    }
}

/// berthd with a ledger, its address, when its listen line was read, and its stderr collected
/// (its warnings echoed to the test's stderr).
pub struct Berthd {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub listening: Instant,
    lines: Arc<Mutex<Vec<LogLine>>>,
    log: Option<JoinHandle<()>>,
}

impl Berthd {
    /// berthd of `h`, ticking every `tick` seconds into `ledger`, with its tick log at debug.
    pub fn start(h: &TestHost, ledger: &Path, tick: &str) -> Result<Berthd> {
        Berthd::start_in(h, ledger, tick, None)
    }

    /// [`Berthd::start`] inside the network namespace `netns` (where the CTs' host sides are:
    /// berthd's quota enforcement shapes and cuts there); its listen address is that
    /// namespace's.
    pub fn start_in(
        h: &TestHost,
        ledger: &Path,
        tick: &str,
        netns: Option<BorrowedFd<'_>>,
    ) -> Result<Berthd> {
        Self::start_with::<&str>(h, ledger, tick, netns, &[])
    }

    /// [`Berthd::start_in`] with more arguments (`--webhook-ca FILE`, `--ship-url URL`, …).
    pub fn start_with<S: AsRef<std::ffi::OsStr>>(
        h: &TestHost,
        ledger: &Path,
        tick: &str,
        netns: Option<BorrowedFd<'_>>,
        extra: &[S],
    ) -> Result<Berthd> {
        let filter =
            std::env::var("BERTHD_TEST_LOG").unwrap_or_else(|_| "warn,berthd=debug".into());
        let mut cmd = Command::new(berthd_bin());
        if let Some(ns) = netns {
            let fd = ns.as_raw_fd();
            // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0", "--tick", tick, "--root"])
            .arg(&h.root)
            .arg("--cgroup-parent")
            .arg(&h.cgroup_parent)
            .arg("--bpffs")
            .arg(&h.bpffs)
            .arg("--ledger")
            .arg(ledger)
            .args(extra)
            .env_remove("BERTH_ROOT")
            .env_remove("BERTH_RUN_DIR")
            .env_remove("BERTH_BPFFS")
            .env("BERTH_LOG", filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning berthd")?;
        let err = child.stderr.take().context("berthd stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let log = std::thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(text) = l else { break };
                if text.contains("WARN") || text.contains("ERROR") {
                    eprintln!("berthd: {text}");
                }
                let line = LogLine {
                    at: Instant::now(),
                    text,
                };
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("berthd stdout")?)
            .read_line(&mut line)
            .context("reading berthd's listen line")?;
        let listening = Instant::now();
        let mut d = Berthd {
            child: Some(child),
            addr: "127.0.0.1:1".parse()?,
            listening,
            lines,
            log: Some(log),
        };
        let Some(addr) = line
            .trim()
            .strip_prefix("berthd listening on http://")
            .and_then(|a| a.strip_suffix("/metrics"))
            .and_then(|a| a.parse().ok())
        else {
            let lines = d.kill()?;
            let text: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            bail!("berthd did not start: {line:?}\n{}", text.join("\n"));
        };
        d.addr = addr;
        Ok(d)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The lines berthd has written on stderr so far.
    pub fn lines(&self) -> Vec<LogLine> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether berthd is still running (not exited, whether reaped or not).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The ticks that have ended so far.
    pub fn tick_ends(&self) -> usize {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().filter(|l| l.is_tick_end()).count()
    }

    /// Waits until more than `after` ticks have ended (berthd's log read while it runs).
    pub fn wait_tick_end(&self, after: usize, timeout: Duration) -> Result<()> {
        ensure!(
            crate::net::wait_for(timeout, || self.tick_ends() > after),
            "berthd ended no tick after its tick {after} within {timeout:?}"
        );
        Ok(())
    }

    /// Its stderr to the end (berthd has exited).
    fn finish(&mut self) -> Result<Vec<LogLine>> {
        if let Some(j) = self.log.take() {
            j.join()
                .map_err(|_| anyhow::anyhow!("berthd log reader panicked"))?;
        }
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        Ok(std::mem::take(&mut *lines))
    }

    /// SIGKILL and reap; its stderr up to its death.
    pub fn kill(&mut self) -> Result<Vec<LogLine>> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("SIGKILL berthd")?;
            c.wait().context("reaping berthd")?;
        }
        self.finish()
    }

    /// SIGTERM (berthd's final tick) and a clean exit; its stderr.
    pub fn sigterm(&mut self) -> Result<Vec<LogLine>> {
        if let Some(mut c) = self.child.take() {
            let pid = libc::pid_t::try_from(c.id())?;
            // SAFETY: kill(2) on our own child's PID, which we have not reaped yet.
            ensure!(
                unsafe { libc::kill(pid, libc::SIGTERM) } == 0,
                "SIGTERM berthd"
            );
            let status = c.wait()?;
            ensure!(status.success(), "berthd exited with {status} on SIGTERM");
        }
        self.finish()
    }
}

impl Drop for Berthd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The CT's kernel counters (`berth netstat`), summed over classes and families.
pub fn kernel_bytes(h: &TestHost, ct: &str) -> (u64, u64) {
    let v = h.json(&["netstat", ct]);
    v.as_array()
        .expect("netstat rows")
        .iter()
        .fold((0, 0), |(i, o), r| {
            (
                i + r["in_bytes"].as_u64().expect("in_bytes"),
                o + r["out_bytes"].as_u64().expect("out_bytes"),
            )
        })
}

/// The ledger's report of `ct` (current period) and its bytes in and out.
pub fn ledger_report(h: &TestHost, ledger: &str, ct: &str) -> Result<(Value, u64, u64)> {
    let r = h.json(&["billing", "--ledger", ledger, "report", ct]);
    let i = r["in_bytes"].as_u64().context("in_bytes")?;
    let o = r["out_bytes"].as_u64().context("out_bytes")?;
    Ok((r, i, o))
}

/// A small xorshift: seeded from `BERTH_TEST_SEED` (to replay a run) or the clock, and the
/// seed printed, so a failing run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn new(what: &str) -> Rng {
        let seed = std::env::var("BERTH_TEST_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        eprintln!("{what} seed {seed} (BERTH_TEST_SEED={seed} replays it)");
        Rng(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The network namespace of a running CT, as seen from the host: its init's.
pub fn ct_netns(h: &TestHost, ct: &str) -> Result<PathBuf> {
    let st = h.status(ct);
    let pid = st["init_pid"]
        .as_u64()
        .with_context(|| format!("CT {ct} has no init pid: {st}"))?;
    Ok(PathBuf::from(format!("/proc/{pid}/ns/net")))
}

/// An iperf3 server (many tests in a row) inside a CT's network namespace, entered from the host
/// side: the CT's rootfs (busybox) has no iperf3, the host's binary runs in the CT's netns only.
pub struct IperfServer(Child);

impl IperfServer {
    pub fn in_netns(netns: &Path, port: u16) -> Result<IperfServer> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["iperf3", "-s", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning iperf3 -s in the CT's netns")?;
        let s = IperfServer(child);
        let listening = crate::net::wait_for(Duration::from_secs(5), || {
            Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["ss", "-Hltn", &format!("sport = :{port}")])
                .output()
                .is_ok_and(|o| !o.stdout.trim_ascii().is_empty())
        });
        ensure!(listening, "iperf3 server did not listen on {port}");
        Ok(s)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Bytes one iperf3 run moved each way, as its receivers counted them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Moved {
    pub to_server: u64,
    pub from_server: u64,
}

/// One TCP run of `secs` seconds in both directions at once (`--bidir`, each capped at `rate`),
/// the client in the namespace `client` against `server:port`. A server still closing the
/// previous run answers "busy" (iperf3 3.12 serves one test at a time): retried a few times.
pub fn iperf_bidir(
    client: BorrowedFd<'_>,
    server: &str,
    port: u16,
    secs: u32,
    rate: &str,
) -> Result<Moved> {
    let mut tries = 0;
    loop {
        tries += 1;
        match iperf_bidir_once(client, server, port, secs, rate) {
            // iperf3 3.12's server closes its listening socket after each test and opens a
            // new one (iperf_reset_test, then iperf_server_listen): a run that starts in that
            // window is refused, like one that finds the server busy.
            Err(e)
                if tries < 5 && {
                    let m = format!("{e:#}");
                    m.contains("busy") || m.contains("Connection refused")
                } =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

fn iperf_bidir_once(
    client: BorrowedFd<'_>,
    server: &str,
    port: u16,
    secs: u32,
    rate: &str,
) -> Result<Moved> {
    let fd = client.as_raw_fd();
    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", server, "-p", &port.to_string(), "--bidir", "-b", rate])
        .args(["-t", &secs.to_string(), "-J"])
        // A run the datapath cuts off (a quota cut) ends with an error instead of hanging.
        .args([
            "--connect-timeout",
            "3000",
            "--rcv-timeout",
            "5000",
            "--snd-timeout",
            "5000",
        ])
        .stdin(Stdio::null());
    // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().context("running iperf3 -c")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 JSON: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let b = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    Ok(Moved {
        to_server: b("/end/sum_received/bytes"),
        from_server: b("/end/sum_received_bidir_reverse/bytes"),
    })
}

/// The kernel's id of the pinned `COUNTERS` map under `bpffs`: a new id is a new map (ids are
/// not reused while a map lives), i.e. a new counter epoch.
pub fn counters_map_id(bpffs: &Path) -> Result<u32> {
    let path = bpffs.join("maps").join(berth_common::map_names::COUNTERS);
    let info = aya::maps::MapInfo::from_pin(&path)
        .with_context(|| format!("map info of {}", path.display()))?;
    Ok(info.id())
}

/// What a billing-row query's series should read, from the CLI's reports of the CT (`cli` in
/// mode max, `per_dir` in mode per-direction): period bytes filtered by the series' direction
/// and class labels (and a direction the query selects), or a 95th in bit/s (per direction, or
/// the billed max without one); negative for a query drawn below zero.
pub fn billing_row_expected(
    expr: &str,
    series: &Value,
    cli: &Value,
    per_dir: &Value,
) -> Result<f64> {
    let dir = series["direction"].as_str().or_else(|| {
        ["in", "out"]
            .into_iter()
            .find(|d| expr.contains(&format!("direction=\"{d}\"")))
    });
    let v = if expr.contains("berth_billing_period_bytes") {
        let class = series["class"].as_str();
        let mut sum = 0u64;
        for t in per_dir["totals"].as_array().context("totals")? {
            if dir.is_none_or(|d| t["direction"] == d)
                && class.is_none_or(|c| c.parse::<u64>().ok() == t["class"].as_u64())
            {
                sum += t["bytes"].as_u64().context("bytes")?;
            }
        }
        sum as f64
    } else if expr.contains("berth_billing_p95_bytes_per_second") {
        let v = match series["direction"].as_str() {
            Some(d) => per_dir["p95"][format!("{d}_bits_per_second")].as_u64(),
            None => cli["p95"]["bits_per_second"].as_u64(),
        };
        v.with_context(|| format!("no 95th for {series} in {cli}"))? as f64
    } else {
        bail!("not a billing query: {expr}");
    };
    Ok(if expr.trim_start().starts_with('-') {
        -v
    } else {
        v
    })
}

/// Runs every query of the dashboard's billing row for CT `ctid` against `prom` (which scrapes
/// berthd) and compares each series with the CLI's reports; every query must return a series
/// for the CT. Waits up to 30 s for the first scrape.
pub fn billing_row_answers(
    prom: &crate::berthd::Prometheus,
    ctid: &str,
    cli: &Value,
    per_dir: &Value,
) -> Result<usize> {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(crate::dashboard::dashboard_path())?)?;
    let panels = crate::dashboard::row_panels(&dash, "Billing")?;
    let mut checked = 0;
    for p in &panels {
        ensure!(!p.exprs.is_empty(), "panel {:?} has no query", p.title);
        for e in &p.exprs {
            let q = crate::dashboard::for_ct(e, ctid);
            let mut res = Vec::new();
            crate::net::wait_for(Duration::from_secs(30), || {
                res = prom.query(&q, None).unwrap_or_default();
                !res.is_empty()
            });
            ensure!(!res.is_empty(), "{:?}: no series for {q}", p.title);
            for s in &res {
                ensure!(s["metric"]["ctid"] == ctid, "{q}: {s}");
                let got: f64 = s["value"][1].as_str().context("value")?.parse()?;
                let want = billing_row_expected(e, &s["metric"], cli, per_dir)?;
                ensure!(
                    got == want,
                    "{:?}: {q} gives {got} for {s}, the CLI {want}",
                    p.title
                );
                checked += 1;
            }
        }
    }
    Ok(checked)
}
