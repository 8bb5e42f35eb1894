//! MachineService: version, config apply/confirm/get, health, power.

use std::sync::Arc;
use std::time::Duration;

use machine_api::proto::machine_service_server::MachineService;
use machine_api::proto::{
    ApplyConfigurationRequest, ApplyConfigurationResponse, ApplyMode as ProtoMode, BootMark,
    BootTimelineResponse, ConfirmConfigurationResponse, Empty, GetConfigurationResponse,
    HealthResponse, ResetRequest, VersionResponse,
};
use tonic::{Request, Response, Status};
use tracing::info;

use super::service_api::info as service_info;
use crate::node::{ApplyMode, Control, Node};
use crate::supervisor::ServiceState;

/// Default time a `try` waits for confirmation.
const DEFAULT_TRY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct MachineApi(pub Arc<Node>);

fn who<T>(r: &Request<T>) -> String {
    r.extensions()
        .get::<super::authz::Caller>()
        .and_then(|c| c.0.as_deref().map(str::to_owned))
        .unwrap_or_else(|| "maintenance client".into())
}

#[tonic::async_trait]
impl MachineService for MachineApi {
    async fn version(&self, _: Request<Empty>) -> Result<Response<VersionResponse>, Status> {
        let cfg = self.0.config().await;
        Ok(Response::new(VersionResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            node: self.0.identity_for(cfg.as_ref()).name,
            maintenance: cfg.is_none(),
            uptime_ms: self.0.uptime().as_millis() as u64,
            roles: cfg
                .map(|c| {
                    c.machine
                        .roles
                        .iter()
                        .map(|r| r.as_str().to_owned())
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }

    async fn apply_configuration(
        &self,
        r: Request<ApplyConfigurationRequest>,
    ) -> Result<Response<ApplyConfigurationResponse>, Status> {
        let caller = who(&r);
        let req = r.into_inner();
        let proto_mode = req.mode();
        let text = String::from_utf8(req.data)
            .map_err(|_| Status::invalid_argument("the config is not UTF-8 text"))?;
        let mode = match proto_mode {
            ProtoMode::Auto => ApplyMode::Auto,
            ProtoMode::NoReboot => ApplyMode::NoReboot,
            ProtoMode::Staged => ApplyMode::Staged,
            ProtoMode::Try => ApplyMode::Try(match req.try_timeout_seconds {
                0 => DEFAULT_TRY,
                s => Duration::from_secs(u64::from(s)),
            }),
        };
        let out = self
            .0
            .apply(&text, mode, req.dry_run, &req.maintenance_token)
            .await?;
        info!(caller, outcome = out.outcome, "apply-config");
        Ok(Response::new(ApplyConfigurationResponse {
            outcome: out.outcome.into(),
            diff: out.diff,
            reboot_required: out.reboot_required,
            message: out.message,
        }))
    }

    async fn confirm_configuration(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<ConfirmConfigurationResponse>, Status> {
        let message = self.0.confirm().await?;
        Ok(Response::new(ConfirmConfigurationResponse { message }))
    }

    async fn get_configuration(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<GetConfigurationResponse>, Status> {
        let cfg = self
            .0
            .config()
            .await
            .ok_or_else(|| Status::failed_precondition("the node has no config"))?;
        let try_deadline = self
            .0
            .store
            .pending_try()
            .ok()
            .flatten()
            .map(|t| t.deadline_unix_ms)
            .unwrap_or(0);
        Ok(Response::new(GetConfigurationResponse {
            data: cfg.redacted().to_yaml().into_bytes(),
            staged_pending: self.0.store.staged_pending(),
            try_deadline_unix_ms: try_deadline,
        }))
    }

    async fn health(&self, _: Request<Empty>) -> Result<Response<HealthResponse>, Status> {
        let services = self.0.services().await;
        let healthy =
            !services.is_empty() && services.iter().all(|s| s.state == ServiceState::Healthy);
        Ok(Response::new(HealthResponse {
            healthy,
            last_event: self.0.last_event().unwrap_or_default(),
            maintenance: self.0.in_maintenance().await,
            services: services.into_iter().map(service_info).collect(),
        }))
    }

    async fn boot_timeline(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<BootTimelineResponse>, Status> {
        let marks = self
            .0
            .timeline
            .read()
            .into_iter()
            .map(|m| BootMark {
                uptime_seconds: m.uptime,
                phase: m.phase,
                detail: m.detail,
            })
            .collect();
        Ok(Response::new(BootTimelineResponse { marks }))
    }

    async fn reboot(&self, r: Request<Empty>) -> Result<Response<Empty>, Status> {
        info!(caller = who(&r), "reboot requested");
        self.0.request(Control::Reboot);
        Ok(Response::new(Empty {}))
    }

    async fn shutdown(&self, r: Request<Empty>) -> Result<Response<Empty>, Status> {
        info!(caller = who(&r), "shutdown requested");
        self.0.request(Control::Shutdown);
        Ok(Response::new(Empty {}))
    }

    async fn reset(&self, r: Request<ResetRequest>) -> Result<Response<Empty>, Status> {
        info!(caller = who(&r), "reset requested");
        self.0.reset(r.into_inner().graceful).await?;
        Ok(Response::new(Empty {}))
    }
}
