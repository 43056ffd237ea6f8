//! The Raft transport over tonic: a client per peer for openraft's RPCs,
//! and the server side that hands them to the local Raft. Messages travel
//! as bincode in a `RaftPayload`; replies carry openraft's own result, so
//! a remote Raft error reaches openraft as a remote error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::peer_auth::PeerAuth;
use super::validate::{self, SnapshotChunks};
use super::{Node, NodeId, Raft, TypeConfig};
use crate::bounds::cut;
use crate::proto::v1::raft_client::RaftClient;
use crate::proto::v1::RaftPayload;
use crate::tls::{endpoint, Tls};

/// Largest message between nodes (snapshots go in chunks below this).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

pub fn encode<T: Serialize>(value: &T) -> RaftPayload {
    RaftPayload {
        data: bincode::serialize(value).expect("raft messages encode"),
    }
}

/// Decodes a payload, bounded by its length (see [`super::decode_bounded`]).
pub fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, tonic::Status> {
    super::decode_bounded(&payload.data)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad payload: {e}")))
}

/// A lazily connected channel to a node's gRPC port, over TLS when the
/// cluster uses it.
pub fn channel(addr: &str, tls: Option<&Tls>) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(addr, tls)?.tcp_nodelay(true).connect_lazy())
}

pub fn client(channel: Channel) -> RaftClient<Channel> {
    RaftClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Makes a client per peer.
#[derive(Clone)]
pub struct Network {
    pub tls: Option<Tls>,
    /// Signs every call with this node's proof.
    pub auth: PeerAuth,
    /// Which peers answered their last call, for logging changes only.
    pub reach: Reachability,
}

/// Whether each peer answered its last call. openraft logs every failed
/// call to a peer that is down (every half second, at ERROR); the default
/// log filter mutes those, and this logs the change instead: once when a
/// peer stops answering, once when it answers again.
#[derive(Clone, Default)]
pub struct Reachability(Arc<Mutex<HashMap<NodeId, bool>>>);

impl Reachability {
    fn saw(&self, target: NodeId, addr: &str, failure: Option<&tonic::Status>) {
        let now = failure.is_none();
        let before = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target, now);
        match (before, failure) {
            (Some(true) | None, Some(status)) => tracing::warn!(
                peer = target,
                addr = %cut(addr),
                error = %cut(status.message()),
                "peer unreachable"
            ),
            (Some(false), None) => {
                tracing::info!(peer = target, addr = %cut(addr), "peer reachable again");
            }
            _ => {}
        }
    }
}

pub struct Peer {
    target: NodeId,
    client: Option<RaftClient<Channel>>,
    addr: String,
    auth: PeerAuth,
    reach: Reachability,
}

/// A request for `method` (the RPC's name in snake case) that carries
/// this node's proof.
pub fn signed_request(
    auth: &PeerAuth,
    method: &str,
    payload: RaftPayload,
) -> tonic::Request<RaftPayload> {
    let mut request = tonic::Request::new(payload);
    auth.sign(method, &mut request, crate::node::now_ms());
    request
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Peer {
        Peer {
            target,
            client: channel(&node.addr, self.tls.as_ref()).ok().map(client),
            addr: node.addr.clone(),
            auth: self.auth.clone(),
            reach: self.reach.clone(),
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

impl Peer {
    async fn call<Req, Resp, E>(
        &mut self,
        which: fn(RaftClient<Channel>, tonic::Request<RaftPayload>) -> futures_call::Call,
        method: &str,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.clone() else {
            let e = std::io::Error::other(format!("bad address {}", cut(&self.addr)));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let mut request = signed_request(&self.auth, method, encode(req));
        request.set_timeout(option.hard_ttl());
        let reply = which(client, request).await;
        self.reach
            .saw(self.target, &self.addr, reply.as_ref().err());
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> = decode(&reply.into_inner())
            .map_err(|status| RPCError::Network(NetworkError::new(&status)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// The tonic calls, boxed so that one `call` serves the three RPCs.
mod futures_call {
    use std::future::Future;
    use std::pin::Pin;

    use crate::proto::v1::RaftPayload;

    pub type Call =
        Pin<Box<dyn Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>> + Send>>;
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        let started = std::time::Instant::now();
        let answer = self
            .call(
                |mut c, r| Box::pin(async move { c.append_entries(r).await }),
                "append_entries",
                &rpc,
                &option,
            )
            .await;
        crate::metrics::record_append_entries(!rpc.entries.is_empty(), started.elapsed());
        answer
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(
            |mut c, r| Box::pin(async move { c.install_snapshot(r).await }),
            "install_snapshot",
            &rpc,
            &option,
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(
            |mut c, r| Box::pin(async move { c.vote(r).await }),
            "vote",
            &rpc,
            &option,
        )
        .await
    }
}

/// Hands openraft's RPCs, decoded and admitted, to the local Raft;
/// replies carry its result. Entries that break the bounds of a log
/// entry are refused (INVALID_ARGUMENT).
pub async fn serve_append(
    raft: &Raft,
    req: AppendEntriesRequest<TypeConfig>,
) -> Result<RaftPayload, tonic::Status> {
    validate::append_entries(&req)?;
    Ok(encode(&raft.append_entries(req).await))
}

pub async fn serve_vote(raft: &Raft, req: VoteRequest<NodeId>) -> RaftPayload {
    encode(&raft.vote(req).await)
}

/// `chunks`: the snapshot being received, which each chunk must continue.
pub async fn serve_install_snapshot(
    raft: &Raft,
    chunks: &SnapshotChunks,
    req: InstallSnapshotRequest<TypeConfig>,
) -> Result<RaftPayload, tonic::Status> {
    match chunks.receive(&req) {
        Ok(()) => Ok(encode(&raft.install_snapshot(req).await)),
        Err(refused) => Ok(encode(&refused.answer(&req)?)),
    }
}
