//! Crash safety: a three-node cluster of real `relayrate node` processes
//! under load; one node at a time is killed with SIGKILL (the leader in
//! some rounds, a follower in others) and restarted from its data dir.
//! Afterwards no acknowledged count may be lost, no event counted twice,
//! no limit exceeded, and every node's sled files must open cleanly and
//! serve again.
//!
//! Counts are read back through the `Limiter` service: a client over its
//! ConnRate limit is refused, and the refusal carries the cluster's count
//! (for a Connect, the count including that Connect; for a Recheck, which
//! counts nothing, the count as it is).
//!
//! On failure the nodes' logs are printed. `RELAYRATE_CRASH_KEEP=1` keeps
//! the data dirs and logs; `RELAYRATE_CRASH_LOG=info` logs more than
//! warnings.

use std::collections::HashMap;
use std::fs::File;
mod common;
use common::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relayrate::convert::event_to_pb;
use relayrate::engine::{ConnId, Event};
use relayrate::node::{Proposal, ProposalReply};
use relayrate::policy::Client;
use relayrate::proto::v1 as pb;
use relayrate::proto::v1::limiter_client::LimiterClient;
use relayrate::raft::peer_auth::PeerAuth;
use relayrate::raft::{Entry, NodeId};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

/// Client addresses of the load and their ConnRate limits: reached early,
/// in the middle and late in the run, so refusals start before, between
/// and after crashes.
const ADDRESSES: [(&str, u64); 4] = [
    ("10.88.0.1", 25),
    ("10.88.0.2", 100),
    ("10.88.0.3", 200),
    ("10.88.0.4", 300),
];
/// The readiness probe's address: its second Connect is refused, which
/// shows that the policy is in force and that writes commit.
const SENTINEL: &str = "10.88.0.100";
/// Kill-and-restart rounds.
const ROUNDS: u64 = 8;
/// Load workers per node.
const WORKERS_PER_NODE: usize = 4;
/// A Decide without an answer by then counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Acknowledged Connects to wait for between the steps of a round.
const PROGRESS: u64 = 40;
/// Deadline for any one condition (election, restart, progress). Generous:
/// on a busy machine a single fsync can take seconds, and with it Raft.
const STEP_DEADLINE: Duration = Duration::from_secs(60);

fn policy_text() -> String {
    let mut text = String::from("CHECK_CONN_RATE YES\nRateWindow 3600\nRateBucket 60\n");
    text.push_str("ConnRate:default 1000000\n");
    for (ip, limit) in ADDRESSES {
        text.push_str(&format!("ConnRate:{ip} {limit}\n"));
    }
    text.push_str(&format!("ConnRate:{SENTINEL} 1\n"));
    text
}

fn client_of(ip: &str) -> Client {
    Client::from_ip(ip.parse().expect("an address"))
}

// ---------------------------------------------------------------------------
// Node processes

/// How a node process is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartMode {
    Bootstrap,
    /// Join through node 1.
    Join,
    /// An existing data dir: neither flag.
    Resume,
}

struct NodeProc {
    id: NodeId,
    /// The client listener.
    addr: String,
    /// The peer listener.
    peer: String,
    data_dir: PathBuf,
    child: Option<Child>,
    /// Starts so far; each has its own log files.
    runs: u32,
}

impl NodeProc {
    fn stdout_path(&self, dir: &Path, run: u32) -> PathBuf {
        dir.join(format!("node{}-run{run}.out", self.id))
    }

    fn stderr_path(&self, dir: &Path, run: u32) -> PathBuf {
        dir.join(format!("node{}-run{run}.err", self.id))
    }
}

struct Cluster {
    dir: TempDir,
    policy: PathBuf,
    nodes: Vec<NodeProc>,
    started: Instant,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = dir.path().join("ze-policy.txt");
        std::fs::write(&policy, policy_text()).expect("write the policy");
        let nodes = (1..=3)
            .map(|id| NodeProc {
                id,
                addr: format!("127.0.0.1:{}", free_port()),
                peer: format!("127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("data{id}")),
                child: None,
                runs: 0,
            })
            .collect();
        Cluster {
            dir,
            policy,
            nodes,
            started: Instant::now(),
        }
    }

    fn log(&self, what: &str) {
        println!("[{:6.2}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    fn peers(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.peer.clone()).collect()
    }

    fn spawn(&mut self, i: usize, mode: StartMode) {
        let seed = self.nodes[0].peer.clone();
        let dir = self.dir.path().to_path_buf();
        let policy = self.policy.clone();
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "node {} is already running", n.id);
        n.runs += 1;
        let out = File::create(n.stdout_path(&dir, n.runs)).expect("stdout file");
        let err = File::create(n.stderr_path(&dir, n.runs)).expect("stderr file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayrate"));
        cmd.arg("node")
            .arg("--id")
            .arg(n.id.to_string())
            .arg("--listen")
            .arg(&n.addr)
            .arg("--peer-listen")
            .arg(&n.peer)
            .arg("--cluster-secret-file")
            .arg(common::test_secret_file(&dir))
            .arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--policy")
            .arg(&policy)
            // Snapshots and log purges happen during the run, so crashes
            // also land around them.
            .arg("--snapshot-every")
            .arg("200");
        match mode {
            StartMode::Bootstrap => {
                cmd.arg("--bootstrap");
            }
            StartMode::Join => {
                cmd.arg("--join").arg(&seed);
            }
            StartMode::Resume => {}
        }
        // RELAYRATE_CRASH_LOG=info (say) for more than warnings.
        let level = std::env::var("RELAYRATE_CRASH_LOG").unwrap_or_else(|_| "warn".into());
        cmd.env("RELAYRATE_LOG", level)
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        n.child = Some(cmd.spawn().expect("spawn relayrate node"));
        let what = format!("node {} started ({mode:?}, run {})", n.id, n.runs);
        self.log(&what);
    }

    /// Waits for the node's "listening" line on stdout.
    async fn wait_listening(&mut self, i: usize) {
        let deadline = Instant::now() + STEP_DEADLINE;
        let dir = self.dir.path().to_path_buf();
        let line = format!("relayrate node {} listening on", self.nodes[i].id);
        loop {
            let n = &mut self.nodes[i];
            let out = std::fs::read_to_string(n.stdout_path(&dir, n.runs)).unwrap_or_default();
            if out.contains(&line) {
                return;
            }
            let child = n.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("node {} exited before serving: {status}", n.id);
            }
            assert!(
                Instant::now() < deadline,
                "node {} not listening after {STEP_DEADLINE:?}",
                n.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and reap.
    fn kill(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let mut child = n.child.take().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("node {} had already exited: {status}", n.id);
        }
        child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix.
        let status = child.wait().expect("wait");
        let what = format!("node {} killed ({status})", n.id);
        self.log(&what);
    }

    /// SIGTERM to every running node at once; each must exit with 0 in time.
    async fn terminate_all(&mut self) {
        let mut running = Vec::new();
        for n in &mut self.nodes {
            if let Some(child) = n.child.take() {
                let ok = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status()
                    .expect("run kill")
                    .success();
                assert!(ok, "kill -TERM {} failed", child.id());
                running.push((n.id, child));
            }
        }
        let deadline = Instant::now() + STEP_DEADLINE;
        let mut statuses: Vec<(NodeId, ExitStatus)> = Vec::new();
        while !running.is_empty() {
            let mut still = Vec::new();
            for (id, mut child) in running {
                match child.try_wait().expect("try_wait") {
                    Some(status) => statuses.push((id, status)),
                    None => still.push((id, child)),
                }
            }
            running = still;
            if Instant::now() >= deadline {
                let ids: Vec<NodeId> = running.iter().map(|(id, _)| *id).collect();
                // Put them back so that Drop kills them.
                for (id, child) in running {
                    self.nodes[id as usize - 1].child = Some(child);
                }
                panic!("nodes {ids:?} still running {STEP_DEADLINE:?} after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.log("all nodes stopped by SIGTERM");
        for (id, status) in statuses {
            assert!(
                status.success(),
                "node {id} exited with {status} after SIGTERM"
            );
        }
    }

    fn dump_logs(&self) {
        let dir = self.dir.path();
        for n in &self.nodes {
            for run in 1..=n.runs {
                for path in [n.stdout_path(dir, run), n.stderr_path(dir, run)] {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let from = lines.len().saturating_sub(60);
                    eprintln!(
                        "----- {} ({} lines, last {}) -----",
                        path.file_name().unwrap().to_string_lossy(),
                        lines.len(),
                        lines.len() - from
                    );
                    for l in &lines[from..] {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
        // RELAYRATE_CRASH_KEEP=1 keeps the data dirs and logs to look at.
        if std::env::var_os("RELAYRATE_CRASH_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

// ---------------------------------------------------------------------------
// Talking to the nodes

fn limiter(addr: &str) -> LimiterClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("an address")
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
    LimiterClient::new(channel)
}

/// One event, one verdict, within [`REQUEST_TIMEOUT`].
async fn decide(client: &mut LimiterClient<Channel>, event: &Event) -> Result<pb::Verdict, String> {
    let mut request = tonic::Request::new(pb::DecideRequest {
        events: vec![event_to_pb(event)],
    });
    request.set_timeout(REQUEST_TIMEOUT);
    match tokio::time::timeout(REQUEST_TIMEOUT, client.decide(request)).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Ok(Ok(reply)) => reply
            .into_inner()
            .verdicts
            .into_iter()
            .next()
            .ok_or_else(|| "no verdict".to_string()),
    }
}

fn is_conn_rate_refusal(v: &pb::Verdict) -> bool {
    !v.allowed && v.check == pb::Check::ConnRate as i32
}

/// Sends a proposal to a node's internal `Propose` RPC.
/// A proposal to a node's peer listener, signed as node 1 would.
async fn propose(peer: &str, proposal: &Proposal) -> Result<ProposalReply, String> {
    let as_node_1 = PeerAuth::new(1, Some(common::test_secret()), false);
    let call = common::peer_propose(peer, None, &as_node_1, proposal.clone());
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Err(_) => Err("timed out".into()),
        Ok(reply) => reply.map_err(|status| status.to_string()),
    }
}

/// Which of `addrs` (peer addresses) leads: only the leader answers
/// `Members` itself (the others answer `NotLeader`).
async fn find_leader(addrs: &[String]) -> usize {
    let deadline = Instant::now() + STEP_DEADLINE;
    loop {
        let mut leaders = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            if let Ok(ProposalReply::Members(_)) = propose(a, &Proposal::Members).await {
                leaders.push(i);
            }
        }
        if let [one] = leaders[..] {
            return one;
        }
        assert!(
            Instant::now() < deadline,
            "no single leader after {STEP_DEADLINE:?}: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes sure node `id` is a voter: the leader answers `Joined` at once
/// for a voter, and adds a node that is not one yet.
async fn ensure_voter(addrs: &[String], id: NodeId) {
    let deadline = Instant::now() + STEP_DEADLINE;
    let join = Proposal::Join {
        id,
        addr: addrs[id as usize - 1].clone(),
        fresh: false,
    };
    loop {
        let leader = find_leader(addrs).await;
        match propose(&addrs[leader], &join).await {
            Ok(ProposalReply::Joined) => return,
            other => assert!(
                Instant::now() < deadline,
                "node {id} not a voter after {STEP_DEADLINE:?}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a Connect of the sentinel through the node is refused by
/// ConnRate: the node serves, writes commit, and the policy is in force.
async fn wait_ready(addr: &str, conns: &AtomicU64) {
    let deadline = Instant::now() + STEP_DEADLINE;
    let mut client = limiter(addr);
    let mut last: String;
    loop {
        let connect = Event::Connect {
            conn: ConnId {
                owner: 0,
                conn: conns.fetch_add(1, Ordering::Relaxed),
            },
            client: client_of(SENTINEL),
        };
        match decide(&mut client, &connect).await {
            Ok(v) if is_conn_rate_refusal(&v) => return,
            Ok(v) => last = format!("{v:?}"),
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "node at {addr} not ready after {STEP_DEADLINE:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ConnRate count of `ip` in the applied state of the node at `addr`
/// by a Recheck (which counts nothing). The count must be over the limit.
async fn read_count(addr: &str, ip: &str) -> u64 {
    let deadline = Instant::now() + STEP_DEADLINE;
    let mut client = limiter(addr);
    let recheck = Event::Recheck {
        client: client_of(ip),
    };
    loop {
        match decide(&mut client, &recheck).await {
            Ok(v) if is_conn_rate_refusal(&v) => return v.count,
            Ok(v) => panic!("Recheck of {ip} at {addr}: not refused by ConnRate: {v:?}"),
            Err(e) => assert!(
                Instant::now() < deadline,
                "Recheck of {ip} at {addr}: {e} after {STEP_DEADLINE:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Load

/// What the load saw for one client address.
#[derive(Debug, Default)]
struct Tally {
    /// Connects answered Allow.
    allowed: u64,
    /// Connects answered with a refusal.
    refused: u64,
    /// Connects without an answer: they may or may not have been counted.
    errors: u64,
    /// The count each refusal reported: one per event, so all different.
    refusal_counts: Vec<u64>,
    /// The round (0: before the first kill) of the first refusal.
    first_refusal_round: Option<u64>,
}

#[derive(Default)]
struct Load {
    tallies: Mutex<Vec<Tally>>,
    /// Acknowledged Connects of all addresses.
    acked: AtomicU64,
    errors: AtomicU64,
    /// Verdicts that cannot be right, whatever the timing.
    anomalies: Mutex<Vec<String>>,
    /// The kill-and-restart round under way (0 before the first).
    round: AtomicU64,
    stop: AtomicBool,
}

impl Load {
    fn new() -> Load {
        let load = Load::default();
        load.tallies
            .lock()
            .unwrap()
            .resize_with(ADDRESSES.len(), Tally::default);
        load
    }

    fn anomaly(&self, what: String) {
        self.anomalies.lock().unwrap().push(what);
    }
}

/// Sends Connects one after the other, cycling through the addresses.
/// Each worker's own requests are sequential, so for one address a later
/// verdict must see a count higher than an earlier one.
async fn worker(w: u64, addr: String, load: Arc<Load>) {
    let mut client = limiter(&addr);
    let mut last_count: HashMap<usize, u64> = HashMap::new();
    let mut n = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        let a = ((w + n) % ADDRESSES.len() as u64) as usize;
        let (ip, limit) = ADDRESSES[a];
        let connect = Event::Connect {
            conn: ConnId {
                owner: 0,
                conn: (w << 40) | n,
            },
            client: client_of(ip),
        };
        n += 1;
        match decide(&mut client, &connect).await {
            Ok(v) => {
                load.acked.fetch_add(1, Ordering::Relaxed);
                let mut tallies = load.tallies.lock().unwrap();
                let t = &mut tallies[a];
                if v.allowed {
                    t.allowed += 1;
                    if let Some(c) = last_count.get(&a) {
                        load.anomaly(format!(
                            "worker {w} via {addr}: {ip} allowed after a refusal at count {c}"
                        ));
                    }
                } else if !is_conn_rate_refusal(&v) || v.limit != limit || v.count <= limit {
                    load.anomaly(format!("worker {w} via {addr}: {ip}: odd refusal {v:?}"));
                } else {
                    t.refused += 1;
                    t.refusal_counts.push(v.count);
                    t.first_refusal_round
                        .get_or_insert(load.round.load(Ordering::Relaxed));
                    if let Some(&c) = last_count.get(&a) {
                        if v.count <= c {
                            load.anomaly(format!(
                                "worker {w} via {addr}: {ip} count {} after {c}",
                                v.count
                            ));
                        }
                    }
                    last_count.insert(a, v.count);
                }
            }
            Err(_) => {
                load.errors.fetch_add(1, Ordering::Relaxed);
                load.tallies.lock().unwrap()[a].errors += 1;
                // The node may be down: do not spin.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Waits until `more` Connects were acknowledged since now.
async fn wait_progress(load: &Load, more: u64, what: &str) {
    let from = load.acked.load(Ordering::Relaxed);
    let deadline = Instant::now() + STEP_DEADLINE;
    while load.acked.load(Ordering::Relaxed) < from + more {
        assert!(
            Instant::now() < deadline,
            "{what}: fewer than {more} Connects acknowledged in {STEP_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Sled

/// Opens a stopped node's sled db directly: it must open, and its log must
/// hold consecutive, decodable entries up to the last, none of them below
/// the purge mark's next. Says what it found, and whether the log was
/// purged.
fn check_sled(data_dir: &Path) -> (String, bool) {
    let db = sled::open(data_dir.join("sled"))
        .unwrap_or_else(|e| panic!("sled db in {} does not open: {e}", data_dir.display()));
    let log = db.open_tree("raft_log").expect("tree raft_log");
    let meta = db.open_tree("raft_meta").expect("tree raft_meta");
    let mut first = None;
    let mut prev: Option<(u64, u64)> = None;
    let mut entries = 0u64;
    for item in log.iter() {
        let (k, v) = item.expect("raft_log iterates");
        assert_eq!(k.len(), 8, "raft_log key of {} bytes", k.len());
        let index = u64::from_be_bytes(k.as_ref().try_into().unwrap());
        let entry: Entry = bincode::deserialize(&v)
            .unwrap_or_else(|e| panic!("raft_log entry {index} does not decode: {e}"));
        assert_eq!(entry.log_id.index, index, "entry under the wrong key");
        let term = entry.log_id.leader_id.term;
        if let Some((pi, pt)) = prev {
            assert_eq!(index, pi + 1, "raft_log has a gap after {pi}");
            assert!(term >= pt, "raft_log term goes back at {index}");
        }
        first.get_or_insert(index);
        prev = Some((index, term));
        entries += 1;
    }
    let purged: Option<openraft::LogId<NodeId>> = meta
        .get("last_purged")
        .expect("raft_meta reads")
        .map(|b| bincode::deserialize(&b).expect("last_purged decodes"));
    if let (Some(p), Some(f)) = (purged, first) {
        assert!(
            f <= p.index + 1,
            "raft_log starts at {f}, after the purged {}",
            p.index
        );
    }
    let vote = meta.get("vote").expect("raft_meta reads");
    let vote: openraft::Vote<NodeId> =
        bincode::deserialize(&vote.expect("a vote is stored")).expect("the vote decodes");
    for name in db.tree_names() {
        let tree = db.open_tree(&name).expect("tree opens");
        for item in tree.iter() {
            item.expect("every tree iterates");
        }
    }
    let what = format!(
        "{entries} log entries {:?}..={:?}, purged {:?}, vote {vote}",
        first,
        prev.map(|p| p.0),
        purged.map(|p| p.index)
    );
    (what, purged.is_some())
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_count() {
    let mut cluster = Cluster::new();
    let probe_conns = AtomicU64::new(1 << 60);

    cluster.spawn(0, StartMode::Bootstrap);
    cluster.wait_listening(0).await;
    for i in 1..3 {
        cluster.spawn(i, StartMode::Join);
    }
    for i in 1..3 {
        cluster.wait_listening(i).await;
    }
    let addrs = cluster.addrs();
    let peers = cluster.peers();
    for id in 2..=3 {
        ensure_voter(&peers, id).await;
    }
    for a in &addrs {
        wait_ready(a, &probe_conns).await;
    }
    cluster.log("cluster of 3 voters ready, policy in force");

    let load = Arc::new(Load::new());
    let workers: Vec<_> = (0..3 * WORKERS_PER_NODE)
        .map(|w| {
            let addr = addrs[w % 3].clone();
            tokio::spawn(worker(w as u64, addr, load.clone()))
        })
        .collect();

    let mut last_victim = None;
    for round in 0..ROUNDS {
        wait_progress(&load, PROGRESS, "before the kill").await;
        load.round.store(round + 1, Ordering::Relaxed);
        let leader = find_leader(&peers).await;
        // Odd rounds kill the leader, even rounds a follower (not the one
        // killed last, if possible).
        let victim = if round % 2 == 1 {
            leader
        } else {
            (0..3)
                .filter(|&i| i != leader)
                .find(|&i| Some(i) != last_victim)
                .expect("a follower")
        };
        last_victim = Some(victim);
        cluster.log(&format!(
            "round {}: killing node {} ({}), acked so far {}",
            round + 1,
            victim + 1,
            if victim == leader {
                "leader"
            } else {
                "follower"
            },
            load.acked.load(Ordering::Relaxed)
        ));
        cluster.kill(victim);
        for (i, a) in addrs.iter().enumerate() {
            if i != victim {
                wait_ready(a, &probe_conns).await;
            }
        }
        wait_progress(&load, PROGRESS, "with a node down").await;
        cluster.log(&format!("round {}: the other two serve", round + 1));
        cluster.spawn(victim, StartMode::Resume);
        cluster.wait_listening(victim).await;
        wait_ready(&addrs[victim], &probe_conns).await;
        cluster.log(&format!(
            "round {}: node {} serves again",
            round + 1,
            victim + 1
        ));
    }

    // Every address over its limit, so that its count can be read back.
    load.round.store(ROUNDS + 1, Ordering::Relaxed);
    let deadline = Instant::now() + 3 * STEP_DEADLINE;
    while load.tallies.lock().unwrap().iter().any(|t| t.refused == 0) {
        assert!(
            Instant::now() < deadline,
            "some address never reached its limit: {:?}",
            ADDRESSES
                .iter()
                .zip(load.tallies.lock().unwrap().iter())
                .map(|((ip, _), t)| (ip, t.allowed, t.refused))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    cluster.log(&format!(
        "load stopped: {} acknowledged, {} errors",
        load.acked.load(Ordering::Relaxed),
        load.errors.load(Ordering::Relaxed)
    ));

    let anomalies = load.anomalies.lock().unwrap().clone();
    assert!(anomalies.is_empty(), "impossible verdicts: {anomalies:#?}");

    let mut counts = Vec::new();
    let mut tallies = std::mem::take(&mut *load.tallies.lock().unwrap());
    for (a, (ip, limit)) in ADDRESSES.iter().enumerate() {
        let t = &mut tallies[a];
        // Rechecks read each node's applied state: a node restarted last
        // may still be applying what the others hold. They must agree
        // once it has caught up.
        let caught_up = Instant::now() + STEP_DEADLINE;
        let seen = loop {
            let mut seen = Vec::new();
            for addr in &addrs {
                seen.push(read_count(addr, ip).await);
            }
            if seen.iter().all(|&c| c == seen[0]) || Instant::now() > caught_up {
                break seen;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let count = seen[0];
        let acked = t.allowed + t.refused;
        cluster.log(&format!(
            "{ip}: limit {limit}, allowed {}, refused {} (from round {:?}), errors {}, \
             cluster count {seen:?}",
            t.allowed, t.refused, t.first_refusal_round, t.errors
        ));
        assert!(
            seen.iter().all(|&c| c == count),
            "{ip}: nodes disagree on the count: {seen:?}"
        );
        assert!(
            t.allowed <= *limit,
            "{ip}: {} Connects allowed over a limit of {limit}",
            t.allowed
        );
        assert!(
            count >= acked,
            "{ip}: acknowledged Connects lost: {acked} acknowledged, the cluster counts {count}"
        );
        assert!(
            count <= acked + t.errors,
            "{ip}: Connects counted twice: {acked} acknowledged + {} unanswered, \
             the cluster counts {count}",
            t.errors
        );
        t.refusal_counts.sort_unstable();
        let dup = t.refusal_counts.windows(2).find(|w| w[0] == w[1]);
        assert!(
            dup.is_none(),
            "{ip}: two refusals reported the same count {dup:?}: a count was lost or reused"
        );
        let max = t.refusal_counts.last().copied().unwrap_or(0);
        assert!(max <= count, "{ip}: a refusal saw count {max} > {count}");
        counts.push(count);
    }

    // A clean stop, then the sled files as another program finds them.
    cluster.terminate_all().await;
    let mut purged_nodes = 0;
    for n in &cluster.nodes {
        let (what, was_purged) = check_sled(&n.data_dir);
        purged_nodes += usize::from(was_purged);
        cluster.log(&format!("node {} sled: {what}", n.id));
    }
    // With --snapshot-every 200 the nodes snapshot and purge during the
    // run, so crashes land around purges too. One node may still end the
    // run unpurged (seen twice in about 25 runs; a node killed between its
    // snapshot and the purge that follows is one way), not all of them.
    assert!(
        purged_nodes >= 1,
        "no node's log was purged behind a snapshot"
    );

    // Everything restarts from its data dir, and the counts are still there.
    for i in 0..3 {
        cluster.spawn(i, StartMode::Resume);
    }
    for i in 0..3 {
        cluster.wait_listening(i).await;
    }
    for a in &addrs {
        wait_ready(a, &probe_conns).await;
    }
    for (a, (ip, _)) in ADDRESSES.iter().enumerate() {
        for addr in &addrs {
            // Read from the node's applied state: give it the time to apply
            // what the leader committed.
            let caught_up = Instant::now() + STEP_DEADLINE;
            let mut after = read_count(addr, ip).await;
            while after != counts[a] && Instant::now() < caught_up {
                tokio::time::sleep(Duration::from_millis(100)).await;
                after = read_count(addr, ip).await;
            }
            assert_eq!(
                after, counts[a],
                "{ip}: count {after} at {addr} after a full restart, {} before",
                counts[a]
            );
        }
    }
    cluster.log("full restart: counts unchanged");
    cluster.terminate_all().await;
    cluster.log("done");
}
