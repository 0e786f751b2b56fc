//! The network part of a CT's configuration (TOML in the CT config) and its validation.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::NetError;
use crate::Ctid;

/// Linux IFNAMSIZ - 1.
pub const IFNAME_MAX: usize = 15;

/// Name of the routed interface inside the CT.
pub const VENET_CT_IFNAME: &str = "venet0";

/// Host-side gateway addresses of routed mode; the CT's default routes point at them (onlink).
pub const ROUTED_GW4: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
pub const ROUTED_GW6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    pub ifaces: Vec<Iface>,
    pub nameservers: Vec<IpAddr>,
    pub searchdomains: Vec<String>,
    /// Host devices that answer ARP/NDP for routed addresses (OpenVZ's NEIGHBOUR_DEVS).
    pub neighbour_devs: NeighbourDevs,
    /// Probe each routed address for duplicates on the neighbour devices before adding it.
    pub arp_probe: bool,
    /// Announce each routed address (gratuitous ARP / unsolicited NA) after adding it.
    pub gratuitous_arp: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Iface {
    Routed(RoutedIface),
    Bridged(BridgedIface),
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutedIface {
    pub addrs: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgedIface {
    /// Interface name inside the CT: `eth<N>`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ifname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<MacAddr>,
    /// Bridge the host end joins. None leaves the host end unattached (vzctl's behaviour when no
    /// bridge is given); the hoster's own tooling wires it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Access VLAN on the bridge port (needs `vlan_filtering` on the bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Static addresses configured inside the CT (for CTs without their own network config).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
}

impl BridgedIface {
    /// A bridged interface with every optional setting at its default.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            mac: None,
            host_ifname: None,
            host_mac: None,
            bridge: None,
            mtu: None,
            vlan: None,
            addrs: Vec::new(),
            gateway4: None,
            gateway6: None,
        }
    }

    /// `N` of `eth<N>`.
    pub fn index(&self) -> Option<u8> {
        self.name.strip_prefix("eth")?.parse().ok()
    }

    pub fn host_ifname(&self, ctid: Ctid) -> String {
        self.host_ifname
            .clone()
            .unwrap_or_else(|| format!("veth{ctid}.{}", self.index().unwrap_or(0)))
    }

    pub fn ct_mac(&self, ctid: Ctid) -> MacAddr {
        self.mac
            .unwrap_or_else(|| MacAddr::derived(ctid, self.index().unwrap_or(0), false))
    }

    pub fn host_mac(&self, ctid: Ctid) -> MacAddr {
        self.host_mac
            .unwrap_or_else(|| MacAddr::derived(ctid, self.index().unwrap_or(0), true))
    }

    /// Parses vzctl's `--netif_add ifname[,mac,host_ifname,host_mac,bridge]` (empty fields keep
    /// their defaults).
    pub fn parse_vzctl(spec: &str) -> Result<Self, NetError> {
        let parts: Vec<&str> = spec.split(',').collect();
        if parts.len() > 5 {
            return Err(NetError::Invalid(format!(
                "--netif_add {spec:?}: expected ifname[,mac,host_ifname,host_mac,bridge]"
            )));
        }
        let field = |i: usize| parts.get(i).map(|s| s.trim()).filter(|s| !s.is_empty());
        let mac = |i: usize| -> Result<Option<MacAddr>, NetError> {
            field(i).map(str::parse).transpose()
        };
        let mut iface = Self::new(field(0).unwrap_or_default());
        iface.mac = mac(1)?;
        iface.host_ifname = field(2).map(str::to_string);
        iface.host_mac = mac(3)?;
        iface.bridge = field(4).map(str::to_string);
        Ok(iface)
    }
}

/// Where proxy ARP/NDP entries for routed addresses go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NeighbourDevs {
    /// The host device holding the route towards each address (`ip route get ADDR`).
    #[default]
    Detect,
    List(Vec<String>),
}

impl Serialize for NeighbourDevs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            NeighbourDevs::Detect => s.serialize_str("detect"),
            NeighbourDevs::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for NeighbourDevs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Word(String),
            List(Vec<String>),
        }
        match Repr::deserialize(d)? {
            Repr::Word(w) if w == "detect" => Ok(NeighbourDevs::Detect),
            // vzctl's NEIGHBOUR_DEVS takes a space-separated list.
            Repr::Word(w) => Ok(NeighbourDevs::List(
                w.split_whitespace().map(str::to_string).collect(),
            )),
            Repr::List(l) => Ok(NeighbourDevs::List(l)),
        }
    }
}

/// An Ethernet MAC address, written `02:b3:00:00:00:65`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A stable, locally administered unicast MAC derived from CTID and interface number.
    ///
    /// CT side starts with `02`; host side with `fe`: a Linux bridge without an explicit address
    /// takes the numerically lowest port MAC as its own, so host ends sorting high keep a bridge's
    /// MAC from changing whenever a CT starts or stops.
    pub fn derived(ctid: Ctid, n: u8, host_side: bool) -> Self {
        let c = ctid.get().to_be_bytes();
        Self([
            if host_side { 0xfe } else { 0x02 },
            n,
            c[0],
            c[1],
            c[2],
            c[3],
        ])
    }

    /// The MAC of both ends of a CT's routed venet pair (first byte `06`: locally administered,
    /// distinct from bridged interfaces' `02`/`fe`).
    pub fn venet(ctid: Ctid) -> Self {
        let c = ctid.get().to_be_bytes();
        Self([0x06, 0, c[0], c[1], c[2], c[3]])
    }

    pub fn is_valid_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            NetError::Invalid(format!(
                "MAC address {s:?}: expected six hex bytes like 02:00:00:00:00:01"
            ))
        };
        let mut out = [0u8; 6];
        let mut it = s.split([':', '-']);
        for b in &mut out {
            let p = it.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks an interface name against the kernel's rules (dev_valid_name).
pub fn validate_ifname(name: &str, what: &str) -> Result<(), NetError> {
    if name.is_empty()
        || name.len() > IFNAME_MAX
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || !b.is_ascii_graphic())
    {
        return Err(NetError::Invalid(format!(
            "{what} {name:?}: interface names are 1-{IFNAME_MAX} printable characters without '/', ':' or spaces"
        )));
    }
    Ok(())
}

/// Checks that an address can be given to a CT in routed mode.
pub fn validate_ct_addr(addr: IpAddr) -> Result<(), NetError> {
    let why = match addr {
        IpAddr::V4(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V4(a) if a.is_link_local() => {
            Some("link-local (169.254.0.0/16 is the routed gateway's range)")
        }
        IpAddr::V4(a) if a.is_multicast() || a.is_broadcast() => {
            Some("a multicast/broadcast address")
        }
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("link-local (fe80::/10)"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some("an IPv4-mapped address"),
        _ => None,
    };
    match why {
        Some(w) => Err(NetError::Invalid(format!("address {addr} is {w}"))),
        None => Ok(()),
    }
}

impl NetConfig {
    pub fn routed(&self) -> Option<&RoutedIface> {
        self.ifaces.iter().find_map(|i| match i {
            Iface::Routed(r) => Some(r),
            Iface::Bridged(_) => None,
        })
    }

    pub fn bridged(&self) -> impl Iterator<Item = &BridgedIface> {
        self.ifaces.iter().filter_map(|i| match i {
            Iface::Bridged(b) => Some(b),
            Iface::Routed(_) => None,
        })
    }

    /// Every address this CT claims (routed addresses and static bridged ones).
    pub fn all_addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.routed()
            .into_iter()
            .flat_map(|r| r.addrs.iter().copied())
            .chain(
                self.bridged()
                    .flat_map(|b| b.addrs.iter().map(|n| n.addr())),
            )
    }

    /// Validates the whole configuration; the error names the first problem found.
    pub fn validate(&self, ctid: Ctid) -> Result<(), NetError> {
        let mut routed = 0;
        let mut ct_names = HashSet::new();
        let mut host_names = HashSet::new();
        let mut seen = HashSet::new();
        for iface in &self.ifaces {
            match iface {
                Iface::Routed(r) => {
                    routed += 1;
                    if routed > 1 {
                        return Err(NetError::Invalid(
                            "more than one routed interface: a CT has one venet0 holding all its routed addresses".into(),
                        ));
                    }
                    for a in &r.addrs {
                        validate_ct_addr(*a)?;
                        if !seen.insert(*a) {
                            return Err(NetError::Invalid(format!("address {a} is listed twice")));
                        }
                    }
                    ct_names.insert(VENET_CT_IFNAME.to_string());
                    host_names.insert(format!("venet{ctid}"));
                }
                Iface::Bridged(b) => b.validate(ctid, &mut ct_names, &mut host_names, &mut seen)?,
            }
        }
        // One default route per family: venet0's (when it has addresses of that family) or one
        // bridged interface's gateway.
        for v6 in [false, true] {
            let mut sources: Vec<String> = Vec::new();
            if self
                .routed()
                .is_some_and(|r| r.addrs.iter().any(|a| a.is_ipv6() == v6))
            {
                sources.push(VENET_CT_IFNAME.into());
            }
            for b in self.bridged() {
                if (v6 && b.gateway6.is_some()) || (!v6 && b.gateway4.is_some()) {
                    sources.push(b.name.clone());
                }
            }
            if sources.len() > 1 {
                return Err(NetError::Invalid(format!(
                    "more than one IPv{} default route (from {}): give only one interface a gateway",
                    if v6 { 6 } else { 4 },
                    sources.join(", ")
                )));
            }
        }
        if let NeighbourDevs::List(l) = &self.neighbour_devs {
            for d in l {
                validate_ifname(d, "neighbour device")?;
            }
        }
        for d in &self.searchdomains {
            validate_hostname(d).map_err(|_| {
                NetError::Invalid(format!("search domain {d:?} is not a valid domain name"))
            })?;
        }
        if self.nameservers.len() > 3 {
            tracing::warn!(
                %ctid, count = self.nameservers.len(),
                "more than 3 nameservers: glibc's resolver uses only the first 3"
            );
        }
        Ok(())
    }
}

impl BridgedIface {
    pub fn validate(
        &self,
        ctid: Ctid,
        ct_names: &mut HashSet<String>,
        host_names: &mut HashSet<String>,
        seen: &mut HashSet<IpAddr>,
    ) -> Result<(), NetError> {
        if self.index().is_none() {
            return Err(NetError::Invalid(format!(
                "bridged interface name {:?}: expected eth<N> with N from 0 to 255",
                self.name
            )));
        }
        if !ct_names.insert(self.name.clone()) {
            return Err(NetError::Invalid(format!(
                "interface {} is configured twice",
                self.name
            )));
        }
        let host = self.host_ifname(ctid);
        validate_ifname(&host, "host interface name").map_err(|e| match self.host_ifname {
            None => NetError::Invalid(format!(
                "default host interface name {host:?} for {} is longer than {IFNAME_MAX} characters; set host_ifname",
                self.name
            )),
            Some(_) => e,
        })?;
        if host.starts_with("venet") && self.host_ifname.is_some() {
            return Err(NetError::Invalid(format!(
                "host interface name {host:?}: venet* names are reserved for routed mode"
            )));
        }
        if !host_names.insert(host.clone()) {
            return Err(NetError::Invalid(format!(
                "host interface name {host} is used twice"
            )));
        }
        if let Some(b) = &self.bridge {
            validate_ifname(b, "bridge")?;
        }
        for (what, m) in [("mac", self.mac), ("host_mac", self.host_mac)] {
            if let Some(m) = m
                && !m.is_valid_unicast()
            {
                return Err(NetError::Invalid(format!(
                    "{} {what} {m}: must be a unicast, non-zero MAC address",
                    self.name
                )));
            }
        }
        if let Some(mtu) = self.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(NetError::Invalid(format!(
                "{} mtu {mtu}: must be between 68 and 65535",
                self.name
            )));
        }
        if let Some(v) = self.vlan
            && !(1..=4094).contains(&v)
        {
            return Err(NetError::Invalid(format!(
                "{} vlan {v}: must be between 1 and 4094",
                self.name
            )));
        }
        if self.vlan.is_some() && self.bridge.is_none() {
            return Err(NetError::Invalid(format!(
                "{} vlan needs a bridge (the VLAN is set on the bridge port)",
                self.name
            )));
        }
        for n in &self.addrs {
            validate_ct_addr(n.addr())?;
            if !seen.insert(n.addr()) {
                return Err(NetError::Invalid(format!(
                    "address {} is listed twice",
                    n.addr()
                )));
            }
        }
        if let Some(g) = self.gateway4
            && !self.addrs.iter().any(|n| n.contains(&IpAddr::V4(g)))
        {
            return Err(NetError::Invalid(format!(
                "{} gateway4 {g} is not inside any of its IPv4 addresses' prefixes",
                self.name
            )));
        }
        if let Some(g) = self.gateway6
            && !g.is_unicast_link_local()
            && !self.addrs.iter().any(|n| n.contains(&IpAddr::V6(g)))
        {
            return Err(NetError::Invalid(format!(
                "{} gateway6 {g} is neither link-local nor inside its IPv6 prefixes",
                self.name
            )));
        }
        Ok(())
    }
}

/// RFC 1123 host name (a trailing dot allowed); the rule lives in `crate::config`.
pub fn validate_hostname(name: &str) -> Result<(), NetError> {
    crate::config::validate_hostname(name.strip_suffix('.').unwrap_or(name))
        .map_err(NetError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(n: u32) -> Ctid {
        Ctid::new(n).unwrap()
    }

    #[test]
    fn toml_roundtrip() {
        let text = r#"
            nameservers = ["192.0.2.53"]
            neighbour_devs = ["eth0", "eth1"]
            arp_probe = true
            [[ifaces]]
            mode = "routed"
            addrs = ["192.0.2.10", "2001:db8::10"]
            [[ifaces]]
            mode = "bridged"
            name = "eth0"
            bridge = "vmbr0"
            vlan = 10
            addrs = ["198.51.100.5/24"]
        "#;
        let cfg: NetConfig = toml::from_str(text).unwrap();
        cfg.validate(ct(101)).unwrap();
        assert_eq!(cfg.routed().unwrap().addrs.len(), 2);
        assert_eq!(
            cfg.neighbour_devs,
            NeighbourDevs::List(vec!["eth0".into(), "eth1".into()])
        );
        let back: NetConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        let d: NetConfig = toml::from_str("neighbour_devs = \"detect\"").unwrap();
        assert_eq!(d.neighbour_devs, NeighbourDevs::Detect);
    }

    #[test]
    fn derived_macs_are_stable_and_local() {
        let a = MacAddr::derived(ct(101), 0, false);
        assert_eq!(a.to_string(), "02:00:00:00:00:65");
        assert_eq!(
            MacAddr::derived(ct(101), 0, true).to_string(),
            "fe:00:00:00:00:65"
        );
        assert!(a.is_valid_unicast() && a.0[0] & 2 == 2);
        assert_ne!(a, MacAddr::derived(ct(101), 1, false));
        assert_eq!("02:00:00:00:00:65".parse::<MacAddr>().unwrap(), a);
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00:00:01".parse::<MacAddr>().is_err());
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let mut cfg = NetConfig::default();
        cfg.ifaces.push(Iface::Routed(RoutedIface {
            addrs: vec!["169.254.0.1".parse().unwrap()],
        }));
        let e = cfg.validate(ct(1)).unwrap_err().to_string();
        assert!(e.contains("169.254.0.1") && e.contains("link-local"), "{e}");

        let mut b = BridgedIface::new("eth12");
        let mut cfg = NetConfig::default();
        cfg.ifaces.push(Iface::Bridged(b.clone()));
        let e = cfg.validate(ct(999_999_999)).unwrap_err().to_string();
        assert!(
            e.contains("veth999999999.12") && e.contains("host_ifname"),
            "{e}"
        );

        b.name = "eth1".into();
        b.vlan = Some(5);
        let cfg = NetConfig {
            ifaces: vec![Iface::Bridged(b)],
            ..Default::default()
        };
        assert!(
            cfg.validate(ct(5))
                .unwrap_err()
                .to_string()
                .contains("vlan needs a bridge")
        );
    }

    #[test]
    fn vzctl_netif_syntax() {
        let b = BridgedIface::parse_vzctl("eth1,02:00:00:00:00:01,,,vmbr0").unwrap();
        assert_eq!(b.name, "eth1");
        assert_eq!(b.mac.unwrap().to_string(), "02:00:00:00:00:01");
        assert_eq!(b.host_ifname, None);
        assert_eq!(b.bridge.as_deref(), Some("vmbr0"));
        assert_eq!(b.host_ifname(ct(101)), "veth101.1");
        assert!(BridgedIface::parse_vzctl("eth1,zz").is_err());
    }

    #[test]
    fn hostnames() {
        assert!(validate_hostname("web1.example.com").is_ok());
        assert!(validate_hostname("-bad").is_err());
        assert!(validate_hostname("a..b").is_err());
        assert!(validate_hostname("bad name").is_err());
    }
}
