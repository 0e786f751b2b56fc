//! `berth_impair`: the testbed's deterministic loss (see `berth_common::impair`). Not part of
//! berth's datapath: only `berth testbed` attaches it, one loaded copy (with its own two
//! maps) per hook.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};
use berth_common::impair::{ImpairConfig, ImpairStats, drops};

#[map]
pub static IMPAIR_CONFIG: Array<ImpairConfig> = Array::with_max_entries(1, 0);

#[map]
pub static IMPAIR_STATS: Array<ImpairStats> = Array::with_max_entries(1, 0);

// Ethertypes as a native 16-bit load of the packet's bytes sees them.
const ETH_P_IP: u16 = u16::from_ne_bytes([0x08, 0x00]);
const ETH_P_IPV6: u16 = u16::from_ne_bytes([0x86, 0xdd]);

/// Packets numbered under contention: a CAS lost this many times in a row gives up numbering
/// the packet (it passes, uncounted) rather than loop.
const TRIES: u32 = 16;

#[classifier]
pub fn berth_impair(ctx: TcContext) -> i32 {
    let proto: u16 = match ctx.load(12) {
        Ok(p) => p,
        Err(_) => return TC_ACT_UNSPEC,
    };
    if proto != ETH_P_IP && proto != ETH_P_IPV6 {
        return TC_ACT_UNSPEC;
    }
    let (Some(cfg), Some(stats)) = (IMPAIR_CONFIG.get(0), IMPAIR_STATS.get_ptr_mut(0)) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: `stats` is the value of a successful array lookup, 8-byte aligned.
    let seen = unsafe { &raw mut (*stats).seen };
    let mut i = 0;
    while i < TRIES {
        // SAFETY: as above; an aligned u64 read is never torn on BPF.
        let cur = unsafe { core::ptr::read_volatile(seen) };
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                seen,
                cur,
                cur + 1,
            )
        };
        if swapped {
            if drops(cfg, cur) {
                // SAFETY: as above.
                let _ = unsafe {
                    atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                        &raw mut (*stats).dropped,
                        1,
                    )
                };
                return TC_ACT_SHOT;
            }
            return TC_ACT_UNSPEC;
        }
        i += 1;
    }
    TC_ACT_UNSPEC
}
