//! `osctl events [-f] [--tail N]`: what machined did, in order.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{EventsRequest, NodeEvent};

use super::session::{rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Events {
    /// Keep printing new events.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Events from the end to show first (0: all the node keeps).
    #[arg(long, default_value = "0")]
    pub tail: u32,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `2026-12-02T01:02:03.456Z  service  etcd healthy`.
fn line(e: &NodeEvent) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z  {:<8} {}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond(),
        e.kind,
        e.message
    )
}

impl Events {
    pub async fn run(mut self) -> Result<ExitCode> {
        if self.follow {
            // A follow has no natural end; the per-call timeout must not cut it.
            self.connect.timeout = u64::MAX / 4;
        }
        let s = Session::mutual(&self.connect)?;
        let multi = s.targets.len() > 1;
        let req = EventsRequest {
            follow: self.follow,
            tail: self.tail,
        };
        let res = s
            .call_named(|node, ch| {
                let prefix = if multi {
                    format!("{node}: ")
                } else {
                    String::new()
                };
                async move {
                    let mut stream = rpc(MachineServiceClient::new(ch).events(req).await)?;
                    loop {
                        match stream.message().await {
                            Ok(Some(e)) => println!("{prefix}{}", line(&e)),
                            Ok(None) => return Ok(()),
                            Err(e) => return Err(anyhow::anyhow!(crate::client::status_line(&e))),
                        }
                    }
                }
            })
            .await;
        let mut code = ExitCode::SUCCESS;
        for (node, r) in res {
            if let Err(e) = r {
                eprintln!("error: node {node}: {e:#}");
                code = ExitCode::FAILURE;
            }
        }
        Ok(code)
    }
}
