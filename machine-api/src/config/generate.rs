//! Machine configs generated from a secrets bundle: the starting point that
//! `osctl gen config` writes and operators patch.

use super::types::*;
use super::KubernetesVersion;
use crate::pki::bundle::SecretsBundle;

/// The Kubernetes release generated configs pin when none is given.
pub const DEFAULT_KUBERNETES_VERSION: &str = "1.35.4";

/// What `osctl gen config` is told about the cluster.
#[derive(Clone, Debug)]
pub struct ClusterInput {
    pub name: super::DnsName,
    pub endpoint: super::Endpoint,
    pub kubernetes_version: KubernetesVersion,
    pub install_disk: Option<String>,
}

/// A machine config for a node with `roles`, carrying only the secrets
/// those roles need.
pub fn machine_config(
    bundle: &SecretsBundle,
    input: &ClusterInput,
    roles: &[Role],
) -> MachineConfig {
    let mut kubelet = Component::default();
    if roles.contains(&Role::Controlplane) && !roles.contains(&Role::Worker) {
        // Control-plane nodes that are not workers take no ordinary pods.
        kubelet.extra_args.insert(
            "register-with-taints".into(),
            "node-role.kubernetes.io/control-plane:NoSchedule".into(),
        );
    }
    MachineConfig {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        machine: Machine {
            roles: roles.to_vec(),
            hostname: None,
            install_disk: input.install_disk.clone(),
            upgrade: Upgrade::default(),
            network: Network::default(),
            sysctls: Default::default(),
            kernel_modules: Vec::new(),
            cert_sans: Vec::new(),
            kubelet,
            metrics: Metrics::default(),
        },
        cluster: Cluster {
            name: input.name.clone(),
            control_plane: ControlPlane {
                endpoint: input.endpoint.clone(),
            },
            kubernetes_version: input.kubernetes_version.clone(),
            network: ClusterNetwork::default(),
            etcd: Etcd::default(),
            api_server: ApiServer::default(),
            controller_manager: Component::default(),
            scheduler: Component::default(),
            proxy: Component::default(),
        },
        secrets: bundle.for_roles(roles),
    }
}
