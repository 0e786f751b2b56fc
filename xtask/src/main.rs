//! Project tasks: `cargo xtask test | demo | bench start`.

mod bench;
mod bench_datapath;
mod bench_metrics;
mod bench_shaper;

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
    /// Build, make the busybox template, boot demo CTs and show `berth list`.
    Demo {
        #[arg(long, default_value = "/var/lib/berth")]
        root: PathBuf,
    },
    /// Benchmarks with a control measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
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
    "berth-tests",
    "xtask",
];

pub fn build_release() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "berth"]))?;
    Ok(workspace_root().join("target/release"))
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Test { filter } => test(filter),
        Cmd::Demo { root } => demo(&root),
        Cmd::Bench(b) => bench::run(b),
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
    run(cargo().args(["build", "-p", "berth", "--bins"]))?;
    let bin = workspace_root().join("target/debug");
    let mut e2e = cargo();
    e2e.args(["test", "-p", "berth-tests"])
        .env("BERTH_BIN_DIR", &bin)
        .arg("--")
        .arg("--test-threads=1");
    if let Some(f) = filter {
        e2e.arg(f);
    }
    run(&mut e2e)
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

fn demo(root: &Path) -> Result<()> {
    let bin = build_release()?.join("berth");
    let berth = |args: &[&str]| -> Result<()> {
        run(Command::new(&bin).arg("--root").arg(root).args(args))
    };
    let has_template = Command::new(&bin)
        .arg("--root")
        .arg(root)
        .args(["template", "list", "--json"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("\"busybox\""))
        .unwrap_or(false);
    if !has_template {
        berth(&["template", "build", "busybox"])?;
    }
    for (ctid, name) in [("101", "demo1"), ("102", "demo2")] {
        let exists = root.join("conf").join(format!("{ctid}.toml")).exists();
        if !exists {
            berth(&[
                "create",
                ctid,
                "--template",
                "busybox",
                "--name",
                name,
                "--hostname",
                &format!("{name}.berth.test"),
            ])?;
        }
        let running = Command::new(&bin)
            .arg("--root")
            .arg(root)
            .args(["status", ctid, "--json"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("\"running\""))
            .unwrap_or(false);
        if !running {
            berth(&["start", ctid])?;
        }
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
    berth(&[
        "exec",
        "101",
        "--",
        "sh",
        "-c",
        "echo hello from $(hostname), PID $$",
    ])?;
    berth(&[
        "list",
        "-a",
        "-o",
        "ctid,name,hostname,status,numproc,memory.usage,memory.limit,cpu.usage",
    ])?;
    eprintln!(
        "\ndemo: CTs 101 and 102 are running under {}. Try:\n  {} --root {} enter 101\n  {} --root {} stop 101",
        root.display(),
        bin.display(),
        root.display(),
        bin.display(),
        root.display()
    );
    Ok(())
}
