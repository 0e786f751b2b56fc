//! Bridged (veth) mode: `veth<CTID>.<N>` on an existing bridge, `eth<N>` in the CT.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::BorrowedFd;

use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    AfSpecBridge, BridgeVlanInfo, BridgeVlanInfoFlags, InfoBridge, InfoData, InfoKind,
    LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};

use super::error::NetError;
use super::nl::Netlink;
use super::routed::{read_back, veth_request, which_exists};
use super::{BridgedIface, HostNet, IfaceState, Mode, NetState};
use crate::Ctid;

struct BridgeInfo {
    index: u32,
    vlan_filtering: bool,
    default_pvid: u16,
}

fn bridge_info(host: &mut HostNet, name: &str) -> Result<BridgeInfo, NetError> {
    let link = host
        .nl
        .link_by_name(name)?
        .ok_or_else(|| NetError::BridgeNotFound {
            bridge: name.to_string(),
        })?;
    let infos: &[LinkInfo] = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i.as_slice()),
            _ => None,
        })
        .unwrap_or(&[]);
    let kind = infos.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k.clone()),
        _ => None,
    });
    if kind != Some(InfoKind::Bridge) {
        return Err(NetError::NotABridge {
            name: name.to_string(),
            kind: kind.map_or_else(
                || "a device without a kind".into(),
                |k| format!("{k:?}").to_lowercase(),
            ),
        });
    }
    let mut info = BridgeInfo {
        index: link.header.index,
        vlan_filtering: false,
        default_pvid: 1,
    };
    for i in infos {
        if let LinkInfo::Data(InfoData::Bridge(data)) = i {
            for d in data {
                match d {
                    InfoBridge::VlanFiltering(v) => info.vlan_filtering = *v,
                    InfoBridge::VlanDefaultPvid(p) => info.default_pvid = *p,
                    _ => {}
                }
            }
        }
    }
    Ok(info)
}

/// RTM_SETLINK/RTM_DELLINK with AF_BRIDGE + IFLA_AF_SPEC: add or remove a VLAN on a bridge port.
fn port_vlan(
    host: &mut HostNet,
    port: u32,
    port_name: &str,
    vid: u16,
    flags: BridgeVlanInfoFlags,
    add: bool,
) -> Result<(), NetError> {
    let mut msg = LinkMessage::default();
    msg.header.interface_family = AddressFamily::Bridge;
    msg.header.index = port;
    msg.attributes
        .push(LinkAttribute::AfSpecBridge(vec![AfSpecBridge::VlanInfo(
            BridgeVlanInfo { flags, vid },
        )]));
    let req = if add {
        RouteNetlinkMessage::SetLink(msg)
    } else {
        RouteNetlinkMessage::DelLink(msg)
    };
    let op = if add { "add VLAN" } else { "remove VLAN" };
    host.nl.request(req, 0)?.map_err(|e| {
        host.nl
            .fail(op, format!("{vid} on bridge port {port_name}"), e)
    })
}

/// Live `--netif_add`: [`create`] then [`configure`].
pub(crate) fn add(
    ctid: Ctid,
    ct_netns: BorrowedFd<'_>,
    b: &BridgedIface,
    host: &mut HostNet,
    ct: &mut Netlink,
    state: &mut NetState,
) -> Result<(), NetError> {
    let bridge = create(ctid, ct_netns, b, host, ct, state)?;
    let st = state.ifaces.last_mut().expect("create pushed it");
    configure(ctid, b, bridge, host, ct, st)
}

/// The bridge a bridged interface joins, as [`create`] found it.
pub(crate) struct Joined(Option<BridgeInfo>);

/// Creates the pair: the host end up (in its bridge), the CT end down, so no frame crosses
/// (without the CT end there is no carrier) until [`configure`] brings it up; the caller
/// attaches the datapath in between.
pub(crate) fn create(
    ctid: Ctid,
    ct_netns: BorrowedFd<'_>,
    b: &BridgedIface,
    host: &mut HostNet,
    ct: &mut Netlink,
    state: &mut NetState,
) -> Result<Joined, NetError> {
    let host_name = b.host_ifname(ctid);
    let bridge = match &b.bridge {
        Some(br) => {
            let info = bridge_info(host, br)?;
            if let Some(vlan) = b.vlan
                && !info.vlan_filtering
            {
                return Err(NetError::VlanFilteringOff {
                    bridge: br.clone(),
                    vlan,
                });
            }
            Some(info)
        }
        None => None,
    };
    let (ct_mac, host_mac) = (b.ct_mac(ctid), b.host_mac(ctid));
    let mut host_attrs = vec![
        LinkAttribute::IfName(host_name.clone()),
        LinkAttribute::Address(host_mac.0.to_vec()),
    ];
    let mut peer_attrs = vec![
        LinkAttribute::IfName(b.name.clone()),
        LinkAttribute::Address(ct_mac.0.to_vec()),
    ];
    if let Some(mtu) = b.mtu {
        host_attrs.push(LinkAttribute::Mtu(mtu));
        peer_attrs.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(br) = &bridge {
        // IFLA_MASTER in the create request enslaves the new device in the same operation.
        host_attrs.push(LinkAttribute::Controller(br.index));
    }
    let msg = veth_request(host_attrs, peer_attrs, ct_netns, LinkFlags::empty(), true);
    let echo = host
        .nl
        .link_create(msg, &host_name)
        .map_err(|e| which_exists(e, host, ct, &host_name, &b.name))?;
    state.ifaces.push(IfaceState {
        mode: Mode::Bridged,
        ct_ifname: b.name.clone(),
        host_ifname: host_name.clone(),
        host_ifindex: 0,
        ct_ifindex: 0,
        ct_mac: Some(ct_mac),
        host_mac: Some(host_mac),
        bridge: b.bridge.clone(),
        vlan: b.vlan,
        addrs: Vec::new(),
        proxy: Vec::new(),
        bridged: Some(b.clone()),
    });
    let st = state.ifaces.last_mut().expect("just pushed");
    read_back(host, ct, echo, &host_name, &b.name, st)?;
    Ok(Joined(bridge))
}

/// The CT end of a pair [`create`] made: up with its static addresses and gateways, VLAN on
/// the bridge port.
pub(crate) fn configure(
    ctid: Ctid,
    b: &BridgedIface,
    Joined(bridge): Joined,
    host: &mut HostNet,
    ct: &mut Netlink,
    st: &mut IfaceState,
) -> Result<(), NetError> {
    let host_name = st.host_ifname.clone();
    // With static addresses berth configures the CT end, so it comes up now; otherwise the CT's
    // own network configuration brings it up.
    if !b.addrs.is_empty() || b.gateway4.is_some() || b.gateway6.is_some() {
        ct.link_set_up(st.ct_ifindex, &b.name)?;
    }

    if let (Some(vid), Some(br)) = (b.vlan, &bridge) {
        port_vlan(
            host,
            st.host_ifindex,
            &host_name,
            vid,
            BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged,
            true,
        )?;
        // A new port joins the bridge's default PVID (usually 1); an access port must not.
        if br.default_pvid != 0 && br.default_pvid != vid {
            port_vlan(
                host,
                st.host_ifindex,
                &host_name,
                br.default_pvid,
                BridgeVlanInfoFlags::empty(),
                false,
            )?;
        }
    }

    for n in &b.addrs {
        let r = ct.addr_add(st.ct_ifindex, n.addr(), n.prefix_len(), &b.name)?;
        r.map_err(|e| ct.fail("add address", format!("{n} on {}", b.name), e))?;
        st.addrs.push(*n);
    }
    let gws = [
        b.gateway4
            .map(IpAddr::V4)
            .map(|g| (g, IpAddr::V4(Ipv4Addr::UNSPECIFIED))),
        b.gateway6
            .map(IpAddr::V6)
            .map(|g| (g, IpAddr::V6(Ipv6Addr::UNSPECIFIED))),
    ];
    for (gw, unspec) in gws.into_iter().flatten() {
        let msg = Netlink::route_msg(unspec, 0, st.ct_ifindex, Some(gw), false);
        match ct.route_add(msg)? {
            Ok(()) => {}
            Err(e) if e.errno == libc::EEXIST => {
                return Err(NetError::Invalid(format!(
                    "{} gateway {gw}: CT {ctid} already has a default route for this address family (venet0 or another interface); give only one interface a gateway",
                    b.name
                )));
            }
            Err(e) => {
                return Err(ct.fail("add default route", format!("via {gw} dev {}", b.name), e));
            }
        }
    }
    tracing::debug!(%ctid, ifname = %b.name, host_ifname = %host_name, "bridged interface added");
    Ok(())
}
