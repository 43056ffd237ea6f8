//! The gRPC services of a node: `Limiter` for milters, `Raft` for peers.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::leader::Inspect;
use super::{Node, NodeError, Proposal};
use crate::bounds::{count, Invalid, MAX_TOP};
use crate::convert::decide_events;
use crate::metrics;
use crate::proto::v1 as pb;
use crate::raft::network;
use crate::raft::validate::{self, SnapshotChunks};

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
        let events = decide_events(request.into_inner(), self.node.incarnation)?;
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
    snapshot: SnapshotChunks,
}

impl RaftService {
    pub fn new(node: Arc<Node>) -> RaftService {
        RaftService {
            node,
            snapshot: SnapshotChunks::default(),
        }
    }
}

/// What a peer may ask the leader: within the bounds of a log entry (see
/// `raft::validate`), so that a bad forwarded batch is refused before it
/// joins the leader's batch.
pub fn validate_proposal(p: &Proposal) -> Result<(), Invalid> {
    match p {
        Proposal::Command(c) => validate::command(c),
        Proposal::Read(events) => {
            if events.iter().any(|e| e.is_write()) {
                return Err(Invalid("a read holds read-only events only".into()));
            }
            validate::events(events.iter())
        }
        Proposal::Join { addr, .. } => validate::node_addr(addr),
        Proposal::EnsurePolicy(files) => validate::policy_files(files),
        Proposal::Inspect(Inspect::Top { n, .. }) => count("keys asked of top", *n, MAX_TOP),
        Proposal::Inspect(Inspect::Show { key }) => validate::counter_key(key),
        Proposal::Remove { .. }
        | Proposal::Membership { .. }
        | Proposal::Policy
        | Proposal::Members => Ok(()),
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
        network::serve_install_snapshot(&self.node.raft, &self.snapshot, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn propose(&self, request: Request<pb::RaftPayload>) -> Reply {
        let proposal: Proposal = network::decode(request.get_ref())?;
        validate_proposal(&proposal)?;
        let reply = self.node.serve_forwarded(proposal).await;
        Ok(Response::new(network::encode(&reply)))
    }
}
