//! MachineService: version, config apply/confirm/get, health, power.

use std::sync::Arc;
use std::time::Duration;

use machine_api::proto::machine_service_server::MachineService;
use machine_api::proto::{
    ApplyConfigurationRequest, ApplyConfigurationResponse, ApplyMode as ProtoMode, BootMark,
    BootTimelineResponse, ConfirmConfigurationResponse, DmesgRequest, Empty, EventsRequest,
    GetConfigurationResponse, HealthResponse, KubeconfigResponse, LogLine, NodeEvent, ResetRequest,
    RollbackResponse, SlotEntry, UpgradeRequest, UpgradeResponse, VersionResponse,
};
use tonic::{Request, Response, Status};
use tracing::info;

use super::service_api::info as service_info;
use crate::node::{ApplyMode, Node, Outcome, Request as NodeRequest, Via};
use crate::state::Wipe;
use crate::supervisor::ServiceState;

/// One upgrade at a time: a second is refused, not queued.
static UPGRADE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// How long the client may pause between two chunks of a bundle.
const UPGRADE_CHUNK_TIMEOUT: Duration = Duration::from_secs(60);
/// The most a client may send (three slot files and a manifest).
const UPGRADE_LIMIT: u64 = 3 * machine_api::image_bundle::FILE_LIMIT;

/// Default time a `try` waits for confirmation.
const DEFAULT_TRY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct MachineApi(pub Arc<Node>);

fn who<T>(r: &Request<T>) -> String {
    r.extensions()
        .get::<super::authz::Caller>()
        .and_then(|c| c.0.as_deref().map(str::to_owned))
        .unwrap_or_else(|| "maintenance client".into())
}

#[tonic::async_trait]
impl MachineService for MachineApi {
    async fn version(&self, _: Request<Empty>) -> Result<Response<VersionResponse>, Status> {
        let cfg = self.0.config();
        let running = running_slot(&self.0);
        Ok(Response::new(VersionResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            node: self.0.identity_for(cfg.as_ref()).name,
            maintenance: cfg.is_none(),
            uptime_ms: self.0.uptime().as_millis() as u64,
            roles: cfg
                .map(|c| {
                    c.machine
                        .roles
                        .iter()
                        .map(|r| r.as_str().to_owned())
                        .collect()
                })
                .unwrap_or_default(),
            image_version: if self.0.opts.host_mode {
                String::new()
            } else {
                image_version()
            },
            slot: running.map(|s| s.name().to_owned()).unwrap_or_default(),
            slots: if running.is_some() {
                slot_entries().await
            } else {
                Vec::new()
            },
        }))
    }

    async fn apply_configuration(
        &self,
        r: Request<ApplyConfigurationRequest>,
    ) -> Result<Response<ApplyConfigurationResponse>, Status> {
        let caller = who(&r);
        let listener = r
            .extensions()
            .get::<super::authz::Listener>()
            .copied()
            .unwrap_or(super::authz::Listener::Maintenance);
        let req = r.into_inner();
        let via = match listener {
            super::authz::Listener::Maintenance => Via::Maintenance {
                token_ok: self.0.maintenance_token_ok(&req.maintenance_token),
            },
            super::authz::Listener::MutualTls => Via::Authenticated,
        };
        let proto_mode = req.mode();
        let text = String::from_utf8(req.data)
            .map_err(|_| Status::invalid_argument("the config is not UTF-8 text"))?;
        let mode = match proto_mode {
            ProtoMode::Auto => ApplyMode::Auto,
            ProtoMode::NoReboot => ApplyMode::NoReboot,
            ProtoMode::Staged => ApplyMode::Staged,
            ProtoMode::Try => ApplyMode::Try(match req.try_timeout_seconds {
                0 => DEFAULT_TRY,
                s => Duration::from_secs(u64::from(s)),
            }),
        };
        let out = self.0.apply(&text, mode, req.dry_run, via).await;
        let Outcome { reply, after } = match out {
            Ok(o) => o,
            Err(e) => {
                info!(caller, error = %e, "apply-config refused");
                return Err(e.into());
            }
        };
        info!(caller, outcome = reply.outcome, "apply-config");
        Ok(with_after(
            ApplyConfigurationResponse {
                outcome: reply.outcome.into(),
                diff: reply.diff,
                reboot_required: reply.reboot_required,
                message: reply.message,
                problems: reply.problems,
            },
            after,
        ))
    }

    async fn confirm_configuration(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<ConfirmConfigurationResponse>, Status> {
        let out = self.0.request(NodeRequest::Confirm).await?;
        Ok(with_after(
            ConfirmConfigurationResponse {
                message: out.reply.message,
            },
            out.after,
        ))
    }

    async fn get_configuration(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<GetConfigurationResponse>, Status> {
        let snap = self.0.snapshot();
        let cfg = snap
            .config
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("the node has no config"))?;
        Ok(Response::new(GetConfigurationResponse {
            data: cfg.redacted().to_yaml().into_bytes(),
            staged_pending: snap.record.staged.is_some(),
            try_deadline_unix_ms: snap
                .record
                .trial
                .as_ref()
                .map(|t| t.deadline_unix_ms)
                .unwrap_or(0),
        }))
    }

    async fn health(&self, _: Request<Empty>) -> Result<Response<HealthResponse>, Status> {
        let services = self.0.services().await;
        let healthy =
            !services.is_empty() && services.iter().all(|s| s.state == ServiceState::Healthy);
        Ok(Response::new(HealthResponse {
            healthy,
            last_event: self.0.last_event().unwrap_or_default(),
            maintenance: self.0.in_maintenance(),
            services: services.into_iter().map(service_info).collect(),
        }))
    }

    async fn boot_timeline(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<BootTimelineResponse>, Status> {
        let marks = self
            .0
            .timeline
            .read()
            .into_iter()
            .map(|m| BootMark {
                uptime_seconds: m.uptime,
                phase: m.phase,
                detail: m.detail,
            })
            .collect();
        Ok(Response::new(BootTimelineResponse { marks }))
    }

    async fn kubeconfig(&self, r: Request<Empty>) -> Result<Response<KubeconfigResponse>, Status> {
        let cfg = self
            .0
            .config()
            .ok_or_else(|| Status::failed_precondition("the node has no config"))?;
        let data = crate::roles::kubernetes::files::admin_kubeconfig(&cfg)
            .map_err(Status::failed_precondition)?;
        info!(caller = who(&r), "admin kubeconfig issued");
        Ok(Response::new(KubeconfigResponse {
            data: data.into_bytes(),
        }))
    }

    async fn reboot(&self, r: Request<Empty>) -> Result<Response<Empty>, Status> {
        info!(caller = who(&r), "reboot requested");
        let out = self.0.request(NodeRequest::Reboot).await?;
        Ok(with_after(Empty {}, out.after))
    }

    async fn shutdown(&self, r: Request<Empty>) -> Result<Response<Empty>, Status> {
        info!(caller = who(&r), "shutdown requested");
        let out = self.0.request(NodeRequest::Shutdown).await?;
        Ok(with_after(Empty {}, out.after))
    }

    async fn upgrade(
        &self,
        r: Request<tonic::Streaming<UpgradeRequest>>,
    ) -> Result<Response<UpgradeResponse>, Status> {
        let caller = who(&r);
        let Ok(_busy) = UPGRADE.try_lock() else {
            return Err(Status::aborted(
                "another upgrade is running on this node: wait for it to finish",
            ));
        };
        let cfg = self
            .0
            .config()
            .ok_or_else(|| Status::failed_precondition("the node has no config"))?;
        let trusted = cfg.trusted_image_keys();
        let target = crate::upgrade::target(
            crate::cmdline::Cmdline::current().text(),
            self.0.opts.host_mode,
        );
        info!(caller, ?target, keys = trusted.len(), "upgrade started");
        let mut stream = r.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(8);
        let kubelet = self.0.role_context(&cfg).binary("kubelet", "kubelet").ok();
        let started = std::time::Instant::now();
        let reader = crate::upgrade::ChunkReader::new(rx);
        let upload = reader.counters();
        let install = tokio::task::spawn_blocking(move || {
            let running = crate::upgrade::running_kubernetes(kubelet.as_deref());
            crate::upgrade::install(reader, &trusted, &target, running.as_deref())
        });
        let mut stage = None;
        let mut total = 0u64;
        loop {
            let next = tokio::time::timeout(UPGRADE_CHUNK_TIMEOUT, stream.message()).await;
            let msg = match next {
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no part of the bundle arrived for {} s",
                        UPGRADE_CHUNK_TIMEOUT.as_secs()
                    ),
                )),
                Ok(Err(status)) => Err(std::io::Error::other(format!(
                    "the upload broke off: {}",
                    status.message()
                ))),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(m))) => Ok(m),
            };
            let failed = msg.is_err();
            let item = msg.map(|m| {
                stage.get_or_insert(m.stage);
                total += m.chunk.len() as u64;
                m.chunk
            });
            let item = match item {
                Ok(_) if total > UPGRADE_LIMIT => Err(std::io::Error::other(format!(
                    "the upload is over {UPGRADE_LIMIT} bytes: not an upgrade bundle"
                ))),
                other => other,
            };
            let stop = failed || item.is_err();
            // The installer stopped reading (it refused the bundle):
            // its answer says why.
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
        drop(tx);
        let done = install
            .await
            .map_err(|e| Status::internal(format!("the upgrade task failed: {e}")))?;
        let installed = match done {
            Ok(i) => i,
            Err(e) => {
                info!(caller, error = %e, "upgrade refused");
                return Err(upgrade_status(e));
            }
        };
        let stage = stage.unwrap_or(false);
        let checked = crate::upgrade::checked(&installed.verified);
        let into = installed
            .into
            .map(|s| s.name().to_owned())
            .unwrap_or_default();
        let mut reply = UpgradeResponse {
            slot: into.clone(),
            running_slot: installed
                .running
                .map(|s| s.name().to_owned())
                .unwrap_or_default(),
            manifest_sha256: installed.verified.manifest_sha256.clone(),
            signed_by: installed.verified.signed_by.clone().unwrap_or_default(),
            message: format!(
                "installed {} into slot {into} ({checked}); boot entry {}; {}",
                installed.verified.manifest.profile.name,
                installed.entry,
                upload_times(total, &upload, started.elapsed())
            ),
            rebooting: false,
        };
        info!(
            caller,
            slot = into,
            entry = installed.entry,
            "upgrade installed"
        );
        self.0.note_event(reply.message.clone());
        if stage {
            reply
                .message
                .push_str("; staged: the next reboot starts it");
            return Ok(Response::new(reply));
        }
        let out = self.0.request(NodeRequest::Reboot).await?;
        reply.rebooting = true;
        reply.message.push_str("; rebooting into it");
        Ok(with_after(reply, out.after))
    }

    type DmesgStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<LogLine, Status>> + Send>>;

    async fn dmesg(&self, r: Request<DmesgRequest>) -> Result<Response<Self::DmesgStream>, Status> {
        let DmesgRequest { follow, tail } = r.into_inner();
        let path = std::path::PathBuf::from("/dev/kmsg");
        // Opened here so that a node without it answers at once.
        std::fs::File::open(&path).map_err(|e| {
            Status::unavailable(format!(
                "cannot read the kernel log {}: {e}",
                path.display()
            ))
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<LogLine, Status>>(64);
        tokio::task::spawn_blocking(move || {
            let result = crate::kmsg::read(&path, tail as usize, follow, &mut |line| {
                if line.is_empty() {
                    // A follower's probe: is the client still there?
                    return !tx.is_closed();
                }
                tx.blocking_send(Ok(LogLine { line })).is_ok()
            });
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(Status::unavailable(format!(
                    "reading the kernel log: {e}"
                ))));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type EventsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<NodeEvent, Status>> + Send>>;

    async fn events(
        &self,
        r: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let EventsRequest { follow, tail } = r.into_inner();
        let (backlog, mut rx) = self.0.events.backlog_and_follow(tail as usize);
        let wire = |e: crate::events::Event| NodeEvent {
            seq: e.seq,
            unix_ms: e.unix_ms,
            kind: e.kind.to_owned(),
            message: e.message,
        };
        let backlog: Vec<Result<NodeEvent, Status>> =
            backlog.into_iter().map(|e| Ok(wire(e))).collect();
        if !follow {
            return Ok(Response::new(Box::pin(tokio_stream::iter(backlog))));
        }
        let (tx, out) = tokio::sync::mpsc::channel::<Result<NodeEvent, Status>>(64);
        tokio::spawn(async move {
            for e in backlog {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            loop {
                let e = match rx.recv().await {
                    Ok(e) => wire(e),
                    // A slow follower: the gap shows in seq.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn rollback(&self, r: Request<Empty>) -> Result<Response<RollbackResponse>, Status> {
        let caller = who(&r);
        let running = running_slot(&self.0);
        let Some(running) = running else {
            return Err(Status::failed_precondition(
                "this node did not boot from a disk slot: there is no other slot to roll back to",
            ));
        };
        let _busy = UPGRADE.try_lock().map_err(|_| {
            Status::aborted("an upgrade is running on this node: wait for it to finish")
        })?;
        let done = tokio::task::spawn_blocking(move || {
            crate::bootentry::with_esp(|esp| crate::bootentry::rollback_in(esp, running))
        })
        .await
        .map_err(|e| Status::internal(format!("the rollback task failed: {e}")))?;
        forget_slot_entries();
        let message = match done {
            Ok(m) => m,
            Err(crate::bootentry::BootEntryError::Refused(m)) => {
                return Err(Status::failed_precondition(m))
            }
            Err(e) => return Err(Status::internal(e.to_string())),
        };
        info!(caller, message, "rollback");
        self.0.note_event(message.clone());
        let out = self.0.request(NodeRequest::Reboot).await?;
        Ok(with_after(
            RollbackResponse {
                slot: running.other().name().to_owned(),
                message: format!("{message}; rebooting"),
            },
            out.after,
        ))
    }

    async fn reset(&self, r: Request<ResetRequest>) -> Result<Response<Empty>, Status> {
        let caller = who(&r);
        let req = r.into_inner();
        let wipe = Wipe::parse(&req.wipe).ok_or_else(|| {
            Status::invalid_argument(format!(
                "wipe: {:?} is not a wipe mode; accepted: \"all\" (the default, also \"\"), \"state\", \"ephemeral\"",
                req.wipe
            ))
        })?;
        info!(
            caller,
            graceful = req.graceful,
            wipe = wipe.as_str(),
            force = req.force,
            "reset requested"
        );
        let out = match self.0.reset(req.graceful, wipe, req.force).await {
            Ok(o) => o,
            Err(e) => {
                info!(caller, error = %e, "reset refused");
                return Err(e.into());
            }
        };
        Ok(with_after(Empty {}, out.after))
    }
}

/// A response carrying the work that follows it: the API's after-reply
/// layer fires it once the response has been sent.
fn with_after<T>(message: T, after: Option<crate::node::AfterReply>) -> Response<T> {
    let mut r = Response::new(message);
    if let Some(a) = after {
        r.extensions_mut()
            .insert(super::authz::FireAfterReply(std::sync::Arc::new(
                std::sync::Mutex::new(Some(a)),
            )));
    }
    r
}

/// How an install of `bytes` that took `took` divides: waiting for the
/// upload, and the rest (checking and writing, interleaved with it, and
/// the final syncs).
fn upload_times(
    bytes: u64,
    upload: &crate::upgrade::UploadCounters,
    took: std::time::Duration,
) -> String {
    let waited = upload.waited().min(took);
    format!(
        "{:.1} MiB in {:.1}s: {:.1}s waiting for the upload, {:.1}s checking and writing",
        bytes as f64 / f64::from(1u32 << 20),
        took.as_secs_f64(),
        waited.as_secs_f64(),
        (took - waited).as_secs_f64()
    )
}

/// The gRPC status of a refused upgrade: a bundle that fails a check is
/// the client's to fix (INVALID_ARGUMENT), a signature the node does not
/// trust or a node that cannot install is FAILED_PRECONDITION.
fn upgrade_status(e: crate::upgrade::UpgradeError) -> Status {
    use crate::upgrade::UpgradeError as U;
    use machine_api::image_bundle::BundleError as B;
    let msg = e.to_string();
    match e {
        U::Bundle(B::Signature(_) | B::Refused(_)) | U::NoTarget { .. } => {
            Status::failed_precondition(msg)
        }
        U::Bundle(B::Store { .. }) | U::Io(..) | U::Esp(..) => Status::internal(msg),
        U::Bundle(_) => Status::invalid_argument(msg),
    }
}

/// The slot this boot runs; None in host mode or on a diskless boot.
fn running_slot(node: &Node) -> Option<machine_api::layout::Slot> {
    if node.opts.host_mode {
        return None;
    }
    crate::bootentry::running_slot(crate::cmdline::Cmdline::current().text())
}

/// The image's version: VERSION_ID of its os-release.
fn image_version() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_ID="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default()
}

/// The ESP's boot entries, read at most every few seconds (Version is
/// served to anyone in maintenance mode: it must not mount the ESP on
/// every call).
static SLOT_ENTRIES: std::sync::Mutex<Option<(std::time::Instant, Vec<SlotEntry>)>> =
    std::sync::Mutex::new(None);

fn forget_slot_entries() {
    if let Ok(mut c) = SLOT_ENTRIES.lock() {
        *c = None;
    }
}

async fn slot_entries() -> Vec<SlotEntry> {
    if let Ok(c) = SLOT_ENTRIES.lock() {
        if let Some((at, list)) = c.as_ref() {
            if at.elapsed() < Duration::from_secs(5) {
                return list.clone();
            }
        }
    }
    let running = crate::bootentry::running_slot(crate::cmdline::Cmdline::current().text());
    let list = tokio::task::spawn_blocking(move || {
        crate::bootentry::with_esp(crate::bootentry::entries_in)
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default();
    // The running entry: this slot's first one that still boots.
    let mut seen_running = false;
    let list: Vec<SlotEntry> = list
        .into_iter()
        .map(|e| {
            let this = !seen_running && Some(e.parsed.slot) == running && e.tries_left != Some(0);
            seen_running |= this;
            SlotEntry {
                slot: e.parsed.slot.name().to_owned(),
                entry: e.file.clone(),
                version: e.version.clone(),
                state: e.state(),
                running: this,
            }
        })
        .collect();
    if let Ok(mut c) = SLOT_ENTRIES.lock() {
        *c = Some((std::time::Instant::now(), list.clone()));
    }
    list
}
