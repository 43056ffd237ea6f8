//! Getting things done at the leader: writes (stamped with the cluster's
//! time), linearizable reads, joins and policy changes. A follower
//! forwards them in one RPC; this is the one place that knows how.

use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};

use super::{Node, NodeError};
use crate::bounds::cut;
use crate::check::Check;
use crate::engine::CounterKey;
use crate::inspect::{self, KeyCount};
use crate::policy::PolicyFile;
use crate::raft::network;
use crate::raft::state::policy_hash;
use crate::raft::{Command, Node as PeerNode, NodeId, Request, Response};

/// What a node asks the leader through the internal `Propose` RPC.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Proposal {
    Command(Command),
    /// Add a node as a learner, then as a voter. `fresh`: the node asks
    /// for itself with an empty data dir, so if it is a voter already it
    /// lost its state (and its vote) and must be added anew.
    Join {
        id: NodeId,
        addr: String,
        fresh: bool,
    },
    /// Put these files in force unless the cluster's policy is the same.
    EnsurePolicy(Vec<PolicyFile>),
    /// Take a node out of the cluster.
    Remove {
        id: NodeId,
    },
    /// Sent by the leader to node `id`, which it removed (`false`) or
    /// added back (`true`): a removed node stops campaigning and deciding.
    /// Naming the node keeps a notice from being replayed to another.
    Membership {
        id: NodeId,
        member: bool,
    },
    /// The policy in force, read at the leader.
    Policy,
    /// The members as the leader sees them, with their replication.
    Members,
    /// Read-only questions about the counts, answered at the leader after
    /// a read-index check.
    Inspect(Inspect),
}

/// A proposal as it travels to the leader through the `Propose` RPC, with
/// the admin token of the call it stands for: a policy change, a reset or
/// a membership change needs the token wherever it entered the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Forwarded {
    pub proposal: Proposal,
    pub admin_token: Option<String>,
}

impl Proposal {
    /// Whether the leader does it only with the admin token (when it has
    /// one): everything that changes the policy, the counts or the members.
    pub fn needs_admin(&self) -> bool {
        match self {
            Proposal::Command(Command::SetPolicy { .. } | Command::Reset { .. })
            | Proposal::EnsurePolicy(_)
            | Proposal::Join { .. }
            | Proposal::Remove { .. } => true,
            Proposal::Command(Command::Decide { .. } | Command::Heartbeat { .. })
            | Proposal::Membership { .. }
            | Proposal::Policy
            | Proposal::Members
            | Proposal::Inspect(_) => false,
        }
    }

    /// The proposal's name in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Proposal::Command(c) => c.name(),
            Proposal::Join { .. } => "join",
            Proposal::EnsurePolicy(_) => "ensure_policy",
            Proposal::Remove { .. } => "remove",
            Proposal::Membership { .. } => "membership",
            Proposal::Policy => "policy",
            Proposal::Members => "members",
            Proposal::Inspect(_) => "inspect",
        }
    }
}

/// What an operator asks about the counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Inspect {
    /// `unusual`: only keys unusual now.
    Top {
        check: Option<Check>,
        n: usize,
        unusual: bool,
    },
    Show {
        key: CounterKey,
    },
}

/// A member of the cluster and how well it keeps up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub addr: String,
    pub voter: bool,
    pub health: Health,
    /// The last log index the leader knows this member holds.
    pub matched_index: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Leader,
    /// Replication within [`LAGGING_ENTRIES`] of the leader's log.
    Up,
    Lagging,
    /// The leader has no acknowledgement from it.
    Unreachable,
    /// Asked of a node that could not reach the leader.
    Unknown,
}

impl Health {
    pub fn name(self) -> &'static str {
        match self {
            Health::Leader => "leader",
            Health::Up => "up",
            Health::Lagging => "lagging",
            Health::Unreachable => "unreachable",
            Health::Unknown => "unknown",
        }
    }
}

/// A member further behind the leader's log than this is lagging.
const LAGGING_ENTRIES: u64 = 64;

/// The leader's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ProposalReply {
    Response(Response),
    Joined,
    /// The cluster already had this policy.
    Unchanged,
    Members(Vec<MemberInfo>),
    Counts(Vec<KeyCount>),
    Policy {
        files: Vec<PolicyFile>,
        hash: String,
        applied_ms: u64,
    },
    /// The leader will not do it, and asking again will not help.
    Refused(String),
    /// Not the leader (any more): ask again.
    NotLeader,
    Failed(String),
}

impl std::fmt::Display for ProposalReply {
    /// In words, for logs: what the leader answered, without the payload.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposalReply::Response(Response::PolicyRefused(why)) => {
                write!(f, "policy refused: {why}")
            }
            ProposalReply::Response(Response::Invalid(why)) => write!(f, "invalid: {why}"),
            ProposalReply::Response(_) => f.write_str("done"),
            ProposalReply::Joined => f.write_str("joined"),
            ProposalReply::Unchanged => f.write_str("unchanged"),
            ProposalReply::Members(m) => write!(f, "{} members", m.len()),
            ProposalReply::Counts(c) => write!(f, "{} counts", c.len()),
            ProposalReply::Policy { hash, .. } => write!(f, "policy {hash}"),
            ProposalReply::Refused(why) => write!(f, "refused: {why}"),
            ProposalReply::NotLeader => f.write_str("not the leader"),
            ProposalReply::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// How long a proposal may take, looking for a leader and waiting for its
/// answer, before it fails: a write never waits longer, whatever becomes
/// of its entry (a leader cut off from its peers commits nothing).
pub const PROPOSE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a new member may take to hold the leader's log before it is
/// refused (silent) or told to ask again (catching up).
const CATCH_UP: Duration = Duration::from_secs(5);

impl Node {
    /// Writes a command at the leader and returns its response; retries
    /// across leader changes until [`PROPOSE_DEADLINE`]. A retried
    /// `Decide` keeps its request ids, so it is counted once.
    pub async fn propose(&self, command: Command) -> Result<Response, NodeError> {
        self.propose_while(command, &|| true).await
    }

    /// As [`Node::propose`], but gives up between attempts once `wanted`
    /// says that no one waits for the answer any more: events whose
    /// callers gave up (and decided without the cluster) must not be
    /// counted seconds later, when a new leader takes the retry.
    pub async fn propose_while(
        &self,
        command: Command,
        wanted: &(dyn Fn() -> bool + Sync),
    ) -> Result<Response, NodeError> {
        match self
            .at_leader_while(Proposal::Command(command), wanted)
            .await?
        {
            ProposalReply::Response(r) => Ok(r),
            other => Err(NodeError::Raft(format!(
                "unexpected reply {}",
                cut(&format!("{other:?}"))
            ))),
        }
    }

    /// Puts policy files in force at the leader unless the cluster has
    /// them already; returns whether the policy changed.
    pub async fn put_policy(&self, files: Vec<PolicyFile>) -> Result<bool, NodeError> {
        match self.at_leader(Proposal::EnsurePolicy(files)).await? {
            ProposalReply::Unchanged => Ok(false),
            ProposalReply::Response(Response::Done) => Ok(true),
            other => Err(NodeError::Raft(format!(
                "policy not put in force: {}",
                cut(&format!("{other:?}"))
            ))),
        }
    }

    /// Runs a proposal at the leader: here if this node leads, else
    /// forwarded in one RPC. The one place that knows about forwarding.
    pub(super) async fn at_leader(&self, proposal: Proposal) -> Result<ProposalReply, NodeError> {
        self.at_leader_while(proposal, &|| true).await
    }

    /// As [`Node::at_leader`]; retries until an answer, the deadline, or
    /// `wanted` says no.
    async fn at_leader_while(
        &self,
        proposal: Proposal,
        wanted: &(dyn Fn() -> bool + Sync),
    ) -> Result<ProposalReply, NodeError> {
        let deadline = Instant::now() + PROPOSE_DEADLINE;
        let mut wait = Duration::from_millis(20);
        loop {
            if self.is_removed() {
                return Err(NodeError::Removed);
            }
            let attempt = async {
                match self.leader_addr() {
                    Some((leader, _)) if leader == self.id => {
                        self.serve_local(proposal.clone()).await
                    }
                    Some((_, addr)) => forward(self, &addr, &proposal).await,
                    None => ProposalReply::NotLeader,
                }
            };
            // An attempt ends by the deadline whatever it waits for (an
            // entry a cut-off leader cannot commit).
            let until = tokio::time::Instant::from_std(deadline);
            let Ok(reply) = tokio::time::timeout_at(until, attempt).await else {
                return Err(NodeError::NoLeader(format!(
                    "no answer within {} s",
                    PROPOSE_DEADLINE.as_secs()
                )));
            };
            match reply {
                ProposalReply::NotLeader => {}
                ProposalReply::Failed(why) if Instant::now() >= deadline => {
                    return Err(NodeError::NoLeader(why))
                }
                ProposalReply::Failed(why) => tracing::debug!(%why, "proposal failed, retrying"),
                done => return Ok(done),
            }
            if Instant::now() >= deadline {
                return Err(NodeError::NoLeader("no leader known".into()));
            }
            if !wanted() {
                return Err(NodeError::Abandoned);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(500));
        }
    }

    /// A proposal forwarded by node `from`, an authenticated peer. It is
    /// done only with the authority of the call it stands for: the admin
    /// token where one is needed, and a membership notice only from this
    /// node's leader. A follower's batch of events joins this leader's
    /// next batch, so that one entry serves them all.
    pub async fn serve_forwarded(&self, forwarded: Forwarded, from: NodeId) -> ProposalReply {
        let Forwarded {
            proposal,
            admin_token,
        } = forwarded;
        if let (true, Some(token)) = (proposal.needs_admin(), &self.admin_token) {
            let given = admin_token.as_deref().unwrap_or("");
            if !super::admin::same_secret(given.as_bytes(), token.as_bytes()) {
                tracing::warn!(
                    from,
                    proposal = proposal.name(),
                    "forwarded proposal without the admin token refused"
                );
                return ProposalReply::Refused(format!(
                    "{} needs the admin token of the cluster (--admin-token-file)",
                    proposal.name()
                ));
            }
        }
        if let Proposal::Membership { id, .. } = proposal {
            if id != self.id {
                return ProposalReply::Refused(format!(
                    "a membership notice for node {id} sent to node {}",
                    self.id
                ));
            }
            let leader = self.raft.metrics().borrow().current_leader;
            if leader != Some(from) {
                tracing::warn!(
                    from,
                    ?leader,
                    "membership notice from a node that is not the leader refused"
                );
                return ProposalReply::Refused(
                    "only the leader tells a node it was removed".into(),
                );
            }
        }
        match proposal {
            Proposal::Command(Command::Decide { senders, events }) if self.is_leader() => {
                let sender = match senders.as_slice() {
                    [one] => *one,
                    _ => {
                        return self
                            .serve_local(Proposal::Command(Command::Decide { senders, events }))
                            .await
                    }
                };
                match self.enqueue(sender, events).await {
                    Ok(verdicts) => ProposalReply::Response(Response::Verdicts(verdicts)),
                    Err(e) => ProposalReply::Failed(e.to_string()),
                }
            }
            other => self.serve_local(other).await,
        }
    }

    /// What the leader does with a proposal.
    async fn serve_local(&self, proposal: Proposal) -> ProposalReply {
        match proposal {
            Proposal::Command(command) => self.write(command).await,
            Proposal::Join { id, addr, fresh } => self.add_member(id, addr, fresh).await,
            Proposal::EnsurePolicy(files) => {
                if let Err(reply) = self.read_index().await {
                    return reply;
                }
                let current =
                    self.state.read().expect("state lock").policy_hash() == policy_hash(&files);
                if current {
                    ProposalReply::Unchanged
                } else {
                    self.write(Command::SetPolicy { files }).await
                }
            }
            Proposal::Remove { id } => self.remove_member(id).await,
            // The leader's notice to a node it removed or added back.
            Proposal::Membership { member, .. } => {
                self.set_member(member).await;
                ProposalReply::Response(Response::Done)
            }
            Proposal::Policy => {
                if let Err(reply) = self.read_index().await {
                    return reply;
                }
                let state = self.state.read().expect("state lock");
                ProposalReply::Policy {
                    files: state.policy().files().to_vec(),
                    hash: state.policy_hash().to_string(),
                    applied_ms: state.policy_applied_ms(),
                }
            }
            Proposal::Members => match self.is_leader() {
                true => ProposalReply::Members(self.members(true)),
                false => ProposalReply::NotLeader,
            },
            Proposal::Inspect(question) => {
                if let Err(reply) = self.read_index().await {
                    return reply;
                }
                // `top` reads every key: on a blocking thread, not the
                // runtime's (one by default), which answers the milters;
                // sorted after the lock is let go.
                let state = self.state.clone();
                let counts = tokio::task::spawn_blocking(move || {
                    // `Some(n)` for top: ranked, the first n kept.
                    let (counts, top_n) = {
                        let state = state.read().expect("state lock");
                        let now = state.now_ms() / 1000;
                        let engine = state.engine();
                        match question {
                            Inspect::Top { check, n, unusual } => (
                                inspect::top_candidates(engine, check, unusual, now),
                                Some(n),
                            ),
                            Inspect::Show { key } => (inspect::show(engine, &key, now), None),
                        }
                    };
                    match top_n {
                        Some(n) => inspect::rank(counts, n),
                        None => counts,
                    }
                })
                .await;
                match counts {
                    Ok(counts) => ProposalReply::Counts(counts),
                    // Not `Failed`, which is asked again: it would fail again.
                    Err(e) => ProposalReply::Refused(format!("inspecting the counts: {e}")),
                }
            }
        }
    }

    /// The members as this node knows them; with replication figures when
    /// `at_leader` (only a leader has them).
    pub fn members(&self, at_leader: bool) -> Vec<MemberInfo> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let last = m.last_log_index.unwrap_or(0);
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).copied().flatten())
                    .map(|l| l.index);
                let health = match (at_leader, matched) {
                    _ if m.current_leader == Some(*id) && at_leader => Health::Leader,
                    (false, _) => Health::Unknown,
                    (true, None) => Health::Unreachable,
                    (true, Some(i)) if last.saturating_sub(i) > LAGGING_ENTRIES => Health::Lagging,
                    (true, Some(_)) => Health::Up,
                };
                MemberInfo {
                    id: *id,
                    addr: node.addr.clone(),
                    voter: voters.contains(id),
                    health,
                    matched_index: if m.current_leader == Some(*id) {
                        m.last_log_index
                    } else {
                        matched
                    },
                }
            })
            .collect()
    }

    /// The voters, and the address of member `id` if it is one.
    fn voters_and_addr(&self, id: NodeId) -> (Vec<NodeId>, Option<String>) {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voters = membership.voter_ids().collect();
        (voters, membership.get_node(&id).map(|n| n.addr.clone()))
    }

    /// Takes a node out: out of the voters and out of the cluster, so the
    /// leader stops replicating to it.
    async fn remove_member(&self, id: NodeId) -> ProposalReply {
        if !self.is_leader() {
            return ProposalReply::NotLeader;
        }
        let (voters, known) = self.voters_and_addr(id);
        let Some(addr) = known else {
            return ProposalReply::Refused(format!("node {id} is not a member"));
        };
        if voters == [id] {
            return ProposalReply::Refused(format!("node {id} is the last voter"));
        }
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters([id].into_iter().collect())
        } else {
            ChangeMembers::RemoveNodes([id].into_iter().collect())
        };
        match self.raft.change_membership(change, false).await {
            Ok(_) => {
                tracing::info!(id, %addr, "node removed from the cluster");
                // Best effort: a removed node that never hears of it keeps
                // asking for votes, which the members refuse.
                if id != self.id {
                    let notice = Proposal::Membership { id, member: false };
                    if let ProposalReply::Failed(why) = forward(self, &addr, &notice).await {
                        tracing::warn!(id, %why, "the removed node was not told");
                    }
                } else {
                    self.set_member(false).await;
                }
                ProposalReply::Response(Response::Done)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                ProposalReply::NotLeader
            }
            Err(e) => ProposalReply::Failed(e.to_string()),
        }
    }

    /// Appends a command stamped with the cluster's time (carried forward
    /// from the log, not this leader's wall clock); one out of bounds is
    /// refused here, never proposed.
    async fn write(&self, command: Command) -> ProposalReply {
        if let Err(e) = crate::raft::validate::proposable(&command) {
            return ProposalReply::Refused(e.to_string());
        }
        let name = command.name();
        let request = Request {
            stamp_ms: self.stamp_ms(),
            command,
        };
        let started = Instant::now();
        let term = self.raft.metrics().borrow().current_term;
        // openraft answers an entry when it is applied or truncated, but
        // never one that a snapshot overtook (installed once this node
        // follows again): a write ends when this node leaves office, and
        // is asked again at the new leader (its request ids keep it from
        // being counted twice).
        let written = tokio::select! {
            written = self.raft.client_write(request) => written,
            left = self.left_office(term) => {
                crate::metrics::record_raft_write(name, started.elapsed());
                return left;
            }
        };
        crate::metrics::record_raft_write(name, started.elapsed());
        match written {
            Ok(r) => ProposalReply::Response(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                ProposalReply::NotLeader
            }
            Err(e) => ProposalReply::Failed(e.to_string()),
        }
    }

    /// Returns once this node no longer leads in `term` (another term, or
    /// another leader), or its Raft core stopped: what a write waiting at
    /// this node then answers.
    async fn left_office(&self, term: u64) -> ProposalReply {
        // The server metrics change with the vote, the leader and the
        // membership only, not with each entry as the full metrics do:
        // the writes waiting here are not woken for every commit.
        let mut server = self.raft.server_metrics();
        let id = self.id;
        let left = server
            .wait_for(|m| m.vote.leader_id().get_term() != term || m.current_leader != Some(id))
            .await
            .is_ok();
        if left {
            return ProposalReply::NotLeader;
        }
        // The core is gone; its last full metrics say why.
        match self.raft.metrics().borrow().running_state.as_ref().err() {
            Some(fatal) => ProposalReply::Failed(format!("the Raft core stopped: {fatal}")),
            None => ProposalReply::Failed("the Raft core stopped".into()),
        }
    }

    /// Confirms leadership with a quorum and waits until the local state
    /// has applied everything committed before: reads after it are
    /// linearizable.
    async fn read_index(&self) -> Result<(), ProposalReply> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(ProposalReply::NotLeader)
            }
            Err(e) => Err(ProposalReply::Failed(e.to_string())),
        }
    }

    /// Adds a node: as a learner, then, once it holds the leader's log,
    /// as a voter. A node that does not answer is taken out again, so it
    /// never counts towards the quorum.
    async fn add_member(&self, id: NodeId, addr: String, fresh: bool) -> ProposalReply {
        if !self.is_leader() {
            return ProposalReply::NotLeader;
        }
        let (mut voters, known) = self.voters_and_addr(id);
        if let Some(known) = known.filter(|a| *a != addr) {
            return ProposalReply::Refused(format!(
                "node {id} is a member at {}: remove it first to move it to {}",
                cut(&known),
                cut(&addr)
            ));
        }
        if fresh && voters.contains(&id) && id != self.id {
            // Kept as it is, it would vote again in terms it voted in.
            tracing::warn!(id, %addr, "a voter joins with an empty data dir: adding it anew");
            let gone = ChangeMembers::RemoveVoters([id].into_iter().collect());
            if let Err(e) = self.raft.change_membership(gone, false).await {
                return ProposalReply::Failed(e.to_string());
            }
            voters.retain(|v| *v != id);
        }
        if !voters.contains(&id) {
            let added = match self
                .raft
                .add_learner(id, PeerNode::new(addr.clone()), false)
                .await
            {
                Ok(r) => r.log_id.index,
                Err(e) => return ProposalReply::Failed(e.to_string()),
            };
            let target = added.max(self.raft.metrics().borrow().last_log_index.unwrap_or(0));
            if let Err(reply) = self.wait_caught_up(id, &addr, target).await {
                return reply;
            }
            let add = ChangeMembers::AddVoterIds([id].into_iter().collect());
            if let Err(e) = self.raft.change_membership(add, false).await {
                return ProposalReply::Failed(e.to_string());
            }
            tracing::info!(id, %addr, "node joined as a voter");
        }
        // A node removed before and added back may campaign again.
        let notice = Proposal::Membership { id, member: true };
        let _ = forward(self, &addr, &notice).await;
        ProposalReply::Joined
    }

    /// Waits until learner `id` holds the log up to `target`. A learner
    /// that never answered is removed and refused; one still catching up
    /// (a big snapshot) is told to ask again, and stays a learner.
    async fn wait_caught_up(
        &self,
        id: NodeId,
        addr: &str,
        target: u64,
    ) -> Result<(), ProposalReply> {
        let matched = |m: &openraft::RaftMetrics<NodeId, PeerNode>| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map(|l| l.index)
        };
        let caught_up = self
            .raft
            .wait(Some(CATCH_UP))
            .metrics(
                |m| matched(m).is_some_and(|i| i >= target),
                "learner caught up",
            )
            .await;
        if caught_up.is_ok() {
            return Ok(());
        }
        let now = matched(&self.raft.metrics().borrow());
        match now {
            Some(at) => Err(ProposalReply::Refused(format!(
                "node {id} is still catching up (at {at} of {target}): ask again"
            ))),
            None => {
                let gone = ChangeMembers::RemoveNodes([id].into_iter().collect());
                if let Err(e) = self.raft.change_membership(gone, false).await {
                    tracing::warn!(id, error = %e, "the silent learner was not removed");
                }
                Err(ProposalReply::Refused(format!(
                    "node {id} at {} did not answer within {} s: not added",
                    cut(addr),
                    CATCH_UP.as_secs()
                )))
            }
        }
    }
}

/// Sends a proposal to another node's `Propose` RPC.
pub(super) async fn forward(node: &Node, addr: &str, proposal: &Proposal) -> ProposalReply {
    let channel = match node.channel_to(addr) {
        Ok(c) => c,
        Err(e) => return ProposalReply::Failed(e.to_string()),
    };
    let mut client = network::client(channel);
    // Encoded as a `Forwarded`, without copying the proposal.
    #[derive(Serialize)]
    struct ForwardedRef<'a> {
        proposal: &'a Proposal,
        admin_token: Option<&'a str>,
    }
    let forwarded = ForwardedRef {
        proposal,
        admin_token: node
            .admin_token
            .as_deref()
            .filter(|_| proposal.needs_admin()),
    };
    let mut request = network::signed_request(&node.auth, "propose", network::encode(&forwarded));
    // A join waits for the new member to catch up.
    let timeout = match proposal {
        Proposal::Join { .. } => CATCH_UP * 3,
        _ => Duration::from_secs(5),
    };
    request.set_timeout(timeout);
    let started = Instant::now();
    let answer = client.propose(request).await;
    crate::metrics::record_forward(proposal.name(), started.elapsed());
    match answer {
        Ok(reply) => network::decode(&reply.into_inner())
            .unwrap_or_else(|s: tonic::Status| ProposalReply::Failed(s.to_string())),
        // The peer will not take this node's calls: asking again will not
        // help (a wrong secret or certificate, or not a member).
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) =>
        {
            ProposalReply::Refused(format!("{addr} refused: {}", cut(status.message())))
        }
        Err(status) => ProposalReply::Failed(status.to_string()),
    }
}
