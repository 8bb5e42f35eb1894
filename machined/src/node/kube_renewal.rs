//! Renewing the Kubernetes certificates of a running node, as
//! `renew_etcd_certificates` does for etcd's. The leaves live a year; each
//! is replaced `--renew-before` ahead of its expiry, while the services
//! keep running on the old one, and the services that read it are
//! restarted only once the new one is on disk:
//! - control plane: the reconcile mints the files again (the CA keys are in
//!   the config), and the new generation in the specs restarts
//!   kube-apiserver, kube-controller-manager and kube-scheduler;
//! - worker: kubelet's serving certificate and kube-proxy's client
//!   certificate are signed again (locally, or by the trust endpoint), and
//!   the service that reads each is restarted. kubelet's own client
//!   certificate is rotated by kubelet itself.
//!
//! A service the operator stopped stays stopped: it gets the new
//! certificate when it is started.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use machine_api::config::Role;

use super::{Node, Request};
use crate::roles::kubernetes::{files, worker};
use crate::supervisor::ServiceState;

/// How long to wait when nothing is minted yet, or after a failed try.
const IDLE: Duration = Duration::from_secs(60);
/// The longest sleep: a clock change or a new config is noticed within it.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

impl Node {
    /// Runs for the life of machined.
    pub async fn renew_kubernetes_certificates(self: Arc<Self>) {
        loop {
            let wait = self.renew_kubernetes_once().await;
            tokio::time::sleep(wait).await;
        }
    }

    /// Renews what is due; how long until the next look.
    async fn renew_kubernetes_once(&self) -> Duration {
        let Some(cfg) = self.config() else {
            return IDLE;
        };
        let ctx = self.role_context(&cfg);
        let now = SystemTime::now();
        let mut next: Option<SystemTime> = None;
        let mut retry = false;

        if cfg.has_role(Role::Controlplane) {
            let dir = files::KubeFiles::dir_of(&self.opts.paths);
            match files::next_renewal(&dir, ctx.renew_before) {
                Some(t) if t <= now => {
                    let _ = self.request(Request::Reconcile).await;
                    match files::next_renewal(&dir, ctx.renew_before) {
                        Some(t) if t > now => {
                            self.events.record(
                                "note",
                                "control-plane certificates renewed; kube-apiserver, kube-controller-manager and kube-scheduler restart with them",
                            );
                            next = Some(t);
                        }
                        _ => {
                            self.note_event("control-plane certificates are due for renewal but were not renewed; retrying in a minute".into());
                            retry = true;
                        }
                    }
                }
                Some(t) => next = Some(t),
                None => {}
            }
        }

        if cfg.has_role(Role::Worker) {
            match worker::next_renewal(&ctx) {
                Some(t) if t <= now => {
                    let progress = |m: String| tracing::info!("certificate renewal: {m}");
                    match worker::renew_due(&cfg, &ctx, &progress).await {
                        Ok(services) => {
                            for s in services {
                                self.restart_for_renewal(s).await;
                            }
                            next = earliest(next, worker::next_renewal(&ctx));
                        }
                        Err(e) => {
                            self.note_event(format!("worker certificates are due for renewal but were not renewed ({e}); the services keep the current ones; retrying in a minute"));
                            retry = true;
                        }
                    }
                }
                t => next = earliest(next, t),
            }
        }

        if retry {
            return IDLE;
        }
        match next {
            Some(t) => t
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_secs(1), MAX_SLEEP),
            None => IDLE,
        }
    }

    /// Restarts `service` so it reads its renewed certificate, unless the
    /// operator stopped it.
    async fn restart_for_renewal(&self, service: &str) {
        let state = self.supervisor.status(service).await.map(|s| s.state);
        if matches!(state, None | Some(ServiceState::Stopped)) {
            self.events.record(
                "note",
                format!(
                    "{service}: certificate renewed; it is stopped, so it will use it when started"
                ),
            );
            return;
        }
        match self.supervisor.restart(service).await {
            Ok(()) => self.events.record(
                "note",
                format!("{service}: certificate renewed; restarting it to use the new one"),
            ),
            Err(e) => self.note_event(format!(
                "{service}: certificate renewed, but the restart failed: {e}"
            )),
        }
    }
}

fn earliest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
