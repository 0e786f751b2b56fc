//! The datapath benchmark (`cargo xtask bench datapath`): per-packet cost of both hooks under
//! iperf3 load, from the kernel's own run-time statistics (`BPF_ENABLE_STATS`, the mechanism
//! behind `sysctl kernel.bpf_stats_enabled=1`: the kernel adds up `run_time_ns` and `run_cnt`
//! of every program while enabled), and single-stream TCP throughput with and without the
//! programs. Everything runs in two network namespaces it creates (a "host" and a "CT" joined
//! by a veth pair) and a private pin directory, all removed afterwards.
//!
//! `bpf_stats` times each run between two `sched_clock()` reads around the program's indirect
//! call, so even a program that does nothing shows a cost; on a VM with retpolines and SRSO
//! that floor is ~100 ns under load. The benchmark therefore also measures the no-op program
//! (`berth_noop`) on the same hooks under the same load, interleaved with the real programs,
//! and reports both the raw figure and the cost net of that floor.

use std::{
    fmt,
    fs::File,
    io,
    marker::PhantomData,
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
    tc::{self, NlOptions, TcAttachOptions},
};
use berth_common::program_names;

use crate::bpf::{
    self, BpfError,
    programs::{self, MapPins, ProgramSpec},
};
use nix::sched::{CloneFlags, setns};
use serde::Serialize;
use thiserror::Error;
use tracing::{info, warn};

use super::{
    AttachMethod, Datapath, DatapathConfig, DatapathError, IfaceConfig, Result,
    parse_networks_classes,
};

/// Loads the reference program (`berth_noop`, does nothing) over the datapath's pinned maps
/// and pins it at `path` (the caller unpins it); nothing else is created.
fn load_noop(dp: &Datapath, path: &Path) -> Result<SchedClassifier> {
    let maps = dp.map_pins();
    let spec = ProgramSpec::required(program_names::NOOP, "noop");
    let pins = MapPins {
        dir: &maps,
        names: &berth_common::map_names::ALL,
    };
    Ok(programs::load_one(&[pins], spec, path)?)
}

fn bench_ctid() -> berth_runtime::Ctid {
    berth_runtime::Ctid::new(BENCH_CTID).expect("BENCH_CTID is a valid CTID")
}

/// Keeps run-time statistics enabled while alive (they cost a few ns per run, so only for
/// measurements).
pub struct StatsGuard(
    #[expect(dead_code, reason = "held for its Drop (closing disables)")] OwnedFd,
);

pub fn enable_stats() -> Result<StatsGuard> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map(StatsGuard)
        .map_err(|e| {
            BpfError::Io {
                op: "enabling BPF run-time stats (BPF_ENABLE_STATS)",
                path: "/proc/sys/kernel/bpf_stats_enabled".into(),
                source: e.io_error,
            }
            .into()
        })
}

/// Cumulative statistics of one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProgStats {
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

impl ProgStats {
    /// Statistics accumulated since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            run_cnt: self.run_cnt.saturating_sub(earlier.run_cnt),
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
        }
    }

    /// Average cost per run (per packet: each skb is one run), ns.
    pub fn ns_per_run(self) -> f64 {
        if self.run_cnt == 0 {
            0.0
        } else {
            self.run_time_ns as f64 / self.run_cnt as f64
        }
    }

    fn add(self, other: Self) -> Self {
        Self {
            run_cnt: self.run_cnt + other.run_cnt,
            run_time_ns: self.run_time_ns + other.run_time_ns,
        }
    }
}

/// Statistics of both hooks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HookStats {
    /// `berth_from_ct`, host-side ingress.
    pub from_ct: ProgStats,
    /// `berth_to_ct`, host-side egress.
    pub to_ct: ProgStats,
}

impl HookStats {
    pub fn since(self, earlier: Self) -> Self {
        Self {
            from_ct: self.from_ct.since(earlier.from_ct),
            to_ct: self.to_ct.since(earlier.to_ct),
        }
    }

    fn add(self, other: Self) -> Self {
        Self {
            from_ct: self.from_ct.add(other.from_ct),
            to_ct: self.to_ct.add(other.to_ct),
        }
    }
}

fn prog_stats(p: &SchedClassifier, name: &'static str) -> Result<ProgStats> {
    let info = p.info().map_err(bpf::prog_err(name, "reading info"))?;
    Ok(ProgStats {
        run_cnt: info.run_count(),
        run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
    })
}

impl Datapath {
    /// Current cumulative run statistics of the two programs.
    pub fn hook_stats(&self) -> Result<HookStats> {
        let (from, to) = self.programs();
        Ok(HookStats {
            from_ct: prog_stats(from, program_names::FROM_CT)?,
            to_ct: prog_stats(to, program_names::TO_CT)?,
        })
    }

    /// Runs `load` with statistics enabled and returns what the programs spent meanwhile.
    pub fn measure<T>(&self, load: impl FnOnce() -> T) -> Result<(T, HookStats)> {
        let guard = enable_stats()?;
        let before = self.hook_stats()?;
        let out = load();
        let after = self.hook_stats()?;
        drop(guard);
        Ok((out, after.since(before)))
    }
}

// ---- the benchmark -------------------------------------------------------------------------

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("datapath benchmark: {0}")]
    Datapath(#[from] DatapathError),

    #[error("datapath benchmark: {tool} not found in PATH ({hint})")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },

    #[error("datapath benchmark: invalid options: {0}")]
    Options(String),

    #[error("datapath benchmark: `{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },

    #[error("datapath benchmark: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("datapath benchmark: cannot read {what} from: {text}")]
    Parse { what: &'static str, text: String },
}

type BenchResult<T> = std::result::Result<T, BenchError>;

/// What to run. `Default` is what `cargo xtask bench datapath` runs.
#[derive(Clone, Debug, Serialize)]
pub struct BenchOptions {
    /// Throughput runs per variant (with / without the programs) and direction; at least 5.
    pub runs: usize,
    /// Length of each throughput run (`iperf3 -t`).
    pub seconds: u32,
    /// Rounds of the cost measurement; each measures berth's programs, then the no-op, for
    /// `cost_seconds` of `iperf3 --bidir` each.
    pub cost_rounds: usize,
    pub cost_seconds: u32,
    /// Bars from issue #4.
    pub bar_ns: f64,
    pub bar_ratio: f64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            runs: 7,
            seconds: 4,
            cost_rounds: 6,
            cost_seconds: 3,
            bar_ns: 100.0,
            bar_ratio: 0.98,
        }
    }
}

/// Per-packet cost of one hook.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct HookCost {
    /// berth's program: runs and ns/run as `bpf_stats` reports them.
    pub runs: u64,
    pub ns_per_run: f64,
    /// The no-op program on the same hook under the same load.
    pub noop_runs: u64,
    pub noop_ns_per_run: f64,
}

impl HookCost {
    /// berth's cost above what running any program costs.
    pub fn net_ns(&self) -> f64 {
        self.ns_per_run - self.noop_ns_per_run
    }
}

/// Throughput of one direction, Gbit/s per run, in the order run.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub direction: &'static str,
    pub with_programs: Vec<f64>,
    pub without_programs: Vec<f64>,
}

impl Throughput {
    pub fn median_with(&self) -> f64 {
        median(&self.with_programs)
    }

    pub fn median_without(&self) -> f64 {
        median(&self.without_programs)
    }

    /// Ratio of the medians (shown for reference).
    pub fn ratio_of_medians(&self) -> f64 {
        let base = self.median_without();
        if base > 0.0 {
            self.median_with() / base
        } else {
            0.0
        }
    }

    /// with ÷ without of each interleaved pair (the two runs made back to back).
    pub fn pair_ratios(&self) -> Vec<f64> {
        self.with_programs
            .iter()
            .zip(&self.without_programs)
            .map(|(w, wo)| if *wo > 0.0 { w / wo } else { 0.0 })
            .collect()
    }

    /// The figure the bar is checked on: the median of the paired ratios. The VM's speed
    /// drifts by more than the effect measured (±15 % between runs minutes apart), and a
    /// pair's two runs share the drift, so pairing removes most of it.
    pub fn ratio(&self) -> f64 {
        median(&self.pair_ratios())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cpus: usize,
    pub attach_method: AttachMethod,
    pub options: BenchOptions,
    /// What `bpf_stats` itself adds per run, without load (BPF_PROG_TEST_RUN).
    pub floor_probe: FloorProbe,
    pub from_ct: HookCost,
    pub to_ct: HookCost,
    /// The cost measurement round by round (the totals above sum them).
    pub rounds: Vec<CostRound>,
    pub throughput: Vec<Throughput>,
}

/// One round of the cost measurement: berth's programs and the no-op, each under the same
/// `cost_seconds` of load.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CostRound {
    pub berth: HookStats,
    pub noop: HookStats,
}

impl Report {
    /// The bar read literally: raw `run_time_ns / run_cnt` of both hooks.
    pub fn cost_pass_raw(&self) -> bool {
        [self.from_ct, self.to_ct]
            .iter()
            .all(|h| h.ns_per_run <= self.options.bar_ns)
    }

    /// The bar on the programs' own cost: raw minus the no-op floor measured alongside.
    pub fn cost_pass_net(&self) -> bool {
        [self.from_ct, self.to_ct]
            .iter()
            .all(|h| h.net_ns() <= self.options.bar_ns)
    }

    pub fn throughput_pass(&self) -> bool {
        self.throughput
            .iter()
            .all(|t| t.ratio() >= self.options.bar_ratio)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "berth datapath benchmark — kernel {}, {} CPUs, attach {:?}",
            self.kernel, self.cpus, self.attach_method
        )?;
        let fp = &self.floor_probe;
        writeln!(
            f,
            "\nbpf_stats instrumentation without load (BPF_PROG_TEST_RUN, {} runs, ns/run as the \
             kernel times the loop):",
            fp.repeat
        )?;
        writeln!(
            f,
            "  no-op: {:.1} stats off, {:.1} stats on (+{:.1}); bpf_stats reports {:.1} for it",
            fp.noop_off_ns,
            fp.noop_on_ns,
            fp.noop_on_ns - fp.noop_off_ns,
            fp.noop_stats_ns
        )?;
        writeln!(
            f,
            "  berth from_ct (TCP/IPv4 from the CT, hot caches): {:.1} stats off, {:.1} stats on",
            fp.berth_off_ns, fp.berth_on_ns
        )?;
        writeln!(
            f,
            "\nper-packet cost under iperf3 --bidir load (bpf_stats run_time_ns / run_cnt; \
             {} rounds × {} s each for berth and the no-op, interleaved ABBA)",
            o.cost_rounds, o.cost_seconds
        )?;
        writeln!(
            f,
            "  {:<20} {:>10} {:>14} {:>14} {:>16}",
            "hook", "runs", "berth ns/run", "no-op ns/run", "berth − no-op"
        )?;
        for (name, h) in [
            ("from_ct (ingress)", self.from_ct),
            ("to_ct (egress)", self.to_ct),
        ] {
            writeln!(
                f,
                "  {:<20} {:>10} {:>14.1} {:>14.1} {:>16.1}",
                name,
                h.runs,
                h.ns_per_run,
                h.noop_ns_per_run,
                h.net_ns()
            )?;
        }
        let spread = |pick: fn(&HookStats) -> ProgStats| {
            let nets: Vec<f64> = self
                .rounds
                .iter()
                .map(|r| pick(&r.berth).ns_per_run() - pick(&r.noop).ns_per_run())
                .collect();
            let min = nets.iter().copied().fold(f64::INFINITY, f64::min);
            let max = nets.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (min, max)
        };
        let (a, b) = spread(|h| h.from_ct);
        let (c, d) = spread(|h| h.to_ct);
        writeln!(
            f,
            "  berth − no-op per round: from_ct {a:.1}..{b:.1}, to_ct {c:.1}..{d:.1}"
        )?;
        writeln!(
            f,
            "  bar ≤ {:.0} ns per hook, raw run_time_ns/run_cnt: {}",
            o.bar_ns,
            verdict(self.cost_pass_raw())
        )?;
        writeln!(
            f,
            "  bar ≤ {:.0} ns per hook, net of the no-op floor:  {}",
            o.bar_ns,
            verdict(self.cost_pass_net())
        )?;
        writeln!(
            f,
            "\nsingle-stream TCP throughput (iperf3 -t {}, client/server pinned to CPUs 0/1, \
             {} runs per variant, interleaved ABBA; bar on the median of the paired ratios)",
            o.seconds, o.runs
        )?;
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        for t in &self.throughput {
            writeln!(
                f,
                "  {:<10} with {:>6.2} Gbit/s [{}]  without {:>6.2} Gbit/s [{}]",
                t.direction,
                t.median_with(),
                list(&t.with_programs),
                t.median_without(),
                list(&t.without_programs),
            )?;
            let ratios: Vec<String> = t.pair_ratios().iter().map(|r| format!("{r:.3}")).collect();
            writeln!(
                f,
                "  {:<10} paired ratios [{}]  median {:.3}  (ratio of medians {:.3})",
                "",
                ratios.join(" "),
                t.ratio(),
                t.ratio_of_medians()
            )?;
        }
        writeln!(
            f,
            "  bar ≥ {:.2} × without: {}",
            o.bar_ratio,
            verdict(self.throughput_pass())
        )?;
        writeln!(
            f,
            "\nresult: cost (raw) {}, cost (net of no-op) {}, throughput {}",
            verdict(self.cost_pass_raw()),
            verdict(self.cost_pass_net()),
            verdict(self.throughput_pass())
        )
    }
}

fn command_err(cmd: &Command, detail: impl Into<String>) -> BenchError {
    BenchError::Command {
        cmd: format!("{cmd:?}").replace('"', ""),
        detail: detail.into(),
    }
}

fn run(cmd: &mut Command) -> BenchResult<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| command_err(cmd, e.to_string()))?;
    if !out.status.success() {
        return Err(command_err(
            cmd,
            format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> BenchResult<String> {
    run(Command::new("ip").args(args))
}

fn require(tool: &'static str, hint: &'static str) -> BenchResult<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(BenchError::MissingTool { tool, hint })
    }
}

/// A network namespace made with `ip netns add`, deleted on drop (which also deletes the
/// veth end inside it, and so the pair).
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> BenchResult<Self> {
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> BenchResult<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    fn exec(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(cmd);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            warn!(netns = %self.name, error = %e, "benchmark cleanup: deleting netns");
        }
    }
}

/// The calling thread inside a network namespace until dropped (setns is per thread; the
/// guard is `!Send` so it is dropped where it was made).
struct InNetns {
    saved: File,
    _not_send: PhantomData<*const ()>,
}

impl InNetns {
    fn enter(target: &Path) -> BenchResult<Self> {
        let own = Path::new("/proc/thread-self/ns/net");
        let saved = File::open(own).map_err(|source| BenchError::Io {
            op: "opening",
            path: own.to_owned(),
            source,
        })?;
        let ns = File::open(target).map_err(|source| BenchError::Io {
            op: "opening",
            path: target.to_owned(),
            source,
        })?;
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| BenchError::Io {
            op: "setns into",
            path: target.to_owned(),
            source: e.into(),
        })?;
        Ok(Self {
            saved,
            _not_send: PhantomData,
        })
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        if let Err(e) = setns(self.saved.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Continuing in the wrong namespace would make the caller act on the wrong
            // interfaces.
            panic!("restoring the thread's network namespace: {e}");
        }
    }
}

/// The bench's world. Drop order: the iperf3 server, the pinned datapath (unloaded from
/// inside the host namespace, where its interfaces are), then the namespaces (fields).
struct Topology {
    server: Option<Child>,
    pin_dir: PathBuf,
    host: Netns,
    ct: Netns,
    host_if: String,
    ct_if: String,
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        match InNetns::enter(&self.host.path()) {
            Ok(_in_host) => {
                if let Err(e) = Datapath::unload_all(&self.pin_dir) {
                    warn!(pin_dir = %self.pin_dir.display(), error = %e, "benchmark cleanup: unloading");
                }
            }
            Err(e) => warn!(error = %e, "benchmark cleanup: entering the host namespace"),
        }
    }
}

const HOST_V4: &str = "10.201.0.1";
const CT_V4: &str = "10.201.0.2";
const HOST_V6: &str = "fd00:201::1";
const CT_V6: &str = "fd00:201::2";
const BENCH_CTID: u32 = 4_000_001;
/// A typical OpenVZ table: a few local networks, everything else class 1. The host side
/// (10.201.0.1) matches only the /0, so the IPv4 scan passes every entry (its worst case).
const BENCH_CLASSES: &str = "\
0 192.0.2.0/24
0 198.51.100.0/24
2 203.0.113.0/24
1 0.0.0.0/0
0 2001:db8::/32
1 ::/0
";

impl Topology {
    fn create() -> BenchResult<Self> {
        let pid = std::process::id();
        let host = Netns::create(format!("berth-bench-h{pid}"))?;
        let ct = Netns::create(format!("berth-bench-c{pid}"))?;
        let host_if = format!("bbh{pid}");
        let ct_if = format!("bbc{pid}");
        let topo = Self {
            server: None,
            pin_dir: Path::new("/sys/fs/bpf").join(format!("berth-bench-{pid}")),
            host,
            ct,
            host_if,
            ct_if,
        };
        let (h, c) = (&topo.host, &topo.ct);
        h.ip(&[
            "link",
            "add",
            &topo.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &topo.ct_if,
            "netns",
            &c.name,
        ])?;
        h.ip(&[
            "addr",
            "add",
            &format!("{HOST_V4}/24"),
            "dev",
            &topo.host_if,
        ])?;
        h.ip(&[
            "addr",
            "add",
            &format!("{HOST_V6}/64"),
            "dev",
            &topo.host_if,
            "nodad",
        ])?;
        c.ip(&["addr", "add", &format!("{CT_V4}/24"), "dev", &topo.ct_if])?;
        c.ip(&[
            "addr",
            "add",
            &format!("{CT_V6}/64"),
            "dev",
            &topo.ct_if,
            "nodad",
        ])?;
        h.ip(&["link", "set", &topo.host_if, "up"])?;
        c.ip(&["link", "set", &topo.ct_if, "up"])?;
        Ok(topo)
    }

    fn ct_mac(&self) -> BenchResult<[u8; 6]> {
        let out = self.ct.ip(&["-j", "link", "show", "dev", &self.ct_if])?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|_| BenchError::Parse {
            what: "the CT interface's MAC",
            text: out.clone(),
        })?;
        let text = v[0]["address"].as_str().unwrap_or_default();
        let bytes: Vec<u8> = text
            .split(':')
            .filter_map(|p| u8::from_str_radix(p, 16).ok())
            .collect();
        bytes.try_into().map_err(|_| BenchError::Parse {
            what: "the CT interface's MAC",
            text: out,
        })
    }

    fn start_server(&mut self) -> BenchResult<()> {
        let mut cmd = self.host.exec(&["iperf3", "-s", "-B", HOST_V4]);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| command_err(&cmd, e.to_string()))?;
        self.server = Some(child);
        // Ready when a client gets through (the server binds within ~100 ms).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.iperf(&["-t", "1"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs an iperf3 client in the CT towards the host; returns the receiver's rate, Gbit/s.
    fn iperf(&self, args: &[&str]) -> BenchResult<f64> {
        let mut full = vec!["iperf3", "-c", HOST_V4, "-J"];
        // Client and server on CPUs of their own: the scheduler moving them around is most of
        // the run-to-run spread on a 2-vCPU VM.
        if thread::available_parallelism().is_ok_and(|n| n.get() >= 2) {
            full.extend_from_slice(&["-A", "0,1"]);
        }
        full.extend_from_slice(args);
        let mut cmd = self.ct.exec(&full);
        let out = run(&mut cmd)?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|_| BenchError::Parse {
            what: "iperf3 JSON",
            text: out.chars().take(500).collect(),
        })?;
        let end = &v["end"];
        let bps = end["sum_received"]["bits_per_second"]
            .as_f64()
            .or_else(|| end["sum"]["bits_per_second"].as_f64())
            .ok_or_else(|| BenchError::Parse {
                what: "iperf3 receiver bits_per_second",
                text: end.to_string().chars().take(500).collect(),
            })?;
        Ok(bps / 1e9)
    }
}

/// What `bpf_stats` adds to every run, measured without load: the no-op and berth's `from_ct`
/// run `TEST_RUN_REPEAT` times each under BPF_PROG_TEST_RUN (which times the whole loop
/// itself), with statistics off and on. Hot caches, so a lower bound for the cost under load.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct FloorProbe {
    pub repeat: u32,
    /// ns per run, statistics off: the program alone (plus the loop's own overhead).
    pub noop_off_ns: f64,
    pub berth_off_ns: f64,
    /// ns per run, statistics on (BPF_PROG_TEST_RUN's own timing).
    pub noop_on_ns: f64,
    pub berth_on_ns: f64,
    /// run_time_ns / run_cnt that `bpf_stats` reports for the no-op's runs above.
    pub noop_stats_ns: f64,
}

const TEST_RUN_REPEAT: u32 = 2_000_000;

/// A TCP segment the CT sends to the host (the shape the load consists of).
fn probe_frame(ct_mac: [u8; 6]) -> Vec<u8> {
    let src: std::net::Ipv4Addr = CT_V4.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let dst: std::net::Ipv4Addr = HOST_V4.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let mut f = Vec::with_capacity(74);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ct_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    // IPv4: version/IHL, TOS, total length 60, id, flags/fragment, TTL, TCP, checksum.
    f.extend_from_slice(&[0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    // TCP: ports 40000 → 5201, seq/ack, data offset 5, ACK, window; then 20 bytes of payload.
    f.extend_from_slice(&[
        0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff,
    ]);
    f.extend_from_slice(&[0; 4]);
    f.resize(74, 0);
    f
}

/// `struct __sk_buff` (192 bytes on every architecture) for BPF_PROG_TEST_RUN; only fields it
/// accepts as input are set. `ifindex` 0 runs on the namespace's loopback (ifindex 1);
/// `ingress_ifindex` (what tc ingress programs see as the receiving device) is set to the
/// same interface.
pub fn skb_ctx(ifindex: u32, gso_segs: u32, gso_size: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    let ingress = if ifindex == 0 { 1 } else { ifindex };
    ctx[36..40].copy_from_slice(&ingress.to_ne_bytes()); // ingress_ifindex
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes()); // ifindex
    ctx[164..168].copy_from_slice(&gso_segs.to_ne_bytes()); // gso_segs
    ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes()); // gso_size
    ctx
}

fn test_run_ns(
    prog: &SchedClassifier,
    name: &'static str,
    frame: &[u8],
    ctx: &[u8],
) -> Result<f64> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(ctx),
        repeat: TEST_RUN_REPEAT,
        ..TestRunOptions::new()
    };
    let res = prog
        .test_run(opts)
        .map_err(bpf::prog_err(name, "BPF_PROG_TEST_RUN"))?;
    Ok(res.duration.as_secs_f64() * 1e9)
}

fn test_run_floor(
    dp: &Datapath,
    noop: &SchedClassifier,
    ifindex: u32,
    ct_mac: [u8; 6],
) -> Result<FloorProbe> {
    let frame = probe_frame(ct_mac);
    let ctx = skb_ctx(ifindex, 0, 0);
    let (from_ct, _) = dp.programs();
    let mut p = FloorProbe {
        repeat: TEST_RUN_REPEAT,
        ..FloorProbe::default()
    };
    // Warm-up, then off / on / off / on: the minimum of each pair (interference only adds).
    test_run_ns(noop, program_names::NOOP, &frame, &ctx)?;
    let mut off = [f64::INFINITY; 2];
    let mut on = [f64::INFINITY; 2];
    let mut stats = f64::INFINITY;
    for _ in 0..2 {
        off[0] = off[0].min(test_run_ns(noop, program_names::NOOP, &frame, &ctx)?);
        off[1] = off[1].min(test_run_ns(from_ct, program_names::FROM_CT, &frame, &ctx)?);
        let guard = enable_stats()?;
        let before = prog_stats(noop, program_names::NOOP)?;
        on[0] = on[0].min(test_run_ns(noop, program_names::NOOP, &frame, &ctx)?);
        let after = prog_stats(noop, program_names::NOOP)?;
        on[1] = on[1].min(test_run_ns(from_ct, program_names::FROM_CT, &frame, &ctx)?);
        drop(guard);
        stats = stats.min(after.since(before).ns_per_run());
    }
    p.noop_off_ns = off[0];
    p.berth_off_ns = off[1];
    p.noop_on_ns = on[0];
    p.berth_on_ns = on[1];
    p.noop_stats_ns = stats;
    Ok(p)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Runs the benchmark (root; needs iperf3 and iproute2). Prints nothing itself: the
/// [`Report`] displays as the benchmark's output.
pub fn run_datapath_bench(opts: &BenchOptions) -> BenchResult<Report> {
    if opts.runs < 5 {
        return Err(BenchError::Options(format!(
            "runs = {}: the bar needs at least 5 runs per variant",
            opts.runs
        )));
    }
    if opts.seconds == 0 || opts.cost_seconds == 0 || opts.cost_rounds == 0 {
        return Err(BenchError::Options(
            "seconds, cost_seconds and cost_rounds must be at least 1".to_owned(),
        ));
    }
    require("ip", "install iproute2")?;
    require("iperf3", "xtask/setup.sh installs it")?;

    let mut topo = Topology::create()?;
    let in_host = InNetns::enter(&topo.host.path())?;
    let mut dp = Datapath::open_or_load(&topo.pin_dir)?;
    let method = dp.attach_method();
    let ifindex =
        bpf::sys::if_nametoindex(&topo.host_if).ok_or_else(|| DatapathError::NoSuchInterface {
            name: topo.host_if.clone(),
        })?;
    let mut cfg = IfaceConfig::routed(bench_ctid(), topo.ct_mac()?);
    cfg.mac_filter = true;
    let classes = parse_networks_classes(BENCH_CLASSES).map_err(DatapathError::from)?;
    dp.load_classes(&classes)?;
    dp.set_config(DatapathConfig::default())?;
    let addrs: Vec<IpAddr> = [CT_V4, CT_V6]
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    dp.set_ct_addrs(bench_ctid(), &addrs)?;
    dp.attach(ifindex, cfg)?;
    topo.start_server()?;

    // Per-packet cost: berth's programs, then the no-op alone on the same hooks, per round.
    // One instance per hook, so that each hook's floor is its own.
    let noop_paths = [
        topo.pin_dir.join("bench-noop-ingress"),
        topo.pin_dir.join("bench-noop-egress"),
    ];
    let mut noop_in = load_noop(&dp, &noop_paths[0])?;
    let mut noop_eg = load_noop(&dp, &noop_paths[1])?;
    // The floor is measured on the hook berth uses: TCX link or cls_bpf filter.
    let noop_opts = || match method {
        AttachMethod::Tcx => TcAttachOptions::TcxOrder(LinkOrder::first()),
        AttachMethod::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
    };
    let floor_probe = test_run_floor(&dp, &noop_in, ifindex, topo.ct_mac()?)?;
    let load = |t: &Topology| t.iperf(&["-t", &opts.cost_seconds.to_string(), "--bidir"]);
    let attach_err = |e: aya::programs::ProgramError| {
        DatapathError::from(BpfError::Attach {
            program: program_names::NOOP,
            ifname: topo.host_if.clone(),
            ifindex,
            op: "attaching the no-op reference program",
            source: Box::new(e),
        })
    };
    let mut rounds = Vec::new();
    for round in 0..opts.cost_rounds {
        // ABBA: drift over the measurement hits berth and the no-op alike.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut this = CostRound::default();
        for berth_phase in order {
            if berth_phase {
                dp.attach(ifindex, cfg)?;
                let (res, stats) = dp.measure(|| load(&topo))?;
                res?;
                this.berth = stats;
            } else {
                dp.detach(ifindex)?;
                if method == AttachMethod::Netlink {
                    // EEXIST when berth's attach left it in place.
                    let _ = tc::qdisc_add_clsact(&topo.host_if);
                }
                let a = noop_in
                    .attach_with_options(&topo.host_if, TcAttachType::Ingress, noop_opts())
                    .map_err(attach_err)?;
                let b = noop_eg
                    .attach_with_options(&topo.host_if, TcAttachType::Egress, noop_opts())
                    .map_err(attach_err)?;
                let read = |i: &SchedClassifier, e: &SchedClassifier| -> Result<HookStats> {
                    Ok(HookStats {
                        from_ct: prog_stats(i, program_names::NOOP)?,
                        to_ct: prog_stats(e, program_names::NOOP)?,
                    })
                };
                let guard = enable_stats()?;
                let before = read(&noop_in, &noop_eg)?;
                let res = load(&topo);
                let after = read(&noop_in, &noop_eg)?;
                drop(guard);
                noop_in.detach(a).map_err(attach_err)?;
                noop_eg.detach(b).map_err(attach_err)?;
                res?;
                this.noop = after.since(before);
            }
        }
        info!(
            round,
            from_ct_ns = this.berth.from_ct.ns_per_run(),
            to_ct_ns = this.berth.to_ct.ns_per_run(),
            "cost round done"
        );
        rounds.push(this);
    }
    let berth = rounds
        .iter()
        .fold(HookStats::default(), |a, r| a.add(r.berth));
    let floor = rounds
        .iter()
        .fold(HookStats::default(), |a, r| a.add(r.noop));
    drop((noop_in, noop_eg));
    for p in &noop_paths {
        let _ = std::fs::remove_file(p);
    }

    let cost = |b: ProgStats, n: ProgStats| HookCost {
        runs: b.run_cnt,
        ns_per_run: b.ns_per_run(),
        noop_runs: n.run_cnt,
        noop_ns_per_run: n.ns_per_run(),
    };
    let from_ct = cost(berth.from_ct, floor.from_ct);
    let to_ct = cost(berth.to_ct, floor.to_ct);
    // Leave the programs attached for the throughput phase's first state change.
    dp.attach(ifindex, cfg)?;

    // Throughput, interleaved ABBA so that drift (thermal, neighbours) hits both alike.
    let secs = opts.seconds.to_string();
    let mut throughput = Vec::new();
    for (direction, extra) in [("CT → host", None), ("host → CT", Some("-R"))] {
        let mut t = Throughput {
            direction,
            with_programs: Vec::new(),
            without_programs: Vec::new(),
        };
        for i in 0..opts.runs {
            let order = if i % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for with in order {
                if with {
                    dp.attach(ifindex, cfg)?;
                } else {
                    dp.detach(ifindex)?;
                }
                let mut args = vec!["-t", secs.as_str()];
                args.extend(extra);
                let gbps = topo.iperf(&args)?;
                if with {
                    t.with_programs.push(gbps);
                } else {
                    t.without_programs.push(gbps);
                }
            }
        }
        throughput.push(t);
    }
    // The counters saw the traffic: a sanity check that the measured programs did work.
    let counted: u64 = dp
        .counters()?
        .iter()
        .filter(|r| r.ctid == BENCH_CTID)
        .map(|r| r.packets)
        .sum();
    if counted == 0 {
        return Err(BenchError::Command {
            cmd: "datapath counters".to_owned(),
            detail: "the programs counted nothing during the benchmark".to_owned(),
        });
    }
    drop(dp);
    drop(in_host);
    let report = Report {
        kernel: kernel_release(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        attach_method: method,
        options: opts.clone(),
        floor_probe,
        from_ct,
        to_ct,
        rounds,
        throughput,
    };
    drop(topo);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratio() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let t = Throughput {
            direction: "x",
            with_programs: vec![9.8, 10.0, 9.9, 1.0, 9.7],
            without_programs: vec![10.0, 10.1, 9.9, 10.0, 10.2],
        };
        assert!((t.ratio_of_medians() - 9.8 / 10.0).abs() < 1e-9);
        // Pairs: 0.98, 0.990, 1.0, 0.1 (the outlier), 0.951 → median 0.98.
        assert!((t.ratio() - 0.98).abs() < 1e-9);
        // Drift that hits both runs of a pair alike cancels out of the paired ratios.
        let drift = Throughput {
            direction: "x",
            with_programs: vec![10.0, 5.0, 10.0, 5.0, 10.0],
            without_programs: vec![10.0, 5.0, 10.0, 5.0, 10.0],
        };
        assert_eq!(drift.ratio(), 1.0);
    }

    #[test]
    fn too_few_runs_is_refused() {
        let opts = BenchOptions {
            runs: 3,
            ..BenchOptions::default()
        };
        let err = run_datapath_bench(&opts).unwrap_err();
        assert!(err.to_string().contains("at least 5 runs"), "{err}");
    }
}
