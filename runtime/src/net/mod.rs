//! CT networking over rtnetlink: routed (venet-style) and bridged (veth) modes.
//!
//! The lifecycle calls [`setup`] with the CT's network namespace (an fd) after creating it and
//! before starting init, keeps the returned [`NetState`] (it is also what `status --json` shows),
//! and calls [`teardown`] when the CT stops. [`add_addrs`]/[`del_addrs`] and
//! [`add_netif`]/[`del_netif`] change a running CT.
//!
//! # Routed mode (OpenVZ venet semantics on a mainline kernel)
//! One veth pair per CT: host end `venet<CTID>`, peer created directly inside the CT's netns as
//! `venet0` (no rename/move round trip). Like OpenVZ's venet the pair is a point-to-point L3 link
//! without ARP/NDP: both ends IFF_NOARP with the same MAC (see `routed::create_link` for why that
//! works), so neither side needs a neighbour entry or a gateway address. Inside the CT: each
//! address as /32 or /128 on `venet0`, default routes `via 169.254.0.1 onlink` and
//! `via fe80::1 onlink` (the gateway is never resolved; any onlink address would do, these are
//! the conventional ones). On the host: no address on `venet<CTID>`, a /32 or /128 route per
//! address to it, and a proxy ARP/NDP entry (`NTF_PROXY`) per address on each neighbour device
//! (a list, or `detect`: the device holding the route towards the address). The CT sees no other
//! CT's frames: every CT has its own point-to-point veth.
//!
//! Host sysctls routed mode needs (set only when not already set, never reset):
//! - `net.ipv4.conf.all.forwarding=1` (= `net.ipv4.ip_forward`): the host routes CT traffic, and
//!   the kernel answers ARP from a proxy entry only on a forwarding interface (arp_process).
//! - `net.ipv6.conf.all.forwarding=1`: same for IPv6; ndisc answers proxied NS only when
//!   forwarding. Note: a forwarding interface ignores router advertisements unless
//!   `accept_ra=2`, so a host that autoconfigures its uplink from RAs must set that.
//! - `net.ipv6.conf.<neighbour dev>.proxy_ndp=1`: enables NDP proxying from the pneigh table.
//!
//! Proxy answers to broadcast ARP / multicast NS are delayed by up to `proxy_delay` (0.8 s by
//! default) per the kernel's neigh parameters; hosters wanting instant first contact can set
//! `net.ipv4.neigh.<dev>.proxy_delay=0` and `net.ipv6.neigh.<dev>.proxy_delay=0`.
//!
//! Teardown: deleting `venet<CTID>` (or letting the kernel destroy it with the CT's netns) removes
//! the peer and the host routes with it; proxy entries live on the
//! neighbour devices and are deleted explicitly.
//!
//! # Bridged mode
//! veth pair `veth<CTID>.<N>` (host) / `eth<N>` (CT, created in the CT's netns), the host end
//! attached to an existing bridge in the same request (`IFLA_MASTER`), stable MACs derived from
//! CTID and N, optional MTU, optional access VLAN on the bridge port (bridge VLAN filtering),
//! optional static addresses and default routes inside the CT.
//!
//! All kernel objects are made over one netlink socket per namespace opened once per call (or
//! once per [`HostNet`] for the host). Setup rolls back in reverse on failure; teardown is best
//! effort, collects every error, treats "not found" as done.

mod bridged;
pub mod config;
pub mod error;
pub mod files;
pub mod inspect;
pub mod nl;
pub mod ns;
pub(crate) mod packet;
mod routed;
mod sysctl;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use self::config::{
    BridgedIface, Iface, MacAddr, NeighbourDevs, NetConfig, ROUTED_GW4, ROUTED_GW6, RoutedIface,
    VENET_CT_IFNAME, validate_hostname,
};
pub use self::error::{AddrHolder, KernelError, NetError};
pub use self::files::{write_hostname_files, write_resolv_conf};
pub use self::nl::Netlink;
pub use self::ns::{NetNsGuard, create_netns, current_netns};
pub use self::routed::veth_request;
use crate::Ctid;
use crate::error_chain::ErrorChain;

/// Host-side name of a CT's routed interface.
pub fn venet_host_ifname(ctid: Ctid) -> String {
    format!("venet{ctid}")
}

/// The host side: its netns (the caller's by default) and a netlink socket opened there once.
///
/// Tests and the benchmark pass a throwaway namespace as "the host".
pub struct HostNet {
    netns: Option<OwnedFd>,
    nl: Netlink,
    /// Sysctls already verified in this namespace (checked once per `HostNet`).
    sysctls_done: HashSet<String>,
    /// Neighbour device name → ifindex, resolved once per `HostNet`.
    dev_index: HashMap<String, u32>,
    /// ifindex → name of devices looked up by index. An ifindex names one device for its
    /// lifetime (the kernel does not reuse them), so only a rename makes an entry stale, and a
    /// `HostNet` lives for one operation.
    dev_names: HashMap<u32, String>,
}

impl HostNet {
    /// The calling thread's current namespace is the host.
    pub fn current() -> Result<Self, NetError> {
        Self::open(None)
    }

    /// `netns` is the host (None: the calling thread's current namespace).
    pub fn open(netns: Option<BorrowedFd<'_>>) -> Result<Self, NetError> {
        let owned = netns
            .map(|fd| {
                fd.try_clone_to_owned().map_err(|e| NetError::Netns {
                    op: "duplicate host netns fd".into(),
                    source: e,
                })
            })
            .transpose()?;
        let nl = match &owned {
            Some(fd) => Netlink::open_in(fd.as_fd(), "the host netns")?,
            None => Netlink::open_current("the host netns")?,
        };
        Ok(Self {
            netns: owned,
            nl,
            sysctls_done: HashSet::new(),
            dev_index: HashMap::new(),
            dev_names: HashMap::new(),
        })
    }

    pub fn netns(&self) -> Option<BorrowedFd<'_>> {
        self.netns.as_ref().map(|f| f.as_fd())
    }

    /// The host netlink socket (for callers that inspect the host, e.g. `status`).
    pub fn netlink(&mut self) -> &mut Netlink {
        &mut self.nl
    }

    fn resolve_dev(&mut self, name: &str) -> Result<u32, NetError> {
        if let Some(i) = self.dev_index.get(name) {
            return Ok(*i);
        }
        let link = self
            .nl
            .link_by_name(name)?
            .ok_or_else(|| NetError::NeighbourDevNotFound {
                dev: name.to_string(),
            })?;
        self.dev_index.insert(name.to_string(), link.header.index);
        Ok(link.header.index)
    }

    fn dev_name(&mut self, index: u32) -> Result<String, NetError> {
        if let Some((n, _)) = self.dev_index.iter().find(|(_, i)| **i == index) {
            return Ok(n.clone());
        }
        if let Some(n) = self.dev_names.get(&index) {
            return Ok(n.clone());
        }
        let link = self.nl.link_by_index(index)?;
        let Some(name) = link.as_ref().and_then(nl::link_name) else {
            return Ok(format!("#{index}"));
        };
        self.dev_names.insert(index, name.to_string());
        Ok(name.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Routed,
    Bridged,
}

/// A proxy ARP/NDP entry berth added on a host device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyEntry {
    pub addr: IpAddr,
    pub dev: String,
    pub ifindex: u32,
}

/// One CT interface as set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IfaceState {
    pub mode: Mode,
    pub ct_ifname: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ct_ifindex: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Addresses inside the CT (routed: /32 and /128).
    pub addrs: Vec<IpNet>,
    /// Proxy entries on the host's neighbour devices (routed only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy: Vec<ProxyEntry>,
    /// Bridged: the settings the interface was made with, so an interface added live without
    /// `--save` can still be named, removed live, or saved later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridged: Option<BridgedIface>,
}

/// What [`setup`] made; persist it with the CT's run state and hand it to [`teardown`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetState {
    pub ctid: Ctid,
    pub ifaces: Vec<IfaceState>,
}

impl NetState {
    pub fn new(ctid: Ctid) -> Self {
        Self {
            ctid,
            ifaces: Vec::new(),
        }
    }

    pub fn routed(&self) -> Option<&IfaceState> {
        self.ifaces.iter().find(|i| i.mode == Mode::Routed)
    }

    /// What a CT with this configuration would have, as far as it can be known without the
    /// kernel: interface names and addresses, no proxy entries. [`teardown`] on such a state
    /// (e.g. by `berth gc` after a crash lost the real state) also removes proxy entries for the
    /// CT's routed addresses found on any host device.
    pub fn expected(ctid: Ctid, cfg: &NetConfig) -> Self {
        let mut st = Self::new(ctid);
        for iface in &cfg.ifaces {
            st.ifaces.push(match iface {
                Iface::Routed(r) => IfaceState {
                    mode: Mode::Routed,
                    ct_ifname: VENET_CT_IFNAME.into(),
                    host_ifname: venet_host_ifname(ctid),
                    host_ifindex: 0,
                    ct_ifindex: 0,
                    ct_mac: None,
                    host_mac: None,
                    bridge: None,
                    vlan: None,
                    addrs: r.addrs.iter().map(|a| IpNet::from(*a)).collect(),
                    proxy: Vec::new(),
                    bridged: None,
                },
                Iface::Bridged(b) => IfaceState {
                    mode: Mode::Bridged,
                    ct_ifname: b.name.clone(),
                    host_ifname: b.host_ifname(ctid),
                    host_ifindex: 0,
                    ct_ifindex: 0,
                    ct_mac: Some(b.ct_mac(ctid)),
                    host_mac: Some(b.host_mac(ctid)),
                    bridge: b.bridge.clone(),
                    vlan: b.vlan,
                    addrs: b.addrs.clone(),
                    proxy: Vec::new(),
                    bridged: Some(b.clone()),
                },
            });
        }
        st
    }
}

fn ct_ns_name(ctid: Ctid) -> String {
    format!("CT {ctid}'s netns")
}

/// Sets up all of a CT's networking inside `ct_netns`. On failure everything done so far is
/// undone (in reverse) and the first error is returned.
pub fn setup(
    ctid: Ctid,
    ct_netns: BorrowedFd<'_>,
    cfg: &NetConfig,
    host: &mut HostNet,
) -> Result<NetState, NetError> {
    setup_with(ctid, ct_netns, cfg, host, &mut |_| Ok(()))
}

/// [`setup`], calling `before_up` once every pair exists and none has carrier, with the
/// interfaces and the addresses they are about to get (start attaches the datapath there).
/// Its error fails the setup (rolled back like any other step).
pub fn setup_with(
    ctid: Ctid,
    ct_netns: BorrowedFd<'_>,
    cfg: &NetConfig,
    host: &mut HostNet,
    before_up: &mut dyn FnMut(&NetState) -> Result<(), NetError>,
) -> Result<NetState, NetError> {
    cfg.validate(ctid)?;
    let mut ct = Netlink::open_in(ct_netns, ct_ns_name(ctid))?;
    let mut state = NetState::new(ctid);
    let res = (|| {
        // Loopback: a fresh netns has `lo` down; CT software expects 127.0.0.1 to work.
        ct.link_set_up(1, "lo")?;
        // Every pair is created with no carrier (routed: both ends down; bridged: the CT end
        // down) and `before_up` attaches the datapath before any comes up: the first frame
        // either end sends (the CT kernel's IPv6 router solicitation or MLD report, sent as
        // the link gets carrier) is counted.
        if cfg.routed().is_some() {
            routed::create_link(ctid, ct_netns, host, &mut ct, &mut state)?;
        }
        let mut joined = Vec::new();
        for b in cfg.bridged() {
            joined.push(bridged::create(
                ctid, ct_netns, b, host, &mut ct, &mut state,
            )?);
        }
        before_up(&planned(&state, cfg))?;
        let mut at = 0;
        if let Some(r) = cfg.routed() {
            routed::links_up(host, &mut ct, &state.ifaces[0])?;
            routed::add(ctid, cfg, &r.addrs, host, &mut ct, &mut state.ifaces[0])?;
            at = 1;
        }
        for (b, j) in cfg.bridged().zip(joined) {
            bridged::configure(ctid, b, j, host, &mut ct, &mut state.ifaces[at])?;
            at += 1;
        }
        Ok(())
    })();
    match res {
        Ok(()) => {
            tracing::debug!(%ctid, ifaces = state.ifaces.len(), "network set up");
            Ok(state)
        }
        Err(e) => {
            tracing::warn!(%ctid, error = %ErrorChain(&e), "network setup failed; rolling back");
            for re in teardown(&state, host, LinkTeardown::Delete) {
                tracing::warn!(%ctid, error = %ErrorChain(&re), "rollback step failed");
            }
            Err(e)
        }
    }
}

/// `state` (interfaces created, none configured yet) with the addresses `cfg` gives each
/// interface, as they will be once set up: what the datapath polices from the first frame.
fn planned(state: &NetState, cfg: &NetConfig) -> NetState {
    let mut p = state.clone();
    let mut bridged = cfg.bridged();
    for i in &mut p.ifaces {
        i.addrs = match i.mode {
            Mode::Routed => cfg
                .routed()
                .map(|r| r.addrs.iter().map(|a| IpNet::from(*a)).collect())
                .unwrap_or_default(),
            Mode::Bridged => bridged.next().map(|b| b.addrs.clone()).unwrap_or_default(),
        };
    }
    p
}

/// How [`teardown`] gets rid of the veth pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkTeardown {
    /// Delete each host-side link (costs ~20 ms per veth in the kernel's RCU waits).
    Delete,
    /// The caller drops the last reference to the CT's netns; the kernel then destroys the veth
    /// pairs with it, batched (and the host routes and gateway addresses with them). Only the
    /// proxy entries, which live on the host's neighbour devices, are removed here.
    NetnsExit,
}

/// Removes a CT's networking from the host. Best effort: every step is tried, the errors are
/// collected; objects already gone count as done. Works without the CT's netns.
pub fn teardown(state: &NetState, host: &mut HostNet, links: LinkTeardown) -> Vec<NetError> {
    let mut errors = Vec::new();
    for iface in state.ifaces.iter().rev() {
        if iface.mode == Mode::Routed {
            if iface.host_ifindex == 0 && iface.proxy.is_empty() {
                // State derived from config only: find the proxy entries by address.
                let addrs: HashSet<IpAddr> = iface.addrs.iter().map(IpNet::addr).collect();
                match host.nl.neighbours(true) {
                    Ok(entries) => {
                        for n in entries {
                            if let Some(a) = inspect::neigh_dst(&n)
                                && addrs.contains(&a)
                            {
                                routed::proxy_del(host, n.header.ifindex, a, &mut errors);
                            }
                        }
                    }
                    Err(e) => errors.push(e),
                }
            }
            for p in iface.proxy.iter().rev() {
                routed::proxy_del(host, p.ifindex, p.addr, &mut errors);
            }
            if links == LinkTeardown::NetnsExit {
                routed::del_host_routes(host, iface, &mut errors);
            }
        }
        if links == LinkTeardown::Delete {
            match host.nl.link_del(&iface.host_ifname) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => errors.push(e),
            }
        }
    }
    errors
}

/// Deletes host-side links named for `ctid`'s interfaces in `cfg` that are still there: left
/// by a run whose state was lost, or kept by a netns something outside the CT still holds.
/// Only the links: a crash's proxy entries are found through the run state
/// ([`NetState::expected`] + [`teardown`]), and dumping every proxy entry of the host on each
/// start would cost milliseconds on a full node.
pub fn remove_stale_links(ctid: Ctid, cfg: &NetConfig, host: &mut HostNet) -> Vec<NetError> {
    let mut errors = Vec::new();
    for iface in NetState::expected(ctid, cfg).ifaces {
        // Only a veth: a configured host_ifname could name a device of the hoster's own.
        if let Err(e) = routed::remove_stale_veth(host, &iface.host_ifname) {
            errors.push(e);
        }
    }
    errors
}

/// Live `--ipadd`: adds routed addresses to a running CT (creating its venet pair if it had
/// none). Refuses an address the host or a running CT already routes; on failure the addresses
/// of this call are removed again. `cfg` supplies neighbour devices and probe/announce settings.
pub fn add_addrs(
    ctid: Ctid,
    ct_netns: BorrowedFd<'_>,
    cfg: &NetConfig,
    addrs: &[IpAddr],
    host: &mut HostNet,
    state: &mut NetState,
) -> Result<(), NetError> {
    let mut seen = HashSet::new();
    for a in addrs {
        config::validate_ct_addr(*a)?;
        if !seen.insert(*a) {
            return Err(NetError::Invalid(format!("address {a} is listed twice")));
        }
    }
    let mut ct = Netlink::open_in(ct_netns, ct_ns_name(ctid))?;
    let created = if state.routed().is_none() {
        routed::create_link(ctid, ct_netns, host, &mut ct, state)?;
        // Live: the caller attaches the datapath once the addresses are in (frames in
        // between are not counted).
        let st = state.ifaces.last().expect("create_link pushed it");
        routed::links_up(host, &mut ct, st)?;
        true
    } else {
        false
    };
    let idx = state
        .ifaces
        .iter()
        .position(|i| i.mode == Mode::Routed)
        .expect("routed iface exists: found or just created");
    let res = routed::add(ctid, cfg, addrs, host, &mut ct, &mut state.ifaces[idx]);
    if res.is_err() && created {
        let iface = state.ifaces.remove(idx);
        let tmp = NetState {
            ctid,
            ifaces: vec![iface],
        };
        for e in teardown(&tmp, host, LinkTeardown::Delete) {
            tracing::warn!(%ctid, error = %ErrorChain(&e), "rollback step failed");
        }
    }
    res
}

/// Which addresses [`del_addrs`] removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrSelection {
    All,
    Some(Vec<IpAddr>),
}

/// Live `--ipdel`: removes routed addresses from a running CT. An address the CT does not have is
/// an error (and nothing is changed); `ct_netns` may be None when the CT's netns is gone.
pub fn del_addrs(
    ctid: Ctid,
    ct_netns: Option<BorrowedFd<'_>>,
    which: &AddrSelection,
    host: &mut HostNet,
    state: &mut NetState,
) -> Result<Vec<NetError>, NetError> {
    let Some(iface) = state.ifaces.iter_mut().find(|i| i.mode == Mode::Routed) else {
        return match which {
            AddrSelection::All => Ok(Vec::new()),
            AddrSelection::Some(a) => Err(NetError::NoSuchAddr {
                ctid,
                addr: a
                    .first()
                    .copied()
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            }),
        };
    };
    let addrs: Vec<IpAddr> = match which {
        AddrSelection::All => iface.addrs.iter().map(IpNet::addr).collect(),
        AddrSelection::Some(list) => {
            for a in list {
                if !iface.addrs.iter().any(|n| n.addr() == *a) {
                    return Err(NetError::NoSuchAddr { ctid, addr: *a });
                }
            }
            list.clone()
        }
    };
    let mut ct = ct_netns
        .map(|fd| Netlink::open_in(fd, ct_ns_name(ctid)))
        .transpose()?;
    let mut errors = Vec::new();
    for a in addrs.iter().rev() {
        routed::del_one(host, ct.as_mut(), iface, *a, &mut errors);
    }
    Ok(errors)
}

/// Takes back routed addresses an add that was killed midway left on `iface` (the CT's routed
/// interface as that add saw it): each address, its host route and its proxy entries, which
/// are those in `iface` or, if they were not recorded, one per neighbour device the CT's other
/// addresses have one on. Errors are returned, not stopped at.
pub fn undo_addrs(
    ctid: Ctid,
    ct_netns: Option<BorrowedFd<'_>>,
    iface: &IfaceState,
    addrs: &[IpAddr],
    host: &mut HostNet,
) -> Vec<NetError> {
    let mut st = iface.clone();
    let mut devs: Vec<(String, u32)> = st
        .proxy
        .iter()
        .map(|p| (p.dev.clone(), p.ifindex))
        .collect();
    devs.sort();
    devs.dedup();
    for a in addrs {
        if !st.proxy.iter().any(|p| p.addr == *a) {
            for (dev, ifindex) in &devs {
                st.proxy.push(ProxyEntry {
                    addr: *a,
                    dev: dev.clone(),
                    ifindex: *ifindex,
                });
            }
        }
    }
    let mut errors = Vec::new();
    let mut ct = match ct_netns
        .map(|fd| Netlink::open_in(fd, ct_ns_name(ctid)))
        .transpose()
    {
        Ok(c) => c,
        Err(e) => {
            errors.push(e);
            None
        }
    };
    for a in addrs {
        routed::del_one(host, ct.as_mut(), &mut st, *a, &mut errors);
    }
    errors
}

/// Live `--netif_add`: adds a bridged interface to a running CT.
pub fn add_netif(
    ctid: Ctid,
    ct_netns: BorrowedFd<'_>,
    iface: &BridgedIface,
    host: &mut HostNet,
    state: &mut NetState,
) -> Result<(), NetError> {
    let mut ct_names: HashSet<String> = state.ifaces.iter().map(|i| i.ct_ifname.clone()).collect();
    let mut host_names: HashSet<String> =
        state.ifaces.iter().map(|i| i.host_ifname.clone()).collect();
    let mut seen: HashSet<IpAddr> = state
        .ifaces
        .iter()
        .flat_map(|i| i.addrs.iter().map(IpNet::addr))
        .collect();
    iface.validate(ctid, &mut ct_names, &mut host_names, &mut seen)?;
    let mut ct = Netlink::open_in(ct_netns, ct_ns_name(ctid))?;
    let before = state.ifaces.len();
    let res = bridged::add(ctid, ct_netns, iface, host, &mut ct, state);
    if res.is_err() && state.ifaces.len() > before {
        let tmp = NetState {
            ctid,
            ifaces: state.ifaces.split_off(before),
        };
        for e in teardown(&tmp, host, LinkTeardown::Delete) {
            tracing::warn!(%ctid, error = %ErrorChain(&e), "rollback step failed");
        }
    }
    res
}

/// Live `--netif_del eth<N>` (None = all bridged interfaces). Deleting the host end removes the
/// CT end with it.
pub fn del_netif(
    ctid: Ctid,
    name: Option<&str>,
    host: &mut HostNet,
    state: &mut NetState,
) -> Result<Vec<NetError>, NetError> {
    if let Some(n) = name
        && !state
            .ifaces
            .iter()
            .any(|i| i.mode == Mode::Bridged && i.ct_ifname == n)
    {
        return Err(NetError::NoSuchIface {
            ctid,
            ifname: n.to_string(),
        });
    }
    let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.ifaces)
        .into_iter()
        .partition(|i| i.mode == Mode::Bridged && name.is_none_or(|n| i.ct_ifname == n));
    state.ifaces = kept;
    let tmp = NetState { ctid, ifaces: gone };
    Ok(teardown(&tmp, host, LinkTeardown::Delete))
}

/// Announces a CT's routed addresses (gratuitous ARP / unsolicited NA) on the devices that
/// proxy them: after a migration the neighbours still point at the old host until told.
pub fn announce_proxied(state: &NetState, host: &mut HostNet) -> Result<(), NetError> {
    let targets: Vec<(IpAddr, String, u32)> = state
        .ifaces
        .iter()
        .flat_map(|i| i.proxy.iter())
        .map(|p| (p.addr, p.dev.clone(), p.ifindex))
        .collect();
    packet::announce(host, &targets)
}

/// Refuses addresses another CT's configuration claims, or that the host (or a running CT's host
/// route) holds. Call before changing a CT's configuration.
pub fn addr_owner_check<'a>(
    ctid: Ctid,
    addrs: &[IpAddr],
    cts: impl IntoIterator<Item = (Ctid, &'a NetConfig)>,
    host: &mut HostNet,
) -> Result<(), NetError> {
    let wanted: HashSet<IpAddr> = addrs.iter().copied().collect();
    for (other, cfg) in cts {
        if other == ctid {
            continue;
        }
        if let Some(a) = cfg.all_addrs().find(|a| wanted.contains(a)) {
            return Err(NetError::AddressInUse {
                addr: a,
                holder: AddrHolder::Ct(other),
                dev: None,
            });
        }
    }
    for a in addrs {
        routed::classify(ctid, *a, host)?;
    }
    Ok(())
}
