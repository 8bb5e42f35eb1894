//! The task that owns one service: it waits for dependencies, runs the
//! pre-start step, spawns, health-checks, restarts with backoff, and obeys
//! operator commands. Everything that happens to a service happens here, in
//! sequence, so there is no lock around a service's lifecycle.
//!
//! ```text
//!            ┌──────────── operator start / new spec ─────────────┐
//!            ▼                                                    │
//!   Start: Waiting → Starting ──spawned──▶ Running: Running ⇄ Healthy
//!      ▲        │ pre-start/spawn failed          │ exited
//!      │        ▼                                 ▼
//!      └─── Backoff (Failed) ◀────────────────────┘
//!   Idle (Stopped, or Failed without a spec) ◀── stop / stop_all
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::backoff::{self, Backoff, RESET_AFTER_HEALTHY};
use super::error::SupervisorError;
use super::health::{self, Prober};
use super::log_tail::log_path;
use super::process::{ExitOutcome, RunningProcess};
use super::shared::{Record, Shared};
use super::spawn::spawn;
use super::spec::ServiceSpec;
use super::state_file::StateFile;
use super::status::{ServiceState, ServiceStatus};

/// Stop timeout of an adopted service whose spec is not known yet.
/// Failed health checks in a row that make a healthy service unhealthy.
const FAILURE_THRESHOLD: u32 = 3;
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a command's result goes.
pub(crate) type Reply = oneshot::Sender<Result<(), SupervisorError>>;

/// What the API asks of a runner. Each carries a reply sent once the
/// command has taken effect (a stop: once the processes are gone).
#[derive(Debug)]
pub(crate) enum Command {
    /// Operator start: clears a sticky stop.
    Start(Reply),
    /// Operator stop: sticky, persisted.
    Stop(Reply),
    /// Shutdown stop: not sticky.
    Halt(Reply),
    /// Operator restart: stop if running, then start at once.
    Restart(Reply),
    /// New spec from reconcile; `restart` when its hash changed.
    SetSpec {
        spec: Box<ServiceSpec>,
        restart: bool,
        reply: Reply,
    },
    /// Stop and forget the service (it left the desired set).
    Remove(Reply),
}

/// What a runner is doing.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Nothing runs; waiting for a command.
    Idle,
    /// Waiting for dependencies, running pre-start, spawning.
    Start,
    /// Failed; restarting after the delay.
    Backoff(Duration),
    Running(Box<RunningProcess>),
    /// The task ends.
    Exit,
}

/// The phase a command arrives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Here {
    Idle,
    Start,
    Backoff,
    Running,
}

/// What to do after a command.
#[derive(Debug)]
enum Next {
    /// Carry on with the current phase.
    Stay,
    Go(Phase),
}

#[derive(Debug)]
pub(crate) struct Runner {
    name: String,
    shared: Arc<Shared>,
    /// None for a process adopted before reconcile gave its spec.
    spec: Option<ServiceSpec>,
    spec_hash: String,
    depends_on: Vec<String>,
    /// Bumped when the spec changes, so a prober picks up the new check.
    spec_generation: u64,
    restarts: u32,
    operator_stopped: bool,
    backoff: Backoff,
    commands: mpsc::Receiver<Command>,
    changes: watch::Receiver<u64>,
}

impl Runner {
    /// A runner for a service that is not running yet. `prior` is what a
    /// previous machined left (restart count, sticky operator stop).
    pub(crate) fn for_spec(
        shared: Arc<Shared>,
        spec: ServiceSpec,
        prior: Option<StateFile>,
        commands: mpsc::Receiver<Command>,
    ) -> (Self, Phase) {
        let operator_stopped = prior.as_ref().is_some_and(|p| p.operator_stopped);
        let restarts = prior.as_ref().map_or(0, |p| p.restarts);
        // The first status already says what the runner will do first, so
        // that no reader sees a blank Waiting.
        let unmet = shared.unhealthy(&spec.depends_on);
        let mut status = if unmet.is_empty() {
            ServiceStatus::new(&spec.name, ServiceState::Starting, spec.depends_on.clone())
        } else {
            let mut st =
                ServiceStatus::new(&spec.name, ServiceState::Waiting, spec.depends_on.clone());
            st.message = waiting_message(&unmet);
            st
        };
        status.restarts = restarts;
        let phase = if operator_stopped {
            status.state = ServiceState::Stopped;
            status.message = "stopped by operator".to_owned();
            Phase::Idle
        } else {
            Phase::Start
        };
        shared.insert(status);
        let runner = Self {
            name: spec.name.clone(),
            changes: shared.watch_changes(),
            shared,
            spec_hash: spec.spec_hash(),
            depends_on: spec.depends_on.clone(),
            spec: Some(spec),
            spec_generation: 0,
            restarts,
            operator_stopped,
            backoff: backoff::restarts(),
            commands,
        };
        (runner, phase)
    }

    /// A runner for a live process a previous machined started. Its spec
    /// arrives with the next reconcile; until then it is only watched.
    pub(crate) fn adopted(
        shared: Arc<Shared>,
        state: StateFile,
        process: RunningProcess,
        commands: mpsc::Receiver<Command>,
    ) -> (Self, Phase) {
        let mut status =
            ServiceStatus::new(&state.name, ServiceState::Running, state.depends_on.clone());
        status.restarts = state.restarts;
        status.pid = Some(process.pid());
        status.adopted = true;
        status.message = "adopted".to_owned();
        shared.insert(status);
        shared.update(&state.name, |r| r.cgroup = process.cgroup().cloned());
        let runner = Self {
            name: state.name,
            changes: shared.watch_changes(),
            shared,
            spec: None,
            spec_hash: state.spec_hash,
            depends_on: state.depends_on,
            spec_generation: 0,
            restarts: state.restarts,
            operator_stopped: false,
            backoff: backoff::restarts(),
            commands,
        };
        (runner, Phase::Running(Box::new(process)))
    }

    /// Drives the service until it is removed or the supervisor goes away.
    pub(crate) async fn run(mut self, mut phase: Phase) {
        loop {
            phase = match phase {
                Phase::Idle => self.idle().await,
                Phase::Start => self.start().await,
                Phase::Backoff(delay) => self.backoff(delay).await,
                Phase::Running(process) => self.running(process).await,
                Phase::Exit => return,
            };
        }
    }

    async fn idle(&mut self) -> Phase {
        match self.commands.recv().await {
            None => Phase::Exit,
            Some(cmd) => match self.handle(cmd, Here::Idle, &mut None).await {
                Next::Stay => Phase::Idle,
                Next::Go(phase) => phase,
            },
        }
    }

    /// Waits for dependencies, runs pre-start and spawns the process.
    async fn start(&mut self) -> Phase {
        if self.spec.is_none() {
            return Phase::Idle;
        }
        loop {
            self.changes.borrow_and_update();
            let unmet = self.shared.unhealthy(&self.depends_on);
            if unmet.is_empty() {
                break;
            }
            self.set_state(ServiceState::Waiting, waiting_message(&unmet));
            tokio::select! {
                _ = self.changes.changed() => {}
                cmd = self.commands.recv() => match cmd {
                    None => return Phase::Exit,
                    Some(cmd) => match self.handle(cmd, Here::Start, &mut None).await {
                        Next::Stay => {}
                        Next::Go(phase) => return phase,
                    },
                },
            }
        }

        // Taken after the wait: reconcile may have updated it meanwhile.
        let Some(spec) = self.spec.clone() else {
            return Phase::Idle;
        };
        self.set_state(ServiceState::Starting, String::new());
        if let Some(pre_start) = spec.pre_start.clone() {
            let (shared, name) = (self.shared.clone(), self.name.clone());
            let progress = move |message: String| {
                shared.update(&name, |r| r.status.message = message);
            };
            let step = pre_start.run(&progress);
            tokio::pin!(step);
            let result = loop {
                tokio::select! {
                    result = &mut step => break result,
                    cmd = self.commands.recv() => match cmd {
                        None => return Phase::Exit,
                        Some(cmd) => match self.handle(cmd, Here::Start, &mut None).await {
                            Next::Stay => {}
                            Next::Go(phase) => return phase,
                        },
                    },
                }
            };
            if let Err(reason) = result {
                tracing::warn!(service = %self.name, %reason, "pre-start failed");
                return self.failed(reason).await;
            }
        }

        let cgroup = self.shared.cgroup_for(&self.name);
        if let Some(cg) = &cgroup {
            if let Some(w) = spec.cpu_weight {
                cg.set_cpu_weight(w);
            }
            if let Err(e) = cg.prepare().await {
                return self
                    .failed(format!("cgroup {}: {e}", cg.path().display()))
                    .await;
            }
        }
        let log = log_path(&self.shared.paths.log_dir, &self.name);
        let process = spawn(&spec, &log, cgroup.as_ref())
            .and_then(|child| RunningProcess::from_child(child, cgroup));
        match process {
            Ok(process) => {
                tracing::info!(service = %self.name, pid = process.pid(), "service started");
                let pid = process.pid();
                let cgroup = process.cgroup().cloned();
                self.update(|r| {
                    r.status.state = ServiceState::Running;
                    r.status.message = String::new();
                    r.status.pid = Some(pid);
                    r.status.adopted = false;
                    r.cgroup = cgroup;
                });
                self.persist(Some(&process)).await;
                Phase::Running(Box::new(process))
            }
            Err(e) => {
                tracing::warn!(service = %self.name, error = %e, "cannot start service");
                self.failed(e.to_string()).await
            }
        }
    }

    /// Marks the service Failed and schedules a restart.
    async fn failed(&mut self, reason: String) -> Phase {
        self.update(|r| {
            r.status.state = ServiceState::Failed;
            r.status.message = reason;
            r.status.pid = None;
            r.status.adopted = false;
            r.cgroup = None;
        });
        self.persist(None).await;
        Phase::Backoff(self.backoff.next_delay())
    }

    async fn backoff(&mut self, delay: Duration) -> Phase {
        tracing::info!(service = %self.name, ?delay, "restarting after backoff");
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                cmd = self.commands.recv() => match cmd {
                    None => return Phase::Exit,
                    Some(cmd) => match self.handle(cmd, Here::Backoff, &mut None).await {
                        Next::Stay => {}
                        Next::Go(phase) => return phase,
                    },
                },
            }
        }
        self.restarts = self.restarts.saturating_add(1);
        let restarts = self.restarts;
        self.update(|r| r.status.restarts = restarts);
        self.persist(None).await;
        Phase::Start
    }

    /// Watches a running process: health checks, exit, commands.
    async fn running(&mut self, process: Box<RunningProcess>) -> Phase {
        let mut process = Some(*process);
        let mut prober = self.spec.as_ref().map(|s| Prober::start(s.health.clone()));
        let mut prober_generation = self.spec_generation;
        let mut healthy_since: Option<Instant> = None;
        let mut failures = 0u32;
        loop {
            tokio::select! {
                outcome = wait(&mut process) => {
                    drop(prober);
                    return self.exited(process, outcome, healthy_since).await;
                }
                result = health::next_result(&mut prober) => {
                    self.on_health(result, &mut healthy_since, &mut failures);
                }
                cmd = self.commands.recv() => match cmd {
                    // The supervisor is gone (dropped or detached): leave
                    // the process running for the next one to adopt.
                    None => return Phase::Exit,
                    Some(cmd) => match self.handle(cmd, Here::Running, &mut process).await {
                        Next::Stay => {
                            if prober_generation != self.spec_generation {
                                prober = self.spec.as_ref().map(|s| Prober::start(s.health.clone()));
                                prober_generation = self.spec_generation;
                            }
                        }
                        Next::Go(phase) => return phase,
                    },
                },
            }
        }
    }

    /// A healthy service turns unhealthy only after
    /// [`FAILURE_THRESHOLD`] failed checks in a row (Kubernetes probes'
    /// default `failureThreshold`): one check that timed out on a loaded
    /// node is not an outage, and flapping states made `osctl health
    /// --wait` and dependents' gating see a healthy node as unhealthy.
    fn on_health(
        &mut self,
        result: Result<(), String>,
        healthy_since: &mut Option<Instant>,
        failures: &mut u32,
    ) {
        match result {
            Ok(()) => {
                *failures = 0;
                if healthy_since.is_none() {
                    tracing::info!(service = %self.name, "service healthy");
                    *healthy_since = Some(Instant::now());
                }
                self.set_state(ServiceState::Healthy, String::new());
            }
            Err(reason) => {
                *failures += 1;
                if healthy_since.is_some() && *failures < FAILURE_THRESHOLD {
                    tracing::debug!(service = %self.name, %reason, failures = *failures, "health check failed");
                    return;
                }
                if healthy_since.take().is_some() {
                    tracing::warn!(service = %self.name, %reason, "service unhealthy");
                }
                self.set_state(ServiceState::Running, reason);
            }
        }
    }

    /// The process exited on its own.
    async fn exited(
        &mut self,
        mut process: Option<RunningProcess>,
        outcome: ExitOutcome,
        healthy_since: Option<Instant>,
    ) -> Phase {
        if let Some(p) = process.as_mut() {
            p.kill_leftovers().await;
        }
        let reason = outcome.describe();
        tracing::warn!(service = %self.name, %reason, "service exited");
        if healthy_since.is_some_and(|t| t.elapsed() >= RESET_AFTER_HEALTHY) {
            self.backoff.reset();
        }
        if self.spec.is_none() {
            // Adopted, spec unknown: nothing to restart with until reconcile.
            self.update(|r| {
                r.status.state = ServiceState::Failed;
                r.status.message = reason;
                r.status.pid = None;
                r.cgroup = None;
            });
            self.persist(None).await;
            return Phase::Idle;
        }
        self.failed(reason).await
    }

    /// Applies a command. `process` is the running process, if any; a
    /// command that stops it takes it out.
    async fn handle(
        &mut self,
        cmd: Command,
        here: Here,
        process: &mut Option<RunningProcess>,
    ) -> Next {
        match cmd {
            Command::Start(reply) => {
                if self.spec.is_none() && process.is_none() {
                    let _ = reply.send(Err(SupervisorError::NotConfigured(self.name.clone())));
                    return Next::Stay;
                }
                let was_stopped = std::mem::replace(&mut self.operator_stopped, false);
                if was_stopped {
                    self.persist(process.as_ref()).await;
                }
                let _ = reply.send(Ok(()));
                match here {
                    Here::Running | Here::Start => Next::Stay,
                    Here::Idle | Here::Backoff => {
                        self.backoff.reset();
                        Next::Go(Phase::Start)
                    }
                }
            }
            Command::Stop(reply) => {
                self.stop_process(process, "stopped by operator").await;
                self.operator_stopped = true;
                self.persist(None).await;
                let _ = reply.send(Ok(()));
                Next::Go(Phase::Idle)
            }
            Command::Halt(reply) => {
                // An already stopped service keeps its reason: a shutdown
                // does not turn "stopped by operator" into "stopped".
                let stopped = self
                    .shared
                    .get(&self.name)
                    .is_some_and(|r| r.status.state == ServiceState::Stopped);
                if process.is_some() || !stopped {
                    self.stop_process(process, "stopped").await;
                }
                self.persist(None).await;
                let _ = reply.send(Ok(()));
                Next::Go(Phase::Idle)
            }
            Command::Restart(reply) => {
                if self.spec.is_none() {
                    let _ = reply.send(Err(SupervisorError::NotConfigured(self.name.clone())));
                    return Next::Stay;
                }
                self.stop_process(process, "restarting").await;
                self.operator_stopped = false;
                self.backoff.reset();
                self.persist(None).await;
                let _ = reply.send(Ok(()));
                Next::Go(Phase::Start)
            }
            Command::SetSpec {
                spec,
                restart,
                reply,
            } => {
                if restart {
                    tracing::info!(service = %self.name, "spec changed");
                    if process.is_some() {
                        // With the old spec's stop timeout.
                        self.stop_process(process, "restarting: spec changed").await;
                    }
                }
                self.apply_spec(*spec);
                self.persist(process.as_ref()).await;
                let _ = reply.send(Ok(()));
                if process.is_some() || (here == Here::Start && !restart) {
                    // Kept running / keeps starting; new dependencies are
                    // seen through the status change apply_spec made.
                    Next::Stay
                } else if self.operator_stopped {
                    Next::Go(Phase::Idle)
                } else if here == Here::Backoff && !restart {
                    Next::Stay
                } else {
                    Next::Go(Phase::Start)
                }
            }
            Command::Remove(reply) => {
                self.stop_process(process, "removed").await;
                StateFile::remove(&self.shared.paths.state_dir, &self.name);
                self.shared.remove(&self.name);
                tracing::info!(service = %self.name, "service removed");
                let _ = reply.send(Ok(()));
                Next::Go(Phase::Exit)
            }
        }
    }

    fn apply_spec(&mut self, spec: ServiceSpec) {
        self.spec_hash = spec.spec_hash();
        self.depends_on = spec.depends_on.clone();
        self.spec = Some(spec);
        self.spec_generation = self.spec_generation.wrapping_add(1);
        let depends_on = self.depends_on.clone();
        self.update(|r| r.status.depends_on = depends_on);
    }

    /// Stops the process if there is one and marks the service Stopped
    /// with `message`.
    async fn stop_process(&mut self, process: &mut Option<RunningProcess>, message: &str) {
        if let Some(mut p) = process.take() {
            let grace = self
                .spec
                .as_ref()
                .map_or(DEFAULT_STOP_TIMEOUT, |s| s.stop_timeout);
            tracing::info!(service = %self.name, pid = p.pid(), ?grace, "stopping service");
            let outcome = p.terminate(grace).await;
            tracing::info!(service = %self.name, outcome = %outcome.describe(), "service stopped");
            if let Some(cg) = p.cgroup() {
                cg.remove();
            }
        }
        self.update(|r| {
            r.status.state = ServiceState::Stopped;
            r.status.message = message.to_owned();
            r.status.pid = None;
            r.status.adopted = false;
            r.cgroup = None;
        });
    }

    fn set_state(&self, state: ServiceState, message: String) {
        self.update(|r| {
            r.status.state = state;
            r.status.message = message;
        });
    }

    fn update(&self, change: impl FnOnce(&mut Record)) {
        self.shared.update(&self.name, change);
    }

    /// Writes the state file; failure is logged (it only costs adoption
    /// after a machined restart).
    async fn persist(&self, process: Option<&RunningProcess>) {
        let mut state = StateFile::new(&self.name);
        state.pid = process.map(RunningProcess::pid);
        state.starttime = process.map(RunningProcess::starttime);
        state.cgroup = process.and_then(|p| p.cgroup().map(|c| c.path().to_owned()));
        state.spec_hash = self.spec_hash.clone();
        state.restarts = self.restarts;
        state.operator_stopped = self.operator_stopped;
        state.depends_on = self.depends_on.clone();
        let dir = self.shared.paths.state_dir.clone();
        let result = tokio::task::spawn_blocking(move || state.save(&dir)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(service = %self.name, error = %e, "cannot save state"),
            Err(e) => tracing::error!(service = %self.name, error = %e, "cannot save state"),
        }
    }
}

fn waiting_message(unmet: &[String]) -> String {
    format!("waiting for {}", unmet.join(", "))
}

/// The exit of the running process; never resolves without one.
async fn wait(process: &mut Option<RunningProcess>) -> ExitOutcome {
    match process {
        Some(p) => p.wait().await,
        None => std::future::pending().await,
    }
}
