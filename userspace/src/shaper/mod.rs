//! Per-CT traffic shaping: eBPF classifies, HTB queues enforce.
//!
//! # Design
//!
//! On this project's kernels a pure eBPF drop-policer wrecks TCP over veth (64 KB GSO
//! packets need a bucket of rate × 200 ms to reach the rate), while HTB reaches ~100 % of the
//! rate with no retransmits, and sch_fq (hence EDT) may be missing. So:
//!
//! * **to the CT** (`rate_in`): an HTB on the host-side interface's egress. berth's shaping
//!   program on the egress hook (after the accounting program) writes the HTB class into
//!   `skb->priority`; HTB takes a priority equal to one of its leaf class ids without any
//!   filter.
//! * **from the CT** (`rate_out`): the ingress program writes the class and redirects the
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
//! The datapath's: clsact + cls_bpf direct-action filters by default, at the last priority
//! (after the datapath's auto-assigned, lower priorities); TCX links pinned under `links/`,
//! last on the hook, with `BERTH_ATTACH=tcx`. See [`crate::bpf::attach`]. Filters are found
//! again by the program's kernel name (15 bytes at most).
//!
//! # Pins
//!
//! ```text
//! <pin_dir>/maps/...                    the datapath's maps (class table, shared)
//! <pin_dir>/shaper/maps/SHAPER_*        interfaces, pps buckets, drop counters, EDT state
//! <pin_dir>/shaper/progs/<hash>/{to_ct,from_ct,edt}
//! <pin_dir>/shaper/links/<ifindex>/{to_ct,from_ct,edt}   TCX links, last on the hook
//! ```

mod apply;
mod backend;
mod edt;
mod plan;
pub mod report;
mod status;
pub mod tc;
mod undelivered;
pub mod view;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData, PerCpuHashMap},
    programs::{SchedClassifier, TcAttachType},
};
pub use backend::{Backend, BackendStatus, FqSupport, fq_support};
use berth_common::{
    DIR_IN, DIR_OUT, DropValue,
    shaper::{
        DROP_HORIZON, DROP_PPS, EdtState, HTB_MAJOR, MINOR_BULK, MINOR_GROUP, MINOR_INTERACTIVE,
        MINOR_TOTAL, PPS_IN, PPS_OUT, PpsBucket, REST_IN, REST_OUT, SHAPE_IN, SHAPE_OUT,
        ShapeIface, map_names, program_names,
    },
};
use berth_runtime::Ctid;
use berth_runtime::net::{NetError, Netlink};
// The CT's shaping settings are part of its typed config, in the runtime.
pub use berth_runtime::Size;
pub use berth_runtime::shaping::{
    ClassRate, DEFAULT_MTU, MAX_PPS, MAX_RATE_BPS, Rate, ShapingChange, ShapingConfig,
    ShapingError, parse_optional_burst, parse_optional_rate,
};
use serde::{Deserialize, Serialize};
use tc::{HtbClass, handle};
use tracing::{info, warn};

use crate::bpf::{
    self, Access, BpfError, PinLock,
    attach::{self as hooks, AttachMethod, Attachment, Hook as TcHook, LinkState, Place},
    map_err, open_map,
    programs::{self, MapPins, ProgramSpec},
    sys,
};
use crate::datapath::{DEFAULT_PIN_DIR, Direction};
use berth_runtime::error_chain::ErrorChain;
pub use plan::ifb_name;
use plan::*;
pub use status::{ClassStatus, DropStatus, IfaceStatus, ShaperStatus, read_status};

const TO_CT: ProgramSpec = ProgramSpec::required(program_names::TO_CT, "to_ct");
const FROM_CT: ProgramSpec = ProgramSpec::required(program_names::FROM_CT, "from_ct");
/// The EDT program reads `__sk_buff::tstamp_type` (5.18): a kernel that rejects it still
/// shapes with HTB (no pin = rejected; later opens do not retry).
const EDT: ProgramSpec = ProgramSpec::optional(program_names::EDT, "edt");
/// Errors of the shaper, each naming the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum ShaperError {
    #[error(transparent)]
    Config(#[from] ShapingError),
    #[error("interface #{ifindex} does not exist in this network namespace")]
    NoSuchIfindex { ifindex: u32 },
    #[error("interface #{ifindex} belongs to CT {owner}, not CT {ctid}")]
    WrongCt { ifindex: u32, ctid: u32, owner: u32 },
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("shaper backend: {0}")]
    Backend(String),
    #[error("shaping {what} of CT {ctid}")]
    Net {
        what: String,
        ctid: u32,
        #[source]
        source: NetError,
    },
}

pub type Result<T, E = ShaperError> = std::result::Result<T, E>;

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

// ---- the shaper --------------------------------------------------------------------------

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

    fn spec(self) -> ProgramSpec {
        match self {
            Self::ToCt => TO_CT,
            Self::FromCt => FROM_CT,
            Self::Edt => EDT,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Self::FromCt => TcAttachType::Ingress,
            Self::ToCt | Self::Edt => TcAttachType::Egress,
        }
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
        bpf::object()?;
        let dir = pin_dir.join("shaper");
        let maps_dir = dir.join("maps");
        let dp_maps = pin_dir.join("maps");
        let progs_root = dir.join("progs");
        bpf::create_dirs(&[&dp_maps, &maps_dir, &progs_root, &dir.join("links")])?;
        let _lock = PinLock::take(&dir)?;
        let pins = [
            MapPins {
                dir: &dp_maps,
                names: &berth_common::map_names::ALL,
            },
            MapPins {
                dir: &maps_dir,
                names: &map_names::ALL,
            },
        ];
        let mut progs = programs::load_or_open(&progs_root, &pins, &[TO_CT, FROM_CT, EDT])?;
        undelivered::ensure(&dir, &pins, progs.fresh)?;
        let to_ct = progs.take_required(&TO_CT)?;
        let from_ct = progs.take_required(&FROM_CT)?;
        let edt_prog = progs.take(EDT.file);
        let edt_verdict = match &edt_prog {
            Some(_) => Ok(()),
            None => {
                Err("the kernel's verifier rejected it (see the log of the first load)".to_owned())
            }
        };
        let backend = backend::decide(fq_support(), Some(edt_verdict), requested)
            .map_err(ShaperError::Backend)?;
        let nl = Netlink::open_current(tc::NS).map_err(net_err("opening netlink", 0))?;
        let mut s = Self {
            ifaces: open_map(
                &maps_dir,
                map_names::IFACES,
                4,
                size_of::<ShapeIface>(),
                Access::ReadWrite,
            )?,
            pps: open_map(
                &maps_dir,
                map_names::PPS,
                8,
                size_of::<PpsBucket>(),
                Access::ReadWrite,
            )?,
            drops: open_map(
                &maps_dir,
                map_names::DROPS,
                8,
                size_of::<DropValue>(),
                Access::ReadWrite,
            )?,
            edt: open_map(
                &maps_dir,
                map_names::EDT,
                4,
                size_of::<EdtState>(),
                Access::ReadWrite,
            )?,
            dir,
            method,
            backend,
            to_ct,
            from_ct,
            edt_prog,
            nl,
        };
        if progs.fresh {
            s.upgrade_links()?;
            programs::sweep_old_builds(&progs_root)?;
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
        for (ifindex, dir) in hooks::link_dirs(&self.dir.join("links"))? {
            if let Some(name) = sys::if_indextoname(ifindex) {
                for hook in Hook::ALL {
                    if dir.join(hook.spec().file).exists() {
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
        let spec = hook.spec();
        let (method, dir) = (self.method, self.links_dir(ifindex));
        let prog = match hook {
            Hook::ToCt => &mut self.to_ct,
            Hook::FromCt => &mut self.from_ct,
            Hook::Edt => self
                .edt_prog
                .as_mut()
                .ok_or(aya::programs::ProgramError::NotLoaded)
                .map_err(bpf::prog_err(spec.name, "attaching"))?,
        };
        let mut a = Attachment {
            prog,
            program: spec.name,
            attach_type: hook.attach_type(),
        };
        let tc_hook = TcHook {
            ifindex,
            ifname,
            attach_type: hook.attach_type(),
        };
        // Last on the hook: the accounting/anti-spoofing programs (attached first) must see
        // every packet before the redirect into the IFB ends the hook, and the EDT stamp
        // comes after the classifier's pps verdict.
        if method == AttachMethod::Netlink {
            return Ok(hooks::attach_cls_bpf(&mut a, &tc_hook, Place::Last)?);
        }
        bpf::create_dirs(&[&dir])?;
        let path = dir.join(spec.file);
        if hooks::refresh_tcx_link(&mut a, &tc_hook, &path)? == LinkState::Missing {
            hooks::create_tcx_link(&mut a, &tc_hook, Place::Last, &path)?;
        }
        Ok(())
    }

    /// Detaches every shaper program from `ifindex` (TCX links by unpinning, cls_bpf filters
    /// by their kernel names).
    fn detach(&mut self, ifindex: u32, ifname: Option<&str>) -> Result<()> {
        bpf::remove_tree(&self.links_dir(ifindex))?;
        if let Some(ifname) = ifname {
            for hook in Hook::ALL {
                hooks::detach_cls_bpf(ifname, hook.attach_type(), hook.spec().name);
            }
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
            )(e)
            .into()),
        }
    }

    /// Removes all shaping of `ifindex`: programs detached, map entries, HTB, IFB. Leaves no
    /// qdisc, class, filter or IFB. A missing interface or entry is fine (the CT's interface
    /// may be gone already: its IFB is still removed).
    pub fn remove(&mut self, ctid: Ctid, ifindex: u32) -> Result<()> {
        self.remove_iface(ctid.get(), ifindex)
    }

    fn remove_iface(&mut self, ctid: u32, ifindex: u32) -> Result<()> {
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
        let _lock = PinLock::take(&self.dir)?;
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
                warn!(ctid, ifindex, error = %ErrorChain(&e), "shaper teardown");
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
            note(bpf::remove_tree(&self.links_dir(i)).map_err(ShaperError::from));
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
    pub fn remove_ct(&mut self, ctid: Ctid) -> Result<()> {
        for ifindex in self.ifindexes_of(ctid.get())? {
            self.remove_iface(ctid.get(), ifindex)?;
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
                let _lock = PinLock::take(&self.dir)?;
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

    /// Removes everything of the shaper pinned under `pin_dir` (every shaped interface's
    /// HTB, IFB, links; programs; maps). For tests and uninstall; the datapath's pins stay.
    pub fn unload_all(pin_dir: impl AsRef<Path>) -> Result<()> {
        let dir = pin_dir.as_ref().join("shaper");
        if !dir.exists() {
            return Ok(());
        }
        if let Ok(mut s) = Self::open(pin_dir.as_ref()) {
            for (ifindex, ctid) in s.shaped() {
                let _ = s.remove_iface(ctid, ifindex);
            }
        }
        Ok(bpf::remove_tree(&dir)?)
    }
}

/// One of a CT's packet-rate (`pps`) or horizon drop counters, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapingDrop {
    pub dir: Direction,
    /// `pps`, `horizon`, or `unknown` (a reason this berth does not know).
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The shaper's `DROPS` key of (CTID, direction, reason): `ShaperDropKey`, little endian.
fn drop_key_parts(key: u64) -> (u32, u8, u8) {
    (key as u32, (key >> 32) as u8, (key >> 40) as u8)
}

impl Shaper {
    /// CT `ctid`'s packet-rate and horizon drop counters.
    pub fn drops_of(&self, ctid: Ctid) -> Result<Vec<ShapingDrop>> {
        let path = self.dir.join("maps").join(map_names::DROPS);
        let mut out = Vec::new();
        for item in self.drops.iter() {
            let (key, per_cpu) = item.map_err(map_err(map_names::DROPS, &path, "iterate"))?;
            let (c, dir, reason) = drop_key_parts(key);
            if c != ctid.get() {
                continue;
            }
            out.push(ShapingDrop {
                dir: if dir == DIR_OUT {
                    Direction::Out
                } else {
                    Direction::In
                },
                reason: match reason {
                    DROP_PPS => "pps",
                    DROP_HORIZON => "horizon",
                    _ => "unknown",
                }
                .to_owned(),
                packets: per_cpu.iter().map(|v| v.packets).sum(),
                bytes: per_cpu.iter().map(|v| v.bytes).sum(),
            });
        }
        out.sort_by(|a, b| (a.dir, &a.reason).cmp(&(b.dir, &b.reason)));
        Ok(out)
    }

    /// Removes CT `ctid`'s drop counters (its CTID may go to a new CT). Only for a CT whose
    /// interfaces are no longer shaped.
    pub fn clear_drops(&mut self, ctid: Ctid) -> Result<()> {
        let path = self.dir.join("maps").join(map_names::DROPS);
        let _lock = PinLock::take(&self.dir)?;
        let keys: Vec<u64> = self
            .drops
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| drop_key_parts(*k).0 == ctid.get())
            .collect();
        for k in keys {
            match self.drops.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::DROPS, &path, "remove")(e).into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_has_a_reason() {
        let b = backend_status().unwrap();
        assert!(!b.reason.is_empty());
        assert!(b.edt.starts_with("available") || b.edt.starts_with("unavailable"));
    }
}
