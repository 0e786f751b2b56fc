//! Bounds-checked header parsing. Only the Ethernet header and the fixed IPv4/IPv6/ARP headers
//! are read: classes and anti-spoofing need addresses only, so fragments (which carry the full
//! IP header but no L4 header after the first) and extension headers never need parsing.

use aya_ebpf::programs::TcContext;
use berth_common::{DROP_MALFORMED, ETH_HLEN};

// Ethertypes as a native 16-bit load of the packet's bytes sees them.
const ETH_P_IP: u16 = u16::from_ne_bytes([0x08, 0x00]);
const ETH_P_IPV6: u16 = u16::from_ne_bytes([0x86, 0xdd]);
const ETH_P_ARP: u16 = u16::from_ne_bytes([0x08, 0x06]);

/// The longest header chain read: Ethernet + the fixed IPv6 header.
const MAX_HDR: u32 = ETH_HLEN + 40;

// Header lengths and the offsets of the fields read (RFC 791, RFC 8200, RFC 826).
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const ARP_LEN: usize = 28;
const ETH_SRC: usize = 6;
const ETH_PROTO: usize = 12;
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const IPV6_SRC: usize = 8;
const IPV6_DST: usize = 24;
const ARP_HLEN: usize = 4;
const ARP_PLEN: usize = 5;
const ARP_SPA: usize = 14;

/// Addresses and MACs are words holding the packet's bytes in memory order (what a native
/// load of those bytes gives): compared against map values stored the same way, never
/// byte-swapped, and never spread over byte arrays (with misaligned access enabled LLVM
/// would merge byte stores into misaligned stack stores, which the verifier rejects).
pub enum L3 {
    V4 {
        src: u32,
        dst: u32,
    },
    V6 {
        src: [u64; 2],
        dst: [u64; 2],
    },
    Arp {
        spa: u32,
    },
    /// Any other ethertype (including VLAN-tagged frames).
    Other,
}

pub struct Frame {
    /// Source MAC bytes 0..4 and 4..6.
    pub src_mac: (u32, u16),
    pub l3: L3,
}

/// `len` bytes at `offset` lie inside the linear packet data: their start address.
#[inline(always)]
fn bytes_at(ctx: &TcContext, offset: usize, len: usize) -> Option<usize> {
    let start = ctx.data();
    if start + offset + len > ctx.data_end() {
        return None;
    }
    Some(start + offset)
}

/// A field inside a header `bytes_at` checked.
///
/// # Safety
/// `base + off + size_of::<T>()` must lie within the checked range.
#[inline(always)]
unsafe fn load<T: Copy>(base: usize, off: usize) -> T {
    // SAFETY: the caller guarantees the range; read_unaligned has no alignment requirement.
    unsafe { core::ptr::read_unaligned((base + off) as *const T) }
}

/// Parses the frame; `Err(DROP_MALFORMED)` when a header it needs is truncated or invalid.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Frame, u8> {
    // Direct packet access only covers the skb's linear part; headers are normally linear on a
    // veth, but a frame built from page fragments may not be. Pull what we read, once, so the
    // bounds checks below only fail for frames that really are too short.
    let want = if ctx.len() < MAX_HDR {
        ctx.len()
    } else {
        MAX_HDR
    };
    if ctx.data() + want as usize > ctx.data_end() {
        let _ = ctx.pull_data(want);
    }

    let eth = bytes_at(ctx, 0, ETH_HLEN as usize).ok_or(DROP_MALFORMED)?;
    // SAFETY (every load below): bytes_at checked the header's whole length.
    let (src_mac, proto) = unsafe {
        (
            (load::<u32>(eth, ETH_SRC), load::<u16>(eth, ETH_SRC + 4)),
            load::<u16>(eth, ETH_PROTO),
        )
    };
    let l3_off = ETH_HLEN as usize;

    let l3 = if proto == ETH_P_IP {
        let ip = bytes_at(ctx, l3_off, IPV4_HLEN).ok_or(DROP_MALFORMED)?;
        let version_ihl: u8 = unsafe { load(ip, 0) };
        if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
            return Err(DROP_MALFORMED);
        }
        unsafe {
            L3::V4 {
                src: load(ip, IPV4_SRC),
                dst: load(ip, IPV4_DST),
            }
        }
    } else if proto == ETH_P_IPV6 {
        let ip = bytes_at(ctx, l3_off, IPV6_HLEN).ok_or(DROP_MALFORMED)?;
        let version: u8 = unsafe { load(ip, 0) };
        if version >> 4 != 6 {
            return Err(DROP_MALFORMED);
        }
        unsafe {
            L3::V6 {
                src: [load(ip, IPV6_SRC), load(ip, IPV6_SRC + 8)],
                dst: [load(ip, IPV6_DST), load(ip, IPV6_DST + 8)],
            }
        }
    } else if proto == ETH_P_ARP {
        let arp = bytes_at(ctx, l3_off, ARP_LEN).ok_or(DROP_MALFORMED)?;
        let (hlen, plen): (u8, u8) = unsafe { (load(arp, ARP_HLEN), load(arp, ARP_PLEN)) };
        if hlen != 6 || plen != 4 {
            return Err(DROP_MALFORMED);
        }
        L3::Arp {
            spa: unsafe { load(arp, ARP_SPA) },
        }
    } else {
        L3::Other
    };
    Ok(Frame { src_mac, l3 })
}

/// The first 8 bytes of a prefix as a native load sees them (for masks on `[u64; 2]`).
const fn word(b: [u8; 8]) -> u64 {
    u64::from_ne_bytes(b)
}

/// fe80::/10
#[inline(always)]
pub fn is_v6_link_local(a: &[u64; 2]) -> bool {
    a[0] & word([0xff, 0xc0, 0, 0, 0, 0, 0, 0]) == word([0xfe, 0x80, 0, 0, 0, 0, 0, 0])
}

/// ff02::/16 (any flags): link-scope multicast (all-nodes, solicited-node for neighbour
/// discovery).
#[inline(always)]
pub fn is_v6_link_multicast(a: &[u64; 2]) -> bool {
    a[0] & word([0xff, 0x0f, 0, 0, 0, 0, 0, 0]) == word([0xff, 0x02, 0, 0, 0, 0, 0, 0])
}

#[inline(always)]
pub fn is_v6_unspecified(a: &[u64; 2]) -> bool {
    a[0] == 0 && a[1] == 0
}
