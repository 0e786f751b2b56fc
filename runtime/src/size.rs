//! Byte counts as people write them, in the two syntaxes berth's users already know:
//!
//! - vzctl's, for resource limits (`--memory`, `--swap`, `--diskspace`): whole numbers with
//!   `K`/`M`/`G`/`T` (powers of 1024), or `unlimited`; printed as `512M`. This is [`FromStr`]
//!   and [`Display`](fmt::Display), and the serde form.
//! - tc's, for shaping bursts (`--burst`): fractions allowed, `b`, `k`/`kb`/`kib`,
//!   `m`/`mb`/`mib`, `g`/`gb`/`gib` (all powers of 1024, as tc reads them) and
//!   `kbit`/`mbit`/`gbit` (bits); printed as `64kb`. This is [`Size::parse_tc`] and
//!   [`Size::tc`].
//!
//! One type for both, so a burst and a memory limit are the same kind of value in the code; each
//! setting keeps the syntax its config key and flag have always had.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const VZCTL_EXAMPLES: &str = "512M, 2G, 1048576, unlimited";
const TC_EXAMPLES: &str = "1514, 64kb, 1.5mb, 8kbit";

/// A size that could not be read: the input, why, and examples of the syntax expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {why} (examples: {examples})")]
pub struct SizeError {
    pub input: String,
    pub why: String,
    examples: &'static str,
}

/// A byte count, or unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Size {
    Bytes(u64),
    Unlimited,
}

impl Size {
    pub fn from_bytes(bytes: u64) -> Self {
        Size::Bytes(bytes)
    }

    pub fn bytes(self) -> Option<u64> {
        match self {
            Size::Bytes(b) => Some(b),
            Size::Unlimited => None,
        }
    }

    /// Parses tc's size syntax (see the module docs): always a byte count, greater than zero and
    /// at most 4 GiB (HTB's burst is a 32-bit byte count).
    pub fn parse_tc(s: &str) -> Result<Self, SizeError> {
        let err = |why: String| SizeError {
            input: s.to_string(),
            why,
            examples: TC_EXAMPLES,
        };
        let t = s.trim();
        if t.starts_with('-') {
            return Err(err("a size cannot be negative".into()));
        }
        let Some((n, unit)) = split_number(t) else {
            return Err(err(
                "not a size (expected a number with a unit like b, kb, mb)".into(),
            ));
        };
        let mult: f64 = match unit.as_str() {
            "" | "b" => 1.0,
            "k" | "kb" | "kib" => 1024.0,
            "m" | "mb" | "mib" => 1024.0 * 1024.0,
            "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "kbit" => 1024.0 / 8.0,
            "mbit" => 1024.0 * 1024.0 / 8.0,
            "gbit" => 1024.0 * 1024.0 * 1024.0 / 8.0,
            other => {
                return Err(err(format!(
                    "unknown size unit {other:?} (use b, kb, mb, gb, kbit, mbit)"
                )));
            }
        };
        let bytes = (n * mult).round();
        if bytes < 1.0 {
            return Err(err("a size must be greater than zero".into()));
        }
        if bytes > f64::from(u32::MAX) {
            return Err(err("size too large (at most 4gb)".into()));
        }
        Ok(Size::Bytes(bytes as u64))
    }

    /// The size in tc's units: the largest that shows it exactly (`64kb`, `1mb`, `1514b`).
    pub fn tc(self) -> TcUnits {
        TcUnits(self)
    }
}

/// [`Size`] printed in tc's units (see [`Size::tc`]).
#[derive(Clone, Copy, Debug)]
pub struct TcUnits(Size);

impl fmt::Display for TcUnits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Size::Bytes(b) = self.0 else {
            return f.write_str("unlimited");
        };
        for (div, unit) in [(1 << 30, "gb"), (1 << 20, "mb"), (1 << 10, "kb")] {
            if b.is_multiple_of(div) {
                return write!(f, "{}{unit}", b / div);
            }
        }
        write!(f, "{b}b")
    }
}

/// Splits "1.5mbit" into (1.5, "mbit"), the unit lower-cased; `None` when there is no leading
/// number. tc's syntax for sizes and rates.
pub(crate) fn split_number(s: &str) -> Option<(f64, String)> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let n: f64 = s[..end].parse().ok()?;
    Some((n, s[end..].trim().to_ascii_lowercase()))
}

impl FromStr for Size {
    type Err = SizeError;
    /// vzctl's syntax (see the module docs).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| SizeError {
            input: s.to_string(),
            why: why.to_string(),
            examples: VZCTL_EXAMPLES,
        };
        let t = s.trim();
        if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("none") {
            return Ok(Size::Unlimited);
        }
        if t.starts_with('-') {
            return Err(err("negative"));
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        if num.is_empty() {
            return Err(err("no number"));
        }
        let n: u64 = num.parse().map_err(|_| err("number too large"))?;
        let mult: u64 = match suffix.to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => 1 << 10,
            "M" | "MB" | "MIB" => 1 << 20,
            "G" | "GB" | "GIB" => 1 << 30,
            "T" | "TB" | "TIB" => 1 << 40,
            _ => return Err(err("unknown suffix")),
        };
        let b = n
            .checked_mul(mult)
            .ok_or_else(|| err("overflows 64 bits"))?;
        Ok(Size::Bytes(b))
    }
}

impl fmt::Display for Size {
    /// vzctl's units: `512M`, `1000`, `unlimited`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Size::Unlimited => f.write_str("unlimited"),
            Size::Bytes(b) => {
                for (shift, s) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
                    if b != 0 && b % (1u64 << shift) == 0 {
                        return write!(f, "{}{s}", b >> shift);
                    }
                }
                write!(f, "{b}")
            }
        }
    }
}

impl TryFrom<String> for Size {
    type Error = SizeError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Size> for String {
    fn from(s: Size) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        assert_eq!("512M".parse::<Size>().unwrap(), Size::Bytes(512 << 20));
        assert_eq!("2g".parse::<Size>().unwrap(), Size::Bytes(2 << 30));
        assert_eq!("4096".parse::<Size>().unwrap(), Size::Bytes(4096));
        assert_eq!("unlimited".parse::<Size>().unwrap(), Size::Unlimited);
        assert_eq!(Size::Bytes(512 << 20).to_string(), "512M");
        assert_eq!(Size::Bytes(1000).to_string(), "1000");
    }

    #[test]
    fn rejects_bad() {
        for bad in [
            "",
            "-1",
            "12X",
            "M",
            "1.5G",
            "99999999999999999999T",
            "100000000000T",
        ] {
            assert!(bad.parse::<Size>().is_err(), "{bad} accepted");
        }
        let e = "12X".parse::<Size>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid size \"12X\": unknown suffix (examples: 512M, 2G, 1048576, unlimited)"
        );
    }

    #[test]
    fn sizes_parse_like_tc() {
        let z = |s| Size::parse_tc(s).map(|s| s.bytes().unwrap());
        assert_eq!(z("1514"), Ok(1514));
        assert_eq!(z("64kb"), Ok(65536));
        assert_eq!(z("64k"), Ok(65536));
        assert_eq!(z("1mb"), Ok(1 << 20));
        assert_eq!(z("1.5kb"), Ok(1536));
        assert_eq!(z("8kbit"), Ok(1024));
        assert!(z("-1kb").is_err());
        assert!(z("0").is_err());
        assert!(z("lots").is_err());
        assert!(z("5gb").is_err());
        assert!(
            Size::parse_tc("10xb")
                .unwrap_err()
                .why
                .contains("unknown size unit")
        );
    }

    /// Each syntax prints in its own units; both read back what they print.
    #[test]
    fn both_printed_forms_round_trip() {
        for (bytes, vz, tc) in [
            (65536, "64K", "64kb"),
            (1 << 20, "1M", "1mb"),
            (1514, "1514", "1514b"),
            (3 << 30, "3G", "3gb"),
        ] {
            let s = Size::Bytes(bytes);
            assert_eq!(s.to_string(), vz);
            assert_eq!(s.tc().to_string(), tc);
            assert_eq!(vz.parse::<Size>().unwrap(), s);
            assert_eq!(Size::parse_tc(tc).unwrap(), s);
        }
        assert_eq!(Size::Unlimited.tc().to_string(), "unlimited");
    }
}
