//! A quota webhook receiver for the tests and benchmarks (plain HTTP or HTTPS), and the
//! private CAs its certificates come from (made with the `openssl` command in a temporary
//! directory: nothing touches the system's trust store).
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Runs `f` on a thread inside the namespace `ns` (a socket made there stays there).
pub fn in_ns<T: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let fd = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on this thread only, with an fd that outlives the scope.
            ensure!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0, "setns");
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    })
}

/// Whether the `openssl` command is here (the HTTPS tests skip visibly without it).
pub fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A private CA (P-256) in its own temporary directory.
pub struct Ca {
    dir: tempfile::TempDir,
    serial: AtomicUsize,
}

/// A server certificate and its key (PEM, the key PKCS#8).
pub struct ServerCert {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Result<Ca> {
        let dir = tempfile::tempdir()?;
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
            ],
        )?;
        Ok(Ca {
            dir,
            serial: AtomicUsize::new(1),
        })
    }

    /// The CA certificate (what berthd's `--webhook-ca` is given).
    pub fn pem_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server certificate signed by this CA for the subject alternative names `sans`
    /// (`DNS:localhost`, `IP:127.0.0.1`).
    pub fn issue(&self, sans: &[&str]) -> Result<ServerCert> {
        let n = self.serial.fetch_add(1, Ordering::SeqCst);
        let d = self.dir.path();
        let (key, csr, crt, ext) = (
            format!("s{n}.key"),
            format!("s{n}.csr"),
            format!("s{n}.pem"),
            format!("s{n}.ext"),
        );
        std::fs::write(
            d.join(&ext),
            format!(
                "subjectAltName={}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )?;
        openssl(
            d,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                "/CN=berth test webhook",
            ],
        )?;
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &(1000 + n).to_string(),
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        )?;
        Ok(ServerCert {
            cert_pem: std::fs::read(d.join(&crt))?,
            key_pem: std::fs::read(d.join(&key))?,
        })
    }
}

/// What a receiver recorded.
#[derive(Default)]
struct Seen {
    /// The 2xx-answered POSTs: `Idempotency-Key` and JSON body.
    calls: Mutex<Vec<(String, Value)>>,
    /// TLS handshakes that failed (the client did not accept the certificate).
    handshake_failures: AtomicUsize,
}

/// A webhook receiver: every POST to `/hook` with its `Idempotency-Key` and JSON body,
/// answered 200 (503 while `failing`). One connection at a time, as berthd sends.
pub struct Receiver {
    pub port: u16,
    /// While set, every POST is answered 503 (and not recorded).
    pub failing: Arc<AtomicBool>,
    /// The POSTs answered 503.
    pub refused: Arc<AtomicUsize>,
    seen: Arc<Seen>,
}

impl Receiver {
    /// Plain HTTP on 127.0.0.1 of the namespace `ns`.
    pub fn start(ns: BorrowedFd<'_>) -> Result<Receiver> {
        Self::start_on(ns, "127.0.0.1", None)
    }

    /// HTTPS with `cert` on 127.0.0.1 of the namespace `ns`.
    pub fn start_tls(ns: BorrowedFd<'_>, cert: &ServerCert) -> Result<Receiver> {
        Self::start_on(ns, "127.0.0.1", Some(cert))
    }

    /// On `addr` (an address of the namespace `ns`), in TLS when given a certificate.
    pub fn start_on(ns: BorrowedFd<'_>, addr: &str, cert: Option<&ServerCert>) -> Result<Receiver> {
        let tls = match cert {
            Some(c) => Some(
                native_tls::TlsAcceptor::new(
                    native_tls::Identity::from_pkcs8(&c.cert_pem, &c.key_pem)
                        .context("loading the receiver's certificate")?,
                )
                .context("setting up the receiver's TLS")?,
            ),
            None => None,
        };
        let l = in_ns(ns, || Ok(TcpListener::bind(format!("{addr}:0"))?))?;
        let port = l.local_addr()?.port();
        let seen = Arc::new(Seen::default());
        let failing = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let (sink, fail, nrefused) = (seen.clone(), failing.clone(), refused.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                match &tls {
                    Some(acc) => match acc.accept(s) {
                        Ok(mut t) => {
                            serve(&mut t, &sink, &fail, &nrefused);
                            let _ = t.shutdown();
                        }
                        Err(_) => {
                            sink.handshake_failures.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                    None => {
                        let mut s = s;
                        serve(&mut s, &sink, &fail, &nrefused);
                    }
                }
            }
        });
        Ok(Receiver {
            port,
            failing,
            refused,
            seen,
        })
    }

    pub fn calls(&self) -> Vec<(String, Value)> {
        self.seen
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn events(&self) -> Vec<String> {
        self.calls()
            .iter()
            .map(|(_, v)| v["event"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    pub fn handshake_failures(&self) -> usize {
        self.seen.handshake_failures.load(Ordering::SeqCst)
    }
}

/// One request on `s`: the head up to the blank line, the body by its Content-Length.
fn serve(s: &mut (impl Read + Write), seen: &Seen, failing: &AtomicBool, refused: &AtomicUsize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    if !lines.next().is_some_and(|l| l.starts_with("POST /hook ")) {
        let _ = s
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let (mut key, mut len) = (String::new(), 0usize);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "idempotency-key" => key = v.trim().to_string(),
                "content-length" => len = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(len);
    if failing.load(Ordering::SeqCst) {
        refused.fetch_add(1, Ordering::SeqCst);
        let _ = s.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    }
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        seen.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key, v));
    }
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = s.flush();
}
