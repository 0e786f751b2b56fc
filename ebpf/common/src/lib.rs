#![no_std]
//! Map keys, values and constants shared by berth's eBPF programs (`berth-ebpf`) and the
//! user-space datapath manager (`berth::datapath`).
//!
//! Every type is `#[repr(C)]` with explicit padding fields and a compile-time size check: the
//! kernel compares keys byte for byte, so uninitialised padding would make lookups miss, and a
//! layout change must be a deliberate decision (the pin directory is versioned, `v2`, because
//! pinned maps outlive the programs that created them).
//!
//! The layout is built for the per-packet cost: one array lookup (`IFACES`) finds everything
//! about the interface (CT, counter slot, mode, MAC, up to 8 + 8 addresses), the class table
//! is usually inline in `CONFIG`, and the counters are a per-CPU array indexed by the CT's
//! slot. Array lookups are inlined by the verifier: no helper call, no hashing. Hash maps and
//! LPM tries remain only as fallbacks (interface position collisions, CTs with many
//! addresses, large class tables).

/// Names of the maps in the eBPF object, as user space looks them up and pins them.
pub mod map_names {
    pub const IFACES: &str = "IFACES";
    pub const IFACES_SPILL: &str = "IFACES_SPILL";
    pub const CT_ADDRS: &str = "CT_ADDRS";
    pub const CLASSES_V4: &str = "CLASSES_V4";
    pub const CLASSES_V6: &str = "CLASSES_V6";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SLOT_CTIDS: &str = "SLOT_CTIDS";
    pub const ARCHIVE: &str = "ARCHIVE";
    pub const DROPS: &str = "DROPS";
    pub const CONFIG: &str = "CONFIG";
    /// Counted bytes that were then dropped before leaving berth's hooks and queues (see
    /// [`crate::undelivered`]). Newer than the other maps: a pin directory made by an older
    /// berth lacks it until the next load creates it, so readers treat it as optional.
    pub const UNDELIVERED: &str = "UNDELIVERED";
    /// Per CTID, what a transfer quota currently enforces (`QuotaOverlay`): only user space
    /// reads it (the programs see `FLAG_QUOTA_CUT`), pinned so that every berth process and
    /// every start of the CT finds it. Newer than the first ten: optional for readers.
    pub const QUOTA: &str = "QUOTA";
    /// The maps every pinned datapath has (what readers require).
    pub const REQUIRED: [&str; 10] = [
        IFACES,
        IFACES_SPILL,
        CT_ADDRS,
        CLASSES_V4,
        CLASSES_V6,
        COUNTERS,
        SLOT_CTIDS,
        ARCHIVE,
        DROPS,
        CONFIG,
    ];
    /// Every map, in the order loaders bind them to pins.
    pub const ALL: [&str; 12] = [
        IFACES,
        IFACES_SPILL,
        CT_ADDRS,
        CLASSES_V4,
        CLASSES_V6,
        COUNTERS,
        SLOT_CTIDS,
        ARCHIVE,
        DROPS,
        CONFIG,
        UNDELIVERED,
        QUOTA,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// Attached to the host-side interface's tc ingress: packets the CT sends.
    pub const FROM_CT: &str = "berth_from_ct";
    /// Attached to the host-side interface's tc egress: packets delivered to the CT.
    pub const TO_CT: &str = "berth_to_ct";
    /// Returns "next" and does nothing: never attached in production; the benchmark attaches
    /// it to measure what an empty program costs on the same hook under the same load (the
    /// floor of a `bpf_stats` measurement).
    pub const NOOP: &str = "berth_noop";
}

/// Capacity of the maps (entries).
pub mod capacity {
    /// `IFACES` array: interfaces are stored at `ifindex % IFACES`; an interface whose
    /// position is taken by another one goes to `IFACES_SPILL`.
    pub const IFACES: u32 = 16_384;
    /// `IFACES_SPILL` hash (interfaces whose `IFACES` position is taken).
    pub const IFACES_SPILL: u32 = 16_384;
    /// Addresses assigned to CTs, all CTs together (the `CT_ADDRS` hash).
    pub const CT_ADDRS: u32 = 65_536;
    /// Prefixes per address family in the class table.
    pub const CLASSES: u32 = 16_384;
    /// Counter slots: CTs with interfaces attached at the same time. `COUNTERS` takes
    /// `SLOTS × size_of::<SlotCounters>()` (1.5 MiB) per possible CPU.
    pub const SLOTS: u32 = 1_024;
    /// (CTID, direction, class, family) rows of CTs whose slot was reclaimed.
    pub const ARCHIVE: u32 = 262_144;
    /// (CTID, direction, reason) drop rows: 2 × 5 per CT at most.
    pub const DROPS: u32 = 65_536;
    /// (CTID, direction, class, family) rows of undelivered traffic.
    pub const UNDELIVERED: u32 = 65_536;
    /// CTs with a quota action in force.
    pub const QUOTA: u32 = 65_536;
}

/// `IfaceInfo::mode`: a routed (venet-like) interface, the host routes the CT's addresses to it.
pub const MODE_ROUTED: u8 = 1;
/// `IfaceInfo::mode`: a bridged (veth) interface, the CT owns an L2 presence.
pub const MODE_BRIDGED: u8 = 2;

/// `IfaceInfo::flags`: drop frames from the CT whose source MAC is not `IfaceInfo::mac`.
pub const FLAG_MAC_FILTER: u8 = 1 << 0;
/// `IfaceInfo::flags`: police the CT's source IP addresses (always set for routed mode).
pub const FLAG_IP_FILTER: u8 = 1 << 1;
/// `IfaceInfo::flags`: the CT has more IPv4 addresses than `IfaceInfo::v4` holds; an address
/// not found inline is looked up in `CT_ADDRS`.
pub const FLAG_V4_SPILL: u8 = 1 << 2;
/// `IfaceInfo::flags`: as `FLAG_V4_SPILL`, for IPv6.
pub const FLAG_V6_SPILL: u8 = 1 << 3;
/// `IfaceInfo::flags`: the CT's transfer quota is exhausted: drop its IP traffic of every
/// network class but 0 (the node's own networks: panel, DNS, mirrors), both ways, reason
/// `DROP_QUOTA`. Frames without IP (ARP) pass.
pub const FLAG_QUOTA_CUT: u8 = 1 << 4;

/// Direction `in`: traffic delivered to the CT (the host-side interface's egress).
pub const DIR_IN: u8 = 0;
/// Direction `out`: traffic sent by the CT (the host-side interface's ingress).
pub const DIR_OUT: u8 = 1;

/// `CounterKey::family` for frames that pass but carry no IP packet (ARP).
pub const FAMILY_OTHER: u8 = 0;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Number of traffic classes (OpenVZ `networks_classes` allows 0..=15).
pub const MAX_CLASSES: u32 = 16;

/// Drop reasons (`DropKey::reason`).
pub const DROP_SPOOFED_IP: u8 = 1;
pub const DROP_SPOOFED_MAC: u8 = 2;
pub const DROP_NON_IP: u8 = 3;
pub const DROP_BAD_DST: u8 = 4;
pub const DROP_MALFORMED: u8 = 5;
pub const DROP_QUOTA: u8 = 6;

/// `Config::byte_layer`: count `skb->len` as the interface sees it, the whole Ethernet frame
/// (equal to `/sys/class/net/<if>/statistics/*_bytes`).
pub const LAYER_L2: u8 = 0;
/// `Config::byte_layer`: count the frame minus its 14-byte Ethernet header (the IP packet, like
/// OpenVZ vznetstat).
pub const LAYER_L3: u8 = 1;

/// Length of the Ethernet header the programs parse (no VLAN tags on a CT's interface).
pub const ETH_HLEN: u32 = 14;

/// `CT_ADDRS` value marking an address as assigned to the CT.
pub const ADDR_ALLOWED: u32 = 1;

/// Addresses per family held inline in `IfaceInfo` (more spill to `CT_ADDRS`).
pub const INLINE_ADDRS: usize = 8;

/// `IFACES` value (index `ifindex % capacity::IFACES`) and `IFACES_SPILL` value (key
/// ifindex): everything the programs need about the interface, so that one lookup serves the
/// whole packet. 192 bytes; the IPv4 path only reads the first 64.
///
/// The programs read it while user space may rewrite it (array values are copied in place):
/// user space keeps an address at the same index while it stays assigned, so a concurrent
/// read never misses an address that is neither being added nor removed. Unused entries are
/// zero, which is never an assignable address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceInfo {
    /// The interface this entry is for; 0 = empty (an `IFACES` position holds whichever
    /// interface user space put there).
    pub ifindex: u32,
    pub ctid: u32,
    /// Row of `COUNTERS` that counts this CT (see `SLOT_CTIDS`).
    pub slot: u32,
    /// `MODE_ROUTED` or `MODE_BRIDGED`; anything else (an entry being written) is ignored.
    pub mode: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub _pad0: [u8; 2],
    /// The MAC the CT's side of the pair must send from (with `FLAG_MAC_FILTER`).
    pub mac: [u8; 6],
    pub _pad1: [u8; 10],
    /// The CT's IPv4 addresses, network byte order; 0 = unused.
    pub v4: [[u8; 4]; INLINE_ADDRS],
    /// The CT's IPv6 addresses; all-zero = unused.
    pub v6: [[u8; 16]; INLINE_ADDRS],
}
const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 192);

impl IfaceInfo {
    pub const EMPTY: Self = Self {
        ifindex: 0,
        ctid: 0,
        slot: 0,
        mode: 0,
        flags: 0,
        _pad0: [0; 2],
        mac: [0; 6],
        _pad1: [0; 10],
        v4: [[0; 4]; INLINE_ADDRS],
        v6: [[0; 16]; INLINE_ADDRS],
    };
}

/// `CT_ADDRS` key: an address assigned to a CT. IPv4 addresses occupy the first 4 bytes of
/// `addr`, the rest is zero. The complete set of every CT's addresses (the inline copies in
/// `IfaceInfo` are a cache of it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub ctid: u32,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 24);

/// `ARCHIVE` key: totals of a CT whose counter slot was reclaimed (and of older layouts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub ctid: u32,
    /// `DIR_IN` or `DIR_OUT`.
    pub dir: u8,
    /// 0..`MAX_CLASSES`.
    pub class: u8,
    /// `FAMILY_V4`, `FAMILY_V6` or `FAMILY_OTHER`.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 8);

/// One counter row. `packets` counts segments on the wire: a GSO super-packet counts
/// `gso_segs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub bytes: u64,
    pub packets: u64,
}
const _: () = assert!(core::mem::size_of::<CounterValue>() == 16);

/// Families in `SlotCounters` order.
pub const FAMILY_INDEX: [u8; 3] = [FAMILY_OTHER, FAMILY_V4, FAMILY_V6];
/// Rows of one slot: direction × family × class.
pub const SLOT_ROWS: usize = 2 * 3 * MAX_CLASSES as usize;

/// Index of a row in `SlotCounters::rows`: `(dir * 3 + family_index) * 16 + class`, with
/// `family_index` 0 = other, 1 = IPv4, 2 = IPv6.
#[inline(always)]
pub const fn slot_row(dir: u8, family_index: u8, class: u8) -> usize {
    ((dir as usize * 3 + family_index as usize) * MAX_CLASSES as usize)
        + (class as usize % MAX_CLASSES as usize)
}

/// `COUNTERS` value (per CPU, index = slot): every counter of one CT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotCounters {
    pub rows: [CounterValue; SLOT_ROWS],
}
const _: () = assert!(core::mem::size_of::<SlotCounters>() == 1536);

impl Default for SlotCounters {
    fn default() -> Self {
        Self {
            rows: [CounterValue {
                bytes: 0,
                packets: 0,
            }; SLOT_ROWS],
        }
    }
}

/// `DROPS` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    pub ctid: u32,
    /// `DIR_IN` or `DIR_OUT`.
    pub dir: u8,
    /// `DROP_*`.
    pub reason: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<DropKey>() == 8);

/// `DROPS` value, one per CPU. `bytes` is `skb->len` (whole frame), whatever the byte layer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropValue {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<DropValue>() == 16);

/// `QUOTA` value: what the CT's transfer quota enforces now. Rates in bit/s, 0 = none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaOverlay {
    /// 1: traffic beyond class 0 is cut (`FLAG_QUOTA_CUT` on the CT's interfaces).
    pub cut: u8,
    /// 1: the quota froze the CT (so lifting it thaws it, and only then).
    pub suspended: u8,
    pub _pad: [u8; 6],
    /// The throttle on top of the CT's own shaping: its rates become the lower of the two.
    pub throttle_in_bps: u64,
    pub throttle_out_bps: u64,
}
const _: () = assert!(core::mem::size_of::<QuotaOverlay>() == 24);

/// `ClassTable::mode`: every address of the family has class `ClassTable::class` (the table
/// is empty, or holds only a /0): no lookup at all.
pub const CLASSES_UNIFORM: u8 = 0;
/// `ClassTable::mode`: the table fits inline: scan `ClassTable::v4`/`v6`, longest first.
pub const CLASSES_INLINE: u8 = 1;
/// `ClassTable::mode`: look up the `CLASSES_V4`/`CLASSES_V6` LPM trie.
pub const CLASSES_LPM: u8 = 2;

/// Prefixes per family the class table holds inline.
pub const INLINE_CLASSES: usize = 8;

/// An inline IPv4 prefix: `addr & mask == net`, all network byte order as loaded from the
/// packet (so the program compares without byte swaps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Prefix {
    pub net: u32,
    pub mask: u32,
    pub class: u32,
}
const _: () = assert!(core::mem::size_of::<V4Prefix>() == 12);

/// An inline IPv6 prefix, as two 64-bit halves in the byte order loaded from the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Prefix {
    pub net: [u64; 2],
    pub mask: [u64; 2],
    pub class: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<V6Prefix>() == 40);

/// `CONFIG[0]`: global settings of the datapath, and the class table in the form that costs
/// the program least (user space derives it from the LPM tries whenever they change).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `LAYER_L2` or `LAYER_L3`.
    pub byte_layer: u8,
    /// Class of traffic whose peer address matches no prefix in the class tables.
    pub default_class: u8,
    /// `CLASSES_*` for IPv4 and IPv6.
    pub v4_mode: u8,
    pub v6_mode: u8,
    /// With `CLASSES_UNIFORM`: the class of every address of the family.
    pub v4_class: u8,
    pub v6_class: u8,
    /// With `CLASSES_INLINE`: entries used in `v4`/`v6` (sorted longest prefix first).
    pub v4_len: u8,
    pub v6_len: u8,
    pub v4: [V4Prefix; INLINE_CLASSES],
    pub v6: [V6Prefix; INLINE_CLASSES],
}
const _: () = assert!(core::mem::size_of::<Config>() == 8 + 96 + 320);

#[cfg(feature = "user")]
mod user {
    use super::{
        AddrKey, Config, CounterKey, CounterValue, DropKey, DropValue, IfaceInfo, SlotCounters,
    };

    // SAFETY: all are #[repr(C)], made only of integers and byte arrays, with explicit padding
    // fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for IfaceInfo {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for DropKey {}
    unsafe impl aya::Pod for DropValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SlotCounters {}
    unsafe impl aya::Pod for super::QuotaOverlay {}
}

pub mod impair;
pub mod shaper;
pub mod undelivered;
