//! Host-side interface, tc ingress: every packet the CT sends.
//!
//! Routed CTs may only send from their own addresses (IPv4, IPv6, and as ARP sender), plus IPv6
//! link-local sources and `::` towards link-scope multicast (DAD, MLD); any other
//! ethertype is dropped. Bridged CTs must use their MAC (with `FLAG_MAC_FILTER`) and, with
//! `FLAG_IP_FILTER`, obey the same address rules.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use berth_common::{
    DIR_OUT, DROP_NON_IP, DROP_SPOOFED_IP, DROP_SPOOFED_MAC, FLAG_IP_FILTER, FLAG_MAC_FILTER,
    IfaceInfo, MODE_ROUTED,
};

use crate::{
    account::{self, Peer},
    packet::{self, L3},
};

#[classifier]
pub fn berth_from_ct(ctx: TcContext) -> i32 {
    account::clear_record(&ctx);
    let Some(iface) = account::iface(&ctx, account::Hook::Ingress) else {
        return TC_ACT_UNSPEC;
    };
    let verdict = try_from_ct(&ctx, iface);
    account::finish(&ctx, iface, DIR_OUT, verdict)
}

#[inline(always)]
fn try_from_ct(ctx: &TcContext, iface: &IfaceInfo) -> Result<Peer, u8> {
    let frame = packet::parse(ctx)?;
    if iface.flags & FLAG_MAC_FILTER != 0 && frame.src_mac != account::mac_words(iface) {
        return Err(DROP_SPOOFED_MAC);
    }
    let police_ip = iface.mode == MODE_ROUTED || iface.flags & FLAG_IP_FILTER != 0;
    match frame.l3 {
        L3::V4 { src, dst } => {
            if police_ip && !account::owns_v4(iface, src) {
                return Err(DROP_SPOOFED_IP);
            }
            Ok(Peer::V4(dst))
        }
        L3::V6 { src, dst, .. } => {
            // Link-local sources never leave the link (the host does not forward them), and
            // neighbour discovery needs them. `::` is legitimate only towards link-scope
            // multicast: DAD probes and the MLD reports Linux sends while its link-local
            // address is still tentative.
            if police_ip
                && !(packet::is_v6_link_local(&src)
                    || (packet::is_v6_unspecified(&src) && packet::is_v6_link_multicast(&dst))
                    || account::owns_v6(iface, &src))
            {
                return Err(DROP_SPOOFED_IP);
            }
            Ok(Peer::V6(dst))
        }
        L3::Arp { spa } => {
            // The host answers the CT's ARP by proxy ARP; the CT may only claim its own
            // addresses as sender (0.0.0.0 is an ARP probe, RFC 5227).
            if police_ip && spa != 0 && !account::owns_v4(iface, spa) {
                return Err(DROP_SPOOFED_IP);
            }
            Ok(Peer::None)
        }
        L3::Other => {
            if police_ip {
                return Err(DROP_NON_IP);
            }
            Ok(Peer::None)
        }
    }
}
