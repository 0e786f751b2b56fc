//! Per-CT traffic shaping: eBPF classifies, HTB queues enforce.
//!
//! # Design
//!
//! On this project's kernels a pure eBPF drop-policer wrecks TCP over veth (64 KB GSO
//! packets need a bucket of rate × 200 ms to reach the rate), while HTB reaches ~100 % of the
//! rate with no retransmits, and sch_fq (hence EDT) may be missing. So:
//!
//! * **to the CT** (`rate_in`): an HTB on the host-side interface's egress. berth's shaping
//!   program on the TCX egress hook (after the accounting program) writes the HTB class into
//!   `skb->priority`; HTB takes a priority equal to one of its leaf class ids without any
//!   filter.
//! * **from the CT** (`rate_out`): the TCX ingress program writes the class and redirects the
//!   packet into the CT's own IFB, whose HTB shapes it; the IFB then re-injects it into the
//!   host-side interface's receive path (tc skipped). CT-to-CT traffic on one host passes
//!   both: the sender's IFB and the receiver's egress HTB.
//! * **packet rates** (`pps_in`/`pps_out`): a GCRA bucket in the same programs drops excess
//!   packets (reason `pps`) — for floods, where dropping is the point.
//!
//! One IFB per shaped interface rather than one shared IFB with a class per CT: each HTB has
//! one qdisc lock, so a shared IFB would serialise every CT's outgoing traffic on one lock and
//! let one CT's flood contend with its neighbours'; per-CT IFBs also make teardown one link
//! deletion and keep the stats per CT. The cost is a netdevice per shaped CT (a few KB).
//!
//! # HTB layout (the same on the host-side interface and on the IFB)
//!
//! ```text
//! 1:     htb root qdisc (default 1:100 — unclassified traffic goes to the rest group)
//! 1:1    the CT's total rate of the direction (when set)
//! 1:10+g group g: g = 0 every network class without a rate of its own (exists with a total),
//!        g = 1+c network class c (--class-rate c:IN:OUT), ceil = min(class rate, total)
//! 1:200+g interactive leaf (prio 0): frames <= 160 bytes, not GSO (pings, ACKs, DNS)
//! 1:100+g bulk leaf (prio 1), bfifo: 200 ms at the group's ceil, at least 4 MiB
//! ```
//!
//! Group guarantees (`rate`) are scaled so they sum to at most the total, and ceilings are the
//! configured rates: every byte beyond a guarantee borrows from `1:1`, so the total holds
//! whatever the mix. The interactive leaf keeps ping latency low through a saturated CT
//! without an AQM qdisc (this kernel has no fq_codel, sfq, or fq).
//!
//! Rates count Ethernet frames as HTB sees them (`skb->len` at the interface, like tc).
//!
//! Changing rates changes the classes in place (`tc class change`): queues and connections
//! stay. Only a change of structure (adding or removing the total, or a class) deletes the
//! classes that no longer fit, with their queued packets.
//!
//! # EDT backend (where sch_fq exists)
//!
//! The same two classifiers (packet rates, redirect into the IFB), plus `berth_shape_edt` on
//! the egress of the host-side interface and of the IFB: it stamps `skb->tstamp` with the
//! packet's earliest departure time from per-CT, per-direction rate state (`SHAPER_EDT`,
//! compare-and-swap across CPUs) and sch_fq, the root qdisc of both devices, holds each
//! packet until then. Packets that would wait longer than the horizon are dropped and counted
//! (reason `horizon`). See `backend.rs` for the choice, `edt.rs` for the plan. sch_fq is
//! missing on the kernel this was developed on: there the backend reports "unavailable: no
//! sch_fq", and only the program (BPF_PROG_TEST_RUN) and the plan are tested.
//!
//! # Attach methods
//!
//! TCX links (pinned) by default; with [`AttachMethod::Netlink`] clsact + cls_bpf
//! direct-action filters at priority `NL_PRIORITY`, after the datapath's (auto-assigned, lower)
//! priorities. Filters are found again by the program's kernel name (15 bytes at most).
//!
//! # Pins
//!
//! ```text
//! <pin_dir>/maps/...                    the datapath's maps (class table, shared)
//! <pin_dir>/shaper/maps/SHAPER_*        interfaces, pps buckets, drop counters, EDT state
//! <pin_dir>/shaper/progs/<hash>/{to_ct,from_ct,edt}
//! <pin_dir>/shaper/links/<ifindex>/{to_ct,from_ct,edt}   TCX links, last on the hook
//! ```

mod backend;
mod config;
mod edt;
pub mod readonly;
pub mod report;
mod sys;
pub mod tc;

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions},
    },
};
pub use backend::{Backend, BackendStatus, FqSupport, fq_support};
use berth_common::{
    DIR_IN, DIR_OUT, DropValue,
    shaper::{
        DROP_HORIZON, DROP_PPS, EdtState, HTB_MAJOR, MINOR_BULK, MINOR_GROUP, MINOR_INTERACTIVE,
        MINOR_TOTAL, PPS_IN, PPS_OUT, PpsBucket, REST_IN, REST_OUT, SHAPE_IN, SHAPE_OUT,
        ShapeIface, kernel_name, map_names, program_names,
    },
};
use berth_runtime::net::{NetError, Netlink};
pub use config::{
    ClassRate, ConfigError, DEFAULT_MTU, MAX_PPS, MAX_RATE_BPS, Rate, ShapingConfig, Size,
    parse_optional_rate,
};
use serde::Serialize;
use tc::{HtbClass, handle};
use tracing::{debug, info, warn};

use crate::datapath::{AttachMethod, DEFAULT_PIN_DIR, Direction};

/// The eBPF object (shared with the datapath; built by build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/berth-ebpf"));

const TO_CT_FILE: &str = "to_ct";
const FROM_CT_FILE: &str = "from_ct";
const EDT_FILE: &str = "edt";
/// tc filter priority of the cls_bpf fallback (kernels without TCX): the largest, so the
/// shaper runs after the datapath's accounting filter (auto-assigned priorities are lower).
const NL_PRIORITY: u16 = 0xfff0;
/// Bulk leaf queue: this much time at the group's ceiling, at least `BULK_QUEUE_MIN`.
/// Traffic from a CT crosses the veth orphaned (no TCP Small Queues backpressure from the
/// qdisc), so a sender's window only stops growing at its socket buffer limit (tcp_wmem max,
/// 4 MiB by default): measured at 10 Mbit/s, a 256 KiB queue cost 135 retransmits in 5 s
/// (2.8 %), 4 MiB none. Latency-sensitive packets skip this queue (interactive leaf).
const BULK_QUEUE_MS: u64 = 200;
const BULK_QUEUE_MIN: u64 = 4 * 1024 * 1024;
const BULK_QUEUE_MAX: u64 = 64 * 1024 * 1024;
/// Interactive leaf queue, packets.
const INTERACTIVE_QUEUE: u32 = 128;
/// HTB direct queue (traffic of unshaped classes), packets.
const DIRECT_QLEN: u32 = 1000;
/// Default burst: this much time at the class's ceiling, at least `MIN_BURST` (measured at
/// 1 Gbit/s: below ~15 KB the HTB watchdog's timer slack costs several % of the rate).
const BURST_MS: u64 = 2;
const MIN_BURST: u64 = 16 * 1024;
/// Default pps burst: this many ms at the rate, at least `MIN_PPS_BURST` packets.
const PPS_BURST_MS: u64 = 20;
const MIN_PPS_BURST: u64 = 16;

/// Errors of the shaper, each naming the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum ShaperError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("CTID 0 is reserved for the host")]
    InvalidCtid,
    #[error("interface #{ifindex} does not exist in this network namespace")]
    NoSuchIfindex { ifindex: u32 },
    #[error("interface #{ifindex} belongs to CT {owner}, not CT {ctid}")]
    WrongCt { ifindex: u32, ctid: u32, owner: u32 },
    #[error(
        "the eBPF programs were not built into this binary (built with AYA_BUILD_SKIP=1); \
         rebuild with the BPF toolchain (xtask/setup.sh)"
    )]
    NotBuilt,
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the shaper's eBPF object (maps under {}): {source}", pin_dir.display())]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("shaper program {program}: {op}: {source}")]
    Program {
        program: &'static str,
        op: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("shaper map {map} ({}): {op}: {source}", path.display())]
    Map {
        map: &'static str,
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("shaper backend: {0}")]
    Backend(String),
    #[error("shaping {what} of CT {ctid}: {source}")]
    Net {
        what: String,
        ctid: u32,
        #[source]
        source: NetError,
    },
}

pub type Result<T, E = ShaperError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ShaperError + use<> {
    let path = path.to_owned();
    move |source| ShaperError::Io { op, path, source }
}

fn prog_err(
    program: &'static str,
    op: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> ShaperError {
    move |e| ShaperError::Program {
        program,
        op,
        source: Box::new(e),
    }
}

fn map_err(
    map: &'static str,
    path: &Path,
    op: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> ShaperError + use<> {
    let path = path.to_owned();
    move |e| ShaperError::Map {
        map,
        path,
        op,
        source: Box::new(e),
    }
}

fn net_err(what: impl Into<String>, ctid: u32) -> impl FnOnce(NetError) -> ShaperError {
    let what = what.into();
    move |source| ShaperError::Net { what, ctid, source }
}

// ---- backend -----------------------------------------------------------------------------

/// The backend this host would use (before any shaper is opened: whether the EDT program
/// verifies is not known yet, see [`Shaper::backend_status`] for the one in use).
pub fn backend_status() -> Result<BackendStatus> {
    let requested = backend::requested_from_env().map_err(ShaperError::Backend)?;
    backend::decide(fq_support(), None, requested).map_err(ShaperError::Backend)
}

// ---- plan --------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaf {
    /// bfifo, limit in bytes.
    Bulk(u32),
    /// pfifo, limit in packets.
    Interactive(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PlannedClass {
    classid: u32,
    parent: u32,
    params: HtbClass,
    leaf: Option<Leaf>,
}

/// What one direction gets on its device, per backend.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DirShape {
    Htb(DirPlan),
    Edt(Box<EdtState>),
}

/// The HTB of one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct DirPlan {
    /// Parents before children.
    classes: Vec<PlannedClass>,
    /// Network classes with a group of their own.
    own: u16,
    /// Group 0 (the rest) is shaped.
    rest: bool,
}

fn quantum(rate: u64) -> u32 {
    (rate / 10).clamp(1600, 200_000) as u32
}

/// `total` and class rates in bits/s; `None` when nothing in this direction is shaped.
fn plan_dir(total: Option<Rate>, classes: &[(u8, Rate)], burst: Option<Size>) -> Option<DirPlan> {
    if total.is_none() && classes.is_empty() {
        return None;
    }
    let root = handle(HTB_MAJOR, 0);
    let total_b = total.map(Rate::bytes_per_sec);
    let burst_for = |ceil: u64| {
        burst
            .map(Size::bytes)
            .unwrap_or_else(|| (ceil * BURST_MS / 1000).max(MIN_BURST))
    };
    let mut plan = DirPlan::default();
    // (group, ceil in bytes/s)
    let mut groups: Vec<(u32, u64)> = Vec::new();
    if let Some(t) = total_b {
        groups.push((0, t));
        plan.rest = true;
        plan.classes.push(PlannedClass {
            classid: handle(HTB_MAJOR, MINOR_TOTAL),
            parent: root,
            params: HtbClass {
                rate: t,
                ceil: t,
                burst: burst_for(t),
                quantum: quantum(t),
                prio: 0,
            },
            leaf: None,
        });
    }
    for (c, r) in classes {
        let ceil = total_b.map_or(r.bytes_per_sec(), |t| r.bytes_per_sec().min(t));
        groups.push((1 + u32::from(*c), ceil));
        plan.own |= 1 << c;
    }
    let sum: u128 = groups.iter().map(|(_, c)| u128::from(*c)).sum();
    for (g, ceil) in groups {
        // Guarantees sum to at most the total; the rest is borrowed from 1:1 up to the ceil.
        let rate = match total_b {
            Some(t) if sum > u128::from(t) => {
                ((u128::from(ceil) * u128::from(t) / sum) as u64).max(1)
            }
            _ => ceil,
        };
        let group = handle(HTB_MAJOR, MINOR_GROUP + g);
        let b = burst_for(ceil);
        plan.classes.push(PlannedClass {
            classid: group,
            parent: if total_b.is_some() {
                handle(HTB_MAJOR, MINOR_TOTAL)
            } else {
                root
            },
            params: HtbClass {
                rate,
                ceil,
                burst: b,
                quantum: quantum(rate),
                prio: 0,
            },
            leaf: None,
        });
        let inter = (rate / 20).max(1).min(rate);
        let bulk = (rate - inter).max(1);
        let queue = (ceil * BULK_QUEUE_MS / 1000).clamp(BULK_QUEUE_MIN, BULK_QUEUE_MAX);
        plan.classes.push(PlannedClass {
            classid: handle(HTB_MAJOR, MINOR_INTERACTIVE + g),
            parent: group,
            params: HtbClass {
                rate: inter,
                ceil,
                burst: b,
                quantum: quantum(inter),
                prio: 0,
            },
            leaf: Some(Leaf::Interactive(INTERACTIVE_QUEUE)),
        });
        plan.classes.push(PlannedClass {
            classid: handle(HTB_MAJOR, MINOR_BULK + g),
            parent: group,
            params: HtbClass {
                rate: bulk,
                ceil,
                burst: b,
                quantum: quantum(bulk),
                prio: 1,
            },
            leaf: Some(Leaf::Bulk(queue as u32)),
        });
    }
    Some(plan)
}

fn pps_bucket(rate: u64) -> PpsBucket {
    let interval_ns = (1_000_000_000 + rate / 2) / rate;
    let burst = (rate * PPS_BURST_MS / 1000).max(MIN_PPS_BURST);
    PpsBucket {
        tat: 0,
        interval_ns,
        tolerance_ns: (burst - 1) * interval_ns,
        rate,
    }
}

/// Depth of a class in the layout (deletion goes deepest first).
fn depth(classid: u32) -> u32 {
    match classid & 0xffff {
        m if m >= MINOR_BULK => 3,
        m if m >= MINOR_GROUP => 2,
        _ => 1,
    }
}

/// The IFB of a host-side interface: `veth101.0` → `ifb101.0` (what hosters grep for),
/// anything else `ifb-<ifindex>`; at most 15 characters either way.
pub fn ifb_name(ifname: &str, ifindex: u32) -> String {
    match ifname.strip_prefix("veth") {
        Some(rest) if !rest.is_empty() => format!("ifb{rest}"),
        _ => format!("ifb-{ifindex}"),
    }
}

// ---- status ------------------------------------------------------------------------------

/// One HTB class as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClassStatus {
    pub dir: Direction,
    /// `1:100` style.
    pub classid: String,
    /// `total`, `group`, `interactive`, `bulk`.
    pub role: &'static str,
    /// The network class of a group/leaf; `None` for the total and the rest group.
    pub network_class: Option<u8>,
    pub rate_bps: u64,
    pub ceil_bps: u64,
    pub burst_bytes: u64,
    pub bytes: u64,
    pub packets: u64,
    /// Packets dropped because the leaf queue was full.
    pub drops: u64,
    /// Times the class had to wait for tokens.
    pub overlimits: u64,
    pub backlog_bytes: u64,
}

/// Drops per direction and reason: `pps` (packet-rate limit, eBPF) and `queue` (a leaf queue
/// was full, HTB).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DropStatus {
    pub dir: Direction,
    pub reason: &'static str,
    pub packets: u64,
    /// `None` where the kernel does not count bytes (queue drops).
    pub bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IfaceStatus {
    pub ifindex: u32,
    pub ifname: Option<String>,
    pub ifb: Option<String>,
    /// What the kernel is configured with, read back.
    pub config: ShapingConfig,
    pub classes: Vec<ClassStatus>,
    pub drops: Vec<DropStatus>,
    /// Sum of the leaf classes' overlimits per direction (`in`, `out`).
    pub overlimits_in: u64,
    pub overlimits_out: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShaperStatus {
    pub ctid: u32,
    pub interfaces: Vec<IfaceStatus>,
}

// ---- the shaper --------------------------------------------------------------------------

struct DirLock(#[expect(dead_code, reason = "held for its Drop (unlock on close)")] File);

impl DirLock {
    fn take(dir: &Path) -> Result<Self> {
        let f = File::open(dir).map_err(io_err("opening", dir))?;
        // SAFETY: f is an open fd for the duration of the call.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err("locking", dir)(io::Error::last_os_error()));
        }
        Ok(Self(f))
    }
}

fn remove_tree(dir: &Path) -> Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(io_err("listing", dir))?;
                let p = e.path();
                if e.file_type().map_err(io_err("stat", &p))?.is_dir() {
                    remove_tree(&p)?;
                } else {
                    fs::remove_file(&p).map_err(io_err("unpinning", &p))?;
                }
            }
            fs::remove_dir(dir).map_err(io_err("removing", dir))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("listing", dir)(e)),
    }
}

/// A program's place on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// Host-side interface egress: classifier (HTB priority, pps) for traffic to the CT.
    ToCt,
    /// Host-side interface ingress: classifier + redirect into the IFB.
    FromCt,
    /// Egress of the host-side interface or of the IFB: EDT stamps (EDT backend).
    Edt,
}

impl Hook {
    const ALL: [Hook; 3] = [Hook::ToCt, Hook::FromCt, Hook::Edt];

    fn file(self) -> &'static str {
        match self {
            Self::ToCt => TO_CT_FILE,
            Self::FromCt => FROM_CT_FILE,
            Self::Edt => EDT_FILE,
        }
    }

    fn program(self) -> &'static str {
        match self {
            Self::ToCt => program_names::TO_CT,
            Self::FromCt => program_names::FROM_CT,
            Self::Edt => program_names::EDT,
        }
    }
}

/// Attaches `prog` as a cls_bpf direct-action filter (clsact added when missing), replacing
/// a filter of the same program name.
fn attach_netlink(
    prog: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    attach_type: TcAttachType,
) -> Result<()> {
    if let Err(e) = aya::programs::tc::qdisc_add_clsact(ifname) {
        debug!(ifname, error = %e, "clsact qdisc not added (exists already?)");
    }
    detach_netlink(ifname, attach_type, name);
    let id = prog
        .attach_with_options(
            ifname,
            attach_type,
            TcAttachOptions::Netlink(NlOptions {
                priority: NL_PRIORITY,
                ..Default::default()
            }),
        )
        .map_err(prog_err(name, "attaching (clsact/cls_bpf)"))?;
    let link = prog.take_link(id).map_err(prog_err(name, "taking link"))?;
    // The filter lives in the qdisc; dropping the handle would delete it.
    std::mem::forget(link);
    Ok(())
}

/// Removes our cls_bpf filter of program `name` from `ifname`'s hook, if any. aya names a
/// filter after the program it was attached from; a program opened from a pin has the
/// kernel's name, cut to 15 bytes (`berth_shape_to_ct` is `berth_shape_to_`).
fn detach_netlink(ifname: &str, attach_type: TcAttachType, name: &str) {
    match aya::programs::tc::qdisc_detach_program(ifname, attach_type, kernel_name(name)) {
        Ok(()) => {}
        Err(aya::programs::tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => debug!(ifname, error = %e, "cls_bpf filter not removed"),
    }
}

/// A handle on the shaper pinned under `<pin_dir>/shaper`. Dropping it changes nothing in the
/// kernel. Call it from the network namespace holding the CTs' host-side interfaces.
pub struct Shaper {
    dir: PathBuf,
    method: AttachMethod,
    backend: BackendStatus,
    to_ct: SchedClassifier,
    from_ct: SchedClassifier,
    /// `None` where the kernel rejected it (then the backend is HTB).
    edt_prog: Option<SchedClassifier>,
    ifaces: HashMap<MapData, u32, ShapeIface>,
    pps: HashMap<MapData, u64, PpsBucket>,
    drops: PerCpuHashMap<MapData, u64, DropValue>,
    edt: HashMap<MapData, u32, EdtState>,
    nl: Netlink,
}

impl Shaper {
    /// Opens the shaper of the datapath pinned at `pin_dir` ([`DEFAULT_PIN_DIR`] in
    /// production), loading and pinning its programs and maps on first use (or when this
    /// binary's programs differ: every pinned link then switches to the new programs
    /// atomically). The datapath's maps (class table) are shared, created if missing.
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Self> {
        let requested = backend::requested_from_env().map_err(ShaperError::Backend)?;
        Self::open_full(pin_dir.as_ref(), AttachMethod::detect(), requested)
    }

    /// [`Self::open`] at [`DEFAULT_PIN_DIR`].
    pub fn open_default() -> Result<Self> {
        Self::open(DEFAULT_PIN_DIR)
    }

    /// With an explicit attach method (tests exercise the cls_bpf fallback with it) and the
    /// automatic backend choice (`BERTH_SHAPER` is not consulted).
    pub fn open_with(pin_dir: impl AsRef<Path>, method: AttachMethod) -> Result<Self> {
        Self::open_full(pin_dir.as_ref(), method, None)
    }

    /// With an explicit attach method and backend (`None`: automatic). A backend that cannot
    /// run here is an error naming why.
    pub fn open_with_backend(
        pin_dir: impl AsRef<Path>,
        method: AttachMethod,
        backend: Option<Backend>,
    ) -> Result<Self> {
        Self::open_full(pin_dir.as_ref(), method, backend)
    }

    fn open_full(pin_dir: &Path, method: AttachMethod, requested: Option<Backend>) -> Result<Self> {
        if OBJECT.is_empty() {
            return Err(ShaperError::NotBuilt);
        }
        let pin_dir = pin_dir.to_path_buf();
        let dir = pin_dir.join("shaper");
        let maps_dir = dir.join("maps");
        let dp_maps = pin_dir.join("maps");
        let progs_root = dir.join("progs");
        for d in [&dp_maps, &maps_dir, &progs_root, &dir.join("links")] {
            fs::create_dir_all(d).map_err(io_err("creating", d))?;
        }
        let _lock = DirLock::take(&dir)?;
        let hash = format!("{:016x}", crate::datapath::object_hash(OBJECT));
        let progs = progs_root.join(&hash);
        let (to_path, from_path) = (progs.join(TO_CT_FILE), progs.join(FROM_CT_FILE));
        let edt_path = progs.join(EDT_FILE);
        let fresh = !(to_path.exists() && from_path.exists());
        if fresh {
            remove_tree(&progs)?;
            fs::create_dir_all(&progs).map_err(io_err("creating", &progs))?;
            let mut loader = EbpfLoader::new();
            for name in berth_common::map_names::ALL {
                loader.map_pin_path(name, dp_maps.join(name));
            }
            for name in map_names::ALL {
                loader.map_pin_path(name, maps_dir.join(name));
            }
            let mut ebpf = loader.load(OBJECT).map_err(|e| ShaperError::Load {
                pin_dir: pin_dir.clone(),
                source: Box::new(e),
            })?;
            for (name, path) in [
                (program_names::TO_CT, &to_path),
                (program_names::FROM_CT, &from_path),
            ] {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .ok_or(aya::programs::ProgramError::NotLoaded)
                    .map_err(prog_err(name, "finding in the object"))?
                    .try_into()
                    .map_err(prog_err(name, "typing"))?;
                prog.load().map_err(prog_err(name, "loading (verifier)"))?;
                prog.pin(path).map_err(|e| ShaperError::Io {
                    op: "pinning program at",
                    path: path.clone(),
                    source: io::Error::other(e),
                })?;
            }
            // The EDT program reads `__sk_buff::tstamp_type` (5.18): a kernel that rejects it
            // still shapes with HTB (no pin = rejected; later opens do not retry).
            let edt_load = ebpf
                .program_mut(program_names::EDT)
                .ok_or(aya::programs::ProgramError::NotLoaded)
                .and_then(<&mut SchedClassifier>::try_from)
                .and_then(|p| {
                    p.load()?;
                    Ok(p)
                });
            match edt_load {
                Ok(p) => p.pin(&edt_path).map_err(|e| ShaperError::Io {
                    op: "pinning program at",
                    path: edt_path.clone(),
                    source: io::Error::other(e),
                })?,
                Err(e) => {
                    warn!(error = %e, "EDT program not loaded: the EDT backend is unavailable")
                }
            }
            info!(dir = %dir.display(), build = %hash, "loaded the shaper programs");
        }
        let to_ct = SchedClassifier::from_pin(&to_path)
            .map_err(prog_err(program_names::TO_CT, "opening pin"))?;
        let from_ct = SchedClassifier::from_pin(&from_path)
            .map_err(prog_err(program_names::FROM_CT, "opening pin"))?;
        let edt_prog = if edt_path.exists() {
            Some(
                SchedClassifier::from_pin(&edt_path)
                    .map_err(prog_err(program_names::EDT, "opening pin"))?,
            )
        } else {
            None
        };
        let edt_verdict = match &edt_prog {
            Some(_) => Ok(()),
            None => {
                Err("the kernel's verifier rejected it (see the log of the first load)".to_owned())
            }
        };
        let backend = backend::decide(fq_support(), Some(edt_verdict), requested)
            .map_err(ShaperError::Backend)?;
        let open = |name: &'static str| -> Result<MapData> {
            let p = maps_dir.join(name);
            MapData::from_pin(&p).map_err(map_err(name, &p, "opening pin"))
        };
        let typed = |name: &'static str, op| {
            let p = maps_dir.join(name);
            map_err(name, &p, op)
        };
        let ifaces = HashMap::try_from(aya::maps::Map::HashMap(open(map_names::IFACES)?))
            .map_err(typed(map_names::IFACES, "typing"))?;
        let pps = HashMap::try_from(aya::maps::Map::HashMap(open(map_names::PPS)?))
            .map_err(typed(map_names::PPS, "typing"))?;
        let drops = PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(open(map_names::DROPS)?))
            .map_err(typed(map_names::DROPS, "typing"))?;
        let edt = HashMap::try_from(aya::maps::Map::HashMap(open(map_names::EDT)?))
            .map_err(typed(map_names::EDT, "typing"))?;
        let nl = Netlink::open_current(tc::NS).map_err(net_err("opening netlink", 0))?;
        let mut s = Self {
            dir,
            method,
            backend,
            to_ct,
            from_ct,
            edt_prog,
            ifaces,
            pps,
            drops,
            edt,
            nl,
        };
        if fresh {
            s.upgrade_links()?;
            for e in fs::read_dir(&progs_root).map_err(io_err("listing", &progs_root))? {
                let e = e.map_err(io_err("listing", &progs_root))?;
                if e.file_name().to_string_lossy() != hash {
                    remove_tree(&e.path())?;
                }
            }
        }
        Ok(s)
    }

    /// Which backend shapes traffic here, and why.
    pub fn backend_status(&self) -> BackendStatus {
        self.backend.clone()
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend.backend
    }

    fn links_dir(&self, ifindex: u32) -> PathBuf {
        self.dir.join("links").join(ifindex.to_string())
    }

    /// Moves every attachment to this binary's programs: TCX links are updated in place
    /// (BPF_LINK_UPDATE), cls_bpf filters replaced.
    fn upgrade_links(&mut self) -> Result<()> {
        let root = self.dir.join("links");
        for e in fs::read_dir(&root).map_err(io_err("listing", &root))? {
            let e = e.map_err(io_err("listing", &root))?;
            if let Ok(ifindex) = e.file_name().to_string_lossy().parse::<u32>()
                && let Some(name) = sys::if_indextoname(ifindex)
            {
                for hook in Hook::ALL {
                    if e.path().join(hook.file()).exists() {
                        self.attach_hook(hook, ifindex, &name)?;
                    }
                }
            }
        }
        if self.method == AttachMethod::Netlink {
            let shaped: Vec<(u32, ShapeIface)> = self.ifaces.iter().flatten().collect();
            for (ifindex, _) in &shaped {
                if let Some(name) = sys::if_indextoname(*ifindex) {
                    self.attach(*ifindex, &name)?;
                }
            }
            let stamped: Vec<u32> = self.edt.keys().flatten().collect();
            for dev in stamped {
                if let Some(name) = sys::if_indextoname(dev) {
                    self.attach_hook(Hook::Edt, dev, &name)?;
                }
            }
        }
        Ok(())
    }

    /// Attaches both classifiers to `ifindex` (idempotent; replaces links of an older program
    /// or of a re-created interface).
    fn attach(&mut self, ifindex: u32, ifname: &str) -> Result<()> {
        self.attach_hook(Hook::ToCt, ifindex, ifname)?;
        self.attach_hook(Hook::FromCt, ifindex, ifname)
    }

    fn attach_hook(&mut self, hook: Hook, ifindex: u32, ifname: &str) -> Result<()> {
        let name = hook.program();
        let (prog, attach_type) = match hook {
            Hook::ToCt => (&mut self.to_ct, TcAttachType::Egress),
            Hook::FromCt => (&mut self.from_ct, TcAttachType::Ingress),
            Hook::Edt => (
                self.edt_prog
                    .as_mut()
                    .ok_or(aya::programs::ProgramError::NotLoaded)
                    .map_err(prog_err(name, "attaching"))?,
                TcAttachType::Egress,
            ),
        };
        if self.method == AttachMethod::Netlink {
            return attach_netlink(prog, name, ifname, attach_type);
        }
        let dir = self.dir.join("links").join(ifindex.to_string());
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let path = dir.join(hook.file());
        let prog_id = prog.info().map_err(prog_err(name, "reading info"))?.id();
        match sys::tcx_link(&path) {
            Ok((link_prog, link_if)) if link_if == ifindex => {
                if link_prog != prog_id {
                    let pinned = PinnedLink::from_pin(&path).map_err(|e| ShaperError::Io {
                        op: "opening pinned link",
                        path: path.clone(),
                        source: io::Error::other(e),
                    })?;
                    let link =
                        SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| {
                            ShaperError::Io {
                                op: "typing pinned link",
                                path: path.clone(),
                                source: io::Error::other(e),
                            }
                        })?;
                    let id = prog
                        .attach_to_link(link)
                        .map_err(prog_err(name, "replacing program (BPF_LINK_UPDATE)"))?;
                    drop(
                        prog.take_link(id)
                            .map_err(prog_err(name, "releasing link"))?,
                    );
                }
                return Ok(());
            }
            Ok(_) => fs::remove_file(&path).map_err(io_err("unpinning dead link", &path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("opening pinned link", &path)(e)),
        }
        let id = prog
            .attach_with_options(
                ifname,
                attach_type,
                // Last on the hook: the accounting/anti-spoofing programs (attached first)
                // must see every packet before the redirect into the IFB ends the hook, and
                // the EDT stamp comes after the classifier's pps verdict.
                TcAttachOptions::TcxOrder(LinkOrder::last()),
            )
            .map_err(prog_err(name, "attaching (TCX)"))?;
        let link = prog.take_link(id).map_err(prog_err(name, "taking link"))?;
        let fd_link = FdLink::try_from(link).map_err(|e| ShaperError::Io {
            op: "converting link",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        fd_link.pin(&path).map_err(|e| ShaperError::Io {
            op: "pinning link at",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        Ok(())
    }

    /// Detaches every shaper program from `ifindex` (TCX links by unpinning, cls_bpf filters
    /// by their kernel names).
    fn detach(&mut self, ifindex: u32, ifname: Option<&str>) -> Result<()> {
        // Unpinning the last reference to a TCX link detaches it.
        remove_tree(&self.links_dir(ifindex))?;
        if let Some(ifname) = ifname {
            for hook in Hook::ALL {
                let t = match hook {
                    Hook::FromCt => TcAttachType::Ingress,
                    Hook::ToCt | Hook::Edt => TcAttachType::Egress,
                };
                detach_netlink(ifname, t, hook.program());
            }
        }
        Ok(())
    }

    /// Applies `config` to the CT's host-side interface `ifindex`, live and idempotently:
    /// rates change in place (queues and connections stay), directions no longer shaped are
    /// torn down. The config is validated first (burst against the interface's MTU): an
    /// invalid one changes nothing. An empty config is [`Self::remove`].
    pub fn apply(&mut self, ctid: u32, ifindex: u32, config: &ShapingConfig) -> Result<()> {
        if ctid == 0 {
            return Err(ShaperError::InvalidCtid);
        }
        let (ifname, _, mtu) = tc::link_kind(&mut self.nl, ifindex)
            .map_err(net_err(format!("interface #{ifindex}"), ctid))?
            .ok_or(ShaperError::NoSuchIfindex { ifindex })?;
        config.validate(if mtu == 0 { DEFAULT_MTU } else { mtu })?;
        let existing = self.entry(ifindex)?;
        if let Some(e) = existing
            && e.ctid != ctid
        {
            return Err(ShaperError::WrongCt {
                ifindex,
                ctid,
                owner: e.ctid,
            });
        }
        if config.is_empty() {
            return self.remove(ctid, ifindex);
        }
        let _lock = DirLock::take(&self.dir)?;
        let class_rates = |f: fn(&ClassRate) -> Option<Rate>| -> Vec<(u8, Rate)> {
            config
                .classes
                .iter()
                .filter_map(|c| f(c).map(|r| (c.class, r)))
                .collect()
        };
        let (classes_in, classes_out) = (class_rates(|c| c.rate_in), class_rates(|c| c.rate_out));
        let plans = match self.backend.backend {
            Backend::Htb => (
                plan_dir(config.rate_in, &classes_in, config.burst).map(DirShape::Htb),
                plan_dir(config.rate_out, &classes_out, config.burst).map(DirShape::Htb),
            ),
            Backend::Edt => (
                edt::state(ctid, DIR_IN, config.rate_in, &classes_in)
                    .map(|s| DirShape::Edt(Box::new(s))),
                edt::state(ctid, DIR_OUT, config.rate_out, &classes_out)
                    .map(|s| DirShape::Edt(Box::new(s))),
            ),
        };

        let result = self.apply_plans(ctid, ifindex, &ifname, config, &plans, existing);
        if result.is_err() && existing.is_none() {
            // A first apply that failed half-way leaves nothing behind.
            if let Err(e) = self.teardown(ctid, ifindex, Some(&ifname), None) {
                warn!(ctid, ifindex, error = %e, "rollback of a failed shaping setup");
            }
        }
        result
    }

    fn apply_plans(
        &mut self,
        ctid: u32,
        ifindex: u32,
        ifname: &str,
        config: &ShapingConfig,
        (plan_in, plan_out): &(Option<DirShape>, Option<DirShape>),
        existing: Option<ShapeIface>,
    ) -> Result<()> {
        self.attach(ifindex, ifname)?;
        if let Some(p) = plan_in {
            self.apply_dir(ctid, ifindex, ifname, p)?;
        }
        let old_ifb = existing.map_or(0, |e| e.ifb_ifindex);
        let mut ifb = 0;
        if let Some(p) = plan_out {
            let name = ifb_name(ifname, ifindex);
            let reuse = old_ifb != 0
                && matches!(
                    tc::link_kind(&mut self.nl, old_ifb)
                        .map_err(net_err(format!("IFB {name}"), ctid))?,
                    Some((_, kind, _)) if kind == "ifb"
                );
            ifb = if reuse {
                old_ifb
            } else {
                self.ensure_ifb(ctid, &name)?
            };
            self.apply_dir(ctid, ifb, &name, p)?;
        }

        let mut flags = 0;
        let mut entry = ShapeIface {
            ctid,
            ifb_ifindex: ifb,
            ..Default::default()
        };
        // With EDT nothing reads the HTB class from skb->priority: SHAPE_IN stays off (the
        // classifier then only enforces packet rates to the CT).
        if let Some(DirShape::Htb(p)) = plan_in {
            flags |= SHAPE_IN | if p.rest { REST_IN } else { 0 };
            entry.classes_in = p.own;
        }
        match plan_out {
            Some(DirShape::Htb(p)) => {
                flags |= SHAPE_OUT | if p.rest { REST_OUT } else { 0 };
                entry.classes_out = p.own;
            }
            Some(DirShape::Edt(_)) => flags |= SHAPE_OUT,
            None => {}
        }
        for (dir, pps, flag) in [
            (DIR_IN, config.pps_in, PPS_IN),
            (DIR_OUT, config.pps_out, PPS_OUT),
        ] {
            let key = u64::from(ifindex) | u64::from(dir) << 32;
            match pps {
                Some(rate) => {
                    flags |= flag;
                    let keep = self.pps.get(&key, 0).ok().filter(|b| b.rate == rate);
                    if keep.is_none() {
                        let path = self.dir.join("maps").join(map_names::PPS);
                        self.pps.insert(key, pps_bucket(rate), 0).map_err(map_err(
                            map_names::PPS,
                            &path,
                            "insert",
                        ))?;
                    }
                }
                None => {
                    let _ = self.pps.remove(&key);
                }
            }
        }
        entry.flags = flags;
        let path = self.dir.join("maps").join(map_names::IFACES);
        // The programs switch over with this one update: queues first, then the entry that
        // sends traffic into them; on the way down the entry first, then the queues.
        self.ifaces.insert(ifindex, entry, 0).map_err(map_err(
            map_names::IFACES,
            &path,
            "insert",
        ))?;

        if plan_in.is_none() {
            self.unshape_dev(ctid, ifindex, Some(ifname))?;
        }
        if old_ifb != 0 && old_ifb != ifb {
            self.unshape_dev(ctid, old_ifb, None)?;
            tc::del_link_index(&mut self.nl, old_ifb, &format!("IFB #{old_ifb}"))
                .map_err(net_err("removing the IFB", ctid))?;
        }
        info!(
            ctid,
            ifindex,
            ifname,
            backend = self.backend.backend.name(),
            ?config,
            "shaping applied"
        );
        Ok(())
    }

    /// Shapes one device (host-side interface or IFB) as `plan` says, switching from the
    /// other backend's setup if it has one.
    fn apply_dir(&mut self, ctid: u32, dev: u32, devname: &str, plan: &DirShape) -> Result<()> {
        match plan {
            DirShape::Htb(p) => {
                self.drop_edt(dev, Some(devname));
                self.apply_htb(ctid, dev, devname, p)
            }
            DirShape::Edt(st) => {
                let err = |what: &str| net_err(format!("{what} on {devname}"), ctid);
                tc::set_root_fq(&mut self.nl, dev, devname, HTB_MAJOR, &edt::fq_params(st))
                    .map_err(err("setting the root fq"))?;
                // Keep the departure clocks of a live rate change: only the rates move.
                let mut st = **st;
                if let Ok(old) = self.edt.get(&dev, 0) {
                    for (new, old) in st.slots.iter_mut().zip(old.slots.iter()) {
                        if new.ns_per_byte_q16 != 0 {
                            new.t_next = old.t_next;
                        }
                    }
                }
                let path = self.dir.join("maps").join(map_names::EDT);
                self.edt
                    .insert(dev, st, 0)
                    .map_err(map_err(map_names::EDT, &path, "insert"))?;
                self.attach_hook(Hook::Edt, dev, devname)
            }
        }
    }

    /// Removes the EDT entry and program of `dev` (a missing one is fine).
    fn drop_edt(&mut self, dev: u32, devname: Option<&str>) {
        let _ = self.edt.remove(&dev);
        let link = self.links_dir(dev).join(EDT_FILE);
        if let Err(e) = fs::remove_file(&link)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(dev, error = %e, "unpinning the EDT link");
        }
        if let Some(name) = devname {
            detach_netlink(name, TcAttachType::Egress, program_names::EDT);
        }
    }

    /// Takes the shaping off one device: EDT entry and program, and our root qdisc (HTB or
    /// fq with handle `1:`); the device falls back to its default qdisc.
    fn unshape_dev(&mut self, ctid: u32, dev: u32, devname: Option<&str>) -> Result<()> {
        let name = devname
            .map(str::to_owned)
            .or_else(|| sys::if_indextoname(dev))
            .unwrap_or_else(|| format!("#{dev}"));
        self.drop_edt(dev, Some(&name));
        if let Some(kind) = tc::root_kind(&mut self.nl, dev, HTB_MAJOR).unwrap_or(None)
            && (kind == "htb" || kind == "fq")
        {
            tc::del_root(&mut self.nl, dev, &name).map_err(net_err(
                format!("removing the {kind} qdisc of {name}"),
                ctid,
            ))?;
        }
        Ok(())
    }

    fn ensure_ifb(&mut self, ctid: u32, name: &str) -> Result<u32> {
        let index = match tc::create_ifb(&mut self.nl, name) {
            Ok(i) => i,
            // A leftover of ours (same naming scheme, e.g. after a crash): reuse it.
            Err(NetError::LinkExists { .. }) => {
                let i = sys::if_nametoindex(name).ok_or_else(|| ShaperError::Net {
                    what: format!("IFB {name}"),
                    ctid,
                    source: NetError::LinkNotFound {
                        ifname: name.to_owned(),
                        ns: tc::NS.to_owned(),
                    },
                })?;
                match tc::link_kind(&mut self.nl, i)
                    .map_err(net_err(format!("IFB {name}"), ctid))?
                {
                    Some((_, kind, _)) if kind == "ifb" => i,
                    _ => {
                        return Err(ShaperError::Net {
                            what: format!("IFB {name}"),
                            ctid,
                            source: NetError::LinkExists {
                                ifname: name.to_owned(),
                                ns: tc::NS.to_owned(),
                            },
                        });
                    }
                }
            }
            Err(e) => return Err(net_err(format!("creating IFB {name}"), ctid)(e)),
        };
        self.nl
            .link_set_up(index, name)
            .map_err(net_err(format!("bringing up IFB {name}"), ctid))?;
        Ok(index)
    }

    /// Makes the HTB of `dev` match `plan`: classes changed in place, missing ones created,
    /// ones that no longer fit (gone, or under another parent) deleted deepest first.
    fn apply_htb(&mut self, ctid: u32, dev: u32, devname: &str, plan: &DirPlan) -> Result<()> {
        let nl = &mut self.nl;
        let err = |what: &str| net_err(format!("{what} on {devname}"), ctid);
        let existing = if tc::root_htb(nl, dev, HTB_MAJOR).map_err(err("reading qdiscs"))? {
            tc::classes(nl, dev)
                .map_err(err("reading classes"))?
                .into_iter()
                .filter(|c| c.handle >> 16 == HTB_MAJOR)
                .collect()
        } else {
            tc::add_root_htb(nl, dev, devname, HTB_MAJOR, MINOR_BULK, DIRECT_QLEN)
                .map_err(err("adding the root HTB"))?;
            Vec::new()
        };
        let wanted: BTreeMap<u32, u32> =
            plan.classes.iter().map(|c| (c.classid, c.parent)).collect();
        let mut stale: Vec<u32> = existing
            .iter()
            // HTB reports a top-level class's parent as TC_H_ROOT, not as the qdisc handle.
            .filter(|c| {
                let parent = if c.parent == u32::MAX {
                    handle(HTB_MAJOR, 0)
                } else {
                    c.parent
                };
                wanted.get(&c.handle) != Some(&parent)
            })
            .map(|c| c.handle)
            .collect();
        stale.sort_by_key(|h| std::cmp::Reverse(depth(*h)));
        for h in stale {
            tc::del_class(nl, dev, devname, h).map_err(err("deleting a class"))?;
        }
        for c in &plan.classes {
            tc::set_htb_class(nl, dev, devname, c.classid, c.parent, &c.params)
                .map_err(err("setting a class"))?;
            match c.leaf {
                Some(Leaf::Bulk(limit)) => tc::set_fifo(
                    nl,
                    dev,
                    devname,
                    c.classid,
                    c.classid & 0xffff,
                    "bfifo",
                    limit,
                ),
                Some(Leaf::Interactive(limit)) => tc::set_fifo(
                    nl,
                    dev,
                    devname,
                    c.classid,
                    c.classid & 0xffff,
                    "pfifo",
                    limit,
                ),
                None => Ok(()),
            }
            .map_err(err("setting a leaf queue"))?;
        }
        Ok(())
    }

    fn entry(&self, ifindex: u32) -> Result<Option<ShapeIface>> {
        match self.ifaces.get(&ifindex, 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(
                map_names::IFACES,
                &self.dir.join("maps").join(map_names::IFACES),
                "lookup",
            )(e)),
        }
    }

    /// Removes all shaping of `ifindex`: programs detached, map entries, HTB, IFB. Leaves no
    /// qdisc, class, filter or IFB. A missing interface or entry is fine (the CT's interface
    /// may be gone already: its IFB is still removed).
    pub fn remove(&mut self, ctid: u32, ifindex: u32) -> Result<()> {
        let entry = self.entry(ifindex)?;
        if let Some(e) = entry
            && e.ctid != ctid
        {
            return Err(ShaperError::WrongCt {
                ifindex,
                ctid,
                owner: e.ctid,
            });
        }
        let _lock = DirLock::take(&self.dir)?;
        let ifname = sys::if_indextoname(ifindex);
        self.teardown(ctid, ifindex, ifname.as_deref(), entry)
    }

    fn teardown(
        &mut self,
        ctid: u32,
        ifindex: u32,
        ifname: Option<&str>,
        entry: Option<ShapeIface>,
    ) -> Result<()> {
        let mut first_err: Option<ShaperError> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                warn!(ctid, ifindex, error = %e, "shaper teardown");
                first_err.get_or_insert(e);
            }
        };
        let _ = self.ifaces.remove(&ifindex);
        for dir in [DIR_IN, DIR_OUT] {
            let _ = self
                .pps
                .remove(&(u64::from(ifindex) | u64::from(dir) << 32));
        }
        note(self.detach(ifindex, ifname));
        match ifname {
            Some(name) => note(self.unshape_dev(ctid, ifindex, Some(name))),
            None => {
                let _ = self.edt.remove(&ifindex);
            }
        }
        let mut ifbs = Vec::new();
        if let Some(e) = entry
            && e.ifb_ifindex != 0
        {
            ifbs.push(e.ifb_ifindex);
        }
        // Also by name: a failed first apply may have created it before the entry existed.
        if let Some(name) = ifname
            && let Some(i) = sys::if_nametoindex(&ifb_name(name, ifindex))
            && !ifbs.contains(&i)
        {
            ifbs.push(i);
        }
        for i in ifbs {
            // Its links and filters go with the device; the pins and the EDT entry do not.
            let _ = self.edt.remove(&i);
            note(remove_tree(&self.links_dir(i)));
            if let Ok(Some((name, kind, _))) = tc::link_kind(&mut self.nl, i)
                && kind == "ifb"
            {
                note(
                    tc::del_link_index(&mut self.nl, i, &name)
                        .map_err(net_err(format!("removing IFB {name}"), ctid)),
                );
            }
        }
        if first_err.is_none() {
            info!(ctid, ifindex, "shaping removed");
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Removes the shaping of every interface of `ctid` (e.g. on CT stop). Drop counters of the
    /// CT are kept.
    pub fn remove_ct(&mut self, ctid: u32) -> Result<()> {
        for ifindex in self.ifindexes_of(ctid)? {
            self.remove(ctid, ifindex)?;
        }
        Ok(())
    }

    /// Cleans up after interfaces that vanished (their links and HTB went with them; their
    /// IFBs and map entries did not). Returns the ifindexes cleaned.
    pub fn gc(&mut self) -> Result<Vec<u32>> {
        let mut gone = Vec::new();
        let entries: Vec<(u32, ShapeIface)> = self.ifaces.iter().flatten().collect();
        for (ifindex, e) in entries {
            if sys::if_indextoname(ifindex).is_none() {
                let _lock = DirLock::take(&self.dir)?;
                self.teardown(e.ctid, ifindex, None, Some(e))?;
                gone.push(ifindex);
            }
        }
        Ok(gone)
    }

    fn ifindexes_of(&self, ctid: u32) -> Result<Vec<u32>> {
        Ok(self
            .ifaces
            .iter()
            .flatten()
            .filter(|(_, e)| e.ctid == ctid)
            .map(|(i, _)| i)
            .collect())
    }

    /// Every shaped interface: (ifindex, CTID).
    pub fn shaped(&self) -> Vec<(u32, u32)> {
        self.ifaces
            .iter()
            .flatten()
            .map(|(i, e)| (i, e.ctid))
            .collect()
    }

    /// Configured rates (read back from the kernel), per-class counters, and drops per
    /// direction and reason of every shaped interface of `ctid`.
    pub fn status(&mut self, ctid: u32) -> Result<ShaperStatus> {
        let mut interfaces = Vec::new();
        for ifindex in self.ifindexes_of(ctid)? {
            let Some(entry) = self.entry(ifindex)? else {
                continue;
            };
            interfaces.push(self.iface_status(ctid, ifindex, entry)?);
        }
        Ok(ShaperStatus { ctid, interfaces })
    }

    fn iface_status(&mut self, ctid: u32, ifindex: u32, entry: ShapeIface) -> Result<IfaceStatus> {
        let ifname = sys::if_indextoname(ifindex);
        let ifb = (entry.ifb_ifindex != 0)
            .then(|| sys::if_indextoname(entry.ifb_ifindex))
            .flatten();
        let mut config = ShapingConfig::default();
        let mut classes = Vec::new();
        let mut drops = Vec::new();
        let (mut over_in, mut over_out) = (0, 0);
        let mut class_rates: BTreeMap<u8, ClassRate> = BTreeMap::new();
        let edt_in = self.edt.get(&ifindex, 0).is_ok();
        for (dir, dev, shaped) in [
            (
                Direction::In,
                ifindex,
                entry.flags & SHAPE_IN != 0 || edt_in,
            ),
            (
                Direction::Out,
                entry.ifb_ifindex,
                entry.flags & SHAPE_OUT != 0,
            ),
        ] {
            if !shaped || dev == 0 {
                continue;
            }
            if let Ok(st) = self.edt.get(&dev, 0) {
                // EDT: rates from the program's state, queue drops and overlimits from fq.
                let (total, crates) = edt::rates_of(&st);
                match dir {
                    Direction::In => config.rate_in = total,
                    Direction::Out => config.rate_out = total,
                }
                for (c, r) in crates {
                    let e = class_rates.entry(c).or_insert(ClassRate {
                        class: c,
                        rate_in: None,
                        rate_out: None,
                    });
                    match dir {
                        Direction::In => e.rate_in = Some(r),
                        Direction::Out => e.rate_out = Some(r),
                    }
                }
                let root = tc::qdiscs(&mut self.nl, dev)
                    .map_err(net_err(format!("reading qdiscs of #{dev}"), ctid))?
                    .into_iter()
                    .find(|q| q.parent == u32::MAX && q.kind == "fq");
                let (qd, qo) = root.map_or((0, 0), |q| (q.drops, q.overlimits));
                match dir {
                    Direction::In => over_in += qo,
                    Direction::Out => over_out += qo,
                }
                drops.push(DropStatus {
                    dir,
                    reason: "queue",
                    packets: qd,
                    bytes: None,
                });
                let (packets, bytes) = self.drop_counter(ctid, dir, DROP_HORIZON);
                drops.push(DropStatus {
                    dir,
                    reason: "horizon",
                    packets,
                    bytes: Some(bytes),
                });
                continue;
            }
            let objs = tc::classes(&mut self.nl, dev)
                .map_err(net_err(format!("reading classes of #{dev}"), ctid))?;
            let mut queue_drops = 0;
            for o in objs.into_iter().filter(|o| o.handle >> 16 == HTB_MAJOR) {
                let Some((rate, ceil, burst)) = o.htb else {
                    continue;
                };
                let minor = o.handle & 0xffff;
                let (role, group) = match minor {
                    MINOR_TOTAL => ("total", None),
                    m if m >= MINOR_INTERACTIVE => ("interactive", Some(m - MINOR_INTERACTIVE)),
                    m if m >= MINOR_BULK => ("bulk", Some(m - MINOR_BULK)),
                    m if m >= MINOR_GROUP => ("group", Some(m - MINOR_GROUP)),
                    _ => ("unknown", None),
                };
                let network_class = group.filter(|g| *g > 0).map(|g| (g - 1) as u8);
                let rate_cfg = Rate::from_bps(ceil * 8);
                match (role, network_class) {
                    ("total", _) => {
                        match dir {
                            Direction::In => config.rate_in = rate_cfg,
                            Direction::Out => config.rate_out = rate_cfg,
                        }
                        config.burst = Some(Size::from_bytes(burst));
                    }
                    ("group", Some(c)) => {
                        let e = class_rates.entry(c).or_insert(ClassRate {
                            class: c,
                            rate_in: None,
                            rate_out: None,
                        });
                        match dir {
                            Direction::In => e.rate_in = rate_cfg,
                            Direction::Out => e.rate_out = rate_cfg,
                        }
                        config.burst.get_or_insert(Size::from_bytes(burst));
                    }
                    _ => {}
                }
                if role == "bulk" || role == "interactive" {
                    queue_drops += o.drops;
                    match dir {
                        Direction::In => over_in += o.overlimits,
                        Direction::Out => over_out += o.overlimits,
                    }
                }
                classes.push(ClassStatus {
                    dir,
                    classid: format!("{:x}:{:x}", o.handle >> 16, minor),
                    role,
                    network_class,
                    rate_bps: rate * 8,
                    ceil_bps: ceil * 8,
                    burst_bytes: burst,
                    bytes: o.bytes,
                    packets: o.packets,
                    drops: o.drops,
                    overlimits: o.overlimits,
                    backlog_bytes: o.backlog,
                });
            }
            drops.push(DropStatus {
                dir,
                reason: "queue",
                packets: queue_drops,
                bytes: None,
            });
        }
        config.classes = class_rates.into_values().collect();
        for (dir, d, flag) in [
            (Direction::In, DIR_IN, PPS_IN),
            (Direction::Out, DIR_OUT, PPS_OUT),
        ] {
            if entry.flags & flag != 0
                && let Ok(b) = self.pps.get(&(u64::from(ifindex) | u64::from(d) << 32), 0)
            {
                match dir {
                    Direction::In => config.pps_in = Some(b.rate),
                    Direction::Out => config.pps_out = Some(b.rate),
                }
            }
            let (packets, bytes) = self.drop_counter(ctid, dir, DROP_PPS);
            drops.push(DropStatus {
                dir,
                reason: "pps",
                packets,
                bytes: Some(bytes),
            });
        }
        Ok(IfaceStatus {
            ifindex,
            ifname,
            ifb,
            config,
            classes,
            drops,
            overlimits_in: over_in,
            overlimits_out: over_out,
        })
    }

    /// (packets, bytes) the shaper's programs dropped for `reason`, all CPUs.
    fn drop_counter(&self, ctid: u32, dir: Direction, reason: u8) -> (u64, u64) {
        let d = match dir {
            Direction::In => DIR_IN,
            Direction::Out => DIR_OUT,
        };
        let key = u64::from(ctid) | u64::from(d) << 32 | u64::from(reason) << 40;
        match self.drops.get(&key, 0) {
            Ok(per_cpu) => per_cpu
                .iter()
                .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes)),
            Err(_) => (0, 0),
        }
    }

    /// Removes everything of the shaper pinned under `pin_dir` (every shaped interface's
    /// HTB, IFB, links; programs; maps). For tests and uninstall; the datapath's pins stay.
    pub fn unload_all(pin_dir: impl AsRef<Path>) -> Result<()> {
        let dir = pin_dir.as_ref().join("shaper");
        if !dir.exists() {
            return Ok(());
        }
        if let Ok(mut s) = Self::open(pin_dir.as_ref()) {
            for (ifindex, ctid) in s.shaped() {
                let _ = s.remove(ctid, ifindex);
            }
        }
        remove_tree(&dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        Rate::parse("t", s).unwrap()
    }

    #[test]
    fn plan_total_only() {
        let p = plan_dir(Some(rate("10mbit")), &[], None).unwrap();
        assert!(p.rest);
        assert_eq!(p.own, 0);
        let ids: Vec<u32> = p.classes.iter().map(|c| c.classid & 0xffff).collect();
        assert_eq!(ids, vec![0x1, 0x10, 0x200, 0x100]);
        let g = &p.classes[1];
        assert_eq!((g.params.rate, g.params.ceil), (1_250_000, 1_250_000));
        // Leaves split the group's guarantee, each may use the whole ceiling.
        assert_eq!(
            p.classes[2].params.rate + p.classes[3].params.rate,
            1_250_000
        );
        assert_eq!(p.classes[3].params.ceil, 1_250_000);
        assert_eq!(p.classes[2].params.prio, 0);
        assert_eq!(p.classes[3].params.prio, 1);
        assert_eq!(g.params.burst, MIN_BURST);
    }

    #[test]
    fn plan_guarantees_never_exceed_the_total() {
        let p = plan_dir(
            Some(rate("20mbit")),
            &[(1, rate("10mbit")), (2, rate("50mbit"))],
            Some(Size::from_bytes(32768)),
        )
        .unwrap();
        let groups: Vec<&PlannedClass> = p
            .classes
            .iter()
            .filter(|c| (MINOR_GROUP..MINOR_BULK).contains(&(c.classid & 0xffff)))
            .collect();
        assert_eq!(groups.len(), 3);
        let sum: u64 = groups.iter().map(|c| c.params.rate).sum();
        assert!(sum <= 2_500_000, "{sum}");
        // Class 2's ceiling is capped at the total.
        assert_eq!(groups[2].params.ceil, 2_500_000);
        assert_eq!(p.own, 0b110);
        assert!(p.classes.iter().all(|c| c.params.burst == 32768));
    }

    #[test]
    fn plan_classes_without_total_are_roots() {
        let p = plan_dir(None, &[(3, rate("1mbit"))], None).unwrap();
        assert!(!p.rest);
        assert_eq!(p.classes[0].classid, handle(HTB_MAJOR, MINOR_GROUP + 4));
        assert_eq!(p.classes[0].parent, handle(HTB_MAJOR, 0));
        assert!(plan_dir(None, &[], None).is_none());
    }

    #[test]
    fn pps_bucket_spacing() {
        let b = pps_bucket(1000);
        assert_eq!(b.interval_ns, 1_000_000);
        assert_eq!(b.tolerance_ns, 19 * 1_000_000);
        assert_eq!(pps_bucket(3).interval_ns, 333_333_333);
    }

    #[test]
    fn ifb_names_fit() {
        assert_eq!(ifb_name("veth101.0", 7), "ifb101.0");
        assert_eq!(ifb_name("veth4294967295.9", 7).len(), 15);
        assert_eq!(ifb_name("eth0", 4294967295), "ifb-4294967295");
    }

    #[test]
    fn backend_has_a_reason() {
        let b = backend_status().unwrap();
        assert!(!b.reason.is_empty());
        assert!(b.edt.starts_with("available") || b.edt.starts_with("unavailable"));
    }
}
