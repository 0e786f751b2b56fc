//! Map keys and values of the shaper (`berth_shape_*` programs, `berth::shaper`).
//!
//! The shaper's programs only decide; queues enforce. On the CT's host-side interface the
//! egress program writes the HTB class for traffic delivered to the CT into `skb->priority`
//! (HTB picks a leaf class whose id equals the priority before running any filter), and the
//! ingress program does the same for traffic from the CT and redirects it into the CT's IFB,
//! whose HTB shapes it. Packet-rate limits are token buckets in `SHAPER_PPS` that drop.

/// Names of the shaper's maps in the eBPF object.
pub mod map_names {
    pub const IFACES: &str = "SHAPER_IFACES";
    pub const PPS: &str = "SHAPER_PPS";
    pub const DROPS: &str = "SHAPER_DROPS";
    pub const ALL: [&str; 3] = [IFACES, PPS, DROPS];
}

/// Names of the shaper's programs.
pub mod program_names {
    /// Host-side interface tc egress: traffic delivered to the CT.
    pub const TO_CT: &str = "berth_shape_to_ct";
    /// Host-side interface tc ingress: traffic sent by the CT.
    pub const FROM_CT: &str = "berth_shape_from_ct";
}

/// Shaped interfaces (`SHAPER_IFACES`), pps buckets (2 per interface) and drop rows.
pub mod capacity {
    pub const IFACES: u32 = 16_384;
    pub const PPS: u32 = 2 * IFACES;
    pub const DROPS: u32 = 4 * IFACES;
}

/// Major number of the HTB qdisc on the host-side interface and on the CT's IFB.
pub const HTB_MAJOR: u32 = 1;
/// Minor of the class holding the CT's total rate of one direction.
pub const MINOR_TOTAL: u32 = 0x1;
/// Minor of a group's inner class: group 0 is every network class without a rate of its own,
/// group `1 + c` is network class `c`.
pub const MINOR_GROUP: u32 = 0x10;
/// Minor of a group's bulk leaf (`MINOR_BULK + group`).
pub const MINOR_BULK: u32 = 0x100;
/// Minor of a group's interactive leaf (`MINOR_INTERACTIVE + group`): small packets (pings,
/// pure ACKs, DNS) served before the bulk leaf, so latency stays low under load.
pub const MINOR_INTERACTIVE: u32 = 0x200;
/// Frames up to this length (and not GSO) go to the interactive leaf.
pub const INTERACTIVE_MAX_LEN: u32 = 160;

/// `ShapeIface::flags`: traffic to the CT is queued in the host-side interface's HTB.
pub const SHAPE_IN: u32 = 1 << 0;
/// `ShapeIface::flags`: traffic from the CT is redirected into `ifb_ifindex` and queued there.
pub const SHAPE_OUT: u32 = 1 << 1;
/// `ShapeIface::flags`: network classes without a rate of their own are shaped (group 0
/// exists) in; without it they bypass the HTB (its direct queue).
pub const REST_IN: u32 = 1 << 2;
pub const REST_OUT: u32 = 1 << 3;
/// `ShapeIface::flags`: the packet-rate bucket of the direction is enforced.
pub const PPS_IN: u32 = 1 << 4;
pub const PPS_OUT: u32 = 1 << 5;

/// Drop reason of the packet-rate limit (`ShaperDropKey::reason`).
pub const DROP_PPS: u8 = 1;

/// `SHAPER_IFACES` value, key = ifindex of the host-side interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShapeIface {
    pub ctid: u32,
    /// The CT's IFB (with `SHAPE_OUT`).
    pub ifb_ifindex: u32,
    /// `SHAPE_*`, `REST_*`, `PPS_*` bits.
    pub flags: u32,
    /// Bit `c` set: network class `c` has a group (rate) of its own, in / out.
    pub classes_in: u16,
    pub classes_out: u16,
}
const _: () = assert!(core::mem::size_of::<ShapeIface>() == 16);

/// `SHAPER_PPS` key: `ifindex | dir << 32` (`DIR_IN`/`DIR_OUT` of `berth_common`).
pub type PpsKey = u64;

/// `SHAPER_PPS` value: a packet-rate limit as a GCRA ("virtual scheduling"): a packet
/// arriving at `now` passes if `max(tat, now) - now <= tolerance_ns`, and then moves `tat` on
/// by `interval_ns` per segment. One word of state, shared by all CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PpsBucket {
    /// Theoretical arrival time of the next packet, `bpf_ktime_get_ns()` clock.
    pub tat: u64,
    /// `10^9 / rate`, rounded: the spacing of packets at the rate.
    pub interval_ns: u64,
    /// `(burst - 1) * interval_ns`: how far ahead of the rate a burst may run.
    pub tolerance_ns: u64,
    /// The configured rate, packets per second (user space reads it back).
    pub rate: u64,
}
const _: () = assert!(core::mem::size_of::<PpsBucket>() == 32);

/// `SHAPER_DROPS` key: per CT, direction and reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShaperDropKey {
    pub ctid: u32,
    pub dir: u8,
    pub reason: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ShaperDropKey>() == 8);

#[cfg(feature = "user")]
mod user {
    use super::{PpsBucket, ShapeIface, ShaperDropKey};

    // SAFETY: #[repr(C)] integers with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for ShapeIface {}
    unsafe impl aya::Pod for PpsBucket {}
    unsafe impl aya::Pod for ShaperDropKey {}
}
