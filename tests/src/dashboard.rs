//! The shipped Grafana dashboard (`dashboards/berth-containers.json`) read the way Grafana lays
//! it out: rows and the panels under them, with the queries' template variables filled in, so
//! a test can run a row's queries against a real Prometheus.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

pub fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/berth-containers.json")
}

/// One panel's title and its queries.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub exprs: Vec<String>,
}

/// The panels of the (expanded) row whose title starts with `row_title`: those whose `gridPos.y`
/// lies between that row's and the next row's, as Grafana places them.
pub fn row_panels(dashboard: &Value, row_title: &str) -> Result<Vec<Panel>> {
    let panels = dashboard["panels"].as_array().context("no panels")?;
    let y = |p: &Value| p["gridPos"]["y"].as_i64().unwrap_or(i64::MAX);
    let rows: Vec<&Value> = panels.iter().filter(|p| p["type"] == "row").collect();
    let row = rows
        .iter()
        .find(|r| {
            r["title"]
                .as_str()
                .is_some_and(|t| t.starts_with(row_title))
        })
        .with_context(|| format!("no row {row_title:?}"))?;
    let (top, bottom) = (
        y(row),
        rows.iter()
            .map(|r| y(r))
            .filter(|&ry| ry > y(row))
            .min()
            .unwrap_or(i64::MAX),
    );
    let mut out = Vec::new();
    for p in panels
        .iter()
        .filter(|p| p["type"] != "row" && (top..bottom).contains(&y(p)))
    {
        let exprs = p["targets"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|t| t["expr"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Panel {
            title: p["title"].as_str().unwrap_or("").to_owned(),
            exprs,
        });
    }
    ensure!(!out.is_empty(), "row {row_title:?} has no panels");
    Ok(out)
}

/// Every panel of the dashboard (rows' titles are not panels), in its order, with the title of
/// the row it sits under.
pub fn all_panels(dashboard: &Value) -> Result<Vec<(String, Panel)>> {
    let panels = dashboard["panels"].as_array().context("no panels")?;
    let mut rows: Vec<&Value> = panels.iter().filter(|p| p["type"] == "row").collect();
    rows.sort_by_key(|r| r["gridPos"]["y"].as_i64());
    let mut out = Vec::new();
    for r in &rows {
        let title = r["title"].as_str().unwrap_or("").to_owned();
        for p in row_panels(dashboard, &title)? {
            out.push((title.clone(), p));
        }
    }
    Ok(out)
}

/// The dashboard's template variables' names (besides the data source).
pub fn variables(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|v| v["type"] != "datasource")
                .filter_map(|v| v["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A query as Grafana sends it with the `node` variable set to `node` (a regex: `.*` is All,
/// which matches a single node's series without the label) and `ctid` to one CT.
pub fn for_node_ct(expr: &str, node: &str, ctid: &str) -> String {
    expr.replace("$node", node)
        .replace("$ctid", ctid)
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
}

/// A query as Grafana sends it on a single node (`node` All) with `ctid` set to one CT.
pub fn for_ct(expr: &str, ctid: &str) -> String {
    for_node_ct(expr, ".*", ctid)
}
