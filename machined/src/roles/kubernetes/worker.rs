//! The `worker` role: kubelet and kube-proxy as supervised services, on a
//! worker alone or beside the control plane.
//!
//! Identities, without a CA key on the worker:
//! - kubelet's client certificate (`system:node:NAME` in `system:nodes`)
//!   comes through kubelet TLS bootstrap with the cluster's bootstrap
//!   token; the controller-manager approves it and kubelet rotates it
//!   itself (the bootstrap objects grant both, see [`super::bootstrap`]);
//! - kubelet's serving certificate and kube-proxy's client certificate are
//!   signed by the cluster CA through the trust endpoint (machine token +
//!   CSR, the key never leaves the node), or minted locally on a node that
//!   holds the CA key. Because kubelet serves a CA-signed certificate, the
//!   apiserver verifies kubelets (`--kubelet-certificate-authority`).
//!
//! kubelet runs with the cgroupfs driver, as machined and containerd do
//! (machined owns the cgroup tree; there is no systemd). kube-proxy runs in
//! nftables mode: docs/architecture.md says why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use machine_api::atomic::write_atomic;
use machine_api::config::MachineConfig;
use machine_api::pki::kube::{self as leaves, NodeIdentity};
use machine_api::pki::{CertificateAuthority, LeafSpec};
use machine_api::proto::KubernetesCertificateKind;

use super::files::kubeconfig;
use crate::roles::{containerd, RoleContext, RoleError};
use crate::supervisor::{PreStart, Progress, ServiceSpec};

pub const ROLE: &str = "worker";
pub const KUBELET: &str = "kubelet";
pub const KUBE_PROXY: &str = "kube-proxy";
pub const KUBELET_PORT: u16 = 10250;
const KUBELET_HEALTHZ: u16 = 10248;
const KUBE_PROXY_HEALTHZ: u16 = 10256;

/// The binaries the role runs, for one clear error on an image without them.
pub const BINARIES: &[&str] = &[KUBELET, KUBE_PROXY];

/// The worker's private directory, on STATE: kubelet's client certificate
/// (from TLS bootstrap, then rotated by kubelet) and the signed
/// certificates survive reboots, so a rebooted worker rejoins as itself
/// without a new bootstrap. A reset wipes it.
pub fn dir_of(paths: &crate::paths::Paths) -> PathBuf {
    paths.state_dir().join("kubelet")
}

fn io(p: &Path, e: std::io::Error) -> RoleError {
    RoleError::Io(p.display().to_string(), e)
}

/// Writes `text` unless the file already holds it: unchanged files keep
/// their mtime, and nothing is rewritten on every reconcile.
fn write_if_changed(p: &Path, text: &str, mode: u32) -> Result<(), RoleError> {
    if std::fs::read_to_string(p).is_ok_and(|old| old == text) {
        return Ok(());
    }
    write_atomic(p, text.as_bytes(), mode).map_err(|e| io(p, e))
}

/// The kubelet configuration: webhook authentication and authorization
/// with anonymous access off, the cluster CA for client certificates, a
/// CA-signed serving certificate that kubelet reloads when machined renews
/// it, client certificate rotation, containerd's CRI socket, cgroupfs.
pub fn kubelet_config(
    dir: &Path,
    ctx: &RoleContext,
    cluster_dns: &str,
    cluster_domain: &str,
) -> String {
    let d = |n: &str| dir.join(n).display().to_string();
    let logs = ctx.paths.log_dir().join("pods");
    let address = if ctx.host_mode {
        ctx.node.ip.to_string()
    } else {
        "0.0.0.0".into()
    };
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {address}
port: {KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {KUBELET_HEALTHZ}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
    cacheTTL: 2m0s
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
  webhook:
    cacheAuthorizedTTL: 5m0s
    cacheUnauthorizedTTL: 30s
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
tlsMinVersion: VersionTLS12
rotateCertificates: true
serverTLSBootstrap: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://{sock}
clusterDNS:
  - {cluster_dns}
clusterDomain: {cluster_domain}
resolvConf: /etc/resolv.conf
podLogsDir: {logs}
failSwapOn: false
registerNode: true
evictionHard:
  memory.available: 100Mi
  nodefs.available: 10%
  nodefs.inodesFree: 5%
  imagefs.available: 10%
",
        ca = d("ca.crt"),
        cert = d("serving.crt"),
        key = d("serving.key"),
        sock = ctx.paths.containerd_socket().display(),
        logs = logs.display(),
    )
}

/// kube-proxy's configuration: nftables mode, the cluster's pod CIDRs,
/// NodePorts on every node address (the classic behaviour; nftables mode
/// would otherwise take only the primary address, and a local cluster's
/// host reaches its VMs on another), health and metrics on loopback only.
pub fn kube_proxy_config(dir: &Path, ctx: &RoleContext, cluster_cidr: &str) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {name}
clusterCIDR: \"{cluster_cidr}\"
bindAddress: {ip}
healthzBindAddress: 127.0.0.1:{KUBE_PROXY_HEALTHZ}
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [\"0.0.0.0/0\", \"::/0\"]
",
        kubeconfig = dir.join("kube-proxy.conf").display(),
        name = ctx.node.name,
        ip = ctx.node.ip,
    )
}

/// The kubelet's bootstrap kubeconfig: the cluster's bootstrap token,
/// which may only ask for a node client certificate.
fn bootstrap_kubeconfig(cluster: &str, server: &str, ca_pem: &str, token: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "server": server,
            "certificate-authority-data": b64,
        }}],
        "users": [{"name": "kubelet-bootstrap", "user": {"token": token}}],
        "contexts": [{"name": "kubelet-bootstrap", "context": {"cluster": cluster, "user": "kubelet-bootstrap"}}],
        "current-context": "kubelet-bootstrap",
        "preferences": {},
    });
    serde_norway::to_string(&doc).unwrap_or_default()
}

/// kubelet and kube-proxy for this node.
pub fn services(cfg: &MachineConfig, ctx: &RoleContext) -> Result<Vec<ServiceSpec>, RoleError> {
    let bins = super::require_binaries(ctx, ROLE, BINARIES)?;
    let dir = dir_of(&ctx.paths);
    std::fs::create_dir_all(dir.join("pki")).map_err(|e| io(&dir, e))?;
    let err = |e: String| RoleError::Certificates(ROLE, e);
    let ca = cfg
        .secrets
        .kubernetes_ca
        .as_ref()
        .ok_or_else(|| err("the config has no secrets.kubernetesCA".into()))?;
    let token = cfg
        .secrets
        .bootstrap_token
        .as_deref()
        .ok_or_else(|| err("the config has no secrets.bootstrapToken".into()))?;
    let cluster = cfg.cluster.name.0.as_str();
    let endpoint = cfg.cluster.control_plane.endpoint.0.to_string();
    let endpoint = endpoint.trim_end_matches('/');
    let net = &cfg.cluster.network;
    let cluster_dns = super::bootstrap::service_ip(cfg, 10).map_err(err)?;
    let pod_cidrs = super::join_cidrs(&net.pod_cidrs);
    write_if_changed(&dir.join("ca.crt"), &ca.crt, 0o644)?;
    write_if_changed(
        &dir.join("bootstrap.conf"),
        &bootstrap_kubeconfig(cluster, endpoint, &ca.crt, token),
        0o600,
    )?;
    write_if_changed(
        &dir.join("kubelet.yaml"),
        &kubelet_config(&dir, ctx, &cluster_dns, &net.dns_domain.0),
        0o644,
    )?;
    write_if_changed(
        &dir.join("kube-proxy.yaml"),
        &kube_proxy_config(&dir, ctx, &pod_cidrs),
        0o644,
    )?;
    let root_dir = ctx.paths.root.join("var/lib/kubelet");
    std::fs::create_dir_all(&root_dir).map_err(|e| io(&root_dir, e))?;
    let d = |n: &str| dir.join(n).display().to_string();
    let kubelet_args = super::flags(
        vec![
            ("config", d("kubelet.yaml")),
            ("kubeconfig", d("kubelet.conf")),
            ("bootstrap-kubeconfig", d("bootstrap.conf")),
            ("cert-dir", d("pki")),
            ("root-dir", root_dir.display().to_string()),
            ("hostname-override", ctx.node.name.clone()),
            ("node-ip", ctx.node.ip.to_string()),
        ],
        &cfg.machine.kubelet.extra_args,
    );
    let health = |port: u16, path: &str| -> Result<Arc<super::health::HttpsHealth>, RoleError> {
        super::health::HttpsHealth::new(&ca.crt, format!("http://127.0.0.1:{port}{path}"))
            .map(Arc::new)
            .map_err(err)
    };
    let identity = Identities::new(cfg, ctx);
    let mut argv = vec![bins[0].display().to_string()];
    argv.extend(kubelet_args);
    let kubelet = ServiceSpec {
        name: KUBELET.into(),
        argv,
        env: vec![("PATH".into(), ctx.service_path())],
        cwd: Some(dir.clone()),
        depends_on: vec![containerd::SERVICE.into()],
        health: health(KUBELET_HEALTHZ, "/healthz")?,
        stop_timeout: Duration::from_secs(20),
        pre_start: Some(Arc::new(KubeletPrep {
            identity: identity.clone(),
            images: ImageImport::new(ctx),
        })),
        cpu_weight: None,
        nofile: Some(1_048_576),
    };
    let proxy = ServiceSpec {
        name: KUBE_PROXY.into(),
        argv: vec![
            bins[1].display().to_string(),
            format!("--config={}", d("kube-proxy.yaml")),
        ],
        env: vec![("PATH".into(), ctx.service_path())],
        cwd: Some(dir.clone()),
        depends_on: vec![],
        health: health(KUBE_PROXY_HEALTHZ, "/livez")?,
        stop_timeout: Duration::from_secs(10),
        pre_start: Some(Arc::new(KubeProxyPrep(identity))),
        cpu_weight: None,
        nofile: Some(65_536),
    };
    Ok(vec![kubelet, proxy])
}

/// The certificates the cluster CA signs for this node, kept in the
/// worker's directory and asked for again when missing, for other names,
/// or due for renewal.
#[derive(Clone)]
struct Identities {
    cfg: Arc<MachineConfig>,
    dir: PathBuf,
    node: NodeIdentity,
    renew_before: Duration,
}

/// The certificates the cluster CA signs for a worker: (file name, what
/// it is, the kind the trust endpoint signs, the service that reads it).
fn certificates(
    node: &NodeIdentity,
) -> [(
    &'static str,
    LeafSpec,
    KubernetesCertificateKind,
    &'static str,
); 2] {
    [
        (
            "serving",
            leaves::kubelet_serving(node),
            KubernetesCertificateKind::KubeletServing,
            KUBELET,
        ),
        (
            "kube-proxy",
            leaves::kube_proxy(),
            KubernetesCertificateKind::KubeProxy,
            KUBE_PROXY,
        ),
    ]
}

/// The earliest renewal time of the worker certificates on this node
/// (none before they exist).
pub fn next_renewal(ctx: &RoleContext) -> Option<std::time::SystemTime> {
    let dir = dir_of(&ctx.paths);
    certificates(&node_identity(ctx))
        .iter()
        .filter_map(|(n, ..)| std::fs::read_to_string(dir.join(format!("{n}.crt"))).ok())
        .filter_map(|pem| machine_api::pki::renewal_time(&pem, ctx.renew_before))
        .min()
}

/// Renews, while the services keep running on the old ones, every worker
/// certificate that is due (or no longer fits the config), and returns the
/// services to restart so that they read the new ones. A certificate the
/// node never had is left to its service's start. When the trust endpoint
/// does not answer, this fails and nothing is restarted: the services go
/// on with certificates that are still valid, and the caller tries again.
pub async fn renew_due(
    cfg: &MachineConfig,
    ctx: &RoleContext,
    progress: &Progress,
) -> Result<Vec<&'static str>, String> {
    let id = Identities::new(cfg, ctx);
    let mut renewed = Vec::new();
    for (name, spec, kind, service) in certificates(&id.node) {
        if !id.dir.join(format!("{name}.crt")).exists() || id.kept(name, &spec) {
            continue;
        }
        id.ensure(name, spec, kind, progress).await?;
        renewed.push(service);
    }
    Ok(renewed)
}

/// This node as its certificates name it.
fn node_identity(ctx: &RoleContext) -> NodeIdentity {
    NodeIdentity {
        name: ctx.node.name.clone(),
        addresses: vec![ctx.node.ip],
    }
}

impl Identities {
    fn new(cfg: &MachineConfig, ctx: &RoleContext) -> Self {
        Identities {
            cfg: Arc::new(cfg.clone()),
            dir: dir_of(&ctx.paths),
            node: node_identity(ctx),
            renew_before: ctx.renew_before,
        }
    }

    /// A kept certificate that still fits `spec` and is not due.
    fn kept(&self, name: &str, spec: &LeafSpec) -> bool {
        let (Ok(cert), Ok(_)) = (
            std::fs::read_to_string(self.dir.join(format!("{name}.crt"))),
            std::fs::read(self.dir.join(format!("{name}.key"))),
        ) else {
            return false;
        };
        let fits = std::fs::read_to_string(self.dir.join(format!("{name}.for")))
            .is_ok_and(|s| s == format!("{spec:?}|{}", ca_crt(&self.cfg)));
        let due = machine_api::pki::renewal_time(&cert, self.renew_before)
            .is_none_or(|t| t <= std::time::SystemTime::now());
        fits && !due
    }

    /// `name.crt`/`name.key` for `spec`: minted here when the config holds
    /// the CA key, else signed through the trust endpoint.
    async fn ensure(
        &self,
        name: &str,
        spec: LeafSpec,
        kind: KubernetesCertificateKind,
        progress: &Progress,
    ) -> Result<(), String> {
        if self.kept(name, &spec) {
            return Ok(());
        }
        let ca = self.cfg.secrets.kubernetes_ca.as_ref();
        let (cert, key) = match ca.and_then(|c| c.key.as_ref().map(|k| (c, k))) {
            Some((c, k)) => {
                let ca = CertificateAuthority::from_pem("secrets.kubernetesCA", &c.crt, k)
                    .map_err(|e| e.to_string())?;
                let pem = ca.issue(&spec).map_err(|e| e.to_string())?;
                (pem.cert_pem, pem.key_pem)
            }
            None => {
                progress(format!(
                    "asking the trust endpoint to sign {}",
                    spec.common_name
                ));
                crate::api::trust::kubernetes_certificate(&self.cfg, &spec, kind, progress)
                    .await
                    .map_err(|e| format!("the trust endpoint refused {name}: {e}"))?
            }
        };
        let w = |n: String, text: &str, mode: u32| {
            let p = self.dir.join(n);
            write_atomic(&p, text.as_bytes(), mode).map_err(|e| format!("{}: {e}", p.display()))
        };
        // Key first: a crash between the two leaves a key without its
        // certificate, which `kept` refuses, never a mismatched pair in use.
        w(format!("{name}.key"), &key, 0o600)?;
        w(format!("{name}.crt"), &cert, 0o644)?;
        w(
            format!("{name}.for"),
            &format!("{spec:?}|{}", ca_crt(&self.cfg)),
            0o600,
        )?;
        tracing::info!(certificate = name, "Kubernetes certificate ready");
        Ok(())
    }
}

fn ca_crt(cfg: &MachineConfig) -> String {
    cfg.secrets
        .kubernetes_ca
        .as_ref()
        .map(|c| c.crt.clone())
        .unwrap_or_default()
}

/// The baked container images, imported into containerd's `k8s.io`
/// namespace before kubelet asks for any of them.
#[derive(Clone)]
struct ImageImport {
    ctr: Option<PathBuf>,
    socket: PathBuf,
    images: PathBuf,
    markers: PathBuf,
}

impl ImageImport {
    fn new(ctx: &RoleContext) -> Self {
        ImageImport {
            ctr: crate::paths::find_binary(ctx.bin_dir.as_deref(), "ctr"),
            socket: ctx.paths.containerd_socket(),
            images: ctx.paths.root.join(machine_api::layout::images::DIR),
            markers: ctx.paths.containerd_root().join("machined-imported"),
        }
    }

    async fn run(&self, progress: &Progress) -> Result<(), String> {
        if !self
            .images
            .join(machine_api::layout::images::INDEX)
            .exists()
        {
            return Ok(());
        }
        let ctr = self.ctr.clone().ok_or(
            "this image bakes container images but has no ctr to import them (usr/bin/ctr)",
        )?;
        progress("importing the baked container images".into());
        let this = self.clone();
        let refs = tokio::task::spawn_blocking(move || {
            crate::roles::images::import_baked(&ctr, &this.socket, &this.images, &this.markers)
        })
        .await
        .map_err(|e| e.to_string())??;
        if !refs.is_empty() {
            tracing::info!(images = ?refs, "baked container images imported");
        }
        Ok(())
    }
}

struct KubeletPrep {
    identity: Identities,
    images: ImageImport,
}

#[async_trait]
impl PreStart for KubeletPrep {
    async fn run(&self, progress: &Progress) -> Result<(), String> {
        self.images.run(progress).await?;
        self.identity
            .ensure(
                "serving",
                leaves::kubelet_serving(&self.identity.node),
                KubernetesCertificateKind::KubeletServing,
                progress,
            )
            .await
    }
}

struct KubeProxyPrep(Identities);

#[async_trait]
impl PreStart for KubeProxyPrep {
    async fn run(&self, progress: &Progress) -> Result<(), String> {
        let id = &self.0;
        id.ensure(
            "kube-proxy",
            leaves::kube_proxy(),
            KubernetesCertificateKind::KubeProxy,
            progress,
        )
        .await?;
        let read =
            |n: &str| std::fs::read_to_string(id.dir.join(n)).map_err(|e| format!("{n}: {e}"));
        let endpoint = id.cfg.cluster.control_plane.endpoint.0.to_string();
        let text = kubeconfig(
            &id.cfg.cluster.name.0,
            endpoint.trim_end_matches('/'),
            &ca_crt(&id.cfg),
            "system:kube-proxy",
            &read("kube-proxy.crt")?,
            &read("kube-proxy.key")?,
        );
        let p = id.dir.join("kube-proxy.conf");
        if std::fs::read_to_string(&p).is_ok_and(|old| old == text) {
            return Ok(());
        }
        write_atomic(&p, text.as_bytes(), 0o600).map_err(|e| format!("{}: {e}", p.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(root: &Path) -> RoleContext {
        RoleContext {
            paths: crate::paths::Paths::new(root),
            bin_dir: None,
            node: crate::roles::NodeIdentity {
                name: "w1".into(),
                ip: "10.5.0.21".parse().unwrap(),
            },
            host_mode: false,
            renew_before: Duration::from_secs(30 * 86400),
        }
    }

    #[tokio::test]
    async fn due_certificates_are_renewed_in_place_and_their_services_named() {
        use machine_api::config::generate::{machine_config, ClusterInput};
        use machine_api::config::Role;
        let tmp = tempfile::tempdir().unwrap();
        let bundle = machine_api::pki::bundle::SecretsBundle::generate().unwrap();
        let input = ClusterInput {
            name: "t".parse().unwrap(),
            endpoint: "https://10.5.0.10:6443".parse().unwrap(),
            kubernetes_version: "1.35.4".parse().unwrap(),
            install_disk: None,
        };
        // A control plane that is also a worker holds the CA key: the
        // certificates are minted here, no trust endpoint needed.
        let cfg = machine_config(&bundle, &input, &[Role::Controlplane, Role::Worker]);
        let mut c = ctx(tmp.path());
        let quiet = |_: String| {};
        // Nothing minted yet: left to the services' start.
        assert!(next_renewal(&c).is_none());
        assert!(renew_due(&cfg, &c, &quiet).await.unwrap().is_empty());
        let id = Identities::new(&cfg, &c);
        std::fs::create_dir_all(&id.dir).unwrap();
        for (name, spec, kind, _) in certificates(&id.node) {
            id.ensure(name, spec, kind, &quiet).await.unwrap();
        }
        let read = |n: &str| std::fs::read_to_string(id.dir.join(n)).unwrap();
        let before = (read("serving.crt"), read("kube-proxy.crt"));
        // Not due: nothing renewed; the next renewal is 30 days before
        // the end of a year.
        assert!(renew_due(&cfg, &c, &quiet).await.unwrap().is_empty());
        let left = next_renewal(&c)
            .unwrap()
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        assert!(left > Duration::from_secs(300 * 86400), "{left:?}");
        // Due (renewing a year ahead): both signed again, both services
        // named for a restart.
        c.renew_before = Duration::from_secs(366 * 86400);
        assert_eq!(
            renew_due(&cfg, &c, &quiet).await.unwrap(),
            [KUBELET, KUBE_PROXY]
        );
        assert_ne!(read("serving.crt"), before.0);
        assert_ne!(read("kube-proxy.crt"), before.1);
    }

    #[test]
    fn kubelet_config_is_locked_down() {
        let c = ctx(Path::new("/"));
        let text = kubelet_config(
            Path::new("/system/secrets/kubelet"),
            &c,
            "10.96.0.10",
            "cluster.local",
        );
        let doc: serde_json::Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(doc["authentication"]["anonymous"]["enabled"], false);
        assert_eq!(doc["authentication"]["webhook"]["enabled"], true);
        assert_eq!(doc["authorization"]["mode"], "Webhook");
        assert_eq!(doc["readOnlyPort"], 0);
        assert_eq!(doc["rotateCertificates"], true);
        assert_eq!(doc["cgroupDriver"], "cgroupfs");
        assert_eq!(doc["clusterDNS"][0], "10.96.0.10");
        assert_eq!(
            doc["containerRuntimeEndpoint"],
            "unix:///run/containerd/containerd.sock"
        );
        assert_eq!(doc["tlsCertFile"], "/system/secrets/kubelet/serving.crt");
    }

    #[test]
    fn kube_proxy_runs_nftables_for_the_pod_cidrs() {
        let c = ctx(Path::new("/"));
        let text = kube_proxy_config(Path::new("/k"), &c, "10.244.0.0/16");
        let doc: serde_json::Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(doc["mode"], "nftables");
        assert_eq!(doc["clusterCIDR"], "10.244.0.0/16");
        assert_eq!(doc["hostnameOverride"], "w1");
        assert_eq!(doc["clientConnection"]["kubeconfig"], "/k/kube-proxy.conf");
    }

    #[test]
    fn bootstrap_kubeconfig_carries_only_the_token() {
        let text = bootstrap_kubeconfig(
            "c",
            "https://10.5.0.2:6443",
            "CA",
            "abcdef.0123456789abcdef",
        );
        let doc: serde_json::Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(doc["users"][0]["user"]["token"], "abcdef.0123456789abcdef");
        assert!(doc["users"][0]["user"].get("client-key-data").is_none());
        assert_eq!(
            doc["clusters"][0]["cluster"]["server"],
            "https://10.5.0.2:6443"
        );
    }
}
