//! `osctl services` and `osctl service NAME [start|stop|restart]`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, ValueEnum};
use machine_api::proto::service_service_client::ServiceServiceClient;
use machine_api::proto::{Empty, ServiceInfo, ServiceRequest};

use super::session::{human_age, human_bytes, print, rpc, Session};
use crate::client::ConnectArgs;

pub const HEADER: &[&str] = &[
    "SERVICE", "STATE", "HEALTH", "RESTARTS", "PID", "MEMORY", "CPU", "AGE", "MESSAGE",
];

pub fn row(s: &ServiceInfo) -> Vec<String> {
    vec![
        s.name.clone(),
        s.state.clone(),
        if s.healthy { "ok".into() } else { "-".into() },
        s.restarts.to_string(),
        if s.pid > 0 {
            s.pid.to_string()
        } else {
            "-".into()
        },
        if s.memory_bytes > 0 {
            human_bytes(s.memory_bytes)
        } else {
            "-".into()
        },
        if s.cpu_usec > 0 {
            format!("{:.2}s", s.cpu_usec as f64 / 1e6)
        } else {
            "-".into()
        },
        human_age(s.since_unix_ms),
        format!("{}{}", if s.adopted { "(adopted) " } else { "" }, s.message),
    ]
}

#[derive(Debug, Args)]
pub struct Services {
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl Services {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let res = s
            .call(|ch| async move { rpc(ServiceServiceClient::new(ch).list(Empty {}).await) })
            .await;
        Ok(print(s.output, &res, HEADER, |l| {
            l.services.iter().map(row).collect()
        }))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Action {
    Start,
    Stop,
    Restart,
}

#[derive(Debug, Args)]
pub struct Service {
    /// Service name (see `osctl services`).
    pub name: String,
    /// What to do; without it, show the service.
    pub action: Option<Action>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl Service {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let name = self.name.clone();
        let Some(action) = self.action else {
            let res = s
                .call(|ch| async move { rpc(ServiceServiceClient::new(ch).list(Empty {}).await) })
                .await;
            let res: Vec<(String, Result<ServiceInfo>)> = res
                .into_iter()
                .map(|(n, r)| {
                    let r = r.and_then(|l| {
                        l.services
                            .into_iter()
                            .find(|x| x.name == name)
                            .ok_or_else(|| anyhow::anyhow!("no service named {name:?}"))
                    });
                    (n, r)
                })
                .collect();
            return Ok(print(s.output, &res, HEADER, |i| vec![row(i)]));
        };
        let res = s
            .call(|ch| {
                let req = ServiceRequest { name: name.clone() };
                async move {
                    let mut c = ServiceServiceClient::new(ch);
                    rpc(match action {
                        Action::Start => c.start(req).await,
                        Action::Stop => c.stop(req).await,
                        Action::Restart => c.restart(req).await,
                    })
                }
            })
            .await;
        Ok(print(s.output, &res, &[], |r| {
            vec![vec![r.message.clone()]]
        }))
    }
}
