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
//! Loading, pinning, attaching and the raw syscalls are [`crate::bpf`]'s, shared with the
//! shaper; this module owns what the maps mean. [`DatapathView`] reads them (opened
//! read-only: what berthd and the read-only verbs use), [`Datapath`] is a view that can also
//! write them and holds the programs to attach. Their methods are split by concern:
//! `ifaces.rs` (interface entries, attach/detach), `slots.rs` (counter slots and the archive),
//! `addrs.rs` (the CTs' addresses), `settings.rs` (class table and settings), `counters.rs`
//! (reading the totals), `migrate_v1.rs` (the previous pin layout).
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
//! totals never go back while the CT exists. Destroying a CT retires its counters
//! (`retire.rs`): the caller records its totals (under the CT's UUID), then its slot is freed
//! and its `ARCHIVE` and `DROPS` entries removed, so a new CT with the same CTID counts from 0.
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

mod addrs;
mod classes;
mod counters;
mod error;
mod ifaces;
mod map_values;
mod migrate_v1;
mod quota;
mod retire;
mod settings;
mod slots;
mod view;

use std::{
    ops::Deref,
    path::{Path, PathBuf},
};

use aya::programs::{SchedClassifier, TcAttachType};
use berth_common::{
    FAMILY_V4, FAMILY_V6, FLAG_IP_FILTER, FLAG_MAC_FILTER, IfaceInfo, MODE_BRIDGED, MODE_ROUTED,
    map_names, program_names,
};
use berth_runtime::Ctid;
use berth_runtime::error_chain::ErrorChain;
pub use classes::{ClassEntry, ClassesError, format_networks_classes, parse_networks_classes};
pub use error::{DatapathError, Result};
pub use retire::Retired;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};
pub use view::DatapathView;

pub use crate::bpf::attach::AttachMethod;
use crate::bpf::{
    self, Access, PinLock,
    attach::{self as hooks, Attachment},
    programs::{self, MapPins, ProgramSpec},
};

/// Where berth pins its datapath unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/berth/v2";

const FROM_CT: ProgramSpec = ProgramSpec::required(program_names::FROM_CT, "from_ct");
const TO_CT: ProgramSpec = ProgramSpec::required(program_names::TO_CT, "to_ct");

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
    pub ctid: Ctid,
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
    pub fn routed(ctid: Ctid, mac: [u8; 6]) -> Self {
        Self {
            ctid,
            mode: IfaceMode::Routed,
            mac,
            mac_filter: false,
            ip_filter: true,
        }
    }

    pub fn bridged(ctid: Ctid, mac: [u8; 6]) -> Self {
        Self {
            ctid,
            mode: IfaceMode::Bridged,
            mac,
            mac_filter: true,
            ip_filter: false,
        }
    }

    /// The `IFACES` entry, without addresses (see [`map_values::set_inline_addrs`]).
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
            ctid: self.ctid.get(),
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

    /// The config of a kernel entry; `None` for one without a valid CTID (an empty entry).
    fn from_raw(raw: IfaceInfo) -> Option<Self> {
        let mode = if raw.mode == MODE_BRIDGED {
            IfaceMode::Bridged
        } else {
            IfaceMode::Routed
        };
        Some(Self {
            ctid: Ctid::new(raw.ctid).ok()?,
            mode,
            mac: raw.mac,
            mac_filter: raw.flags & FLAG_MAC_FILTER != 0,
            ip_filter: raw.flags & FLAG_IP_FILTER != 0,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
    /// The CT's transfer quota is exhausted (cut): traffic beyond class 0.
    Quota,
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
            berth_common::DROP_QUOTA => Self::Quota,
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
            Self::Quota => "quota",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// Which bytes the traffic counters count (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRow {
    pub ctid: u32,
    pub dir: Direction,
    pub class: u8,
    pub family: Family,
    pub bytes: u64,
    pub packets: u64,
}

/// One drop counter row, summed over CPUs. `bytes` are whole frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// A handle on the pinned datapath that can change it: a [`DatapathView`] (every read method)
/// over maps opened read-write, plus the programs it attaches. Dropping it changes nothing in
/// the kernel.
pub struct Datapath {
    view: DatapathView,
    method: AttachMethod,
    from_ct: SchedClassifier,
    to_ct: SchedClassifier,
}

impl Deref for Datapath {
    type Target = DatapathView;
    fn deref(&self) -> &DatapathView {
        &self.view
    }
}

impl Datapath {
    /// Opens the datapath pinned under `pin_dir`, loading and pinning it first where needed
    /// (first use, or a binary with different programs: then every attachment is switched to
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
        bpf::object()?;
        bpf::ensure_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let progs_root = pin_dir.join("progs");
        bpf::create_dirs(&[pin_dir, &maps_dir, &progs_root, &pin_dir.join("links")])?;
        let _lock = PinLock::take(pin_dir)?;
        let mut progs = programs::load_or_open(
            &progs_root,
            &[MapPins {
                dir: &maps_dir,
                names: &map_names::ALL,
            }],
            &[FROM_CT, TO_CT],
        )?;
        let mut dp = Self {
            from_ct: progs.take_required(&FROM_CT)?,
            to_ct: progs.take_required(&TO_CT)?,
            method,
            view: DatapathView::open(pin_dir, Access::ReadWrite)?,
        };
        if progs.fresh {
            dp.upgrade_attachments()?;
            programs::sweep_old_builds(&progs_root)?;
        }
        Ok(dp)
    }

    /// The programs to attach to one interface, in `IFACES`-entry order (ingress first).
    fn attachments(&mut self) -> [Attachment<'_>; 2] {
        [
            Attachment {
                prog: &mut self.from_ct,
                program: FROM_CT.name,
                attach_type: TcAttachType::Ingress,
            },
            Attachment {
                prog: &mut self.to_ct,
                program: TO_CT.name,
                attach_type: TcAttachType::Egress,
            },
        ]
    }

    /// After a program upgrade: point every attachment at the freshly loaded programs, each on
    /// the path it was made with (a host may hold both: TCX links from before the default
    /// changed, cls_bpf filters since).
    fn upgrade_attachments(&mut self) -> Result<()> {
        let mut tcx = std::collections::BTreeSet::new();
        for (ifindex, _) in hooks::link_dirs(&self.pin_dir.join("links"))? {
            let ifname = bpf::sys::if_indextoname(ifindex).unwrap_or_default();
            self.attach_tcx(ifindex, &ifname, false)?;
            tcx.insert(ifindex);
        }
        for iface in self.attached()? {
            if tcx.contains(&iface.ifindex) {
                continue;
            }
            if let Some(ifname) = iface.ifname {
                self.attach_cls_bpf(iface.ifindex, &ifname)?;
            }
        }
        Ok(())
    }

    /// The maps a further program of the object shares with the datapath's (the tests and the
    /// benchmark load the no-op reference program over them with [`programs::load_one`]).
    pub fn map_pins(&self) -> PathBuf {
        self.pin_dir.join("maps")
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
            .map_err(bpf::prog_err(FROM_CT.name, "reading info"))?;
        let b = self
            .to_ct
            .info()
            .map_err(bpf::prog_err(TO_CT.name, "reading info"))?;
        Ok((a.id(), b.id()))
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
        // Best effort, like the rest of an uninstall: filters that cannot be found are left,
        // the pins go in any case.
        match DatapathView::open_pinned(pin_dir).map(|v| v.map(|v| v.iface_entries())) {
            Ok(Some(Ok(entries))) => {
                for ifindex in entries.into_keys() {
                    if let Some(ifname) = bpf::sys::if_indextoname(ifindex) {
                        hooks::detach_cls_bpf(&ifname, TcAttachType::Ingress, FROM_CT.name);
                        hooks::detach_cls_bpf(&ifname, TcAttachType::Egress, TO_CT.name);
                    }
                }
            }
            Ok(None) => debug!(pin_dir = %pin_dir.display(), "no IFACES map to clean filters from"),
            Ok(Some(Err(e))) | Err(e) => {
                debug!(pin_dir = %pin_dir.display(), error = %ErrorChain(&e), "datapath maps not readable; filters left")
            }
        }
        bpf::remove_tree(pin_dir)?;
        info!(pin_dir = %pin_dir.display(), "datapath unloaded");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(n: u32) -> Ctid {
        Ctid::new(n).unwrap()
    }

    #[test]
    fn iface_config_round_trips_and_routed_always_polices_ip() {
        let r = IfaceConfig::routed(ct(101), [2, 0, 0, 0, 0, 1]);
        let raw = r.to_raw(5, 9);
        assert_eq!((raw.ifindex, raw.slot, raw.ctid), (5, 9, 101));
        assert_eq!(raw.mode, MODE_ROUTED);
        assert_eq!(raw.flags, FLAG_IP_FILTER);
        assert_eq!(IfaceConfig::from_raw(raw), Some(r));

        let mut b = IfaceConfig::bridged(ct(7), [2, 0, 0, 0, 0, 2]);
        assert_eq!(b.to_raw(5, 0).flags, FLAG_MAC_FILTER);
        b.ip_filter = true;
        assert_eq!(IfaceConfig::from_raw(b.to_raw(5, 0)), Some(b));
        assert_eq!(IfaceConfig::from_raw(IfaceInfo::EMPTY), None);
    }

    #[test]
    fn v4_addr_keys_zero_the_unused_bytes() {
        let k = addrs::addr_key(ct(5), "192.0.2.1".parse().unwrap());
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(&k.addr[..4], &[192, 0, 2, 1]);
        assert!(k.addr[4..].iter().all(|b| *b == 0));
    }
}
