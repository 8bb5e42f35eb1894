//! The authorization matrix: every RPC of the proto, called against one
//! configured node by every kind of caller, checked against a table kept
//! here (not machined's `RULES`: a change to the rules that this table does
//! not make too fails the test).
//!
//! Callers: the three roles (`osctl gen osconfig --role`), a certificate of
//! the right CA that names no role, no client certificate, a certificate
//! from another cluster's OS CA, an expired certificate from the right CA,
//! and a certificate from the same cluster's Kubernetes CA. A role either
//! gets through authorization (and then meets the harmless argument it was
//! sent: an unknown service, an unknown member, a dry run, ...) or gets
//! PermissionDenied naming its role; the others are refused at the TLS
//! handshake (or with Unauthenticated).
//!
//! Reboot, Shutdown and Reset take nothing that fails after authorization,
//! so the roles they refuse are checked with the rest, and the roles they
//! allow call them at the very end, one at a time, each followed by the
//! node coming back (Reset, the last, leaves it in maintenance mode).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use machine_api::osconfig::OsConfig;
use machine_api::pki::bundle::{os_client_cert, OsRole, SecretsBundle};
use machine_api::pki::{CertKeyPem, LeafSpec, Usage};
use machine_api::proto::etcd_service_client::EtcdServiceClient;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::service_service_client::ServiceServiceClient;
use machine_api::proto::trust_service_client::TrustServiceClient;
use machine_api::proto::{
    ApplyConfigurationRequest, ApplyMode, DmesgRequest, Empty, EtcdAddMemberRequest,
    EtcdAlarmsRequest, EtcdRecoverRequest, EtcdRemoveMemberRequest, EventsRequest, LogsRequest,
    ResetRequest, ServiceRequest, SignKubernetesCertificateRequest, SignServerCertificateRequest,
    UpgradeRequest,
};
use node_tests::{alive, bootstrapped_node, osctl, require};
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

// ------------------------------------------------------------------ table

/// The least caller an RPC admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Least {
    Reader,
    Operator,
    Admin,
    /// Not an RPC of the API port at all: refused for everyone.
    NotServed,
}

/// What a call that passed authorization meets: the harmless argument
/// decides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Ok,
    Code(Code),
    /// Destructive, with no argument that fails after authorization:
    /// anything but PermissionDenied or Unauthenticated; called last.
    Acts(Recovery),
}

/// How the node comes back after an allowed destructive call (host mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recovery {
    /// machined re-executes itself, with its services.
    Reexec,
    /// machined exits; the harness starts it again.
    Restart,
    /// The node is wiped back to maintenance mode: only the last call.
    Maintenance,
}

struct Row {
    path: &'static str,
    least: Least,
    then: Then,
}

const fn row(path: &'static str, least: Least, then: Then) -> Row {
    Row { path, least, then }
}

use Least::{Admin, NotServed, Operator, Reader};

/// Every RPC of `machine.proto`, who may call it, and what the call sent
/// here meets once authorized.
const TABLE: &[Row] = &[
    row("/machine.v1alpha1.MachineService/Version", Reader, Then::Ok),
    // A dry run of the config the node already runs.
    row(
        "/machine.v1alpha1.MachineService/ApplyConfiguration",
        Admin,
        Then::Ok,
    ),
    // No try is pending.
    row(
        "/machine.v1alpha1.MachineService/ConfirmConfiguration",
        Admin,
        Then::Code(Code::FailedPrecondition),
    ),
    row(
        "/machine.v1alpha1.MachineService/GetConfiguration",
        Reader,
        Then::Ok,
    ),
    row("/machine.v1alpha1.MachineService/Health", Reader, Then::Ok),
    // Cluster-admin credentials, minted; nothing on the node changes.
    row(
        "/machine.v1alpha1.MachineService/Kubeconfig",
        Admin,
        Then::Ok,
    ),
    row(
        "/machine.v1alpha1.MachineService/BootTimeline",
        Reader,
        Then::Ok,
    ),
    row(
        "/machine.v1alpha1.MachineService/Reboot",
        Operator,
        Then::Acts(Recovery::Reexec),
    ),
    row(
        "/machine.v1alpha1.MachineService/Shutdown",
        Admin,
        Then::Acts(Recovery::Restart),
    ),
    row(
        "/machine.v1alpha1.MachineService/Reset",
        Admin,
        Then::Acts(Recovery::Maintenance),
    ),
    // Not an upgrade bundle: refused by its first check.
    row(
        "/machine.v1alpha1.MachineService/Upgrade",
        Admin,
        Then::Code(Code::InvalidArgument),
    ),
    // Host mode: no other slot.
    row(
        "/machine.v1alpha1.MachineService/Rollback",
        Admin,
        Then::Code(Code::FailedPrecondition),
    ),
    // The kernel log's last record.
    row("/machine.v1alpha1.MachineService/Dmesg", Reader, Then::Ok),
    row("/machine.v1alpha1.MachineService/Events", Reader, Then::Ok),
    row("/machine.v1alpha1.ServiceService/List", Reader, Then::Ok),
    // Start, Stop, Restart: a service the node does not have.
    row(
        "/machine.v1alpha1.ServiceService/Start",
        Operator,
        Then::Code(Code::NotFound),
    ),
    row(
        "/machine.v1alpha1.ServiceService/Stop",
        Operator,
        Then::Code(Code::NotFound),
    ),
    row(
        "/machine.v1alpha1.ServiceService/Restart",
        Operator,
        Then::Code(Code::NotFound),
    ),
    // The last line of etcd's log.
    row("/machine.v1alpha1.ServiceService/Logs", Reader, Then::Ok),
    // Bootstrapped already.
    row(
        "/machine.v1alpha1.EtcdService/Bootstrap",
        Admin,
        Then::Code(Code::FailedPrecondition),
    ),
    row("/machine.v1alpha1.EtcdService/Members", Reader, Then::Ok),
    row("/machine.v1alpha1.EtcdService/Status", Reader, Then::Ok),
    // No peer URL.
    row(
        "/machine.v1alpha1.EtcdService/AddMember",
        Admin,
        Then::Code(Code::InvalidArgument),
    ),
    // A member that does not exist.
    row(
        "/machine.v1alpha1.EtcdService/RemoveMember",
        Admin,
        Then::Code(Code::NotFound),
    ),
    // The whole keyspace.
    row("/machine.v1alpha1.EtcdService/Snapshot", Admin, Then::Ok),
    // Bootstrapped already: refused before the upload is read.
    row(
        "/machine.v1alpha1.EtcdService/Recover",
        Admin,
        Then::Code(Code::FailedPrecondition),
    ),
    row(
        "/machine.v1alpha1.EtcdService/Defragment",
        Operator,
        Then::Ok,
    ),
    // Listing only.
    row("/machine.v1alpha1.EtcdService/Alarms", Operator, Then::Ok),
    // The only member leads, and there is no one to hand it to.
    row(
        "/machine.v1alpha1.EtcdService/ForfeitLeadership",
        Operator,
        Then::Code(Code::FailedPrecondition),
    ),
    // Served on the trust port (50001) only; the API port's table does not
    // have it, so it is refused there whoever asks.
    row(
        "/machine.v1alpha1.TrustService/SignServerCertificate",
        NotServed,
        Then::Code(Code::PermissionDenied),
    ),
    row(
        "/machine.v1alpha1.TrustService/SignKubernetesCertificate",
        NotServed,
        Then::Code(Code::PermissionDenied),
    ),
];

/// Every method of every service in the proto's descriptor.
fn proto_methods() -> Vec<String> {
    let fds = prost_types::FileDescriptorSet::decode(machine_api::proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set decodes");
    let mut paths = Vec::new();
    for file in fds.file {
        let pkg = file.package.unwrap_or_default();
        for svc in file.service {
            let name = svc.name.unwrap_or_default();
            for m in svc.method {
                paths.push(format!("/{pkg}.{name}/{}", m.name.unwrap_or_default()));
            }
        }
    }
    paths
}

/// The table has exactly the proto's methods, each once: a new RPC fails
/// here until someone decides who may call it.
#[test]
fn table_covers_every_rpc_of_the_proto() {
    let methods = proto_methods();
    assert!(methods.len() >= 20, "{methods:?}");
    let mut missing = Vec::new();
    for m in &methods {
        if !TABLE.iter().any(|r| r.path == m) {
            missing.push(m.as_str());
        }
    }
    assert!(
        missing.is_empty(),
        "RPCs of machine.proto missing from the authorization matrix: {missing:?}"
    );
    for (i, r) in TABLE.iter().enumerate() {
        assert!(
            methods.iter().any(|m| m == r.path),
            "{} is in the matrix but not in machine.proto",
            r.path
        );
        assert!(
            !TABLE[..i].iter().any(|o| o.path == r.path),
            "{} is in the matrix twice",
            r.path
        );
    }
    // Only the last destructive call may leave the node in maintenance.
    let wipes: Vec<&str> = TABLE
        .iter()
        .filter(|r| r.then == Then::Acts(Recovery::Maintenance))
        .map(|r| r.path)
        .collect();
    assert_eq!(wipes.len(), 1, "{wipes:?}");
}

// ------------------------------------------------------------- identities

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Role(OsRole),
    /// Right CA, no role in the Organization.
    NoRole,
    NoCert,
    ForeignCa,
    Expired,
    /// The same cluster's Kubernetes CA.
    WrongCa,
}

impl Who {
    fn label(self) -> String {
        match self {
            Who::Role(r) => r.organization().to_owned(),
            Who::NoRole => "no role".into(),
            Who::NoCert => "no client cert".into(),
            Who::ForeignCa => "foreign CA".into(),
            Who::Expired => "expired".into(),
            Who::WrongCa => "kubernetes CA".into(),
        }
    }

    fn rank(r: OsRole) -> u8 {
        match r {
            OsRole::Reader => 1,
            OsRole::Operator => 2,
            OsRole::Admin => 3,
        }
    }

    /// Whether a role meets a row's least caller.
    fn allowed(role: OsRole, least: Least) -> bool {
        let need = match least {
            Reader => 1,
            Operator => 2,
            Admin => 3,
            NotServed => return false,
        };
        Self::rank(role) >= need
    }
}

/// What a cell should give.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Want {
    /// Authorized; then the row's outcome.
    Through(Then),
    /// PermissionDenied with this in the message.
    Denied(String),
    /// Refused at the TLS handshake, or Unauthenticated.
    Refused,
}

fn want(who: Who, r: &Row) -> Want {
    let method = r.path.rsplit('/').next().unwrap();
    match who {
        // The table is consulted before the certificate's role.
        Who::Role(_) | Who::NoRole if r.least == NotServed => {
            Want::Denied("is not in the authorization table".into())
        }
        Who::Role(role) if Who::allowed(role, r.least) => Want::Through(r.then),
        Who::Role(role) => Want::Denied(format!(
            "role {} may not call {method}",
            role.organization()
        )),
        Who::NoRole => Want::Denied("names no role".into()),
        Who::NoCert | Who::ForeignCa | Who::Expired | Who::WrongCa => Want::Refused,
    }
}

/// What a cell gave.
#[derive(Clone, Debug)]
enum Got {
    Ok,
    Status(Code, String),
    /// The connection (TCP, TLS, HTTP/2) failed before any call (the
    /// text is for failure messages).
    NoConnection(#[allow(dead_code)] String),
}

impl Got {
    fn short(&self) -> String {
        match self {
            Got::Ok => "ok".into(),
            Got::Status(c, m) if m.contains("transport error") => {
                format!("{c:?} (connection)")
            }
            Got::Status(c, _) => format!("{c:?}"),
            Got::NoConnection(_) => "no connection".into(),
        }
    }
}

fn matches(want: &Want, got: &Got) -> bool {
    match (want, got) {
        (Want::Through(Then::Ok), Got::Ok) => true,
        (Want::Through(Then::Code(c)), Got::Status(g, _)) => c == g,
        (Want::Through(Then::Acts(_)), Got::Ok) => true,
        (Want::Through(Then::Acts(_)), Got::Status(c, _)) => {
            !matches!(c, Code::PermissionDenied | Code::Unauthenticated)
        }
        (Want::Denied(needle), Got::Status(Code::PermissionDenied, m)) => m.contains(needle),
        (Want::Refused, Got::NoConnection(_)) => true,
        (Want::Refused, Got::Status(Code::Unauthenticated, _)) => true,
        // A TLS 1.3 client finishes its side of the handshake before the
        // server checks its certificate: the refusal surfaces on the first
        // call, as the server's alert or, when the request was already on
        // its way, as the connection it closed. No gRPC status came from
        // machined; `handshake_verdict` shows the alert itself.
        (Want::Refused, Got::Status(Code::Unavailable | Code::Unknown | Code::Cancelled, m)) => {
            m.contains("transport error")
        }
        _ => false,
    }
}

/// The innermost causes of an error, joined.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// The alerts the server may refuse a caller's TLS handshake with (None:
/// the handshake succeeds and authorization decides).
fn want_alert(who: Who) -> Option<&'static [&'static str]> {
    match who {
        Who::Role(_) | Who::NoRole => None,
        Who::NoCert => Some(&["CertificateRequired"]),
        Who::Expired => Some(&["CertificateExpired"]),
        // Another cluster's OS CA has the same name as this one (its
        // signature fails: DecryptError); the Kubernetes CA does not
        // (UnknownCA).
        Who::ForeignCa | Who::WrongCa => Some(&["UnknownCA", "DecryptError", "BadCertificate"]),
    }
}

struct Caller {
    who: Who,
    tls: ClientTlsConfig,
    cert: Option<CertKeyPem>,
}

fn caller(who: Who, server_ca: &str, ip: &str, cert: Option<&CertKeyPem>) -> Caller {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca))
        .domain_name(ip);
    if let Some(c) = cert {
        tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
    }
    Caller {
        who,
        tls,
        cert: cert.cloned(),
    }
}

/// The certificate and key of an osconfig file's current context.
fn osconfig_identity(path: &Path) -> (String, CertKeyPem) {
    let cfg = OsConfig::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ctx = &cfg.contexts[&cfg.context];
    (
        ctx.ca.clone(),
        CertKeyPem {
            cert_pem: ctx.crt.clone(),
            key_pem: ctx.key.clone(),
        },
    )
}

/// A TLS 1.3 handshake by hand with `cert`, then a read: the server either
/// starts HTTP/2 (it accepted the certificate: None) or sends the fatal
/// alert it refused it with. Nothing is written after the handshake, so
/// the alert is not lost to a reset the way it can be under a client that
/// sends its request at once.
fn handshake_verdict(ip: &str, server_ca: &str, cert: Option<&CertKeyPem>) -> Option<String> {
    use std::io::Read;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(c) => {
            let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(ip.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut sock = std::net::TcpStream::connect((ip, 50000)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            return Some(alert_of(&e));
        }
    }
    let mut buf = [0u8; 64];
    match rustls::Stream::new(&mut conn, &mut sock).read(&mut buf) {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("closed without an alert".into()),
        Err(e) => Some(alert_of(&e)),
    }
}

fn alert_of(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => format!("{a:?}"),
        _ => format!("no alert: {e}"),
    }
}

// ------------------------------------------------------------------ calls

/// Harmless arguments.
struct Args {
    /// The config the node runs (for a dry-run apply).
    config: Vec<u8>,
}

const UNKNOWN_SERVICE: &str = "no-such-service";

async fn channel(ip: &str, tls: &ClientTlsConfig) -> Result<Channel, Got> {
    Endpoint::from_shared(format!("https://{ip}:50000"))
        .unwrap()
        .tls_config(tls.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| Got::NoConnection(chain(&e)))
}

/// Calls the RPC at `path` with its harmless argument.
async fn call(ch: Channel, path: &str, a: &Args) -> Result<(), tonic::Status> {
    let mut m = MachineServiceClient::new(ch.clone());
    let mut s = ServiceServiceClient::new(ch.clone());
    let mut e = EtcdServiceClient::new(ch.clone());
    let svc = |name: &str| ServiceRequest { name: name.into() };
    let method = path.rsplit_once('/').unwrap().1;
    let service = path
        .trim_start_matches("/machine.v1alpha1.")
        .split('/')
        .next()
        .unwrap();
    match (service, method) {
        ("MachineService", "Version") => m.version(Empty {}).await.map(drop),
        ("MachineService", "ApplyConfiguration") => m
            .apply_configuration(ApplyConfigurationRequest {
                data: a.config.clone(),
                mode: ApplyMode::NoReboot as i32,
                dry_run: true,
                maintenance_token: String::new(),
                try_timeout_seconds: 0,
            })
            .await
            .map(drop),
        ("MachineService", "ConfirmConfiguration") => {
            m.confirm_configuration(Empty {}).await.map(drop)
        }
        ("MachineService", "GetConfiguration") => m.get_configuration(Empty {}).await.map(drop),
        ("MachineService", "Health") => m.health(Empty {}).await.map(drop),
        ("MachineService", "BootTimeline") => m.boot_timeline(Empty {}).await.map(drop),
        ("MachineService", "Kubeconfig") => m.kubeconfig(Empty {}).await.map(drop),
        ("MachineService", "Reboot") => m.reboot(Empty {}).await.map(drop),
        ("MachineService", "Shutdown") => m.shutdown(Empty {}).await.map(drop),
        // The node is the only etcd member: without force the reset is
        // refused after authorization, and the test wants it to happen.
        ("MachineService", "Reset") => m
            .reset(ResetRequest {
                force: true,
                ..Default::default()
            })
            .await
            .map(drop),
        ("MachineService", "Rollback") => m.rollback(Empty {}).await.map(drop),
        ("MachineService", "Upgrade") => m
            .upgrade(tokio_stream::iter([UpgradeRequest {
                chunk: b"not a bundle".to_vec(),
                stage: true,
            }]))
            .await
            .map(drop),
        ("MachineService", "Dmesg") => {
            let mut stream = m
                .dmesg(DmesgRequest {
                    follow: false,
                    tail: 1,
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        ("MachineService", "Events") => {
            let mut stream = m
                .events(EventsRequest {
                    follow: false,
                    tail: 5,
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        ("ServiceService", "List") => s.list(Empty {}).await.map(drop),
        ("ServiceService", "Start") => s.start(svc(UNKNOWN_SERVICE)).await.map(drop),
        ("ServiceService", "Stop") => s.stop(svc(UNKNOWN_SERVICE)).await.map(drop),
        ("ServiceService", "Restart") => s.restart(svc(UNKNOWN_SERVICE)).await.map(drop),
        ("ServiceService", "Logs") => {
            let mut stream = s
                .logs(LogsRequest {
                    service: "etcd".into(),
                    tail: 1,
                    follow: false,
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        ("EtcdService", "Bootstrap") => e.bootstrap(Empty {}).await.map(drop),
        ("EtcdService", "Members") => e.members(Empty {}).await.map(drop),
        ("EtcdService", "Status") => e.status(Empty {}).await.map(drop),
        ("EtcdService", "AddMember") => e
            .add_member(EtcdAddMemberRequest { peer_urls: vec![] })
            .await
            .map(drop),
        ("EtcdService", "RemoveMember") => e
            .remove_member(EtcdRemoveMemberRequest {
                member: "no-such-member".into(),
            })
            .await
            .map(drop),
        ("EtcdService", "Snapshot") => {
            let mut stream = e.snapshot(Empty {}).await?.into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        // A junk upload: refused after authorization, before anything is
        // stored.
        ("EtcdService", "Recover") => e
            .recover(tokio_stream::iter([EtcdRecoverRequest {
                data: b"not a snapshot".to_vec(),
                size: 14,
                sha256: "0".repeat(64),
            }]))
            .await
            .map(drop),
        ("EtcdService", "Defragment") => e.defragment(Empty {}).await.map(drop),
        ("EtcdService", "Alarms") => e
            .alarms(EtcdAlarmsRequest { disarm: false })
            .await
            .map(drop),
        ("EtcdService", "ForfeitLeadership") => e.forfeit_leadership(Empty {}).await.map(drop),
        ("TrustService", "SignServerCertificate") => TrustServiceClient::new(ch)
            .sign_server_certificate(SignServerCertificateRequest {
                machine_token: "not-the-token".into(),
                csr_pem: String::new(),
            })
            .await
            .map(drop),
        ("TrustService", "SignKubernetesCertificate") => TrustServiceClient::new(ch)
            .sign_kubernetes_certificate(SignKubernetesCertificateRequest {
                machine_token: "not-the-token".into(),
                csr_pem: String::new(),
                kind: 1,
            })
            .await
            .map(drop),
        _ => panic!("the matrix has no call for {path}: add one"),
    }
}

/// One cell: a fresh connection, one call.
async fn cell(ip: &str, c: &Caller, path: &str, a: &Args) -> Got {
    let ch = match channel(ip, &c.tls).await {
        Ok(ch) => ch,
        Err(g) => return g,
    };
    match call(ch, path, a).await {
        Ok(()) => Got::Ok,
        Err(s) => {
            let detail = std::error::Error::source(&s)
                .map(|src| format!(" ({})", chain(src)))
                .unwrap_or_default();
            Got::Status(s.code(), format!("{}{detail}", s.message()))
        }
    }
}

// ------------------------------------------------------------- node state

/// Process uptime (host mode) from Version, or why there is none.
async fn uptime_ms(ip: &str, admin: &Caller) -> Result<u64, String> {
    let ch = channel(ip, &admin.tls)
        .await
        .map_err(|g| format!("{g:?}"))?;
    MachineServiceClient::new(ch)
        .version(Empty {})
        .await
        .map(|r| r.into_inner().uptime_ms)
        .map_err(|s| format!("{s:?}"))
}

/// Waits until every service reports healthy to the admin.
async fn wait_healthy(ip: &str, admin: &Caller, limit: Duration) {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match channel(ip, &admin.tls).await {
            Ok(ch) => match MachineServiceClient::new(ch).health(Empty {}).await {
                Ok(h) if h.get_ref().healthy => return,
                Ok(h) => last = format!("{:?}", h.into_inner()),
                Err(s) => last = format!("{s:?}"),
            },
            Err(g) => last = format!("{g:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("the node did not become healthy in {limit:?}: {last}");
}

// ------------------------------------------------------------------- test

#[test]
fn authorization_matrix() {
    require!("etcd", "containerd", "runc", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.21.1";
    let (files, mut node) = bootstrapped_node(tmp.path(), ip);
    let secrets_path = files.path("secrets.yaml");
    let bundle: SecretsBundle =
        serde_norway::from_str(&std::fs::read_to_string(&secrets_path).unwrap()).unwrap();
    let config = std::fs::read(files.path("n.yaml")).unwrap();

    // Identities. The roles as an operator makes them.
    let role_cert = |role: &str| {
        let out = tmp.path().join(format!("{role}.osconfig"));
        osctl(&[
            "gen",
            "osconfig",
            "--with-secrets",
            secrets_path.to_str().unwrap(),
            "--role",
            role,
            "-e",
            ip,
            "-o",
            out.to_str().unwrap(),
        ])
        .expect_ok();
        osconfig_identity(&out)
    };
    let (server_ca, admin_cert) = role_cert("admin");
    let (_, operator_cert) = role_cert("operator");
    let (_, reader_cert) = role_cert("reader");
    assert_eq!(server_ca, bundle.os_ca.crt);
    let os_ca = bundle.os_ca.authority("osCA").unwrap();
    let no_role = os_ca
        .issue(&LeafSpec::new("nobody", Usage::Client))
        .unwrap();
    let foreign = os_client_cert(
        &SecretsBundle::generate().unwrap(),
        "mallory",
        OsRole::Admin,
    )
    .unwrap();
    // Ended 30 minutes ago (it started an hour ago: pki backdates).
    let expired = os_ca
        .issue_for(
            &LeafSpec::new("admin", Usage::Client).org(OsRole::Admin.organization()),
            time::Duration::minutes(-30),
        )
        .unwrap();
    let wrong_ca = bundle
        .kubernetes_ca
        .authority("kubernetesCA")
        .unwrap()
        .issue(&LeafSpec::new("admin", Usage::Client).org(OsRole::Admin.organization()))
        .unwrap();
    let callers = [
        caller(Who::Role(OsRole::Admin), &server_ca, ip, Some(&admin_cert)),
        caller(
            Who::Role(OsRole::Operator),
            &server_ca,
            ip,
            Some(&operator_cert),
        ),
        caller(
            Who::Role(OsRole::Reader),
            &server_ca,
            ip,
            Some(&reader_cert),
        ),
        caller(Who::NoRole, &server_ca, ip, Some(&no_role)),
        caller(Who::NoCert, &server_ca, ip, None),
        caller(Who::ForeignCa, &server_ca, ip, Some(&foreign)),
        caller(Who::Expired, &server_ca, ip, Some(&expired)),
        caller(Who::WrongCa, &server_ca, ip, Some(&wrong_ca)),
    ];
    let admin = &callers[0];
    let args = Args { config };

    // 0. The TLS handshake alone: who gets past it, and the alert the
    //    others are refused with.
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for c in &callers {
        let verdict = handshake_verdict(ip, &server_ca, c.cert.as_ref());
        let ok = match (want_alert(c.who), &verdict) {
            (None, None) => true,
            (Some(alerts), Some(got)) => alerts.contains(&got.as_str()),
            _ => false,
        };
        report.push(format!(
            "{:<16} {:<55} {:<22} {}",
            c.who.label(),
            "TLS handshake",
            verdict.as_deref().unwrap_or("accepted"),
            if ok { "" } else { "MISMATCH" }
        ));
        if !ok {
            failures.push(format!(
                "{}: TLS handshake: wanted {:?}, got {verdict:?}",
                c.who.label(),
                want_alert(c.who)
            ));
        }
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut check = |who: Who, r: &Row, got: Got| {
            let w = want(who, r);
            let ok = matches(&w, &got);
            report.push(format!(
                "{:<16} {:<55} {:<22} {}",
                who.label(),
                r.path,
                got.short(),
                if ok { "" } else { "MISMATCH" }
            ));
            if !ok {
                failures.push(format!(
                    "{} calling {}: wanted {w:?}, got {got:?}",
                    who.label(),
                    r.path
                ));
            }
        };

        // 1. Everything that changes nothing, or is refused before it
        //    could: every caller, every RPC, destructive ones only where
        //    they are to be refused.
        for c in &callers {
            for r in TABLE {
                if matches!(r.then, Then::Acts(_)) && matches!(want(c.who, r), Want::Through(_)) {
                    continue;
                }
                let got = cell(ip, c, r.path, &args).await;
                check(c.who, r, got);
            }
            // Whatever this caller was refused, the node still serves.
            uptime_ms(ip, admin).await.unwrap_or_else(|e| {
                panic!("the node stopped serving after {}: {e}", c.who.label())
            });
        }
        wait_healthy(ip, admin, Duration::from_secs(60)).await;

        // 2. The allowed destructive calls, last, one at a time; the node
        //    comes back after each (Reset, the very last, leaves it in
        //    maintenance mode).
        let mut acts: Vec<(&Caller, &Row, Recovery)> = Vec::new();
        for r in TABLE {
            let Then::Acts(rec) = r.then else { continue };
            for c in &callers {
                if matches!(want(c.who, r), Want::Through(_)) {
                    acts.push((c, r, rec));
                }
            }
        }
        acts.sort_by_key(|(_, _, rec)| *rec == Recovery::Maintenance);
        for (c, r, rec) in acts {
            let before = uptime_ms(ip, admin).await.unwrap();
            let pid = node.pid();
            let got = cell(ip, c, r.path, &args).await;
            check(c.who, r, got);
            match rec {
                Recovery::Reexec => {
                    // The same process, executed afresh: its uptime starts over.
                    let start = Instant::now();
                    loop {
                        match uptime_ms(ip, admin).await {
                            Ok(u) if u < before => break,
                            _ if start.elapsed() > Duration::from_secs(60) => {
                                panic!("machined did not come back from {}", r.path)
                            }
                            _ => tokio::time::sleep(Duration::from_millis(300)).await,
                        }
                    }
                    assert_eq!(node.pid(), pid, "a host-mode reboot re-executes machined");
                    wait_healthy(ip, admin, Duration::from_secs(90)).await;
                }
                Recovery::Restart => {
                    let start = Instant::now();
                    while alive(pid as i32) {
                        assert!(
                            start.elapsed() < Duration::from_secs(60),
                            "machined did not exit after {}",
                            r.path
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    node.restart();
                    node.wait_configured();
                    wait_healthy(ip, admin, Duration::from_secs(90)).await;
                }
                Recovery::Maintenance => {
                    node_tests::wait_until(
                        Duration::from_secs(60),
                        "maintenance mode after reset",
                        || {
                            let v = osctl(&["version", "--insecure", "-n", ip]);
                            v.ok && v.stdout.contains("maintenance")
                        },
                    );
                }
            }
        }
    });
    let cells = callers.len() * TABLE.len();
    println!(
        "authorization matrix: {} callers x {} RPCs = {cells} calls, and {} handshakes",
        callers.len(),
        TABLE.len(),
        callers.len()
    );
    for line in &report {
        println!("{line}");
    }
    assert_eq!(
        report.len(),
        cells + callers.len(),
        "every cell was called once"
    );
    assert!(
        failures.is_empty(),
        "{} of {cells} cells differ from the table:\n{}",
        failures.len(),
        failures.join("\n")
    );
    drop(node);
}
