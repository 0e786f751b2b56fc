//! billing: reports, the slot record and the auditor's recompute, read from berthd's ledger
//! (opened read-only: the CLI never writes it).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use berth::billing::{
    BillingAnchor, Ledger, P95Mode, Period, PeriodSpec, Report, SlotRow, csv::recompute,
};
use berth::datapath::{ByteLayer, DatapathView};
use berth_runtime::config::{ConfigError, CtConfig};
use serde_json::{Value, json};

use crate::Ctx;
use crate::cli::{BillingArgs, BillingCmd};

pub fn billing(ctx: &Ctx, a: BillingArgs) -> Result<()> {
    let ledger_path = a
        .ledger
        .clone()
        .unwrap_or_else(|| ctx.host.root.join("billing.db"));
    let now = unix_now();
    match a.cmd {
        BillingCmd::Report {
            ct,
            period,
            mode,
            csv,
        } => {
            let mode: P95Mode = mode.parse()?;
            output_flags(ctx, csv)?;
            let ledger = open(&ledger_path)?;
            let uuids = if ct == "all" {
                let mut cts: Vec<_> = ledger.cts().collect();
                cts.sort_by(|a, b| (a.ctid, &a.uuid).cmp(&(b.ctid, &b.uuid)));
                cts.into_iter().map(|c| c.uuid.clone()).collect()
            } else {
                vec![uuid_of(ctx, &ledger, &ct)?]
            };
            let mut reports = Vec::with_capacity(uuids.len());
            for u in &uuids {
                let p = period_of(&ledger, u, period.as_deref(), now)?;
                reports.push(ledger.report(u, &p, mode, None, now)?);
            }
            print_reports(ctx, &reports, csv)
        }
        BillingCmd::Slots { ct, period, csv } => {
            output_flags(ctx, csv)?;
            let ledger = open(&ledger_path)?;
            let uuid = uuid_of(ctx, &ledger, &ct)?;
            let p = period_of(&ledger, &uuid, period.as_deref(), now)?;
            if csv {
                let layer = byte_layer(&ctx.pin_dir)?;
                let mut out = std::io::stdout().lock();
                ledger.export_csv(&mut out, &uuid, &p, layer, now)?;
                out.flush().context("writing the export")?;
                return Ok(());
            }
            let spec = ledger.period_spec(&uuid)?;
            let rows = ledger.slots(&uuid, p.start, p.end)?;
            print_slots(ctx, spec, &rows)
        }
        BillingCmd::Recompute { file, mode, csv } => {
            let mode: P95Mode = mode.parse()?;
            output_flags(ctx, csv)?;
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let r = recompute(std::io::BufReader::new(f), mode, None, None)
                .with_context(|| format!("recomputing {}", file.display()))?;
            print_reports(ctx, &[r], csv)
        }
    }
}

fn output_flags(ctx: &Ctx, csv: bool) -> Result<()> {
    if csv && ctx.json {
        bail!("--csv and --json exclude each other");
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn open(path: &Path) -> Result<Ledger> {
    if !path.exists() {
        bail!(
            "no ledger at {}: is berthd running with --ledger?",
            path.display()
        );
    }
    Ok(Ledger::open_read_only(path)?)
}

/// The byte layer the counters count, for the export (the datapath's setting; L2 when none is
/// pinned, the datapath's default).
fn byte_layer(pin_dir: &Path) -> Result<&'static str> {
    let layer = match DatapathView::open_pinned(pin_dir)? {
        Some(v) => v.config()?.byte_layer,
        None => ByteLayer::default(),
    };
    Ok(match layer {
        ByteLayer::L2 => "l2",
        ByteLayer::L3 => "l3",
    })
}

/// The ledger UUID a CT argument names: a UUID as is, a CTID or name through its config, or the
/// newest ledger CT with that CTID once its config is gone.
fn uuid_of(ctx: &Ctx, ledger: &Ledger, ct: &str) -> Result<String> {
    if let Ok(u) = uuid::Uuid::parse_str(ct) {
        let u = u.hyphenated().to_string();
        ledger.ct(&u)?;
        return Ok(u);
    }
    let ctid = ctx.resolve(ct)?;
    match CtConfig::load(&ctx.host, ctid) {
        Ok(cfg) => {
            let Some(u) = cfg.uuid else {
                bail!("CT {ctid} has no UUID yet (it gets one at its first start): not billed yet");
            };
            let u = u.hyphenated().to_string();
            ledger
                .ct(&u)
                .with_context(|| format!("CT {ctid} has not been ticked into the ledger yet"))?;
            Ok(u)
        }
        Err(ConfigError::NotFound(_)) => ledger
            .cts()
            .filter(|c| c.ctid == ctid.get())
            .max_by_key(|c| c.created)
            .map(|c| c.uuid.clone())
            .with_context(|| format!("CT {ctid} is neither configured nor in the ledger")),
        Err(e) => Err(e.into()),
    }
}

fn period_of(ledger: &Ledger, uuid: &str, label: Option<&str>, now: i64) -> Result<Period> {
    let spec = ledger.period_spec(uuid)?;
    Ok(match label {
        Some(l) => spec.parse(l)?,
        None => spec.period_of(now)?,
    })
}

fn anchor_name(a: BillingAnchor) -> String {
    match a {
        BillingAnchor::Day(d) => d.to_string(),
        BillingAnchor::Anniversary => "anniversary".to_string(),
    }
}

fn report_json(r: &Report) -> Result<Value> {
    let spec = PeriodSpec::new(r.ct.anchor, &r.ct.tz, r.ct.created)?;
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
            })
        })
        .collect();
    let (in_bytes, out_bytes) = direction_sums(r);
    let p = &r.p95;
    Ok(json!({
        "ct_uuid": r.ct.uuid,
        "ctid": r.ct.ctid,
        "billing_day": anchor_name(r.ct.anchor),
        "tz": r.ct.tz,
        "period": r.period.label(),
        "period_start": spec.rfc3339(r.period.start)?,
        "period_end": spec.rfc3339(r.period.end)?,
        "created": spec.rfc3339(r.ct.created)?,
        "destroyed": r.ct.destroyed.map(|d| spec.rfc3339(d)).transpose()?,
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

fn direction_sums(r: &Report) -> (u64, u64) {
    let mut sums = (0u64, 0u64);
    for (k, c) in &r.totals {
        match k.direction {
            berth::billing::Direction::In => sums.0 += c.bytes,
            berth::billing::Direction::Out => sums.1 += c.bytes,
        }
    }
    sums
}

fn print_reports(ctx: &Ctx, reports: &[Report], csv: bool) -> Result<()> {
    if ctx.json {
        let v: Vec<Value> = reports.iter().map(report_json).collect::<Result<_>>()?;
        // One CT: its object; `all`: an array.
        let out = if v.len() == 1 && reports.len() == 1 {
            v.into_iter().next().unwrap_or(Value::Null)
        } else {
            Value::Array(v)
        };
        println!("{out}");
        return Ok(());
    }
    if csv {
        let mut w = ::csv::Writer::from_writer(std::io::stdout().lock());
        w.write_record([
            "ct_uuid",
            "ctid",
            "period",
            "direction",
            "class",
            "family",
            "bytes",
            "packets",
            "p95_mode",
            "p95_bits_per_second",
            "n",
            "slots_present",
            "slots_estimated",
            "flags",
        ])?;
        for r in reports {
            for (k, c) in &r.totals {
                w.write_record([
                    r.ct.uuid.clone(),
                    r.ct.ctid.to_string(),
                    r.period.label(),
                    k.direction.as_str().to_string(),
                    k.class.to_string(),
                    k.family.as_str().to_string(),
                    c.bytes.to_string(),
                    c.packets.to_string(),
                    r.p95.mode.as_str().to_string(),
                    r.p95.bps.to_string(),
                    r.p95.n.to_string(),
                    r.p95.slots_present.to_string(),
                    r.p95.slots_estimated.to_string(),
                    r.flags.to_names(),
                ])?;
            }
        }
        w.flush()?;
        return Ok(());
    }
    println!(
        "{:>6} {:36} {:7} {:>16} {:>16} {:>14} {:>6} {:>7} flags",
        "CTID", "UUID", "PERIOD", "IN_BYTES", "OUT_BYTES", "P95_BPS", "N", "PRESENT"
    );
    for r in reports {
        let (i, o) = direction_sums(r);
        println!(
            "{:>6} {:36} {:7} {:>16} {:>16} {:>14} {:>6} {:>7} {}",
            r.ct.ctid,
            r.ct.uuid,
            r.period.label(),
            i,
            o,
            r.p95.bps,
            r.p95.n,
            r.p95.slots_present,
            r.flags.to_names()
        );
    }
    Ok(())
}

fn print_slots(ctx: &Ctx, spec: &PeriodSpec, rows: &[SlotRow]) -> Result<()> {
    if ctx.json {
        let v: Vec<Value> = rows
            .iter()
            .map(|r| {
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
            })
            .collect::<Result<_>>()?;
        println!("{}", Value::Array(v));
        return Ok(());
    }
    println!(
        "{:25} {:3} {:>5} {:4} {:>14} {:>10} flags",
        "SLOT", "DIR", "CLASS", "FAM", "BYTES", "PACKETS"
    );
    for r in rows {
        println!(
            "{:25} {:3} {:>5} {:4} {:>14} {:>10} {}",
            spec.rfc3339(r.slot_start)?,
            r.key.direction.as_str(),
            r.key.class,
            r.key.family.as_str(),
            r.counter.bytes,
            r.counter.packets,
            r.flags.to_names()
        );
    }
    Ok(())
}
