//! `bench start`: create → start → stop --fast → destroy of a busybox CT as whole CLI
//! processes (the release `berth` in `BERTH_BIN_DIR`), against crun's create → start → kill →
//! delete on a copy of the same rootfs, interleaved so both see the same machine noise.
//!
//! `--baseline DIR` adds the same cycle with the `berth` in DIR (another build, e.g. the commit
//! before a refactor), as an installation of its own (root, pin dir, cgroup parent), in every
//! round: the ratio this/baseline is taken pair by pair, in alternating order, so drift of
//! the machine cancels.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::stats::{ms, summarize};

#[derive(Args)]
pub struct StartArgs {
    /// Measured cycles (after 3 warm-up cycles).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    cycles: u64,
    /// Give every berth CT a routed IPv4 + IPv6 address (venet setup, proxy ARP/NDP, eBPF
    /// attach) — in a network namespace of the benchmark's own.
    #[arg(long)]
    routed: bool,
    /// A directory holding another build's `berth`, cycled alongside this one (A/B).
    #[arg(long)]
    baseline: Option<PathBuf>,
}

pub fn run(a: &StartArgs) -> Result<()> {
    crate::require_root("start", "namespaces, cgroups, mounts")?;
    let bin = berth_tests::ct::bin_dir().join("berth");
    if !bin.exists() {
        bail!(
            "{} missing: `cargo xtask bench start` builds it (or set BERTH_BIN_DIR)",
            bin.display()
        );
    }
    let baseline = match &a.baseline {
        Some(dir) => {
            let b = dir.join("berth");
            if !b.exists() {
                bail!("--baseline {}: no berth binary there", dir.display());
            }
            Some(b)
        }
        None => None,
    };
    start(
        &bin,
        baseline.as_deref(),
        usize::try_from(a.cycles)?,
        a.routed,
    )
}

/// One berth installation of the benchmark: its binary, root, run dir, pin dir and cgroup
/// parent, so two builds never share pins (each would upgrade the other's programs).
pub(crate) struct Install {
    pub(crate) bin: PathBuf,
    pub(crate) root: PathBuf,
    pub(crate) run_dir: PathBuf,
    pub(crate) pin_dir: PathBuf,
    pub(crate) cg_parent: String,
}

impl Install {
    pub(crate) fn new(bin: &Path, tmp: &Path, tag: &str) -> Self {
        let id = format!("berth-bench-{}{tag}", std::process::id());
        Self {
            bin: bin.to_owned(),
            root: tmp.join(format!("berth{tag}")),
            // Run state on tmpfs, as with the default /run/berth; the CTs' files stay on disk.
            run_dir: PathBuf::from(format!("/run/{id}")),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{id}")),
            cg_parent: id,
        }
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root")
            .arg(&self.root)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--bpffs")
            .arg(&self.pin_dir)
            .arg("--cgroup-parent")
            .arg(&self.cg_parent)
            .args(args);
        c
    }

    /// create → start → stop --fast → destroy of CT `ctid` (with two routed addresses).
    fn cycle(&self, ctid: &str, addrs: Option<(&str, &str)>) -> Result<std::time::Duration> {
        let t0 = Instant::now();
        match addrs {
            Some((v4, v6)) => quiet(&mut self.cmd(&[
                "create",
                ctid,
                "--template",
                "busybox",
                "--ipadd",
                v4,
                "--ipadd",
                v6,
            ]))?,
            None => quiet(&mut self.cmd(&["create", ctid, "--template", "busybox"]))?,
        }
        quiet(&mut self.cmd(&["start", ctid]))?;
        quiet(&mut self.cmd(&["stop", "--fast", ctid]))?;
        quiet(&mut self.cmd(&["destroy", ctid]))?;
        Ok(t0.elapsed())
    }

    pub(crate) fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Ok(d) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in d.flatten() {
                let _ = std::fs::remove_dir(h.path().join(&self.cg_parent));
            }
        }
    }
}

/// Runs a command with stdio detached. stderr goes to a file, not a pipe: crun's container
/// init inherits it, and a pipe would only reach EOF when the container exits.
pub(crate) fn quiet(cmd: &mut Command) -> Result<()> {
    use std::io::{Read, Seek};
    // Unnamed (O_TMPFILE or unlinked): nothing is left in /tmp.
    let mut errf = tempfile::tempfile()?;
    let st = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(errf.try_clone()?)
        .status()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !st.success() {
        let mut err = String::new();
        let _ = errf.rewind().and_then(|()| errf.read_to_string(&mut err));
        bail!("{cmd:?} failed: {st}: {err}");
    }
    Ok(())
}

/// crun 1.8 refuses hybrid hosts whose cgroup2 mount holds a controller ("cgroups in hybrid
/// mode not supported"; here: hugetlb). The benchmark therefore runs in a private mount
/// namespace whose /sys/fs/cgroup is a fresh tmpfs holding bind mounts of the v1 hierarchies
/// only: the host's mounts are not touched, and crun then manages v1 cgroups exactly like
/// berth does, so both pay the same kernel cgroup costs.
pub(crate) fn hide_unified_cgroup2() -> Result<()> {
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

fn start(bin: &Path, baseline: Option<&Path>, cycles: usize, routed: bool) -> Result<()> {
    hide_unified_cgroup2()?;
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
    let this = Install::new(bin, &tmp, "");
    let base = baseline.map(|b| Install::new(b, &tmp, "-base"));
    let installs: Vec<&Install> = std::iter::once(&this).chain(base.as_ref()).collect();
    for inst in &installs {
        quiet(&mut inst.cmd(&["template", "build", "busybox"]))?;
    }

    // crun control: an OCI bundle on a copy of the very same busybox rootfs.
    let bundle = tmp.join("bundle");
    std::fs::create_dir_all(&bundle)?;
    quiet(
        Command::new("cp")
            .arg("-a")
            .arg(this.root.join("template/busybox/rootfs"))
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
        for (k, inst) in installs.iter().enumerate() {
            let ctid = (999 - k).to_string();
            let addr = format!("198.19.255.{}", 254 - k);
            quiet(&mut inst.cmd(&["create", &ctid, "--template", "busybox", "--ipadd", &addr]))?;
            quiet(&mut inst.cmd(&["start", &ctid]))?;
        }
    }
    let mut berth_t = Vec::with_capacity(cycles);
    let mut base_t = Vec::with_capacity(cycles);
    let mut ratios = Vec::with_capacity(cycles);
    let mut crun_t = Vec::with_capacity(cycles);
    // Interleaved so all see the same machine noise.
    for i in 0..cycles + 3 {
        let ctid = (1000 + i).to_string();
        // Each installation's CTs get addresses of their own half of 198.18.0.0/15.
        let addrs = |half: usize| {
            (
                format!("198.{}.{}.{}", 18 + half, (i / 250) % 250, 2 + i % 250),
                format!("2001:db8:18::{:x}", 0x100 + i + half * 0x8000),
            )
        };
        let (v4, v6) = addrs(0);
        let run_this = || this.cycle(&ctid, routed.then_some((v4.as_str(), v6.as_str())));
        let (b, bb) = match &base {
            None => (run_this()?, None),
            Some(base) => {
                let (bv4, bv6) = addrs(1);
                let run_base = || base.cycle(&ctid, routed.then_some((bv4.as_str(), bv6.as_str())));
                // ABBA: the order alternates, so drift within a round hits both alike. The
                // kernel frees a stopped CT's netns and veths asynchronously (cleanup_net,
                // ~0.5 ms per device here); back to back, one build's start would pay for the
                // other's stop. A pause before each cycle (crun's cycle gives the same pause
                // in the single-build run) keeps the pairs independent of their order.
                let settle = || std::thread::sleep(std::time::Duration::from_millis(30));
                settle();
                if i % 2 == 0 {
                    let b = run_this()?;
                    settle();
                    (b, Some(run_base()?))
                } else {
                    let bb = run_base()?;
                    settle();
                    (run_this()?, Some(bb))
                }
            }
        };

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
            if let Some(bb) = bb {
                base_t.push(bb);
                ratios.push(b.as_secs_f64() / bb.as_secs_f64());
            }
        }
    }
    if routed {
        for (k, inst) in installs.iter().enumerate() {
            let ctid = (999 - k).to_string();
            quiet(&mut inst.cmd(&["stop", "--fast", &ctid]))?;
            quiet(&mut inst.cmd(&["destroy", &ctid]))?;
        }
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
    if !base_t.is_empty() {
        let bs = summarize(base_t);
        ratios.sort_by(f64::total_cmp);
        let med = crate::stats::quantile(&ratios, 0.5);
        println!(
            "  baseline ({}): p50 {:.2} ms  p99 {:.2} ms  (min {:.2}, max {:.2})",
            baseline
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ms(bs.p50),
            ms(bs.p99),
            ms(bs.min),
            ms(bs.max)
        );
        println!(
            "  ratio this/baseline: median of pairs {:.3} (pairs {:.3}..{:.3}; p25 {:.3}, p75 {:.3}); p50/p50 {:.3}",
            med,
            ratios[0],
            ratios[ratios.len() - 1],
            crate::stats::quantile(&ratios, 0.25),
            crate::stats::quantile(&ratios, 0.75),
            ms(b.p50) / ms(bs.p50)
        );
        println!(
            "  bar: this/baseline <= 1.05: {}",
            if med <= 1.05 { "PASS" } else { "FAIL" }
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    for inst in &installs {
        inst.cleanup();
    }
    Ok(())
}

pub(crate) fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

pub(crate) fn tempdir() -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("berth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
