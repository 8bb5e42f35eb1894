//! The trust endpoint: how a worker, whose config carries the OS CA
//! certificate but not its key, gets an OS API server certificate.
//!
//! Nodes holding the OS CA key serve `TrustService` on port 50001 with
//! server-side TLS only (the worker has no client certificate yet). The
//! worker checks that server against the OS CA certificate from its config,
//! proves cluster membership with the machine token, and sends a PKCS#10
//! request; its private key never leaves it. The signed certificate and
//! key are kept on STATE and reused until they near expiry or the node's
//! name or addresses change.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use machine_api::config::MachineConfig;
use machine_api::pki::kube;
use machine_api::pki::kube::os_api_server;
use machine_api::pki::{server_certificate_request, CertificateAuthority};
use machine_api::proto::trust_service_client::TrustServiceClient;
use machine_api::proto::trust_service_server::{TrustService, TrustServiceServer};
use machine_api::proto::{
    KubernetesCertificateKind, SignKubernetesCertificateRequest, SignServerCertificateRequest,
    SignServerCertificateResponse,
};
use machine_api::retry::Backoff;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::tls::ServerIdentity;
use crate::node::Node;
use crate::roles::NodeIdentity;
use machine_api::pki::kube::NodeIdentity as CertIdentity;

/// A worker's kept certificate and key, on STATE.
pub const KEPT_FILES: [&str; 2] = ["os-api.crt", "os-api.key"];

/// The trust endpoint's port on every node holding the OS CA key.
pub const TRUST_PORT: u16 = 50001;

/// The signer side.
#[derive(Debug)]
pub struct TrustApi(pub Arc<Node>);

fn peer_of<T>(r: &Request<T>) -> String {
    r.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".into())
}

impl TrustApi {
    /// The running config, once the caller's machine token matches it
    /// (compared in constant time; a mismatch is logged with the peer).
    fn config_for(&self, token: &str, peer: &str) -> Result<MachineConfig, Status> {
        let cfg = self
            .0
            .config()
            .ok_or_else(|| Status::unavailable("this node has no config yet"))?;
        if !crate::node::constant_time_eq(token.as_bytes(), cfg.secrets.machine_token.as_bytes()) {
            warn!(%peer, "trust endpoint: wrong machine token");
            return Err(Status::permission_denied(
                "wrong machine token: the worker's secrets.machineToken is not this cluster's",
            ));
        }
        Ok(cfg)
    }
}

#[tonic::async_trait]
impl TrustService for TrustApi {
    async fn sign_server_certificate(
        &self,
        r: Request<SignServerCertificateRequest>,
    ) -> Result<Response<SignServerCertificateResponse>, Status> {
        let peer = peer_of(&r);
        let req = r.into_inner();
        let cfg = self.config_for(&req.machine_token, &peer)?;
        let key =
            cfg.secrets.os_ca.key.as_ref().ok_or_else(|| {
                Status::failed_precondition("this node does not hold the OS CA key")
            })?;
        let ca = CertificateAuthority::from_pem("secrets.osCA", &cfg.secrets.os_ca.crt, key)
            .map_err(|e| Status::internal(e.to_string()))?;
        let (spec, cert_pem) = ca
            .sign_server_request(&req.csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(
            %peer,
            node = %spec.common_name,
            ips = ?spec.ip_addresses,
            "trust endpoint: signed an OS API server certificate"
        );
        Ok(Response::new(SignServerCertificateResponse { cert_pem }))
    }

    async fn sign_kubernetes_certificate(
        &self,
        r: Request<SignKubernetesCertificateRequest>,
    ) -> Result<Response<SignServerCertificateResponse>, Status> {
        let peer = peer_of(&r);
        let req = r.into_inner();
        let cfg = self.config_for(&req.machine_token, &peer)?;
        let ca = cfg
            .secrets
            .kubernetes_ca
            .as_ref()
            .and_then(|c| c.key.as_ref().map(|k| (c, k)))
            .ok_or_else(|| {
                Status::failed_precondition(
                    "this node does not hold the Kubernetes CA key: ask a control-plane node",
                )
            })?;
        let ca = CertificateAuthority::from_pem("secrets.kubernetesCA", &ca.0.crt, ca.1)
            .map_err(|e| Status::internal(e.to_string()))?;
        let kind = KubernetesCertificateKind::try_from(req.kind)
            .unwrap_or(KubernetesCertificateKind::Unspecified);
        let signed = match kind {
            KubernetesCertificateKind::KubeletServing => {
                ca.sign_request_as(&req.csr_pem, kube::kubelet_serving_from_request)
            }
            KubernetesCertificateKind::KubeProxy => {
                ca.sign_request_as(&req.csr_pem, |_, _| Ok(kube::kube_proxy()))
            }
            KubernetesCertificateKind::Unspecified => {
                return Err(Status::invalid_argument(
                    "kind: say which certificate (KUBELET_SERVING or KUBE_PROXY)",
                ))
            }
        };
        let (spec, cert_pem) = signed.map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(%peer, identity = %spec.common_name, ips = ?spec.ip_addresses, "trust endpoint: signed a Kubernetes certificate");
        Ok(Response::new(SignServerCertificateResponse { cert_pem }))
    }
}

/// The trust service for a server builder.
pub fn service(node: Arc<Node>) -> TrustServiceServer<TrustApi> {
    TrustServiceServer::new(TrustApi(node))
}

/// Where the trust endpoint is: port 50001 on the control-plane
/// endpoint's host.
pub fn endpoint_of(cfg: &MachineConfig) -> Result<(String, String), String> {
    let url = &cfg.cluster.control_plane.endpoint.0;
    let host = url
        .host_str()
        .ok_or("cluster.controlPlane.endpoint has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let authority = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{host}]:{TRUST_PORT}"),
        _ => format!("{host}:{TRUST_PORT}"),
    };
    Ok((host, format!("https://{authority}")))
}

/// A kept certificate that still fits: same CA, names and addresses, and
/// not expired (one due for renewal is served and renewed).
fn cached(dir: &Path, cfg: &MachineConfig, me: &NodeIdentity) -> Option<(String, String)> {
    let cert = std::fs::read_to_string(dir.join("os-api.crt")).ok()?;
    let key = std::fs::read_to_string(dir.join("os-api.key")).ok()?;
    use x509_parser::prelude::FromDer;
    let der = machine_api::pki::pem::first_cert_der(&cert).ok()?;
    let (_, x) = x509_parser::certificate::X509Certificate::from_der(&der).ok()?;
    // Any time left will do: one due for renewal is served while the serve
    // loop asks for its replacement, so a restart never costs the API.
    x.validity().time_to_expiration()?;
    let cn_ok = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        == Some(me.name.as_str());
    let names: Vec<String> = x
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let ips: Vec<IpAddr> = x
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?)),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?)),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let issued_by_ours = CertificateAuthority::verify_issued(&cfg.secrets.os_ca.crt, &cert);
    // Every name and address the node would ask for now (its address and
    // machine.certSANs included) must be in the kept certificate.
    let want = wanted_spec(cfg, me);
    let sans_ok = want.ip_addresses.iter().all(|ip| ips.contains(ip))
        && want.dns_names.iter().all(|d| names.contains(d));
    (cn_ok && sans_ok && issued_by_ours).then_some((cert, key))
}

/// What a worker asks the trust endpoint to sign.
fn wanted_spec(cfg: &MachineConfig, me: &NodeIdentity) -> machine_api::pki::LeafSpec {
    os_api_server(
        &CertIdentity {
            name: me.name.clone(),
            addresses: vec![me.ip],
        },
        &cfg.machine.cert_sans,
    )
}

/// A worker's OS API identity: kept on STATE, else requested from the trust
/// endpoint, retrying while it is unreachable (the control plane may boot
/// later). A definitive refusal (wrong machine token, a request it will
/// not sign, an endpoint without the CA key), or no answer within
/// `--trust-timeout` for a worker that never had a certificate, is
/// returned as an error: the
/// config cannot work and must not leave the node unreachable.
pub async fn worker_identity(
    node: &Node,
    cfg: &MachineConfig,
    me: &NodeIdentity,
) -> Result<ServerIdentity, String> {
    let dir = node.opts.paths.state_dir();
    let ca = cfg.secrets.os_ca.crt.clone();
    if let Some((cert, key)) = cached(&dir, cfg, me) {
        return Ok(ServerIdentity::new(cert, key, Some(ca)));
    }
    // A worker that never had a certificate gives up after a while: its
    // config may name a wrong endpoint, and waiting forever without an API
    // would leave it unreachable. One with a kept certificate (a renewal,
    // a control plane that is down) keeps waiting.
    let first_time = !dir.join(KEPT_FILES[0]).exists();
    let timeout = node.opts.trust_first_timeout;
    let give_up = first_time.then(|| std::time::Instant::now() + timeout);
    let spec = wanted_spec(cfg, me);
    match request_until(
        node,
        cfg,
        &spec,
        "waiting for the trust endpoint",
        true,
        give_up,
    )
    .await
    {
        Ok((cert, key)) => {
            keep(&dir, &cert, &key);
            info!("OS API certificate signed by the trust endpoint");
            Ok(ServerIdentity::new(cert, key, Some(ca)))
        }
        Err((true, e)) => Err(format!("the trust endpoint refused this worker: {e}")),
        Err((false, e)) => Err(format!(
            "the trust endpoint gave no answer within {}s: {e}",
            timeout.as_secs()
        )),
    }
}

/// Asks the trust endpoint until it signs, retrying after 1 s, doubling up
/// to every 15 s, and noting each distinct failure as `{doing}: REASON`.
/// Ends early with `(true, reason)` on a definitive refusal when
/// `refusal_ends`, and with `(false, reason)` once `give_up` has passed.
async fn request_until(
    node: &Node,
    cfg: &MachineConfig,
    spec: &machine_api::pki::LeafSpec,
    doing: &str,
    refusal_ends: bool,
    give_up: Option<std::time::Instant>,
) -> Result<(String, String), (bool, String)> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(15));
    if let Some(t) = give_up {
        backoff = backoff.deadline(t);
    }
    backoff
        .retry(
            || request_once(cfg, spec),
            |(refused, e), _| {
                if *refused && refusal_ends {
                    return false;
                }
                node.note_event(format!("{doing}: {e}"));
                true
            },
        )
        .await
        .map_err(|(refused, e)| (refused && refusal_ends, e))
}

/// Keeps a signed certificate and its key on STATE.
fn keep(dir: &Path, cert: &str, key: &str) {
    for (name, text, mode) in [("os-api.key", key, 0o600), ("os-api.crt", cert, 0o644)] {
        if let Err(e) = machine_api::atomic::write_atomic(&dir.join(name), text.as_bytes(), mode) {
            warn!("cannot keep the OS API certificate on STATE: {e}");
        }
    }
}

/// A running worker's renewal: asks the trust endpoint for a new
/// certificate, retrying (every 15 s at most) for as long as it takes,
/// and keeps it. The caller goes on serving with the current certificate
/// meanwhile, so a control plane that is down costs nothing until the
/// old certificate actually expires.
pub async fn renew(node: &Node, cfg: &MachineConfig, me: &NodeIdentity) {
    let spec = wanted_spec(cfg, me);
    let doing = "renewing the OS API certificate";
    if let Ok((cert, key)) = request_until(node, cfg, &spec, doing, false, None).await {
        keep(&node.opts.paths.state_dir(), &cert, &key);
    }
}

async fn request_once(
    cfg: &MachineConfig,
    spec: &machine_api::pki::LeafSpec,
) -> Result<(String, String), (bool, String)> {
    request_signed(cfg, spec, None).await
}

/// Asks the trust endpoint once to sign a fresh key for `spec`: an OS API
/// server certificate, or with `kind` a Kubernetes one. `(true, _)` is a
/// definitive refusal, `(false, _)` worth retrying.
async fn request_signed(
    cfg: &MachineConfig,
    spec: &machine_api::pki::LeafSpec,
    kind: Option<KubernetesCertificateKind>,
) -> Result<(String, String), (bool, String)> {
    let transient = |e: String| (false, e);
    let (host, url) = endpoint_of(cfg).map_err(|e| (true, e))?;
    let (csr, key) = server_certificate_request(spec).map_err(|e| (true, e.to_string()))?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            &cfg.secrets.os_ca.crt,
        ))
        .domain_name(host);
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| (true, format!("{url}: {e}")))?
        .tls_config(tls)
        .map_err(|e| (true, format!("{url}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| transient(format!("{url}: cannot connect: {}", crate::node::chain(&e))))?;
    let mut client = TrustServiceClient::new(channel);
    let token = cfg.secrets.machine_token.clone();
    let resp = match kind {
        None => {
            client
                .sign_server_certificate(SignServerCertificateRequest {
                    machine_token: token,
                    csr_pem: csr,
                })
                .await
        }
        Some(kind) => {
            client
                .sign_kubernetes_certificate(SignKubernetesCertificateRequest {
                    machine_token: token,
                    csr_pem: csr,
                    kind: kind as i32,
                })
                .await
        }
    }
    .map_err(|s| {
        let definitive = matches!(
            s.code(),
            tonic::Code::PermissionDenied
                | tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
        );
        (definitive, format!("{url}: {}", s.message()))
    })?;
    Ok((resp.into_inner().cert_pem, key))
}

/// A Kubernetes certificate for this worker from the trust endpoint,
/// retrying while it is unreachable (every 15 s at most, for as long as it
/// takes: the control plane may boot later). A definitive refusal ends it
/// with the endpoint's reason.
pub async fn kubernetes_certificate(
    cfg: &MachineConfig,
    spec: &machine_api::pki::LeafSpec,
    kind: KubernetesCertificateKind,
    progress: &crate::supervisor::Progress,
) -> Result<(String, String), String> {
    let doing = format!("asking the trust endpoint for {}", spec.common_name);
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(15));
    backoff = backoff.deadline(std::time::Instant::now() + Duration::from_secs(3600));
    backoff
        .retry(
            || request_signed(cfg, spec, Some(kind)),
            |(refused, e), _| {
                if *refused {
                    return false;
                }
                progress(format!("{doing}: {e}"));
                true
            },
        )
        .await
        .map_err(|(_, e)| e)
}

/// The trust listener's address: the API's address on port 50001.
pub fn listen_addr(api: SocketAddr) -> SocketAddr {
    SocketAddr::new(api.ip(), TRUST_PORT)
}
