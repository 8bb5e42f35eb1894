//! machined entry point: parse flags, pick node or host mode, run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use machined::node::{Control, Node, Options};
use machined::paths::Paths;
use machined::supervisor::{Supervisor, SupervisorPaths};
use rand::RngExt;
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "machined",
    version,
    about = "The node agent: OS API, machine config, services"
)]
struct Cli {
    /// Host mode: run as an ordinary process with all state under DIR
    /// (for tests and debugging). Without it, machined runs as the node agent.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Address of the OS API.
    #[arg(long, default_value = "0.0.0.0:50000")]
    listen: SocketAddr,
    /// Directory with etcd, containerd, runc and the shims (default: PATH).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// This node's address for etcd and certificates (default: the listen
    /// address, or 127.0.0.1 when that is unspecified).
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// Node name when the config names none (default: the host name).
    #[arg(long)]
    hostname: Option<String>,
    /// Maintenance token (default: random per boot, printed on the console;
    /// on a node also `machined.token=` on the kernel command line).
    #[arg(long, env = "MACHINED_MAINTENANCE_TOKEN", hide_env_values = true)]
    maintenance_token: Option<String>,
    /// Accept a config in maintenance mode without a token (labs only).
    #[arg(long, conflicts_with = "maintenance_token")]
    no_maintenance_token: bool,
    /// Seconds a worker configured for the first time waits for the trust
    /// endpoint before it drops the config and returns to maintenance mode
    /// (a worker with a kept certificate never gives up).
    #[arg(
        long,
        env = "MACHINED_TRUST_TIMEOUT",
        default_value_t = 300,
        value_name = "SECONDS"
    )]
    trust_timeout: u64,
    /// Seconds before expiry at which the node replaces its own
    /// certificates (OS API server, etcd) while running (default 30 days;
    /// leaf certificates live a year).
    #[arg(long, env = "MACHINED_RENEW_BEFORE", default_value_t = 30 * 86_400, value_name = "SECONDS")]
    renew_before: u64,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "MACHINED_LOG", default_value = "info")]
    log: String,
}

/// The cgroup2 mount point.
fn cgroup2_mount() -> Option<PathBuf> {
    machined::mountinfo::current()
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point)
}

/// A cgroup this machined owns: one per root in host mode, so several
/// machined processes on a host do not share one.
fn cgroup_base(root: &Path, host_mode: bool) -> Option<PathBuf> {
    let mount = cgroup2_mount()?;
    let name = if host_mode {
        let h = hex::encode(Sha256::digest(root.display().to_string()));
        format!("machined-{}", &h[..12])
    } else {
        "machined".into()
    };
    let base = mount.join(name);
    match std::fs::create_dir_all(&base) {
        Ok(()) => {
            if !host_mode {
                // The controllers the services' cgroups use (cpu.weight,
                // memory.current) and the ones kubelet needs for its pod
                // cgroups (cpuset, io, hugetlb), each on its own: a kernel
                // without one must not lose the others. A host's own
                // cgroup setup is left alone in host mode.
                for dir in [&mount, &base] {
                    for c in ["cpu", "cpuset", "memory", "pids", "io", "hugetlb"] {
                        let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
                    }
                }
            }
            Some(base)
        }
        Err(e) => {
            warn!(
                "cgroups unavailable at {} ({e}): services run without them",
                base.display()
            );
            None
        }
    }
}

fn kernel_cmdline_token() -> Option<String> {
    machined::cmdline::Cmdline::current()
        .get("machined.token")
        .map(str::to_owned)
}

/// The maintenance token: given, or random and kept for this boot under
/// /run so a machined restart shows the same one.
fn maintenance_token(cli: &Cli, paths: &Paths, host_mode: bool) -> Option<String> {
    if cli.no_maintenance_token {
        return None;
    }
    if let Some(t) = &cli.maintenance_token {
        return Some(t.clone());
    }
    if !host_mode {
        if let Some(t) = kernel_cmdline_token() {
            return Some(t);
        }
    }
    let file = paths.services_dir().join("../maintenance-token");
    if let Ok(t) = std::fs::read_to_string(&file) {
        if !t.trim().is_empty() {
            return Some(t.trim().to_owned());
        }
    }
    let mut rng = rand::rng();
    let token: String = (0..20)
        .map(|_| char::from(b"abcdefghijkmnpqrstuvwxyz23456789"[rng.random_range(0..32)]))
        .collect();
    let _ = machine_api::atomic::write_atomic(&file, token.as_bytes(), 0o600);
    Some(token)
}

fn main() -> ExitCode {
    // Before any thread exists: glibc keeps arenas made before the cap.
    machined::limits::tune_malloc();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before the runtime, the listeners and any service start: the
    // listeners' caps and the services' own limits (capped at machined's
    // hard limit) rely on it.
    match machined::limits::raise_nofile() {
        Ok(change) => info!("{change}"),
        Err(e) => warn!("cannot raise the open files limit: {e}"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("machined: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let host_mode = cli.root.is_some();
    let root = cli.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let root = std::fs::canonicalize(&root).unwrap_or(root);
    let paths = Paths::new(&root);
    let timeline = machined::timeline::Timeline::new(paths.timeline_file());
    timeline.mark("machined started", env!("CARGO_PKG_VERSION"));
    if !host_mode {
        // Before anything opens a file under /var or /system/state.
        // Failures are on the console (warn) and in this mark; the node
        // carries on from RAM.
        let (done, _errors) = machined::disks::prepare(&root);
        timeline.mark("disks ready", &done.join("; "));
    }
    paths.create_all()?;
    let node_ip = cli.node_ip.unwrap_or(match cli.listen.ip() {
        ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip => ip,
    });
    let default_hostname = cli.hostname.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .map(|h| h.to_lowercase())
            .filter(|h| h.parse::<machine_api::config::DnsName>().is_ok())
            // An unset kernel hostname reads "(none)".
            .unwrap_or_else(|| "node".into())
    });
    let supervisor = Supervisor::new(SupervisorPaths {
        state_dir: paths.services_dir(),
        log_dir: paths.log_dir(),
        cgroup_base: cgroup_base(&root, host_mode),
    })?;
    let opts = Options {
        maintenance_token: maintenance_token(&cli, &paths, host_mode),
        paths,
        bin_dir: cli.bin_dir.clone(),
        listen: cli.listen,
        node_ip,
        default_hostname,
        host_mode,
        trust_first_timeout: std::time::Duration::from_secs(cli.trust_timeout),
        renew_before: std::time::Duration::from_secs(cli.renew_before),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let node = Node::new(opts, supervisor.clone(), tx);
    node.boot().await?;
    spawn_state_printer(&supervisor, timeline, node.clone());
    tokio::spawn(node.clone().renew_etcd_certificates());
    tokio::spawn(node.clone().renew_kubernetes_certificates());
    tokio::spawn(node.clone().snapshot_etcd_on_schedule());
    tokio::spawn(machined::pod_network::run(node.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let next = tokio::select! {
        c = machined::api::serve(node.clone(), rx) => c,
        _ = term.recv() => {
            info!("SIGTERM: machined exits; services keep running and are adopted by the next machined");
            return Ok(ExitCode::SUCCESS);
        }
        _ = tokio::signal::ctrl_c() => {
            info!("interrupted: machined exits; services keep running");
            return Ok(ExitCode::SUCCESS);
        }
    };
    info!("stopping services in reverse dependency order");
    supervisor.stop_all().await;
    match next {
        Control::Reboot if host_mode => {
            // Host mode has no kernel to reboot: start machined afresh, which
            // promotes a staged config exactly as a boot does.
            use std::os::unix::process::CommandExt;
            let exe = std::env::current_exe()?;
            let err = std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .exec();
            Err(anyhow::anyhow!("cannot re-execute machined: {err}"))
        }
        Control::Reboot => {
            // Exit code 10 asks init to reboot (PID-1 duties live in init).
            Ok(ExitCode::from(10))
        }
        _ => {
            info!("shut down");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Service state changes on the console and in the node's event log
/// (`osctl events`), as they happen. Each service's first healthy state
/// of this boot goes on the timeline.
fn spawn_state_printer(
    supervisor: &Supervisor,
    timeline: machined::timeline::Timeline,
    node: std::sync::Arc<Node>,
) {
    let mut rx = supervisor.subscribe();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(s) => {
                    let msg = if s.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.message)
                    };
                    let line = format!("{} {}{msg}", s.name, s.state);
                    eprintln!("[service] {line}");
                    node.events.record("service", line);
                    if s.state == machined::supervisor::ServiceState::Healthy {
                        let phase = format!("{} healthy", s.name);
                        if !timeline.has(&phase) {
                            timeline.mark(&phase, "");
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => node
                    .events
                    .record("service", format!("({n} service changes not recorded)")),
                Err(_) => return,
            }
        }
    });
}
