//! `osctl reboot`, `osctl shutdown`, `osctl reset` and `osctl rollback`.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{Empty, ResetRequest};

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Power {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Copy)]
pub enum PowerAction {
    Reboot,
    Shutdown,
}

impl Power {
    pub async fn run(self, action: PowerAction) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let res = s
            .call(|ch| async move {
                let mut c = MachineServiceClient::new(ch);
                rpc(match action {
                    PowerAction::Reboot => c.reboot(Empty {}).await,
                    PowerAction::Shutdown => c.shutdown(Empty {}).await,
                })
            })
            .await;
        let word = match action {
            PowerAction::Reboot => "rebooting",
            PowerAction::Shutdown => "shutting down",
        };
        Ok(print(s.output, &res, &[], |_| vec![vec![word.to_owned()]]))
    }
}

#[derive(Debug, Args)]
pub struct Reset {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Leave the etcd cluster first (recommended when other members remain).
    #[arg(long)]
    pub graceful: bool,
}

impl Reset {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let graceful = self.graceful;
        let res = s
            .call(|ch| async move {
                rpc(MachineServiceClient::new(ch)
                    .reset(ResetRequest { graceful })
                    .await)
            })
            .await;
        Ok(print(s.output, &res, &[], |_| {
            vec![vec![
                "reset: config and data wiped; the node is back in maintenance mode".into(),
            ]]
        }))
    }
}

#[derive(Debug, Args)]
pub struct Rollback {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl Rollback {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let res = s
            .call(|ch| async move { rpc(MachineServiceClient::new(ch).rollback(Empty {}).await) })
            .await;
        Ok(print(s.output, &res, &["SLOT", "MESSAGE"], |r| {
            vec![vec![r.slot.clone(), r.message.clone()]]
        }))
    }
}
