//! In-process clusters of three nodes on loopback, each on its own temp
//! dir: limits that hold across nodes, leader loss, restarts, catch-up by
//! snapshot, and lease expiry.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fast_raft;
use relayrate::check::Check;
use relayrate::convert::event_to_pb;
use relayrate::engine::{ConnId, Event};
use relayrate::node::{self, NodeConfig, NodeHandle, Start};
use relayrate::policy::{Client, PolicyFile};
use relayrate::proto::v1::limiter_client::LimiterClient;
use relayrate::proto::v1::DecideRequest;
use tempfile::TempDir;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds or [`DEADLINE`] passes.
async fn eventually<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::eventually_async(what, DEADLINE, cond).await
}

fn policy(text: &str) -> Vec<PolicyFile> {
    vec![PolicyFile {
        name: "test-policy".into(),
        text: text.into(),
    }]
}

struct Cluster {
    dirs: Vec<TempDir>,
    nodes: Vec<Option<NodeHandle>>,
    configs: Vec<NodeConfig>,
}

impl Cluster {
    /// Three voters; node 1 bootstraps with `policy`, 2 and 3 join it.
    async fn start(policy_text: &str, tune: impl Fn(&mut NodeConfig)) -> Cluster {
        let mut c = Cluster {
            dirs: Vec::new(),
            nodes: Vec::new(),
            configs: Vec::new(),
        };
        for id in 1..=3u64 {
            let dir = TempDir::new().unwrap();
            let start = match c.nodes.first() {
                None => Start::Bootstrap,
                Some(first) => Start::Join(first.as_ref().unwrap().peer_addr.to_string()),
            };
            let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let mut config = NodeConfig::new(id, listen, dir.path().to_path_buf(), start);
            config.raft = fast_raft();
            config.cluster_secret = Some(common::test_secret());
            if id == 1 {
                config.policy = policy(policy_text);
            }
            tune(&mut config);
            let handle = node::start(config.clone()).await.expect("node starts");
            // A restart listens where peers know it.
            config.listen = handle.addr;
            config.peer_listen = Some(handle.peer_addr);
            config.start = Start::Resume;
            c.dirs.push(dir);
            c.nodes.push(Some(handle));
            c.configs.push(config);
        }
        c.wait_voters(3).await;
        let hash = relayrate::raft::state::policy_hash(&policy(policy_text));
        for i in 0..3 {
            let node = c.node(i).node.clone();
            let hash = hash.clone();
            eventually("the policy on every node", || {
                let ok = node.state().read().unwrap().policy_hash() == hash;
                async move { ok }
            })
            .await;
        }
        c
    }

    fn node(&self, i: usize) -> &NodeHandle {
        self.nodes[i].as_ref().expect("node running")
    }

    fn running(&self) -> impl Iterator<Item = &NodeHandle> {
        self.nodes.iter().flatten()
    }

    async fn wait_voters(&self, n: usize) {
        for h in self.running() {
            let raft = h.node.raft.clone();
            eventually("voters and a leader", || {
                let m = raft.metrics().borrow().clone();
                let ok = m.current_leader.is_some()
                    && m.membership_config.membership().voter_ids().count() == n;
                async move { ok }
            })
            .await;
        }
    }

    fn leader_index(&self) -> Option<usize> {
        self.running()
            .find_map(|h| h.node.raft.metrics().borrow().current_leader)
            .map(|id| id as usize - 1)
    }

    async fn kill(&mut self, i: usize) {
        self.nodes[i].take().expect("running").kill().await;
    }

    async fn restart(&mut self, i: usize) {
        let handle = start_with_retry(self.configs[i].clone()).await;
        self.nodes[i] = Some(handle);
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dirs[i].path().to_path_buf()
    }
}

/// The sled lock of a killed node goes once its last tasks are gone.
async fn start_with_retry(config: NodeConfig) -> NodeHandle {
    let until = Instant::now() + DEADLINE;
    loop {
        match node::start(config.clone()).await {
            Ok(h) => return h,
            Err(e) if Instant::now() < until => {
                eprintln!("restart not yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("restart failed: {e}"),
        }
    }
}

async fn client(addr: SocketAddr) -> LimiterClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    LimiterClient::new(ch)
}

fn ip_client(ip: &str) -> Client {
    Client::from_ip(ip.parse().unwrap())
}

static CONN: AtomicU64 = AtomicU64::new(1);

fn connect(ip: &str) -> Event {
    Event::Connect {
        conn: ConnId {
            owner: 0,
            conn: CONN.fetch_add(1, Ordering::Relaxed),
        },
        client: ip_client(ip),
    }
}

/// Sends one event; `Some(allowed)` when a verdict came back.
async fn decide(c: &mut LimiterClient<Channel>, e: &Event) -> Option<bool> {
    let r = c
        .decide(DecideRequest {
            events: vec![event_to_pb(e)],
        })
        .await
        .ok()?;
    r.into_inner().verdicts.first().map(|v| v.allowed)
}

fn count_on(h: &NodeHandle, check: Check, ip: &str) -> u64 {
    let state = h.node.state().read().unwrap();
    state
        .engine()
        .count_of(check, &ip_client(ip), state.now_ms() / 1000)
}

/// `per_node` tasks per node each send `each` Connects for `ip`; returns
/// (allowed, refused, errors).
async fn hammer(
    addrs: &[SocketAddr],
    ip: &'static str,
    per_node: usize,
    each: usize,
) -> (u64, u64, u64) {
    let mut tasks = Vec::new();
    for addr in addrs {
        for _ in 0..per_node {
            let addr = *addr;
            tasks.push(tokio::spawn(async move {
                let mut c = client(addr).await;
                let mut tally = (0, 0, 0);
                for _ in 0..each {
                    match decide(&mut c, &connect(ip)).await {
                        Some(true) => tally.0 += 1,
                        Some(false) => tally.1 += 1,
                        None => tally.2 += 1,
                    }
                }
                tally
            }));
        }
    }
    let mut total = (0, 0, 0);
    for t in tasks {
        let (a, r, e) = t.await.unwrap();
        total = (total.0 + a, total.1 + r, total.2 + e);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limit_hammered_through_three_nodes_allows_exactly_n() {
    let c = Cluster::start("CHECK_CONN_RATE YES\nConnRate:10.1.0.1 50\n", |_| {}).await;
    let addrs: Vec<_> = c.running().map(|h| h.addr).collect();
    let (allowed, refused, errors) = hammer(&addrs, "10.1.0.1", 4, 25).await;
    assert_eq!(errors, 0);
    assert_eq!(allowed, 50, "refused {refused}");
    assert_eq!(allowed + refused, 300);
    // Every node holds the same count once it has applied the log.
    for i in 0..3 {
        let h = c.node(i);
        eventually("the count on every node", || {
            let n = count_on(h, Check::ConnRate, "10.1.0.1");
            async move { n == 300 }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_mid_run_lets_nothing_above_the_limit_and_decisions_resume() {
    let mut c = Cluster::start("CHECK_CONN_RATE YES\nConnRate:10.1.0.2 200\n", |_| {}).await;
    let addrs: Vec<_> = c.running().map(|h| h.addr).collect();
    let load = tokio::spawn(async move { hammer(&addrs, "10.1.0.2", 3, 60).await });
    // Let some decisions happen, then kill the leader.
    let leader = c.leader_index().unwrap();
    let before = c.node(leader).node.clone();
    eventually("load under way", || {
        let n = count_on_node(&before, "10.1.0.2");
        async move { n >= 40 }
    })
    .await;
    drop(before);
    c.kill(leader).await;
    let (allowed, refused, errors) = load.await.unwrap();
    assert!(allowed <= 200, "allowed {allowed} over the limit");
    // A new leader among the survivors; decisions go on through them.
    c.wait_voters(3).await;
    let new_leader = c.leader_index().unwrap();
    assert_ne!(new_leader, leader);
    let survivor = (0..3).find(|i| *i != leader).unwrap();
    let mut sc = client(c.node(survivor).addr).await;
    assert!(decide(&mut sc, &connect("10.1.0.9")).await.is_some());
    // What was acknowledged is in the survivors' state.
    let n = count_on(c.node(new_leader), Check::ConnRate, "10.1.0.2");
    assert!(
        n >= allowed + refused,
        "count {n} < acknowledged {}",
        allowed + refused
    );
    eprintln!(
        "leader killed mid-run: allowed {allowed}, refused {refused}, errors {errors}, count {n}"
    );
}

fn count_on_node(node: &Arc<relayrate::node::Node>, ip: &str) -> u64 {
    let state = node.state().read().unwrap();
    state
        .engine()
        .count_of(Check::ConnRate, &ip_client(ip), state.now_ms() / 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_restarted_on_its_data_dir_has_every_committed_count() {
    let mut c = Cluster::start("CHECK_CONN_RATE YES\nConnRate:default 1000\n", |_| {}).await;
    let leader = c.leader_index().unwrap();
    let victim = (leader + 1) % 3;
    let addrs = [c.node(leader).addr];
    let (allowed, _, errors) = hammer(&addrs, "10.1.0.3", 2, 40).await;
    assert_eq!((allowed, errors), (80, 0));
    let victim_node = c.node(victim).node.clone();
    eventually("the victim has applied the counts", || {
        let n = count_on_node(&victim_node, "10.1.0.3");
        async move { n == 80 }
    })
    .await;
    drop(victim_node);
    c.kill(victim).await;
    assert!(c.data_dir(victim).join("sled").exists());
    // More counts while it is down.
    let (allowed, _, _) = hammer(&addrs, "10.1.0.3", 2, 10).await;
    assert_eq!(allowed, 20);
    c.restart(victim).await;
    let h = c.node(victim);
    eventually("the restarted node has every count", || {
        let n = count_on(h, Check::ConnRate, "10.1.0.3");
        async move { n == 100 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_that_missed_a_lot_catches_up_by_snapshot() {
    let mut c = Cluster::start("CHECK_CONN_RATE YES\nConnRate:default 100000\n", |cfg| {
        cfg.raft.snapshot_every = 20;
        cfg.raft.keep_behind_snapshot = 0;
    })
    .await;
    let leader = c.leader_index().unwrap();
    let victim = (leader + 1) % 3;
    c.kill(victim).await;
    // One Connect a call, one call at a time: one log entry each.
    let mut lc = client(c.node(leader).addr).await;
    for _ in 0..150 {
        assert_eq!(decide(&mut lc, &connect("10.1.0.4")).await, Some(true));
    }
    let leader_raft = c.node(leader).node.raft.clone();
    eventually("the leader purged its log behind a snapshot", || {
        let m = leader_raft.metrics().borrow().clone();
        let ok = m.purged.is_some_and(|p| p.index > 100);
        async move { ok }
    })
    .await;
    c.restart(victim).await;
    let h = c.node(victim);
    eventually("the follower caught up", || {
        let n = count_on(h, Check::ConnRate, "10.1.0.4");
        async move { n == 150 }
    })
    .await;
    // It could only have caught up from the leader's snapshot: the log
    // before index 100 is gone.
    let raft = h.node.raft.clone();
    eventually("the follower's snapshot is the leader's", || {
        let m = raft.metrics().borrow().clone();
        async move { m.snapshot.is_some_and(|s| s.index > 100) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_silent_past_the_ttl_loses_its_leases() {
    let mut c = Cluster::start(
        "CHECK_OPEN_CONNECTIONS YES\nConnOpen:default 100\n",
        |cfg| {
            cfg.lease_ttl = Duration::from_secs(2);
        },
    )
    .await;
    let leader = c.leader_index().unwrap();
    let victim = (leader + 1) % 3;
    // Three connections open through the victim, two through the leader.
    let mut vc = client(c.node(victim).addr).await;
    for _ in 0..3 {
        assert_eq!(decide(&mut vc, &connect("10.1.0.5")).await, Some(true));
    }
    let mut lc = client(c.node(leader).addr).await;
    for _ in 0..2 {
        assert_eq!(decide(&mut lc, &connect("10.1.0.5")).await, Some(true));
    }
    let h = c.node(leader);
    eventually("five open connections", || {
        let n = count_on(h, Check::ConnOpen, "10.1.0.5");
        async move { n == 5 }
    })
    .await;
    let victim_incarnation = c.node(victim).node.incarnation;
    {
        let st = c.node(leader).node.state().read().unwrap();
        eprintln!(
            "victim {victim_incarnation} owners {:?} leases {:?}",
            st.owners().collect::<Vec<_>>(),
            st.leases().collect::<Vec<_>>()
        );
    }
    c.kill(victim).await;
    let killed_at = Instant::now();
    let h = c.node(leader);
    eventually("the victim's leases expired", || {
        let n = count_on(h, Check::ConnOpen, "10.1.0.5");
        async move { n == 2 }
    })
    .await;
    // Not before its TTL.
    assert!(killed_at.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_shut_down_gracefully_hands_over_and_its_counts_stay() {
    let mut c = Cluster::start("CHECK_CONN_RATE YES\nConnRate:default 1000\n", |_| {}).await;
    let leader = c.leader_index().unwrap();
    let mut lc = client(c.node(leader).addr).await;
    for _ in 0..10 {
        assert_eq!(decide(&mut lc, &connect("10.1.0.6")).await, Some(true));
    }
    let stopped_at = Instant::now();
    c.nodes[leader].take().unwrap().shutdown().await;
    // It waited for a successor, which is known at once: within moments
    // on the successors too (a node publishes its metrics after the step
    // that changed them), far sooner than a new election could end.
    let known_by = Instant::now() + Duration::from_millis(250);
    let new_leader = loop {
        if let Some(l) = c.leader_index() {
            break l;
        }
        assert!(
            Instant::now() < known_by,
            "no leader right after the shutdown"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_ne!(new_leader, leader);
    eprintln!(
        "graceful shutdown of the leader took {:?}",
        stopped_at.elapsed()
    );
    let mut nc = client(c.node(new_leader).addr).await;
    assert_eq!(decide(&mut nc, &connect("10.1.0.6")).await, Some(true));
    assert_eq!(
        count_on(c.node(new_leader), Check::ConnRate, "10.1.0.6"),
        11
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_alternating_between_nodes_gets_exactly_its_message_limit() {
    let c = Cluster::start("CHECK_MSG_RATE YES\nMsgRate:10.1.0.7 3\n", |_| {}).await;
    let mut clients = Vec::new();
    for h in c.running() {
        clients.push(client(h.addr).await);
    }
    let who = ip_client("10.1.0.7");
    let mail = Event::Mail {
        client: who.clone(),
        msgs_in_conn: 1,
    };
    let mut sent = 0;
    for i in 0..9 {
        // Each MAIL FROM reserves its slot, at whichever node it reaches.
        if decide(&mut clients[i % 3], &mail).await.expect("a verdict") {
            sent += 1;
        }
    }
    assert_eq!(sent, 3);
}

/// A node cut off from any leader retries a batch only while a caller
/// waits for it. Once every caller has given up (a milter then decides
/// without the cluster), the batch is dropped, so the cluster does not
/// count it as well when a leader is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_whose_callers_gave_up_is_dropped_not_counted_later() {
    let mut c = Cluster::start("CHECK_CONN_RATE YES\nConnRate:default 1000\n", |_| {}).await;
    let leader = c.leader_index().unwrap();
    let (other, lone) = ((leader + 1) % 3, (leader + 2) % 3);
    c.kill(leader).await;
    c.kill(other).await;

    // One node of three: no quorum. The caller gives up after 300 ms.
    let impatient =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.node(lone).addr))
            .unwrap()
            .timeout(Duration::from_millis(300))
            .connect_lazy();
    let mut impatient = LimiterClient::new(impatient);
    assert_eq!(decide(&mut impatient, &connect("10.1.0.9")).await, None);
    let node = c.node(lone).node.clone();
    eventually("the node drops the batch nobody waits for", || {
        let n = node.abandoned_events();
        async move { n == 1 }
    })
    .await;

    c.restart(leader).await;
    c.restart(other).await;
    c.wait_voters(3).await;
    let mut patient = client(c.node(lone).addr).await;
    let until = Instant::now() + DEADLINE;
    while decide(&mut patient, &connect("10.1.0.9")).await.is_none() {
        assert!(Instant::now() < until, "no decision after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only the Connect answered after the restart counts.
    let leader = c.leader_index().unwrap();
    assert_eq!(count_on(c.node(leader), Check::ConnRate, "10.1.0.9"), 1);
}

/// Waits out the last minutes of an hour, so that a one-hour bucket does
/// not end under the test.
async fn clear_of_the_hour() {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = 3600 - secs % 3600;
    if left < 300 {
        eprintln!("waiting {left} s for the next hour's bucket");
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

fn conn_rate_id(ip: &str) -> relayrate::engine::CounterId {
    relayrate::engine::CounterId {
        check: Check::ConnRate,
        key: relayrate::engine::CounterKey::Ip(ip.parse().unwrap()),
    }
}

fn is_unusual_on(h: &NodeHandle, ip: &str) -> bool {
    let state = h.node.state().read().unwrap();
    let now = state.now_ms() / 1000;
    state.engine().is_unusual(&conn_rate_id(ip), now)
}

/// The keys of the Admin service's Top of unusual keys, asked of `addr`.
async fn top_unusual(addr: SocketAddr) -> Result<Vec<String>, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let mut admin = relayrate::proto::v1::admin_client::AdminClient::new(ch);
    let req = relayrate::proto::v1::TopRequest {
        unusual: true,
        ..Default::default()
    };
    let r = admin.top(req).await?;
    Ok(r.into_inner().keys.into_iter().map(|k| k.key).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unusual_key_stays_flagged_after_the_leader_is_killed() {
    clear_of_the_hour().await;
    let mut c = Cluster::start(
        "CHECK_CONN_RATE YES\nConnRate:default 1000\nRateWindow 7200\nRateBucket 3600\n",
        |_| {},
    )
    .await;
    let leader = c.leader_index().unwrap();
    let mut lc = client(c.node(leader).addr).await;
    // No history, 12 in the bucket: over the floor of 10.
    for _ in 0..12 {
        assert_eq!(decide(&mut lc, &connect("10.1.0.20")).await, Some(true));
    }
    for i in 0..3 {
        let h = c.node(i);
        eventually("every node has the flag", || {
            let ok = is_unusual_on(h, "10.1.0.20");
            async move { ok }
        })
        .await;
    }
    c.kill(leader).await;
    eventually("a new leader", || {
        let ok = c.leader_index().is_some_and(|l| l != leader);
        async move { ok }
    })
    .await;
    let new_leader = c.leader_index().unwrap();
    let addr = c.node(new_leader).addr;
    eventually("the new leader lists it as unusual", || async move {
        top_unusual(addr).await.ok() == Some(vec!["10.1.0.20".to_string()])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn baselines_are_the_same_on_every_node_and_outlive_the_leader() {
    // One-second buckets, so that baselines are learned within the test.
    let mut c = Cluster::start(
        "CHECK_CONN_RATE YES\nConnRate:default 1000\nRateWindow 10\nRateBucket 1\n",
        |_| {},
    )
    .await;
    let leader = c.leader_index().unwrap();
    let mut lc = client(c.node(leader).addr).await;
    let id = conn_rate_id("10.1.0.21");
    let learned = |h: &NodeHandle| {
        let state = h.node.state().read().unwrap();
        let now = state.now_ms() / 1000;
        state.engine().usual(&id, now)
    };
    let until = Instant::now() + DEADLINE;
    // A few buckets of traffic, and one more event so the last is learned.
    while learned(c.node(leader)).is_none() {
        assert!(Instant::now() < until, "never learned");
        assert_eq!(decide(&mut lc, &connect("10.1.0.21")).await, Some(true));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let expected = learned(c.node(leader));
    for i in 0..3 {
        let h = c.node(i);
        eventually("the same baseline on every node", || {
            let ok = learned(h) == expected;
            async move { ok }
        })
        .await;
    }
    c.kill(leader).await;
    eventually("a new leader", || {
        let ok = c.leader_index().is_some_and(|l| l != leader);
        async move { ok }
    })
    .await;
    let new_leader = c.leader_index().unwrap();
    assert!(
        learned(c.node(new_leader)).is_some(),
        "the new leader has it"
    );
}
