//! The quota tables in the billing ledger's SQLite file: each CT's state (by UUID), the
//! period's top-ups and the webhook outbox. They are created when berthd opens them (`CREATE
//! TABLE IF NOT EXISTS`: additive, the billing schema's version is untouched, and a ledger
//! without them reads as "no quota state yet"). A tick writes every state and the outbox rows
//! of its events in one transaction, so an event is queued exactly when its state is stored.
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::State;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS quota_state (
    uuid TEXT PRIMARY KEY,
    ctid INTEGER NOT NULL,
    period TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    period_end INTEGER NOT NULL,
    state TEXT NOT NULL,
    used INTEGER NOT NULL,
    soft INTEGER NOT NULL,
    hard INTEGER,
    since INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    enforced TEXT,
    enforce_error TEXT
);
CREATE TABLE IF NOT EXISTS quota_topup (
    uuid TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (uuid, period_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_outbox (
    key TEXT PRIMARY KEY,
    uuid TEXT NOT NULL,
    ctid INTEGER NOT NULL,
    event TEXT NOT NULL,
    url TEXT,
    body TEXT NOT NULL,
    created INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL,
    delivered INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS quota_outbox_pending ON quota_outbox (next_attempt)
    WHERE delivered IS NULL AND url IS NOT NULL;
";

/// Added after the first release of the outbox: when an event was given up (its CT lost its
/// webhook, or the CT is gone); the reason is its `last_error`. An abandoned event is neither
/// pending nor delivered.
const ADD_ABANDONED: &str = "ALTER TABLE quota_outbox ADD COLUMN abandoned INTEGER";

/// An event still to send: not delivered, not abandoned, with a webhook.
const LIVE: &str = "delivered IS NULL AND url IS NOT NULL AND abandoned IS NULL";
/// The same on an outbox that predates `abandoned` (read-only, before berthd migrated it).
const LIVE_OLD: &str = "delivered IS NULL AND url IS NOT NULL";

/// Errors of the quota tables; each names the operation and the ledger file.
#[derive(Debug, thiserror::Error)]
pub enum QuotaStoreError {
    #[error("quota tables of {path}: {op}")]
    Sql {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("quota tables of {path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("no billing ledger at {0}: berthd creates it at its first tick")]
    NoLedger(PathBuf),
}

/// A CT's stored quota state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRow {
    pub uuid: String,
    pub ctid: u32,
    pub period: String,
    pub period_start: i64,
    pub period_end: i64,
    pub state: State,
    pub used: u64,
    /// The soft limit with this period's top-ups.
    pub soft: u64,
    pub hard: Option<u64>,
    /// When the CT entered `state`.
    pub since: i64,
    pub updated: i64,
    /// The enforcement last applied without error, and the last error (cleared on success).
    pub enforced: Option<String>,
    pub enforce_error: Option<String>,
}

/// An event to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub key: String,
    pub uuid: String,
    pub ctid: u32,
    pub event: String,
    /// `None`: the CT has no webhook; the event is recorded, never sent.
    pub url: Option<String>,
    pub body: String,
}

/// An undelivered event that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub key: String,
    pub uuid: String,
    pub ctid: u32,
    pub url: String,
    pub body: String,
    pub attempts: u32,
}

/// A CT's outbox as `quota status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxSummary {
    pub delivered: u64,
    pub pending: u64,
    /// The newest error of an undelivered event, with its key and attempts.
    pub last_error: Option<(String, u32, String)>,
    /// Events given up (the CT lost its webhook), and the newest one's key and reason.
    pub abandoned: u64,
    pub last_abandoned: Option<(String, String)>,
}

/// The backoff after the `attempts`-th failure: 1 s doubling, at most 5 minutes.
pub fn backoff_secs(attempts: u32) -> i64 {
    1i64 << attempts.saturating_sub(1).min(8)
}

const MAX_BACKOFF: i64 = 300;

pub struct QuotaStore {
    conn: Connection,
    path: PathBuf,
    /// Opened read-only on a ledger without the tables: every read is empty.
    missing: bool,
    /// The outbox has the `abandoned` column (always after [`QuotaStore::open`]).
    abandoned_col: bool,
}

impl QuotaStore {
    /// Opens the tables of the ledger at `path` for writing, creating them when missing. The
    /// ledger itself must exist (berthd opens [`crate::billing::Ledger`] first).
    pub fn open(path: &Path) -> Result<QuotaStore, QuotaStoreError> {
        if !path.exists() {
            return Err(QuotaStoreError::NoLedger(path.to_path_buf()));
        }
        let sql = sql_err(path);
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("opening"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        // The ledger set WAL (persistent in the file); FULL like its ticks.
        conn.execute_batch("PRAGMA synchronous=FULL;")
            .map_err(sql("setting synchronous"))?;
        conn.execute_batch(SCHEMA)
            .map_err(sql("creating the quota tables"))?;
        if !has_abandoned(&conn).map_err(sql("reading the outbox's columns"))? {
            conn.execute_batch(ADD_ABANDONED)
                .map_err(sql("adding the outbox's abandoned column"))?;
        }
        Ok(QuotaStore {
            conn,
            path: path.to_path_buf(),
            missing: false,
            abandoned_col: true,
        })
    }

    /// Opens read-only (the CLI's `quota status`); a ledger berthd has not added the tables to
    /// reads as empty.
    pub fn open_read_only(path: &Path) -> Result<QuotaStore, QuotaStoreError> {
        if !path.exists() {
            return Err(QuotaStoreError::NoLedger(path.to_path_buf()));
        }
        let sql = sql_err(path);
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("opening read-only"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('quota_state', 'quota_topup', 'quota_outbox')",
                [],
                |r| r.get(0),
            )
            .map_err(sql("reading the schema"))?;
        let abandoned_col =
            n == 3 && has_abandoned(&conn).map_err(sql("reading the outbox's columns"))?;
        Ok(QuotaStore {
            conn,
            path: path.to_path_buf(),
            missing: n < 3,
            abandoned_col,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn live(&self) -> &'static str {
        if self.abandoned_col { LIVE } else { LIVE_OLD }
    }

    fn sql(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> QuotaStoreError + '_ {
        sql_err(&self.path)(op)
    }

    pub fn state(&self, uuid: &str) -> Result<Option<StateRow>, QuotaStoreError> {
        Ok(self.states()?.into_iter().find(|r| r.uuid == uuid))
    }

    /// Every stored state, by CTID then UUID.
    pub fn states(&self) -> Result<Vec<StateRow>, QuotaStoreError> {
        if self.missing {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT uuid, ctid, period, period_start, period_end, state, used, soft, hard, since, updated, enforced, enforce_error FROM quota_state ORDER BY ctid, uuid",
            )
            .map_err(self.sql("reading the states"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    StateRow {
                        uuid: r.get(0)?,
                        ctid: r.get(1)?,
                        period: r.get(2)?,
                        period_start: r.get(3)?,
                        period_end: r.get(4)?,
                        state: State::Normal,
                        used: r.get::<_, i64>(6)? as u64,
                        soft: r.get::<_, i64>(7)? as u64,
                        hard: r.get::<_, Option<i64>>(8)?.map(|h| h as u64),
                        since: r.get(9)?,
                        updated: r.get(10)?,
                        enforced: r.get(11)?,
                        enforce_error: r.get(12)?,
                    },
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(self.sql("reading the states"))?;
        let mut out = Vec::new();
        for r in rows {
            let (mut row, s) = r.map_err(self.sql("reading the states"))?;
            row.state = State::parse(&s).ok_or_else(|| QuotaStoreError::Corrupt {
                path: self.path.clone(),
                what: format!("CT {}: unknown state {s:?}", row.uuid),
            })?;
            out.push(row);
        }
        Ok(out)
    }

    /// The bytes topped up for the period starting at `period_start`.
    pub fn topup(&self, uuid: &str, period_start: i64) -> Result<u64, QuotaStoreError> {
        if self.missing {
            return Ok(0);
        }
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT bytes FROM quota_topup WHERE uuid = ?1 AND period_start = ?2",
                params![uuid, period_start],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql("reading the top-ups"))?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Adds `bytes` to the period starting at `period_start`; returns the period's new total.
    pub fn add_topup(
        &mut self,
        uuid: &str,
        period_start: i64,
        bytes: u64,
    ) -> Result<u64, QuotaStoreError> {
        let b = i64::try_from(bytes).map_err(|_| QuotaStoreError::Corrupt {
            path: self.path.clone(),
            what: format!("top-up of {bytes} bytes is too large"),
        })?;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql_err(&self.path)("adding a top-up"))?;
        tx.execute(
            "INSERT INTO quota_topup (uuid, period_start, bytes) VALUES (?1, ?2, ?3)
             ON CONFLICT (uuid, period_start) DO UPDATE SET bytes = bytes + excluded.bytes",
            params![uuid, period_start, b],
        )
        .map_err(sql_err(&self.path)("adding a top-up"))?;
        let total: i64 = tx
            .query_row(
                "SELECT bytes FROM quota_topup WHERE uuid = ?1 AND period_start = ?2",
                params![uuid, period_start],
                |r| r.get(0),
            )
            .map_err(sql_err(&self.path)("adding a top-up"))?;
        tx.commit()
            .map_err(sql_err(&self.path)("committing a top-up"))?;
        Ok(total as u64)
    }

    /// One tick: every state and the events of their changes, in one transaction. Events whose
    /// key is already queued (or delivered) are ignored. Returns the number of new events.
    pub fn commit_tick(
        &mut self,
        states: &[StateRow],
        events: &[OutboxRow],
        now: i64,
    ) -> Result<usize, QuotaStoreError> {
        let path = self.path.clone();
        let sql = |op| sql_err(&path)(op);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("starting a quota tick"))?;
        {
            let mut up = tx
                .prepare_cached(
                    "INSERT INTO quota_state (uuid, ctid, period, period_start, period_end, state, used, soft, hard, since, updated, enforced, enforce_error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                     ON CONFLICT (uuid) DO UPDATE SET ctid = excluded.ctid, period = excluded.period,
                       period_start = excluded.period_start, period_end = excluded.period_end,
                       state = excluded.state, used = excluded.used, soft = excluded.soft,
                       hard = excluded.hard, since = excluded.since, updated = excluded.updated",
                )
                .map_err(sql("storing the quota states"))?;
            for s in states {
                up.execute(params![
                    s.uuid,
                    s.ctid,
                    s.period,
                    s.period_start,
                    s.period_end,
                    s.state.as_str(),
                    s.used as i64,
                    s.soft as i64,
                    s.hard.map(|h| h as i64),
                    s.since,
                    s.updated,
                    s.enforced,
                    s.enforce_error
                ])
                .map_err(sql("storing the quota states"))?;
            }
        }
        let mut added = 0;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO quota_outbox (key, uuid, ctid, event, url, body, created, next_attempt)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                )
                .map_err(sql("queueing quota events"))?;
            for e in events {
                added += ins
                    .execute(params![e.key, e.uuid, e.ctid, e.event, e.url, e.body, now])
                    .map_err(sql("queueing quota events"))?;
            }
        }
        tx.commit().map_err(sql("committing a quota tick"))?;
        Ok(added)
    }

    /// Records the outcome of an enforcement call (`Ok`: what was applied).
    pub fn set_enforced(
        &mut self,
        uuid: &str,
        res: Result<&str, &str>,
    ) -> Result<(), QuotaStoreError> {
        let (ok, e) = match res {
            Ok(w) => (Some(w), None),
            Err(e) => (None, Some(e)),
        };
        self.conn
            .execute(
                "UPDATE quota_state SET enforced = coalesce(?2, enforced), enforce_error = ?3 WHERE uuid = ?1",
                params![uuid, ok, e],
            )
            .map_err(self.sql("recording an enforcement"))?;
        Ok(())
    }

    /// Forgets a CT's state (its quota was removed, or it was destroyed).
    pub fn remove_state(&mut self, uuid: &str) -> Result<(), QuotaStoreError> {
        self.conn
            .execute("DELETE FROM quota_state WHERE uuid = ?1", params![uuid])
            .map_err(self.sql("removing a quota state"))?;
        Ok(())
    }

    /// Undelivered events due at `now`, oldest first.
    pub fn due(&self, now: i64, limit: u32) -> Result<Vec<Pending>, QuotaStoreError> {
        if self.missing {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT key, uuid, ctid, url, body, attempts FROM quota_outbox
                 WHERE {} AND next_attempt <= ?1
                 ORDER BY next_attempt, rowid LIMIT ?2",
                self.live()
            ))
            .map_err(self.sql("reading the outbox"))?;
        let rows = stmt
            .query_map(params![now, limit], |r| {
                Ok(Pending {
                    key: r.get(0)?,
                    uuid: r.get(1)?,
                    ctid: r.get(2)?,
                    url: r.get(3)?,
                    body: r.get(4)?,
                    attempts: r.get(5)?,
                })
            })
            .map_err(self.sql("reading the outbox"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sql("reading the outbox"))
    }

    /// Marks an event delivered (after a 2xx): it is never sent again.
    pub fn delivered(&mut self, key: &str, now: i64) -> Result<(), QuotaStoreError> {
        self.conn
            .execute(
                "UPDATE quota_outbox SET delivered = ?2, attempts = attempts + 1, last_error = NULL WHERE key = ?1",
                params![key, now],
            )
            .map_err(self.sql("marking an event delivered"))?;
        Ok(())
    }

    /// Records a failed attempt and schedules the next one with [`backoff_secs`].
    pub fn failed(&mut self, key: &str, now: i64, error: &str) -> Result<(), QuotaStoreError> {
        let attempts: u32 = self
            .conn
            .query_row(
                "UPDATE quota_outbox SET attempts = attempts + 1, last_error = ?2 WHERE key = ?1 RETURNING attempts",
                params![key, error],
                |r| r.get(0),
            )
            .map_err(self.sql("recording a failed delivery"))?;
        let next = now + backoff_secs(attempts).min(MAX_BACKOFF);
        self.conn
            .execute(
                "UPDATE quota_outbox SET next_attempt = ?2 WHERE key = ?1",
                params![key, next],
            )
            .map_err(self.sql("recording a failed delivery"))?;
        Ok(())
    }

    /// Events with a webhook not yet delivered (every CT).
    pub fn backlog(&self) -> Result<u64, QuotaStoreError> {
        if self.missing {
            return Ok(0);
        }
        let n: i64 = self
            .conn
            .query_row(
                &format!("SELECT count(*) FROM quota_outbox WHERE {}", self.live()),
                [],
                |r| r.get(0),
            )
            .map_err(self.sql("counting the outbox"))?;
        Ok(n as u64)
    }

    /// Undelivered events whose last attempt failed.
    pub fn failing(&self) -> Result<u64, QuotaStoreError> {
        if self.missing {
            return Ok(0);
        }
        let n: i64 = self
            .conn
            .query_row(
                &format!(
                    "SELECT count(*) FROM quota_outbox WHERE {} AND last_error IS NOT NULL",
                    self.live()
                ),
                [],
                |r| r.get(0),
            )
            .map_err(self.sql("counting the outbox"))?;
        Ok(n as u64)
    }

    /// A CT's outbox: delivered and pending counts, the newest error.
    pub fn outbox_summary(&self, uuid: &str) -> Result<OutboxSummary, QuotaStoreError> {
        if self.missing {
            return Ok(OutboxSummary::default());
        }
        let (delivered, pending): (i64, i64) = self
            .conn
            .query_row(
                &format!(
                    "SELECT count(delivered), coalesce(sum({}), 0) FROM quota_outbox WHERE uuid = ?1",
                    self.live()
                ),
                params![uuid],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.sql("reading the outbox"))?;
        let last_error = self
            .conn
            .query_row(
                &format!(
                    "SELECT key, attempts, last_error FROM quota_outbox
                     WHERE uuid = ?1 AND {} AND last_error IS NOT NULL
                     ORDER BY next_attempt DESC LIMIT 1",
                    self.live()
                ),
                params![uuid],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.sql("reading the outbox"))?;
        let (mut abandoned, mut last_abandoned) = (0, None);
        if self.abandoned_col {
            abandoned = self
                .conn
                .query_row(
                    "SELECT count(*) FROM quota_outbox WHERE uuid = ?1 AND abandoned IS NOT NULL",
                    params![uuid],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(self.sql("reading the outbox"))? as u64;
            last_abandoned = self
                .conn
                .query_row(
                    "SELECT key, coalesce(last_error, '') FROM quota_outbox
                     WHERE uuid = ?1 AND abandoned IS NOT NULL ORDER BY abandoned DESC, rowid DESC LIMIT 1",
                    params![uuid],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(self.sql("reading the outbox"))?;
        }
        Ok(OutboxSummary {
            delivered: delivered as u64,
            pending: pending as u64,
            last_error,
            abandoned,
            last_abandoned,
        })
    }

    /// The CTs with events still to send, each with the URLs they were queued with (or last
    /// sent to): what a delivery pass compares with the CTs' current webhooks.
    pub fn pending_targets(&self) -> Result<Vec<(String, u32, String)>, QuotaStoreError> {
        if self.missing {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT DISTINCT uuid, ctid, url FROM quota_outbox WHERE {} ORDER BY ctid, uuid",
                self.live()
            ))
            .map_err(self.sql("reading the outbox"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.sql("reading the outbox"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sql("reading the outbox"))
    }

    /// Points a CT's events still to send at `url` (its webhook now); those that were going
    /// elsewhere are due at once, the old URL's backoff being no measure of the new one.
    /// Returns how many moved.
    pub fn retarget(&mut self, uuid: &str, url: &str, now: i64) -> Result<usize, QuotaStoreError> {
        let n = self
            .conn
            .execute(
                &format!(
                    "UPDATE quota_outbox SET url = ?2, next_attempt = min(next_attempt, ?3)
                     WHERE uuid = ?1 AND {LIVE} AND url IS NOT ?2"
                ),
                params![uuid, url, now],
            )
            .map_err(self.sql("retargeting quota events"))?;
        Ok(n)
    }

    /// Gives up a CT's events still to send, `reason` kept as their last error. Returns how
    /// many.
    pub fn abandon(
        &mut self,
        uuid: &str,
        now: i64,
        reason: &str,
    ) -> Result<usize, QuotaStoreError> {
        let n = self
            .conn
            .execute(
                &format!(
                    "UPDATE quota_outbox SET abandoned = ?2, last_error = ?3 WHERE uuid = ?1 AND {LIVE}"
                ),
                params![uuid, now, reason],
            )
            .map_err(self.sql("abandoning quota events"))?;
        Ok(n)
    }

    /// Every event key of a CT with its delivery time (tests and `quota status --json`).
    pub fn events(&self, uuid: &str) -> Result<Vec<(String, Option<i64>)>, QuotaStoreError> {
        if self.missing {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT key, delivered FROM quota_outbox WHERE uuid = ?1 ORDER BY rowid",
            )
            .map_err(self.sql("reading the outbox"))?;
        let rows = stmt
            .query_map(params![uuid], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.sql("reading the outbox"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sql("reading the outbox"))
    }
}

fn has_abandoned(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM pragma_table_info('quota_outbox') WHERE name = 'abandoned'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

fn sql_err(
    path: &Path,
) -> impl Fn(&'static str) -> Box<dyn FnOnce(rusqlite::Error) -> QuotaStoreError> + '_ {
    move |op| {
        let path = path.to_path_buf();
        Box::new(move |source| QuotaStoreError::Sql { op, path, source })
    }
}
