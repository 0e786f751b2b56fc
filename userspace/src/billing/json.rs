//! The JSON spelling of a report and of a slot row, shared by `berth billing --json` and
//! berthd's `/v1/billing/*` endpoints so the two cannot drift apart.

use serde_json::{Value, json};

use super::{BillingAnchor, BillingError, Direction, PeriodSpec, Report, SlotRow};

fn anchor_name(a: BillingAnchor) -> String {
    match a {
        BillingAnchor::Day(d) => d.to_string(),
        BillingAnchor::Anniversary => "anniversary".to_string(),
    }
}

/// Bytes in and out over every class the CT bills (all of them unless it has a class filter)
/// and every family.
pub fn direction_sums(r: &Report) -> (u64, u64) {
    let mut sums = (0u64, 0u64);
    for (k, c) in r.totals.iter().filter(|(k, _)| r.ct.bills_class(k.class)) {
        match k.direction {
            Direction::In => sums.0 += c.bytes,
            Direction::Out => sums.1 += c.bytes,
        }
    }
    sums
}

/// One CT's bill; instants in RFC 3339 in the time zone of the period's settings. `layer` is
/// the ledger's byte layer (`Ledger::byte_layer`), `basis` what its bytes are.
/// `billing_day` and `tz` are the settings the period is laid out with; `next_settings` is set
/// while a change waits for a later period to begin.
pub fn report_json(r: &Report, layer: Option<&str>) -> Result<Value, BillingError> {
    let spec = PeriodSpec::with_history(&r.ct.history, r.ct.anchor, &r.ct.tz, r.ct.created)?;
    let (anchor, tz) = spec.settings_at(r.period.start);
    let next = match r.ct.history.last() {
        Some(h) if h.until > r.period.start => Some(json!({
            "billing_day": anchor_name(r.ct.anchor),
            "tz": r.ct.tz,
            "from": spec.rfc3339(h.until)?,
        })),
        _ => None,
    };
    let totals: Vec<Value> = r
        .totals
        .iter()
        .map(|(k, c)| {
            json!({
                "direction": k.direction.as_str(),
                "class": k.class,
                "family": k.family.as_str(),
                "bytes": c.bytes,
                "packets": c.packets,
                "billed": r.ct.bills_class(k.class),
            })
        })
        .collect();
    let (in_bytes, out_bytes) = direction_sums(r);
    let p = &r.p95;
    Ok(json!({
        "ct_uuid": r.ct.uuid,
        "ctid": r.ct.ctid,
        "billing_day": anchor_name(anchor),
        "tz": tz,
        "next_settings": next,
        "commit_bits_per_second": r.commit_bps,
        "classes": r.ct.classes,
        "period": r.period.label(),
        "period_start": spec.rfc3339(r.period.start)?,
        "period_end": spec.rfc3339(r.period.end)?,
        "created": spec.rfc3339(r.ct.created)?,
        "destroyed": r.ct.destroyed.map(|d| spec.rfc3339(d)).transpose()?,
        "layer": layer,
        "basis": super::store::BASIS,
        "in_bytes": in_bytes,
        "out_bytes": out_bytes,
        "totals": totals,
        "p95": {
            "mode": p.mode.as_str(),
            "bits_per_second": p.bps,
            "slot_bytes": p.slot_bytes,
            "in_bits_per_second": p.in_bps,
            "out_bits_per_second": p.out_bps,
            "n": p.n,
            "slots_present": p.slots_present,
            "slots_estimated": p.slots_estimated,
            "slots_over_commit": p.slots_over_commit,
        },
        "flags": r.flags.to_names(),
    }))
}

/// Reports as one document: the object of the one CT asked for, or an array for `all` (also
/// when it holds one CT or none, so a consumer of `all` always gets the same type).
pub fn reports_json(
    reports: &[Report],
    all: bool,
    layer: Option<&str>,
) -> Result<Value, BillingError> {
    let mut v: Vec<Value> = reports
        .iter()
        .map(|r| report_json(r, layer))
        .collect::<Result<_, _>>()?;
    if !all && v.len() == 1 {
        return Ok(v.remove(0));
    }
    Ok(Value::Array(v))
}

/// One slot row; `slot_start` in RFC 3339 in the CT's time zone (`spec`).
pub fn slot_json(spec: &PeriodSpec, r: &SlotRow) -> Result<Value, BillingError> {
    Ok(json!({
        "slot_start": spec.rfc3339(r.slot_start)?,
        "direction": r.key.direction.as_str(),
        "class": r.key.class,
        "family": r.key.family.as_str(),
        "bytes": r.counter.bytes,
        "packets": r.counter.packets,
        "flags": r.flags.to_names(),
        "seq": r.seq,
    }))
}
