//! Host-side interface, tc egress: every packet delivered to the CT.
//!
//! A routed CT only receives packets for its own addresses (plus IPv6 link-local and
//! link-scope multicast for neighbour discovery) and ARP from the host; any other ethertype is
//! dropped. Bridged CTs receive everything (the bridge decides), only counted.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use berth_common::{DIR_IN, DROP_BAD_DST, DROP_NON_IP, IfaceInfo, MODE_ROUTED};

use crate::{
    account::{self, Peer},
    packet::{self, L3},
};

#[classifier]
pub fn berth_to_ct(ctx: TcContext) -> i32 {
    account::clear_record(&ctx);
    let Some(iface) = account::iface(&ctx, account::Hook::Egress) else {
        return TC_ACT_UNSPEC;
    };
    let verdict = try_to_ct(&ctx, iface);
    account::finish(&ctx, iface, DIR_IN, verdict)
}

#[inline(always)]
fn try_to_ct(ctx: &TcContext, iface: &IfaceInfo) -> Result<Peer, u8> {
    let frame = packet::parse(ctx)?;
    let routed = iface.mode == MODE_ROUTED;
    match frame.l3 {
        L3::V4 { src, dst } => {
            if routed && !account::owns_v4(iface, dst) {
                return Err(DROP_BAD_DST);
            }
            Ok(Peer::V4(src))
        }
        L3::V6 { src, dst, .. } => {
            // Only routed mode polices destinations: bridged CTs get no lookup at all.
            if routed
                && !(packet::is_v6_link_local(&dst)
                    || packet::is_v6_link_multicast(&dst)
                    || account::owns_v6(iface, &dst))
            {
                return Err(DROP_BAD_DST);
            }
            Ok(Peer::V6(src))
        }
        L3::Arp { .. } => Ok(Peer::None),
        L3::Other => {
            if routed {
                return Err(DROP_NON_IP);
            }
            Ok(Peer::None)
        }
    }
}
