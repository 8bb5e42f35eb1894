//! Downloads: http(s) through ureq (rustls), and file:// for local
//! mirrors and tests.

use std::sync::OnceLock;
use std::time::Duration;

use machine_api::retry::Backoff;

use super::SourceError;

/// Timeout for connecting, sending the request and receiving the response
/// headers.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Budget for receiving one response body (a large .deb on a slow link).
const BODY_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Largest body accepted (the biggest Debian packages are a few hundred MiB).
const BODY_LIMIT: u64 = 4 << 30;

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .timeout_resolve(Some(TIMEOUT))
            .timeout_connect(Some(TIMEOUT))
            .timeout_send_request(Some(TIMEOUT))
            .timeout_recv_response(Some(TIMEOUT))
            .timeout_recv_body(Some(BODY_TIMEOUT))
            .user_agent(concat!("imager/", env!("CARGO_PKG_VERSION")))
            .build()
            .into()
    })
}

/// Fetches `uri` (http, https or file) into memory. HTTP failures other
/// than a 4xx status are retried once.
pub fn fetch(uri: &str) -> Result<Vec<u8>, SourceError> {
    let err = |reason: String| SourceError::Fetch {
        url: uri.to_owned(),
        reason,
    };
    let parsed = url::Url::parse(uri).map_err(|e| err(format!("not a URL: {e}")))?;
    match parsed.scheme() {
        "file" => {
            let path = parsed
                .to_file_path()
                .map_err(|()| err("not a local file path".to_owned()))?;
            std::fs::read(&path).map_err(|e| err(e.to_string()))
        }
        "http" | "https" => {
            // One retry, a second later, for what may pass.
            Backoff::constant(Duration::from_secs(1))
                .max_attempts(2)
                .retry_blocking(|| http_get(uri), |e, _| matches!(e, HttpFailure::Retry(_)))
                .map_err(|e| match e {
                    HttpFailure::Final(reason) => err(reason),
                    HttpFailure::Retry(reason) => err(format!("{reason} (after one retry)")),
                })
        }
        other => Err(err(format!(
            "unsupported scheme {other:?}: use http, https or file"
        ))),
    }
}

enum HttpFailure {
    Retry(String),
    Final(String),
}

fn http_get(uri: &str) -> Result<Vec<u8>, HttpFailure> {
    let mut resp = agent().get(uri).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) if (400..500).contains(&code) => {
            HttpFailure::Final(format!("HTTP status {code}"))
        }
        ureq::Error::StatusCode(code) => HttpFailure::Retry(format!("HTTP status {code}")),
        other => HttpFailure::Retry(other.to_string()),
    })?;
    resp.body_mut()
        .with_config()
        .limit(BODY_LIMIT)
        .read_to_vec()
        .map_err(|e| HttpFailure::Retry(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_read_and_missing_files_name_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"hello").unwrap();
        let u = url::Url::from_file_path(&p).unwrap();
        assert_eq!(fetch(u.as_str()).unwrap(), b"hello");
        let missing = url::Url::from_directory_path(dir.path())
            .unwrap()
            .join("nope")
            .unwrap();
        let e = fetch(missing.as_str()).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        assert!(fetch("ftp://x/y").is_err());
    }
}
