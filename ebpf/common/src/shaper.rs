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
    /// EDT backend: per-device departure-time state (`EdtState`).
    pub const EDT: &str = "SHAPER_EDT";
    /// `crate::undelivered::SealConfig`: the key and drop reasons of undelivered accounting.
    pub const SEAL: &str = "SHAPER_SEAL";
    pub const ALL: [&str; 5] = [IFACES, PPS, DROPS, EDT, SEAL];
}

/// Names of the shaper's programs.
pub mod program_names {
    /// Host-side interface tc egress: traffic delivered to the CT.
    pub const TO_CT: &str = "berth_shape_to_ct";
    /// Host-side interface tc ingress: traffic sent by the CT.
    pub const FROM_CT: &str = "berth_shape_from_ct";
    /// EDT backend: tc egress of the host-side interface (traffic to the CT) and of the CT's
    /// IFB (traffic from the CT), in front of sch_fq. Exactly 15 characters, the kernel's
    /// limit for program names (`BPF_OBJ_NAME_LEN` - 1), so the name cls_bpf reports is whole.
    pub const EDT: &str = "berth_shape_edt";
    /// `kfree_skb` tracepoint: takes back the counts of sealed packets that were dropped.
    pub const UNDELIVERED: &str = "berth_undelivered";
}

/// The name the kernel keeps for a program (`bpf_prog_info.name`, at most 15 bytes): what a
/// program opened from a pin is called, and so what cls_bpf filters attached from it carry.
pub fn kernel_name(name: &str) -> &str {
    name.get(..15).unwrap_or(name)
}

/// Shaped interfaces (`SHAPER_IFACES`), pps buckets (2 per interface) and drop rows.
pub mod capacity {
    pub const IFACES: u32 = 16_384;
    pub const PPS: u32 = 2 * IFACES;
    pub const DROPS: u32 = 4 * IFACES;
    /// `SHAPER_EDT`: one entry per shaped device (host-side interface, IFB).
    pub const EDT: u32 = 2 * IFACES;
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
/// Drop reason of the EDT backend: the packet's departure time would lie more than
/// `EdtState::horizon_ns` after its arrival (the sender outruns its rate by that much).
pub const DROP_HORIZON: u8 = 2;

/// Compare-and-swap attempts on one rate state before a program charges it without reading
/// back (an atomic add): losing the race this often means other CPUs are charging the same
/// bucket right now, so it is saturated and the packet's own slot hardly matters.
pub const CAS_TRIES: u32 = 4;

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
/// by `interval_ns` per segment. One word of state, shared by all CPUs, updated with
/// compare-and-swap.
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

/// `EdtState::flags`: the device's total rate (slot 0) applies to every packet.
pub const EDT_TOTAL: u32 = 1 << 0;
/// Slots of an `EdtState`: 0 = total, `1 + c` = network class `c`.
pub const EDT_SLOTS: usize = 17;
/// Fixed-point shift of `EdtSlot::ns_per_byte_q16`.
pub const EDT_SHIFT: u32 = 16;

/// One rate of the EDT backend, shared by all CPUs (updated with compare-and-swap).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdtSlot {
    /// Departure time of the next byte at this rate: a packet leaves at `max(t_next,
    /// arrival)` and moves `t_next` on by its length at the rate. `bpf_ktime_get_ns()`
    /// clock (CLOCK_MONOTONIC, what sch_fq compares `skb->tstamp` with).
    pub t_next: u64,
    /// Nanoseconds per byte << `EDT_SHIFT` (`8e9 << 16 / rate_bps`); 0 = slot unused.
    pub ns_per_byte_q16: u64,
    /// The configured rate, bits per second (user space reads it back; unused by the program).
    pub rate_bps: u64,
}
const _: () = assert!(core::mem::size_of::<EdtSlot>() == 24);

impl EdtSlot {
    /// Nanoseconds `len` bytes take at this slot's rate. Slow rates (below ~2 kbit/s, where
    /// `len * ns_per_byte_q16` could overflow) drop the fraction: it is below 1e-7 there.
    #[inline(always)]
    pub const fn cost_ns(q16: u64, len: u64) -> u64 {
        if q16 >> 40 != 0 {
            len * (q16 >> EDT_SHIFT)
        } else {
            (len * q16) >> EDT_SHIFT
        }
    }

    /// The slot for `rate_bps` (bits per second, > 0).
    pub const fn for_rate(rate_bps: u64) -> Self {
        let q = ((8_000_000_000u128 << EDT_SHIFT) / rate_bps as u128) as u64;
        Self {
            t_next: 0,
            ns_per_byte_q16: if q == 0 { 1 } else { q },
            rate_bps,
        }
    }
}

/// `SHAPER_EDT` value, key = ifindex of the device whose egress the EDT program runs on: the
/// host-side interface (traffic to the CT, `dir` = `DIR_IN`) or the CT's IFB (traffic from
/// the CT, `DIR_OUT`). A packet is charged to the slot of its network class when that class
/// has a rate (`own`), and to the total (`EDT_TOTAL`); it departs when every slot charged
/// allows it, and is dropped (`DROP_HORIZON`) when that is more than `horizon_ns` away.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdtState {
    pub ctid: u32,
    /// `DIR_IN` or `DIR_OUT`.
    pub dir: u8,
    pub _pad0: u8,
    /// Bit `c` set: network class `c` has a rate of its own (slot `1 + c`).
    pub own: u16,
    /// `EDT_*` bits.
    pub flags: u32,
    pub _pad1: u32,
    pub horizon_ns: u64,
    pub slots: [EdtSlot; EDT_SLOTS],
}
const _: () = assert!(core::mem::size_of::<EdtState>() == 24 + 24 * EDT_SLOTS);

impl Default for EdtState {
    fn default() -> Self {
        Self {
            ctid: 0,
            dir: 0,
            _pad0: 0,
            own: 0,
            flags: 0,
            _pad1: 0,
            horizon_ns: 0,
            slots: [EdtSlot {
                t_next: 0,
                ns_per_byte_q16: 0,
                rate_bps: 0,
            }; EDT_SLOTS],
        }
    }
}

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
    use super::{EdtState, PpsBucket, ShapeIface, ShaperDropKey};

    // SAFETY: #[repr(C)] integers with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for ShapeIface {}
    unsafe impl aya::Pod for PpsBucket {}
    unsafe impl aya::Pod for ShaperDropKey {}
    unsafe impl aya::Pod for EdtState {}
}
