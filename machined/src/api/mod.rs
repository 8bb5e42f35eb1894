//! The OS API server: mutual TLS on port 50000 when configured, a pinned
//! self-signed certificate and two RPCs in maintenance mode.

pub mod authz;
pub mod etcd_api;
pub mod listener;
pub mod machine_api;
pub mod metrics;
pub mod metrics_layer;
pub mod service_api;
pub mod tls;
pub mod trust;

use std::sync::Arc;
use std::time::Duration;

use ::machine_api::proto::etcd_service_server::EtcdServiceServer;
use ::machine_api::proto::machine_service_server::MachineServiceServer;
use ::machine_api::proto::service_service_server::ServiceServiceServer;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::node::{Control, Node};
use tls::ServerIdentity;

/// A listening socket with SO_REUSEADDR: a reload binds again at once,
/// while the connection whose reply triggered it may still be open.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Prints what an operator at the console needs to reach this node.
fn banner(node: &Node, id: &tls::ServerIdentity, maintenance: bool, name: &str) {
    let mut lines = vec![
        format!("node:        {name}"),
        format!(
            "addresses:   {}",
            match node.addresses() {
                a if a.is_empty() => node.node_ip().to_string(),
                a => a.join(", "),
            }
        ),
        format!(
            "OS API:      {} ({})",
            node.opts.listen,
            if maintenance {
                "TLS; pin this certificate with --cert-fingerprint"
            } else {
                "mutual TLS, client certificates from the OS CA"
            }
        ),
        format!("fingerprint: {}", id.fingerprint),
    ];
    if maintenance {
        lines.push(
            "state:       maintenance: no config yet; waiting for `osctl apply-config --insecure`"
                .into(),
        );
        match &node.opts.maintenance_token {
            Some(t) => lines.push(format!("token:       {t}")),
            None => lines.push("token:       disabled (--no-maintenance-token): anyone who can reach the node can configure it".into()),
        }
    } else {
        lines.push("state:       configured".into());
    }
    let width = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    let rule = "=".repeat(width);
    eprintln!("{rule}\n{}\n{rule}", lines.join("\n"));
    info!(node = name, fingerprint = %id.fingerprint, maintenance, "OS API identity");
}

/// Waits (up to 5 s) until `listen` accepts TCP connections.
async fn wait_listening(listen: std::net::SocketAddr) {
    let mut probe = listen;
    if probe.ip().is_unspecified() {
        probe.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(probe).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    warn!("the OS API at {listen} does not accept connections yet");
}

/// Returns once this node has a replacement for its OS API certificate
/// `cert_pem` (due `--renew-before` ahead of its expiry): a node holding the
/// OS CA key mints one at the reload that follows; a worker asks the trust
/// endpoint first, still serving the current one meanwhile. Never returns
/// in maintenance mode (that certificate is pinned by fingerprint).
async fn renew_identity(
    node: &Node,
    cfg: Option<&::machine_api::config::MachineConfig>,
    me: &crate::roles::NodeIdentity,
    cert_pem: &str,
) {
    let Some(cfg) = cfg else {
        return std::future::pending().await;
    };
    let due = ::machine_api::pki::renewal_time(cert_pem, node.opts.renew_before)
        .unwrap_or_else(std::time::SystemTime::now);
    // Sleep in bounded steps: the wall clock may jump (NTP, a suspended VM).
    while let Ok(left) = due.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left.min(Duration::from_secs(3600))).await;
    }
    if cfg.secrets.os_ca.key.is_none() {
        trust::renew(node, cfg, me).await;
    }
}

/// Serves until asked to reboot or shut down; restarts the server when the
/// identity changes (maintenance → configured, reset, new CA or names).
pub async fn serve(node: Arc<Node>, mut control: mpsc::UnboundedReceiver<Control>) -> Control {
    loop {
        let cfg = node.config();
        let maintenance = cfg.is_none();
        let me = node.identity_for(cfg.as_ref());
        let id = match &cfg {
            None => tls::maintenance_identity(&node.opts.paths.secrets_dir(), &me),
            Some(c) if c.secrets.os_ca.key.is_none() => {
                // A worker: wait for the trust endpoint, but let a reboot,
                // shutdown or new config interrupt the wait.
                tokio::select! {
                    id = trust::worker_identity(&node, c, &me) => match id {
                        Ok(id) => Ok(id),
                        Err(e) => {
                            node.refuse_config(&e).await;
                            continue;
                        }
                    },
                    c = control.recv() => match c.unwrap_or(Control::Shutdown) {
                        Control::Reload => continue,
                        other => return other,
                    },
                }
            }
            Some(c) => tls::configured_identity(c, &me),
        };
        let id = match id {
            Ok(id) => id,
            Err(e) => {
                error!("cannot build the OS API identity: {e}; retrying in 5s");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (tls, listener) = match id
            .rustls_config()
            .map_err(|e| format!("TLS configuration rejected: {e}"))
            .and_then(|tls| {
                bind(node.opts.listen)
                    .map(|l| (tls, l))
                    .map_err(|e| format!("cannot listen on {}: {e}", node.opts.listen))
            }) {
            Ok(x) => x,
            Err(e) => {
                error!("{e}; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let limits = listener::Limits::default();
        let server = listener::server(&limits)
            // Outside authz: refused calls are counted too.
            .layer(metrics_layer::MetricsLayer)
            .layer(authz::AuthzLayer { maintenance })
            .add_service(MachineServiceServer::new(machine_api::MachineApi(
                node.clone(),
            )))
            .add_service(ServiceServiceServer::new(service_api::ServiceApi(
                node.clone(),
            )))
            .add_service(EtcdServiceServer::new(etcd_api::EtcdApi(node.clone())))
            .serve_with_incoming_shutdown(listener::incoming(listener, tls, limits), async {
                let _ = stop_rx.await;
            });
        // Nodes holding the OS CA key also sign workers' certificates on
        // the trust port (server TLS only: workers have no client
        // certificate yet; the machine token authorizes them).
        let signs = cfg.as_ref().is_some_and(|c| c.secrets.os_ca.key.is_some());
        let (trust_stop_tx, trust_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let trust_task = if signs {
            let addr = trust::listen_addr(node.opts.listen);
            let tls =
                ServerIdentity::new(id.cert_pem.clone(), id.key_pem.clone(), None).rustls_config();
            match tls.map_err(|e| e.to_string()).and_then(|tls| {
                bind(addr)
                    .map(|l| (tls, l))
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))
            }) {
                Ok((tls, l)) => {
                    let limits = listener::Limits::trust();
                    Some(tokio::spawn(
                        listener::server(&limits)
                            .add_service(trust::service(node.clone()))
                            .serve_with_incoming_shutdown(
                                listener::incoming(l, tls, limits),
                                async {
                                    let _ = trust_stop_rx.await;
                                },
                            ),
                    ))
                }
                Err(e) => {
                    error!("trust endpoint not served: {e}");
                    None
                }
            }
        } else {
            None
        };
        // Prometheus metrics (port 50002, and the config's plain port) of
        // a configured node; stopped when this iteration ends.
        let _metrics = if maintenance {
            None
        } else {
            metrics::spawn(node.clone(), &id)
        };
        let mut task = tokio::spawn(server);
        // The banner tells operators to connect: print it once the port
        // accepts connections, not before.
        wait_listening(node.opts.listen).await;
        node.timeline.mark(
            "API serving",
            if maintenance {
                "maintenance mode"
            } else {
                "mutual TLS"
            },
        );
        banner(&node, &id, maintenance, &me.name);
        node.mark_boot_good();
        let next = tokio::select! {
            c = control.recv() => c.unwrap_or(Control::Shutdown),
            () = renew_identity(&node, cfg.as_ref(), &me, &id.cert_pem) => {
                info!("OS API certificate due for renewal: serving a new one");
                Control::Reload
            }
            r = &mut task => {
                match r {
                    Ok(Err(e)) => error!("OS API server stopped: {}", crate::node::chain(&e)),
                    Ok(Ok(())) => warn!("OS API server stopped"),
                    Err(e) => error!("OS API server task failed: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let _ = stop_tx.send(());
        let _ = trust_stop_tx.send(());
        if let Some(t) = trust_task {
            if tokio::time::timeout(Duration::from_secs(2), t)
                .await
                .is_err()
            {
                warn!("the trust endpoint did not stop in time");
            }
        }
        // Streams (logs -f) would hold a graceful shutdown open forever.
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
        }
        if next != Control::Reload {
            return next;
        }
        info!("restarting the OS API with a new identity");
    }
}
