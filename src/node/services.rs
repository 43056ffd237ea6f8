//! The gRPC services of a node: `Limiter` for milters, `Raft` for peers
//! (only for authenticated members: see [`crate::raft::peer_auth`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{EntryPayload, Membership};
use tonic::{Request, Response, Status};

use super::leader::{Forwarded, Inspect};
use super::{MemberAddr as Membership_, Node, NodeError, Proposal};
use crate::bounds::{count, Invalid, MAX_TOP};
use crate::convert::decide_events;
use crate::metrics;
use crate::proto::v1 as pb;
use crate::raft::network;
use crate::raft::peer_auth::{host_of, Caller, ReplayGuard};
use crate::raft::validate::{self, SnapshotChunks};
use crate::raft::{Node as PeerNode, NodeId, TypeConfig};

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
        let policy_hash = self
            .node
            .state()
            .read()
            .expect("state lock")
            .policy_hash()
            .to_string();
        Ok(Response::new(pb::DecideResponse {
            verdicts: verdicts.iter().map(pb::Verdict::from).collect(),
            policy_hash,
        }))
    }

    /// The policy in force; refused (UNAVAILABLE) until this node's own
    /// `--policy` is, so that a milter never takes an interim one.
    async fn get_policy(
        &self,
        _request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        if !self.node.is_ready() {
            return Err(status(NodeError::NotReady));
        }
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
    /// Refused calls, logged at most once per [`REFUSAL_LOG_EVERY_MS`].
    refusals: RefusalLog,
    /// Admin writes and membership notices already taken.
    replays: ReplayGuard,
    /// The snapshot being received, which each chunk must continue.
    snapshot: SnapshotChunks,
}

impl RaftService {
    pub fn new(node: Arc<Node>) -> RaftService {
        RaftService {
            node,
            refusals: RefusalLog::default(),
            replays: ReplayGuard::default(),
            snapshot: SnapshotChunks::default(),
        }
    }

    /// Checks that `claimed` (the sender the message names: a leader or
    /// a candidate) is the caller, whose proof held, and a member it
    /// speaks for. `carried`: memberships the message itself carries, for
    /// a follower that has not seen its leader's addition yet.
    fn admit<'a>(
        &self,
        method: &'static str,
        caller: &Caller,
        claimed: Option<NodeId>,
        carried: impl Iterator<Item = &'a Membership<NodeId, PeerNode>>,
    ) -> Result<(), Status> {
        let refuse = |why: String| self.refuse(method, caller, why);
        match claimed {
            Some(id) if id == caller.id => {}
            Some(id) => {
                return Err(refuse(format!(
                    "node {} sent a message of node {id}",
                    caller.id
                )))
            }
            None => return Err(refuse("the message names no sender".into())),
        }
        match self.node.member_addr(caller.id, carried) {
            Membership_::Member(addr) if caller.speaks_for(&addr) => Ok(()),
            Membership_::Member(addr) => Err(refuse(format!(
                "the certificate does not name {}, the host of node {}",
                host_of(&addr),
                caller.id
            ))),
            Membership_::NotMember => Err(refuse(format!("node {} is not a member", caller.id))),
            Membership_::Joining(hosts) if hosts.iter().any(|h| caller.speaks_for(h)) => Ok(()),
            Membership_::Joining(_) => Err(refuse(
                "this node is joining: its seeds' certificates only".into(),
            )),
        }
    }

    fn verify(
        &self,
        method: &'static str,
        request: &Request<pb::RaftPayload>,
    ) -> Result<Caller, Status> {
        self.node
            .auth
            .verify(method, request, super::now_ms())
            .inspect_err(|status| {
                let from = request
                    .remote_addr()
                    .map_or_else(|| "-".to_string(), |a| a.to_string());
                self.refusals.log(method, &from, status.message());
            })
    }

    fn refuse(&self, method: &'static str, caller: &Caller, why: String) -> Status {
        self.refusals
            .log(method, &format!("node {}", caller.id), &why);
        Status::permission_denied(why)
    }
}

/// The last time a refused peer call was logged, and how many were not.
#[derive(Default)]
struct RefusalLog {
    last_ms: AtomicU64,
    quiet: AtomicU64,
}

/// A flood of refused calls writes one log line per this many ms.
const REFUSAL_LOG_EVERY_MS: u64 = 5_000;

impl RefusalLog {
    fn log(&self, method: &'static str, from: &str, why: &str) {
        metrics::record_peer_refusal(method);
        let now = super::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < REFUSAL_LOG_EVERY_MS
            || self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.quiet.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let also = self.quiet.swap(0, Ordering::Relaxed);
        tracing::warn!(
            method,
            from = ?from,
            why = ?why,
            refused_since_last_line = also,
            "peer call refused"
        );
    }
}

/// What a peer may ask the leader: within the bounds of a log entry (see
/// `raft::validate`), so that a bad forwarded batch is refused before it
/// joins the leader's batch.
pub fn validate_proposal(p: &Proposal) -> Result<(), Invalid> {
    match p {
        Proposal::Command(c) => validate::command(c),
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
    // Each call's proof is checked before its payload is decoded: an
    // outsider gets nothing decoded.
    async fn append_entries(&self, request: Request<pb::RaftPayload>) -> Reply {
        let caller = self.verify("append_entries", &request)?;
        let rpc: AppendEntriesRequest<TypeConfig> = network::decode(request.get_ref())?;
        let carried = rpc.entries.iter().filter_map(|e| match &e.payload {
            EntryPayload::Membership(m) => Some(m),
            _ => None,
        });
        self.admit(
            "append_entries",
            &caller,
            rpc.vote.leader_id().voted_for(),
            carried,
        )?;
        Ok(Response::new(
            network::serve_append(&self.node.raft, rpc).await?,
        ))
    }

    async fn vote(&self, request: Request<pb::RaftPayload>) -> Reply {
        let caller = self.verify("vote", &request)?;
        let rpc: VoteRequest<NodeId> = network::decode(request.get_ref())?;
        self.admit(
            "vote",
            &caller,
            rpc.vote.leader_id().voted_for(),
            std::iter::empty(),
        )?;
        Ok(Response::new(
            network::serve_vote(&self.node.raft, rpc).await,
        ))
    }

    async fn install_snapshot(&self, request: Request<pb::RaftPayload>) -> Reply {
        let caller = self.verify("install_snapshot", &request)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = network::decode(request.get_ref())?;
        let carried = std::iter::once(rpc.meta.last_membership.membership());
        self.admit(
            "install_snapshot",
            &caller,
            rpc.vote.leader_id().voted_for(),
            carried,
        )?;
        network::serve_install_snapshot(&self.node.raft, &self.snapshot, rpc)
            .await
            .map(Response::new)
    }

    /// A proposal for the leader. Members may forward any (with the admin
    /// token for those that need it, checked at the leader); a node that
    /// is not a member may only ask to join as itself, or who the members
    /// are (which any client can read from the Admin service).
    async fn propose(&self, request: Request<pb::RaftPayload>) -> Reply {
        let caller = self.verify("propose", &request)?;
        let forwarded: Forwarded = network::decode(request.get_ref())?;
        let member = match self.node.member_addr(caller.id, std::iter::empty()) {
            Membership_::Member(addr) => caller.speaks_for(&addr),
            _ => false,
        };
        let allowed = match &forwarded.proposal {
            _ if member => Ok(()),
            Proposal::Members => Ok(()),
            Proposal::Join { id, addr, .. } if *id == caller.id && caller.speaks_for(addr) => {
                Ok(())
            }
            Proposal::Join { id, .. } if *id == caller.id => Err(format!(
                "the certificate does not name the host of the address node {id} joins with"
            )),
            other => Err(format!(
                "node {} is not a member: it may not ask for {}",
                caller.id,
                other.name()
            )),
        };
        if let Err(why) = allowed {
            return Err(self.refuse("propose", &caller, why));
        }
        validate_proposal(&forwarded.proposal)?;
        let once_only = forwarded.proposal.needs_admin()
            || matches!(forwarded.proposal, Proposal::Membership { .. });
        if once_only && !self.replays.first_time(&caller, super::now_ms()) {
            return Err(self.refuse(
                "propose",
                &caller,
                format!("{} seen before: a replay", forwarded.proposal.name()),
            ));
        }
        let reply = self.node.serve_forwarded(forwarded, caller.id).await;
        Ok(Response::new(network::encode(&reply)))
    }
}
