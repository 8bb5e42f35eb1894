//! `osctl apply-config`: send a machine config to nodes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};
use machine_api::config::MachineConfig;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{ApplyConfigurationRequest, ApplyMode};

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mode {
    /// Apply live where possible, otherwise reboot.
    Auto,
    /// Apply live; refuse changes that need a reboot.
    NoReboot,
    /// Store for the next boot.
    Staged,
    /// Apply live; roll back unless confirmed (`osctl confirm`) in --try-timeout.
    Try,
}

#[derive(Debug, Args)]
pub struct ApplyConfig {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The machine config to apply.
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Talk to a node in maintenance mode (no client certificate yet).
    #[arg(long)]
    pub insecure: bool,
    /// With --insecure: the node's certificate SHA-256, as printed on its console.
    #[arg(long, requires = "insecure")]
    pub cert_fingerprint: Option<String>,
    /// The maintenance token printed on the node's console.
    #[arg(long, env = "OSCTL_MAINTENANCE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long, short = 'm', value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Seconds a `try` waits for confirmation.
    #[arg(long, default_value = "60")]
    pub try_timeout: u32,
    /// Print what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl ApplyConfig {
    pub async fn run(self) -> Result<ExitCode> {
        let text = crate::files::read(&self.file)?;
        // Check locally first: the node would refuse it anyway, and this
        // names the file and line.
        MachineConfig::parse(&text).map_err(|p| {
            let lines: Vec<String> =
                p.0.iter()
                    .map(|x| format!("{}: {x}", self.file.display()))
                    .collect();
            anyhow!(
                "{} is invalid; nothing was sent:\n{}",
                self.file.display(),
                lines.join("\n")
            )
        })?;
        let s = if self.insecure {
            Session::insecure(&self.connect, self.cert_fingerprint.clone())?
        } else {
            Session::mutual(&self.connect)?
        };
        let mode = match self.mode {
            Mode::Auto => ApplyMode::Auto,
            Mode::NoReboot => ApplyMode::NoReboot,
            Mode::Staged => ApplyMode::Staged,
            Mode::Try => ApplyMode::Try,
        };
        let req = ApplyConfigurationRequest {
            data: text.into_bytes(),
            mode: mode as i32,
            dry_run: self.dry_run,
            maintenance_token: self.token.as_deref().unwrap_or_default().trim().to_owned(),
            try_timeout_seconds: self.try_timeout,
        };
        let res = s
            .call(|ch| {
                let req = req.clone();
                async move { rpc(MachineServiceClient::new(ch).apply_configuration(req).await) }
            })
            .await;
        Ok(print(s.output, &res, &[], |r| {
            let mut out = Vec::new();
            if self.dry_run && !r.diff.is_empty() {
                out.push(vec![r.diff.trim_end().to_owned()]);
            }
            let mut line = r.outcome.clone();
            if !r.message.is_empty() {
                line = format!("{line}: {}", r.message);
            }
            if r.reboot_required && r.outcome != "rebooting" {
                line.push_str(" (reboot required)");
            }
            out.push(vec![line]);
            out
        }))
    }
}
