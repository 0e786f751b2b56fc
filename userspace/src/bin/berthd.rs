//! `berthd`: serves every CT's traffic and cgroup counters to Prometheus.
//!
//! It also keeps the billing ledger (`--ledger`, default `<root>/billing.db`): it reads the
//! counters every `--tick` seconds and books them (berth::billing::feed), with a final tick on
//! SIGTERM/SIGINT. The ledger is the only thing berthd writes.
//!
//! `GET /metrics` reads the pinned eBPF maps and the cgroup files at request time (Prometheus
//! text format, OpenMetrics when the `Accept` header prefers it); `GET /healthz` answers
//! `ok` while the daemon serves. berthd never loads or attaches programs; nothing else depends
//! on it running (traffic while it is down is booked at its next tick, spread over the gap).
//!
//! Transfer quotas (`[quota]` of a CT config) are evaluated after every ledger tick on the
//! period's totals (berth::quota::engine), stored in the ledger's file with their webhook
//! events, and enforced; a delivery loop posts the queued events with retry and backoff.
//!
//! `GET /v1/billing/report?ct=<CTID|UUID|all>&period=YYYY-MM&mode=M` and
//! `GET /v1/billing/slots?after_seq=N&limit=K` answer from the ledger in JSON
//! (berth::billing::api; a read-only connection per request); a bad query is a 400 whose JSON
//! body names the parameter, an unknown CT a 404.
//!
//! The panel API (berth::api, README "API") is served on a unix socket (`--api-socket`,
//! default `<run>/berthd.sock`, mode 0660, group `berth`) and, with `--api-listen`, on TCP
//! with TLS and a bearer token or client certificate — never plain or unauthenticated.

use berth::clock::unix_now;
use std::{
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use berth::{
    billing::{Ledger, LedgerOptions, api, feed::Feeder, store::CurrentPeriods},
    datapath::DEFAULT_PIN_DIR,
    metrics::{BerthCollector, DEFAULT_LISTEN, Format, Sources, billing::BillingGauges, expose},
    quota::{self, store::QuotaStore, webhook::SharedStore},
};
use berth_runtime::{config::Host, error_chain::ErrorChain};
use clap::Parser;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::Mutex};
use tracing::{debug, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "berthd",
    version,
    about = "Prometheus exporter of berth's per-CT traffic and cgroup counters"
)]
struct Args {
    /// Address to serve /metrics and /healthz on (port 0 picks a free port; the address is
    /// printed on stdout).
    #[arg(long, env = "BERTHD_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// State directory (CT configs), as for berth.
    #[arg(long, env = "BERTH_ROOT")]
    root: Option<PathBuf>,
    /// Run-state directory. Default: /run/berth, or <root>/run.
    #[arg(long, env = "BERTH_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// cgroup directory holding this installation's CTs, under every hierarchy.
    #[arg(long, env = "BERTH_CGROUP_PARENT")]
    cgroup_parent: Option<String>,
    /// bpffs directory the datapath is pinned under.
    #[arg(long, env = "BERTH_BPFFS", default_value = DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    /// Billing ledger (SQLite). Default: <root>/billing.db.
    #[arg(long, env = "BERTHD_LEDGER")]
    ledger: Option<PathBuf>,
    /// Seconds between two readings of the counters into the ledger (10–300).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(10..=300))]
    tick: u64,
    /// Billing periods before the current one whose 5-minute slots the ledger keeps (1–120);
    /// per-period totals are kept for good.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=120))]
    retention: u32,
    /// Seconds a quota webhook POST may take before it counts as failed (retried with backoff).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=120))]
    webhook_timeout: u64,
    /// PEM file of CA certificates trusted for `https://` quota webhooks besides the system's
    /// trust store (a private CA of the panel). The host name is always checked.
    #[arg(long, env = "BERTHD_WEBHOOK_CA")]
    webhook_ca: Option<PathBuf>,
    /// Ship the ledger after every tick into this central PostgreSQL (libpq connection string,
    /// README "Fleet"); on its own thread, so a slow or unreachable database never delays a
    /// tick; failed rounds are retried with backoff.
    #[arg(long, env = "BERTHD_SHIP_URL")]
    ship_url: Option<String>,
    /// The node's name in the central tables. Default: the host name.
    #[arg(long, env = "BERTHD_NODE")]
    node: Option<String>,
    /// The panel API's unix socket. Default: <run-dir>/berthd.sock.
    #[arg(long, env = "BERTHD_API_SOCKET")]
    api_socket: Option<PathBuf>,
    /// Serve no API on a unix socket.
    #[arg(long)]
    no_api_socket: bool,
    /// Also serve the API on this TCP address: TLS only (--api-tls-cert, --api-tls-key) and
    /// with --api-token-file and/or --api-client-ca; berthd refuses to start otherwise.
    #[arg(long, env = "BERTHD_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TCP API.
    #[arg(long, env = "BERTHD_API_TLS_CERT", requires = "api_listen")]
    api_tls_cert: Option<PathBuf>,
    /// PEM private key of the TCP API.
    #[arg(long, env = "BERTHD_API_TLS_KEY", requires = "api_listen")]
    api_tls_key: Option<PathBuf>,
    /// File holding the bearer token TCP clients send (one word, ≥ 16 characters, not
    /// readable by others).
    #[arg(long, env = "BERTHD_API_TOKEN_FILE", requires = "api_listen")]
    api_token_file: Option<PathBuf>,
    /// PEM CA certificates whose client certificates authenticate TCP clients.
    #[arg(long, env = "BERTHD_API_CLIENT_CA", requires = "api_listen")]
    api_client_ca: Option<PathBuf>,
    /// TCP API requests per second per client address (bursts of twice that).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    api_rate: u32,
    /// More logging on stderr (-v debug). BERTH_LOG takes tracing filter syntax.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

struct Server {
    collector: BerthCollector,
    scraper: expose::Scraper,
    /// One collection at a time: concurrent scrapes would only multiply the same reads and
    /// the memory they hold.
    scrape: Mutex<()>,
    /// The ledger the billing endpoints read (each request opens its own read-only connection:
    /// the feeder's writes never wait for a reader).
    ledger: PathBuf,
    /// Wakes the shipper after a tick (a full channel: it is already due).
    ship: Option<std::sync::mpsc::SyncSender<()>>,
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut b = body.to_string();
    b.push('\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(b)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

impl Server {
    async fn metrics(self: Arc<Self>, accept: Option<String>) -> Response<Full<Bytes>> {
        let format = Format::negotiate(accept.as_deref());
        let _one = self.scrape.lock().await;
        let t0 = Instant::now();
        let me = self.clone();
        // The reads are blocking file and bpf(2) calls.
        let res =
            tokio::task::spawn_blocking(move || me.scraper.scrape(me.collector.reader(), format))
                .await;
        match res {
            Ok(body) => {
                debug!(bytes = body.len(), elapsed = ?t0.elapsed(), ?format, "scrape served");
                Response::builder()
                    .header(header::CONTENT_TYPE, format.content_type())
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
            }
            Err(e) => {
                warn!(error = %e, "collector task failed");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "collecting metrics failed\n",
                )
            }
        }
    }

    /// `/v1/billing/report` (`report`) or `/v1/billing/slots`, answered on a blocking thread.
    async fn billing(
        self: Arc<Self>,
        report: bool,
        query: Option<String>,
    ) -> Response<Full<Bytes>> {
        let path = self.ledger.clone();
        let res =
            tokio::task::spawn_blocking(move || -> Result<serde_json::Value, api::ApiError> {
                let q = query.as_deref();
                // The query first: a bad one is a 400 whatever the ledger's state.
                type Answer = Box<dyn FnOnce(&Ledger) -> Result<serde_json::Value, api::ApiError>>;
                let answer: Answer = if report {
                    let rq = api::parse_report_query(q)?;
                    Box::new(move |l| api::report(l, &rq, unix_now()))
                } else {
                    let sq = api::parse_slots_query(q)?;
                    Box::new(move |l| api::slots(l, &sq))
                };
                let ledger = Ledger::open_read_only(&path).map_err(api::ApiError::Ledger)?;
                answer(&ledger)
            })
            .await;
        match res {
            Ok(Ok(v)) => json(StatusCode::OK, &v),
            Ok(Err(e)) => {
                if e.status() >= 500 {
                    warn!(error = %ErrorChain(&e), "billing request failed");
                }
                let status =
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                json(status, &e.body())
            }
            Err(e) => {
                warn!(error = %e, "billing task failed");
                json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": "billing task failed"}),
                )
            }
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                self.metrics(accept).await
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/v1/billing/report" | "/v1/billing/slots" => {
                let query = req.uri().query().map(str::to_owned);
                self.billing(req.uri().path() == "/v1/billing/report", query)
                    .await
            }
            "/" => text(
                StatusCode::OK,
                "berthd: per-CT traffic and cgroup counters at /metrics, liveness at /healthz, the billing ledger at /v1/billing/report and /v1/billing/slots\n",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
        }
    }
}

async fn serve(args: Args) -> Result<()> {
    let host = Host::new(
        args.root.clone(),
        args.run_dir.clone(),
        args.cgroup_parent.clone(),
    )
    .context("invalid --root/--run-dir/--cgroup-parent")?;
    if !host.root.exists() {
        warn!(root = %host.root.display(), "state directory does not exist (yet): no CTs to export");
    }
    let ledger_path = args
        .ledger
        .clone()
        .unwrap_or_else(|| host.root.join("billing.db"));
    // A CA file that does not load stops berthd here: every https event would fail otherwise.
    let webhooks = quota::webhook::Client::new(
        args.webhook_ca.as_deref(),
        Duration::from_secs(args.webhook_timeout),
    )
    .context("setting up the quota webhooks' client")?;
    let scraper = expose::Scraper::default();
    let ship = match &args.ship_url {
        Some(url) => Some(start_shipper(
            url,
            args.node.clone(),
            ledger_path.clone(),
            &scraper,
            Duration::from_secs(args.tick),
        )?),
        None => None,
    };
    let server = Arc::new(Server {
        collector: BerthCollector::new(Sources {
            host: host.clone(),
            pin_dir: args.bpffs.clone(),
        }),
        scraper,
        scrape: Mutex::new(()),
        ledger: ledger_path.clone(),
        ship,
    });

    // Before anything is announced: a SIGTERM right after the listen line must still get the
    // final tick, not the default action.
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let ledger_path_for_quota = ledger_path.clone();
    let ledger_for_api = ledger_path.clone();
    let feeder = open_feeder(
        host.clone(),
        args.bpffs.clone(),
        ledger_path,
        args.retention,
    )
    .await?;
    let quota = open_quota(ledger_path_for_quota).await?;
    // Before the ticker writes files: the socket is bound under a narrow umask.
    let (_api, api_lines) = start_api(&args, &host, &ledger_for_api).await?;
    let gauges = SharedGauges::default();
    let ticker = tokio::spawn(tick_loop(
        feeder.clone(),
        quota.clone(),
        server.clone(),
        gauges.clone(),
        Duration::from_secs(args.tick),
    ));
    let deliverer = tokio::spawn(delivery_loop(
        quota.clone(),
        server.clone(),
        webhooks,
        host.clone(),
    ));

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // Tests and scripts started with port 0 learn the port from the first line, the API's
    // addresses from the next ones. One write, errors ignored: a reader that closes the pipe
    // after the first line must not fail the daemon.
    let mut announce = format!("berthd listening on http://{addr}/metrics\n");
    for line in &api_lines {
        announce.push_str(line);
        announce.push('\n');
    }
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_all(announce.as_bytes())
        .and_then(|()| out.flush());
    drop(out);
    info!(%addr, root = %host.root.display(), cgroup_parent = %host.cgroup_parent, bpffs = %args.bpffs.display(), "berthd serving");

    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let server = server.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                debug!(%peer, error = %ErrorChain(&e), "connection ended with an error");
            }
        });
    }
    info!("berthd stopping");
    ticker.abort();
    deliverer.abort();
    // The ticker may be inside a tick: the lock waits for it, then the final one books up to now.
    tick_once(feeder, quota, server, gauges).await;
    Ok(())
}

/// The API's listeners (berth::api), started after the metrics listener; the guard removes
/// the socket file when berthd stops.
async fn start_api(
    args: &Args,
    host: &Host,
    ledger: &std::path::Path,
) -> Result<(Option<berth::api::socket::SocketGuard>, Vec<String>)> {
    use berth::api;
    // A TCP listener that would be plain or unauthenticated stops berthd before it serves.
    let tcp = match args.api_listen {
        Some(listen) => Some(
            api::tls::TlsListener::bind(&api::tls::TlsOptions {
                listen,
                cert: args.api_tls_cert.clone(),
                key: args.api_tls_key.clone(),
                token_file: args.api_token_file.clone(),
                client_ca: args.api_client_ca.clone(),
                rate: args.api_rate,
            })
            .await
            .context("the TCP API")?,
        ),
        None => None,
    };
    let exe =
        std::env::current_exe().context("finding berthd's own executable (the API's worker)")?;
    let state = api::Api::new(host.clone(), args.bpffs.clone(), ledger.to_owned(), exe);
    let app = api::router(state.clone());
    tokio::spawn(state.watch_loop());
    let (mut guard, mut lines) = (None, Vec::new());
    if !args.no_api_socket {
        let path = args
            .api_socket
            .clone()
            .unwrap_or_else(|| host.run.join("berthd.sock"));
        match api::socket::bind(&path) {
            Ok((l, g)) => {
                guard = Some(g);
                lines.push(format!("berthd API on unix:{}", path.display()));
                info!(socket = %path.display(), "API serving");
                tokio::spawn(api::socket::serve(l, app.clone()));
            }
            // Another berthd of this installation serves it (a second daemon for a side-by-side
            // measurement): the metrics and the ledger still work here.
            Err(e @ api::socket::SocketError::InUse { .. }) => {
                warn!(error = %e, "not serving the API on the socket");
            }
            Err(e) => return Err(anyhow::Error::new(e).context("the API socket")),
        }
    }
    if let Some(t) = tcp {
        let a = t.local_addr().context("reading the API's bound address")?;
        lines.push(format!("berthd API on https://{a}/v1"));
        info!(%a, "API serving over TLS");
        tokio::spawn(t.serve(app));
    }
    Ok((guard, lines))
}

type SharedFeeder = Arc<std::sync::Mutex<Feeder>>;
/// The billing gauges' state between ticks (what `Ledger::current_periods` advances).
type SharedGauges = Arc<std::sync::Mutex<CurrentPeriods>>;

async fn open_feeder(
    host: Host,
    pin_dir: PathBuf,
    path: PathBuf,
    retention: u32,
) -> Result<SharedFeeder> {
    let f = tokio::task::spawn_blocking(move || -> Result<Feeder> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the ledger's directory {}", dir.display()))?;
        }
        let ledger = Ledger::open(
            &path,
            LedgerOptions {
                retention_periods: retention,
            },
        )
            .with_context(|| format!("opening the billing ledger {}", path.display()))?;
        info!(ledger = %path.display(), cts = ledger.cts().count(), seq = ledger.seq(), "billing ledger open");
        Ok(Feeder::new(host, pin_dir, ledger))
    })
    .await
    .context("opening the billing ledger: task failed")??;
    Ok(Arc::new(std::sync::Mutex::new(f)))
}

/// The quota tables in the ledger's file (after the ledger opened it, so it exists).
async fn open_quota(path: PathBuf) -> Result<SharedStore> {
    let s = tokio::task::spawn_blocking(move || {
        QuotaStore::open(&path)
            .with_context(|| format!("opening the quota tables of {}", path.display()))
    })
    .await
    .context("opening the quota tables: task failed")??;
    Ok(Arc::new(std::sync::Mutex::new(s)))
}

/// Posts the queued quota events every second (a failed one waits for its backoff), each to
/// its CT's webhook as saved at that pass.
async fn delivery_loop(
    store: SharedStore,
    server: Arc<Server>,
    client: quota::webhook::Client,
    host: Host,
) {
    let mut iv = tokio::time::interval(Duration::from_secs(1));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        match quota::webhook::deliver_due(&store, &client, &host).await {
            Ok(p) => {
                if p.delivered + p.failed + p.retargeted + p.abandoned > 0 {
                    debug!(
                        delivered = p.delivered,
                        failed = p.failed,
                        retargeted = p.retargeted,
                        abandoned = p.abandoned,
                        backlog = p.backlog,
                        "quota webhook pass"
                    );
                }
                server.scraper.set_quota_outbox(p.backlog, p.failing);
            }
            Err(e) => warn!(error = %ErrorChain(&e), "quota webhook pass failed"),
        }
    }
}

/// One tick on a blocking thread; a failed tick is logged and retried at the next one (the
/// ledger re-derives every delta from its last committed checkpoint, so nothing is lost).
/// After it, the quota is evaluated and enforced and the billing gauges of /metrics are
/// advanced from the ledger.
async fn tick_once(
    feeder: SharedFeeder,
    quota: SharedStore,
    server: Arc<Server>,
    gauges: SharedGauges,
) {
    let res = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let now = unix_now();
        let mut f = feeder.lock().unwrap_or_else(|p| p.into_inner());
        let r = f.tick(now);
        let took = t0.elapsed();
        // The quota reads the totals this tick committed; after a failed tick, the last ones.
        {
            let mut q = quota.lock().unwrap_or_else(|p| p.into_inner());
            let mut enforcer = quota::engine::apply_with(&f.host, &f.pin_dir);
            match quota::engine::tick(&mut q, &f.ledger, &f.host, &mut enforcer, now) {
                Ok(t) => {
                    debug!(
                        cts = t.cts.len(),
                        queued = t.queued,
                        backlog = t.backlog,
                        "quota tick"
                    );
                    server.scraper.set_quota(t.cts);
                    if let Ok(failing) = q.failing() {
                        server.scraper.set_quota_outbox(t.backlog, failing);
                    }
                }
                Err(e) => {
                    warn!(error = %ErrorChain(&e), "quota tick failed (retried at the next tick)")
                }
            }
        }
        let path = f.ledger.path().to_owned();
        // The gauges read on their own read connection, so a slow read (the first one reads
        // every slot of the period) never holds the feeder (the final tick on SIGTERM waits
        // for that lock).
        drop(f);
        let mut state = gauges.lock().unwrap_or_else(|p| p.into_inner());
        match Ledger::open_read_only(&path)
            .and_then(|l| BillingGauges::advance(&l, &mut state, now))
        {
            Ok(g) => server.scraper.set_billing(g),
            // The previous gauges stay: stale by a tick rather than gone.
            // (What a failed read settled is final all the same.)
            Err(e) => warn!(error = %ErrorChain(&e), "reading the billing gauges failed"),
        }
        drop(state);
        debug!(took = ?t0.elapsed() - took, "billing gauges read");
        if let Some(tx) = &server.ship {
            let _ = tx.try_send(());
        }
        (r, took)
    })
    .await;
    match res {
        Ok((Ok(s), took)) => debug!(
            cts = s.cts,
            registered = s.registered,
            retired = s.retired,
            no_uuid = s.skipped_no_uuid,
            seq = s.tick.seq,
            slot_rows = s.tick.slot_rows,
            anomalies = s.tick.anomalies,
            ?took,
            "billing tick"
        ),
        Ok((Err(e), _)) => warn!(error = %ErrorChain(&e), "billing tick failed"),
        Err(e) => warn!(error = %e, "billing tick task failed"),
    }
}

async fn tick_loop(
    feeder: SharedFeeder,
    quota: SharedStore,
    server: Arc<Server>,
    gauges: SharedGauges,
    every: Duration,
) {
    let mut iv = tokio::time::interval(every);
    // After a stall, one tick books the whole gap: no burst of catch-up ticks.
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        iv.tick().await;
        tick_once(
            feeder.clone(),
            quota.clone(),
            server.clone(),
            gauges.clone(),
        )
        .await;
    }
}

/// The shipper's thread: a round after every tick (or every `every` when no tick wakes it),
/// backing off while the database fails. It ends with berthd; a round cut short resumes from
/// the acknowledged seq at the next start.
fn start_shipper(
    url: &str,
    node: Option<String>,
    ledger: PathBuf,
    scraper: &expose::Scraper,
    every: Duration,
) -> Result<std::sync::mpsc::SyncSender<()>> {
    use berth::fleet::{ConnInfo, ShipOptions, ShipStatus, Shipper, backoff, default_node};
    let info: ConnInfo = url.parse().context("--ship-url")?;
    let node = node.unwrap_or_else(default_node);
    let mut shipper = Shipper::new(
        info,
        ShipOptions {
            node: node.clone(),
            page_rows: 100_000,
        },
    )
    .context("--node")?;
    info!(target_db = %shipper.target(), %node, "shipping the ledger after every tick");
    let status = Arc::new(ShipStatus::default());
    scraper.set_ship(status.clone());
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("berthd-ship".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "shipper: starting its runtime failed; not shipping");
                    return;
                }
            };
            loop {
                match rx.recv_timeout(every) {
                    Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                if !ledger.exists() {
                    continue;
                }
                while rt
                    .block_on(shipper.round(&ledger, &status, unix_now()))
                    .is_err()
                {
                    let n = status
                        .failing_rounds
                        .load(std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(backoff(n));
                    // Ticks meanwhile are in the ledger: the next round takes them all.
                    while rx.try_recv().is_ok() {}
                }
            }
        })
        .context("starting the shipper thread")?;
    Ok(tx)
}

fn main() -> ExitCode {
    // A worker of the API: one state change, in a process of its own, before any thread.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == berth::api::worker::WORKER_ARG)
    {
        berth::logging::init(0, &["warn"]);
        return ExitCode::from(berth::api::worker::worker_main());
    }
    // The fault-injection tests' crash points (a build with `--features failpoints`).
    if let Err(e) = berth_runtime::crashpoint::setup_from_env() {
        eprintln!("berthd: error: {e}");
        return ExitCode::from(2);
    }
    let args = Args::parse();
    berth::logging::init(args.verbose, &["info", "debug"]);
    // One thread serves HTTP; a scrape's reads run on a blocking thread and fan out over a
    // few scoped threads (metrics::snapshot), which keeps the daemon small when idle.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berthd: error: starting the tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berthd: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
