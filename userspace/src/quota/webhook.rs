//! Webhook delivery: an HTTP/1.1 POST per outbox row with hyper's client connection over a
//! tokio TCP stream (plain `http://`; the config refuses `https://`, berthd links no TLS
//! stack). The body is the event's JSON, the `Idempotency-Key` header its key
//! `uuid:period:event`, so a receiver that saw a retry whose 2xx got lost can drop it.
use crate::clock::unix_now;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_runtime::error_chain::ErrorChain;
use tracing::{debug, warn};

use super::store::{QuotaStore, QuotaStoreError};

use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a delivery failed (stored as the row's `last_error`).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("bad webhook URL {0:?}")]
    Url(String),
    #[error("connecting to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("HTTP exchange with {0}")]
    Http(String, #[source] hyper::Error),
    #[error("webhook {0} answered {1}")]
    Status(String, u16),
    #[error("webhook {0} timed out after {1:?}")]
    Timeout(String, Duration),
}

/// Host (with port) and path of an `http://` URL, as the config validated it.
fn split_url(url: &str) -> Option<(String, String, String)> {
    let rest = url.strip_prefix("http://")?;
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return None;
    }
    let has_port = if authority.starts_with('[') {
        authority.contains("]:")
    } else {
        authority.contains(':')
    };
    let connect = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Some((connect, authority.to_string(), path))
}

/// POSTs `body` to `url`; `Ok` only on a 2xx.
pub async fn post(
    url: &str,
    key: &str,
    body: String,
    timeout: Duration,
) -> Result<u16, DeliveryError> {
    let fut = async {
        let (connect, host, path) =
            split_url(url).ok_or_else(|| DeliveryError::Url(url.to_string()))?;
        let stream = TcpStream::connect(&connect)
            .await
            .map_err(|e| DeliveryError::Connect(connect.clone(), e))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| DeliveryError::Http(url.to_string(), e))?;
        let driver = tokio::spawn(conn);
        let req = Request::post(path)
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key)
            .header(
                header::USER_AGENT,
                concat!("berthd/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| DeliveryError::Url(url.to_string()))?;
        let res = send
            .send_request(req)
            .await
            .map_err(|e| DeliveryError::Http(url.to_string(), e));
        let out = match res {
            Ok(r) => {
                let status = r.status().as_u16();
                // Read the answer to its end so the exchange completes before the close.
                let _ = r.into_body().collect().await;
                if (200..300).contains(&status) {
                    Ok(status)
                } else {
                    Err(DeliveryError::Status(url.to_string(), status))
                }
            }
            Err(e) => Err(e),
        };
        driver.abort();
        out
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(DeliveryError::Timeout(url.to_string(), timeout)),
    }
}

/// The outbox, shared by berthd's tick and its delivery loop.
pub type SharedStore = Arc<Mutex<QuotaStore>>;

/// What a delivery pass did, and the outbox after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub delivered: usize,
    pub failed: usize,
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

/// Sends every event due now, one at a time (oldest first); each is marked delivered right
/// after its 2xx, so a crash between two resends at most the one in flight (which the
/// receiver recognises by its `Idempotency-Key`).
pub async fn deliver_due(store: &SharedStore, timeout: Duration) -> Result<Pass, QuotaStoreError> {
    let due = with_store(store, |s| s.due(unix_now(), 64)).await?;
    let mut pass = Pass::default();
    for p in due {
        match post(&p.url, &p.key, p.body.clone(), timeout).await {
            Ok(status) => {
                debug!(key = %p.key, status, "quota event delivered");
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
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:8080/hook?x=1").unwrap(),
            (
                "127.0.0.1:8080".into(),
                "127.0.0.1:8080".into(),
                "/hook?x=1".into()
            )
        );
        assert_eq!(
            split_url("http://panel.example").unwrap(),
            (
                "panel.example:80".into(),
                "panel.example".into(),
                "/".into()
            )
        );
        assert_eq!(
            split_url("http://[::1]:9/a").unwrap(),
            ("[::1]:9".into(), "[::1]:9".into(), "/a".into())
        );
        assert_eq!(split_url("http://[::1]/").unwrap().0, "[::1]:80");
        assert!(split_url("ftp://x").is_none());
    }
}
