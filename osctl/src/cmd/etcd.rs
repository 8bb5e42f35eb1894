//! `osctl etcd members|status|remove-member`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use machine_api::proto::etcd_service_client::EtcdServiceClient;
use machine_api::proto::{Empty, EtcdMembersResponse, EtcdRemoveMemberRequest};
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
}

/// The etcd members as one node's member sees them.
pub async fn members(ch: Channel) -> Result<EtcdMembersResponse> {
    rpc(EtcdServiceClient::new(ch).members(Empty {}).await)
}

impl Etcd {
    pub async fn run(self) -> Result<ExitCode> {
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
        }
    }
}
