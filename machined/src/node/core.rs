//! The core: the one task that owns the node's state. It takes requests in
//! order, asks [`plan`] what each does, and executes the steps. Nothing
//! else writes the config record or changes the running config, so no two
//! changes interleave and no lock orders need remembering.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use machine_api::config::MachineConfig;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

use super::plan::{self, Control, Phase, Request, Snapshot, Step, Transition};
use super::{chain, AfterReply, Envelope, Node, NodeError, Outcome};
use crate::paths::Paths;
use crate::state::{ConfigStore, TryState, Wipe};
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
            Step::WipeData {
                wipe,
                forget_etcd_bootstrap,
            } => wipe_data(&node.opts.paths, wipe, forget_etcd_bootstrap)?,
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

    /// `osctl reset`. What the etcd member holds is found out first (the
    /// core's plan does no I/O): the core refuses to wipe the last copy of
    /// the cluster's data without `force`. A retry of a reset that failed
    /// midway skips the question: it finishes the reset it began, and etcd
    /// is stopped by then.
    pub async fn reset(
        &self,
        graceful: bool,
        wipe: Wipe,
        force: bool,
    ) -> Result<Outcome, NodeError> {
        let etcd = if self.snapshot().record.resetting {
            plan::EtcdMember::NoData
        } else {
            self.etcd_member().await
        };
        self.request(Request::Reset {
            graceful,
            wipe,
            force,
            etcd,
        })
        .await
    }

    /// Whether this node holds etcd data, and how many other members etcd
    /// lists (see [`plan::EtcdMember`]).
    async fn etcd_member(&self) -> plan::EtcdMember {
        use plan::EtcdMember;
        if !crate::roles::etcd::member_initialized(&self.opts.paths) {
            return EtcdMember::NoData;
        }
        let client = match self.etcd_client().await {
            Ok(c) => c,
            Err(e) => return EtcdMember::Unknown(chain(&e)),
        };
        let me = self.identity_for(self.config().as_ref()).name;
        match client.members().await {
            Ok(list) => EtcdMember::Member {
                others: list
                    .iter()
                    .filter(|m| !m.name.is_empty() && m.name != me)
                    .count(),
            },
            Err(e) => EtcdMember::Unknown(e.to_string()),
        }
    }
}

/// What a reset removes: directories and files, by wipe mode (see
/// [`Wipe`] for why etcd data goes in every mode). Logs (/var/log) stay in
/// every mode, so what happened before a reset can still be read.
fn wiped(p: &Paths, wipe: Wipe, forget_etcd_bootstrap: bool) -> (Vec<PathBuf>, Vec<PathBuf>) {
    // etcd's data: the member's identity in its cluster (EPHEMERAL).
    let mut dirs = vec![p.etcd_data()];
    let mut files = Vec::new();
    if wipe.forgets_config() {
        // The node's identity: minted certificates (RAM on a node), a
        // worker's kubelet identity and kept OS API certificate, and the
        // bootstrap mark (STATE). The record itself is the reset's commit.
        dirs.push(p.secrets_dir());
        dirs.push(crate::roles::kubernetes::worker::dir_of(p));
        files.extend(
            crate::api::trust::KEPT_FILES
                .iter()
                .map(|f| p.state_dir().join(f)),
        );
    }
    if wipe.forgets_config() || forget_etcd_bootstrap {
        files.push(crate::roles::etcd::bootstrap_marker(p));
    }
    // A recovery's staged etcd data, with etcd's data.
    dirs.push(crate::etcd_backup::recovery_dir(p));
    if wipe != Wipe::State {
        // The rest of EPHEMERAL's data: containerd's images and
        // containers, kubelet's pods and volumes (its root dir), the pod
        // network's address allocations.
        dirs.push(p.containerd_root());
        dirs.push(p.root.join(KUBELET_ROOT));
        dirs.push(p.root.join(CNI_STATE));
    }
    if wipe == Wipe::All {
        // Scheduled etcd snapshots hold the whole keyspace (every
        // Kubernetes Secret): they go with everything else, but stay
        // through the partial wipes, as the way back.
        dirs.push(crate::etcd_backup::snapshot_dir(p));
    }
    (dirs, files)
}

/// kubelet's `--root-dir` (see `roles::kubernetes::worker`).
const KUBELET_ROOT: &str = "var/lib/kubelet";
/// The pod network's host-local address allocations (see `pod_network`).
const CNI_STATE: &str = "var/lib/cni";

/// Removes what `wipe` names, then recreates the node's directories empty.
fn wipe_data(p: &Paths, wipe: Wipe, forget_etcd_bootstrap: bool) -> Result<(), NodeError> {
    let (dirs, files) = wiped(p, wipe, forget_etcd_bootstrap);
    let mounts = crate::mountinfo::current();
    for dir in dirs {
        detach_mounts_under(&mounts, &dir);
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
    for f in files {
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(NodeError::internal(
                    format!("cannot remove {}", f.display()),
                    e,
                ))
            }
        }
    }
    p.create_all()
        .map_err(|e| NodeError::internal("cannot recreate the node's directories", e))
}

/// Detaches whatever is mounted under `dir`, deepest first: pods' volumes
/// under kubelet's root dir stay mounted after kubelet stops, and removing
/// the directory would fail on them (EBUSY) halfway through. Lazy, so a
/// mount still in use goes away once its last user does. Errors are left
/// to the removal to report.
fn detach_mounts_under(mounts: &[crate::mountinfo::Mount], dir: &Path) {
    let mut under: Vec<&Path> = mounts
        .iter()
        .map(|m| m.mount_point.as_path())
        .filter(|m| m.starts_with(dir))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    under.dedup();
    for m in under {
        if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(
                "cannot unmount {} before the reset wipes it: {e}",
                m.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Paths) {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path());
        p.create_all().unwrap();
        let put = |path: PathBuf| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "x").unwrap();
        };
        put(p.state_dir().join(crate::state::RECORD));
        put(crate::roles::etcd::bootstrap_marker(&p));
        put(p.state_dir().join(crate::api::trust::KEPT_FILES[0]));
        put(crate::roles::kubernetes::worker::dir_of(&p).join("kubelet.conf"));
        put(p.secrets_dir().join("etcd/ca.crt"));
        put(p.etcd_data().join("member/wal/0.wal"));
        put(p.containerd_root().join("meta.db"));
        put(p.root.join(KUBELET_ROOT).join("pods/x"));
        put(p.root.join(CNI_STATE).join("networks/n/10.0.0.2"));
        put(p.log_dir().join("etcd.log"));
        put(crate::etcd_backup::snapshot_dir(&p).join("etcd-1.db"));
        (d, p)
    }

    /// What is left of the tree after a wipe, as paths relative to root.
    fn left(p: &Paths) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![p.root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(
                        e.path()
                            .strip_prefix(&p.root)
                            .unwrap()
                            .display()
                            .to_string(),
                    );
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn each_wipe_mode_removes_its_part() {
        let (_d, p) = tree();
        wipe_data(&p, Wipe::All, false).unwrap();
        // The record goes with the reset's commit, not here; logs stay.
        assert_eq!(
            left(&p),
            ["system/state/machine-state.json", "var/log/etcd.log"]
        );
        assert!(p.etcd_data().is_dir() && p.secrets_dir().is_dir());

        let (_d, p) = tree();
        wipe_data(&p, Wipe::State, false).unwrap();
        assert_eq!(
            left(&p),
            [
                "system/state/machine-state.json",
                "var/lib/cni/networks/n/10.0.0.2",
                "var/lib/containerd/meta.db",
                "var/lib/etcd-snapshots/etcd-1.db",
                "var/lib/kubelet/pods/x",
                "var/log/etcd.log",
            ]
        );

        let (_d, p) = tree();
        wipe_data(&p, Wipe::Ephemeral, false).unwrap();
        assert_eq!(
            left(&p),
            [
                "system/secrets/etcd/ca.crt",
                "system/state/etcd.bootstrap",
                "system/state/kubelet/kubelet.conf",
                "system/state/machine-state.json",
                "system/state/os-api.crt",
                "var/lib/etcd-snapshots/etcd-1.db",
                "var/log/etcd.log",
            ]
        );
        let (_d, p) = tree();
        wipe_data(&p, Wipe::Ephemeral, true).unwrap();
        assert!(!crate::roles::etcd::bootstrap_marker(&p).exists());
        assert!(p.state_dir().join("os-api.crt").exists());
    }
}
