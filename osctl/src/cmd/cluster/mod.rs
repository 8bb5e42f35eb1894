//! `osctl cluster create|show|destroy`: local clusters of QEMU VMs for
//! trying the OS and for CI. Everything a cluster has (image copy of each
//! disk, configs, secrets, consoles, pids) lives in one directory,
//! `~/.osctl/clusters/NAME` (or `--state-dir`/`$OSCTL_CLUSTERS`).

pub mod create;
mod drive;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

#[derive(Debug, Subcommand)]
pub enum Cluster {
    /// Create a local cluster of QEMU VMs, configure it, bootstrap etcd and
    /// wait until it is healthy.
    Create(create::Create),
    /// The cluster's nodes, their addresses and whether their VMs run.
    Show(Show),
    /// Stop the VMs and delete everything the cluster had.
    Destroy(Destroy),
}

impl Cluster {
    pub fn run(self) -> Result<ExitCode> {
        match self {
            Cluster::Create(c) => c.run(),
            Cluster::Show(s) => s.run(),
            Cluster::Destroy(d) => d.run(),
        }
    }
}

/// Where clusters live.
#[derive(Debug, Clone, Args)]
pub struct StateDir {
    /// Directory holding local clusters (default: $OSCTL_CLUSTERS, then
    /// ~/.osctl/clusters).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Cluster name.
    #[arg(long, default_value = "local")]
    pub name: String,
}

impl StateDir {
    pub fn root(&self) -> Result<PathBuf> {
        self.state_dir
            .clone()
            .or_else(|| std::env::var_os("OSCTL_CLUSTERS").map(PathBuf::from))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".osctl/clusters")))
            .ok_or_else(|| anyhow!("no HOME: pass --state-dir"))
    }

    pub fn dir(&self) -> Result<PathBuf> {
        Ok(self.root()?.join(&self.name))
    }
}

/// One node of a local cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub roles: Vec<String>,
    /// Address on the private network.
    pub ip: String,
    /// 127.0.0.1 port forwarded to the node's OS API (50000).
    pub api_port: u16,
    /// 127.0.0.1 port forwarded to the node's etcd client port (2379).
    pub etcd_port: u16,
    /// 127.0.0.1 port forwarded to the node's kube-apiserver (6443), on
    /// control-plane nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_port: Option<u16>,
    /// 127.0.0.1 port forwarded to NodePort [`qemu::NODE_PORT`] on worker
    /// nodes, so a NodePort service can be reached from the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    /// Memory of its VM in MiB.
    #[serde(default)]
    pub memory_mib: u32,
    pub config: PathBuf,
    pub console: PathBuf,
    pub disk: PathBuf,
    pub pidfile: PathBuf,
    /// The exact QEMU command, to restart a stopped VM by hand.
    pub qemu: Vec<String>,
}

impl NodeState {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
    }
    /// The Kubernetes API through the forwarded port.
    pub fn k8s_endpoint(&self) -> Option<String> {
        self.k8s_port.map(|p| format!("https://127.0.0.1:{p}"))
    }
    pub fn pid(&self) -> Option<u32> {
        qemu::read_pid(&self.pidfile).filter(|p| qemu::is_qemu(*p))
    }
}

/// `cluster.json`: what `show` and `destroy` need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    pub name: String,
    pub accel: qemu::Accel,
    pub image: PathBuf,
    pub network: String,
    pub mcast: String,
    pub osconfig: PathBuf,
    /// What the image says about its Kubernetes binaries (the manifest's
    /// note), when it says anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<String>,
    pub nodes: Vec<NodeState>,
}

impl ClusterState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("cluster.json")
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let p = Self::path(dir);
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{}: no such cluster (create it with `osctl cluster create`)",
                dir.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a cluster state file", p.display()))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        machine_api::atomic::write_atomic(&Self::path(dir), text.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", Self::path(dir).display()))
    }
}

#[derive(Debug, Args)]
pub struct Show {
    #[command(flatten)]
    pub dir: StateDir,
}

impl Show {
    fn run(self) -> Result<ExitCode> {
        let dir = self.dir.dir()?;
        let st = ClusterState::load(&dir)?;
        println!(
            "cluster {} ({} nodes, {}, private network {}, state in {})",
            st.name,
            st.nodes.len(),
            match st.accel {
                qemu::Accel::Kvm => "KVM",
                _ => "TCG",
            },
            st.network,
            dir.display()
        );
        if let Some(k) = &st.kubernetes {
            println!("kubernetes: {k}");
        }
        println!(
            "{:<14} {:<18} {:<12} {:<17} {:<17} {:<17} {:<7} {:<10} CONSOLE",
            "NODE", "ROLES", "IP", "OS API", "ETCD", "KUBERNETES API", "MEMORY", "VM"
        );
        for n in &st.nodes {
            println!(
                "{:<14} {:<18} {:<12} {:<17} {:<17} {:<17} {:<7} {:<10} {}",
                n.name,
                n.roles.join(","),
                n.ip,
                n.endpoint(),
                format!("127.0.0.1:{}", n.etcd_port),
                n.k8s_port
                    .map(|p| format!("127.0.0.1:{p}"))
                    .unwrap_or_else(|| "-".into()),
                if n.memory_mib > 0 {
                    format!("{}M", n.memory_mib)
                } else {
                    "-".into()
                },
                match n.pid() {
                    Some(p) => format!("pid {p}"),
                    None => "stopped".into(),
                },
                n.console.display()
            );
        }
        println!(
            "\nosctl health --osconfig {} --context {}",
            st.osconfig.display(),
            st.name
        );
        for n in &st.nodes {
            if let Some(p) = n.node_port {
                println!("NodePort {} of {}: 127.0.0.1:{p}", qemu::NODE_PORT, n.name);
            }
        }
        if st.nodes.iter().any(|n| n.k8s_port.is_some()) {
            println!(
                "osctl kubeconfig --osconfig {} --context {} PATH   (server: the first control plane's forwarded port)",
                st.osconfig.display(),
                st.name
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(Debug, Args)]
pub struct Destroy {
    #[command(flatten)]
    pub dir: StateDir,
}

impl Destroy {
    fn run(self) -> Result<ExitCode> {
        let dir = self.dir.dir()?;
        if !dir.exists() {
            bail!("{}: no such cluster", dir.display());
        }
        match ClusterState::load(&dir) {
            Ok(st) => {
                for n in &st.nodes {
                    if let Some(pid) = n.pid() {
                        eprintln!("stopping {} (pid {pid})", n.name);
                        qemu::stop(pid, Duration::from_secs(5));
                    }
                }
                remove_context(&st.osconfig, &st.name);
            }
            Err(e) => eprintln!("{e:#}; removing the directory anyway"),
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        eprintln!("destroyed cluster {} ({})", self.dir.name, dir.display());
        Ok(ExitCode::SUCCESS)
    }
}

/// Drops the cluster's context from an osconfig (if it is still ours).
fn remove_context(path: &Path, name: &str) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let Ok(mut cfg) = machine_api::osconfig::OsConfig::parse(&text) else {
        return;
    };
    if cfg.contexts.remove(name).is_none() {
        return;
    }
    if cfg.context == name {
        cfg.context = cfg.contexts.keys().next().cloned().unwrap_or_default();
    }
    if cfg.contexts.is_empty() {
        let _ = std::fs::remove_file(path);
    } else {
        let _ = machine_api::atomic::write_atomic(path, cfg.to_yaml().as_bytes(), 0o600);
    }
}
