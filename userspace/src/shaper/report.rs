//! A CT's shaping as `berth status` and `berth netstat` show it: the settings the kernel is
//! enforcing (read back, so a live change without `--save` shows too), the backend, and the
//! counters of each direction.
//!
//! Read-only and cheap like [`super::view`] (which it builds on): it opens the shaper's
//! pinned maps and dumps the qdiscs and classes of the CT's devices over rtnetlink; it loads,
//! attaches and creates nothing, and needs no berthd. Call it from the network namespace
//! holding the CTs' host-side interfaces.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use aya::maps::{HashMap, MapData};
use berth_common::{
    DIR_IN, DIR_OUT,
    shaper::{
        DROP_HORIZON, DROP_PPS, EdtState, HTB_MAJOR, MINOR_BULK, MINOR_GROUP, MINOR_TOTAL,
        SHAPE_IN, SHAPE_OUT, map_names,
    },
};
use berth_runtime::Ctid;
use berth_runtime::net::Netlink;
use serde::Serialize;

use super::{
    Backend, Rate, Result, Size, edt, net_err, tc,
    view::{self, CtIfaces, ShaperView},
};
use crate::bpf::{Access, open_map, sys};

/// A network class's own rate in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClassReport {
    pub class: u8,
    /// Bits per second, as the kernel enforces it (a class rate above the total is capped at
    /// the total).
    pub rate_bps: u64,
    /// The same in tc units (`5mbit`).
    pub rate: String,
}

/// One direction of a shaped CT (the CT's point of view: `in` = to the CT).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirReport {
    /// The CT's total rate, bits per second; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u64>,
    /// The same in tc units (`10mbit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// HTB burst of the direction's classes, bytes (HTB only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst_bytes: Option<u64>,
    /// Network classes with a rate of their own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassReport>,
    /// Packet-rate limit, packets per second; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pps_limit: Option<u64>,
    /// Bytes and packets that left the direction's queue (the root qdisc of the host-side
    /// interface for `in`, of the CT's IFB for `out`); 0 when nothing is queued.
    pub sent_bytes: u64,
    pub sent_packets: u64,
    /// Times traffic had to wait for its rate (HTB leaves' overlimits, or sch_fq's).
    pub overlimits: u64,
    /// Packets dropped because the queue was full.
    pub queue_drops: u64,
    /// Packets (and their bytes) dropped by the packet-rate limit (reason `pps`).
    pub pps_drops: u64,
    pub pps_drop_bytes: u64,
    /// EDT only: packets dropped because they would have waited beyond the horizon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub horizon_drops: Option<u64>,
    /// Bytes waiting in the queue now.
    pub backlog_bytes: u64,
}

impl DirReport {
    /// Whether this direction is rate-shaped or packet-rate limited at all.
    pub fn configured(&self) -> bool {
        self.rate_bps.is_some() || !self.classes.is_empty() || self.pps_limit.is_some()
    }

    /// Every packet shaping dropped in this direction, all reasons.
    pub fn drops(&self) -> u64 {
        self.queue_drops + self.pps_drops + self.horizon_drops.unwrap_or(0)
    }
}

/// A shaped host-side interface of the CT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShapedIface {
    pub ifindex: u32,
    pub ifname: Option<String>,
    /// The IFB that queues the CT's outgoing traffic (when that is shaped).
    pub ifb: Option<String>,
}

/// A CT's shaping, both directions. With several shaped interfaces (a bridged CT with more
/// than one) the counters are summed and the settings (the same on each) taken from the
/// interface with the lowest ifindex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShapingReport {
    /// `htb` or `edt`; absent when only packet-rate limits are set (nothing is queued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    pub interfaces: Vec<ShapedIface>,
    #[serde(rename = "in")]
    pub to_ct: DirReport,
    #[serde(rename = "out")]
    pub from_ct: DirReport,
}

impl ShapingReport {
    /// Every packet shaping dropped, both directions, all reasons.
    pub fn drops(&self) -> u64 {
        self.to_ct.drops() + self.from_ct.drops()
    }

    /// The compact block `berth status` prints (no trailing newline).
    pub fn human(&self) -> String {
        let backend = self.backend.map_or("pps only", Backend::name);
        let devs: Vec<String> = self
            .interfaces
            .iter()
            .map(|i| {
                let name = i
                    .ifname
                    .clone()
                    .unwrap_or_else(|| format!("#{}", i.ifindex));
                match &i.ifb {
                    Some(ifb) => format!("{name} (out via {ifb})"),
                    None => name,
                }
            })
            .collect();
        let mut s = format!("shaping: {backend} on {}", devs.join(", "));
        for (name, d) in [("in", &self.to_ct), ("out", &self.from_ct)] {
            let _ = write!(s, "\n  {name:>3}: {}", dir_line(d));
        }
        s
    }
}

fn dir_line(d: &DirReport) -> String {
    let mut s = format!("rate {}", d.rate.as_deref().unwrap_or("-"));
    if let Some(b) = d.burst_bytes {
        let _ = write!(s, " burst {}", Size::from_bytes(b).tc());
    }
    for c in &d.classes {
        let _ = write!(s, " class{} {}", c.class, c.rate);
    }
    if let Some(p) = d.pps_limit {
        let _ = write!(s, " pps {p}");
    }
    let _ = write!(
        s,
        ", sent {} B {} pkts, overlimits {}, drops queue {} pps {}",
        d.sent_bytes, d.sent_packets, d.overlimits, d.queue_drops, d.pps_drops
    );
    if let Some(h) = d.horizon_drops {
        let _ = write!(s, " horizon {h}");
    }
    s
}

/// The shaper's pinned state, opened read-only, with an rtnetlink socket for the dumps.
pub struct ShapingReader {
    view: ShaperView,
    /// The EDT backend's per-device state; absent where the EDT map was never pinned.
    edt: Option<HashMap<MapData, u32, EdtState>>,
    ifaces: BTreeMap<u32, CtIfaces>,
    nl: Netlink,
}

impl ShapingReader {
    /// The shaper pinned under `<pin_dir>/shaper`; `None` when nothing is pinned there (no CT
    /// was ever shaped with this pin directory).
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let Some(view) = ShaperView::open_pinned(pin_dir.as_ref())? else {
            return Ok(None);
        };
        let p = pin_dir
            .as_ref()
            .join("shaper")
            .join("maps")
            .join(map_names::EDT);
        let edt = if p.exists() {
            let maps = p.parent().unwrap_or(&p);
            Some(open_map(
                maps,
                map_names::EDT,
                4,
                size_of::<EdtState>(),
                Access::ReadOnly,
            )?)
        } else {
            None
        };
        let ifaces = view.interfaces();
        Ok(Some(Self {
            view,
            edt,
            ifaces,
            nl: view::netlink()?,
        }))
    }

    /// The CTs with a shaped interface, ascending.
    pub fn shaped_cts(&self) -> Vec<Ctid> {
        // Keys come from the kernel's entries; one without a valid CTID is no CT's.
        self.ifaces
            .keys()
            .filter_map(|&c| Ctid::new(c).ok())
            .collect()
    }

    /// CT `ctid`'s shaping; `None` when none of its interfaces is shaped or limited.
    pub fn read(&mut self, ctid: Ctid) -> Result<Option<ShapingReport>> {
        let ctid = ctid.get();
        let Some(ifaces) = self.ifaces.get(&ctid) else {
            return Ok(None);
        };
        let mut r = ShapingReport {
            backend: None,
            interfaces: Vec::new(),
            to_ct: DirReport::default(),
            from_ct: DirReport::default(),
        };
        let (mut htb, mut edt_used) = (false, false);
        for (i, (ifindex, e)) in ifaces.entries().iter().enumerate() {
            let first = i == 0;
            r.interfaces.push(ShapedIface {
                ifindex: *ifindex,
                ifname: sys::if_indextoname(*ifindex),
                ifb: (e.ifb_ifindex != 0)
                    .then(|| sys::if_indextoname(e.ifb_ifindex))
                    .flatten(),
            });
            for (dev, to_ct) in [(*ifindex, true), (e.ifb_ifindex, false)] {
                let edt_state = self.edt.as_ref().and_then(|m| m.get(&dev, 0).ok());
                // EDT shapes traffic to the CT without SHAPE_IN (no classification into HTB
                // classes is needed); its IFB carries SHAPE_OUT like HTB's.
                let flag = if to_ct { SHAPE_IN } else { SHAPE_OUT };
                if dev == 0 || (e.flags & flag == 0 && edt_state.is_none()) {
                    continue;
                }
                let what = |w: &str| net_err(format!("reading {w} of #{dev}"), ctid);
                let qdiscs = tc::qdiscs(&mut self.nl, dev).map_err(what("qdiscs"))?;
                let d = if to_ct { &mut r.to_ct } else { &mut r.from_ct };
                match edt_state {
                    Some(st) => {
                        edt_used = true;
                        add_edt(d, &st, &qdiscs, first);
                    }
                    None => {
                        htb = true;
                        let classes = tc::classes(&mut self.nl, dev).map_err(what("classes"))?;
                        add_htb(d, &classes, &qdiscs, first);
                    }
                }
            }
            if first {
                r.to_ct.pps_limit = self.view.pps_limit(*ifindex, e, DIR_IN);
                r.from_ct.pps_limit = self.view.pps_limit(*ifindex, e, DIR_OUT);
            }
        }
        for (d, dir) in [(&mut r.to_ct, DIR_IN), (&mut r.from_ct, DIR_OUT)] {
            (d.pps_drops, d.pps_drop_bytes) = self.view.drop_counter(ctid, dir, DROP_PPS);
            if edt_used {
                d.horizon_drops = Some(self.view.drop_counter(ctid, dir, DROP_HORIZON).0);
            }
        }
        r.backend = if edt_used {
            Some(Backend::Edt)
        } else if htb {
            Some(Backend::Htb)
        } else {
            None
        };
        if !r.to_ct.configured() && !r.from_ct.configured() {
            // An entry without anything in force (being removed right now).
            return Ok(None);
        }
        Ok(Some(r))
    }
}

/// Whether `q` is the shaper's root qdisc (`1:` at the root).
fn is_root(q: &tc::TcObject) -> bool {
    q.parent == u32::MAX && q.handle == tc::handle(HTB_MAJOR, 0)
}

fn add_sent(d: &mut DirReport, qdiscs: &[tc::TcObject]) {
    if let Some(q) = qdiscs.iter().find(|q| is_root(q)) {
        d.sent_bytes += q.bytes;
        d.sent_packets += q.packets;
    }
}

/// Adds one device's HTB: settings only from the CT's first interface (`settings`),
/// counters from every one.
fn add_htb(d: &mut DirReport, classes: &[tc::TcObject], qdiscs: &[tc::TcObject], settings: bool) {
    add_sent(d, qdiscs);
    for o in classes.iter().filter(|o| o.handle >> 16 == HTB_MAJOR) {
        let Some((_rate, ceil, burst)) = o.htb else {
            continue;
        };
        // HTB keeps bytes per second: the configured bits/s rounded up to whole bytes.
        let bps = ceil.saturating_mul(8);
        match o.handle & 0xffff {
            MINOR_TOTAL if settings => {
                d.rate_bps = Some(bps);
                d.rate = Some(rate_text(bps));
                d.burst_bytes = Some(burst);
            }
            MINOR_TOTAL => {}
            // Leaves (bulk, and interactive above it) hold the queues.
            m if m >= MINOR_BULK => {
                d.overlimits += o.overlimits;
                d.queue_drops += o.drops;
                d.backlog_bytes += o.backlog;
            }
            // Group 0 is the rest of the traffic (no rate of its own); group 1 + c is network
            // class c.
            m if m > MINOR_GROUP => {
                if settings && let Ok(class) = u8::try_from(m - MINOR_GROUP - 1) {
                    d.classes.push(ClassReport {
                        class,
                        rate_bps: bps,
                        rate: rate_text(bps),
                    });
                    d.burst_bytes.get_or_insert(burst);
                }
            }
            _ => {}
        }
    }
    d.classes.sort_unstable_by_key(|c| c.class);
}

/// Adds one device's EDT state and its sch_fq's counters.
fn add_edt(d: &mut DirReport, st: &EdtState, qdiscs: &[tc::TcObject], settings: bool) {
    add_sent(d, qdiscs);
    if let Some(q) = qdiscs.iter().find(|q| is_root(q)) {
        d.overlimits += q.overlimits;
        d.queue_drops += q.drops;
        d.backlog_bytes += q.backlog;
    }
    if settings {
        let (total, classes) = edt::rates_of(st);
        d.rate_bps = total.map(Rate::bits_per_sec);
        d.rate = total.map(|r| r.to_string());
        d.classes = classes
            .into_iter()
            .map(|(class, r)| ClassReport {
                class,
                rate_bps: r.bits_per_sec(),
                rate: r.to_string(),
            })
            .collect();
    }
}

/// `bps` in tc units; "-" for 0 (never a configured rate).
pub fn rate_text(bps: u64) -> String {
    Rate::from_bps(bps).map_or_else(|| "-".to_owned(), |r| r.to_string())
}

#[cfg(test)]
mod tests {
    use berth_common::shaper::{EDT_TOTAL, EdtSlot, MINOR_INTERACTIVE};

    use super::*;

    fn htb(minor: u32, ceil: u64, burst: u64, overlimits: u64, drops: u64) -> tc::TcObject {
        tc::TcObject {
            handle: tc::handle(HTB_MAJOR, minor),
            kind: "htb".into(),
            htb: Some((ceil / 2, ceil, burst)),
            overlimits,
            drops,
            backlog: 100,
            ..Default::default()
        }
    }

    fn root(kind: &str, bytes: u64, packets: u64, overlimits: u64, drops: u64) -> tc::TcObject {
        tc::TcObject {
            handle: tc::handle(HTB_MAJOR, 0),
            parent: u32::MAX,
            kind: kind.into(),
            bytes,
            packets,
            overlimits,
            drops,
            ..Default::default()
        }
    }

    #[test]
    fn htb_settings_and_counters() {
        let classes = [
            htb(MINOR_TOTAL, 1_250_000, 16384, 5, 0),
            htb(MINOR_GROUP, 1_250_000, 16384, 0, 0),
            htb(MINOR_GROUP + 3, 625_000, 16384, 0, 0),
            htb(MINOR_BULK, 1_250_000, 16384, 7, 2),
            htb(MINOR_INTERACTIVE, 1_250_000, 16384, 1, 1),
            htb(MINOR_BULK + 3, 625_000, 16384, 10, 4),
        ];
        let qdiscs = [
            root("htb", 9000, 9, 0, 0),
            // A leaf's fifo: not the root, not counted as sent.
            tc::TcObject {
                handle: tc::handle(0x8001, 0),
                parent: tc::handle(HTB_MAJOR, MINOR_BULK),
                kind: "bfifo".into(),
                bytes: 1_000_000,
                ..Default::default()
            },
        ];
        let mut d = DirReport::default();
        add_htb(&mut d, &classes, &qdiscs, true);
        assert_eq!(d.rate_bps, Some(10_000_000));
        assert_eq!(d.rate.as_deref(), Some("10mbit"));
        assert_eq!(d.burst_bytes, Some(16384));
        assert_eq!(
            d.classes,
            vec![ClassReport {
                class: 2,
                rate_bps: 5_000_000,
                rate: "5mbit".into()
            }]
        );
        assert_eq!((d.sent_bytes, d.sent_packets), (9000, 9));
        assert_eq!((d.overlimits, d.queue_drops, d.backlog_bytes), (18, 7, 300));
        // A second interface adds counters only.
        add_htb(&mut d, &classes, &qdiscs, false);
        assert_eq!(d.classes.len(), 1);
        assert_eq!((d.sent_bytes, d.overlimits, d.queue_drops), (18000, 36, 14));
        assert!(d.configured());
        assert!(!DirReport::default().configured());
    }

    #[test]
    fn edt_settings_and_fq_counters() {
        let mut st = EdtState {
            flags: EDT_TOTAL,
            own: 1 << 1,
            ..Default::default()
        };
        st.slots[0] = EdtSlot::for_rate(100_000_000);
        st.slots[2] = EdtSlot::for_rate(20_000_000);
        let mut d = DirReport::default();
        add_edt(&mut d, &st, &[root("fq", 500, 5, 3, 2)], true);
        assert_eq!(d.rate.as_deref(), Some("100mbit"));
        assert_eq!(d.rate_bps, Some(100_000_000));
        assert_eq!(d.classes[0].class, 1);
        assert_eq!(d.classes[0].rate, "20mbit");
        assert_eq!(d.burst_bytes, None);
        assert_eq!(
            (d.sent_bytes, d.sent_packets, d.overlimits, d.queue_drops),
            (500, 5, 3, 2)
        );
    }

    fn report() -> ShapingReport {
        ShapingReport {
            backend: Some(Backend::Htb),
            interfaces: vec![ShapedIface {
                ifindex: 7,
                ifname: Some("venet101".into()),
                ifb: Some("ifb101".into()),
            }],
            to_ct: DirReport {
                rate_bps: Some(20_000_000),
                rate: Some("20mbit".into()),
                burst_bytes: Some(16384),
                pps_limit: Some(1000),
                sent_bytes: 1500,
                sent_packets: 1,
                overlimits: 4,
                queue_drops: 1,
                pps_drops: 2,
                pps_drop_bytes: 128,
                ..Default::default()
            },
            from_ct: DirReport {
                rate_bps: Some(10_000_000),
                rate: Some("10mbit".into()),
                burst_bytes: Some(16384),
                classes: vec![ClassReport {
                    class: 1,
                    rate_bps: 1_000_000,
                    rate: "1mbit".into(),
                }],
                ..Default::default()
            },
        }
    }

    #[test]
    fn human_block() {
        let r = report();
        assert_eq!(
            r.human(),
            "shaping: htb on venet101 (out via ifb101)\n   \
             in: rate 20mbit burst 16kb pps 1000, sent 1500 B 1 pkts, overlimits 4, drops \
             queue 1 pps 2\n  \
             out: rate 10mbit burst 16kb class1 1mbit, sent 0 B 0 pkts, overlimits 0, drops \
             queue 0 pps 0"
        );
        assert_eq!(r.drops(), 3);
        let pps_only = ShapingReport {
            backend: None,
            interfaces: vec![ShapedIface {
                ifindex: 9,
                ifname: None,
                ifb: None,
            }],
            to_ct: DirReport {
                pps_limit: Some(50),
                horizon_drops: Some(3),
                ..Default::default()
            },
            from_ct: DirReport::default(),
        };
        assert_eq!(
            pps_only.human(),
            "shaping: pps only on #9\n   \
             in: rate - pps 50, sent 0 B 0 pkts, overlimits 0, drops queue 0 pps 0 horizon 3\n  \
             out: rate -, sent 0 B 0 pkts, overlimits 0, drops queue 0 pps 0"
        );
        assert_eq!(pps_only.drops(), 3);
    }

    #[test]
    fn json_names_directions_and_leaves_out_what_is_not_set() {
        let v = serde_json::to_value(report()).unwrap();
        assert_eq!(v["backend"], "htb");
        assert_eq!(v["in"]["rate_bps"], 20_000_000);
        assert_eq!(v["in"]["rate"], "20mbit");
        assert_eq!(v["in"]["pps_limit"], 1000);
        assert_eq!(v["out"]["rate_bps"], 10_000_000);
        assert_eq!(v["out"]["classes"][0]["rate_bps"], 1_000_000);
        assert_eq!(v["interfaces"][0]["ifb"], "ifb101");
        let out = v["out"].as_object().unwrap();
        assert!(!out.contains_key("pps_limit") && !out.contains_key("horizon_drops"));
        assert!(!v["in"].as_object().unwrap().contains_key("classes"));
        assert_eq!(rate_text(0), "-");
        assert_eq!(rate_text(1_500_000), "1500kbit");
    }
}
