//! `osctl upgrade --image FILE`: streams an upgrade bundle (`imager
//! build`'s NAME-upgrade.tar) to each node. The bundle is checked here
//! first (so a damaged file fails before it is sent), and again by every
//! node, which also checks the signature against its trusted image keys.
//!
//! Nodes are upgraded one at a time: after a node takes the bundle and
//! reboots, osctl waits (`--wait`) until it answers again from the new
//! slot with every service healthy (an etcd member: etcd healthy, so it
//! has a leader and serves reads) before the next node is touched. A node
//! that comes back on its old slot (the new system never became healthy
//! and systemd-boot fell back) stops the rollout with an error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{UpgradeRequest, UpgradeResponse, VersionResponse};
use tokio::io::AsyncReadExt;

use super::session::{print, rpc, RpcError, Session};
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
    /// Seconds to wait for each node to come back healthy from the new
    /// slot before the next node is upgraded; 0 sends the bundle to every
    /// node at once and returns when they have taken it.
    #[arg(long, default_value = "900", value_name = "SECONDS")]
    pub wait: u64,
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
        let call_timeout = self.connect.timeout;
        self.connect.timeout = self.connect.timeout.max(self.upload_timeout);
        let s = Session::mutual(&self.connect)?;
        let (image, stage) = (self.image.clone(), self.stage);
        let res = if self.wait == 0 || stage {
            s.call(|ch| send(ch, image.clone(), stage)).await
        } else {
            // One node at a time; a node that does not come back healthy
            // on the new slot stops the rollout.
            let mut res = Vec::new();
            let want = Want {
                version: local.manifest.image_version.clone(),
                slot: None,
            };
            for (i, t) in s.targets.iter().enumerate() {
                let one = s.only(t, Duration::from_secs(self.upload_timeout));
                let check = s.only(t, Duration::from_secs(call_timeout));
                let limit = Duration::from_secs(self.wait);
                let started = Instant::now();
                let mut r = one.call(|ch| send(ch, image.clone(), false)).await;
                let (node, sent) = r.remove(0);
                let done = match sent {
                    Ok(reply) => {
                        eprintln!("{node}: {}", reply.message);
                        let want = Want {
                            slot: Some(reply.slot.clone()).filter(|s| !s.is_empty()),
                            ..want.clone()
                        };
                        wait_back(&check, &want, started, limit)
                            .await
                            .map(|_| reply)
                    }
                    // The connection dropped after the upload: the node may
                    // have installed the bundle and rebooted before its
                    // answer got out. Which version it boots tells.
                    Err(e) if maybe_installed(&e) => {
                        eprintln!(
                            "{node}: no answer after the upload ({e:#}); waiting to see which version it boots"
                        );
                        wait_back(&check, &want, started, limit)
                            .await
                            .map(|v| UpgradeResponse {
                                slot: v.slot.clone(),
                                running_slot: v.slot.clone(),
                                message: format!(
                                    "running {} on slot {} (the node's answer to the upload was lost)",
                                    v.image_version, v.slot
                                ),
                                ..Default::default()
                            })
                    }
                    Err(e) => Err(e),
                };
                let failed = done.is_err();
                res.push((node, done));
                if failed {
                    for rest in &s.targets[i + 1..] {
                        res.push((
                            rest.clone(),
                            Err(anyhow::anyhow!("not upgraded: the rollout stopped at {t}")),
                        ));
                    }
                    break;
                }
            }
            res
        };
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

/// Streams the bundle at `image` to the node on `ch`.
async fn send(
    ch: tonic::transport::Channel,
    image: PathBuf,
    stage: bool,
) -> Result<UpgradeResponse> {
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
                // The node sees the stream end early and refuses the
                // truncated bundle.
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

/// What a node must come back running.
#[derive(Clone, Debug)]
struct Want {
    /// The bundle's image version (empty in bundles that do not record it).
    version: String,
    /// The slot the node said it installed into, when its answer arrived.
    slot: Option<String>,
}

/// A failed upload call that may still have installed the bundle: the
/// connection broke (no status from the node, or a transport one), as
/// when the node reboots before its answer is through.
fn maybe_installed(e: &anyhow::Error) -> bool {
    matches!(
        RpcError::code_of(e),
        None | Some(tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
    )
}

/// Waits until the node rebooted (its uptime is shorter than the time
/// since the upload started) and answers running what `want` says with
/// every service healthy; the node's version when it does.
async fn wait_back(
    s: &Session,
    want: &Want,
    started: Instant,
    limit: Duration,
) -> Result<VersionResponse> {
    let waiting = Instant::now();
    let deadline = waiting + limit;
    let mut last = String::from("no answer yet");
    let mut rebooted = false;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let v = match s.call(super::version::version).await.remove(0).1 {
            Ok(v) => v,
            Err(e) => {
                last = format!("{e:#}");
                continue;
            }
        };
        if !rebooted && Duration::from_millis(v.uptime_ms) < started.elapsed() {
            rebooted = true;
            eprintln!(
                "{}: back after the reboot, on slot {} running {}",
                s.targets[0], v.slot, v.image_version
            );
        }
        if !rebooted {
            last = "not rebooted yet".into();
            continue;
        }
        let wrong_slot = want.slot.as_ref().is_some_and(|w| *w != v.slot);
        let wrong_version = !want.version.is_empty() && want.version != v.image_version;
        if wrong_slot || wrong_version {
            bail!(
                "the node came back on slot {} running {} instead of {}{}: the new system did not become healthy and the node fell back (see `osctl events` and `osctl health`)",
                v.slot,
                v.image_version,
                want.slot
                    .as_ref()
                    .map(|w| format!("slot {w} "))
                    .unwrap_or_default(),
                if want.version.is_empty() {
                    "the bundle".to_owned()
                } else {
                    format!("the bundle's {}", want.version)
                }
            );
        }
        match s.call(super::health::health).await.remove(0).1 {
            Ok(h) => match super::health::unhealthy(&h) {
                None => {
                    eprintln!(
                        "{}: healthy on slot {} (image {}) {:.1}s after the upload ended, {:.1}s after it began",
                        s.targets[0],
                        v.slot,
                        v.image_version,
                        waiting.elapsed().as_secs_f64(),
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(v);
                }
                Some(why) => last = format!("unhealthy: {why}"),
            },
            Err(e) => last = format!("{e:#}"),
        }
    }
    bail!(
        "not back healthy running {} within {} s (last: {last}); later nodes were not upgraded",
        if want.version.is_empty() {
            "the bundle"
        } else {
            want.version.as_str()
        },
        limit.as_secs()
    )
}
