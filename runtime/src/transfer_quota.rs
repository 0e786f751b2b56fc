//! A CT's transfer quota as configuration: `[quota]` in `<root>/conf/<CTID>.toml` and the
//! `--quota-*` flags of `berth create` and `berth set` ([`QuotaChange`]). berthd reads it from
//! the saved config at every ledger tick and runs the quota state machine (the `berth` crate's
//! `quota` module) on the period's totals. (`crate::quota` is the disk quota, `--diskspace`.)
//!
//! ```toml
//! [quota]
//! transfer = "2TB"            # soft limit per billing period; TB = 10^12, TiB = 2^40
//! count = "out"               # out | in | both (in + out) | max (the larger); default out
//! classes = [1, 2]            # network classes counted; default every class but 0
//! soft_action = "throttle"    # at `transfer`: throttle (needs a throttle rate); default none
//! throttle_rate_in = "10mbit" # tc rate units, as [shaping]
//! throttle_rate_out = "10mbit"
//! hard = "2.2TB"              # at `hard`: `hard_action`; at least `transfer`
//! hard_action = "cut"         # cut | suspend | stop | none
//! notify = [80, 90, 100]      # percent of `transfer` that send a webhook event once per period
//! webhook = "http://panel.example:8080/berth"
//! ```
//!
//! Every value is validated where the config is loaded and where a flag is parsed; the error
//! names the key or flag and the value.

use std::fmt;

use berth_common::MAX_CLASSES;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::shaping::Rate;
use crate::size::split_number;

/// A quota value that cannot be used; names the flag (`--quota-hard`) or key and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value:?}: {reason}")]
pub struct QuotaSettingError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

fn err(flag: &'static str, value: &str, reason: impl Into<String>) -> QuotaSettingError {
    QuotaSettingError {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A number of bytes written with a decimal (`GB` = 10^9) or binary (`GiB` = 2^30) unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub u64);

const UNITS: [(&str, u64); 13] = [
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("pb", 1_000_000_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("pib", 1 << 50),
    ("k", 1_000),
    ("", 1),
];

impl Bytes {
    /// `2TB`, `1.5GiB`, `500MB`, `4096` (bytes). A transfer of 0 bytes is refused.
    pub fn parse(flag: &'static str, s: &str) -> Result<Bytes, QuotaSettingError> {
        const HELP: &str = "use B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 2TB";
        let t = s.trim();
        if t.starts_with('-') {
            return Err(err(flag, s, "a size cannot be negative"));
        }
        let Some((n, unit)) = split_number(t) else {
            return Err(err(flag, s, format!("not a size: {HELP}")));
        };
        let Some(&(_, mult)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(err(flag, s, format!("unknown unit {unit:?}: {HELP}")));
        };
        let v = (n * mult as f64).round();
        if !v.is_finite() || v >= u64::MAX as f64 {
            return Err(err(flag, s, "too large"));
        }
        if v < 1.0 {
            return Err(err(flag, s, "a quota must be at least 1 byte"));
        }
        Ok(Bytes(v as u64))
    }
}

impl fmt::Display for Bytes {
    /// The largest unit that writes the value exactly (`2TB`, `3GiB`, `12345B`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        for (u, m) in [
            ("PiB", 1u64 << 50),
            ("PB", 1_000_000_000_000_000),
            ("TiB", 1 << 40),
            ("TB", 1_000_000_000_000),
            ("GiB", 1 << 30),
            ("GB", 1_000_000_000),
            ("MiB", 1 << 20),
            ("MB", 1_000_000),
            ("KiB", 1 << 10),
            ("kB", 1_000),
        ] {
            if v >= m && v.is_multiple_of(m) {
                return write!(f, "{}{u}", v / m);
            }
        }
        write!(f, "{v}B")
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Bytes::parse("quota size", &s).map_err(|e| de::Error::custom(e.reason))
    }
}

macro_rules! word_enum {
    ($(#[$m:meta])* $name:ident, $flag:literal, { $($v:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($v),* }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),* }
            }
            pub fn parse(flag: &'static str, s: &str) -> Result<$name, QuotaSettingError> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($s => Ok($name::$v),)*
                    _ => Err(err(flag, s, concat!("unknown ", $flag, ": use one of ", $($s, " "),*).trim_end().to_string())),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

word_enum!(
    /// Which direction's bytes count toward the quota.
    Count, "count", { Out = "out", In = "in", Both = "both", Max = "max" }
);
word_enum!(
    /// What happens at the soft limit (`transfer`).
    SoftAction, "soft action", { Throttle = "throttle", None = "none" }
);
word_enum!(
    /// What happens at the hard limit: drop in eBPF (`cut`, class 0 still passes), freeze the
    /// CT (`suspend`), stop it (`stop`), or nothing but the notification (`none`).
    HardAction, "hard action", { Cut = "cut", Suspend = "suspend", Stop = "stop", None = "none" }
);

/// `http://host[:port]/path` or `https://…` (berthd verifies the server's certificate and name
/// against the system's trust store and its `--webhook-ca`). Returns the URL trimmed.
pub fn parse_webhook(flag: &'static str, s: &str) -> Result<String, QuotaSettingError> {
    let t = s.trim();
    let Some(rest) = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
    else {
        return Err(err(
            flag,
            s,
            "not a URL: expected http://host[:port]/path or https://host[:port]/path",
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(err(flag, s, "the URL has no host (or has user info)"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Err(err(flag, s, "unterminated IPv6 address"));
        };
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'))
    {
        return Err(err(flag, s, format!("bad host {host:?}")));
    }
    if let Some(p) = port
        && !matches!(p.parse::<u16>(), Ok(1..))
    {
        return Err(err(flag, s, format!("bad port {p:?}")));
    }
    if t.bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(err(flag, s, "the URL contains whitespace"));
    }
    Ok(t.to_string())
}

/// `80,90,100`: percent of `transfer`, each 1–1000, listed once (sorted).
pub fn parse_notify(flag: &'static str, s: &str) -> Result<Vec<u16>, QuotaSettingError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for p in t.split(',') {
        let v: u16 = p
            .trim()
            .trim_end_matches('%')
            .parse()
            .map_err(|_| err(flag, s, format!("{p:?} is not a percentage")))?;
        out.push(v);
    }
    validate_notify(&out).map_err(|r| err(flag, s, r))?;
    out.sort_unstable();
    Ok(out)
}

fn validate_notify(v: &[u16]) -> Result<(), String> {
    for (i, &p) in v.iter().enumerate() {
        if !(1..=1000).contains(&p) {
            return Err(format!("{p}% is out of range 1–1000"));
        }
        if v[..i].contains(&p) {
            return Err(format!("{p}% is listed twice"));
        }
    }
    Ok(())
}

fn validate_classes(c: &[u8]) -> Result<(), String> {
    if c.is_empty() {
        return Err("an empty class list would count nothing".into());
    }
    for (i, &x) in c.iter().enumerate() {
        if u32::from(x) >= MAX_CLASSES {
            return Err(format!(
                "class {x} does not exist: network classes are 0–{}",
                MAX_CLASSES - 1
            ));
        }
        if c[..i].contains(&x) {
            return Err(format!("class {x} is listed twice"));
        }
    }
    Ok(())
}

/// `[quota]` of a CT config. No `transfer`: no quota (the other keys are kept but unused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<Count>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_action: Option<SoftAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_rate_in: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_rate_out: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard: Option<Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_action: Option<HardAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

impl QuotaConfig {
    pub fn is_empty(&self) -> bool {
        *self == QuotaConfig::default()
    }

    pub fn count(&self) -> Count {
        self.count.unwrap_or(Count::Out)
    }

    /// Whether class `class` counts: the listed ones, by default every class but 0 (the node's
    /// own networks: panel, DNS, mirrors).
    pub fn counts_class(&self, class: u8) -> bool {
        match &self.classes {
            Some(c) => c.contains(&class),
            None => class != 0,
        }
    }

    pub fn soft_action(&self) -> SoftAction {
        self.soft_action.unwrap_or(if self.throttles() {
            SoftAction::Throttle
        } else {
            SoftAction::None
        })
    }

    fn throttles(&self) -> bool {
        self.throttle_rate_in.is_some() || self.throttle_rate_out.is_some()
    }

    /// The hard action; `cut` when a hard limit is set without one.
    pub fn hard_action(&self) -> HardAction {
        self.hard_action.unwrap_or(HardAction::Cut)
    }

    pub fn notify(&self) -> &[u16] {
        self.notify.as_deref().unwrap_or(&[])
    }

    /// Checks the combination (a hand-edited config or a merged `set`); the error names the key.
    pub fn validate(&self) -> Result<(), QuotaSettingError> {
        let show = |b: Option<Bytes>| b.map(|b| b.to_string()).unwrap_or_default();
        if let (Some(t), Some(h)) = (self.transfer, self.hard)
            && h < t
        {
            return Err(err(
                "quota.hard",
                &h.to_string(),
                format!("the hard limit is below the transfer quota {t}"),
            ));
        }
        if self.transfer.is_none() && (self.hard.is_some() || self.throttles()) {
            return Err(err(
                "quota.transfer",
                &show(self.transfer),
                "a hard limit or a throttle rate needs a transfer quota",
            ));
        }
        if self.soft_action == Some(SoftAction::Throttle) && !self.throttles() {
            return Err(err(
                "quota.soft_action",
                "throttle",
                "throttle needs throttle_rate_in or throttle_rate_out (--quota-throttle RATE[:RATE])",
            ));
        }
        if let Some(c) = &self.classes {
            validate_classes(c).map_err(|r| err("quota.classes", &format!("{c:?}"), r))?;
        }
        if let Some(n) = &self.notify {
            validate_notify(n).map_err(|r| err("quota.notify", &format!("{n:?}"), r))?;
        }
        if let Some(w) = &self.webhook {
            parse_webhook("quota.webhook", w)?;
        }
        Ok(())
    }
}

/// The quota flags of `create` and `set`; `None` = unchanged, `Some(None)` = removed (`none`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaChange {
    /// `--quota-transfer none` removes the whole quota.
    pub transfer: Option<Option<Bytes>>,
    pub count: Option<Count>,
    pub classes: Option<Option<Vec<u8>>>,
    /// `--quota-throttle IN[:OUT]` (one rate: both directions; `none`: no throttle).
    pub throttle: Option<(Option<Rate>, Option<Rate>)>,
    pub hard: Option<Option<Bytes>>,
    pub hard_action: Option<HardAction>,
    pub notify: Option<Vec<u16>>,
    pub webhook: Option<Option<String>>,
}

impl QuotaChange {
    pub fn is_empty(&self) -> bool {
        *self == QuotaChange::default()
    }

    /// `cur` with the change applied, validated.
    pub fn merge(&self, cur: &QuotaConfig) -> Result<QuotaConfig, QuotaSettingError> {
        if self.transfer == Some(None) {
            let rest = QuotaChange {
                transfer: None,
                ..self.clone()
            };
            if !rest.is_empty() {
                return Err(err(
                    "--quota-transfer",
                    "none",
                    "removes the whole quota and takes no other --quota-* flag",
                ));
            }
            return Ok(QuotaConfig::default());
        }
        let mut q = cur.clone();
        if let Some(t) = self.transfer {
            q.transfer = t;
        }
        if let Some(c) = self.count {
            q.count = Some(c);
        }
        if let Some(c) = &self.classes {
            q.classes = c.clone();
        }
        if let Some((i, o)) = self.throttle {
            q.throttle_rate_in = i;
            q.throttle_rate_out = o;
            q.soft_action = Some(if i.is_some() || o.is_some() {
                SoftAction::Throttle
            } else {
                SoftAction::None
            });
        }
        if let Some(h) = self.hard {
            q.hard = h;
        }
        if let Some(a) = self.hard_action {
            q.hard_action = Some(a);
        }
        if let Some(n) = &self.notify {
            q.notify = (!n.is_empty()).then(|| n.clone());
        }
        if let Some(w) = &self.webhook {
            q.webhook = w.clone();
        }
        // The flags' names, not the keys': the user typed flags.
        q.validate().map_err(|mut e| {
            e.flag = match e.flag {
                "quota.hard" => "--quota-hard",
                "quota.transfer" => "--quota-transfer",
                "quota.soft_action" => "--quota-throttle",
                "quota.classes" => "--quota-classes",
                "quota.notify" => "--quota-notify",
                "quota.webhook" => "--quota-webhook",
                other => other,
            };
            e
        })?;
        Ok(q)
    }
}

/// `--quota-throttle RATE` (both directions), `IN:OUT` (either may be `none`), or `none`.
pub fn parse_throttle(
    flag: &'static str,
    s: &str,
) -> Result<(Option<Rate>, Option<Rate>), QuotaSettingError> {
    let one = |p: &str| -> Result<Option<Rate>, QuotaSettingError> {
        if p.trim().eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        Rate::parse(flag, p)
            .map(Some)
            .map_err(|e| err(flag, s, e.reason))
    };
    match s.split_once(':') {
        Some((i, o)) => Ok((one(i)?, one(o)?)),
        None => {
            let r = one(s)?;
            Ok((r, r))
        }
    }
}

/// `--quota-classes 1,2` or `all` (every class, 0 included) or `default` (all but 0).
pub fn parse_classes(flag: &'static str, s: &str) -> Result<Option<Vec<u8>>, QuotaSettingError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("default") {
        return Ok(None);
    }
    if t.eq_ignore_ascii_case("all") {
        return Ok(Some((0..MAX_CLASSES as u8).collect()));
    }
    let mut out = Vec::new();
    for p in t.split(',') {
        out.push(
            p.trim()
                .parse::<u8>()
                .map_err(|_| err(flag, s, format!("{p:?} is not a class number")))?,
        );
    }
    validate_classes(&out).map_err(|r| err(flag, s, r))?;
    Ok(Some(out))
}

/// An optional size flag: `none` removes it.
pub fn parse_optional_bytes(
    flag: &'static str,
    s: &str,
) -> Result<Option<Bytes>, QuotaSettingError> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Bytes::parse(flag, s).map(Some)
}

/// An optional webhook flag: `none` removes it.
pub fn parse_optional_webhook(
    flag: &'static str,
    s: &str,
) -> Result<Option<String>, QuotaSettingError> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    parse_webhook(flag, s).map(Some)
}

#[cfg(test)]
#[path = "transfer_quota_tests.rs"]
mod tests;
