//! A CT's traffic shaping as configuration: `[shaping]` in `<root>/conf/<CTID>.toml`, the
//! shaping flags of `berth set` ([`ShapingChange`]) and the run state's live shaping. Rates and
//! sizes use tc's units and are validated before anything in the kernel changes; the shaper in
//! the `berth` crate applies them.
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

use crate::size::{Size, split_number};

/// A shaping value that cannot be used; names the flag (`--rate-in`) and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value:?}: {reason}")]
pub struct ShapingError {
    /// The command-line flag (the TOML key is the same with `_`, e.g. `rate_in`).
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

impl ShapingError {
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
    pub fn parse(flag: &'static str, s: &str) -> Result<Self, ShapingError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(ShapingError::new(flag, s, "empty rate"));
        }
        if t.starts_with('-') {
            return Err(ShapingError::new(flag, s, "a rate cannot be negative"));
        }
        let Some((n, unit)) = split_number(t) else {
            return Err(ShapingError::new(
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
                return Err(ShapingError::new(
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
            return Err(ShapingError::new(
                flag,
                s,
                "a rate must be greater than zero",
            ));
        }
        if bits > MAX_RATE_BPS as f64 {
            return Err(ShapingError::new(
                flag,
                s,
                "rate too large (at most 10tbit)",
            ));
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
    type Err = ShapingError;
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

/// `--rate-in` / `--rate-out` values: a rate, or `none` (no limit).
pub fn parse_optional_rate(flag: &'static str, s: &str) -> Result<Option<Rate>, ShapingError> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Rate::parse(flag, s).map(Some)
}

/// `--burst` values: a size in tc's syntax ([`Size::parse_tc`]), or `none` (the default
/// burst).
pub fn parse_optional_burst(flag: &'static str, s: &str) -> Result<Option<Size>, ShapingError> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Size::parse_tc(s)
        .map(Some)
        .map_err(|e| ShapingError::new(flag, s, e.why))
}

/// `burst` in TOML and JSON: tc's units (`"64kb"`), or a bare number of bytes.
mod burst_format {
    use super::*;

    pub fn serialize<S: Serializer>(b: &Option<Size>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.collect_str(&b.tc()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Size>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(Some(Size::Bytes(b))),
            Raw::Text(t) => Size::parse_tc(&t)
                .map(Some)
                .map_err(|e| de::Error::custom(ShapingError::new("burst", t, e.why))),
        }
    }
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
    /// `--class-rate CLASS:IN:OUT`, e.g. `1:1gbit:none`; `none` removes that direction's rate.
    pub fn parse(s: &str) -> Result<Self, ShapingError> {
        const FLAG: &str = "--class-rate";
        let parts: Vec<&str> = s.split(':').collect();
        let [class, rin, rout] = parts.as_slice() else {
            return Err(ShapingError::new(
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
                ShapingError::new(
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
///
/// The fields are declared in the order their keys sort: configs saved before this type existed
/// (through a TOML table, which sorts its keys) and configs saved now look the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingConfig {
    /// HTB burst (and cburst) of every class; default: 2 ms at the class's rate, at least
    /// 16 KiB (measured: smaller bursts lose rate at 1 Gbit/s to timer slack).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "burst_format"
    )]
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
    /// Total rate of traffic to the CT (all classes together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_in: Option<Rate>,
    /// Total rate of traffic from the CT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_out: Option<Rate>,
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

    /// `Some(self)` unless there is nothing to shape: what the lifecycle hands the shaper.
    pub fn non_empty(self) -> Option<Self> {
        (!self.is_empty()).then_some(self)
    }

    /// Checks what parsing cannot: burst at least one frame of the interface (`mtu` + the
    /// Ethernet header), packet rates in range, class numbers valid and unique.
    pub fn validate(&self, mtu: u32) -> Result<(), ShapingError> {
        if let Some(b) = self.burst {
            let frame = u64::from(mtu) + u64::from(berth_common::ETH_HLEN);
            if b.bytes().is_none_or(|b| b < frame) {
                return Err(ShapingError::new(
                    "--burst",
                    b.tc().to_string(),
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
                return Err(ShapingError::new(
                    flag,
                    p.to_string(),
                    format!("packet rate must be between 1 and {MAX_PPS} packets per second"),
                ));
            }
        }
        let mut seen = 0u32;
        for c in &self.classes {
            if u32::from(c.class) >= MAX_CLASSES {
                return Err(ShapingError::new(
                    "--class-rate",
                    c.to_string(),
                    format!("class must be a number from 0 to {}", MAX_CLASSES - 1),
                ));
            }
            if seen & (1 << c.class) != 0 {
                return Err(ShapingError::new(
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
    pub fn parse_pps(flag: &'static str, s: &str) -> Result<Option<u64>, ShapingError> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        if t.starts_with('-') {
            return Err(ShapingError::new(
                flag,
                s,
                "a packet rate cannot be negative",
            ));
        }
        let n: u64 = t.parse().map_err(|_| {
            ShapingError::new(flag, s, "not a packet rate (expected packets per second)")
        })?;
        if n == 0 || n > MAX_PPS {
            return Err(ShapingError::new(
                flag,
                s,
                format!("packet rate must be between 1 and {MAX_PPS} packets per second"),
            ));
        }
        Ok(Some(n))
    }
}

impl ShapingError {
    /// The `[shaping]` key the flag stands for (`--rate-in` → `rate_in`, `--class-rate` →
    /// `class`).
    pub fn key(&self) -> String {
        match self.flag {
            "--class-rate" => "class".into(),
            f => f.trim_start_matches("--").replace('-', "_"),
        }
    }
}

/// The shaping flags of one `berth set`: each `Some` replaces that setting (`Some(None)`
/// removes it), each class rate replaces that class's rates. Everything else of the CT's
/// shaping stays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShapingChange {
    /// `--rate-in RATE|none`.
    pub rate_in: Option<Option<Rate>>,
    /// `--rate-out RATE|none`.
    pub rate_out: Option<Option<Rate>>,
    /// `--burst SIZE|none`.
    pub burst: Option<Option<Size>>,
    /// `--class-rate CLASS:IN:OUT`, in the order given (a later one for the same class wins).
    pub class_rates: Vec<ClassRate>,
    /// `--pps-in N|none`.
    pub pps_in: Option<Option<u64>>,
    /// `--pps-out N|none`.
    pub pps_out: Option<Option<u64>>,
}

impl ShapingChange {
    /// No shaping flag was given.
    pub fn is_empty(&self) -> bool {
        self.rate_in.is_none()
            && self.rate_out.is_none()
            && self.burst.is_none()
            && self.class_rates.is_empty()
            && self.pps_in.is_none()
            && self.pps_out.is_none()
    }

    /// The CT's shaping after this change, on top of `base` (its current shaping), validated
    /// against [`DEFAULT_MTU`] (the shaper checks each interface's own MTU again). `None`: nothing
    /// is left to shape, so the CT ends up unshaped.
    pub fn merge(
        &self,
        base: Option<&ShapingConfig>,
    ) -> Result<Option<ShapingConfig>, ShapingError> {
        let mut sc = base.cloned().unwrap_or_default();
        if let Some(r) = self.rate_in {
            sc.rate_in = r;
        }
        if let Some(r) = self.rate_out {
            sc.rate_out = r;
        }
        if let Some(b) = self.burst {
            sc.burst = b;
        }
        for c in &self.class_rates {
            sc.set_class(*c);
        }
        if let Some(p) = self.pps_in {
            sc.pps_in = p;
        }
        if let Some(p) = self.pps_out {
            sc.pps_out = p;
        }
        sc.validate(DEFAULT_MTU)?;
        Ok(sc.non_empty())
    }
}

#[cfg(test)]
mod tests;
