//! Bounds-checked header parsing. Only the Ethernet header and the fixed IPv4/IPv6/ARP headers
//! are read: classes and anti-spoofing need addresses only, so fragments (which carry the full
//! IP header but no L4 header after the first) and extension headers never need parsing.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use berth_common::{DROP_MALFORMED, ETH_HLEN};

const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
const ETH_P_ARP: [u8; 2] = [0x08, 0x06];

/// The longest header chain read: Ethernet + the fixed IPv6 header.
const MAX_HDR: u32 = ETH_HLEN + 40;

// Header layouts made of bytes only (alignment 1), so a pointer at any packet offset is valid.
#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto: [u8; 2],
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    protocol: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    version_tc: u8,
    tc_flow: [u8; 3],
    payload_len: [u8; 2],
    next_hdr: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// ARP for IPv4 over Ethernet (RFC 826), the only kind a CT's interface carries.
#[repr(C)]
struct ArpEthIpv4 {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    op: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

const _: () = assert!(size_of::<EthHdr>() == ETH_HLEN as usize);
const _: () = assert!(size_of::<Ipv4Hdr>() == 20);
const _: () = assert!(size_of::<Ipv6Hdr>() == 40);
const _: () = assert!(size_of::<ArpEthIpv4>() == 28);

pub enum L3 {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
    },
    Arp {
        spa: [u8; 4],
    },
    /// Any other ethertype (including VLAN-tagged frames).
    Other,
}

pub struct Frame {
    pub src_mac: [u8; 6],
    pub l3: L3,
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
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

    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: ptr_at checked that the header lies within [data, data_end).
    let (src_mac, proto) = unsafe { ((*eth).src, (*eth).proto) };
    let l3_off = ETH_HLEN as usize;

    let l3 = if proto == ETH_P_IP {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(DROP_MALFORMED)?;
        // SAFETY: bounds-checked by ptr_at.
        let (version_ihl, src, dst) = unsafe { ((*ip).version_ihl, (*ip).src, (*ip).dst) };
        if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
            return Err(DROP_MALFORMED);
        }
        L3::V4 { src, dst }
    } else if proto == ETH_P_IPV6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off).ok_or(DROP_MALFORMED)?;
        // SAFETY: bounds-checked by ptr_at.
        let (version_tc, src, dst) = unsafe { ((*ip).version_tc, (*ip).src, (*ip).dst) };
        if version_tc >> 4 != 6 {
            return Err(DROP_MALFORMED);
        }
        L3::V6 { src, dst }
    } else if proto == ETH_P_ARP {
        let arp: *const ArpEthIpv4 = ptr_at(ctx, l3_off).ok_or(DROP_MALFORMED)?;
        // SAFETY: bounds-checked by ptr_at.
        let (hlen, plen, spa) = unsafe { ((*arp).hlen, (*arp).plen, (*arp).spa) };
        if hlen != 6 || plen != 4 {
            return Err(DROP_MALFORMED);
        }
        L3::Arp { spa }
    } else {
        L3::Other
    };
    Ok(Frame { src_mac, l3 })
}

/// fe80::/10
#[inline(always)]
pub fn is_v6_link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// ff02::/16: link-scope multicast (all-nodes, solicited-node for neighbour discovery).
#[inline(always)]
pub fn is_v6_link_multicast(a: &[u8; 16]) -> bool {
    a[0] == 0xff && a[1] & 0x0f == 0x02
}

#[inline(always)]
pub fn is_v6_unspecified(a: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    true
}
