//! ServiceService: list, start, stop, restart, and logs of node services.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use machine_api::proto::service_service_server::ServiceService;
use machine_api::proto::{
    Empty, LogLine, LogsRequest, ServiceActionResponse, ServiceInfo, ServiceList, ServiceRequest,
};
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::supervisor::{ServiceState, ServiceStatus, SupervisorError};

pub fn info(s: ServiceStatus) -> ServiceInfo {
    ServiceInfo {
        healthy: s.state == ServiceState::Healthy,
        state: s.state.to_string(),
        message: s.message,
        restarts: s.restarts,
        pid: s.pid.map(i64::from).unwrap_or(0),
        memory_bytes: s.memory_bytes.unwrap_or(0),
        cpu_usec: s.cpu_usec.unwrap_or(0),
        since_unix_ms: crate::state::unix_ms(s.since),
        depends_on: s.depends_on,
        adopted: s.adopted,
        name: s.name,
    }
}

fn status_of(e: SupervisorError) -> Status {
    match e {
        SupervisorError::UnknownService(n) => {
            Status::not_found(format!("no service named {n:?} on this node"))
        }
        other => Status::internal(other.to_string()),
    }
}

#[derive(Debug, Clone)]
pub struct ServiceApi(pub Arc<Node>);

type LogStream = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

#[tonic::async_trait]
impl ServiceService for ServiceApi {
    async fn list(&self, _: Request<Empty>) -> Result<Response<ServiceList>, Status> {
        let services = self.0.services().await.into_iter().map(info).collect();
        Ok(Response::new(ServiceList { services }))
    }

    async fn start(
        &self,
        r: Request<ServiceRequest>,
    ) -> Result<Response<ServiceActionResponse>, Status> {
        let name = r.into_inner().name;
        self.0.supervisor.start(&name).await.map_err(status_of)?;
        Ok(Response::new(ServiceActionResponse {
            message: format!("{name} started"),
        }))
    }

    async fn stop(
        &self,
        r: Request<ServiceRequest>,
    ) -> Result<Response<ServiceActionResponse>, Status> {
        let name = r.into_inner().name;
        self.0.supervisor.stop(&name).await.map_err(status_of)?;
        Ok(Response::new(ServiceActionResponse {
            message: format!("{name} stopped (stays stopped until started)"),
        }))
    }

    async fn restart(
        &self,
        r: Request<ServiceRequest>,
    ) -> Result<Response<ServiceActionResponse>, Status> {
        let name = r.into_inner().name;
        self.0.supervisor.restart(&name).await.map_err(status_of)?;
        Ok(Response::new(ServiceActionResponse {
            message: format!("{name} restarted"),
        }))
    }

    type LogsStream = LogStream;

    async fn logs(&self, r: Request<LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let req = r.into_inner();
        let sup = &self.0.supervisor;
        // Subscribe before reading the tail so no line falls in between.
        let follow = if req.follow {
            Some(sup.logs_follow(&req.service).await.map_err(status_of)?)
        } else {
            None
        };
        let tail = sup
            .logs_tail(&req.service, req.tail as usize)
            .await
            .map_err(status_of)?;
        let head = futures::stream::iter(tail.into_iter().map(|line| Ok(LogLine { line })));
        let Some(rx) = follow else {
            return Ok(Response::new(Box::pin(head)));
        };
        let live = futures::stream::unfold(rx, |mut rx| async move {
            let line = match rx.recv().await {
                Ok(line) => line,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    format!("[machined: {n} lines dropped: the client read too slowly]")
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(LogLine { line }), rx))
        });
        use futures::StreamExt;
        Ok(Response::new(Box::pin(head.chain(live))))
    }
}
