//! Helpers for the berthd tests: the real `berthd` binary on a free loopback port, a minimal
//! HTTP/1.1 client, a text-format sample parser, a throwaway Prometheus server (the Debian
//! package's binary) and the 1000-CT scrape benchmark.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::ct::bin_dir;

pub fn berthd_bin() -> PathBuf {
    let p = bin_dir().join("berthd");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p berth` (cargo xtask test does)",
        p.display()
    );
    p
}

/// A loopback port that was free a moment ago (for servers whose port must be known before
/// they start: Prometheus' scrape target, a berthd restarted on the same port).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---- HTTP --------------------------------------------------------------------------------

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` (with query) on `addr`, `Connection: close`; decodes chunked bodies.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {line:?} from {addr}{path}"))?;
    let mut hdrs = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            hdrs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let chunked = hdrs.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if n == 0 {
                break;
            }
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers: hdrs,
        body: String::from_utf8(body).context("non-UTF-8 body")?,
    })
}

/// Percent-encodes a query parameter value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---- text format -------------------------------------------------------------------------

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k).map(String::as_str)
    }

    /// `name{k="v",...}` with sorted labels: a stable series identity.
    pub fn series(&self) -> String {
        let l: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        format!("{}{{{}}}", self.name, l.join(","))
    }
}

/// Parses the samples of a text-format (or OpenMetrics) exposition; comments are skipped.
pub fn parse_samples(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest
                    .strip_suffix('}')
                    .with_context(|| format!("unclosed labels in {line:?}"))?;
                (name.to_owned(), parse_labels(rest)?)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        ensure!(chars.next() == Some('"'), "label {key} not quoted in {s:?}");
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(c) => val.push(c),
                    None => bail!("dangling escape in {s:?}"),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_owned(), val);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Ok(out)
}

/// The value of the one sample named `name` whose labels include `labels`.
pub fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .collect();
    match matching.as_slice() {
        [one] => Some(one.value),
        _ => None,
    }
}

// ---- berthd ------------------------------------------------------------------------------

/// A running `berthd`, killed on drop.
pub struct Berthd {
    pub child: Child,
    pub addr: SocketAddr,
}

/// What berthd reads: a berth root, run dir, cgroup parent and pin directory.
#[derive(Debug, Clone)]
pub struct BerthdArgs {
    pub root: PathBuf,
    pub run_dir: Option<PathBuf>,
    pub cgroup_parent: String,
    pub bpffs: PathBuf,
}

impl Berthd {
    /// Starts berthd on `port` (0: any) and waits until it serves. It runs in the calling
    /// thread's network namespace (enter a test namespace first to export the qdiscs there;
    /// requests from the same thread then reach its loopback).
    pub fn start(args: &BerthdArgs, port: u16) -> Result<Self> {
        Self::start_bin(&berthd_bin(), args, port)
    }

    /// [`Self::start`] with another build's berthd (benchmarks compare two).
    pub fn start_bin(bin: &std::path::Path, args: &BerthdArgs, port: u16) -> Result<Self> {
        Self::start_bin_with(bin, args, port, &[])
    }

    /// [`Self::start_bin`] with more command-line arguments (e.g. `--ship-url`).
    pub fn start_bin_with(
        bin: &std::path::Path,
        args: &BerthdArgs,
        port: u16,
        extra: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(extra);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--root")
            .arg(&args.root)
            .arg("--cgroup-parent")
            .arg(&args.cgroup_parent)
            .arg("--bpffs")
            .arg(&args.bpffs)
            .env_remove("BERTH_ROOT")
            .env_remove("BERTH_RUN_DIR")
            .env_remove("BERTH_BPFFS")
            // BERTHD_TEST_LOG=debug shows berthd's per-scrape timings in a test's output.
            .env(
                "BERTH_LOG",
                std::env::var("BERTHD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(r) = &args.run_dir {
            cmd.arg("--run-dir").arg(r);
        }
        let mut child = cmd.spawn().context("spawning berthd")?;
        let stdout = child.stdout.take().context("berthd stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading berthd's listen line")?;
        let Some(addr) = line
            .split_whitespace()
            .nth(3)
            .and_then(|u| u.strip_prefix("http://"))
            .and_then(|u| u.strip_suffix("/metrics"))
            .and_then(|a| a.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("berthd did not print its address: {line:?}");
        };
        let d = Self { child, addr };
        let r = http_get(d.addr, "/healthz", &[])?;
        ensure!(r.status == 200 && r.body == "ok\n", "healthz: {}", r.body);
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        http_get(self.addr, path, headers)
    }

    /// `/metrics` in the text format, parsed.
    pub fn scrape(&self) -> Result<(String, Vec<Sample>)> {
        let r = self.get("/metrics", &[])?;
        ensure!(r.status == 200, "/metrics: {} {}", r.status, r.body);
        let samples = parse_samples(&r.body)?;
        Ok((r.body, samples))
    }

    /// SIGKILL (no chance to clean up: what a crash does) and reap.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Berthd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs promtool with `args`, `stdin` fed to it; fails with its output.
pub fn promtool(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning promtool (apt-get install prometheus; xtask/setup.sh does)")?;
    {
        let mut sin = child.stdin.take().context("promtool stdin")?;
        if let Some(s) = stdin {
            sin.write_all(s.as_bytes())?;
        }
    }
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed: {text}");
    Ok(text)
}

// ---- Prometheus --------------------------------------------------------------------------

/// The Debian package's Prometheus on a loopback port with its own config and storage in a
/// temporary directory, scraping `targets` every `interval`. Killed and removed on drop.
pub struct Prometheus {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(targets: &[SocketAddr], interval: &str) -> Result<Self> {
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n\
             scrape_configs:\n  - job_name: berthd\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        Self::start_config(&config, &[])
    }

    /// A Prometheus with the configuration `config` (YAML) and more flags (`--enable-feature=agent`,
    /// `--web.enable-remote-write-receiver`); an agent has no query API, so readiness is
    /// all that is waited for.
    pub fn start_config(config: &str, flags: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-prometheus-")
            .tempdir()?;
        let agent = flags.contains(&"--enable-feature=agent");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(if agent {
                format!("--storage.agent.path={}", dir.path().join("wal").display())
            } else {
                format!("--storage.tsdb.path={}", dir.path().join("data").display())
            })
            .arg(format!("--web.listen-address={addr}"))
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning /usr/bin/prometheus (xtask/setup.sh installs it)")?;
        let mut p = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http_get(p.addr, "/-/ready", &[])
                && r.status == 200
            {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30 s: {}", p.log());
            }
            if let Ok(Some(st)) = p.child.try_wait() {
                bail!("prometheus exited ({st}): {}", p.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query (at `time`, Unix seconds, or now): the `data.result` array.
    pub fn query(&self, expr: &str, time: Option<f64>) -> Result<Vec<serde_json::Value>> {
        let mut path = format!("/api/v1/query?query={}", urlencode(expr));
        if let Some(t) = time {
            path.push_str(&format!("&time={t:.3}"));
        }
        let r = http_get(self.addr, &path, &[])?;
        let v: serde_json::Value =
            serde_json::from_str(&r.body).with_context(|| format!("query {expr}: {}", r.body))?;
        ensure!(v["status"] == "success", "query {expr}: {}", r.body);
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The single value of an instant query's result (`None` when it is empty).
    pub fn value(&self, expr: &str, time: Option<f64>) -> Result<Option<f64>> {
        let res = self.query(expr, time)?;
        match res.as_slice() {
            [] => Ok(None),
            [one] => {
                let v = one["value"][1]
                    .as_str()
                    .with_context(|| format!("{expr}: {one}"))?;
                Ok(Some(v.parse()?))
            }
            more => bail!("{expr}: {} series, wanted one: {more:?}", more.len()),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Resident set (VmRSS) and its peak (VmHWM) of a process, in bytes.
/// CPU time (user + system, all threads) `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = s.rsplit_once(')').context("no comm in stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("no utime")?.parse::<u64>()?
        + f.get(12).context("no stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// CPU time the whole machine spent busy (all CPUs, everything but idle and iowait), in
/// seconds: with [`cpu_seconds`] of the processes measured, it tells how much other work ran
/// during a benchmark.
pub fn machine_busy_seconds() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let cpu = s.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = f
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy as f64 / hz)
}

pub fn rss(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let l = s
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing"))?;
        let kb: u64 = l.split_whitespace().nth(1).context("no number")?.parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
