//! Server identities: the node's OS API certificate minted from the OS CA
//! (configured mode), or a self-signed one whose fingerprint the operator
//! pins (maintenance mode).

use std::path::Path;
use std::sync::Arc;

use machine_api::atomic::write_atomic;
use machine_api::config::MachineConfig;
use machine_api::pki::kube::{os_api_server, NodeIdentity};
use machine_api::pki::pem::{certs_from_pem, key_from_pem};
use machine_api::pki::{fingerprint_sha256, parse_cert_der, CertificateAuthority, LeafSpec, Usage};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::roles::NodeIdentity as Node;

/// A TLS identity ready for the server, with what the banner shows.
#[derive(Clone)]
pub struct ServerIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 of the certificate (DER), hex.
    pub fingerprint: String,
    /// OS CA that client certificates must chain to; None in maintenance.
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ServerIdentity {
    pub fn new(cert_pem: String, key_pem: String, client_ca_pem: Option<String>) -> Self {
        ServerIdentity {
            fingerprint: fingerprint_of(&cert_pem),
            cert_pem,
            key_pem,
            client_ca_pem,
        }
    }

    pub fn tls_config(&self) -> ServerTlsConfig {
        let tls =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => tls.client_ca_root(Certificate::from_pem(ca)),
            None => tls,
        }
    }

    /// The same server configuration as [`tls_config`](Self::tls_config)
    /// (client certificates required and checked against the OS CA when
    /// there is one, ALPN h2), as rustls takes it: for
    /// [`listener::incoming`](super::listener::incoming), which runs the
    /// handshake itself, with a deadline.
    pub fn rustls_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs =
            certs_from_pem(&self.cert_pem).map_err(|e| format!("server certificate: {e}"))?;
        let key = key_from_pem(&self.key_pem).map_err(|e| format!("server key: {e}"))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs_from_pem(ca).map_err(|e| format!("OS CA certificate: {e}"))? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("OS CA certificate: {e}"))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| format!("client certificate verifier: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("server certificate and key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A hash of what the identity is made from: when it changes, the
    /// server restarts with the new certificate.
    pub fn key_of(cfg: Option<&MachineConfig>, node: &Node) -> String {
        match cfg {
            None => "maintenance".into(),
            Some(c) => format!(
                "{}|{:?}|{}|{}",
                c.secrets.os_ca.crt, c.machine.cert_sans, node.name, node.ip
            ),
        }
    }
}

fn fingerprint_of(cert_pem: &str) -> String {
    parse_cert_der("server", cert_pem)
        .map(|d| fingerprint_sha256(&d))
        .unwrap_or_default()
}

/// A self-signed certificate for maintenance mode. Kept in `dir` so the
/// fingerprint stays the same across machined restarts within a boot.
pub fn maintenance_identity(dir: &Path, node: &Node) -> Result<ServerIdentity, String> {
    let cert_path = dir.join("maintenance.crt");
    let key_path = dir.join("maintenance.key");
    if let (Ok(cert_pem), Ok(key_pem)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        if machine_api::pki::check_key_matches("maintenance", &cert_pem, &key_pem).is_ok() {
            return Ok(ServerIdentity {
                fingerprint: fingerprint_of(&cert_pem),
                cert_pem,
                key_pem,
                client_ca_pem: None,
            });
        }
    }
    // A throwaway CA signs the leaf: clients pin the leaf's fingerprint,
    // and rustls refuses a self-signed leaf used as its own issuer less
    // often than an end-entity certificate without a chain.
    let ca = CertificateAuthority::generate("maintenance").map_err(|e| e.to_string())?;
    let spec = LeafSpec::new(&node.name, Usage::Server)
        .san(&node.name)
        .san(node.ip.to_string())
        .san("localhost")
        .san("127.0.0.1");
    let leaf = ca.issue(&spec).map_err(|e| e.to_string())?;
    write_atomic(&cert_path, leaf.cert_pem.as_bytes(), 0o644).map_err(|e| e.to_string())?;
    write_atomic(&key_path, leaf.key_pem.as_bytes(), 0o600).map_err(|e| e.to_string())?;
    Ok(ServerIdentity {
        fingerprint: fingerprint_of(&leaf.cert_pem),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
        client_ca_pem: None,
    })
}

/// The node's OS API certificate, minted from the OS CA in its config.
pub fn configured_identity(cfg: &MachineConfig, node: &Node) -> Result<ServerIdentity, String> {
    let key = cfg.secrets.os_ca.key.as_ref().ok_or_else(|| {
        "the config has no OS CA key (a worker gets its certificate from the trust endpoint instead)".to_string()
    })?;
    let ca = CertificateAuthority::from_pem("secrets.osCA", &cfg.secrets.os_ca.crt, key)
        .map_err(|e| e.to_string())?;
    let spec = os_api_server(
        &NodeIdentity {
            name: node.name.clone(),
            addresses: vec![node.ip],
        },
        &cfg.machine.cert_sans,
    );
    let leaf = ca.issue(&spec).map_err(|e| e.to_string())?;
    Ok(ServerIdentity {
        fingerprint: fingerprint_of(&leaf.cert_pem),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
        client_ca_pem: Some(cfg.secrets.os_ca.crt.clone()),
    })
}
