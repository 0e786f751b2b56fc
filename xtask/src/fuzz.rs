//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/ (a workspace of its own, built with
//! nightly), each run for a while from its checked-in corpus; `cargo xtask test` runs each briefly.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::workspace_root;

/// Every target in fuzz/Cargo.toml, in the order they run.
pub const TARGETS: &[&str] = &[
    "ct_config",
    "vz_conf",
    "networks_classes",
    "sizes",
    "tar_import",
    "netlink",
];

/// Seconds per target in `cargo xtask test`: six targets plus one build stay under 3 minutes.
pub const SHORT_SECONDS: u32 = 12;

fn cargo_fuzz() -> Command {
    // rustup's proxy picks the toolchain from `+nightly`; the xtask's own CARGO is stable.
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"]);
    c
}

/// Builds the targets, then runs `targets` for `seconds` each. A crash fails the run and leaves
/// its input under fuzz/artifacts/<target>/ (cargo-fuzz prints how to reproduce it).
pub fn fuzz(targets: &[&str], seconds: u32) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(t) {
            bail!(
                "no fuzz target {t:?}; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let dir = workspace_root().join("fuzz");
    let mut build = cargo_fuzz();
    build.arg("build").args(["--debug-assertions"]);
    run_in(&dir, &mut build)?;
    for t in targets {
        let corpus = dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let mut c = cargo_fuzz();
        c.args(["run", "--debug-assertions", t])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // Bounds one input, so a hang shows as a failure rather than a stuck run.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1");
        run_in(&dir, &mut c)?;
    }
    Ok(())
}

fn run_in(dir: &Path, cmd: &mut Command) -> Result<()> {
    cmd.current_dir(dir);
    eprintln!("xtask: {cmd:?} (in {})", dir.display());
    let st = cmd.status()?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}
