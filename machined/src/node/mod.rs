//! The node: its config, its services, and what the API does to them.
//!
//! One task, the core ([`core`]), owns the node's state (phase, config
//! record, running config) and executes transitions that the pure
//! [`plan`](plan::plan) function decides. API handlers send it requests and
//! await the result; everyone else reads the latest [`Snapshot`] from a
//! watch channel. Boot steps live in [`boot`], etcd's operations in
//! [`etcd_ops`], kernel settings in [`crate::kernel`].

pub mod boot;
mod core;
pub mod etcd_backup_ops;
pub mod etcd_ops;
pub mod kube_renewal;
pub mod plan;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machine_api::config::MachineConfig;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use crate::paths::Paths;
use crate::roles::{NodeIdentity, RoleContext};
use crate::state::{ConfigStore, StoreError};
use crate::supervisor::Supervisor;
pub use plan::{ApplyMode, Control, Phase, Reply, Request, Snapshot, Via};

/// How machined was started.
#[derive(Clone, Debug)]
pub struct Options {
    pub paths: Paths,
    pub bin_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    pub node_ip: IpAddr,
    /// Node name when the config names none.
    pub default_hostname: String,
    /// Token that apply needs in maintenance mode; None when disabled.
    pub maintenance_token: Option<String>,
    /// Host mode: no PID-1 duties; reboot re-executes machined.
    pub host_mode: bool,
    /// How long a worker configured for the first time waits for the trust
    /// endpoint before it gives the config up and returns to maintenance.
    pub trust_first_timeout: Duration,
    /// How long before expiry the node's own certificates (OS API, etcd)
    /// are replaced while it runs.
    pub renew_before: Duration,
}

/// Errors of node operations, mapped to gRPC codes by the API. Internal
/// errors keep their cause chain.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{context}")]
    Internal {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl NodeError {
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        NodeError::Internal {
            context: context.into(),
            source: source.into(),
        }
    }
}

impl From<plan::Refusal> for NodeError {
    fn from(r: plan::Refusal) -> Self {
        match r {
            plan::Refusal::Invalid(m) => NodeError::Invalid(m),
            plan::Refusal::Precondition(m) => NodeError::Precondition(m),
            plan::Refusal::Denied(m) => NodeError::Denied(m),
        }
    }
}

/// The error and its causes on one line: `a: b: c` ("error sending
/// request" alone does not say that the server's certificate was not
/// trusted).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        let text = chain(&e);
        match e {
            NodeError::Invalid(_) => tonic::Status::invalid_argument(text),
            NodeError::Precondition(_) => tonic::Status::failed_precondition(text),
            NodeError::Denied(_) => tonic::Status::permission_denied(text),
            NodeError::NotFound(_) => tonic::Status::not_found(text),
            NodeError::Store(_) | NodeError::Internal { .. } => tonic::Status::internal(text),
        }
    }
}

/// Work that follows a reply: fired when dropped, which the API arranges
/// to happen once the response has been sent (or the call was abandoned;
/// the transition is committed either way, so its follow-up must happen).
#[derive(Debug)]
pub struct AfterReply {
    control: Control,
    tx: mpsc::UnboundedSender<Control>,
}

impl Drop for AfterReply {
    fn drop(&mut self) {
        let _ = self.tx.send(self.control);
    }
}

/// What a request to the core returns.
#[derive(Debug)]
pub struct Outcome {
    pub reply: Reply,
    pub after: Option<AfterReply>,
}

/// What the network came up as, and names learnt at boot.
#[derive(Clone, Debug)]
struct Facts {
    node_ip: IpAddr,
    addresses: Vec<String>,
    nameservers: Vec<IpAddr>,
    cmdline_hostname: Option<String>,
}

type Envelope = (Request, oneshot::Sender<Result<Outcome, NodeError>>);

/// The node: a handle every task shares.
pub struct Node {
    pub opts: Options,
    pub supervisor: Supervisor,
    /// This boot's phases (`osctl boot`).
    pub timeline: crate::timeline::Timeline,
    state: watch::Receiver<Arc<Snapshot>>,
    publish: watch::Sender<Arc<Snapshot>>,
    requests: mpsc::Sender<Envelope>,
    /// Taken once by [`Node::start_core`].
    inbox: std::sync::Mutex<Option<mpsc::Receiver<Envelope>>>,
    control: mpsc::UnboundedSender<Control>,
    facts: std::sync::RwLock<Facts>,
    /// The last thing worth telling (rollback, reconcile error).
    last_event: std::sync::Mutex<Option<String>>,
    /// What the node did, for `osctl events`.
    pub events: crate::events::Events,
    /// The roles that could not start at the last reconcile: noted once
    /// when they change, so a later event (a rollback) is not buried under
    /// the same problem repeated at every reconcile.
    role_problems: std::sync::Mutex<Vec<String>>,
    started: Instant,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// The events journal, in the log directory (EPHEMERAL): kept by every
/// reset mode that keeps the logs.
pub const EVENTS_JOURNAL: &str = "machined-events.log";

/// This boot's identity: a `try` outlives a machined restart but not a reboot.
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Node {
    pub fn new(
        opts: Options,
        supervisor: Supervisor,
        control: mpsc::UnboundedSender<Control>,
    ) -> Arc<Self> {
        let (publish, state) = watch::channel(Arc::new(Snapshot {
            phase: Phase::Maintenance,
            record: Default::default(),
            config: None,
        }));
        // Requests queue briefly behind a running transition; a full queue
        // means the core is stuck, and callers are told so.
        let (requests, inbox) = mpsc::channel(64);
        let events =
            crate::events::Events::with_journal(&opts.paths.log_dir().join(EVENTS_JOURNAL));
        events.record(
            "note",
            format!("machined {} started", env!("CARGO_PKG_VERSION")),
        );
        Arc::new(Node {
            timeline: crate::timeline::Timeline::new(opts.paths.timeline_file()),
            facts: std::sync::RwLock::new(Facts {
                node_ip: opts.node_ip,
                addresses: Vec::new(),
                nameservers: Vec::new(),
                cmdline_hostname: None,
            }),
            opts,
            supervisor,
            state,
            publish,
            requests,
            inbox: std::sync::Mutex::new(Some(inbox)),
            control,
            last_event: std::sync::Mutex::new(None),
            events,
            role_problems: std::sync::Mutex::new(Vec::new()),
            started: Instant::now(),
        })
    }

    /// The store of this node's config record.
    pub fn store(&self) -> ConfigStore {
        let store = ConfigStore::new(self.opts.paths.state_dir());
        match crate::fault::hook() {
            Some(h) if self.opts.host_mode => store.with_fault_hook(h),
            _ => store,
        }
    }

    /// The node's state now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.borrow().clone()
    }

    /// Watches state changes (tests, the serve loop).
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.state.clone()
    }

    /// Sends `request` to the core and waits for its outcome; requests an
    /// operator would want in `osctl events` are recorded there.
    pub async fn request(&self, request: Request) -> Result<Outcome, NodeError> {
        let label = request.event_label();
        let (tx, rx) = oneshot::channel();
        self.requests
            .send_timeout((request, tx), Duration::from_secs(30))
            .await
            .map_err(|_| {
                NodeError::Precondition(
                    "the node is busy with an earlier change; try again shortly".into(),
                )
            })?;
        let outcome = rx.await.map_err(|_| {
            NodeError::Precondition("the node is stopping; the request was not carried out".into())
        })?;
        if let Some(what) = label {
            match &outcome {
                Ok(o) => self.events.record(
                    "request",
                    format!(
                        "{what}: {}{}",
                        o.reply.outcome,
                        if o.reply.message.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", o.reply.message)
                        }
                    ),
                ),
                Err(e) => self
                    .events
                    .record("request", format!("{what}: refused: {e}")),
            }
        }
        outcome
    }

    /// The node's own address: etcd's and the certificates'.
    pub fn node_ip(&self) -> IpAddr {
        self.facts
            .read()
            .map(|n| n.node_ip)
            .unwrap_or(self.opts.node_ip)
    }

    /// Every address configured at boot, `interface address/prefix`.
    pub fn addresses(&self) -> Vec<String> {
        self.facts
            .read()
            .map(|n| n.addresses.clone())
            .unwrap_or_default()
    }

    fn nameservers(&self) -> Vec<IpAddr> {
        self.facts
            .read()
            .map(|n| n.nameservers.clone())
            .unwrap_or_default()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn config(&self) -> Option<MachineConfig> {
        self.state.borrow().config.clone()
    }

    pub fn in_maintenance(&self) -> bool {
        self.state.borrow().config.is_none()
    }

    /// The name used when the config names none.
    fn fallback_name(&self) -> String {
        self.facts
            .read()
            .ok()
            .and_then(|f| f.cmdline_hostname.clone())
            .unwrap_or_else(|| self.opts.default_hostname.clone())
    }

    pub fn identity_for(&self, cfg: Option<&MachineConfig>) -> NodeIdentity {
        NodeIdentity {
            name: cfg
                .and_then(|c| c.machine.hostname.as_ref())
                .map(|h| h.0.clone())
                .unwrap_or_else(|| self.fallback_name()),
            ip: self.node_ip(),
        }
    }

    pub fn identity(&self) -> NodeIdentity {
        self.identity_for(self.config().as_ref())
    }

    /// Facts the planner needs from outside the state.
    fn env(&self) -> plan::Env {
        plan::Env {
            now: std::time::SystemTime::now(),
            boot_id: boot_id(),
            fallback_name: self.fallback_name(),
            node_ip: self.node_ip(),
        }
    }

    pub fn role_context(&self, cfg: &MachineConfig) -> RoleContext {
        RoleContext {
            paths: self.opts.paths.clone(),
            bin_dir: self.opts.bin_dir.clone(),
            node: self.identity_for(Some(cfg)),
            host_mode: self.opts.host_mode,
            renew_before: self.opts.renew_before,
        }
    }

    /// Records something the operator should know (shown by `osctl
    /// health`), without repeating an identical message in the log.
    pub fn note_event(&self, text: String) {
        if self.last_event().as_deref() != Some(text.as_str()) {
            self.note(text);
        }
    }

    fn note(&self, text: String) {
        warn!("{text}");
        self.events.record("note", text.clone());
        if let Ok(mut e) = self.last_event.lock() {
            *e = Some(text);
        }
    }

    pub fn last_event(&self) -> Option<String> {
        self.last_event.lock().ok().and_then(|e| e.clone())
    }

    /// Drops a config that cannot work (a worker the trust endpoint refuses):
    /// back to the previous config, or to maintenance mode when there is
    /// none, so the node stays reachable to fix it.
    pub async fn refuse_config(&self, reason: &str) {
        if let Err(e) = self
            .request(Request::Refuse {
                reason: reason.into(),
            })
            .await
        {
            self.note(format!(
                "{reason}; and the config cannot be dropped: {}",
                chain(&e)
            ));
        }
    }

    /// Node-specific checks a config must pass besides validation.
    pub fn check_runnable(cfg: &MachineConfig) -> Result<(), NodeError> {
        if cfg.secrets.os_ca.key.is_none() {
            // A worker: its OS API certificate comes from the trust endpoint
            // on the control-plane endpoint's host.
            crate::api::trust::endpoint_of(cfg)
                .map_err(|e| NodeError::Invalid(format!("cluster.controlPlane.endpoint: {e}")))?;
        }
        Ok(())
    }

    /// Applies a config: parsed and checked here (off the core), then
    /// planned and executed by the core.
    pub async fn apply(
        &self,
        text: &str,
        mode: ApplyMode,
        dry_run: bool,
        via: Via,
    ) -> Result<Outcome, NodeError> {
        // The token is judged before the document is parsed: a stranger's
        // bytes reach the parser only with the right token.
        if via == (Via::Maintenance { token_ok: false }) {
            return Err(plan::Refusal::Denied(plan::TOKEN_REFUSED.into()).into());
        }
        let config = match MachineConfig::parse(text) {
            Ok(c) => c,
            // A dry run answers with every problem in the reply's body; an
            // error's status message must stay small (clients refuse
            // metadata over 8 KiB), so it carries a capped summary.
            Err(p) if dry_run => {
                return Ok(Outcome {
                    reply: Reply {
                        outcome: machine_api::proto::APPLY_OUTCOME_INVALID,
                        message: format!("the config has {} problems", p.0.len()),
                        problems: p.0.iter().map(ToString::to_string).collect(),
                        ..Default::default()
                    },
                    after: None,
                })
            }
            Err(p) => {
                return Err(NodeError::Invalid(format!(
                    "config rejected:\n{}",
                    p.summary(machine_api::config::MAX_STATUS_MESSAGE_BYTES - 64)
                )))
            }
        };
        Self::check_runnable(&config)?;
        self.request(Request::Apply {
            config: Box::new(config),
            mode,
            dry_run,
            via,
        })
        .await
    }

    /// Whether `token` opens the maintenance listener.
    pub fn maintenance_token_ok(&self, token: &str) -> bool {
        match &self.opts.maintenance_token {
            Some(expected) => constant_time_eq(expected.as_bytes(), token.trim().as_bytes()),
            None => true,
        }
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Request {
    /// What `osctl events` calls this request; None for the node's own
    /// housekeeping (reconciles) and dry runs.
    fn event_label(&self) -> Option<&'static str> {
        Some(match self {
            Request::Apply { dry_run: true, .. } | Request::Reconcile => return None,
            Request::Apply { .. } => "config applied",
            Request::Confirm => "config confirmed",
            Request::EndTry { .. } => "config try ended",
            Request::Refuse { .. } => "config refused by the trust endpoint",
            Request::Reset { .. } => "reset",
            Request::Reboot => "reboot",
            Request::Shutdown => "shutdown",
            Request::Bootstrap => "etcd bootstrap",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn error_chains_are_kept() {
        let e = NodeError::internal(
            "cannot wipe /var/lib/etcd",
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        );
        assert_eq!(chain(&e), "cannot wipe /var/lib/etcd: denied");
        let s: tonic::Status = e.into();
        assert_eq!(s.code(), tonic::Code::Internal);
    }
}
