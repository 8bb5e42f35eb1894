//! `osctl apply-config`: send a machine config to nodes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};
use machine_api::config::MachineConfig;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{
    ApplyConfigurationRequest, ApplyConfigurationResponse, ApplyMode, APPLY_OUTCOME_INVALID,
};
use tonic::transport::Channel;

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

/// Reads a machine config and checks it locally first: the node would
/// refuse it anyway, and this names the file and line.
pub fn read_checked(file: &Path) -> Result<String> {
    let text = crate::files::read(file)?;
    MachineConfig::parse(&text).map_err(|p| {
        let lines: Vec<String> =
            p.0.iter()
                .map(|x| format!("{}: {x}", file.display()))
                .collect();
        anyhow!(
            "{} is invalid; nothing was sent:\n{}",
            file.display(),
            lines.join("\n")
        )
    })?;
    Ok(text)
}

/// Sends a config to one node.
pub async fn apply(
    ch: Channel,
    req: ApplyConfigurationRequest,
) -> Result<ApplyConfigurationResponse> {
    rpc(MachineServiceClient::new(ch).apply_configuration(req).await)
}

impl ApplyConfig {
    pub async fn run(self) -> Result<ExitCode> {
        let text = read_checked(&self.file)?;
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
        let res = s.call(|ch| apply(ch, req.clone())).await;
        let code = print(s.output, &res, &[], |r| {
            reply_rows(&self.file, self.dry_run, r)
        });
        Ok(if any_invalid(&res) {
            ExitCode::FAILURE
        } else {
            code
        })
    }
}

/// What one node's reply shows: the diff of a dry run, every problem the
/// node found (`FILE: line L: path: message`), then the outcome.
fn reply_rows(file: &Path, dry_run: bool, r: &ApplyConfigurationResponse) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    if dry_run && !r.diff.is_empty() {
        out.push(vec![r.diff.trim_end().to_owned()]);
    }
    for p in &r.problems {
        out.push(vec![format!("{}: {p}", file.display())]);
    }
    let mut line = r.outcome.clone();
    if !r.message.is_empty() {
        line = format!("{line}: {}", r.message);
    } else if !r.problems.is_empty() {
        let n = r.problems.len();
        line = format!("{line}: {n} problem{}", if n == 1 { "" } else { "s" });
    }
    if r.reboot_required && r.outcome != "rebooting" {
        line.push_str(" (reboot required)");
    }
    out.push(vec![line]);
    out
}

/// True when a node found the config invalid (a dry run answers with the
/// problems instead of an error): the command fails.
fn any_invalid(res: &[(String, Result<ApplyConfigurationResponse>)]) -> bool {
    res.iter()
        .any(|(_, r)| r.as_ref().is_ok_and(|r| r.outcome == APPLY_OUTCOME_INVALID))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_dry_run_lists_every_problem_and_fails() {
        let invalid = ApplyConfigurationResponse {
            outcome: APPLY_OUTCOME_INVALID.into(),
            problems: vec![
                "line 6: machine.roles[1]: unknown variant `wrker`".into(),
                "line 9: machine.bogus: unknown field `bogus`".into(),
            ],
            ..Default::default()
        };
        let rows = reply_rows(Path::new("cp.yaml"), true, &invalid);
        let lines: Vec<String> = rows.into_iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            lines,
            vec![
                "cp.yaml: line 6: machine.roles[1]: unknown variant `wrker`",
                "cp.yaml: line 9: machine.bogus: unknown field `bogus`",
                "invalid: 2 problems",
            ]
        );
        let ok = ApplyConfigurationResponse {
            outcome: "dry-run".into(),
            diff: "+ a\n".into(),
            ..Default::default()
        };
        assert_eq!(
            reply_rows(Path::new("cp.yaml"), true, &ok),
            vec![vec!["+ a".to_owned()], vec!["dry-run".to_owned()]]
        );
        assert!(any_invalid(&[
            ("n1".into(), Ok(ok.clone())),
            ("n2".into(), Ok(invalid))
        ]));
        assert!(!any_invalid(&[
            ("n1".into(), Ok(ok)),
            ("n2".into(), Err(anyhow!("down")))
        ]));
    }
}
