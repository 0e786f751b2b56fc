//! Webhook delivery: an HTTP/1.1 POST per outbox row with hyper's client connection over a
//! tokio TCP stream, in TLS for `https://` (native-tls: the system's OpenSSL and trust store,
//! plus berthd's `--webhook-ca`; SNI and the host-name check always on). The body is the
//! event's JSON, the `Idempotency-Key` header its key `uuid:period:event`, so a receiver that
//! saw a retry whose 2xx got lost can drop it.
//!
//! An event goes to its CT's webhook as saved *now*, not the one it was queued with: a hoster
//! who fixes a wrong URL gets the pending events at the new one, and a CT that lost its webhook
//! (or is gone) has its pending events abandoned, visibly, instead of retried forever.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::clock::unix_now;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_runtime::config::{ConfigError, CtConfig, Host};
use berth_runtime::{Ctid, error_chain::ErrorChain};
use tracing::{debug, info, warn};

use super::store::{QuotaStore, QuotaStoreError};

use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

/// Why a delivery failed (stored as the row's `last_error`).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("bad webhook URL {0:?}")]
    Url(String),
    #[error("connecting to {0}")]
    Connect(String, #[source] std::io::Error),
    /// The certificate is not trusted, is not for the host name, or the handshake failed
    /// (OpenSSL's reason, see [`tls_reason`]).
    #[error("TLS handshake with {0}: {1}")]
    Tls(String, String),
    #[error("HTTP exchange with {0}")]
    Http(String, #[source] hyper::Error),
    #[error("webhook {0} answered {1}")]
    Status(String, u16),
    #[error("webhook {url}: {stage} timed out after {after:?}")]
    Timeout {
        url: String,
        stage: &'static str,
        after: Duration,
    },
}

/// Setting up the client (berthd refuses to start on these).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading the webhook CA file {0}")]
    ReadCa(PathBuf, #[source] std::io::Error),
    #[error("webhook CA file {0}: not PEM certificates")]
    BadCa(PathBuf, #[source] native_tls::Error),
    #[error("webhook CA file {0}: no PEM certificate in it")]
    EmptyCa(PathBuf),
    #[error("setting up the TLS client of the webhooks")]
    Tls(#[source] native_tls::Error),
}

/// What a delivery connects with: the TLS settings and the time one POST may take.
#[derive(Clone)]
pub struct Client {
    tls: tokio_native_tls::TlsConnector,
    timeout: Duration,
}

impl Client {
    /// The system's trust roots, plus every certificate of the PEM file `ca` (a private CA).
    pub fn new(ca: Option<&Path>, timeout: Duration) -> Result<Client, ClientError> {
        let mut b = native_tls::TlsConnector::builder();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| ClientError::ReadCa(ca.to_path_buf(), e))?;
            let certs = native_tls::Certificate::stack_from_pem(&pem)
                .map_err(|e| ClientError::BadCa(ca.to_path_buf(), e))?;
            if certs.is_empty() {
                return Err(ClientError::EmptyCa(ca.to_path_buf()));
            }
            for c in certs {
                b.add_root_certificate(c);
            }
        }
        // Spelled out: these are the defaults, and the check this client exists for.
        b.use_sni(true)
            .danger_accept_invalid_certs(false)
            .danger_accept_invalid_hostnames(false);
        let tls = b.build().map_err(ClientError::Tls)?;
        Ok(Client {
            tls: tls.into(),
            timeout,
        })
    }
}

/// Where a URL (as the config validated it) connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// `host:port` for the TCP connect.
    connect: String,
    /// The `Host` header (the URL's authority).
    authority: String,
    /// The name the certificate must be for (and the SNI): the host without brackets.
    name: String,
    path: String,
}

fn split_url(url: &str) -> Option<Target> {
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(r) => (true, r),
        None => (false, url.strip_prefix("http://")?),
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return None;
    }
    let (name, has_port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (h, after.starts_with(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) => (h, true),
            None => (authority, false),
        }
    };
    let connect = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Some(Target {
        tls,
        connect,
        authority: authority.to_string(),
        name: name.to_string(),
        path,
    })
}

/// POSTs `body` to `url`; `Ok` only on a 2xx. Connect, TLS handshake and the answer share the
/// client's timeout; the error names the stage that ran out of it.
pub async fn post(
    client: &Client,
    url: &str,
    key: &str,
    body: String,
) -> Result<u16, DeliveryError> {
    let deadline = Instant::now() + client.timeout;
    let timeout = |stage| DeliveryError::Timeout {
        url: url.to_string(),
        stage,
        after: client.timeout,
    };
    let t = split_url(url).ok_or_else(|| DeliveryError::Url(url.to_string()))?;
    let stream = timeout_at(deadline, TcpStream::connect(&t.connect))
        .await
        .map_err(|_| timeout("connect"))?
        .map_err(|e| DeliveryError::Connect(t.connect.clone(), e))?;
    let req = Request::post(t.path.as_str())
        .header(header::HOST, t.authority.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .header(
            header::USER_AGENT,
            concat!("berthd/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| DeliveryError::Url(url.to_string()))?;
    if t.tls {
        let tls = timeout_at(deadline, client.tls.connect(&t.name, stream))
            .await
            .map_err(|_| timeout("TLS handshake"))?
            .map_err(|e| DeliveryError::Tls(t.connect.clone(), tls_reason(&e)))?;
        exchange(tls, req, url, deadline)
            .await
            .map_err(|e| e.unwrap_or_else(|| timeout("response")))
    } else {
        exchange(stream, req, url, deadline)
            .await
            .map_err(|e| e.unwrap_or_else(|| timeout("response")))
    }
}

/// The reason of a failed handshake, short: native-tls shows OpenSSL's error queue (codes and
/// source lines) and, for a refused certificate, the verification's result in parentheses —
/// what a hoster needs ("unable to get local issuer certificate", "hostname mismatch", …).
fn tls_reason(e: &native_tls::Error) -> String {
    let full = e.to_string();
    if full.contains("certificate verify failed")
        && let Some(open) = full.rfind(" (")
        && full.ends_with(')')
    {
        return format!(
            "certificate verify failed: {}",
            &full[open + 2..full.len() - 1]
        );
    }
    full
}

/// The HTTP/1.1 exchange on a connected stream; `Err(None)` when the deadline passed.
async fn exchange<S>(
    io: S,
    req: Request<Full<Bytes>>,
    url: &str,
    deadline: Instant,
) -> Result<u16, Option<DeliveryError>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = |e| Some(DeliveryError::Http(url.to_string(), e));
    let fut = async {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(http)?;
        let driver = tokio::spawn(conn);
        let res = send.send_request(req).await.map_err(http);
        let out = match res {
            Ok(r) => {
                let status = r.status().as_u16();
                // Read the answer to its end so the exchange completes before the close.
                let _ = r.into_body().collect().await;
                if (200..300).contains(&status) {
                    Ok(status)
                } else {
                    Err(Some(DeliveryError::Status(url.to_string(), status)))
                }
            }
            Err(e) => Err(e),
        };
        driver.abort();
        out
    };
    timeout_at(deadline, fut).await.map_err(|_| None)?
}

/// The outbox, shared by berthd's tick and its delivery loop.
pub type SharedStore = Arc<Mutex<QuotaStore>>;

/// What a delivery pass did, and the outbox after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub delivered: usize,
    pub failed: usize,
    /// Events moved to their CT's new webhook, and given up (the CT lost its webhook).
    pub retargeted: usize,
    pub abandoned: usize,
    pub backlog: u64,
    pub failing: u64,
}

async fn with_store<T: Send + 'static>(
    store: &SharedStore,
    f: impl FnOnce(&mut QuotaStore) -> Result<T, QuotaStoreError> + Send + 'static,
) -> Result<T, QuotaStoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// A CT's webhook as saved now, for the events queued under `uuid`.
enum Current {
    Url(String),
    /// The reason its events are given up.
    Gone(String),
    /// The config did not load for another reason: left alone until it does.
    Unreadable(String),
}

fn current_webhook(host: &Host, ctid: u32, uuid: &str) -> Current {
    let Ok(id) = Ctid::new(ctid) else {
        return Current::Gone(format!("abandoned: CT {ctid} no longer exists"));
    };
    match CtConfig::load(host, id) {
        Ok(cfg) if cfg.uuid.is_some_and(|u| u.to_string() == uuid) => match cfg.quota.webhook {
            Some(url) => Current::Url(url),
            None => Current::Gone(format!(
                "abandoned: CT {ctid} has no quota webhook any more"
            )),
        },
        Ok(_) => Current::Gone(format!(
            "abandoned: CT {ctid} no longer exists (its CTID now holds another CT)"
        )),
        Err(ConfigError::NotFound(_)) => {
            Current::Gone(format!("abandoned: CT {ctid} no longer exists"))
        }
        Err(e) => Current::Unreadable(ErrorChain(&e).to_string()),
    }
}

/// Points every CT's pending events at its webhook as saved now, or abandons them when it has
/// none; one config read per CT with pending events.
pub fn retarget_all(
    s: &mut QuotaStore,
    host: &Host,
    now: i64,
) -> Result<(usize, usize), QuotaStoreError> {
    let (mut moved, mut dropped) = (0, 0);
    let mut done = HashSet::new();
    for (uuid, ctid, queued_url) in s.pending_targets()? {
        if !done.insert(uuid.clone()) {
            continue;
        }
        match current_webhook(host, ctid, &uuid) {
            Current::Url(url) => {
                let n = s.retarget(&uuid, &url, now)?;
                if n > 0 {
                    info!(ctid, %uuid, from = %queued_url, to = %url, events = n, "quota events go to the CT's new webhook");
                }
                moved += n;
            }
            Current::Gone(reason) => {
                let n = s.abandon(&uuid, now, &reason)?;
                warn!(ctid, %uuid, events = n, %reason, "quota events abandoned");
                dropped += n;
            }
            Current::Unreadable(e) => {
                warn!(ctid, %uuid, error = %e, "quota events held: the CT's config does not load")
            }
        }
    }
    Ok((moved, dropped))
}

/// Sends every event due now, one at a time (oldest first), to its CT's current webhook; each
/// is marked delivered right after its 2xx, so a crash between two resends at most the one in
/// flight (which the receiver recognises by its `Idempotency-Key`).
pub async fn deliver_due(
    store: &SharedStore,
    client: &Client,
    host: &Host,
) -> Result<Pass, QuotaStoreError> {
    let host = host.clone();
    let (retargeted, abandoned, due) = with_store(store, move |s| {
        let now = unix_now();
        let (moved, dropped) = retarget_all(s, &host, now)?;
        Ok((moved, dropped, s.due(now, 64)?))
    })
    .await?;
    let mut pass = Pass {
        retargeted,
        abandoned,
        ..Pass::default()
    };
    for p in due {
        match post(client, &p.url, &p.key, p.body.clone()).await {
            Ok(status) => {
                debug!(key = %p.key, url = %p.url, status, "quota event delivered");
                let key = p.key.clone();
                with_store(store, move |s| s.delivered(&key, unix_now())).await?;
                pass.delivered += 1;
            }
            Err(e) => {
                let msg = ErrorChain(&e).to_string();
                warn!(key = %p.key, attempts = p.attempts + 1, error = %msg, "quota webhook delivery failed; retried with backoff");
                let key = p.key.clone();
                with_store(store, move |s| s.failed(&key, unix_now(), &msg)).await?;
                pass.failed += 1;
            }
        }
    }
    let (backlog, failing) = with_store(store, |s| Ok((s.backlog()?, s.failing()?))).await?;
    pass.backlog = backlog;
    pass.failing = failing;
    Ok(pass)
}

#[cfg(test)]
#[path = "webhook_tests.rs"]
mod tests;
