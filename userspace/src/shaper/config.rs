//! What a CT's shaping looks like in its config (`[shaping]` in `<root>/conf/<CTID>.toml`)
//! and on the command line: rates and sizes with tc's units, validated before anything in the
//! kernel changes.
//!
//! ```toml
//! [shaping]
//! rate_in = "100mbit"      # traffic to the CT
//! rate_out = "100mbit"     # traffic from the CT
//! burst = "64kb"
//! pps_in = 200000
//! pps_out = 200000
//! [[shaping.class]]        # network class 1 (networks_classes) gets rates of its own
//! class = 1
//! rate_in = "1gbit"
//! rate_out = "1gbit"
//! ```

use std::{fmt, str::FromStr};

use berth_common::MAX_CLASSES;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A configuration value that cannot be used; names the flag (`--rate-in`) and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value:?}: {reason}")]
pub struct ConfigError {
    /// The command-line flag (the TOML key is the same with `_`, e.g. `rate_in`).
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    fn new(flag: &'static str, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            flag,
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// The largest rate accepted: 10 Tbit/s (HTB takes 64-bit bytes per second; anything above
/// is a typo).
pub const MAX_RATE_BPS: u64 = 10_000_000_000_000;
/// The largest packet rate accepted: the GCRA spacing must stay at least 10 ns.
pub const MAX_PPS: u64 = 100_000_000;

/// Splits "1.5mbit" into (1.5, "mbit"); `None` when there is no leading number.
fn split_number(s: &str) -> Option<(f64, String)> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let n: f64 = s[..end].parse().ok()?;
    Some((n, s[end..].trim().to_ascii_lowercase()))
}

/// A rate in bits per second (of Ethernet frames, as HTB counts them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u64);

impl Rate {
    /// `bits` per second; `None` for 0 or above [`MAX_RATE_BPS`].
    pub fn from_bps(bits: u64) -> Option<Self> {
        (bits > 0 && bits <= MAX_RATE_BPS).then_some(Self(bits))
    }

    pub fn bits_per_sec(self) -> u64 {
        self.0
    }

    pub fn bytes_per_sec(self) -> u64 {
        self.0.div_ceil(8)
    }

    /// Parses tc's rate syntax: a number with `bit` (or none: bits/s), `kbit`, `mbit`, `gbit`,
    /// `tbit`, `kibit`…, or bytes per second: `bps`, `kbps`, `mbps`, `gbps`, `kibps`….
    /// `flag` names the option in the error.
    pub fn parse(flag: &'static str, s: &str) -> Result<Self, ConfigError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(ConfigError::new(flag, s, "empty rate"));
        }
        if t.starts_with('-') {
            return Err(ConfigError::new(flag, s, "a rate cannot be negative"));
        }
        let Some((n, unit)) = split_number(t) else {
            return Err(ConfigError::new(
                flag,
                s,
                "not a rate (expected a number with a unit like kbit, mbit, gbit, bps)",
            ));
        };
        let mult: f64 = match unit.as_str() {
            "" | "bit" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            "tbit" => 1e12,
            "kibit" => 1024.0,
            "mibit" => 1024.0 * 1024.0,
            "gibit" => 1024.0 * 1024.0 * 1024.0,
            "tibit" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            "bps" => 8.0,
            "kbps" => 8e3,
            "mbps" => 8e6,
            "gbps" => 8e9,
            "tbps" => 8e12,
            "kibps" => 8.0 * 1024.0,
            "mibps" => 8.0 * 1024.0 * 1024.0,
            "gibps" => 8.0 * 1024.0 * 1024.0 * 1024.0,
            "tibps" => 8.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
            other => {
                return Err(ConfigError::new(
                    flag,
                    s,
                    format!(
                        "unknown rate unit {other:?} (use bit, kbit, mbit, gbit, tbit, \
                         kibit…, or bytes per second: bps, kbps, mbps, gbps…)"
                    ),
                ));
            }
        };
        let bits = (n * mult).round();
        if bits < 1.0 {
            return Err(ConfigError::new(
                flag,
                s,
                "a rate must be greater than zero",
            ));
        }
        if bits > MAX_RATE_BPS as f64 {
            return Err(ConfigError::new(flag, s, "rate too large (at most 10tbit)"));
        }
        Ok(Self(bits as u64))
    }
}

impl fmt::Display for Rate {
    /// The largest decimal unit that shows the rate exactly ("10mbit", "1500kbit", "7bit").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (div, unit) in [
            (1_000_000_000_000, "tbit"),
            (1_000_000_000, "gbit"),
            (1_000_000, "mbit"),
            (1_000, "kbit"),
        ] {
            if self.0.is_multiple_of(div) {
                return write!(f, "{}{unit}", self.0 / div);
            }
        }
        write!(f, "{}bit", self.0)
    }
}

impl FromStr for Rate {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("rate", s)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bits(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bits(b) => Rate::from_bps(b).ok_or_else(|| {
                de::Error::custom(format!(
                    "rate {b}: must be between 1 and {MAX_RATE_BPS} bits per second"
                ))
            }),
            Raw::Text(t) => Rate::parse("rate", &t).map_err(de::Error::custom),
        }
    }
}

/// A size in bytes (burst), tc's syntax: bare or `b` = bytes, `k`/`kb`/`kib`, `m`/`mb`/`mib`,
/// `g`/`gb`/`gib` (all powers of 1024, as tc reads them), `kbit`/`mbit`/`gbit` = bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(u64);

impl Size {
    pub fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    pub fn parse(flag: &'static str, s: &str) -> Result<Self, ConfigError> {
        let t = s.trim();
        if t.starts_with('-') {
            return Err(ConfigError::new(flag, s, "a size cannot be negative"));
        }
        let Some((n, unit)) = split_number(t) else {
            return Err(ConfigError::new(
                flag,
                s,
                "not a size (expected a number with a unit like b, kb, mb)",
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
                return Err(ConfigError::new(
                    flag,
                    s,
                    format!("unknown size unit {other:?} (use b, kb, mb, gb, kbit, mbit)"),
                ));
            }
        };
        let bytes = (n * mult).round();
        if bytes < 1.0 {
            return Err(ConfigError::new(
                flag,
                s,
                "a size must be greater than zero",
            ));
        }
        if bytes > f64::from(u32::MAX) {
            return Err(ConfigError::new(flag, s, "size too large (at most 4gb)"));
        }
        Ok(Self(bytes as u64))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (div, unit) in [(1 << 30, "gb"), (1 << 20, "mb"), (1 << 10, "kb")] {
            if self.0.is_multiple_of(div) {
                return write!(f, "{}{unit}", self.0 / div);
            }
        }
        write!(f, "{}b", self.0)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(Size(b)),
            Raw::Text(t) => Size::parse("burst", &t).map_err(de::Error::custom),
        }
    }
}

/// `--rate-in` / `--rate-out` values: a rate, or `none` (no limit).
pub fn parse_optional_rate(flag: &'static str, s: &str) -> Result<Option<Rate>, ConfigError> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Rate::parse(flag, s).map(Some)
}

/// Rates of one network class (`networks_classes`), from the CT's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassRate {
    pub class: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_in: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_out: Option<Rate>,
}

impl ClassRate {
    /// `--class-rate CLASS:IN:OUT`, e.g. `1:1gbit:none`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        const FLAG: &str = "--class-rate";
        let parts: Vec<&str> = s.split(':').collect();
        let [class, rin, rout] = parts.as_slice() else {
            return Err(ConfigError::new(
                FLAG,
                s,
                "expected CLASS:IN:OUT (e.g. 1:100mbit:none)",
            ));
        };
        let class: u8 = class
            .trim()
            .parse()
            .ok()
            .filter(|c| u32::from(*c) < MAX_CLASSES)
            .ok_or_else(|| {
                ConfigError::new(
                    FLAG,
                    s,
                    format!("class must be a number from 0 to {}", MAX_CLASSES - 1),
                )
            })?;
        Ok(Self {
            class,
            rate_in: parse_optional_rate(FLAG, rin)?,
            rate_out: parse_optional_rate(FLAG, rout)?,
        })
    }
}

impl fmt::Display for ClassRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |r: Option<Rate>| r.map_or("none".to_owned(), |r| r.to_string());
        write!(
            f,
            "{}:{}:{}",
            self.class,
            show(self.rate_in),
            show(self.rate_out)
        )
    }
}

/// A CT's shaping, from its point of view: `in` = traffic delivered to the CT, `out` =
/// traffic it sends. Everything `None`/empty means unshaped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingConfig {
    /// Total rate of traffic to the CT (all classes together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_in: Option<Rate>,
    /// Total rate of traffic from the CT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_out: Option<Rate>,
    /// HTB burst (and cburst) of every class; default: 2 ms at the class's rate, at least
    /// 16 KiB (measured: smaller bursts lose rate at 1 Gbit/s to timer slack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<Size>,
    /// Per-network-class rates.
    #[serde(default, rename = "class", skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassRate>,
    /// Packet-rate limit of traffic to the CT (packets per second; over-limit packets are
    /// dropped, reason `pps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pps_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pps_out: Option<u64>,
}

/// The smallest MTU a burst is checked against when the interface's is unknown.
pub const DEFAULT_MTU: u32 = 1500;

impl ShapingConfig {
    /// Nothing to shape or limit.
    pub fn is_empty(&self) -> bool {
        self.rate_in.is_none()
            && self.rate_out.is_none()
            && self.pps_in.is_none()
            && self.pps_out.is_none()
            && self
                .classes
                .iter()
                .all(|c| c.rate_in.is_none() && c.rate_out.is_none())
    }

    /// Checks what parsing cannot: burst at least one frame of the interface (`mtu` + the
    /// Ethernet header), packet rates in range, class numbers valid and unique.
    pub fn validate(&self, mtu: u32) -> Result<(), ConfigError> {
        if let Some(b) = self.burst {
            let frame = u64::from(mtu) + u64::from(berth_common::ETH_HLEN);
            if b.bytes() < frame {
                return Err(ConfigError::new(
                    "--burst",
                    b.to_string(),
                    format!(
                        "burst must hold at least one frame: {frame} bytes (MTU {mtu} + \
                         Ethernet header)"
                    ),
                ));
            }
        }
        for (flag, pps) in [("--pps-in", self.pps_in), ("--pps-out", self.pps_out)] {
            if let Some(p) = pps
                && (p == 0 || p > MAX_PPS)
            {
                return Err(ConfigError::new(
                    flag,
                    p.to_string(),
                    format!("packet rate must be between 1 and {MAX_PPS} packets per second"),
                ));
            }
        }
        let mut seen = 0u32;
        for c in &self.classes {
            if u32::from(c.class) >= MAX_CLASSES {
                return Err(ConfigError::new(
                    "--class-rate",
                    c.to_string(),
                    format!("class must be a number from 0 to {}", MAX_CLASSES - 1),
                ));
            }
            if seen & (1 << c.class) != 0 {
                return Err(ConfigError::new(
                    "--class-rate",
                    c.to_string(),
                    "class given twice",
                ));
            }
            seen |= 1 << c.class;
        }
        Ok(())
    }

    /// Sets (or with `None` removes) the rates of one class.
    pub fn set_class(&mut self, rate: ClassRate) {
        self.classes.retain(|c| c.class != rate.class);
        if rate.rate_in.is_some() || rate.rate_out.is_some() {
            self.classes.push(rate);
            self.classes.sort_by_key(|c| c.class);
        }
    }

    /// Packets-per-second argument (`--pps-in N`, `none` removes the limit).
    pub fn parse_pps(flag: &'static str, s: &str) -> Result<Option<u64>, ConfigError> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        if t.starts_with('-') {
            return Err(ConfigError::new(
                flag,
                s,
                "a packet rate cannot be negative",
            ));
        }
        let n: u64 = t.parse().map_err(|_| {
            ConfigError::new(flag, s, "not a packet rate (expected packets per second)")
        })?;
        if n == 0 || n > MAX_PPS {
            return Err(ConfigError::new(
                flag,
                s,
                format!("packet rate must be between 1 and {MAX_PPS} packets per second"),
            ));
        }
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_like_tc() {
        let r = |s| Rate::parse("--rate-in", s).map(Rate::bits_per_sec);
        assert_eq!(r("10mbit"), Ok(10_000_000));
        assert_eq!(r("10Mbit"), Ok(10_000_000));
        assert_eq!(r("1.5gbit"), Ok(1_500_000_000));
        assert_eq!(r("100kbit"), Ok(100_000));
        assert_eq!(r("1000"), Ok(1000));
        assert_eq!(r("1000bit"), Ok(1000));
        assert_eq!(r("125bps"), Ok(1000));
        assert_eq!(r("1mbps"), Ok(8_000_000));
        assert_eq!(r("1kibit"), Ok(1024));
        assert_eq!(r("1mibps"), Ok(8 * 1024 * 1024));
    }

    #[test]
    fn bad_rates_name_the_flag() {
        for bad in [
            "0",
            "0mbit",
            "-5mbit",
            "fast",
            "10 parsecs",
            "",
            "10xbit",
            "0.0001bit",
        ] {
            let e = Rate::parse("--rate-out", bad).unwrap_err();
            assert_eq!(e.flag, "--rate-out", "{bad}");
            assert!(e.to_string().starts_with("--rate-out"), "{e}");
        }
        assert!(
            Rate::parse("--rate-in", "-1mbit")
                .unwrap_err()
                .reason
                .contains("negative")
        );
        assert!(
            Rate::parse("--rate-in", "0")
                .unwrap_err()
                .reason
                .contains("greater than zero")
        );
        assert!(Rate::parse("--rate-in", "20tbit").is_err());
    }

    #[test]
    fn rates_display_round_trip() {
        for s in ["10mbit", "1gbit", "1500kbit", "7bit", "10tbit"] {
            assert_eq!(Rate::parse("x", s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn sizes_parse_like_tc() {
        let z = |s| Size::parse("--burst", s).map(Size::bytes);
        assert_eq!(z("1514"), Ok(1514));
        assert_eq!(z("64kb"), Ok(65536));
        assert_eq!(z("64k"), Ok(65536));
        assert_eq!(z("1mb"), Ok(1 << 20));
        assert_eq!(z("8kbit"), Ok(1024));
        assert!(z("-1kb").is_err());
        assert!(z("0").is_err());
        assert!(z("lots").is_err());
    }

    #[test]
    fn class_rates_parse() {
        let c = ClassRate::parse("1:100mbit:none").unwrap();
        assert_eq!(c.class, 1);
        assert_eq!(c.rate_in, Some(Rate(100_000_000)));
        assert_eq!(c.rate_out, None);
        assert_eq!(c.to_string(), "1:100mbit:none");
        assert!(ClassRate::parse("16:1mbit:1mbit").is_err());
        assert!(ClassRate::parse("1:1mbit").is_err());
        assert_eq!(
            ClassRate::parse("1:0:1mbit").unwrap_err().flag,
            "--class-rate"
        );
    }

    #[test]
    fn validation_rejects_small_burst_and_zero_pps() {
        let mut c = ShapingConfig {
            rate_in: Some(Rate(10_000_000)),
            burst: Some(Size(1000)),
            ..Default::default()
        };
        let e = c.validate(1500).unwrap_err();
        assert_eq!(e.flag, "--burst");
        assert!(e.reason.contains("1514"), "{e}");
        c.burst = Some(Size(1514));
        c.validate(1500).unwrap();
        c.pps_in = Some(0);
        assert_eq!(c.validate(1500).unwrap_err().flag, "--pps-in");
        assert_eq!(
            ShapingConfig::parse_pps("--pps-out", "-3")
                .unwrap_err()
                .flag,
            "--pps-out"
        );
        assert_eq!(ShapingConfig::parse_pps("--pps-out", "none"), Ok(None));
    }

    #[test]
    fn toml_round_trip() {
        let text = r#"
            rate_in = "100mbit"
            rate_out = 5000000
            burst = "64kb"
            pps_in = 1000
            [[class]]
            class = 1
            rate_in = "1gbit"
        "#;
        let c: ShapingConfig = toml::from_str(text).unwrap();
        assert_eq!(c.rate_out, Some(Rate(5_000_000)));
        assert_eq!(c.burst, Some(Size(65536)));
        assert_eq!(c.classes[0].rate_in, Some(Rate(1_000_000_000)));
        let back: ShapingConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(toml::from_str::<ShapingConfig>("rate_in = \"0\"").is_err());
        assert!(toml::from_str::<ShapingConfig>("rate_in = 0").is_err());
        assert!(toml::from_str::<ShapingConfig>("rate_inn = \"1mbit\"").is_err());
    }
}
