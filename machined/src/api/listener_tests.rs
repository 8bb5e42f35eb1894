//! Tests of the bounded listener: raw TCP and TLS peers against the
//! stream itself, and a tonic server and client over mutual TLS.

use std::time::Duration;

use futures::StreamExt;
use machine_api::pki::{CertificateAuthority, LeafSpec, Usage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream as ClientTls;

use super::*;
use crate::api::tls::ServerIdentity;

struct Pki {
    ca: CertificateAuthority,
    server: ServerIdentity,
}

fn pki() -> Pki {
    let ca = CertificateAuthority::generate("test CA").unwrap();
    let leaf = ca
        .issue(&LeafSpec::new("server", Usage::Server).san("localhost"))
        .unwrap();
    let server = ServerIdentity::new(leaf.cert_pem, leaf.key_pem, Some(ca.cert_pem().into()));
    Pki { ca, server }
}

/// A listener on a free loopback port, its stream driven by a task that
/// keeps every handshaken connection (as a server would) and forwards it.
struct Harness {
    addr: SocketAddr,
    slots: Arc<Semaphore>,
    registry: Arc<Registry>,
    established: mpsc::UnboundedReceiver<TlsStream<Connection>>,
    pki: Pki,
}

async fn harness(limits: Limits) -> Harness {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = Incoming::new(listener, pki.server.rustls_config().unwrap(), limits);
    let (slots, registry) = (incoming.slots.clone(), incoming.registry.clone());
    let (tx, established) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut incoming = Box::pin(incoming);
        while let Some(c) = incoming.next().await {
            if tx.send(c.unwrap()).is_err() {
                return;
            }
        }
    });
    Harness {
        addr,
        slots,
        registry,
        established,
        pki,
    }
}

impl Harness {
    fn held(&self) -> usize {
        self.registry.lock().len()
    }

    async fn tls_client(&self) -> ClientTls<TcpStream> {
        let client = self
            .pki
            .ca
            .issue(&LeafSpec::new("client", Usage::Client))
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pki.ca.cert_pem().as_bytes()).unwrap())
            .unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap()
    }
}

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// True when the server closes `s` within `within`.
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut b = [0u8; 64];
    loop {
        match tokio::time::timeout(within, s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // TLS 1.3 session tickets and the like: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads from a served connection until it ends, as an HTTP/2 server
/// always does (an eviction or idle close shows up as a failed read).
fn serve(mut served: TlsStream<Connection>) {
    tokio::spawn(async move {
        let mut b = [0u8; 256];
        while matches!(served.read(&mut b).await, Ok(n) if n > 0) {}
    });
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

fn limits(max: usize) -> Limits {
    Limits {
        max_connections: max,
        ..Limits::default()
    }
}

#[tokio::test]
async fn a_silent_peer_is_closed_at_the_handshake_deadline() {
    let h = harness(Limits {
        handshake_timeout: Duration::from_millis(300),
        ..limits(8)
    })
    .await;
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    // And one that stalls mid-handshake: a TLS record header, no body.
    let mut stalled = TcpStream::connect(h.addr).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    eventually("both are held", || h.held() == 2).await;
    assert!(!closed_within(&mut silent, Duration::from_millis(100)).await);
    assert!(closed_within(&mut silent, Duration::from_secs(2)).await);
    assert!(closed_within(&mut stalled, Duration::from_secs(2)).await);
    eventually("the slots are back", || h.slots.available_permits() == 8).await;
    assert_eq!(h.held(), 0);
}

#[tokio::test]
async fn the_cap_holds_and_a_flood_of_handshakes_evicts_its_oldest() {
    let mut h = harness(limits(4)).await;
    let mut flood = Vec::new();
    for _ in 0..4 {
        flood.push(TcpStream::connect(h.addr).await.unwrap());
    }
    eventually("the listener is full", || h.slots.available_permits() == 0).await;
    // Ten more: each one evicts the oldest still handshaking.
    for _ in 0..10 {
        flood.push(TcpStream::connect(h.addr).await.unwrap());
        assert!(h.held() <= 4, "{} held", h.held());
    }
    for old in &mut flood[..10] {
        assert!(closed_within(old, Duration::from_secs(2)).await);
    }
    assert!(h.held() <= 4);
    // A real client still gets in, evicting one more of the flood.
    let mut client = h.tls_client().await;
    let mut served = tokio::time::timeout(Duration::from_secs(2), h.established.recv())
        .await
        .unwrap()
        .unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    served.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    assert!(h.held() <= 4);
}

#[tokio::test]
async fn a_listener_full_of_recent_connections_refuses_the_newcomer() {
    let mut h = harness(Limits {
        evict_idle_after: Duration::from_secs(60),
        ..limits(2)
    })
    .await;
    let mut a = h.tls_client().await;
    let _b = h.tls_client().await;
    let _served = (
        h.established.recv().await.unwrap(),
        h.established.recv().await.unwrap(),
    );
    let mut late = TcpStream::connect(h.addr).await.unwrap();
    assert!(closed_within(&mut late, Duration::from_secs(2)).await);
    // The established ones were left alone.
    assert!(!closed_within(&mut a, Duration::from_millis(200)).await);
    assert_eq!(h.held(), 2);
}

#[tokio::test]
async fn when_full_the_longest_idle_established_connection_makes_room() {
    let mut h = harness(Limits {
        evict_idle_after: Duration::ZERO,
        ..limits(2)
    })
    .await;
    let mut first = h.tls_client().await;
    serve(h.established.recv().await.unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut second = h.tls_client().await;
    serve(h.established.recv().await.unwrap());
    let _third = h.tls_client().await;
    let _s3 = tokio::time::timeout(Duration::from_secs(2), h.established.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(closed_within(&mut first, Duration::from_secs(2)).await);
    assert!(!closed_within(&mut second, Duration::from_millis(200)).await);
}

#[tokio::test]
async fn an_idle_established_connection_is_closed() {
    let mut h = harness(Limits {
        idle_timeout: Duration::from_millis(300),
        ..limits(4)
    })
    .await;
    let mut client = h.tls_client().await;
    let mut served = h.established.recv().await.unwrap();
    // Keep reading on the server side, as HTTP/2 would.
    let reader = tokio::spawn(async move {
        let mut b = [0u8; 16];
        served.read(&mut b).await
    });
    assert!(!closed_within(&mut client, Duration::from_millis(150)).await);
    let err = reader.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert!(closed_within(&mut client, Duration::from_secs(2)).await);
    eventually("the slot is back", || h.slots.available_permits() == 4).await;
}

#[tokio::test]
async fn slots_come_back_when_connections_end_however_they_end() {
    let mut h = harness(limits(3)).await;
    // Handshake failure: garbage instead of a ClientHello.
    let mut garbage = TcpStream::connect(h.addr).await.unwrap();
    garbage.write_all(&[0xff; 64]).await.unwrap();
    assert!(closed_within(&mut garbage, Duration::from_secs(2)).await);
    // Client goes away before its handshake.
    drop(TcpStream::connect(h.addr).await.unwrap());
    // An established connection closed by the server.
    let _client = h.tls_client().await;
    drop(h.established.recv().await.unwrap());
    eventually("all slots are back", || h.slots.available_permits() == 3).await;
    assert_eq!(h.held(), 0);
}

#[tokio::test]
async fn dropping_the_stream_closes_the_listening_socket_at_once() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stream = incoming(listener, pki.server.rustls_config().unwrap(), limits(4));
    drop(stream);
    // The port is free again: a restarted server can bind it.
    TcpListener::bind(addr).await.unwrap();
}

/// The whole path: tonic over the listener, a mutual-TLS client, the
/// client's certificate visible to layers as authz.rs reads it, and the
/// call counted while in flight.
#[tokio::test]
async fn tonic_serves_mutual_tls_through_the_listener() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    #[derive(Clone)]
    struct SeesCert<S>(S, mpsc::UnboundedSender<(bool, usize)>);
    impl<S, B> tower::Service<http::Request<B>> for SeesCert<S>
    where
        S: tower::Service<http::Request<B>>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
            self.0.poll_ready(cx)
        }
        fn call(&mut self, req: http::Request<B>) -> S::Future {
            let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
            let certs = info
                .and_then(|i| i.peer_certs())
                .is_some_and(|c| !c.is_empty());
            let in_flight = info
                .and_then(|i| Some((i.get_ref().local_addr?, i.get_ref().remote_addr?)))
                .and_then(|k| index().get(&k).map(|s| s.in_flight.load(Ordering::Acquire)))
                .unwrap_or(0);
            let _ = self.1.send((certs, in_flight));
            self.0.call(req)
        }
    }

    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lim = limits(8);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        server(&lim)
            .layer(tower::layer::layer_fn(move |s| {
                SeesCert(s, seen_tx.clone())
            }))
            .add_service(health)
            .serve_with_incoming_shutdown(
                incoming(listener, pki.server.rustls_config().unwrap(), lim),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );

    let client = pki
        .ca
        .issue(&LeafSpec::new("client", Usage::Client))
        .unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca.cert_pem()))
        .identity(Identity::from_pem(&client.cert_pem, &client.key_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = c
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(reply.into_inner().status, 1);
    assert_eq!(seen.recv().await.unwrap(), (true, 1));

    // Without a client certificate the handshake fails.
    let no_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca.cert_pem()))
        .domain_name("localhost");
    let refused = async {
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(no_cert)
            .unwrap()
            .connect()
            .await?;
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    assert!(refused.await.is_err());

    drop(c);
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
