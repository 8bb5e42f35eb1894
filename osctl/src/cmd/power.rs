//! `osctl reboot`, `osctl shutdown`, `osctl reset` and `osctl rollback`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, ValueEnum};
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

/// What `osctl reset` wipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WipeMode {
    /// The config and all data (etcd, containerd, kubelet, secrets,
    /// etcd snapshots); the node returns to maintenance mode.
    All,
    /// The config and the node's identity (secrets, kept certificates, the
    /// bootstrap mark) and etcd data; the rest of /var (containerd's
    /// images, kubelet's data, etcd snapshots, logs) stays. The node
    /// returns to maintenance mode.
    State,
    /// The data on /var (etcd, containerd, kubelet); the config stays and
    /// the services start afresh with it: an etcd member joins its cluster
    /// again as a new member, a lone one starts a new, empty cluster.
    Ephemeral,
}

impl WipeMode {
    fn wire(self) -> &'static str {
        match self {
            WipeMode::All => "all",
            WipeMode::State => "state",
            WipeMode::Ephemeral => "ephemeral",
        }
    }

    /// What was wiped and where the node is now.
    fn done(self) -> &'static str {
        match self {
            WipeMode::All => "reset: config and all data wiped; the node is in maintenance mode",
            WipeMode::State => "reset: config, identity and etcd data wiped (the rest of /var kept); the node is in maintenance mode",
            WipeMode::Ephemeral => "reset: etcd, containerd and kubelet data wiped (config kept); the services are starting again with the same config",
        }
    }
}

#[derive(Debug, Args)]
pub struct Reset {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Leave the etcd cluster first (recommended when other members remain).
    #[arg(long)]
    pub graceful: bool,
    /// What to wipe.
    #[arg(long, value_enum, default_value_t = WipeMode::All)]
    pub wipe: WipeMode,
    /// Wipe even when this node holds the last copy of its etcd cluster's
    /// data (it is the only member, or etcd cannot say): without it, such
    /// a reset is refused.
    #[arg(long)]
    pub force: bool,
}

impl Reset {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let req = ResetRequest {
            graceful: self.graceful,
            wipe: self.wipe.wire().into(),
            force: self.force,
        };
        let res = s
            .call(|ch| {
                let req = req.clone();
                async move { rpc(MachineServiceClient::new(ch).reset(req).await) }
            })
            .await;
        let done = self.wipe.done();
        Ok(print(s.output, &res, &[], |_| vec![vec![done.into()]]))
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
