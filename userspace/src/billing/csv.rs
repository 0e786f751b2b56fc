//! The 5-minute record of a CT for a period as RFC 4180 CSV with a header, and the recompute of
//! its totals and 95th from that file alone, so a customer or an auditor can check an invoice
//! without berth's database. Every row carries the period and the CT's lifetime, so the file is
//! self-contained, and its row number and the file's row count, so a truncated file is an error
//! (a cut inside a row leaves it short, a cut between rows leaves the count unmet).
use std::collections::{BTreeMap, BTreeSet};
use std::io;

use jiff::Timestamp;

use super::p95::P95Mode;
use super::period::{BillingAnchor, Period, PeriodSpec};
use super::store::{CtInfo, Ledger, Report, SlotRow, build_report};
use super::{BillingError, Counter, CounterKey, Direction, Family, SLOT_SECS, SlotFlags};

/// The columns, in order.
pub const HEADER: [&str; 19] = [
    "ct_uuid",
    "ctid",
    "layer",
    "billing_day",
    "tz",
    "period",
    "period_start",
    "period_end",
    "created",
    "until",
    "slot_start",
    "direction",
    "class",
    "family",
    "bytes",
    "packets",
    "flags",
    "row",
    "rows",
];

/// What an export describes besides its slot rows.
#[derive(Debug, Clone, Copy)]
pub struct ExportContext<'a> {
    pub ct: &'a CtInfo,
    pub spec: &'a PeriodSpec,
    pub period: Period,
    /// End of the CT's window: the earlier of the export time and its destruction.
    pub until: i64,
    /// The byte layer counted (`l2` or `l3`), as the datapath defines it.
    pub layer: &'a str,
}

/// Writes `rows` (the CT's slot rows of `ctx.period`) as CSV. Returns the number of rows.
pub fn write_slots<W: io::Write>(
    w: W,
    ctx: &ExportContext<'_>,
    rows: &[SlotRow],
) -> Result<u64, BillingError> {
    let werr = |source| BillingError::CsvWrite { source };
    let mut out = csv::Writer::from_writer(w);
    out.write_record(HEADER).map_err(werr)?;
    // The settings the period is laid out with (after a change, the CT's older periods keep
    // theirs).
    let (anchor, tz) = ctx.spec.settings_at(ctx.period.start);
    let day = match anchor {
        BillingAnchor::Day(d) => d.to_string(),
        BillingAnchor::Anniversary => "anniversary".to_string(),
    };
    let fixed = [
        ctx.ct.uuid.clone(),
        ctx.ct.ctid.to_string(),
        ctx.layer.to_string(),
        day,
        tz.to_string(),
        ctx.period.label(),
        ctx.spec.rfc3339(ctx.period.start)?,
        ctx.spec.rfc3339(ctx.period.end)?,
        utc(ctx.ct.created)?,
        utc(ctx.until)?,
    ];
    let total = rows.len().to_string();
    for (i, r) in rows.iter().enumerate() {
        let mut rec: Vec<String> = fixed.to_vec();
        rec.extend([
            utc(r.slot_start)?,
            r.key.direction.as_str().to_string(),
            r.key.class.to_string(),
            r.key.family.as_str().to_string(),
            r.counter.bytes.to_string(),
            r.counter.packets.to_string(),
            r.flags.to_names(),
            (i + 1).to_string(),
            total.clone(),
        ]);
        out.write_record(&rec).map_err(werr)?;
    }
    out.flush()
        .map_err(|e| BillingError::CsvWrite { source: e.into() })?;
    Ok(rows.len() as u64)
}

fn utc(t: i64) -> Result<String, BillingError> {
    Timestamp::from_second(t)
        .map(|ts| ts.to_string())
        .map_err(|source| BillingError::PeriodRange {
            what: format!("instant {t}"),
            tz: "UTC".to_string(),
            source,
        })
}

impl Ledger {
    /// Exports a CT's slot rows of `period` as CSV (see [`write_slots`]), as of `now`.
    pub fn export_csv<W: io::Write>(
        &self,
        w: W,
        uuid: &str,
        period: &Period,
        layer: &str,
        now: i64,
    ) -> Result<u64, BillingError> {
        let ct = self.ct(uuid)?;
        let spec = self.period_spec(uuid)?;
        let rows = self.slots(uuid, period.start, period.end)?;
        let until = ct.destroyed.map_or(now, |d| d.min(now));
        let ctx = ExportContext {
            ct,
            spec,
            period: *period,
            until,
            layer,
        };
        write_slots(w, &ctx, &rows)
    }
}

/// What the file's rows agree on.
#[derive(PartialEq, Eq)]
struct Fixed {
    uuid: String,
    ctid: u32,
    day: String,
    tz: String,
    label: String,
    period_start: i64,
    period_end: i64,
    created: i64,
    until: i64,
    rows: u64,
}

/// Recomputes a CT's totals and 95th from an exported CSV alone. With `period_override`
/// (billing anchor, IANA zone) the period is recomputed in those terms: the one holding the
/// exported period's start, with only the rows inside it counted.
pub fn recompute<R: io::Read>(
    input: R,
    mode: P95Mode,
    commit_bps: Option<u64>,
    period_override: Option<(BillingAnchor, &str)>,
) -> Result<Report, BillingError> {
    recompute_with(input, mode, commit_bps, period_override, None)
}

/// [`recompute`] billing only the network classes `classes` (`None`: every class) in the 95th
/// and the billed bytes, as a CT with that class filter is billed.
pub fn recompute_with<R: io::Read>(
    input: R,
    mode: P95Mode,
    commit_bps: Option<u64>,
    period_override: Option<(BillingAnchor, &str)>,
    classes: Option<Vec<u8>>,
) -> Result<Report, BillingError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(input);
    let header = rdr
        .headers()
        .map_err(|source| BillingError::CsvRead { line: 1, source })?;
    if header.iter().ne(HEADER.iter().copied()) {
        return Err(BillingError::CsvLine {
            line: 1,
            detail: format!(
                "header is {:?}, expected {}",
                header.iter().collect::<Vec<_>>(),
                HEADER.join(",")
            ),
        });
    }
    let mut fixed: Option<Fixed> = None;
    let mut rows: Vec<SlotRow> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut last_line = 1;
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|source| BillingError::CsvRead {
            line: source.position().map_or(last_line + 1, |p| p.line()),
            source,
        })?;
        let line = rec.position().map_or(last_line + 1, |p| p.line());
        last_line = line;
        let bad = |detail: String| BillingError::CsvLine { line, detail };
        let f = |i: usize| &rec[i];
        let int = |i: usize| -> Result<u64, BillingError> {
            f(i).parse().map_err(|_| {
                bad(format!(
                    "{} {:?} is not a non-negative integer",
                    HEADER[i],
                    f(i)
                ))
            })
        };
        let time = |i: usize| -> Result<i64, BillingError> {
            f(i).parse::<Timestamp>()
                .map(|t| t.as_second())
                .map_err(|_| bad(format!("{} {:?} is not an RFC 3339 time", HEADER[i], f(i))))
        };
        let this = Fixed {
            uuid: f(0).to_string(),
            ctid: u32::try_from(int(1)?)
                .map_err(|_| bad(format!("ctid {} is out of range", f(1))))?,
            day: f(3).to_string(),
            tz: f(4).to_string(),
            label: f(5).to_string(),
            period_start: time(6)?,
            period_end: time(7)?,
            created: time(8)?,
            until: time(9)?,
            rows: int(18)?,
        };
        match &fixed {
            None => fixed = Some(this),
            Some(prev) if *prev != this => {
                return Err(bad(
                    "CT, period or row count differs from the first row".to_string()
                ));
            }
            Some(_) => {}
        }
        let fx = fixed.as_ref().expect("set above");
        if int(17)? != i as u64 + 1 {
            return Err(bad(format!(
                "row number {} where {} was expected",
                f(17),
                i + 1
            )));
        }
        let slot_start = time(10)?;
        if slot_start.rem_euclid(SLOT_SECS) != 0 {
            return Err(bad(format!(
                "slot_start {} is not on a 5-minute boundary",
                f(10)
            )));
        }
        if slot_start + SLOT_SECS <= fx.period_start || slot_start >= fx.period_end {
            return Err(bad(format!("slot_start {} is outside the period", f(10))));
        }
        let direction = Direction::parse(f(11))
            .ok_or_else(|| bad(format!("direction {:?} is not in or out", f(11))))?;
        let class = u8::try_from(int(12)?)
            .map_err(|_| bad(format!("class {} is out of range 0–255", f(12))))?;
        let family = Family::parse(f(13))
            .ok_or_else(|| bad(format!("family {:?} is not ipv4 or ipv6", f(13))))?;
        let key = CounterKey::new(direction, class, family);
        if !seen.insert((slot_start, key)) {
            return Err(bad(format!(
                "slot {} {} class {} {} appears twice",
                f(10),
                f(11),
                f(12),
                f(13)
            )));
        }
        let flags = SlotFlags::parse_names(f(16))
            .ok_or_else(|| bad(format!("unknown flags {:?}", f(16))))?;
        rows.push(SlotRow {
            slot_start,
            key,
            counter: Counter::new(int(14)?, int(15)?),
            flags,
            seq: 0,
        });
    }
    let Some(fx) = fixed else {
        return Err(BillingError::CsvEmpty(
            "no slot rows after the header: nothing to recompute".to_string(),
        ));
    };
    if rows.len() as u64 != fx.rows {
        return Err(BillingError::CsvLine {
            line: last_line,
            detail: format!(
                "truncated: the file ends after row {} of {}",
                rows.len(),
                fx.rows
            ),
        });
    }
    let stored = BillingAnchor::parse(&fx.day).map_err(|e| BillingError::CsvLine {
        line: 2,
        detail: e.to_string(),
    })?;
    let (anchor, tz) = period_override.unwrap_or((stored, fx.tz.as_str()));
    let spec = PeriodSpec::new(anchor, tz, fx.created)?;
    let period = match period_override {
        Some(_) => spec.period_of(fx.period_start)?,
        None => {
            let p = spec.period_of(fx.period_start)?;
            let q = spec.period_of(fx.period_end - 1)?;
            if (p.start, p.end) == (fx.period_start, fx.period_end) {
                p
            } else if q.end == fx.period_end
                && q.label() == fx.label
                && fx.period_start < fx.period_end
                && fx.period_start >= spec.prev(&q)?.start
            {
                // The first period after a change of billing day or time zone: it starts where
                // the old settings' last period ended (see `PeriodSpec`), and ends on a boundary
                // of the file's (new) settings.
                Period {
                    start: fx.period_start,
                    ..q
                }
            } else {
                return Err(BillingError::CsvLine {
                    line: 2,
                    detail: format!(
                        "period_start/period_end do not match billing day {} in {}",
                        fx.day, fx.tz
                    ),
                });
            }
        }
    };
    rows.retain(|r| period.contains(r.slot_start) || period.contains(r.slot_start + SLOT_SECS - 1));
    let mut totals: BTreeMap<CounterKey, Counter> = BTreeMap::new();
    for r in &rows {
        let t = totals.entry(r.key).or_default();
        t.bytes = t
            .bytes
            .checked_add(r.counter.bytes)
            .ok_or_else(|| BillingError::CsvEmpty("byte total overflows 64 bits".to_string()))?;
        t.packets = t
            .packets
            .checked_add(r.counter.packets)
            .ok_or_else(|| BillingError::CsvEmpty("packet total overflows 64 bits".to_string()))?;
    }
    let ct = CtInfo {
        uuid: fx.uuid,
        ctid: fx.ctid,
        anchor,
        tz: tz.to_string(),
        created: fx.created,
        destroyed: None,
        commit_bps: None,
        classes,
        history: Vec::new(),
    };
    Ok(build_report(
        ct, period, totals, &rows, mode, commit_bps, fx.until,
    ))
}

#[cfg(test)]
#[path = "csv_tests.rs"]
mod tests;
