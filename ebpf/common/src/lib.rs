#![no_std]
//! Map keys, values and constants shared by berth's eBPF programs (`berth-ebpf`) and the
//! user-space datapath manager (`berth::datapath`).
//!
//! Every type is `#[repr(C)]` with explicit padding fields and a compile-time size check: the
//! kernel compares keys byte for byte, so uninitialised padding would make lookups miss, and a
//! layout change must be a deliberate decision (the pin directory is versioned, `v1`, because
//! pinned maps outlive the programs that created them).

/// Names of the maps in the eBPF object, as user space looks them up and pins them.
pub mod map_names {
    pub const IFACES: &str = "IFACES";
    pub const CT_ADDRS: &str = "CT_ADDRS";
    pub const CLASSES_V4: &str = "CLASSES_V4";
    pub const CLASSES_V6: &str = "CLASSES_V6";
    pub const COUNTERS: &str = "COUNTERS";
    pub const DROPS: &str = "DROPS";
    pub const CONFIG: &str = "CONFIG";
    /// Every map, in the order user space opens them.
    pub const ALL: [&str; 7] = [
        IFACES, CT_ADDRS, CLASSES_V4, CLASSES_V6, COUNTERS, DROPS, CONFIG,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// Attached to the host-side interface's tc ingress: packets the CT sends.
    pub const FROM_CT: &str = "berth_from_ct";
    /// Attached to the host-side interface's tc egress: packets delivered to the CT.
    pub const TO_CT: &str = "berth_to_ct";
}

/// Capacity of the maps (entries). Hash maps are created with `BPF_F_NO_PREALLOC` where the
/// kernel allows it, so unused capacity costs no memory.
pub mod capacity {
    /// Interfaces with the programs attached (a CT may have several).
    pub const IFACES: u32 = 16_384;
    /// Addresses assigned to CTs, all CTs together.
    pub const CT_ADDRS: u32 = 65_536;
    /// Prefixes per address family in the class table.
    pub const CLASSES: u32 = 16_384;
    /// (CTID, direction, class, family) counter rows: 2 × 16 × 3 = 96 per CT at most.
    pub const COUNTERS: u32 = 262_144;
    /// (CTID, direction, reason) drop rows: 2 × 5 per CT at most.
    pub const DROPS: u32 = 65_536;
}

/// `IfaceInfo::mode`: a routed (venet-like) interface, the host routes the CT's addresses to it.
pub const MODE_ROUTED: u8 = 1;
/// `IfaceInfo::mode`: a bridged (veth) interface, the CT owns an L2 presence.
pub const MODE_BRIDGED: u8 = 2;

/// `IfaceInfo::flags`: drop frames from the CT whose source MAC is not `IfaceInfo::mac`.
pub const FLAG_MAC_FILTER: u8 = 1 << 0;
/// `IfaceInfo::flags`: in bridged mode, also police the CT's source IP addresses (routed mode
/// always does).
pub const FLAG_IP_FILTER: u8 = 1 << 1;

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

/// `Config::byte_layer`: count `skb->len` as the interface sees it, the whole Ethernet frame
/// (equal to `/sys/class/net/<if>/statistics/*_bytes`).
pub const LAYER_L2: u32 = 0;
/// `Config::byte_layer`: count the frame minus its 14-byte Ethernet header (the IP packet, like
/// OpenVZ vznetstat).
pub const LAYER_L3: u32 = 1;

/// Length of the Ethernet header the programs parse (no VLAN tags on a CT's interface).
pub const ETH_HLEN: u32 = 14;

/// `CT_ADDRS` value marking an address as assigned to the CT.
pub const ADDR_ALLOWED: u32 = 1;

/// `IFACES` value, keyed by the host-side interface's ifindex (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceInfo {
    pub ctid: u32,
    /// `MODE_ROUTED` or `MODE_BRIDGED`.
    pub mode: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// The MAC the CT's side of the pair must send from (with `FLAG_MAC_FILTER`).
    pub mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 12);

/// `CT_ADDRS` key: an address assigned to a CT. IPv4 addresses occupy the first 4 bytes of
/// `addr`, the rest is zero.
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

/// `COUNTERS` key.
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

/// `COUNTERS` value, one per CPU. `packets` counts segments on the wire: a GSO super-packet
/// counts `gso_segs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub bytes: u64,
    pub packets: u64,
}
const _: () = assert!(core::mem::size_of::<CounterValue>() == 16);

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

/// `CONFIG[0]`: global settings of the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `LAYER_L2` or `LAYER_L3`.
    pub byte_layer: u32,
    /// Class of traffic whose peer address matches no prefix in the class tables.
    pub default_class: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 8);

#[cfg(feature = "user")]
mod user {
    use super::{AddrKey, Config, CounterKey, CounterValue, DropKey, DropValue, IfaceInfo};

    // SAFETY: all are #[repr(C)], made only of integers and byte arrays, with explicit padding
    // fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for IfaceInfo {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for DropKey {}
    unsafe impl aya::Pod for DropValue {}
    unsafe impl aya::Pod for Config {}
}
