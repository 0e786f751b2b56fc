//! billing: reports, the slot record and the auditor's recompute, read from berthd's ledger
//! (opened read-only: the CLI never writes it).

use berth::clock::unix_now;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use berth::billing::graph::{Format, p95_label, render_png, render_svg};
use berth::billing::json::{direction_sums, reports_json, slot_json};
use berth::billing::{
    BillingAnchor, Ledger, P95Mode, Period, PeriodSpec, Report, SlotRow, csv::recompute_with,
};
use berth::datapath::{ByteLayer, DatapathView};
use berth_runtime::billing::{parse_classes, parse_commit};
use berth_runtime::config::{ConfigError, CtConfig};
use serde_json::Value;

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
            print_reports(ctx, &reports, ct == "all", csv, ledger.byte_layer()?)
        }
        BillingCmd::Slots { ct, period, csv } => {
            output_flags(ctx, csv)?;
            let ledger = open(&ledger_path)?;
            let uuid = uuid_of(ctx, &ledger, &ct)?;
            let p = period_of(&ledger, &uuid, period.as_deref(), now)?;
            if csv {
                let layer = match ledger.byte_layer()? {
                    Some(l) => l,
                    None => byte_layer(&ctx.pin_dir)?,
                };
                let mut out = std::io::stdout().lock();
                ledger.export_csv(&mut out, &uuid, &p, layer, now)?;
                out.flush().context("writing the export")?;
                return Ok(());
            }
            let spec = ledger.period_spec(&uuid)?;
            let rows = ledger.slots(&uuid, p.start, p.end)?;
            print_slots(ctx, spec, &rows)
        }
        BillingCmd::Graph { ct, period, output } => {
            let Some(format) = Format::of(&output) else {
                bail!(
                    "{}: unknown graph format (the file name must end in .svg or .png)",
                    output.display()
                );
            };
            let ledger = open(&ledger_path)?;
            let uuid = uuid_of(ctx, &ledger, &ct)?;
            let p = period_of(&ledger, &uuid, period.as_deref(), now)?;
            let report = ledger.report(&uuid, &p, P95Mode::Max, None, now)?;
            let rows = ledger.slots(&uuid, p.start, p.end)?;
            let bytes = match format {
                Format::Svg => render_svg(&report, &rows)?.into_bytes(),
                Format::Png => render_png(&report, &rows)?,
            };
            // Written whole after the drawing succeeded: a failure leaves no partial file.
            let tmp = output.with_extension(format!("{}.tmp", format.extension()));
            std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &output)
                .with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))?;
            if ctx.json {
                println!(
                    "{}",
                    serde_json::json!({"file": output, "p95_bits_per_second": report.p95.bps})
                );
            } else {
                println!("{}: {}", output.display(), p95_label(&report));
            }
            Ok(())
        }
        BillingCmd::Ship(s) => crate::ship::ship(&ledger_path, s),
        BillingCmd::Recompute {
            file,
            mode,
            csv,
            billing_day,
            tz,
            commit,
            classes,
        } => {
            let mode: P95Mode = mode.parse()?;
            output_flags(ctx, csv)?;
            // Checked before the file is read: a bad flag is named as such.
            let anchor = billing_day
                .as_deref()
                .map(BillingAnchor::parse)
                .transpose()
                .context("--billing-day")?;
            if let (Some(a), Some(z)) = (anchor, tz.as_deref()) {
                PeriodSpec::new(a, z, 0).context("--tz")?;
            }
            let commit = commit
                .as_deref()
                .map(|c| parse_commit("--commit", c))
                .transpose()?
                .flatten()
                .map(|r| r.bits_per_sec());
            let classes = classes
                .as_deref()
                .map(|c| parse_classes("--classes", c))
                .transpose()?
                .flatten();
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let over = anchor.zip(tz.as_deref());
            let r = recompute_with(std::io::BufReader::new(f), mode, commit, over, classes)
                .with_context(|| format!("recomputing {}", file.display()))?;
            // The file's own rows carry their layer; the report is about the file.
            print_reports(ctx, &[r], false, csv, None)
        }
    }
}

fn output_flags(ctx: &Ctx, csv: bool) -> Result<()> {
    if csv && ctx.json {
        bail!("--csv and --json exclude each other");
    }
    Ok(())
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

fn print_reports(
    ctx: &Ctx,
    reports: &[Report],
    all: bool,
    csv: bool,
    layer: Option<&str>,
) -> Result<()> {
    if ctx.json {
        println!("{}", reports_json(reports, all, layer)?);
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
            "billed",
            "commit_bits_per_second",
            "slots_over_commit",
            "layer",
            "basis",
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
                    r.ct.bills_class(k.class).to_string(),
                    r.commit_bps.map_or_else(String::new, |c| c.to_string()),
                    r.p95.slots_over_commit.to_string(),
                    layer.unwrap_or("").to_string(),
                    berth::billing::store::BASIS.to_string(),
                ])?;
            }
        }
        w.flush()?;
        return Ok(());
    }
    println!(
        "{:>6} {:36} {:7} {:>16} {:>16} {:>14} {:>6} {:>7} {:>14} {:>6} {:9} flags",
        "CTID",
        "UUID",
        "PERIOD",
        "IN_BYTES",
        "OUT_BYTES",
        "P95_BPS",
        "N",
        "PRESENT",
        "COMMIT_BPS",
        "OVER",
        "CLASSES"
    );
    for r in reports {
        // Billed bytes: the classes the CT is billed for.
        let (i, o) = direction_sums(r);
        let classes = r.ct.classes.as_ref().map_or_else(
            || "all".to_string(),
            |c| c.iter().map(u8::to_string).collect::<Vec<_>>().join(","),
        );
        println!(
            "{:>6} {:36} {:7} {:>16} {:>16} {:>14} {:>6} {:>7} {:>14} {:>6} {:9} {}",
            r.ct.ctid,
            r.ct.uuid,
            r.period.label(),
            i,
            o,
            r.p95.bps,
            r.p95.n,
            r.p95.slots_present,
            r.commit_bps
                .map_or_else(|| "-".to_string(), |c| c.to_string()),
            r.p95.slots_over_commit,
            classes,
            r.flags.to_names()
        );
    }
    Ok(())
}

fn print_slots(ctx: &Ctx, spec: &PeriodSpec, rows: &[SlotRow]) -> Result<()> {
    if ctx.json {
        let v: Vec<Value> = rows
            .iter()
            .map(|r| slot_json(spec, r))
            .collect::<Result<_, _>>()?;
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
