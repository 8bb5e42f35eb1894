//! `osctl bootstrap`: create the etcd cluster on the first etcd node.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use machine_api::proto::etcd_service_client::EtcdServiceClient;
use machine_api::proto::{Empty, EtcdBootstrapResponse};
use tonic::transport::Channel;

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Bootstrap {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Creates the etcd cluster on one node.
pub async fn bootstrap(ch: Channel) -> Result<EtcdBootstrapResponse> {
    rpc(EtcdServiceClient::new(ch).bootstrap(Empty {}).await)
}

impl Bootstrap {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        if s.targets.len() != 1 {
            bail!("bootstrap exactly one node (-n NODE): every other etcd node joins it");
        }
        let res = s.call(bootstrap).await;
        Ok(print(s.output, &res, &[], |r| {
            vec![vec![r.message.clone()]]
        }))
    }
}
