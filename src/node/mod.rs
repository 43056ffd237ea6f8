//! A relayrate node: one member of the Raft group, serving the `Limiter`
//! service to its milters and the internal `Raft` service to its peers.
//!
//! - `config`: what a node is started with;
//! - [`batcher`] gathers concurrent events into one log entry;
//! - `leader`: [`Node::propose`] writes a command at the leader,
//!   forwarding from a follower in one RPC; [`Node::read_local`] answers
//!   rechecks from this node's applied state;
//! - `lifecycle`: [`start`] opens the data dir, starts Raft and the gRPC
//!   server, and bootstraps, joins or resumes the cluster; [`NodeHandle`]
//!   stops it;
//! - `services`: the gRPC `Limiter` and `Raft` services;
//! - `admin`: the gRPC `Admin` service, for `relayratectl`.

mod admin;
pub mod batcher;
mod config;
mod leader;
mod lifecycle;
mod retry;
mod services;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;

pub use admin::{same_secret, AdminService};
pub use config::{default_peer_listen, NodeConfig, RaftTuning, Start, PEER_PORT_OFFSET};
pub use leader::{Forwarded, Proposal, ProposalReply};
pub use lifecycle::{start, NodeHandle};
pub use services::validate_proposal;

use crate::engine::{Event, Verdict};
use crate::raft::network;
use crate::raft::peer_auth::{host_of, PeerAuth};
use crate::raft::state_machine::{SharedClock, SharedState};
use crate::raft::{Node as PeerNode, NodeId, Raft, RequestId, Sender};
use crate::tls::Tls;

/// Why a node could not start or a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the data dir is empty: start with --bootstrap or --join ADDR")]
    NotInitialized,
    #[error(
        "joining needs a way to prove membership: --cluster-secret-file (the cluster's) or TLS"
    )]
    NoPeerAuth,
    #[error("no leader could take the request in time: {0}")]
    NoLeader(String),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("the node's policy is not in force yet")]
    NotReady,
    #[error("this node was removed from the cluster")]
    Removed,
    #[error("every caller gave up waiting")]
    Abandoned,
    #[error("raft: {0}")]
    Raft(String),
}

/// Key of the removal mark in the `node_meta` tree.
const REMOVED_KEY: &str = "removed";

/// Key of this host's clock offset from the cluster's time (ms, i64 big
/// endian) in the `node_meta` tree: at the next start it tells the
/// cluster's time before any stamp arrives.
const CLOCK_OFFSET_KEY: &str = "clock_offset_ms";

/// The clock offset stored by the last run, if any.
fn stored_clock_offset(meta: &sled::Tree) -> Option<i64> {
    let bytes = meta.get(CLOCK_OFFSET_KEY).ok()??;
    Some(i64::from_be_bytes(bytes.as_ref().try_into().ok()?))
}

/// Milliseconds since the epoch by this host's wall clock. Entries are
/// stamped with the cluster's time instead ([`Node::cluster_now_ms`]).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A running node, shared by its services and tasks.
pub struct Node {
    pub id: NodeId,
    /// This process's identity in the log: request ids and lease owner.
    pub incarnation: u64,
    seq: AtomicU64,
    pub raft: Raft,
    state: SharedState,
    /// The cluster's time, carried forward from the stamps applied.
    clock: SharedClock,
    batches: mpsc::Sender<batcher::Pending>,
    /// Batches being written or forwarded.
    in_flight: batcher::InFlight,
    draining: AtomicBool,
    /// Told by the leader that it was removed: it neither decides nor
    /// campaigns until it is added back. Kept in `meta`, so that a restart
    /// does not forget it. A watch, so that waiting tasks hear when it
    /// is added back.
    removed: watch::Sender<bool>,
    /// Events dropped because every caller of their batch gave up.
    abandoned: AtomicU64,
    /// This node's own facts on sled (tree `node_meta`), outside the log.
    meta: sled::Tree,
    /// Set once this node's `--policy` is in force (at once without one):
    /// until then no event is decided, so none is decided with no limits.
    ready: AtomicBool,
    /// Why this node's Raft core stopped (a storage error, such as a full
    /// disk, or a panic), once it has: the node is then not ready, and
    /// its process exits for its supervisor to start it again.
    stopped: watch::Sender<Option<String>>,
    /// The hash of this node's `--policy`, if it was given one.
    policy_hash: Option<String>,
    lease_ttl: Duration,
    /// Channels to the other nodes, by address.
    peers: Mutex<HashMap<String, Channel>>,
    /// TLS to the other nodes, when the cluster uses it.
    tls: Option<Tls>,
    /// This node's proof to its peers, and the check of theirs.
    auth: PeerAuth,
    /// The admin token this node was given: carried by the proposals it
    /// makes itself that need one (its `--policy`, its join).
    admin_token: Option<String>,
    /// While this node has no membership yet (it is joining), the hosts
    /// whose certificates may replicate to it: its seeds and the members
    /// they named.
    join_hosts: Mutex<Vec<String>>,
}

/// What a node knows of another's membership.
pub(crate) enum MemberAddr {
    /// A member, at this address.
    Member(String),
    NotMember,
    /// This node has no membership yet; these hosts may speak to it.
    Joining(Vec<String>),
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Whether the node decides events: its policy is in force, it is a
    /// member, and its Raft core runs.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.is_removed() && self.stopped.borrow().is_none()
    }

    /// Why the Raft core stopped, if it has.
    pub fn raft_stopped(&self) -> Option<String> {
        self.stopped.borrow().clone()
    }

    /// Returns, with the reason, once the Raft core has stopped (never
    /// while it runs).
    pub async fn wait_raft_stopped(&self) -> String {
        let mut stopped = self.stopped.subscribe();
        let why = match stopped.wait_for(|s| s.is_some()).await {
            Ok(why) => why.clone(),
            // The sender lives as long as `self`.
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Whether this node was given a `--policy` that is not the policy
    /// in force (an operator applied another since it started).
    pub fn policy_differs(&self) -> Option<(&str, String)> {
        let mine = self.policy_hash.as_deref()?;
        let cluster = self
            .state
            .read()
            .expect("state lock")
            .policy_hash()
            .to_string();
        (mine != cluster).then_some((mine, cluster))
    }

    /// Events this node dropped, unanswered, because every caller of
    /// their batch had given up waiting (and decided without the cluster).
    pub fn abandoned_events(&self) -> u64 {
        self.abandoned.load(Ordering::Relaxed)
    }

    pub fn is_removed(&self) -> bool {
        *self.removed.borrow()
    }

    /// Returns once this node is a member, not removed: at once, or when
    /// the leader adds it back.
    async fn wait_member(&self) {
        let mut removed = self.removed.subscribe();
        // Never fails: the sender lives as long as `self`.
        let _ = removed.wait_for(|r| !r).await;
    }

    /// The leader's word on whether this node is a member.
    async fn set_member(&self, member: bool) {
        let was_removed = self.removed.send_replace(!member);
        if was_removed == member {
            if member {
                tracing::info!("added back to the cluster");
            } else {
                tracing::warn!("removed from the cluster: no longer deciding or campaigning");
            }
            let stored = match member {
                true => self.meta.remove(REMOVED_KEY).map(|_| ()),
                false => self.meta.insert(REMOVED_KEY, &[1]).map(|_| ()),
            };
            // flush_async: a flush waits for the disk, which must not
            // hold up the runtime's one thread.
            let flushed = match stored {
                Ok(()) => self.meta.flush_async().await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = flushed {
                tracing::error!(error = %e, "could not store whether this node is a member");
            }
        }
        self.raft.runtime_config().elect(member);
    }

    /// Where member `id` is, as this node's membership or one of the
    /// `carried` memberships (of the message that names it) says.
    pub(crate) fn member_addr<'a>(
        &self,
        id: NodeId,
        carried: impl Iterator<Item = &'a openraft::Membership<NodeId, PeerNode>>,
    ) -> MemberAddr {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        if let Some(node) = membership.get_node(&id) {
            return MemberAddr::Member(node.addr.clone());
        }
        let empty = membership.nodes().next().is_none();
        for other in carried {
            if let Some(node) = other.get_node(&id) {
                return MemberAddr::Member(node.addr.clone());
            }
        }
        if empty {
            let hosts = self.join_hosts.lock().expect("join hosts lock");
            return MemberAddr::Joining(hosts.iter().map(|h| host_of(h).to_string()).collect());
        }
        MemberAddr::NotMember
    }

    pub fn state(&self) -> &SharedState {
        &self.state
    }

    /// A channel to a peer, kept for the next forward: one HTTP/2
    /// connection carries every forwarded batch.
    fn channel_to(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut peers = self.peers.lock().expect("peers lock");
        if let Some(c) = peers.get(addr) {
            return Ok(c.clone());
        }
        let c = network::channel(addr, self.tls.as_ref())?;
        peers.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Gives `n` request ids of this incarnation.
    fn next_seqs(&self, n: u64) -> u64 {
        self.seq.fetch_add(n, Ordering::Relaxed)
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// How many voters the membership this node knows has.
    pub fn voters(&self) -> usize {
        self.raft
            .server_metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .count()
    }

    /// The leader and its address, as this node knows them. Called for
    /// every batch: reads the metrics in place rather than copying them.
    fn leader_addr(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// Decides events: the batcher gathers them with other callers' into
    /// one log entry.
    pub async fn decide(&self, events: Vec<Event>) -> Result<Vec<Verdict>, NodeError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(NodeError::ShuttingDown);
        }
        if self.is_removed() {
            return Err(NodeError::Removed);
        }
        if !self.is_ready() {
            return Err(NodeError::NotReady);
        }
        // Rechecks alone are reads: no entry, and no wait behind the batches
        // being written.
        if !events.iter().any(Event::is_write) {
            return Ok(self.read_local(events.iter()));
        }
        let first = self.next_seqs(events.len() as u64);
        let events = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let id = RequestId {
                    origin: self.incarnation,
                    seq: first + i as u64,
                };
                (id, e)
            })
            .collect();
        self.enqueue(self.sender(), events).await
    }

    /// Decides read-only events (rechecks) from this node's applied state,
    /// with no round to the leader: every limit that spans sessions is
    /// decided by a write, so a recheck may see a state a round behind.
    pub fn read_local<'a>(&self, events: impl Iterator<Item = &'a Event>) -> Vec<Verdict> {
        let state = self.state.read().expect("state lock");
        let now = self.cluster_now_ms().max(state.now_ms()) / 1000;
        events.map(|e| state.engine().read(e, now)).collect()
    }

    /// The cluster's time now, in ms since the Unix epoch; this host's
    /// wall clock while no stamp is known.
    pub fn cluster_now_ms(&self) -> u64 {
        let clock = self.clock.lock().expect("clock lock");
        clock
            .now_ms(std::time::Instant::now())
            .unwrap_or_else(now_ms)
    }

    /// The stamp for an entry this leader writes now (ms since the Unix
    /// epoch): the cluster's time; this host's wall clock starts it only
    /// when no stamp is known at all (a new cluster).
    fn stamp_ms(&self) -> u64 {
        let mut clock = self.clock.lock().expect("clock lock");
        clock.stamp(std::time::Instant::now(), now_ms())
    }

    /// How far this host's wall clock is ahead of the cluster's time, in
    /// ms (negative: behind); `None` while no stamp is known.
    pub fn clock_offset_ms(&self) -> Option<i64> {
        let clock = self.clock.lock().expect("clock lock");
        clock.offset_ms(std::time::Instant::now(), now_ms())
    }

    /// Keeps this host's clock offset (ms) for the next start.
    async fn store_clock_offset(&self, offset_ms: i64) {
        let stored = match self.meta.insert(CLOCK_OFFSET_KEY, &offset_ms.to_be_bytes()) {
            Ok(_) => self.meta.flush_async().await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::warn!(error = %e, "the clock offset was not stored");
        }
    }

    /// This node as the sender of events.
    fn sender(&self) -> Sender {
        Sender {
            origin: self.incarnation,
            ttl_ms: self.lease_ttl.as_millis() as u64,
        }
    }

    /// Hands identified events to the batcher and waits for their verdicts.
    async fn enqueue(
        &self,
        sender: Sender,
        events: Vec<(RequestId, Event)>,
    ) -> Result<Vec<Verdict>, NodeError> {
        let (reply, answer) = oneshot::channel();
        let pending = batcher::Pending {
            sender,
            events,
            reply,
        };
        self.batches
            .send(pending)
            .await
            .map_err(|_| NodeError::ShuttingDown)?;
        // Whatever becomes of the batch, the caller hears within the
        // deadline; a batch no caller waits for any more is dropped.
        match tokio::time::timeout(leader::PROPOSE_DEADLINE, answer).await {
            Ok(answer) => answer.map_err(|_| NodeError::ShuttingDown)?,
            Err(_) => Err(NodeError::NoLeader(format!(
                "not decided within {} s",
                leader::PROPOSE_DEADLINE.as_secs()
            ))),
        }
    }
}
