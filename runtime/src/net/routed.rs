//! Routed (venet-style) mode. See the module documentation of [`super`] for the design.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAttribute, RouteType};

use super::config::{NeighbourDevs, ROUTED_GW4, ROUTED_GW6, VENET_CT_IFNAME};
use super::error::{AddrHolder, KernelError, NetError};
use super::nl::{Netlink, full_prefix};
use super::{
    HostNet, IfaceState, IpNet, MacAddr, Mode, NetConfig, NetState, ProxyEntry, packet, sysctl,
    venet_host_ifname,
};
use crate::Ctid;
use crate::error_chain::ErrorChain;

fn is_gone(e: &KernelError) -> bool {
    matches!(
        e.errno,
        libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL
    )
}

pub(crate) fn link_mac(l: &LinkMessage) -> Option<MacAddr> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) if b.len() == 6 => {
            let mut m = [0u8; 6];
            m.copy_from_slice(b);
            Some(MacAddr(m))
        }
        _ => None,
    })
}

/// Builds an RTM_NEWLINK for a veth pair (host end up if `host_up`) whose peer is created
/// directly in `peer_netns`, down: the kernel configures the peer before linking the pair, so
/// IFF_UP on the peer fails with ENOTCONN from veth_open (seen on 6.18); bring it up afterwards.
pub fn veth_request(
    host_attrs: Vec<LinkAttribute>,
    mut peer_attrs: Vec<LinkAttribute>,
    peer_netns: BorrowedFd<'_>,
    flags: LinkFlags,
    host_up: bool,
) -> LinkMessage {
    let mut peer = LinkMessage::default();
    peer.header.flags = flags;
    peer.header.change_mask = flags;
    // IFLA_NET_NS_FD inside the peer's ifinfomsg: the kernel creates the peer in that netns,
    // which saves a rename + move round trip per CT (and a window where it sits on the host).
    peer_attrs.push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
    // One queue each, asked for up front: veth allocates one per possible CPU and, left to
    // itself, trims the real count to 1 after registering both ends (veth_init_queues), and
    // netif_set_real_num_tx_queues on a registered device waits for an expedited RCU grace
    // period under RTNL — twice per pair, the largest single cost of a veth creation on 6.18.
    // The datapath is the same: veth only uses more than one queue with XDP/GRO set up.
    peer_attrs.push(LinkAttribute::NumTxQueues(1));
    peer_attrs.push(LinkAttribute::NumRxQueues(1));
    peer.attributes = peer_attrs;
    let host_flags = if host_up {
        flags | LinkFlags::Up
    } else {
        flags
    };
    let mut msg = LinkMessage::default();
    msg.header.flags = host_flags;
    msg.header.change_mask = host_flags;
    msg.attributes = host_attrs;
    msg.attributes.push(LinkAttribute::NumTxQueues(1));
    msg.attributes.push(LinkAttribute::NumRxQueues(1));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    msg
}

/// Turns EEXIST on a veth creation into an error naming the side that exists.
pub(crate) fn which_exists(
    e: NetError,
    host: &mut HostNet,
    ct: &mut Netlink,
    host_name: &str,
    ct_name: &str,
) -> NetError {
    if !matches!(e, NetError::LinkExists { .. }) {
        return e;
    }
    if matches!(host.nl.link_by_name(host_name), Ok(Some(_))) {
        return e;
    }
    if matches!(ct.link_by_name(ct_name), Ok(Some(_))) {
        return NetError::LinkExists {
            ifname: ct_name.to_string(),
            ns: ct.ns.clone(),
        };
    }
    e
}

/// Records host ifindex, peer ifindex (IFLA_LINK) and host MAC of a freshly created veth, from
/// the kernel's echo of the creation or, without one, from a GET.
pub(crate) fn read_back(
    host: &mut HostNet,
    ct: &mut Netlink,
    echo: Option<LinkMessage>,
    host_name: &str,
    ct_name: &str,
    st: &mut IfaceState,
) -> Result<(), NetError> {
    let l = match echo {
        Some(l) => l,
        None => host
            .nl
            .link_by_name(host_name)?
            .ok_or_else(|| NetError::LinkNotFound {
                ifname: host_name.to_string(),
                ns: host.nl.ns.clone(),
            })?,
    };
    st.host_ifindex = l.header.index;
    st.host_mac = link_mac(&l);
    st.ct_ifindex = l
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Link(i) => Some(*i),
            _ => None,
        })
        .unwrap_or(0);
    if st.ct_ifindex == 0 {
        let p = ct
            .link_by_name(ct_name)?
            .ok_or_else(|| NetError::LinkNotFound {
                ifname: ct_name.to_string(),
                ns: ct.ns.clone(),
            })?;
        st.ct_ifindex = p.header.index;
    }
    Ok(())
}

/// Creates the `venet<CTID>` / `venet0` pair and records it in `state` (so rollback removes it).
///
/// The pair is a pure layer-3 point-to-point link, like OpenVZ's venet: both ends IFF_NOARP and
/// the same MAC. On a NOARP device the kernel resolves every neighbour to the device's own MAC
/// (arp_constructor / ndisc_constructor), which is the peer's MAC too, so frames are accepted as
/// PACKET_HOST without any ARP/NDP: no gateway addresses on the host end, no neighbour entries,
/// no DAD on the CT's addresses (addrconf skips DAD on NOARP devices). The host end also gets
/// no IPv6 link-local (addr_gen_mode none): it needs no address at all, and a link-local derived
/// from the shared MAC would equal the CT end's. Both ends stay down: see [`links_up`].
pub(crate) fn create_link(
    ctid: Ctid,
    ct_netns: BorrowedFd<'_>,
    host: &mut HostNet,
    ct: &mut Netlink,
    state: &mut NetState,
) -> Result<(), NetError> {
    let name = venet_host_ifname(ctid);
    let mac = MacAddr::venet(ctid);
    let msg = veth_request(
        vec![
            LinkAttribute::IfName(name.clone()),
            LinkAttribute::Address(mac.0.to_vec()),
        ],
        vec![
            LinkAttribute::IfName(VENET_CT_IFNAME.into()),
            LinkAttribute::Address(mac.0.to_vec()),
        ],
        ct_netns,
        LinkFlags::Noarp,
        // Created down: a new link configured up with flags other than the defaults (IFF_NOARP)
        // gets NETDEV_CHANGE right after NETDEV_UP while it has no carrier, and addrconf then
        // walks the host's whole IPv6 FIB (rt6_sync_down_dev) and ARP/NDP their neighbour
        // tables (neigh_carrier_down): ~0.1 ms per CT with 1000 CTs on 6.18, growing with
        // the host's routes. Brought up in a later request, only NETDEV_UP fires.
        false,
    );
    let echo = match host.nl.link_create(msg.clone(), &name) {
        Err(NetError::LinkExists { .. }) if remove_stale_veth(host, &name)? => {
            host.nl.link_create(msg, &name)
        }
        r => r,
    }
    .map_err(|e| which_exists(e, host, ct, &name, VENET_CT_IFNAME))?;
    state.ifaces.push(IfaceState {
        mode: Mode::Routed,
        ct_ifname: VENET_CT_IFNAME.into(),
        host_ifname: name.clone(),
        host_ifindex: 0,
        ct_ifindex: 0,
        ct_mac: Some(mac),
        host_mac: Some(mac),
        bridge: None,
        vlan: None,
        addrs: Vec::new(),
        proxy: Vec::new(),
        bridged: None,
    });
    let st = state.ifaces.last_mut().expect("just pushed");
    read_back(host, ct, echo, &name, VENET_CT_IFNAME, st)?;
    // addr_gen_mode is refused in RTM_NEWLINK (EAFNOSUPPORT: the inet6 device does not exist
    // yet), so it is set here, while the host end is still down: a change of IFLA_AF_SPEC ends
    // in netdev_state_change, which on an up device without carrier is the NETDEV_CHANGE with
    // its FIB and neighbour walks (see above). Its own request, as do_setlink applies IFF_UP
    // before IFLA_AF_SPEC.
    let mut set = LinkMessage::default();
    set.header.index = st.host_ifindex;
    set.attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
            vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
        )]));
    host.nl
        .request(RouteNetlinkMessage::SetLink(set), 0)?
        .map_err(|e| host.nl.fail("disable IPv6 link-local on", name.clone(), e))?;
    Ok(())
}

/// Brings up the pair [`create_link`] left down (the last routed interface of `state`). The
/// caller attaches the datapath in between, so the first frame either end sends is counted.
pub(crate) fn links_up(
    host: &mut HostNet,
    ct: &mut Netlink,
    st: &IfaceState,
) -> Result<(), NetError> {
    // Up before the CT end: without carrier NETDEV_UP does nothing costly; carrier (and the
    // one FIB walk that comes with it) arrives with the CT end, handled by linkwatch.
    host.nl.link_set_up(st.host_ifindex, &st.host_ifname)?;
    ct.link_set_up(st.ct_ifindex, VENET_CT_IFNAME)
}

/// A host end named for this CT already on the host when its pair is about to be made: left
/// by an earlier run whose netns something outside the CT kept alive (stop leaves the veth to
/// the netns' exit) or whose state was lost. A veth by that name is removed (true); any
/// other kind of device is left alone (false) and the creation will fail naming it.
pub(crate) fn remove_stale_veth(host: &mut HostNet, name: &str) -> Result<bool, NetError> {
    let Some(link) = host.nl.link_by_name(name)? else {
        return Ok(false);
    };
    let is_veth = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    });
    if !is_veth {
        return Ok(false);
    }
    tracing::warn!(
        ifname = name,
        "removing a stale host end left by an earlier run"
    );
    match host.nl.link_del(name) {
        Ok(()) => Ok(true),
        Err(e) if e.is_not_found() => Ok(true),
        Err(e) => Err(e),
    }
}

/// Who holds `addr` on the host, or which host device routes towards it (for `detect`).
pub(crate) fn classify(
    ctid: Ctid,
    addr: IpAddr,
    host: &mut HostNet,
) -> Result<Option<(String, u32)>, NetError> {
    let route = match host.nl.route_get(addr)? {
        Ok(r) => r,
        // No route towards the address: nothing holds it, and there is no device to detect.
        Err(e)
            if matches!(
                e.errno,
                libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EINVAL
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(host.nl.fail("look up route to", addr.to_string(), e)),
    };
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    if route.header.kind == RouteType::Local {
        let dev = host_dev_holding(host, addr);
        return Err(NetError::AddressInUse {
            addr,
            holder: AddrHolder::Host,
            dev,
        });
    }
    let Some(oif) = oif else { return Ok(None) };
    let name = host.dev_name(oif)?;
    if let Some(other) = name
        .strip_prefix("venet")
        .and_then(|n| n.parse::<Ctid>().ok())
    {
        if other == ctid {
            return Ok(None);
        }
        return Err(NetError::AddressInUse {
            addr,
            holder: AddrHolder::Ct(other),
            dev: Some(name),
        });
    }
    Ok(Some((name, oif)))
}

/// Error path only: names the host interface an address is assigned to.
fn host_dev_holding(host: &mut HostNet, addr: IpAddr) -> Option<String> {
    let addrs = host.nl.addrs().ok()?;
    let idx = addrs
        .iter()
        .find(|m| super::inspect::addr_of(m) == Some(addr))?
        .header
        .index;
    host.dev_name(idx).ok()
}

fn ok_if_exists(r: Result<(), KernelError>) -> Result<(), KernelError> {
    match r {
        Err(e) if e.errno == libc::EEXIST => Ok(()),
        r => r,
    }
}

/// Adds routed addresses to the CT's venet interface `st` (host route, CT address, proxy
/// entries), after checking ownership and, if configured, probing for duplicates on the link.
pub(crate) fn add(
    ctid: Ctid,
    cfg: &NetConfig,
    addrs: &[IpAddr],
    host: &mut HostNet,
    ct: &mut Netlink,
    st: &mut IfaceState,
) -> Result<(), NetError> {
    for a in addrs {
        if st.addrs.iter().any(|n| n.addr() == *a) {
            return Err(NetError::Invalid(format!(
                "CT {ctid} already has address {a}"
            )));
        }
    }
    // Phase 1: decide everything before changing anything.
    let mut plan: Vec<(IpAddr, Vec<(String, u32)>)> = Vec::with_capacity(addrs.len());
    for &a in addrs {
        let detected = classify(ctid, a, host)?;
        let devs = match &cfg.neighbour_devs {
            NeighbourDevs::List(l) => l
                .iter()
                .map(|d| host.resolve_dev(d).map(|i| (d.clone(), i)))
                .collect::<Result<Vec<_>, _>>()?,
            NeighbourDevs::Detect => {
                if detected.is_none() {
                    tracing::warn!(%ctid, addr = %a,
                        "no host route towards the address: no proxy ARP/NDP entry (only reachable from the host and other CTs)");
                }
                detected.into_iter().collect()
            }
        };
        plan.push((a, devs));
    }
    let want4 = addrs.iter().any(IpAddr::is_ipv4);
    let want6 = addrs.iter().any(IpAddr::is_ipv6);
    if want4 {
        sysctl::ensure(host, "ipv4/conf/all/forwarding")?;
    }
    if want6 {
        sysctl::ensure(host, "ipv6/conf/all/forwarding")?;
        let mut devs: Vec<&str> = plan
            .iter()
            .filter(|(a, _)| a.is_ipv6())
            .flat_map(|(_, d)| d.iter().map(|(n, _)| n.as_str()))
            .collect();
        devs.sort_unstable();
        devs.dedup();
        for d in devs {
            sysctl::ensure(host, &format!("ipv6/conf/{d}/proxy_ndp"))?;
        }
    }
    if cfg.arp_probe {
        let targets: Vec<(IpAddr, String, u32)> = plan
            .iter()
            .flat_map(|(a, devs)| devs.iter().map(|(n, i)| (*a, n.clone(), *i)))
            .collect();
        packet::dad_probe(host, &targets)?;
    }

    // Phase 2: apply; on failure remove what this call added.
    let had4 = st.addrs.iter().any(|n| n.addr().is_ipv4());
    let had6 = st.addrs.iter().any(|n| n.addr().is_ipv6());
    let mut added: Vec<IpAddr> = Vec::new();
    let res = (|| -> Result<(), NetError> {
        for (want, had, gw) in [
            (want4, had4, IpAddr::V4(ROUTED_GW4)),
            (want6, had6, IpAddr::V6(ROUTED_GW6)),
        ] {
            if !want || had {
                continue;
            }
            let unspec = if gw.is_ipv4() {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            };
            let msg = Netlink::route_msg(unspec, 0, st.ct_ifindex, Some(gw), true);
            match ct.route_add(msg)? {
                Ok(()) => {}
                Err(e) if e.errno == libc::EEXIST => {
                    // A bridged interface's gateway got there first (validation refuses that
                    // combination in one config; live changes can still produce it).
                    tracing::warn!(%ctid, gateway = %gw,
                        "CT already has a default route for this family; venet0's is not added");
                }
                Err(e) => {
                    return Err(ct.fail(
                        "add default route",
                        format!("via {gw} dev {}", st.ct_ifname),
                        e,
                    ));
                }
            }
        }
        for (a, devs) in &plan {
            let a = *a;
            let prefix = full_prefix(a);
            let msg = Netlink::route_msg(a, prefix, st.host_ifindex, None, false);
            match host.nl.route_add(msg)? {
                Ok(()) => {}
                Err(e) if e.errno == libc::EEXIST => {
                    // A route for exactly this address exists: another CT (or the admin)
                    // holds it. Name the holder if we can.
                    return Err(match classify(ctid, a, host) {
                        Err(e @ NetError::AddressInUse { .. }) => e,
                        _ => NetError::AddressInUse {
                            addr: a,
                            holder: AddrHolder::Host,
                            dev: Some("a host route".into()),
                        },
                    });
                }
                Err(e) => {
                    return Err(host.nl.fail(
                        "add host route",
                        format!("{a}/{prefix} dev {}", st.host_ifname),
                        e,
                    ));
                }
            }
            added.push(a);
            let r = ct.addr_add(st.ct_ifindex, a, prefix, &st.ct_ifname)?;
            ok_if_exists(r).map_err(|e| {
                ct.fail(
                    "add address",
                    format!("{a}/{prefix} on {}", st.ct_ifname),
                    e,
                )
            })?;
            st.addrs.push(IpNet::from(a));
            for (dev, idx) in devs {
                host.nl.proxy_add(*idx, a)?.map_err(|e| {
                    host.nl
                        .fail("add proxy neighbour entry", format!("{a} on {dev}"), e)
                })?;
                st.proxy.push(ProxyEntry {
                    addr: a,
                    dev: dev.clone(),
                    ifindex: *idx,
                });
            }
        }
        Ok(())
    })();
    if let Err(e) = res {
        let mut errors = Vec::new();
        for a in added.iter().rev() {
            del_one(host, Some(ct), st, *a, &mut errors);
        }
        for re in errors {
            tracing::warn!(%ctid, error = %ErrorChain(&re), "rollback step failed");
        }
        return Err(e);
    }
    tracing::debug!(%ctid, addrs = ?addrs, "routed addresses added");
    if cfg.gratuitous_arp {
        let targets: Vec<(IpAddr, String, u32)> = plan
            .iter()
            .flat_map(|(a, devs)| devs.iter().map(|(n, i)| (*a, n.clone(), *i)))
            .collect();
        if let Err(e) = packet::announce(host, &targets) {
            // The addresses work without the announcement; peers learn them on first contact.
            tracing::warn!(%ctid, error = %ErrorChain(&e), "gratuitous ARP / unsolicited NA failed");
        }
    }
    Ok(())
}

pub(crate) fn proxy_del(
    host: &mut HostNet,
    ifindex: u32,
    addr: IpAddr,
    errors: &mut Vec<NetError>,
) {
    match host.nl.proxy_del(ifindex, addr) {
        Ok(Ok(())) => {}
        Ok(Err(e)) if is_gone(&e) => {}
        Ok(Err(e)) => {
            let dev = host
                .dev_name(ifindex)
                .unwrap_or_else(|_| format!("#{ifindex}"));
            errors.push(host.nl.fail(
                "delete proxy neighbour entry",
                format!("{addr} on {dev}"),
                e,
            ));
        }
        Err(e) => errors.push(e),
    }
}

/// Removes the host routes of a routed interface whose veth goes away with the CT's netns.
/// They would go with the device anyway, unless something outside the CT still holds the
/// netns (an open /proc/<pid>/ns/net, a bind mount): then the orphaned host end keeps no route
/// that would make the addresses look taken. Two cheap requests, against ~35 ms for deleting
/// the veth itself (its unregistration waits for RCU).
pub(crate) fn del_host_routes(host: &mut HostNet, st: &IfaceState, errors: &mut Vec<NetError>) {
    if st.host_ifindex == 0 {
        return;
    }
    for a in st.addrs.iter().map(|n| n.addr()) {
        del_host_route(host, st, a, errors);
    }
}

/// The host route of `a` towards the CT's venet; already gone counts as done.
fn del_host_route(host: &mut HostNet, st: &IfaceState, a: IpAddr, errors: &mut Vec<NetError>) {
    let prefix = full_prefix(a);
    let msg = Netlink::route_msg(a, prefix, st.host_ifindex, None, false);
    match host.nl.route_del(msg) {
        Ok(Ok(())) => {}
        Ok(Err(e)) if is_gone(&e) => {}
        Ok(Err(e)) => errors.push(host.nl.fail(
            "delete host route",
            format!("{a}/{prefix} dev {}", st.host_ifname),
            e,
        )),
        Err(e) => errors.push(e),
    }
}

/// Removes one routed address (proxy entries, host route, CT address). Best effort.
pub(crate) fn del_one(
    host: &mut HostNet,
    ct: Option<&mut Netlink>,
    st: &mut IfaceState,
    a: IpAddr,
    errors: &mut Vec<NetError>,
) {
    let prefix = full_prefix(a);
    let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut st.proxy)
        .into_iter()
        .partition(|p| p.addr == a);
    st.proxy = kept;
    for p in gone.iter().rev() {
        proxy_del(host, p.ifindex, a, errors);
    }
    del_host_route(host, st, a, errors);
    if let Some(ct) = ct {
        match ct.addr_del(st.ct_ifindex, a, prefix) {
            Ok(Ok(())) => {}
            Ok(Err(e)) if is_gone(&e) => {}
            Ok(Err(e)) => errors.push(ct.fail(
                "delete address",
                format!("{a}/{prefix} on {}", st.ct_ifname),
                e,
            )),
            Err(e) => errors.push(e),
        }
    }
    st.addrs.retain(|n| n.addr() != a);
}
