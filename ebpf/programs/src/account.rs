//! What both attach points share: finding the CT behind the interface, address ownership,
//! classification, and the counter/drop updates.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use berth_common::{
    AddrKey, Config, CounterKey, CounterValue, DropKey, DropValue, ETH_HLEN, FAMILY_OTHER,
    FAMILY_V4, FAMILY_V6, IfaceInfo, LAYER_L3, MAX_CLASSES,
};

use crate::maps::{CLASSES_V4, CLASSES_V6, CONFIG, COUNTERS, CT_ADDRS, DROPS, IFACES};

/// The address that decides the class: the far end of the conversation (the destination of
/// what the CT sends, the source of what it receives).
pub enum Peer {
    /// A frame without an IP packet (ARP), counted under `FAMILY_OTHER` and the default class.
    None,
    V4([u8; 4]),
    V6([u8; 16]),
}

/// The CT behind the interface the packet is on; `None` for interfaces berth does not manage.
#[inline(always)]
pub fn iface(ctx: &TcContext) -> Option<IfaceInfo> {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed in; the verifier rewrites
    // this field access into a read of skb->dev->ifindex.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: IFACES values are plain data; a concurrent update can at worst give a torn read
    // of a value that is being replaced, which we copy out immediately.
    unsafe { IFACES.get(ifindex) }.copied()
}

#[inline(always)]
pub fn owns_v4(ctid: u32, addr: &[u8; 4]) -> bool {
    let key = AddrKey {
        ctid,
        family: FAMILY_V4,
        _pad: [0; 3],
        addr: [
            addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    };
    CT_ADDRS.get_ptr(key).is_some()
}

#[inline(always)]
pub fn owns_v6(ctid: u32, addr: &[u8; 16]) -> bool {
    let key = AddrKey {
        ctid,
        family: FAMILY_V6,
        _pad: [0; 3],
        addr: *addr,
    };
    CT_ADDRS.get_ptr(key).is_some()
}

#[inline(always)]
fn class_of(value: Option<&u32>, default_class: u32) -> u8 {
    let class = match value {
        Some(c) => *c,
        None => default_class,
    };
    // User space only writes classes < MAX_CLASSES; the mask keeps a bad entry from creating
    // rows outside the documented range.
    (class % MAX_CLASSES) as u8
}

/// Counts a passed packet or a dropped one and returns the tc verdict. Passing returns
/// `TC_ACT_UNSPEC` (TCX_NEXT): later programs on the hook, such as a shaping classifier, still
/// run, and with none left the packet continues.
#[inline(always)]
pub fn finish(ctx: &TcContext, iface: &IfaceInfo, dir: u8, verdict: Result<Peer, u8>) -> i32 {
    let len = u64::from(ctx.len());
    match verdict {
        Ok(peer) => {
            let cfg = match CONFIG.get(0) {
                Some(c) => *c,
                None => Config::default(),
            };
            let (family, class) = match peer {
                Peer::None => (FAMILY_OTHER, class_of(None, cfg.default_class)),
                Peer::V4(a) => (
                    FAMILY_V4,
                    class_of(CLASSES_V4.get(Key::new(32, a)), cfg.default_class),
                ),
                Peer::V6(a) => (
                    FAMILY_V6,
                    class_of(CLASSES_V6.get(Key::new(128, a)), cfg.default_class),
                ),
            };
            let bytes = if cfg.byte_layer == LAYER_L3 {
                len.saturating_sub(u64::from(ETH_HLEN))
            } else {
                len
            };
            // SAFETY: context field read, rewritten by the verifier (skb_shinfo()->gso_segs).
            let segs = unsafe { (*ctx.skb.skb).gso_segs };
            // A non-GSO skb reports 0 segments; it is one packet on the wire.
            let packets = if segs == 0 { 1 } else { u64::from(segs) };
            let key = CounterKey {
                ctid: iface.ctid,
                dir,
                class,
                family,
                _pad: 0,
            };
            add_counter(&key, bytes, packets);
            TC_ACT_UNSPEC
        }
        Err(reason) => {
            let key = DropKey {
                ctid: iface.ctid,
                dir,
                reason,
                _pad: [0; 2],
            };
            add_drop(&key, len);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn add_counter(key: &CounterKey, bytes: u64, packets: u64) {
    // Per-CPU values: this CPU's slot is ours alone while the program runs, no atomics needed.
    if let Some(v) = COUNTERS.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's value.
        unsafe {
            (*v).bytes += bytes;
            (*v).packets += packets;
        }
        return;
    }
    let init = CounterValue { bytes, packets };
    if COUNTERS.insert(key, init, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU created the row between our lookup and insert (EEXIST): add to it.
        if let Some(v) = COUNTERS.get_ptr_mut(key) {
            // SAFETY: as above.
            unsafe {
                (*v).bytes += bytes;
                (*v).packets += packets;
            }
        }
    }
}

#[inline(always)]
fn add_drop(key: &DropKey, bytes: u64) {
    if let Some(v) = DROPS.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's value.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes;
        }
        return;
    }
    let init = DropValue { packets: 1, bytes };
    if DROPS.insert(key, init, u64::from(BPF_NOEXIST)).is_err()
        && let Some(v) = DROPS.get_ptr_mut(key) {
            // SAFETY: as above.
            unsafe {
                (*v).packets += 1;
                (*v).bytes += bytes;
            }
        }
}
