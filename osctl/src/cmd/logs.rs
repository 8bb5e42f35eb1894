//! `osctl logs NAME [-f] [--tail N]`: a service's output.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::service_service_client::ServiceServiceClient;
use machine_api::proto::LogsRequest;

use super::session::{rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Logs {
    /// Service name.
    pub service: String,
    /// Keep printing new lines.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Lines from the end to show first (0: all that the node keeps).
    #[arg(long, default_value = "100")]
    pub tail: u32,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl Logs {
    pub async fn run(mut self) -> Result<ExitCode> {
        if self.follow {
            // A follow has no natural end; the per-call timeout must not cut it.
            self.connect.timeout = u64::MAX / 4;
        }
        let s = Session::mutual(&self.connect)?;
        let multi = s.targets.len() > 1;
        let req = LogsRequest {
            service: self.service.clone(),
            tail: self.tail,
            follow: self.follow,
        };
        let res = s
            .call_named(|node, ch| {
                let req = req.clone();
                let prefix = if multi {
                    format!("{node}: ")
                } else {
                    String::new()
                };
                async move {
                    let mut stream = rpc(ServiceServiceClient::new(ch).logs(req).await)?;
                    loop {
                        match stream.message().await {
                            Ok(Some(l)) => println!("{prefix}{}", l.line),
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
