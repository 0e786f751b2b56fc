//! berth's tc programs, attached to the host-side interface of every CT (one file per attach
//! point): `ingress.rs` sees what the CT sends, `egress.rs` what is delivered to it. Both count
//! traffic per (CTID, direction, class, family) and drop spoofed packets, counted by reason.
//!
//! No panics (the verifier rejects them), no per-packet logging.
#![no_std]
#![no_main]
// `core::intrinsics::atomic_cxchg`: the BPF target has no CAS in `core::sync::atomic`
// (see atomic.rs); the eBPF crate builds with nightly anyway (build-std).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod account;
mod atomic;
mod edt;
mod egress;
mod impair;
mod ingress;
mod maps;
mod packet;
mod shaper;
mod undelivered;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};

/// The benchmark's reference (`berth_common::program_names::NOOP`): the cost of running any
/// program at all on the hook, which `bpf_stats` includes in every measurement.
#[classifier]
pub fn berth_noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: every access is bounds-checked and nothing unwraps.
    loop {}
}

/// The kernel only allows GPL-compatible programs to call some helpers (none used today, but the
/// license is part of the object's ABI with the kernel).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
