//! The node: its config, its services, and what the API does to them.
//!
//! Data flows one way: an apply is validated, persisted atomically, then the
//! roles turn the config into service specs and the supervisor converges.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machine_api::config::{MachineConfig, Role};
use tokio::sync::{mpsc, Mutex, RwLock};
use tracing::{info, warn};

use crate::net;
use crate::paths::Paths;
use crate::roles::{self, etcd, NodeIdentity, RoleContext};
use crate::state::{change, ConfigStore, TryState};
use crate::supervisor::{ServiceState, ServiceStatus, Supervisor};

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

/// What the server loop is asked to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// The server identity changed (maintenance → configured, new CA...).
    Reload,
    Reboot,
    Shutdown,
}

/// Errors of node operations, mapped to gRPC codes by the API.
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
    #[error("{0}")]
    Internal(String),
}

impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Invalid(m) => tonic::Status::invalid_argument(m),
            NodeError::Precondition(m) => tonic::Status::failed_precondition(m),
            NodeError::Denied(m) => tonic::Status::permission_denied(m),
            NodeError::NotFound(m) => tonic::Status::not_found(m),
            NodeError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> NodeError {
    NodeError::Internal(e.to_string())
}

/// How a config should be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    Auto,
    NoReboot,
    Staged,
    Try(Duration),
}

/// What an apply did.
#[derive(Clone, Debug, Default)]
pub struct ApplyOutcome {
    pub outcome: &'static str,
    pub diff: String,
    pub reboot_required: bool,
    pub message: String,
}

/// The node.
pub struct Node {
    pub opts: Options,
    pub store: ConfigStore,
    pub supervisor: Supervisor,
    config: RwLock<Option<MachineConfig>>,
    control: mpsc::UnboundedSender<Control>,
    /// Serializes applies, bootstrap and reset.
    change_lock: Mutex<()>,
    try_watcher: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    started: Instant,
    /// This boot's phases (`osctl boot`).
    pub timeline: crate::timeline::Timeline,
    /// The node's address (etcd, certificates) and every configured one.
    net: std::sync::RwLock<NetState>,
    /// Name servers from DHCP or `ip=` (the config's win).
    nameservers: std::sync::Mutex<Vec<IpAddr>>,
    /// Host name from the kernel's `ip=`.
    cmdline_hostname: std::sync::Mutex<Option<String>>,
    /// The last thing worth telling (rollback, reconcile error).
    last_event: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// What the network came up as.
#[derive(Clone, Debug)]
struct NetState {
    node_ip: IpAddr,
    addresses: Vec<String>,
}

/// This boot's identity: a `try` outlives a machined restart but not a reboot.
fn boot_id() -> String {
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
        Arc::new(Node {
            store: ConfigStore::new(opts.paths.state_dir()),
            timeline: crate::timeline::Timeline::new(opts.paths.timeline_file()),
            net: std::sync::RwLock::new(NetState {
                node_ip: opts.node_ip,
                addresses: Vec::new(),
            }),
            opts,
            supervisor,
            config: RwLock::new(None),
            control,
            change_lock: Mutex::new(()),
            try_watcher: std::sync::Mutex::new(None),
            started: Instant::now(),
            last_event: std::sync::Mutex::new(None),
            nameservers: std::sync::Mutex::new(Vec::new()),
            cmdline_hostname: std::sync::Mutex::new(None),
        })
    }

    /// The node's own address: etcd's and the certificates'.
    pub fn node_ip(&self) -> IpAddr {
        self.net
            .read()
            .map(|n| n.node_ip)
            .unwrap_or(self.opts.node_ip)
    }

    /// Every address configured at boot, `interface address/prefix`.
    pub fn addresses(&self) -> Vec<String> {
        self.net
            .read()
            .map(|n| n.addresses.clone())
            .unwrap_or_default()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub async fn config(&self) -> Option<MachineConfig> {
        self.config.read().await.clone()
    }

    pub async fn in_maintenance(&self) -> bool {
        self.config.read().await.is_none()
    }

    pub fn identity_for(&self, cfg: Option<&MachineConfig>) -> NodeIdentity {
        NodeIdentity {
            name: cfg
                .and_then(|c| c.machine.hostname.as_ref())
                .map(|h| h.0.clone())
                .or_else(|| self.cmdline_hostname.lock().ok().and_then(|h| h.clone()))
                .unwrap_or_else(|| self.opts.default_hostname.clone()),
            ip: self.node_ip(),
        }
    }

    pub async fn identity(&self) -> NodeIdentity {
        let cfg = self.config.read().await;
        self.identity_for(cfg.as_ref())
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
        if let Ok(mut e) = self.last_event.lock() {
            *e = Some(text);
        }
    }

    pub fn last_event(&self) -> Option<String> {
        self.last_event.lock().ok().and_then(|e| e.clone())
    }

    /// Loads the boot config, adopts services a previous machined left
    /// running, resumes a pending `try`, and converges.
    pub async fn boot(self: &Arc<Self>) -> Result<(), NodeError> {
        // A try outlives a machined restart, not a reboot.
        if let Some(t) = self.store.pending_try().map_err(internal)? {
            if t.boot_id == boot_id() && t.remaining() > Duration::ZERO {
                info!("resuming a pending try ({}s left)", t.remaining().as_secs());
            } else {
                self.store.rollback().map_err(internal)?;
                self.note("a try config was not confirmed before reboot; rolled back".into());
            }
        }
        let boot = self.store.load_at_boot().map_err(internal)?;
        for n in &boot.notes {
            self.note(n.clone());
        }
        let config = match boot.config {
            Some(c) => Some(c),
            None if !self.opts.host_mode => {
                self.bring_up_network(None).await;
                self.acquire_config().await
            }
            None => None,
        };
        if !self.opts.host_mode && !self.net_configured() {
            self.bring_up_network(config.as_ref()).await;
        }
        if config.is_some() {
            self.timeline.mark("config loaded", "");
        }
        *self.config.write().await = config;
        self.write_etc_files().await;
        let adopted = self.supervisor.adopt_existing().await;
        if !adopted.is_empty() {
            info!("adopted running services: {}", adopted.join(", "));
        }
        self.reconcile().await;
        if self.config.read().await.is_some() {
            self.timeline.mark("services started", "");
        }
        if let Some(t) = self.store.pending_try().map_err(internal)? {
            self.watch_try(t);
        }
        Ok(())
    }

    /// Drops a config that cannot work (a worker the trust endpoint refuses):
    /// back to the last-known-good config, or to maintenance mode when there
    /// is none, so the node stays reachable to fix it.
    pub async fn refuse_config(&self, reason: &str) {
        let _guard = self.change_lock.lock().await;
        let previous = match self.store.rollback() {
            Ok(()) => self
                .store
                .current()
                .ok()
                .flatten()
                .and_then(|t| MachineConfig::parse(&t).ok()),
            Err(_) => {
                if let Err(e) = self.store.wipe() {
                    self.note(format!("{reason}; and the config cannot be removed: {e}"));
                    return;
                }
                None
            }
        };
        self.note(format!(
            "{reason}; {}",
            if previous.is_some() {
                "back to the last-known-good config"
            } else {
                "back to maintenance mode"
            }
        ));
        *self.config.write().await = previous;
        self.write_etc_files().await;
        self.reconcile().await;
    }

    /// Once per boot, on a disk boot: the API serves, so this slot's
    /// systemd-boot entry loses its try counter.
    pub fn mark_boot_good(&self) {
        if self.opts.host_mode || self.timeline.has("boot entry") {
            return;
        }
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        match crate::bootentry::mark_good(&cmdline) {
            None => {}
            Some(Ok(msg)) => {
                info!("{msg}");
                self.timeline.mark("boot entry", &msg);
            }
            Some(Err(e)) => {
                self.timeline
                    .mark("boot entry", &format!("not marked: {e}"));
                self.note(format!(
                    "cannot mark the boot entry good: {e}; systemd-boot keeps counting tries down"
                ));
            }
        }
    }

    fn net_configured(&self) -> bool {
        self.net
            .read()
            .map(|n| !n.addresses.is_empty())
            .unwrap_or(false)
    }

    /// Configures the network (node mode): the machine config's interfaces,
    /// else the kernel's `ip=`, else DHCP on the first link with carrier.
    async fn bring_up_network(&self, cfg: Option<&MachineConfig>) {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let plan = match cfg.and_then(|c| net::Plan::from_config(&c.machine.network)) {
            Some(p) => p,
            None => match net::Plan::from_kernel_cmdline(&cmdline) {
                Ok(Some(p)) => p,
                Ok(None) => net::Plan::default_dhcp(),
                Err(e) => {
                    self.note(format!("{e}; falling back to DHCP"));
                    net::Plan::default_dhcp()
                }
            },
        };
        let (out, errors) = net::apply(&plan).await;
        for e in errors {
            self.note(format!("network: {e}"));
        }
        let addresses: Vec<String> = out
            .addresses
            .iter()
            .map(|(i, a)| format!("{i} {a}"))
            .collect();
        self.timeline.mark(
            "network up",
            &format!("{} from the {}", addresses.join(", "), plan.source),
        );
        if let Ok(mut n) = self.net.write() {
            if let Some(ip) = out.node_ip() {
                n.node_ip = ip;
            }
            n.addresses = addresses;
        }
        if let Ok(mut d) = self.nameservers.lock() {
            *d = out.nameservers;
        }
        if let Some(h) = out.hostname {
            if let Ok(mut d) = self.cmdline_hostname.lock() {
                *d = Some(h);
            }
        }
    }

    /// A node without a stored config tries the embedded config and the
    /// kernel command line before maintenance mode.
    async fn acquire_config(&self) -> Option<MachineConfig> {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let embedded = self.opts.paths.root.join(crate::acquire::EMBEDDED_CONFIG);
        let extra_ca = self.opts.paths.root.join(crate::acquire::EMBEDDED_CA);
        for source in crate::acquire::sources(&cmdline, &embedded) {
            let got = match crate::acquire::fetch(&source, &cmdline, &extra_ca).await {
                Ok(g) => g,
                Err(e) => {
                    self.note(format!("config source {source}: {e}"));
                    continue;
                }
            };
            let cfg = match MachineConfig::parse(&got.text) {
                Ok(c) => c,
                Err(p) => {
                    self.note(format!("config from {source} rejected:\n{p}"));
                    continue;
                }
            };
            if let Err(e) = self.check_runnable(&cfg) {
                self.note(format!("config from {source} rejected: {e}"));
                continue;
            }
            if let Err(e) = self.store.save(&cfg.to_yaml()) {
                self.note(format!("config from {source}: cannot store it: {e}"));
                continue;
            }
            info!("config from {source} accepted and stored");
            self.timeline.mark("config acquired", &source);
            return Some(cfg);
        }
        None
    }

    /// /etc/hosts, resolv.conf and hostname (node mode), and the kernel's
    /// host name.
    async fn write_etc_files(&self) {
        if self.opts.host_mode {
            return;
        }
        let cfg = self.config.read().await.clone();
        let name = self.identity_for(cfg.as_ref()).name;
        let mut nameservers = self
            .nameservers
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        if let Some(c) = &cfg {
            if !c.machine.network.nameservers.is_empty() {
                nameservers = c.machine.network.nameservers.iter().map(|n| n.0).collect();
            }
        }
        let files = crate::etc_files::EtcFiles {
            hostname: name.clone(),
            addresses: vec![self.node_ip()],
            nameservers,
        };
        if let Err(e) = files.write(&self.opts.paths.etc_dir()) {
            self.note(format!("cannot write /system/etc: {e}"));
        }
        if let Err(e) = nix::unistd::sethostname(&name) {
            self.note(format!("cannot set the host name {name}: {e}"));
        }
    }

    /// Replaces the etcd certificates before they expire while etcd runs:
    /// sleeps until the earliest is due (waking at least hourly to follow
    /// config changes and clock jumps), then reconciles, which mints new
    /// ones in place; etcd reads them at its next TLS handshake.
    pub async fn renew_etcd_certificates(self: Arc<Self>) {
        loop {
            let has_etcd = self
                .config
                .read()
                .await
                .as_ref()
                .is_some_and(|c| c.has_role(machine_api::config::Role::Etcd));
            let files = roles::etcd::EtcdFiles::new(&self.opts.paths);
            let due = has_etcd
                .then(|| roles::etcd::next_renewal(&files, self.opts.renew_before))
                .flatten();
            let now = std::time::SystemTime::now();
            let wait = match due {
                // Not minted yet (etcd waits for bootstrap) or no etcd role.
                None => Duration::from_secs(30),
                Some(t) => match t.duration_since(now) {
                    Ok(left) => left.min(Duration::from_secs(3600)),
                    Err(_) => {
                        {
                            let _guard = self.change_lock.lock().await;
                            self.reconcile().await;
                        }
                        // Minting logs itself; only a failure is noted here.
                        let renewed = roles::etcd::next_renewal(&files, self.opts.renew_before)
                            .is_some_and(|t| t > now);
                        if !renewed {
                            self.note_event("etcd certificates are due for renewal but were not renewed; retrying in a minute".into());
                        }
                        Duration::from_secs(if renewed { 1 } else { 60 })
                    }
                },
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Brings the services in line with the config (none in maintenance).
    pub async fn reconcile(&self) {
        let cfg = self.config.read().await.clone();
        let specs = match &cfg {
            None => Ok(Vec::new()),
            Some(c) => roles::desired_services(c, &self.role_context(c)),
        };
        match specs {
            Ok(s) => self.supervisor.reconcile(s).await,
            Err(e) => self.note(format!("cannot start services: {e}")),
        }
    }

    fn send(&self, c: Control, after: Duration) {
        let tx = self.control.clone();
        tokio::spawn(async move {
            // Let the reply that asked for it reach the client first.
            tokio::time::sleep(after).await;
            let _ = tx.send(c);
        });
    }

    /// Node-specific checks a config must pass besides validation.
    fn check_runnable(&self, cfg: &MachineConfig) -> Result<(), NodeError> {
        if cfg.secrets.os_ca.key.is_none() {
            // A worker: its OS API certificate comes from the trust endpoint
            // on the control-plane endpoint's host.
            crate::api::trust::endpoint_of(cfg)
                .map_err(|e| NodeError::Invalid(format!("cluster.controlPlane.endpoint: {e}")))?;
        }
        Ok(())
    }

    pub async fn apply(
        self: &Arc<Self>,
        text: &str,
        mode: ApplyMode,
        dry_run: bool,
        token: &str,
    ) -> Result<ApplyOutcome, NodeError> {
        let new = MachineConfig::parse(text)
            .map_err(|p| NodeError::Invalid(format!("config rejected:\n{p}")))?;
        self.check_runnable(&new)?;
        let _guard = self.change_lock.lock().await;
        let old = self.config.read().await.clone();
        let diff = change::diff(old.as_ref(), &new);
        let canonical = new.to_yaml();

        let Some(old) = old else {
            // Maintenance mode: the first config.
            if let Some(expected) = &self.opts.maintenance_token {
                if !constant_time_eq(expected.as_bytes(), token.as_bytes()) {
                    return Err(NodeError::Denied(
                        "maintenance token missing or wrong: it is printed on the node's console (pass --token)".into(),
                    ));
                }
            }
            if matches!(mode, ApplyMode::Try(_)) {
                return Err(NodeError::Precondition(
                    "try needs a running config to roll back to; apply with --mode auto first"
                        .into(),
                ));
            }
            if dry_run {
                return Ok(ApplyOutcome {
                    outcome: "dry-run",
                    diff,
                    ..Default::default()
                });
            }
            self.store.save(&canonical).map_err(internal)?;
            *self.config.write().await = Some(new);
            self.reconcile().await;
            self.send(Control::Reload, Duration::from_millis(300));
            return Ok(ApplyOutcome {
                outcome: "applied",
                diff,
                message: "config applied; the API now requires client certificates from the OS CA"
                    .into(),
                ..Default::default()
            });
        };

        if self.store.pending_try().map_err(internal)?.is_some() {
            return Err(NodeError::Precondition(
                "a try config is pending: confirm it (osctl confirm) or wait for its rollback"
                    .into(),
            ));
        }
        let reboot_fields = change::reboot_required(&old, &new);
        let reboot_required = !reboot_fields.is_empty();
        let mut out = ApplyOutcome {
            outcome: "applied",
            diff,
            reboot_required,
            message: String::new(),
        };
        if old == new {
            out.outcome = "unchanged";
            return Ok(out);
        }
        if dry_run {
            out.outcome = "dry-run";
            if reboot_required {
                out.message = format!("needs a reboot: {}", reboot_fields.join(", "));
            }
            return Ok(out);
        }
        match mode {
            ApplyMode::Staged => {
                self.store.stage(&canonical).map_err(internal)?;
                out.outcome = "staged";
                out.message = "the config takes effect at the next reboot".into();
            }
            ApplyMode::NoReboot if reboot_required => {
                return Err(NodeError::Precondition(format!(
                    "these changes need a reboot: {}; use --mode auto or --mode staged",
                    reboot_fields.join(", ")
                )));
            }
            ApplyMode::Try(_) if reboot_required => {
                return Err(NodeError::Precondition(format!(
                    "try cannot roll back changes that need a reboot ({}); use --mode staged",
                    reboot_fields.join(", ")
                )));
            }
            ApplyMode::Auto if reboot_required => {
                self.store.drop_staged().map_err(internal)?;
                self.store.save(&canonical).map_err(internal)?;
                out.outcome = "rebooting";
                out.message = format!("rebooting to apply {}", reboot_fields.join(", "));
                self.send(Control::Reboot, Duration::from_millis(300));
            }
            ApplyMode::Try(timeout) => {
                self.store.drop_staged().map_err(internal)?;
                let t = TryState::new(timeout, boot_id());
                self.store.save(&canonical).map_err(internal)?;
                self.store.begin_try(&t).map_err(internal)?;
                self.apply_live(&old, new).await;
                out.outcome = "trying";
                out.message = format!(
                    "rolls back in {}s unless confirmed with `osctl confirm`, or at once if a service fails",
                    timeout.as_secs()
                );
                self.watch_try(t);
            }
            ApplyMode::Auto | ApplyMode::NoReboot => {
                self.store.drop_staged().map_err(internal)?;
                self.store.save(&canonical).map_err(internal)?;
                self.apply_live(&old, new).await;
            }
        }
        Ok(out)
    }

    async fn apply_live(&self, old: &MachineConfig, new: MachineConfig) {
        let before = self.identity_for(Some(old));
        let key_before = crate::api::tls::ServerIdentity::key_of(Some(old), &before);
        let after = self.identity_for(Some(&new));
        let key_after = crate::api::tls::ServerIdentity::key_of(Some(&new), &after);
        *self.config.write().await = Some(new);
        self.write_etc_files().await;
        self.reconcile().await;
        if key_before != key_after {
            self.send(Control::Reload, Duration::from_millis(300));
        }
    }

    /// Rolls a `try` back when a service fails, or when it is not confirmed
    /// in time.
    fn watch_try(self: &Arc<Self>, t: TryState) {
        let node = Arc::clone(self);
        let handle = tokio::spawn(async move {
            let baseline: Vec<(String, u32)> = node
                .supervisor
                .list()
                .await
                .into_iter()
                .map(|s| (s.name, s.restarts))
                .collect();
            let started = std::time::SystemTime::now();
            let reason = loop {
                if t.remaining().is_zero() {
                    break "not confirmed within the try timeout".to_owned();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                match node.store.pending_try() {
                    Ok(Some(_)) => {}
                    _ => return, // confirmed
                }
                if let Some(bad) = failing(&node.supervisor.list().await, &baseline, started) {
                    break format!("service {} failed: {}", bad.name, bad.message);
                }
            };
            node.rollback(&reason).await;
        });
        if let Ok(mut w) = self.try_watcher.lock() {
            if let Some(old) = w.replace(handle) {
                old.abort();
            }
        }
    }

    async fn rollback(&self, reason: &str) {
        let _guard = self.change_lock.lock().await;
        let Ok(Some(_)) = self.store.pending_try() else {
            return;
        };
        if let Err(e) = self.store.rollback() {
            self.note(format!("try rollback failed: {e}"));
            return;
        }
        let previous = match self.store.current() {
            Ok(Some(text)) => MachineConfig::parse(&text).ok(),
            _ => None,
        };
        let Some(previous) = previous else {
            self.note("try rollback: the previous config does not parse".into());
            return;
        };
        let current = self.config.read().await.clone();
        self.note(format!("try config rolled back: {reason}"));
        match current {
            Some(cur) => self.apply_live(&cur, previous).await,
            None => {
                *self.config.write().await = Some(previous);
                self.reconcile().await;
            }
        }
    }

    pub async fn confirm(&self) -> Result<String, NodeError> {
        let _guard = self.change_lock.lock().await;
        if self.store.pending_try().map_err(internal)?.is_none() {
            return Err(NodeError::Precondition("no try config is pending".into()));
        }
        self.store.confirm_try().map_err(internal)?;
        if let Ok(mut w) = self.try_watcher.lock() {
            if let Some(h) = w.take() {
                h.abort();
            }
        }
        Ok("the tried config is kept".into())
    }

    /// The etcd role is present but the member waits for bootstrap.
    pub async fn etcd_waiting(&self) -> Option<String> {
        let cfg = self.config.read().await;
        let cfg = cfg.as_ref()?;
        (cfg.has_role(Role::Etcd) && !etcd::can_start(cfg, &self.opts.paths)).then(|| {
            "waiting for `osctl bootstrap` (first etcd node) or cluster.etcd.endpoints (to join)".into()
        })
    }

    /// Services, with etcd shown as waiting while it waits for bootstrap.
    pub async fn services(&self) -> Vec<ServiceStatus> {
        let mut list = self.supervisor.list().await;
        if let Some(msg) = self.etcd_waiting().await {
            if !list.iter().any(|s| s.name == etcd::SERVICE) {
                list.push(ServiceStatus {
                    name: etcd::SERVICE.into(),
                    state: ServiceState::Waiting,
                    message: msg,
                    restarts: 0,
                    pid: None,
                    since: std::time::SystemTime::now(),
                    depends_on: vec![],
                    adopted: false,
                    memory_bytes: None,
                    cpu_usec: None,
                });
            }
        }
        list
    }

    /// The config, when it gives this node the etcd role.
    async fn etcd_config(&self) -> Result<MachineConfig, NodeError> {
        let cfg = self
            .config
            .read()
            .await
            .clone()
            .ok_or_else(|| NodeError::Precondition("the node has no config".into()))?;
        if !cfg.has_role(Role::Etcd) {
            return Err(NodeError::Precondition("this node has no etcd role".into()));
        }
        Ok(cfg)
    }

    pub async fn bootstrap(&self) -> Result<String, NodeError> {
        let _guard = self.change_lock.lock().await;
        let cfg = self.etcd_config().await?;
        if etcd::member_initialized(&self.opts.paths) {
            return Err(NodeError::Precondition(
                "etcd already has data on this node: the cluster is bootstrapped".into(),
            ));
        }
        if !cfg.cluster.etcd.endpoints.is_empty() {
            return Err(NodeError::Precondition(
                "this node joins the etcd members in cluster.etcd.endpoints; bootstrap only the first etcd node".into(),
            ));
        }
        // A missing binary now beats a marker that promises a start later.
        self.role_context(&cfg)
            .binary(etcd::SERVICE, "etcd")
            .map_err(|e| NodeError::Precondition(e.to_string()))?;
        let marker = etcd::bootstrap_marker(&self.opts.paths);
        if marker.exists() {
            return Err(NodeError::Precondition(
                "etcd was already bootstrapped on this node and is starting (see `osctl logs etcd`)".into(),
            ));
        }
        machine_api::atomic::write_atomic(&marker, b"bootstrap\n", 0o600).map_err(internal)?;
        self.reconcile().await;
        Ok("etcd is starting a new cluster on this node".into())
    }

    /// An etcd client for this node's member.
    pub async fn etcd_client(&self) -> Result<roles::etcd_client::EtcdClient, NodeError> {
        let cfg = self.etcd_config().await?;
        let ctx = self.role_context(&cfg);
        etcd::EtcdFiles::new(&ctx.paths)
            .local_client(vec![etcd::client_url(ctx.node.ip)])
            .map_err(internal)
    }

    /// Wipes config and data and returns to maintenance mode.
    pub async fn reset(&self, graceful: bool) -> Result<(), NodeError> {
        let _guard = self.change_lock.lock().await;
        if graceful && etcd::member_initialized(&self.opts.paths) {
            let me = self.identity().await;
            let client = self.etcd_client().await?;
            let members = client.members().await.map_err(|e| {
                NodeError::Precondition(format!(
                    "cannot leave the etcd cluster ({e}); reset without --graceful to wipe anyway"
                ))
            })?;
            if members.len() > 1 {
                if let Some(m) = members.iter().find(|m| m.name == me.name) {
                    client
                        .remove_member(m.id)
                        .await
                        .map_err(|e| NodeError::Precondition(format!("cannot leave etcd: {e}")))?;
                }
            }
        }
        self.supervisor.stop_all().await;
        self.store.wipe().map_err(internal)?;
        let p = &self.opts.paths;
        for dir in [p.etcd_data(), p.secrets_dir(), p.containerd_root()] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(internal)?;
            }
        }
        let _ = std::fs::remove_file(etcd::bootstrap_marker(p));
        // A worker's certificate from the trust endpoint belongs to the
        // config just wiped.
        for f in crate::api::trust::KEPT_FILES {
            let _ = std::fs::remove_file(p.state_dir().join(f));
        }
        p.create_all().map_err(internal)?;
        *self.config.write().await = None;
        self.supervisor.reconcile(Vec::new()).await;
        self.send(Control::Reload, Duration::from_millis(300));
        Ok(())
    }

    pub fn request(&self, c: Control) {
        self.send(c, Duration::from_millis(300));
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

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
}
