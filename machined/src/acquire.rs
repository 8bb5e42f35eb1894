//! Where a node without a stored config gets one, in order:
//! 1. a config embedded in the image (`/usr/lib/machined/config.yaml`,
//!    `imager build --embed-config FILE`);
//! 2. `machined.config.inline=BASE64` on the kernel command line (YAML,
//!    optionally gzipped, then base64);
//! 3. `machined.config=URL` on the kernel command line (http or https with
//!    `machined.config.sha256=HEX` to pin the content; fetched with retries
//!    because the network or the server may still be coming up).
//!
//! Then maintenance mode. A config from any source is validated exactly
//! like an applied one; an invalid one is reported on the console and the
//! node falls through to the next source, never half-configured.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
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

/// A config text and where it came from.
#[derive(Debug, Clone)]
pub struct Acquired {
    pub source: String,
    pub text: String,
}

fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn gunzip_if_needed(bytes: Vec<u8>) -> Result<String, String> {
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("not valid gzip: {e}"))?;
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

/// Reads one source named by [`sources`].
pub async fn fetch(source: &str, cmdline: &str) -> Result<Acquired, AcquireError> {
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
        fetch_url(url, pin).await?
    } else {
        return Err(AcquireError::Inline(format!("unknown source {source}")));
    };
    Ok(Acquired {
        source: source.to_owned(),
        text,
    })
}

async fn fetch_url(url: &str, pin: Option<&str>) -> Result<String, AcquireError> {
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
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut last = String::new();
    for attempt in 0..6u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
        }
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => {
                let body = r.bytes().await.map_err(|e| err(e.to_string()))?.to_vec();
                if let Some(want) = pin {
                    let got = hex::encode(Sha256::digest(&body));
                    if !got.eq_ignore_ascii_case(want) {
                        return Err(err(format!(
                            "content sha256 {got} does not match machined.config.sha256={want}"
                        )));
                    }
                }
                return gunzip_if_needed(body).map_err(err);
            }
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(err(format!("gave up after 6 attempts: {last}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inline_config_decodes_plain_and_gzipped() {
        let yaml = "machine: {}\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(yaml);
        let cmdline = format!("quiet machined.config.inline={b64}");
        let src = sources(&cmdline, Path::new("/nonexistent"));
        assert_eq!(src, vec!["machined.config.inline".to_owned()]);
        assert_eq!(fetch(&src[0], &cmdline).await.unwrap().text, yaml);

        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(yaml.as_bytes()).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
        let cmdline = format!("machined.config.inline={b64}");
        assert_eq!(
            fetch("machined.config.inline", &cmdline)
                .await
                .unwrap()
                .text,
            yaml
        );

        let e = fetch("machined.config.inline", "machined.config.inline=@@@")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("machined.config.inline: not base64"), "{e}");
    }

    #[tokio::test]
    async fn url_source_is_fetched_and_its_pin_checked() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = "machine: {}\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let url = format!("http://{addr}/node.yaml");
        let good = hex::encode(Sha256::digest(b"machine: {}\n"));
        let cmdline = format!("machined.config={url} machined.config.sha256={good}");
        assert_eq!(
            sources(&cmdline, Path::new("/nonexistent")),
            vec![format!("url:{url}")]
        );
        let got = fetch(&format!("url:{url}"), &cmdline).await.unwrap();
        assert_eq!(got.text, "machine: {}\n");
        let bad = format!(
            "machined.config={url} machined.config.sha256={}",
            "0".repeat(64)
        );
        let e = fetch(&format!("url:{url}"), &bad)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match"), "{e}");
    }
}
