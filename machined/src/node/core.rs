//! The core: the one task that owns the node's state. It takes requests in
//! order, asks [`plan`] what each does, and executes the steps. Nothing
//! else writes the config record or changes the running config, so no two
//! changes interleave and no lock orders need remembering.

use std::sync::Arc;
use std::time::Duration;

use machine_api::config::MachineConfig;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

use super::plan::{self, Control, Phase, Request, Snapshot, Step, Transition};
use super::{chain, AfterReply, Envelope, Node, NodeError, Outcome};
use crate::state::{ConfigStore, TryState};
use crate::supervisor::{ServiceState, ServiceStatus};

pub(super) struct Core {
    node: Arc<Node>,
    store: ConfigStore,
    snap: Snapshot,
    try_watch: Option<JoinHandle<()>>,
}

impl Core {
    pub(super) fn new(node: Arc<Node>, store: ConfigStore, snap: Snapshot) -> Self {
        Core {
            node,
            store,
            snap,
            try_watch: None,
        }
    }

    /// Executes the start transition, then serves requests until every
    /// sender is gone.
    pub(super) async fn run(mut self, start: Transition, mut inbox: mpsc::Receiver<Envelope>) {
        if let Err(e) = self.execute(start).await {
            self.node.note(format!(
                "finishing the last change at start failed: {}",
                chain(&e)
            ));
        }
        while let Some((request, reply)) = inbox.recv().await {
            let env = self.node.env();
            let result = match plan::plan(&self.snap, request, &env) {
                Ok(t) => self.execute(t).await,
                Err(r) => Err(r.into()),
            };
            let _ = reply.send(result);
        }
    }

    fn publish(&self) {
        self.node.publish.send_replace(Arc::new(self.snap.clone()));
    }

    async fn execute(&mut self, t: Transition) -> Result<Outcome, NodeError> {
        let mut after = None;
        for step in t.steps {
            self.step(step, &mut after).await?;
        }
        self.snap.phase = t.phase;
        self.publish();
        Ok(Outcome {
            reply: t.reply,
            after: after.map(|control| AfterReply {
                control,
                tx: self.node.control.clone(),
            }),
        })
    }

    async fn step(&mut self, step: Step, after: &mut Option<Control>) -> Result<(), NodeError> {
        let node = Arc::clone(&self.node);
        match step {
            Step::LeaveEtcd => {
                if let Some(cfg) = &self.snap.config {
                    node.leave_etcd(cfg).await?;
                }
            }
            Step::Commit(record) => {
                self.store.commit(&record)?;
                if record.resetting {
                    // Until the reset finishes, nothing else is accepted.
                    self.snap.phase = Phase::Resetting;
                }
                self.snap.record = record;
                self.publish();
            }
            Step::SetConfig(cfg) => {
                self.snap.config = cfg.map(|c| *c);
                self.publish();
            }
            Step::WriteEtcFiles => node.write_etc_files(self.snap.config.as_ref()),
            Step::ApplyKernelSettings => {
                if let Some(cfg) = &self.snap.config {
                    node.apply_kernel_settings(cfg);
                }
            }
            Step::Reconcile => node.reconcile_with(self.snap.config.as_ref()).await,
            Step::WatchTry { generation, trial } => self.watch_try(generation, trial),
            Step::StopTryWatch => {
                if let Some(h) = self.try_watch.take() {
                    h.abort();
                }
            }
            Step::StopServices => node.supervisor.stop_all().await,
            Step::WipeData => node.wipe_data()?,
            Step::EtcdBootstrap => {
                let cfg = self
                    .snap
                    .config
                    .as_ref()
                    .ok_or_else(|| NodeError::Precondition("the node has no config".into()))?;
                node.mark_etcd_bootstrap(cfg)?;
            }
            Step::Note(text) => node.note(text),
            Step::AfterReply(c) => *after = Some(c),
        }
        Ok(())
    }

    /// Rolls a `try` back when a service fails or it is not confirmed in
    /// time, by sending the core a request naming the trial's generation
    /// (a later change makes it stale, and the core ignores it).
    fn watch_try(&mut self, generation: u64, trial: TryState) {
        if let Some(h) = self.try_watch.take() {
            h.abort();
        }
        info!(
            "a try config is pending ({}s left)",
            trial.remaining().as_secs()
        );
        let node = Arc::clone(&self.node);
        self.try_watch = Some(tokio::spawn(async move {
            let baseline: Vec<(String, u32)> = node
                .supervisor
                .list()
                .await
                .into_iter()
                .map(|s| (s.name, s.restarts))
                .collect();
            let started = std::time::SystemTime::now();
            let reason = loop {
                if trial.remaining().is_zero() {
                    break "not confirmed within the try timeout".to_owned();
                }
                tokio::time::sleep(trial.remaining().min(Duration::from_millis(500))).await;
                if let Some(bad) = failing(&node.supervisor.list().await, &baseline, started) {
                    break format!("service {} failed: {}", bad.name, bad.message);
                }
            };
            // The core may be mid-change; it judges staleness itself.
            let _ = node.request(Request::EndTry { generation, reason }).await;
        }));
    }
}

/// A service that failed since `started`, or restarted twice since the
/// baseline.
fn failing<'a>(
    list: &'a [ServiceStatus],
    baseline: &[(String, u32)],
    started: std::time::SystemTime,
) -> Option<&'a ServiceStatus> {
    list.iter().find(|s| {
        let base = baseline
            .iter()
            .find(|(n, _)| n == &s.name)
            .map(|(_, r)| *r)
            .unwrap_or(0);
        (s.state == ServiceState::Failed && s.since >= started) || s.restarts >= base + 2
    })
}

impl Node {
    /// Starts the core with the record found on disk: the start transition
    /// (finish a reset, resolve a try, promote a staged config) runs before
    /// any request.
    pub(super) fn start_core(self: &Arc<Self>, store: ConfigStore, record: crate::state::Record) {
        let Some(inbox) = self.inbox.lock().ok().and_then(|mut i| i.take()) else {
            return;
        };
        let start = plan::at_start(&record, &self.env());
        let snap = Snapshot {
            phase: Phase::Maintenance,
            record,
            config: None,
        };
        // Requests sent meanwhile wait in the queue behind `start`.
        let core = Core::new(Arc::clone(self), store, snap);
        tokio::spawn(core.run(start, inbox));
    }

    /// Services in line with `cfg` (none in maintenance).
    pub(super) async fn reconcile_with(&self, cfg: Option<&MachineConfig>) {
        let specs = match cfg {
            None => Ok((Vec::new(), Vec::new())),
            Some(c) => crate::roles::desired_services(c, &self.role_context(c)),
        };
        match specs {
            Ok((s, problems)) => {
                let texts: Vec<String> = problems
                    .iter()
                    .map(|p| format!("cannot start services: {p}"))
                    .collect();
                let changed = self
                    .role_problems
                    .lock()
                    .map(|mut known| {
                        let changed = *known != texts;
                        *known = texts.clone();
                        changed
                    })
                    .unwrap_or(true);
                if changed {
                    for t in texts {
                        self.note(t);
                    }
                }
                self.supervisor.reconcile(s).await
            }
            Err(e) => self.note(format!("cannot start services: {e}")),
        }
    }

    /// Removes what belongs to the wiped config: etcd data, minted
    /// secrets, containerd's root, the bootstrap mark, a worker's kept
    /// certificate and its kubelet identity.
    pub(super) fn wipe_data(&self) -> Result<(), NodeError> {
        let p = &self.opts.paths;
        for dir in [
            p.etcd_data(),
            p.secrets_dir(),
            p.containerd_root(),
            crate::roles::kubernetes::worker::dir_of(p),
        ] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(NodeError::internal(
                        format!("cannot remove {}", dir.display()),
                        e,
                    ))
                }
            }
        }
        let _ = std::fs::remove_file(crate::roles::etcd::bootstrap_marker(p));
        for f in crate::api::trust::KEPT_FILES {
            let _ = std::fs::remove_file(p.state_dir().join(f));
        }
        p.create_all()
            .map_err(|e| NodeError::internal("cannot recreate the node's directories", e))
    }
}
