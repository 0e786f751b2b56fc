//! The small static C helpers the tests build (tests/probes/*.c), for what busybox has no tool
//! for: they run inside CTs, so they are linked statically against nothing of the template's.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles `src` into the static binary `out` with the system's C compiler (warnings are errors).
pub fn build_static(src: &Path, out: &Path) {
    let st = Command::new("cc")
        .args(["-static", "-O1", "-Wall", "-Werror", "-o"])
        .arg(out)
        .arg(src)
        .status()
        .expect("cc (build-essential, installed by xtask/setup.sh)");
    assert!(st.success(), "building {}: {st}", src.display());
}

/// Builds tests/probes/`name`.c into `dir/name-probe`.
pub fn build(name: &str, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("probes/{name}.c"));
    let out = dir.join(format!("{name}-probe"));
    build_static(&src, &out);
    out
}
