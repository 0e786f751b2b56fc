//! Builds the eBPF object (`ebpf/programs`, package `berth-ebpf`) with aya-build: nightly cargo,
//! `-Z build-std=core`, target bpfel-unknown-none, linked by bpf-linker. The object lands in
//! `$OUT_DIR/berth-ebpf` and is embedded once, in `bpf` (src/bpf/mod.rs), for the datapath and
//! the shaper alike.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (clippy, doc, machines without the BPF toolchain):
//! an empty placeholder is embedded instead, and loading the datapath or the shaper then fails
//! with `BpfError::NotBuilt`.

use std::{env, fs, io, path::PathBuf};

fn main() -> aya_build::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let programs = manifest_dir.join("../ebpf/programs");
    let common = manifest_dir.join("../ebpf/common");
    // The programs are a separate cargo invocation, not a dependency: cargo would not notice
    // edits to the shared types without this.
    println!("cargo:rerun-if-changed={}", common.display());

    let skip = env::var("AYA_BUILD_SKIP")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        println!("cargo:rerun-if-changed={}", programs.display());
        let out = PathBuf::from(env::var("OUT_DIR")?).join("berth-ebpf");
        fs::write(&out, [])?;
        return Ok(());
    }

    let programs = programs.to_str().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("eBPF package path {} is not UTF-8", programs.display()),
        )
    })?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "berth-ebpf",
            root_dir: programs,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
