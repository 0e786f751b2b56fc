//! The billing ledger (issue 13): billing periods in a CT's own time zone, the 95th percentile
//! over 5-minute slots, the booking of counter readings into slots, the SQLite ledger and the
//! CSV export an auditor can recompute an invoice from.
//!
//! Every quantity is an integer: bytes and packets are `u64`, instants are Unix seconds (`i64`),
//! a slot is named by its start, a multiple of [`SLOT_SECS`].
pub mod api;
pub mod book;
pub mod csv;
mod error;
pub mod feed;
pub mod graph;
pub mod json;
pub mod p95;
pub mod period;
pub mod store;
#[cfg(test)]
mod testrng;

pub use book::{Baseline, Booking, Checkpoint, Reading, SlotAdd, book};
pub use error::BillingError;
pub use p95::{P95Mode, P95Report, SlotSample, SlotWindow, bytes_to_bps, nearest_rank};
pub use period::{AnchorChange, BillingAnchor, Period, PeriodSpec};
pub use store::{CtInfo, CtReading, Ledger, LedgerOptions, Report, SlotRow, TickSummary};

/// Length of a billing slot: the 5-minute sample transit providers bill the 95th on.
pub const SLOT_SECS: i64 = 300;

/// Start of the slot holding instant `t` (Unix seconds).
pub fn slot_of(t: i64) -> i64 {
    t.div_euclid(SLOT_SECS) * SLOT_SECS
}

/// Traffic direction as seen from the CT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards the CT.
    In,
    /// From the CT.
    Out,
}

/// Address family of the counted traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
    pub fn parse(s: &str) -> Option<Direction> {
        match s {
            "in" => Some(Direction::In),
            "out" => Some(Direction::Out),
            _ => None,
        }
    }
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
    pub fn parse(s: &str) -> Option<Family> {
        match s {
            "ipv4" => Some(Family::V4),
            "ipv6" => Some(Family::V6),
            _ => None,
        }
    }
}

/// One counter of a CT: direction × traffic class × address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterKey {
    pub direction: Direction,
    pub class: u8,
    pub family: Family,
}

impl CounterKey {
    pub fn new(direction: Direction, class: u8, family: Family) -> CounterKey {
        CounterKey {
            direction,
            class,
            family,
        }
    }

    /// Packs the key into one small integer (class·4 + direction·2 + family): the ledger stores
    /// it in a 1–2 byte SQLite integer instead of three columns.
    pub fn code(self) -> u16 {
        (u16::from(self.class) << 2)
            | (u16::from(self.direction == Direction::Out) << 1)
            | u16::from(self.family == Family::V6)
    }

    pub fn from_code(code: u16) -> Option<CounterKey> {
        let class = u8::try_from(code >> 2).ok()?;
        let direction = if code & 2 != 0 {
            Direction::Out
        } else {
            Direction::In
        };
        let family = if code & 1 != 0 {
            Family::V6
        } else {
            Family::V4
        };
        Some(CounterKey::new(direction, class, family))
    }
}

/// A cumulative counter value, or a delta of one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Counter {
    pub bytes: u64,
    pub packets: u64,
}

impl Counter {
    pub fn new(bytes: u64, packets: u64) -> Counter {
        Counter { bytes, packets }
    }
}

/// Flags of a slot row (a bit set, stored as an integer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SlotFlags(pub u8);

impl SlotFlags {
    /// The bytes of a gap (several slots without a reading) spread evenly over them.
    pub const ESTIMATED: SlotFlags = SlotFlags(1);
    /// The wall clock stepped backwards: booked into the last booked slot instead.
    pub const CLOCK_STEP: SlotFlags = SlotFlags(2);
    /// A counter went down within one epoch: its delta was taken as 0.
    pub const COUNTER_ANOMALY: SlotFlags = SlotFlags(4);
    /// The counters were reset (new epoch): counted from 0.
    pub const NEW_EPOCH: SlotFlags = SlotFlags(8);

    const NAMES: [(SlotFlags, &'static str); 4] = [
        (SlotFlags::ESTIMATED, "estimated"),
        (SlotFlags::CLOCK_STEP, "clock_step"),
        (SlotFlags::COUNTER_ANOMALY, "counter_anomaly"),
        (SlotFlags::NEW_EPOCH, "new_epoch"),
    ];

    pub fn empty() -> SlotFlags {
        SlotFlags(0)
    }
    pub fn contains(self, other: SlotFlags) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn union(self, other: SlotFlags) -> SlotFlags {
        SlotFlags(self.0 | other.0)
    }

    /// `estimated|clock_step`, or the empty string: the CSV and JSON spelling.
    pub fn to_names(self) -> String {
        let names: Vec<&str> = SlotFlags::NAMES
            .iter()
            .filter(|(f, _)| self.contains(*f))
            .map(|(_, n)| *n)
            .collect();
        names.join("|")
    }

    pub fn parse_names(s: &str) -> Option<SlotFlags> {
        let mut flags = SlotFlags::empty();
        for name in s.split('|').filter(|n| !n.is_empty()) {
            let (f, _) = SlotFlags::NAMES.iter().find(|(_, n)| *n == name)?;
            flags = flags.union(*f);
        }
        Some(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_code_round_trips_every_key() {
        for class in 0..=u8::MAX {
            for d in [Direction::In, Direction::Out] {
                for f in [Family::V4, Family::V6] {
                    let k = CounterKey::new(d, class, f);
                    assert_eq!(CounterKey::from_code(k.code()), Some(k));
                }
            }
        }
        assert_eq!(CounterKey::from_code(1024), None);
    }

    #[test]
    fn flags_names_round_trip() {
        for bits in 0..16u8 {
            let f = SlotFlags(bits);
            assert_eq!(SlotFlags::parse_names(&f.to_names()), Some(f));
        }
        assert_eq!(SlotFlags::parse_names("estimated|bogus"), None);
    }

    #[test]
    fn slot_of_floors_also_before_1970() {
        assert_eq!(slot_of(0), 0);
        assert_eq!(slot_of(299), 0);
        assert_eq!(slot_of(300), 300);
        assert_eq!(slot_of(-1), -300);
    }
}
