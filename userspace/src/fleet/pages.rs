//! The shipper's ledger side, read ahead: a thread of its own reads page N+1 (its slot rows and
//! the totals and bounds of the periods they touch) while the database writes page N, one page
//! in hand at most.
use std::collections::{BTreeSet, HashMap};

use tokio::sync::mpsc;

use super::{FleetError, i64_of};
use crate::billing::{Ledger, Period, SlotRow};

/// One page as the ledger had it when read: whole ticks after `after`, up to `last`.
#[derive(Debug, Default)]
pub(super) struct Page {
    /// The acknowledged seq this page follows (what the database must hold to take it).
    pub after: i64,
    /// The seq of its last tick: acknowledged with it.
    pub last: i64,
    pub rows: Vec<(String, SlotRow)>,
    pub periods: PeriodRows,
    pub totals: TotalRows,
}

/// `berth_period` rows of the periods a page touched, column by column (for `unnest`).
#[derive(Debug, Default)]
pub(super) struct PeriodRows {
    pub uuid: Vec<String>,
    pub start: Vec<i64>,
    pub end: Vec<i64>,
    pub label: Vec<String>,
}

/// `berth_total` rows of those periods, column by column.
#[derive(Debug, Default)]
pub(super) struct TotalRows {
    pub uuid: Vec<String>,
    pub start: Vec<i64>,
    pub direction: Vec<&'static str>,
    pub class: Vec<i16>,
    pub family: Vec<&'static str>,
    pub bytes: Vec<i64>,
    pub packets: Vec<i64>,
}

/// The page after `after`: up to `page_rows` rows of whole ticks up to `until` (the ledger's
/// seq when the round began), with its periods' totals as the ledger has them now. `None`:
/// nothing left.
pub(super) fn read_page(
    ledger: &Ledger,
    after: i64,
    until: i64,
    page_rows: u32,
) -> Result<Option<Page>, FleetError> {
    if after >= until {
        return Ok(None);
    }
    let mut rows = ledger
        .slots_after_seq(after, page_rows)
        .map_err(FleetError::Ledger)?;
    rows.retain(|(_, r)| r.seq <= until);
    let Some(last) = rows.last().map(|(_, r)| r.seq) else {
        return Ok(None);
    };
    let mut seen: HashMap<&str, Period> = HashMap::new();
    let mut touched: BTreeSet<(&str, i64, i64, String)> = BTreeSet::new();
    for (uuid, r) in &rows {
        if seen
            .get(uuid.as_str())
            .is_some_and(|p| p.start <= r.slot_start && r.slot_start < p.end)
        {
            continue;
        }
        let p = ledger
            .period_spec(uuid)
            .and_then(|s| s.period_of(r.slot_start))
            .map_err(FleetError::Ledger)?;
        touched.insert((uuid.as_str(), p.start, p.end, p.label()));
        seen.insert(uuid.as_str(), p);
    }
    let mut periods = PeriodRows::default();
    let mut totals = TotalRows::default();
    for (uuid, start, end, label) in touched {
        periods.uuid.push(uuid.to_owned());
        periods.start.push(start);
        periods.end.push(end);
        periods.label.push(label);
        for (k, c) in ledger.totals(uuid, start).map_err(FleetError::Ledger)? {
            totals.uuid.push(uuid.to_owned());
            totals.start.push(start);
            totals.direction.push(k.direction.as_str());
            totals.class.push(i16::from(k.class));
            totals.family.push(k.family.as_str());
            totals.bytes.push(i64_of(c.bytes));
            totals.packets.push(i64_of(c.packets));
        }
    }
    Ok(Some(Page {
        after,
        last,
        rows,
        periods,
        totals,
    }))
}

/// Reads pages from `after` on a blocking thread into a channel one page deep; it ends after
/// the last page, on the first error (sent), or when the receiver is dropped.
pub(super) fn read_ahead(
    ledger: Ledger,
    after: i64,
    until: i64,
    page_rows: u32,
) -> (
    mpsc::Receiver<Result<Page, FleetError>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(1);
    let reader = tokio::task::spawn_blocking(move || {
        let mut after = after;
        loop {
            match read_page(&ledger, after, until, page_rows) {
                Ok(Some(p)) => {
                    after = p.last;
                    if tx.blocking_send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    (rx, reader)
}
