//! `osctl bootstrap`: create the etcd cluster on the first etcd node.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use machine_api::proto::etcd_service_client::EtcdServiceClient;
use machine_api::proto::Empty;

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Bootstrap {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl Bootstrap {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        if s.targets.len() != 1 {
            bail!("bootstrap exactly one node (-n NODE): every other etcd node joins it");
        }
        let res = s
            .call(|ch| async move { rpc(EtcdServiceClient::new(ch).bootstrap(Empty {}).await) })
            .await;
        Ok(print(s.output, &res, &[], |r| {
            vec![vec![r.message.clone()]]
        }))
    }
}
