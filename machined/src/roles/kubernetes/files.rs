//! The control plane's files, minted on the node from the CAs in its
//! config after kubeadm's table: serving and client certificates, the
//! service-account key pair, kubeconfigs, the encryption, audit and
//! authentication configs. All under one private directory; written
//! atomically, and minted again when the inputs change or a certificate
//! is due for renewal. The components read their files at start, so each
//! minting gets a new generation, carried in the specs' environment: a
//! changed generation changes the specs' hash and restarts them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine;
use machine_api::atomic::write_atomic;
use machine_api::config::MachineConfig;
use machine_api::pki::kube::{self as leaves, ApiServerNames, NodeIdentity};
use machine_api::pki::{CertificateAuthority, LeafSpec, Usage};
use sha2::{Digest, Sha256};

use crate::roles::{RoleContext, RoleError};

pub const ROLE: &str = "controlplane";

/// The control plane's directory and the names in it.
#[derive(Clone, Debug)]
pub struct KubeFiles {
    pub dir: PathBuf,
    /// Every input the files are minted from, hashed.
    pub stamp: String,
    /// When they were last minted (unix nanoseconds): new with every
    /// minting, renewals included, so the services restart with them.
    pub generation: String,
}

impl KubeFiles {
    pub fn dir_of(paths: &crate::paths::Paths) -> PathBuf {
        paths.secrets_dir().join("kubernetes")
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn path(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }
}

fn err(e: impl std::fmt::Display) -> RoleError {
    RoleError::Certificates(ROLE, e.to_string())
}

fn ca(
    cfg_ca: Option<&machine_api::config::CertAndKey>,
    what: &str,
) -> Result<CertificateAuthority, RoleError> {
    let c = cfg_ca.ok_or_else(|| err(format!("the config has no secrets.{what}")))?;
    let key = c
        .key
        .as_ref()
        .ok_or_else(|| err(format!("the config has no secrets.{what} key")))?;
    CertificateAuthority::from_pem(&format!("secrets.{what}"), &c.crt, key).map_err(err)
}

/// `https://HOST:PORT` for a kubeconfig.
pub fn https(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V6(v6) => format!("https://[{v6}]:{port}"),
        IpAddr::V4(v4) => format!("https://{v4}:{port}"),
    }
}

/// A kubeconfig with embedded certificates (kubectl's format).
pub fn kubeconfig(
    cluster: &str,
    server: &str,
    ca_pem: &str,
    user: &str,
    cert_pem: &str,
    key_pem: &str,
) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "server": server,
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(cert_pem),
            "client-key-data": b64(key_pem),
        }}],
        "contexts": [{"name": format!("{user}@{cluster}"), "context": {"cluster": cluster, "user": user}}],
        "current-context": format!("{user}@{cluster}"),
        "preferences": {},
    });
    serde_norway::to_string(&doc).unwrap_or_default()
}

/// Mints whatever is missing, stale or due, and returns the directory.
pub fn ensure(cfg: &MachineConfig, ctx: &RoleContext) -> Result<KubeFiles, RoleError> {
    let dir = KubeFiles::dir_of(&ctx.paths);
    let io = |p: &Path, e| RoleError::Io(p.display().to_string(), e);
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let s = &cfg.secrets;
    let node = NodeIdentity {
        name: ctx.node.name.clone(),
        addresses: vec![ctx.node.ip],
    };
    let names = ApiServerNames::from_config(cfg);
    let serving = |cn: &str| {
        LeafSpec::new(cn, Usage::Server)
            .san(&node.name)
            .san(ctx.node.ip.to_string())
            .san("localhost")
            .san("127.0.0.1")
    };
    let kube_leaves = [
        ("apiserver", leaves::apiserver(&node, &names)),
        (
            "apiserver-kubelet-client",
            leaves::apiserver_kubelet_client(),
        ),
        (
            "controller-manager-server",
            serving("kube-controller-manager"),
        ),
        ("scheduler-server", serving("kube-scheduler")),
        ("admin", leaves::admin()),
        ("super-admin", leaves::super_admin()),
        ("controller-manager", leaves::controller_manager()),
        ("scheduler", leaves::scheduler()),
    ];
    let inputs = format!(
        "{kube_leaves:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
        s.kubernetes_ca.as_ref().map(|c| &c.crt),
        s.etcd_ca.as_ref().map(|c| &c.crt),
        s.front_proxy_ca.as_ref().map(|c| &c.crt),
        s.service_account_key,
        s.secretbox_encryption_secret,
        cfg.cluster.control_plane.endpoint.0,
    );
    let stamp = hex::encode(Sha256::digest(&inputs));
    let files = KubeFiles {
        generation: std::fs::read_to_string(dir.join("generation")).unwrap_or_default(),
        dir,
        stamp,
    };
    let stamp_file = files.file("minted-for");
    let same = std::fs::read_to_string(&stamp_file).unwrap_or_default() == files.stamp
        && files.file("scheduler.conf").exists();
    let due = next_renewal(&files.dir, ctx.renew_before)
        .is_none_or(|t| t <= std::time::SystemTime::now());
    if same && !due && !files.generation.is_empty() {
        return Ok(files);
    }
    let write = |name: &str, text: &str, mode: u32| {
        let p = files.file(name);
        write_atomic(&p, text.as_bytes(), mode).map_err(|e| io(&p, e))
    };
    let kube_ca = ca(s.kubernetes_ca.as_ref(), "kubernetesCA")?;
    let etcd_ca = ca(s.etcd_ca.as_ref(), "etcdCA")?;
    let proxy_ca = ca(s.front_proxy_ca.as_ref(), "frontProxyCA")?;
    write("ca.crt", kube_ca.cert_pem(), 0o644)?;
    write("ca.key", kube_ca.key_pem(), 0o600)?;
    write("etcd-ca.crt", etcd_ca.cert_pem(), 0o644)?;
    write("front-proxy-ca.crt", proxy_ca.cert_pem(), 0o644)?;
    let mut minted = Vec::new();
    for (name, spec) in &kube_leaves {
        let leaf = kube_ca.issue(spec).map_err(err)?;
        write(&format!("{name}.crt"), &leaf.cert_pem, 0o644)?;
        write(&format!("{name}.key"), &leaf.key_pem, 0o600)?;
        minted.push((*name, leaf));
    }
    let leaf = etcd_ca
        .issue(&leaves::apiserver_etcd_client())
        .map_err(err)?;
    write("apiserver-etcd-client.crt", &leaf.cert_pem, 0o644)?;
    write("apiserver-etcd-client.key", &leaf.key_pem, 0o600)?;
    let leaf = proxy_ca.issue(&leaves::front_proxy_client()).map_err(err)?;
    write("front-proxy-client.crt", &leaf.cert_pem, 0o644)?;
    write("front-proxy-client.key", &leaf.key_pem, 0o600)?;

    // Service-account tokens: signed with the cluster's key, checked with
    // its public half.
    let sa = s
        .service_account_key
        .as_ref()
        .ok_or_else(|| err("the config has no secrets.serviceAccountKey"))?;
    let pair =
        rcgen::KeyPair::from_pem(sa).map_err(|e| err(format!("secrets.serviceAccountKey: {e}")))?;
    write("sa.key", sa, 0o600)?;
    write("sa.pub", &pair.public_key_pem(), 0o644)?;

    let cluster = cfg.cluster.name.0.as_str();
    let local = https(ctx.node.ip, super::APISERVER_PORT);
    let endpoint = cfg.cluster.control_plane.endpoint.0.to_string();
    for (name, user, server) in [
        ("admin", "kubernetes-admin", endpoint.trim_end_matches('/')),
        ("super-admin", "kubernetes-super-admin", local.as_str()),
        (
            "controller-manager",
            "system:kube-controller-manager",
            local.as_str(),
        ),
        ("scheduler", "system:kube-scheduler", local.as_str()),
    ] {
        let leaf = minted
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, l)| l)
            .ok_or_else(|| err(format!("{name} was not minted")))?;
        write(
            &format!("{name}.conf"),
            &kubeconfig(
                cluster,
                server,
                kube_ca.cert_pem(),
                user,
                &leaf.cert_pem,
                &leaf.key_pem,
            ),
            0o600,
        )?;
    }
    write(
        "encryption.yaml",
        &encryption_config(
            s.secretbox_encryption_secret
                .as_deref()
                .ok_or_else(|| err("the config has no secrets.secretboxEncryptionSecret"))?,
        ),
        0o600,
    )?;
    write("audit-policy.yaml", AUDIT_POLICY, 0o644)?;
    write("authentication.yaml", AUTHENTICATION, 0o644)?;
    // The generation before the stamp that says the set is complete: a
    // crash in between mints again at the next start.
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().to_string())
        .unwrap_or_default();
    write("generation", &generation, 0o600)?;
    write("minted-for", &files.stamp, 0o600)?;
    if same {
        tracing::info!("control-plane certificates renewed");
    }
    Ok(KubeFiles {
        generation,
        ..files
    })
}

/// The earliest renewal time of the leaf certificates minted in `dir`
/// (none while one is missing).
pub fn next_renewal(dir: &Path, before: std::time::Duration) -> Option<std::time::SystemTime> {
    let mut earliest: Option<std::time::SystemTime> = None;
    for name in [
        "apiserver",
        "apiserver-etcd-client",
        "front-proxy-client",
        "admin",
        "scheduler",
        "controller-manager",
    ] {
        let pem = std::fs::read_to_string(dir.join(format!("{name}.crt"))).ok()?;
        let t = machine_api::pki::renewal_time(&pem, before)?;
        earliest = Some(earliest.map_or(t, |e| e.min(t)));
    }
    earliest
}

/// Secrets encrypted at rest with secretbox (XSalsa20-Poly1305) and the
/// cluster's key; `identity` last, so secrets written before encryption
/// was on stay readable.
pub fn encryption_config(secret_b64: &str) -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - secretbox:
          keys:
            - name: cluster-key
              secret: {secret_b64}
      - identity: {{}}
"
    )
}

/// What the audit log keeps: metadata of every request, the request of
/// changes (not of secrets, whose bodies would leak), nothing of the
/// noisiest read-only health and watch traffic.
pub const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    nonResourceURLs: [/healthz*, /livez*, /readyz*, /version]
  - level: None
    users: [system:kube-proxy]
    verbs: [watch]
  - level: Metadata
    resources:
      - group: \"\"
        resources: [secrets, configmaps]
      - group: authentication.k8s.io
        resources: [tokenreviews]
  - level: Request
    verbs: [create, update, patch, delete, deletecollection]
  - level: Metadata
";

/// Anonymous requests are refused except on the health endpoints (for
/// load balancers and probes); everything else needs a certificate or a
/// token.
pub const AUTHENTICATION: &str = "apiVersion: apiserver.config.k8s.io/v1
kind: AuthenticationConfiguration
anonymous:
  enabled: true
  conditions:
    - path: /livez
    - path: /readyz
    - path: /healthz
";

/// A fresh admin kubeconfig (`kubernetes-admin` in `kubeadm:cluster-admins`)
/// for the operator, pointing at the cluster's endpoint.
pub fn admin_kubeconfig(cfg: &MachineConfig) -> Result<String, String> {
    use machine_api::config::Role;
    if !cfg.has_role(Role::Controlplane) {
        return Err("this node has no controlplane role: ask a control-plane node".into());
    }
    let ca = ca(cfg.secrets.kubernetes_ca.as_ref(), "kubernetesCA").map_err(|e| e.to_string())?;
    let leaf = ca.issue(&leaves::admin()).map_err(|e| e.to_string())?;
    let cluster = cfg.cluster.name.0.as_str();
    let endpoint = cfg.cluster.control_plane.endpoint.0.to_string();
    Ok(kubeconfig(
        cluster,
        endpoint.trim_end_matches('/'),
        ca.cert_pem(),
        "kubernetes-admin",
        &leaf.cert_pem,
        &leaf.key_pem,
    ))
}
