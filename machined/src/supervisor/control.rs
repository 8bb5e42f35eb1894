//! The public face of the supervisor: the API server and the boot sequence
//! call these methods; each service's lifecycle runs in its own runner task
//! (see [`runner`](super::runner)).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::cgroup::Cgroup;
use super::error::SupervisorError;
use super::log_buffer::LogBuffer;
use super::log_tail::{self, log_path, Tailer};
use super::order::dependency_order;
use super::process::RunningProcess;
use super::runner::{Command, Phase, Reply, Runner};
use super::shared::{Record, Shared};
use super::spec::{validate_name, ServiceSpec};
use super::state_file::{self, StateFile};
use super::status::ServiceStatus;
use super::{lock, procfs, SupervisorOptions, SupervisorPaths};

/// Commands queued per service; senders wait beyond that.
const COMMAND_QUEUE: usize = 16;

/// Supervises the node's services. Cheap to clone; all clones drive the same
/// services.
///
/// Dropping the last clone (or [`detach`](Self::detach)) stops supervising
/// but leaves the processes running, so that the next machined can adopt
/// them: stopping services is always explicit
/// ([`stop_all`](Self::stop_all)).
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    services: Mutex<BTreeMap<String, ServiceHandle>>,
    /// Operator-stopped services of a previous machined, not yet in the
    /// desired set: they stay stopped when reconcile brings them back.
    remembered: Mutex<BTreeMap<String, StateFile>>,
    /// Serialises reconcile, adoption and stop_all, which change the set
    /// of services.
    changing: tokio::sync::Mutex<()>,
}

/// The API's handle on one service's runner and log tailer. Dropping it
/// ends both tasks (not the process).
struct ServiceHandle {
    commands: mpsc::Sender<Command>,
    spec_hash: String,
    logs: Arc<LogBuffer>,
    runner: JoinHandle<()>,
    tailer: JoinHandle<()>,
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        self.runner.abort();
        self.tailer.abort();
    }
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = lock(&self.inner.services).keys().cloned().collect();
        f.debug_struct("Supervisor")
            .field("paths", &self.inner.shared.paths)
            .field("services", &names)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Creates the state, log and cgroup directories. Starts nothing.
    pub fn new(paths: SupervisorPaths) -> Result<Self, SupervisorError> {
        Self::with_options(paths, SupervisorOptions::default())
    }

    /// [`new`](Self::new) with non-default log limits.
    pub fn with_options(
        paths: SupervisorPaths,
        options: SupervisorOptions,
    ) -> Result<Self, SupervisorError> {
        create_dir(&paths.state_dir, 0o700)?;
        create_dir(&paths.log_dir, 0o750)?;
        if let Some(base) = &paths.cgroup_base {
            create_dir(base, 0o755)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared::new(paths, options)),
                services: Mutex::new(BTreeMap::new()),
                remembered: Mutex::new(BTreeMap::new()),
                changing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Takes over the services a previous machined left running: for each
    /// state file whose process is still alive (same pid and start time) a
    /// runner watches it without restarting it. Returns the adopted names.
    ///
    /// Call before the first [`reconcile`](Self::reconcile), which then
    /// keeps adopted processes whose spec hash is unchanged. State files of
    /// dead processes are removed (leftovers in their cgroups killed),
    /// except the sticky stop of operator-stopped services.
    pub async fn adopt_existing(&self) -> Vec<String> {
        let _changing = self.inner.changing.lock().await;
        let shared = &self.inner.shared;
        let mut adopted = Vec::new();
        for path in state_file::list(&shared.paths.state_dir) {
            let state = match StateFile::load(&path) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "discarding unreadable state file");
                    remove_file(&path);
                    continue;
                }
            };
            let stem_matches = path.file_stem().is_some_and(|s| *s == *state.name);
            if !stem_matches || validate_name(&state.name).is_err() {
                tracing::warn!(path = %path.display(), "discarding state file with a bad name");
                remove_file(&path);
                continue;
            }
            if lock(&self.inner.services).contains_key(&state.name) {
                continue;
            }
            let live = match (state.pid, state.starttime) {
                (Some(pid), Some(st)) if procfs::is_same_live_process(pid, st) => Some((pid, st)),
                _ => None,
            };
            match live {
                Some((pid, starttime)) => {
                    let cgroup = state.cgroup.clone().map(Cgroup::new);
                    let process = RunningProcess::adopt(pid, starttime, cgroup);
                    tracing::info!(service = %state.name, pid, "adopting running service");
                    let name = state.name.clone();
                    let hash = state.spec_hash.clone();
                    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
                    let (runner, phase) = Runner::adopted(shared.clone(), state, process, rx);
                    self.register(&name, hash, tx, runner, phase);
                    adopted.push(name);
                }
                None => {
                    if let Some(cg) = state.cgroup.clone().map(Cgroup::new) {
                        if !cg.is_empty() {
                            tracing::warn!(service = %state.name, "killing leftovers of a dead service");
                            cg.kill_all();
                        }
                    }
                    if state.operator_stopped {
                        lock(&self.inner.remembered).insert(state.name.clone(), state);
                    } else {
                        tracing::info!(service = %state.name, "removing stale state file");
                        remove_file(&path);
                    }
                }
            }
        }
        adopted
    }

    /// Makes the supervised set match `desired`: services not in it are
    /// stopped (dependents first) and forgotten; new ones are started;
    /// those whose spec hash (argv, env, cwd) changed are restarted;
    /// unchanged ones, adopted ones included, keep running untouched (their
    /// health check, dependencies and timeouts are updated in place).
    ///
    /// Invalid or duplicate specs are logged and skipped.
    pub async fn reconcile(&self, desired: Vec<ServiceSpec>) {
        let _changing = self.inner.changing.lock().await;
        let mut wanted: BTreeMap<String, ServiceSpec> = BTreeMap::new();
        for spec in desired {
            if let Err(e) = spec.validate() {
                tracing::error!(error = %e, "skipping service");
            } else if wanted.contains_key(&spec.name) {
                tracing::error!(service = %spec.name, "duplicate service; keeping the first");
            } else {
                wanted.insert(spec.name.clone(), spec);
            }
        }

        let gone: BTreeSet<String> = lock(&self.inner.services)
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in self.stop_order().into_iter().filter(|n| gone.contains(n)) {
            tracing::info!(service = %name, "service no longer desired");
            if let Err(e) = self.send(&name, Command::Remove).await {
                tracing::error!(service = %name, error = %e, "cannot remove service");
            }
            lock(&self.inner.services).remove(&name);
        }
        lock(&self.inner.remembered).retain(|name, _| {
            let keep = wanted.contains_key(name);
            if !keep {
                StateFile::remove(&self.inner.shared.paths.state_dir, name);
            }
            keep
        });

        for (name, spec) in wanted {
            let hash = spec.spec_hash();
            let existing = lock(&self.inner.services)
                .get(&name)
                .map(|h| h.spec_hash.clone());
            match existing {
                Some(old_hash) => {
                    let restart = old_hash != hash;
                    let spec = Box::new(spec);
                    let sent = self
                        .send(&name, |reply| Command::SetSpec {
                            spec,
                            restart,
                            reply,
                        })
                        .await;
                    match sent {
                        Ok(()) => {
                            if let Some(h) = lock(&self.inner.services).get_mut(&name) {
                                h.spec_hash = hash;
                            }
                        }
                        Err(e) => {
                            tracing::error!(service = %name, error = %e, "cannot update service")
                        }
                    }
                }
                None => {
                    let prior = lock(&self.inner.remembered).remove(&name);
                    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
                    let (runner, phase) =
                        Runner::for_spec(self.inner.shared.clone(), spec, prior, rx);
                    self.register(&name, hash, tx, runner, phase);
                }
            }
        }
    }

    /// Starts a service (clearing an operator stop). Returns once the start
    /// is under way; the service may still wait for its dependencies.
    pub async fn start(&self, name: &str) -> Result<(), SupervisorError> {
        self.send(name, Command::Start).await
    }

    /// Stops a service and keeps it stopped (across machined restarts too)
    /// until [`start`](Self::start) or [`restart`](Self::restart). Returns
    /// once its processes are gone.
    pub async fn stop(&self, name: &str) -> Result<(), SupervisorError> {
        self.send(name, Command::Stop).await
    }

    /// Stops the service if running and starts it again at once.
    pub async fn restart(&self, name: &str) -> Result<(), SupervisorError> {
        self.send(name, Command::Restart).await
    }

    /// All services, dependencies before dependents, with resource usage.
    pub async fn list(&self) -> Vec<ServiceStatus> {
        let mut records: BTreeMap<String, Record> = self
            .inner
            .shared
            .snapshot()
            .into_iter()
            .map(|r| (r.status.name.clone(), r))
            .collect();
        let graph = records
            .iter()
            .map(|(n, r)| (n.clone(), r.status.depends_on.clone()))
            .collect();
        dependency_order(&graph)
            .into_iter()
            .filter_map(|name| records.remove(&name))
            .map(with_usage)
            .collect()
    }

    /// One service, with resource usage.
    pub async fn status(&self, name: &str) -> Option<ServiceStatus> {
        self.inner.shared.get(name).map(with_usage)
    }

    /// Stops every service, dependents first, each within its stop timeout,
    /// one after the other. For shutdown, reboot and reset. Not sticky: a
    /// later reconcile or start brings services back.
    pub async fn stop_all(&self) {
        let _changing = self.inner.changing.lock().await;
        for name in self.stop_order() {
            if let Err(e) = self.send(&name, Command::Halt).await {
                tracing::error!(service = %name, error = %e, "cannot stop service");
            }
        }
    }

    /// The last `lines` lines of a service's output (0: all that are kept).
    pub async fn logs_tail(
        &self,
        name: &str,
        lines: usize,
    ) -> Result<Vec<String>, SupervisorError> {
        Ok(self.logs(name)?.tail(lines))
    }

    /// New lines of a service's output as they are written.
    pub async fn logs_follow(
        &self,
        name: &str,
    ) -> Result<broadcast::Receiver<String>, SupervisorError> {
        Ok(self.logs(name)?.follow())
    }

    /// Every status change of every service.
    pub fn subscribe(&self) -> broadcast::Receiver<ServiceStatus> {
        self.inner.shared.subscribe()
    }

    /// Stops supervising (for all clones) without touching the processes,
    /// which keep running for a later supervisor to
    /// [`adopt`](Self::adopt_existing).
    pub fn detach(self) {
        lock(&self.inner.services).clear();
    }

    fn logs(&self, name: &str) -> Result<Arc<LogBuffer>, SupervisorError> {
        lock(&self.inner.services)
            .get(name)
            .map(|h| h.logs.clone())
            .ok_or_else(|| SupervisorError::UnknownService(name.to_owned()))
    }

    /// Supervised services, dependents before their dependencies.
    fn stop_order(&self) -> Vec<String> {
        let graph = self
            .inner
            .shared
            .snapshot()
            .into_iter()
            .map(|r| (r.status.name, r.status.depends_on))
            .collect();
        let mut order = dependency_order(&graph);
        order.reverse();
        order
    }

    /// Sends a command to a service's runner and waits for its reply.
    async fn send(
        &self,
        name: &str,
        command: impl FnOnce(Reply) -> Command,
    ) -> Result<(), SupervisorError> {
        let commands = lock(&self.inner.services)
            .get(name)
            .map(|h| h.commands.clone())
            .ok_or_else(|| SupervisorError::UnknownService(name.to_owned()))?;
        let (reply, result) = oneshot::channel();
        let gone = || SupervisorError::RunnerGone(name.to_owned());
        commands.send(command(reply)).await.map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }

    /// Starts the runner and log tailer of a service.
    fn register(
        &self,
        name: &str,
        spec_hash: String,
        commands: mpsc::Sender<Command>,
        runner: Runner,
        phase: Phase,
    ) {
        let shared = &self.inner.shared;
        let logs = Arc::new(LogBuffer::new(shared.options.log_ring_lines));
        let tailer = Tailer::new(
            log_path(&shared.paths.log_dir, name),
            shared.options.log_rotate_bytes,
            logs.clone(),
        );
        let handle = ServiceHandle {
            commands,
            spec_hash,
            logs,
            tailer: tokio::spawn(log_tail::run(tailer)),
            runner: tokio::spawn(runner.run(phase)),
        };
        lock(&self.inner.services).insert(name.to_owned(), handle);
    }
}

/// Fills in memory and CPU use of a running service.
fn with_usage(record: Record) -> ServiceStatus {
    let mut status = record.status;
    if let Some(pid) = status.pid {
        match &record.cgroup {
            Some(cg) => {
                status.cpu_usec = cg.cpu_usec();
                status.memory_bytes = cg.memory_bytes();
            }
            None => {
                status.cpu_usec = procfs::cpu_usec(pid);
                status.memory_bytes = procfs::rss_bytes(pid);
            }
        }
    }
    status
}

fn create_dir(path: &Path, mode: u32) -> Result<(), SupervisorError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| SupervisorError::io(format!("create {}", path.display()), e))
}

fn remove_file(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove file");
    }
}
