//! Human sizes as vzctl and tc users write them: `512M`, `2G`, `1048576`, `unlimited`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {why} (examples: 512M, 2G, 1048576, unlimited)")]
pub struct SizeError {
    pub input: String,
    pub why: &'static str,
}

/// A byte count, or unlimited. Suffixes K/M/G/T are powers of 1024 (as in vzctl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Size {
    Bytes(u64),
    Unlimited,
}

impl Size {
    pub fn bytes(self) -> Option<u64> {
        match self {
            Size::Bytes(b) => Some(b),
            Size::Unlimited => None,
        }
    }
}

impl FromStr for Size {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| SizeError {
            input: s.to_string(),
            why,
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
    }
}
