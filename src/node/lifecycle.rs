//! Starting and stopping a node: open the data dir, start Raft and the gRPC
//! server, bootstrap, join or resume; heartbeats and policy sync in the
//! background; graceful shutdown and, for tests, a crash.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::config::{default_peer_listen, raft_config, NodeConfig, Start};
use super::leader::{forward, Proposal, ProposalReply};
use super::retry::{Backoff, Reasons};
use super::{admin, batcher, services, Node, NodeError};
use crate::policy::PolicyFile;
use crate::proto::v1::admin_server::AdminServer;
use crate::proto::v1::limiter_server::LimiterServer;
use crate::proto::v1::raft_server::RaftServer;
use crate::raft::log_store::LogStore;
use crate::raft::network::{Network, MAX_MESSAGE_BYTES};
use crate::raft::peer_auth::PeerAuth;
use crate::raft::state::policy_hash;
use crate::raft::state_machine::{initial_state, StateMachine};
use crate::raft::{Command, Node as PeerNode, NodeId, Raft, Response};

/// A started node: its addresses, and how to stop it.
pub struct NodeHandle {
    pub node: Arc<Node>,
    /// The client listener (Limiter, Admin, health).
    pub addr: SocketAddr,
    /// The peer listener (Raft).
    pub peer_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    /// The client server, then the peer server.
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
            if queued == 0 && node.in_flight.is_idle() {
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
        Ok(m) => match m.current_leader {
            Some(leader) => tracing::info!(new_leader = leader, "leadership handed over"),
            None => tracing::info!("leadership handed over"),
        },
        // openraft's error carries the whole metrics dump: say it plainly.
        Err(_) => tracing::warn!(
            waited_ms = wait.as_millis() as u64,
            "leadership not handed over: no other node became leader in time"
        ),
    }
}

/// Starts a node and returns once it serves; joining and putting the
/// policy in force go on in the background.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    let auth = PeerAuth::new(
        config.id,
        config.cluster_secret.clone(),
        config.tls.is_some(),
    );
    std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    wait_writable(&config.data_dir).await?;
    let storage = |e: &dyn std::fmt::Display| NodeError::Storage(e.to_string());
    // On a blocking thread: opening sled and restoring the snapshot take
    // time with the keys, and the runtime's thread meanwhile serves
    // /metrics and hears a stop signal.
    let data_dir = config.data_dir.clone();
    let (db, mut log, mut sm) = tokio::task::spawn_blocking(move || {
        let db = sled::open(data_dir.join("sled")).map_err(|e| NodeError::DataDir {
            path: data_dir.clone(),
            source: std::io::Error::other(e),
        })?;
        let log = LogStore::open(&db).map_err(|e| storage(&e))?;
        let sm = StateMachine::open(&db).map_err(|e| storage(&e))?;
        Ok::<_, NodeError>((db, log, sm))
    })
    .await
    .map_err(|e| storage(&e))??;
    {
        use openraft::storage::RaftLogStorage;
        let end = log.get_log_state().await.map_err(|e| storage(&e))?;
        sm.replays_until(end.last_log_id.map_or(0, |l| l.index));
    }
    let state = sm.shared();
    let clock = sm.clock();
    let meta = db.open_tree("node_meta").map_err(|e| storage(&e))?;
    // After a stop, the log's last stamp is behind by the time the node was
    // down: with the offset measured in the last run, this host's clock
    // tells the cluster's time now (forward only; live stamps win after).
    if let Some(offset) = super::stored_clock_offset(&meta) {
        let now = i128::from(super::now_ms()) - i128::from(offset);
        if let Ok(now) = u64::try_from(now) {
            clock
                .lock()
                .expect("clock lock")
                .observe(now, Instant::now());
        }
    }
    let raft = Raft::new(
        config.id,
        Arc::new(raft_config(&config.raft)?),
        Network {
            tls: config.tls.clone(),
            auth: auth.clone(),
            reach: Default::default(),
        },
        log,
        sm,
    )
    .await
    .map_err(|e| NodeError::Raft(e.to_string()))?;

    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    // The operator's --policy at every start; the default one only for
    // a new cluster: a restart keeps the cluster's policy.
    let policy_files = match (config.policy.is_empty(), &config.start) {
        (false, _) => config.policy.clone(),
        (true, Start::Bootstrap) if !initialized => config.default_policy.clone(),
        (true, _) => Vec::new(),
    };
    if matches!(config.start, Start::Join(_)) && !auth.accepts_peers() {
        let _ = raft.shutdown().await;
        return Err(NodeError::NoPeerAuth);
    }
    if !auth.accepts_peers() {
        tracing::warn!(
            "no cluster secret and no TLS: this node accepts no peer, so no node can join it \
             (see --cluster-secret-file)"
        );
    }
    let (listener, addr) = bind(config.listen).await?;
    let peer_listen = config
        .peer_listen
        .unwrap_or_else(|| default_peer_listen(config.listen));
    let (peer_listener, peer_addr) = bind(peer_listen).await?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| peer_addr.to_string());

    let removed = meta
        .contains_key(super::REMOVED_KEY)
        .map_err(|e| storage(&e))?;
    if removed {
        tracing::warn!("this node was removed from the cluster: it waits to be added back");
        raft.runtime_config().elect(false);
    }
    let (batch_tx, batch_rx) = mpsc::channel(4096);
    let node = Arc::new(Node {
        id: config.id,
        incarnation: incarnation(config.id),
        seq: AtomicU64::new(1),
        raft: raft.clone(),
        state,
        clock,
        batches: batch_tx,
        in_flight: batcher::InFlight::default(),
        draining: AtomicBool::new(false),
        removed: tokio::sync::watch::Sender::new(removed),
        abandoned: AtomicU64::new(0),
        meta,
        ready: AtomicBool::new(policy_files.is_empty()),
        stopped: tokio::sync::watch::Sender::new(None),
        policy_hash: (!config.policy.is_empty()).then(|| policy_hash(&config.policy)),
        lease_ttl: config.lease_ttl,
        peers: Mutex::new(HashMap::new()),
        tls: config.tls.clone(),
        auth,
        admin_token: config.admin_token.clone(),
        join_hosts: Mutex::new(match &config.start {
            Start::Join(seeds) => seeds.split(',').map(|s| s.trim().to_string()).collect(),
            _ => Vec::new(),
        }),
    });

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (health, health_service) = tonic_health::server::health_reporter();
    let server = {
        let limiter = LimiterServer::new(services::LimiterService::new(node.clone()));
        let admin = AdminServer::new(admin::AdminService::new(
            node.clone(),
            config.admin_token.clone(),
        ));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| NodeError::Raft(format!("reflection: {e}")))?;
        let raft_service = RaftServer::new(services::RaftService::new(node.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        // The shape and freshness of a call's proof are checked on its
        // headers, before its message is read (the MAC, over the message,
        // after).
        let precheck = node.auth.clone();
        let peers = tonic::service::interceptor::InterceptedService::new(
            raft_service,
            move |request: tonic::Request<()>| {
                precheck
                    .precheck(request.metadata(), super::now_ms())
                    .map(|()| request)
            },
        );
        let tls = config.tls.as_ref().map(|t| t.server_config());
        let (peer_stop_tx, peer_stop_rx) = oneshot::channel::<()>();
        let clients = server_builder(tls.clone())?
            .add_service(limiter)
            .add_service(admin)
            .add_service(health_service)
            .add_service(reflection)
            .serve_with_incoming_shutdown(incoming(listener), async {
                let _ = stop_rx.await;
                let _ = peer_stop_tx.send(());
            });
        // Peers on their own listener, so that firewalls and the
        // NetworkPolicy can keep everyone else away from it.
        let peer_server = server_builder(tls)?
            .add_service(peers)
            .serve_with_incoming_shutdown(incoming(peer_listener), async {
                let _ = peer_stop_rx.await;
            });
        tokio::spawn(async move {
            let (clients, peers) = tokio::join!(clients, peer_server);
            for (which, result) in [("client", clients), ("peer", peers)] {
                if let Err(e) = result {
                    tracing::error!(error = %e, "gRPC {which} server failed");
                }
            }
        })
    };

    if !initialized {
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
    tasks.push(tokio::spawn(watch_clock(node.clone())));
    tasks.push(tokio::spawn(report_health(node.clone(), health)));
    if !policy_files.is_empty() {
        tasks.push(tokio::spawn(sync_policy(node.clone(), policy_files)));
    }
    tracing::info!(id = config.id, %addr, incarnation = node.incarnation, "node serving");
    Ok(NodeHandle {
        node,
        addr,
        peer_addr,
        stop: Some(stop_tx),
        server,
        batcher,
        tasks,
        db,
    })
}

/// Bytes a node must be able to write in its data dir before it opens
/// its log: room for sled to open and for a few log segments.
const START_ROOM: usize = 1 << 20;

/// Waits until [`START_ROOM`] bytes can be written (and synced) in the
/// data dir: a node whose disk is full waits, saying why, instead of
/// opening a log it cannot write; it starts by itself once there is room.
/// Other errors (no permission) are returned.
async fn wait_writable(dir: &std::path::Path) -> Result<(), NodeError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut waited = false;
    loop {
        match write_probe(dir) {
            Ok(()) => {
                crate::metrics::set_data_dir_writable(true);
                if waited {
                    tracing::info!(data_dir = %dir.display(), "the data dir is writable again: starting");
                }
                return Ok(());
            }
            Err(e) if is_full(&e) => {
                crate::metrics::set_data_dir_writable(false);
                if !waited {
                    tracing::error!(
                        data_dir = %dir.display(),
                        error = %e,
                        "cannot write the data dir: waiting for room before starting (not ready)"
                    );
                }
                waited = true;
                backoff.wait().await;
            }
            Err(source) => {
                return Err(NodeError::DataDir {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

fn write_probe(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join("write-probe");
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; START_ROOM])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    written
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), NodeError> {
    let listen = |source| NodeError::Listen { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(listen)?;
    let bound = listener.local_addr().map_err(listen)?;
    Ok((listener, bound))
}

/// Accepted sockets, with TCP_NODELAY set here: tonic only sets it on
/// listeners it binds itself. Without it, Nagle's algorithm meets delayed
/// ACKs and replies stall for 40 ms.
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |socket| socket.and_then(|s| s.set_nodelay(true).map(|()| s)),
    )
}

/// A gRPC server, with mutual TLS when the cluster uses it.
fn server_builder(
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<tonic::transport::Server, NodeError> {
    let builder = tonic::transport::Server::builder();
    match tls {
        Some(tls) => builder
            .tls_config(tls)
            .map_err(|e| NodeError::Tls(e.to_string())),
        None => Ok(builder),
    }
}

/// A number unique to this start of this node: request ids and lease
/// owners of an earlier run never collide with this one's.
fn incarnation(id: NodeId) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos << 8) ^ id ^ u64::from(std::process::id()) << 40
}

/// Asks the seeds in turn (`seeds`: one address or several, separated by
/// commas; then the leader they point to) to add this node, until this
/// node sees itself a voter. Waits longer after each refusal (up to
/// [`MAX_RETRY_WAIT`]); logs a refusal when its reason is new.
async fn join(node: Arc<Node>, seeds: String, advertise: String) {
    let seeds: Vec<String> = seeds.split(',').map(|s| s.trim().to_string()).collect();
    let mut backoff = Backoff::new(Duration::from_millis(100), MAX_RETRY_WAIT);
    let mut reasons = Reasons::default();
    for attempt in 0.. {
        let voter = {
            let metrics = node.raft.metrics();
            let m = metrics.borrow();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == node.id);
            voter
        };
        if voter {
            tracing::info!("joined the cluster");
            return;
        }
        let proposal = Proposal::Join {
            id: node.id,
            addr: advertise.clone(),
            fresh: true,
        };
        let seed = &seeds[attempt % seeds.len()];
        let target = node.leader_addr().map_or(seed.clone(), |(_, a)| a);
        // The leader that will replicate to this node may be any member:
        // with TLS, their certificates are the ones to accept.
        if let ProposalReply::Members(members) = forward(&node, &target, &Proposal::Members).await {
            let mut hosts = node.join_hosts.lock().expect("join hosts lock");
            for m in members {
                if !hosts.contains(&m.addr) {
                    hosts.push(m.addr);
                }
            }
        }
        match forward(&node, &target, &proposal).await {
            ProposalReply::Joined => {
                tracing::info!(%target, "joined the cluster");
                return;
            }
            other => {
                let reply = other.to_string();
                // Asking again will not help: say what to fix, loudly.
                let refused = matches!(other, ProposalReply::Refused(_));
                let new = reasons.is_new(&reply);
                if new && refused {
                    tracing::warn!(
                        %target,
                        %reply,
                        "join refused: is --cluster-secret-file the cluster's secret (and \
                         --admin-token-file its token, if it has one)?"
                    );
                } else if new {
                    tracing::info!(%target, %reply, "join: not yet");
                } else {
                    tracing::debug!(%target, %reply, "join: not yet");
                }
            }
        }
        backoff.wait().await;
    }
}

/// The longest wait between two attempts of a retry loop.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

/// Keeps the gRPC health service true: "liveness" serves while the
/// process does; "" (the whole server) and the Limiter serve once the node
/// is a member that knows its leader, has applied the log and has its
/// policy in force.
async fn report_health(node: Arc<Node>, health: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    health
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    let mut serving = None;
    // Rounds the policies have differed (a node that just put its
    // --policy in force may take a round to apply it).
    let mut differs = 0u32;
    loop {
        if node.raft_stopped().is_none() {
            if let Some(why) = core_stopped(&node).await {
                tracing::error!(
                    reason = %why,
                    "the Raft core stopped: this node is not ready, and its process exits \
                     (its supervisor starts it again)"
                );
                node.stopped.send_replace(Some(why));
            }
        }
        // Loudly, once each time it starts: the operator's --policy will
        // put its own back at this node's next start.
        differs = match node.is_ready() && node.policy_differs().is_some() {
            true => differs.saturating_add(1),
            false => 0,
        };
        if differs == 4 {
            if let Some((mine, cluster)) = node.policy_differs() {
                tracing::warn!(
                    policy_hash = %mine,
                    cluster_policy_hash = %cluster,
                    "the cluster's policy is not this node's --policy: a restart of this node \
                     puts its --policy back in force (change --policy, or start without it)"
                );
            }
        }
        let now = node.is_ready() && {
            let metrics = node.raft.metrics();
            let m = metrics.borrow();
            let member = m
                .membership_config
                .membership()
                .get_node(&node.id)
                .is_some();
            member && m.current_leader.is_some() && m.last_applied.is_some()
        };
        if serving != Some(now) {
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            // The Limiter first: once the whole node answers SERVING, its
            // service does too (a check between the two found it unknown).
            health
                .set_service_status("relayrate.v1.Limiter", status)
                .await;
            health.set_service_status("", status).await;
            tracing::info!(serving = now, "health");
            serving = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Compares this host's wall clock with the cluster's time every second:
/// the offset goes to a metric (and, when it moved by more than 0.5 s, to
/// `node_meta` for the next start). An offset beyond a second is logged at
/// WARN once it has lasted past the next heartbeat entry (a node catching
/// up applies old stamps, and is behind until a new one comes), then once
/// a minute while it lasts, and at INFO when it ends.
async fn watch_clock(node: Arc<Node>) {
    const EVERY: Duration = Duration::from_secs(1);
    const REPEAT: Duration = Duration::from_secs(60);
    const STORE_CHANGE_MS: u64 = 500;
    let patience = node.lease_ttl / 3 + Duration::from_secs(5);
    let mut off_since: Option<Instant> = None;
    let mut warned: Option<Instant> = None;
    let mut stored = super::stored_clock_offset(&node.meta);
    loop {
        if let Some(offset) = node.clock_offset_ms() {
            if stored.is_none_or(|s| s.abs_diff(offset) > STORE_CHANGE_MS) {
                node.store_clock_offset(offset).await;
                stored = Some(offset);
            }
            crate::metrics::set_clock_offset(offset);
            let seconds = offset as f64 / 1000.0;
            if offset.unsigned_abs() > crate::clock::OFFSET_WARN_MS {
                let since = *off_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= patience && warned.is_none_or(|t| t.elapsed() >= REPEAT) {
                    tracing::warn!(
                        offset_seconds = seconds,
                        "this host's clock differs from the cluster's time by more than a second: \
                         entries are stamped with the cluster's time, but fix the host's clock (NTP)"
                    );
                    warned = Some(Instant::now());
                }
            } else {
                if warned.is_some() {
                    tracing::info!(
                        offset_seconds = seconds,
                        "this host's clock agrees with the cluster's time again"
                    );
                }
                off_since = None;
                warned = None;
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// Why the Raft core stopped, if it has: a storage error it reported, or
/// a core that no longer answers because it ended (a panic). A core busy
/// for a moment is not stopped.
async fn core_stopped(node: &Node) -> Option<String> {
    if let Err(fatal) = &node.raft.metrics().borrow().running_state {
        return Some(fatal.to_string());
    }
    let asked = node.raft.with_raft_state(|_| ());
    match tokio::time::timeout(Duration::from_secs(1), asked).await {
        Ok(Err(fatal)) => Some(fatal.to_string()),
        Ok(Ok(())) | Err(_) => None,
    }
}

/// Tells the cluster this node is alive, every third of its lease TTL.
/// A removed node waits, silent, to be added back.
async fn heartbeat(node: Arc<Node>) {
    let every = (node.lease_ttl / 3).max(Duration::from_millis(100));
    let mut reasons = Reasons::default();
    loop {
        node.wait_member().await;
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
            match node.propose(hb).await {
                Ok(_) => reasons = Reasons::default(),
                // Removed meanwhile: the loop's start waits.
                Err(NodeError::Removed) => continue,
                Err(e) => {
                    let why = e.to_string();
                    if reasons.is_new(&why) {
                        tracing::warn!(error = %why, "heartbeat not written");
                    }
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Puts this node's `--policy` in force if the cluster's differs. Asks
/// again, waiting longer each time, while no leader takes it; a removed
/// node (which no leader answers) waits, silent, to be added back.
async fn sync_policy(node: Arc<Node>, files: Vec<PolicyFile>) {
    let hash = policy_hash(&files);
    let mut backoff = Backoff::new(Duration::from_millis(200), MAX_RETRY_WAIT);
    let mut reasons = Reasons::default();
    loop {
        if node.is_removed() {
            node.wait_member().await;
            backoff.reset();
        }
        // The cluster's policy before, to say loudly what this one replaces.
        let before = match node.at_leader(Proposal::Policy).await {
            Ok(ProposalReply::Policy { hash, .. }) => Some(hash),
            _ => None,
        };
        match node.at_leader(Proposal::EnsurePolicy(files.clone())).await {
            Ok(ProposalReply::Response(Response::Done)) => {
                let initial = initial_state().policy_hash().to_string();
                if let Some(cluster) = before.filter(|b| *b != initial && *b != hash) {
                    tracing::warn!(
                        policy_hash = %hash,
                        cluster_policy_hash = %cluster,
                        "this node's --policy differs from the cluster's policy and replaces it \
                         (a policy applied since is undone; start without --policy to keep \
                         the cluster's)"
                    );
                }
                tracing::info!(%hash, "policy in force");
                node.ready.store(true, Ordering::Relaxed);
                return;
            }
            Ok(ProposalReply::Unchanged) => {
                tracing::info!(%hash, "policy in force");
                node.ready.store(true, Ordering::Relaxed);
                return;
            }
            Ok(other) => {
                // It was validated before start: only a cluster that
                // cannot parse it gets here. Decide with the cluster's.
                tracing::error!(reply = %other, "policy refused: deciding with the cluster's policy");
                node.ready.store(true, Ordering::Relaxed);
                return;
            }
            // Removed meanwhile: the loop's start waits.
            Err(NodeError::Removed) => {}
            Err(e) => {
                let why = e.to_string();
                if reasons.is_new(&why) {
                    tracing::warn!(error = %why, "policy not in force yet: asking again");
                } else {
                    tracing::debug!(error = %why, "policy not in force yet: asking again");
                }
                backoff.wait().await;
            }
        }
    }
}
