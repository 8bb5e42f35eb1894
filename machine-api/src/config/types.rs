//! The machine config document: what one node is and which cluster it joins.
//!
//! Doc comments on these types are the field reference: they become the
//! descriptions in the published JSON Schema and in `docs/config-reference.md`,
//! so write them for operators.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::scalar::{scalar_map, Cidr, DnsName, Endpoint, InterfaceAddress, Ip, KubernetesVersion};
use crate::image_signature::TrustedKey;

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The only `apiVersion` this release reads and writes.
pub const API_VERSION: &str = "v1alpha1";
/// The `kind` of a machine config document.
pub const KIND: &str = "MachineConfig";

/// Most names a `certSANs` list may hold. The OS API certificate also
/// carries the node's name, its addresses and `localhost`, `127.0.0.1` and
/// `::1`, and a worker's certificate must stay within the trust endpoint's
/// limit of [`crate::pki::MAX_SERVER_SANS`] names.
pub const MAX_CERT_SANS: usize = 24;
// Room for the node's name, loopback names and a few addresses.
const _: () = assert!(MAX_CERT_SANS + 8 <= crate::pki::MAX_SERVER_SANS);

/// A machine config: the whole desired state of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "MachineConfig")]
pub struct MachineConfig {
    /// Document version. Must be `v1alpha1`.
    pub api_version: String,
    /// Document kind. Must be `MachineConfig`.
    pub kind: String,
    /// Settings of this node.
    pub machine: Machine,
    /// Settings shared by every node of the cluster.
    pub cluster: Cluster,
    /// Keys and certificates this node needs for its roles, and nothing more:
    /// a worker's config carries no CA private key.
    pub secrets: Secrets,
}

/// A role a node plays. A node may hold several.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs an etcd member.
    Etcd,
    /// Runs kube-apiserver, kube-controller-manager and kube-scheduler.
    Controlplane,
    /// Runs kubelet and kube-proxy and takes workloads.
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Etcd => "etcd",
            Role::Controlplane => "controlplane",
            Role::Worker => "worker",
        }
    }
}

/// Settings of this node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Machine {
    /// Roles of this node: any of `etcd`, `controlplane`, `worker`.
    pub roles: Vec<Role>,
    /// Node name. When absent, the name comes from DHCP or is derived from
    /// the first MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<DnsName>,
    /// Disk to install the OS on (e.g. `/dev/vda`, `/dev/nvme0n1`). Absent
    /// when the node boots from the network or runs from RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_disk: Option<String>,
    /// Which OS images this node takes when installing or upgrading.
    #[serde(default, skip_serializing_if = "is_default")]
    pub upgrade: Upgrade,
    /// Network configuration. Absent means DHCP on the first link with carrier.
    #[serde(default, skip_serializing_if = "is_default")]
    pub network: Network,
    /// Kernel parameters set at boot, e.g. `net.ipv4.ip_forward: "1"`. Names
    /// are written as sysctl(8) does: parts of letters, digits, `_` and `-`
    /// between single dots (or slashes), none leading or trailing.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub sysctls: BTreeMap<String, String>,
    /// Extra kernel modules to load at boot (the image must contain them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_modules: Vec<String>,
    /// Extra names and addresses for this node's OS API certificate: DNS
    /// names (lowercase; one leading `*.` wildcard label allowed) or IP
    /// addresses, at most 24.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[serde(rename = "certSANs")]
    pub cert_sans: Vec<String>,
    /// kubelet settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub kubelet: Component,
    /// machined's Prometheus metrics. They are always served over mutual
    /// TLS on port 50002 (client certificates from the OS CA, any role);
    /// this adds a plain-HTTP port.
    #[serde(default, skip_serializing_if = "is_default")]
    pub metrics: Metrics,
}

/// machined's Prometheus metrics endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metrics {
    /// Also serve `/metrics` without TLS or client certificates on this
    /// port of the OS API's address (1024 to 65535; not 2379, 2380 or
    /// 50000 to 50002), read-only, for scrapers that cannot hold a client
    /// certificate. Anyone who can reach the port can read the metrics
    /// (service states, certificate expiry, etcd health). Absent: no
    /// plain-HTTP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_port: Option<u16>,
}

/// Which OS images a node takes when installing or upgrading.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Upgrade {
    /// Public keys of the image builders this node trusts, each an ed25519
    /// key in PEM (`-----BEGIN PUBLIC KEY-----`): the `image-signing.pub`
    /// that `osctl gen signing-key` writes, or `openssl pkey -in KEY
    /// -pubout`. An image is trusted when its `manifest.json` carries a
    /// signature (`manifest.json.sig`, from `imager build --sign KEY`) by
    /// one of them. At most 16, none twice; list the next key beside the
    /// current one while rotating.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::image_signature::MAX_TRUSTED_KEYS))]
    pub trusted_image_keys: Vec<String>,
}

/// Network configuration of the node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    /// Interfaces to configure; interfaces not listed stay down. An empty
    /// list means: the kernel command line's `ip=` arguments if any, else
    /// DHCP on the first link with carrier. Applied at boot: a change takes
    /// effect at the next reboot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// DNS servers (at most three are used). When absent, those from DHCP
    /// or `ip=` are used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<Ip>,
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Interface {
    /// Kernel name of the interface, e.g. `eth0` or `enp1s0`.
    pub name: String,
    /// Get an address, routes and DNS servers by DHCP.
    #[serde(default)]
    pub dhcp: bool,
    /// Static addresses with prefix length, e.g. `192.168.1.10/24`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<InterfaceAddress>,
    /// Static routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// MTU; the kernel's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// A static route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// Destination network, e.g. `0.0.0.0/0` for the default route.
    pub network: Cidr,
    /// Next hop. Absent for an on-link route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ip>,
    /// Route metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// Settings shared by every node of the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    /// Cluster name: a DNS label, used in kubeconfigs and osconfig contexts.
    pub name: DnsName,
    /// Where the Kubernetes API is reached, e.g. `https://10.5.0.2:6443`
    /// (a load balancer or a VIP for several control-plane nodes).
    pub control_plane: ControlPlane,
    /// Kubernetes release to run, e.g. `1.35.0`.
    pub kubernetes_version: KubernetesVersion,
    /// Pod and service networks.
    #[serde(default)]
    pub network: ClusterNetwork,
    /// Where etcd is and how this node's etcd member joins.
    #[serde(default, skip_serializing_if = "is_default")]
    pub etcd: Etcd,
    /// kube-apiserver settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub api_server: ApiServer,
    /// kube-controller-manager settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub controller_manager: Component,
    /// kube-scheduler settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub scheduler: Component,
    /// kube-proxy settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub proxy: Component,
}

/// The control-plane endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlane {
    /// An `https://` URL with host and port.
    pub endpoint: Endpoint,
}

/// Pod and service networks of the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterNetwork {
    /// Pod networks (one per IP family).
    #[serde(default = "default_pod_cidrs")]
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<Cidr>,
    /// Service networks (one per IP family). The first address of the first
    /// one is the `kubernetes` service's cluster IP.
    #[serde(default = "default_service_cidrs")]
    #[serde(rename = "serviceCIDRs")]
    pub service_cidrs: Vec<Cidr>,
    /// Cluster DNS domain.
    #[serde(default = "default_dns_domain")]
    pub dns_domain: DnsName,
    /// How each node gets its pod CIDR.
    #[serde(default)]
    #[serde(rename = "nodePodCIDR")]
    pub node_pod_cidr: NodePodCidr,
}

impl Default for ClusterNetwork {
    fn default() -> Self {
        ClusterNetwork {
            pod_cidrs: default_pod_cidrs(),
            service_cidrs: default_service_cidrs(),
            dns_domain: default_dns_domain(),
            node_pod_cidr: NodePodCidr::default(),
        }
    }
}

fn default_pod_cidrs() -> Vec<Cidr> {
    vec![Cidr("10.244.0.0/16".parse().expect("constant CIDR"))]
}
fn default_service_cidrs() -> Vec<Cidr> {
    vec![Cidr("10.96.0.0/12".parse().expect("constant CIDR"))]
}
fn default_dns_domain() -> DnsName {
    DnsName("cluster.local".into())
}

/// How a node's pod CIDR is chosen: exactly one of `maskSize` (allocated by
/// kube-controller-manager out of the cluster's pod CIDRs) or `cidr` (fixed
/// for this node).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodePodCidr {
    /// Prefix length of each node's IPv4 pod CIDR when the controller
    /// manager allocates them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_size: Option<u8>,
    /// A fixed pod CIDR for this node, inside the cluster's pod CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Cidr>,
}

impl Default for NodePodCidr {
    fn default() -> Self {
        NodePodCidr {
            mask_size: Some(24),
            cidr: None,
        }
    }
}

/// Where etcd is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Etcd {
    /// Client URLs (`https://HOST:2379`) of existing etcd members of this
    /// cluster. An `etcd` node joins through them (empty on the first node,
    /// which `osctl bootstrap` turns into a new cluster); a `controlplane`
    /// node without the `etcd` role talks to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// An etcd cluster not run by this OS. Mutually exclusive with the
    /// `etcd` role and with `endpoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalEtcd>,
    /// Extra etcd flags, without the leading `--`.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub extra_args: BTreeMap<String, String>,
    /// Snapshots each `etcd` node takes of its member on a schedule, kept
    /// in /var/lib/etcd-snapshots (the EPHEMERAL partition) with the
    /// newest `keep`. Absent: none are taken (`osctl etcd snapshot` still
    /// works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<EtcdSnapshots>,
}

/// Scheduled etcd snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdSnapshots {
    /// Minutes between snapshots: 5 to 10080 (a week); 1440 is daily.
    #[serde(default = "default_snapshot_interval")]
    pub interval_minutes: u32,
    /// How many snapshots to keep, oldest removed first: 1 to 100.
    #[serde(default = "default_snapshot_keep")]
    pub keep: u32,
}

fn default_snapshot_interval() -> u32 {
    1440
}

fn default_snapshot_keep() -> u32 {
    7
}

/// An etcd cluster run elsewhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalEtcd {
    /// Client URLs of the external cluster.
    pub endpoints: Vec<Endpoint>,
    /// PEM CA certificate that signs the external cluster's server certificates.
    pub ca_cert: String,
    /// PEM client certificate kube-apiserver presents to etcd.
    pub client_cert: String,
    /// PEM private key of `clientCert`.
    pub client_key: String,
}

/// kube-apiserver settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiServer {
    /// Extra names and addresses for the API server certificate: DNS names
    /// (lowercase; one leading `*.` wildcard label allowed) or IP
    /// addresses, at most 24.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[serde(rename = "certSANs")]
    pub cert_sans: Vec<String>,
    /// Extra flags, without the leading `--`. An escape hatch: flags set here
    /// override the ones this OS generates.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub extra_args: BTreeMap<String, String>,
}

/// Settings of a Kubernetes component.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Component {
    /// Extra flags, without the leading `--`. An escape hatch: flags set here
    /// override the ones this OS generates.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "scalar_map"
    )]
    pub extra_args: BTreeMap<String, String>,
}

/// A PEM certificate with an optional PEM private key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertAndKey {
    /// PEM certificate.
    pub crt: String,
    /// PEM private key (PKCS#8). Present only where the node signs with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Secrets carried by a machine config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Secrets {
    /// CA of the OS API (port 50000). Every node has the certificate; nodes
    /// with `etcd` or `controlplane` also have the key, to mint their own
    /// API certificate and to issue workers theirs.
    #[serde(rename = "osCA")]
    pub os_ca: CertAndKey,
    /// Token a node presents to obtain its OS API certificate from a
    /// control-plane node (trust bootstrap).
    pub machine_token: String,
    /// Kubernetes CA. Key on `controlplane` nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "kubernetesCA")]
    pub kubernetes_ca: Option<CertAndKey>,
    /// etcd CA. Key on `etcd` and `controlplane` nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "etcdCA")]
    pub etcd_ca: Option<CertAndKey>,
    /// Front-proxy (aggregation layer) CA. On `controlplane` nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "frontProxyCA")]
    pub front_proxy_ca: Option<CertAndKey>,
    /// PEM private key that signs service-account tokens. On `controlplane`
    /// nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_key: Option<String>,
    /// Kubelet TLS bootstrap token, `[a-z0-9]{6}.[a-z0-9]{16}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_token: Option<String>,
    /// Base64 of 32 random bytes: the key that encrypts Secrets at rest in
    /// etcd (secretbox). On `controlplane` nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secretbox_encryption_secret: Option<String>,
}

impl MachineConfig {
    pub fn has_role(&self, role: Role) -> bool {
        self.machine.roles.contains(&role)
    }

    /// The keys of `machine.upgrade.trustedImageKeys`, to check an image's
    /// signature with ([`crate::image_signature::verify_manifest`]). A
    /// config that passed validation yields every key it lists; an entry
    /// that is not a key is left out (validation reports it).
    pub fn trusted_image_keys(&self) -> Vec<TrustedKey> {
        self.machine
            .upgrade
            .trusted_image_keys
            .iter()
            .enumerate()
            .filter_map(|(i, pem)| {
                TrustedKey::from_pem(pem, &format!("machine.upgrade.trustedImageKeys[{i}]")).ok()
            })
            .collect()
    }
}
