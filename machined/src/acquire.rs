//! Where a node without a stored config gets one, in order:
//! 1. a config embedded in the image (`/usr/lib/machined/config.yaml`,
//!    `imager build --embed-config FILE`);
//! 2. `machined.config.inline=BASE64` on the kernel command line (YAML,
//!    optionally gzipped, then base64);
//! 3. `machined.config=URL` on the kernel command line (http or https with
//!    `machined.config.sha256=HEX` to pin the content; fetched with retries
//!    because the network or the server may still be coming up). An https
//!    server must present a certificate from a public web CA (the
//!    webpki-roots list, compiled in: the image carries no CA bundle) or
//!    from a CA baked into the image with `imager build --config-ca FILE`
//!    ([`EMBEDDED_CA`]), for servers of a private PKI.
//!
//! Then maintenance mode. A config from any source is validated exactly
//! like an applied one; an invalid one is reported on the console and the
//! node falls through to the next source, never half-configured.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use machine_api::config::MAX_DOCUMENT_BYTES;
use machine_api::retry::Backoff;
use sha2::{Digest, Sha256};

/// Errors fetching or decoding a config source.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("machined.config.inline: {0}")]
    Inline(String),
    #[error("machined.config={0}: {1}")]
    Url(String, String),
    #[error("{0}: {1}")]
    Embedded(String, std::io::Error),
}

/// A config baked into the image (`imager build --embed-config`), relative
/// to the root.
pub const EMBEDDED_CONFIG: &str = "usr/lib/machined/config.yaml";
/// CA certificates baked into the image (`imager build --config-ca`),
/// trusted for https config URLs besides the public web roots; relative to
/// the root.
pub const EMBEDDED_CA: &str = "usr/lib/machined/config-ca.pem";

/// A config text and where it came from.
#[derive(Debug, Clone)]
pub struct Acquired {
    pub source: String,
    pub text: String,
}

fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    crate::cmdline::Cmdline::parse(cmdline)
        .get(key)
        .map(str::to_owned)
}

/// What a source may hold: no more than the config reader takes
/// ([`MAX_DOCUMENT_BYTES`]), checked before holding more in memory.
fn too_big() -> String {
    format!("larger than {MAX_DOCUMENT_BYTES} bytes (1 MiB), the limit of a machine config")
}

fn gunzip_if_needed(bytes: Vec<u8>) -> Result<String, String> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(too_big());
    }
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        use std::io::Read;
        let mut out = Vec::new();
        // A few KiB of gzip can expand to gigabytes: stop one byte past
        // the limit.
        flate2::read::GzDecoder::new(&bytes[..])
            .take(MAX_DOCUMENT_BYTES as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("not valid gzip: {e}"))?;
        if out.len() > MAX_DOCUMENT_BYTES {
            return Err(too_big());
        }
        out
    } else {
        bytes
    };
    String::from_utf8(bytes).map_err(|_| "the config is not UTF-8 text".to_owned())
}

/// The sources that exist on this node, in order (each one read lazily by
/// [`fetch`]).
pub fn sources(cmdline: &str, embedded: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if embedded.is_file() {
        out.push(format!("embedded:{}", embedded.display()));
    }
    if cmdline_value(cmdline, "machined.config.inline").is_some() {
        out.push("machined.config.inline".into());
    }
    if let Some(u) = cmdline_value(cmdline, "machined.config") {
        out.push(format!("url:{u}"));
    }
    out
}

/// Reads one source named by [`sources`]; `extra_ca` is the image's
/// [`EMBEDDED_CA`] file (absent on most images).
pub async fn fetch(source: &str, cmdline: &str, extra_ca: &Path) -> Result<Acquired, AcquireError> {
    let text = if let Some(path) = source.strip_prefix("embedded:") {
        std::fs::read_to_string(path).map_err(|e| AcquireError::Embedded(path.into(), e))?
    } else if source == "machined.config.inline" {
        let b64 = cmdline_value(cmdline, "machined.config.inline").unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| AcquireError::Inline(format!("not base64: {e}")))?;
        gunzip_if_needed(bytes).map_err(AcquireError::Inline)?
    } else if let Some(url) = source.strip_prefix("url:") {
        let pin = cmdline_value(cmdline, "machined.config.sha256");
        fetch_url(url, pin.as_deref(), extra_ca).await?
    } else {
        return Err(AcquireError::Inline(format!("unknown source {source}")));
    };
    Ok(Acquired {
        source: source.to_owned(),
        text,
    })
}

/// TLS for https config URLs: the public web roots plus the image's own CA
/// certificates, if it has any. A present but unusable CA file is an error
/// naming it, not silently ignored.
fn url_tls(extra_ca: &Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if extra_ca.exists() {
        let what = extra_ca.display();
        let pem = std::fs::read(extra_ca).map_err(|e| format!("{what}: {e}"))?;
        let certs = machine_api::pki::pem::certs_from_pem(&pem).map_err(|e| match e {
            machine_api::pki::pem::PemError::NoCertificate => {
                format!("{what}: no certificate found")
            }
            e => format!("{what}: not PEM certificates: {e}"),
        })?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{what}: not a usable CA certificate: {e}"))?;
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

async fn fetch_url(url: &str, pin: Option<&str>, extra_ca: &Path) -> Result<String, AcquireError> {
    let err = |m: String| AcquireError::Url(url.to_owned(), m);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(err("only http:// and https:// URLs are supported".into()));
    }
    if url.starts_with("http://") && pin.is_none() {
        tracing::warn!(
            "machined.config={url}: plain http without machined.config.sha256= lets anyone on the path change this node's config"
        );
    }
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(url_tls(extra_ca).map_err(err)?)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| err(e.to_string()))?;
    // Six attempts, 2, 4, 8, 16 and 16 s apart. An untrusted server
    // certificate ends it at once: a retry will not change it.
    let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(16)).max_attempts(6);
    let client = &client;
    let mut r = backoff
        .retry(
            move || async move {
                match client.get(url).send().await {
                    Ok(r) if r.status().is_success() => Ok(r),
                    Ok(r) => Err(format!("HTTP {}", r.status())),
                    Err(e) => Err(crate::node::chain(&e)),
                }
            },
            |last, _| !last.contains("invalid peer certificate"),
        )
        .await
        .map_err(|last| {
            let attempts = backoff.attempts();
            err(format!(
                "gave up after {attempts} attempt{}: {last}",
                if attempts == 1 { "" } else { "s" }
            ))
        })?;
    if r.content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(err(too_big()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| err(e.to_string()))? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(err(too_big()));
        }
        body.extend_from_slice(&chunk);
    }
    if let Some(want) = pin {
        let got = hex::encode(Sha256::digest(&body));
        if !got.eq_ignore_ascii_case(want) {
            return Err(err(format!(
                "content sha256 {got} does not match machined.config.sha256={want}"
            )));
        }
    }
    gunzip_if_needed(body).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_CA_FILE: &str = "/nonexistent/config-ca.pem";

    /// Reads a request and answers `machine: {}` (a test config server).
    async fn answer_one_request<S>(s: &mut S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let body = "machine: {}\n";
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
        let _ = s.shutdown().await;
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_document_limit() {
        use std::io::Write;
        // 64 MiB of spaces is about 64 KiB of gzip.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        for _ in 0..64 {
            gz.write_all(&[b' '; 1 << 20]).unwrap();
        }
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < MAX_DOCUMENT_BYTES);
        let e = gunzip_if_needed(bomb).unwrap_err();
        assert!(e.contains("larger than 1048576 bytes"), "{e}");
        let e = gunzip_if_needed(vec![b' '; MAX_DOCUMENT_BYTES + 1]).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
        assert!(gunzip_if_needed(vec![b' '; MAX_DOCUMENT_BYTES]).is_ok());
    }

    #[tokio::test]
    async fn inline_config_decodes_plain_and_gzipped() {
        let yaml = "machine: {}\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(yaml);
        let cmdline = format!("quiet machined.config.inline={b64}");
        let src = sources(&cmdline, Path::new("/nonexistent"));
        assert_eq!(src, vec!["machined.config.inline".to_owned()]);
        assert_eq!(
            fetch(&src[0], &cmdline, Path::new(NO_CA_FILE))
                .await
                .unwrap()
                .text,
            yaml
        );

        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(yaml.as_bytes()).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
        let cmdline = format!("machined.config.inline={b64}");
        assert_eq!(
            fetch("machined.config.inline", &cmdline, Path::new(NO_CA_FILE))
                .await
                .unwrap()
                .text,
            yaml
        );

        let e = fetch(
            "machined.config.inline",
            "machined.config.inline=@@@",
            Path::new(NO_CA_FILE),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("machined.config.inline: not base64"), "{e}");
    }

    #[tokio::test]
    async fn url_source_is_fetched_and_its_pin_checked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                answer_one_request(&mut s).await;
            }
        });
        let url = format!("http://{addr}/node.yaml");
        let good = hex::encode(Sha256::digest(b"machine: {}\n"));
        let cmdline = format!("machined.config={url} machined.config.sha256={good}");
        assert_eq!(
            sources(&cmdline, Path::new("/nonexistent")),
            vec![format!("url:{url}")]
        );
        let got = fetch(&format!("url:{url}"), &cmdline, Path::new(NO_CA_FILE))
            .await
            .unwrap();
        assert_eq!(got.text, "machine: {}\n");
        let bad = format!(
            "machined.config={url} machined.config.sha256={}",
            "0".repeat(64)
        );
        let e = fetch(&format!("url:{url}"), &bad, Path::new(NO_CA_FILE))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match"), "{e}");
    }

    #[tokio::test]
    async fn https_source_trusts_public_roots_and_the_image_ca_only() {
        use machine_api::pki::pem::{certs_from_pem, key_from_pem};
        use machine_api::pki::{CertificateAuthority, LeafSpec, Usage};

        // A config server of a private PKI, on 127.0.0.1 over TLS.
        let ca = CertificateAuthority::generate("config server CA").unwrap();
        let leaf = ca
            .issue(&LeafSpec::new("config server", Usage::Server).san("127.0.0.1"))
            .unwrap();
        let chain = certs_from_pem(&leaf.cert_pem).unwrap();
        let key = key_from_pem(&leaf.key_pem).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let Ok(mut s) = acceptor.accept(s).await else {
                    continue;
                };
                answer_one_request(&mut s).await;
            }
        });
        let url = format!("https://{addr}/node.yaml");
        let source = format!("url:{url}");
        let cmdline = format!("machined.config={url}");

        // Public web roots only: refused at the first attempt, saying why.
        let e = fetch(&source, &cmdline, Path::new(NO_CA_FILE))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gave up after 1 attempt:") && e.contains("invalid peer certificate"),
            "{e}"
        );

        // The image's CA file makes the private server trusted.
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("config-ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let got = fetch(&source, &cmdline, &ca_file).await.unwrap();
        assert_eq!(got.text, "machine: {}\n");

        // A CA file without certificates is an error naming it.
        std::fs::write(&ca_file, "not a certificate\n").unwrap();
        let e = fetch(&source, &cmdline, &ca_file)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("config-ca.pem: no certificate found"), "{e}");
    }
}
