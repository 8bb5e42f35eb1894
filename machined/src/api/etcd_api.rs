//! EtcdService: bootstrap, membership and status of the node's etcd member.

use std::sync::Arc;

use machine_api::proto::etcd_service_server::EtcdService;
use machine_api::proto::{
    Empty, EtcdAddMemberRequest, EtcdBootstrapResponse, EtcdMember, EtcdMembersResponse,
    EtcdRemoveMemberRequest, EtcdStatusResponse,
};
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

#[derive(Debug, Clone)]
pub struct EtcdApi(pub Arc<Node>);

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
