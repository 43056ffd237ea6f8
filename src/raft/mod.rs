//! Raft for the limiter: openraft's type configuration, the sled log store
//! and state machine, and the tonic transport between nodes.

// openraft's storage traits return `StorageError` (over 200 bytes) by value;
// our helpers return it the same way rather than boxing and unboxing.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod peer_auth;
pub mod state;
pub mod state_machine;
pub mod validate;

use std::io::Cursor;

pub use state::{Command, Request, RequestId, Response, Sender};

/// Node ids are small integers chosen by the operator (a pod's ordinal).
pub type NodeId = u64;
/// A node's address for the Raft transport, `host:port`.
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// relayrate's Raft: limiter commands in, responses with verdicts out.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;

/// Decodes bincode that came from a peer or from disk. Nothing it holds
/// can claim more than its own length: a forged length prefix is an error,
/// not an allocation.
pub fn decode_bounded<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> bincode::Result<T> {
    use bincode::Options;
    // The encoding of `bincode::serialize`: fixed-size integers, and
    // trailing bytes allowed.
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(bytes.len() as u64)
        .deserialize(bytes)
}
