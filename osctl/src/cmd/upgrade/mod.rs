//! `osctl upgrade --image FILE|URL`: streams an upgrade bundle (`imager
//! build`'s NAME-upgrade.tar; a URL is downloaded first, see
//! [`download`]) to each node. The bundle is checked here
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
use machine_api::proto::{ResetRequest, UpgradeRequest, UpgradeResponse, VersionResponse};
use tokio::io::AsyncReadExt;

use super::session::{print, rpc, RpcError, Session};
use crate::client::ConnectArgs;

pub mod download;

/// Bytes per message: well under the gRPC default message limit (4 MiB).
const CHUNK: usize = 1 << 20;

#[derive(Debug, Args)]
pub struct Upgrade {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The upgrade bundle (NAME-upgrade.tar from `imager build`): a file,
    /// or an http(s) URL, downloaded once into $TMPDIR for every node.
    #[arg(long, value_name = "FILE|URL")]
    pub image: String,
    /// The bundle's expected sha256 (hex): a download or file that differs
    /// is refused before any node sees it.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// Extra CA certificates (PEM) to trust for an https --image URL,
    /// besides the public web roots.
    #[arg(long, value_name = "FILE")]
    pub image_ca: Option<PathBuf>,
    /// Install into the other slot but do not reboot: the next reboot
    /// starts the new version.
    #[arg(long)]
    pub stage: bool,
    /// Keep each node's data on /var (etcd, containerd, kubelet) across
    /// the upgrade: the default. `--preserve=false` makes each node leave
    /// etcd and wipe that data first (`reset --graceful --wipe ephemeral`:
    /// refused on the last etcd member) and wait healthy again, so the new
    /// version starts from an empty /var; it needs --wait and no --stage.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub preserve: bool,
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

/// A bundle checked here: what the manifest check found, and the sha256
/// of the whole file (what `--sha256` pins).
struct Checked {
    verified: machine_api::image_bundle::Verified,
    sha256: String,
}

/// Checks the bundle's structure and every file against its manifest,
/// and the whole file against `pin`, in one read; `name` is what the user
/// gave.
fn check_locally(path: &std::path::Path, name: &str, pin: Option<&str>) -> Result<Checked> {
    let f = std::fs::File::open(path).with_context(|| format!("--image {name}"))?;
    let mut hashing = HashingReader {
        inner: std::io::BufReader::new(f),
        hash: <sha2::Sha256 as sha2::Digest>::new(),
    };
    let verified = machine_api::image_bundle::read(&mut hashing, &[], &mut |_, r| {
        std::io::copy(r, &mut std::io::sink()).map(drop)
    })
    .with_context(|| format!("--image {name}"))?;
    // Whatever follows the tar's end counts too.
    std::io::copy(&mut hashing, &mut std::io::sink()).with_context(|| format!("--image {name}"))?;
    let sha256 = hex::encode(sha2::Digest::finalize(hashing.hash));
    if let Some(want) = pin {
        if !sha256.eq_ignore_ascii_case(want.trim()) {
            bail!("--image {name}: its sha256 is {sha256}, --sha256 says {want}: refused (this is not the file you pinned)");
        }
    }
    Ok(Checked { verified, sha256 })
}

/// Hashes what is read through it.
struct HashingReader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        Ok(n)
    }
}

impl Upgrade {
    pub async fn run(mut self) -> Result<ExitCode> {
        if !self.preserve && (self.stage || self.wait == 0) {
            bail!("--preserve=false wipes each node's data just before its upgrade, one node at a time: it cannot be combined with --stage or --wait 0");
        }
        // A URL is fetched once; the temporary file lives until the end.
        let download = if download::is_url(&self.image) {
            Some(
                download::download(
                    &self.image,
                    self.image_ca.as_deref(),
                    download::MAX_BUNDLE_BYTES,
                )
                .await?,
            )
        } else {
            None
        };
        let path = download
            .as_ref()
            .map_or_else(|| PathBuf::from(&self.image), |d| d.path().to_owned());
        let Checked {
            verified: local,
            sha256,
        } = check_locally(&path, &self.image, self.sha256.as_deref())?;
        if self.image.starts_with("http://") && self.sha256.is_none() && !local.signed {
            eprintln!(
                "warning: {} is an unsigned bundle over plain http with no --sha256: nothing tells whether it was replaced on the way; sign images (imager build --sign) or pin them",
                self.image
            );
        }
        eprintln!(
            "{}: upgrade bundle of {} (manifest sha256 {}), {}; sha256 {sha256}",
            self.image,
            local.manifest.profile.name,
            &local.manifest_sha256[..16],
            if local.signed { "signed" } else { "unsigned" }
        );
        let call_timeout = self.connect.timeout;
        self.connect.timeout = self.connect.timeout.max(self.upload_timeout);
        let s = Session::mutual(&self.connect)?;
        let (image, stage) = (path, self.stage);
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
                let done = upgrade_one(&one, &check, &image, &want, self.preserve, limit).await;
                let failed = done.is_err();
                res.push((t.clone(), done));
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

/// One node of a rollout: with `preserve` false its data is wiped first;
/// the bundle goes through `one` (the upload's timeout), and `check` waits
/// until the node is back healthy on the new slot.
async fn upgrade_one(
    one: &Session,
    check: &Session,
    image: &std::path::Path,
    want: &Want,
    preserve: bool,
    limit: Duration,
) -> Result<UpgradeResponse> {
    if !preserve {
        wipe_first(check, limit).await?;
    }
    let started = Instant::now();
    let (node, sent) = one
        .call(|ch| send(ch, image.to_owned(), false))
        .await
        .remove(0);
    match sent {
        Ok(reply) => {
            eprintln!("{node}: {}", reply.message);
            let want = Want {
                slot: Some(reply.slot.clone()).filter(|s| !s.is_empty()),
                ..want.clone()
            };
            wait_back(check, &want, started, limit).await.map(|_| reply)
        }
        // The connection dropped after the upload: the node may have
        // installed the bundle and rebooted before its answer got out.
        // Which version it boots tells.
        Err(e) if maybe_installed(&e) => {
            eprintln!(
                "{node}: no answer after the upload ({e:#}); waiting to see which version it boots"
            );
            wait_back(check, want, started, limit)
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
    }
}

/// What keeps the node on `s` from being healthy now (None: nothing).
async fn health_problem(s: &Session) -> Option<String> {
    match s.call(super::health::health).await.remove(0).1 {
        Ok(h) => super::health::unhealthy(&h).map(|why| format!("unhealthy: {why}")),
        Err(e) => Some(format!("{e:#}")),
    }
}

/// `--preserve=false`: the node leaves etcd and wipes its data on /var
/// (the node refuses when it holds the last copy of etcd's data), then
/// osctl waits until its services are healthy again with the same config.
async fn wipe_first(s: &Session, limit: Duration) -> Result<()> {
    let node = &s.targets[0];
    let req = ResetRequest {
        graceful: true,
        wipe: "ephemeral".into(),
        force: false,
    };
    s.call(|ch| {
        let req = req.clone();
        async move { rpc(MachineServiceClient::new(ch).reset(req).await) }
    })
    .await
    .remove(0)
    .1
    .with_context(|| format!("--preserve=false: wiping {node}'s data before its upgrade"))?;
    eprintln!("{node}: left etcd and wiped its data on /var (--preserve=false); waiting for it to be healthy again");
    let deadline = Instant::now() + limit;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match health_problem(s).await {
            None => return Ok(()),
            Some(why) => last = why,
        }
    }
    bail!(
        "--preserve=false: {node} was wiped but not healthy again within {} s (last: {last}); it was not upgraded",
        limit.as_secs()
    )
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
        match health_problem(s).await {
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
            Some(why) => last = why,
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
