//! Benchmarks that print ratios against a control measured in the same run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::build_release;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// create → start → stop → destroy of a busybox CT, berth vs crun on the same rootfs.
    Start {
        #[arg(long, default_value_t = 60)]
        cycles: usize,
        /// Give every berth CT a routed IPv4 + IPv6 address (venet setup, proxy ARP/NDP, eBPF
        /// attach) — in a network namespace of the benchmark's own.
        #[arg(long)]
        routed: bool,
    },
    /// eBPF datapath: per-packet cost under iperf3 load (bpf_stats) and single-stream
    /// throughput with vs without the programs.
    Datapath(crate::bench_datapath::DatapathArgs),
    /// berthd /metrics with 1000 synthetic CTs: p50/p99 scrape time, RSS, series per CT.
    Metrics(crate::bench_metrics::MetricsArgs),
    /// Shaper: iperf3 goodput vs a hand-made HTB, isolation, pps accuracy, ping p99 under load.
    Shaper(crate::bench_shaper::ShaperArgs),
    /// Network setup per CT (in-process netlink vs ip(8)) and 1000 CTs up and down.
    Net {
        #[arg(long, default_value_t = 1000)]
        cts: usize,
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Start { cycles, routed } => start(cycles, routed),
        BenchCmd::Datapath(a) => crate::bench_datapath::run_bench(a),
        BenchCmd::Shaper(a) => crate::bench_shaper::run(a),
        BenchCmd::Metrics(a) => crate::bench_metrics::run_bench(a),
        BenchCmd::Net { cts, samples } => {
            crate::run(crate::cargo().args([
                "build",
                "--release",
                "-p",
                "berth-runtime",
                "--example",
                "netbench",
            ]))?;
            crate::run(
                Command::new(crate::workspace_root().join("target/release/examples/netbench"))
                    .arg(cts.to_string())
                    .arg(samples.to_string()),
            )
        }
    }
}

/// Runs a command with stdio detached. stderr goes to a file, not a pipe: crun's container
/// init inherits it, and a pipe would only reach EOF when the container exits.
fn quiet(cmd: &mut Command) -> Result<()> {
    let errf = std::env::temp_dir().join(format!("berth-bench-{}.stderr", std::process::id()));
    let st = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errf)?)
        .status()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !st.success() {
        let err = std::fs::read_to_string(&errf).unwrap_or_default();
        bail!("{cmd:?} failed: {st}: {err}");
    }
    Ok(())
}

pub struct Summary {
    pub p50: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
}

pub fn summarize(mut v: Vec<Duration>) -> Summary {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Summary {
        p50: at(0.5),
        p99: at(0.99),
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// crun 1.8 refuses hybrid hosts whose cgroup2 mount holds a controller ("cgroups in hybrid
/// mode not supported"; here: hugetlb). The benchmark therefore runs in a private mount
/// namespace whose /sys/fs/cgroup is a fresh tmpfs holding bind mounts of the v1 hierarchies
/// only: the host's mounts are not touched, and crun then manages v1 cgroups exactly like
/// berth does, so both pay the same kernel cgroup costs.
fn hide_unified_cgroup2() -> Result<()> {
    use nix::mount::{MsFlags, mount};
    use std::os::fd::AsRawFd;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare mount namespace")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / private in the benchmark's mount namespace")?;
    let base = Path::new("/sys/fs/cgroup");
    let mut keep = Vec::new();
    for e in std::fs::read_dir(base)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "unified" || !e.path().join("cgroup.procs").exists() {
            continue;
        }
        // O_PATH handles keep the hierarchies reachable after the tmpfs covers them.
        let f = std::fs::File::open(e.path())?;
        keep.push((name, f));
    }
    mount(
        Some("tmpfs"),
        base,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=755"),
    )
    .context("cover /sys/fs/cgroup in the benchmark's mount namespace")?;
    for (name, f) in &keep {
        let target = base.join(name);
        std::fs::create_dir_all(&target)?;
        let src = format!("/proc/self/fd/{}", f.as_raw_fd());
        mount(
            Some(src.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind cgroup hierarchy {name}"))?;
    }
    Ok(())
}

fn start(cycles: usize, routed: bool) -> Result<()> {
    let bin = build_release()?.join("berth");
    hide_unified_cgroup2()?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/berth-bench-{}", std::process::id()));
    if routed {
        // The CTs' venet links, routes and proxy entries go into a network namespace of the
        // benchmark's own, with a dummy "uplink" device holding the test network.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare netns")?;
        quiet(Command::new("ip").args(["link", "set", "lo", "up"]))?;
        // No dummy driver on this kernel: one end of a veth pair stands in for the uplink.
        quiet(
            Command::new("ip").args(["link", "add", "up0", "type", "veth", "peer", "name", "up1"]),
        )?;
        quiet(Command::new("ip").args(["link", "set", "up1", "up"]))?;
        quiet(Command::new("ip").args(["addr", "add", "198.18.0.1/15", "dev", "up0"]))?;
        quiet(Command::new("ip").args([
            "addr",
            "add",
            "2001:db8:18::1/64",
            "dev",
            "up0",
            "nodad",
        ]))?;
        quiet(Command::new("ip").args(["link", "set", "up0", "up"]))?;
    }
    let crun = which("crun").context("crun not installed (xtask/setup.sh installs it)")?;
    let tmp = tempdir()?;
    let root = tmp.join("berth");
    let cg_parent = format!("berth-bench-{}", std::process::id());
    // Run state on tmpfs, as with the default /run/berth; the CTs' files stay on the disk.
    let run_dir = PathBuf::from(format!("/run/berth-bench-{}", std::process::id()));
    let berth = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("--root")
            .arg(&root)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--bpffs")
            .arg(&pin_dir)
            .arg("--cgroup-parent")
            .arg(&cg_parent)
            .args(args);
        c
    };
    quiet(&mut berth(&["template", "build", "busybox"]))?;

    // crun control: an OCI bundle on a copy of the very same busybox rootfs.
    let bundle = tmp.join("bundle");
    std::fs::create_dir_all(&bundle)?;
    quiet(
        Command::new("cp")
            .arg("-a")
            .arg(root.join("template/busybox/rootfs"))
            .arg(bundle.join("rootfs")),
    )?;
    quiet(Command::new(&crun).arg("spec").current_dir(&bundle))?;
    let spec_path = bundle.join("config.json");
    let spec = std::fs::read_to_string(&spec_path)?;
    let spec = spec
        .replace("\"terminal\": true", "\"terminal\": false")
        .replace("\"sh\"", "\"/sbin/init\"")
        .replace("\"readonly\": true", "\"readonly\": false");
    std::fs::write(&spec_path, spec)?;
    let crun_root = tmp.join("crun-state");

    if routed {
        // A hosting node always runs other CTs. Without any, every start would flip the
        // kernel's global TCX ingress/egress static keys on and every stop off again (text
        // patching, 5-12 ms per attach here) — a cost a real node does not pay.
        quiet(&mut berth(&[
            "create",
            "999",
            "--template",
            "busybox",
            "--ipadd",
            "198.19.255.254",
        ]))?;
        quiet(&mut berth(&["start", "999"]))?;
    }
    let mut berth_t = Vec::with_capacity(cycles);
    let mut crun_t = Vec::with_capacity(cycles);
    // Interleaved so both see the same machine noise.
    for i in 0..cycles + 3 {
        let ctid = (1000 + i).to_string();
        let t0 = Instant::now();
        if routed {
            let v4 = format!("198.18.{}.{}", (i / 250) % 250, 2 + i % 250);
            let v6 = format!("2001:db8:18::{:x}", 0x100 + i);
            quiet(&mut berth(&[
                "create",
                &ctid,
                "--template",
                "busybox",
                "--ipadd",
                &v4,
                "--ipadd",
                &v6,
            ]))?;
        } else {
            quiet(&mut berth(&["create", &ctid, "--template", "busybox"]))?;
        }
        quiet(&mut berth(&["start", &ctid]))?;
        quiet(&mut berth(&["stop", "--fast", &ctid]))?;
        quiet(&mut berth(&["destroy", &ctid]))?;
        let b = t0.elapsed();

        let id = format!("bench{}-{i}", std::process::id());
        let c = |args: &[&str]| {
            let mut c = Command::new(&crun);
            c.arg("--root")
                .arg(&crun_root)
                .arg("--cgroup-manager=cgroupfs")
                .args(args);
            c
        };
        let t0 = Instant::now();
        quiet(c(&["create", "--bundle"]).arg(&bundle).arg(&id))?;
        quiet(&mut c(&["start", &id]))?;
        quiet(&mut c(&["kill", &id, "KILL"]))?;
        quiet(&mut c(&["delete", "--force", &id]))?;
        let r = t0.elapsed();
        if i >= 3 {
            berth_t.push(b);
            crun_t.push(r);
        }
    }
    if routed {
        quiet(&mut berth(&["stop", "--fast", "999"]))?;
        quiet(&mut berth(&["destroy", "999"]))?;
    }
    let b = summarize(berth_t);
    let c = summarize(crun_t);
    println!(
        "bench start: {cycles} cycles of create→start→stop --fast→destroy (busybox rootfs{}), whole CLI processes",
        if routed {
            ", routed IPv4+IPv6 address with eBPF attach"
        } else {
            ""
        }
    );
    println!(
        "  berth: p50 {:.2} ms  p99 {:.2} ms  (min {:.2}, max {:.2})",
        ms(b.p50),
        ms(b.p99),
        ms(b.min),
        ms(b.max)
    );
    println!(
        "  crun:  p50 {:.2} ms  p99 {:.2} ms  (min {:.2}, max {:.2})  [create→start→kill→delete]",
        ms(c.p50),
        ms(c.p99),
        ms(c.min),
        ms(c.max)
    );
    println!(
        "  ratio berth/crun: p50 {:.3}  p99 {:.3}",
        ms(b.p50) / ms(c.p50),
        ms(b.p99) / ms(c.p99)
    );
    println!(
        "  bar: p50 <= 25 ms: {}; berth/crun <= 1.0: {}",
        if ms(b.p50) <= 25.0 { "PASS" } else { "FAIL" },
        if b.p50 <= c.p50 { "PASS" } else { "FAIL" }
    );
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_dir_all(&pin_dir);
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let _ = std::fs::remove_dir(h.path().join(&cg_parent));
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

fn tempdir() -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("berth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
