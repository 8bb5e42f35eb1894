//! The node's side of etcd backups: scheduled snapshots with retention,
//! and recovery of a one-member cluster from an uploaded snapshot (see
//! [`crate::etcd_backup`] for the files).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use machine_api::config::Role;

use super::{Node, NodeError, Request};
use crate::etcd_backup::{self, RestoreAs};
use crate::roles::etcd;

/// After a failed scheduled snapshot, the next try.
const RETRY_AFTER: Duration = Duration::from_secs(300);

impl Node {
    /// Checks a recovery may run here, and returns who the restored member
    /// is and the `etcdctl` that restores it.
    pub fn prepare_etcd_recovery(&self) -> Result<(RestoreAs, PathBuf), NodeError> {
        let cfg = self
            .config()
            .ok_or_else(|| NodeError::Precondition("the node has no config".into()))?;
        self.check_etcd_bootstrap(&cfg)?;
        let ctx = self.role_context(&cfg);
        let etcdctl = ctx
            .binary(etcd::SERVICE, "etcdctl")
            .map_err(|e| NodeError::Precondition(format!("{e}: it restores the snapshot")))?;
        Ok((
            RestoreAs {
                name: ctx.node.name.clone(),
                peer_url: etcd::peer_url(ctx.node.ip),
                cluster_token: cfg.cluster.name.0.clone(),
            },
            etcdctl,
        ))
    }

    /// Restores the checked snapshot at `snapshot` into etcd's data and
    /// starts etcd from it: a new cluster whose only member is this node,
    /// holding the snapshot's keyspace.
    pub async fn finish_etcd_recovery(
        self: &Arc<Self>,
        snapshot: PathBuf,
        who: RestoreAs,
        etcdctl: PathBuf,
    ) -> Result<String, NodeError> {
        // Checked again: the config may have changed during the upload.
        let (again, _) = self.prepare_etcd_recovery()?;
        if again.name != who.name || again.peer_url != who.peer_url {
            return Err(NodeError::Precondition(
                "the node's name or address changed during the upload: run the recovery again"
                    .into(),
            ));
        }
        let paths = self.opts.paths.clone();
        let who2 = who.clone();
        tokio::task::spawn_blocking(move || {
            etcd_backup::restore(&etcdctl, &snapshot, &who2, &paths)
        })
        .await
        .map_err(|e| NodeError::internal("the restore task failed", e))?
        .map_err(NodeError::Precondition)?;
        self.note_event(format!(
            "etcd was recovered from a snapshot: a new cluster with member {} ({})",
            who.name, who.peer_url
        ));
        self.request(Request::Reconcile).await?;
        Ok(format!(
            "etcd restored from the snapshot and starting as a new one-member cluster ({}); add the other members by applying their configs with cluster.etcd.endpoints",
            who.name
        ))
    }

    /// Takes the snapshots `cluster.etcd.snapshots` asks for, on an
    /// etcd node whose member has data, and keeps the newest `keep`. The
    /// schedule counts from the newest snapshot on disk, so a reboot does
    /// not add one.
    pub async fn snapshot_etcd_on_schedule(self: Arc<Self>) {
        loop {
            let wait = self.scheduled_snapshot_step().await;
            tokio::time::sleep(wait).await;
        }
    }

    async fn scheduled_snapshot_step(&self) -> Duration {
        let idle = Duration::from_secs(15);
        let Some(cfg) = self.config() else {
            return idle;
        };
        let Some(plan) = cfg.cluster.etcd.snapshots.clone() else {
            return idle;
        };
        if !cfg.has_role(Role::Etcd) || !etcd::member_initialized(&self.opts.paths) {
            return idle;
        }
        let dir = etcd_backup::snapshot_dir(&self.opts.paths);
        let every = Duration::from_secs(u64::from(plan.interval_minutes) * 60);
        let now = SystemTime::now();
        if let Some(last) = etcd_backup::newest(&dir) {
            if let Ok(age) = now.duration_since(last) {
                if age < every {
                    return (every - age).min(idle);
                }
            }
        }
        match self.save_etcd_snapshot(&dir, plan.keep as usize).await {
            Ok(text) => {
                tracing::info!("{text}");
                idle
            }
            Err(e) => {
                self.note_event(format!(
                    "scheduled etcd snapshot failed: {e}; retrying in {} min",
                    RETRY_AFTER.as_secs() / 60
                ));
                RETRY_AFTER
            }
        }
    }

    async fn save_etcd_snapshot(&self, dir: &Path, keep: usize) -> Result<String, String> {
        let client = self.etcd_client().await.map_err(|e| e.to_string())?;
        let saved = etcd_backup::save(&client, dir, SystemTime::now()).await?;
        let gone = etcd_backup::prune(dir, keep);
        Ok(format!(
            "etcd snapshot {} ({} bytes, sha256 {}); {} older removed",
            saved.path.display(),
            saved.checked.size,
            saved.checked.sha256,
            gone.len()
        ))
    }
}
