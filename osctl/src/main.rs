//! osctl: the operator's CLI. One file per verb under `cmd/`.

mod client;
mod cmd;
mod files;
mod patch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "osctl",
    version,
    about = "Operate nodes of the immutable Kubernetes OS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate secrets, machine configs and client files.
    #[command(subcommand)]
    Gen(cmd::gen::Gen),
    /// Check machine configs (and secrets bundles, osconfig files) offline.
    Validate(cmd::validate::Validate),
    /// Local clusters of QEMU VMs: create, show, destroy.
    #[command(subcommand)]
    Cluster(cmd::cluster::Cluster),
    /// Print generated reference material (JSON Schema, field reference).
    #[command(subcommand)]
    Docs(cmd::docs::Docs),
    /// Client and node versions.
    Version(cmd::version::Version),
    /// Send a machine config to nodes.
    ApplyConfig(cmd::apply_config::ApplyConfig),
    /// Keep a config applied with `--mode try`.
    Confirm(cmd::confirm::Confirm),
    /// Show a node resource.
    Get(cmd::get::Get),
    /// List services with state, health, restarts and resource use.
    Services(cmd::services::Services),
    /// Show, start, stop or restart one service.
    Service(cmd::services::Service),
    /// A service's output.
    Logs(cmd::logs::Logs),
    /// The node's kernel log; `-f` follows it.
    Dmesg(cmd::dmesg::Dmesg),
    /// What machined did: config applied, service state changes, resets,
    /// upgrades, renewals; `-f` follows.
    Events(cmd::events::Events),
    /// Write one archive for a bug report: version, redacted config,
    /// services, boot timeline, etcd status, logs, events and kernel log
    /// of each node.
    Support(cmd::support::Support),
    /// This boot's timeline: guest uptime at each phase (init, disks,
    /// network, config, each service healthy).
    #[command(alias = "analyze")]
    Boot(cmd::boot::Boot),
    /// Node health; `--wait` until healthy.
    Health(cmd::health::Health),
    /// Create the etcd cluster on the first etcd node.
    Bootstrap(cmd::bootstrap::Bootstrap),
    /// Write an admin kubeconfig from a control-plane node (merged into
    /// ~/.kube/config by default).
    Kubeconfig(cmd::kubeconfig::Kubeconfig),
    /// etcd membership and status.
    Etcd(cmd::etcd::Etcd),
    /// Reboot nodes (services stop in reverse dependency order first).
    Reboot(cmd::power::Power),
    /// Shut nodes down (services stop in reverse dependency order first).
    Shutdown(cmd::power::Power),
    /// Wipe config and data (back to maintenance mode), or only /var data
    /// (`--wipe ephemeral`: the config stays).
    Reset(cmd::power::Reset),
    /// Install an upgrade bundle into the other slot and reboot into it.
    Upgrade(cmd::upgrade::Upgrade),
    /// Boot the other slot again (the version before the last upgrade).
    Rollback(cmd::power::Rollback),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gen(g) => g.run(),
        Command::Validate(v) => v.run(),
        Command::Docs(d) => d.run(),
        Command::Cluster(c) => c.run(),
        other => match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(run_node_verb(other)),
            Err(e) => Err(anyhow::anyhow!("cannot start the runtime: {e}")),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_node_verb(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Version(v) => v.run().await,
        Command::ApplyConfig(a) => a.run().await,
        Command::Confirm(c) => c.run().await,
        Command::Get(g) => g.run().await,
        Command::Services(s) => s.run().await,
        Command::Service(s) => s.run().await,
        Command::Logs(l) => l.run().await,
        Command::Dmesg(d) => d.run().await,
        Command::Events(e) => e.run().await,
        Command::Support(s) => s.run().await,
        Command::Health(h) => h.run().await,
        Command::Boot(b) => b.run().await,
        Command::Bootstrap(b) => b.run().await,
        Command::Kubeconfig(k) => k.run().await,
        Command::Etcd(e) => e.run().await,
        Command::Reboot(p) => p.run(cmd::power::PowerAction::Reboot).await,
        Command::Shutdown(p) => p.run(cmd::power::PowerAction::Shutdown).await,
        Command::Reset(r) => r.run().await,
        Command::Upgrade(u) => u.run().await,
        Command::Rollback(r) => r.run().await,
        Command::Gen(_) | Command::Validate(_) | Command::Docs(_) | Command::Cluster(_) => {
            unreachable!("handled in main")
        }
    }
}
