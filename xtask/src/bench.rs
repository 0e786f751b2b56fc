//! `cargo xtask bench <name> [options]`: the benchmarks live in bench/ (crate `berth-bench`,
//! outside the default members so a plain build never compiles them). This builds it with
//! berth's release binaries, which the start and metrics benchmarks drive as whole processes,
//! and runs `berth-bench <name> [options]` with `BERTH_BIN_DIR` pointing at them.
//! `cargo xtask bench --help` lists the benchmarks.

use std::ffi::OsString;
use std::process::Command;

use anyhow::Result;

use crate::{cargo, run, workspace_root};

pub fn run_bench(args: &[OsString]) -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "berth",
        "--bins",
        "-p",
        "berth-bench",
    ]))?;
    let dir = workspace_root().join("target/release");
    run(Command::new(dir.join("berth-bench"))
        .args(args)
        .env("BERTH_BIN_DIR", &dir))
}
