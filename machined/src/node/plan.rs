//! The node's state machine as a pure function: given where the node is
//! and what was asked, [`plan`] decides what happens, as a list of steps
//! the core executes in order. Nothing here does I/O, so every state and
//! every request is unit-tested without a process, a disk or a VM.
//!
//! Why steps instead of code paths: a transition's disk change is one
//! [`Step::Commit`] of the whole [`Record`] (one rename), and work that
//! must follow the reply (reloading the API, rebooting) is a
//! [`Step::AfterReply`] the API fires when the reply has gone out. The
//! order of side effects is data a test can read.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use machine_api::config::MachineConfig;

use crate::api::tls::ServerIdentity;
use crate::roles::NodeIdentity;
use crate::state::{change, unix_ms, Record, TryState, Wipe};

/// Where the node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No config: the maintenance listener takes one first config.
    Maintenance,
    /// Running its config (maybe with a staged one for the next boot).
    Configured,
    /// Running a `try` config that rolls back unless confirmed.
    Trying,
    /// Leaving its cluster and wiping its config and data.
    Resetting,
    /// Stopping to reboot: takes no more requests.
    Rebooting,
    /// Stopping to power off: takes no more requests.
    ShuttingDown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Maintenance => "maintenance",
            Phase::Configured => "configured",
            Phase::Trying => "trying",
            Phase::Resetting => "resetting",
            Phase::Rebooting => "rebooting",
            Phase::ShuttingDown => "shutting down",
        }
    }

    /// A phase that ends this machined; nothing more is accepted.
    fn is_final(self) -> bool {
        matches!(self, Phase::Rebooting | Phase::ShuttingDown)
    }
}

/// How a config should be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    Auto,
    NoReboot,
    Staged,
    Try(Duration),
}

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The maintenance listener (no client certificate), with whether the
    /// request carried the right token (or no token is required).
    Maintenance { token_ok: bool },
    /// The mutual-TLS listener; the authorization table already checked
    /// the caller's role.
    Authenticated,
}

/// What the serve loop does once a reply has gone out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// The server identity changed (maintenance → configured, new CA...).
    Reload,
    Reboot,
    Shutdown,
}

/// A request to the core.
#[derive(Clone, Debug)]
pub enum Request {
    Apply {
        config: Box<MachineConfig>,
        mode: ApplyMode,
        dry_run: bool,
        via: Via,
    },
    Confirm,
    /// A try watcher's verdict on the trial of `generation`.
    EndTry {
        generation: u64,
        reason: String,
    },
    /// The trust endpoint refused this worker's config.
    Refuse {
        reason: String,
    },
    /// `osctl reset`.
    Reset {
        /// Leave the etcd cluster first.
        graceful: bool,
        wipe: Wipe,
        /// Wipe the last copy of the etcd cluster's data too.
        force: bool,
        /// This node's etcd member, as the node found it just before
        /// asking (plan does no I/O).
        etcd: EtcdMember,
    },
    Reboot,
    Shutdown,
    /// `osctl bootstrap`: start a new etcd cluster on this node.
    Bootstrap,
    /// Bring services in line with the config (certificate renewal).
    Reconcile,
}

/// What a reset would take from etcd, found out by the node before it asks
/// the core (see `Node::reset`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EtcdMember {
    /// No etcd data on this node: a reset loses nothing of etcd's.
    NoData,
    /// This node's member has data, and etcd lists `others` other started
    /// members (members added but never started hold no data and do not
    /// count). With none, this data is the cluster's only copy.
    Member { others: usize },
    /// This node has etcd data, but etcd could not say how many members
    /// there are (why). A reset treats it like the last member: refusing
    /// a reset that turns out harmless costs a `--force`; wiping what
    /// turns out to be the only copy costs the cluster.
    Unknown(String),
}

/// One step of a transition, executed in order; a failing step stops the
/// transition there.
#[derive(Clone, Debug)]
pub enum Step {
    /// Leave the etcd cluster (graceful reset); before anything changes.
    LeaveEtcd,
    /// Write the record: the transition's one atomic step on disk.
    Commit(Record),
    /// The config the roles and the API see from now on.
    SetConfig(Option<Box<MachineConfig>>),
    /// /etc files and the host name.
    WriteEtcFiles,
    /// machine.sysctls and machine.kernelModules.
    ApplyKernelSettings,
    /// Services in line with the config.
    Reconcile,
    /// Watch the trial of this generation until its deadline.
    WatchTry {
        generation: u64,
        trial: TryState,
    },
    StopTryWatch,
    StopServices,
    /// Remove what the reset wipes (see [`Wipe`]).
    WipeData {
        wipe: Wipe,
        /// Remove the etcd bootstrap mark although the config stays.
        forget_etcd_bootstrap: bool,
    },
    /// Check etcd can start a new cluster here and mark it to.
    EtcdBootstrap,
    /// Tell the operator (`osctl health`, the log).
    Note(String),
    /// After the reply has gone out.
    AfterReply(Control),
}

/// What the caller is told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub outcome: &'static str,
    pub diff: String,
    pub reboot_required: bool,
    pub message: String,
    /// Every problem of an invalid config (a dry run's answer).
    pub problems: Vec<String>,
}

/// A planned transition.
#[derive(Clone, Debug)]
pub struct Transition {
    pub steps: Vec<Step>,
    /// The phase once every step has run.
    pub phase: Phase,
    pub reply: Reply,
}

/// Why a request was refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Denied(String),
}

/// What the node is now.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub phase: Phase,
    pub record: Record,
    pub config: Option<MachineConfig>,
}

/// Facts from outside the state: the clock, this boot, who the node is
/// when its config names nobody.
#[derive(Clone, Debug)]
pub struct Env {
    pub now: SystemTime,
    pub boot_id: String,
    /// Node name when the config names none (kernel `ip=`, host name).
    pub fallback_name: String,
    pub node_ip: IpAddr,
}

impl Env {
    fn identity(&self, cfg: Option<&MachineConfig>) -> NodeIdentity {
        NodeIdentity {
            name: cfg
                .and_then(|c| c.machine.hostname.as_ref())
                .map(|h| h.0.clone())
                .unwrap_or_else(|| self.fallback_name.clone()),
            ip: self.node_ip,
        }
    }

    /// Whether the OS API's certificate must change between two configs.
    fn identity_changes(&self, old: Option<&MachineConfig>, new: Option<&MachineConfig>) -> bool {
        ServerIdentity::key_of(old, &self.identity(old))
            != ServerIdentity::key_of(new, &self.identity(new))
    }
}

pub(crate) const TOKEN_REFUSED: &str =
    "maintenance token missing or wrong: it is printed on the node's console (pass --token)";
const MAINTENANCE_CLOSED: &str = "the node is configured: its maintenance API accepts no more configs; use mutual TLS with the cluster's osconfig (osctl apply-config without --insecure)";

fn busy(phase: Phase) -> Refusal {
    Refusal::Precondition(format!(
        "the node is {}: it accepts no more requests until it is back",
        phase.as_str()
    ))
}

/// The steps that make `new` the running config (a live change).
fn go_live(
    env: &Env,
    old: Option<&MachineConfig>,
    new: Option<MachineConfig>,
    steps: &mut Vec<Step>,
) {
    let reload = env.identity_changes(old, new.as_ref());
    steps.push(Step::SetConfig(new.map(Box::new)));
    steps.push(Step::WriteEtcFiles);
    steps.push(Step::ApplyKernelSettings);
    steps.push(Step::Reconcile);
    if reload {
        steps.push(Step::AfterReply(Control::Reload));
    }
}

/// Decides what `request` does to the node in `now`.
pub fn plan(now: &Snapshot, request: Request, env: &Env) -> Result<Transition, Refusal> {
    // Resetting lasts past its transition only when a step failed midway:
    // then the reset may be retried, or the node rebooted to finish it.
    let retry_allowed = matches!(
        request,
        Request::Reset { .. } | Request::Reboot | Request::Shutdown | Request::EndTry { .. }
    );
    if now.phase.is_final() || (now.phase == Phase::Resetting && !retry_allowed) {
        return Err(busy(now.phase));
    }
    match request {
        Request::Apply {
            config,
            mode,
            dry_run,
            via,
        } => plan_apply(now, *config, mode, dry_run, via, env),
        Request::Confirm => {
            if now.phase != Phase::Trying {
                return Err(Refusal::Precondition("no try config is pending".into()));
            }
            let record = Record {
                generation: now.record.generation + 1,
                trial: None,
                ..now.record.clone()
            };
            Ok(Transition {
                steps: vec![Step::Commit(record), Step::StopTryWatch],
                phase: Phase::Configured,
                reply: Reply {
                    outcome: "confirmed",
                    message: "the tried config is kept".into(),
                    ..Default::default()
                },
            })
        }
        Request::EndTry { generation, reason } => {
            if now.phase != Phase::Trying || now.record.generation != generation {
                // Confirmed, rolled back or replaced meanwhile.
                return Ok(unchanged(now.phase, "stale"));
            }
            Ok(rollback(
                now,
                env,
                &format!("try config rolled back: {reason}"),
            ))
        }
        Request::Refuse { reason } => {
            let previous = now
                .record
                .previous
                .as_deref()
                .and_then(|t| MachineConfig::parse(t).ok());
            let mut steps = Vec::new();
            let (record, phase, what) = match &previous {
                Some(_) => (
                    Record {
                        generation: now.record.generation + 1,
                        current: now.record.previous.clone(),
                        trial: None,
                        ..now.record.clone()
                    },
                    Phase::Configured,
                    "back to the last-known-good config",
                ),
                None => (
                    Record {
                        generation: now.record.generation + 1,
                        ..Record::default()
                    },
                    Phase::Maintenance,
                    "back to maintenance mode",
                ),
            };
            steps.push(Step::Commit(record));
            steps.push(Step::StopTryWatch);
            steps.push(Step::Note(format!("{reason}; {what}")));
            // The serve loop that asked restarts the API itself.
            steps.push(Step::SetConfig(previous.map(Box::new)));
            steps.push(Step::WriteEtcFiles);
            steps.push(Step::Reconcile);
            Ok(Transition {
                steps,
                phase,
                reply: Reply {
                    outcome: "refused",
                    ..Default::default()
                },
            })
        }
        Request::Reset {
            graceful,
            wipe,
            force,
            etcd,
        } => plan_reset(now, graceful, wipe, force, &etcd, env),
        Request::Reboot | Request::Shutdown => {
            let (phase, control, outcome) = match request {
                Request::Reboot => (Phase::Rebooting, Control::Reboot, "rebooting"),
                _ => (Phase::ShuttingDown, Control::Shutdown, "shutting down"),
            };
            Ok(Transition {
                steps: vec![Step::AfterReply(control)],
                phase,
                reply: Reply {
                    outcome,
                    ..Default::default()
                },
            })
        }
        Request::Bootstrap => {
            if now.config.is_none() {
                return Err(Refusal::Precondition("the node has no config".into()));
            }
            Ok(Transition {
                steps: vec![Step::EtcdBootstrap, Step::Reconcile],
                phase: now.phase,
                reply: Reply {
                    outcome: "bootstrapped",
                    message: "etcd is starting a new cluster on this node".into(),
                    ..Default::default()
                },
            })
        }
        Request::Reconcile => Ok(Transition {
            steps: vec![Step::Reconcile],
            phase: now.phase,
            reply: Reply::default(),
        }),
    }
}

/// Why a reset that destroys etcd data is refused without `--force`, if it
/// is: this node holds the last copy of its cluster's data, or etcd cannot
/// tell (the safer reading). Every wipe mode destroys etcd data (see
/// [`Wipe`]).
fn last_copy(etcd: &EtcdMember, wipe: Wipe) -> Option<String> {
    match etcd {
        EtcdMember::NoData | EtcdMember::Member { others: 1.. } => None,
        EtcdMember::Member { others: 0 } => Some(format!(
            "this node is the last member of its etcd cluster: --wipe {wipe} destroys the cluster's only copy of its data (every Kubernetes object); pass --force to wipe it anyway"
        )),
        EtcdMember::Unknown(why) => Some(format!(
            "cannot ask etcd how many members remain ({}), so this node may hold the cluster's last copy of its data, which --wipe {wipe} destroys; pass --force to wipe it anyway",
            why.replace('\n', " ")
        )),
    }
}

/// `osctl reset`: leave etcd (graceful), mark the reset in the record
/// (with its wipe mode), then wipe and finish.
fn plan_reset(
    now: &Snapshot,
    graceful: bool,
    wipe: Wipe,
    force: bool,
    etcd: &EtcdMember,
    env: &Env,
) -> Result<Transition, Refusal> {
    if now.record.resetting {
        // A step of the reset failed (the record still says resetting): a
        // retry finishes the reset the record names. Its checks passed and
        // its leave ran before the mark, and the services are stopped, so
        // neither runs again.
        if wipe != now.record.wipe {
            return Err(Refusal::Precondition(format!(
                "a reset with --wipe {0} is under way: retry it with --wipe {0}, or reboot to finish it",
                now.record.wipe
            )));
        }
        return finish_reset(now, &now.record, env);
    }
    if wipe == Wipe::Ephemeral && now.phase == Phase::Trying {
        return Err(Refusal::Precondition(
            "a try config is pending: confirm it (osctl confirm) or wait for its rollback before a reset that keeps the config".into(),
        ));
    }
    if !force {
        if let Some(why) = last_copy(etcd, wipe) {
            return Err(Refusal::Precondition(why));
        }
    }
    // Marked first: a crash mid-wipe finishes the same reset at the next
    // start instead of booting a config whose data is half gone.
    let marked = Record {
        generation: now.record.generation + 1,
        resetting: true,
        wipe,
        forget_etcd_bootstrap: wipe == Wipe::Ephemeral
            && matches!(
                etcd,
                EtcdMember::Member { others: 1.. } | EtcdMember::Unknown(_)
            ),
        ..now.record.clone()
    };
    let mut t = finish_reset(now, &marked, env)?;
    let mut steps = Vec::new();
    if graceful {
        steps.push(Step::LeaveEtcd);
    }
    steps.push(Step::Commit(marked));
    steps.append(&mut t.steps);
    t.steps = steps;
    Ok(t)
}

/// Stop everything and wipe what the marked reset names.
fn wipe_steps(marked: &Record) -> Vec<Step> {
    vec![
        Step::StopTryWatch,
        Step::StopServices,
        Step::WipeData {
            wipe: marked.wipe,
            forget_etcd_bootstrap: marked.forget_etcd_bootstrap,
        },
    ]
}

/// After the reset is marked in `marked`: wipe, then forget the config
/// (`all`, `state`) or start the services afresh with it (`ephemeral`).
fn finish_reset(now: &Snapshot, marked: &Record, env: &Env) -> Result<Transition, Refusal> {
    if marked.wipe.forgets_config() {
        let mut steps = reset_steps(marked);
        steps.push(Step::AfterReply(Control::Reload));
        let message = match marked.wipe {
            Wipe::State => "config, identity and etcd data wiped (the rest of /var kept); the node is in maintenance mode",
            _ => "config and data wiped; the node is in maintenance mode",
        };
        return Ok(Transition {
            steps,
            phase: Phase::Maintenance,
            reply: Reply {
                outcome: "reset",
                message: message.into(),
                ..Default::default()
            },
        });
    }
    let config = now.config.clone().or_else(|| {
        marked
            .current
            .as_deref()
            .and_then(|t| MachineConfig::parse(t).ok())
    });
    let Some(config) = config else {
        return Err(Refusal::Precondition(
            "the node has no config to keep: reset with --wipe all".into(),
        ));
    };
    let mut steps = wipe_steps(marked);
    steps.push(Step::Commit(Record {
        generation: marked.generation + 1,
        resetting: false,
        wipe: Wipe::All,
        forget_etcd_bootstrap: false,
        ..marked.clone()
    }));
    steps.push(Step::Note(ephemeral_note(&config, marked)));
    go_live(env, now.config.as_ref(), Some(config), &mut steps);
    Ok(Transition {
        steps,
        phase: Phase::Configured,
        reply: Reply {
            outcome: "reset",
            message: "data on EPHEMERAL wiped; the services start afresh with the same config"
                .into(),
            ..Default::default()
        },
    })
}

/// What an ephemeral reset tells the operator: how etcd comes back.
fn ephemeral_note(config: &MachineConfig, marked: &Record) -> String {
    let what = "reset --wipe ephemeral: etcd, containerd and kubelet data wiped, config kept";
    if !config.has_role(machine_api::config::Role::Etcd) {
        return format!("{what}; services restarting");
    }
    if !config.cluster.etcd.endpoints.is_empty() {
        return format!(
            "{what}; etcd joins its cluster again as a new member through cluster.etcd.endpoints"
        );
    }
    if marked.forget_etcd_bootstrap {
        return format!("{what}; this node founded its etcd cluster and its config names no cluster.etcd.endpoints, so etcd waits: list a surviving member there (osctl apply-config) to join again; `osctl bootstrap` would found a second cluster");
    }
    format!("{what}; etcd starts a new, empty cluster on this node")
}

/// After an `all` or `state` reset is marked: stop, wipe, forget the config.
fn reset_steps(marked: &Record) -> Vec<Step> {
    let mut steps = wipe_steps(marked);
    steps.extend([
        Step::Commit(Record {
            generation: marked.generation + 1,
            ..Record::default()
        }),
        Step::SetConfig(None),
        Step::WriteEtcFiles,
        Step::Reconcile,
    ]);
    steps
}

fn unchanged(phase: Phase, outcome: &'static str) -> Transition {
    Transition {
        steps: Vec::new(),
        phase,
        reply: Reply {
            outcome,
            ..Default::default()
        },
    }
}

/// Back to `previous`, ending the trial.
fn rollback(now: &Snapshot, env: &Env, note: &str) -> Transition {
    let previous = now
        .record
        .previous
        .as_deref()
        .and_then(|t| MachineConfig::parse(t).ok());
    let mut steps = vec![Step::Commit(Record {
        generation: now.record.generation + 1,
        current: now.record.previous.clone(),
        trial: None,
        ..now.record.clone()
    })];
    steps.push(Step::StopTryWatch);
    steps.push(Step::Note(note.into()));
    let phase = if previous.is_some() {
        Phase::Configured
    } else {
        Phase::Maintenance
    };
    go_live(env, now.config.as_ref(), previous, &mut steps);
    Transition {
        steps,
        phase,
        reply: Reply {
            outcome: "rolled back",
            ..Default::default()
        },
    }
}

fn plan_apply(
    now: &Snapshot,
    new: MachineConfig,
    mode: ApplyMode,
    dry_run: bool,
    via: Via,
    env: &Env,
) -> Result<Transition, Refusal> {
    let canonical = new.to_yaml();
    let diff = change::diff(now.config.as_ref(), &new);
    if let Via::Maintenance { token_ok } = via {
        if !token_ok {
            return Err(Refusal::Denied(TOKEN_REFUSED.into()));
        }
        // The takeover guard: whatever arrives on the maintenance listener
        // once a config exists is refused, token or not.
        if now.phase != Phase::Maintenance || now.record.current.is_some() {
            return Err(Refusal::Precondition(MAINTENANCE_CLOSED.into()));
        }
        if matches!(mode, ApplyMode::Try(_)) {
            return Err(Refusal::Precondition(
                "try needs a running config to roll back to; apply with --mode auto first".into(),
            ));
        }
        if dry_run {
            return Ok(Transition {
                steps: Vec::new(),
                phase: now.phase,
                reply: Reply {
                    outcome: "dry-run",
                    diff,
                    ..Default::default()
                },
            });
        }
        let mut steps = vec![Step::Commit(Record {
            generation: now.record.generation + 1,
            current: Some(canonical),
            ..Record::default()
        })];
        steps.push(Step::SetConfig(Some(Box::new(new))));
        steps.push(Step::WriteEtcFiles);
        steps.push(Step::ApplyKernelSettings);
        steps.push(Step::Reconcile);
        // Always: the maintenance listener closes once the reply is out.
        steps.push(Step::AfterReply(Control::Reload));
        return Ok(Transition {
            steps,
            phase: Phase::Configured,
            reply: Reply {
                outcome: "applied",
                diff,
                message: "config applied; the API now requires client certificates from the OS CA"
                    .into(),
                ..Default::default()
            },
        });
    }
    let Some(old) = now.config.as_ref() else {
        return Err(Refusal::Precondition(
            "the node is in maintenance mode: apply the first config with --insecure and its token"
                .into(),
        ));
    };
    if now.phase == Phase::Trying {
        return Err(Refusal::Precondition(
            "a try config is pending: confirm it (osctl confirm) or wait for its rollback".into(),
        ));
    }
    let reboot_fields = change::reboot_required(old, &new);
    let reboot_required = !reboot_fields.is_empty();
    let mut reply = Reply {
        outcome: "applied",
        diff,
        reboot_required,
        message: String::new(),
        problems: Vec::new(),
    };
    if *old == new {
        reply.outcome = "unchanged";
        return Ok(Transition {
            steps: Vec::new(),
            phase: now.phase,
            reply,
        });
    }
    if dry_run {
        reply.outcome = "dry-run";
        if reboot_required {
            reply.message = format!("needs a reboot: {}", reboot_fields.join(", "));
        }
        return Ok(Transition {
            steps: Vec::new(),
            phase: now.phase,
            reply,
        });
    }
    let next = now.record.generation + 1;
    let live = Record {
        generation: next,
        current: Some(canonical.clone()),
        previous: now.record.current.clone(),
        ..Record::default()
    };
    let mut steps = Vec::new();
    let phase = match mode {
        ApplyMode::Staged => {
            steps.push(Step::Commit(Record {
                generation: next,
                staged: Some(canonical),
                ..now.record.clone()
            }));
            reply.outcome = "staged";
            reply.message = "the config takes effect at the next reboot".into();
            Phase::Configured
        }
        ApplyMode::NoReboot if reboot_required => {
            return Err(Refusal::Precondition(format!(
                "these changes need a reboot: {}; use --mode auto or --mode staged",
                reboot_fields.join(", ")
            )));
        }
        ApplyMode::Try(_) if reboot_required => {
            return Err(Refusal::Precondition(format!(
                "try cannot roll back changes that need a reboot ({}); use --mode staged",
                reboot_fields.join(", ")
            )));
        }
        ApplyMode::Auto if reboot_required => {
            steps.push(Step::Commit(live));
            steps.push(Step::AfterReply(Control::Reboot));
            reply.outcome = "rebooting";
            reply.message = format!("rebooting to apply {}", reboot_fields.join(", "));
            Phase::Rebooting
        }
        ApplyMode::Try(timeout) => {
            let trial = TryState {
                deadline_unix_ms: unix_ms(env.now + timeout),
                boot_id: env.boot_id.clone(),
            };
            steps.push(Step::Commit(Record {
                trial: Some(trial.clone()),
                ..live
            }));
            go_live(env, Some(old), Some(new), &mut steps);
            steps.push(Step::WatchTry {
                generation: next,
                trial,
            });
            reply.outcome = "trying";
            reply.message = format!(
                "rolls back in {}s unless confirmed with `osctl confirm`, or at once if a service fails",
                timeout.as_secs()
            );
            Phase::Trying
        }
        ApplyMode::Auto | ApplyMode::NoReboot => {
            steps.push(Step::Commit(live));
            go_live(env, Some(old), Some(new), &mut steps);
            Phase::Configured
        }
    };
    Ok(Transition {
        steps,
        phase,
        reply,
    })
}

/// What a start of machined makes of the record it finds: finishes a
/// reset, resolves a pending try (kept within this boot and its deadline,
/// rolled back otherwise), promotes a staged config, and falls back to the
/// previous config when the current one no longer validates. The returned
/// transition's steps hold at most one commit besides a reset's.
pub fn at_start(record: &Record, env: &Env) -> Transition {
    let mut notes = Vec::new();
    let mut steps = Vec::new();
    let mut r = record.clone();
    if r.resetting && r.wipe.forgets_config() {
        notes.push(format!(
            "a reset (--wipe {}) was interrupted; finished it",
            r.wipe
        ));
        steps.extend(reset_steps(&r));
        steps.push(Step::Note(notes.join("; ")));
        return Transition {
            steps,
            phase: Phase::Maintenance,
            reply: Reply::default(),
        };
    }
    if r.resetting {
        // An ephemeral reset keeps the config: wipe, then start as any
        // start does (the commit below clears the mark).
        notes.push("a reset (--wipe ephemeral) was interrupted; finished it".to_owned());
        steps.extend(wipe_steps(&r));
        r.resetting = false;
        r.wipe = Wipe::All;
        r.forget_etcd_bootstrap = false;
    }
    let mut watch = None;
    if let Some(t) = &r.trial {
        let deadline = SystemTime::UNIX_EPOCH + Duration::from_millis(t.deadline_unix_ms);
        if t.boot_id == env.boot_id && deadline > env.now {
            watch = Some(t.clone());
        } else {
            r.current = r.previous.clone();
            r.trial = None;
            notes.push(
                "a try config was not confirmed before reboot or its deadline; rolled back"
                    .to_owned(),
            );
        }
    }
    if let Some(staged) = r.staged.take() {
        match MachineConfig::parse(&staged) {
            Ok(_) => {
                if r.current.as_deref() != Some(staged.as_str()) {
                    r.previous = r.current.take();
                }
                r.current = Some(staged);
                notes.push("the staged config was applied".to_owned());
            }
            Err(p) => notes.push(format!("the staged config is invalid and was dropped: {p}")),
        }
    }
    let mut config = None;
    if let Some(text) = r.current.clone() {
        match MachineConfig::parse(&text) {
            Ok(c) => config = Some(c),
            Err(p) => {
                notes.push(format!("the running config does not validate: {p}"));
                match r.previous.as_deref().map(MachineConfig::parse) {
                    Some(Ok(c)) => {
                        notes.push("booted the last-known-good config".into());
                        r.current = r.previous.clone();
                        r.trial = None;
                        watch = None;
                        config = Some(c);
                    }
                    _ => {
                        notes.push("no config to fall back to: maintenance mode".into());
                        r.current = None;
                        r.trial = None;
                        watch = None;
                    }
                }
            }
        }
    }
    if r != *record {
        r.generation += 1;
        steps.push(Step::Commit(r.clone()));
    }
    for n in notes {
        steps.push(Step::Note(n));
    }
    let phase = match (&config, &watch) {
        (None, _) => Phase::Maintenance,
        (Some(_), Some(_)) => Phase::Trying,
        (Some(_), None) => Phase::Configured,
    };
    steps.push(Step::SetConfig(config.map(Box::new)));
    steps.push(Step::WriteEtcFiles);
    steps.push(Step::ApplyKernelSettings);
    steps.push(Step::Reconcile);
    if let Some(trial) = watch {
        steps.push(Step::WatchTry {
            generation: r.generation,
            trial,
        });
    }
    Transition {
        steps,
        phase,
        reply: Reply::default(),
    }
}

#[cfg(test)]
mod tests;
