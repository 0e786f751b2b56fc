use std::{io, path::PathBuf};

use thiserror::Error;

/// Errors of the eBPF plumbing shared by the datapath and the shaper. Each names the operation
/// and the object (pin path, program, map, interface); the cause is the `#[source]`.
#[derive(Debug, Error)]
pub enum BpfError {
    #[error(
        "the eBPF programs were not built into this binary (built with AYA_BUILD_SKIP=1); \
         rebuild with the BPF toolchain (xtask/setup.sh)"
    )]
    NotBuilt,

    #[error("{path}: not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },

    #[error("mounting bpffs at {path}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("loading the eBPF object (maps pinned under {maps_dir})")]
    Load {
        maps_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },

    #[error("program {program}: {op}")]
    Program {
        program: &'static str,
        op: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("program {program}: pinning at {path}")]
    PinProgram {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },

    #[error("map {map} ({path}): {op}")]
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

    #[error("program {program} on interface {ifname} (ifindex {ifindex}): {op}")]
    Attach {
        program: &'static str,
        ifname: String,
        ifindex: u32,
        op: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("program {program} on interface {ifname} (ifindex {ifindex}): {op}")]
    Link {
        program: &'static str,
        ifname: String,
        ifindex: u32,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = BpfError> = std::result::Result<T, E>;
