//! list: vzlist's listing. A table (strings left-, numbers right-aligned, `-` for none) or
//! the CT objects as JSON.

use std::cmp::Ordering;

use anyhow::{Result, bail};
use berth::ct::{self, Field, Kind};
use berth::exit_codes::SCHEMA_VERSION;
use berth::inventory::{self, DEFAULT_FIELDS, DEFAULT_NAME_FIELDS, FIELDS, Selection, Which};
use serde_json::{Value, json};

use crate::Ctx;
use crate::cli::ListArgs;
use crate::table::{Align, render};

pub fn list(ctx: &Ctx, a: &ListArgs) -> Result<()> {
    if a.list_fields {
        for f in FIELDS {
            println!("{:<14} {:<14} {}", f.name, f.header, f.doc);
        }
        return Ok(());
    }
    if a.templates {
        bail!("list -t: berth has no template CTs (OS templates: `berth template list`)");
    }
    if a.description.is_some() {
        bail!("list -d: berth CTs have no description to filter on");
    }
    let json = ctx.json || a.json;
    // Without -o, JSON carries the whole object; a table the default columns.
    let spec = match (&a.output, a.name_column, a.ctids_only) {
        (Some(o), ..) => Some(o.as_str()),
        (None, _, true) => Some("ctid"),
        (None, true, _) => Some(DEFAULT_NAME_FIELDS),
        (None, false, _) if json => None,
        (None, false, _) => Some(DEFAULT_FIELDS),
    };
    let fields = spec.map(inventory::parse_fields).transpose()?;
    let sort = a
        .sort
        .as_deref()
        .map(|s| -> Result<(&'static Field, bool)> {
            let (name, rev) = match s.strip_prefix('-') {
                Some(n) => (n, true),
                None => (s, false),
            };
            Ok((ct::field(name)?, rev))
        })
        .transpose()?;
    let mut need = fields.as_deref().map_or(ct::Need::ALL, ct::need_of);
    if let Some((f, _)) = sort {
        need = need.or(f.need());
    }
    let sel = Selection {
        cts: a.cts.clone(),
        which: if a.all {
            Which::All
        } else if a.stopped {
            Which::Stopped
        } else {
            Which::Running
        },
        hostname: a.hostname.clone(),
        name: a.name_filter.clone(),
        netif: a.netif.clone(),
    };
    let views = inventory::list(&ctx.host, &ctx.pin_dir, &sel, need)?;
    let mut rows: Vec<Value> = views
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    if let Some((f, rev)) = sort {
        // Stable: ties keep CTID order. Unset values sort last either way, as vzlist's do.
        rows.sort_by(|x, y| {
            let (vx, vy) = (f.value(x), f.value(y));
            match (vx.is_null(), vy.is_null()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                _ if rev => compare(vy, vx),
                _ => compare(vx, vy),
            }
        });
    }
    if json {
        let cts: Vec<Value> = match &fields {
            Some(fs) => rows.iter().map(|r| ct::subset(r, fs)).collect(),
            None => rows,
        };
        println!("{}", json!({"schema_version": SCHEMA_VERSION, "cts": cts}));
        return Ok(());
    }
    let fields = fields.expect("a table always has fields");
    if a.ctids_only {
        for r in &rows {
            println!("{}", r["ctid"]);
        }
        return Ok(());
    }
    print!("{}", table(&fields, &rows, !a.no_header));
    Ok(())
}

fn compare(a: &Value, b: &Value) -> Ordering {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => cell_text(a, Kind::Text).cmp(&cell_text(b, Kind::Text)),
    }
}

/// The table of `rows` with `fields` as columns.
fn table(fields: &[&Field], rows: &[Value], header: bool) -> String {
    let headers: Vec<(&str, Align)> = fields
        .iter()
        .map(|f| {
            let align = if f.kind == Kind::Text {
                Align::Left
            } else {
                Align::Right
            };
            (f.header, align)
        })
        .collect();
    let cells = rows
        .iter()
        .map(|r| {
            fields
                .iter()
                .map(|f| cell_text(f.value(r), f.kind))
                .collect()
        })
        .collect();
    render(&headers, cells, header)
}

/// A value as a table cell: `-` for none or empty, sizes human-readable.
fn cell_text(v: &Value, kind: Kind) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a
            .iter()
            .map(|v| cell_text(v, kind))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Number(n) => match kind {
            Kind::Bytes => n
                .as_u64()
                .map_or_else(|| n.to_string(), berth::human::bytes),
            Kind::Seconds => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
            _ => n.to_string(),
        },
        v => v.to_string(),
    }
}
