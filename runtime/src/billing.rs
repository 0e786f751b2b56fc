//! A CT's billing settings as configuration: `[billing]` in `<root>/conf/<CTID>.toml`, the
//! billing flags of `berth create` and `berth set` ([`BillingChange`]). berthd reads them from
//! the config at every tick and hands them to the billing ledger (the `berth` crate's
//! `billing` module), which records when a change of the billing day or time zone takes effect.
//!
//! ```toml
//! [billing]
//! billing_day = 31          # 1–31 (clamped to short months) or "anniversary"; default 1
//! tz = "Europe/Berlin"      # IANA time zone of the period boundaries; default "UTC"
//! commit = "100mbit"        # committed rate in bit/s (slots over it are counted); default none
//! classes = [0, 1]          # network classes billed (95th and billed bytes); default all
//! ```
//!
//! Everything is validated here, where the config is loaded, so a hand-edited config with a bad
//! value is refused like a bad shaping rate is, naming the key. The time zone is checked against
//! jiff's bundled tz database, the same one the ledger computes periods with, so a zone the
//! config accepts is one the ledger knows.

use std::fmt;

use berth_common::MAX_CLASSES;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::shaping::Rate;
use crate::size::split_number;

/// A billing value that cannot be used; names the flag (`--billing-day`) and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value:?}: {reason}")]
pub struct BillingSettingError {
    /// The command-line flag (the TOML key is `billing.` and the flag's name with `_`).
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

fn err(flag: &'static str, value: &str, reason: impl Into<String>) -> BillingSettingError {
    BillingSettingError {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// What a CT's billing periods are anchored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BillingDay {
    /// Day of the month 1–31; months shorter than that start on their last day.
    Day(u8),
    /// The local day of the month the CT was first billed on.
    Anniversary,
}

impl Default for BillingDay {
    fn default() -> BillingDay {
        BillingDay::Day(1)
    }
}

impl BillingDay {
    /// `1`…`31` or `anniversary`.
    pub fn parse(flag: &'static str, s: &str) -> Result<BillingDay, BillingSettingError> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("anniversary") {
            return Ok(BillingDay::Anniversary);
        }
        let day: i64 = t
            .parse()
            .map_err(|_| err(flag, s, "expected a day of the month 1–31 or `anniversary`"))?;
        BillingDay::from_day(day).map_err(|reason| err(flag, s, reason))
    }

    fn from_day(day: i64) -> Result<BillingDay, String> {
        match u8::try_from(day) {
            Ok(d @ 1..=31) => Ok(BillingDay::Day(d)),
            _ => Err(format!(
                "billing day {day} is out of range: it must be 1–31 (clamped to short months) or `anniversary`"
            )),
        }
    }
}

impl fmt::Display for BillingDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BillingDay::Day(d) => write!(f, "{d}"),
            BillingDay::Anniversary => f.write_str("anniversary"),
        }
    }
}

impl Serialize for BillingDay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BillingDay::Day(d) => s.serialize_u8(*d),
            BillingDay::Anniversary => s.serialize_str("anniversary"),
        }
    }
}

impl<'de> Deserialize<'de> for BillingDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Day(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Day(n) => BillingDay::from_day(n).map_err(de::Error::custom),
            Raw::Text(t) if t == "anniversary" => Ok(BillingDay::Anniversary),
            Raw::Text(t) => Err(de::Error::custom(format!(
                "billing day {t:?} is neither a number 1–31 nor \"anniversary\""
            ))),
        }
    }
}

/// The canonical IANA name of time zone `s` (`europe/berlin` → `Europe/Berlin`), if jiff's
/// bundled database has it.
pub fn parse_tz(flag: &'static str, s: &str) -> Result<String, BillingSettingError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(err(flag, s, "empty time zone"));
    }
    let zone = jiff::tz::db().get(t).map_err(|_| {
        err(
            flag,
            s,
            "unknown time zone: use an IANA name such as UTC or Europe/Berlin",
        )
    })?;
    Ok(zone.iana_name().unwrap_or(t).to_string())
}

/// A commit rate in bits per second: a number with `k`, `M`, `G` or `T` (decimal, bits: `100M`
/// is 100,000,000 bit/s, as transit contracts write it), or any rate tc's syntax takes
/// (`100mbit`, `12500kbps`…, see [`Rate::parse`]); `none` removes it.
pub fn parse_commit(flag: &'static str, s: &str) -> Result<Option<Rate>, BillingSettingError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    const UNITS: &str = "use k, M, G or T (bit/s: 100M is 100,000,000 bit/s) or tc's units \
                         (100mbit, 12500kbps…)";
    let Some((n, unit)) = split_number(t) else {
        return Err(err(flag, s, format!("not a rate: {UNITS}")));
    };
    let mult = match unit.as_str() {
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        _ => {
            return Rate::parse(flag, t).map(Some).map_err(|e| {
                if e.reason.starts_with("unknown rate unit") {
                    err(flag, s, format!("unknown unit {unit:?}: {UNITS}"))
                } else {
                    BillingSettingError {
                        flag,
                        value: s.to_string(),
                        reason: e.reason,
                    }
                }
            });
        }
    };
    let bits = (n * mult).round();
    if bits < 1.0 || bits > crate::shaping::MAX_RATE_BPS as f64 {
        return Err(err(
            flag,
            s,
            "a commit rate must be between 1 bit/s and 10T bit/s",
        ));
    }
    let rate = Rate::from_bps(bits as u64).ok_or_else(|| err(flag, s, "out of range"))?;
    Ok(Some(rate))
}

/// The network classes billed: `0,1,3` or `all` (`None`). Each must be a class the datapath
/// counts (0 to `MAX_CLASSES` − 1), listed once.
pub fn parse_classes(flag: &'static str, s: &str) -> Result<Option<Vec<u8>>, BillingSettingError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("all") {
        return Ok(None);
    }
    let mut out = Vec::new();
    for part in t.split(',') {
        let p = part.trim();
        let c: u8 = p.parse().map_err(|_| {
            err(
                flag,
                s,
                format!("{p:?} is not a class number (expected e.g. 0,1 or all)"),
            )
        })?;
        out.push(c);
    }
    validate_classes(&out).map_err(|reason| err(flag, s, reason))?;
    Ok(Some(out))
}

fn validate_classes(classes: &[u8]) -> Result<(), String> {
    if classes.is_empty() {
        return Err("an empty class list would bill nothing (use `all` for every class)".into());
    }
    let mut seen = [false; 256];
    for &c in classes {
        if u32::from(c) >= MAX_CLASSES {
            return Err(format!(
                "class {c} does not exist: network classes are 0–{}",
                MAX_CLASSES - 1
            ));
        }
        if std::mem::replace(&mut seen[usize::from(c)], true) {
            return Err(format!("class {c} is listed twice"));
        }
    }
    Ok(())
}

/// `[billing]` of a CT config. Absent keys take the defaults: billing day 1, UTC, no commit
/// rate, every class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing_day: Option<BillingDay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<u8>>,
}

impl BillingConfig {
    pub fn is_empty(&self) -> bool {
        *self == BillingConfig::default()
    }

    pub fn day(&self) -> BillingDay {
        self.billing_day.unwrap_or_default()
    }

    pub fn tz(&self) -> &str {
        self.tz.as_deref().unwrap_or("UTC")
    }

    /// Checks the values a hand-edited config may hold (serde checked the billing day and the
    /// commit rate already); the error names the key.
    pub fn validate(&self) -> Result<(), BillingSettingError> {
        if let Some(tz) = &self.tz {
            parse_tz("billing.tz", tz)?;
        }
        if let Some(c) = &self.classes {
            validate_classes(c)
                .map_err(|reason| err("billing.classes", &format!("{c:?}"), reason))?;
        }
        Ok(())
    }
}

/// The billing flags of `set`; `None` = unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BillingChange {
    pub billing_day: Option<BillingDay>,
    /// A canonical IANA name ([`parse_tz`]).
    pub tz: Option<String>,
    /// `Some(None)`: remove the commit rate (`--commit none`).
    pub commit: Option<Option<Rate>>,
    /// `Some(None)`: every class (`--classes all`).
    pub classes: Option<Option<Vec<u8>>>,
}

impl BillingChange {
    pub fn is_empty(&self) -> bool {
        *self == BillingChange::default()
    }

    /// `cur` with the change applied, validated. Defaults are written out only when asked for
    /// (`--tz UTC` is kept as `tz = "UTC"`), so the config says what the user set.
    pub fn merge(&self, cur: &BillingConfig) -> Result<BillingConfig, BillingSettingError> {
        let mut b = cur.clone();
        if let Some(d) = self.billing_day {
            b.billing_day = Some(d);
        }
        if let Some(tz) = &self.tz {
            b.tz = Some(parse_tz("--tz", tz)?);
        }
        if let Some(c) = self.commit {
            b.commit = c;
        }
        if let Some(c) = &self.classes {
            if let Some(list) = c {
                validate_classes(list)
                    .map_err(|reason| err("--classes", &format!("{list:?}"), reason))?;
            }
            b.classes = c.clone();
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_days() {
        assert_eq!(
            BillingDay::parse("--billing-day", "31"),
            Ok(BillingDay::Day(31))
        );
        assert_eq!(
            BillingDay::parse("--billing-day", "anniversary"),
            Ok(BillingDay::Anniversary)
        );
        for bad in ["0", "32", "-1", "x", "", "1.5"] {
            let e = BillingDay::parse("--billing-day", bad).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("--billing-day {bad:?}: ")),
                "{e}"
            );
        }
        let e = BillingDay::parse("--billing-day", "32")
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range") && e.contains("1–31"), "{e}");
    }

    #[test]
    fn time_zones_are_canonical_and_unknown_ones_refused() {
        assert_eq!(parse_tz("--tz", "Europe/Berlin").unwrap(), "Europe/Berlin");
        assert_eq!(parse_tz("--tz", "europe/berlin").unwrap(), "Europe/Berlin");
        assert_eq!(parse_tz("--tz", "UTC").unwrap(), "UTC");
        let e = parse_tz("--tz", "Mars/Olympus").unwrap_err().to_string();
        assert!(
            e.starts_with("--tz \"Mars/Olympus\": unknown time zone"),
            "{e}"
        );
        assert!(parse_tz("--tz", " ").is_err());
    }

    #[test]
    fn commit_rates() {
        let bps = |s| {
            parse_commit("--commit", s)
                .unwrap()
                .map(|r| r.bits_per_sec())
        };
        assert_eq!(bps("100M"), Some(100_000_000));
        assert_eq!(bps("1.5G"), Some(1_500_000_000));
        assert_eq!(bps("250k"), Some(250_000));
        assert_eq!(bps("100mbit"), Some(100_000_000));
        assert_eq!(bps("1000"), Some(1000));
        assert_eq!(bps("none"), None);
        for bad in ["0", "0M", "-5M", "100X", "", "20T"] {
            let e = parse_commit("--commit", bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--commit {bad:?}: ")), "{bad}: {e}");
        }
    }

    #[test]
    fn class_lists() {
        assert_eq!(parse_classes("--classes", "all").unwrap(), None);
        assert_eq!(
            parse_classes("--classes", "0, 2").unwrap(),
            Some(vec![0, 2])
        );
        for (bad, why) in [
            ("16", "does not exist"),
            ("1,1", "twice"),
            ("", "not a class number"),
            ("a", "not a class number"),
            ("300", "not a class number"),
        ] {
            let e = parse_classes("--classes", bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn toml_round_trip_and_bad_keys() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct W {
            billing: BillingConfig,
        }
        let text = "[billing]\nbilling_day = 31\ntz = \"Europe/Berlin\"\ncommit = \"100mbit\"\nclasses = [0, 1]\n";
        let w: W = toml::from_str(text).unwrap();
        assert_eq!(w.billing.day(), BillingDay::Day(31));
        assert_eq!(w.billing.commit.unwrap().bits_per_sec(), 100_000_000);
        w.billing.validate().unwrap();
        assert_eq!(toml::to_string(&w).unwrap(), text);
        let a: W = toml::from_str("[billing]\nbilling_day = \"anniversary\"\n").unwrap();
        assert_eq!(a.billing.day(), BillingDay::Anniversary);
        assert_eq!(a.billing.tz(), "UTC");
        for bad in [
            "[billing]\nbilling_day = 0\n",
            "[billing]\nbilling_day = 32\n",
            "[billing]\nbilling_day = \"first\"\n",
            "[billing]\ncommit = \"fast\"\n",
            "[billing]\nday = 3\n",
        ] {
            assert!(toml::from_str::<W>(bad).is_err(), "{bad}");
        }
        let w: W = toml::from_str("[billing]\ntz = \"Nowhere/Atlantis\"\n").unwrap();
        let e = w.billing.validate().unwrap_err().to_string();
        assert!(e.starts_with("billing.tz \"Nowhere/Atlantis\""), "{e}");
        let w: W = toml::from_str("[billing]\nclasses = [3, 99]\n").unwrap();
        assert!(
            w.billing
                .validate()
                .unwrap_err()
                .to_string()
                .contains("class 99")
        );
    }

    #[test]
    fn a_change_merges_and_removes() {
        let cur = BillingConfig {
            commit: Rate::from_bps(1000),
            classes: Some(vec![1]),
            ..BillingConfig::default()
        };
        let ch = BillingChange {
            billing_day: Some(BillingDay::Day(15)),
            tz: Some("asia/tokyo".into()),
            commit: Some(None),
            classes: Some(None),
        };
        let b = ch.merge(&cur).unwrap();
        assert_eq!(b.billing_day, Some(BillingDay::Day(15)));
        assert_eq!(b.tz.as_deref(), Some("Asia/Tokyo"));
        assert_eq!(b.commit, None);
        assert_eq!(b.classes, None);
        assert!(b.validate().is_ok());
        let bad = BillingChange {
            tz: Some("Nowhere/Atlantis".into()),
            ..BillingChange::default()
        };
        assert!(bad.merge(&cur).is_err());
    }
}
