//! `osctl logs NAME [-f] [--tail N]`: a service's output.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::service_service_client::ServiceServiceClient;
use machine_api::proto::{LogLine, LogsRequest};

use super::session::{print_streams, rpc, Session};
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
        let req = LogsRequest {
            service: self.service.clone(),
            tail: self.tail,
            follow: self.follow,
        };
        Ok(print_streams(
            &s,
            |ch| {
                let req = req.clone();
                async move { rpc(ServiceServiceClient::new(ch).logs(req).await) }
            },
            |l: &LogLine| l.line.clone(),
        )
        .await)
    }
}
