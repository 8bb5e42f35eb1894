//! `osctl upgrade --image FILE`: streams an upgrade bundle (`imager
//! build`'s NAME-upgrade.tar) to each node. The bundle is checked here
//! first (so a damaged file fails before it is sent), and again by every
//! node, which also checks the signature against its trusted image keys.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::UpgradeRequest;
use tokio::io::AsyncReadExt;

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

/// Bytes per message: well under the gRPC default message limit (4 MiB).
const CHUNK: usize = 1 << 20;

#[derive(Debug, Args)]
pub struct Upgrade {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The upgrade bundle (NAME-upgrade.tar from `imager build`).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// Install into the other slot but do not reboot: the next reboot
    /// starts the new version.
    #[arg(long)]
    pub stage: bool,
    /// Seconds a node has for the whole transfer and install (the
    /// per-call --timeout is for quick calls).
    #[arg(long, default_value = "1800", value_name = "SECONDS")]
    pub upload_timeout: u64,
}

/// Checks the bundle's structure and every file against its manifest.
fn check_locally(path: &std::path::Path) -> Result<machine_api::image_bundle::Verified> {
    let f = std::fs::File::open(path).with_context(|| format!("--image {}", path.display()))?;
    machine_api::image_bundle::read(std::io::BufReader::new(f), &[], &mut |_, r| {
        std::io::copy(r, &mut std::io::sink()).map(drop)
    })
    .with_context(|| format!("--image {}", path.display()))
}

impl Upgrade {
    pub async fn run(mut self) -> Result<ExitCode> {
        let local = check_locally(&self.image)?;
        eprintln!(
            "{}: upgrade bundle of {} (manifest sha256 {}), {}",
            self.image.display(),
            local.manifest.profile.name,
            &local.manifest_sha256[..16],
            if local.signed { "signed" } else { "unsigned" }
        );
        self.connect.timeout = self.connect.timeout.max(self.upload_timeout);
        let s = Session::mutual(&self.connect)?;
        let (image, stage) = (self.image.clone(), self.stage);
        let res = s
            .call(|ch| {
                let image = image.clone();
                async move {
                    let file = tokio::fs::File::open(&image)
                        .await
                        .with_context(|| format!("--image {}", image.display()))?;
                    let stream = futures::stream::unfold(
                        (file, true, false),
                        move |(mut file, first, done)| async move {
                            if done {
                                return None;
                            }
                            let mut buf = vec![0u8; CHUNK];
                            let n = match file.read(&mut buf).await {
                                Ok(0) if !first => return None,
                                Ok(n) => n,
                                // The node sees the stream end early and
                                // refuses the truncated bundle.
                                Err(_) => return None,
                            };
                            buf.truncate(n);
                            let msg = UpgradeRequest {
                                chunk: buf,
                                stage: first && stage,
                            };
                            Some((msg, (file, false, n == 0)))
                        },
                    );
                    rpc(MachineServiceClient::new(ch).upgrade(stream).await)
                }
            })
            .await;
        Ok(print(
            s.output,
            &res,
            &["SLOT", "SIGNED BY", "MESSAGE"],
            |r| {
                vec![vec![
                    r.slot.clone(),
                    if r.signed_by.is_empty() {
                        "-".into()
                    } else {
                        r.signed_by.clone()
                    },
                    r.message.clone(),
                ]]
            },
        ))
    }
}
