//! Health of the control-plane components over TLS: the apiserver's
//! `/readyz`, the controller-manager's and scheduler's `/healthz`, each
//! with the server certificate checked against the cluster CA. The
//! endpoints serve anonymous requests (the apiserver's authentication
//! config allows exactly them), so no client identity is needed.

use std::time::Duration;

use async_trait::async_trait;

use crate::supervisor::HealthCheck;

/// kubeadm's probe timeout for the control-plane components: on a loaded
/// node (three control planes under emulation, or a busy etcd) `/readyz`
/// answers in seconds, and a 2 s limit made healthy API servers flap.
const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct HttpsHealth {
    client: reqwest::Client,
    url: String,
}

impl HttpsHealth {
    pub fn new(ca_pem: &str, url: String) -> Result<Self, String> {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())
            .map_err(|e| format!("cluster CA: {e}"))?;
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .use_rustls_tls()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| format!("health client: {e}"))?;
        Ok(HttpsHealth { client, url })
    }
}

#[async_trait]
impl HealthCheck for HttpsHealth {
    fn timeout(&self) -> Duration {
        TIMEOUT
    }

    async fn check(&self) -> Result<(), String> {
        let r = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| format!("{}: {}", self.url, crate::node::chain(&e)))?;
        let status = r.status();
        if status.is_success() {
            return Ok(());
        }
        let body = r.text().await.unwrap_or_default();
        // /readyz lists the failing checks as `[-]name failed`.
        let failing: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("[-]"))
            .take(3)
            .collect();
        Err(format!(
            "{} answered {status}{}",
            self.url,
            if failing.is_empty() {
                String::new()
            } else {
                format!(": {}", failing.join("; "))
            }
        ))
    }
}
