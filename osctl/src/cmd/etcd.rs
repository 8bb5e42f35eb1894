//! `osctl etcd members|status|remove-member|snapshot|defrag|alarm|forfeit-leadership`.

use std::process::ExitCode;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use machine_api::etcd_snapshot::{Checked, SnapshotCheck};
use machine_api::proto::etcd_service_client::EtcdServiceClient;
use machine_api::proto::{Empty, EtcdAlarmsRequest, EtcdMembersResponse, EtcdRemoveMemberRequest};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

use super::session::{human_bytes, print, rpc, Session};
use crate::client::ConnectArgs;

#[derive(Debug, Args)]
pub struct Etcd {
    #[command(subcommand)]
    pub command: EtcdCommand,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// The cluster's members, as this node's member sees them.
    Members,
    /// This node's member: ID, leader, version, database size, raft position.
    Status,
    /// Remove a member by name or hex ID (e.g. a node that is gone for good).
    RemoveMember { member: String },
    /// Save a consistent snapshot of the keyspace from one node's member to
    /// FILE (written to FILE.part, checked, then renamed). Restore it with
    /// `osctl bootstrap --recover-from FILE`.
    Snapshot {
        file: PathBuf,
        /// Seconds the whole transfer may take.
        #[arg(long, default_value = "3600", value_name = "SECONDS")]
        transfer_timeout: u64,
    },
    /// Defragment each given node's member, returning the space deleted
    /// keys left. The member stops serving while it runs: one node at a time.
    Defrag,
    /// The cluster's alarms (NOSPACE after the quota was reached, CORRUPT).
    Alarm {
        #[command(subcommand)]
        action: AlarmAction,
    },
    /// When the node's member leads, hand leadership to another member
    /// (before rebooting or upgrading it).
    ForfeitLeadership,
}

#[derive(Debug, Subcommand)]
pub enum AlarmAction {
    /// List active alarms.
    List,
    /// Clear every alarm (after freeing space: compact, then defrag).
    Disarm,
}

/// Streams a snapshot from the node on `ch` into `file`, checked as it
/// arrives against etcd's own trailer and the node's size and sha256.
pub async fn save_snapshot(ch: Channel, file: &Path) -> Result<Checked> {
    let name = file
        .file_name()
        .with_context(|| format!("{}: not a file name", file.display()))?;
    let part = file.with_file_name(format!("{}.part", name.to_string_lossy()));
    let result = async {
        let mut out = tokio::fs::File::create(&part)
            .await
            .with_context(|| format!("{}", part.display()))?;
        let mut stream = rpc(EtcdServiceClient::new(ch).snapshot(Empty {}).await)?;
        let mut check = SnapshotCheck::new();
        let mut sent = None;
        while let Some(m) = stream
            .message()
            .await
            .map_err(|s| anyhow::Error::new(super::session::RpcError(s)))?
        {
            if !m.data.is_empty() {
                check.update(&m.data);
                out.write_all(&m.data)
                    .await
                    .with_context(|| format!("{}", part.display()))?;
            }
            if !m.sha256.is_empty() {
                sent = Some((m.size, m.sha256));
            }
        }
        let Some((size, sha256)) = sent else {
            bail!("the node ended the snapshot without its size and sha256: it was cut short");
        };
        out.sync_all().await?;
        let checked = check.finish();
        if let Some(p) = checked.problem(Some(size), Some(&sha256)) {
            bail!("{p}");
        }
        tokio::fs::rename(&part, file)
            .await
            .with_context(|| format!("renaming {} to {}", part.display(), file.display()))?;
        Ok(checked)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&part).await;
    }
    result
}

/// The etcd members as one node's member sees them.
pub async fn members(ch: Channel) -> Result<EtcdMembersResponse> {
    rpc(EtcdServiceClient::new(ch).members(Empty {}).await)
}

impl Etcd {
    pub async fn run(mut self) -> Result<ExitCode> {
        if let EtcdCommand::Snapshot {
            transfer_timeout, ..
        } = &self.command
        {
            self.connect.timeout = self.connect.timeout.max(*transfer_timeout);
        }
        let s = Session::mutual(&self.connect)?;
        match self.command {
            EtcdCommand::Members => {
                let res = s.call(members).await;
                Ok(print(
                    s.output,
                    &res,
                    &["ID", "NAME", "PEER URLS", "CLIENT URLS", "LEARNER"],
                    |m| {
                        m.members
                            .iter()
                            .map(|x| {
                                vec![
                                    x.id.clone(),
                                    if x.name.is_empty() {
                                        "(not started)".into()
                                    } else {
                                        x.name.clone()
                                    },
                                    x.peer_urls.join(","),
                                    x.client_urls.join(","),
                                    x.is_learner.to_string(),
                                ]
                            })
                            .collect()
                    },
                ))
            }
            EtcdCommand::Status => {
                let res = s
                    .call(
                        |ch| async move { rpc(EtcdServiceClient::new(ch).status(Empty {}).await) },
                    )
                    .await;
                Ok(print(
                    s.output,
                    &res,
                    &[
                        "MEMBER",
                        "LEADER",
                        "VERSION",
                        "DB SIZE",
                        "RAFT TERM",
                        "RAFT INDEX",
                        "ERRORS",
                    ],
                    |x| {
                        vec![vec![
                            x.member_id.clone(),
                            x.leader_id.clone(),
                            x.version.clone(),
                            human_bytes(x.db_size),
                            x.raft_term.to_string(),
                            x.raft_index.to_string(),
                            x.errors.join("; "),
                        ]]
                    },
                ))
            }
            EtcdCommand::RemoveMember { member } => {
                let res = s
                    .call(|ch| {
                        let req = EtcdRemoveMemberRequest {
                            member: member.clone(),
                        };
                        async move { rpc(EtcdServiceClient::new(ch).remove_member(req).await) }
                    })
                    .await;
                Ok(print(s.output, &res, &[], |m| {
                    vec![vec![format!("removed; {} members remain", m.members.len())]]
                }))
            }
            EtcdCommand::Snapshot { file, .. } => {
                if s.targets.len() != 1 {
                    bail!("snapshot one node (-n NODE): every member holds the same keyspace");
                }
                let res = s
                    .call(|ch| {
                        let file = file.clone();
                        async move { save_snapshot(ch, &file).await }
                    })
                    .await;
                Ok(print(s.output, &res, &["FILE", "SIZE", "SHA256"], |c| {
                    vec![vec![
                        file.display().to_string(),
                        c.size.to_string(),
                        c.sha256.clone(),
                    ]]
                }))
            }
            EtcdCommand::Defrag => {
                let res =
                    s.call(|ch| async move {
                        rpc(EtcdServiceClient::new(ch).defragment(Empty {}).await)
                    })
                    .await;
                Ok(print(s.output, &res, &[], |r| {
                    vec![vec![r.message.clone()]]
                }))
            }
            EtcdCommand::Alarm { action } => {
                let disarm = matches!(action, AlarmAction::Disarm);
                let res = s
                    .call(|ch| async move {
                        rpc(EtcdServiceClient::new(ch)
                            .alarms(EtcdAlarmsRequest { disarm })
                            .await)
                    })
                    .await;
                Ok(print(s.output, &res, &["MEMBER", "ALARM"], |r| {
                    if r.alarms.is_empty() {
                        return vec![vec!["-".into(), "none".into()]];
                    }
                    r.alarms
                        .iter()
                        .map(|a| vec![a.member_id.clone(), a.alarm.clone()])
                        .collect()
                }))
            }
            EtcdCommand::ForfeitLeadership => {
                let res = s
                    .call(|ch| async move {
                        rpc(EtcdServiceClient::new(ch)
                            .forfeit_leadership(Empty {})
                            .await)
                    })
                    .await;
                Ok(print(s.output, &res, &[], |r| {
                    vec![vec![r.message.clone()]]
                }))
            }
        }
    }
}
