//! The gRPC `Admin` service: what `relayratectl` asks a node. Reads of the
//! counts and every write go to the leader through [`Node::at_leader`], so
//! any node can be asked. Writes need the admin token when one is set.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tonic::{Request, Response, Status};

use super::leader::{Inspect, MemberInfo};
use super::{Node, NodeError, Proposal, ProposalReply};
use crate::bounds::cut;
use crate::convert;
use crate::inspect::KeyCount;
use crate::policy::Policy;
use crate::proto::v1 as pb;
use crate::raft::state::policy_hash;
use crate::raft::{Command, Response as Applied};

/// How long `status` waits for the leader's view of the members.
const MEMBERS_WAIT: Duration = Duration::from_secs(2);

pub struct AdminService {
    node: Arc<Node>,
    /// Writes need `authorization: Bearer TOKEN` when set.
    token: Option<String>,
    /// Held while a suggestion is worked out: one at a time.
    suggesting: Arc<tokio::sync::Mutex<()>>,
}

impl AdminService {
    pub fn new(node: Arc<Node>, token: Option<String>) -> AdminService {
        AdminService {
            node,
            token,
            suggesting: Arc::default(),
        }
    }

    /// Refuses a write without the right token.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if same_secret(g.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::permission_denied("wrong admin token")),
            None => Err(Status::unauthenticated(
                "this node needs an admin token for writes (authorization: Bearer TOKEN)",
            )),
        }
    }

    async fn at_leader(&self, proposal: Proposal) -> Result<ProposalReply, Status> {
        match self.node.at_leader(proposal).await {
            Ok(ProposalReply::Failed(why) | ProposalReply::Refused(why)) => {
                Err(Status::failed_precondition(why))
            }
            Ok(reply) => Ok(reply),
            Err(e @ NodeError::Removed) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ (NodeError::NoLeader(_) | NodeError::ShuttingDown)) => {
                Err(Status::unavailable(e.to_string()))
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn counts(&self, question: Inspect) -> Result<Vec<pb::KeyCount>, Status> {
        match self.at_leader(Proposal::Inspect(question)).await? {
            ProposalReply::Counts(counts) => Ok(counts.iter().map(pb::KeyCount::from).collect()),
            other => Err(unexpected(other)),
        }
    }

    async fn members(&self) -> Result<Vec<MemberInfo>, Status> {
        match self.at_leader(Proposal::Members).await? {
            ProposalReply::Members(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unexpected(reply: ProposalReply) -> Status {
    Status::internal(format!(
        "unexpected reply from the leader: {}",
        cut(&format!("{reply:?}"))
    ))
}

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl From<&KeyCount> for pb::KeyCount {
    fn from(k: &KeyCount) -> pb::KeyCount {
        let percent = k.percent();
        pb::KeyCount {
            check: pb::Check::from(k.check).into(),
            key: k.key.clone(),
            count: k.count,
            limit: k.limit.unwrap_or(0),
            percent: if percent.is_finite() { percent } else { 0.0 },
            window_secs: k.window_secs.unwrap_or(0),
            enabled: k.enabled,
            unusual: k.unusual,
            bucket_count: k.bucket_count,
            baseline: k.baseline,
        }
    }
}

impl From<&MemberInfo> for pb::Member {
    fn from(m: &MemberInfo) -> pb::Member {
        pb::Member {
            id: m.id,
            addr: m.addr.clone(),
            voter: m.voter,
            health: m.health.name().to_string(),
            matched_index: m.matched_index.unwrap_or(0),
        }
    }
}

fn members_response(members: &[MemberInfo]) -> pb::MembersResponse {
    pb::MembersResponse {
        members: members.iter().map(pb::Member::from).collect(),
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        // The leader's view of the members has their health; a node that
        // cannot reach it in time shows its own view, health unknown.
        let members = match tokio::time::timeout(MEMBERS_WAIT, self.members()).await {
            Ok(Ok(m)) => m,
            _ => self.node.members(false),
        };
        let m = self.node.raft.metrics().borrow().clone();
        let leader = m.current_leader;
        let leader_addr = leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
            .map(|n| n.addr)
            .unwrap_or_default();
        let state = self.node.state().read().expect("state lock");
        Ok(Response::new(pb::StatusResponse {
            id: self.node.id,
            role: role(m.state).to_string(),
            term: m.current_term,
            leader_id: leader.unwrap_or(0),
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map_or(0, |l| l.index),
            ready: self.node.is_ready(),
            members: members.iter().map(pb::Member::from).collect(),
            policy_hash: state.policy_hash().to_string(),
            policy_applied_unix_ms: state.policy_applied_ms(),
            counters: state.engine().counters_len() as u64,
            leases: state.engine().leases_len() as u64,
        }))
    }

    async fn members(
        &self,
        _request: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        Ok(Response::new(members_response(&self.members().await?)))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        self.authorize(&request)?;
        convert::add_node_from_pb(request.get_ref())?;
        let pb::AddNodeRequest { id, addr } = request.into_inner();
        tracing::info!(id, %addr, "admin: add node");
        let join = Proposal::Join {
            id,
            addr,
            fresh: false,
        };
        match self.at_leader(join).await? {
            ProposalReply::Joined => {}
            other => return Err(unexpected(other)),
        }
        Ok(Response::new(members_response(&self.members().await?)))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        self.authorize(&request)?;
        let id = request.into_inner().id;
        tracing::info!(id, "admin: remove node");
        let outcome = self.at_leader(Proposal::Remove { id }).await;
        // A node removing itself may hear the leader's notice before the
        // answer: it is out, which is what was asked.
        if id == self.node.id && self.node.is_removed() {
            return Ok(Response::new(members_response(&self.node.members(false))));
        }
        match outcome? {
            ProposalReply::Response(Applied::Done) => {}
            other => return Err(unexpected(other)),
        }
        Ok(Response::new(members_response(&self.members().await?)))
    }

    async fn top(
        &self,
        request: Request<pb::TopRequest>,
    ) -> Result<Response<pb::TopResponse>, Status> {
        let (check, n) = convert::top_from_pb(request.get_ref())?;
        let unusual = request.get_ref().unusual;
        let keys = self.counts(Inspect::Top { check, n, unusual }).await?;
        Ok(Response::new(pb::TopResponse { keys }))
    }

    async fn show(
        &self,
        request: Request<pb::ShowRequest>,
    ) -> Result<Response<pb::ShowResponse>, Status> {
        let key = convert::key_from_pb(&request.get_ref().key, "show")?;
        let checks = self.counts(Inspect::Show { key }).await?;
        Ok(Response::new(pb::ShowResponse { checks }))
    }

    async fn reset(
        &self,
        request: Request<pb::ResetRequest>,
    ) -> Result<Response<pb::ResetResponse>, Status> {
        self.authorize(&request)?;
        let peer = request.remote_addr();
        let r = request.into_inner();
        let (key, check) = convert::reset_from_pb(&r)?;
        let requested_by = match (r.requested_by.as_str(), peer) {
            ("", Some(p)) => p.to_string(),
            ("", None) => "unknown".to_string(),
            (who, Some(p)) => format!("{who} from {p}"),
            (who, None) => who.to_string(),
        };
        let checks = check.map_or_else(|| "all".to_string(), |c| c.to_string());
        tracing::info!(key = %r.key, check = %checks, %requested_by, "admin: reset");
        let command = Command::Reset {
            key,
            check,
            requested_by,
        };
        match self.at_leader(Proposal::Command(command)).await? {
            ProposalReply::Response(Applied::Cleared(cleared)) => {
                Ok(Response::new(pb::ResetResponse { cleared }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn suggest(
        &self,
        request: Request<pb::SuggestRequest>,
    ) -> Result<Response<pb::SuggestResponse>, Status> {
        // It costs seconds of CPU and a copy of every key's peaks: the
        // token, when set, is asked as for a write.
        self.authorize(&request)?;
        let share = request.get_ref().delay_share.unwrap_or(0.01);
        if !crate::history::suggest::is_share(share) {
            return Err(Status::invalid_argument(
                "delay_share must be a share from 0 to 1, such as 0.01",
            ));
        }
        // Held by the work itself, not by the request: a client that
        // gives up does not let a second one start beside it.
        let Ok(one) = self.suggesting.clone().try_lock_owned() else {
            return Err(Status::resource_exhausted(
                "another suggestion is being worked out; ask again in a moment",
            ));
        };
        // All on a blocking thread, not the runtime's. The peaks are shared
        // under the lock (a pointer a key, at most UnusualKeys keys), then
        // copied and worked out without it, so that decisions do not wait.
        let state = self.node.state().clone();
        let text = tokio::task::spawn_blocking(move || {
            let _one = one;
            let (shared, policy, now) = {
                let state = state.read().expect("state lock");
                let shared: Vec<_> = state
                    .engine()
                    .hourly_peaks()
                    .map(|(id, peaks)| (id.clone(), peaks))
                    .collect();
                (shared, state.policy().clone(), state.now_ms() / 1000)
            };
            let keys = shared
                .into_iter()
                .map(|(id, peaks)| (id, peaks.peaks()))
                .collect();
            let cluster = crate::history::suggest::ClusterPeaks {
                keys,
                policy: &policy,
                now,
            };
            crate::history::suggest::policy_from_hourly_peaks(cluster, share)
        })
        .await
        .map_err(|e| Status::internal(format!("suggest: {e}")))?;
        Ok(Response::new(pb::SuggestResponse { policy: text }))
    }

    async fn show_policy(
        &self,
        _request: Request<pb::ShowPolicyRequest>,
    ) -> Result<Response<pb::ShowPolicyResponse>, Status> {
        // At the leader, so that a policy just applied shows everywhere.
        let ProposalReply::Policy {
            files,
            hash,
            applied_ms,
        } = self.at_leader(Proposal::Policy).await?
        else {
            return Err(Status::internal("unexpected reply from the leader"));
        };
        Ok(Response::new(pb::ShowPolicyResponse {
            files: files.iter().map(pb::PolicyFile::from).collect(),
            hash,
            applied_unix_ms: applied_ms,
        }))
    }

    async fn apply_policy(
        &self,
        request: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        self.authorize(&request)?;
        let files = convert::policy_files_from_pb(request.into_inner())?;
        // Validated here first: a bad file never reaches the log. The
        // message holds the first errors, one FILE:LINE:COL line each.
        let policy =
            Policy::parse(files.clone()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let warnings = policy.warning_lines();
        let hash = policy_hash(&files);
        let changed = match self.at_leader(Proposal::EnsurePolicy(files)).await? {
            ProposalReply::Unchanged => false,
            ProposalReply::Response(Applied::Done) => true,
            ProposalReply::Response(Applied::PolicyRefused(why)) => {
                return Err(Status::invalid_argument(why))
            }
            other => return Err(unexpected(other)),
        };
        tracing::info!(%hash, changed, "admin: policy applied");
        Ok(Response::new(pb::ApplyPolicyResponse {
            hash,
            changed,
            warnings,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::leader::Health;
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }

    #[test]
    fn health_names_are_those_of_the_proto() {
        let names: Vec<_> = [
            Health::Leader,
            Health::Up,
            Health::Lagging,
            Health::Unreachable,
            Health::Unknown,
        ]
        .iter()
        .map(|h| h.name())
        .collect();
        assert_eq!(names, ["leader", "up", "lagging", "unreachable", "unknown"]);
    }
}
