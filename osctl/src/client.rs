//! Connections to nodes: mutual TLS with the osconfig identity, or
//! `--insecure` for maintenance mode with the node's certificate pinned by
//! its SHA-256 fingerprint. One connection per target node; commands fan
//! out over all targets at once and report per node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use hyper_util::rt::TokioIo;
use machine_api::osconfig::{Context, OsConfig, OSCONFIG_ENV};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

/// The OS API port.
pub const DEFAULT_PORT: u16 = 50000;

/// Global connection flags, shared by every verb.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Client file (default: $OSCONFIG, then ~/.osctl/osconfig).
    #[arg(long, global = true, value_name = "FILE")]
    pub osconfig: Option<PathBuf>,
    /// Context in the client file (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Nodes to act on (HOST or HOST:PORT), comma-separated or repeated.
    #[arg(long, short = 'n', global = true, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Endpoints to dial when no nodes are given.
    #[arg(long, short = 'e', global = true, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// Per-node call timeout in seconds.
    #[arg(long, global = true, default_value = "30")]
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// How to trust the node.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Mutual TLS with the context's CA and client certificate.
    Mutual(Box<Context>),
    /// Maintenance mode: no client certificate; the server certificate is
    /// accepted when its fingerprint matches, or at all when none is given.
    Insecure { fingerprint: Option<String> },
}

pub fn default_osconfig_path() -> Option<PathBuf> {
    std::env::var_os(OSCONFIG_ENV)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".osctl/osconfig")))
}

impl ConnectArgs {
    /// Loads the context named by the flags.
    pub fn context(&self) -> Result<Context> {
        let path = self
            .osconfig
            .clone()
            .or_else(default_osconfig_path)
            .ok_or_else(|| anyhow!("no client file: pass --osconfig FILE or set {OSCONFIG_ENV}"))?;
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read client file {} (generate one with `osctl gen config`, or pass --osconfig)",
                path.display()
            )
        })?;
        let cfg = OsConfig::parse(&text)
            .map_err(|p| anyhow!("client file {} is invalid:\n{p}", path.display()))?;
        let name = self.context.clone().unwrap_or(cfg.context.clone());
        cfg.contexts
            .get(&name)
            .cloned()
            .ok_or_else(|| anyhow!("client file {} has no context {name:?}", path.display()))
    }

    /// The nodes to act on: `-n`, else `-e`, else the context's nodes, else
    /// its endpoints.
    pub fn targets(&self, ctx: Option<&Context>) -> Result<Vec<String>> {
        let list = if !self.nodes.is_empty() {
            self.nodes.clone()
        } else if !self.endpoints.is_empty() {
            self.endpoints.clone()
        } else if let Some(c) = ctx {
            if c.nodes.is_empty() {
                c.endpoints.clone()
            } else {
                c.nodes.clone()
            }
        } else {
            Vec::new()
        };
        if list.is_empty() {
            bail!("no node to talk to: pass -n NODE (or -e ENDPOINT)");
        }
        Ok(list)
    }
}

/// `HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 address → (host, port).
pub fn split_target(t: &str) -> Result<(String, u16)> {
    if let Ok(ip) = t.parse::<std::net::IpAddr>() {
        return Ok((ip.to_string(), DEFAULT_PORT));
    }
    if let Some(rest) = t.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| anyhow!("bad address {t:?}"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| anyhow!("bad port in {t:?}"))?,
            None => DEFAULT_PORT,
        };
        return Ok((host.to_owned(), port));
    }
    match t.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_owned(),
            p.parse().map_err(|_| anyhow!("bad port in {t:?}"))?,
        )),
        None => Ok((t.to_owned(), DEFAULT_PORT)),
    }
}

/// Accepts exactly the certificate with a given SHA-256, or any when none
/// is given (then the caller has warned the operator).
#[derive(Debug)]
struct PinnedVerifier {
    fingerprint: Option<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.fingerprint {
            None => Ok(ServerCertVerified::assertion()),
            Some(want) => {
                let got = hex::encode(Sha256::digest(end_entity.as_ref()));
                if got.eq_ignore_ascii_case(want) {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(format!(
                        "server certificate fingerprint {got} does not match --cert-fingerprint {want}"
                    )))
                }
            }
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    machine_api::pki::pem::certs_from_pem(pem).with_context(|| what.to_owned())
}

/// The rustls client configuration for `trust`.
pub fn tls_config(trust: &Trust) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let mut cfg = match trust {
        Trust::Mutual(ctx) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in pem_certs(&ctx.ca, "osconfig ca")? {
                roots.add(c).context("osconfig ca")?;
            }
            let certs = pem_certs(&ctx.crt, "osconfig crt")?;
            let key = machine_api::pki::pem::key_from_pem(&ctx.key).context("osconfig key")?;
            builder
                .with_root_certificates(roots)
                .with_client_auth_cert(certs, key)
                .context("osconfig client certificate")?
        }
        Trust::Insecure { fingerprint } => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                fingerprint: fingerprint.clone(),
                provider,
            }))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Opens a gRPC channel to one node.
pub async fn connect(target: &str, tls: Arc<ClientConfig>, timeout: Duration) -> Result<Channel> {
    let (host, port) = split_target(target)?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| anyhow!("{target}: not a host name or IP address"))?
        .to_owned();
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let connector = tokio_rustls::TlsConnector::from(tls);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout);
    let dial = addr.clone();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let dial = dial.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&dial).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| ConnectError::of(&e))?;
    Ok(channel)
}

/// Why a connection to a node failed, for code that waits on nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing served the port: refused, reset or closed before the TLS
    /// handshake finished, or timed out (a node still booting, or down).
    NotServing,
    /// The node's certificate is not from the osconfig's CA: a node still
    /// in maintenance mode, or another cluster's.
    UnknownIssuer,
    /// The node's certificate is not the one `--cert-fingerprint` pins.
    Fingerprint,
    /// Anything else: the node refused our certificate, a bad address, ...
    Other,
}

/// A failed connection: the message osctl prints, and its kind.
#[derive(Debug)]
pub struct ConnectError {
    message: String,
    pub failure: ConnectFailure,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConnectError {}

impl ConnectError {
    fn of(e: &(dyn std::error::Error + 'static)) -> Self {
        let chain = error_chain(e);
        let failure = if chain.contains("UnknownIssuer") {
            ConnectFailure::UnknownIssuer
        } else if chain.contains("fingerprint") {
            ConnectFailure::Fingerprint
        } else if io_kinds(e).iter().any(|k| {
            use std::io::ErrorKind as K;
            matches!(
                k,
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::UnexpectedEof
                    | K::BrokenPipe
                    | K::TimedOut
            )
        }) || chain.contains("Connection refused")
            || chain.contains("timed out")
        {
            ConnectFailure::NotServing
        } else {
            ConnectFailure::Other
        };
        let hint = if chain.contains("UnknownIssuer") {
            ": the node's certificate is not from this osconfig's CA (another cluster?), or the node is in maintenance mode (use --insecure --cert-fingerprint)"
        } else if chain.contains("fingerprint")
            || chain.contains("Connection refused")
            || chain.contains("timed out")
        {
            ""
        } else {
            ": if the node refused the TLS handshake, check that the osconfig's client certificate comes from this cluster's OS CA and has not expired"
        };
        ConnectError {
            message: format!("cannot connect: {chain}{hint}"),
            failure,
        }
    }

    /// The kind of a failed connection in an error, if it is one.
    pub fn failure_of(e: &anyhow::Error) -> Option<ConnectFailure> {
        e.downcast_ref::<ConnectError>().map(|c| c.failure)
    }
}

/// The kinds of the I/O errors in an error's chain.
fn io_kinds(e: &(dyn std::error::Error + 'static)) -> Vec<std::io::ErrorKind> {
    let mut kinds = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
        }
        cur = err.source();
    }
    kinds
}

/// The innermost causes of an error, joined: TLS failures are otherwise
/// hidden behind "transport error".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// A gRPC status as one line an operator can act on.
pub fn status_line(s: &tonic::Status) -> String {
    let msg = s.message();
    let code = match s.code() {
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => "not authenticated",
        tonic::Code::InvalidArgument => "rejected",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::NotFound => "not found",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "timed out",
        _ => "error",
    };
    if s.code() == tonic::Code::Unavailable && msg.contains("tls") {
        return format!("TLS handshake failed: {msg}");
    }
    format!("{code}: {msg}")
}

/// Runs `f` against every target at once; returns (target, result) in the
/// order given.
pub async fn fan_out<T, F, Fut>(
    targets: &[String],
    tls: Arc<ClientConfig>,
    timeout: Duration,
    f: F,
) -> Vec<(String, Result<T>)>
where
    F: Fn(String, Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let calls = targets.iter().map(|t| {
        let tls = tls.clone();
        let fut = async {
            let ch = connect(t, tls, timeout).await?;
            f(t.clone(), ch).await
        };
        async move { (t.clone(), fut.await) }
    });
    futures::future::join_all(calls).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            split_target("10.0.0.1").unwrap(),
            ("10.0.0.1".into(), 50000)
        );
        assert_eq!(
            split_target("10.0.0.1:123").unwrap(),
            ("10.0.0.1".into(), 123)
        );
        assert_eq!(split_target("[fd00::1]:5").unwrap(), ("fd00::1".into(), 5));
        assert_eq!(split_target("fd00::1").unwrap(), ("fd00::1".into(), 50000));
        assert_eq!(split_target("node-1").unwrap(), ("node-1".into(), 50000));
        assert!(split_target("a:b").is_err());
    }
}
