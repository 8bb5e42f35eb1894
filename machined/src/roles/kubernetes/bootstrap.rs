//! The cluster's bootstrap objects, applied with the real kubectl
//! (server-side apply, field manager `machined`) before every start of the
//! controller-manager, which depends on a ready apiserver. Server-side
//! apply of an unchanged manifest changes nothing (no new resourceVersion),
//! so applying on every control-plane node is safe; within one boot the
//! same objects are applied once.
//!
//! They are applied as `kubernetes-super-admin` (group `system:masters`):
//! the binding that gives the operator's `kubeadm:cluster-admins` group its
//! rights is itself one of these objects. That identity never leaves the
//! node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use machine_api::config::MachineConfig;

use super::files::KubeFiles;
use crate::roles::RoleError;
use crate::supervisor::{PreStart, Progress};

/// CoreDNS' image as the node's containerd knows it (baked into the image,
/// never pulled; see docs/architecture.md).
pub const COREDNS_IMAGE: &str = machine_api::layout::images::COREDNS;

/// The pre-start step of the controller-manager.
#[derive(Debug)]
pub struct Apply {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    manifest: PathBuf,
    text: String,
    /// The sha256 of the last manifest applied in this boot (under /run):
    /// a controller-manager that restarts (it exits whenever it loses its
    /// leader lease, which a slow apiserver makes frequent) does not run
    /// kubectl again for the same objects. A new boot, or changed objects,
    /// apply again.
    applied: PathBuf,
}

impl Apply {
    pub fn new(
        cfg: &MachineConfig,
        files: &KubeFiles,
        kubectl: &Path,
        applied: PathBuf,
    ) -> Result<Self, RoleError> {
        Ok(Apply {
            kubectl: kubectl.to_owned(),
            kubeconfig: files.file("super-admin.conf"),
            manifest: files.file("bootstrap-objects.yaml"),
            text: manifests(cfg).map_err(|e| RoleError::Certificates(super::files::ROLE, e))?,
            applied,
        })
    }

    fn digest(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.text.as_bytes()))
    }
}

#[async_trait]
impl PreStart for Apply {
    async fn run(&self, progress: &Progress) -> Result<(), String> {
        let digest = self.digest();
        if std::fs::read_to_string(&self.applied).is_ok_and(|d| d.trim() == digest) {
            return Ok(());
        }
        machine_api::atomic::write_atomic(&self.manifest, self.text.as_bytes(), 0o600)
            .map_err(|e| format!("{}: {e}", self.manifest.display()))?;
        progress("applying the cluster's bootstrap objects".into());
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args([
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--field-manager=machined",
                    "-f",
                ])
                .arg(&self.manifest)
                .env_clear()
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| "kubectl apply of the bootstrap objects timed out after 60 s".to_owned())?
        .map_err(|e| format!("cannot run {}: {e}", self.kubectl.display()))?;
        if !out.status.success() {
            return Err(format!(
                "kubectl apply of the bootstrap objects failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let objects = String::from_utf8_lossy(&out.stdout).lines().count();
        tracing::info!(objects, "bootstrap objects applied");
        if let Some(dir) = self.applied.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // Best effort: without the mark the next start applies again.
        let _ = machine_api::atomic::write_atomic(&self.applied, digest.as_bytes(), 0o600);
        Ok(())
    }
}

/// The `n`-th address of the first service CIDR (kubeadm puts cluster DNS
/// at the 10th).
pub fn service_ip(cfg: &MachineConfig, n: usize) -> Result<String, String> {
    let cidr = cfg
        .cluster
        .network
        .service_cidrs
        .first()
        .ok_or("cluster.network.serviceCIDRs is empty")?
        .0;
    cidr.hosts()
        .nth(n - 1)
        .map(|ip| ip.to_string())
        .ok_or_else(|| format!("cluster.network.serviceCIDRs[0] {cidr} is too small"))
}

/// Every bootstrap object, as one multi-document YAML.
pub fn manifests(cfg: &MachineConfig) -> Result<String, String> {
    let token = cfg
        .secrets
        .bootstrap_token
        .as_deref()
        .ok_or("the config has no secrets.bootstrapToken")?;
    let (token_id, token_secret) = token
        .split_once('.')
        .ok_or("secrets.bootstrapToken is not ID.SECRET")?;
    let domain = &cfg.cluster.network.dns_domain.0;
    let dns_ip = service_ip(cfg, 10)?;
    let cluster_cidr = cfg
        .cluster
        .network
        .pod_cidrs
        .iter()
        .map(|c| c.0.to_string())
        .collect::<Vec<_>>()
        .join(",");
    Ok(format!(
        r#"# The operator's group (admin kubeconfig) is cluster-admin, through RBAC
# (revocable), not system:masters.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kubeadm:cluster-admins
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}
subjects:
  - {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "kubeadm:cluster-admins"}}
---
# apiserver → kubelet: logs, exec, port-forward, metrics.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:kube-apiserver-to-kubelet
rules:
  - apiGroups: [""]
    resources: [nodes/proxy, nodes/stats, nodes/log, nodes/spec, nodes/metrics, nodes/pods, nodes/healthz, nodes/configz]
    verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:kube-apiserver
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kube-apiserver-to-kubelet"}}
subjects:
  - {{apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}}
---
# Node bootstrap: the cluster's bootstrap token, the right to ask for a
# node client certificate, and automatic approval of those requests and
# of renewals by nodes.
apiVersion: v1
kind: Secret
metadata:
  name: bootstrap-token-{token_id}
  namespace: kube-system
type: bootstrap.kubernetes.io/token
stringData:
  description: "machined: the cluster's node bootstrap token"
  token-id: "{token_id}"
  token-secret: "{token_secret}"
  usage-bootstrap-authentication: "true"
  usage-bootstrap-signing: "true"
  auth-extra-groups: "system:bootstrappers:machined:nodes"
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: machined:kubelet-bootstrap
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:node-bootstrapper"}}
subjects:
  - {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:bootstrappers:machined:nodes"}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: machined:node-autoapprove-bootstrap
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:certificates.k8s.io:certificatesigningrequests:nodeclient"}}
subjects:
  - {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:bootstrappers:machined:nodes"}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: machined:node-autoapprove-certificate-rotation
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient"}}
subjects:
  - {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:nodes"}}
---
# kube-proxy: its identity's rights and its configuration.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: machined:node-proxier
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:node-proxier"}}
subjects:
  - {{apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:kube-proxy"}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: kube-proxy
  namespace: kube-system
data:
  config.conf: |
    apiVersion: kubeproxy.config.k8s.io/v1alpha1
    kind: KubeProxyConfiguration
    mode: nftables
    clusterCIDR: "{cluster_cidr}"
---
# Cluster DNS.
apiVersion: v1
kind: ServiceAccount
metadata:
  name: coredns
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects:
  - {{kind: ServiceAccount, name: coredns, namespace: kube-system}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
    .:53 {{
        errors
        health {{
            lameduck 5s
        }}
        ready
        kubernetes {domain} in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 30
        }}
        forward . /etc/resolv.conf {{
            max_concurrent 1000
        }}
        cache 30
        loop
        reload
        loadbalance
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  replicas: 2
  selector:
    matchLabels: {{k8s-app: kube-dns}}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxUnavailable: 1}}
  template:
    metadata:
      labels: {{k8s-app: kube-dns}}
    spec:
      priorityClassName: system-cluster-critical
      serviceAccountName: coredns
      tolerations:
        - {{key: CriticalAddonsOnly, operator: Exists}}
        - {{key: node-role.kubernetes.io/control-plane, effect: NoSchedule}}
      nodeSelector: {{kubernetes.io/os: linux}}
      containers:
        - name: coredns
          image: {COREDNS_IMAGE}
          imagePullPolicy: Never
          args: ["-conf", "/etc/coredns/Corefile"]
          resources:
            limits: {{memory: 170Mi}}
            requests: {{cpu: 100m, memory: 70Mi}}
          volumeMounts:
            - {{name: config-volume, mountPath: /etc/coredns, readOnly: true}}
          ports:
            - {{containerPort: 53, name: dns, protocol: UDP}}
            - {{containerPort: 53, name: dns-tcp, protocol: TCP}}
            - {{containerPort: 9153, name: metrics, protocol: TCP}}
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {{add: [NET_BIND_SERVICE], drop: [ALL]}}
            readOnlyRootFilesystem: true
          livenessProbe:
            httpGet: {{path: /health, port: 8080, scheme: HTTP}}
            initialDelaySeconds: 60
            timeoutSeconds: 5
          readinessProbe:
            httpGet: {{path: /ready, port: 8181, scheme: HTTP}}
      dnsPolicy: Default
      volumes:
        - name: config-volume
          configMap:
            name: coredns
            items: [{{key: Corefile, path: Corefile}}]
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns, kubernetes.io/name: CoreDNS}}
spec:
  selector: {{k8s-app: kube-dns}}
  clusterIP: {dns_ip}
  ports:
    - {{name: dns, port: 53, protocol: UDP}}
    - {{name: dns-tcp, port: 53, protocol: TCP}}
    - {{name: metrics, port: 9153, protocol: TCP}}
"#
    ))
}
