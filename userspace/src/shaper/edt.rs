//! The EDT backend's plan: the `SHAPER_EDT` entry of each shaped device and the options of its
//! sch_fq, from a CT's rates of one direction.
//!
//! A device holds one direction: the host-side interface what goes to the CT, the CT's IFB
//! what comes from it. Slot 0 is the total, slot `1 + c` network class `c`, capped at the
//! total like the HTB backend's ceilings. The horizon is the time the HTB backend's bulk queue
//! takes to drain at the direction's fastest rate (200 ms at that rate, at least 4 MiB, at most
//! 64 MiB): the same queueing depth on either backend, because traffic from a CT crosses the
//! veth orphaned and nothing but the queue limit stops a sender's window from growing.

use berth_common::shaper::{EDT_TOTAL, EdtSlot, EdtState};

use super::{BULK_QUEUE_MAX, BULK_QUEUE_MIN, BULK_QUEUE_MS, Rate, tc::FqParams};

/// Slack of sch_fq's own horizon beyond the program's: fq must never be the one that drops
/// (its drops are not counted per CT and reason).
const FQ_HORIZON_SLACK_NS: u64 = 1_000_000_000;
/// fq's packet limits are packets, the horizon bytes: count a queue of full-size frames,
/// twice over (GSO packets are fewer, small ones more), and never below fq's defaults.
const FQ_MIN_LIMIT: u32 = 10_000;
const FRAME: u64 = 1514;

/// The entry of one direction; `None` when nothing in it is shaped.
pub(super) fn state(
    ctid: u32,
    dir: u8,
    total: Option<Rate>,
    classes: &[(u8, Rate)],
) -> Option<EdtState> {
    if total.is_none() && classes.is_empty() {
        return None;
    }
    let mut st = EdtState {
        ctid,
        dir,
        ..Default::default()
    };
    let mut fastest = 0;
    if let Some(t) = total {
        st.flags |= EDT_TOTAL;
        st.slots[0] = EdtSlot::for_rate(t.bits_per_sec());
        fastest = t.bits_per_sec();
    }
    for (c, r) in classes {
        let bps = match total {
            Some(t) => r.bits_per_sec().min(t.bits_per_sec()),
            None => r.bits_per_sec(),
        };
        st.own |= 1 << c;
        st.slots[1 + usize::from(*c)] = EdtSlot::for_rate(bps);
        fastest = fastest.max(bps);
    }
    st.horizon_ns = horizon_ns(fastest);
    Some(st)
}

/// Nanoseconds of queue at `rate_bps` (see the module docs).
pub(super) fn horizon_ns(rate_bps: u64) -> u64 {
    let bytes_per_sec = rate_bps.div_ceil(8).max(1);
    let queue = (bytes_per_sec * BULK_QUEUE_MS / 1000).clamp(BULK_QUEUE_MIN, BULK_QUEUE_MAX);
    u64::try_from(u128::from(queue) * 1_000_000_000 / u128::from(bytes_per_sec)).unwrap_or(u64::MAX)
}

/// The sch_fq of a device whose entry is `st`.
pub(super) fn fq_params(st: &EdtState) -> FqParams {
    let fastest = st
        .slots
        .iter()
        .map(|s| s.rate_bps)
        .max()
        .unwrap_or(0)
        .max(1);
    let queue_bytes = u128::from(st.horizon_ns) * u128::from(fastest.div_ceil(8)) / 1_000_000_000;
    let packets = u32::try_from(queue_bytes * 2 / u128::from(FRAME))
        .unwrap_or(u32::MAX)
        .max(FQ_MIN_LIMIT);
    FqParams {
        limit: packets.saturating_mul(2),
        flow_limit: packets,
        horizon_us: u32::try_from((st.horizon_ns + FQ_HORIZON_SLACK_NS) / 1000).unwrap_or(u32::MAX),
        horizon_drop: true,
    }
}

/// The rates an entry was configured with: (total, [(class, rate)]).
pub(super) fn rates_of(st: &EdtState) -> (Option<Rate>, Vec<(u8, Rate)>) {
    let total = (st.flags & EDT_TOTAL != 0)
        .then(|| Rate::from_bps(st.slots[0].rate_bps))
        .flatten();
    let classes = (0..16u8)
        .filter(|c| st.own & (1 << c) != 0)
        .filter_map(|c| Rate::from_bps(st.slots[1 + usize::from(c)].rate_bps).map(|r| (c, r)))
        .collect();
    (total, classes)
}

#[cfg(test)]
mod tests {
    use berth_common::{DIR_IN, shaper::EDT_SHIFT};

    use super::*;

    fn rate(s: &str) -> Rate {
        Rate::parse("t", s).unwrap()
    }

    #[test]
    fn slots_and_horizon() {
        let st = state(7, DIR_IN, Some(rate("10mbit")), &[(2, rate("50mbit"))]).unwrap();
        assert_eq!(st.flags, EDT_TOTAL);
        assert_eq!(st.own, 1 << 2);
        // 10 Mbit/s = 800 ns per byte.
        assert_eq!(st.slots[0].ns_per_byte_q16 >> EDT_SHIFT, 800);
        // The class is capped at the total.
        assert_eq!(st.slots[3].rate_bps, 10_000_000);
        // 4 MiB at 10 Mbit/s.
        assert_eq!(st.horizon_ns, 4 * 1024 * 1024 * 1_000_000_000 / 1_250_000);
        assert_eq!(
            rates_of(&st),
            (Some(rate("10mbit")), vec![(2, rate("10mbit"))])
        );
        assert!(state(7, DIR_IN, None, &[]).is_none());
    }

    #[test]
    fn horizon_is_200ms_at_high_rates() {
        assert_eq!(horizon_ns(1_000_000_000), 200_000_000);
        // 64 MiB cap at 10 Gbit/s: 53.7 ms.
        assert_eq!(horizon_ns(10_000_000_000), 64 * 1024 * 1024 * 8 / 10);
    }

    #[test]
    fn fq_never_drops_before_the_program() {
        let st = state(7, DIR_IN, Some(rate("1gbit")), &[]).unwrap();
        let p = fq_params(&st);
        assert!(u64::from(p.horizon_us) * 1000 > st.horizon_ns);
        // 25 MB of full frames, twice: ~33 000 packets per flow.
        assert!(p.flow_limit >= 33_000, "{p:?}");
        assert!(p.limit >= p.flow_limit);
        assert!(p.horizon_drop);
    }

    #[test]
    fn cost_of_a_frame() {
        let s = EdtSlot::for_rate(1_000_000);
        assert_eq!(EdtSlot::cost_ns(s.ns_per_byte_q16, 1500), 12_000_000);
        // 1 bit/s: 8 s per byte, the slow path without overflow.
        let s = EdtSlot::for_rate(1);
        assert_eq!(
            EdtSlot::cost_ns(s.ns_per_byte_q16, 65_536),
            65_536 * 8_000_000_000
        );
    }
}
