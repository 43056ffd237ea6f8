//! relayratectl as an operator runs it: a process, against a cluster of
//! real `relayrate node` processes on loopback. Traffic goes through the
//! `Limiter` service (Connects and Closes, end-of-message events), so every
//! count the tests expect is exact.
//!
//! A stub Admin server (plain and with TLS) checks what relayratectl sends
//! (token, TLS identity, request fields) and how it reports refusals that
//! a real node rarely produces.
//!
//! Waits are polls with deadlines, never fixed sleeps.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, NodeProc};
use relayrate::convert::event_to_pb;
use relayrate::engine::{ConnId, Event};
use relayrate::policy::Client;
use relayrate::proto::v1 as pb;
use relayrate::proto::v1::admin_client::AdminClient;
use relayrate::proto::v1::limiter_client::LimiterClient;
use serde_json::Value;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

/// Deadline for a cluster to form, a leader to change, an index to move.
const DEADLINE: Duration = Duration::from_secs(60);

/// Rate checks only (no open-connection check, so Connects need no
/// matching Close to stay under a limit). 10.99.0.1 is the hot key,
/// 10.99.0.2 the one reset, 10.99.0.3 the one whose limit a new policy
/// raises.
const POLICY: &str = "\
CHECK_CONN_RATE YES
CHECK_MSG_RATE YES
RateWindow 600
RateBucket 30
ConnRate:default 100
MsgRate:default 100
ConnRate:10.99.0.1 20
ConnRate:10.99.0.2 5
ConnRate:10.99.0.3 5
";

// ---------------------------------------------------------------------------
// relayratectl

fn ctl_cmd(node: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_relayratectl"));
    c.arg("--node")
        .arg(node)
        .env_remove("RELAYRATE_NODE")
        .env_remove("RELAYRATE_ADMIN_TOKEN_FILE");
    c
}

/// relayratectl `args` against the node at `addr`.
fn ctl(addr: SocketAddr, args: &[&str]) -> Output {
    ctl_cmd(&format!("http://{addr}"))
        .args(args)
        .output()
        .expect("run relayratectl")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The JSON object a successful `relayratectl ARGS --json` printed.
fn ctl_json(addr: SocketAddr, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = ctl(addr, &all);
    assert!(
        out.status.success(),
        "relayratectl {args:?}: {}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("relayratectl {args:?}: not JSON ({e}): {}", describe(&out)))
}

/// As `ctl_json`, or `None` when the command failed (a node not up yet).
fn try_json(addr: SocketAddr, args: &[&str]) -> Option<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let out = ctl(addr, &all);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// A `top --json` answer as (check, key, count) rows.
fn top_rows(top: &Value) -> Vec<(&str, &str, u64)> {
    top["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            (
                k["check"].as_str().unwrap(),
                k["key"].as_str().unwrap(),
                k["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The entry of `check` in a `show` answer.
fn show_check(addr: SocketAddr, key: &str, check: &str) -> Value {
    let show = ctl_json(addr, &["show", key]);
    show["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == check)
        .unwrap_or_else(|| panic!("show {key}: no {check} in {show}"))
        .clone()
}

fn applied_index(addr: SocketAddr) -> u64 {
    ctl_json(addr, &["status"])["last_applied_index"]
        .as_u64()
        .expect("last_applied_index")
}

fn member_ids(v: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

// ---------------------------------------------------------------------------
// Traffic through the Limiter service

fn limiter(addr: SocketAddr) -> LimiterClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    LimiterClient::new(ch)
}

static CONN: AtomicU64 = AtomicU64::new(1);

async fn decide(c: &mut LimiterClient<Channel>, e: &Event) -> Result<pb::Verdict, tonic::Status> {
    let reply = c
        .decide(pb::DecideRequest {
            events: vec![event_to_pb(e)],
        })
        .await?
        .into_inner();
    reply
        .verdicts
        .into_iter()
        .next()
        .ok_or_else(|| tonic::Status::internal("no verdict"))
}

fn client(ip: &str) -> Client {
    Client::from_ip(ip.parse().unwrap())
}

/// A connection from `ip`, opened and closed; whether it was allowed.
/// Errors fail the test: a retry could count twice.
async fn connect(c: &mut LimiterClient<Channel>, ip: &str) -> bool {
    let conn = ConnId {
        owner: 0,
        conn: CONN.fetch_add(1, Ordering::Relaxed),
    };
    let v = decide(
        c,
        &Event::Connect {
            conn,
            client: client(ip),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("Connect {ip}: {e}"));
    decide(c, &Event::Close { conn })
        .await
        .unwrap_or_else(|e| panic!("Close {ip}: {e}"));
    v.allowed
}

/// One message from `ip` (its MAIL FROM reserves a MsgRate slot).
async fn message(c: &mut LimiterClient<Channel>, ip: &str) {
    let mail = Event::Mail {
        client: client(ip),
        msgs_in_conn: 1,
    };
    let v = decide(c, &mail)
        .await
        .unwrap_or_else(|e| panic!("Message {ip}: {e}"));
    assert!(v.allowed, "message from {ip} refused: {v:?}");
}

// ---------------------------------------------------------------------------
// Clusters

/// Polls `cond` until it holds; false when the deadline passed.
async fn poll<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Cluster {
    nodes: Vec<NodeProc>,
    _root: TempDir,
}

impl Cluster {
    /// Node 1 bootstraps with `policy` (and `extra` flags, as every node),
    /// the others join it; returns once every node sees all of them as
    /// voters and a leader, and decides events.
    async fn start(size: u64, policy: &str, extra: &[&std::ffi::OsStr]) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("relayrate-ctl")
            .tempdir()
            .unwrap();
        let first = NodeProc::start_with_args(root.path(), 1, Some(policy), None, extra);
        let seed = first.peer;
        let mut nodes = vec![first];
        for id in 2..=size {
            nodes.push(NodeProc::start_with_args(
                root.path(),
                id,
                None,
                Some(seed),
                extra,
            ));
        }
        let cluster = Cluster { nodes, _root: root };
        for n in &cluster.nodes {
            let addr = n.addr;
            let formed = poll(DEADLINE, || async move {
                try_json(addr, &["status"]).is_some_and(|s| {
                    s["ready"] == true
                        && s["leader_id"].as_u64().unwrap_or(0) != 0
                        && s["members"].as_array().is_some_and(|m| {
                            m.len() == size as usize && m.iter().all(|m| m["voter"] == true)
                        })
                })
            })
            .await;
            cluster.assert(formed, &format!("node at {addr} sees {size} voters"));
            // A Recheck counts nothing: a probe that leaves no trace.
            let decides = poll(DEADLINE, || async move {
                let probe = Event::Recheck {
                    client: client("10.99.0.200"),
                };
                decide(&mut limiter(addr), &probe).await.is_ok()
            })
            .await;
            cluster.assert(decides, &format!("node at {addr} decides"));
        }
        cluster
    }

    /// Node `id`'s client port: what relayratectl and milters call.
    fn addr(&self, id: u64) -> SocketAddr {
        self.nodes[id as usize - 1].addr
    }

    /// Node `id`'s peer port: its address as a member.
    fn peer(&self, id: u64) -> SocketAddr {
        self.nodes[id as usize - 1].peer
    }

    /// Fails with every node's log, which is what one needs to see.
    fn assert(&self, ok: bool, what: &str) {
        if !ok {
            for (i, n) in self.nodes.iter().enumerate() {
                eprintln!("==== node {} log:\n{}", i + 1, n.log());
            }
            panic!("timed out waiting until {what}");
        }
    }
}

// ---------------------------------------------------------------------------
// Against a three-node cluster: one cluster, the steps in order (each
// uses keys of its own; removing a node comes last).

#[tokio::test]
async fn relayratectl_administers_a_three_node_cluster() {
    let cluster = Cluster::start(3, POLICY, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    status_shows_one_leader_and_three_voters(&cluster);
    top_lists_the_hot_key_first_and_filters_by_check(&cluster).await;
    suggest_gives_the_hot_key_a_limit_of_its_own(&cluster, dir.path()).await;
    show_gives_every_count_of_a_key(&cluster);
    reset_clears_a_key_so_it_is_allowed_again(&cluster).await;
    a_broken_policy_is_refused_and_a_good_one_keeps_counts(&cluster, dir.path()).await;
    a_removed_node_is_no_longer_replicated_to(&cluster).await;
    a_removed_node_added_again_catches_up(&cluster).await;
}

fn status_shows_one_leader_and_three_voters(cluster: &Cluster) {
    let statuses: Vec<Value> = (1..=3)
        .map(|id| ctl_json(cluster.addr(id), &["status"]))
        .collect();
    let leaders: Vec<&Value> = statuses.iter().filter(|s| s["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "one leader: {statuses:?}");
    let leader = leaders[0]["id"].as_u64().unwrap();
    for (i, s) in statuses.iter().enumerate() {
        assert_eq!(s["id"], i as u64 + 1, "{s}");
        assert_eq!(s["leader_id"], leader, "every node names the leader: {s}");
        assert_eq!(
            s["leader_addr"],
            cluster.peer(leader).to_string(),
            "leader address (its peer port): {s}"
        );
        assert_eq!(member_ids(s), [1, 2, 3], "{s}");
        assert!(
            s["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["voter"] == true),
            "all voters: {s}"
        );
        assert!(
            s["policy_hash"].as_str().is_some_and(|h| h.len() >= 12),
            "a policy hash: {s}"
        );
        assert!(
            s["last_applied_index"].as_u64().unwrap() > 0,
            "applied index: {s}"
        );
    }
    // The table, as a person reads it, from a node that is not the leader.
    let follower = if leader == 1 { 2 } else { 1 };
    let out = ctl(cluster.addr(follower), &["status"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let leader_line = format!("{leader}@{}", cluster.peer(leader));
    assert!(
        text.lines()
            .any(|l| l.starts_with("leader") && l.ends_with(&leader_line)),
        "status names the leader {leader_line}:\n{text}"
    );
    assert!(text.contains("role      follower"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["id", "addr", "kind", "health", "matched"]),
        "members table:\n{text}"
    );
    assert_eq!(text.matches(" voter ").count(), 3, "{text}");
    // A node named as in its own flags, HOST:PORT, will do.
    let out = ctl_cmd(&cluster.addr(3).to_string())
        .arg("status")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("node      3\n"));
    // `members` as a table too.
    let out = ctl(cluster.addr(follower), &["members"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 4, "header and 3 members:\n{text}");
}

async fn top_lists_the_hot_key_first_and_filters_by_check(cluster: &Cluster) {
    // Spread over the three nodes: the counts are the cluster's.
    let mut nodes: Vec<_> = (1..=3).map(|id| limiter(cluster.addr(id))).collect();
    for i in 0..12 {
        assert!(connect(&mut nodes[i % 3], "10.99.0.1").await);
    }
    for i in 0..5 {
        assert!(connect(&mut nodes[i % 3], "10.99.0.10").await);
    }
    for i in 0..2 {
        assert!(connect(&mut nodes[i % 3], "10.99.0.11").await);
    }
    for i in 0..8 {
        message(&mut nodes[i % 3], "10.99.0.12").await;
    }

    // Reads see every acknowledged count, asked of any node: no waiting.
    for id in 1..=3 {
        let top = ctl_json(cluster.addr(id), &["top", "-n", "3"]);
        let keys = top["keys"].as_array().expect("keys");
        assert_eq!(
            top_rows(&top),
            [
                ("ConnRate", "10.99.0.1", 12),
                ("MsgRate", "10.99.0.12", 8),
                ("ConnRate", "10.99.0.10", 5)
            ],
            "top -n 3 on node {id}: {top}"
        );
        let hot = &keys[0];
        assert_eq!(hot["limit"], 20, "{hot}");
        assert!(
            (hot["percent"].as_f64().unwrap() - 60.0).abs() < 1e-6,
            "{hot}"
        );
        assert_eq!(hot["window_secs"], 600, "{hot}");
        assert_eq!(hot["enabled"], true, "{hot}");
    }

    let top = ctl_json(cluster.addr(2), &["top", "--check", "connrate", "-n", "3"]);
    assert_eq!(
        top_rows(&top),
        [
            ("ConnRate", "10.99.0.1", 12),
            ("ConnRate", "10.99.0.10", 5),
            ("ConnRate", "10.99.0.11", 2)
        ],
        "top --check ConnRate: {top}"
    );

    // The table.
    let out = ctl(cluster.addr(1), &["top", "-n", "1"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["check", "key", "count", "limit", "percent", "window"],
            vec!["ConnRate", "10.99.0.1", "12", "20", "60.0", "600s"]
        ],
        "{text}"
    );
}

/// After the top step's traffic (ConnRate: 10.99.0.1 12, .10 5, .11 2;
/// MsgRate: 10.99.0.12 8) and ten more clients of 1 connection each.
async fn suggest_gives_the_hot_key_a_limit_of_its_own(cluster: &Cluster, dir: &Path) {
    let mut node = limiter(cluster.addr(1));
    for i in 0..10 {
        assert!(connect(&mut node, &format!("10.99.1.{i}")).await);
    }
    let applied = applied_index(cluster.addr(1));
    let addr = cluster.addr(3);
    let caught_up = poll(DEADLINE, || async move { applied_index(addr) >= applied }).await;
    cluster.assert(caught_up, "node 3 has applied node 1's entries");

    // Asked of a follower: every node holds the same hourly peaks.
    let out = ctl(addr, &["suggest"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // 13 ConnRate keys whose limits are their peaks: the 90th percentile
    // is 5, and the hot key, above it, has its own entry with its figures.
    for want in [
        "CHECK_CONN_RATE          YES",
        "ConnRate:default 5",
        "ConnRate:10.99.0.1 12",
        "MsgRate:default 8",
    ] {
        assert!(lines.contains(&want), "no line {want:?} in:\n{text}");
    }
    let entry = lines
        .iter()
        .position(|l| *l == "ConnRate:10.99.0.1 12")
        .unwrap();
    assert!(lines[entry - 1].starts_with("# peak 12 on "), "{text}");
    assert!(!text.contains("ConnRate:10.99.0.10 "), "{text}");
    assert!(
        text.contains("# CHECK_OPEN_CONNECTIONS: off in the policy in force"),
        "{text}"
    );

    // What it prints is a valid policy.
    let file = dir.join("suggested.txt");
    std::fs::write(&file, &text).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_relayrate"))
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}\n{text}", describe(&check));

    // The same as JSON; a share out of range is a usage error.
    let json = ctl_json(addr, &["suggest", "--delay-share", "0.01"]);
    assert_eq!(json["policy"].as_str(), Some(text.as_str()));
    let bad = ctl(addr, &["suggest", "--delay-share", "2"]);
    assert_eq!(bad.status.code(), Some(64), "{}", describe(&bad));
}

fn show_gives_every_count_of_a_key(cluster: &Cluster) {
    let conn = show_check(cluster.addr(3), "10.99.0.1", "ConnRate");
    assert_eq!(conn["count"], 12, "{conn}");
    assert_eq!(conn["limit"], 20, "{conn}");
    assert_eq!(conn["window_secs"], 600, "{conn}");
    assert_eq!(conn["key"], "10.99.0.1", "{conn}");
    let msg = show_check(cluster.addr(3), "10.99.0.12", "MsgRate");
    assert_eq!(msg["count"], 8, "{msg}");
    assert_eq!(msg["limit"], 100, "{msg}");
    let fresh = show_check(cluster.addr(1), "10.99.0.77", "ConnRate");
    assert_eq!(fresh["count"], 0, "a key never seen: {fresh}");
    assert_eq!(fresh["limit"], 100, "ConnRate:default: {fresh}");

    let out = ctl(cluster.addr(2), &["show", "10.99.0.1"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["ConnRate", "12", "20", "60.0", "600s", "yes", "-"]),
        "{text}"
    );
}

async fn reset_clears_a_key_so_it_is_allowed_again(cluster: &Cluster) {
    let key = "10.99.0.2";
    let mut c = limiter(cluster.addr(2));
    for i in 0..5 {
        assert!(connect(&mut c, key).await, "connect {} of 5", i + 1);
    }
    assert!(
        !connect(&mut c, key).await,
        "the 6th is over the limit of 5"
    );
    assert_eq!(show_check(cluster.addr(1), key, "ConnRate")["count"], 6);

    let reset = ctl_json(cluster.addr(3), &["reset", key]);
    assert!(reset["cleared"].as_u64().unwrap() >= 1, "{reset}");
    assert_eq!(show_check(cluster.addr(1), key, "ConnRate")["count"], 0);
    assert!(connect(&mut c, key).await, "allowed again after the reset");
    assert_eq!(show_check(cluster.addr(2), key, "ConnRate")["count"], 1);

    // One check only: the others keep their counts.
    let mut c = limiter(cluster.addr(1));
    assert!(connect(&mut c, "10.99.0.12").await);
    let out = ctl(
        cluster.addr(1),
        &["reset", "10.99.0.12", "--check", "MsgRate"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cleared"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        show_check(cluster.addr(1), "10.99.0.12", "MsgRate")["count"],
        0
    );
    assert_eq!(
        show_check(cluster.addr(1), "10.99.0.12", "ConnRate")["count"],
        1
    );
}

async fn a_broken_policy_is_refused_and_a_good_one_keeps_counts(cluster: &Cluster, dir: &Path) {
    let key = "10.99.0.3";
    let before = ctl_json(cluster.addr(1), &["policy", "show"]);
    let hash = before["hash"].as_str().expect("hash").to_string();
    assert!(
        before["files"][0]["text"]
            .as_str()
            .unwrap()
            .contains("ConnRate:10.99.0.3 5"),
        "{before}"
    );

    let broken = dir.join("broken.txt");
    std::fs::write(&broken, "CHECK_CONN_RATE YES\nConnRate:10.99.0.3 lots\n").unwrap();
    let out = ctl(
        cluster.addr(2),
        &["policy", "apply", broken.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("broken.txt:2:"), "names the line: {said}");

    // The node validates too (relayratectl checks first, so ask directly).
    let mut admin = AdminClient::connect(format!("http://{}", cluster.addr(3)))
        .await
        .unwrap();
    let refused = admin
        .apply_policy(pb::ApplyPolicyRequest {
            files: vec![pb::PolicyFile {
                name: "broken.txt".into(),
                text: "CHECK_CONN_RATE YES\nConnRate:10.99.0.3 lots\n".into(),
            }],
        })
        .await
        .expect_err("a broken policy is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("broken.txt:2:"), "{refused:?}");

    // The old policy stays: same hash, the old limit of 5 still refuses.
    assert_eq!(ctl_json(cluster.addr(3), &["policy", "show"])["hash"], hash);
    let mut c = limiter(cluster.addr(3));
    for i in 0..5 {
        assert!(connect(&mut c, key).await, "connect {} of 5", i + 1);
    }
    assert!(!connect(&mut c, key).await, "the old limit of 5 holds");

    let good = dir.join("good.txt");
    std::fs::write(
        &good,
        POLICY.replace("ConnRate:10.99.0.3 5", "ConnRate:10.99.0.3 10"),
    )
    .unwrap();
    let applied = ctl_json(
        cluster.addr(2),
        &["policy", "apply", good.to_str().unwrap()],
    );
    assert_eq!(applied["changed"], true, "{applied}");
    let new_hash = applied["hash"].as_str().unwrap().to_string();
    assert_ne!(new_hash, hash);
    // policy show answers from the node's own state: a follower may
    // apply the new policy a moment after the leader answered.
    let mut now = Value::Null;
    let shown = poll(DEADLINE, || {
        now = ctl_json(cluster.addr(1), &["policy", "show"]);
        let same = now["hash"] == new_hash.as_str();
        async move { same }
    })
    .await;
    cluster.assert(shown, &format!("node 1 shows policy {new_hash}: {now}"));
    assert!(
        now["files"][0]["text"]
            .as_str()
            .unwrap()
            .contains("ConnRate:10.99.0.3 10"),
        "{now}"
    );
    // Counts kept (5 allowed and the refused one), against the new limit.
    let conn = show_check(cluster.addr(1), key, "ConnRate");
    assert_eq!(
        (conn["count"].as_u64(), conn["limit"].as_u64()),
        (Some(6), Some(10)),
        "{conn}"
    );
    assert!(connect(&mut c, key).await, "allowed under the new limit");
    assert_eq!(show_check(cluster.addr(2), key, "ConnRate")["count"], 7);

    // The same files again change nothing; the table says so.
    let out = ctl(
        cluster.addr(1),
        &["policy", "apply", good.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&new_hash) && text.contains("unchanged"),
        "{text}"
    );
}

async fn a_removed_node_is_no_longer_replicated_to(cluster: &Cluster) {
    let removed = ctl_json(cluster.addr(1), &["remove-node", "3"]);
    assert_eq!(
        member_ids(&removed),
        [1, 2],
        "remove-node answers: {removed}"
    );
    // Should the leader have been node 3, nodes 1 and 2 elect another.
    let members_ok = poll(DEADLINE, || async {
        try_json(cluster.addr(1), &["members"]).is_some_and(|m| member_ids(&m) == [1, 2])
    })
    .await;
    cluster.assert(members_ok, "members lists nodes 1 and 2");

    // Node 3 was told: it no longer decides, so its milters fall back at
    // once instead of waiting on a node outside the cluster.
    let told = poll(DEADLINE, || async {
        try_json(cluster.addr(3), &["status"]).is_some_and(|s| s["ready"] == false)
    })
    .await;
    cluster.assert(told, "node 3 reports itself not ready");
    let started = Instant::now();
    let refused = decide(
        &mut limiter(cluster.addr(3)),
        &Event::Connect {
            conn: ConnId {
                owner: 0,
                conn: CONN.fetch_add(1, Ordering::Relaxed),
            },
            client: client("10.99.0.52"),
        },
    )
    .await
    .expect_err("a removed node decides nothing");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );

    // Node 3's applied index stays where it is while node 1 goes on. A
    // few tries: entries already sent to it before the removal may land.
    let mut c = limiter(cluster.addr(1));
    let mut tries = Vec::new();
    let mut still = false;
    for _ in 0..3 {
        let before = applied_index(cluster.addr(3));
        let target = before + 10;
        let until = Instant::now() + DEADLINE;
        let mut advanced = false;
        while !advanced && Instant::now() < until {
            assert!(
                connect(&mut c, "10.99.0.50").await,
                "traffic through node 1"
            );
            advanced = applied_index(cluster.addr(1)) >= target;
        }
        cluster.assert(advanced, "node 1 applies 10 entries more");
        let after = applied_index(cluster.addr(3));
        tries.push((before, after, applied_index(cluster.addr(1))));
        if after == before {
            still = true;
            break;
        }
    }
    assert!(
        still,
        "node 3's applied index kept moving (before, after, node 1): {tries:?}"
    );
}

async fn a_removed_node_added_again_catches_up(cluster: &Cluster) {
    let addr3 = cluster.peer(3).to_string();
    let added = ctl_json(cluster.addr(2), &["add-node", "3", &addr3]);
    assert_eq!(member_ids(&added), [1, 2, 3], "add-node answers: {added}");
    assert!(
        added["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["voter"] == true),
        "node 3 is a voter again: {added}"
    );
    let mut c = limiter(cluster.addr(1));
    assert!(connect(&mut c, "10.99.0.51").await);
    let target = applied_index(cluster.addr(1));
    let caught_up = poll(DEADLINE, || async move {
        try_json(cluster.addr(3), &["status"])
            .is_some_and(|s| s["last_applied_index"].as_u64().unwrap_or(0) >= target)
    })
    .await;
    cluster.assert(caught_up, &format!("node 3 applies up to {target}"));
    assert_eq!(
        show_check(cluster.addr(3), "10.99.0.51", "ConnRate")["count"],
        1
    );
}

/// AddNode promises to make the node a voter only once it has caught up.
/// A node that cannot be reached never catches up: it must not become a
/// voter, or a one-node cluster loses its quorum for good.
#[tokio::test]
async fn adding_an_unreachable_node_leaves_the_cluster_working() {
    let cluster = Cluster::start(1, POLICY, &[]).await;
    let addr = cluster.addr(1);
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = ctl(addr, &["--timeout-secs", "20", "add-node", "9", &nowhere]);
    assert!(!out.status.success(), "{}", describe(&out));
    let members = ctl_json(addr, &["members"]);
    assert!(
        members["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["id"] == 1 || m["voter"] == false),
        "node 9 is no voter: {members}"
    );
    let out = ctl(addr, &["--timeout-secs", "5", "reset", "10.99.0.9"]);
    assert!(
        out.status.success(),
        "writes still commit: {}",
        describe(&out)
    );

    // Requests the leader will never carry out are refused at once, not
    // retried until a timeout.
    for (args, why) in [
        (["remove-node", "42"], "node 42 is not a member"),
        (["remove-node", "1"], "node 1 is the last voter"),
    ] {
        let started = Instant::now();
        let out = ctl(addr, &args);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "{}",
            describe(&out)
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "refused at once"
        );
    }
}

// ---------------------------------------------------------------------------
// The admin token

#[tokio::test]
async fn writes_need_the_token_and_reads_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let cluster = Cluster::start(
        1,
        POLICY,
        &["--admin-token-file".as_ref(), token.as_os_str()],
    )
    .await;
    let addr = cluster.addr(1);
    let url = format!("http://{addr}");

    // Reads need no token.
    let out = ctl(addr, &["status"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = ctl(addr, &["show", "10.99.0.5"]);
    assert!(out.status.success(), "{}", describe(&out));

    let out = ctl(addr, &["reset", "10.99.0.5"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("relayratectl: permission denied") && err.contains("unauthenticated"),
        "{err}"
    );

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess").unwrap();
    let out = ctl(
        addr,
        &[
            "reset",
            "10.99.0.5",
            "--token-file",
            wrong.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        describe(&out)
    );

    let out = ctl(
        addr,
        &[
            "reset",
            "10.99.0.5",
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));

    // The same from the environment.
    let out = ctl_cmd(&url)
        .env("RELAYRATE_ADMIN_TOKEN_FILE", &token)
        .args(["reset", "10.99.0.5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));

    // Applying a policy is a write too.
    let file = dir.path().join("p.txt");
    std::fs::write(&file, POLICY).unwrap();
    let out = ctl(addr, &["policy", "apply", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));

    // A suggestion costs seconds of CPU on a big cluster: it needs the
    // token as a write does.
    let out = ctl(addr, &["suggest"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let token_arg = ["suggest", "--token-file", token.to_str().unwrap()];
    let out = ctl(addr, &token_arg);
    assert!(out.status.success(), "{}", describe(&out));
}

// ---------------------------------------------------------------------------
// Nodes that cannot answer, and bad command lines

#[test]
fn an_unreachable_node_exits_69_quickly() {
    let port = free_port();
    let started = Instant::now();
    let out = ctl_cmd(&format!("http://127.0.0.1:{port}"))
        .arg("status")
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "relayratectl: cannot reach http://127.0.0.1:{port}: "
        )),
        "{err}"
    );
    assert!(err.contains("refused"), "says why: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn a_node_that_never_answers_times_out_with_69() {
    // Accepts connections and says nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let started = Instant::now();
    let out = ctl_cmd(&format!("http://{addr}"))
        .args(["--timeout-secs", "2", "status"])
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr.to_string()) && err.contains("2s"),
        "{err}"
    );
}

#[test]
fn bad_command_lines_exit_64() {
    let node = "http://127.0.0.1:1";
    for args in [
        &["frobnicate"][..],
        &["top", "--check", "ConnRat"],
        &["top", "-n", "many"],
        &["reset"],
        &["policy", "apply"],
        &["status", "--tls-cert", "c.pem"],
        &["status", "--timeout-secs", "0"],
    ] {
        let out = ctl_cmd(node).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", describe(&out));
    }
    for bad in ["not a url", "ftp://127.0.0.1:1"] {
        let out = ctl_cmd(bad).arg("status").output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{bad}: {}", describe(&out));
    }
    let out = ctl_cmd(node)
        .args(["status", "--token-file", "/nonexistent/token"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    let out = ctl_cmd(node)
        .args(["policy", "apply", "/nonexistent/policy.txt"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
    let out = ctl_cmd(node).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn a_broken_policy_is_refused_before_any_node_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.txt");
    std::fs::write(
        &broken,
        "# two mistakes\nConnRate:1.2.3.4 lots\nNoSuchCheck:default 5\n",
    )
    .unwrap();
    // No node listens there: reaching for one would exit 69.
    let out = ctl_cmd(&format!("http://127.0.0.1:{}", free_port()))
        .args(["policy", "apply", broken.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() >= 3, "{err}");
    let at = |line: u32| format!("{}:{line}:", broken.display());
    assert!(lines[0].starts_with(&at(2)), "{err}");
    assert!(lines[1].starts_with(&at(3)), "{err}");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("relayratectl: policy not applied"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// A stub Admin server: what relayratectl sends, and refusals it reports

#[derive(Default)]
struct Stub {
    /// One line per call: method, authorization header, request fields.
    calls: Mutex<Vec<String>>,
}

impl Stub {
    fn record<T: std::fmt::Debug>(&self, method: &str, req: &tonic::Request<T>) {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        self.calls
            .lock()
            .unwrap()
            .push(format!("{method} auth={auth} {:?}", req.get_ref()));
    }
}

type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl pb::admin_server::Admin for Stub {
    async fn status(&self, req: tonic::Request<pb::StatusRequest>) -> Reply<pb::StatusResponse> {
        self.record("status", &req);
        Ok(tonic::Response::new(pb::StatusResponse {
            id: 7,
            role: "leader".into(),
            leader_id: 7,
            leader_addr: "stub:7450".into(),
            ready: true,
            ..Default::default()
        }))
    }
    async fn members(&self, req: tonic::Request<pb::MembersRequest>) -> Reply<pb::MembersResponse> {
        self.record("members", &req);
        Err(tonic::Status::unavailable("no leader"))
    }
    async fn add_node(
        &self,
        req: tonic::Request<pb::AddNodeRequest>,
    ) -> Reply<pb::MembersResponse> {
        self.record("add_node", &req);
        Err(tonic::Status::failed_precondition(
            "node 4 already a member",
        ))
    }
    async fn remove_node(
        &self,
        req: tonic::Request<pb::RemoveNodeRequest>,
    ) -> Reply<pb::MembersResponse> {
        self.record("remove_node", &req);
        Err(tonic::Status::unauthenticated("missing token"))
    }
    async fn top(&self, req: tonic::Request<pb::TopRequest>) -> Reply<pb::TopResponse> {
        self.record("top", &req);
        Ok(tonic::Response::new(pb::TopResponse::default()))
    }
    async fn show(&self, req: tonic::Request<pb::ShowRequest>) -> Reply<pb::ShowResponse> {
        self.record("show", &req);
        Err(tonic::Status::permission_denied("wrong token"))
    }
    async fn reset(&self, req: tonic::Request<pb::ResetRequest>) -> Reply<pb::ResetResponse> {
        self.record("reset", &req);
        Ok(tonic::Response::new(pb::ResetResponse { cleared: 3 }))
    }
    async fn show_policy(
        &self,
        req: tonic::Request<pb::ShowPolicyRequest>,
    ) -> Reply<pb::ShowPolicyResponse> {
        self.record("show_policy", &req);
        Err(tonic::Status::unimplemented("not here"))
    }
    async fn suggest(&self, req: tonic::Request<pb::SuggestRequest>) -> Reply<pb::SuggestResponse> {
        self.record("suggest", &req);
        Err(tonic::Status::resource_exhausted("another suggestion"))
    }
    async fn apply_policy(
        &self,
        req: tonic::Request<pb::ApplyPolicyRequest>,
    ) -> Reply<pb::ApplyPolicyResponse> {
        self.record("apply_policy", &req);
        let name = req.get_ref().files[0].name.clone();
        if req.get_ref().files[0].text.contains("10.6.6.6") {
            return Err(tonic::Status::invalid_argument(format!(
                "{name}:1:10: refused by the node\n{name}:2:1: and this too"
            )));
        }
        Ok(tonic::Response::new(pb::ApplyPolicyResponse {
            hash: "ab".repeat(32),
            changed: true,
            warnings: vec![format!("{name}:2:1: warning: switch off")],
        }))
    }
}

/// Serves `stub` on loopback, with `tls` when given; its address.
async fn serve_stub(stub: Arc<Stub>, tls: Option<tonic::transport::ServerTlsConfig>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).unwrap();
    }
    let server = builder
        .add_service(pb::admin_server::AdminServer::from_arc(stub))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    addr
}

/// relayratectl in a blocking thread, so that the stub keeps serving.
async fn ctl_async(cmd: Command) -> Output {
    let mut cmd = cmd;
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_the_token_the_fields_and_who_asked() {
    let stub = Arc::new(Stub::default());
    let addr = serve_stub(stub.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "  tok-123 \n").unwrap();
    let url = format!("http://{addr}");

    let mut cmd = ctl_cmd(&url);
    cmd.args(["top", "--check", "msgratefrom", "-n", "3", "--token-file"])
        .arg(&token);
    let out = ctl_async(cmd).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no counters\n");

    let mut cmd = ctl_cmd(&url);
    cmd.env("USER", "alice")
        .args(["reset", "a@b.test", "--check", "MsgRateFrom", "--json"]);
    let out = ctl_async(cmd).await;
    assert!(out.status.success(), "{}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"key": "a@b.test", "check": "MsgRateFrom", "cleared": 3})
    );

    let calls = stub.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls[0].starts_with(
            "top auth=Bearer tok-123 TopRequest { check: MsgRateFrom, limit: 3, unusual: false }"
        ),
        "{calls:?}"
    );
    assert!(calls[1].starts_with("reset auth=- "), "{calls:?}");
    assert!(calls[1].contains("check: MsgRateFrom"), "{calls:?}");
    assert!(calls[1].contains("requested_by: \"alice@"), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_become_one_line_and_an_exit_code() {
    let stub = Arc::new(Stub::default());
    let addr = serve_stub(stub.clone(), None).await;
    let url = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();

    let cases: [(&[&str], i32, &str); 5] = [
        (
            &["members"],
            69,
            &format!("relayratectl: {url} unavailable: no leader"),
        ),
        (
            &["add-node", "4", "127.0.0.1:9"],
            1,
            "relayratectl: refused: node 4 already a member",
        ),
        (
            &["remove-node", "3"],
            1,
            "relayratectl: permission denied: unauthenticated: missing token",
        ),
        (
            &["show", "k"],
            1,
            "relayratectl: permission denied: wrong token",
        ),
        (&["policy", "show"], 1, "does not serve this request"),
    ];
    for (args, code, says) in cases {
        let mut cmd = ctl_cmd(&url);
        cmd.args(args);
        let out = ctl_async(cmd).await;
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            describe(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", describe(&out));
    }

    // A policy valid here that the node refuses: its lines, then exit 1.
    let file = dir.path().join("p.txt");
    std::fs::write(&file, "CHECK_CONN_RATE YES\nConnRate:10.6.6.6 5\n").unwrap();
    let mut cmd = ctl_cmd(&url);
    cmd.args(["policy", "apply"]).arg(&file);
    let out = ctl_async(cmd).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let name = file.display().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[0],
        format!("{name}:1:10: refused by the node"),
        "{err}"
    );
    assert_eq!(lines[1], format!("{name}:2:1: and this too"), "{err}");
    assert!(
        lines[2].starts_with("relayratectl: policy not applied"),
        "{err}"
    );

    // Accepted: warnings on stderr, the hash on stdout.
    std::fs::write(&file, "CHECK_CONN_RATE YES\nConnRate:10.1.1.1 5\n").unwrap();
    let mut cmd = ctl_cmd(&url);
    cmd.args(["policy", "apply"]).arg(&file);
    let out = ctl_async(cmd).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("policy {} in force\n", "ab".repeat(32))
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("{name}:2:1: warning: switch off\n")
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in
/// PEM files under `dir` (ca, server, client .pem and .key); the stub's TLS.
fn certificates(dir: &Path) -> tonic::transport::ServerTlsConfig {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("127.0.0.1");
    let (client_cert, client_key) = leaf("relayratectl.test");
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), &server_cert).unwrap();
    std::fs::write(dir.join("server.key"), &server_key).unwrap();
    std::fs::write(dir.join("client.pem"), client_cert).unwrap();
    std::fs::write(dir.join("client.key"), client_key).unwrap();
    tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            server_cert,
            server_key,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(ca.pem()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_reaches_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certificates(dir.path());
    let stub = Arc::new(Stub::default());
    let addr = serve_stub(stub.clone(), Some(tls)).await;
    let file = |name: &str| dir.path().join(name);

    // http:// with --tls-ca is taken as https.
    for url in [format!("https://{addr}"), format!("http://{addr}")] {
        let mut cmd = ctl_cmd(&url);
        cmd.args(["status", "--json", "--tls-ca"])
            .arg(file("ca.pem"))
            .arg("--tls-cert")
            .arg(file("client.pem"))
            .arg("--tls-key")
            .arg(file("client.key"));
        let out = ctl_async(cmd).await;
        assert!(out.status.success(), "{url}: {}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["id"], 7, "{v}");
    }

    // Without its certificate the node does not serve relayratectl.
    let mut cmd = ctl_cmd(&format!("https://{addr}"));
    cmd.args(["--timeout-secs", "5", "status", "--tls-ca"])
        .arg(file("ca.pem"));
    let out = ctl_async(cmd).await;
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("relayratectl: connection to https://"),
        "{}",
        describe(&out)
    );

    // Nor to a client that does not trust the node's CA.
    let mut cmd = ctl_cmd(&format!("https://{addr}"));
    cmd.args(["--timeout-secs", "5", "status"]);
    let out = ctl_async(cmd).await;
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UnknownIssuer"),
        "{}",
        describe(&out)
    );
    assert_eq!(stub.calls.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn relayratectl_reaches_a_node_that_asks_for_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let file = |name: &str| dir.path().join(name);
    let root = tempfile::tempdir().unwrap();
    let node = NodeProc::start_with_args(
        root.path(),
        1,
        Some(POLICY),
        None,
        &[
            "--tls-cert".as_ref(),
            file("server.pem").as_os_str(),
            "--tls-key".as_ref(),
            file("server.key").as_os_str(),
            "--tls-client-ca".as_ref(),
            file("ca.pem").as_os_str(),
        ],
    );
    let url = format!("https://{}", node.addr);
    let with_certs = |args: &[&str]| {
        ctl_cmd(&url)
            .args(args)
            .arg("--tls-ca")
            .arg(file("ca.pem"))
            .arg("--tls-cert")
            .arg(file("client.pem"))
            .arg("--tls-key")
            .arg(file("client.key"))
            .output()
            .unwrap()
    };
    let ready = poll(DEADLINE, || {
        let out = with_certs(&["status", "--json"]);
        let ok = out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|s| s["ready"] == true);
        async move { ok }
    })
    .await;
    assert!(ready, "node never answered over TLS:\n{}", node.log());
    let out = with_certs(&["reset", "10.99.0.9"]);
    assert!(out.status.success(), "{}", describe(&out));

    // Without a client certificate, or over plain HTTP, nothing is served.
    let out = ctl_cmd(&url)
        .args(["status", "--tls-ca"])
        .arg(file("ca.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    let out = ctl(node.addr, &["status"]);
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
}
