//! `osctl boot`: this boot's timeline on each node, with guest-uptime stamps
//! and the time each phase took since the one before.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::Empty;

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Boot {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl Boot {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let res = s
            .call(|ch| async move {
                rpc(MachineServiceClient::new(ch).boot_timeline(Empty {}).await)
            })
            .await;
        Ok(print(
            s.output,
            &res,
            &["UPTIME", "+STEP", "PHASE", "DETAIL"],
            |t| {
                let mut prev = 0.0;
                t.marks
                    .iter()
                    .map(|m| {
                        let step = m.uptime_seconds - prev;
                        prev = m.uptime_seconds;
                        vec![
                            format!("{:.2}s", m.uptime_seconds),
                            format!("{step:+.2}s"),
                            m.phase.clone(),
                            m.detail.clone(),
                        ]
                    })
                    .collect()
            },
        ))
    }
}
