//! etcd's operations on the node: bootstrap, leaving the cluster at
//! reset, a client for the API, certificate renewal, and how a waiting
//! member is shown.

use std::sync::Arc;
use std::time::Duration;

use machine_api::config::{MachineConfig, Role};

use super::{Node, NodeError, Request};
use crate::roles::{self, etcd};
use crate::supervisor::{ServiceState, ServiceStatus};

impl Node {
    /// `osctl bootstrap`: checked and executed by the core.
    pub async fn bootstrap(&self) -> Result<String, NodeError> {
        Ok(self.request(Request::Bootstrap).await?.reply.message)
    }

    /// Checks this node may start a new etcd cluster and marks it to; the
    /// reconcile that follows starts etcd.
    pub(super) fn mark_etcd_bootstrap(&self, cfg: &MachineConfig) -> Result<(), NodeError> {
        self.check_etcd_bootstrap(cfg)?;
        let marker = etcd::bootstrap_marker(&self.opts.paths);
        machine_api::atomic::write_atomic(&marker, b"bootstrap\n", 0o600)
            .map_err(|e| NodeError::internal(format!("cannot write {}", marker.display()), e))
    }

    /// Whether this node may start a new etcd cluster (bootstrap, or a
    /// recovery from a snapshot).
    pub(crate) fn check_etcd_bootstrap(&self, cfg: &MachineConfig) -> Result<(), NodeError> {
        if !cfg.has_role(Role::Etcd) {
            return Err(NodeError::Precondition("this node has no etcd role".into()));
        }
        if etcd::member_initialized(&self.opts.paths) {
            return Err(NodeError::Precondition(
                "etcd already has data on this node: the cluster is already bootstrapped".into(),
            ));
        }
        if !cfg.cluster.etcd.endpoints.is_empty() {
            return Err(NodeError::Precondition(
                "this node joins the etcd members in cluster.etcd.endpoints; bootstrap only the first etcd node".into(),
            ));
        }
        // A missing binary now beats a marker that promises a start later.
        self.role_context(cfg)
            .binary(etcd::SERVICE, "etcd")
            .map_err(|e| NodeError::Precondition(e.to_string()))?;
        if etcd::bootstrap_marker(&self.opts.paths).exists() {
            return Err(NodeError::Precondition(
                "etcd was already bootstrapped on this node and is starting (see `osctl logs etcd`)".into(),
            ));
        }
        Ok(())
    }

    /// Graceful reset: this member leaves the etcd cluster first (unless
    /// it is the last one).
    pub(super) async fn leave_etcd(&self, cfg: &MachineConfig) -> Result<(), NodeError> {
        if !cfg.has_role(Role::Etcd) || !etcd::member_initialized(&self.opts.paths) {
            return Ok(());
        }
        let me = self.identity_for(Some(cfg));
        let client = self.etcd_client_for(cfg)?;
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
        Ok(())
    }

    /// The config, when it gives this node the etcd role.
    fn etcd_config(&self) -> Result<MachineConfig, NodeError> {
        let cfg = self
            .config()
            .ok_or_else(|| NodeError::Precondition("the node has no config".into()))?;
        if !cfg.has_role(Role::Etcd) {
            return Err(NodeError::Precondition("this node has no etcd role".into()));
        }
        Ok(cfg)
    }

    fn etcd_client_for(
        &self,
        cfg: &MachineConfig,
    ) -> Result<roles::etcd_client::EtcdClient, NodeError> {
        let ctx = self.role_context(cfg);
        etcd::EtcdFiles::new(&ctx.paths)
            .local_client(vec![etcd::client_url(ctx.node.ip)])
            .map_err(|e| NodeError::internal("cannot make an etcd client", e))
    }

    /// An etcd client for this node's member.
    pub async fn etcd_client(&self) -> Result<roles::etcd_client::EtcdClient, NodeError> {
        let cfg = self.etcd_config()?;
        self.etcd_client_for(&cfg)
    }

    /// The etcd role is present but the member waits for bootstrap.
    pub fn etcd_waiting(&self) -> Option<String> {
        let cfg = self.config()?;
        (cfg.has_role(Role::Etcd) && !etcd::can_start(&cfg, &self.opts.paths)).then(|| {
            "waiting for `osctl bootstrap` (first etcd node) or cluster.etcd.endpoints (to join)".into()
        })
    }

    /// Services, with etcd shown as waiting while it waits for bootstrap.
    pub async fn services(&self) -> Vec<ServiceStatus> {
        let mut list = self.supervisor.list().await;
        if let Some(msg) = self.etcd_waiting() {
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

    /// Replaces the etcd certificates before they expire while etcd runs:
    /// sleeps until the earliest is due (waking at least hourly to follow
    /// config changes and clock jumps), then asks the core to reconcile,
    /// which mints new ones in place; etcd reads them at its next TLS
    /// handshake.
    pub async fn renew_etcd_certificates(self: Arc<Self>) {
        loop {
            let has_etcd = self.config().is_some_and(|c| c.has_role(Role::Etcd));
            let files = etcd::EtcdFiles::new(&self.opts.paths);
            let due = has_etcd
                .then(|| etcd::next_renewal(&files, self.opts.renew_before))
                .flatten();
            let now = std::time::SystemTime::now();
            let wait = match due {
                // Not minted yet (etcd waits for bootstrap) or no etcd role.
                None => Duration::from_secs(30),
                Some(t) => match t.duration_since(now) {
                    Ok(left) => left.min(Duration::from_secs(3600)),
                    Err(_) => {
                        let _ = self.request(Request::Reconcile).await;
                        // Minting logs itself; only a failure is noted here.
                        let renewed = etcd::next_renewal(&files, self.opts.renew_before)
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
}
