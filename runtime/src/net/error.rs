//! Errors of the networking layer. Each names the operation and the object, and kernel errnos are
//! translated into messages a hoster can act on.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::Ctid;

/// Who holds an address that a CT asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrHolder {
    /// Another CT (by its configuration or by a live host route to its interface).
    Ct(Ctid),
    /// The host itself: the address is assigned to one of the host's interfaces.
    Host,
}

impl std::fmt::Display for AddrHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddrHolder::Ct(c) => write!(f, "CT {c}"),
            AddrHolder::Host => f.write_str("the host"),
        }
    }
}

/// The kernel's answer to a failed netlink request: errno plus the extended-ack text, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    pub errno: i32,
    pub extack: Option<String>,
}

impl KernelError {
    pub fn io(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.io())?;
        if let Some(m) = &self.extack {
            write!(f, " (kernel: {m})")?;
        }
        Ok(())
    }
}

impl std::error::Error for KernelError {}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network configuration: {0}")]
    Invalid(String),

    #[error("address {addr} is already assigned to {holder}{}", dev.as_ref().map(|d| format!(" (interface {d})")).unwrap_or_default())]
    AddressInUse {
        addr: IpAddr,
        holder: AddrHolder,
        dev: Option<String>,
    },

    #[error(
        "duplicate address probe: {addr} answered on {dev} by {mac} — another machine on the link uses it"
    )]
    DuplicateOnLink {
        addr: IpAddr,
        dev: String,
        mac: String,
    },

    #[error("interface {ifname} already exists in {ns}")]
    LinkExists { ifname: String, ns: String },

    #[error("interface {ifname} does not exist in {ns}")]
    LinkNotFound { ifname: String, ns: String },

    #[error(
        "bridge {bridge} does not exist on the host; create it first or fix the bridge= setting"
    )]
    BridgeNotFound { bridge: String },

    #[error("interface {name} is not a bridge (it is {kind}); fix the bridge= setting")]
    NotABridge { name: String, kind: String },

    #[error(
        "VLAN {vlan} requested on bridge {bridge}, but the bridge has VLAN filtering off (enable it: ip link set {bridge} type bridge vlan_filtering 1)"
    )]
    VlanFilteringOff { bridge: String, vlan: u16 },

    #[error("neighbour device {dev} does not exist on the host (NEIGHBOUR_DEVS / neighbour_devs)")]
    NeighbourDevNotFound { dev: String },

    #[error("CT {ctid} has no interface {ifname}")]
    NoSuchIface { ctid: Ctid, ifname: String },

    #[error("CT {ctid} does not have address {addr}")]
    NoSuchAddr { ctid: Ctid, addr: IpAddr },

    #[error("{op} {object} in {ns}: {source}")]
    Netlink {
        op: &'static str,
        object: String,
        ns: String,
        #[source]
        source: KernelError,
    },

    #[error("netlink socket in {ns}: {op}: {source}")]
    Socket {
        op: &'static str,
        ns: String,
        #[source]
        source: io::Error,
    },

    #[error("network namespace: {op}: {source}")]
    Netns {
        op: String,
        #[source]
        source: io::Error,
    },

    #[error("sysctl {path} in {ns}: {source}")]
    Sysctl {
        path: String,
        ns: String,
        #[source]
        source: io::Error,
    },

    #[error("{op} on {dev}: {source}")]
    Packet {
        op: &'static str,
        dev: String,
        #[source]
        source: io::Error,
    },

    #[error("{op} {}: {source}", path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl NetError {
    /// Whether the error means "the object is already gone" (teardown treats that as done).
    pub fn is_not_found(&self) -> bool {
        match self {
            NetError::LinkNotFound { .. } => true,
            NetError::Netlink { source, .. } => matches!(
                source.errno,
                libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL
            ),
            _ => false,
        }
    }
}
