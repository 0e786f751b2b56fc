//! `bench api`: berthd's panel API (issue 16's bars). 1000 stopped CTs (configs written
//! directly, with names and host names: the cheap way to a full `GET /v1/cts`), then rounds of
//! 200 concurrent `GET /v1/cts`, each on its own unix-socket connection: per-request p50/p99.
//! Then create+start of a busybox CT through the API against `berth create` + `berth start`,
//! alternating, each pair in the same run (the CT is stopped and destroyed untimed after
//! each). berthd (release) runs in a network namespace of its own; everything made is removed
//! and checked.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use berth_runtime::config::{CtConfig, Host};
use berth_tests::ct::{bin_dir, cgroup_roots};
use berth_tests::net::Ns;
use clap::Args;

use crate::stats::{ms, quantile};

#[derive(Args)]
pub struct ApiArgs {
    /// CTs in the listing.
    #[arg(long, default_value_t = 1000)]
    cts: u32,
    /// Concurrent `GET /v1/cts` per round.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Rounds of concurrent requests.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// create+start pairs (API and CLI each) measured.
    #[arg(long, default_value_t = 10)]
    starts: usize,
}

const P99_BAR_MS: f64 = 50.0;
const START_BAR: f64 = 1.2;
/// CTIDs of the create+start CTs (the listed ones are below).
const START_BASE: u32 = 30_000;

/// One request on a fresh connection: the status and the time to the whole answer.
fn request(sock: &Path, method: &str, path: &str, body: &str) -> Result<(u16, Duration, Vec<u8>)> {
    request_with(sock, method, path, body, "")
}

/// [`request`] with extra header lines (each ending in `\r\n`).
fn request_with(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
    headers: &str,
) -> Result<(u16, Duration, Vec<u8>)> {
    let t = Instant::now();
    let mut s = UnixStream::connect(sock).with_context(|| format!("connect {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: berthd\r\nConnection: close\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let took = t.elapsed();
    let head = String::from_utf8_lossy(&out[..out.len().min(64)]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{method} {path}: bad answer {head:?}"))?;
    Ok((status, took, out))
}

fn in_ns(c: &mut Command, ns: &Ns) {
    use std::os::fd::AsRawFd;
    let fd = ns.fd.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

struct Setup {
    host: Host,
    parent: String,
    bpffs: PathBuf,
    ns: Ns,
}

impl Setup {
    fn berth(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("berth"));
        c.arg("--root")
            .arg(&self.host.root)
            .args(["--cgroup-parent", &self.parent, "--bpffs"])
            .arg(&self.bpffs)
            .args(args)
            .env_remove("BERTH_ROOT")
            .env_remove("BERTH_RUN_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        in_ns(&mut c, &self.ns);
        c
    }

    fn berth_ok(&self, args: &[&str]) -> Result<()> {
        let st = self.berth(args).status()?;
        ensure!(st.success(), "berth {args:?}: {st}");
        Ok(())
    }
}

pub fn run(a: &ApiArgs) -> Result<()> {
    crate::require_root("api", "cgroups, namespaces")?;
    if a.concurrency == 0 || a.rounds == 0 || a.starts == 0 {
        bail!("--concurrency, --rounds and --starts must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("berth-bench-api-")
        .tempdir()?;
    let parent = format!("berth-bench-api-{}", std::process::id());
    let host = Host::new(Some(dir.path().join("root")), None, Some(parent.clone()))?;
    host.ensure_dirs()?;
    let s = Setup {
        host,
        parent: parent.clone(),
        bpffs: PathBuf::from(format!("/sys/fs/bpf/{parent}")),
        ns: Ns::new(),
    };
    let res = measure(&s, a, dir.path());
    // Whatever happened: no CT of ours runs, no cgroup or pin is left.
    // (The listed CTs never ran; only the started ones can be left running.)
    for c in s.host.list_ctids().unwrap_or_default() {
        if c.get() >= START_BASE {
            let n = c.to_string();
            let _ = s
                .berth(&["stop", "--fast", &n])
                .stderr(Stdio::null())
                .status();
        }
    }
    let _ = s.berth(&["gc"]).status();
    for r in cgroup_roots() {
        let _ = std::fs::remove_dir(r.join(&parent));
    }
    let _ = std::fs::remove_dir_all(&s.bpffs);
    let left: Vec<PathBuf> = cgroup_roots()
        .into_iter()
        .map(|r| r.join(&parent))
        .filter(|p| p.exists())
        .collect();
    res?;
    ensure!(left.is_empty(), "cgroups left: {left:?}");
    Ok(())
}

fn measure(s: &Setup, a: &ApiArgs, dir: &Path) -> Result<()> {
    s.berth_ok(&["template", "build", "busybox"])?;
    let t = Instant::now();
    for i in 0..a.cts {
        let ctid = berth_runtime::Ctid::new(20_000 + i)?;
        let mut cfg = CtConfig::new(ctid, "busybox".into());
        cfg.name = Some(format!("ct{i}"));
        cfg.hostname = Some(format!("ct{i}.example.com"));
        cfg.save(&s.host)?;
    }
    println!(
        "{} stopped CT configs written in {:.0} ms",
        a.cts,
        ms(t.elapsed())
    );

    let sock = dir.join("api/berthd.sock");
    let mut c = Command::new(bin_dir().join("berthd"));
    c.args(["--listen", "127.0.0.1:0", "--tick", "300", "--root"])
        .arg(&s.host.root)
        .args(["--cgroup-parent", &s.parent, "--bpffs"])
        .arg(&s.bpffs)
        .arg("--api-socket")
        .arg(&sock)
        .env_remove("BERTH_ROOT")
        .env("BERTH_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    in_ns(&mut c, &s.ns);
    let mut d = c.spawn().context("spawning berthd")?;
    let res = (|| {
        let mut out = d.stdout.take().context("berthd stdout")?;
        let mut seen = String::new();
        let mut buf = [0u8; 512];
        while !seen.contains("berthd API on unix:") {
            let n = out.read(&mut buf)?;
            ensure!(n > 0, "berthd ended before serving: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        list_rounds(&sock, a, "")?;
        list_rounds(&sock, a, "Accept-Encoding: gzip\r\n")?;
        starts(s, &sock, a)
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = d.wait();
    res
}

/// Rounds of concurrent `GET /v1/cts` with `headers` (plain, or gzip as panels' HTTP clients
/// ask for it).
fn list_rounds(sock: &Path, a: &ApiArgs, headers: &str) -> Result<()> {
    let label = if headers.is_empty() { "plain" } else { "gzip" };
    let mut one = Vec::new();
    for _ in 0..5 {
        one.push(request_with(sock, "GET", "/v1/cts", "", headers)?.1);
    }
    one.sort();
    println!(
        "[{label}] one GET /v1/cts at a time: median {:.1} ms",
        ms(one[2])
    );
    let (status, _, body) = request(sock, "GET", "/v1/cts", "")?;
    ensure!(status == 200, "GET /v1/cts: {status}");
    let text = String::from_utf8_lossy(&body);
    let json = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(json).context("GET /v1/cts body")?;
    let n = v["cts"].as_array().map_or(0, Vec::len);
    ensure!(
        n == a.cts as usize,
        "GET /v1/cts lists {n} CTs, not {}",
        a.cts
    );
    println!("GET /v1/cts: {} bytes for {n} CTs", json.len());
    let mut all = Vec::new();
    let mut p99s = Vec::new();
    for round in 1..=a.rounds {
        let barrier = Arc::new(Barrier::new(a.concurrency));
        let handles: Vec<_> = (0..a.concurrency)
            .map(|_| {
                let (b, sock, h) = (barrier.clone(), sock.to_owned(), headers.to_owned());
                std::thread::spawn(move || -> Result<Duration> {
                    b.wait();
                    let (st, took, _) = request_with(&sock, "GET", "/v1/cts", "", &h)?;
                    ensure!(st == 200, "GET /v1/cts: {st}");
                    Ok(took)
                })
            })
            .collect();
        let mut v: Vec<Duration> = Vec::new();
        for h in handles {
            v.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
            );
        }
        v.sort();
        let (p50, p99) = (quantile(&v, 0.5), quantile(&v, 0.99));
        println!(
            "[{label}] round {round}: {} concurrent GET /v1/cts: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            a.concurrency,
            ms(p50),
            ms(p99),
            ms(v[v.len() - 1])
        );
        p99s.push(ms(p99));
        all.extend(v);
    }
    all.sort();
    let p99 = ms(quantile(&all, 0.99));
    let (lo, hi) = p99s
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, h), x| (l.min(*x), h.max(*x)));
    println!(
        "[{label}] GET /v1/cts over {} requests: p50 {:.1} ms, p99 {p99:.1} ms (per-round p99 {lo:.1}–{hi:.1} ms); bar p99 ≤ {P99_BAR_MS} ms: {}",
        all.len(),
        ms(quantile(&all, 0.5)),
        if p99 <= P99_BAR_MS { "met" } else { "MISSED" }
    );
    Ok(())
}

fn starts(s: &Setup, sock: &Path, a: &ApiArgs) -> Result<()> {
    let (mut api, mut cli, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.starts {
        let base = START_BASE + 2 * i as u32;
        // Alternate which goes first, so neither always meets a warmer cache.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let (mut ta, mut tc) = (Duration::ZERO, Duration::ZERO);
        for via_api in order {
            let ct = if via_api { base } else { base + 1 };
            let n = ct.to_string();
            let t = Instant::now();
            if via_api {
                let (st, _, b) = request(sock, "POST", "/v1/cts", &format!(r#"{{"ctid": {ct}}}"#))?;
                ensure!(
                    st == 201,
                    "POST /v1/cts: {st} {}",
                    String::from_utf8_lossy(&b)
                );
                let (st, _, b) = request(sock, "POST", &format!("/v1/cts/{ct}/start"), "")?;
                ensure!(st == 200, "start: {st} {}", String::from_utf8_lossy(&b));
                ta = t.elapsed();
            } else {
                s.berth_ok(&["create", &n])?;
                s.berth_ok(&["start", &n])?;
                tc = t.elapsed();
            }
            s.berth_ok(&["stop", &n])?;
            s.berth_ok(&["destroy", &n])?;
        }
        let r = ta.as_secs_f64() / tc.as_secs_f64();
        println!(
            "pair {}: create+start API {:.1} ms, CLI {:.1} ms, ratio {r:.2}",
            i + 1,
            ms(ta),
            ms(tc)
        );
        api.push(ta);
        cli.push(tc);
        ratios.push(r);
    }
    api.sort();
    cli.sort();
    ratios.sort_by(f64::total_cmp);
    let (ma, mc) = (quantile(&api, 0.5), quantile(&cli, 0.5));
    let ratio = ma.as_secs_f64() / mc.as_secs_f64();
    println!(
        "create+start median: API {:.1} ms, CLI {:.1} ms: ratio {ratio:.2} (pairs {:.2}–{:.2}); bar ≤ {START_BAR}: {}",
        ms(ma),
        ms(mc),
        ratios[0],
        ratios[ratios.len() - 1],
        if ratio <= START_BAR { "met" } else { "MISSED" }
    );
    Ok(())
}
