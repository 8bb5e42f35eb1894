//! `osctl bootstrap`: create the etcd cluster on the first etcd node, or
//! (`--recover-from FILE`) rebuild it from a snapshot after quorum is lost.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use machine_api::etcd_snapshot::{Checked, SnapshotCheck};
use machine_api::proto::etcd_service_client::EtcdServiceClient;
use machine_api::proto::{Empty, EtcdBootstrapResponse, EtcdRecoverRequest};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::session::{print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Bootstrap {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Rebuild the cluster from this snapshot (`osctl etcd snapshot`)
    /// instead of starting it empty: the node becomes the only member of a
    /// new cluster holding the snapshot's keyspace. For a cluster that lost
    /// quorum: reset the other members, recover one, then apply the
    /// others' configs again so they join it.
    #[arg(long, value_name = "FILE")]
    pub recover_from: Option<PathBuf>,
    /// Seconds the whole upload and restore may take.
    #[arg(long, default_value = "3600", value_name = "SECONDS")]
    pub transfer_timeout: u64,
}

/// Chunks of an upload: small enough for gRPC's default message limit.
const CHUNK: usize = 1 << 20;

/// Reads the snapshot once to check it and learn its size and sha256,
/// which go in the first message, so the node can refuse a cut-short or
/// changed upload.
fn check_file(path: &Path) -> Result<Checked> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("--recover-from {}", path.display()))?;
    let mut check = SnapshotCheck::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("--recover-from {}", path.display()))?;
        if n == 0 {
            break;
        }
        check.update(&buf[..n]);
    }
    let c = check.finish();
    if let Some(p) = c.problem(None, None) {
        bail!("--recover-from {}: {p}", path.display());
    }
    Ok(c)
}

/// Uploads the snapshot at `path` (already checked as `c`) to the node.
async fn recover(ch: Channel, path: PathBuf, c: Checked) -> Result<EtcdBootstrapResponse> {
    let file = tokio::fs::File::open(&path)
        .await
        .with_context(|| format!("--recover-from {}", path.display()))?;
    let stream = futures::stream::unfold(
        (file, Some((c.size, c.sha256))),
        |(mut file, first)| async move {
            let mut buf = vec![0u8; CHUNK];
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                // The node sees the upload end early and refuses it.
                Err(_) => return None,
            };
            if n == 0 && first.is_none() {
                return None;
            }
            buf.truncate(n);
            let (size, sha256) = first.unwrap_or_default();
            let msg = EtcdRecoverRequest {
                data: buf,
                size,
                sha256,
            };
            Some((msg, (file, None)))
        },
    );
    rpc(EtcdServiceClient::new(ch).recover(stream).await)
}

/// Creates the etcd cluster on one node.
pub async fn bootstrap(ch: Channel) -> Result<EtcdBootstrapResponse> {
    rpc(EtcdServiceClient::new(ch).bootstrap(Empty {}).await)
}

impl Bootstrap {
    pub async fn run(mut self) -> Result<ExitCode> {
        if self.recover_from.is_some() {
            self.connect.timeout = self.connect.timeout.max(self.transfer_timeout);
        }
        let s = Session::mutual(&self.connect)?;
        if s.targets.len() != 1 {
            bail!("bootstrap exactly one node (-n NODE): every other etcd node joins it");
        }
        let res = match &self.recover_from {
            None => s.call(bootstrap).await,
            Some(path) => {
                let c = check_file(path)?;
                eprintln!(
                    "{}: etcd snapshot, {} bytes, sha256 {}",
                    path.display(),
                    c.size,
                    c.sha256
                );
                s.call(|ch| recover(ch, path.clone(), c.clone())).await
            }
        };
        Ok(print(s.output, &res, &[], |r| {
            vec![vec![r.message.clone()]]
        }))
    }
}
