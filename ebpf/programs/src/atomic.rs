//! Rate state shared by all CPUs, moved on with compare-and-swap.
//!
//! Rust's BPF target has no atomic read-modify-write in `core::sync::atomic` (its spec says
//! `atomic_cas: false`), but LLVM's BPF backend emits `cmpxchg` (BPF_ATOMIC | BPF_CMPXCHG,
//! kernel 5.12) for the `atomic_cxchg` intrinsic even with the default `generic` CPU, and a
//! legacy XADD for an atomic add whose result is unused. A fetch-add with its result used
//! needs `-mcpu=v3`, which aya-build's fixed RUSTFLAGS cannot pass; neither is needed here.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use berth_common::shaper::CAS_TRIES;

/// A "virtual scheduling" charge on the shared clock word `*t`: the packet starts at
/// `max(*t, now)` unless that is more than `limit` ns after `now` (then `None`, nothing
/// charged), and `*t` moves on to start + `cost`. Returns the start.
///
/// After `CAS_TRIES` lost races (other CPUs charging the same word at this very moment) the
/// cost is added without reading back: the word is busy, the start computed last is close.
///
/// # Safety
///
/// `t` points at an 8-byte aligned word of a map value obtained from a successful lookup.
#[inline(always)]
pub unsafe fn charge(t: *mut u64, now: u64, cost: u64, limit: u64) -> Option<u64> {
    let mut start = now;
    let mut i = 0;
    while i < CAS_TRIES {
        // SAFETY: caller's contract; a torn read is impossible for an aligned u64 on BPF.
        let cur = unsafe { core::ptr::read_volatile(t) };
        start = if cur > now { cur } else { now };
        if start - now > limit {
            return None;
        }
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                t,
                cur,
                start + cost,
            )
        };
        if swapped {
            return Some(start);
        }
        i += 1;
    }
    // SAFETY: as above.
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(t, cost) };
    Some(start)
}
