//! `osctl health [--wait SECONDS]`: is every service healthy?

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{Empty, HealthResponse};
use machine_api::retry::Backoff;
use tonic::transport::Channel;

use super::services::{row, HEADER};
use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Health {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Wait up to this many seconds for every node to become healthy,
    /// printing progress.
    #[arg(long, value_name = "SECONDS")]
    pub wait: Option<u64>,
}

/// One node's health.
pub async fn health(ch: Channel) -> Result<HealthResponse> {
    rpc(MachineServiceClient::new(ch).health(Empty {}).await)
}

/// Why a node is not healthy (None when it is): maintenance mode, or each
/// service that is not healthy with its state and message.
pub fn unhealthy(h: &HealthResponse) -> Option<String> {
    if h.healthy {
        return None;
    }
    if h.maintenance {
        return Some("maintenance mode (no config)".to_owned());
    }
    let bad: Vec<String> = h
        .services
        .iter()
        .filter(|x| !x.healthy)
        .map(|x| {
            format!(
                "{} {}{}",
                x.name,
                x.state,
                if x.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", x.message)
                }
            )
        })
        .collect();
    Some(bad.join("; "))
}

impl Health {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        // With --wait, ask again every 2 s until every node is healthy or
        // the time is up; without it, once.
        let mut backoff = match self.wait {
            Some(w) => Backoff::constant(Duration::from_secs(2)).timeout(Duration::from_secs(w)),
            None => Backoff::constant(Duration::from_secs(2)).max_attempts(1),
        };
        let session = &s;
        let res = backoff
            .retry(
                move || async move {
                    let res = session
                        .call(|ch| async move {
                            let h = health(ch).await?;
                            match unhealthy(&h) {
                                None => Ok(h),
                                Some(why) => Err(anyhow::anyhow!("unhealthy: {why}")),
                            }
                        })
                        .await;
                    if res.iter().all(|(_, r)| r.is_ok()) {
                        Ok(res)
                    } else {
                        Err(res)
                    }
                },
                |res, _| {
                    let waiting: Vec<String> = res
                        .iter()
                        .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e:#}")))
                        .collect();
                    eprintln!("waiting: {}", waiting.join(" | "));
                    true
                },
            )
            .await
            .unwrap_or_else(|res| res);
        // What the node wants the operator to know (a rollback, a role
        // that cannot start): beside the table, never in place of it.
        for (node, r) in &res {
            if let Ok(h) = r {
                if !h.last_event.is_empty() {
                    eprintln!("{node}: last event: {}", h.last_event);
                }
            }
        }
        Ok(print(s.output, &res, HEADER, |h| {
            h.services.iter().map(row).collect()
        }))
    }
}
