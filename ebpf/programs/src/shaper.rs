//! The shaper's classifiers, attached after the accounting programs on a CT's host-side
//! interface (TCX, last on the hook).
//!
//! Neither queues nor paces anything: they write the HTB class into `skb->priority` (HTB takes
//! a priority equal to one of its leaf class ids before consulting filters, so no cls_bpf
//! filter is needed on the qdisc) and, for traffic from the CT, redirect it into the CT's IFB.
//! The only packets they drop are those over a packet-rate limit (token bucket, reason
//! `DROP_PPS`): a pure eBPF byte policer wrecks TCP over veth (64 KB GSO packets), so byte
//! rates are left to HTB; floods of small packets are what the pps bucket is for.
//!
//! `skb->priority` is overwritten on every packet of a shaped direction: a CT can set it on
//! its own sockets (`SO_PRIORITY`) and forwarding derives it from the TOS byte, and neither
//! may pick another class.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_redirect},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuHashMap},
    programs::TcContext,
};
use berth_common::{
    DIR_IN, DIR_OUT, DropValue,
    shaper::{
        DROP_PPS, HTB_MAJOR, INTERACTIVE_MAX_LEN, MINOR_BULK, MINOR_INTERACTIVE, PPS_IN, PPS_OUT,
        PpsBucket, PpsKey, REST_IN, REST_OUT, SHAPE_IN, SHAPE_OUT, ShapeIface, capacity,
    },
    undelivered::{CB_COUNTED, SKB_DEV_OFFSET, SealConfig, seal},
};

use crate::{
    account,
    maps::CONFIG,
    packet::{self, L3},
};

#[map]
static SHAPER_IFACES: HashMap<u32, ShapeIface> =
    HashMap::with_max_entries(capacity::IFACES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static SHAPER_PPS: HashMap<PpsKey, PpsBucket> =
    HashMap::with_max_entries(capacity::PPS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Key: `berth_common::shaper::ShaperDropKey` as one word (ctid | dir << 32 | reason << 40).
#[map]
static SHAPER_DROPS: PerCpuHashMap<u64, DropValue> =
    PerCpuHashMap::with_max_entries(capacity::DROPS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Only user space writes it (the secret and the drop reasons; see `berth_common::undelivered`).
#[map]
pub(crate) static SHAPER_SEAL: Array<SealConfig> = Array::with_max_entries(1, 0);

/// Seals the accounting program's record of this packet, so that a drop from here on (the
/// pps bucket below, the HTB or EDT queue, the IFB) takes it back from the bill.
#[inline(always)]
fn seal_record(ctx: &TcContext, ctid: u32, to_ct: bool) {
    let Some(cfg) = SHAPER_SEAL.get(0) else {
        return;
    };
    if cfg.secret == 0 {
        return;
    }
    let skb = ctx.skb.skb;
    // Volatile: LLVM would merge neighbouring words into one 8-byte load, and the verifier
    // only takes aligned context accesses of a field's size.
    // SAFETY: context field reads.
    let cb = unsafe {
        let p = core::ptr::addr_of!((*skb).cb) as *const u32;
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    };
    // The record must be this CT's, written by the accounting program just before us on
    // this hook: without it the control block holds what earlier layers left there.
    if cb[0] != ctid || cb[3] & CB_COUNTED == 0 || (cb[3] & 0xff == u32::from(DIR_IN)) != to_ct {
        return;
    }
    let dev = if to_ct {
        // The context pointer is the kernel's sk_buff (user space checked the offset
        // against BTF before setting the secret).
        // SAFETY: probe reads fault safely; the address is only read.
        match unsafe {
            bpf_probe_read_kernel((skb as *const u8).add(SKB_DEV_OFFSET as usize) as *const u64)
        } {
            Ok(d) if d != 0 => d,
            _ => return,
        }
    } else {
        0
    };
    // SAFETY: writable context field.
    unsafe { (*skb).cb[4] = seal(cfg.secret, cb, dev) };
}

#[classifier]
pub fn berth_shape_to_ct(ctx: TcContext) -> i32 {
    // SAFETY: context field read, rewritten by the verifier (skb->dev->ifindex).
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain data; user space replaces entries whole.
    let Some(iface) = (unsafe { SHAPER_IFACES.get(&ifindex) }) else {
        return TC_ACT_UNSPEC;
    };
    seal_record(&ctx, iface.ctid, true);
    let flags = iface.flags;
    if flags & PPS_IN != 0 && !pps_pass(&ctx, ifindex, DIR_IN) {
        count_drop(&ctx, iface.ctid, DIR_IN, DROP_PPS);
        return TC_ACT_SHOT;
    }
    if flags & SHAPE_IN != 0 {
        let prio = classid(&ctx, iface.classes_in, flags & REST_IN != 0, true);
        // SAFETY: writable context field for tc programs.
        unsafe { (*ctx.skb.skb).priority = prio };
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn berth_shape_from_ct(ctx: TcContext) -> i32 {
    // SAFETY: context field read (skb->skb_iif: the receiving device at tc ingress).
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: as above.
    let Some(iface) = (unsafe { SHAPER_IFACES.get(&ifindex) }) else {
        return TC_ACT_UNSPEC;
    };
    seal_record(&ctx, iface.ctid, false);
    let flags = iface.flags;
    if flags & PPS_OUT != 0 && !pps_pass(&ctx, ifindex, DIR_OUT) {
        count_drop(&ctx, iface.ctid, DIR_OUT, DROP_PPS);
        return TC_ACT_SHOT;
    }
    if flags & SHAPE_OUT != 0 && iface.ifb_ifindex != 0 {
        let prio = classid(&ctx, iface.classes_out, flags & REST_OUT != 0, false);
        // SAFETY: writable context field for tc programs.
        unsafe { (*ctx.skb.skb).priority = prio };
        // The IFB queues it on its egress and then re-injects it into this interface's
        // receive path with tc skipped (`tc_skip_classify`), so it is neither counted nor
        // redirected twice. bpf_redirect marks the skb as redirected from ingress, which IFB
        // requires (it drops anything else).
        // SAFETY: helper call with plain integer arguments.
        return unsafe { bpf_redirect(iface.ifb_ifindex, 0) } as i32;
    }
    TC_ACT_UNSPEC
}

/// The HTB class id for the packet: the group of the peer address's network class (group 0
/// for classes without a rate of their own), its interactive leaf for small non-GSO frames,
/// else its bulk leaf. A packet of group 0 when group 0 is not shaped gets the qdisc's own
/// handle, which HTB sends through its direct queue, unshaped.
#[inline(always)]
fn classid(ctx: &TcContext, own_classes: u16, rest: bool, peer_is_src: bool) -> u32 {
    let mut group = 0;
    if own_classes != 0 {
        let c = u32::from(class_of(ctx, peer_is_src) & 0x0f);
        if own_classes & (1 << c) != 0 {
            group = 1 + c;
        }
    }
    if group == 0 && !rest {
        return HTB_MAJOR << 16;
    }
    // SAFETY: context field read (skb_shinfo()->gso_segs).
    let segs = unsafe { (*ctx.skb.skb).gso_segs };
    let leaf = if ctx.len() <= INTERACTIVE_MAX_LEN && segs <= 1 {
        MINOR_INTERACTIVE
    } else {
        MINOR_BULK
    };
    HTB_MAJOR << 16 | (leaf + group)
}

/// The network class of the packet's peer (source of what the CT receives, destination of
/// what it sends), from the datapath's class table; frames without IP, or unparsable ones,
/// belong to the default class.
#[inline(always)]
pub(crate) fn class_of(ctx: &TcContext, peer_is_src: bool) -> u8 {
    let Some(cfg) = CONFIG.get(0) else {
        return 0;
    };
    match packet::parse(ctx) {
        Ok(frame) => match frame.l3 {
            L3::V4 { src, dst } => account::class_v4(cfg, if peer_is_src { src } else { dst }),
            L3::V6 { src, dst } => account::class_v6(cfg, if peer_is_src { &src } else { &dst }),
            _ => cfg.default_class,
        },
        Err(_) => cfg.default_class,
    }
}

/// The packet-rate limit (see `PpsBucket`). A GSO packet counts its segments.
///
/// `tat` is shared by all CPUs and moved on with compare-and-swap, so concurrent packets on
/// several CPUs each get a slot of their own (the bucket never admits more than its rate plus
/// its burst). After `CAS_TRIES` lost races the packet is charged with a plain atomic add
/// (which needs no read-back, so the BPF v1 ISA has it): the bucket is saturated then, and
/// the charge still counts.
#[inline(always)]
fn pps_pass(ctx: &TcContext, ifindex: u32, dir: u8) -> bool {
    let key: PpsKey = u64::from(ifindex) | u64::from(dir) << 32;
    let Some(b) = SHAPER_PPS.get_ptr_mut(&key) else {
        return true;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY (all accesses to *b): b points at the map value of a successful lookup; user
    // space replaces values whole (a concurrent program then updates the old copy, harmless).
    let (interval, tolerance) = unsafe { ((*b).interval_ns, (*b).tolerance_ns) };
    // SAFETY: context field read (skb_shinfo()->gso_segs).
    let segs = unsafe { (*ctx.skb.skb).gso_segs };
    let cost = if segs > 1 { u64::from(segs) } else { 1 } * interval;
    // SAFETY: as above; the field is 8-byte aligned inside the map value.
    let tat = unsafe { core::ptr::addr_of_mut!((*b).tat) };
    // SAFETY: tat points into the map value.
    unsafe { crate::atomic::charge(tat, now, cost, tolerance) }.is_some()
}

#[inline(always)]
pub(crate) fn count_drop(ctx: &TcContext, ctid: u32, dir: u8, reason: u8) {
    let key = u64::from(ctid) | u64::from(dir) << 32 | u64::from(reason) << 40;
    let bytes = u64::from(ctx.len());
    if let Some(v) = SHAPER_DROPS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value from a successful lookup.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes;
        }
        return;
    }
    let init = DropValue { packets: 1, bytes };
    if SHAPER_DROPS
        .insert(&key, &init, u64::from(BPF_NOEXIST))
        .is_err()
        && let Some(v) = SHAPER_DROPS.get_ptr_mut(&key)
    {
        // Another CPU created the row between our lookup and insert.
        // SAFETY: as above.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes;
        }
    }
}
