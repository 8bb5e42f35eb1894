//! `osctl get config`: the running config, secrets redacted.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, ValueEnum};
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::Empty;

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Resource {
    /// The machine config (private keys and tokens redacted).
    Config,
}

/// The running config as structured data (for -o json/yaml) and as text.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigView {
    config: serde_json::Value,
    #[serde(skip)]
    text: String,
    staged_pending: bool,
    try_deadline_unix_ms: u64,
}

#[derive(Debug, Args)]
pub struct Get {
    pub resource: Resource,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl Get {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let res = s
            .call(|ch| async move {
                let r = rpc(MachineServiceClient::new(ch)
                    .get_configuration(Empty {})
                    .await)?;
                let text = String::from_utf8_lossy(&r.data).into_owned();
                machine_api::config::check_limits(&text)
                    .map_err(|p| anyhow::anyhow!("the node's config: {p}"))?;
                Ok(ConfigView {
                    config: serde_norway::from_str(&text)?,
                    text,
                    staged_pending: r.staged_pending,
                    try_deadline_unix_ms: r.try_deadline_unix_ms,
                })
            })
            .await;
        Ok(print(s.output, &res, &[], |r| {
            let mut out = vec![vec![r.text.trim_end().to_owned()]];
            if r.staged_pending {
                out.push(vec!["# a staged config waits for the next reboot".into()]);
            }
            if r.try_deadline_unix_ms > 0 {
                out.push(vec![
                    "# this config is on trial: `osctl confirm` keeps it".into()
                ]);
            }
            out
        }))
    }
}
