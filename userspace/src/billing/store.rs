//! The SQLite ledger: one file, WAL, `synchronous=FULL` (NORMAL may lose the last commits on
//! power loss). One [`Ledger::tick`] is one transaction holding the checkpoints, the slot upserts
//! and the period totals, so a crash anywhere re-derives each delta from the last committed
//! checkpoint: nothing lost, nothing counted twice.
//!
//! Cost: each CT's newest slot rows live on a page of their own, so writing them every tick
//! dirtied ~1000 pages per 1000-CT tick. Instead the rows a CT changed recently ("open" rows) are
//! kept in its checkpoint row, in the same transaction as the counters (so just as durable), and
//! moved to the slot and total tables in a staggered way: CT `id` flushes its closed slots on the
//! ticks where `(id + seq) % FLUSH_EVERY == 0`. Readers merge the open rows in.
//!
//! Reads: a report's 95th takes each complete UTC hour of a CT from one `slot_hour` row (the
//! hour's per-slot in/out sums, written by the tick once the hour is complete; store/agg.rs)
//! and only the newest hours from the slot rows, so `report all` for a month at 1000 CTs reads
//! ~720k short rows instead of ~35M. berthd's gauges advance incrementally (store/current.rs).
//!
//! Size: slot rows are `WITHOUT ROWID` with a compact integer CT id, the slot index (start/300)
//! and the packed [`CounterKey::code`] as the key, so a row is ~25 bytes of record; zero deltas
//! are not stored. The per-node `seq` is the tick number, stored in each row a tick changed. Bytes are SQLite INTEGERs holding the `u64` bit pattern (exact for every value;
//! period totals are exact below 2^63 bytes).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::book::{Baseline, Checkpoint, Reading};
use super::p95::{P95Mode, P95Report, SlotSample, SlotWindow, p95};
use super::period::{AnchorChange, BillingAnchor, Period, PeriodSpec};
use super::{BillingError, Counter, CounterKey, Direction, SLOT_SECS, SlotFlags};

/// 2 added the commit rate and class filter (`ct.commit_bps`, `ct.classes`) and the history of
/// billing-day and time-zone changes (`ct_anchor`); a version 1 file is migrated at open.
const SCHEMA_VERSION: i64 = 2;

/// A CT moves its closed open rows to the tables every this many ticks (staggered by CT id).
const FLUSH_EVERY: i64 = 4;
/// ...or as soon as it holds more open rows than this (a long gap spread).
const MAX_OPEN: usize = 64;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ct (
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    ctid INTEGER NOT NULL,
    billing_day TEXT NOT NULL,
    tz TEXT NOT NULL,
    created INTEGER NOT NULL,
    destroyed INTEGER,
    commit_bps INTEGER,
    classes TEXT
);
-- Earlier billing settings of a CT: billing_day in tz applied until the instant `until` (a
-- period boundary), the next row's or the ct row's from there.
CREATE TABLE IF NOT EXISTS ct_anchor (
    ct INTEGER NOT NULL,
    until INTEGER NOT NULL,
    billing_day TEXT NOT NULL,
    tz TEXT NOT NULL,
    PRIMARY KEY (ct, until)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoint (
    ct INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    at INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    counters BLOB NOT NULL,
    open BLOB NOT NULL,
    open_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS slot (
    ct INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    key INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    packets INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (ct, slot, key)
) WITHOUT ROWID;
-- The slot feed (rows changed after a seq) without an index on seq, which cost ~7 ms of a
-- 1000-CT tick in index churn: every tick records the oldest slot it wrote, so the rows it
-- changed are found by one short range seek per CT.
CREATE TABLE IF NOT EXISTS tick (seq INTEGER PRIMARY KEY, min_slot INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS total (
    ct INTEGER NOT NULL,
    period_start INTEGER NOT NULL,
    key INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    packets INTEGER NOT NULL,
    PRIMARY KEY (ct, period_start, key)
) WITHOUT ROWID;
-- Per CT and complete UTC hour, each slot's in/out bytes and flags (store/agg.rs): what the
-- 95th reads.
CREATE TABLE IF NOT EXISTS slot_hour (
    ct INTEGER NOT NULL,
    hour INTEGER NOT NULL,
    v BLOB NOT NULL,
    PRIMARY KEY (ct, hour)
) WITHOUT ROWID;
";

/// Ledger settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerOptions {
    /// Slots are kept for the current period and this many before it (totals are kept for good).
    pub retention_periods: u32,
}

impl Default for LedgerOptions {
    fn default() -> LedgerOptions {
        LedgerOptions {
            retention_periods: 3,
        }
    }
}

/// A CT as the ledger knows it. `uuid` is the identity; `ctid` is reused by hosters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtInfo {
    pub uuid: String,
    pub ctid: u32,
    pub anchor: BillingAnchor,
    /// IANA time zone name.
    pub tz: String,
    /// Creation time (Unix seconds).
    pub created: i64,
    /// Destruction time, once destroyed.
    pub destroyed: Option<i64>,
    /// Committed rate (bit/s): reports count the slots over it.
    pub commit_bps: Option<u64>,
    /// The network classes billed (the 95th and the billed bytes); `None`: every class.
    pub classes: Option<Vec<u8>>,
    /// Earlier billing days and time zones, oldest first, each with the instant it stopped
    /// applying; `anchor` and `tz` apply from the last one's `until` (which is in the future
    /// while a change waits for the current period to end).
    pub history: Vec<AnchorChange>,
}

impl CtInfo {
    /// A CT billed on `anchor` in `tz` from its creation, with no commit rate, every class.
    pub fn new(uuid: String, ctid: u32, anchor: BillingAnchor, tz: String, created: i64) -> CtInfo {
        CtInfo {
            uuid,
            ctid,
            anchor,
            tz,
            created,
            destroyed: None,
            commit_bps: None,
            classes: None,
            history: Vec::new(),
        }
    }

    /// Whether class `class` counts toward the bill.
    pub fn bills_class(&self, class: u8) -> bool {
        self.classes.as_ref().is_none_or(|c| c.contains(&class))
    }
}

/// One CT's reading in a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtReading {
    pub uuid: String,
    pub reading: Reading,
    /// What to count from when the CT has no checkpoint yet (ignored otherwise).
    pub first: Baseline,
}

/// What a tick did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TickSummary {
    /// The sequence number the tick's slot rows carry.
    pub seq: i64,
    pub slot_rows: u64,
    pub anomalies: u64,
    pub estimated_slots: u64,
    pub clock_steps: u64,
    pub new_epochs: u64,
}

/// One stored slot row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRow {
    pub slot_start: i64,
    pub key: CounterKey,
    pub counter: Counter,
    pub flags: SlotFlags,
    /// The tick that last changed the row (per-node, monotonic).
    pub seq: i64,
}

/// A CT's bill for one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub ct: CtInfo,
    pub period: Period,
    /// The slots the 95th is over: the period within the CT's lifetime, up to `now`.
    pub window: SlotWindow,
    /// Exact totals per direction, class and family.
    pub totals: BTreeMap<CounterKey, Counter>,
    pub p95: P95Report,
    /// Union of the flags of the period's slots.
    pub flags: SlotFlags,
    /// The commit rate `p95.slots_over_commit` counts against (bit/s).
    pub commit_bps: Option<u64>,
}

struct CtState {
    id: i64,
    info: CtInfo,
    spec: PeriodSpec,
    checkpoint: Option<Checkpoint>,
    /// Slot rows not yet in the slot table (sorted by slot, key; seq = `open_seq`).
    open: Vec<SlotRow>,
    /// The tick that last changed an open row.
    open_seq: i64,
    /// The period the last booking fell in, to skip the time zone arithmetic per tick.
    period: Option<Period>,
}

/// The billing ledger of one node.
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    options: LedgerOptions,
    cts: HashMap<String, CtState>,
    seq: i64,
    /// CT id → its first hour not in the aggregate (store/agg.rs; the writer's only).
    agg_next: HashMap<i64, i64>,
    #[cfg(test)]
    pub(crate) fail_after: Option<usize>,
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path`.
    pub fn open(path: &Path, options: LedgerOptions) -> Result<Ledger, BillingError> {
        let sql = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| BillingError::Sql { path, op, source }
        };
        let conn = Connection::open(path).map_err(sql("opening"))?;
        // berthd writes while the CLI reads: wait out the other's short locks instead of failing.
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(sql("switching to WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(BillingError::Corrupt {
                path: path.to_path_buf(),
                op: "switching to WAL",
                detail: format!("journal mode stayed {mode}"),
            });
        }
        conn.execute_batch("PRAGMA synchronous=FULL;")
            .map_err(sql("setting synchronous=FULL"))?;
        conn.execute_batch(SCHEMA)
            .map_err(sql("creating the schema"))?;
        let version: Option<i64> = conn
            .query_row("SELECT v FROM meta WHERE k='schema'", [], |r| r.get(0))
            .optional()
            .map_err(sql("reading the schema version"))?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta VALUES ('schema', ?1), ('seq', 0)",
                    [SCHEMA_VERSION],
                )
                .map_err(sql("writing the schema version"))?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(1) => migrate_v1(&conn).map_err(sql("migrating the schema from version 1"))?,
            Some(v) => {
                return Err(BillingError::Corrupt {
                    path: path.to_path_buf(),
                    op: "reading the schema version",
                    detail: format!("version {v}, this berth knows {SCHEMA_VERSION}"),
                });
            }
        }
        let seq: i64 = conn
            .query_row("SELECT v FROM meta WHERE k='seq'", [], |r| r.get(0))
            .map_err(sql("reading the sequence"))?;
        let mut ledger = Ledger {
            conn,
            path: path.to_path_buf(),
            options,
            cts: HashMap::new(),
            seq,
            agg_next: HashMap::new(),
            #[cfg(test)]
            fail_after: None,
        };
        ledger.load()?;
        let started = std::time::Instant::now();
        if let Some(rows) = ledger.ensure_aggregate()? {
            tracing::info!(ledger = %path.display(), rows, took = ?started.elapsed(), "built the per-slot aggregate from the slot rows");
        }
        Ok(ledger)
    }

    /// Opens an existing ledger read-only (the CLI's reports while berthd writes): nothing in
    /// the file is created or changed, and [`Ledger::tick`] and the other writers fail.
    pub fn open_read_only(path: &Path) -> Result<Ledger, BillingError> {
        let sql = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| BillingError::Sql { path, op, source }
        };
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("opening read-only"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        let version: Option<i64> = conn
            .query_row("SELECT v FROM meta WHERE k='schema'", [], |r| r.get(0))
            .optional()
            .map_err(sql("reading the schema version"))?;
        // A version 1 file (berthd not restarted since the upgrade) reads as CTs with the
        // default settings: the read-only reader cannot migrate it.
        if version != Some(SCHEMA_VERSION) && version != Some(1) {
            return Err(BillingError::Corrupt {
                path: path.to_path_buf(),
                op: "reading the schema version",
                detail: format!("version {version:?}, this berth knows {SCHEMA_VERSION}"),
            });
        }
        let seq: i64 = conn
            .query_row("SELECT v FROM meta WHERE k='seq'", [], |r| r.get(0))
            .map_err(sql("reading the sequence"))?;
        let mut ledger = Ledger {
            conn,
            path: path.to_path_buf(),
            options: LedgerOptions::default(),
            cts: HashMap::new(),
            seq,
            agg_next: HashMap::new(),
            #[cfg(test)]
            fail_after: None,
        };
        ledger.load_version(version == Some(1))?;
        Ok(ledger)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> BillingError + use<> {
        sql_err(&self.path, op)
    }

    fn corrupt(&self, op: &'static str, detail: String) -> BillingError {
        BillingError::Corrupt {
            path: self.path.clone(),
            op,
            detail,
        }
    }

    fn load(&mut self) -> Result<(), BillingError> {
        self.load_version(false)
    }

    fn load_version(&mut self, v1: bool) -> Result<(), BillingError> {
        let mut cts = HashMap::new();
        let history = if v1 {
            HashMap::new()
        } else {
            self.load_history()?
        };
        {
            let mut stmt = self
                .conn
                .prepare(if v1 {
                    "SELECT id, uuid, ctid, billing_day, tz, created, destroyed, NULL, NULL FROM ct"
                } else {
                    "SELECT id, uuid, ctid, billing_day, tz, created, destroyed, commit_bps, classes
                     FROM ct"
                })
                .map_err(self.sql("loading the CTs"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, u32>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                        r.get::<_, Option<i64>>(7)?,
                        r.get::<_, Option<String>>(8)?,
                    ))
                })
                .map_err(self.sql("loading the CTs"))?;
            for row in rows {
                let (id, uuid, ctid, day, tz, created, destroyed, commit, classes) =
                    row.map_err(self.sql("loading the CTs"))?;
                let bad = |e: String| self.corrupt("loading the CTs", format!("CT {uuid}: {e}"));
                let anchor = BillingAnchor::parse(&day).map_err(|e| bad(e.to_string()))?;
                let history = history.get(&id).cloned().unwrap_or_default();
                let spec = PeriodSpec::with_history(&history, anchor, &tz, created)
                    .map_err(|e| bad(e.to_string()))?;
                let classes = classes
                    .map(|c| decode_classes(&c).ok_or_else(|| bad(format!("bad classes {c:?}"))))
                    .transpose()?;
                let info = CtInfo {
                    uuid: uuid.clone(),
                    ctid,
                    anchor,
                    tz,
                    created,
                    destroyed,
                    commit_bps: commit.map(|c| c as u64),
                    classes,
                    history,
                };
                cts.insert(
                    uuid,
                    CtState {
                        id,
                        info,
                        spec,
                        checkpoint: None,
                        open: Vec::new(),
                        open_seq: 0,
                        period: None,
                    },
                );
            }
        }
        let by_id: HashMap<i64, String> = cts.iter().map(|(u, s)| (s.id, u.clone())).collect();
        let mut stmt = self
            .conn
            .prepare("SELECT ct, epoch, at, slot, counters, open, open_seq FROM checkpoint")
            .map_err(self.sql("loading the checkpoints"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(self.sql("loading the checkpoints"))?;
        for row in rows {
            let (ct, epoch, at, slot, blob, open, open_seq) =
                row.map_err(self.sql("loading the checkpoints"))?;
            let open = decode_open(&open, open_seq).ok_or_else(|| {
                self.corrupt(
                    "loading the checkpoints",
                    format!("CT id {ct}: bad open-slot blob"),
                )
            })?;
            let counters = decode_counters(&blob).ok_or_else(|| {
                self.corrupt(
                    "loading the checkpoints",
                    format!("CT id {ct}: bad counter blob"),
                )
            })?;
            if let Some(state) = by_id.get(&ct).and_then(|u| cts.get_mut(u)) {
                state.open = open;
                state.open_seq = open_seq;
                state.checkpoint = Some(Checkpoint {
                    at,
                    epoch: epoch as u64,
                    slot,
                    counters,
                });
            }
        }
        drop(stmt);
        self.cts = cts;
        Ok(())
    }

    /// Records the CT's destruction time (after its final tick): its window ends there.
    pub fn mark_destroyed(&mut self, uuid: &str, at: i64) -> Result<(), BillingError> {
        let id = self.state(uuid)?.id;
        self.conn
            .execute(
                "UPDATE ct SET destroyed = ?1 WHERE id = ?2",
                params![at, id],
            )
            .map_err(self.sql("marking a CT destroyed"))?;
        if let Some(s) = self.cts.get_mut(uuid) {
            s.info.destroyed = Some(at);
        }
        Ok(())
    }

    fn state(&self, uuid: &str) -> Result<&CtState, BillingError> {
        self.cts
            .get(uuid)
            .ok_or_else(|| BillingError::UnknownCt(uuid.to_string()))
    }

    /// The registered CTs, in no particular order.
    pub fn cts(&self) -> impl Iterator<Item = &CtInfo> {
        self.cts.values().map(|s| &s.info)
    }

    pub fn ct(&self, uuid: &str) -> Result<&CtInfo, BillingError> {
        Ok(&self.state(uuid)?.info)
    }

    pub fn period_spec(&self, uuid: &str) -> Result<&PeriodSpec, BillingError> {
        Ok(&self.state(uuid)?.spec)
    }

    /// The last committed checkpoint of a CT.
    pub fn checkpoint(&self, uuid: &str) -> Result<Option<&Checkpoint>, BillingError> {
        Ok(self.state(uuid)?.checkpoint.as_ref())
    }

    /// The newest sequence number committed.
    pub fn seq(&self) -> i64 {
        self.seq
    }
}

mod agg;
mod current;
mod layer;
mod query;
mod settings;
pub use layer::BASIS;
mod tick;
mod watched;

pub use current::{CurrentBill, CurrentPeriods};
use settings::{decode_classes, migrate_v1};

fn sql_err(path: &Path, op: &'static str) -> impl FnOnce(rusqlite::Error) -> BillingError + use<> {
    let path = path.to_path_buf();
    move |source| BillingError::Sql { path, op, source }
}

fn validate_uuid(uuid: &str) -> Result<(), BillingError> {
    let ok = uuid.len() == 36
        && uuid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(())
    } else {
        Err(BillingError::Uuid(uuid.to_string()))
    }
}

/// Checkpoint counters as fixed 18-byte records: key code (u16), bytes, packets (u64), LE.
fn encode_counters(counters: &BTreeMap<CounterKey, Counter>) -> Vec<u8> {
    let mut v = Vec::with_capacity(counters.len() * 18);
    for (k, c) in counters {
        v.extend_from_slice(&k.code().to_le_bytes());
        v.extend_from_slice(&c.bytes.to_le_bytes());
        v.extend_from_slice(&c.packets.to_le_bytes());
    }
    v
}

/// Open slot rows as fixed 23-byte records: slot index (u32), key code (u16), bytes, packets
/// (u64), flags (u8), LE. Slot indexes fit u32 until the year 42800.
fn encode_open(rows: &[SlotRow]) -> Vec<u8> {
    let mut v = Vec::with_capacity(rows.len() * 23);
    for r in rows {
        v.extend_from_slice(&(slot_index(r.slot_start) as u32).to_le_bytes());
        v.extend_from_slice(&r.key.code().to_le_bytes());
        v.extend_from_slice(&r.counter.bytes.to_le_bytes());
        v.extend_from_slice(&r.counter.packets.to_le_bytes());
        v.push(r.flags.0);
    }
    v
}

fn decode_open(blob: &[u8], seq: i64) -> Option<Vec<SlotRow>> {
    if !blob.len().is_multiple_of(23) {
        return None;
    }
    blob.chunks_exact(23)
        .map(|r| {
            let slot = u32::from_le_bytes(r[0..4].try_into().ok()?);
            Some(SlotRow {
                slot_start: i64::from(slot) * SLOT_SECS,
                key: CounterKey::from_code(u16::from_le_bytes([r[4], r[5]]))?,
                counter: Counter::new(
                    u64::from_le_bytes(r[6..14].try_into().ok()?),
                    u64::from_le_bytes(r[14..22].try_into().ok()?),
                ),
                flags: SlotFlags(r[22]),
                seq,
            })
        })
        .collect()
}

fn decode_counters(blob: &[u8]) -> Option<BTreeMap<CounterKey, Counter>> {
    if !blob.len().is_multiple_of(18) {
        return None;
    }
    blob.chunks_exact(18)
        .map(|r| {
            let key = CounterKey::from_code(u16::from_le_bytes([r[0], r[1]]))?;
            let bytes = u64::from_le_bytes(r[2..10].try_into().ok()?);
            let packets = u64::from_le_bytes(r[10..18].try_into().ok()?);
            Some((key, Counter::new(bytes, packets)))
        })
        .collect()
}

/// The 95th's input: per-slot samples, each with the union of its rows' flags.
#[derive(Debug, Default)]
pub(crate) struct Series {
    samples: Vec<SlotSample>,
    flags: Vec<SlotFlags>,
}

impl Series {
    fn with_capacity(n: usize) -> Series {
        Series {
            samples: Vec::with_capacity(n),
            flags: Vec::with_capacity(n),
        }
    }

    /// Sums per-key slot rows into per-slot samples (the classes `ct` bills, every family).
    /// Rows come
    /// sorted by slot (the slot table's key order, then the newer open rows), so neighbours
    /// merge; an unsorted input still gives correct samples, only more of them (`p95` sums
    /// duplicates, as saturating sums of non-negative values the order does not matter).
    fn push_rows(&mut self, rows: &[SlotRow], ct: &CtInfo) {
        for r in rows.iter().filter(|r| ct.bills_class(r.key.class)) {
            if self.samples.last().is_none_or(|s| s.start != r.slot_start) {
                self.samples.push(SlotSample {
                    start: r.slot_start,
                    ..SlotSample::default()
                });
                self.flags.push(SlotFlags::empty());
            }
            let s = self.samples.last_mut().expect("just pushed");
            match r.key.direction {
                Direction::In => s.in_bytes = s.in_bytes.saturating_add(r.counter.bytes),
                Direction::Out => s.out_bytes = s.out_bytes.saturating_add(r.counter.bytes),
            }
            s.estimated |= r.flags.contains(SlotFlags::ESTIMATED);
            let f = self.flags.last_mut().expect("just pushed");
            *f = f.union(r.flags);
        }
    }

    fn push_sum(&mut self, s: agg::SlotSum) {
        self.samples.push(SlotSample {
            start: s.start,
            in_bytes: s.in_bytes,
            out_bytes: s.out_bytes,
            estimated: s.flags.contains(SlotFlags::ESTIMATED),
        });
        self.flags.push(s.flags);
    }
}

/// The report of one CT for `period` from its slot rows and totals (shared with the CSV
/// recompute so both compute the same numbers the same way). The 95th covers the classes the CT
/// bills; `commit_bps` overrides the CT's commit rate.
pub(crate) fn build_report(
    ct: CtInfo,
    period: Period,
    totals: BTreeMap<CounterKey, Counter>,
    rows: &[SlotRow],
    mode: P95Mode,
    commit_bps: Option<u64>,
    now: i64,
) -> Report {
    let mut series = Series::default();
    series.push_rows(rows, &ct);
    report_from(ct, period, totals, &series, mode, commit_bps, now)
}

fn report_from(
    ct: CtInfo,
    period: Period,
    totals: BTreeMap<CounterKey, Counter>,
    series: &Series,
    mode: P95Mode,
    commit_bps: Option<u64>,
    now: i64,
) -> Report {
    let until = ct.destroyed.map_or(now, |d| d.min(now));
    let window = SlotWindow::new(period.start, period.end, ct.created, until);
    let flags = series
        .samples
        .iter()
        .zip(&series.flags)
        .filter(|(s, _)| window.contains(s.start))
        .fold(SlotFlags::empty(), |u, (_, f)| u.union(*f));
    let commit_bps = commit_bps.or(ct.commit_bps);
    let p95 = p95(&series.samples, window, mode, commit_bps);
    Report {
        ct,
        period,
        window,
        totals,
        p95,
        flags,
        commit_bps,
    }
}

/// Slot index as stored (start/300): 3 bytes in SQLite's record format instead of 4–5.
fn slot_index(start: i64) -> i64 {
    start.div_euclid(SLOT_SECS)
}

#[cfg(test)]
#[path = "store_agg_tests.rs"]
mod agg_tests;
#[cfg(test)]
#[path = "store_measure.rs"]
mod measure;
#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
