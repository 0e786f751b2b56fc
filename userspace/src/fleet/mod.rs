//! The fleet (issue 14): each node's billing ledger shipped into one central PostgreSQL.
//!
//! The shipper reads the ledger read-only (`Ledger::slots_after_seq`, the node's per-tick
//! sequence feed) and upserts slot rows, period totals and CT metadata with the node's values
//! (never `+=`), storing the last acknowledged sequence in the same transaction as the rows: a
//! shipper killed at any point, or a database that went away, resumes from what was committed,
//! and a replay from 0 changes no row.
pub mod conninfo;
mod pages;
pub mod schema;
pub mod ship;
mod slots;

use std::path::PathBuf;

pub use conninfo::{ConnInfo, SslMode};
pub use ship::{ShipOptions, ShipStats, ShipStatus, Shipper, backoff};

fn db(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> FleetError {
    move |source| FleetError::Db { op, source }
}

fn i64_of(v: u64) -> i64 {
    // Bytes of one CT's period stay far below 2^63 (9.2 EB); saturate rather than wrap.
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Errors of the fleet shipper. Each names the operation and the object; the cause is in the
/// message (bad input) or in `#[source]` (PostgreSQL, TLS, the ledger), never both.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("bad connection string: {0}")]
    ConnInfo(String),
    #[error("connection string")]
    ConnConfig(#[source] tokio_postgres::Error),
    #[error("reading TLS file {path}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up TLS ({what})")]
    Tls {
        what: &'static str,
        #[source]
        source: native_tls::Error,
    },
    #[error("connecting to the central database {target}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("central database: {op}")]
    Db {
        op: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "central database holds schema version {found}; this berth knows up to {known}: upgrade berth first"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error("bad node name {0:?}: 1–253 characters of letters, digits, '.', '-', '_'")]
    Node(String),
    #[error("reading the ledger for shipping")]
    Ledger(#[source] crate::billing::BillingError),
    #[error("reading the ledger for shipping: the reader thread panicked")]
    Reader,
}

/// Checks a node name (what the central tables key a node's rows by).
pub fn check_node(name: &str) -> Result<(), FleetError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FleetError::Node(name.to_string()))
    }
}

/// This machine's host name, the default node name.
pub fn default_node() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}
