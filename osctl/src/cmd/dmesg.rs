//! `osctl dmesg [-f] [--tail N]`: the node's kernel log.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::DmesgRequest;

use super::session::{rpc, Session};
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
        let multi = s.targets.len() > 1;
        let req = DmesgRequest {
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
                    let mut stream = rpc(MachineServiceClient::new(ch).dmesg(req).await)?;
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
