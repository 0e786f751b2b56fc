//! libpq connection strings: `postgresql://user:pass@host:port/db?sslmode=verify-full&sslrootcert=…`
//! or `host=/run/postgresql dbname=billing user=berth`. tokio-postgres parses both but knows
//! only `sslmode` disable/prefer/require and no certificate files, so the TLS keys libpq users
//! write (`sslmode=verify-ca|verify-full`, `sslrootcert`, `sslcert`, `sslkey`) are taken out here
//! and turn into a native-tls (OpenSSL) connector; the rest goes to tokio-postgres as written.
use std::path::PathBuf;
use std::str::FromStr;

use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::config::SslMode as PgSslMode;

use super::FleetError;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it (libpq's default).
    Prefer,
    /// TLS, the server's certificate unchecked (checked as `verify-ca` when `sslrootcert` is
    /// given, as libpq does).
    Require,
    /// TLS, the chain checked against `sslrootcert` (else the system's roots), not the name.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, FleetError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(FleetError::ConnInfo(format!(
                    "sslmode {s:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }
}

/// A parsed connection string.
pub struct ConnInfo {
    pub config: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The string with any password replaced by `***`, for logs and errors.
    pub redacted: String,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn percent_decode(s: &str) -> Result<String, FleetError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let v = b
                .get(i + 1)
                .and_then(|h| hex(*h))
                .zip(b.get(i + 2).and_then(|l| hex(*l)))
                .ok_or_else(|| FleetError::ConnInfo(format!("bad percent escape in {s:?}")))?;
            out.push(v.0 << 4 | v.1);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| FleetError::ConnInfo(format!("{s:?} is not UTF-8")))
}

/// Splits `key=value key='quoted \' value'` into pairs, as libpq reads them.
fn keyword_pairs(s: &str) -> Result<Vec<(String, String)>, FleetError> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(FleetError::ConnInfo(format!("{key:?} has no `=value`")));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => {
                        return Err(FleetError::ConnInfo(format!(
                            "unterminated quoted value of {key:?}"
                        )));
                    }
                    Some('\'') => break,
                    Some('\\') => value.extend(it.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl FromStr for ConnInfo {
    type Err = FleetError;

    fn from_str(s: &str) -> Result<ConnInfo, FleetError> {
        let mut tls: Vec<(String, String)> = Vec::new();
        let (rest, redacted) = if s.starts_with("postgresql://") || s.starts_with("postgres://") {
            let (base, query) = s.split_once('?').unwrap_or((s, ""));
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let k = percent_decode(k)?;
                if TLS_KEYS.contains(&k.as_str()) {
                    tls.push((k, percent_decode(v)?));
                } else {
                    kept.push(pair);
                }
            }
            let rest = if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            };
            (rest, redact_url(s))
        } else {
            let mut kept = Vec::new();
            let mut shown = Vec::new();
            for (k, v) in keyword_pairs(s)? {
                shown.push(if k == "password" {
                    "password=***".to_string()
                } else {
                    format!("{k}={}", quote(&v))
                });
                if TLS_KEYS.contains(&k.as_str()) {
                    tls.push((k, v));
                } else {
                    kept.push(format!("{k}={}", quote(&v)));
                }
            }
            (kept.join(" "), shown.join(" "))
        };
        let mut ssl_mode = SslMode::Prefer;
        let (mut root_cert, mut client_cert, mut client_key) = (None, None, None);
        for (k, v) in tls {
            match k.as_str() {
                "sslmode" => ssl_mode = SslMode::parse(&v)?,
                "sslrootcert" => root_cert = Some(PathBuf::from(v)),
                "sslcert" => client_cert = Some(PathBuf::from(v)),
                _ => client_key = Some(PathBuf::from(v)),
            }
        }
        if client_cert.is_some() != client_key.is_some() {
            return Err(FleetError::ConnInfo(
                "sslcert and sslkey go together (a client certificate needs its key)".to_string(),
            ));
        }
        if ssl_mode == SslMode::Require && root_cert.is_some() {
            ssl_mode = SslMode::VerifyCa;
        }
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(FleetError::ConnConfig)?;
        if config.get_hosts().is_empty() {
            return Err(FleetError::ConnInfo(format!(
                "{redacted}: no host (give a host name, an address or a socket directory)"
            )));
        }
        if config.get_password().is_none()
            && let Ok(p) = std::env::var("PGPASSWORD")
        {
            config.password(p);
        }
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        if config.get_connect_timeout().is_none() {
            // libpq waits for the kernel's TCP timeout (minutes); a shipper rather retries.
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("berth-ship");
        }
        Ok(ConnInfo {
            config,
            ssl_mode,
            root_cert,
            client_cert,
            client_key,
            redacted,
        })
    }
}

/// `postgresql://user:secret@host/db` → `postgresql://user:***@host/db`; a `password=` query
/// parameter likewise.
fn redact_url(s: &str) -> String {
    let (base, query) = s.split_once('?').map_or((s, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let auth_end = base[scheme_end..]
        .find(['/'])
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = base.to_string();
    if let Some(at) = base[scheme_end..auth_end].rfind('@') {
        let userinfo = &base[scheme_end..scheme_end + at];
        if let Some(colon) = userinfo.find(':') {
            out = format!(
                "{}{}:***{}",
                &base[..scheme_end],
                &userinfo[..colon],
                &base[scheme_end + at..]
            );
        }
    }
    if let Some(q) = query {
        let q: Vec<String> = q
            .split('&')
            .map(|p| {
                if p.starts_with("password=") {
                    "password=***".to_string()
                } else {
                    p.to_string()
                }
            })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

fn read(path: &PathBuf) -> Result<Vec<u8>, FleetError> {
    std::fs::read(path).map_err(|source| FleetError::TlsFile {
        path: path.clone(),
        source,
    })
}

impl ConnInfo {
    /// The TLS connector for `ssl_mode` (unused by tokio-postgres for `disable` and for unix
    /// sockets, where libpq does no TLS either).
    pub fn tls(&self) -> Result<MakeTlsConnector, FleetError> {
        let mut b = native_tls::TlsConnector::builder();
        match self.ssl_mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                b.danger_accept_invalid_certs(true);
                b.danger_accept_invalid_hostnames(true);
            }
            SslMode::VerifyCa => {
                b.danger_accept_invalid_hostnames(true);
            }
            SslMode::VerifyFull => {}
        }
        if let Some(p) = &self.root_cert {
            let pem = read(p)?;
            let cert =
                native_tls::Certificate::from_pem(&pem).map_err(|source| FleetError::Tls {
                    what: "parsing sslrootcert",
                    source,
                })?;
            b.disable_built_in_roots(true);
            b.add_root_certificate(cert);
        }
        if let (Some(c), Some(k)) = (&self.client_cert, &self.client_key) {
            let id = native_tls::Identity::from_pkcs8(&read(c)?, &read(k)?).map_err(|source| {
                FleetError::Tls {
                    what: "loading sslcert/sslkey (PEM certificate, PKCS#8 PEM key)",
                    source,
                }
            })?;
            b.identity(id);
        }
        let c = b.build().map_err(|source| FleetError::Tls {
            what: "building the connector",
            source,
        })?;
        Ok(MakeTlsConnector::new(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::Host;

    #[test]
    fn url_with_tls_keys() {
        let c: ConnInfo = "postgresql://ship:s3cr%40t@db.example:6432/billing?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5"
            .parse()
            .unwrap();
        assert_eq!(c.ssl_mode, SslMode::VerifyFull);
        assert_eq!(c.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.config.get_user(), Some("ship"));
        assert_eq!(c.config.get_password(), Some(&b"s3cr@t"[..]));
        assert_eq!(c.config.get_dbname(), Some("billing"));
        assert_eq!(c.config.get_ports(), &[6432]);
        assert_eq!(
            c.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(5))
        );
        assert_eq!(c.config.get_ssl_mode(), PgSslMode::Require);
        assert!(!c.redacted.contains("s3cr"), "{}", c.redacted);
        assert!(c.redacted.contains("ship:***@db.example"), "{}", c.redacted);
    }

    #[test]
    fn keyword_form_unix_socket() {
        let c: ConnInfo =
            "host=/run/postgresql dbname=billing user=berth password='a b\\'c' sslmode=disable"
                .parse()
                .unwrap();
        assert_eq!(c.ssl_mode, SslMode::Disable);
        assert_eq!(
            c.config.get_hosts(),
            &[Host::Unix(PathBuf::from("/run/postgresql"))]
        );
        assert_eq!(c.config.get_password(), Some(&b"a b'c"[..]));
        assert!(!c.redacted.contains("a b"), "{}", c.redacted);
    }

    #[test]
    fn require_with_root_cert_verifies_the_chain() {
        let c: ConnInfo = "postgresql://u@h/d?sslmode=require&sslrootcert=/x"
            .parse()
            .unwrap();
        assert_eq!(c.ssl_mode, SslMode::VerifyCa);
    }

    #[test]
    fn bad_strings_are_named() {
        for (s, want) in [
            ("postgresql://u@h/d?sslmode=bogus", "sslmode \"bogus\""),
            ("postgresql://u@h/d?sslcert=/c", "sslcert and sslkey"),
            ("host=/tmp dbname", "has no `=value`"),
            ("host='/tmp", "unterminated"),
            ("dbname=x", "no host"),
            ("postgresql://u@h/d?sslrootcert=%zz", "percent escape"),
        ] {
            let e = s.parse::<ConnInfo>().err().expect(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
        assert!("postgresql://u@h/d?nonsense=1".parse::<ConnInfo>().is_err());
    }

    #[test]
    fn missing_root_cert_file_is_named() {
        let c: ConnInfo = "postgresql://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
            .parse()
            .unwrap();
        let e = c.tls().err().unwrap();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
