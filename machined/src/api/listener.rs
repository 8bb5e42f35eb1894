//! The OS API's and the trust endpoint's listener: TCP accept, a
//! per-listener connection cap, the TLS handshake with a deadline, and an
//! idle limit, in front of tonic's `serve_with_incoming_shutdown`.
//!
//! tonic's own `serve_with_shutdown` accepts every connection and waits for
//! each TLS handshake forever. 20k TCP connections that never sent a byte
//! filled machined's fd table: real clients timed out, and machined's own
//! etcd and containerd health checks failed with `Too many open files`.
//!
//! Here every connection holds a permit of the listener's semaphore
//! (`Limits::max_connections`) from accept to close, and the permit goes
//! back when the connection is dropped, whatever ends it. When the
//! listener is full, a newcomer evicts, in this order:
//!
//! 1. the oldest connection still in its TLS handshake. A real client
//!    finishes its handshake in milliseconds; a connection that has not
//!    is, most likely, one of a flood that never will (the handshake
//!    deadline would close it within `handshake_timeout` anyway). Oldest
//!    first, because a flood keeps adding new ones: the newest is the one
//!    most likely to be a real client still mid-handshake;
//! 2. else the established connection idle the longest (no request in
//!    flight), once idle for `evict_idle_after`;
//! 3. else nobody: the newcomer is closed at once. Every slot then holds a
//!    connection with work in flight or used seconds ago, and closing one of
//!    those would break a real client's call.
//!
//! Why not stop accepting when full: the flood then sits in the kernel's
//! accept queue in front of the real client, which waits behind up to
//! `somaxconn` connections, each holding a slot for the whole handshake
//! deadline once accepted. Accepting and evicting keeps the real client's
//! wait at one handshake.
//!
//! An established connection with no request in flight for
//! `idle_timeout` is closed; HTTP/2 keepalive pings close one whose peer
//! stopped answering. Requests are counted by [`ActivityLayer`], which
//! [`server`] installs.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep, Timeout};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::layer::util::{Identity, Stack};
use tracing::{debug, warn};

/// What one listener allows. [`Limits::default`] is for the OS API;
/// [`Limits::trust`] for the trust endpoint.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections held at once, in their handshake or established. Each
    /// costs an fd and, established, about 26 KiB of RSS (rustls and
    /// HTTP/2 buffers, the connection task; measured: 500 idle mutual-TLS
    /// connections took machined from 21 to 34 MiB).
    pub max_connections: usize,
    /// From accept to a finished TLS handshake.
    pub handshake_timeout: Duration,
    /// An established connection with no request in flight for this long
    /// is closed.
    pub idle_timeout: Duration,
    /// When the listener is full, an established connection idle this long
    /// may be closed to admit a new one.
    pub evict_idle_after: Duration,
    /// HTTP/2 PING interval on every connection; a peer that does not
    /// answer within `http2_keepalive_timeout` is dropped.
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// TCP keepalive idle time (probes then every 10 s, 3 of them).
    pub tcp_keepalive: Duration,
    /// HTTP/2 streams (calls) at once on one connection.
    pub max_concurrent_streams: u32,
    /// Deadline of a call's handler (a streamed reply's body is not
    /// bounded, only the wait for its headers). Bounds a call whose client
    /// never finishes its request body.
    pub request_timeout: Option<Duration>,
    /// After this, a connection is asked to go away (HTTP/2 GOAWAY; calls in
    /// flight finish, clients reconnect).
    pub max_connection_age: Option<Duration>,
}

impl Default for Limits {
    /// The OS API. Its real clients are operators' osctl (one connection
    /// per node per command), `osctl cluster create` and other nodes: tens
    /// of connections at most. 512 leaves room for fan-outs and costs at
    /// most about 13 MiB established and 512 fds: with the trust
    /// endpoint's 128, 640 of the kernel's default 1024 should machined
    /// fail to raise its limit.
    fn default() -> Self {
        Limits {
            max_connections: 512,
            // Several round trips over a slow link, not a stalled peer.
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            evict_idle_after: Duration::from_secs(10),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            // osctl fans out one call per node per connection; `logs -f`
            // of every service is about a dozen streams.
            max_concurrent_streams: 128,
            // apply-config, bootstrap and reset answer when their work is
            // accepted, not done; but leave the handlers their own timing.
            request_timeout: None,
            max_connection_age: None,
        }
    }
}

impl Limits {
    /// The trust endpoint: one short call per worker (sign a CSR), from
    /// any host that can reach the port (no client certificate).
    pub fn trust() -> Self {
        Limits {
            max_connections: 128,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Some(Duration::from_secs(30)),
            ..Limits::default()
        }
    }
}

/// A tonic server builder with the HTTP/2 limits of `limits`, and the
/// layer that tells the listener which connections are in use. Add the
/// services and serve with [`incoming`].
pub fn server(limits: &Limits) -> tonic::transport::Server<Stack<ActivityLayer, Identity>> {
    let mut b = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        // Ignored with an incoming stream (tonic's note); `incoming` sets
        // it on each socket. Kept so the builder says what is in force.
        .tcp_keepalive(Some(limits.tcp_keepalive))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .accept_http1(false);
    if let Some(t) = limits.request_timeout {
        b = b.timeout(t);
    }
    if let Some(age) = limits.max_connection_age {
        b = b.max_connection_age(age);
    }
    b.layer(ActivityLayer)
}

/// Accepted, TLS-handshaken connections of `listener`, within `limits`,
/// for `Server::serve_with_incoming_shutdown`. Dropping the stream (tonic
/// does at shutdown) closes the listening socket at once and abandons
/// handshakes in progress; established connections live on until served
/// out.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
) -> impl Stream<Item = Result<TlsStream<Connection>, io::Error>> + Send + 'static {
    Incoming::new(listener, tls, limits)
}

// ------------------------------------------------------------------ state

/// One connection's state, shared by its stream, its listener's registry
/// (for eviction) and the request layer (for activity).
#[derive(Debug)]
struct Shared {
    accepted: Instant,
    established: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds since `accepted` at the last change of `in_flight`.
    last_active_ms: AtomicU64,
    killed: AtomicBool,
    waker: AtomicWaker,
}

impl Shared {
    fn new() -> Self {
        Shared {
            accepted: Instant::now(),
            established: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    /// Since when nothing has been in flight; None while something is.
    fn idle_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| {
            self.accepted + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed))
        })
    }

    /// Closes the connection: its next (or pending) read or write fails.
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// Connections of one listener.
#[derive(Debug, Default)]
struct Registry {
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Shared>>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Shared>>> {
        // A panic while holding this lock leaves a consistent map.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection to close for a newcomer (see the module docs), not
    /// yet marked.
    fn victim(&self, evict_idle_after: Duration) -> Option<Arc<Shared>> {
        let conns = self.lock();
        let live = || conns.values().filter(|c| !c.killed.load(Ordering::Acquire));
        if let Some(c) = live()
            .filter(|c| !c.established.load(Ordering::Acquire))
            .min_by_key(|c| c.accepted)
        {
            return Some(c.clone());
        }
        let now = Instant::now();
        live()
            .filter_map(|c| c.idle_since().map(|t| (t, c)))
            .filter(|(t, _)| now.saturating_duration_since(*t) >= evict_idle_after)
            .min_by_key(|(t, _)| *t)
            .map(|(_, c)| c.clone())
    }
}

/// Every live connection by (local, peer) address, for [`ActivityLayer`]:
/// tonic hands a request only the connection's `TcpConnectInfo`.
type Index = Mutex<HashMap<(SocketAddr, SocketAddr), Arc<Shared>>>;
static INDEX: LazyLock<Index> = LazyLock::new(Index::default);

fn index() -> MutexGuard<'static, HashMap<(SocketAddr, SocketAddr), Arc<Shared>>> {
    INDEX.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connections open on every listener, and the most since the last trim.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static TRIM_SCHEDULED: AtomicBool = AtomicBool::new(false);
/// Below this peak there is too little to give back to bother.
const TRIM_MIN_PEAK: usize = 64;

fn conn_opened() {
    let now = LIVE.fetch_add(1, Ordering::Relaxed) + 1;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// After a load peak (a flood, a fan-out) has mostly drained, gives the
/// freed heap back to the kernel: glibc keeps freed memory in its arenas,
/// so RSS otherwise stays at the peak (155 MB after 20k connections).
fn conn_closed() {
    let now = LIVE.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
    let peak = PEAK.load(Ordering::Relaxed);
    if peak < TRIM_MIN_PEAK || now > peak / 8 || TRIM_SCHEDULED.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        TRIM_SCHEDULED.store(false, Ordering::Release);
        return;
    };
    rt.spawn(async {
        // Let the rest of the wave close first: one trim, not one each.
        tokio::time::sleep(Duration::from_secs(2)).await;
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(crate::limits::release_free_memory).await;
        TRIM_SCHEDULED.store(false, Ordering::Release);
    });
}

// ------------------------------------------------------------- connection

/// An accepted TCP connection, as served under TLS. Holds its listener's
/// permit until dropped, and fails its reads and writes once evicted or
/// idle too long.
#[derive(Debug)]
pub struct Connection {
    tcp: TcpStream,
    info: TcpConnectInfo,
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    id: u64,
    idle_timeout: Duration,
    /// Armed once established: when it fires, the connection closes if idle.
    idle_check: Option<Pin<Box<Sleep>>>,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    fn new(
        tcp: TcpStream,
        registry: Arc<Registry>,
        permit: OwnedSemaphorePermit,
        idle_timeout: Duration,
    ) -> Self {
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: tcp.peer_addr().ok(),
        };
        let shared = Arc::new(Shared::new());
        let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
        registry.lock().insert(id, shared.clone());
        if let (Some(l), Some(r)) = (info.local_addr, info.remote_addr) {
            index().insert((l, r), shared.clone());
        }
        conn_opened();
        Connection {
            tcp,
            info,
            shared,
            registry,
            id,
            idle_timeout,
            idle_check: None,
            _permit: permit,
        }
    }

    /// The TLS handshake is done: from now on idleness counts.
    fn established(&mut self) {
        self.shared.touch();
        self.shared.established.store(true, Ordering::Release);
        self.idle_check = Some(Box::pin(tokio::time::sleep(self.idle_timeout)));
    }

    fn check_killed(&self, cx: &mut Context<'_>) -> io::Result<()> {
        self.shared.waker.register(cx.waker());
        if self.shared.killed.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to admit another connection",
            ));
        }
        Ok(())
    }

    /// Ready(Err) when the connection has been idle for `idle_timeout`;
    /// otherwise re-arms the timer for the earliest moment it could be.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(timer) = self.idle_check.as_mut() else {
            return Poll::Pending;
        };
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.shared.idle_since() {
                Some(since) if now.saturating_duration_since(since) >= self.idle_timeout => {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "idle connection closed",
                    ));
                }
                Some(since) => timer.as_mut().reset(since + self.idle_timeout),
                None => timer.as_mut().reset(now + self.idle_timeout),
            }
        }
        Poll::Pending
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
        if let (Some(l), Some(r)) = (self.info.local_addr, self.info.remote_addr) {
            let mut index = index();
            // Only ours: the address pair may already be a new connection's.
            if index
                .get(&(l, r))
                .is_some_and(|s| Arc::ptr_eq(s, &self.shared))
            {
                index.remove(&(l, r));
            }
        }
        conn_closed();
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_killed(cx)?;
        if let Poll::Ready(r) = Pin::new(&mut this.tcp).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        // The server always has a read pending on a connection it serves,
        // so the idle timer is polled here.
        this.poll_idle(cx).map(Err)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_killed(cx)?;
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_killed(cx)?;
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

// --------------------------------------------------------------- incoming

type Handshake = Option<TlsStream<Connection>>;
type SlotWait = Pin<Box<Timeout<Pin<Box<dyn Future<Output = PermitResult> + Send>>>>>;
type PermitResult = Result<OwnedSemaphorePermit, AcquireError>;

/// How long a newcomer waits for the slot of the connection it evicted
/// (that connection's task must run once to drop it: microseconds).
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// Accepts per poll before yielding to other tasks.
const ACCEPT_BATCH: usize = 64;
/// Pause after accept fails for lack of fds or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

struct Incoming {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Limits,
    slots: Arc<Semaphore>,
    registry: Arc<Registry>,
    handshakes: JoinSet<Handshake>,
    /// A newcomer waiting for the slot of the connection it evicted.
    waiting: Option<(TcpStream, SlotWait)>,
    backoff: Option<Pin<Box<Sleep>>>,
    refused: u64,
}

impl Incoming {
    fn new(listener: TcpListener, tls: Arc<rustls::ServerConfig>, limits: Limits) -> Self {
        Incoming {
            listener,
            acceptor: TlsAcceptor::from(tls),
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            registry: Arc::default(),
            handshakes: JoinSet::new(),
            waiting: None,
            backoff: None,
            refused: 0,
            limits,
        }
    }

    fn configure(&self, tcp: &TcpStream) {
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.limits.tcp_keepalive)
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
    }

    /// Starts the TLS handshake of an admitted connection.
    fn start(&mut self, tcp: TcpStream, permit: OwnedSemaphorePermit) {
        self.configure(&tcp);
        let conn = Connection::new(tcp, self.registry.clone(), permit, self.limits.idle_timeout);
        let accept = self.acceptor.accept(conn);
        let deadline = self.limits.handshake_timeout;
        self.handshakes.spawn(async move {
            match tokio::time::timeout(deadline, accept).await {
                Ok(Ok(mut tls)) => {
                    tls.get_mut().0.established();
                    Some(tls)
                }
                Ok(Err(e)) => {
                    debug!("TLS handshake failed: {e}");
                    None
                }
                Err(_) => {
                    debug!("TLS handshake timed out after {deadline:?}");
                    None
                }
            }
        });
    }

    /// A new TCP connection: a free slot, else an evicted one's, else none.
    fn admit(&mut self, tcp: TcpStream) {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return self.start(tcp, permit);
        }
        match self.registry.victim(self.limits.evict_idle_after) {
            Some(victim) => {
                victim.kill();
                let acquire: Pin<Box<dyn Future<Output = PermitResult> + Send>> =
                    Box::pin(self.slots.clone().acquire_owned());
                self.waiting = Some((tcp, Box::pin(tokio::time::timeout(EVICTION_WAIT, acquire))));
            }
            None => {
                drop(tcp);
                self.refused += 1;
                if self.refused.is_power_of_two() {
                    warn!(
                        refused = self.refused,
                        max = self.limits.max_connections,
                        "listener full of connections in use: refusing new ones"
                    );
                }
            }
        }
    }
}

impl Stream for Incoming {
    type Item = Result<TlsStream<Connection>, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut accepted = 0;
        loop {
            // Finished handshakes first: they are what the server waits for.
            while let Poll::Ready(Some(done)) = this.handshakes.poll_join_next(cx) {
                if let Ok(Some(tls)) = done {
                    return Poll::Ready(Some(Ok(tls)));
                }
            }
            if let Some((_, wait)) = &mut this.waiting {
                let r = match wait.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                let Some((tcp, _)) = this.waiting.take() else {
                    continue;
                };
                match r {
                    Ok(Ok(permit)) => this.start(tcp, permit),
                    // The slot was not freed in time: the newcomer goes.
                    _ => drop(tcp),
                }
                continue;
            }
            if let Some(b) = &mut this.backoff {
                if b.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
            }
            if accepted == ACCEPT_BATCH {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match this.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((tcp, _))) => {
                    accepted += 1;
                    this.admit(tcp);
                }
                Poll::Ready(Err(e)) => {
                    if is_resource_error(&e) {
                        // Out of fds or memory: something else holds them
                        // (we hold at most max_connections). Retrying at
                        // once would spin.
                        warn!("accept: {e}; pausing {ACCEPT_BACKOFF:?}");
                        this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    } else {
                        debug!("accept: {e}");
                    }
                }
            }
        }
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

// --------------------------------------------------------------- activity

/// Counts each call on its connection from the moment it arrives until its
/// reply body ends (a `logs -f` stream is in flight for as long as it
/// streams), so the listener knows which connections are idle.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = Activity<S>;

    fn layer(&self, inner: S) -> Activity<S> {
        Activity { inner }
    }
}

/// See [`ActivityLayer`].
#[derive(Debug, Clone)]
pub struct Activity<S> {
    inner: S,
}

/// A call in flight on its connection.
#[derive(Debug)]
struct InFlight(Arc<Shared>);

impl InFlight {
    fn begin(shared: Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        shared.touch();
        InFlight(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for Activity<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<Tracked<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| Some((i.get_ref().local_addr?, i.get_ref().remote_addr?)))
            .and_then(|key| index().get(&key).cloned())
            .map(InFlight::begin);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| Tracked {
                body,
                _in_flight: guard,
            }))
        })
    }
}

/// A request in flight on its connection until dropped, for servers that
/// are not tonic's (the metrics endpoint's HTTP/1.1), which
/// [`ActivityLayer`] does not see: without it, a scraper's keep-alive
/// connection would count as idle however often it is used.
#[derive(Debug)]
pub struct RequestGuard {
    _in_flight: InFlight,
}

/// Marks a request in flight on the connection from `peer` to `local` of
/// any listener; None when no such connection is open.
pub fn request_guard(local: SocketAddr, peer: SocketAddr) -> Option<RequestGuard> {
    let shared = index().get(&(local, peer)).cloned()?;
    Some(RequestGuard {
        _in_flight: InFlight::begin(shared),
    })
}

/// A reply body that keeps its call in flight until it ends or is dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _in_flight: Option<InFlight>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
#[path = "listener_tests.rs"]
mod tests;
