//! The etcd role: certificates minted on the node from the etcd CA, the
//! etcd config file, and the decision how this member starts (existing data,
//! a new cluster after `osctl bootstrap`, or joining through MemberAdd).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use machine_api::atomic::write_atomic;
use machine_api::config::MachineConfig;
use machine_api::pki::kube as leaves;
use machine_api::pki::CertificateAuthority;
use machine_api::retry::Backoff;
use sha2::{Digest, Sha256};

use super::etcd_client::EtcdClient;
use super::{RoleContext, RoleError};
use crate::paths::Paths;
use crate::supervisor::{HealthCheck, PreStart, Progress, ServiceSpec};

pub const SERVICE: &str = "etcd";

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

pub fn client_url(ip: IpAddr) -> String {
    format!("https://{}:2379", host(ip))
}

pub fn peer_url(ip: IpAddr) -> String {
    format!("https://{}:2380", host(ip))
}

/// Where the etcd certificates and config file live.
#[derive(Clone, Debug)]
pub struct EtcdFiles {
    pub dir: PathBuf,
}

impl EtcdFiles {
    pub fn new(paths: &Paths) -> Self {
        EtcdFiles {
            dir: paths.secrets_dir().join("etcd"),
        }
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn read(&self, name: &str) -> Result<String, RoleError> {
        let p = self.file(name);
        std::fs::read_to_string(&p).map_err(|e| RoleError::Io(p.display().to_string(), e))
    }
    /// A client of the local member, authenticated with the node's
    /// healthcheck-client certificate.
    pub fn local_client(&self, endpoints: Vec<String>) -> Result<EtcdClient, RoleError> {
        EtcdClient::new(
            endpoints,
            &self.read("ca.crt")?,
            &self.read("client.crt")?,
            &self.read("client.key")?,
        )
        .map_err(|e| RoleError::Certificates(SERVICE, e.to_string()))
    }
}

/// True once this member has data: it then restarts from it, whatever the
/// config says about bootstrapping or joining.
pub fn member_initialized(paths: &Paths) -> bool {
    // etcd's own test (wal.Exist): a WAL file, not just the directory. A
    // first start that failed (a join racing another) can leave
    // `member/` without a WAL; taking that for data would start etcd
    // without initial-cluster, and it would found a cluster of its own.
    std::fs::read_dir(paths.etcd_data().join("member/wal"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".wal"))
        })
        .unwrap_or(false)
}

/// Removes what a failed first start left (a `member/` without a WAL), so
/// the next attempt starts clean.
fn clear_partial_member(paths: &Paths) {
    let member = paths.etcd_data().join("member");
    if member.exists() && !member_initialized(paths) {
        tracing::warn!("removing {} left by a failed first start", member.display());
        let _ = std::fs::remove_dir_all(&member);
    }
}

/// Written by `osctl bootstrap`: this node creates a new cluster.
pub fn bootstrap_marker(paths: &Paths) -> PathBuf {
    paths.state_dir().join("etcd.bootstrap")
}

/// Mints the server, peer and client certificates when missing, when the
/// node's names changed, or when one is due for renewal. Re-minting keeps
/// the same CA, so peers still trust the member, and the files keep their
/// names: etcd reads them at every TLS handshake, so a running etcd takes
/// renewed certificates without a restart.
pub fn ensure_certificates(cfg: &MachineConfig, ctx: &RoleContext) -> Result<EtcdFiles, RoleError> {
    let files = EtcdFiles::new(&ctx.paths);
    let io = |p: &PathBuf, e| RoleError::Io(p.display().to_string(), e);
    std::fs::create_dir_all(&files.dir).map_err(|e| io(&files.dir, e))?;
    let ca_pem = cfg.secrets.etcd_ca.as_ref().ok_or(RoleError::Certificates(
        SERVICE,
        "the config has no etcdCA".into(),
    ))?;
    let key = ca_pem.key.as_ref().ok_or(RoleError::Certificates(
        SERVICE,
        "the config has no etcdCA key".into(),
    ))?;
    let node = leaves::NodeIdentity {
        name: ctx.node.name.clone(),
        addresses: vec![ctx.node.ip],
    };
    let specs = [
        ("server", leaves::etcd_server(&node)),
        ("peer", leaves::etcd_peer(&node)),
        ("client", leaves::etcd_healthcheck_client()),
    ];
    let stamp = hex::encode(Sha256::digest(format!("{:?}{}", specs, ca_pem.crt)));
    let stamp_file = files.file("minted-for");
    let current = std::fs::read_to_string(&stamp_file).unwrap_or_default();
    let same = current == stamp && files.file("client.key").exists();
    let due =
        next_renewal(&files, ctx.renew_before).is_none_or(|t| t <= std::time::SystemTime::now());
    if same && !due {
        return Ok(files);
    }
    let ca = CertificateAuthority::from_pem("secrets.etcdCA", &ca_pem.crt, key)
        .map_err(|e| RoleError::Certificates(SERVICE, e.to_string()))?;
    let write = |name: &str, text: &str, mode: u32| {
        let p = files.file(name);
        write_atomic(&p, text.as_bytes(), mode).map_err(|e| io(&p, e))
    };
    write("ca.crt", &ca_pem.crt, 0o644)?;
    for (name, spec) in &specs {
        let leaf = ca
            .issue(spec)
            .map_err(|e| RoleError::Certificates(SERVICE, e.to_string()))?;
        write(&format!("{name}.crt"), &leaf.cert_pem, 0o644)?;
        write(&format!("{name}.key"), &leaf.key_pem, 0o600)?;
    }
    write("minted-for", &stamp, 0o600)?;
    if same {
        tracing::info!("etcd certificates renewed (etcd keeps running)");
    }
    Ok(files)
}

/// The earliest renewal time of the minted etcd certificates; None when one
/// is missing or unreadable.
pub fn next_renewal(files: &EtcdFiles, before: Duration) -> Option<std::time::SystemTime> {
    ["server.crt", "peer.crt", "client.crt"]
        .iter()
        .map(|n| {
            let pem = std::fs::read_to_string(files.file(n)).ok()?;
            machine_api::pki::renewal_time(&pem, before)
        })
        .try_fold(None, |acc: Option<std::time::SystemTime>, t| {
            let t = t?;
            Some(Some(acc.map_or(t, |a| a.min(t))))
        })
        .flatten()
}

/// etcd flags that go in its config file. Extra args may override them.
fn base_config(
    cfg: &MachineConfig,
    ctx: &RoleContext,
    files: &EtcdFiles,
) -> BTreeMap<String, serde_json::Value> {
    use serde_json::json;
    let ip = ctx.node.ip;
    let tls = |cert: &str, key: &str| {
        json!({
            "cert-file": files.file(cert),
            "key-file": files.file(key),
            "client-cert-auth": true,
            "trusted-ca-file": files.file("ca.crt"),
        })
    };
    let mut listen_client = vec![client_url(ip)];
    if !ctx.host_mode {
        // A node serves clients on every address it has (the API server on
        // loopback, operators on any interface); client certificates from
        // the etcd CA are required on all of them.
        listen_client = vec!["https://0.0.0.0:2379".into()];
    } else if !ip.is_loopback() {
        // Local clients (kube-apiserver, etcdctl on the node) use loopback.
        listen_client.push("https://127.0.0.1:2379".into());
    }
    let mut m = BTreeMap::from([
        ("name".to_owned(), json!(ctx.node.name)),
        ("data-dir".to_owned(), json!(ctx.paths.etcd_data())),
        (
            "listen-client-urls".to_owned(),
            json!(listen_client.join(",")),
        ),
        ("advertise-client-urls".to_owned(), json!(client_url(ip))),
        ("listen-peer-urls".to_owned(), json!(peer_url(ip))),
        (
            "initial-advertise-peer-urls".to_owned(),
            json!(peer_url(ip)),
        ),
        (
            "initial-cluster-token".to_owned(),
            json!(cfg.cluster.name.0),
        ),
        (
            "client-transport-security".to_owned(),
            tls("server.crt", "server.key"),
        ),
        (
            "peer-transport-security".to_owned(),
            tls("peer.crt", "peer.key"),
        ),
        ("enable-v2".to_owned(), json!(false)),
        // Read from a config file, etcd 3.4 leaves the gRPC gateway off
        // unless asked; machined's membership calls go through it.
        ("enable-grpc-gateway".to_owned(), json!(true)),
        ("logger".to_owned(), json!("zap")),
        ("log-outputs".to_owned(), json!(["stderr"])),
    ]);
    for (k, v) in &cfg.cluster.etcd.extra_args {
        // etcd's config file is typed; flags arrive as text.
        let value = if let Ok(n) = v.parse::<i64>() {
            json!(n)
        } else if let Ok(b) = v.parse::<bool>() {
            json!(b)
        } else {
            json!(v)
        };
        m.insert(k.clone(), value);
    }
    m
}

/// How the member starts the first time.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FirstStart {
    Existing,
    NewCluster,
    Join(Vec<String>),
}

/// Writes etcd's config file before every start; for a joining member it
/// first registers the member through MemberAdd (idempotently).
struct EtcdPreStart {
    config: BTreeMap<String, serde_json::Value>,
    files: EtcdFiles,
    paths: Paths,
    name: String,
    peer_url: String,
    join_endpoints: Vec<String>,
}

impl EtcdPreStart {
    fn first_start(&self) -> FirstStart {
        if member_initialized(&self.paths) {
            FirstStart::Existing
        } else if bootstrap_marker(&self.paths).exists() {
            FirstStart::NewCluster
        } else {
            FirstStart::Join(self.join_endpoints.clone())
        }
    }

    /// Adds this member (when needed) and returns etcd's initial-cluster.
    /// `Err((true, why))` is a wait, not a failure: no member answers yet
    /// (the first one is still starting), or etcd refuses a second member
    /// while an added one has not started ("not enough started members",
    /// "unhealthy cluster").
    async fn join(&self, endpoints: Vec<String>) -> Result<String, (bool, String)> {
        let client = self
            .files
            .local_client(endpoints)
            .map_err(|e| (false, e.to_string()))?;
        let not_yet = |e: &str| {
            e.contains("error sending request")
                || e.contains("not enough started members")
                || e.contains("unhealthy cluster")
                || e.contains("HTTP 503")
        };
        let members = client.members().await.map_err(|e| {
            let e = format!("cannot list members to join: {e}");
            (not_yet(&e), e)
        })?;
        let mine = members
            .iter()
            .find(|m| m.peer_urls.contains(&self.peer_url));
        let members = match mine {
            Some(m) if !m.name.is_empty() && m.name != self.name => {
                return Err((
                    false,
                    format!(
                        "peer URL {} already belongs to member {:?}; remove it first",
                        self.peer_url, m.name
                    ),
                ))
            }
            // This node was a member before and lost its data (reset, new
            // disk): the old member must go, or etcd would crash-loop on
            // raft state it no longer has.
            Some(m) if m.name == self.name => {
                let locked = client.join_lock(&self.peer_url, 10).await.map_err(|e| {
                    let e = format!("cannot take the join lock: {e}");
                    (not_yet(&e), e)
                })?;
                if !locked {
                    return Err((true, "another member is joining; waiting for it".into()));
                }
                client.remove_member(m.id).await.map_err(|e| {
                    let e = format!("removing this node's stale member failed: {e}");
                    (not_yet(&e), e)
                })?;
                let (_, all) = client
                    .add_member(std::slice::from_ref(&self.peer_url))
                    .await
                    .map_err(|e| {
                        let e = format!("member add failed: {e}");
                        (not_yet(&e), e)
                    })?;
                all
            }
            // Added by an earlier attempt that never started.
            Some(_) => members,
            None => {
                // One joiner at a time (see `join_lock`): the lock outlives
                // the add by a few seconds, then etcd's own check ("not
                // enough started members") holds the next joiner until this
                // one has started.
                let locked = client.join_lock(&self.peer_url, 10).await.map_err(|e| {
                    let e = format!("cannot take the join lock: {e}");
                    (not_yet(&e), e)
                })?;
                if !locked {
                    return Err((true, "another member is joining; waiting for it".into()));
                }
                let (_, all) = client
                    .add_member(std::slice::from_ref(&self.peer_url))
                    .await
                    .map_err(|e| {
                        let e = format!("member add failed: {e}");
                        (not_yet(&e), e)
                    })?;
                all
            }
        };
        let mut parts = Vec::new();
        for m in &members {
            let name = if m.peer_urls.contains(&self.peer_url) {
                self.name.clone()
            } else if m.name.is_empty() {
                // Another member added but not started yet: it has no name,
                // but etcd checks initial-cluster against every member's
                // peer URLs, so it must be listed (with an empty name, as
                // `etcdctl member add` prints it). Leaving it out made both
                // of two joiners that were added before either started fail
                // "error validating peerURLs" forever, without quorum.
                String::new()
            } else {
                m.name.clone()
            };
            for u in &m.peer_urls {
                parts.push(format!("{name}={u}"));
            }
        }
        Ok(parts.join(","))
    }
}

#[async_trait]
impl PreStart for EtcdPreStart {
    async fn run(&self, progress: &Progress) -> Result<(), String> {
        use serde_json::json;
        let mut config = self.config.clone();
        let first = self.first_start();
        if !matches!(first, FirstStart::Existing) {
            clear_partial_member(&self.paths);
        }
        match first {
            // etcd ignores initial-* settings when it has data; should the
            // data be gone after all, `existing` makes it fail instead of
            // founding a cluster of its own.
            FirstStart::Existing => {
                config.insert("initial-cluster-state".into(), json!("existing"));
            }
            FirstStart::NewCluster => {
                config.insert(
                    "initial-cluster".into(),
                    json!(format!("{}={}", self.name, self.peer_url)),
                );
                config.insert("initial-cluster-state".into(), json!("new"));
            }
            FirstStart::Join(endpoints) if endpoints.is_empty() => {
                return Err("no data, no bootstrap and no cluster.etcd.endpoints to join: run `osctl bootstrap` on the first etcd node".into())
            }
            FirstStart::Join(endpoints) => {
                // Waiting for the cluster is not a failure: retry each
                // second, saying why, for up to JOIN_WAIT; only then fail
                // (and let the supervisor back off).
                let initial = Backoff::constant(Duration::from_secs(1))
                    .timeout(JOIN_WAIT)
                    .retry(
                        || self.join(endpoints.clone()),
                        |(waiting, why), _| {
                            if *waiting {
                                progress(format!("waiting to join: {why}"));
                            }
                            *waiting
                        },
                    )
                    .await
                    .map_err(|(_, why)| why)?;
                config.insert("initial-cluster".into(), json!(initial));
                config.insert("initial-cluster-state".into(), json!("existing"));
            }
        }
        let text = serde_norway::to_string(&config).map_err(|e| e.to_string())?;
        let p = self.files.file("etcd.conf.yaml");
        write_atomic(&p, text.as_bytes(), 0o600).map_err(|e| format!("{}: {e}", p.display()))
    }
}

/// How long a joining member waits for the cluster to take it before its
/// start counts as failed.
const JOIN_WAIT: Duration = Duration::from_secs(120);

/// Health from etcd's own `/health` over mutual TLS.
struct EtcdHealth {
    files: EtcdFiles,
    url: String,
}

#[async_trait]
impl HealthCheck for EtcdHealth {
    /// etcd's `/health` is a linearizable read through raft: on a loaded
    /// node it takes seconds (kubeadm gives etcd's probe 15 s).
    fn timeout(&self) -> Duration {
        crate::roles::etcd_client::HEALTH_TIMEOUT
    }

    async fn check(&self) -> Result<(), String> {
        let client = self
            .files
            .local_client(vec![self.url.clone()])
            .map_err(|e| e.to_string())?;
        client.health().await.map_err(|e| e.to_string())
    }
}

/// Whether etcd should run now: it has data, was bootstrapped here, or has
/// members to join.
pub fn can_start(cfg: &MachineConfig, paths: &Paths) -> bool {
    member_initialized(paths)
        || bootstrap_marker(paths).exists()
        || !cfg.cluster.etcd.endpoints.is_empty()
}

/// The etcd service, or None while it waits for `osctl bootstrap`.
pub fn service(cfg: &MachineConfig, ctx: &RoleContext) -> Result<Option<ServiceSpec>, RoleError> {
    let bin = ctx.binary(SERVICE, "etcd")?;
    let files = ensure_certificates(cfg, ctx)?;
    if !can_start(cfg, &ctx.paths) {
        return Ok(None);
    }
    let config = base_config(cfg, ctx, &files);
    // The config file is written by the pre-start step, so argv stays the
    // same; this hash makes a changed config restart etcd.
    let spec_hash = hex::encode(Sha256::digest(
        serde_json::to_string(&config).unwrap_or_default(),
    ));
    let pre = EtcdPreStart {
        config,
        files: files.clone(),
        paths: ctx.paths.clone(),
        name: ctx.node.name.clone(),
        peer_url: peer_url(ctx.node.ip),
        join_endpoints: cfg
            .cluster
            .etcd
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect(),
    };
    Ok(Some(ServiceSpec {
        name: SERVICE.into(),
        argv: vec![
            bin.display().to_string(),
            "--config-file".into(),
            files.file("etcd.conf.yaml").display().to_string(),
        ],
        env: vec![
            ("PATH".into(), ctx.service_path()),
            ("MACHINED_ETCD_CONFIG".into(), spec_hash),
        ],
        cwd: Some(ctx.paths.etcd_data()),
        depends_on: vec![],
        health: Arc::new(EtcdHealth {
            files,
            url: client_url(ctx.node.ip),
        }),
        stop_timeout: Duration::from_secs(15),
        pre_start: Some(Arc::new(pre)),
        // etcd is latency-critical (raft heartbeats, leader leases): it
        // wins the CPU over bulk work such as image pulls in containerd.
        cpu_weight: Some(ETCD_CPU_WEIGHT),
        nofile: Some(ETCD_NOFILE),
    }))
}

/// etcd's CPU share against the default of 100.
pub const ETCD_CPU_WEIGHT: u32 = 500;

/// etcd's open-files limit: Debian's etcd-server unit (the binary the
/// image ships) sets `LimitNOFILE=65536`; etcd's own
/// `contrib/systemd/etcd.service` sets 40000. An fd per client connection
/// and peer, plus its WAL and snapshot files: far below either.
pub const ETCD_NOFILE: u64 = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_dir_without_wal_is_not_data_and_is_cleared() {
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path());
        let wal = paths.etcd_data().join("member/wal");
        std::fs::create_dir_all(&wal).unwrap();
        assert!(!member_initialized(&paths));
        clear_partial_member(&paths);
        assert!(!paths.etcd_data().join("member").exists());
        std::fs::create_dir_all(&wal).unwrap();
        std::fs::write(wal.join("0000000000000000-0000000000000000.wal"), b"x").unwrap();
        assert!(member_initialized(&paths));
        clear_partial_member(&paths);
        assert!(wal.exists(), "real data must never be removed");
    }
}
