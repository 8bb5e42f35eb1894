//! Health checks: the stock ones, and the periodic prober that feeds a
//! running service's state (Running ⇄ Healthy).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::spec::HealthCheck;

/// Time between checks.
const INTERVAL: Duration = Duration::from_secs(1);
/// Between checks until the first success.
const STARTING_INTERVAL: Duration = Duration::from_millis(250);
/// A check that takes longer has failed, unless the check says otherwise
/// ([`HealthCheck::timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Healthy as soon as the process runs: for services without a readiness
/// signal.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysHealthy;

#[async_trait]
impl HealthCheck for AlwaysHealthy {
    async fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Healthy when a TCP connection to the address succeeds (the service
/// listens).
#[derive(Debug, Clone, Copy)]
pub struct TcpConnectCheck(pub SocketAddr);

#[async_trait]
impl HealthCheck for TcpConnectCheck {
    async fn check(&self) -> Result<(), String> {
        tokio::net::TcpStream::connect(self.0)
            .await
            .map(drop)
            .map_err(|e| format!("connect {}: {e}", self.0))
    }
}

/// Runs a health check at once, then every 250 ms until it first passes and
/// every second after, for as long as it lives, sending each result.
/// Dropping it stops the checks.
#[derive(Debug)]
pub(crate) struct Prober {
    task: JoinHandle<()>,
    results: mpsc::Receiver<Result<(), String>>,
}

impl Prober {
    pub(crate) fn start(check: Arc<dyn HealthCheck>) -> Self {
        let (tx, results) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            // Every 250 ms until the first success (a starting service is
            // seen healthy within a quarter second, which is what boot time
            // is made of), then every second. A slow check delays the next
            // one instead of bunching them.
            let mut healthy_once = false;
            loop {
                let limit = check.timeout();
                let result = match tokio::time::timeout(limit, check.check()).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("health check timed out after {limit:?}")),
                };
                healthy_once |= result.is_ok();
                if tx.send(result).await.is_err() {
                    return;
                }
                tokio::time::sleep(if healthy_once {
                    INTERVAL
                } else {
                    STARTING_INTERVAL
                })
                .await;
            }
        });
        Self { task, results }
    }

    /// The next check result. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Option<Result<(), String>> {
        self.results.recv().await
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The next result of an optional prober; never resolves without one.
pub(crate) async fn next_result(prober: &mut Option<Prober>) -> Result<(), String> {
    match prober {
        Some(p) => match p.next().await {
            Some(r) => r,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_check_follows_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let check = TcpConnectCheck(addr);
        assert!(check.check().await.is_ok());
        drop(listener);
        assert!(check.check().await.is_err());
    }

    #[tokio::test]
    async fn prober_checks_at_once_and_times_out_slow_checks() {
        struct Slow;
        #[async_trait]
        impl HealthCheck for Slow {
            async fn check(&self) -> Result<(), String> {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        }
        let mut p = Prober::start(Arc::new(AlwaysHealthy));
        assert_eq!(p.next().await, Some(Ok(())));
        let mut slow = Prober::start(Arc::new(Slow));
        let r = slow.next().await.expect("result");
        assert!(r.is_err_and(|e| e.contains("timed out")));
    }
}
