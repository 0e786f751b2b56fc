//! A small synchronous rtnetlink socket bound to one network namespace.
//!
//! A netlink socket stays bound to the namespace it was created in, whatever the thread does later,
//! so one socket per namespace is opened once (inside a short [`NetNsGuard`]) and reused for every
//! request. Requests are sent one at a time and acknowledged before the next: the start path is
//! latency-bound, not throughput-bound, and a failure must name the exact request that failed.

use std::net::IpAddr;
use std::os::fd::BorrowedFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_ECHO, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::error::{KernelError, NetError};
use super::ns::NetNsGuard;

/// `NLMSGERR_ATTR_MSG`: the extended-ack text attribute after a capped error header.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Size of `struct nlmsghdr`; with `NETLINK_CAP_ACK` the error payload echoes only that header.
const NLMSG_HDRLEN: usize = 16;
/// Main routing table id.
pub(crate) const RT_TABLE_MAIN: u8 = 254;

pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Human-readable namespace name used in error messages ("the host netns", "CT 101's netns").
    pub(crate) ns: String,
}

pub(crate) fn family_of(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

pub(crate) fn full_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl Netlink {
    /// Opens a socket in the calling thread's current namespace.
    pub fn open_current(ns: impl Into<String>) -> Result<Self, NetError> {
        let ns = ns.into();
        let sock_err = |op, source| NetError::Socket {
            op,
            ns: ns.clone(),
            source,
        };
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| sock_err("socket", e))?;
        sock.bind_auto().map_err(|e| sock_err("bind", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| sock_err("connect", e))?;
        // Extended acks carry the kernel's own explanation ("Nexthop has invalid gateway", ...);
        // capped acks keep error replies small. Both exist since 4.12; failure is not fatal.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        Ok(Self {
            sock,
            seq: 0,
            buf: Vec::with_capacity(64 * 1024),
            ns,
        })
    }

    /// Opens a socket inside `netns` (setns on a short-lived guard); the socket stays bound there.
    pub fn open_in(netns: BorrowedFd<'_>, ns: impl Into<String>) -> Result<Self, NetError> {
        let _guard = NetNsGuard::enter(netns)?;
        Self::open_current(ns)
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, NetError> {
        self.seq = self.seq.wrapping_add(1);
        let mut nl = NetlinkMessage::from(msg);
        nl.header.flags = flags;
        nl.header.sequence_number = self.seq;
        nl.finalize();
        self.buf.clear();
        self.buf.resize(nl.buffer_len(), 0);
        nl.serialize(&mut self.buf);
        self.sock
            .send(&self.buf, 0)
            .map_err(|source| NetError::Socket {
                op: "send",
                ns: self.ns.clone(),
                source,
            })?;
        Ok(self.seq)
    }

    fn recv_batch(&mut self) -> Result<(), NetError> {
        self.buf.clear();
        loop {
            match self.sock.recv(&mut self.buf, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(NetError::Socket {
                        op: "recv",
                        ns: self.ns.clone(),
                        source,
                    });
                }
            }
        }
    }

    fn decode_err(&self, e: impl std::fmt::Display) -> NetError {
        NetError::Socket {
            op: "decode reply",
            ns: self.ns.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        }
    }

    /// Sends a request and waits for its ACK. `Ok(Err(_))` is the kernel refusing the request;
    /// the outer error is a socket-level failure.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Result<(), KernelError>, NetError> {
        Ok(self.request_echo(msg, flags)?.map(|_| ()))
    }

    /// Receives until `on_reply` returns a value for a message answering request `seq`
    /// (messages of other sequence numbers, e.g. late replies to an abandoned request, are
    /// skipped).
    fn replies<T>(
        &mut self,
        seq: u32,
        mut on_reply: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> Option<T>,
    ) -> Result<T, NetError> {
        loop {
            self.recv_batch()?;
            let mut off = 0;
            while let Some(m) = next_reply(&self.buf, &mut off) {
                let m = m.map_err(|e| self.decode_err(e))?;
                if m.header.sequence_number != seq {
                    continue;
                }
                if let Some(done) = on_reply(m.payload) {
                    return Ok(done);
                }
            }
        }
    }

    /// Like [`Self::request`], also returning the messages the kernel sent back before the ACK
    /// (with `NLM_F_ECHO`: the object as created, saving a GET round trip).
    pub fn request_echo(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Result<Vec<RouteNetlinkMessage>, KernelError>, NetError> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        let mut echoed = Vec::new();
        self.replies(seq, |payload| match payload {
            NetlinkPayload::Error(err) => Some(match err.code {
                None => Ok(std::mem::take(&mut echoed)),
                Some(code) => Err(KernelError {
                    errno: -code.get(),
                    extack: extack_text(&err.header),
                }),
            }),
            NetlinkPayload::InnerMessage(inner) => {
                echoed.push(inner);
                None
            }
            _ => None,
        })
    }

    /// Sends a dump request and collects every reply message.
    pub fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<Result<Vec<RouteNetlinkMessage>, KernelError>, NetError> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.replies(seq, |payload| match payload {
            NetlinkPayload::Done(_) => Some(Ok(std::mem::take(&mut out))),
            NetlinkPayload::Error(err) => err.code.map(|code| {
                Err(KernelError {
                    errno: -code.get(),
                    extack: extack_text(&err.header),
                })
            }),
            NetlinkPayload::InnerMessage(inner) => {
                out.push(inner);
                None
            }
            _ => None,
        })
    }

    /// Sends a non-dump GET and returns the single reply.
    pub fn get(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<Result<RouteNetlinkMessage, KernelError>, NetError> {
        let seq = self.send(msg, NLM_F_REQUEST)?;
        self.replies(seq, |payload| match payload {
            NetlinkPayload::Error(err) => Some(Err(KernelError {
                errno: err.code.map_or(libc::EIO, |c| -c.get()),
                extack: extack_text(&err.header),
            })),
            NetlinkPayload::InnerMessage(inner) => Some(Ok(inner)),
            _ => None,
        })
    }

    /// Wraps a kernel refusal into a [`NetError::Netlink`] naming the operation and object.
    pub(crate) fn fail(&self, op: &'static str, object: String, source: KernelError) -> NetError {
        NetError::Netlink {
            op,
            object,
            ns: self.ns.clone(),
            source,
        }
    }

    // ---- links -------------------------------------------------------------------------------

    /// Looks a link up by name. `Ok(None)` when it does not exist.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.get(RouteNetlinkMessage::GetLink(msg))? {
            Ok(RouteNetlinkMessage::NewLink(l)) => Ok(Some(l)),
            Ok(_) => Ok(None),
            Err(e) if e.errno == libc::ENODEV => Ok(None),
            Err(e) => Err(self.fail("look up interface", name.to_string(), e)),
        }
    }

    pub fn link_by_index(&mut self, index: u32) -> Result<Option<LinkMessage>, NetError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.get(RouteNetlinkMessage::GetLink(msg))? {
            Ok(RouteNetlinkMessage::NewLink(l)) => Ok(Some(l)),
            Ok(_) => Ok(None),
            Err(e) if e.errno == libc::ENODEV => Ok(None),
            Err(e) => Err(self.fail("look up interface", format!("#{index}"), e)),
        }
    }

    /// Creates a link; EEXIST becomes [`NetError::LinkExists`]. Returns the link as created
    /// when the kernel echoes it (NLM_F_ECHO on RTM_NEWLINK; older kernels: None).
    pub fn link_create(
        &mut self,
        msg: LinkMessage,
        name: &str,
    ) -> Result<Option<LinkMessage>, NetError> {
        match self.request_echo(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO,
        )? {
            Ok(echo) => Ok(echo.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if e.errno == libc::EEXIST => Err(NetError::LinkExists {
                ifname: name.to_string(),
                ns: self.ns.clone(),
            }),
            Err(e) => Err(self.fail("create interface", name.to_string(), e)),
        }
    }

    /// Deletes a link by name. A missing link is [`NetError::LinkNotFound`].
    pub fn link_del(&mut self, name: &str) -> Result<(), NetError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::DelLink(msg), 0)? {
            Ok(()) => Ok(()),
            Err(e) if e.errno == libc::ENODEV => Err(NetError::LinkNotFound {
                ifname: name.to_string(),
                ns: self.ns.clone(),
            }),
            Err(e) => Err(self.fail("delete interface", name.to_string(), e)),
        }
    }

    pub fn link_set_up(&mut self, index: u32, what: &str) -> Result<(), NetError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), 0)?
            .map_err(|e| self.fail("bring up interface", what.to_string(), e))
    }

    pub fn links(&mut self) -> Result<Vec<LinkMessage>, NetError> {
        let r = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        let msgs = r.map_err(|e| self.fail("list", "interfaces".into(), e))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    // ---- addresses ---------------------------------------------------------------------------

    fn addr_msg(index: u32, addr: IpAddr, prefix: u8, nodad: bool) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.family = family_of(addr);
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.header.scope = if matches!(addr, IpAddr::V6(a) if a.is_unicast_link_local()) {
            AddressScope::Link
        } else {
            AddressScope::Universe
        };
        if nodad {
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        // IFA_LOCAL and IFA_ADDRESS equal: a plain (not point-to-point) address for both families.
        msg.attributes.push(AddressAttribute::Local(addr));
        msg.attributes.push(AddressAttribute::Address(addr));
        msg
    }

    /// Adds an address. IPv6 addresses are added without DAD (`IFA_F_NODAD`): berth refuses
    /// duplicates itself, and a tentative address could not be used for ~1 s after start.
    pub fn addr_add(
        &mut self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
        dev: &str,
    ) -> Result<Result<(), KernelError>, NetError> {
        let msg = Self::addr_msg(index, addr, prefix, addr.is_ipv6());
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .inspect(|r| {
            if r.is_ok() {
                tracing::trace!(%addr, prefix, dev, ns = %self.ns, "address added");
            }
        })
    }

    pub fn addr_del(
        &mut self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<Result<(), KernelError>, NetError> {
        let msg = Self::addr_msg(index, addr, prefix, false);
        self.request(RouteNetlinkMessage::DelAddress(msg), 0)
    }

    pub fn addrs(&mut self) -> Result<Vec<AddressMessage>, NetError> {
        let r = self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
        let msgs = r.map_err(|e| self.fail("list", "addresses".into(), e))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    // ---- routes ------------------------------------------------------------------------------

    /// Builds a main-table unicast route message.
    pub(crate) fn route_msg(
        dst: IpAddr,
        prefix: u8,
        oif: u32,
        gateway: Option<IpAddr>,
        onlink: bool,
    ) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family_of(dst);
        msg.header.destination_prefix_length = prefix;
        msg.header.table = RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Static;
        msg.header.kind = RouteType::Unicast;
        msg.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        if prefix > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        }
        if let Some(gw) = gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        msg
    }

    pub fn route_add(&mut self, msg: RouteMessage) -> Result<Result<(), KernelError>, NetError> {
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    pub fn route_del(&mut self, msg: RouteMessage) -> Result<Result<(), KernelError>, NetError> {
        self.request(RouteNetlinkMessage::DelRoute(msg), 0)
    }

    /// `ip route get ADDR`: the route the kernel would use towards `addr`.
    pub fn route_get(
        &mut self,
        addr: IpAddr,
    ) -> Result<Result<RouteMessage, KernelError>, NetError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family_of(addr);
        msg.header.destination_prefix_length = full_prefix(addr);
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        Ok(match self.get(RouteNetlinkMessage::GetRoute(msg))? {
            Ok(RouteNetlinkMessage::NewRoute(r)) => Ok(r),
            Ok(_) => Err(KernelError {
                errno: libc::EIO,
                extack: Some("unexpected reply to RTM_GETROUTE".into()),
            }),
            Err(e) => Err(e),
        })
    }

    pub fn routes(&mut self, family: AddressFamily) -> Result<Vec<RouteMessage>, NetError> {
        let mut q = RouteMessage::default();
        q.header.address_family = family;
        let r = self.dump(RouteNetlinkMessage::GetRoute(q))?;
        let msgs = r.map_err(|e| self.fail("list", "routes".into(), e))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    // ---- proxy neighbours --------------------------------------------------------------------

    fn proxy_msg(index: u32, addr: IpAddr) -> NeighbourMessage {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family_of(addr);
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Proxy;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::Destination(match addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        msg
    }

    /// Adds a proxy ARP/NDP entry (`ip neigh add proxy ADDR dev DEV`). The kernel's pneigh table
    /// accepts an existing entry silently, so this is idempotent.
    pub fn proxy_add(
        &mut self,
        index: u32,
        addr: IpAddr,
    ) -> Result<Result<(), KernelError>, NetError> {
        self.request(
            RouteNetlinkMessage::NewNeighbour(Self::proxy_msg(index, addr)),
            NLM_F_CREATE,
        )
    }

    pub fn proxy_del(
        &mut self,
        index: u32,
        addr: IpAddr,
    ) -> Result<Result<(), KernelError>, NetError> {
        self.request(
            RouteNetlinkMessage::DelNeighbour(Self::proxy_msg(index, addr)),
            0,
        )
    }

    /// Dumps neighbour entries; `proxy` selects the proxy (pneigh) table instead of the cache.
    pub fn neighbours(&mut self, proxy: bool) -> Result<Vec<NeighbourMessage>, NetError> {
        let mut q = NeighbourMessage::default();
        if proxy {
            q.header.flags = NeighbourFlags::Proxy;
        }
        let r = self.dump(RouteNetlinkMessage::GetNeighbour(q))?;
        let msgs = r.map_err(|e| self.fail("list", "neighbours".into(), e))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(n),
                _ => None,
            })
            .collect())
    }
}

/// The message at `*off` in a received batch, advancing `*off` past it (the kernel pads each to
/// 4 bytes); `None` once no whole header is left.
pub(crate) fn next_reply(
    buf: &[u8],
    off: &mut usize,
) -> Option<Result<NetlinkMessage<RouteNetlinkMessage>, netlink_packet_core::DecodeError>> {
    let rest = buf.get(*off..).filter(|r| r.len() >= NLMSG_HDRLEN)?;
    let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest);
    match &m {
        Ok(m) => {
            *off += (m.header.length as usize)
                .next_multiple_of(4)
                .max(NLMSG_HDRLEN)
        }
        // Nothing after an undecodable message can be trusted to start where it claims.
        Err(_) => *off = buf.len(),
    }
    Some(m)
}

/// Pulls the `NLMSGERR_ATTR_MSG` string out of a capped error payload (original header + TLVs).
pub(crate) fn extack_text(payload: &[u8]) -> Option<String> {
    let mut tlvs = payload.get(NLMSG_HDRLEN..)?;
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let v = &tlvs[4..len];
            let v = v.split(|b| *b == 0).next().unwrap_or(v);
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        tlvs = &tlvs[len.next_multiple_of(4).min(tlvs.len())..];
    }
    None
}

/// Interface name from a link message.
pub(crate) fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extack_parses_message_tlv() {
        let mut p = vec![0u8; NLMSG_HDRLEN];
        let text = b"Nexthop has invalid gateway\0";
        let len = (4 + text.len()) as u16;
        p.extend_from_slice(&len.to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(text);
        assert_eq!(
            extack_text(&p).as_deref(),
            Some("Nexthop has invalid gateway")
        );
        assert_eq!(extack_text(&p[..NLMSG_HDRLEN]), None);
    }
}
