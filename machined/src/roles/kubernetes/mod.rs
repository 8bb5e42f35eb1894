//! The `controlplane` role: kube-apiserver, kube-controller-manager and
//! kube-scheduler as supervised services, configured as kubeadm configures
//! a production cluster (Node,RBAC authorization, anonymous access only to
//! health endpoints, secrets encrypted at rest, an audit log, the
//! aggregation layer's front-proxy certificates, service-account issuer
//! and keys), gated etcd → apiserver → controller-manager and scheduler.
//! The cluster's bootstrap objects are applied before the
//! controller-manager starts (see [`bootstrap`]).

pub mod bootstrap;
pub mod files;
mod health;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use machine_api::config::{MachineConfig, Role};

use super::{etcd, RoleContext, RoleError};
use crate::supervisor::ServiceSpec;
use files::KubeFiles;

pub const APISERVER: &str = "kube-apiserver";
pub const CONTROLLER_MANAGER: &str = "kube-controller-manager";
pub const SCHEDULER: &str = "kube-scheduler";
pub const APISERVER_PORT: u16 = 6443;
pub const CONTROLLER_MANAGER_PORT: u16 = 10257;
pub const SCHEDULER_PORT: u16 = 10259;

/// The binaries the role runs, for a clear error on an image without them.
pub const BINARIES: &[&str] = &[APISERVER, CONTROLLER_MANAGER, SCHEDULER, "kubectl"];

/// Every binary of `names`, or one error naming all that are missing.
pub(super) fn require_binaries(
    ctx: &RoleContext,
    role: &'static str,
    names: &[&'static str],
) -> Result<Vec<std::path::PathBuf>, RoleError> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for b in names {
        match ctx.binary(role, b) {
            Ok(p) => found.push(p),
            Err(_) => missing.push(*b),
        }
    }
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(RoleError::MissingBinaries {
            role,
            binaries: missing.join(", "),
            where_: match &ctx.bin_dir {
                Some(d) => d.display().to_string(),
                None => "PATH".into(),
            },
        })
    }
}

/// CIDRs as a flag value (`a,b`).
pub(super) fn join_cidrs(cidrs: &[machine_api::config::Cidr]) -> String {
    cidrs
        .iter()
        .map(|c| c.0.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Flags with the config's `extraArgs` merged over ours (theirs win), as
/// `--key=value`, sorted so the spec hash is stable.
pub(super) fn flags(
    ours: Vec<(&str, String)>,
    extra: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let mut m: std::collections::BTreeMap<String, String> =
        ours.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    for (k, v) in extra {
        m.insert(k.clone(), v.clone());
    }
    m.into_iter().map(|(k, v)| format!("--{k}={v}")).collect()
}

fn spec(
    name: &str,
    bin: &std::path::Path,
    args: Vec<String>,
    ctx: &RoleContext,
    files: &KubeFiles,
    depends_on: Vec<String>,
    health: Arc<dyn crate::supervisor::HealthCheck>,
) -> ServiceSpec {
    let mut argv = vec![bin.display().to_string()];
    argv.extend(args);
    ServiceSpec {
        name: name.into(),
        argv,
        env: vec![
            ("PATH".into(), ctx.service_path()),
            // Minted files are read at start: new ones (other inputs, or a
            // renewal) restart the service.
            (
                "MACHINED_KUBE_FILES".into(),
                format!("{}.{}", files.stamp, files.generation),
            ),
        ],
        cwd: Some(files.dir.clone()),
        depends_on,
        health,
        stop_timeout: Duration::from_secs(15),
        pre_start: None,
        cpu_weight: None,
        nofile: Some(65_536),
    }
}

/// The control-plane services, or none while this node's etcd member
/// waits for bootstrap (the apiserver would only fail against it).
pub fn services(cfg: &MachineConfig, ctx: &RoleContext) -> Result<Vec<ServiceSpec>, RoleError> {
    let bins = require_binaries(ctx, files::ROLE, BINARIES)?;
    let local_etcd = cfg.has_role(Role::Etcd);
    if local_etcd && !etcd::can_start(cfg, &ctx.paths) {
        return Ok(Vec::new());
    }
    let files = files::ensure(cfg, ctx)?;
    let ip = ctx.node.ip;
    let bind = if ctx.host_mode {
        ip.to_string()
    } else {
        "0.0.0.0".into()
    };
    let mut etcd_servers: Vec<String> = Vec::new();
    if local_etcd {
        etcd_servers.push(etcd::client_url(ip));
    }
    for e in &cfg.cluster.etcd.endpoints {
        let u = e.to_string().trim_end_matches('/').to_owned();
        if !etcd_servers.contains(&u) {
            etcd_servers.push(u);
        }
    }
    let net = &cfg.cluster.network;
    let service_cidrs = join_cidrs(&net.service_cidrs);
    let pod_cidrs = join_cidrs(&net.pod_cidrs);
    let f = |n: &str| files.path(n);
    let audit_dir = ctx.paths.log_dir().join("kubernetes");
    std::fs::create_dir_all(&audit_dir)
        .map_err(|e| RoleError::Io(audit_dir.display().to_string(), e))?;
    let apiserver_args = flags(
        vec![
            ("advertise-address", ip.to_string()),
            ("bind-address", bind.clone()),
            ("secure-port", APISERVER_PORT.to_string()),
            ("etcd-servers", etcd_servers.join(",")),
            ("etcd-cafile", f("etcd-ca.crt")),
            ("etcd-certfile", f("apiserver-etcd-client.crt")),
            ("etcd-keyfile", f("apiserver-etcd-client.key")),
            ("client-ca-file", f("ca.crt")),
            ("tls-cert-file", f("apiserver.crt")),
            ("tls-private-key-file", f("apiserver.key")),
            ("tls-min-version", "VersionTLS12".into()),
            (
                "kubelet-client-certificate",
                f("apiserver-kubelet-client.crt"),
            ),
            ("kubelet-client-key", f("apiserver-kubelet-client.key")),
            // kubelets serve certificates the cluster CA signed (see
            // `worker`), so the apiserver checks whom it talks to.
            ("kubelet-certificate-authority", f("ca.crt")),
            (
                "kubelet-preferred-address-types",
                "InternalIP,ExternalIP,Hostname".into(),
            ),
            ("authorization-mode", "Node,RBAC".into()),
            ("authentication-config", f("authentication.yaml")),
            ("enable-admission-plugins", "NodeRestriction".into()),
            ("enable-bootstrap-token-auth", "true".into()),
            ("allow-privileged", "true".into()),
            ("profiling", "false".into()),
            (
                "service-account-issuer",
                format!("https://kubernetes.default.svc.{}", net.dns_domain.0),
            ),
            ("service-account-key-file", f("sa.pub")),
            ("service-account-signing-key-file", f("sa.key")),
            ("service-cluster-ip-range", service_cidrs.clone()),
            ("proxy-client-cert-file", f("front-proxy-client.crt")),
            ("proxy-client-key-file", f("front-proxy-client.key")),
            ("requestheader-client-ca-file", f("front-proxy-ca.crt")),
            ("requestheader-allowed-names", "front-proxy-client".into()),
            (
                "requestheader-extra-headers-prefix",
                "X-Remote-Extra-".into(),
            ),
            ("requestheader-group-headers", "X-Remote-Group".into()),
            ("requestheader-username-headers", "X-Remote-User".into()),
            ("encryption-provider-config", f("encryption.yaml")),
            ("audit-policy-file", f("audit-policy.yaml")),
            (
                "audit-log-path",
                audit_dir.join("audit.log").display().to_string(),
            ),
            ("audit-log-maxage", "30".into()),
            ("audit-log-maxbackup", "5".into()),
            ("audit-log-maxsize", "100".into()),
        ],
        &cfg.cluster.api_server.extra_args,
    );
    let common = |port: u16, name: &str, kubeconfig: &str| {
        vec![
            ("kubeconfig", f(kubeconfig)),
            ("authentication-kubeconfig", f(kubeconfig)),
            ("authorization-kubeconfig", f(kubeconfig)),
            ("bind-address", bind.clone()),
            ("secure-port", port.to_string()),
            ("tls-cert-file", f(&format!("{name}-server.crt"))),
            ("tls-private-key-file", f(&format!("{name}-server.key"))),
            ("tls-min-version", "VersionTLS12".into()),
            ("client-ca-file", f("ca.crt")),
            ("requestheader-client-ca-file", f("front-proxy-ca.crt")),
            ("leader-elect", "true".into()),
            ("profiling", "false".into()),
        ]
    };
    let mut kcm = common(
        CONTROLLER_MANAGER_PORT,
        "controller-manager",
        "controller-manager.conf",
    );
    kcm.extend([
        ("cluster-name", cfg.cluster.name.0.clone()),
        ("cluster-signing-cert-file", f("ca.crt")),
        ("cluster-signing-key-file", f("ca.key")),
        ("root-ca-file", f("ca.crt")),
        ("service-account-private-key-file", f("sa.key")),
        ("use-service-account-credentials", "true".into()),
        ("controllers", "*,bootstrapsigner,tokencleaner".into()),
        ("allocate-node-cidrs", "true".into()),
        ("cluster-cidr", pod_cidrs),
        ("service-cluster-ip-range", service_cidrs),
    ]);
    if let Some(mask) = net.node_pod_cidr.mask_size {
        kcm.push(("node-cidr-mask-size", mask.to_string()));
    }
    let kcm_args = flags(kcm, &cfg.cluster.controller_manager.extra_args);
    let sched_args = flags(
        common(SCHEDULER_PORT, "scheduler", "scheduler.conf"),
        &cfg.cluster.scheduler.extra_args,
    );
    let kube_ca = std::fs::read_to_string(files.file("ca.crt"))
        .map_err(|e| RoleError::Io(files.path("ca.crt"), e))?;
    let probe = |port: u16, path: &str| -> Result<Arc<health::HttpsHealth>, RoleError> {
        health::HttpsHealth::new(&kube_ca, files::https(ip, port) + path)
            .map(Arc::new)
            .map_err(|e| RoleError::Certificates(files::ROLE, e))
    };
    let apiserver_deps = if local_etcd {
        vec![etcd::SERVICE.to_owned()]
    } else {
        vec![]
    };
    let mut apiserver = spec(
        APISERVER,
        &bins[0],
        apiserver_args,
        ctx,
        &files,
        apiserver_deps,
        probe(APISERVER_PORT, "/readyz")?,
    );
    apiserver.stop_timeout = Duration::from_secs(30);
    let mut kcm = spec(
        CONTROLLER_MANAGER,
        &bins[1],
        kcm_args,
        ctx,
        &files,
        vec![APISERVER.into()],
        probe(CONTROLLER_MANAGER_PORT, "/healthz")?,
    );
    // The cluster's bootstrap objects, before the controllers act on them.
    kcm.pre_start = Some(Arc::new(bootstrap::Apply::new(
        cfg,
        &files,
        &bins[3],
        ctx.paths.root.join("run/machined/bootstrap-objects.sha256"),
    )?));
    let sched = spec(
        SCHEDULER,
        &bins[2],
        sched_args,
        ctx,
        &files,
        vec![APISERVER.into()],
        probe(SCHEDULER_PORT, "/healthz")?,
    );
    Ok(vec![apiserver, kcm, sched])
}
