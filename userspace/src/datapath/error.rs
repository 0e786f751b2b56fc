use std::net::IpAddr;

use berth_runtime::Ctid;

use thiserror::Error;

use crate::bpf::BpfError;

/// Errors of the datapath manager. Each names the operation and the object (interface, CTID,
/// class) it failed on; loading, pinning, maps and attaching fail with the shared
/// [`BpfError`].
#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(transparent)]
    Bpf(#[from] BpfError),

    #[error("interface with ifindex {ifindex} not found in this network namespace")]
    NoSuchIfindex { ifindex: u32 },

    #[error("interface {name} not found in this network namespace")]
    NoSuchInterface { name: String },

    #[error("CT {ctid}: interface config: {reason}")]
    InvalidIfaceConfig { ctid: Ctid, reason: String },

    #[error("CT {ctid}: address {addr} cannot be assigned to a CT ({reason})")]
    InvalidAddr {
        ctid: Ctid,
        addr: IpAddr,
        reason: &'static str,
    },

    #[error("CT {ctid}: {count} addresses exceed the CT_ADDRS capacity left ({capacity})")]
    TooManyAddrs {
        ctid: Ctid,
        count: usize,
        capacity: u32,
    },

    #[error(
        "CT {ctid}: no counter slot left: all {slots} belong to CTs with interfaces attached \
         (detach a stopped CT's interfaces, or raise capacity::SLOTS)"
    )]
    NoFreeSlot { ctid: Ctid, slots: u32 },

    #[error(
        "CT {ctid}: interface with ifindex {ifindex} is still attached: its counters cannot be cleared"
    )]
    StillAttached { ctid: Ctid, ifindex: u32 },

    #[error("class table")]
    Classes(#[from] super::classes::ClassesError),

    #[error("class {class} out of range (0..{max})")]
    InvalidClass { class: u32, max: u32 },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;
