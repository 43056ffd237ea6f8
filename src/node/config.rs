//! How a node is configured: its identity, addresses, data dir, how it
//! enters the cluster, and Raft's timing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::NodeError;
use crate::policy::PolicyFile;
use crate::raft::network::MAX_MESSAGE_BYTES;
use crate::raft::peer_auth::ClusterSecret;
use crate::raft::state::DEFAULT_LEASE_TTL_MS;
use crate::raft::NodeId;
use crate::tls::Tls;

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
    /// gRPC address to bind for clients: milters, `relayratectl`, health
    /// checks (port 0 picks one).
    pub listen: SocketAddr,
    /// gRPC address to bind for the other nodes (the `Raft` service);
    /// `None`: [`default_peer_listen`] of `listen`.
    pub peer_listen: Option<SocketAddr>,
    /// Address peers reach this node's peer listener at; the bound
    /// address if `None`.
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// Policy files (read and validated) to put in force if the
    /// cluster's differs: the operator's explicit `--policy`, which wins
    /// over the cluster's at each start (loudly when they differ).
    pub policy: Vec<PolicyFile>,
    /// Policy files put in force only by the start that creates the
    /// cluster (bootstrap of an empty data dir) when `policy` is empty:
    /// a node that resumes or joins keeps the cluster's policy, so that a
    /// restart never undoes `relayratectl policy apply`.
    pub default_policy: Vec<PolicyFile>,
    pub start: Start,
    /// How long this node's open-connection leases outlive its silence.
    pub lease_ttl: Duration,
    pub raft: RaftTuning,
    /// Mutual TLS on the gRPC port and to the peers.
    pub tls: Option<Tls>,
    /// Admin writes need this bearer token when set; so do joining and
    /// policy changes forwarded between nodes.
    pub admin_token: Option<String>,
    /// Authenticates peer calls (with or without TLS). Without it and
    /// without TLS, the node accepts no peer and cannot join one.
    pub cluster_secret: Option<ClusterSecret>,
}

/// How far the peer port is from the client port by default.
pub const PEER_PORT_OFFSET: u16 = 10;

/// The peer listener beside a client listener: same address, port + 10
/// (7450 gives 7460); port 0 stays 0.
pub fn default_peer_listen(listen: SocketAddr) -> SocketAddr {
    let port = match listen.port() {
        0 => 0,
        p => p.saturating_add(PEER_PORT_OFFSET),
    };
    SocketAddr::new(listen.ip(), port)
}

impl NodeConfig {
    pub fn new(id: NodeId, listen: SocketAddr, data_dir: PathBuf, start: Start) -> NodeConfig {
        NodeConfig {
            id,
            listen,
            peer_listen: None,
            advertise: None,
            data_dir,
            policy: Vec::new(),
            default_policy: Vec::new(),
            start,
            lease_ttl: Duration::from_millis(DEFAULT_LEASE_TTL_MS),
            raft: RaftTuning::default(),
            tls: None,
            admin_token: None,
            cluster_secret: None,
        }
    }
}

pub(super) fn raft_config(t: &RaftTuning) -> Result<openraft::Config, NodeError> {
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
