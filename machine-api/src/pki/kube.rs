//! The leaf certificates of a node, after kubeadm's certificate table.
//!
//! Each function returns the [`LeafSpec`] of one certificate; the node mints
//! them from the CAs in its config. Departures from Kubernetes-the-Hard-Way:
//! etcd always uses TLS with client-certificate auth, the scheduler's subject
//! has no Organization typo, and admin uses the `kubeadm:cluster-admins`
//! group rather than `system:masters` (which cannot be revoked by RBAC).

use std::net::IpAddr;

use super::{CertKeyPem, LeafSpec, PkiError, Usage};
use crate::config::{MachineConfig, Role};
use crate::pki::bundle::SecretsBundle;

/// Who a node is: the inputs to its certificates' subjects and SANs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// Facts about the cluster that go into the API server certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiServerNames {
    /// Host of the control-plane endpoint URL.
    pub endpoint_host: String,
    /// First address of the first service CIDR: the `kubernetes` service IP.
    pub service_ip: IpAddr,
    pub dns_domain: String,
    pub extra_sans: Vec<String>,
}

impl ApiServerNames {
    pub fn from_config(cfg: &MachineConfig) -> Self {
        let first = cfg
            .cluster
            .network
            .service_cidrs
            .first()
            .map(|c| c.0)
            .unwrap_or_else(|| "10.96.0.0/12".parse().expect("constant CIDR"));
        let service_ip = first.hosts().next().unwrap_or_else(|| first.network());
        ApiServerNames {
            endpoint_host: cfg
                .cluster
                .control_plane
                .endpoint
                .0
                .host_str()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            service_ip,
            dns_domain: cfg.cluster.network.dns_domain.0.clone(),
            extra_sans: cfg.cluster.api_server.cert_sans.clone(),
        }
    }
}

fn with_node_sans(mut spec: LeafSpec, node: &NodeIdentity) -> LeafSpec {
    spec = spec.san(&node.name);
    for ip in &node.addresses {
        spec = spec.san(ip.to_string());
    }
    spec
}

fn with_loopback(spec: LeafSpec) -> LeafSpec {
    spec.san("localhost").san("127.0.0.1").san("::1")
}

/// etcd server certificate: serves clients on 2379.
pub fn etcd_server(node: &NodeIdentity) -> LeafSpec {
    with_loopback(with_node_sans(
        LeafSpec::new(&node.name, Usage::ServerAndClient),
        node,
    ))
}

/// etcd peer certificate: member-to-member traffic on 2380, both directions.
pub fn etcd_peer(node: &NodeIdentity) -> LeafSpec {
    with_loopback(with_node_sans(
        LeafSpec::new(&node.name, Usage::ServerAndClient),
        node,
    ))
}

/// Client certificate for etcd health checks and for machined's own etcd
/// operations (member add/remove, status).
pub fn etcd_healthcheck_client() -> LeafSpec {
    LeafSpec::new("kube-etcd-healthcheck-client", Usage::Client)
}

/// kube-apiserver's client certificate to etcd.
pub fn apiserver_etcd_client() -> LeafSpec {
    LeafSpec::new("kube-apiserver-etcd-client", Usage::Client)
}

/// kube-apiserver serving certificate.
pub fn apiserver(node: &NodeIdentity, names: &ApiServerNames) -> LeafSpec {
    let d = &names.dns_domain;
    let mut spec = with_node_sans(LeafSpec::new("kube-apiserver", Usage::Server), node)
        .san("kubernetes")
        .san("kubernetes.default")
        .san("kubernetes.default.svc")
        .san(format!("kubernetes.default.svc.{d}"))
        .san(names.service_ip.to_string())
        .san(&names.endpoint_host)
        .san("localhost")
        .san("127.0.0.1");
    for s in &names.extra_sans {
        spec = spec.san(s);
    }
    spec
}

/// kube-apiserver's client certificate to kubelets (logs, exec, port-forward).
pub fn apiserver_kubelet_client() -> LeafSpec {
    LeafSpec::new("kube-apiserver-kubelet-client", Usage::Client).org("kubeadm:cluster-admins")
}

/// kube-apiserver's client certificate to aggregated API servers; signed by
/// the front-proxy CA.
pub fn front_proxy_client() -> LeafSpec {
    LeafSpec::new("front-proxy-client", Usage::Client)
}

/// The administrator's kubeconfig identity (bound to cluster-admin by RBAC).
pub fn admin() -> LeafSpec {
    LeafSpec::new("kubernetes-admin", Usage::Client).org("kubeadm:cluster-admins")
}

/// Break-glass identity in `system:masters`, used only on control-plane
/// nodes to create the RBAC bindings `admin` relies on.
pub fn super_admin() -> LeafSpec {
    LeafSpec::new("kubernetes-super-admin", Usage::Client).org("system:masters")
}

pub fn controller_manager() -> LeafSpec {
    LeafSpec::new("system:kube-controller-manager", Usage::Client)
}

pub fn scheduler() -> LeafSpec {
    LeafSpec::new("system:kube-scheduler", Usage::Client)
}

/// kubelet's client identity (Node authorizer: `system:node:NAME` in `system:nodes`).
pub fn kubelet_client(node: &NodeIdentity) -> LeafSpec {
    LeafSpec::new(format!("system:node:{}", node.name), Usage::Client).org("system:nodes")
}

/// kubelet's serving certificate (port 10250).
pub fn kubelet_serving(node: &NodeIdentity) -> LeafSpec {
    with_node_sans(
        LeafSpec::new(format!("system:node:{}", node.name), Usage::Server).org("system:nodes"),
        node,
    )
}

/// The kubelet serving certificate a worker asks the trust endpoint for,
/// checked: the common name must be `system:node:NAME` with NAME a DNS
/// name, and the only DNS name it may claim is NAME itself (addresses are
/// its own to state; the Node authorizer ties everything else to NAME).
pub fn kubelet_serving_from_request(
    common_name: &str,
    sans: Vec<String>,
) -> Result<LeafSpec, super::PkiError> {
    let bad = super::PkiError::BadRequest;
    let name = common_name.strip_prefix("system:node:").ok_or_else(|| {
        bad(format!(
            "common name {common_name:?} is not system:node:NAME"
        ))
    })?;
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !valid {
        return Err(bad(format!(
            "node name {name:?} is not a lowercase DNS name"
        )));
    }
    let mut spec = LeafSpec::new(common_name, Usage::Server).org("system:nodes");
    for san in sans {
        if san.parse::<std::net::IpAddr>().is_err() && san != name {
            return Err(bad(format!(
                "DNS name {san:?}: a kubelet serving certificate names only its node ({name})"
            )));
        }
        spec = spec.san(san);
    }
    Ok(spec)
}

pub fn kube_proxy() -> LeafSpec {
    LeafSpec::new("system:kube-proxy", Usage::Client).org("system:node-proxier")
}

/// The node's OS API serving certificate (port 50000).
pub fn os_api_server(node: &NodeIdentity, extra_sans: &[String]) -> LeafSpec {
    let mut spec = with_loopback(with_node_sans(
        LeafSpec::new(&node.name, Usage::Server),
        node,
    ));
    for s in extra_sans {
        spec = spec.san(s);
    }
    spec
}

/// Which CA signs a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    Os,
    Kubernetes,
    Etcd,
    FrontProxy,
}

/// One minted leaf certificate.
#[derive(Clone, Debug)]
pub struct MintedLeaf {
    /// File stem, after kubeadm's names (`apiserver`, `etcd/server`, ...).
    pub name: &'static str,
    pub signer: Signer,
    pub spec: LeafSpec,
    pub pem: CertKeyPem,
}

/// The leaves a node with `cfg`'s roles runs with, as (name, signer, spec).
pub fn node_leaf_specs(
    cfg: &MachineConfig,
    node: &NodeIdentity,
) -> Vec<(&'static str, Signer, LeafSpec)> {
    let mut out = vec![(
        "os-api",
        Signer::Os,
        os_api_server(node, &cfg.machine.cert_sans),
    )];
    if cfg.has_role(Role::Etcd) {
        out.push(("etcd/server", Signer::Etcd, etcd_server(node)));
        out.push(("etcd/peer", Signer::Etcd, etcd_peer(node)));
        out.push((
            "etcd/healthcheck-client",
            Signer::Etcd,
            etcd_healthcheck_client(),
        ));
    }
    if cfg.has_role(Role::Controlplane) {
        let names = ApiServerNames::from_config(cfg);
        out.extend([
            ("apiserver", Signer::Kubernetes, apiserver(node, &names)),
            (
                "apiserver-kubelet-client",
                Signer::Kubernetes,
                apiserver_kubelet_client(),
            ),
            (
                "apiserver-etcd-client",
                Signer::Etcd,
                apiserver_etcd_client(),
            ),
            (
                "front-proxy-client",
                Signer::FrontProxy,
                front_proxy_client(),
            ),
            ("admin", Signer::Kubernetes, admin()),
            ("super-admin", Signer::Kubernetes, super_admin()),
            (
                "controller-manager",
                Signer::Kubernetes,
                controller_manager(),
            ),
            ("scheduler", Signer::Kubernetes, scheduler()),
        ]);
    }
    out
}

/// Mints every leaf of [`node_leaf_specs`] from a bundle. The node itself
/// mints from the CA keys in its config; this is for `osctl gen certs` and
/// for tests that check every chain with an independent tool.
pub fn mint_node_leaves(
    bundle: &SecretsBundle,
    cfg: &MachineConfig,
    node: &NodeIdentity,
) -> Result<Vec<MintedLeaf>, PkiError> {
    let os = bundle.os_ca.authority("osCA")?;
    let kube = bundle.kubernetes_ca.authority("kubernetesCA")?;
    let etcd = bundle.etcd_ca.authority("etcdCA")?;
    let fp = bundle.front_proxy_ca.authority("frontProxyCA")?;
    let mut out = Vec::new();
    let mut specs = node_leaf_specs(cfg, node);
    if cfg.has_role(Role::Worker) || cfg.has_role(Role::Controlplane) {
        // Workers obtain these through TLS bootstrap; minted here so that
        // their subjects and usages are checked like the others.
        specs.push(("kubelet-client", Signer::Kubernetes, kubelet_client(node)));
        specs.push(("kubelet-serving", Signer::Kubernetes, kubelet_serving(node)));
        specs.push(("kube-proxy", Signer::Kubernetes, kube_proxy()));
    }
    for (name, signer, spec) in specs {
        let ca = match signer {
            Signer::Os => &os,
            Signer::Kubernetes => &kube,
            Signer::Etcd => &etcd,
            Signer::FrontProxy => &fp,
        };
        let pem = ca.issue(&spec)?;
        out.push(MintedLeaf {
            name,
            signer,
            spec,
            pem,
        });
    }
    Ok(out)
}
