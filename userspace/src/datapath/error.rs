use std::{io, net::IpAddr, path::PathBuf};

use thiserror::Error;

/// Errors of the datapath manager. Each names the operation and the object (pin path,
/// interface, CTID, map) it failed on.
#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(
        "the eBPF programs were not built into this binary (built with AYA_BUILD_SKIP=1); \
         rebuild without it"
    )]
    NotBuilt,

    #[error("{path}: not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },

    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("loading the eBPF object (maps pinned under {pin_dir}): {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },

    #[error("program {program}: {op}: {source}")]
    Program {
        program: &'static str,
        op: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("program {program}: pinning at {path}: {source}")]
    PinProgram {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },

    #[error("map {map} ({path}): {op}: {source}")]
    Map {
        map: &'static str,
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error(
        "map {map} pinned at {path} has key/value size {found:?}, this berth expects {expected:?}: \
         it was created by an incompatible berth version (use a new versioned pin directory)"
    )]
    IncompatibleMap {
        map: &'static str,
        path: PathBuf,
        found: (u32, u32),
        expected: (u32, u32),
    },

    #[error("interface with ifindex {ifindex} not found in this network namespace")]
    NoSuchIfindex { ifindex: u32 },

    #[error("interface {name} not found in this network namespace")]
    NoSuchInterface { name: String },

    #[error("interface {ifname} (ifindex {ifindex}): {op}: {source}")]
    Attach {
        ifname: String,
        ifindex: u32,
        op: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("interface {ifname} (ifindex {ifindex}): {op}: {source}")]
    Link {
        ifname: String,
        ifindex: u32,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("CT {ctid}: invalid CTID (0 is the host)")]
    InvalidCtid { ctid: u32 },

    #[error("CT {ctid}: interface config: {reason}")]
    InvalidIfaceConfig { ctid: u32, reason: String },

    #[error("CT {ctid}: address {addr} cannot be assigned to a CT ({reason})")]
    InvalidAddr {
        ctid: u32,
        addr: IpAddr,
        reason: &'static str,
    },

    #[error("CT {ctid}: {count} addresses exceed the CT_ADDRS capacity left ({capacity})")]
    TooManyAddrs {
        ctid: u32,
        count: usize,
        capacity: u32,
    },

    #[error(
        "CT {ctid}: no counter slot left: all {slots} belong to CTs with interfaces attached \
         (detach a stopped CT's interfaces, or raise capacity::SLOTS)"
    )]
    NoFreeSlot { ctid: u32, slots: u32 },

    #[error("class table: {0}")]
    Classes(#[from] super::classes::ClassesError),

    #[error("class {class} out of range (0..{max})")]
    InvalidClass { class: u32, max: u32 },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;
