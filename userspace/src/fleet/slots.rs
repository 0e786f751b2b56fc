//! A page's slot rows into `berth_slot`. Most pages of a backfill (a node joining the fleet, a
//! shipper catching up after an outage) hold only slots the database cannot have yet: those are
//! COPYed straight into the table. A page that may touch rows already there (the open slot
//! of every tick, a replay) goes through the staging table and an upsert.
use std::collections::{HashMap, HashSet};
use std::pin::pin;

use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use super::{FleetError, db, i64_of};
use crate::billing::SlotRow;

const STAGING_COLUMNS: [Type; 9] = [
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::INT2,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT2,
    Type::INT8,
];

const SLOT_COLUMNS: [Type; 10] = [
    Type::TEXT,
    Type::UUID,
    Type::INT8,
    Type::TEXT,
    Type::INT2,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT2,
    Type::INT8,
];

/// The page's rows once each (a later duplicate of a key would make the upsert fail with
/// "cannot affect row a second time", so the latest wins), in `berth_slot`'s key order: a page
/// comes tick by tick across every CT, which would touch the index pages in a scattered order.
fn rows_once(page: &[(String, SlotRow)]) -> Vec<(&str, &SlotRow)> {
    let mut seen: HashSet<(&str, i64, u16)> = HashSet::with_capacity(page.len());
    let mut rows: Vec<(&str, &SlotRow)> = page
        .iter()
        .rev()
        .filter(|(u, r)| seen.insert((u.as_str(), r.slot_start, r.key.code())))
        .map(|(u, r)| (u.as_str(), r))
        .collect();
    rows.sort_unstable_by(|(ua, a), (ub, b)| {
        (
            *ua,
            a.slot_start,
            a.key.direction.as_str(),
            a.key.class,
            a.key.family.as_str(),
        )
            .cmp(&(
                *ub,
                b.slot_start,
                b.key.direction.as_str(),
                b.key.class,
                b.key.family.as_str(),
            ))
    });
    rows
}

/// Whether the database may hold a row of the page already: some CT of the page has a row at or
/// after the page's earliest slot of that CT. Only this node's shipper writes its rows, and it
/// holds the node's row lock (`locked_ack`), so the answer stays true for the transaction.
async fn may_conflict(
    tx: &Transaction<'_>,
    node: &str,
    rows: &[(&str, &SlotRow)],
) -> Result<bool, FleetError> {
    let mut lo: HashMap<&str, i64> = HashMap::new();
    for (u, r) in rows {
        lo.entry(u)
            .and_modify(|s| *s = (*s).min(r.slot_start))
            .or_insert(r.slot_start);
    }
    let (uuid, first): (Vec<&str>, Vec<i64>) = lo.into_iter().unzip();
    Ok(tx
        .query_one(
            "SELECT EXISTS (
                 SELECT 1 FROM unnest($2::text[], $3::int8[]) AS p (u, lo)
                 WHERE EXISTS (SELECT 1 FROM berth_slot s
                               WHERE s.node = $1 AND s.ct_uuid = p.u::uuid
                                 AND s.slot_start >= p.lo))",
            &[&node, &uuid, &first],
        )
        .await
        .map_err(db("looking for slot rows the page may change"))?
        .get(0))
}

/// Writes the page's slot rows with the node's values; returns the rows inserted or changed.
pub(super) async fn write(
    tx: &Transaction<'_>,
    node: &str,
    page: &[(String, SlotRow)],
) -> Result<u64, FleetError> {
    let rows = rows_once(page);
    // A UUID PostgreSQL would not take goes the upsert's way, whose cast names it.
    let uuids: Option<Vec<Uuid>> = rows.iter().map(|(u, _)| Uuid::parse_str(u).ok()).collect();
    match uuids {
        Some(uuids) if !may_conflict(tx, node, &rows).await? => {
            copy_new(tx, node, &rows, &uuids).await
        }
        _ => upsert(tx, node, &rows).await,
    }
}

/// COPYs `rows` with `stmt`: into `berth_slot` with the node and the parsed UUIDs first
/// (`uuids`), or into the staging table with the UUID as text.
async fn copy_rows(
    tx: &Transaction<'_>,
    stmt: &str,
    types: &[Type],
    node: &str,
    rows: &[(&str, &SlotRow)],
    uuids: Option<&[Uuid]>,
) -> Result<u64, FleetError> {
    let sink = tx
        .copy_in(stmt)
        .await
        .map_err(db("starting the slot copy"))?;
    let mut w = pin!(BinaryCopyInWriter::new(sink, types));
    for (i, (uuid, r)) in rows.iter().enumerate() {
        let (class, flags) = (i16::from(r.key.class), i16::from(r.flags.0));
        let (bytes, packets) = (i64_of(r.counter.bytes), i64_of(r.counter.packets));
        let (direction, family) = (r.key.direction.as_str(), r.key.family.as_str());
        let mut row: Vec<&(dyn ToSql + Sync)> = match uuids {
            Some(u) => vec![&node, &u[i]],
            None => vec![uuid],
        };
        row.extend::<[&(dyn ToSql + Sync); 8]>([
            &r.slot_start,
            &direction,
            &class,
            &family,
            &bytes,
            &packets,
            &flags,
            &r.seq,
        ]);
        w.as_mut()
            .write(&row)
            .await
            .map_err(db("copying slot rows"))?;
    }
    w.finish().await.map_err(db("finishing the slot copy"))
}

async fn copy_new(
    tx: &Transaction<'_>,
    node: &str,
    rows: &[(&str, &SlotRow)],
    uuids: &[Uuid],
) -> Result<u64, FleetError> {
    copy_rows(
        tx,
        "COPY berth_slot (node, ct_uuid, slot_start, direction, class, family, bytes, packets,
                          flags, seq) FROM STDIN (FORMAT binary)",
        &SLOT_COLUMNS,
        node,
        rows,
        Some(uuids),
    )
    .await
}

async fn upsert(
    tx: &Transaction<'_>,
    node: &str,
    rows: &[(&str, &SlotRow)],
) -> Result<u64, FleetError> {
    copy_rows(
        tx,
        "COPY berth_ship_slot FROM STDIN (FORMAT binary)",
        &STAGING_COLUMNS,
        node,
        rows,
        None,
    )
    .await?;
    // The staging table was filled in key order (`rows_once`) and is read back in it.
    tx.execute(
        "INSERT INTO berth_slot AS s (node, ct_uuid, slot_start, direction, class, family, bytes,
                                      packets, flags, seq)
         SELECT $1, ct_uuid::uuid, slot_start, direction, class, family, bytes, packets, flags, seq
         FROM berth_ship_slot
         ON CONFLICT (node, ct_uuid, slot_start, direction, class, family) DO UPDATE
         SET bytes = excluded.bytes, packets = excluded.packets, flags = excluded.flags,
             seq = excluded.seq
         WHERE (s.bytes, s.packets, s.flags) IS DISTINCT FROM
               (excluded.bytes, excluded.packets, excluded.flags)",
        &[&node],
    )
    .await
    .map_err(db("upserting slot rows"))
}
