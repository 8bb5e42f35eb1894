//! `osctl events [-f] [--tail N]`: what machined did, in order.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{EventsRequest, NodeEvent};

use super::session::{print_streams, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Events {
    /// Keep printing new events.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Events from the end to show first (0: all the node keeps).
    #[arg(long, default_value = "0")]
    pub tail: u32,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `2026-12-02T01:02:03.456Z  service  etcd healthy`.
fn line(e: &NodeEvent) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z  {:<8} {}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond(),
        e.kind,
        e.message
    )
}

impl Events {
    pub async fn run(mut self) -> Result<ExitCode> {
        if self.follow {
            // A follow has no natural end; the per-call timeout must not cut it.
            self.connect.timeout = u64::MAX / 4;
        }
        let s = Session::mutual(&self.connect)?;
        let req = EventsRequest {
            follow: self.follow,
            tail: self.tail,
        };
        Ok(print_streams(
            &s,
            |ch| async move { rpc(MachineServiceClient::new(ch).events(req).await) },
            line,
        )
        .await)
    }
}
