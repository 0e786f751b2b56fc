//! The API on TCP: TLS only (rustls), and every request authenticated by a bearer token
//! (`--api-token-file`) or a client certificate signed by `--api-client-ca`. A listener
//! without TLS or without either way of authenticating is refused at start, so no
//! unauthenticated TCP access exists. Each peer address is rate limited before anything
//! else, so a token cannot be guessed at speed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use super::error::ApiError;

/// The shortest token accepted: a guessable token is no authentication.
pub const MIN_TOKEN: usize = 16;

/// A TLS handshake that takes longer is dropped (a slow client must not hold a task).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub listen: SocketAddr,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    /// Requests per second per peer address (bursts of twice that).
    pub rate: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "--api-listen {0} needs --api-tls-cert and --api-tls-key: the API is not served over plain TCP"
    )]
    NoTls(SocketAddr),
    #[error(
        "--api-listen {0} needs --api-token-file or --api-client-ca: the API is not served to unauthenticated clients"
    )]
    NoAuth(SocketAddr),
    #[error("read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: {why}", path.display())]
    Bad {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("set up TLS")]
    Rustls(#[source] rustls::Error),
    #[error("listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What authenticates a TCP request.
#[derive(Clone)]
struct Auth {
    token: Option<Arc<[u8]>>,
}

/// A connection's peer as the router sees it (absent on the unix socket).
#[derive(Debug, Clone, Copy)]
pub struct TcpPeer {
    pub addr: SocketAddr,
    /// The client showed a certificate the client CA signed.
    pub client_cert: bool,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn bad(what: &'static str, path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::Bad {
        what,
        path: path.to_owned(),
        why: why.to_string(),
    }
}

/// The token of `path`: one line, at least [`MIN_TOKEN`] bytes, in a file others cannot read.
pub fn load_token(path: &Path) -> Result<Vec<u8>, TlsError> {
    let what = "API token file";
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(bad(what, path, "readable by every user: chmod o-r it"));
    }
    let raw = read(what, path)?;
    let t = String::from_utf8(raw).map_err(|_| bad(what, path, "not UTF-8"))?;
    let t = t.trim();
    if t.len() < MIN_TOKEN || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(
            what,
            path,
            format!("the token must be one word of at least {MIN_TOKEN} characters"),
        ));
    }
    Ok(t.as_bytes().to_vec())
}

fn server_config(o: &TlsOptions) -> Result<ServerConfig, TlsError> {
    let (Some(cert), Some(key)) = (&o.cert, &o.key) else {
        return Err(TlsError::NoTls(o.listen));
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("TLS certificate", cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("TLS certificate", cert, e))?;
    if certs.is_empty() {
        return Err(bad("TLS certificate", cert, "no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read("TLS key", key)?)
        .map_err(|e| bad("TLS key", key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let builder = match &o.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read("client CA", ca)?) {
                let c = c.map_err(|e| bad("client CA", ca, e))?;
                roots.add(c).map_err(|e| bad("client CA", ca, e))?;
            }
            if roots.is_empty() {
                return Err(bad("client CA", ca, "no certificate in the file"));
            }
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            // With a token as the other way in, a client without a certificate may still
            // connect; the request then needs the token.
            if o.token_file.is_some() {
                v = v.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(v.build().map_err(|e| bad("client CA", ca, e))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key_der)
        .map_err(TlsError::Rustls)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A bound, configured TCP listener; [`TlsListener::serve`] serves it.
pub struct TlsListener {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    auth: Auth,
    limiter: Arc<Limiter>,
}

impl TlsListener {
    /// Checks the options (refusing plain or unauthenticated TCP) and binds.
    pub async fn bind(o: &TlsOptions) -> Result<Self, TlsError> {
        if o.cert.is_none() || o.key.is_none() {
            return Err(TlsError::NoTls(o.listen));
        }
        if o.token_file.is_none() && o.client_ca.is_none() {
            return Err(TlsError::NoAuth(o.listen));
        }
        let token = o
            .token_file
            .as_deref()
            .map(load_token)
            .transpose()?
            .map(Arc::from);
        let cfg = server_config(o)?;
        let listener = TcpListener::bind(o.listen)
            .await
            .map_err(|source| TlsError::Listen {
                addr: o.listen,
                source,
            })?;
        Ok(Self {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            auth: Auth { token },
            limiter: Arc::new(Limiter::new(o.rate.max(1))),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(self, app: Router) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, app, auth, limiter) = (
                self.acceptor.clone(),
                app.clone(),
                self.auth.clone(),
                self.limiter.clone(),
            );
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "API: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let client_cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .is_some_and(|c| !c.is_empty());
                let info = TcpPeer {
                    addr: peer,
                    client_cert,
                };
                let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                    let (app, auth, limiter) = (app.clone(), auth.clone(), limiter.clone());
                    async move {
                        if let Err(e) = limiter.check(info.addr.ip()) {
                            return Ok::<_, std::convert::Infallible>(e.into_response());
                        }
                        if let Err(e) = authenticate(&auth, &info, req.headers()) {
                            let mut r = e.into_response();
                            r.headers_mut().insert(
                                header::WWW_AUTHENTICATE,
                                HeaderValue::from_static("Bearer realm=\"berthd\""),
                            );
                            return Ok(r);
                        }
                        req.extensions_mut().insert(info);
                        Ok(app.oneshot(req).await.unwrap_or_else(|e| match e {}))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(tls), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "API connection ended with an error");
                }
            });
        }
    }
}

/// A request over TCP passes with a verified client certificate or the bearer token.
fn authenticate(auth: &Auth, peer: &TcpPeer, h: &axum::http::HeaderMap) -> Result<(), ApiError> {
    if peer.client_cert {
        return Ok(());
    }
    let unauth = |m: &str| ApiError::api(StatusCode::UNAUTHORIZED, "unauthenticated", m);
    let Some(token) = &auth.token else {
        return Err(unauth("a client certificate is required"));
    };
    let Some(given) = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return Err(unauth(
            "missing bearer token (Authorization: Bearer <token>)",
        ));
    };
    if !same(given.trim().as_bytes(), token) {
        return Err(unauth("invalid bearer token"));
    }
    Ok(())
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for (i, x) in a.iter().enumerate() {
        diff |= u64::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

/// A token bucket per peer address.
struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Peers remembered at most; beyond it, full buckets are forgotten.
const MAX_PEERS: usize = 10_000;

impl Limiter {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(rate) * 2.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_PEERS {
            let (rate, burst) = (self.rate, self.burst);
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = b.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens < 1.0 {
            return Err(ApiError::api(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("more than {} requests per second from {ip}", self.rate),
            ));
        }
        *tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(same(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!same(b"abcdefghijklmnoq", b"abcdefghijklmnop"));
        assert!(!same(b"abc", b"abcdefghijklmnop"));
        assert!(!same(b"", b"abcdefghijklmnop"));
    }

    #[test]
    fn limiter_refuses_past_the_burst() {
        let l = Limiter::new(5);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let ok = (0..20).filter(|_| l.check(ip).is_ok()).count();
        assert_eq!(ok, 10, "a burst of twice the rate");
        assert!(l.check("192.0.2.2".parse().unwrap()).is_ok(), "per peer");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn plain_or_unauthenticated_tcp_is_refused() {
        let base = TlsOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: None,
            key: None,
            token_file: Some("/nonexistent".into()),
            client_ca: None,
            rate: 10,
        };
        assert!(matches!(
            TlsListener::bind(&base).await,
            Err(TlsError::NoTls(_))
        ));
        let o = TlsOptions {
            cert: Some("/c".into()),
            key: Some("/k".into()),
            token_file: None,
            ..base
        };
        assert!(matches!(
            TlsListener::bind(&o).await,
            Err(TlsError::NoAuth(_))
        ));
    }

    #[test]
    fn weak_or_world_readable_tokens_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, "short\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_token(&p).is_err());
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        assert_eq!(load_token(&p).unwrap(), b"0123456789abcdef0123");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_token(&p).is_err());
    }
}
