//! `osctl health [--wait SECONDS]`: is every service healthy?

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::Empty;

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

impl Health {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let deadline = self.wait.map(|w| Instant::now() + Duration::from_secs(w));
        loop {
            let res = s
                .call(|ch| async move {
                    let h = rpc(MachineServiceClient::new(ch).health(Empty {}).await)?;
                    if h.healthy {
                        Ok(h)
                    } else {
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
                        Err(anyhow::anyhow!(
                            "unhealthy: {}",
                            if h.maintenance {
                                "maintenance mode (no config)".to_owned()
                            } else {
                                bad.join("; ")
                            }
                        ))
                    }
                })
                .await;
            let all_ok = res.iter().all(|(_, r)| r.is_ok());
            match deadline {
                Some(d) if !all_ok && Instant::now() < d => {
                    let waiting: Vec<String> = res
                        .iter()
                        .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e:#}")))
                        .collect();
                    eprintln!("waiting: {}", waiting.join(" | "));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                _ => {
                    return Ok(print(s.output, &res, HEADER, |h| {
                        h.services.iter().map(row).collect()
                    }))
                }
            }
        }
    }
}
