//! The HTB class plan of one direction (rates, guarantees, leaf queues) and the pps bucket,
//! computed from a [`ShapingConfig`] before anything is touched.

use super::*;

/// Bulk leaf queue: this much time at the group's ceiling, at least `BULK_QUEUE_MIN`.
/// Traffic from a CT crosses the veth orphaned (no TCP Small Queues backpressure from the
/// qdisc), so a sender's window only stops growing at its socket buffer limit (tcp_wmem max,
/// 4 MiB by default): measured at 10 Mbit/s, a 256 KiB queue cost 135 retransmits in 5 s
/// (2.8 %), 4 MiB none. Latency-sensitive packets skip this queue (interactive leaf).
pub(super) const BULK_QUEUE_MS: u64 = 200;
pub(super) const BULK_QUEUE_MIN: u64 = 4 * 1024 * 1024;
pub(super) const BULK_QUEUE_MAX: u64 = 64 * 1024 * 1024;
/// Interactive leaf queue, packets.
pub(super) const INTERACTIVE_QUEUE: u32 = 128;
/// HTB direct queue (traffic of unshaped classes), packets.
pub(super) const DIRECT_QLEN: u32 = 1000;
/// Default burst: this much time at the class's ceiling, at least `MIN_BURST` (measured at
/// 1 Gbit/s: below ~15 KB the HTB watchdog's timer slack costs several % of the rate).
pub(super) const BURST_MS: u64 = 2;
pub(super) const MIN_BURST: u64 = 16 * 1024;
/// Default pps burst: this many ms at the rate, at least `MIN_PPS_BURST` packets.
pub(super) const PPS_BURST_MS: u64 = 20;
pub(super) const MIN_PPS_BURST: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Leaf {
    /// bfifo, limit in bytes.
    Bulk(u32),
    /// pfifo, limit in packets.
    Interactive(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PlannedClass {
    pub(super) classid: u32,
    pub(super) parent: u32,
    pub(super) params: HtbClass,
    pub(super) leaf: Option<Leaf>,
}

/// What one direction gets on its device, per backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum DirShape {
    Htb(DirPlan),
    Edt(Box<EdtState>),
}

/// The HTB of one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct DirPlan {
    /// Parents before children.
    pub(super) classes: Vec<PlannedClass>,
    /// Network classes with a group of their own.
    pub(super) own: u16,
    /// Group 0 (the rest) is shaped.
    pub(super) rest: bool,
}

pub(super) fn quantum(rate: u64) -> u32 {
    (rate / 10).clamp(1600, 200_000) as u32
}

/// `total` and class rates in bits/s; `None` when nothing in this direction is shaped.
pub(super) fn plan_dir(
    total: Option<Rate>,
    classes: &[(u8, Rate)],
    burst: Option<Size>,
) -> Option<DirPlan> {
    if total.is_none() && classes.is_empty() {
        return None;
    }
    let root = handle(HTB_MAJOR, 0);
    let total_b = total.map(Rate::bytes_per_sec);
    let burst_for = |ceil: u64| {
        burst
            .and_then(Size::bytes)
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

pub(super) fn pps_bucket(rate: u64) -> PpsBucket {
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
pub(super) fn depth(classid: u32) -> u32 {
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
}
