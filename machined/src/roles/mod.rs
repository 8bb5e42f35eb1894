//! Roles turn the machine config into services for the supervisor:
//! containerd on every node, etcd on `etcd` nodes. Kubernetes components
//! join here in a later release.

pub mod containerd;
pub mod etcd;
pub mod etcd_client;
pub mod images;
pub mod kubernetes;

use std::net::IpAddr;
use std::path::PathBuf;

use machine_api::config::{MachineConfig, Role};

use crate::paths::Paths;
use crate::supervisor::ServiceSpec;

/// Errors while deriving services from a config.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("{role}: binary {binary:?} not found (looked in {where_})")]
    MissingBinary {
        role: &'static str,
        binary: &'static str,
        where_: String,
    },
    #[error("{role}: this image has no {binaries} (looked in {where_}); build an image with Kubernetes (see docs/images.md)")]
    MissingBinaries {
        role: &'static str,
        binaries: String,
        where_: String,
    },
    #[error("{0}: {1}")]
    Certificates(&'static str, String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// Who this node is, for certificates and listen addresses.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub ip: IpAddr,
}

/// What the roles need beyond the config.
#[derive(Clone, Debug)]
pub struct RoleContext {
    pub paths: Paths,
    pub bin_dir: Option<PathBuf>,
    pub node: NodeIdentity,
    /// Host mode: several nodes share one host, so services bind only
    /// their node's address; a real node binds all of its addresses.
    pub host_mode: bool,
    /// Certificates this close to expiry are minted again.
    pub renew_before: std::time::Duration,
}

impl RoleContext {
    pub fn binary(&self, role: &'static str, name: &'static str) -> Result<PathBuf, RoleError> {
        crate::paths::find_binary(self.bin_dir.as_deref(), name).ok_or_else(|| {
            RoleError::MissingBinary {
                role,
                binary: name,
                where_: match &self.bin_dir {
                    Some(d) => d.display().to_string(),
                    None => "PATH".into(),
                },
            }
        })
    }

    /// PATH for services: the bin dir first, so containerd finds its shim
    /// and runc there.
    pub fn service_path(&self) -> String {
        let mut p = String::new();
        if let Some(d) = &self.bin_dir {
            p.push_str(&d.display().to_string());
            p.push(':');
        }
        p.push_str("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        p
    }
}

/// The services `cfg` asks for on this node, and the roles that cannot
/// run (a missing binary, a missing secret). A role that cannot run does
/// not stop the others: containerd and etcd keep running when the image
/// lacks Kubernetes.
pub fn desired_services(
    cfg: &MachineConfig,
    ctx: &RoleContext,
) -> Result<(Vec<ServiceSpec>, Vec<RoleError>), RoleError> {
    let mut out = vec![containerd::service(ctx)?];
    let mut problems = Vec::new();
    if cfg.has_role(Role::Etcd) {
        match etcd::service(cfg, ctx) {
            Ok(Some(spec)) => out.push(spec),
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }
    if cfg.has_role(Role::Controlplane) {
        match kubernetes::services(cfg, ctx) {
            Ok(s) => out.extend(s),
            Err(e) => problems.push(e),
        }
    }
    if cfg.has_role(Role::Worker) {
        match kubernetes::worker::services(cfg, ctx) {
            Ok(s) => out.extend(s),
            Err(e) => problems.push(e),
        }
    }
    Ok((out, problems))
}
