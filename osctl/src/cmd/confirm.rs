//! `osctl confirm`: keep a config applied with `--mode try`.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::Empty;

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Confirm {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl Confirm {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let res = s
            .call(|ch| async move {
                rpc(MachineServiceClient::new(ch)
                    .confirm_configuration(Empty {})
                    .await)
            })
            .await;
        Ok(print(s.output, &res, &[], |r| {
            vec![vec![r.message.clone()]]
        }))
    }
}
