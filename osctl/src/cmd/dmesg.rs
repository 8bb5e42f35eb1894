//! `osctl dmesg [-f] [--tail N]`: the node's kernel log.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{DmesgRequest, LogLine};

use super::session::{print_streams, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Dmesg {
    /// Keep printing new kernel messages.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Records from the end to show first (0: all the kernel keeps).
    #[arg(long, default_value = "0")]
    pub tail: u32,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl Dmesg {
    pub async fn run(mut self) -> Result<ExitCode> {
        if self.follow {
            // A follow has no natural end; the per-call timeout must not cut it.
            self.connect.timeout = u64::MAX / 4;
        }
        let s = Session::mutual(&self.connect)?;
        let req = DmesgRequest {
            follow: self.follow,
            tail: self.tail,
        };
        Ok(print_streams(
            &s,
            |ch| async move { rpc(MachineServiceClient::new(ch).dmesg(req).await) },
            |l: &LogLine| l.line.clone(),
        )
        .await)
    }
}
