//! EtcdService: bootstrap, membership and status of the node's etcd member.

use std::sync::Arc;

use machine_api::proto::etcd_service_server::EtcdService;
use machine_api::proto::{
    Empty, EtcdActionResponse, EtcdAddMemberRequest, EtcdAlarm, EtcdAlarmsRequest,
    EtcdAlarmsResponse, EtcdBootstrapResponse, EtcdMember, EtcdMembersResponse, EtcdRecoverRequest,
    EtcdRemoveMemberRequest, EtcdSnapshotChunk, EtcdStatusResponse,
};
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::roles::etcd_client::Member;

fn member(m: Member) -> EtcdMember {
    EtcdMember {
        id: format!("{:x}", m.id),
        name: m.name,
        peer_urls: m.peer_urls,
        client_urls: m.client_urls,
        is_learner: m.is_learner,
    }
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("etcd: {e}"))
}

/// One recovery at a time on a node.
static RECOVERY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// No part of an uploaded snapshot for this long ends the upload.
const UPLOAD_CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// The next message of an upload, bounded in time.
async fn next_upload_message(
    s: &mut tonic::Streaming<EtcdRecoverRequest>,
) -> Result<Option<EtcdRecoverRequest>, Status> {
    match tokio::time::timeout(UPLOAD_CHUNK_TIMEOUT, s.message()).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no part of the snapshot arrived for {} s",
            UPLOAD_CHUNK_TIMEOUT.as_secs()
        ))),
        Ok(Err(s)) => Err(Status::aborted(format!(
            "the upload broke off: {}",
            s.message()
        ))),
        Ok(Ok(m)) => Ok(m),
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<EtcdSnapshotChunk, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct EtcdApi(pub Arc<Node>);

impl EtcdApi {
    /// Receives the snapshot of a recovery; its path once every check passed.
    async fn receive_snapshot(
        &self,
        mut stream: tonic::Streaming<EtcdRecoverRequest>,
    ) -> Result<std::path::PathBuf, Status> {
        let first = next_upload_message(&mut stream)
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty upload: send the snapshot"))?;
        let mut upload =
            crate::etcd_backup::Upload::start(&self.0.opts.paths, first.size, &first.sha256)
                .await
                .map_err(Status::invalid_argument)?;
        upload
            .write(&first.data)
            .await
            .map_err(Status::invalid_argument)?;
        while let Some(m) = next_upload_message(&mut stream).await? {
            upload
                .write(&m.data)
                .await
                .map_err(Status::invalid_argument)?;
        }
        upload.finish().await.map_err(Status::invalid_argument)
    }
}

#[tonic::async_trait]
impl EtcdService for EtcdApi {
    async fn bootstrap(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<EtcdBootstrapResponse>, Status> {
        let message = self.0.bootstrap().await?;
        Ok(Response::new(EtcdBootstrapResponse { message }))
    }

    async fn members(&self, _: Request<Empty>) -> Result<Response<EtcdMembersResponse>, Status> {
        let c = self.0.etcd_client().await?;
        let members = c.members().await.map_err(unavailable)?;
        Ok(Response::new(EtcdMembersResponse {
            members: members.into_iter().map(member).collect(),
        }))
    }

    async fn status(&self, _: Request<Empty>) -> Result<Response<EtcdStatusResponse>, Status> {
        let c = self.0.etcd_client().await?;
        let s = c.status().await.map_err(unavailable)?;
        Ok(Response::new(EtcdStatusResponse {
            member_id: format!("{:x}", s.header.member_id),
            leader_id: format!("{:x}", s.leader),
            version: s.version,
            db_size: s.db_size,
            raft_term: s.raft_term,
            raft_index: s.raft_index,
            errors: s.errors,
        }))
    }

    async fn add_member(
        &self,
        r: Request<EtcdAddMemberRequest>,
    ) -> Result<Response<EtcdMembersResponse>, Status> {
        let urls = r.into_inner().peer_urls;
        if urls.is_empty() || urls.iter().any(|u| !u.starts_with("https://")) {
            return Err(Status::invalid_argument(
                "peer_urls: give https:// peer URLs",
            ));
        }
        let c = self.0.etcd_client().await?;
        let (_, members) = c.add_member(&urls).await.map_err(unavailable)?;
        Ok(Response::new(EtcdMembersResponse {
            members: members.into_iter().map(member).collect(),
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, _: Request<Empty>) -> Result<Response<SnapshotStream>, Status> {
        let c = self.0.etcd_client().await?;
        let mut source = c.snapshot().await.map_err(unavailable)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<EtcdSnapshotChunk, Status>>(4);
        tokio::spawn(async move {
            let mut check = machine_api::etcd_snapshot::SnapshotCheck::new();
            loop {
                match source.next_chunk().await {
                    Ok(Some(data)) => {
                        check.update(&data);
                        let chunk = EtcdSnapshotChunk {
                            data,
                            ..Default::default()
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return; // the client went away
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e))).await;
                        return;
                    }
                }
            }
            let checked = check.finish();
            let last = match checked.problem(None, None) {
                Some(p) => Err(Status::data_loss(format!("etcd's snapshot: {p}"))),
                None => Ok(EtcdSnapshotChunk {
                    data: Vec::new(),
                    size: checked.size,
                    sha256: checked.sha256,
                }),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn recover(
        &self,
        r: Request<tonic::Streaming<EtcdRecoverRequest>>,
    ) -> Result<Response<EtcdBootstrapResponse>, Status> {
        let Ok(_one) = RECOVERY.try_lock() else {
            return Err(Status::aborted(
                "another recovery is running on this node: wait for it to finish",
            ));
        };
        // Refused before a byte is stored when the node cannot take it.
        let (who, etcdctl) = self.0.prepare_etcd_recovery()?;
        let snapshot = self.receive_snapshot(r.into_inner()).await?;
        let message = self.0.finish_etcd_recovery(snapshot, who, etcdctl).await?;
        Ok(Response::new(EtcdBootstrapResponse { message }))
    }

    async fn defragment(&self, _: Request<Empty>) -> Result<Response<EtcdActionResponse>, Status> {
        let c = self.0.etcd_client().await?;
        let before = c.status().await.map_err(unavailable)?.db_size;
        c.defragment().await.map_err(unavailable)?;
        let after = c.status().await.map_err(unavailable)?.db_size;
        Ok(Response::new(EtcdActionResponse {
            message: format!("defragmented: database {before} bytes before, {after} after"),
        }))
    }

    async fn alarms(
        &self,
        r: Request<EtcdAlarmsRequest>,
    ) -> Result<Response<EtcdAlarmsResponse>, Status> {
        let c = self.0.etcd_client().await?;
        let mut alarms = c.alarms().await.map_err(unavailable)?;
        if r.into_inner().disarm {
            for (id, alarm) in &alarms {
                c.disarm(*id, alarm).await.map_err(unavailable)?;
            }
            alarms = c.alarms().await.map_err(unavailable)?;
        }
        Ok(Response::new(EtcdAlarmsResponse {
            alarms: alarms
                .into_iter()
                .map(|(id, alarm)| EtcdAlarm {
                    member_id: format!("{id:x}"),
                    alarm,
                })
                .collect(),
        }))
    }

    async fn forfeit_leadership(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<EtcdActionResponse>, Status> {
        let c = self.0.etcd_client().await?;
        let s = c.status().await.map_err(unavailable)?;
        if s.leader != s.header.member_id {
            return Ok(Response::new(EtcdActionResponse {
                message: format!(
                    "this member ({:x}) does not lead (the leader is {:x}): nothing to do",
                    s.header.member_id, s.leader
                ),
            }));
        }
        let members = c.members().await.map_err(unavailable)?;
        // A started voting member: it has a name and client URLs.
        let target = members
            .iter()
            .find(|m| {
                m.id != s.header.member_id
                    && !m.is_learner
                    && !m.name.is_empty()
                    && !m.client_urls.is_empty()
            })
            .ok_or_else(|| {
                Status::failed_precondition("no other started voting member to hand leadership to")
            })?;
        c.move_leader(target.id).await.map_err(unavailable)?;
        Ok(Response::new(EtcdActionResponse {
            message: format!("leadership moved to {} ({:x})", target.name, target.id),
        }))
    }

    async fn remove_member(
        &self,
        r: Request<EtcdRemoveMemberRequest>,
    ) -> Result<Response<EtcdMembersResponse>, Status> {
        let wanted = r.into_inner().member;
        let c = self.0.etcd_client().await?;
        let members = c.members().await.map_err(unavailable)?;
        let target = members
            .iter()
            .find(|m| m.name == wanted || format!("{:x}", m.id) == wanted.to_lowercase())
            .ok_or_else(|| {
                Status::not_found(format!("no etcd member named or with ID {wanted:?}"))
            })?;
        let members = c.remove_member(target.id).await.map_err(unavailable)?;
        Ok(Response::new(EtcdMembersResponse {
            members: members.into_iter().map(member).collect(),
        }))
    }
}
