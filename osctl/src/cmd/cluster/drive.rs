//! `osctl cluster create`, once the VMs run: configure every node through
//! maintenance mode, bootstrap etcd on the first, and wait until every
//! node is healthy, etcd has every member and, when the image has
//! Kubernetes, every control plane's API server answers `/readyz` through
//! its forwarded port. It calls the node verbs'
//! own functions (`apply-config --insecure`, `version`, `bootstrap`,
//! `health`, `etcd members`) in this process and reads their typed
//! results.
//!
//! While it waits, states that every node passes through as it starts
//! (nothing serving the port yet, maintenance mode, services starting,
//! etcd waiting to join, Unavailable) are shown as progress, each once per
//! node when it changes; a failure that waiting cannot change (refused
//! authorization, an invalid config) ends the wait at once; at the
//! deadline the last error, with its cause, is what `create` reports.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use machine_api::osconfig::Context as OsContext;
use machine_api::proto::{ApplyConfigurationRequest, ApplyMode};
use machine_api::retry::Backoff;
use rustls::ClientConfig;
use tonic::Code;

use super::create::Progress;
use super::{ClusterState, NodeState};
use crate::client::{self, ConnectError, ConnectFailure, Trust};
use crate::cmd::session::{fingerprint_arg, RpcError};
use crate::cmd::{apply_config, bootstrap, etcd, health, version};

/// Per-call timeout, as the verbs' `--timeout` default.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A state that is normal while nodes start, not an error: the step waits
/// it out.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NotYet(String);

/// What a failed attempt on a node means while the cluster starts.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Every node passes through it while it boots and configures itself:
    /// shown as progress, and waited out.
    Starting(String),
    /// Not a normal state, but it may pass: shown as it is, and retried
    /// until the step's time is up.
    Trouble(String),
    /// Waiting cannot change it: the step fails now.
    Fatal,
}

/// A node's VM is gone (its QEMU exited or was killed): no wait brings it
/// back, so every wait ends at once with its console's last lines.
#[derive(Debug, thiserror::Error)]
#[error("the VM of {node} exited; the last lines of its console ({console}):\n{tail}")]
struct VmExited {
    node: String,
    console: String,
    tail: String,
}

/// The last `n` non-empty lines of a console log.
fn console_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails with [`VmExited`] for the first node whose VM is not running.
fn all_vms_running(nodes: &[NodeState]) -> Result<()> {
    match nodes.iter().find(|n| n.pid().is_none()) {
        None => Ok(()),
        Some(n) => Err(VmExited {
            node: n.name.clone(),
            console: n.console.display().to_string(),
            tail: console_tail(&n.console, 8),
        }
        .into()),
    }
}

fn seen(e: &anyhow::Error) -> Seen {
    if e.downcast_ref::<VmExited>().is_some() {
        return Seen::Fatal;
    }
    if let Some(n) = e.downcast_ref::<NotYet>() {
        return Seen::Starting(n.0.clone());
    }
    if let Some(failure) = ConnectError::failure_of(e) {
        return match failure {
            ConnectFailure::NotServing => {
                Seen::Starting("not serving its API yet (booting, or restarting it)".into())
            }
            ConnectFailure::UnknownIssuer => Seen::Starting(
                "still in maintenance mode (its certificate is not from the cluster's CA yet)"
                    .into(),
            ),
            ConnectFailure::Fingerprint | ConnectFailure::Other => Seen::Trouble(format!("{e:#}")),
        };
    }
    if let Some(status) = e.downcast_ref::<RpcError>().map(|r| &r.0) {
        return match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => Seen::Starting(format!("{e:#}")),
            // A connection machined dropped mid-call: it restarts its API
            // with the new identity after an apply.
            Code::Unknown | Code::Cancelled if status.message().contains("transport error") => {
                Seen::Starting("connection closed (machined is restarting its API)".into())
            }
            Code::FailedPrecondition if status.message().contains("maintenance mode") => {
                Seen::Starting("maintenance mode (no config yet)".into())
            }
            Code::PermissionDenied
            | Code::Unauthenticated
            | Code::InvalidArgument
            | Code::Unimplemented => Seen::Fatal,
            _ => Seen::Trouble(format!("{e:#}")),
        };
    }
    Seen::Trouble(format!("{e:#}"))
}

/// Shows each node's state once, when it changes.
struct Watch<'a> {
    p: &'a Progress,
    last: BTreeMap<String, String>,
}

impl<'a> Watch<'a> {
    fn new(p: &'a Progress) -> Self {
        Watch {
            p,
            last: BTreeMap::new(),
        }
    }

    fn show(&mut self, node: &str, state: String) {
        if self.last.get(node) != Some(&state) {
            self.p.step(format!("  {node}: {state}"));
            self.last.insert(node.to_owned(), state);
        }
    }

    /// Shows what a failed attempt met; false when it is worth no retry.
    fn failed(&mut self, node: &str, e: &anyhow::Error) -> bool {
        match seen(e) {
            Seen::Starting(s) => {
                self.show(node, s);
                true
            }
            Seen::Trouble(s) => {
                self.show(node, format!("{s} (retrying)"));
                true
            }
            Seen::Fatal => false,
        }
    }

    /// A node that was shown waiting and is done now.
    fn done(&mut self, node: &str, state: &str) {
        if self.last.contains_key(node) {
            self.show(node, state.to_owned());
        }
    }
}

/// Runs `attempt` every second until it succeeds, meets a failure that
/// waiting cannot change (a VM of `vms` that exited is one), or `limit`
/// passes; shows what it meets on `node`.
async fn wait_on<T, F, Fut>(
    watch: &mut Watch<'_>,
    vms: &[NodeState],
    node: &str,
    limit: Duration,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    Backoff::constant(Duration::from_secs(1))
        .timeout(limit)
        .retry(
            || {
                let next = all_vms_running(vms).map(|()| attempt());
                async move { next?.await }
            },
            |e, _| watch.failed(node, e),
        )
        .await
}

/// A banner value (`fingerprint:`) from a console log; lines end in CR LF.
fn banner_value(console: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(console).ok()?;
    text.lines()
        .rev()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|v| v.trim().to_owned())
}

/// Configures the cluster's nodes and waits for them, in `limit` at most.
pub fn configure(
    p: &Progress,
    st: &ClusterState,
    token: &str,
    context: &OsContext,
    kube_ca: Option<&str>,
    limit: Duration,
) -> Result<()> {
    let kube_tls = kube_ca.map(readyz_tls).transpose()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(
        Driver {
            p,
            st,
            deadline: Instant::now() + limit,
            mutual: Arc::new(client::tls_config(&Trust::Mutual(Box::new(
                context.clone(),
            )))?),
            kube_tls,
        }
        .run(token),
    )
}

struct Driver<'a> {
    p: &'a Progress,
    st: &'a ClusterState,
    deadline: Instant,
    /// The cluster's admin identity.
    mutual: Arc<ClientConfig>,
    /// Anonymous TLS trusting the cluster's Kubernetes CA, for `/readyz`.
    kube_tls: Option<Arc<ClientConfig>>,
}

impl Driver<'_> {
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    async fn run(&self, token: &str) -> Result<()> {
        let p = self.p;
        let mut watch = Watch::new(p);
        for n in &self.st.nodes {
            let fp = self.maintenance_fingerprint(n).await?;
            p.step(format!(
                "{} is in maintenance mode; applying its config",
                n.name
            ));
            self.apply(&mut watch, n, &fp, token)
                .await
                .with_context(|| format!("applying {} to {}", n.config.display(), n.name))?;
        }

        let first = &self.st.nodes[0];
        let ep = first.endpoint();
        wait_on(
            &mut watch,
            &self.st.nodes,
            &first.name,
            Duration::from_secs(120).min(self.left()),
            || async {
                let v = version::version(self.connect(&ep).await?).await?;
                if v.maintenance {
                    return Err(NotYet("maintenance mode (no config yet)".into()).into());
                }
                Ok(())
            },
        )
        .await
        .context("the first node did not come back with its config")?;

        p.step(format!("bootstrapping etcd on {}", first.name));
        wait_on(
            &mut watch,
            &self.st.nodes,
            &first.name,
            Duration::from_secs(60).min(self.left()),
            || async {
                match bootstrap::bootstrap(self.connect(&ep).await?).await {
                    Ok(_) => Ok(()),
                    // An earlier attempt whose reply was lost.
                    Err(e)
                        if RpcError::code_of(&e) == Some(Code::FailedPrecondition)
                            && e.to_string().contains("already") =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            },
        )
        .await?;

        p.step("waiting for every node to be healthy");
        self.all_healthy(&mut watch).await?;

        let want = self
            .st
            .nodes
            .iter()
            .filter(|n| n.roles.iter().any(|r| r == "etcd"))
            .count();
        wait_on(
            &mut watch,
            &self.st.nodes,
            &first.name,
            Duration::from_secs(60).min(self.left()),
            || async {
                let m = etcd::members(self.connect(&ep).await?).await?;
                let n = m.members.len();
                if n == want {
                    Ok(())
                } else {
                    Err(NotYet(format!("etcd has {n} of {want} members")).into())
                }
            },
        )
        .await?;
        p.step(format!(
            "etcd has {want} member{}",
            if want == 1 { "" } else { "s" }
        ));

        if let Some(tls) = &self.kube_tls {
            for n in &self.st.nodes {
                let Some(port) = n.k8s_port else { continue };
                wait_on(
                    &mut watch,
                    &self.st.nodes,
                    &n.name,
                    Duration::from_secs(300).min(self.left()),
                    || readyz(port, tls.clone()),
                )
                .await
                .with_context(|| format!("the Kubernetes API of {} (127.0.0.1:{port})", n.name))?;
                p.step(format!(
                    "{}: Kubernetes API ready (/readyz ok through 127.0.0.1:{port})",
                    n.name
                ));
            }
        }
        Ok(())
    }

    async fn connect(&self, endpoint: &str) -> Result<tonic::transport::Channel> {
        client::connect(endpoint, self.mutual.clone(), CALL_TIMEOUT).await
    }

    /// The maintenance certificate's fingerprint, once the node's console
    /// shows its banner.
    async fn maintenance_fingerprint(&self, n: &NodeState) -> Result<String> {
        Backoff::constant(Duration::from_secs(1))
            .timeout(self.left())
            .retry(
                || async {
                    all_vms_running(std::slice::from_ref(n))?;
                    let fp = banner_value(&n.console, "fingerprint:").ok_or_else(|| {
                        anyhow!(
                            "{}: no maintenance banner on {} yet",
                            n.name,
                            n.console.display()
                        )
                    })?;
                    fingerprint_arg(&fp)
                },
                |_, _| true,
            )
            .await
    }

    /// `osctl apply-config --insecure --cert-fingerprint FP --token T`.
    async fn apply(
        &self,
        watch: &mut Watch<'_>,
        n: &NodeState,
        fp: &str,
        token: &str,
    ) -> Result<()> {
        let text = apply_config::read_checked(&n.config)?;
        let tls = Arc::new(client::tls_config(&Trust::Insecure {
            fingerprint: Some(fp.to_owned()),
        })?);
        let req = ApplyConfigurationRequest {
            data: text.into_bytes(),
            mode: ApplyMode::Auto as i32,
            dry_run: false,
            maintenance_token: token.to_owned(),
            try_timeout_seconds: 60,
        };
        let ep = n.endpoint();
        wait_on(
            watch,
            &self.st.nodes,
            &n.name,
            Duration::from_secs(60).min(self.left()),
            || async {
                let ch = client::connect(&ep, tls.clone(), CALL_TIMEOUT).await?;
                match apply_config::apply(ch, req.clone()).await {
                    Ok(_) => Ok(()),
                    // The maintenance listener takes one config: an earlier
                    // attempt whose reply was lost got there first (the
                    // next step checks the node runs this cluster's).
                    Err(e) if RpcError::code_of(&e) == Some(Code::FailedPrecondition) => Ok(()),
                    Err(e) => Err(e),
                }
            },
        )
        .await
    }

    /// Health of every node, again every second until all are healthy.
    async fn all_healthy(&self, watch: &mut Watch<'_>) -> Result<()> {
        let nodes = &self.st.nodes;
        let endpoints: Vec<String> = nodes.iter().map(NodeState::endpoint).collect();
        let mut backoff = Backoff::constant(Duration::from_secs(1)).deadline(self.deadline);
        loop {
            all_vms_running(nodes)?;
            let res = client::fan_out(&endpoints, self.mutual.clone(), CALL_TIMEOUT, |_, ch| {
                health::health(ch)
            })
            .await;
            let mut problems = Vec::new();
            let mut fatal = false;
            for (n, (_, r)) in nodes.iter().zip(res) {
                let e = match r {
                    Ok(h) => match health::unhealthy(&h) {
                        None => {
                            watch.done(&n.name, "healthy");
                            continue;
                        }
                        Some(why) => anyhow::Error::new(NotYet(format!("unhealthy: {why}"))),
                    },
                    Err(e) => e,
                };
                fatal |= !watch.failed(&n.name, &e);
                problems.push(format!("node {} ({}): {e:#}", n.name, n.endpoint()));
            }
            if problems.is_empty() {
                return Ok(());
            }
            if fatal || backoff.exhausted() {
                bail!("{}", problems.join("; "));
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

/// TLS for the API server's health endpoints from this host: the cluster's
/// Kubernetes CA, no client certificate (anonymous requests may read
/// `/livez`, `/readyz` and `/healthz`), HTTP/1.1.
fn readyz_tls(ca: &str) -> Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in machine_api::pki::pem::certs_from_pem(ca).context("the Kubernetes CA")? {
        roots.add(c).context("the Kubernetes CA")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// `GET /readyz` on 127.0.0.1:`port`, the certificate checked for
/// 127.0.0.1. Anything but `200` is a state to wait out.
async fn readyz(port: u16, tls: Arc<ClientConfig>) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let not_yet = |what: String| anyhow::Error::new(NotYet(what));
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| not_yet(format!("Kubernetes API: {e}")))?;
        let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut s = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| match e.kind() {
                // QEMU's forward accepts and closes while nothing listens.
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                    not_yet("Kubernetes API not serving yet".into())
                }
                _ => anyhow!("Kubernetes API TLS: {e}"),
            })?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf);
        let status = text.lines().next().unwrap_or_default();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        if status.split_whitespace().nth(1) == Some("200") {
            Ok(())
        } else {
            let last = body.lines().rev().take(3).collect::<Vec<_>>().join("; ");
            Err(not_yet(format!("Kubernetes API /readyz: {status} {last}")))
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, attempt)
        .await
        .map_err(|_| not_yet("Kubernetes API /readyz timed out".into()))?
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_exited_vm_ends_the_wait_with_its_console_tail() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("cp1.console");
        let lines: String = (1..=20).map(|i| format!("line {i}\r\n\r\n")).collect();
        std::fs::write(&console, lines + "Kernel panic - not syncing: VFS\r\n").unwrap();
        let node = NodeState {
            name: "cp1".into(),
            roles: vec!["etcd".into()],
            ip: "10.5.0.10".into(),
            api_port: 1,
            etcd_port: 2,
            k8s_port: None,
            node_port: None,
            memory_mib: 0,
            config: dir.path().join("cp1.yaml"),
            console: console.clone(),
            disk: dir.path().join("cp1.raw"),
            // No pid file: the VM is not running.
            pidfile: dir.path().join("cp1.pid"),
            qemu: Vec::new(),
        };
        let e = all_vms_running(std::slice::from_ref(&node)).unwrap_err();
        assert_eq!(seen(&e), Seen::Fatal);
        let text = format!("{e:#}");
        assert!(text.starts_with("the VM of cp1 exited"), "{text}");
        assert!(
            text.ends_with("  Kernel panic - not syncing: VFS"),
            "{text}"
        );
        assert!(
            text.contains("line 14") && !text.contains("line 13\n"),
            "{text}"
        );
        assert!(all_vms_running(&[]).is_ok());
    }

    use super::*;

    fn status(code: Code, msg: &str) -> anyhow::Error {
        anyhow::Error::new(RpcError(tonic::Status::new(code, msg)))
    }

    #[test]
    fn startup_states_are_progress_and_refusals_are_final() {
        assert!(matches!(
            seen(&status(Code::Unavailable, "etcd: connection refused")),
            Seen::Starting(s) if s == "unavailable: etcd: connection refused"
        ));
        assert!(matches!(
            seen(&status(
                Code::FailedPrecondition,
                "the node is in maintenance mode (no config yet): only version and apply-config are served"
            )),
            Seen::Starting(_)
        ));
        assert!(matches!(
            seen(&anyhow::Error::new(NotYet("unhealthy: etcd waiting (waiting to join: no quorum)".into()))),
            Seen::Starting(s) if s.contains("waiting to join")
        ));
        assert!(matches!(
            seen(&status(Code::Unknown, "transport error").context("calling")),
            Seen::Starting(_)
        ));
        for code in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
        ] {
            assert_eq!(seen(&status(code, "no")), Seen::Fatal, "{code:?}");
        }
        assert!(matches!(
            seen(&status(Code::Internal, "boom")),
            Seen::Trouble(s) if s == "error: boom"
        ));
        assert!(matches!(seen(&anyhow!("something else")), Seen::Trouble(_)));
    }

    /// A port nothing listens on, and one that closes every connection at
    /// once (QEMU's port forward while the guest does not listen): both
    /// are a node not serving yet.
    #[tokio::test]
    async fn a_port_not_served_yet_is_progress() {
        let tls = Arc::new(
            client::tls_config(&Trust::Insecure {
                fingerprint: Some("0".repeat(64)),
            })
            .unwrap(),
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let e = client::connect(&format!("127.0.0.1:{port}"), tls.clone(), CALL_TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(
            ConnectError::failure_of(&e),
            Some(ConnectFailure::NotServing),
            "{e:#}"
        );
        assert!(matches!(seen(&e), Seen::Starting(_)));

        let hangs_up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = hangs_up.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((sock, _)) = hangs_up.accept().await {
                drop(sock);
            }
        });
        let e = client::connect(&addr.to_string(), tls, CALL_TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(
            ConnectError::failure_of(&e),
            Some(ConnectFailure::NotServing),
            "{e:#}"
        );
        // What osctl prints is unchanged.
        assert!(e.to_string().starts_with("cannot connect: "), "{e}");
    }

    #[test]
    fn each_state_is_shown_once_per_node() {
        let p = Progress(Instant::now());
        let mut w = Watch::new(&p);
        w.done("a", "healthy");
        assert!(
            w.last.is_empty(),
            "a node never shown waiting is not shown done"
        );
        assert!(w.failed("a", &status(Code::Unavailable, "x")));
        assert!(w.failed("a", &status(Code::Unavailable, "x")));
        assert!(!w.failed("a", &status(Code::PermissionDenied, "no")));
        assert_eq!(w.last["a"], "unavailable: x");
        w.done("a", "healthy");
        assert_eq!(w.last["a"], "healthy");
    }
}
