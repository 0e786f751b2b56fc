//! The EDT backend's program: stamps each packet with its earliest departure time
//! (`skb->tstamp`) from the rate state of the device it leaves through; sch_fq on that device
//! holds it until then. Attached to the tc egress of the CT's host-side interface (traffic
//! to the CT) and of the CT's IFB (traffic from the CT, redirected there by
//! `berth_shape_from_ct`), after the shaper's classifier.
//!
//! Only packets whose departure would lie beyond the horizon are dropped (reason
//! `DROP_HORIZON`): pacing, not policing, so TCP sees delay (and its own pacing/TSQ
//! backpressure), not loss, as long as it keeps within the horizon.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_skb_set_tstamp},
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use berth_common::{
    DIR_IN,
    shaper::{DROP_HORIZON, EDT_SLOTS, EDT_TOTAL, EdtSlot, EdtState, capacity},
};

use crate::{atomic, shaper};

#[map]
static SHAPER_EDT: HashMap<u32, EdtState> =
    HashMap::with_max_entries(capacity::EDT, BPF_F_NO_PREALLOC);

// The uapi's anonymous enum for `__sk_buff::tstamp_type` (include/uapi/linux/bpf.h; the
// bindings only have it as `_bindgen_ty_28`).
/// `BPF_SKB_TSTAMP_UNSPEC`: clears `skb->tstamp` (with a zero time).
const TSTAMP_UNSPEC: u32 = 0;
/// `BPF_SKB_TSTAMP_DELIVERY_MONO` (`BPF_SKB_CLOCK_MONOTONIC` since 6.11): a CLOCK_MONOTONIC
/// delivery time, what sch_fq compares with.
const TSTAMP_MONO: u32 = 1;

#[classifier]
pub fn berth_shape_edt(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: context field read (skb->dev->ifindex: the device this egress hook belongs to).
    let ifindex = unsafe { (*skb).ifindex };
    let Some(st) = SHAPER_EDT.get_ptr_mut(&ifindex) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // A delivery time set by the sender's stack (TCP pacing, SO_TXTIME) is honoured: the
    // packet may not leave before it. Anything else in skb->tstamp is a receive timestamp
    // (CLOCK_REALTIME, kept when netstamp is on), which sch_fq would take for a departure
    // time decades ahead; reading `tstamp_type` makes the kernel hand out tstamp unconverted
    // (6.11+: BPF_SKB_CLOCK_MONOTONIC, same value as BPF_SKB_TSTAMP_DELIVERY_MONO in 5.18).
    // SAFETY: context field reads.
    let (ts, mono) = unsafe { ((*skb).tstamp, u32::from((*skb).tstamp_type) == TSTAMP_MONO) };
    let arrival = if mono && ts > now { ts } else { now };
    // SAFETY (all accesses to *st): map value of a successful lookup; user space replaces
    // entries whole.
    let (own, flags, horizon, dir, ctid) = unsafe {
        (
            (*st).own,
            (*st).flags,
            (*st).horizon_ns,
            (*st).dir,
            (*st).ctid,
        )
    };
    let mut class_slot = 0usize;
    if own != 0 {
        let c = usize::from(shaper::class_of(&ctx, dir == DIR_IN) & 0x0f);
        if own & (1 << c) != 0 {
            class_slot = 1 + c;
        }
    }
    if class_slot == 0 && flags & EDT_TOTAL == 0 {
        // A class without a rate, and no total: unshaped. Leave no receive time behind.
        if ts != 0 && !mono {
            // SAFETY: helper on the program's own skb.
            unsafe { bpf_skb_set_tstamp(skb, 0, TSTAMP_UNSPEC) };
        }
        return TC_ACT_UNSPEC;
    }
    let len = u64::from(ctx.len());
    let mut depart = arrival;
    // The class's own rate first, then the total: each slot's schedule stays within its
    // rate, and the packet leaves when both allow it.
    if class_slot != 0 {
        match reserve(st, class_slot, arrival, len, horizon) {
            Some(start) => depart = start,
            None => return horizon_drop(&ctx, ctid, dir),
        }
    }
    if flags & EDT_TOTAL != 0 {
        match reserve(st, 0, arrival, len, horizon) {
            Some(start) if start > depart => depart = start,
            Some(_) => {}
            None => return horizon_drop(&ctx, ctid, dir),
        }
    }
    // SAFETY: helper on the program's own skb.
    unsafe { bpf_skb_set_tstamp(skb, depart, TSTAMP_MONO) };
    TC_ACT_UNSPEC
}

/// Charges `len` bytes to slot `slot` of `st`: the start time, or `None` beyond the horizon.
#[inline(always)]
fn reserve(st: *mut EdtState, slot: usize, arrival: u64, len: u64, horizon: u64) -> Option<u64> {
    if slot >= EDT_SLOTS {
        return Some(arrival);
    }
    // SAFETY: st is a map value from a successful lookup, slot < EDT_SLOTS; slots are
    // 8-byte aligned words of it.
    let (q, t) = unsafe {
        let s: *mut EdtSlot = core::ptr::addr_of_mut!((*st).slots[slot]);
        ((*s).ns_per_byte_q16, core::ptr::addr_of_mut!((*s).t_next))
    };
    if q == 0 {
        return Some(arrival);
    }
    // SAFETY: t points into the map value.
    unsafe { atomic::charge(t, arrival, EdtSlot::cost_ns(q, len), horizon) }
}

#[inline(always)]
fn horizon_drop(ctx: &TcContext, ctid: u32, dir: u8) -> i32 {
    shaper::count_drop(ctx, ctid, dir, DROP_HORIZON);
    TC_ACT_SHOT
}
