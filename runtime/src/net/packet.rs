//! Raw link-layer packets on the host's neighbour devices: duplicate-address probes before a
//! routed address is added (OpenVZ's `arpsend -D`) and announcements after (`arpsend -U`).
//!
//! IPv4: ARP probe (sender IP 0.0.0.0, RFC 5227) and gratuitous ARP request (sender = target).
//! IPv6: DAD neighbour solicitation from `::` to the solicited-node group (RFC 4862) and an
//! unsolicited neighbour advertisement to all-nodes with the override flag (RFC 4861 7.2.6).
//! All are sent with the neighbour device's MAC: that is where the host proxies the address.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::error::NetError;
use super::routed::link_mac;
use super::{HostNet, MacAddr, inspect, ns};

/// How long to listen for an answer to the duplicate-address probes (arpsend's default wait).
const DAD_WAIT: Duration = Duration::from_millis(1000);

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;
const PACKET_OUTGOING: u8 = 4;

struct DevSocket {
    fd: OwnedFd,
    dev: String,
    ifindex: u32,
    mac: MacAddr,
}

fn open_packet_socket(dev: &str, ifindex: u32, mac: MacAddr) -> Result<DevSocket, NetError> {
    let perr = |op, source| NetError::Packet {
        op,
        dev: dev.to_string(),
        source,
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if raw < 0 {
        return Err(perr("open packet socket", io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid initial value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: pointer and length describe `sll`, which outlives the call.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(perr("bind packet socket", io::Error::last_os_error()));
    }
    Ok(DevSocket {
        fd,
        dev: dev.to_string(),
        ifindex,
        mac,
    })
}

impl DevSocket {
    fn send(&self, frame: &[u8]) -> Result<(), NetError> {
        // SAFETY: buffer pointer/length come from a live slice.
        let r = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if r < 0 {
            return Err(NetError::Packet {
                op: "send",
                dev: self.dev.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Next incoming (not our own outgoing) frame, or None if none is queued.
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        loop {
            // SAFETY: sockaddr_ll is plain data; pointers/lengths describe live locals.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut sll).cast(),
                    &raw mut len,
                )
            };
            if n < 0 {
                return None;
            }
            if sll.sll_pkttype != PACKET_OUTGOING {
                return Some(n as usize);
            }
        }
    }
}

fn eth_header(dst: [u8; 6], src: MacAddr, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(86);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// ARP request. `sender` 0.0.0.0 makes it a probe; `sender == target` a gratuitous ARP.
fn arp_frame(mac: MacAddr, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = eth_header([0xff; 6], mac, ETH_P_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, hlen 6, plen 4, request
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, body: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            sum += u32::from(w);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(body.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(body);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv6_frame(
    mac: MacAddr,
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    mut icmp: Vec<u8>,
) -> Vec<u8> {
    let ck = icmpv6_checksum(&src, &dst, &icmp);
    icmp[2..4].copy_from_slice(&ck.to_be_bytes());
    let mut f = eth_header(dst_mac, mac, ETH_P_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]); // next header ICMPv6, hop limit 255 (ND requires it)
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// DAD neighbour solicitation for `target`, from `::` to its solicited-node group.
fn dad_ns_frame(mac: MacAddr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let dst = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let dst_mac = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
    let mut icmp = vec![ICMPV6_NS, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    ipv6_frame(mac, dst_mac, Ipv6Addr::UNSPECIFIED, dst, icmp)
}

/// Unsolicited NA for `target` with our MAC as target link-layer address, override set.
fn unsolicited_na_frame(mac: MacAddr, src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![ICMPV6_NA, 0, 0, 0, 0x20, 0, 0, 0]; // flags: O
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]); // option: target link-layer address, 8 bytes
    icmp.extend_from_slice(&mac.0);
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    ipv6_frame(mac, [0x33, 0x33, 0, 0, 0, 1], src, all_nodes, icmp)
}

/// If `frame` shows another machine using `addr`, returns its MAC.
pub(crate) fn claims(frame: &[u8], addr: IpAddr, own: MacAddr) -> Option<MacAddr> {
    if frame.len() < 14 {
        return None;
    }
    let mut src = [0u8; 6];
    src.copy_from_slice(&frame[6..12]);
    if src == own.0 {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    match addr {
        IpAddr::V4(a) if ethertype == ETH_P_ARP && frame.len() >= 42 => {
            // Any ARP packet whose sender protocol address is `addr` (reply or announcement).
            (frame[28..32] == a.octets()).then(|| {
                let mut m = [0u8; 6];
                m.copy_from_slice(&frame[22..28]);
                MacAddr(m)
            })
        }
        IpAddr::V6(a) if ethertype == ETH_P_IPV6 && frame.len() >= 78 => {
            let icmp = &frame[54..];
            (frame[20] == 58 && icmp[0] == ICMPV6_NA && icmp[8..24] == a.octets())
                .then_some(MacAddr(src))
        }
        _ => None,
    }
}

fn dev_sockets(
    host: &mut HostNet,
    targets: &[(IpAddr, String, u32)],
) -> Result<Vec<DevSocket>, NetError> {
    let mut devs: Vec<(String, u32)> = targets.iter().map(|(_, d, i)| (d.clone(), *i)).collect();
    devs.sort();
    devs.dedup();
    let mut macs = Vec::new();
    for (d, i) in &devs {
        let link = host
            .nl
            .link_by_index(*i)?
            .ok_or_else(|| NetError::NeighbourDevNotFound { dev: d.clone() })?;
        let mac = link_mac(&link).ok_or_else(|| NetError::Packet {
            op: "find Ethernet address",
            dev: d.clone(),
            source: io::Error::new(io::ErrorKind::Unsupported, "device has no MAC address"),
        })?;
        macs.push(mac);
    }
    // Packet sockets bind to the netns they are created in: create them in the host netns.
    ns::within(host.netns(), || {
        devs.iter()
            .zip(macs)
            .map(|((d, i), m)| open_packet_socket(d, *i, m))
            .collect()
    })
}

/// Probes every (address, device) pair at once and waits [`DAD_WAIT`] for any claim.
pub(crate) fn dad_probe(
    host: &mut HostNet,
    targets: &[(IpAddr, String, u32)],
) -> Result<(), NetError> {
    if targets.is_empty() {
        return Ok(());
    }
    let socks = dev_sockets(host, targets)?;
    let sock_of = |i: u32| {
        socks
            .iter()
            .find(|s| s.ifindex == i)
            .expect("socket per device")
    };
    for (a, _, i) in targets {
        let s = sock_of(*i);
        let frame = match a {
            IpAddr::V4(a) => arp_frame(s.mac, Ipv4Addr::UNSPECIFIED, *a),
            IpAddr::V6(a) => dad_ns_frame(s.mac, *a),
        };
        s.send(&frame)?;
    }
    let deadline = Instant::now() + DAD_WAIT;
    let mut buf = vec![0u8; 2048];
    let mut pfds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        // SAFETY: `pfds` is a live, correctly sized array of pollfd.
        let r = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                left.as_millis() as i32 + 1,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(NetError::Packet {
                op: "poll",
                dev: socks
                    .iter()
                    .map(|s| s.dev.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                source: e,
            });
        }
        for s in &socks {
            while let Some(n) = s.recv(&mut buf) {
                for (a, _, _) in targets.iter().filter(|t| t.2 == s.ifindex) {
                    if let Some(mac) = claims(&buf[..n], *a, s.mac) {
                        return Err(NetError::DuplicateOnLink {
                            addr: *a,
                            dev: s.dev.clone(),
                            mac: mac.to_string(),
                        });
                    }
                }
            }
        }
    }
}

/// Sends a gratuitous ARP / unsolicited NA for every (address, device) pair.
pub(crate) fn announce(
    host: &mut HostNet,
    targets: &[(IpAddr, String, u32)],
) -> Result<(), NetError> {
    if targets.is_empty() {
        return Ok(());
    }
    let socks = dev_sockets(host, targets)?;
    // Source of an NA: a link-local address of the sending interface (looked up only if needed).
    let mut lladdr: Vec<(u32, Ipv6Addr)> = Vec::new();
    if targets.iter().any(|t| t.0.is_ipv6()) {
        for m in host.nl.addrs()? {
            if let Some(IpAddr::V6(a)) = inspect::addr_of(&m)
                && a.is_unicast_link_local()
            {
                lladdr.push((m.header.index, a));
            }
        }
    }
    for (a, dev, i) in targets {
        let s = socks
            .iter()
            .find(|s| s.ifindex == *i)
            .expect("socket per device");
        let frame = match a {
            IpAddr::V4(a) => arp_frame(s.mac, *a, *a),
            IpAddr::V6(a) => {
                let Some((_, src)) = lladdr.iter().find(|(idx, _)| idx == i) else {
                    tracing::warn!(%dev, addr = %a, "no link-local address on the device; unsolicited NA not sent");
                    continue;
                };
                unsolicited_na_frame(s.mac, *src, *a)
            }
        };
        s.send(&frame)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_known_ns() {
        // NS from :: for 2001:db8::1 — checksum recomputed over the frame must verify to 0.
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let f = dad_ns_frame(mac, "2001:db8::1".parse().unwrap());
        let src: Ipv6Addr = Ipv6Addr::from(<[u8; 16]>::try_from(&f[22..38]).unwrap());
        let dst: Ipv6Addr = Ipv6Addr::from(<[u8; 16]>::try_from(&f[38..54]).unwrap());
        assert_eq!(dst, "ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(icmpv6_checksum(&src, &dst, &f[54..]), 0);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0xff, 0, 0, 1]);
    }

    #[test]
    fn arp_claim_detection() {
        let own = MacAddr([2, 0, 0, 0, 0, 1]);
        let other = MacAddr([2, 0, 0, 0, 0, 2]);
        let a: Ipv4Addr = "192.0.2.10".parse().unwrap();
        let reply = arp_frame(other, a, "192.0.2.1".parse().unwrap());
        assert_eq!(claims(&reply, IpAddr::V4(a), own), Some(other));
        let probe = arp_frame(other, Ipv4Addr::UNSPECIFIED, a);
        assert_eq!(claims(&probe, IpAddr::V4(a), own), None);
        assert_eq!(claims(&arp_frame(own, a, a), IpAddr::V4(a), own), None);
    }
}
