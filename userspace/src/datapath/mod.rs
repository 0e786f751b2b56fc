//! The eBPF datapath manager: loads berth's tc programs, pins them and their maps, attaches
//! them to CTs' host-side interfaces and edits/reads the maps.
//!
//! # bpffs layout (`pin_dir`, default [`DEFAULT_PIN_DIR`])
//!
//! ```text
//! <pin_dir>/maps/<MAP>              every map (berth_common::map_names::ALL)
//! <pin_dir>/progs/<hash>/{from_ct,to_ct}   the programs of one build (hash of the object)
//! <pin_dir>/links/<ifindex>/{from_ct,to_ct} TCX links (kernel >= 6.6)
//! ```
//!
//! Everything lives in the kernel and keeps working with no berth process alive. Counters
//! belong to CTIDs (never ifindexes), so they survive CT restarts and interface re-creation;
//! the maps are reused by every later load, so they survive program upgrades too: a binary
//! with different programs pins them under a new `progs/<hash>` and atomically swaps every
//! pinned link to them (`BPF_LINK_UPDATE`). A map layout change needs a new `v<N>` directory.
//!
//! # Per-packet cost
//!
//! The programs' common path touches arrays only (lookups the verifier inlines, no helper
//! call): the interface's `IFACES` entry at `ifindex % 16384` carries the CT, its counter slot,
//! mode, MAC and up to 8 IPv4 + 8 IPv6 addresses; `CONFIG` carries the settings and, for up
//! to 8 prefixes per family, the class table; `COUNTERS` is a per-CPU array of one
//! [`berth_common::SlotCounters`] per slot. Hash maps and LPM tries are fallbacks: an
//! interface whose `IFACES` position is taken goes to `IFACES_SPILL`, addresses beyond 8 per
//! family are found in `CT_ADDRS`, larger class tables in `CLASSES_V4/V6`.
//!
//! # Counter slots
//!
//! A CT gets a slot on its first attach and keeps it (`SLOT_CTIDS[slot] = ctid`, pinned, so
//! the mapping is as persistent as the counters). When all [`berth_common::capacity::SLOTS`]
//! slots are taken, the slot of a CT with no interface attached is reclaimed: its totals are
//! first added to the `ARCHIVE` per-CPU hash (keyed by CTID), which every read includes, so
//! totals never go back.
//!
//! # What is counted
//!
//! Per (CTID, direction, class, family): bytes and packets, 64-bit, per CPU (summed on read).
//! * direction: [`Direction::In`] = delivered to the CT, [`Direction::Out`] = sent by it;
//! * class: the class of the peer address (destination of what the CT sends, source of what
//!   it receives) from the `networks_classes` table, longest prefix wins, else the default
//!   class; frames without IP (ARP) count as [`Family::Other`] in the default class;
//! * packets: segments on the wire — a GSO super-packet counts `gso_segs`;
//! * bytes, per [`ByteLayer`]: `L2` (default) counts `skb->len` at the host-side interface,
//!   the whole Ethernet frame, exactly what `/sys/class/net/<if>/statistics/{rx,tx}_bytes`
//!   count; `L3` counts the IP packet (frame minus the 14-byte Ethernet header), like OpenVZ
//!   vznetstat. For a GSO super-packet both count its bytes once as the interface does
//!   (headers of the later segments are not invented).
//!
//! Dropped packets are counted per (CTID, direction, [`DropReason`]) instead, never in the
//! traffic counters.
//!
//! # Network namespaces
//!
//! ifindexes are per network namespace: call every method from the namespace that holds the
//! host-side interfaces (the host's, in production).

pub mod bench;
mod classes;
mod error;
mod layout;
mod legacy;
mod readonly;
mod sys;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs::{self, File},
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap,
        PerCpuValues, lpm_trie::Key,
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
};
use berth_common::{
    ADDR_ALLOWED, AddrKey, Config, CounterKey, CounterValue, DropKey, DropValue, FAMILY_V4,
    FAMILY_V6, FLAG_IP_FILTER, FLAG_MAC_FILTER, IfaceInfo, MAX_CLASSES, MODE_BRIDGED, MODE_ROUTED,
    SlotCounters, capacity, map_names, program_names,
};
pub use classes::{ClassEntry, ClassesError, format_networks_classes, parse_networks_classes};
pub use error::{DatapathError, Result};
use ipnet::IpNet;
use serde::Serialize;
use tracing::{debug, info, warn};

/// Where berth pins its datapath unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/berth/v2";

/// The eBPF object built by `build.rs` (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/berth-ebpf"));

const FROM_CT_FILE: &str = "from_ct";
const TO_CT_FILE: &str = "to_ct";

/// How a CT's interface is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IfaceMode {
    /// venet-like: the host routes the CT's addresses to the interface (proxy ARP / NDP).
    /// Source addresses of everything the CT sends and destinations of everything it receives
    /// are policed; ARP and IPv6 neighbour discovery pass, other ethertypes are dropped.
    Routed,
    /// veth in a bridge: the CT has its own L2 presence. Its source MAC is policed with
    /// `mac_filter`, its source addresses with `ip_filter`.
    Bridged,
}

/// What the datapath enforces on one host-side interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IfaceConfig {
    pub ctid: u32,
    pub mode: IfaceMode,
    /// The MAC of the CT's end of the pair (checked with `mac_filter`).
    pub mac: [u8; 6],
    /// Drop frames from the CT with another source MAC (vzctl `mac_filter`, on by default for
    /// bridged interfaces).
    pub mac_filter: bool,
    /// Bridged mode: police source IPs like routed mode does (routed mode always does).
    pub ip_filter: bool,
}

impl IfaceConfig {
    pub fn routed(ctid: u32, mac: [u8; 6]) -> Self {
        Self {
            ctid,
            mode: IfaceMode::Routed,
            mac,
            mac_filter: false,
            ip_filter: true,
        }
    }

    pub fn bridged(ctid: u32, mac: [u8; 6]) -> Self {
        Self {
            ctid,
            mode: IfaceMode::Bridged,
            mac,
            mac_filter: true,
            ip_filter: false,
        }
    }

    /// The `IFACES` entry, without addresses (see [`layout::set_inline_addrs`]).
    fn to_raw(self, ifindex: u32, slot: u32) -> IfaceInfo {
        let mut flags = 0;
        if self.mac_filter {
            flags |= FLAG_MAC_FILTER;
        }
        if self.ip_filter || self.mode == IfaceMode::Routed {
            flags |= FLAG_IP_FILTER;
        }
        IfaceInfo {
            ifindex,
            ctid: self.ctid,
            slot,
            mode: match self.mode {
                IfaceMode::Routed => MODE_ROUTED,
                IfaceMode::Bridged => MODE_BRIDGED,
            },
            flags,
            mac: self.mac,
            ..IfaceInfo::EMPTY
        }
    }

    fn from_raw(raw: IfaceInfo) -> Self {
        let mode = if raw.mode == MODE_BRIDGED {
            IfaceMode::Bridged
        } else {
            IfaceMode::Routed
        };
        Self {
            ctid: raw.ctid,
            mode,
            mac: raw.mac,
            mac_filter: raw.flags & FLAG_MAC_FILTER != 0,
            ip_filter: raw.flags & FLAG_IP_FILTER != 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Delivered to the CT (host-side interface egress).
    In,
    /// Sent by the CT (host-side interface ingress).
    Out,
}

impl Direction {
    fn from_raw(v: u8) -> Self {
        if v == berth_common::DIR_OUT {
            Self::Out
        } else {
            Self::In
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::In => "in",
            Self::Out => "out",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Frames without an IP packet that passed (ARP).
    Other,
    V4,
    V6,
}

impl Family {
    fn from_raw(v: u8) -> Self {
        match v {
            FAMILY_V4 => Self::V4,
            FAMILY_V6 => Self::V6,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Other => "other",
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The CT sent from an address (IPv4, IPv6 or ARP sender) that is not its own.
    SpoofedIp,
    /// The CT sent from a MAC other than its interface's (`mac_filter`).
    SpoofedMac,
    /// Routed mode: an ethertype other than IPv4, IPv6 and ARP (bridged with `ip_filter`:
    /// from the CT).
    NonIp,
    /// Routed mode: a packet for an address that is not the CT's.
    BadDst,
    /// A truncated or invalid Ethernet/IP/ARP header.
    Malformed,
    /// A reason this berth does not know (written by a newer program).
    Unknown(u8),
}

impl DropReason {
    fn from_raw(v: u8) -> Self {
        match v {
            berth_common::DROP_SPOOFED_IP => Self::SpoofedIp,
            berth_common::DROP_SPOOFED_MAC => Self::SpoofedMac,
            berth_common::DROP_NON_IP => Self::NonIp,
            berth_common::DROP_BAD_DST => Self::BadDst,
            berth_common::DROP_MALFORMED => Self::Malformed,
            other => Self::Unknown(other),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SpoofedIp => "spoofed_ip",
            Self::SpoofedMac => "spoofed_mac",
            Self::NonIp => "non_ip",
            Self::BadDst => "bad_dst",
            Self::Malformed => "malformed",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// Which bytes the traffic counters count (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ByteLayer {
    /// The Ethernet frame (`skb->len`), equal to the interface statistics.
    #[default]
    L2,
    /// The IP packet: the frame minus its 14-byte Ethernet header (vznetstat).
    L3,
}

/// Global settings, stored in the pinned `CONFIG` map (shared by every CT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DatapathConfig {
    pub byte_layer: ByteLayer,
    /// Class of peers matching no prefix of the class table (OpenVZ files usually map
    /// `0.0.0.0/0` and `::/0` explicitly, making this moot).
    pub default_class: u8,
}

/// One traffic counter row, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CounterRow {
    pub ctid: u32,
    pub dir: Direction,
    pub class: u8,
    pub family: Family,
    pub bytes: u64,
    pub packets: u64,
}

/// One drop counter row, summed over CPUs. `bytes` are whole frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DropRow {
    pub ctid: u32,
    pub dir: Direction,
    pub reason: DropReason,
    pub packets: u64,
    pub bytes: u64,
}

/// An interface present in the `IFACES` map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttachedIface {
    pub ifindex: u32,
    /// `None` when no interface has this ifindex any more in this namespace.
    pub ifname: Option<String>,
    pub config: IfaceConfig,
}

/// How programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMethod {
    /// TCX links (kernel >= 6.6), pinned under `links/`.
    Tcx,
    /// clsact qdisc + cls_bpf direct-action filters (the default). The filters hold the
    /// programs themselves; nothing is pinned for them.
    Netlink,
}

impl AttachMethod {
    /// clsact + cls_bpf unless `BERTH_ATTACH=tcx` asks for TCX (kernel >= 6.6, commit
    /// e420bed02507; refused with a clear error below that).
    ///
    /// Why not TCX by default: every TCX link creation swaps the device's bpf_mprog entry and
    /// then waits for a full RCU grace period (tcx_entry_sync) — measured 27-34 ms per CT start
    /// on this 6.18 VM even with both hooks attached in parallel, against 2-7 ms for the qdisc
    /// and two cls_bpf filters, which only publish with RCU and never wait. The programs,
    /// their counting and their verdicts are identical on both paths (same program type, same
    /// direct-action return codes).
    pub fn detect() -> Self {
        match std::env::var("BERTH_ATTACH").as_deref() {
            Ok("tcx") => match KernelVersion::current() {
                Ok(v) if v < KernelVersion::new(6, 6, 0) => {
                    warn!(kernel = ?v, "BERTH_ATTACH=tcx: TCX needs kernel 6.6; using clsact + cls_bpf");
                    Self::Netlink
                }
                _ => Self::Tcx,
            },
            Ok("netlink") | Ok("cls_bpf") | Err(_) => Self::Netlink,
            Ok(other) => {
                warn!(
                    value = other,
                    "BERTH_ATTACH: expected tcx or netlink; using netlink"
                );
                Self::Netlink
            }
        }
    }
}

/// Attaches `prog` to `ifname`'s `attach_type` hook as a new TCX link, first in line, and pins
/// the link at `path` (the pin keeps it attached after this process exits).
fn create_tcx_link(
    prog: &mut SchedClassifier,
    ifname: &str,
    ifindex: u32,
    attach_type: TcAttachType,
    path: &Path,
) -> Result<()> {
    let link_err = |op: &'static str| {
        move |source: io::Error| DatapathError::Link {
            ifname: ifname.to_owned(),
            ifindex,
            op,
            source,
        }
    };
    let attach_err = |op: &'static str| {
        move |e: aya::programs::ProgramError| DatapathError::Attach {
            ifname: ifname.to_owned(),
            ifindex,
            op,
            source: Box::new(e),
        }
    };
    let id = prog
        .attach_with_options(
            ifname,
            attach_type,
            // First on the hook: accounting and anti-spoofing see packets before any other
            // program (e.g. a shaping classifier) acts on them.
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(attach_err("attaching (TCX)"))?;
    let link = prog.take_link(id).map_err(attach_err("taking link"))?;
    let fd_link =
        FdLink::try_from(link).map_err(|e| link_err("converting link")(io::Error::other(e)))?;
    fd_link
        .pin(path)
        .map_err(|e| link_err("pinning link")(io::Error::other(e)))?;
    Ok(())
}

/// An exclusive flock on the pin directory: load/upgrade and attach/detach of concurrent berth
/// processes serialise on it (bpffs directories support flock like any inode).
struct DirLock(#[expect(dead_code, reason = "held for its Drop (unlock on close)")] File);

impl DirLock {
    fn take(dir: &Path) -> Result<Self> {
        let f = File::open(dir).map_err(|source| DatapathError::Io {
            op: "opening",
            path: dir.to_owned(),
            source,
        })?;
        // SAFETY: f is an open fd for the duration of the call.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(DatapathError::Io {
                op: "locking",
                path: dir.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self(f))
    }
}

/// A handle on the pinned datapath. Dropping it changes nothing in the kernel.
pub struct Datapath {
    pin_dir: PathBuf,
    method: AttachMethod,
    from_ct: SchedClassifier,
    to_ct: SchedClassifier,
    ifaces: Array<MapData, IfaceInfo>,
    ifaces_spill: HashMap<MapData, u32, IfaceInfo>,
    ct_addrs: HashMap<MapData, AddrKey, u32>,
    classes_v4: LpmTrie<MapData, [u8; 4], u32>,
    classes_v6: LpmTrie<MapData, [u8; 16], u32>,
    counters: PerCpuArray<MapData, SlotCounters>,
    slot_ctids: Array<MapData, u32>,
    archive: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    drops: PerCpuHashMap<MapData, DropKey, DropValue>,
    config: Array<MapData, Config>,
}

/// Where an interface's entry lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IfaceAt {
    /// `IFACES[ifindex % capacity::IFACES]`.
    Array,
    /// `IFACES_SPILL[ifindex]`: its array position holds another interface.
    Spill,
}

fn iface_pos(ifindex: u32) -> u32 {
    ifindex % capacity::IFACES
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DatapathError {
    let path = path.to_owned();
    move |source| DatapathError::Io { op, path, source }
}

/// FNV-1a: a stable (across Rust versions) fingerprint of the embedded object, naming the
/// `progs/<hash>` directory so a new build is recognised as an upgrade.
pub(crate) fn object_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    // The nearest existing ancestor tells which filesystem the pins would land on.
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if sys::is_bpffs(&probe).map_err(io_err("statfs", &probe))? {
        return Ok(());
    }
    let default_mount = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default_mount) && probe == default_mount {
        info!(path = %default_mount.display(), "bpffs not mounted; mounting it");
        sys::mount_bpffs(default_mount).map_err(|source| DatapathError::MountBpffs {
            path: default_mount.to_owned(),
            source,
        })?;
        return Ok(());
    }
    Err(DatapathError::NotBpffs {
        path: pin_dir.to_owned(),
    })
}

fn map_err(
    map: &'static str,
    path: &Path,
    op: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let path = path.to_owned();
    move |e| DatapathError::Map {
        map,
        path,
        op,
        source: Box::new(e),
    }
}

fn open_map<T>(maps_dir: &Path, name: &'static str, key: usize, value: usize) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = maps_dir.join(name);
    let data = MapData::from_pin(&path).map_err(map_err(name, &path, "opening pin"))?;
    let info = data.info().map_err(map_err(name, &path, "reading info"))?;
    let found = (info.key_size(), info.value_size());
    let expected = (key as u32, value as u32);
    if found != expected {
        return Err(DatapathError::IncompatibleMap {
            map: name,
            path,
            found,
            expected,
        });
    }
    let map = Map::from_map_data(data).map_err(map_err(name, &path, "typing"))?;
    T::try_from(map).map_err(map_err(name, &path, "typing"))
}

fn prog_err(
    program: &'static str,
    op: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |e| DatapathError::Program {
        program,
        op,
        source: Box::new(e),
    }
}

fn remove_dir_contents(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        let path = entry.path();
        if entry.file_type().map_err(io_err("stat", &path))?.is_dir() {
            remove_dir_contents(&path)?;
            fs::remove_dir(&path).map_err(io_err("removing", &path))?;
        } else {
            fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
        }
    }
    Ok(())
}

fn v4_addr_key(ctid: u32, a: [u8; 4]) -> AddrKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&a);
    AddrKey {
        ctid,
        family: FAMILY_V4,
        _pad: [0; 3],
        addr,
    }
}

fn addr_key(ctid: u32, ip: IpAddr) -> AddrKey {
    match ip {
        IpAddr::V4(a) => v4_addr_key(ctid, a.octets()),
        IpAddr::V6(a) => AddrKey {
            ctid,
            family: FAMILY_V6,
            _pad: [0; 3],
            addr: a.octets(),
        },
    }
}

/// aya reports a missing key as `KeyNotFound` from lookups but as a raw ENOENT from deletes.
fn not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(path, e)| io_err("reading", Path::new(path))(e))
}

fn ifname_of(ifindex: u32) -> Result<String> {
    sys::if_indextoname(ifindex).ok_or(DatapathError::NoSuchIfindex { ifindex })
}

impl Datapath {
    /// Opens the datapath pinned under `pin_dir`, loading and pinning it first where needed
    /// (first use, or a binary with different programs: then every pinned link is switched to
    /// the new programs). Maps already pinned are reused, never recreated.
    pub fn open_or_load(pin_dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_or_load_with(pin_dir, AttachMethod::detect())
    }

    /// Like [`Self::open_or_load`] with an explicit attach method (tests use it to exercise
    /// the clsact fallback on kernels that have TCX).
    pub fn open_or_load_with(pin_dir: impl AsRef<Path>, method: AttachMethod) -> Result<Self> {
        let mut dp = Self::open_inner(pin_dir.as_ref(), method)?;
        // After open_inner released the directory lock: migrating attaches, which takes it.
        dp.migrate_v1()?;
        Ok(dp)
    }

    fn open_inner(pin_dir: &Path, method: AttachMethod) -> Result<Self> {
        let pin_dir = pin_dir.to_path_buf();
        if OBJECT.is_empty() {
            return Err(DatapathError::NotBuilt);
        }
        ensure_bpffs(&pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let progs_root = pin_dir.join("progs");
        let links_dir = pin_dir.join("links");
        for d in [&pin_dir, &maps_dir, &progs_root, &links_dir] {
            fs::create_dir_all(d).map_err(io_err("creating", d))?;
        }
        let _lock = DirLock::take(&pin_dir)?;

        let hash = format!("{:016x}", object_hash(OBJECT));
        let progs_dir = progs_root.join(&hash);
        let from_path = progs_dir.join(FROM_CT_FILE);
        let to_path = progs_dir.join(TO_CT_FILE);
        let fresh = !(from_path.exists() && to_path.exists());
        if fresh {
            // A previous attempt may have died between the two pins.
            remove_dir_contents(&progs_dir)?;
            fs::create_dir_all(&progs_dir).map_err(io_err("creating", &progs_dir))?;
            Self::load_and_pin(&maps_dir, &from_path, &to_path)?;
            info!(pin_dir = %pin_dir.display(), build = %hash, "loaded and pinned the datapath programs");
        }
        let from_ct = SchedClassifier::from_pin(&from_path)
            .map_err(prog_err(program_names::FROM_CT, "opening pin"))?;
        let to_ct = SchedClassifier::from_pin(&to_path)
            .map_err(prog_err(program_names::TO_CT, "opening pin"))?;

        let mut dp = Self::from_pins(pin_dir, &maps_dir, from_ct, to_ct, method)?;

        if fresh {
            dp.upgrade_attachments()?;
            // Older builds' programs: unpinning releases them once no link uses them.
            for entry in fs::read_dir(&progs_root).map_err(io_err("listing", &progs_root))? {
                let entry = entry.map_err(io_err("listing", &progs_root))?;
                if entry.file_name().to_string_lossy() != hash {
                    let old = entry.path();
                    remove_dir_contents(&old)?;
                    fs::remove_dir(&old).map_err(io_err("removing", &old))?;
                    info!(path = %old.display(), "removed the programs of an older build");
                }
            }
        }
        Ok(dp)
    }

    fn load_and_pin(maps_dir: &Path, from_path: &Path, to_path: &Path) -> Result<()> {
        Self::load_programs(
            maps_dir,
            &[
                (program_names::FROM_CT, from_path),
                (program_names::TO_CT, to_path),
            ],
        )
    }

    /// Loads the named programs of the object over the pinned maps (created and pinned where
    /// missing) and pins each program at its path.
    fn load_programs(maps_dir: &Path, progs: &[(&'static str, &Path)]) -> Result<()> {
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            // Reuses the pinned map if it exists, creates and pins it otherwise.
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| DatapathError::Load {
            pin_dir: maps_dir.to_owned(),
            source: Box::new(e),
        })?;
        for &(name, path) in progs {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(aya::programs::ProgramError::NotLoaded)
                .map_err(prog_err(name, "finding in the object"))?
                .try_into()
                .map_err(prog_err(name, "typing"))?;
            prog.load().map_err(prog_err(name, "loading (verifier)"))?;
            prog.pin(path).map_err(|source| DatapathError::PinProgram {
                program: name,
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    /// After a program upgrade: point every attachment at the freshly loaded programs, each on
    /// the path it was made with (a host may hold both: TCX links from before the default
    /// changed, cls_bpf filters since).
    fn upgrade_attachments(&mut self) -> Result<()> {
        let links_dir = self.pin_dir.join("links");
        let mut tcx = BTreeSet::new();
        match fs::read_dir(&links_dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(io_err("listing", &links_dir))?;
                    let Ok(ifindex) = entry.file_name().to_string_lossy().parse::<u32>() else {
                        continue;
                    };
                    let ifname = sys::if_indextoname(ifindex).unwrap_or_default();
                    self.attach_tcx(ifindex, &ifname, false)?;
                    tcx.insert(ifindex);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("listing", &links_dir)(e)),
        }
        for iface in self.attached()? {
            if tcx.contains(&iface.ifindex) {
                continue;
            }
            if let Some(ifname) = iface.ifname {
                self.attach_netlink(iface.ifindex, &ifname)?;
            }
        }
        Ok(())
    }

    /// Loads the benchmark's reference program (`berth_noop`, does nothing) and pins it at
    /// `path` (the caller unpins it). It shares the pinned maps, so nothing else is created.
    pub fn load_noop(&self, path: &Path) -> Result<SchedClassifier> {
        let name = program_names::NOOP;
        Self::load_programs(&self.pin_dir.join("maps"), &[(name, path)])?;
        SchedClassifier::from_pin(path).map_err(prog_err(name, "opening pin"))
    }

    /// The handle over already pinned maps and the given programs (shared by the loader and
    /// the read-only open).
    fn from_pins(
        pin_dir: PathBuf,
        maps_dir: &Path,
        from_ct: SchedClassifier,
        to_ct: SchedClassifier,
        method: AttachMethod,
    ) -> Result<Self> {
        let maps_dir = maps_dir.to_path_buf();
        Ok(Self {
            from_ct,
            to_ct,
            method,
            ifaces: open_map(&maps_dir, map_names::IFACES, 4, size_of::<IfaceInfo>())?,
            ifaces_spill: open_map(
                &maps_dir,
                map_names::IFACES_SPILL,
                4,
                size_of::<IfaceInfo>(),
            )?,
            ct_addrs: open_map(&maps_dir, map_names::CT_ADDRS, size_of::<AddrKey>(), 4)?,
            classes_v4: open_map(&maps_dir, map_names::CLASSES_V4, 8, 4)?,
            classes_v6: open_map(&maps_dir, map_names::CLASSES_V6, 20, 4)?,
            counters: open_map(&maps_dir, map_names::COUNTERS, 4, size_of::<SlotCounters>())?,
            slot_ctids: open_map(&maps_dir, map_names::SLOT_CTIDS, 4, 4)?,
            archive: open_map(
                &maps_dir,
                map_names::ARCHIVE,
                size_of::<CounterKey>(),
                size_of::<CounterValue>(),
            )?,
            drops: open_map(
                &maps_dir,
                map_names::DROPS,
                size_of::<DropKey>(),
                size_of::<DropValue>(),
            )?,
            config: open_map(&maps_dir, map_names::CONFIG, 4, size_of::<Config>())?,
            pin_dir,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attach_method(&self) -> AttachMethod {
        self.method
    }

    /// The loaded programs (for `BPF_PROG_TEST_RUN` and run-time statistics):
    /// `(from_ct, to_ct)`.
    pub fn programs(&self) -> (&SchedClassifier, &SchedClassifier) {
        (&self.from_ct, &self.to_ct)
    }

    /// Kernel ids of the loaded programs `(from_ct, to_ct)`.
    pub fn program_ids(&self) -> Result<(u32, u32)> {
        let a = self
            .from_ct
            .info()
            .map_err(prog_err(program_names::FROM_CT, "reading info"))?;
        let b = self
            .to_ct
            .info()
            .map_err(prog_err(program_names::TO_CT, "reading info"))?;
        Ok((a.id(), b.id()))
    }

    /// Attaches both programs to the host-side interface `ifindex` and records what they
    /// enforce there. Idempotent: attaching again updates the config (and the program, if it
    /// changed). On failure nothing stays attached or recorded.
    pub fn attach(&mut self, ifindex: u32, config: IfaceConfig) -> Result<()> {
        if config.ctid == 0 {
            return Err(DatapathError::InvalidCtid { ctid: 0 });
        }
        if config.mac_filter && config.mac == [0; 6] {
            return Err(DatapathError::InvalidIfaceConfig {
                ctid: config.ctid,
                reason: "mac_filter needs the CT's MAC (got 00:00:00:00:00:00)".to_owned(),
            });
        }
        let ifname = ifname_of(ifindex)?;
        let _lock = DirLock::take(&self.pin_dir)?;
        let previous = self.find_iface(ifindex)?;
        let slot = self.slot_for(config.ctid)?;
        let mut raw = config.to_raw(ifindex, slot);
        if let Some((_, p)) = previous {
            // Keep the address positions a concurrent reader may be using.
            raw.v4 = p.v4;
            raw.v6 = p.v6;
        }
        layout::set_inline_addrs(&mut raw, &self.ct_addrs(config.ctid)?);
        // The entry goes first: from the first packet the programs see, the CT is known.
        self.write_iface(ifindex, raw)?;
        // An interface that already has pinned TCX links keeps them (switched to the current
        // programs), whatever the default: a cls_bpf filter next to them would run twice.
        let links = self.pin_dir.join("links").join(ifindex.to_string());
        let has_links = [FROM_CT_FILE, TO_CT_FILE]
            .iter()
            .any(|f| links.join(f).exists());
        let res = match (self.method, has_links) {
            (AttachMethod::Tcx, _) | (AttachMethod::Netlink, true) => {
                self.attach_tcx(ifindex, &ifname, true)
            }
            (AttachMethod::Netlink, false) => self.attach_netlink(ifindex, &ifname),
        };
        if let Err(e) = res {
            let _ = self.detach_links(ifindex, Some(&ifname));
            let _ = match previous {
                Some((_, p)) => self.write_iface(ifindex, p),
                None => self.remove_iface(ifindex),
            };
            return Err(e);
        }
        info!(ifindex, ifname, ctid = config.ctid, slot, mode = ?config.mode, method = ?self.method, "datapath attached");
        Ok(())
    }

    // ---- interface entries: IFACES[ifindex % N], else IFACES_SPILL[ifindex] ----------------

    fn find_iface(&self, ifindex: u32) -> Result<Option<(IfaceAt, IfaceInfo)>> {
        let at = self.ifaces.get(&iface_pos(ifindex), 0).map_err(map_err(
            map_names::IFACES,
            &self.pin_dir,
            "get",
        ))?;
        if at.ifindex == ifindex && ifindex != 0 {
            return Ok(Some((IfaceAt::Array, at)));
        }
        match self.ifaces_spill.get(&ifindex, 0) {
            Ok(v) => Ok(Some((IfaceAt::Spill, v))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map_names::IFACES_SPILL, &self.pin_dir, "get")(e)),
        }
    }

    fn write_iface(&mut self, ifindex: u32, info: IfaceInfo) -> Result<()> {
        let pos = iface_pos(ifindex);
        let at =
            self.ifaces
                .get(&pos, 0)
                .map_err(map_err(map_names::IFACES, &self.pin_dir, "get"))?;
        if at.ifindex == 0 || at.ifindex == ifindex {
            self.ifaces.set(pos, info, 0).map_err(map_err(
                map_names::IFACES,
                &self.pin_dir,
                "set",
            ))?;
            return self.remove_spill(ifindex);
        }
        debug!(
            ifindex,
            holder = at.ifindex,
            "IFACES position taken; using the spill map"
        );
        self.ifaces_spill.insert(ifindex, info, 0).map_err(map_err(
            map_names::IFACES_SPILL,
            &self.pin_dir,
            "insert",
        ))
    }

    fn remove_spill(&mut self, ifindex: u32) -> Result<()> {
        match self.ifaces_spill.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(map_err(map_names::IFACES_SPILL, &self.pin_dir, "remove")(e)),
        }
    }

    /// Removes the entry; a spilled interface waiting for the freed array position moves in
    /// (written there before it leaves the spill map, so it is never missing).
    fn remove_iface(&mut self, ifindex: u32) -> Result<()> {
        match self.find_iface(ifindex)? {
            None => Ok(()),
            Some((IfaceAt::Spill, _)) => self.remove_spill(ifindex),
            Some((IfaceAt::Array, _)) => {
                let pos = iface_pos(ifindex);
                let waiting = self
                    .ifaces_spill
                    .iter()
                    .filter_map(|r| r.ok())
                    .find(|(k, _)| iface_pos(*k) == pos);
                let next = waiting.map(|(_, v)| v).unwrap_or(IfaceInfo::EMPTY);
                self.ifaces.set(pos, next, 0).map_err(map_err(
                    map_names::IFACES,
                    &self.pin_dir,
                    "set",
                ))?;
                if next.ifindex != 0 {
                    self.remove_spill(next.ifindex)?;
                }
                Ok(())
            }
        }
    }

    /// Every interface entry (array and spill), by ifindex.
    fn iface_entries(&self) -> Result<BTreeMap<u32, IfaceInfo>> {
        let mut out = BTreeMap::new();
        let rows = sys::lookup_batch::<u32, IfaceInfo>(self.ifaces.map().fd().as_fd())
            .map_err(io_err("batch lookup", &self.map_path(map_names::IFACES)))?;
        for (_, v) in rows {
            if v.ifindex != 0 {
                out.insert(v.ifindex, v);
            }
        }
        for item in self.ifaces_spill.iter() {
            let (k, v) =
                item.map_err(map_err(map_names::IFACES_SPILL, &self.pin_dir, "iterate"))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    fn map_path(&self, name: &str) -> PathBuf {
        self.pin_dir.join("maps").join(name)
    }

    // ---- counter slots ---------------------------------------------------------------------

    fn slot_ctids(&self) -> Result<Vec<u32>> {
        let rows = sys::lookup_batch::<u32, u32>(self.slot_ctids.map().fd().as_fd()).map_err(
            io_err("batch lookup", &self.map_path(map_names::SLOT_CTIDS)),
        )?;
        let mut out = vec![0u32; capacity::SLOTS as usize];
        for (slot, ctid) in rows {
            if let Some(o) = out.get_mut(slot as usize) {
                *o = ctid;
            }
        }
        Ok(out)
    }

    /// The CT's counter slot: its own, else a free one, else one reclaimed from a CT that has
    /// no interface attached (its totals moved to `ARCHIVE` first).
    fn slot_for(&mut self, ctid: u32) -> Result<u32> {
        let owners = self.slot_ctids()?;
        if let Some(slot) = owners.iter().position(|c| *c == ctid) {
            return Ok(slot as u32);
        }
        let slot = match owners.iter().position(|c| *c == 0) {
            Some(free) => free as u32,
            None => {
                let in_use: HashSet<u32> = self.iface_entries()?.values().map(|i| i.slot).collect();
                let victim = (0..capacity::SLOTS).find(|s| !in_use.contains(s)).ok_or(
                    DatapathError::NoFreeSlot {
                        ctid,
                        slots: capacity::SLOTS,
                    },
                )?;
                self.archive_slot(victim, owners[victim as usize])?;
                victim
            }
        };
        // A fresh slot counts from zero (a reclaimed one was zeroed after archiving; a free
        // one may hold what an interrupted reclaim left).
        self.zero_slot(slot)?;
        self.slot_ctids.set(slot, ctid, 0).map_err(map_err(
            map_names::SLOT_CTIDS,
            &self.pin_dir,
            "set",
        ))?;
        debug!(ctid, slot, "counter slot assigned");
        Ok(slot)
    }

    /// `ARCHIVE[key] += values`, CPU by CPU.
    fn archive_add(&mut self, key: &CounterKey, values: &[CounterValue]) -> Result<()> {
        let mut sum: Vec<CounterValue> = match self.archive.get(key, 0) {
            Ok(old) => old.iter().copied().collect(),
            Err(e) if not_found(&e) => vec![CounterValue::default(); values.len()],
            Err(e) => return Err(map_err(map_names::ARCHIVE, &self.pin_dir, "get")(e)),
        };
        for (acc, v) in sum.iter_mut().zip(values) {
            acc.bytes += v.bytes;
            acc.packets += v.packets;
        }
        let sum = PerCpuValues::try_from(sum).map_err(io_err(
            "building per-CPU values for",
            &self.map_path(map_names::ARCHIVE),
        ))?;
        self.archive.insert(key, sum, 0).map_err(map_err(
            map_names::ARCHIVE,
            &self.pin_dir,
            "insert",
        ))
    }

    fn zero_slot(&mut self, slot: u32) -> Result<()> {
        let nr_cpus = nr_cpus()?;
        let zeros =
            PerCpuValues::try_from(vec![SlotCounters::default(); nr_cpus]).map_err(io_err(
                "building per-CPU values for",
                &self.map_path(map_names::COUNTERS),
            ))?;
        self.counters.set(slot, zeros, 0).map_err(map_err(
            map_names::COUNTERS,
            &self.pin_dir,
            "set",
        ))
    }

    /// Adds the slot's counters to `ARCHIVE` under `ctid` and zeroes the slot. Only for a slot
    /// no interface entry points at (no program writes to it any more).
    fn archive_slot(&mut self, slot: u32, ctid: u32) -> Result<()> {
        let values = self.counters.get(&slot, 0).map_err(map_err(
            map_names::COUNTERS,
            &self.pin_dir,
            "get",
        ))?;
        for row in 0..berth_common::SLOT_ROWS {
            let per_cpu: Vec<CounterValue> = values.iter().map(|v| v.rows[row]).collect();
            if per_cpu.iter().all(|v| *v == CounterValue::default()) {
                continue;
            }
            self.archive_add(&layout::row_key(ctid, row), &per_cpu)?;
        }
        self.zero_slot(slot)?;
        info!(ctid, slot, "counter slot reclaimed; totals archived");
        Ok(())
    }

    /// `create`: attach a missing link (false while upgrading: only update existing links).
    fn attach_tcx(&mut self, ifindex: u32, ifname: &str, create: bool) -> Result<()> {
        let dir = self.pin_dir.join("links").join(ifindex.to_string());
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let link_err = |op: &'static str| {
            let ifname = ifname.to_owned();
            move |source: io::Error| DatapathError::Link {
                ifname,
                ifindex,
                op,
                source,
            }
        };
        let attach_err = |op: &'static str| {
            let ifname = ifname.to_owned();
            move |e: aya::programs::ProgramError| DatapathError::Attach {
                ifname,
                ifindex,
                op,
                source: Box::new(e),
            }
        };
        let mut todo = Vec::with_capacity(2);
        for (prog, attach_type, file) in [
            (&mut self.from_ct, TcAttachType::Ingress, FROM_CT_FILE),
            (&mut self.to_ct, TcAttachType::Egress, TO_CT_FILE),
        ] {
            let path = dir.join(file);
            let prog_id = prog
                .info()
                .map_err(attach_err("reading program info"))?
                .id();
            match sys::obj_get(&path) {
                Ok(fd) => {
                    let link = sys::tcx_link_info(fd.as_fd()).map_err(link_err("reading link"))?;
                    if link.ifindex == ifindex {
                        if link.prog_id != prog_id {
                            let pinned = PinnedLink::from_pin(&path).map_err(|e| {
                                link_err("opening pinned link")(io::Error::other(e))
                            })?;
                            let tc_link = SchedClassifierLink::try_from(FdLink::from(pinned))
                                .map_err(|e| link_err("typing pinned link")(io::Error::other(e)))?;
                            let id = prog
                                .attach_to_link(tc_link)
                                .map_err(attach_err("replacing the program (BPF_LINK_UPDATE)"))?;
                            // Dropping our handle closes the fd; the pin keeps the link.
                            drop(prog.take_link(id).map_err(attach_err("releasing link"))?);
                            debug!(ifindex, file, "link switched to the new program");
                        }
                        continue;
                    }
                    // The interface this link was made for is gone (ifindex 0) or the ifindex
                    // was reused: the link is dead, replace it.
                    fs::remove_file(&path).map_err(link_err("unpinning a dead link"))?;
                    debug!(
                        ifindex,
                        file,
                        old_ifindex = link.ifindex,
                        "removed dead link pin"
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(link_err("opening pinned link")(e)),
            }
            if !create || ifname.is_empty() {
                continue;
            }
            todo.push((prog, attach_type, path));
        }
        // Each TCX link creation waits for an RCU grace period (tcx_entry_sync after the
        // mprog entry swap; ~5-15 ms each on this 6.18 VM): the two hooks are attached from
        // two threads so their grace periods overlap instead of adding up.
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = todo
                .into_iter()
                .map(|(prog, attach_type, path)| {
                    s.spawn(move || create_tcx_link(prog, ifname, ifindex, attach_type, &path))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        for r in results {
            r?;
        }
        if !create
            && fs::read_dir(&dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
        {
            let _ = fs::remove_dir(&dir);
        }
        Ok(())
    }

    fn attach_netlink(&mut self, ifindex: u32, ifname: &str) -> Result<()> {
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            // EEXIST when the qdisc is there already; a real failure shows in the attach.
            debug!(ifname, error = %e, "clsact qdisc not added");
        }
        for (prog, attach_type, name) in [
            (
                &mut self.from_ct,
                TcAttachType::Ingress,
                program_names::FROM_CT,
            ),
            (&mut self.to_ct, TcAttachType::Egress, program_names::TO_CT),
        ] {
            // Replace our filter (an older program) rather than stacking a second one.
            match tc::qdisc_detach_program(ifname, attach_type, name) {
                Ok(()) => {}
                Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(DatapathError::Link {
                        ifname: ifname.to_owned(),
                        ifindex,
                        op: "removing the previous filter",
                        source: io::Error::other(e),
                    });
                }
            }
            let id = prog
                .attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .map_err(|e| DatapathError::Attach {
                    ifname: ifname.to_owned(),
                    ifindex,
                    op: "attaching (clsact/cls_bpf)",
                    source: Box::new(e),
                })?;
            let link = prog.take_link(id).map_err(|e| DatapathError::Attach {
                ifname: ifname.to_owned(),
                ifindex,
                op: "taking link",
                source: Box::new(e),
            })?;
            // The filter lives in the qdisc, independent of this process; dropping the handle
            // would delete it.
            std::mem::forget(link);
        }
        Ok(())
    }

    fn detach_links(&mut self, ifindex: u32, ifname: Option<&str>) -> Result<()> {
        let dir = self.pin_dir.join("links").join(ifindex.to_string());
        // Unpinning releases the last reference to a TCX link: the kernel detaches it.
        remove_dir_contents(&dir)?;
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing", &dir)(e)),
        }
        if let Some(ifname) = ifname {
            for (attach_type, name) in [
                (TcAttachType::Ingress, program_names::FROM_CT),
                (TcAttachType::Egress, program_names::TO_CT),
            ] {
                match tc::qdisc_detach_program(ifname, attach_type, name) {
                    Ok(()) => {}
                    // No filter of ours (TCX mode), or no clsact qdisc at all.
                    Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => debug!(ifname, error = %e, "cls_bpf filter not removed"),
                }
            }
        }
        Ok(())
    }

    /// Detaches the programs from `ifindex` and forgets its config. Counters stay. Missing
    /// links or entries are fine (an interface that vanished has lost its links already).
    pub fn detach(&mut self, ifindex: u32) -> Result<()> {
        let _lock = DirLock::take(&self.pin_dir)?;
        let ifname = sys::if_indextoname(ifindex);
        self.detach_links(ifindex, ifname.as_deref())?;
        self.remove_iface(ifindex)?;
        info!(
            ifindex,
            ifname = ifname.as_deref().unwrap_or("-"),
            "datapath detached"
        );
        Ok(())
    }

    /// [`Self::detach`] by interface name.
    pub fn detach_name(&mut self, ifname: &str) -> Result<()> {
        let ifindex =
            sys::if_nametoindex(ifname).ok_or_else(|| DatapathError::NoSuchInterface {
                name: ifname.to_owned(),
            })?;
        self.detach(ifindex)
    }

    /// Removes attachments whose interface no longer exists (a CT's veth deleted with its
    /// namespace): their link pins and `IFACES` entries. Returns the ifindexes cleaned.
    pub fn gc(&mut self) -> Result<Vec<u32>> {
        let mut gone = BTreeSet::new();
        for iface in self.attached()? {
            if iface.ifname.is_none() {
                gone.insert(iface.ifindex);
            }
        }
        let links_dir = self.pin_dir.join("links");
        for entry in fs::read_dir(&links_dir).map_err(io_err("listing", &links_dir))? {
            let entry = entry.map_err(io_err("listing", &links_dir))?;
            if let Ok(ifindex) = entry.file_name().to_string_lossy().parse::<u32>() {
                let dead = [FROM_CT_FILE, TO_CT_FILE].iter().any(|f| {
                    sys::obj_get(&entry.path().join(f))
                        .and_then(|fd| sys::tcx_link_info(fd.as_fd()))
                        .map(|l| l.ifindex != ifindex)
                        .unwrap_or(true)
                });
                if dead || sys::if_indextoname(ifindex).is_none() {
                    gone.insert(ifindex);
                }
            }
        }
        for &ifindex in &gone {
            self.detach(ifindex)?;
        }
        Ok(gone.into_iter().collect())
    }

    /// Every interface with an entry (`IFACES` or `IFACES_SPILL`), by ifindex.
    pub fn attached(&self) -> Result<Vec<AttachedIface>> {
        Ok(self
            .iface_entries()?
            .into_iter()
            .map(|(ifindex, raw)| AttachedIface {
                ifindex,
                ifname: sys::if_indextoname(ifindex),
                config: IfaceConfig::from_raw(raw),
            })
            .collect())
    }

    /// Rewrites the inline address copies of every interface of `ctid` to `addrs` (the CT's
    /// new set; `CT_ADDRS` may still hold stale ones at this point).
    /// `ifaces`: the CT's interfaces when the caller knows them; None scans every entry
    /// (`IFACES` is 3 MiB, a few milliseconds to read).
    fn refresh_inline_addrs(
        &mut self,
        ctid: u32,
        addrs: &[IpAddr],
        ifaces: Option<&[u32]>,
    ) -> Result<()> {
        let entries: Vec<(u32, IfaceInfo)> = match ifaces {
            None => self.iface_entries()?.into_iter().collect(),
            Some(list) => {
                let mut v = Vec::with_capacity(list.len());
                for &ifindex in list {
                    if let Some((_, info)) = self.find_iface(ifindex)? {
                        v.push((ifindex, info));
                    }
                }
                v
            }
        };
        for (ifindex, mut info) in entries {
            if info.ctid != ctid {
                continue;
            }
            layout::set_inline_addrs(&mut info, addrs);
            self.write_iface(ifindex, info)?;
        }
        Ok(())
    }

    /// Replaces the set of addresses `ctid` may use (routed mode: send from and receive for;
    /// bridged with `ip_filter`: send from). Validated before anything changes; new
    /// addresses are added before stale ones go, so kept addresses never see a gap.
    pub fn set_ct_addrs(&mut self, ctid: u32, addrs: &[IpAddr]) -> Result<()> {
        self.set_ct_addrs_inner(ctid, addrs, None)
    }

    /// [`Self::set_ct_addrs`] when the CT's interfaces are known (`ifaces`: host-side
    /// ifindexes): only their entries are rewritten, without scanning every interface entry.
    /// Interfaces attached to the CT but missing from `ifaces` keep their old inline copies.
    pub fn set_ct_addrs_on(&mut self, ctid: u32, addrs: &[IpAddr], ifaces: &[u32]) -> Result<()> {
        self.set_ct_addrs_inner(ctid, addrs, Some(ifaces))
    }

    fn set_ct_addrs_inner(
        &mut self,
        ctid: u32,
        addrs: &[IpAddr],
        ifaces: Option<&[u32]>,
    ) -> Result<()> {
        if ctid == 0 {
            return Err(DatapathError::InvalidCtid { ctid });
        }
        for &addr in addrs {
            let reason = match addr {
                IpAddr::V4(a) if a.is_unspecified() => Some("unspecified"),
                IpAddr::V4(a) if a.is_multicast() => Some("multicast"),
                IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
                IpAddr::V6(a) if a.is_unspecified() => Some("unspecified"),
                IpAddr::V6(a) if a.is_multicast() => Some("multicast"),
                _ => None,
            };
            if let Some(reason) = reason {
                return Err(DatapathError::InvalidAddr { ctid, addr, reason });
            }
        }
        let wanted: HashSet<AddrKey> = addrs.iter().map(|&a| addr_key(ctid, a)).collect();
        let all = self.ct_addr_keys(None)?;
        let total = all.len();
        let existing: HashSet<AddrKey> = all.into_iter().filter(|k| k.ctid == ctid).collect();
        let adding = wanted.difference(&existing).count();
        if total + adding > capacity::CT_ADDRS as usize {
            return Err(DatapathError::TooManyAddrs {
                ctid,
                count: adding,
                capacity: capacity::CT_ADDRS - total as u32,
            });
        }
        for key in wanted.difference(&existing) {
            self.ct_addrs.insert(key, ADDR_ALLOWED, 0).map_err(map_err(
                map_names::CT_ADDRS,
                &self.pin_dir,
                "insert",
            ))?;
        }
        // CT_ADDRS holds old + new now; the inline copies switch to the new set, then the
        // stale keys go: a kept address is found at every moment.
        self.refresh_inline_addrs(ctid, addrs, ifaces)?;
        for key in existing.difference(&wanted) {
            self.remove_addr_key(key)?;
        }
        info!(ctid, count = addrs.len(), "CT addresses set");
        Ok(())
    }

    /// Addresses recorded for `ctid`.
    pub fn ct_addrs(&self, ctid: u32) -> Result<Vec<IpAddr>> {
        let mut out: Vec<IpAddr> = self
            .ct_addr_keys(Some(ctid))?
            .into_iter()
            .map(|k| {
                if k.family == FAMILY_V4 {
                    IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
                } else {
                    IpAddr::from(k.addr)
                }
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The `CT_ADDRS` keys (all, or one CT's). One batch syscall per 256 entries: iterating
    /// key by key costs a syscall per address on the node, on every start.
    fn ct_addr_keys(&self, ctid: Option<u32>) -> Result<HashSet<AddrKey>> {
        let mut out = HashSet::new();
        match sys::lookup_batch::<AddrKey, u32>(self.ct_addrs.map().fd().as_fd()) {
            Ok(rows) => {
                out.extend(
                    rows.into_iter()
                        .map(|(k, _)| k)
                        .filter(|k| ctid.is_none_or(|c| c == k.ctid)),
                );
            }
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                for key in self.ct_addrs.keys() {
                    let key =
                        key.map_err(map_err(map_names::CT_ADDRS, &self.pin_dir, "iterate"))?;
                    if ctid.is_none_or(|c| c == key.ctid) {
                        out.insert(key);
                    }
                }
            }
            Err(e) => {
                return Err(io_err("batch lookup", &self.map_path(map_names::CT_ADDRS))(
                    e,
                ));
            }
        }
        Ok(out)
    }

    fn remove_addr_key(&mut self, key: &AddrKey) -> Result<()> {
        match self.ct_addrs.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(map_err(map_names::CT_ADDRS, &self.pin_dir, "remove")(e)),
        }
    }

    /// Forgets the CT's addresses (the CT is stopped or destroyed). Its counters stay for
    /// billing; its interfaces are detached separately ([`Self::detach`]).
    pub fn remove_ct(&mut self, ctid: u32) -> Result<()> {
        for key in self.ct_addr_keys(Some(ctid))? {
            self.remove_addr_key(&key)?;
        }
        self.refresh_inline_addrs(ctid, &[], None)
    }

    /// Replaces the class table (both families) with `entries`; prefixes not in `entries` are
    /// removed after the new ones are in.
    pub fn load_classes(&mut self, entries: &[ClassEntry]) -> Result<()> {
        classes::check_capacity(entries)?;
        for e in entries {
            if u32::from(e.class) >= MAX_CLASSES {
                return Err(DatapathError::InvalidClass {
                    class: u32::from(e.class),
                    max: MAX_CLASSES,
                });
            }
        }
        let old = self.classes()?;
        let path = self.pin_dir.clone();
        for e in entries {
            match e.net.trunc() {
                IpNet::V4(n) => self
                    .classes_v4
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        u32::from(e.class),
                        0,
                    )
                    .map_err(map_err(map_names::CLASSES_V4, &path, "insert"))?,
                IpNet::V6(n) => self
                    .classes_v6
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        u32::from(e.class),
                        0,
                    )
                    .map_err(map_err(map_names::CLASSES_V6, &path, "insert"))?,
            }
        }
        // The tries hold old + new now; the fast path in CONFIG switches to the new table,
        // then stale prefixes go.
        let settings = self.config()?;
        self.write_config(settings, entries)?;
        let keep: HashSet<IpNet> = entries.iter().map(|e| e.net.trunc()).collect();
        for e in old.iter().filter(|e| !keep.contains(&e.net)) {
            let res = match e.net {
                IpNet::V4(n) => self
                    .classes_v4
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets()))
                    .map_err(map_err(map_names::CLASSES_V4, &path, "remove")),
                IpNet::V6(n) => self
                    .classes_v6
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets()))
                    .map_err(map_err(map_names::CLASSES_V6, &path, "remove")),
            };
            res?;
        }
        info!(entries = entries.len(), "class table loaded");
        Ok(())
    }

    /// The class table, sorted by family, prefix length and address.
    pub fn classes(&self) -> Result<Vec<ClassEntry>> {
        let mut out = Vec::new();
        for item in self.classes_v4.iter() {
            let (k, class) =
                item.map_err(map_err(map_names::CLASSES_V4, &self.pin_dir, "iterate"))?;
            let net = ipnet::Ipv4Net::new(k.data().into(), k.prefix_len() as u8)
                .map_err(|e| io_err("decoding", &self.pin_dir)(io::Error::other(e)))?;
            out.push(ClassEntry {
                class: class as u8,
                net: net.into(),
            });
        }
        for item in self.classes_v6.iter() {
            let (k, class) =
                item.map_err(map_err(map_names::CLASSES_V6, &self.pin_dir, "iterate"))?;
            let net = ipnet::Ipv6Net::new(k.data().into(), k.prefix_len() as u8)
                .map_err(|e| io_err("decoding", &self.pin_dir)(io::Error::other(e)))?;
            out.push(ClassEntry {
                class: class as u8,
                net: net.into(),
            });
        }
        out.sort_by_key(|e| (e.net.addr().is_ipv6(), e.net.prefix_len(), e.net.addr()));
        Ok(out)
    }

    pub fn config(&self) -> Result<DatapathConfig> {
        let raw =
            self.config
                .get(&0, 0)
                .map_err(map_err(map_names::CONFIG, &self.pin_dir, "get"))?;
        Ok(layout::settings_of(&raw))
    }

    fn write_config(&mut self, settings: DatapathConfig, classes: &[ClassEntry]) -> Result<()> {
        let raw = layout::config_value(settings, classes);
        self.config
            .set(0, raw, 0)
            .map_err(map_err(map_names::CONFIG, &self.pin_dir, "set"))
    }

    /// Changes the global settings; applies to packets from now on (existing totals keep
    /// what they counted).
    pub fn set_config(&mut self, config: DatapathConfig) -> Result<()> {
        if u32::from(config.default_class) >= MAX_CLASSES {
            return Err(DatapathError::InvalidClass {
                class: u32::from(config.default_class),
                max: MAX_CLASSES,
            });
        }
        let classes = self.classes()?;
        self.write_config(config, &classes)
    }

    /// Every traffic counter row, summed over CPUs, sorted by (CTID, direction, class,
    /// family).
    /// Rows that never counted anything are left out.
    pub fn counters(&self) -> Result<Vec<CounterRow>> {
        let mut sums: BTreeMap<CounterKey, (u64, u64)> = BTreeMap::new();
        for (k, vals) in self.read_percpu(&self.archive, map_names::ARCHIVE)? {
            let e = sums.entry(k).or_default();
            e.0 += vals.iter().map(|v| v.bytes).sum::<u64>();
            e.1 += vals.iter().map(|v| v.packets).sum::<u64>();
        }
        let owners = self.slot_ctids()?;
        let used = owners.iter().filter(|c| **c != 0).count();
        // Many CTs: the whole array in a few batch syscalls (the same bytes, ~1 µs less per
        // slot); few: only the used slots, not every slot's per-CPU rows.
        let batch = if used > 64 {
            match sys::lookup_batch_percpu::<u32, SlotCounters>(
                self.counters.map().fd().as_fd(),
                nr_cpus()?,
            ) {
                Ok(rows) => Some(
                    rows.into_iter()
                        .collect::<BTreeMap<u32, Vec<SlotCounters>>>(),
                ),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => None,
                Err(e) => {
                    return Err(io_err("batch lookup", &self.map_path(map_names::COUNTERS))(
                        e,
                    ));
                }
            }
        } else {
            None
        };
        for (slot, ctid) in owners.into_iter().enumerate() {
            if ctid == 0 {
                continue;
            }
            let fetched;
            let vals: &[SlotCounters] = match batch.as_ref().and_then(|b| b.get(&(slot as u32))) {
                Some(v) => v,
                None => {
                    fetched = self.counters.get(&(slot as u32), 0).map_err(map_err(
                        map_names::COUNTERS,
                        &self.pin_dir,
                        "get",
                    ))?;
                    &fetched
                }
            };
            for row in 0..berth_common::SLOT_ROWS {
                let bytes: u64 = vals.iter().map(|v| v.rows[row].bytes).sum();
                let packets: u64 = vals.iter().map(|v| v.rows[row].packets).sum();
                if bytes == 0 && packets == 0 {
                    continue;
                }
                let e = sums.entry(layout::row_key(ctid, row)).or_default();
                e.0 += bytes;
                e.1 += packets;
            }
        }
        let mut out: Vec<CounterRow> = sums
            .into_iter()
            .filter(|(_, (b, p))| *b != 0 || *p != 0)
            .map(|(k, (bytes, packets))| CounterRow {
                ctid: k.ctid,
                dir: Direction::from_raw(k.dir),
                class: k.class,
                family: Family::from_raw(k.family),
                bytes,
                packets,
            })
            .collect();
        out.sort_by_key(|r| (r.ctid, r.dir, r.class, r.family));
        Ok(out)
    }

    /// Every drop counter row, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<DropRow>> {
        let rows = self.read_percpu(&self.drops, map_names::DROPS)?;
        let mut out: Vec<DropRow> = rows
            .into_iter()
            .map(|(k, vals): (DropKey, Vec<DropValue>)| DropRow {
                ctid: k.ctid,
                dir: Direction::from_raw(k.dir),
                reason: DropReason::from_raw(k.reason),
                packets: vals.iter().map(|v| v.packets).sum(),
                bytes: vals.iter().map(|v| v.bytes).sum(),
            })
            .collect();
        out.sort_by_key(|r| (r.ctid, r.dir, r.reason));
        Ok(out)
    }

    fn read_percpu<K: aya::Pod + Eq + Ord, V: aya::Pod>(
        &self,
        map: &PerCpuHashMap<MapData, K, V>,
        name: &'static str,
    ) -> Result<Vec<(K, Vec<V>)>> {
        let nr_cpus = nr_cpus()?;
        match sys::lookup_batch_percpu::<K, V>(map.map().fd().as_fd(), nr_cpus) {
            Ok(rows) => return Ok(rows),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                debug!(map = name, "no BPF_MAP_LOOKUP_BATCH; iterating");
            }
            Err(e) => {
                return Err(io_err(
                    "batch lookup",
                    &self.pin_dir.join("maps").join(name),
                )(e));
            }
        }
        // Entries can be deleted between get_next_key and lookup: merge by key.
        let mut rows: BTreeMap<K, Vec<V>> = BTreeMap::new();
        for item in map.iter() {
            let (k, vals) = item.map_err(map_err(name, &self.pin_dir, "iterate"))?;
            rows.insert(k, vals.iter().copied().collect());
        }
        Ok(rows.into_iter().collect())
    }

    /// Removes everything pinned under `pin_dir`: links (detaching the programs), programs,
    /// maps (all counters), and the directory. For tests and full uninstall. Also removes
    /// cls_bpf filters of the netlink fallback on interfaces recorded in `IFACES` (in the
    /// calling thread's network namespace).
    pub fn unload_all(pin_dir: impl AsRef<Path>) -> Result<()> {
        let pin_dir = pin_dir.as_ref();
        if !pin_dir.exists() {
            return Ok(());
        }
        let ifaces_path = pin_dir.join("maps").join(map_names::IFACES);
        let maps_dir = pin_dir.join("maps");
        if let Ok(ifaces) = open_map::<Array<MapData, IfaceInfo>>(
            &maps_dir,
            map_names::IFACES,
            4,
            size_of::<IfaceInfo>(),
        ) {
            let mut ifindexes: Vec<u32> =
                sys::lookup_batch::<u32, IfaceInfo>(ifaces.map().fd().as_fd())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(_, v)| v.ifindex)
                    .filter(|i| *i != 0)
                    .collect();
            if let Ok(spill) = open_map::<HashMap<MapData, u32, IfaceInfo>>(
                &maps_dir,
                map_names::IFACES_SPILL,
                4,
                size_of::<IfaceInfo>(),
            ) {
                ifindexes.extend(spill.keys().flatten());
            }
            for ifindex in ifindexes {
                if let Some(ifname) = sys::if_indextoname(ifindex) {
                    for (attach_type, name) in [
                        (TcAttachType::Ingress, program_names::FROM_CT),
                        (TcAttachType::Egress, program_names::TO_CT),
                    ] {
                        let _ = tc::qdisc_detach_program(&ifname, attach_type, name);
                    }
                }
            }
        } else {
            debug!(path = %ifaces_path.display(), "no IFACES map to clean filters from");
        }
        remove_dir_contents(pin_dir)?;
        fs::remove_dir(pin_dir).map_err(io_err("removing", pin_dir))?;
        info!(pin_dir = %pin_dir.display(), "datapath unloaded");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iface_config_round_trips_and_routed_always_polices_ip() {
        let r = IfaceConfig::routed(101, [2, 0, 0, 0, 0, 1]);
        let raw = r.to_raw(5, 9);
        assert_eq!((raw.ifindex, raw.slot, raw.ctid), (5, 9, 101));
        assert_eq!(raw.mode, MODE_ROUTED);
        assert_eq!(raw.flags, FLAG_IP_FILTER);
        assert_eq!(IfaceConfig::from_raw(raw), r);

        let mut b = IfaceConfig::bridged(7, [2, 0, 0, 0, 0, 2]);
        assert_eq!(b.to_raw(5, 0).flags, FLAG_MAC_FILTER);
        b.ip_filter = true;
        assert_eq!(IfaceConfig::from_raw(b.to_raw(5, 0)), b);
    }

    #[test]
    fn v4_addr_keys_zero_the_unused_bytes() {
        let k = addr_key(5, "192.0.2.1".parse().unwrap());
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(&k.addr[..4], &[192, 0, 2, 1]);
        assert!(k.addr[4..].iter().all(|b| *b == 0));
    }

    #[test]
    fn object_hash_is_stable() {
        assert_eq!(object_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(object_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
