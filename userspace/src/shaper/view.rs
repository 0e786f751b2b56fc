//! A read-only view of the shaper, for berthd: what each CT's shaping is configured to (read
//! back from the kernel's HTB classes and packet-rate buckets) and its counters (HTB
//! overlimits and queue drops, packet-rate drops).
//!
//! Unlike [`super::Shaper::open`], opening it loads, attaches and creates nothing: it opens
//! the shaper's pinned maps read-only if they exist and lists tc classes over rtnetlink. Call it from
//! the network namespace holding the CTs' host-side interfaces.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, MapData, PerCpuHashMap};
use berth_common::{
    DIR_IN, DIR_OUT, DropValue,
    shaper::{
        DROP_PPS, HTB_MAJOR, MINOR_BULK, MINOR_GROUP, MINOR_INTERACTIVE, MINOR_TOTAL, PPS_IN,
        PPS_OUT, PpsBucket, SHAPE_IN, SHAPE_OUT, ShapeIface, map_names,
    },
};
use berth_runtime::net::Netlink;

use super::{Result, net_err, tc};
use crate::bpf::{self, Access, open_map};
use crate::datapath::Direction;

/// One direction of a shaped CT, as the kernel has it. Direction is the CT's point of view
/// (`In` = to the CT, shaped on the host-side interface; `Out` = from the CT, on its IFB).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirShaping {
    /// The CT's total rate in bytes per second (`--rate-in`/`--rate-out`): the ceiling of the
    /// `1:1` class; `None` without a total.
    pub rate: Option<u64>,
    /// Network classes with a rate of their own (`--class-rate`): (class, ceiling in bytes
    /// per second; a class rate above the total is capped at the total, as HTB enforces it).
    pub class_rates: Vec<(u8, u64)>,
    /// Packet-rate limit (`--pps-in`/`--pps-out`), packets per second.
    pub pps_limit: Option<u64>,
    /// Times a leaf class had to wait for tokens (HTB `overlimits`, leaves summed).
    pub overlimits: u64,
    /// Packets dropped because a leaf queue was full.
    pub queue_drops: u64,
    /// Packets dropped by the packet-rate limit.
    pub pps_drops: u64,
    /// Bytes of those packets.
    pub pps_drop_bytes: u64,
}

impl DirShaping {
    /// Whether this direction is shaped or limited at all.
    pub fn configured(&self) -> bool {
        self.rate.is_some() || !self.class_rates.is_empty() || self.pps_limit.is_some()
    }
}

/// A shaped CT: both directions. With several shaped interfaces (a bridged CT with more
/// than one) counters are summed and the settings (the same on each) taken from the
/// interface with the lowest ifindex.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtShaping {
    pub ctid: u32,
    /// To the CT.
    pub receive: DirShaping,
    /// From the CT.
    pub transmit: DirShaping,
}

impl CtShaping {
    pub fn dir(&self, d: Direction) -> &DirShaping {
        match d {
            Direction::In => &self.receive,
            Direction::Out => &self.transmit,
        }
    }

    fn dir_mut(&mut self, d: Direction) -> &mut DirShaping {
        match d {
            Direction::In => &mut self.receive,
            Direction::Out => &mut self.transmit,
        }
    }
}

/// A CT's shaped interfaces (host-side ifindex and the shaper's entry), by ifindex.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtIfaces(Vec<(u32, ShapeIface)>);

impl CtIfaces {
    /// (host-side ifindex, the shaper's entry), lowest ifindex first.
    pub fn entries(&self) -> &[(u32, ShapeIface)] {
        &self.0
    }
}

/// The shaper's pinned maps, opened without changing anything. Shared by the threads of a
/// scrape; each brings its own rtnetlink socket ([`netlink`]) for the class dumps.
pub struct ShaperView {
    ifaces: HashMap<MapData, u32, ShapeIface>,
    pps: HashMap<MapData, u64, PpsBucket>,
    drops: PerCpuHashMap<MapData, u64, DropValue>,
}

/// (packets, bytes) in the shaper's drop map for CT `ctid` in direction `dir`
/// (`DIR_IN`/`DIR_OUT`) for `reason` (`DROP_*`), all CPUs summed.
pub(super) fn drop_counter(
    drops: &PerCpuHashMap<MapData, u64, DropValue>,
    ctid: u32,
    dir: u8,
    reason: u8,
) -> (u64, u64) {
    // The same key layout as `ShaperDropKey` (ctid, dir, reason, pad), little endian.
    let key = u64::from(ctid) | u64::from(dir) << 32 | u64::from(reason) << 40;
    match drops.get(&key, 0) {
        Ok(per_cpu) => per_cpu
            .iter()
            .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes)),
        Err(_) => (0, 0),
    }
}

/// An rtnetlink socket in the calling thread's network namespace, for [`ShaperView::read_ct`].
pub fn netlink() -> Result<Netlink> {
    Netlink::open_current(tc::NS).map_err(net_err("opening netlink", 0))
}

impl ShaperView {
    /// The shaper pinned under `<pin_dir>/shaper`; `None` when nothing is pinned there (no
    /// CT was ever shaped with this pin directory).
    pub fn open_pinned(pin_dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let maps = pin_dir.as_ref().join("shaper").join("maps");
        let maps = maps.as_path();
        if !bpf::maps_pinned(maps, &[map_names::IFACES, map_names::PPS, map_names::DROPS]) {
            return Ok(None);
        }
        let ro = Access::ReadOnly;
        Ok(Some(Self {
            ifaces: open_map(maps, map_names::IFACES, 4, size_of::<ShapeIface>(), ro)?,
            pps: open_map(maps, map_names::PPS, 8, size_of::<PpsBucket>(), ro)?,
            drops: open_map(maps, map_names::DROPS, 8, size_of::<DropValue>(), ro)?,
        }))
    }

    /// Every shaped interface, by CTID.
    pub fn interfaces(&self) -> BTreeMap<u32, CtIfaces> {
        let mut cts: BTreeMap<u32, CtIfaces> = BTreeMap::new();
        // An entry removed while iterating ends the walk early or is skipped: either way
        // the interface is no longer shaped.
        for (ifindex, e) in self.ifaces.iter().flatten() {
            cts.entry(e.ctid).or_default().0.push((ifindex, e));
        }
        for c in cts.values_mut() {
            c.0.sort_unstable_by_key(|(ifindex, _)| *ifindex);
        }
        cts
    }

    /// One CT's shaping: its interfaces' HTB classes dumped through `nl`, its packet-rate
    /// buckets and drop counters.
    pub fn read_ct(&self, nl: &mut Netlink, ctid: u32, ifaces: &CtIfaces) -> Result<CtShaping> {
        let mut ct = CtShaping {
            ctid,
            ..CtShaping::default()
        };
        // The lowest ifindex gives the settings.
        for (i, (ifindex, e)) in ifaces.0.iter().enumerate() {
            let first = i == 0;
            for (dir, dev, flag) in [
                (Direction::In, *ifindex, SHAPE_IN),
                (Direction::Out, e.ifb_ifindex, SHAPE_OUT),
            ] {
                if e.flags & flag == 0 || dev == 0 {
                    continue;
                }
                let classes = tc::classes(nl, dev)
                    .map_err(net_err(format!("reading classes of #{dev}"), ctid))?;
                add_classes(ct.dir_mut(dir), &classes, first);
            }
            if first {
                for (dir, d, flag) in [
                    (Direction::In, DIR_IN, PPS_IN),
                    (Direction::Out, DIR_OUT, PPS_OUT),
                ] {
                    if e.flags & flag != 0
                        && let Ok(b) = self.pps.get(&(u64::from(*ifindex) | u64::from(d) << 32), 0)
                    {
                        ct.dir_mut(dir).pps_limit = Some(b.rate);
                    }
                }
            }
        }
        for (dir, d) in [(Direction::In, DIR_IN), (Direction::Out, DIR_OUT)] {
            // The same key layout as `ShaperDropKey` (ctid, dir, reason, pad), little
            // endian, as the shaper writes it.
            let key = u64::from(ctid) | u64::from(d) << 32 | u64::from(DROP_PPS) << 40;
            if let Ok(per_cpu) = self.drops.get(&key, 0) {
                let ds = ct.dir_mut(dir);
                for v in per_cpu.iter() {
                    ds.pps_drops += v.packets;
                    ds.pps_drop_bytes += v.bytes;
                }
            }
        }
        Ok(ct)
    }

    /// The packet-rate limit (packets per second) enforced on `ifindex` in direction `dir`
    /// (`DIR_IN`/`DIR_OUT`), when its entry has the direction's `PPS_*` flag.
    pub fn pps_limit(&self, ifindex: u32, entry: &ShapeIface, dir: u8) -> Option<u64> {
        let flag = if dir == DIR_IN { PPS_IN } else { PPS_OUT };
        if entry.flags & flag == 0 {
            return None;
        }
        self.pps
            .get(&(u64::from(ifindex) | u64::from(dir) << 32), 0)
            .ok()
            .map(|b| b.rate)
    }

    /// (packets, bytes) the shaper's programs dropped for CT `ctid` in direction `dir`
    /// (`DIR_IN`/`DIR_OUT`) for `reason` (`DROP_*`), all CPUs summed.
    pub fn drop_counter(&self, ctid: u32, dir: u8, reason: u8) -> (u64, u64) {
        drop_counter(&self.drops, ctid, dir, reason)
    }

    /// Every shaped CT, sorted by CTID (one thread, one socket).
    pub fn read(&self) -> Result<Vec<CtShaping>> {
        let mut nl = netlink()?;
        self.interfaces()
            .iter()
            .map(|(ctid, ifaces)| self.read_ct(&mut nl, *ctid, ifaces))
            .collect()
    }
}

/// Adds one interface's HTB classes of one direction: settings only from the CT's first
/// interface (`settings`), counters from every one.
fn add_classes(ds: &mut DirShaping, classes: &[tc::TcObject], settings: bool) {
    for o in classes.iter().filter(|o| o.handle >> 16 == HTB_MAJOR) {
        let Some((_rate, ceil, _burst)) = o.htb else {
            continue;
        };
        match o.handle & 0xffff {
            MINOR_TOTAL if settings => ds.rate = Some(ceil),
            MINOR_TOTAL => {}
            m if m >= MINOR_BULK => {
                // Leaves (bulk and interactive) hold the queues.
                ds.overlimits += o.overlimits;
                ds.queue_drops += o.drops;
            }
            // Group 0 is the rest of the traffic (no rate of its own); group 1 + c is network
            // class c.
            m if m > MINOR_GROUP && m < MINOR_BULK => {
                if settings && let Ok(c) = u8::try_from(m - MINOR_GROUP - 1) {
                    ds.class_rates.push((c, ceil));
                }
            }
            _ => {}
        }
    }
    ds.class_rates.sort_unstable();
    // MINOR_INTERACTIVE > MINOR_BULK: both count as leaves above.
    const _: () = assert!(MINOR_INTERACTIVE > MINOR_BULK);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn htb(minor: u32, ceil: u64, overlimits: u64, drops: u64) -> tc::TcObject {
        tc::TcObject {
            handle: tc::handle(HTB_MAJOR, minor),
            kind: "htb".into(),
            htb: Some((ceil / 2, ceil, 16384)),
            overlimits,
            drops,
            ..Default::default()
        }
    }

    #[test]
    fn classes_map_to_settings_and_counters() {
        let classes = [
            htb(MINOR_TOTAL, 1_250_000, 5, 0),
            htb(MINOR_GROUP, 1_250_000, 0, 0),
            htb(MINOR_GROUP + 3, 125_000, 0, 0),
            htb(MINOR_BULK, 1_250_000, 7, 2),
            htb(MINOR_INTERACTIVE, 1_250_000, 1, 1),
            htb(MINOR_BULK + 3, 125_000, 10, 4),
            // Another qdisc's class: ignored.
            tc::TcObject {
                handle: tc::handle(HTB_MAJOR + 1, 1),
                htb: Some((1, 1, 1)),
                overlimits: 100,
                ..Default::default()
            },
        ];
        let mut ds = DirShaping::default();
        add_classes(&mut ds, &classes, true);
        assert_eq!(ds.rate, Some(1_250_000));
        assert_eq!(ds.class_rates, vec![(2, 125_000)]);
        assert_eq!((ds.overlimits, ds.queue_drops), (18, 7));
        assert!(ds.configured());
        // A second interface adds counters only.
        add_classes(&mut ds, &classes, false);
        assert_eq!(ds.class_rates, vec![(2, 125_000)]);
        assert_eq!((ds.overlimits, ds.queue_drops), (36, 14));
        assert!(!DirShaping::default().configured());
    }

    #[test]
    fn nothing_pinned_is_none_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("v1");
        assert!(ShaperView::open_pinned(&pin).unwrap().is_none());
        assert!(!pin.exists());
    }
}
