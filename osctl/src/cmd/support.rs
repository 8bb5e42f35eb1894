//! `osctl support [FILE]`: one archive with what a bug report needs from
//! each node: version, the redacted config, health and services, the boot
//! timeline, etcd's status and members, every service's kept log lines,
//! machined's events and the kernel log.
//!
//! The config comes from `GetConfiguration`, which the node redacts (every
//! private key, token and secret replaced); nothing else the archive holds
//! carries the config. What a node could not give is written to
//! `NODE/errors.txt` instead of failing the whole archive. The file is
//! written to `FILE.part` and renamed when complete.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use machine_api::proto::etcd_service_client::EtcdServiceClient;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::service_service_client::ServiceServiceClient;
use machine_api::proto::{DmesgRequest, Empty, EventsRequest, LogsRequest};
use tonic::transport::Channel;

use super::session::{rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Support {
    /// Where to write the archive (.tar.gz).
    #[arg(value_name = "FILE", default_value = "support.tar.gz")]
    pub file: PathBuf,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// One node's files: (path inside the node's directory, contents).
type Files = Vec<(String, Vec<u8>)>;

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Drains a server stream of lines into one text.
async fn lines<T>(
    stream: Result<tonic::Streaming<T>>,
    line: impl Fn(T) -> String,
) -> Result<Vec<u8>> {
    let mut stream = stream?;
    let mut out = Vec::new();
    while let Some(m) = stream
        .message()
        .await
        .map_err(|e| anyhow::anyhow!(crate::client::status_line(&e)))?
    {
        out.extend_from_slice(line(m).as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

/// Everything one node gives; what fails goes to `errors.txt`.
async fn collect(ch: Channel) -> Result<Files> {
    let mut files: Files = Vec::new();
    let mut errors = Vec::new();
    let mut m = MachineServiceClient::new(ch.clone());
    let mut svc = ServiceServiceClient::new(ch.clone());
    let mut etcd = EtcdServiceClient::new(ch);
    let mut keep = |name: &str, r: Result<Vec<u8>>, files: &mut Files| match r {
        Ok(data) => files.push((name.to_owned(), data)),
        Err(e) => errors.push(format!("{name}: {e:#}")),
    };
    // The version answers even when nothing else does: fail on it.
    let version = rpc(m.version(Empty {}).await)?;
    files.push(("version.json".into(), json(&version)));
    let config = rpc(m.get_configuration(Empty {}).await).map(|c| c.data);
    keep("config.yaml", config, &mut files);
    let health = rpc(m.health(Empty {}).await).map(|h| json(&h));
    keep("health.json", health, &mut files);
    let boot = rpc(m.boot_timeline(Empty {}).await).map(|b| json(&b));
    keep("boot-timeline.json", boot, &mut files);
    let status = rpc(etcd.status(Empty {}).await).map(|s| json(&s));
    keep("etcd-status.json", status, &mut files);
    let members = rpc(etcd.members(Empty {}).await).map(|s| json(&s));
    keep("etcd-members.json", members, &mut files);
    let events = lines(
        rpc(m
            .events(EventsRequest {
                follow: false,
                tail: 0,
            })
            .await),
        |e| format!("{} {:<8} {}", e.unix_ms, e.kind, e.message),
    )
    .await;
    keep("events.txt", events, &mut files);
    let dmesg = lines(
        rpc(m
            .dmesg(DmesgRequest {
                follow: false,
                tail: 0,
            })
            .await),
        |l| l.line,
    )
    .await;
    keep("dmesg.txt", dmesg, &mut files);
    match rpc(svc.list(Empty {}).await) {
        Ok(list) => {
            files.push(("services.json".into(), json(&list)));
            for s in list.services {
                let log = lines(
                    rpc(svc
                        .logs(LogsRequest {
                            service: s.name.clone(),
                            tail: 0,
                            follow: false,
                        })
                        .await),
                    |l| l.line,
                )
                .await;
                keep(&format!("logs/{}.log", s.name), log, &mut files);
            }
        }
        Err(e) => errors.push(format!("services: {e:#}")),
    }
    if !errors.is_empty() {
        files.push(("errors.txt".into(), (errors.join("\n") + "\n").into_bytes()));
    }
    Ok(files)
}

/// A directory name for a node address (`127.0.0.1:50000` → `127.0.0.1_50000`).
fn dir_name(node: &str) -> String {
    if node.is_empty() || node.chars().all(|c| c == '.') {
        return "_".repeat(node.len().max(1));
    }
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Support {
    pub async fn run(self) -> Result<ExitCode> {
        let s = Session::mutual(&self.connect)?;
        let res = s.call_named(|_, ch| collect(ch)).await;
        let name = self
            .file
            .file_name()
            .with_context(|| format!("{}: not a file name", self.file.display()))?;
        let part = self
            .file
            .with_file_name(format!("{}.part", name.to_string_lossy()));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let write = || -> Result<()> {
            let f = std::fs::File::create(&part).with_context(|| part.display().to_string())?;
            let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
            let mut tar = tar::Builder::new(gz);
            let mut add = |path: String, data: &[u8]| -> Result<()> {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o600);
                h.set_mtime(now);
                h.set_cksum();
                tar.append_data(&mut h, &path, data)
                    .with_context(|| format!("{}: {path}", part.display()))
            };
            let mut summary = String::new();
            for (node, r) in &res {
                let dir = dir_name(node);
                match r {
                    Ok(files) => {
                        summary.push_str(&format!("{node}: {} files\n", files.len()));
                        for (p, data) in files {
                            add(format!("{dir}/{p}"), data)?;
                        }
                    }
                    Err(e) => {
                        summary.push_str(&format!("{node}: unreachable: {e:#}\n"));
                        add(format!("{dir}/errors.txt"), format!("{e:#}\n").as_bytes())?;
                    }
                }
            }
            add("summary.txt".into(), summary.as_bytes())?;
            let gz = tar.into_inner()?;
            let mut f = gz.finish()?;
            f.flush()?;
            f.sync_all()?;
            std::fs::rename(&part, &self.file)
                .with_context(|| format!("renaming {} to {}", part.display(), self.file.display()))
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        let mut code = ExitCode::SUCCESS;
        for (node, r) in &res {
            match r {
                Ok(files) => eprintln!("{node}: {} files", files.len()),
                Err(e) => {
                    eprintln!("error: node {node}: {e:#}");
                    code = ExitCode::FAILURE;
                }
            }
        }
        println!("wrote {}", self.file.display());
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_make_plain_directory_names() {
        assert_eq!(dir_name("127.0.0.1:50000"), "127.0.0.1_50000");
        assert_eq!(dir_name("[fd00::1]:50000"), "_fd00__1__50000");
        assert_eq!(dir_name("../etc"), ".._etc");
        assert_eq!(dir_name(".."), "__");
    }
}
