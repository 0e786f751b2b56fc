use std::path::PathBuf;

/// Errors of the billing ledger. Each names the operation and the object; the cause is either in
/// the message (bad input) or in `#[source]` (SQLite, CSV, time zone database), never both.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("billing day {0} is out of range: it must be 1–31 or `anniversary`")]
    BillingDay(i64),
    #[error("billing day {0:?} is neither a number 1–31 nor `anniversary`")]
    BillingDaySyntax(String),
    #[error("unknown time zone {name:?}")]
    TimeZone {
        name: String,
        #[source]
        source: jiff::Error,
    },
    #[error("bad billing period {0:?}: expected YYYY-MM with a month 01–12 and a year 1970–9999")]
    PeriodSyntax(String),
    #[error("billing period arithmetic for {what} in time zone {tz}")]
    PeriodRange {
        what: String,
        tz: String,
        #[source]
        source: jiff::Error,
    },
    #[error("no billing period is named {0}: the CT's time zone changed across that month's start")]
    NoSuchPeriod(String),
    #[error(
        "CT {0}: a change of billing day or time zone takes effect at a period boundary (Ledger::change_anchor), not at registration"
    )]
    AnchorChange(String),
    #[error("commit rate {0} bit/s is out of range")]
    Commit(u64),
    #[error("bad class list {0:?}: classes 0–15, each once, at least one")]
    Classes(String),
    #[error("unknown 95th-percentile mode {0:?}: expected max, per-direction, sum or max-per-slot")]
    Mode(String),
    #[error("bad CT UUID {0:?}: expected 36 characters of hex digits and dashes")]
    Uuid(String),
    #[error("CT {0} is not registered in the billing ledger")]
    UnknownCt(String),
    #[error("tick has two readings of CT {0}")]
    DuplicateReading(String),
    #[error("billing ledger {path}: {op}")]
    Sql {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("billing ledger {path}: {op}: {detail}")]
    Corrupt {
        path: PathBuf,
        op: &'static str,
        detail: String,
    },
    #[error("billing CSV line {line}: {detail}")]
    CsvLine { line: u64, detail: String },
    #[error("billing CSV line {line}")]
    CsvRead {
        line: u64,
        #[source]
        source: csv::Error,
    },
    #[error("billing CSV: writing the export")]
    CsvWrite {
        #[source]
        source: csv::Error,
    },
    #[error("billing CSV: {0}")]
    CsvEmpty(String),
    #[error("drawing the billing graph of CT {uuid}: {detail}")]
    Graph { uuid: String, detail: String },
}
