//! `osctl kubeconfig [PATH] [--force]`: asks a control-plane node for an
//! admin kubeconfig and writes it, merged into PATH the way kubectl and
//! talosctl merge: the cluster, user and context of the same names are
//! replaced, every other entry is kept, and the current context becomes
//! the new one. `--force` replaces the whole file. `-` prints it.
//!
//! Default PATH: `$KUBECONFIG`'s first entry, else `~/.kube/config`.
//!
//! The server is the cluster's `controlPlane.endpoint`, unless the context
//! names a `kubernetesEndpoint` (how this machine reaches the API server:
//! a local cluster's forwarded port). Given several nodes (a context's
//! endpoints), the first that answers with one is used.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::Empty;
use serde_json::Value;

use super::session::{rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Kubeconfig {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Where to write (`-` for stdout). Default: $KUBECONFIG's first
    /// entry, else ~/.kube/config.
    pub path: Option<PathBuf>,
    /// Replace the file instead of merging into it.
    #[arg(long)]
    pub force: bool,
}

fn default_path() -> Result<PathBuf> {
    if let Some(k) = std::env::var_os("KUBECONFIG") {
        if let Some(first) = std::env::split_paths(&k).next() {
            if !first.as_os_str().is_empty() {
                return Ok(first);
            }
        }
    }
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set; give a PATH"))?;
    Ok(PathBuf::from(home).join(".kube/config"))
}

/// Replaces entries of `new` by name in `old`'s lists and takes `new`'s
/// current context.
pub fn merge(old: &mut Value, new: &Value) -> Result<()> {
    for list in ["clusters", "users", "contexts"] {
        let entries = new[list]
            .as_array()
            .ok_or_else(|| anyhow!("the node's kubeconfig has no {list}"))?;
        if !old[list].is_array() {
            old[list] = Value::Array(Vec::new());
        }
        let target = old[list].as_array_mut().expect("made an array above");
        for e in entries {
            target.retain(|t| t["name"] != e["name"]);
            target.push(e.clone());
        }
    }
    old["current-context"] = new["current-context"].clone();
    if old.get("apiVersion").is_none() {
        old["apiVersion"] = Value::from("v1");
        old["kind"] = Value::from("Config");
    }
    Ok(())
}

/// Points every cluster entry of a kubeconfig at `server`.
pub fn set_server(kubeconfig: &mut Value, server: &str) {
    if let Some(clusters) = kubeconfig["clusters"].as_array_mut() {
        for c in clusters {
            c["cluster"]["server"] = Value::from(server);
        }
    }
}

impl Kubeconfig {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        // Several nodes (a context's endpoints): the first, in order, that
        // gives one (a control-plane node that answers).
        let res = s
            .call(|ch| async move { rpc(MachineServiceClient::new(ch).kubeconfig(Empty {}).await) })
            .await;
        let mut errors = Vec::new();
        let mut data = None;
        for (node, r) in res {
            match r {
                Ok(r) => {
                    data = Some(r.data);
                    break;
                }
                Err(e) => errors.push(format!("node {node}: {e:#}")),
            }
        }
        let Some(data) = data else {
            bail!(
                "no node gave a kubeconfig (ask a control-plane node with -n):\n  {}",
                errors.join("\n  ")
            );
        };
        let mut text = String::from_utf8(data).context("the node's kubeconfig is not text")?;
        // The context knows how this machine reaches the API server (a
        // local cluster's forwarded port) when the cluster's endpoint is
        // not reachable from here.
        if let Some(server) = self
            .connect
            .context()
            .ok()
            .and_then(|c| c.kubernetes_endpoint)
        {
            let mut v: Value = serde_norway::from_str(&text).context("the node's kubeconfig")?;
            set_server(&mut v, &server);
            text = serde_norway::to_string(&v)?;
        }
        let path = match self.path {
            Some(p) if p.as_os_str() == "-" => {
                print!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            Some(p) => p,
            None => default_path()?,
        };
        let new: Value = serde_norway::from_str(&text).context("the node's kubeconfig")?;
        let merged = match std::fs::read_to_string(&path) {
            Ok(old) if !self.force && !old.trim().is_empty() => {
                let mut old: Value = serde_norway::from_str(&old).with_context(|| {
                    format!(
                        "{} is not a kubeconfig; use --force to replace it",
                        path.display()
                    )
                })?;
                merge(&mut old, &new)?;
                old
            }
            Ok(_) => new,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => new,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let out = serde_norway::to_string(&merged)?;
        machine_api::atomic::write_atomic(&path, out.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "kubeconfig for context {} written to {}",
            merged["current-context"].as_str().unwrap_or("?"),
            path.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_replaces_by_name_and_keeps_the_rest() {
        let mut old: Value = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "a", "cluster": {"server": "https://old"}}, {"name": "other"}],
            "users": [{"name": "kubernetes-admin", "user": {}}],
            "contexts": [{"name": "x"}],
            "current-context": "x",
        });
        let new: Value = serde_json::json!({
            "clusters": [{"name": "a", "cluster": {"server": "https://new"}}],
            "users": [{"name": "kubernetes-admin", "user": {"token": "t"}}],
            "contexts": [{"name": "kubernetes-admin@a"}],
            "current-context": "kubernetes-admin@a",
        });
        merge(&mut old, &new).unwrap();
        assert_eq!(old["clusters"].as_array().unwrap().len(), 2);
        assert!(old["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["cluster"]["server"] == "https://new"));
        assert_eq!(old["users"].as_array().unwrap().len(), 1);
        assert_eq!(old["contexts"].as_array().unwrap().len(), 2);
        assert_eq!(old["current-context"], "kubernetes-admin@a");
    }

    #[test]
    fn the_server_is_replaced_in_every_cluster() {
        let mut k: Value = serde_json::json!({
            "clusters": [{"name": "a", "cluster": {"server": "https://10.5.0.10:6443", "certificate-authority-data": "x"}}],
        });
        set_server(&mut k, "https://127.0.0.1:41234");
        assert_eq!(
            k["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:41234"
        );
        assert_eq!(
            k["clusters"][0]["cluster"]["certificate-authority-data"],
            "x"
        );
    }
}
