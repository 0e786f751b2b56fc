//! list: one line (or JSON object) per CT with the chosen fields.

use anyhow::Result;
use berth::inventory::{self, DEFAULT_FIELDS, FIELDS};
use serde_json::Value;

use crate::Ctx;
use crate::cli::ListArgs;

pub fn list(ctx: &Ctx, a: &ListArgs) -> Result<()> {
    if a.list_fields {
        for (f, doc) in FIELDS {
            println!("{f:<16} {doc}");
        }
        return Ok(());
    }
    let fields = inventory::parse_fields(a.output.as_deref().unwrap_or(DEFAULT_FIELDS))?;
    let rows = inventory::rows(&ctx.host, a.all, &fields, &ctx.pin_dir)?;
    if ctx.json {
        let arr: Vec<Value> = rows
            .iter()
            .map(|r| {
                Value::Object(
                    fields
                        .iter()
                        .zip(r)
                        .map(|(f, v)| (f.to_string(), v.clone()))
                        .collect(),
                )
            })
            .collect();
        println!("{}", Value::Array(arr));
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(cell).collect()).collect();
    let header: Vec<String> = fields.iter().map(|f| f.to_uppercase()).collect();
    let mut width: Vec<usize> = header.iter().map(String::len).collect();
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.len());
        }
    }
    let line = |r: &[String]| {
        r.iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>w$}", w = width[i]))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if !a.no_header {
        println!("{}", line(&header));
    }
    for r in &cells {
        println!("{}", line(r));
    }
    Ok(())
}

/// A value as the table shows it: `-` for none, fractions with two decimals.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => n
            .as_f64()
            .filter(|_| n.is_f64())
            .map(|f| format!("{f:.2}"))
            .unwrap_or_else(|| n.to_string()),
        v => v.to_string(),
    }
}
