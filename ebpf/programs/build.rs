//! Code generation flags for bpf-linker (aya-build fixes RUSTFLAGS, so they go here; rustc
//! already passes `--cpu`).
//!
//! * `+allows-misaligned-mem-access` (LLVM >= 22): packet fields at unaligned offsets (IPv4
//!   addresses sit at offset 26 of the frame) load as one word instead of byte by byte. The
//!   executed path's size matters: under load the JIT-ed code is evicted from the i-cache
//!   between packets, so every extra cache line of instructions costs a miss. The verifier
//!   accepts misaligned packet and map-value access on architectures with efficient
//!   unaligned access (x86-64, arm64: `CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS`).
fn main() {
    println!("cargo:rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
    println!("cargo:rerun-if-changed=build.rs");
}
