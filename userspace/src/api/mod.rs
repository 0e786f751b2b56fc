//! berthd's REST API for hosting panels, under `/v1`: CTs (list, get, create, patch, delete,
//! start/stop/restart/suspend/resume), templates, usage and billing from the ledger, long
//! operations, an event stream and the OpenAPI document (`/v1/openapi.json`).
//!
//! Served on a unix socket (access is the socket's permissions: root and the `berth` group)
//! and optionally on TCP, which is TLS only and needs a bearer token or a client certificate
//! on every request ([`tls`]). Reads run in berthd on a blocking thread through the same
//! library calls as `berth list`/`status`; changes run in a worker process ([`worker`]) through
//! the library calls of `berth create`/`set`/`start`/….

pub mod body;
pub mod error;
pub mod events;
pub mod openapi;
pub mod ops;
pub mod socket;
pub mod tls;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_runtime::Ctid;
use berth_runtime::config::Host;
use berth_runtime::template::TemplateStore;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::billing::{Ledger, api as billing_api};
use crate::clock::unix_now;
use crate::ct::Need;
use crate::exit_codes::{ErrorCode, SCHEMA_VERSION};
use crate::inventory::{self, Selection, Which};
use error::ApiError;
use events::Events;
use ops::Operations;
use worker::{Op, WorkerRequest};

/// The largest request body accepted (a create or patch is well under 1 KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// What the handlers share.
pub struct Api {
    pub host: Host,
    pub pin_dir: PathBuf,
    pub ledger: PathBuf,
    /// berthd's own executable, run as the worker of state changes.
    pub exe: PathBuf,
    pub ops: Operations,
    pub events: Events,
    /// `GET /v1/cts` answers concurrent requests from one read (see [`Api::list_json`]).
    list: tokio::sync::Mutex<Option<(Instant, u64, Listing)>>,
    /// Bumped when an operation ends: a listing read before it is stale.
    generation: std::sync::atomic::AtomicU64,
    /// A background read of the listing is running (see [`Api::list_json`]).
    refreshing: std::sync::atomic::AtomicBool,
}

/// How old a listing may be served for changes made outside the API (the CLI, an init that
/// died); the API's own changes make it stale at once.
pub const LIST_MAX_AGE: Duration = Duration::from_secs(1);

/// One read of `GET /v1/cts`, plain and gzip-compressed (compressed once per read, not per
/// client: at 1000 CTs the document is ~1 MB and compresses about tenfold).
#[derive(Clone)]
struct Listing {
    plain: axum::body::Bytes,
    gzip: axum::body::Bytes,
}

pub type Shared = Arc<Api>;

impl Api {
    pub fn new(host: Host, pin_dir: PathBuf, ledger: PathBuf, exe: PathBuf) -> Shared {
        Arc::new(Self {
            host,
            pin_dir,
            ledger,
            exe,
            ops: Operations::default(),
            events: Events::new(),
            list: tokio::sync::Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
            refreshing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Compares the CTs' states for the event stream, every [`events::WATCH_EVERY`].
    pub async fn watch_loop(self: Shared) {
        let mut iv = tokio::time::interval(events::WATCH_EVERY);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            let me = self.clone();
            let _ =
                tokio::task::spawn_blocking(move || me.events.check(&me.host, unix_now())).await;
        }
    }

    /// The `GET /v1/cts` document. A read serves every request that arrives while it runs or
    /// within [`LIST_MAX_AGE`] after it began, unless an API operation ended since (a client
    /// sees its own changes at once, the CLI's within a second): 200 panels polling at once
    /// cost one read, not 200. A listing between one and two [`LIST_MAX_AGE`]s old is still
    /// served, while one background read replaces it: panels polling steadily never wait for a
    /// read (at 1000 CTs one takes ~60 ms), and a CLI change shows within two seconds.
    async fn list_json(self: &Shared) -> Result<Listing, ApiError> {
        use std::sync::atomic::Ordering::SeqCst;
        let arrived = Instant::now();
        let mut slot = self.list.lock().await;
        if let Some((started, generation, body)) = slot.as_ref() {
            let current = *generation == self.generation.load(SeqCst);
            if *started >= arrived || (current && started.elapsed() < LIST_MAX_AGE) {
                return Ok(body.clone());
            }
            if current && started.elapsed() < 2 * LIST_MAX_AGE {
                if !self.refreshing.swap(true, SeqCst) {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Ok(read) = me.read_listing().await {
                            let mut slot = me.list.lock().await;
                            if slot.as_ref().is_none_or(|(s, _, _)| *s < read.0) {
                                *slot = Some(read);
                            }
                        }
                        me.refreshing.store(false, SeqCst);
                    });
                }
                return Ok(body.clone());
            }
        }
        let read = self.read_listing().await?;
        let body = read.2.clone();
        *slot = Some(read);
        Ok(body)
    }

    /// One read of every CT, with when it began and the operation generation it saw.
    async fn read_listing(self: &Shared) -> Result<(Instant, u64, Listing), ApiError> {
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let started = Instant::now();
        let me = self.clone();
        let body = blocking(move || {
            let sel = Selection {
                which: Which::All,
                ..Default::default()
            };
            let cts = inventory::list(&me.host, &me.pin_dir, &sel, Need::ALL)
                .map_err(|e| ApiError::of(&e))?;
            let mut b = serde_json::to_vec(&json!({"schema_version": SCHEMA_VERSION, "cts": cts}))
                .map_err(|e| ApiError::internal(e.to_string()))?;
            b.push(b'\n');
            let mut z = flate2::write::GzEncoder::new(
                Vec::with_capacity(b.len() / 8),
                flate2::Compression::fast(),
            );
            std::io::Write::write_all(&mut z, &b)
                .and_then(|()| z.finish())
                .map(|gz| Listing {
                    plain: b.into(),
                    gzip: gz.into(),
                })
                .map_err(|e| ApiError::internal(format!("compressing the listing: {e}")))
        })
        .await?;
        Ok((started, generation, body))
    }

    fn worker_request(&self, op: Op) -> WorkerRequest {
        WorkerRequest {
            root: self.host.root.clone(),
            run: self.host.run.clone(),
            cgroup_parent: self.host.cgroup_parent.clone(),
            bpffs: self.pin_dir.clone(),
            op,
        }
    }

    /// Runs `op` as an operation: its result when `wait`, else 202 with the operation.
    async fn operate(self: &Shared, op: Op, wait: bool, created: bool) -> Response {
        let ctid = op.ctid();
        let kind = op.name();
        let operation = self.ops.begin(kind, ctid.map(Ctid::get), unix_now());
        if let Some(c) = ctid {
            self.events.begin(c);
        }
        let me = self.clone();
        let id = operation.id.clone();
        // The operation runs to its end even when the client goes away.
        let task = tokio::spawn(async move {
            let req = me.worker_request(op);
            let mut res = worker::spawn(&me.exe, &req).await;
            if let (Ok(v), Some(c)) = (&mut res, ctid)
                && kind != "destroy"
                && let Some(m) = v.as_object_mut()
            {
                let (h, p) = (me.host.clone(), me.pin_dir.clone());
                if let Ok(Ok(view)) =
                    tokio::task::spawn_blocking(move || inventory::view(&h, &p, c)).await
                {
                    m.insert(
                        "ct".into(),
                        serde_json::to_value(view).unwrap_or(Value::Null),
                    );
                }
            }
            let now = unix_now();
            me.generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            me.ops.finish(&id, &res, now);
            if let Some(c) = ctid {
                let event = res
                    .as_ref()
                    .ok()
                    .and_then(|v| events::of_op(kind, v))
                    .map(|k| events::Event {
                        kind: k,
                        ctid: c,
                        status: if k == "destroyed" {
                            None
                        } else {
                            events::state_of(&me.host, c)
                        },
                        source: "api",
                        operation: Some(id.clone()),
                        time: now,
                    });
                let host = me.host.clone();
                let ev = me.events.clone();
                let _ = tokio::task::spawn_blocking(move || ev.end(&host, c, event)).await;
            }
            res
        });
        if !wait {
            let loc = format!("/v1/operations/{}", operation.id);
            let mut r = (
                StatusCode::ACCEPTED,
                Json(json!({"schema_version": SCHEMA_VERSION, "operation": operation})),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&loc) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        match task.await {
            Ok(Ok(mut v)) => {
                if let Some(m) = v.as_object_mut() {
                    m.insert("schema_version".into(), SCHEMA_VERSION.into());
                    m.insert("operation".into(), operation.id.clone().into());
                }
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                (status, Json(v)).into_response()
            }
            Ok(Err(e)) => e.into_response(),
            Err(e) => ApiError::internal(format!("operation task failed: {e}")).into_response(),
        }
    }
}

/// A blocking library call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request task failed: {e}")))?
}

/// A JSON body whose every rejection (bad JSON, an unknown field, a wrong type, no JSON
/// content type, too large) is the API's JSON error.
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::api(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body over {MAX_BODY} bytes"),
            )),
            Err(r) => Err(ApiError::coded(
                format!("request body: {}", r.body_text()),
                ErrorCode::InvalidSyntax,
            )),
        }
    }
}

/// The `k=v` pairs of a query; a parameter not in `known` is a 400.
fn query_pairs<'a>(
    q: &'a Option<String>,
    known: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, ApiError> {
    let mut out = Vec::new();
    for part in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if !known.contains(&k) {
            return Err(ApiError::bad_request(format!(
                "query parameter {k:?}: unknown (expected {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn flag(k: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "" | "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "query parameter {k:?}: {v:?} is not a boolean (true/false/1/0)"
        ))),
    }
}

/// `?wait=` (default true) and, for stop, `?fast=`.
fn wait_of(q: &Option<String>, extra: &[&str]) -> Result<(bool, bool), ApiError> {
    let mut known = vec!["wait"];
    known.extend_from_slice(extra);
    let (mut wait, mut fast) = (true, false);
    for (k, v) in query_pairs(q, &known)? {
        match k {
            "wait" => wait = flag(k, v)?,
            _ => fast = flag(k, v)?,
        }
    }
    Ok((wait, fast))
}

async fn resolve(api: &Shared, ct: String) -> Result<Ctid, ApiError> {
    let me = api.clone();
    blocking(move || me.host.resolve(&ct).map_err(|e| ApiError::of(&e))).await
}

async fn list_cts(
    State(api): State<Shared>,
    RawQuery(q): RawQuery,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    query_pairs(&q, &[])?;
    let body = api.list_json().await?;
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.trim().split(';').next() == Some("gzip"));
    let mut r = if gzip {
        (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CONTENT_ENCODING, "gzip"),
            ],
            body.gzip,
        )
            .into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], body.plain).into_response()
    };
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    Ok(r)
}

async fn get_ct(
    State(api): State<Shared>,
    Path(ct): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    query_pairs(&q, &[])?;
    let me = api.clone();
    let v = blocking(move || {
        let ctid = me.host.resolve(&ct).map_err(|e| ApiError::of(&e))?;
        inventory::view(&me.host, &me.pin_dir, ctid).map_err(|e| ApiError::of(&e))
    })
    .await?;
    Ok(Json(json!({"schema_version": SCHEMA_VERSION, "ct": v})))
}

async fn create_ct(
    State(api): State<Shared>,
    RawQuery(q): RawQuery,
    JsonBody(body): JsonBody<body::CreateBody>,
) -> Result<Response, ApiError> {
    let (wait, _) = wait_of(&q, &[])?;
    // Refused here, before an operation exists: a bad value is the request's fault.
    body.ctid().map_err(|e| ApiError::bad_request(e.0))?;
    body.opts().map_err(|e| ApiError::bad_request(e.0))?;
    Ok(api
        .operate(
            Op::Create {
                body: Box::new(body),
            },
            wait,
            true,
        )
        .await)
}

async fn patch_ct(
    State(api): State<Shared>,
    Path(ct): Path<String>,
    RawQuery(q): RawQuery,
    JsonBody(body): JsonBody<body::PatchBody>,
) -> Result<Response, ApiError> {
    let (wait, _) = wait_of(&q, &[])?;
    let ctid = resolve(&api, ct).await?;
    if body.is_empty() {
        return Err(ApiError::bad_request("request body: no setting to change"));
    }
    body.opts(ctid).map_err(|e| ApiError::bad_request(e.0))?;
    Ok(api
        .operate(
            Op::Set {
                ctid,
                body: Box::new(body),
            },
            wait,
            false,
        )
        .await)
}

async fn delete_ct(
    State(api): State<Shared>,
    Path(ct): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let (wait, _) = wait_of(&q, &[])?;
    let ctid = resolve(&api, ct).await?;
    Ok(api.operate(Op::Destroy { ctid }, wait, false).await)
}

async fn action(
    State(api): State<Shared>,
    Path((ct, action)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let extra: &[&str] = if action == "stop" { &["fast"] } else { &[] };
    let known = ["start", "stop", "restart", "suspend", "resume"];
    if !known.contains(&action.as_str()) {
        return Err(ApiError::api(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no action {action:?} (expected {})", known.join(", ")),
        ));
    }
    let (wait, fast) = wait_of(&q, extra)?;
    let ctid = resolve(&api, ct).await?;
    let op = match action.as_str() {
        "start" => Op::Start { ctid },
        "stop" => Op::Stop { ctid, fast },
        "restart" => Op::Restart { ctid },
        "suspend" => Op::Suspend { ctid },
        _ => Op::Resume { ctid },
    };
    Ok(api.operate(op, wait, false).await)
}

async fn templates(
    State(api): State<Shared>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    query_pairs(&q, &[])?;
    let me = api.clone();
    let list = blocking(move || {
        let dir = me.host.template_dir();
        // A host without a template directory has none (a GET creates nothing).
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let store = TemplateStore::open(dir).map_err(|e| ApiError::of(&e))?;
        store.list().map_err(|e| ApiError::of(&e))
    })
    .await?;
    Ok(Json(
        json!({"schema_version": SCHEMA_VERSION, "templates": list}),
    ))
}

/// A billing answer from the ledger (berth::billing::api, as berthd's metrics listener
/// serves it), its errors in the API's shape.
async fn billing_answer(
    api: &Shared,
    f: impl FnOnce(&Ledger) -> Result<Value, billing_api::ApiError> + Send + 'static,
) -> Result<Json<Value>, ApiError> {
    let path = api.ledger.clone();
    let v = blocking(move || {
        let conv = |e: billing_api::ApiError| {
            let msg = e.body()["error"].as_str().unwrap_or_default().to_owned();
            let code = match e.status() {
                400 => ErrorCode::InvalidValue,
                404 => ErrorCode::NotFound,
                _ => ErrorCode::Failed,
            };
            ApiError::coded(msg, code)
        };
        if !path.exists() {
            return Err(ApiError::coded(
                "the billing ledger does not exist yet",
                ErrorCode::NotFound,
            ));
        }
        let ledger =
            Ledger::open_read_only(&path).map_err(|e| conv(billing_api::ApiError::Ledger(e)))?;
        f(&ledger).map_err(conv)
    })
    .await?;
    let mut v = v;
    if let Some(m) = v.as_object_mut() {
        m.entry("schema_version").or_insert(SCHEMA_VERSION.into());
    }
    Ok(Json(v))
}

fn billing_query_error(e: billing_api::ApiError) -> ApiError {
    ApiError::bad_request(e.body()["error"].as_str().unwrap_or_default().to_owned())
}

async fn usage(
    State(api): State<Shared>,
    Path(ct): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs = query_pairs(&q, &["period", "mode"])?;
    let ctid = resolve(&api, ct).await?;
    let mut query = format!("ct={ctid}");
    for (k, v) in pairs {
        query.push_str(&format!("&{k}={v}"));
    }
    let rq = billing_api::parse_report_query(Some(&query)).map_err(billing_query_error)?;
    billing_answer(&api, move |l| billing_api::report(l, &rq, unix_now())).await
}

async fn billing_report(
    State(api): State<Shared>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let rq = billing_api::parse_report_query(q.as_deref()).map_err(billing_query_error)?;
    billing_answer(&api, move |l| billing_api::report(l, &rq, unix_now())).await
}

async fn billing_slots(
    State(api): State<Shared>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let sq = billing_api::parse_slots_query(q.as_deref()).map_err(billing_query_error)?;
    billing_answer(&api, move |l| billing_api::slots(l, &sq)).await
}

async fn operation(
    State(api): State<Shared>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let mut wait = false;
    for (k, v) in query_pairs(&q, &["wait"])? {
        wait = flag(k, v)?;
    }
    let d = if wait { ops::MAX_WAIT } else { Duration::ZERO };
    match api.ops.get(&id, d).await {
        Some(op) => Ok(Json(
            json!({"schema_version": SCHEMA_VERSION, "operation": op}),
        )),
        None => Err(ApiError::coded(
            format!("no operation {id:?}"),
            ErrorCode::NotFound,
        )),
    }
}

async fn event_stream(
    State(api): State<Shared>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    query_pairs(&q, &[])?;
    let rx = api.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = match rx.recv().await {
            Ok(e) => {
                let data = serde_json::to_string(&e).unwrap_or_default();
                SseEvent::default().event(e.kind).data(data)
            }
            // A slow client is told how many events it missed, then reads on.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => SseEvent::default()
                .event("lagged")
                .data(json!({"type": "lagged", "missed": n}).to_string()),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, std::convert::Infallible>(ev), rx))
    });
    // A first event tells the client its subscription is in place: changes after it reach it.
    let ready = SseEvent::default()
        .event("ready")
        .data(json!({"type": "ready", "schema_version": SCHEMA_VERSION}).to_string());
    let stream = futures_util::stream::once(async move { Ok(ready) }).chain(stream);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

async fn openapi_doc() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document().to_string(),
    )
        .into_response()
}

async fn no_route() -> ApiError {
    ApiError::api(
        StatusCode::NOT_FOUND,
        "no_route",
        "no such resource (see /v1/openapi.json)",
    )
}

/// The `/v1` router over `api`.
pub fn router(api: Shared) -> Router {
    Router::new()
        .route("/v1/cts", get(list_cts).post(create_ct))
        .route(
            "/v1/cts/{ct}",
            get(get_ct).patch(patch_ct).delete(delete_ct),
        )
        .route("/v1/cts/{ct}/usage", get(usage))
        .route("/v1/cts/{ct}/{action}", post(action))
        .route("/v1/templates", get(templates))
        .route("/v1/billing/report", get(billing_report))
        .route("/v1/billing/slots", get(billing_slots))
        .route("/v1/operations/{id}", get(operation))
        .route("/v1/events", get(event_stream))
        .route("/v1/openapi.json", get(openapi_doc))
        .fallback(no_route)
        .method_not_allowed_fallback(|| async {
            ApiError::api(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this resource (see /v1/openapi.json)",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}
