//! `bench start`: create → start → stop --fast → destroy of a busybox CT as whole CLI
//! processes (the release `berth` in `BERTH_BIN_DIR`), against crun's create → start → kill →
//! delete on a copy of the same rootfs, interleaved so both see the same machine noise.

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
    start(&bin, usize::try_from(a.cycles)?, a.routed)
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

fn start(bin: &Path, cycles: usize, routed: bool) -> Result<()> {
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
        let mut c = Command::new(bin);
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
