//! Errors of the networking layer. Each names the operation and the object, and kernel errnos are
//! translated into messages a hoster can act on. A kernel or I/O cause is the variant's
//! `#[source]` and is not repeated in its message.

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

    /// What the caller does between creating a CT's interfaces and bringing them up (the
    /// datapath attaching) failed.
    #[error("prepare the interfaces before they come up")]
    BeforeUp(#[source] Box<dyn std::error::Error + Send + Sync>),

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

    #[error("{op} {object} in {ns}")]
    Netlink {
        op: &'static str,
        object: String,
        ns: String,
        #[source]
        source: KernelError,
    },

    #[error("netlink socket in {ns}: {op}")]
    Socket {
        op: &'static str,
        ns: String,
        #[source]
        source: io::Error,
    },

    #[error("network namespace: {op}")]
    Netns {
        op: String,
        #[source]
        source: io::Error,
    },

    #[error("sysctl {path} in {ns}")]
    Sysctl {
        path: String,
        ns: String,
        #[source]
        source: io::Error,
    },

    #[error("{op} on {dev}")]
    Packet {
        op: &'static str,
        dev: String,
        #[source]
        source: io::Error,
    },

    #[error("{op} {}", path.display())]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain::{ErrorChain, assert_causes_not_repeated};

    #[test]
    fn netlink_refusal_prints_its_kernel_cause_once() {
        let e = NetError::Netlink {
            op: "add host route",
            object: "192.0.2.1/32 dev venet101".into(),
            ns: "the host netns".into(),
            source: KernelError {
                errno: libc::EEXIST,
                extack: Some("Route exists".into()),
            },
        };
        assert_causes_not_repeated(&e);
        assert_eq!(
            ErrorChain(&e).to_string(),
            "add host route 192.0.2.1/32 dev venet101 in the host netns: File exists (os error \
             17) (kernel: Route exists)"
        );
    }
}
