//! A relayrate node: one member of the Raft group, serving the `Limiter`
//! service to its milters and the internal `Raft` service to its peers.
//!
//! - [`batcher`] gathers concurrent events into one log entry;
//! - [`Node::propose`] writes a command at the leader, forwarding from a
//!   follower in one RPC;
//! - [`Node::read`] answers read-only events linearizably at the leader;
//! - [`start`] opens the data dir, starts Raft and the gRPC server, and
//!   bootstraps, joins or resumes the cluster.

pub mod batcher;
mod services;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::engine::{Event, Verdict};
use crate::policy::PolicyFile;
use crate::proto::v1::limiter_server::LimiterServer;
use crate::proto::v1::raft_server::RaftServer;
use crate::raft::log_store::LogStore;
use crate::raft::network::{self, Network, MAX_MESSAGE_BYTES};
use crate::raft::state::{policy_hash, DEFAULT_LEASE_TTL_MS};
use crate::raft::state_machine::{SharedState, StateMachine};
use crate::raft::{Command, Node as PeerNode, NodeId, Raft, Request, RequestId, Response, Sender};

/// How a node with an empty data dir enters a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Create a new one-node cluster.
    Bootstrap,
    /// Ask a member (any; it points to the leader) to add this node.
    Join(String),
    /// The data dir must already hold this node's state.
    Resume,
}

/// Raft timing. The defaults suit loopback and LAN clusters.
///
/// openraft gives each AppendEntries RPC one heartbeat interval to
/// complete, the follower's fsync included: a short interval turns a slow
/// disk moment into timeouts and resends, so it is not made shorter than
/// a few hundred milliseconds.
#[derive(Clone, Debug)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Take a snapshot after this many entries...
    pub snapshot_every: u64,
    /// ...and keep this many entries behind it for slow followers.
    pub keep_behind_snapshot: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 500,
            election_min_ms: 1500,
            election_max_ms: 3000,
            snapshot_every: 5000,
            keep_behind_snapshot: 1000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// gRPC address to bind (port 0 picks one).
    pub listen: SocketAddr,
    /// Address peers reach this node at; the bound address if `None`.
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// Policy files (read and validated) to put in force if the
    /// cluster's differs.
    pub policy: Vec<PolicyFile>,
    pub start: Start,
    /// How long this node's open-connection leases outlive its silence.
    pub lease_ttl: Duration,
    pub raft: RaftTuning,
}

impl NodeConfig {
    pub fn new(id: NodeId, listen: SocketAddr, data_dir: PathBuf, start: Start) -> NodeConfig {
        NodeConfig {
            id,
            listen,
            advertise: None,
            data_dir,
            policy: Vec::new(),
            start,
            lease_ttl: Duration::from_millis(DEFAULT_LEASE_TTL_MS),
            raft: RaftTuning::default(),
        }
    }
}

/// Why a node could not start or a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
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
    #[error("no leader could take the request in time: {0}")]
    NoLeader(String),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("raft: {0}")]
    Raft(String),
}

/// What a node asks the leader through the internal `Propose` RPC.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Proposal {
    Command(Command),
    /// Read-only events, answered after a read-index check.
    Read(Vec<Event>),
    /// Add a node as a learner, then as a voter.
    Join {
        id: NodeId,
        addr: String,
    },
    /// Put these files in force unless the cluster's policy is the same.
    EnsurePolicy(Vec<PolicyFile>),
}

/// The leader's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ProposalReply {
    Response(Response),
    Verdicts(Vec<Verdict>),
    Joined,
    /// Not the leader (any more): ask again.
    NotLeader,
    Failed(String),
}

/// Milliseconds since the epoch: the leader's stamp on each entry.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long a proposal may look for a leader before giving up.
const PROPOSE_DEADLINE: Duration = Duration::from_secs(10);

/// A running node, shared by its services and tasks.
pub struct Node {
    pub id: NodeId,
    /// This process's identity in the log: request ids and lease owner.
    pub incarnation: u64,
    seq: AtomicU64,
    pub raft: Raft,
    state: SharedState,
    batches: mpsc::Sender<batcher::Pending>,
    /// Batches being written; all permits free means nothing in flight.
    in_flight: Arc<Semaphore>,
    draining: AtomicBool,
    lease_ttl: Duration,
    /// Channels to the other nodes, by address.
    peers: Mutex<HashMap<String, Channel>>,
}

impl Node {
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
        let c = network::channel(addr)?;
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

    fn leader_addr(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, node.addr))
    }

    /// Decides events: the batcher gathers them with other callers' into
    /// one log entry.
    pub async fn decide(&self, events: Vec<Event>) -> Result<Vec<Verdict>, NodeError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(NodeError::ShuttingDown);
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
        answer.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Writes a command at the leader and returns its response; retries
    /// across leader changes until [`PROPOSE_DEADLINE`]. A retried
    /// `Decide` keeps its request ids, so it is counted once.
    pub async fn propose(&self, command: Command) -> Result<Response, NodeError> {
        match self.at_leader(Proposal::Command(command)).await? {
            ProposalReply::Response(r) => Ok(r),
            other => Err(NodeError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Decides read-only events so that they see every count acknowledged
    /// before they were asked: at the leader, after a read-index check.
    pub async fn read(&self, events: Vec<Event>) -> Result<Vec<Verdict>, NodeError> {
        match self.at_leader(Proposal::Read(events)).await? {
            ProposalReply::Verdicts(v) => Ok(v),
            other => Err(NodeError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Runs a proposal at the leader: here if this node leads, else
    /// forwarded in one RPC. The one place that knows about forwarding.
    async fn at_leader(&self, proposal: Proposal) -> Result<ProposalReply, NodeError> {
        let deadline = Instant::now() + PROPOSE_DEADLINE;
        let mut wait = Duration::from_millis(20);
        loop {
            let reply = match self.leader_addr() {
                Some((leader, _)) if leader == self.id => self.serve_local(proposal.clone()).await,
                Some((_, addr)) => forward(self, &addr, &proposal).await,
                None => ProposalReply::NotLeader,
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
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(500));
        }
    }

    /// A proposal forwarded by another node. A follower's batch of events
    /// joins this leader's next batch, so that one entry serves them all.
    pub async fn serve_forwarded(&self, proposal: Proposal) -> ProposalReply {
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
            Proposal::Read(events) => match self.read_index().await {
                Ok(()) => {
                    let state = self.state.read().expect("state lock");
                    ProposalReply::Verdicts(events.iter().map(|e| state.read(e)).collect())
                }
                Err(reply) => reply,
            },
            Proposal::Join { id, addr } => self.add_member(id, addr).await,
            Proposal::EnsurePolicy(files) => {
                if let Err(reply) = self.read_index().await {
                    return reply;
                }
                let current =
                    self.state.read().expect("state lock").policy_hash() == policy_hash(&files);
                if current {
                    ProposalReply::Response(Response::Done)
                } else {
                    self.write(Command::SetPolicy { files }).await
                }
            }
        }
    }

    /// Appends a command stamped with this leader's clock.
    async fn write(&self, command: Command) -> ProposalReply {
        let request = Request {
            stamp_ms: now_ms(),
            command,
        };
        match self.raft.client_write(request).await {
            Ok(r) => ProposalReply::Response(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                ProposalReply::NotLeader
            }
            Err(e) => ProposalReply::Failed(e.to_string()),
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

    async fn add_member(&self, id: NodeId, addr: String) -> ProposalReply {
        if !self.is_leader() {
            return ProposalReply::NotLeader;
        }
        let voters: Vec<NodeId> = {
            let m = self.raft.metrics().borrow().membership_config.clone();
            m.membership().voter_ids().collect()
        };
        if !voters.contains(&id) {
            if let Err(e) = self
                .raft
                .add_learner(id, PeerNode::new(addr.clone()), true)
                .await
            {
                return ProposalReply::Failed(e.to_string());
            }
            let add = ChangeMembers::AddVoterIds([id].into_iter().collect());
            if let Err(e) = self.raft.change_membership(add, false).await {
                return ProposalReply::Failed(e.to_string());
            }
            tracing::info!(id, %addr, "node joined as a voter");
        }
        ProposalReply::Joined
    }
}

/// Sends a proposal to another node's `Propose` RPC.
async fn forward(node: &Node, addr: &str, proposal: &Proposal) -> ProposalReply {
    let channel = match node.channel_to(addr) {
        Ok(c) => c,
        Err(e) => return ProposalReply::Failed(e.to_string()),
    };
    let mut client = network::client(channel);
    let mut request = tonic::Request::new(network::encode(proposal));
    request.set_timeout(Duration::from_secs(5));
    match client.propose(request).await {
        Ok(reply) => network::decode(&reply.into_inner())
            .unwrap_or_else(|s: tonic::Status| ProposalReply::Failed(s.to_string())),
        Err(status) => ProposalReply::Failed(status.to_string()),
    }
}

/// A started node: its address, and how to stop it.
pub struct NodeHandle {
    pub node: Arc<Node>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    batcher: JoinHandle<()>,
    /// Heartbeats, joining, policy sync.
    tasks: Vec<JoinHandle<()>>,
    db: sled::Db,
}

impl NodeHandle {
    /// Stops gracefully: refuses new events, lets leadership pass to
    /// another voter, finishes in-flight requests, flushes, stops Raft.
    pub async fn shutdown(mut self) {
        self.node.draining.store(true, Ordering::Relaxed);
        // No more heartbeats: they would keep this node leading.
        self.abort_background().await;
        self.wait_in_flight(Duration::from_secs(5)).await;
        hand_over_leadership(&self.node).await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
        self.stop_tasks().await;
        let _ = self.db.flush_async().await;
    }

    /// Waits (bounded) until no event is queued or being decided.
    async fn wait_in_flight(&self, bound: Duration) {
        let until = Instant::now() + bound;
        let node = &self.node;
        while Instant::now() < until {
            let queued = node.batches.max_capacity() - node.batches.capacity();
            if queued == 0 && node.in_flight.available_permits() == batcher::MAX_IN_FLIGHT {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!("requests still in flight at shutdown");
    }

    async fn abort_background(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    /// Stops at once, as a crash would (minus the process exit): the server
    /// and tasks are aborted, Raft is stopped, nothing is flushed.
    pub async fn kill(mut self) {
        self.server.abort();
        let _ = (&mut self.server).await;
        self.stop_tasks().await;
    }

    async fn stop_tasks(&mut self) {
        self.abort_background().await;
        self.batcher.abort();
        let _ = (&mut self.batcher).await;
        let _ = self.node.raft.shutdown().await;
    }
}

/// If this node leads a cluster of several voters, stop its heartbeats so
/// that another voter takes over, and wait (bounded) until one has.
async fn hand_over_leadership(node: &Node) {
    let m = node.raft.metrics().borrow().clone();
    let voters = m.membership_config.membership().voter_ids().count();
    if m.current_leader != Some(node.id) || voters < 2 {
        return;
    }
    node.raft.runtime_config().heartbeat(false);
    node.raft.runtime_config().elect(false);
    let wait = Duration::from_millis(node.raft.config().election_timeout_max * 3);
    let handed = node
        .raft
        .wait(Some(wait))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != node.id),
            "another leader",
        )
        .await;
    match handed {
        Ok(m) => tracing::info!(new_leader = ?m.current_leader, "leadership handed over"),
        Err(e) => tracing::warn!(error = %e, "leadership not handed over"),
    }
}

fn raft_config(t: &RaftTuning) -> Result<openraft::Config, NodeError> {
    openraft::Config {
        cluster_name: "relayrate".into(),
        heartbeat_interval: t.heartbeat_ms,
        election_timeout_min: t.election_min_ms,
        election_timeout_max: t.election_max_ms,
        install_snapshot_timeout: t.election_max_ms.max(2000),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(t.snapshot_every),
        max_in_snapshot_log_to_keep: t.keep_behind_snapshot,
        // Entries are batches of up to MAX_EVENTS events: keep each
        // AppendEntries small enough to finish well within a heartbeat.
        max_payload_entries: 64,
        snapshot_max_chunk_size: (MAX_MESSAGE_BYTES / 4) as u64,
        ..Default::default()
    }
    .validate()
    .map_err(|e| NodeError::Raft(e.to_string()))
}

/// Starts a node and returns once it serves; joining and putting the
/// policy in force go on in the background.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    let policy_files = config.policy.clone();
    std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let db = sled::open(config.data_dir.join("sled")).map_err(|e| NodeError::DataDir {
        path: config.data_dir.clone(),
        source: std::io::Error::other(e),
    })?;
    let storage = |e: &dyn std::fmt::Display| NodeError::Storage(e.to_string());
    let log = LogStore::open(&db).map_err(|e| storage(&e))?;
    let sm = StateMachine::open(&db).map_err(|e| storage(&e))?;
    let state = sm.shared();
    let raft = Raft::new(
        config.id,
        Arc::new(raft_config(&config.raft)?),
        Network,
        log,
        sm,
    )
    .await
    .map_err(|e| NodeError::Raft(e.to_string()))?;

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Listen {
        addr: config.listen,
        source,
    })?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());

    let (batch_tx, batch_rx) = mpsc::channel(4096);
    let node = Arc::new(Node {
        id: config.id,
        incarnation: incarnation(config.id),
        seq: AtomicU64::new(1),
        raft: raft.clone(),
        state,
        batches: batch_tx,
        in_flight: Arc::new(Semaphore::new(batcher::MAX_IN_FLIGHT)),
        draining: AtomicBool::new(false),
        lease_ttl: config.lease_ttl,
        peers: Mutex::new(HashMap::new()),
    });

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = {
        let limiter = LimiterServer::new(services::LimiterService::new(node.clone()));
        let peers = RaftServer::new(services::RaftService::new(node.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        // Accepted sockets need TCP_NODELAY set here: tonic only sets it on
        // listeners it binds itself. Without it, Nagle's algorithm meets
        // delayed ACKs and replies stall for 40 ms.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |socket| socket.and_then(|s| s.set_nodelay(true).map(|()| s)),
        );
        let fut = tonic::transport::Server::builder()
            .add_service(limiter)
            .add_service(peers)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            });
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        })
    };

    if !raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?
    {
        match &config.start {
            Start::Bootstrap => {
                let members = BTreeMap::from([(config.id, PeerNode::new(advertise.clone()))]);
                raft.initialize(members)
                    .await
                    .map_err(|e| NodeError::Raft(e.to_string()))?;
                tracing::info!(id = config.id, %advertise, "bootstrapped a new cluster");
            }
            Start::Join(_) => {}
            Start::Resume => {
                server.abort();
                let _ = raft.shutdown().await;
                return Err(NodeError::NotInitialized);
            }
        }
    }

    let batcher = tokio::spawn(batcher::run(node.clone(), batch_rx));
    let mut tasks = Vec::new();
    if let Start::Join(seed) = &config.start {
        if !raft.is_initialized().await.unwrap_or(true) {
            tasks.push(tokio::spawn(join(
                node.clone(),
                seed.clone(),
                advertise.clone(),
            )));
        }
    }
    tasks.push(tokio::spawn(heartbeat(node.clone())));
    if !policy_files.is_empty() {
        tasks.push(tokio::spawn(sync_policy(node.clone(), policy_files)));
    }
    tracing::info!(id = config.id, %addr, incarnation = node.incarnation, "node serving");
    Ok(NodeHandle {
        node,
        addr,
        stop: Some(stop_tx),
        server,
        batcher,
        tasks,
        db,
    })
}

/// A number unique to this start of this node: request ids and lease
/// owners of an earlier run never collide with this one's.
fn incarnation(id: NodeId) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos << 8) ^ id ^ u64::from(std::process::id()) << 40
}

/// Asks `seed` (and then the leader it points to) to add this node.
async fn join(node: Arc<Node>, seed: String, advertise: String) {
    let mut wait = Duration::from_millis(100);
    loop {
        let proposal = Proposal::Join {
            id: node.id,
            addr: advertise.clone(),
        };
        let target = node.leader_addr().map_or(seed.clone(), |(_, a)| a);
        match forward(&node, &target, &proposal).await {
            ProposalReply::Joined => {
                tracing::info!(%target, "joined the cluster");
                return;
            }
            other => tracing::info!(%target, reply = ?other, "join: not yet"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Tells the cluster this node is alive, every third of its lease TTL.
async fn heartbeat(node: Arc<Node>) {
    let every = node.lease_ttl / 3;
    loop {
        let member = node
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node.id)
            .is_some();
        if member {
            let hb = Command::Heartbeat {
                origin: node.incarnation,
                ttl_ms: node.lease_ttl.as_millis() as u64,
            };
            if let Err(e) = node.propose(hb).await {
                tracing::warn!(error = %e, "heartbeat not written");
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Puts this node's `--policy` in force if the cluster's differs.
async fn sync_policy(node: Arc<Node>, files: Vec<PolicyFile>) {
    let hash = policy_hash(&files);
    loop {
        match node.at_leader(Proposal::EnsurePolicy(files.clone())).await {
            Ok(ProposalReply::Response(Response::Done)) => {
                tracing::info!(%hash, "policy in force");
                return;
            }
            Ok(other) => {
                tracing::error!(reply = ?other, "policy refused");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "policy not in force yet"),
        }
    }
}
