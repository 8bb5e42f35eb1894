//! Prometheus metrics of the node, served once it is configured.
//!
//! *Where.* `https://ADDRESS:50002/metrics` (the OS API's address, port
//! 50002, as the trust endpoint takes 50001), with the OS API's server
//! certificate and the same client-certificate check: a client certificate
//! from the OS CA is required in the TLS handshake (no certificate, no
//! connection), and its Organization must name a role; every role may read
//! metrics. `machine.metrics.insecurePort` adds a plain-HTTP port for
//! scrapers that cannot hold a client certificate. Maintenance mode serves
//! neither: a node without a config has no CA to check clients against.
//!
//! *What.* Read at scrape time, so nothing runs between scrapes: the
//! supervisor's services (state, restarts, memory, CPU), the boot
//! timeline's phases, STATE's and EPHEMERAL's size and free space, the
//! not-after time of the OS API server certificate and of etcd's, and on
//! etcd nodes a few of etcd's own metrics (leader, leader changes, database
//! size, WAL fsync latency) fetched from its `/metrics` over mutual TLS
//! with the node's etcd client certificate, within 2 s, left out when etcd
//! does not answer. The only state kept between scrapes is the OS API's
//! call counts and latencies, recorded by
//! [`MetricsLayer`](super::metrics_layer::MetricsLayer).
//!
//! *Format.* OpenMetrics text from the `prometheus-client` crate, every
//! name prefixed `machined_`; Prometheus reads it (it asks for it first).
//!
//! *Bounds.* As on the OS API's listener: at most 64 connections, a TLS
//! handshake deadline, idle connections closed. HTTP/1.1 only, request
//! headers read within 10 s, GET (and HEAD) of `/metrics` only, no request
//! body, two scrapes gathered at once (others wait up to 5 s, then 503).
//! The reply is ours and its size grows only with the node's services,
//! boot phases and API methods, none of which a client chooses: unknown
//! gRPC paths are counted as `other`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use machine_api::config::Role;
use machine_api::pki::bundle::OsRole;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::server::Connected;
use tower::ServiceExt;
use tracing::{debug, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{authz, listener};
use crate::node::Node;
use crate::paths::Paths;
use crate::supervisor::ServiceStatus;
use crate::timeline::Mark;

/// The mutual-TLS metrics port.
pub const METRICS_PORT: u16 = 50002;

/// What the reply says it is.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long etcd may take to answer its `/metrics`.
const ETCD_TIMEOUT: Duration = Duration::from_secs(2);
/// Scrapes gathered at once; more wait.
const CONCURRENT_SCRAPES: usize = 2;
const SCRAPE_QUEUE_WAIT: Duration = Duration::from_secs(5);
/// Request headers must arrive within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A plain-HTTP connection lives at most this long (no keep-alive there).
const PLAIN_CONNECTION_LIMIT: Duration = Duration::from_secs(30);
/// Plain-HTTP connections at once.
const PLAIN_MAX_CONNECTIONS: usize = 32;

/// The metrics address for the OS API's `--listen` address.
pub fn listen_addr(api: SocketAddr) -> SocketAddr {
    SocketAddr::new(api.ip(), METRICS_PORT)
}

// ------------------------------------------------------------ API calls

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), label_value(v)))
        .collect()
}

/// The encoder writes label values as they are: keep what would end or
/// break the quoted value out.
fn label_value(v: &str) -> String {
    v.chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' => '_',
            c => c,
        })
        .collect()
}

/// Latency buckets of the OS API's calls, in seconds.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The OS API's calls since machined started: the one part of the metrics
/// recorded as it happens rather than read at scrape time.
#[derive(Debug)]
pub struct ApiMetrics {
    calls: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
}

static API: LazyLock<ApiMetrics> = LazyLock::new(|| ApiMetrics {
    calls: Family::default(),
    latency: Family::new_with_constructor(latency_histogram),
});

/// The process's API call metrics.
pub fn api_metrics() -> &'static ApiMetrics {
    &API
}

impl ApiMetrics {
    /// One call of `method` finished with gRPC status `code`.
    pub fn count(&self, method: &str, code: &str) {
        self.calls
            .get_or_create(&labels(&[("method", method), ("code", code)]))
            .inc();
    }

    /// One call of `method` answered (headers) after `seconds`.
    pub fn observe_latency(&self, method: &str, seconds: f64) {
        self.latency
            .get_or_create(&labels(&[("method", method)]))
            .observe(seconds);
    }
}

// ------------------------------------------------------------ a scrape

/// A filesystem's size.
#[derive(Clone, Debug, PartialEq)]
pub struct Filesystem {
    /// `STATE` or `EPHEMERAL`.
    pub mount: &'static str,
    pub size_bytes: u64,
    /// Available to unprivileged writers (statvfs `f_bavail`).
    pub free_bytes: u64,
}

/// A histogram read from elsewhere (etcd): per-bucket counts, not
/// cumulative, the last bucket's bound `f64::MAX` (+Inf), as
/// `prometheus-client` encodes them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadHistogram {
    pub sum: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for ReadHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// What etcd's own `/metrics` said, the parts re-exported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EtcdSample {
    pub has_leader: Option<f64>,
    pub leader_changes: Option<f64>,
    pub db_size_bytes: Option<f64>,
    pub wal_fsync: Option<ReadHistogram>,
}

/// Everything one scrape reports besides the API's calls.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub services: Vec<ServiceStatus>,
    pub boot: Vec<Mark>,
    pub filesystems: Vec<Filesystem>,
    /// Certificate name → not-after, Unix seconds.
    pub certificates: BTreeMap<String, i64>,
    /// None when this is no etcd node or etcd did not answer in time.
    pub etcd: Option<EtcdSample>,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn gauge_f64(v: f64) -> Gauge<f64, AtomicU64> {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    g
}

/// The OpenMetrics text of `sample` and the API's calls in `api`.
pub fn encode(sample: &Sample, api: &ApiMetrics) -> String {
    let mut reg = Registry::with_prefix("machined");

    let state = Family::<Labels, Gauge>::default();
    let restarts = Family::<Labels, Counter>::default();
    let memory = Family::<Labels, Gauge>::default();
    let cpu = Family::<Labels, Counter<f64, AtomicU64>>::default();
    for s in &sample.services {
        let service = [("service", s.name.as_str())];
        state
            .get_or_create(&labels(&[
                ("service", &s.name),
                ("state", s.state.as_str()),
            ]))
            .set(1);
        restarts
            .get_or_create(&labels(&service))
            .inc_by(u64::from(s.restarts));
        if let Some(m) = s.memory_bytes {
            memory.get_or_create(&labels(&service)).set(to_i64(m));
        }
        if let Some(usec) = s.cpu_usec {
            cpu.get_or_create(&labels(&service))
                .inc_by(usec as f64 / 1e6);
        }
    }
    reg.register(
        "service_state",
        "Services by state: 1 for the state each service is in",
        state,
    );
    reg.register(
        "service_restarts",
        "Automatic restarts of each service (kept across machined restarts)",
        restarts,
    );
    reg.register(
        "service_memory_bytes",
        "Memory of each service's cgroup",
        memory,
    );
    reg.register(
        "service_cpu_seconds",
        "CPU time of each service's cgroup",
        cpu,
    );

    let boot = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let mut seen = std::collections::HashSet::new();
    for m in &sample.boot {
        // A phase marked again (the API after a reload) keeps its boot time.
        if seen.insert(m.phase.as_str()) {
            boot.get_or_create(&labels(&[("phase", &m.phase)]))
                .set(m.uptime);
        }
    }
    reg.register(
        "boot_phase_seconds",
        "Seconds from the kernel's start to each boot phase (osctl boot)",
        boot,
    );

    let fs_size = Family::<Labels, Gauge>::default();
    let fs_free = Family::<Labels, Gauge>::default();
    for f in &sample.filesystems {
        let l = labels(&[("mount", f.mount)]);
        fs_size.get_or_create(&l).set(to_i64(f.size_bytes));
        fs_free.get_or_create(&l).set(to_i64(f.free_bytes));
    }
    reg.register(
        "filesystem_size_bytes",
        "Size of the STATE and EPHEMERAL filesystems",
        fs_size,
    );
    reg.register(
        "filesystem_free_bytes",
        "Space left to unprivileged writers on STATE and EPHEMERAL",
        fs_free,
    );

    let certs = Family::<Labels, Gauge>::default();
    for (name, not_after) in &sample.certificates {
        certs
            .get_or_create(&labels(&[("name", name)]))
            .set(*not_after);
    }
    reg.register(
        "certificate_expiry_timestamp_seconds",
        "Not-after time of the node's certificates, Unix seconds",
        certs,
    );

    reg.register(
        "api_requests",
        "OS API calls by gRPC method and status code",
        api.calls.clone(),
    );
    reg.register(
        "api_request_duration_seconds",
        "Time from an OS API call's arrival to its reply's headers",
        api.latency.clone(),
    );

    if let Some(e) = &sample.etcd {
        if let Some(v) = e.has_leader {
            reg.register(
                "etcd_has_leader",
                "1 when the local etcd member knows a leader (etcd_server_has_leader)",
                gauge_f64(v),
            );
        }
        if let Some(v) = e.leader_changes {
            let c = Counter::<f64, AtomicU64>::default();
            c.inc_by(v);
            reg.register(
                "etcd_leader_changes_seen",
                "Leader changes the local etcd member saw (etcd_server_leader_changes_seen_total)",
                c,
            );
        }
        if let Some(v) = e.db_size_bytes {
            reg.register(
                "etcd_db_total_size_bytes",
                "Size of the local etcd member's database file (etcd_mvcc_db_total_size_in_bytes)",
                gauge_f64(v),
            );
        }
        if let Some(h) = &e.wal_fsync {
            reg.register(
                "etcd_disk_wal_fsync_duration_seconds",
                "Latency of the local etcd member's WAL fsyncs (etcd_disk_wal_fsync_duration_seconds)",
                h.clone(),
            );
        }
    }

    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        warn!("encoding the metrics: {e}");
    }
    out
}

// -------------------------------------------------------- etcd's metrics

/// The re-exported parts of etcd's Prometheus text.
pub fn parse_etcd(text: &str) -> EtcdSample {
    let mut s = EtcdSample::default();
    let mut fsync_buckets: Vec<(f64, f64)> = Vec::new();
    let mut fsync_sum = None;
    let mut fsync_count = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(char::is_whitespace) else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let series = series.trim();
        let (name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        match name {
            "etcd_server_has_leader" => s.has_leader = Some(value),
            "etcd_server_leader_changes_seen_total" => s.leader_changes = Some(value),
            "etcd_mvcc_db_total_size_in_bytes" => s.db_size_bytes = Some(value),
            "etcd_disk_wal_fsync_duration_seconds_sum" => fsync_sum = Some(value),
            "etcd_disk_wal_fsync_duration_seconds_count" => fsync_count = Some(value),
            "etcd_disk_wal_fsync_duration_seconds_bucket" => {
                let le = label_text
                    .split(',')
                    .find_map(|kv| kv.trim().strip_prefix("le="))
                    .map(|v| v.trim_matches('"'));
                let bound = match le {
                    Some("+Inf") => f64::MAX,
                    Some(v) => match v.parse::<f64>() {
                        Ok(b) if b.is_finite() => b,
                        _ => continue,
                    },
                    None => continue,
                };
                fsync_buckets.push((bound, value));
            }
            _ => {}
        }
    }
    if let (Some(sum), Some(count)) = (fsync_sum, fsync_count) {
        fsync_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        if fsync_buckets.last().is_none_or(|b| b.0 != f64::MAX) {
            fsync_buckets.push((f64::MAX, count));
        }
        // etcd's buckets are cumulative; the encoder adds them up itself.
        let mut below = 0.0;
        let buckets = fsync_buckets
            .iter()
            .map(|&(bound, cumulative)| {
                let n = (cumulative - below).max(0.0);
                below = cumulative.max(below);
                (bound, n as u64)
            })
            .collect();
        s.wal_fsync = Some(ReadHistogram {
            sum,
            count: count as u64,
            buckets,
        });
    }
    s
}

/// The client for etcd's `/metrics`, kept between scrapes with the
/// certificate it was made with: its pooled connection spares each scrape
/// a TLS handshake with etcd. Made again when the certificate is renewed.
#[derive(Debug, Default)]
pub struct EtcdScraper(std::sync::Mutex<Option<(String, reqwest::Client)>>);

impl EtcdScraper {
    fn client(&self, ca: &str, crt: &str, key: &str) -> Option<reqwest::Client> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let id = format!("{ca}{crt}");
        if let Some((made_with, client)) = cached.as_ref() {
            if *made_with == id {
                return Some(client.clone());
            }
        }
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).ok()?)
            .identity(reqwest::Identity::from_pem(format!("{crt}\n{key}").as_bytes()).ok()?)
            .timeout(ETCD_TIMEOUT)
            .connect_timeout(ETCD_TIMEOUT)
            .pool_max_idle_per_host(1)
            .build()
            .ok()?;
        *cached = Some((id, client.clone()));
        Some(client)
    }

    /// etcd's `/metrics` through the node's etcd client certificate; None
    /// when the files are missing or etcd does not answer within 2 s.
    async fn fetch(&self, paths: &Paths, ip: IpAddr) -> Option<String> {
        let files = crate::roles::etcd::EtcdFiles::new(paths);
        let ca = files.read("ca.crt").ok()?;
        let crt = files.read("client.crt").ok()?;
        let key = files.read("client.key").ok()?;
        let client = self.client(&ca, &crt, &key)?;
        let url = format!("{}/metrics", crate::roles::etcd::client_url(ip));
        let fetch = async {
            let resp = client.get(&url).send().await;
            match resp.and_then(reqwest::Response::error_for_status) {
                Ok(r) => r.text().await.ok(),
                Err(e) => {
                    debug!("etcd metrics from {url}: {e}");
                    None
                }
            }
        };
        tokio::time::timeout(ETCD_TIMEOUT, fetch)
            .await
            .ok()
            .flatten()
    }
}

/// Not-after of the first certificate in `pem`, Unix seconds.
fn not_after(pem: &str) -> Option<i64> {
    let der = machine_api::pki::parse_cert_der("certificate", pem).ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn filesystem(mount: &'static str, path: &std::path::Path) -> Option<Filesystem> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(Filesystem {
        mount,
        size_bytes: s.blocks().saturating_mul(s.fragment_size()),
        free_bytes: s.blocks_available().saturating_mul(s.fragment_size()),
    })
}

/// Reads everything a scrape reports (see the module docs).
pub async fn gather(node: &Node, api_cert_pem: &str, etcd: &EtcdScraper) -> Sample {
    let paths = node.opts.paths.clone();
    let etcd_node = node.config().is_some_and(|c| c.has_role(Role::Etcd));
    let etcd = async {
        if etcd_node {
            etcd.fetch(&paths, node.node_ip())
                .await
                .map(|t| parse_etcd(&t))
        } else {
            None
        }
    };
    let (services, etcd) = tokio::join!(node.supervisor.list(), etcd);
    let mut certificates = BTreeMap::new();
    if let Some(t) = not_after(api_cert_pem) {
        certificates.insert("os-api-server".to_owned(), t);
    }
    if etcd_node {
        let files = crate::roles::etcd::EtcdFiles::new(&paths);
        for (file, name) in [
            ("server.crt", "etcd-server"),
            ("peer.crt", "etcd-peer"),
            ("client.crt", "etcd-client"),
        ] {
            if let Some(t) = files.read(file).ok().and_then(|p| not_after(&p)) {
                certificates.insert(name.to_owned(), t);
            }
        }
    }
    let filesystems = [
        ("STATE", paths.state_dir()),
        ("EPHEMERAL", paths.root.join("var")),
    ]
    .iter()
    .filter_map(|(m, p)| filesystem(m, p))
    .collect();
    Sample {
        services,
        boot: node.timeline.read(),
        filesystems,
        certificates,
        etcd,
    }
}

// ------------------------------------------------------------ the server

/// What a request's connection proved.
#[derive(Clone, Copy, Debug)]
enum Peer {
    /// Mutual TLS: the role in the client certificate, if any.
    Tls(Option<OsRole>),
    /// The config's plain-HTTP port: anyone.
    Plain,
}

#[derive(Debug)]
struct Scrapes {
    node: Arc<Node>,
    api_cert_pem: String,
    slots: Semaphore,
    etcd: EtcdScraper,
}

fn reply(status: http::StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

async fn metrics(State(s): State<Arc<Scrapes>>, req: Request) -> Response {
    match req.extensions().get::<Peer>() {
        Some(Peer::Plain) | Some(Peer::Tls(Some(_))) => {}
        _ => {
            return reply(
                http::StatusCode::FORBIDDEN,
                "the client certificate names no role (Organization os:admin, os:operator or os:reader)\n",
            )
        }
    }
    let Ok(Ok(_slot)) = tokio::time::timeout(SCRAPE_QUEUE_WAIT, s.slots.acquire()).await else {
        return reply(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "too many scrapes at once\n",
        );
    };
    let sample = gather(&s.node, &s.api_cert_pem, &s.etcd).await;
    let body = encode(&sample, api_metrics());
    ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

fn router(scrapes: Arc<Scrapes>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(scrapes)
}

/// True when a request says it carries a body.
fn has_body(req: &http::Request<hyper::body::Incoming>) -> bool {
    let h = req.headers();
    h.contains_key(http::header::TRANSFER_ENCODING)
        || h.get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.to_str().map_or(true, |n| n.trim() != "0"))
}

/// Serves one connection with HTTP/1.1.
async fn serve_connection<I>(
    io: I,
    router: Router,
    peer: Peer,
    addrs: Option<(SocketAddr, SocketAddr)>,
    keep_alive: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let router = router.clone();
        // Keeps the connection from counting as idle while it is used.
        let guard = addrs.and_then(|(local, remote)| listener::request_guard(local, remote));
        async move {
            let _guard = guard;
            if has_body(&req) {
                return Ok::<_, Infallible>(reply(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    "requests with a body are not accepted\n",
                ));
            }
            req.extensions_mut().insert(peer);
            router.oneshot(req).await
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(16 * 1024)
        .keep_alive(keep_alive);
    if let Err(e) = http.serve_connection(TokioIo::new(io), svc).await {
        debug!("metrics connection: {e}");
    }
}

/// Binds `addr`, retrying for a few seconds: the previous server (before
/// a reload) may still be closing its socket.
async fn bind_retrying(addr: SocketAddr) -> Option<tokio::net::TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match super::bind(addr) {
            Ok(l) => return Some(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(e) = last {
        warn!("metrics not served on {addr}: {e}");
    }
    None
}

async fn serve_tls(addr: SocketAddr, tls: Arc<rustls::ServerConfig>, router: Router) {
    let Some(l) = bind_retrying(addr).await else {
        return;
    };
    let limits = listener::Limits {
        max_connections: 64,
        ..listener::Limits::default()
    };
    let mut incoming = Box::pin(listener::incoming(l, tls, limits));
    let mut conns = JoinSet::new();
    while let Some(conn) = incoming.next().await {
        while conns.try_join_next().is_some() {}
        let Ok(tls) = conn else {
            continue;
        };
        let (tcp, session) = tls.get_ref();
        let role = session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| authz::role_of(c.as_ref()));
        let info = tcp.connect_info();
        let addrs = info.local_addr.zip(info.remote_addr);
        conns.spawn(serve_connection(
            tls,
            router.clone(),
            Peer::Tls(role),
            addrs,
            true,
        ));
    }
}

async fn serve_plain(addr: SocketAddr, router: Router) {
    let Some(l) = bind_retrying(addr).await else {
        return;
    };
    let slots = Arc::new(Semaphore::new(PLAIN_MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let (tcp, _) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let router = router.clone();
        conns.spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(
                PLAIN_CONNECTION_LIMIT,
                serve_connection(tcp, router, Peer::Plain, None, false),
            )
            .await;
        });
    }
}

/// The config's plain-HTTP port, following live config changes.
async fn serve_plain_following_config(node: Arc<Node>, router: Router) {
    let mut watch = node.watch();
    let port_now = |w: &tokio::sync::watch::Receiver<Arc<crate::node::Snapshot>>| {
        w.borrow()
            .config
            .as_ref()
            .and_then(|c| c.machine.metrics.insecure_port)
    };
    loop {
        let port = port_now(&watch);
        let addr = port.map(|p| SocketAddr::new(node.opts.listen.ip(), p));
        let serve = async {
            match addr {
                Some(a) => serve_plain(a, router.clone()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(serve);
        loop {
            tokio::select! {
                () = &mut serve => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    break;
                }
                changed = watch.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if port_now(&watch) != port {
                        break;
                    }
                }
            }
        }
    }
}

/// The running metrics servers; dropping it stops them and their
/// connections.
#[derive(Debug)]
pub struct MetricsServer(tokio::task::JoinHandle<()>);

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the metrics servers of a configured node whose OS API serves
/// `id` (with its client CA): mutual TLS on [`METRICS_PORT`] and the
/// config's plain port, if any.
pub fn spawn(node: Arc<Node>, id: &super::tls::ServerIdentity) -> Option<MetricsServer> {
    let tls = match id.rustls_config() {
        Ok(t) => t,
        Err(e) => {
            warn!("metrics not served: {e}");
            return None;
        }
    };
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let addr = listen_addr(node.opts.listen);
    let router = router(Arc::new(Scrapes {
        node: node.clone(),
        api_cert_pem: id.cert_pem.clone(),
        slots: Semaphore::new(CONCURRENT_SCRAPES),
        etcd: EtcdScraper::default(),
    }));
    Some(MetricsServer(tokio::spawn(async move {
        let mut servers = JoinSet::new();
        servers.spawn(serve_tls(addr, Arc::new(tls), router.clone()));
        servers.spawn(serve_plain_following_config(node, router));
        while servers.join_next().await.is_some() {}
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::ServiceState;

    fn service(name: &str, state: ServiceState, restarts: u32) -> ServiceStatus {
        let mut s = ServiceStatus::new(name, state, Vec::new());
        s.restarts = restarts;
        s.memory_bytes = Some(4096);
        s.cpu_usec = Some(1_500_000);
        s
    }

    const ETCD_TEXT: &str = r#"# HELP etcd_server_has_leader Whether or not a leader exists. 1 is existence, 0 is not.
# TYPE etcd_server_has_leader gauge
etcd_server_has_leader 1
# TYPE etcd_server_leader_changes_seen_total counter
etcd_server_leader_changes_seen_total 2
etcd_mvcc_db_total_size_in_bytes 20480
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.001"} 3
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.002"} 5
etcd_disk_wal_fsync_duration_seconds_bucket{le="+Inf"} 6
etcd_disk_wal_fsync_duration_seconds_sum 0.0123
etcd_disk_wal_fsync_duration_seconds_count 6
etcd_disk_backend_commit_duration_seconds_sum 9
"#;

    #[test]
    fn etcd_text_is_read() {
        let e = parse_etcd(ETCD_TEXT);
        assert_eq!(e.has_leader, Some(1.0));
        assert_eq!(e.leader_changes, Some(2.0));
        assert_eq!(e.db_size_bytes, Some(20480.0));
        let h = e.wal_fsync.unwrap();
        assert_eq!(h.count, 6);
        assert_eq!(h.buckets, vec![(0.001, 3), (0.002, 2), (f64::MAX, 1)]);
        assert_eq!(parse_etcd("junk\n{}\n"), EtcdSample::default());
    }

    #[test]
    fn encoded_text() {
        let api = ApiMetrics {
            calls: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        };
        api.count("/machine.v1alpha1.MachineService/Version", "OK");
        api.count("/machine.v1alpha1.MachineService/Version", "OK");
        api.observe_latency("/machine.v1alpha1.MachineService/Version", 0.003);
        let sample = Sample {
            services: vec![
                service("etcd", ServiceState::Healthy, 1),
                service("containerd", ServiceState::Running, 0),
            ],
            boot: vec![
                Mark {
                    uptime: 1.5,
                    phase: "API serving".into(),
                    detail: String::new(),
                },
                Mark {
                    uptime: 9.0,
                    phase: "API serving".into(),
                    detail: String::new(),
                },
                Mark {
                    uptime: 2.25,
                    phase: "etcd \"healthy\"".into(),
                    detail: String::new(),
                },
            ],
            filesystems: vec![Filesystem {
                mount: "STATE",
                size_bytes: 1000,
                free_bytes: 400,
            }],
            certificates: BTreeMap::from([("os-api-server".to_owned(), 1_900_000_000)]),
            etcd: Some(parse_etcd(ETCD_TEXT)),
        };
        let text = encode(&sample, &api);
        for want in [
            "# TYPE machined_service_state gauge",
            r#"machined_service_state{service="etcd",state="healthy"} 1"#,
            r#"machined_service_state{service="containerd",state="running"} 1"#,
            r#"machined_service_restarts_total{service="etcd"} 1"#,
            r#"machined_service_memory_bytes{service="etcd"} 4096"#,
            r#"machined_service_cpu_seconds_total{service="etcd"} 1.5"#,
            r#"machined_boot_phase_seconds{phase="API serving"} 1.5"#,
            r#"machined_boot_phase_seconds{phase="etcd _healthy_"} 2.25"#,
            r#"machined_filesystem_size_bytes{mount="STATE"} 1000"#,
            r#"machined_filesystem_free_bytes{mount="STATE"} 400"#,
            r#"machined_certificate_expiry_timestamp_seconds{name="os-api-server"} 1900000000"#,
            r#"machined_api_requests_total{method="/machine.v1alpha1.MachineService/Version",code="OK"} 2"#,
            r#"machined_api_request_duration_seconds_bucket{le="0.005",method="/machine.v1alpha1.MachineService/Version"} 1"#,
            "machined_etcd_has_leader 1",
            "machined_etcd_leader_changes_seen_total 2",
            "machined_etcd_db_total_size_bytes 20480",
            r#"machined_etcd_disk_wal_fsync_duration_seconds_bucket{le="0.002"} 5"#,
            r#"machined_etcd_disk_wal_fsync_duration_seconds_bucket{le="+Inf"} 6"#,
            "machined_etcd_disk_wal_fsync_duration_seconds_count 6",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        assert!(!text.contains("phase=\"API serving\"} 9"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn no_etcd_no_etcd_metrics() {
        let text = encode(&Sample::default(), api_metrics());
        assert!(!text.contains("machined_etcd_"), "{text}");
    }

    #[test]
    fn bodies_and_addresses() {
        assert_eq!(
            listen_addr("10.0.0.5:50000".parse().unwrap()),
            "10.0.0.5:50002".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(label_value("a\"b\\c\nd"), "a_b_c_d");
    }
}
