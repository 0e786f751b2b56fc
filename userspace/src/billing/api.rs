//! berthd's read-only billing endpoints: query parsing and the JSON answers of
//! `GET /v1/billing/report` and `GET /v1/billing/slots` (the HTTP plumbing stays in berthd).

use serde_json::{Value, json};

use super::json::{reports_json, slot_json};
use super::{BillingError, Ledger, P95Mode, Period};

/// The default and the largest `limit` of one `/v1/billing/slots` page.
pub const SLOTS_DEFAULT_LIMIT: u32 = 10_000;
pub const SLOTS_MAX_LIMIT: u32 = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtSelector {
    All,
    Ctid(u32),
    Uuid(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportQuery {
    pub ct: CtSelector,
    /// `YYYY-MM`, checked for syntax; `None`: each CT's current period.
    pub period: Option<String>,
    pub mode: P95Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotsQuery {
    pub after_seq: i64,
    pub limit: u32,
}

/// Why a request got no answer; [`ApiError::status`] is its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("query parameter {param:?}: {detail}")]
    BadParam { param: String, detail: String },
    #[error("CT {0} is not in the billing ledger")]
    UnknownCt(String),
    #[error("reading the billing ledger")]
    Ledger(#[source] BillingError),
}

impl ApiError {
    fn bad(param: &str, detail: impl Into<String>) -> ApiError {
        ApiError::BadParam {
            param: param.to_string(),
            detail: detail.into(),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadParam { .. } => 400,
            ApiError::UnknownCt(_) => 404,
            ApiError::Ledger(_) => 500,
        }
    }

    /// `{"error": "...", "parameter": "..."}` (the parameter only for a bad query); the message
    /// carries the whole cause chain.
    pub fn body(&self) -> Value {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        match self {
            ApiError::BadParam { param, .. } => json!({"error": msg, "parameter": param}),
            _ => json!({ "error": msg }),
        }
    }
}

/// `k=v` pairs of a query string; a repeated, empty-named or unknown parameter is an error.
fn pairs<'a>(query: Option<&'a str>, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, ApiError> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if !known.contains(&k) {
            return Err(ApiError::bad(
                k,
                format!("unknown parameter (expected {})", known.join(", ")),
            ));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(ApiError::bad(k, "given more than once"));
        }
        out.push((k, v));
    }
    Ok(out)
}

pub fn parse_report_query(query: Option<&str>) -> Result<ReportQuery, ApiError> {
    let mut ct = None;
    let mut period = None;
    let mut mode = P95Mode::Max;
    for (k, v) in pairs(query, &["ct", "period", "mode"])? {
        match k {
            "ct" => ct = Some(parse_ct(v)?),
            "period" => {
                Period::parse_label(v).map_err(|e| ApiError::bad("period", e.to_string()))?;
                period = Some(v.to_string());
            }
            _ => {
                mode = v
                    .parse()
                    .map_err(|e: BillingError| ApiError::bad("mode", e.to_string()))?
            }
        }
    }
    let ct = ct.ok_or_else(|| ApiError::bad("ct", "missing (a CTID, a CT UUID or `all`)"))?;
    Ok(ReportQuery { ct, period, mode })
}

fn parse_ct(v: &str) -> Result<CtSelector, ApiError> {
    if v == "all" {
        return Ok(CtSelector::All);
    }
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .map(CtSelector::Ctid)
            .ok_or_else(|| ApiError::bad("ct", format!("CTID {v:?} out of range")));
    }
    uuid::Uuid::parse_str(v)
        .map(|u| CtSelector::Uuid(u.hyphenated().to_string()))
        .map_err(|_| ApiError::bad("ct", format!("{v:?} is neither a CTID, a UUID nor `all`")))
}

pub fn parse_slots_query(query: Option<&str>) -> Result<SlotsQuery, ApiError> {
    let mut q = SlotsQuery {
        after_seq: 0,
        limit: SLOTS_DEFAULT_LIMIT,
    };
    for (k, v) in pairs(query, &["after_seq", "limit"])? {
        if k == "after_seq" {
            q.after_seq = v.parse().ok().filter(|&n: &i64| n >= 0).ok_or_else(|| {
                ApiError::bad("after_seq", format!("{v:?} is not a sequence number ≥ 0"))
            })?;
        } else {
            q.limit = v
                .parse()
                .ok()
                .filter(|&n: &u32| (1..=SLOTS_MAX_LIMIT).contains(&n))
                .ok_or_else(|| {
                    ApiError::bad("limit", format!("{v:?} is not 1–{SLOTS_MAX_LIMIT}"))
                })?;
        }
    }
    Ok(q)
}

/// The ledger UUID of a CTID: its live CT, else the newest one with that CTID.
fn uuid_of_ctid(ledger: &Ledger, ctid: u32) -> Option<String> {
    ledger
        .cts()
        .filter(|c| c.ctid == ctid)
        .max_by_key(|c| (c.destroyed.is_none(), c.created))
        .map(|c| c.uuid.clone())
}

/// The answer of `/v1/billing/report`: as `berth billing report --json`.
pub fn report(ledger: &Ledger, q: &ReportQuery, now: i64) -> Result<Value, ApiError> {
    let uuids = match &q.ct {
        CtSelector::All => {
            let mut cts: Vec<_> = ledger.cts().collect();
            cts.sort_by(|a, b| (a.ctid, &a.uuid).cmp(&(b.ctid, &b.uuid)));
            cts.into_iter().map(|c| c.uuid.clone()).collect()
        }
        CtSelector::Ctid(n) => {
            vec![uuid_of_ctid(ledger, *n).ok_or_else(|| ApiError::UnknownCt(n.to_string()))?]
        }
        CtSelector::Uuid(u) => {
            ledger.ct(u).map_err(|_| ApiError::UnknownCt(u.clone()))?;
            vec![u.clone()]
        }
    };
    let mut reports = Vec::with_capacity(uuids.len());
    for u in &uuids {
        let spec = ledger.period_spec(u).map_err(ApiError::Ledger)?;
        let period = match &q.period {
            Some(l) => spec
                .parse(l)
                .map_err(|e| ApiError::bad("period", e.to_string()))?,
            None => spec.period_of(now).map_err(ApiError::Ledger)?,
        };
        reports.push(
            ledger
                .report(u, &period, q.mode, None, now)
                .map_err(ApiError::Ledger)?,
        );
    }
    let layer = ledger.byte_layer().map_err(ApiError::Ledger)?;
    reports_json(&reports, q.ct == CtSelector::All, layer).map_err(ApiError::Ledger)
}

/// The answer of `/v1/billing/slots`: `{"after_seq", "next_after_seq", "rows": [...]}`, each
/// row a slot row of `berth billing slots --json` with its CT's `ct_uuid` and `ctid`.
/// `next_after_seq` is the `after_seq` of the next page (the same when nothing is new).
pub fn slots(ledger: &Ledger, q: &SlotsQuery) -> Result<Value, ApiError> {
    let got = ledger
        .slots_after_seq(q.after_seq, q.limit)
        .map_err(ApiError::Ledger)?;
    let next = got.last().map_or(q.after_seq, |(_, r)| r.seq);
    let mut rows = Vec::with_capacity(got.len());
    for (uuid, r) in &got {
        let spec = ledger.period_spec(uuid).map_err(ApiError::Ledger)?;
        let ctid = ledger.ct(uuid).map_err(ApiError::Ledger)?.ctid;
        let mut v = slot_json(spec, r).map_err(ApiError::Ledger)?;
        if let Value::Object(m) = &mut v {
            m.insert("ct_uuid".into(), json!(uuid));
            m.insert("ctid".into(), json!(ctid));
        }
        rows.push(v);
    }
    let layer = ledger.byte_layer().map_err(ApiError::Ledger)?;
    Ok(json!({
        "after_seq": q.after_seq,
        "next_after_seq": next,
        "layer": layer,
        "basis": super::store::BASIS,
        "rows": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad_param(r: Result<impl std::fmt::Debug, ApiError>) -> String {
        match r {
            Err(e @ ApiError::BadParam { .. }) => {
                assert_eq!(e.status(), 400);
                e.body()["parameter"].as_str().unwrap().to_string()
            }
            other => panic!("expected a bad parameter, got {other:?}"),
        }
    }

    #[test]
    fn report_query_parses_every_selector_and_defaults() {
        let q = parse_report_query(Some("ct=all")).unwrap();
        assert_eq!(
            (q.ct, q.period, q.mode),
            (CtSelector::All, None, P95Mode::Max)
        );
        let q = parse_report_query(Some("ct=4260&period=2026-12&mode=per-direction")).unwrap();
        assert_eq!(q.ct, CtSelector::Ctid(4260));
        assert_eq!(q.period.as_deref(), Some("2026-12"));
        assert_eq!(q.mode, P95Mode::PerDirection);
        let q = parse_report_query(Some("ct=0F8FAD5B-D9CB-469F-A165-70867728950E")).unwrap();
        assert_eq!(
            q.ct,
            CtSelector::Uuid("0f8fad5b-d9cb-469f-a165-70867728950e".into())
        );
    }

    #[test]
    fn report_query_names_the_bad_parameter() {
        assert_eq!(bad_param(parse_report_query(None)), "ct");
        assert_eq!(bad_param(parse_report_query(Some("ct="))), "ct");
        assert_eq!(bad_param(parse_report_query(Some("ct=0"))), "ct");
        assert_eq!(bad_param(parse_report_query(Some("ct=99999999999"))), "ct");
        assert_eq!(bad_param(parse_report_query(Some("ct=web1"))), "ct");
        assert_eq!(bad_param(parse_report_query(Some("ct=all&ct=1"))), "ct");
        assert_eq!(
            bad_param(parse_report_query(Some("ct=1&period=2026-13"))),
            "period"
        );
        assert_eq!(
            bad_param(parse_report_query(Some("ct=1&period=202612"))),
            "period"
        );
        assert_eq!(bad_param(parse_report_query(Some("ct=1&mode=p99"))), "mode");
        assert_eq!(
            bad_param(parse_report_query(Some("ct=1&after_seq=2"))),
            "after_seq"
        );
        let e = parse_report_query(Some("ct=1&mode=p99")).unwrap_err();
        assert!(
            e.body()["error"].as_str().unwrap().contains("p99"),
            "{}",
            e.body()
        );
    }

    #[test]
    fn slots_query_defaults_bounds_and_errors() {
        assert_eq!(
            parse_slots_query(None).unwrap(),
            SlotsQuery {
                after_seq: 0,
                limit: SLOTS_DEFAULT_LIMIT
            }
        );
        assert_eq!(
            parse_slots_query(Some("after_seq=17&limit=5")).unwrap(),
            SlotsQuery {
                after_seq: 17,
                limit: 5
            }
        );
        assert_eq!(
            parse_slots_query(Some(&format!("limit={SLOTS_MAX_LIMIT}")))
                .unwrap()
                .limit,
            SLOTS_MAX_LIMIT
        );
        assert_eq!(
            bad_param(parse_slots_query(Some("after_seq=-1"))),
            "after_seq"
        );
        assert_eq!(
            bad_param(parse_slots_query(Some("after_seq=x"))),
            "after_seq"
        );
        assert_eq!(bad_param(parse_slots_query(Some("limit=0"))), "limit");
        assert_eq!(
            bad_param(parse_slots_query(Some(&format!(
                "limit={}",
                SLOTS_MAX_LIMIT + 1
            )))),
            "limit"
        );
        assert_eq!(bad_param(parse_slots_query(Some("seq=1"))), "seq");
    }

    /// 2026-03-01T00:00:00Z.
    const MAR1: i64 = 1_772_323_200;

    fn ledger_with_two_lives_of_ct_7(dir: &tempfile::TempDir) -> (Ledger, [String; 2]) {
        use super::super::{
            Baseline, BillingAnchor, Counter, CounterKey, CtInfo, CtReading, Direction, Family,
            LedgerOptions, Reading,
        };
        let path = dir.path().join("ledger.db");
        let mut l = Ledger::open(&path, LedgerOptions::default()).unwrap();
        let uuids = [
            "00000001-0000-4000-8000-000000000000".to_string(),
            "00000002-0000-4000-8000-000000000000".to_string(),
        ];
        for (i, u) in uuids.iter().enumerate() {
            l.register_ct(&CtInfo {
                uuid: u.clone(),
                ctid: 7,
                anchor: BillingAnchor::Day(1),
                tz: "UTC".into(),
                created: MAR1 + i as i64 * 600,
                destroyed: None,
                commit_bps: None,
                classes: None,
                history: Vec::new(),
            })
            .unwrap();
        }
        let key = CounterKey::new(Direction::In, 0, Family::V4);
        for (at, bytes) in [(MAR1 + 700, 0), (MAR1 + 1000, 3000)] {
            let readings: Vec<CtReading> = uuids
                .iter()
                .map(|u| CtReading {
                    uuid: u.clone(),
                    reading: Reading {
                        at,
                        epoch: 1,
                        counters: [(key, Counter::new(bytes, 3))].into_iter().collect(),
                    },
                    first: Baseline::Zero,
                })
                .collect();
            l.tick(&readings).unwrap();
        }
        l.mark_destroyed(&uuids[0], MAR1 + 1100).unwrap();
        drop(l);
        (Ledger::open_read_only(&path).unwrap(), uuids)
    }

    #[test]
    fn answers_from_a_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let (l, uuids) = ledger_with_two_lives_of_ct_7(&dir);
        let now = MAR1 + 1200;
        // A CTID names its live CT, not the destroyed one before it.
        let v = report(&l, &parse_report_query(Some("ct=7")).unwrap(), now).unwrap();
        assert_eq!(v["ct_uuid"], uuids[1].as_str());
        assert_eq!(v["in_bytes"], 3000);
        assert_eq!(v["period"], "2026-03");
        let all = report(&l, &parse_report_query(Some("ct=all")).unwrap(), now).unwrap();
        assert_eq!(all.as_array().map(Vec::len), Some(2));
        let q = parse_report_query(Some(&format!("ct={}&period=2026-03", uuids[0]))).unwrap();
        assert_eq!(
            report(&l, &q, now).unwrap()["destroyed"],
            "2026-03-01T00:18:20+00:00"
        );

        for q in ["ct=8", "ct=00000003-0000-4000-8000-000000000000"] {
            let e = report(&l, &parse_report_query(Some(q)).unwrap(), now).unwrap_err();
            assert_eq!(e.status(), 404, "{q}: {e}");
        }

        let feed = slots(&l, &parse_slots_query(Some("after_seq=0")).unwrap()).unwrap();
        let rows = feed["rows"].as_array().unwrap();
        assert!(!rows.is_empty(), "{feed}");
        assert!(
            rows.iter()
                .all(|r| r["ctid"] == 7 && r["seq"].as_i64() > Some(0))
        );
        let bytes: u64 = rows.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
        assert_eq!(bytes, 6000, "{feed}");
        let next = feed["next_after_seq"].as_i64().unwrap();
        assert_eq!(rows.last().unwrap()["seq"].as_i64(), Some(next));
        let q = SlotsQuery {
            after_seq: next,
            limit: 10,
        };
        let tail = slots(&l, &q).unwrap();
        assert_eq!(tail["rows"], serde_json::json!([]));
        assert_eq!(tail["next_after_seq"], next);
    }
}
