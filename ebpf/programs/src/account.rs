//! What both attach points share: finding the interface's entry, address ownership,
//! classification, and the counter/drop updates.
//!
//! Cost model (kernel 6.18 x86-64 with retpolines and SRSO "safe RET", measured under iperf3
//! load with `bpf_stats`): an array lookup the verifier inlines costs ~15 ns, a hash lookup
//! (a helper call, jhash, a bucket walk, each line likely cold after a 64 KB copy) 100–200 ns,
//! the LPM trie ~35 ns. So the common path touches arrays only: `IFACES`, `CONFIG`, and the
//! per-CPU `COUNTERS`; hash maps and tries are fallbacks.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use berth_common::{
    AddrKey, CLASSES_INLINE, CLASSES_UNIFORM, Config, DROP_QUOTA, DropKey, DropValue, ETH_HLEN,
    FAMILY_V4, FAMILY_V6, FLAG_QUOTA_CUT, FLAG_V4_SPILL, FLAG_V6_SPILL, INLINE_ADDRS,
    INLINE_CLASSES, IfaceInfo, LAYER_L3, MODE_BRIDGED, MODE_ROUTED, capacity, slot_row,
    undelivered::record_word,
};

use crate::maps::{
    CLASSES_V4, CLASSES_V6, CONFIG, COUNTERS, CT_ADDRS, DROPS, IFACES, IFACES_SPILL,
};

// The word layouts below, the packet words and the v6 address split assume the byte order
// of the only target aya-build builds for.
#[cfg(not(target_endian = "little"))]
compile_error!("berth's eBPF programs assume a little-endian target (bpfel)");

// Keys built on the stack are 8-aligned u64 words: the verifier rejects a stack store that is
// not aligned to its own size, and with misaligned access enabled LLVM merges narrower stores
// into wider ones wherever the bytes are adjacent.

/// `berth_common::AddrKey`: word 0 = ctid | family << 32 (padding zero), words 1–2 = the
/// address bytes (IPv4 in the low 4 bytes of word 1).
#[repr(C, align(8))]
pub struct AddrKeyW([u64; 3]);
const _: () = assert!(core::mem::size_of::<AddrKeyW>() == core::mem::size_of::<AddrKey>());

impl AddrKeyW {
    #[inline(always)]
    fn new(ctid: u32, family: u8, addr: [u64; 2]) -> Self {
        Self([u64::from(ctid) | u64::from(family) << 32, addr[0], addr[1]])
    }
}

/// `berth_common::DropKey`: ctid | dir << 32 | reason << 40 (padding zero).
#[repr(C, align(8))]
pub struct DropKeyW(u64);
const _: () = assert!(core::mem::size_of::<DropKeyW>() == core::mem::size_of::<DropKey>());

/// An LPM trie key (`prefix_len: u32` then the address bytes) laid out in aligned words.
#[repr(C, align(8))]
struct LpmKeyW<const N: usize>([u64; N]);
const _: () = assert!(core::mem::size_of::<Key<u32>>() == 8);
const _: () = assert!(core::mem::size_of::<Key<[u32; 4]>>() == 20);

impl<const N: usize> LpmKeyW<N> {
    /// SAFETY of the cast: `Key<K>` is `repr(C, packed)` (alignment 1) and no larger than
    /// `8 * N` bytes for the `K` each caller uses (asserted above).
    #[inline(always)]
    fn as_key<K>(&self) -> &Key<K> {
        // SAFETY: see above; every bit pattern is a valid Key of plain integers.
        unsafe { &*(self.0.as_ptr() as *const Key<K>) }
    }
}

/// An inline IPv6 address of the entry, as two words in memory order.
#[inline(always)]
fn inline_v6(iface: &IfaceInfo, i: usize) -> [u64; 2] {
    let p = iface.v6[i].as_ptr();
    // SAFETY: 16 readable bytes of the map value; read_unaligned has no alignment needs.
    unsafe {
        [
            core::ptr::read_unaligned(p as *const u64),
            core::ptr::read_unaligned(p.add(8) as *const u64),
        ]
    }
}

/// The entry's MAC as (bytes 0..4, bytes 4..6), like `packet::Frame::src_mac`.
#[inline(always)]
pub fn mac_words(iface: &IfaceInfo) -> (u32, u16) {
    let p = iface.mac.as_ptr();
    // SAFETY: 6 readable bytes of the map value.
    unsafe {
        (
            core::ptr::read_unaligned(p as *const u32),
            core::ptr::read_unaligned(p.add(4) as *const u16),
        )
    }
}

// `ifindex & MASK` must cover every position exactly once.
const _: () = assert!(capacity::IFACES.is_power_of_two());
const IFACES_MASK: u32 = capacity::IFACES - 1;

/// The address that decides the class: the far end of the conversation (the destination of
/// what the CT sends, the source of what it receives).
pub enum Peer {
    /// A frame without an IP packet (ARP), counted under `FAMILY_OTHER` and the default class.
    None,
    V4(u32),
    V6([u64; 2]),
}

/// Which field names the interface the program runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// tc ingress: `ingress_ifindex` (`skb->skb_iif`, which `__netif_receive_skb_core` sets
    /// to the receiving device before tc ingress runs). It lives in the skb itself, while
    /// `ifindex` costs a dependent load of `skb->dev` first, measurably slower under load.
    Ingress,
    /// tc egress: `ifindex` (`skb->dev->ifindex`; `skb_iif` is where the packet came from).
    Egress,
}

/// The entry of the interface the packet is on; `None` for interfaces berth does not manage.
#[inline(always)]
pub fn iface(ctx: &TcContext, hook: Hook) -> Option<&'static IfaceInfo> {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed in; the verifier rewrites
    // these field accesses into reads of skb->skb_iif / skb->dev->ifindex.
    let ifindex = unsafe {
        match hook {
            Hook::Ingress => (*ctx.skb.skb).ingress_ifindex,
            Hook::Egress => (*ctx.skb.skb).ifindex,
        }
    };
    let mut entry = IFACES.get(ifindex & IFACES_MASK)?;
    if entry.ifindex != ifindex {
        // The position belongs to another interface (or none): the rare, slower path.
        // SAFETY: plain data; see IfaceInfo on concurrent rewrites.
        entry = unsafe { IFACES_SPILL.get(ifindex) }?;
    }
    // An entry caught half-written by user space (mode still 0) is treated as not ours.
    if entry.mode != MODE_ROUTED && entry.mode != MODE_BRIDGED {
        return None;
    }
    Some(entry)
}

#[inline(always)]
pub fn owns_v4(iface: &IfaceInfo, addr: u32) -> bool {
    // 0 marks an unused inline entry, and 0.0.0.0 is never a CT's address.
    if addr == 0 {
        return false;
    }
    let mut i = 0;
    while i < INLINE_ADDRS {
        // SAFETY: 4 readable bytes of the map value.
        if unsafe { core::ptr::read_unaligned(iface.v4[i].as_ptr() as *const u32) } == addr {
            return true;
        }
        i += 1;
    }
    if iface.flags & FLAG_V4_SPILL == 0 {
        return false;
    }
    let key = AddrKeyW::new(iface.ctid, FAMILY_V4, [u64::from(addr), 0]);
    CT_ADDRS.get_ptr(key).is_some()
}

#[inline(always)]
pub fn owns_v6(iface: &IfaceInfo, addr: &[u64; 2]) -> bool {
    if addr[0] == 0 && addr[1] == 0 {
        return false;
    }
    let mut i = 0;
    while i < INLINE_ADDRS {
        let have = inline_v6(iface, i);
        if have[0] == addr[0] && have[1] == addr[1] {
            return true;
        }
        i += 1;
    }
    if iface.flags & FLAG_V6_SPILL == 0 {
        return false;
    }
    let key = AddrKeyW::new(iface.ctid, FAMILY_V6, *addr);
    CT_ADDRS.get_ptr(key).is_some()
}

#[inline(always)]
fn lpm_class(value: Option<&u32>, default_class: u8) -> u8 {
    match value {
        Some(c) => *c as u8,
        None => default_class,
    }
}

#[inline(always)]
pub(crate) fn class_v4(cfg: &Config, addr: u32) -> u8 {
    if cfg.v4_mode == CLASSES_UNIFORM {
        return cfg.v4_class;
    }
    if cfg.v4_mode == CLASSES_INLINE {
        let mut i = 0;
        while i < INLINE_CLASSES {
            if i >= cfg.v4_len as usize {
                break;
            }
            let p = &cfg.v4[i];
            if addr & p.mask == p.net {
                return p.class as u8;
            }
            i += 1;
        }
        return cfg.default_class;
    }
    let key = LpmKeyW([32 | u64::from(addr) << 32]);
    lpm_class(CLASSES_V4.get(key.as_key::<u32>()), cfg.default_class)
}

#[inline(always)]
pub(crate) fn class_v6(cfg: &Config, a: &[u64; 2]) -> u8 {
    if cfg.v6_mode == CLASSES_UNIFORM {
        return cfg.v6_class;
    }
    if cfg.v6_mode == CLASSES_INLINE {
        let mut i = 0;
        while i < INLINE_CLASSES {
            if i >= cfg.v6_len as usize {
                break;
            }
            let p = &cfg.v6[i];
            if a[0] & p.mask[0] == p.net[0] && a[1] & p.mask[1] == p.net[1] {
                return p.class as u8;
            }
            i += 1;
        }
        return cfg.default_class;
    }
    let key = LpmKeyW([128 | a[0] << 32, a[0] >> 32 | a[1] << 32, a[1] >> 32]);
    lpm_class(CLASSES_V6.get(key.as_key::<[u32; 4]>()), cfg.default_class)
}

/// Counts a passed packet or a dropped one and returns the tc verdict. Passing returns
/// `TC_ACT_UNSPEC` (TCX_NEXT): later programs on the hook, such as a shaping classifier, still
/// run, and with none left the packet continues.
#[inline(always)]
pub fn finish(ctx: &TcContext, iface: &IfaceInfo, dir: u8, verdict: Result<Peer, u8>) -> i32 {
    let len = u64::from(ctx.len());
    match verdict {
        Ok(peer) => {
            // CONFIG has one entry, always present; the check is for the verifier.
            let Some(cfg) = CONFIG.get(0) else {
                return TC_ACT_UNSPEC;
            };
            // Family index in SlotCounters order: 0 other, 1 IPv4, 2 IPv6.
            let (family, class) = match peer {
                Peer::None => (0, cfg.default_class),
                Peer::V4(a) => (1, class_v4(cfg, a)),
                Peer::V6(a) => (2, class_v6(cfg, &a)),
            };
            // An exhausted quota: only class 0 (the node's own networks) still passes; not
            // counted as traffic (it goes nowhere), counted as a drop.
            if iface.flags & FLAG_QUOTA_CUT != 0 && family != 0 && class != 0 {
                let key = DropKeyW(
                    u64::from(iface.ctid) | u64::from(dir) << 32 | u64::from(DROP_QUOTA) << 40,
                );
                add_drop(&key, len);
                return TC_ACT_SHOT;
            }
            let bytes = if cfg.byte_layer == LAYER_L3 {
                len.saturating_sub(u64::from(ETH_HLEN))
            } else {
                len
            };
            // SAFETY: context field read, rewritten by the verifier (skb_shinfo()->gso_segs).
            let segs = unsafe { (*ctx.skb.skb).gso_segs };
            // A non-GSO skb reports 0 segments; it is one packet on the wire.
            let packets = if segs == 0 { 1 } else { u64::from(segs) };
            // Per-CPU value: this CPU's copy is ours alone while the program runs, no atomics.
            if let Some(block) = COUNTERS.get_ptr_mut(iface.slot) {
                // SAFETY: the pointer comes from a successful lookup of this CPU's value.
                if let Some(row) = unsafe { (*block).rows.get_mut(slot_row(dir, family, class)) } {
                    row.bytes += bytes;
                    row.packets += packets;
                    record(
                        ctx,
                        iface.ctid,
                        packets,
                        bytes,
                        record_word(dir, family, class),
                    );
                }
            }
            TC_ACT_UNSPEC
        }
        Err(reason) => {
            let key =
                DropKeyW(u64::from(iface.ctid) | u64::from(dir) << 32 | u64::from(reason) << 40);
            add_drop(&key, len);
            TC_ACT_SHOT
        }
    }
}

/// What was counted, for the shaper to seal and the `kfree_skb` program to take back if the
/// packet is dropped later (see `berth_common::undelivered`). Plain stores into the context,
/// a few cycles.
#[inline(always)]
fn record(ctx: &TcContext, ctid: u32, packets: u64, bytes: u64, word: u32) {
    // Volatile: separate 4-byte stores (LLVM merges neighbours into unaligned 8-byte ones,
    // which the verifier refuses on the context).
    // SAFETY: `cb` is a writable context field for tc programs.
    unsafe {
        let cb = core::ptr::addr_of_mut!((*ctx.skb.skb).cb) as *mut u32;
        core::ptr::write_volatile(cb, ctid);
        core::ptr::write_volatile(cb.add(1), packets as u32);
        core::ptr::write_volatile(cb.add(2), bytes as u32);
        core::ptr::write_volatile(cb.add(3), word);
    }
}

/// Marks the control block as holding no record: it may hold anything from the layers the
/// packet came through, including the CT's own IP stack.
#[inline(always)]
pub fn clear_record(ctx: &TcContext) {
    // SAFETY: as in `record`.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*ctx.skb.skb).cb[3]), 0) };
}

#[inline(always)]
fn add_drop(key: &DropKeyW, bytes: u64) {
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
        && let Some(v) = DROPS.get_ptr_mut(key)
    {
        // Another CPU created the row between our lookup and insert (EEXIST): add to it.
        // SAFETY: as above.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes;
        }
    }
}
