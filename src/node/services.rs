//! The gRPC services of a node: `Limiter` for milters, `Raft` for peers.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::{Node, NodeError, Proposal};
use crate::convert::event_from_pb;
use crate::metrics;
use crate::proto::v1 as pb;
use crate::raft::network;

pub struct LimiterService {
    node: Arc<Node>,
}

impl LimiterService {
    pub fn new(node: Arc<Node>) -> LimiterService {
        LimiterService { node }
    }
}

/// Refusals a milter can act on: it falls back when the node is not
/// able to decide.
fn status(e: NodeError) -> Status {
    match e {
        NodeError::ShuttingDown
        | NodeError::NoLeader(_)
        | NodeError::NotReady
        | NodeError::Removed => Status::unavailable(e.to_string()),
        NodeError::Abandoned => Status::cancelled(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl pb::limiter_server::Limiter for LimiterService {
    async fn decide(
        &self,
        request: Request<pb::DecideRequest>,
    ) -> Result<Response<pb::DecideResponse>, Status> {
        let events = request
            .into_inner()
            .events
            .into_iter()
            .map(|e| event_from_pb(e, self.node.incarnation))
            .collect::<Result<Vec<_>, _>>()?;
        if events.is_empty() {
            return Ok(Response::new(pb::DecideResponse::default()));
        }
        let started = Instant::now();
        let kinds: Vec<&'static str> = events.iter().map(metrics::event_name).collect();
        let verdicts = self.node.decide(events).await.map_err(status)?;
        metrics::record_decisions(&kinds, &verdicts, started.elapsed());
        Ok(Response::new(pb::DecideResponse {
            verdicts: verdicts.iter().map(pb::Verdict::from).collect(),
        }))
    }

    async fn get_policy(
        &self,
        _request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        let state = self.node.state().read().expect("state lock");
        let files = state
            .policy()
            .files()
            .iter()
            .map(pb::PolicyFile::from)
            .collect();
        Ok(Response::new(pb::GetPolicyResponse {
            files,
            hash: state.policy_hash().to_string(),
        }))
    }
}

pub struct RaftService {
    node: Arc<Node>,
}

impl RaftService {
    pub fn new(node: Arc<Node>) -> RaftService {
        RaftService { node }
    }
}

type Reply = Result<Response<pb::RaftPayload>, Status>;

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(&self, request: Request<pb::RaftPayload>) -> Reply {
        network::serve_append(&self.node.raft, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn vote(&self, request: Request<pb::RaftPayload>) -> Reply {
        network::serve_vote(&self.node.raft, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn install_snapshot(&self, request: Request<pb::RaftPayload>) -> Reply {
        network::serve_install_snapshot(&self.node.raft, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn propose(&self, request: Request<pb::RaftPayload>) -> Reply {
        let proposal: Proposal = network::decode(request.get_ref())?;
        let reply = self.node.serve_forwarded(proposal).await;
        Ok(Response::new(network::encode(&reply)))
    }
}
