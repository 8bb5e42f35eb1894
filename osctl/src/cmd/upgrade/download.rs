//! `osctl upgrade --image URL`: the bundle is downloaded once, to a
//! temporary file, and from then on handled like a local one: checked
//! here, streamed to each node in turn, and checked again by every node
//! (its signature against the node's trusted image keys, and every file
//! against the manifest). One download serves every node, so a rollout of
//! many nodes does not fetch the image many times, and a server that
//! changes the file halfway through a rollout cannot upgrade nodes to
//! different images.
//!
//! A stranger's server is bounded like any other input: a size limit
//! (checked against Content-Length before the body and counted while
//! reading it), connect and stall timeouts, at most 5 redirects and none
//! from https to http. The file is then checked like a local one (its
//! `--sha256` pin included) by the caller, in the one read that checks
//! the bundle.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::error_chain;

/// The largest bundle downloaded (a bundle is a kernel, an initramfs and a
/// root squashfs: hundreds of MiB today).
pub const MAX_BUNDLE_BYTES: u64 = 8 << 30;
/// A server that sends nothing for this long is given up on.
const STALL: Duration = Duration::from_secs(60);
const CONNECT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 5;

/// Whether `--image` names a URL rather than a file.
pub fn is_url(image: &str) -> bool {
    image.starts_with("http://") || image.starts_with("https://")
}

/// TLS for the image server: the public web roots, plus `extra_ca` (a PEM
/// file of CA certificates) for a server of one's own.
fn tls(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = extra_ca {
        let what = format!("--image-ca {}", ca.display());
        let pem = std::fs::read(ca).with_context(|| what.clone())?;
        let certs = machine_api::pki::pem::certs_from_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{what}: not PEM certificates: {e}"))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("{what}: not a usable CA certificate: {e}"))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// Redirects: at most [`MAX_REDIRECTS`], and never from https to http
/// (that would drop the server's authentication halfway).
fn redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.url().scheme() == "http"
            && attempt.previous().iter().any(|u| u.scheme() == "https");
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else if downgrade {
            let to = attempt.url().to_string();
            attempt.error(format!(
                "redirected from https to plain http ({to}): refused"
            ))
        } else {
            attempt.follow()
        }
    })
}

/// Downloads `url` into a temporary file (in `$TMPDIR`, removed when
/// dropped), checking its size against `limit`.
pub async fn download(
    url: &str,
    extra_ca: Option<&Path>,
    limit: u64,
) -> Result<tempfile::NamedTempFile> {
    let started = Instant::now();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls(extra_ca)?)
        .connect_timeout(CONNECT)
        .read_timeout(STALL)
        .redirect(redirects())
        .build()
        .context("HTTP client")?;
    let chain = |e: reqwest::Error| anyhow::anyhow!("--image {url}: {}", error_chain(&e));
    let mut resp = client.get(url).send().await.map_err(chain)?;
    if !resp.status().is_success() {
        bail!("--image {url}: the server answered HTTP {}", resp.status());
    }
    if let Some(n) = resp.content_length().filter(|n| *n > limit) {
        bail!("--image {url}: {n} bytes is over the limit of {limit} for a bundle: refused");
    }
    let mut file = tempfile::Builder::new()
        .prefix("osctl-bundle-")
        .suffix(".tar")
        .tempfile()
        .context("a temporary file for the download (set TMPDIR to a roomier place)")?;
    let mut bytes: u64 = 0;
    while let Some(chunk) = resp.chunk().await.map_err(chain)? {
        bytes += chunk.len() as u64;
        if bytes > limit {
            bail!("--image {url}: over the limit of {limit} bytes for a bundle: refused");
        }
        file.write_all(&chunk)
            .with_context(|| format!("writing {}", file.path().display()))?;
    }
    file.flush()?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{url}: downloaded {bytes} bytes in {secs:.1}s ({:.1} MiB/s)",
        bytes as f64 / (1 << 20) as f64 / secs.max(0.001)
    );
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_are_urls() {
        assert!(is_url("https://images.example/os-upgrade.tar"));
        assert!(is_url("http://10.0.0.1:8080/b.tar"));
        assert!(!is_url("out/qemu-upgrade.tar"));
        assert!(!is_url("/srv/http://x"));
    }

    #[test]
    fn an_unreadable_ca_file_is_named() {
        let e = tls(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(format!("{e:#}").contains("--image-ca /nonexistent/ca.pem"));
    }
}
