//! Project tasks: `cargo xtask test | demo | bench <name> | fuzz | soak | install | man`.

mod bench;
mod demo;
mod fuzz;
mod install;
mod skips;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything CI checks: fmt, clippy, unit tests, privileged end-to-end tests (needs root).
    Test {
        /// Only run privileged tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Build, make the busybox template, boot demo CTs and show `berth list`; `--stop` tears
    /// it all down again.
    Demo {
        /// The demo's berth state directory.
        #[arg(long, default_value = "/var/lib/berth")]
        root: PathBuf,
        /// Tear the demo down: its berthd, CTs, template, network namespace and datapath pins.
        #[arg(long)]
        stop: bool,
        /// Use the debug build (faster to build).
        #[arg(long)]
        debug: bool,
    },
    /// Install berth, berthd, vzctl, vzlist, the man pages and the shell completions under
    /// PREFIX (release build; idempotent).
    Install {
        /// Where bin/ and share/ are.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Install the debug build instead (faster to build; for tests).
        #[arg(long)]
        debug: bool,
    },
    /// Write the man pages of every berth command into DIR.
    Man {
        /// The directory the pages are written to.
        #[arg(default_value = "target/man")]
        dir: PathBuf,
        /// Generate with the debug build.
        #[arg(long)]
        debug: bool,
    },
    /// Runs the cargo-fuzz targets (fuzz/, nightly) from their corpus, each for `--seconds`.
    Fuzz {
        /// Only this target (default: all of them).
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value_t = 300)]
        seconds: u32,
    },
    /// The soak: random lifecycle operations and traffic on `--cts` CTs for `--minutes`, with
    /// berthd killed and restarted at random; ends with the ledger checked against the kernel's
    /// counters and a leak check (tests/tests/soak.rs; `BERTH_TEST_SEED` replays a run).
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        #[arg(long, default_value_t = 50)]
        cts: u64,
    },
    /// Benchmarks with a control measured in the same run: `bench <name> [options]` runs
    /// berth-bench (bench/); `bench --help` lists them.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let st = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Crates built for the host (ebpf/programs only builds for bpfel through aya-build).
const HOST_CRATES: &[&str] = &[
    "berth-common",
    "berth-runtime",
    "berth",
    "berth-testbed",
    "berth-tests",
    "berth-bench",
    "xtask",
];

pub fn build_release() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "berth", "--bins"]))?;
    Ok(workspace_root().join("target/release"))
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test { filter } => test(filter),
        Cmd::Demo { root, stop, debug } => {
            if stop {
                demo::stop(&root, debug)
            } else {
                demo(&root, debug)
            }
        }
        Cmd::Bench { args } => bench::run_bench(&args),
        Cmd::Soak { minutes, cts } => soak(minutes, cts),
        Cmd::Install { prefix, debug } => install::install(&prefix, debug),
        Cmd::Man { dir, debug } => install::man(&workspace_root().join(dir), debug),
        Cmd::Fuzz { target, seconds } => match target {
            Some(t) => fuzz::fuzz(&[t.as_str()], seconds, fuzz::Build::Thorough),
            None => fuzz::fuzz(fuzz::TARGETS, seconds, fuzz::Build::Thorough),
        },
    }
}

fn test(filter: Option<String>) -> Result<()> {
    if !nix_is_root() {
        bail!("the end-to-end tests need root (real namespaces, cgroups, eBPF)");
    }
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    let mut clippy = cargo();
    clippy.arg("clippy").arg("--all-targets");
    for c in HOST_CRATES {
        clippy.args(["-p", c]);
    }
    clippy.args(["--", "-D", "warnings"]);
    run(&mut clippy)?;
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "berth-ebpf",
        "--exclude",
        "berth-tests",
    ]))?;
    // The parsers against a short burst of fuzzing; a filtered run is someone's own e2e tests,
    // so it fuzzes only when asked by name (`cargo xtask test --filter fuzz`).
    if filter.as_deref().is_none_or(|f| f == "fuzz") {
        fuzz::fuzz(fuzz::TARGETS, fuzz::SHORT_SECONDS, fuzz::Build::Quick)?;
    }
    // With the crash points of tests/tests/crashpoints.rs: inert unless FAILPOINTS is set.
    // berth-tests depends on berth with the same feature, so its build reuses this one.
    run(cargo().args(["build", "-p", "berth", "--bins", "--features", "failpoints"]))?;
    let bin = workspace_root().join("target/debug");
    print_free_space("before the end-to-end tests");
    let skip_log = skips::log_path();
    let _ = std::fs::remove_file(&skip_log);
    let mut e2e = cargo();
    // Every test file runs even after one fails, so a red run names every failure at once.
    e2e.args(["test", "-p", "berth-tests", "--no-fail-fast"])
        .env("BERTH_BIN_DIR", &bin)
        .env("BERTH_SKIP_LOG", &skip_log)
        .arg("--")
        .arg("--test-threads=1");
    if let Some(f) = filter {
        e2e.arg(f);
    }
    let result = run(&mut e2e);
    // Whatever the outcome: the tests that did not run here, and why.
    let root = workspace_root();
    let mut skipped = skips::recorded(&skip_log)?;
    let _ = std::fs::remove_file(&skip_log);
    skipped.extend(skips::ignored(&[
        root.join("tests"),
        root.join("runtime/src"),
        root.join("userspace/src"),
    ])?);
    print!("{}", skips::report(&skipped));
    print_free_space("after the end-to-end tests");
    result
}

/// Free space where the tests write (their temporary roots, the build): a run on a nearly full
/// disk fails in ways that look like bugs (an import refused, PostgreSQL stalling), so the log
/// says how much there was.
fn print_free_space(when: &str) {
    let tmp = std::env::temp_dir();
    for dir in [tmp.as_path(), workspace_root().as_path()] {
        match nix::sys::statvfs::statvfs(dir) {
            Ok(s) => {
                let free = s.blocks_available() * s.fragment_size();
                println!("disk {when}: {} MiB free in {}", free >> 20, dir.display());
                if free < 2 << 30 {
                    println!(
                        "warning: less than 2 GiB free in {}: tests that import, ship or checkpoint may fail for want of space",
                        dir.display()
                    );
                }
            }
            Err(e) => println!("disk {when}: statvfs {}: {e}", dir.display()),
        }
    }
}

fn soak(minutes: u64, cts: u64) -> Result<()> {
    if !nix_is_root() {
        bail!("the soak needs root (real namespaces, cgroups, eBPF)");
    }
    if minutes == 0 || !(1..=150).contains(&cts) {
        bail!("--minutes must be at least 1 and --cts 1..=150 (one routed /24 of addresses)");
    }
    run(cargo().args(["build", "-p", "berth", "--bins"]))?;
    let mut t = cargo();
    t.args(["test", "-p", "berth-tests", "--test", "soak"])
        .env("BERTH_BIN_DIR", workspace_root().join("target/debug"))
        .env("BERTH_SOAK_MINUTES", minutes.to_string())
        .env("BERTH_SOAK_CTS", cts.to_string())
        .args(["--", "--ignored", "--nocapture", "--exact", "soak"]);
    run(&mut t)
}

pub fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Network namespace holding the demo CTs' host-side links and routes, so the demo never
/// touches the machine's own interfaces, routes or neighbour tables.
pub const DEMO_NETNS: &str = "berth-demo";

/// Makes `c` run in the network namespace `ns` names (setns between fork and exec).
pub fn enter_netns(c: &mut Command, ns: PathBuf) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setns on a freshly opened fd, between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let f = std::fs::File::open(&ns)?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
}

fn demo(root: &Path, debug: bool) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let dir = if debug {
        run(cargo().args(["build", "-p", "berth", "--bins"]))?;
        workspace_root().join("target/debug")
    } else {
        let dir = build_release()?;
        // The README's first command is the hoster's install: berth, berthd, the vzctl/vzlist
        // wrappers, man pages and completions into /usr/local (the boot unit runs
        // /usr/local/bin/berth). The debug demo is a developer's and installs nothing.
        install::install(Path::new("/usr/local"), false)?;
        dir
    };
    let bin = dir.join("berth");
    if !root.exists() {
        // The root is the demo's own: `demo --stop` may remove it whole (ledger included).
        std::fs::create_dir_all(root)?;
        std::fs::write(root.join(demo::OWN_ROOT), "made by cargo xtask demo\n")?;
    }
    let netns = PathBuf::from(format!("/run/netns/{DEMO_NETNS}"));
    if !netns.exists() {
        run(Command::new("ip").args(["netns", "add", DEMO_NETNS]))?;
        run(Command::new("ip").args(["-n", DEMO_NETNS, "link", "set", "lo", "up"]))?;
        // The demo's stand-in uplink: a veth pair holding the CTs' network, inside the netns.
        run(Command::new("ip").args([
            "-n", DEMO_NETNS, "link", "add", "up0", "type", "veth", "peer", "name", "up1",
        ]))?;
        run(Command::new("ip").args([
            "-n",
            DEMO_NETNS,
            "addr",
            "add",
            "192.0.2.1/24",
            "dev",
            "up0",
        ]))?;
        run(Command::new("ip").args(["-n", DEMO_NETNS, "link", "set", "up0", "up"]))?;
        run(Command::new("ip").args(["-n", DEMO_NETNS, "link", "set", "up1", "up"]))?;
    }
    // berth runs with its network namespace set to the demo's (setns, not `ip netns exec`,
    // which would hide bpffs); berthd stays in the host's, on loopback.
    let berth_cmd = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg("--root").arg(root).args(args);
        enter_netns(&mut c, netns.clone());
        c
    };
    let berth = |args: &[&str]| run(&mut berth_cmd(args));
    let out = |args: &[&str]| -> String {
        berth_cmd(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    if !out(&["template", "list", "--json"]).contains("\"busybox\"") {
        berth(&["template", "build", "busybox"])?;
    }
    for (ctid, name, ip) in [
        ("101", "demo1", "192.0.2.101"),
        ("102", "demo2", "192.0.2.102"),
    ] {
        if !root.join("conf").join(format!("{ctid}.toml")).exists() {
            berth(&[
                "create",
                ctid,
                "--template",
                "busybox",
                "--name",
                name,
                "--hostname",
                &format!("{name}.berth.test"),
                "--ipadd",
                ip,
            ])?;
            berth(&[
                "set",
                ctid,
                "--memory",
                "256M",
                "--numproc",
                "200",
                "--save",
            ])?;
        }
        if !out(&["status", ctid, "--json"]).contains("\"running\"") {
            berth(&["start", ctid])?;
        }
    }
    // Steady traffic between the pair, so the counters move: ping runs on inside the CT.
    berth(&[
        "exec",
        "101",
        "--",
        "sh",
        "-c",
        "pidof ping >/dev/null || (ping -q -s 1000 -i 0.2 192.0.2.102 >/dev/null 2>&1 &)",
    ])?;
    berth(&[
        "exec",
        "102",
        "--",
        "sh",
        "-c",
        "pidof ping >/dev/null || (ping -q -i 0.5 192.0.2.101 >/dev/null 2>&1 &)",
    ])?;
    berth(&[
        "exec",
        "101",
        "--",
        "sh",
        "-c",
        "echo hello from $(hostname), PID $$",
    ])?;

    // berthd, detached, unless one already answers.
    let listen = "127.0.0.1:9597";
    let up = std::net::TcpStream::connect(listen).is_ok();
    if !up {
        let log = root.join("berthd.log");
        std::fs::create_dir_all(root)?;
        let mut d = Command::new(dir.join("berthd"));
        d.arg("--root").arg(root).arg("--listen").arg(listen);
        d.stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?);
        // SAFETY: setsid between fork and exec, so berthd outlives this command's session.
        unsafe {
            d.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = d.spawn().context("start berthd")?;
        // `demo --stop` ends this PID (and only this one).
        std::fs::write(root.join(demo::BERTHD_PID), format!("{}\n", child.id()))?;
        eprintln!(
            "demo: berthd started (PID {}), log {}",
            child.id(),
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(1500));
    }
    berth(&[
        "list",
        "-a",
        "-o",
        "ctid,name,hostname,status,ip,numproc,memory,traffic.in,traffic.out",
    ])?;
    berth(&["netstat"])?;
    println!(
        "\nmetrics: http://{listen}/metrics  (e.g. curl -s http://{listen}/metrics | grep 'ctid=\"101\"')"
    );
    eprintln!(
        "demo: CTs 101 and 102 run under {root} with their host side in netns {DEMO_NETNS}. Try:\n  {b} --root {root} enter 101\n  nsenter --net=/run/netns/{DEMO_NETNS} {b} --root {root} netstat",
        root = root.display(),
        b = bin.display(),
    );
    Ok(())
}
