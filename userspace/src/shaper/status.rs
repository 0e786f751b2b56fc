//! What `berth shaper status` reports for a CT: configured rates read back from the kernel,
//! per-class counters and drops.

use super::*;

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

impl Shaper {
    /// Configured rates (read back from the kernel), per-class counters, and drops per
    /// direction and reason of every shaped interface of `ctid`.
    pub fn status(&mut self, ctid: Ctid) -> Result<ShaperStatus> {
        StatusSource {
            ifaces: &self.ifaces,
            pps: &self.pps,
            drops: &self.drops,
            edt: Some(&self.edt),
            nl: &mut self.nl,
        }
        .status(ctid)
    }
}

/// [`Shaper::status`] without a shaper: the pins under `pin_dir/shaper` opened read-only,
/// nothing loaded, attached or created; no interface when no shaper is pinned there. Call it
/// from the network namespace holding the CTs' host-side interfaces.
pub fn read_status(pin_dir: &Path, ctid: Ctid) -> Result<ShaperStatus> {
    let maps = pin_dir.join("shaper").join("maps");
    let maps = maps.as_path();
    // The same test as the other readers' ([`view::ShaperView::open_pinned`]): no shaper pinned
    // means no CT is shaped.
    if !bpf::maps_pinned(maps, &[map_names::IFACES, map_names::PPS, map_names::DROPS]) {
        return Ok(ShaperStatus {
            ctid: ctid.get(),
            interfaces: Vec::new(),
        });
    }
    let ro = Access::ReadOnly;
    let ifaces = open_map(maps, map_names::IFACES, 4, size_of::<ShapeIface>(), ro)?;
    let pps = open_map(maps, map_names::PPS, 8, size_of::<PpsBucket>(), ro)?;
    let drops = open_map(maps, map_names::DROPS, 8, size_of::<DropValue>(), ro)?;
    // Pinned by every shaper that has the EDT backend; older pins may lack it.
    let edt = if maps.join(map_names::EDT).exists() {
        Some(open_map(
            maps,
            map_names::EDT,
            4,
            size_of::<EdtState>(),
            ro,
        )?)
    } else {
        None
    };
    let mut nl = view::netlink()?;
    StatusSource {
        ifaces: &ifaces,
        pps: &pps,
        drops: &drops,
        edt: edt.as_ref(),
        nl: &mut nl,
    }
    .status(ctid)
}

/// What a status report reads: the shaper's maps (a shaper's own, or opened read-only) and an
/// rtnetlink socket for the qdisc and class dumps.
struct StatusSource<'a> {
    ifaces: &'a HashMap<MapData, u32, ShapeIface>,
    pps: &'a HashMap<MapData, u64, PpsBucket>,
    drops: &'a PerCpuHashMap<MapData, u64, DropValue>,
    edt: Option<&'a HashMap<MapData, u32, EdtState>>,
    nl: &'a mut Netlink,
}

impl StatusSource<'_> {
    fn status(&mut self, ctid: Ctid) -> Result<ShaperStatus> {
        let ctid = ctid.get();
        let mut interfaces = Vec::new();
        for (ifindex, entry) in self.ifaces.iter().flatten() {
            if entry.ctid == ctid {
                interfaces.push(self.iface_status(ctid, ifindex, entry)?);
            }
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
        let edt_in = self.edt.is_some_and(|m| m.get(&ifindex, 0).is_ok());
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
            if let Some(st) = self.edt.and_then(|m| m.get(&dev, 0).ok()) {
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
                let root = tc::qdiscs(self.nl, dev)
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
            let objs = tc::classes(self.nl, dev)
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
        view::drop_counter(self.drops, ctid, d, reason)
    }
}
