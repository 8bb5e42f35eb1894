//! `osctl version`: the client's version and every node's.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{Empty, VersionResponse};
use tonic::transport::Channel;

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Version {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Talk to a node in maintenance mode (no client certificate).
    #[arg(long)]
    pub insecure: bool,
    /// With --insecure: the node's certificate SHA-256, as printed on its console.
    #[arg(long, requires = "insecure")]
    pub cert_fingerprint: Option<String>,
    /// Print only the client version.
    #[arg(long)]
    pub client: bool,
}

/// A node's version, name, mode and roles.
pub async fn version(ch: Channel) -> Result<VersionResponse> {
    rpc(MachineServiceClient::new(ch).version(Empty {}).await)
}

impl Version {
    pub async fn run(self) -> Result<ExitCode> {
        if self.connect.output == crate::client::Output::Table || self.client {
            println!("Client: osctl {}", env!("CARGO_PKG_VERSION"));
        }
        if self.client {
            return Ok(ExitCode::SUCCESS);
        }
        let s = if self.insecure {
            Session::insecure(&self.connect, self.cert_fingerprint.clone())?
        } else {
            Session::mutual(&self.connect)?
        };
        let res = s.call(version).await;
        Ok(print(
            s.output,
            &res,
            &[
                "NAME", "VERSION", "IMAGE", "SLOTS", "MODE", "ROLES", "UPTIME",
            ],
            |v| {
                vec![vec![
                    v.node.clone(),
                    v.version.clone(),
                    if v.image_version.is_empty() {
                        "-".into()
                    } else {
                        v.image_version.clone()
                    },
                    slots(v),
                    if v.maintenance {
                        "maintenance".into()
                    } else {
                        "configured".into()
                    },
                    v.roles.join(","),
                    format!("{:.1}s", v.uptime_ms as f64 / 1000.0),
                ]]
            },
        ))
    }
}

/// The boot entries in boot order, the running one starred: `*B 2.0 good,
/// A 1.0 good`. `-` when the node did not boot from a disk slot.
fn slots(v: &VersionResponse) -> String {
    if v.slots.is_empty() {
        return if v.slot.is_empty() {
            "-".into()
        } else {
            format!("*{}", v.slot)
        };
    }
    v.slots
        .iter()
        .map(|e| {
            format!(
                "{}{} {} {}",
                if e.running { "*" } else { "" },
                e.slot,
                if e.version.is_empty() {
                    "?"
                } else {
                    &e.version
                },
                e.state
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
