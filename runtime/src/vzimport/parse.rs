//! Reading OpenVZ's shell-style config files (`CTID.conf`, `vz.conf`) without a shell.
//!
//! vzctl itself reads these files line by line rather than sourcing them, and so does this
//! parser: `KEY="value"`, `KEY='value'` or `KEY=value`, comments, and `$VEID` / `${VEID}`
//! expanded to the CT's ID. Anything a shell would execute or expand otherwise (backquotes,
//! `$(...)`, other variables) is refused naming the file, line and key, never run.
//!
//! Values: [`Quantity`] for numbers with vzctl's suffixes (`T`/`G`/`M`/`K` powers of 1024 in
//! bytes, `P` pages, `B` bytes, decimals like `2.2G`, `unlimited` and LONG_MAX), and
//! [`parse_pair`] for `barrier:limit`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The page size of OpenVZ's `*PAGES` parameters (x86: 4 KiB).
pub const PAGE: u64 = 4096;
/// vzctl's "unlimited" for 64-bit beancounters.
pub const LONG_MAX: u64 = i64::MAX as u64;

/// A config line that cannot be read: where it is and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {}{msg}", file.display(), key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ParseError {
    pub file: PathBuf,
    pub line: usize,
    pub key: Option<String>,
    pub msg: String,
}

/// One `KEY=value` setting and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub value: String,
    pub file: PathBuf,
    pub line: usize,
}

impl Setting {
    /// An error about this setting, naming its file, line and key.
    pub fn error(&self, key: &str, msg: impl Into<String>) -> ParseError {
        ParseError {
            file: self.file.clone(),
            line: self.line,
            key: Some(key.to_string()),
            msg: msg.into(),
        }
    }
}

/// A parsed config file: the last setting of each key wins, as in a shell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VzFile {
    pub path: PathBuf,
    pub settings: BTreeMap<String, Setting>,
}

impl VzFile {
    pub fn get(&self, key: &str) -> Option<&Setting> {
        self.settings.get(key)
    }
}

/// Parses `text` (the contents of `path`); `veid` is what `$VEID` expands to (none in the global
/// `vz.conf`, where `$VEID` stays as written so each CT can expand it later).
pub fn parse(path: &Path, text: &str, veid: Option<u32>) -> Result<VzFile, ParseError> {
    let mut out = VzFile {
        path: path.to_path_buf(),
        settings: BTreeMap::new(),
    };
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |key: Option<&str>, msg: String| ParseError {
            file: path.to_path_buf(),
            line,
            key: key.map(str::to_string),
            msg,
        };
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let l = l.strip_prefix("export ").map_or(l, str::trim_start);
        let Some((key, rest)) = l.split_once('=') else {
            return Err(err(None, format!("expected KEY=\"value\", found {l:?}")));
        };
        let valid_key = key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_key {
            return Err(err(None, format!("invalid key {key:?}")));
        }
        let value = parse_value(rest, veid).map_err(|m| err(Some(key), m))?;
        out.settings.insert(
            key.to_string(),
            Setting {
                value,
                file: path.to_path_buf(),
                line,
            },
        );
    }
    Ok(out)
}

/// The value after `=`: quoted or bare, then nothing but blanks or a comment.
fn parse_value(rest: &str, veid: Option<u32>) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = rest.chars().peekable();
    match chars.peek() {
        Some('"') => {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some(e @ ('"' | '\\' | '$' | '`')) => out.push(e),
                        Some('\n') | None => {}
                        Some(o) => {
                            out.push('\\');
                            out.push(o);
                        }
                    },
                    '$' => expand(&mut chars, &mut out, veid)?,
                    '`' => return Err("command substitution (`...`) is not evaluated".into()),
                    c => out.push(c),
                }
            }
            if !closed {
                return Err("unterminated double quote".into());
            }
        }
        Some('\'') => {
            chars.next();
            let mut closed = false;
            for c in chars.by_ref() {
                if c == '\'' {
                    closed = true;
                    break;
                }
                out.push(c);
            }
            if !closed {
                return Err("unterminated single quote".into());
            }
        }
        _ => {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '#' {
                    break;
                }
                chars.next();
                match c {
                    '$' => expand(&mut chars, &mut out, veid)?,
                    '`' => return Err("command substitution (`...`) is not evaluated".into()),
                    '"' | '\'' | ';' | '&' | '|' | '<' | '>' | '(' | ')' => {
                        return Err(format!("{c:?} in an unquoted value"));
                    }
                    c => out.push(c),
                }
            }
        }
    }
    let tail: String = chars.collect();
    let tail = tail.trim_start();
    if !tail.is_empty() && !tail.starts_with('#') {
        return Err(format!("unexpected {tail:?} after the value"));
    }
    Ok(out)
}

/// After a `$`: `VEID` or `{VEID}` becomes the CT's ID; nothing else is expanded.
fn expand(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    out: &mut String,
    veid: Option<u32>,
) -> Result<(), String> {
    let braced = chars.peek() == Some(&'{');
    if braced {
        chars.next();
    }
    if chars.peek() == Some(&'(') {
        return Err("command substitution ($(...)) is not evaluated".into());
    }
    let mut name = String::new();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_alphanumeric() || c == '_' {
            name.push(c);
            chars.next();
        } else {
            break;
        }
    }
    if braced && chars.next() != Some('}') {
        return Err(format!("unsupported expansion ${{{name}...}}"));
    }
    if name.is_empty() {
        out.push('$');
        return Ok(());
    }
    if name != "VEID" && name != "CTID" {
        return Err(format!("variable ${name} is not expanded (only $VEID is)"));
    }
    match veid {
        Some(v) => out.push_str(&v.to_string()),
        None => out.push_str("$VEID"),
    }
    Ok(())
}

/// Replaces `$VEID` left in a global setting (`VE_PRIVATE=/vz/private/$VEID`).
pub fn expand_veid(value: &str, veid: u32) -> String {
    value
        .replace("${VEID}", &veid.to_string())
        .replace("$VEID", &veid.to_string())
}

/// A number as vzctl reads it for resource parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quantity {
    Unlimited,
    /// Without a suffix: in the parameter's own unit (pages, KiB, bytes, count).
    Native(f64),
    /// With a suffix: bytes.
    Bytes(f64),
}

impl Quantity {
    /// The value in units of `unit` bytes (the parameter's own unit), rounded; `None` is
    /// unlimited.
    pub fn in_units(self, unit: u64) -> Option<u64> {
        match self {
            Quantity::Unlimited => None,
            Quantity::Native(n) => Some(n.round() as u64),
            Quantity::Bytes(b) => Some((b / unit as f64).round() as u64),
        }
    }

    /// Bytes, given the parameter's own unit in bytes.
    pub fn bytes(self, unit: u64) -> Option<u64> {
        match self {
            Quantity::Unlimited => None,
            Quantity::Native(n) => Some((n * unit as f64).round() as u64),
            Quantity::Bytes(b) => Some(b.round() as u64),
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quantity::Unlimited => f.write_str("unlimited"),
            Quantity::Native(n) => write!(f, "{n}"),
            Quantity::Bytes(b) => write!(f, "{b} bytes"),
        }
    }
}

/// Parses one number with vzctl's suffixes (see the module docs).
pub fn parse_quantity(s: &str) -> Result<Quantity, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(Quantity::Unlimited);
    }
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(end);
    if num.is_empty() || num.starts_with('.') && num.len() == 1 {
        return Err(format!("{t:?} is not a number"));
    }
    let n: f64 = num.parse().map_err(|_| format!("{t:?} is not a number"))?;
    if suffix.is_empty() {
        // LONG_MAX and above (vzctl writes 9223372036854775807) mean no limit.
        if num.parse::<u64>().is_ok_and(|v| v >= LONG_MAX) || n >= LONG_MAX as f64 {
            return Ok(Quantity::Unlimited);
        }
        return Ok(Quantity::Native(n));
    }
    let mult: f64 = match suffix {
        "T" | "t" => (1u64 << 40) as f64,
        "G" | "g" => (1u64 << 30) as f64,
        "M" | "m" => (1u64 << 20) as f64,
        "K" | "k" => 1024.0,
        "P" | "p" => PAGE as f64,
        "B" | "b" => 1.0,
        other => {
            return Err(format!(
                "unknown suffix {other:?} in {t:?} (use T, G, M, K, P for pages or B)"
            ));
        }
    };
    let b = n * mult;
    if b >= LONG_MAX as f64 {
        return Ok(Quantity::Unlimited);
    }
    Ok(Quantity::Bytes(b))
}

/// `barrier:limit`, or one value standing for both.
pub fn parse_pair(s: &str) -> Result<(Quantity, Quantity), String> {
    match s.split_once(':') {
        Some((b, l)) => Ok((parse_quantity(b)?, parse_quantity(l)?)),
        None => {
            let q = parse_quantity(s)?;
            Ok((q, q))
        }
    }
}

/// `yes`/`no` as vzctl writes booleans.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "yes" | "on" | "1" | "true" => Ok(true),
        "no" | "off" | "0" | "false" | "" => Ok(false),
        other => Err(format!("{other:?} is not yes or no")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<VzFile, ParseError> {
        parse(Path::new("/c/101.conf"), text, Some(101))
    }

    #[test]
    fn reads_lines_like_vzctl_never_a_shell() {
        let f = p("# c\n\nONBOOT=\"yes\"\nVE_PRIVATE=\"/vz/private/$VEID\" # x\nA=bare\nB='lit $VEID'\nC=\"${VEID}x\"\nONBOOT=no\n")
            .unwrap();
        assert_eq!(f.get("ONBOOT").unwrap().value, "no");
        assert_eq!(f.get("ONBOOT").unwrap().line, 8);
        assert_eq!(f.get("VE_PRIVATE").unwrap().value, "/vz/private/101");
        assert_eq!(f.get("A").unwrap().value, "bare");
        assert_eq!(f.get("B").unwrap().value, "lit $VEID");
        assert_eq!(f.get("C").unwrap().value, "101x");
        for (bad, want) in [
            ("X=\"`id`\"\n", "1: X: command substitution"),
            ("X=\"$(id)\"\n", "1: X: command substitution"),
            ("X=\"$HOME\"\n", "1: X: variable $HOME is not expanded"),
            ("\nX=\"open\n", "2: X: unterminated double quote"),
            ("X=a;rm\n", "1: X: ';' in an unquoted value"),
            ("X=\"a\" b\n", "1: X: unexpected \"b\""),
            ("just words\n", "1: expected KEY="),
            ("1X=2\n", "1: invalid key"),
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("/c/101.conf:") && e.contains(want),
                "{bad}: {e}"
            );
        }
        let g = parse(Path::new("vz.conf"), "VE_ROOT=/vz/root/$VEID\n", None).unwrap();
        assert_eq!(
            expand_veid(&g.get("VE_ROOT").unwrap().value, 7),
            "/vz/root/7"
        );
    }

    #[test]
    fn quantities_and_pairs() {
        assert_eq!(
            parse_quantity("262144").unwrap().in_units(PAGE),
            Some(262144)
        );
        assert_eq!(parse_quantity("1G").unwrap().in_units(PAGE), Some(262144));
        assert_eq!(parse_quantity("256P").unwrap().bytes(PAGE), Some(1 << 20));
        assert_eq!(parse_quantity("4096B").unwrap().in_units(PAGE), Some(1));
        assert_eq!(
            parse_quantity("2.5G").unwrap().bytes(1),
            Some(5 * (1 << 29))
        );
        assert_eq!(parse_quantity("unlimited").unwrap(), Quantity::Unlimited);
        assert_eq!(
            parse_quantity("9223372036854775807").unwrap(),
            Quantity::Unlimited
        );
        let (b, l) = parse_pair("2G:2.2G").unwrap();
        assert_eq!(b.bytes(1024), Some(2 << 30));
        assert_eq!(
            l.bytes(1024),
            Some((2.2 * (1u64 << 30) as f64).round() as u64)
        );
        assert_eq!(
            parse_pair("240").unwrap(),
            (Quantity::Native(240.0), Quantity::Native(240.0))
        );
        assert!(
            parse_quantity("12X")
                .unwrap_err()
                .contains("unknown suffix")
        );
        assert!(parse_quantity("-1").is_err());
        assert!(parse_quantity("").is_err());
        assert!(parse_pair("1:x").is_err());
    }
}
