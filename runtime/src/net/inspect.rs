//! Reading a namespace's network state back over netlink: for `status`, `gc` and tests.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    AfSpecBridge, BridgeVlanInfo, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::error::NetError;
use super::nl::{Netlink, link_name};

pub fn addr_of(m: &AddressMessage) -> Option<IpAddr> {
    let mut addr = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => addr = Some(*ip),
            _ => {}
        }
    }
    addr
}

pub fn neigh_dst(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })
}

fn route_addr(a: &RouteAddress) -> String {
    match a {
        RouteAddress::Inet(a) => a.to_string(),
        RouteAddress::Inet6(a) => a.to_string(),
        other => format!("{other:?}"),
    }
}

/// A route in `ip route`-like words: `table 254 192.0.2.10/32 dev venet101 scope Link ...`.
pub fn route_line(r: &RouteMessage, names: &HashMap<u32, String>) -> String {
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    let mut table = u32::from(r.header.table);
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = Some(route_addr(d)),
            RouteAttribute::Gateway(g) => gw = Some(route_addr(g)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let fam = if r.header.address_family == AddressFamily::Inet6 {
        "inet6"
    } else {
        "inet"
    };
    let mut s = format!(
        "{fam} table {table} {}/{} type {:?} proto {:?} scope {:?}",
        dst.unwrap_or_else(|| "default".into()),
        r.header.destination_prefix_length,
        r.header.kind,
        r.header.protocol,
        r.header.scope,
    );
    if let Some(g) = gw {
        s += &format!(" via {g}");
    }
    if let Some(i) = oif {
        s += &format!(
            " dev {}",
            names.get(&i).cloned().unwrap_or_else(|| format!("#{i}"))
        );
    }
    if r.header.flags.contains(RouteFlags::Onlink) {
        s += " onlink";
    }
    s
}

/// Everything berth could have changed in a namespace, as comparable lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub links: BTreeSet<String>,
    pub addrs: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    pub proxy: BTreeSet<String>,
}

fn link_line(l: &LinkMessage, names: &HashMap<u32, String>) -> String {
    let name = link_name(l).unwrap_or("?");
    let mut kind = String::from("-");
    let mut master = None;
    let mut mtu = 0;
    for a in &l.attributes {
        match a {
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        kind = format!("{k:?}").to_lowercase();
                    }
                }
            }
            LinkAttribute::Controller(m) => master = Some(*m),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let up = if l.header.flags.contains(LinkFlags::Up) {
        "up"
    } else {
        "down"
    };
    let noarp = if l.header.flags.contains(LinkFlags::Noarp) {
        " noarp"
    } else {
        ""
    };
    let mut s = format!("{name} {kind} {up}{noarp} mtu {mtu}");
    if let Some(m) = master {
        s += &format!(
            " master {}",
            names.get(&m).cloned().unwrap_or_else(|| format!("#{m}"))
        );
    }
    s
}

impl Snapshot {
    pub fn take(nl: &mut Netlink) -> Result<Self, NetError> {
        let links = nl.links()?;
        let names: HashMap<u32, String> = links
            .iter()
            .filter_map(|l| link_name(l).map(|n| (l.header.index, n.to_string())))
            .collect();
        let name = |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("#{i}"));
        let mut snap = Snapshot {
            links: links.iter().map(|l| link_line(l, &names)).collect(),
            ..Default::default()
        };
        for a in nl.addrs()? {
            if let Some(ip) = addr_of(&a) {
                snap.addrs.insert(format!(
                    "{} {ip}/{}",
                    name(a.header.index),
                    a.header.prefix_len
                ));
            }
        }
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            for r in nl.routes(fam)? {
                snap.routes.insert(route_line(&r, &names));
            }
        }
        for n in nl.neighbours(true)? {
            if let Some(ip) = neigh_dst(&n) {
                snap.proxy
                    .insert(format!("{ip} dev {}", name(n.header.ifindex)));
            }
        }
        Ok(snap)
    }

    /// Lines present in `self` but not in `other`, per category (for readable test failures).
    pub fn minus(&self, other: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        for (what, a, b) in [
            ("link", &self.links, &other.links),
            ("addr", &self.addrs, &other.addrs),
            ("route", &self.routes, &other.routes),
            ("proxy", &self.proxy, &other.proxy),
        ] {
            out.extend(a.difference(b).map(|l| format!("{what}: {l}")));
        }
        out
    }
}

/// The VLANs configured on a bridge port (`bridge vlan show dev PORT`).
pub fn port_vlans(nl: &mut Netlink, port_ifindex: u32) -> Result<Vec<BridgeVlanInfo>, NetError> {
    let mut q = LinkMessage::default();
    q.header.interface_family = AddressFamily::Bridge;
    q.attributes
        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::Brvlan]));
    let msgs = nl
        .dump(RouteNetlinkMessage::GetLink(q))?
        .map_err(|e| nl.fail("list", "bridge port VLANs".into(), e))?;
    let mut out = Vec::new();
    for m in msgs {
        let RouteNetlinkMessage::NewLink(l) = m else {
            continue;
        };
        if l.header.index != port_ifindex {
            continue;
        }
        for a in &l.attributes {
            if let LinkAttribute::AfSpecBridge(specs) = a {
                for s in specs {
                    if let AfSpecBridge::VlanInfo(v) = s {
                        out.push(*v);
                    }
                }
            }
        }
    }
    Ok(out)
}
