//! `kfree_skb` tracepoint: takes a sealed packet's counts back from the bill when the packet
//! is dropped by tc or a qdisc (see `berth_common::undelivered`).
//!
//! The tracepoint fires for every packet the kernel drops, on every device of the host, and
//! every berth pin directory attaches its own copy: the reason filter and the seal (keyed by
//! this pin directory's secret) leave all but our own drops alone after a few loads.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_probe_read_kernel, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use berth_common::{
    CounterValue, DIR_IN, FAMILY_INDEX,
    undelivered::{CB_COUNTED, QDISC_CB_DATA_OFFSET, SKB_CB_OFFSET, SKB_DEV_OFFSET, seal},
};

use crate::{maps::UNDELIVERED, shaper::SHAPER_SEAL};

// `TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)` since
// 5.17 (the reason argument's position has not moved since).
const ARG_SKB: usize = 0;
const ARG_REASON: usize = 2;

#[btf_tracepoint(function = "kfree_skb")]
pub fn berth_undelivered(ctx: BtfTracePointContext) -> i32 {
    let Some(cfg) = SHAPER_SEAL.get(0) else {
        return 0;
    };
    if cfg.secret == 0 {
        return 0;
    }
    let reason: u32 = ctx.arg(ARG_REASON);
    // Subsystem reasons (`SKB_DROP_REASON_SUBSYS_*`) have high bits set: not tc's.
    if reason >= 256 || cfg.reasons[(reason / 64) as usize & 3] & (1 << (reason % 64)) == 0 {
        return 0;
    }
    let skb: *const u8 = ctx.arg(ARG_SKB);
    let off = (SKB_CB_OFFSET + QDISC_CB_DATA_OFFSET) as usize;
    // SAFETY: probe reads fault safely; skb is the tracepoint's sk_buff.
    let Ok(cb) = (unsafe { bpf_probe_read_kernel(skb.add(off) as *const [u32; 5]) }) else {
        return 0;
    };
    let word = cb[3];
    if word & CB_COUNTED == 0 {
        return 0;
    }
    let dir = (word & 0xff) as u8;
    let dev = if dir == DIR_IN {
        // SAFETY: as above.
        match unsafe { bpf_probe_read_kernel(skb.add(SKB_DEV_OFFSET as usize) as *const u64) } {
            Ok(d) => d,
            Err(_) => return 0,
        }
    } else {
        0
    };
    if seal(cfg.secret, [cb[0], cb[1], cb[2], word], dev) != cb[4] {
        return 0;
    }
    let family_index = ((word >> 8) & 0xff) as usize;
    let Some(family) = FAMILY_INDEX.get(family_index) else {
        return 0;
    };
    let class = ((word >> 16) & 0x0f) as u64;
    // `berth_common::CounterKey` as one word: ctid | dir << 32 | class << 40 | family << 48.
    let key = u64::from(cb[0]) | u64::from(dir) << 32 | class << 40 | u64::from(*family) << 48;
    let (packets, bytes) = (u64::from(cb[1]), u64::from(cb[2]));
    if let Some(v) = UNDELIVERED.get_ptr_mut(&key) {
        // SAFETY: this CPU's value from a successful lookup.
        unsafe {
            (*v).packets += packets;
            (*v).bytes += bytes;
        }
        return 0;
    }
    let init = CounterValue { bytes, packets };
    if UNDELIVERED
        .insert(&key, &init, u64::from(BPF_NOEXIST))
        .is_err()
        && let Some(v) = UNDELIVERED.get_ptr_mut(&key)
    {
        // Another CPU created the row between our lookup and insert.
        // SAFETY: as above.
        unsafe {
            (*v).packets += packets;
            (*v).bytes += bytes;
        }
    }
    0
}
