//! One node's shipper: ledger pages (whole ticks, `Ledger::slots_after_seq`) into the central
//! database, each page in one transaction with the node's acknowledged seq, the next page read
//! from the ledger while one is written (pages.rs).
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres::{Client, Transaction};
use tracing::{debug, info, warn};

use super::pages::{self, Page};
use super::{ConnInfo, FleetError, check_node, db, i64_of, schema, slots};
use crate::billing::{BillingAnchor, CtInfo, Ledger};
use berth_runtime::error_chain::ErrorChain;

/// What a shipper ships as, and how much at once.
#[derive(Debug, Clone)]
pub struct ShipOptions {
    /// The node name the central rows are keyed by.
    pub node: String,
    /// Slot rows per transaction (whole ticks: a tick larger than this is one page).
    pub page_rows: u32,
}

/// What one [`Shipper::ship`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipStats {
    /// Transactions committed with slot rows.
    pub pages: u64,
    /// Slot rows sent.
    pub rows_sent: u64,
    /// Slot rows inserted or changed (0 for a replay of what the database holds).
    pub rows_written: u64,
    /// The node's acknowledged seq afterwards.
    pub acked_seq: i64,
    /// The ledger's seq when it was read.
    pub ledger_seq: i64,
}

/// The shipper's state for metrics and logs, shared with berthd's exposition.
#[derive(Debug, Default)]
pub struct ShipStatus {
    pub acked_seq: AtomicI64,
    pub ledger_seq: AtomicI64,
    /// Unix seconds of the last round that caught up.
    pub last_success: AtomicI64,
    /// Rounds that failed since the last success.
    pub failing_rounds: AtomicU64,
    pub failures_total: AtomicU64,
    pub rows_written_total: AtomicU64,
}

impl ShipStatus {
    /// Ticks of the ledger not yet acknowledged by the central database.
    pub fn lag(&self) -> i64 {
        (self.ledger_seq.load(Ordering::Relaxed) - self.acked_seq.load(Ordering::Relaxed)).max(0)
    }
}

/// A connection to the central database, made on first use and made again after a failure.
pub struct Shipper {
    info: ConnInfo,
    opts: ShipOptions,
    client: Option<Client>,
}

fn anchor_name(a: BillingAnchor) -> String {
    match a {
        BillingAnchor::Day(d) => d.to_string(),
        BillingAnchor::Anniversary => "anniversary".to_string(),
    }
}

impl Shipper {
    pub fn new(info: ConnInfo, opts: ShipOptions) -> Result<Shipper, FleetError> {
        check_node(&opts.node)?;
        Ok(Shipper {
            info,
            opts,
            client: None,
        })
    }

    pub fn target(&self) -> &str {
        &self.info.redacted
    }

    async fn client(&mut self) -> Result<&mut Client, FleetError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let target = self.info.redacted.clone();
            let tls = self.info.tls()?;
            let (mut client, conn) =
                self.info
                    .config
                    .connect(tls)
                    .await
                    .map_err(|source| FleetError::Connect {
                        target: target.clone(),
                        source,
                    })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %ErrorChain(&e), "central database connection ended");
                }
            });
            schema::migrate(&mut client).await?;
            client
                .batch_execute(
                    "CREATE TEMP TABLE IF NOT EXISTS berth_ship_slot (
                         ct_uuid text, slot_start bigint, direction text, class smallint,
                         family text, bytes bigint, packets bigint, flags smallint, seq bigint
                     ) ON COMMIT DELETE ROWS",
                )
                .await
                .map_err(db("creating the staging table"))?;
            info!(target = %target, node = %self.opts.node, "connected to the central database");
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| FleetError::ConnInfo("no connection".to_string()))
    }

    /// The node's acknowledged seq in the central database (0: nothing shipped yet).
    pub async fn acked_seq(&mut self) -> Result<i64, FleetError> {
        let node = self.opts.node.clone();
        let r = self.with_client(async |c| {
            c.query_opt("SELECT last_seq FROM berth_node WHERE node = $1", &[&node])
                .await
                .map_err(db("reading the acknowledged seq"))
        });
        Ok(r.await?.map_or(0, |r| r.get(0)))
    }

    /// Sets the node's acknowledged seq back to `seq` (0: a full replay from the ledger).
    pub async fn rewind(&mut self, seq: i64) -> Result<(), FleetError> {
        let node = self.opts.node.clone();
        self.with_client(async |c| {
            c.execute(
                "UPDATE berth_node SET last_seq = least(last_seq, $2) WHERE node = $1",
                &[&node, &seq],
            )
            .await
            .map_err(db("rewinding the acknowledged seq"))
        })
        .await
        .map(|_| ())
    }

    async fn with_client<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, FleetError>,
    ) -> Result<T, FleetError> {
        let c = self.client().await?;
        let r = f(c).await;
        if r.is_err() {
            // A failed statement may have been a dead connection: the next call connects anew.
            self.client = None;
        }
        r
    }

    /// Ships everything the ledger at `ledger_path` holds past the node's acknowledged seq,
    /// page by page, until caught up with the ledger as opened.
    pub async fn ship(&mut self, ledger_path: &Path) -> Result<ShipStats, FleetError> {
        let ledger = Ledger::open_read_only(ledger_path).map_err(FleetError::Ledger)?;
        let opts = self.opts.clone();
        self.with_client(async |c| ship_ledger(c, ledger, &opts).await)
            .await
    }
}

async fn ship_ledger(
    client: &mut Client,
    ledger: Ledger,
    opts: &ShipOptions,
) -> Result<ShipStats, FleetError> {
    let node = opts.node.as_str();
    // CTs registered after the ledger was opened are not in `ledger.cts()`: rows of ticks after
    // its seq wait for the next round, so a page never acknowledges a tick it did not ship whole.
    let ledger_seq = ledger.seq();
    let layer = ledger.byte_layer().map_err(FleetError::Ledger)?;
    let cts: Vec<CtInfo> = ledger.cts().cloned().collect();
    let mut stats = ShipStats {
        ledger_seq,
        ..ShipStats::default()
    };
    let tx = client
        .transaction()
        .await
        .map_err(db("starting a transaction"))?;
    tx.execute(
        "INSERT INTO berth_node (node, layer) VALUES ($1, $2)
         ON CONFLICT (node) DO UPDATE SET layer = excluded.layer",
        &[&node, &layer],
    )
    .await
    .map_err(db("registering the node"))?;
    let mut acked = locked_ack(&tx, node).await?;
    upsert_cts(&tx, &cts, node).await?;
    tx.commit().await.map_err(db("committing"))?;
    stats.acked_seq = acked;
    // Page N+1 is read from the ledger while page N is written: the reader owns the ledger.
    let (mut pages, reader) = pages::read_ahead(ledger, acked, ledger_seq, opts.page_rows);
    while let Some(page) = pages.recv().await {
        let page = page?;
        let tx = client
            .transaction()
            .await
            .map_err(db("starting a transaction"))?;
        let now = locked_ack(&tx, node).await?;
        if now != page.after {
            // Another shipper of this node name moved the seq since the page was read: this
            // round stops here, the next starts from what the database holds.
            warn!(
                node,
                acked = now,
                expected = page.after,
                "the acknowledged seq moved under the shipper; resuming from it next round"
            );
            stats.acked_seq = now;
            return Ok(stats);
        }
        let written = slots::write(&tx, node, &page.rows).await?;
        upsert_totals(&tx, node, &page).await?;
        ack(&tx, node, page.last).await?;
        tx.commit().await.map_err(db("committing a page"))?;
        debug!(
            node,
            rows = page.rows.len(),
            written,
            acked = page.last,
            "page shipped"
        );
        stats.pages += 1;
        stats.rows_sent += page.rows.len() as u64;
        stats.rows_written += written;
        stats.acked_seq = page.last;
        acked = page.last;
    }
    reader.await.map_err(|_| FleetError::Reader)?;
    if ledger_seq > acked {
        // Caught up: ticks up to the ledger's seq that booked no row are shipped too.
        let n = client
            .execute(
                "UPDATE berth_node SET last_seq = $2, shipped_at = now()
                 WHERE node = $1 AND last_seq = $3",
                &[&node, &ledger_seq, &acked],
            )
            .await
            .map_err(db("acknowledging the seq"))?;
        if n == 1 {
            stats.acked_seq = ledger_seq;
        }
    }
    Ok(stats)
}

/// The node's acknowledged seq, locked for the transaction.
async fn locked_ack(tx: &Transaction<'_>, node: &str) -> Result<i64, FleetError> {
    Ok(tx
        .query_one(
            "SELECT last_seq FROM berth_node WHERE node = $1 FOR UPDATE",
            &[&node],
        )
        .await
        .map_err(db("reading the acknowledged seq"))?
        .get(0))
}

async fn ack(tx: &Transaction<'_>, node: &str, seq: i64) -> Result<(), FleetError> {
    tx.execute(
        "UPDATE berth_node SET last_seq = $2, shipped_at = now() WHERE node = $1",
        &[&node, &seq],
    )
    .await
    .map_err(db("acknowledging the seq"))?;
    Ok(())
}

async fn upsert_cts(tx: &Transaction<'_>, cts: &[CtInfo], node: &str) -> Result<(), FleetError> {
    let uuid: Vec<&str> = cts.iter().map(|c| c.uuid.as_str()).collect();
    let ctid: Vec<i64> = cts.iter().map(|c| i64::from(c.ctid)).collect();
    let day: Vec<String> = cts.iter().map(|c| anchor_name(c.anchor)).collect();
    let tz: Vec<&str> = cts.iter().map(|c| c.tz.as_str()).collect();
    let created: Vec<i64> = cts.iter().map(|c| c.created).collect();
    let destroyed: Vec<Option<i64>> = cts.iter().map(|c| c.destroyed).collect();
    let commit: Vec<Option<i64>> = cts.iter().map(|c| c.commit_bps.map(i64_of)).collect();
    let classes: Vec<Option<String>> = cts
        .iter()
        .map(|c| {
            c.classes.as_ref().map(|v| {
                v.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            })
        })
        .collect();
    tx.execute(
        "INSERT INTO berth_ct AS c (node, ct_uuid, ct_id, billing_day, tz, created, destroyed,
                                    commit_bps, classes)
         SELECT $1, u::uuid, i, d, z, cr, de, cm, string_to_array(cl, ',')::smallint[]
         FROM unnest($2::text[], $3::int8[], $4::text[], $5::text[], $6::int8[], $7::int8[],
                     $8::int8[], $9::text[]) AS x (u, i, d, z, cr, de, cm, cl)
         ON CONFLICT (node, ct_uuid) DO UPDATE SET ct_id = excluded.ct_id,
             billing_day = excluded.billing_day, tz = excluded.tz, created = excluded.created,
             destroyed = excluded.destroyed, commit_bps = excluded.commit_bps,
             classes = excluded.classes
         WHERE (c.ct_id, c.billing_day, c.tz, c.created, c.destroyed, c.commit_bps, c.classes)
               IS DISTINCT FROM (excluded.ct_id, excluded.billing_day, excluded.tz,
               excluded.created, excluded.destroyed, excluded.commit_bps, excluded.classes)",
        &[
            &node, &uuid, &ctid, &day, &tz, &created, &destroyed, &commit, &classes,
        ],
    )
    .await
    .map_err(db("upserting CT metadata"))?;
    Ok(())
}

/// The totals and bounds of every period the page touched, as the ledger had them when the page
/// was read.
async fn upsert_totals(tx: &Transaction<'_>, node: &str, page: &Page) -> Result<(), FleetError> {
    let (p, t) = (&page.periods, &page.totals);
    tx.execute(
        "INSERT INTO berth_period (node, ct_uuid, period_start, period_end, period)
         SELECT $1, u::uuid, s, e, n
         FROM unnest($2::text[], $3::int8[], $4::int8[], $5::text[]) AS x (u, s, e, n)
         ON CONFLICT (node, ct_uuid, period_start) DO UPDATE
         SET period_end = excluded.period_end, period = excluded.period
         WHERE (berth_period.period_end, berth_period.period)
               IS DISTINCT FROM (excluded.period_end, excluded.period)",
        &[&node, &p.uuid, &p.start, &p.end, &p.label],
    )
    .await
    .map_err(db("upserting periods"))?;
    tx.execute(
        "INSERT INTO berth_total AS t (node, ct_uuid, period_start, direction, class, family,
                                       bytes, packets)
         SELECT $1, u::uuid, s, d, c, f, b, p
         FROM unnest($2::text[], $3::int8[], $4::text[], $5::int2[], $6::text[], $7::int8[],
                     $8::int8[]) AS x (u, s, d, c, f, b, p)
         ON CONFLICT (node, ct_uuid, period_start, direction, class, family) DO UPDATE
         SET bytes = excluded.bytes, packets = excluded.packets
         WHERE (t.bytes, t.packets) IS DISTINCT FROM (excluded.bytes, excluded.packets)",
        &[
            &node,
            &t.uuid,
            &t.start,
            &t.direction,
            &t.class,
            &t.family,
            &t.bytes,
            &t.packets,
        ],
    )
    .await
    .map_err(db("upserting period totals"))?;
    Ok(())
}

/// Backoff after `failures` failed rounds in a row: 1 s doubling to 60 s.
pub fn backoff(failures: u64) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

impl Shipper {
    /// One round with its outcome recorded in `status` and the log: what berthd runs after each
    /// tick and `berth billing ship` every interval. Ok: it caught up.
    pub async fn round(
        &mut self,
        ledger_path: &Path,
        status: &ShipStatus,
        now: i64,
    ) -> Result<ShipStats, FleetError> {
        match self.ship(ledger_path).await {
            Ok(s) => {
                status.acked_seq.store(s.acked_seq, Ordering::Relaxed);
                status.ledger_seq.store(s.ledger_seq, Ordering::Relaxed);
                status.last_success.store(now, Ordering::Relaxed);
                status.failing_rounds.store(0, Ordering::Relaxed);
                status
                    .rows_written_total
                    .fetch_add(s.rows_written, Ordering::Relaxed);
                if s.pages > 0 {
                    info!(
                        node = %self.opts.node,
                        pages = s.pages,
                        rows = s.rows_sent,
                        written = s.rows_written,
                        acked_seq = s.acked_seq,
                        "ledger shipped"
                    );
                }
                Ok(s)
            }
            Err(e) => {
                let n = status.failing_rounds.fetch_add(1, Ordering::Relaxed) + 1;
                status.failures_total.fetch_add(1, Ordering::Relaxed);
                warn!(
                    target_db = %self.info.redacted,
                    node = %self.opts.node,
                    lag_seq = status.lag(),
                    failing_rounds = n,
                    retry_in = ?backoff(n),
                    error = %ErrorChain(&e),
                    "shipping the ledger failed; nothing is lost, retrying"
                );
                Err(e)
            }
        }
    }
}
