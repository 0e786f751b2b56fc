//! Container identifiers: the numeric CTID hosters know from OpenVZ, plus optional names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Largest CTID: keeps host interface names such as `veth999999999.9` within IFNAMSIZ-1 (15).
pub const CTID_MAX: u32 = 999_999_999;

/// A container ID, 1..=[`CTID_MAX`]. 0 is the host (as in OpenVZ) and is never a valid CT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Ctid(u32);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CtidError {
    #[error("invalid CTID {0:?}: must be a number from 1 to {CTID_MAX}")]
    NotNumber(String),
    #[error("invalid CTID 0: 0 is the host")]
    Zero,
    #[error(
        "invalid CTID {0}: larger than {CTID_MAX} (host interface names must fit 15 characters)"
    )]
    TooLarge(u64),
    #[error(
        "invalid CT name {0:?}: use 1-63 characters from a-z A-Z 0-9 . _ -, starting with a letter"
    )]
    BadName(String),
}

impl Ctid {
    pub fn new(v: u32) -> Result<Self, CtidError> {
        match v {
            0 => Err(CtidError::Zero),
            v if v > CTID_MAX => Err(CtidError::TooLarge(v.into())),
            v => Ok(Self(v)),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Ctid {
    type Error = CtidError;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Self::new(v)
    }
}

impl From<Ctid> for u32 {
    fn from(c: Ctid) -> u32 {
        c.0
    }
}

impl FromStr for Ctid {
    type Err = CtidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CtidError::NotNumber(s.to_string()));
        }
        let v: u64 = s.parse().map_err(|_| CtidError::TooLarge(u64::MAX))?;
        if v > u64::from(CTID_MAX) {
            return Err(CtidError::TooLarge(v));
        }
        Self::new(v as u32)
    }
}

impl fmt::Display for Ctid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Validates a CT name (`--name`). Names never look like numbers, so a CTID argument is unambiguous.
pub fn validate_name(name: &str) -> Result<(), CtidError> {
    let ok = (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CtidError::BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_range() {
        assert_eq!("101".parse::<Ctid>().unwrap().get(), 101);
        assert_eq!("999999999".parse::<Ctid>().unwrap().get(), CTID_MAX);
        assert_eq!("1".parse::<Ctid>().unwrap().get(), 1);
    }

    #[test]
    fn rejects_invalid() {
        assert_eq!("0".parse::<Ctid>(), Err(CtidError::Zero));
        assert_eq!(
            "1000000000".parse::<Ctid>(),
            Err(CtidError::TooLarge(1_000_000_000))
        );
        assert!(matches!("-1".parse::<Ctid>(), Err(CtidError::NotNumber(_))));
        assert!(matches!(
            "abc".parse::<Ctid>(),
            Err(CtidError::NotNumber(_))
        ));
        assert!(matches!("".parse::<Ctid>(), Err(CtidError::NotNumber(_))));
        assert!(matches!(
            "99999999999999999999999".parse::<Ctid>(),
            Err(CtidError::TooLarge(_))
        ));
    }

    #[test]
    fn names() {
        assert!(validate_name("web1").is_ok());
        assert!(validate_name("db-main.eu_2").is_ok());
        assert!(validate_name("1web").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
    }
}
