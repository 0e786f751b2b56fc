//! shaper status: the host's shaping backend, and a CT's configured and live shaping.

use anyhow::Result;
use berth::datapath::Direction;
use berth::shaper::report::rate_text;
use berth::shaper::{BackendStatus, ShaperStatus};
use berth_runtime::config::CtConfig;
use berth_runtime::container;
use serde_json::{Value, json};

use crate::Ctx;
use crate::cli::ShaperCmd;
use crate::table::Align;

pub fn shaper(ctx: &Ctx, c: ShaperCmd) -> Result<()> {
    match c {
        ShaperCmd::Status { ct } => status(ctx, ct.as_deref()),
    }
}

fn status(ctx: &Ctx, ct: Option<&str>) -> Result<()> {
    let backend = berth::shaper::backend_status()?;
    let mut v = json!({ "backend": backend });
    let mut live = None;
    if let Some(ct) = ct {
        let ctid = ctx.resolve(ct)?;
        let cfg = CtConfig::load(&ctx.host, ctid)?;
        v["ctid"] = json!(ctid);
        v["configured"] = json!(cfg.active_shaping());
        if container::running(&ctx.host, ctid).is_some() {
            let l = berth::shaper::read_status(&ctx.pin_dir, ctid)?;
            v["live"] = serde_json::to_value(&l)?;
            live = Some(l);
        }
    }
    ctx.print(v.clone(), || {
        print!("{}", human(&v, &backend, live.as_ref()))
    });
    Ok(())
}

/// The text view: the backend and why; with a CT its configured shaping, then per shaped
/// interface a table of its classes and its drops by direction and reason.
fn human(v: &Value, b: &BackendStatus, live: Option<&ShaperStatus>) -> String {
    let mut s = format!(
        "backend: {} ({})\nedt:     {}\n",
        b.backend.name(),
        b.reason,
        b.edt
    );
    let Some(ctid) = v.get("ctid") else {
        return s;
    };
    let configured = match v.get("configured") {
        Some(c) if !c.is_null() => settings(c),
        _ => "none".to_owned(),
    };
    s.push_str(&format!("\nCT {ctid} configured: {configured}\n"));
    let Some(live) = live else {
        s.push_str("live: - (not running)\n");
        return s;
    };
    if live.interfaces.is_empty() {
        s.push_str("live: no shaped interface\n");
    }
    for i in &live.interfaces {
        let name = i
            .ifname
            .clone()
            .unwrap_or_else(|| format!("#{}", i.ifindex));
        let via = i
            .ifb
            .as_ref()
            .map(|f| format!(" (out via {f})"))
            .unwrap_or_default();
        s.push_str(&format!(
            "\ninterface {name}{via}: overlimits in {} out {}\n",
            i.overlimits_in, i.overlimits_out
        ));
        let headers = [
            ("DIR", Align::Left),
            ("CLASSID", Align::Left),
            ("ROLE", Align::Left),
            ("NETCLASS", Align::Right),
            ("RATE", Align::Right),
            ("CEIL", Align::Right),
            ("BURST", Align::Right),
            ("BYTES", Align::Right),
            ("PACKETS", Align::Right),
            ("DROPS", Align::Right),
            ("OVERLIMITS", Align::Right),
        ];
        let rows = i
            .classes
            .iter()
            .map(|c| {
                vec![
                    dir(c.dir).to_owned(),
                    c.classid.clone(),
                    c.role.to_owned(),
                    c.network_class
                        .map_or_else(|| "-".into(), |n| n.to_string()),
                    rate_text(c.rate_bps),
                    rate_text(c.ceil_bps),
                    berth::human::bytes(c.burst_bytes),
                    berth::human::bytes(c.bytes),
                    c.packets.to_string(),
                    c.drops.to_string(),
                    c.overlimits.to_string(),
                ]
            })
            .collect();
        s.push_str(&crate::table::render(&headers, rows, true));
        let drops: Vec<String> = i
            .drops
            .iter()
            .filter(|d| d.packets > 0)
            .map(|d| format!("{} {}={}", dir(d.dir), d.reason, d.packets))
            .collect();
        s.push_str(&format!(
            "drops: {}\n",
            if drops.is_empty() {
                "none".to_owned()
            } else {
                drops.join(", ")
            }
        ));
    }
    s
}

fn dir(d: Direction) -> &'static str {
    match d {
        Direction::In => "in",
        Direction::Out => "out",
    }
}

/// `key=value` pairs of a settings object, nested lists and objects in brackets.
fn settings(v: &Value) -> String {
    match v {
        Value::Object(m) => m
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k}={}", settings(v)))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(settings).collect::<Vec<_>>().join(", ")
        ),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
