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

/// Seconds per target in `cargo xtask test`: six targets plus one unoptimised build stay
/// under 3 minutes.
pub const SHORT_SECONDS: u32 = 12;

/// How the targets are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// Optimised and under AddressSanitizer: `cargo xtask fuzz`, where the run is long enough
    /// for the build (~12 min on 2 vCPUs) to pay off.
    Thorough,
    /// Unoptimised, no sanitizer, debug assertions on: the short run in `cargo xtask test`,
    /// whose worth is replaying the corpus and a few seconds of search, so the build must be cheap.
    Quick,
}

impl Build {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Build::Thorough => &["--debug-assertions"],
            Build::Quick => &["--debug-assertions", "--dev", "--sanitizer", "none"],
        }
    }
}

fn cargo_fuzz() -> Command {
    // rustup's proxy picks the toolchain from `+nightly`; the xtask's own CARGO is stable.
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"]);
    // No target loads the datapath, so the eBPF objects (a nightly build of their own through
    // userspace/build.rs) are not needed inside the fuzz binaries.
    c.env("AYA_BUILD_SKIP", "1");
    c
}

/// Builds the targets, then runs `targets` for `seconds` each. A crash fails the run and leaves
/// its input under fuzz/artifacts/<target>/ (cargo-fuzz prints how to reproduce it).
pub fn fuzz(targets: &[&str], seconds: u32, how: Build) -> Result<()> {
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
    // `run` must get the same flags, or cargo-fuzz rebuilds the targets another way.
    build.arg("build").args(how.flags());
    run_in(&dir, &mut build)?;
    for t in targets {
        let corpus = dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let mut c = cargo_fuzz();
        c.arg("run")
            .args(how.flags())
            .arg(t)
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
