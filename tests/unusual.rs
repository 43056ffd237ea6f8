//! Unusual activity in a real node process on real sled: a key that starts
//! sending above the floor with no history is flagged (one log line, the
//! gauge, `relayratectl top --unusual`), and the flag survives a SIGKILL
//! and restart. The engine's own tests cover the rates over simulated
//! weeks; tests/cluster.rs the leader change.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{eventually_async, free_port, scrape, test_secret_file};
use relayrate::convert::event_to_pb;
use relayrate::engine::{ConnId, Event};
use relayrate::policy::Client;
use relayrate::proto::v1 as pb;
use relayrate::proto::v1::limiter_client::LimiterClient;
use serde_json::Value;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(60);

/// One-hour buckets: a flag lasts until the next bucket's first event.
const POLICY: &str =
    "CHECK_CONN_RATE YES\nConnRate:default 1000\nRateWindow 7200\nRateBucket 3600\n";

/// Waits out the last minutes of an hour, so that the test's bucket does
/// not end under it.
pub async fn clear_of_the_hour() {
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

struct Node {
    dir: PathBuf,
    addr: SocketAddr,
    peer: SocketAddr,
    metrics: u16,
    runs: u32,
    child: Option<Child>,
    /// `--snapshot-every`: 5, so that a restart reads a snapshot.
    snapshot_every: &'static str,
}

impl Node {
    fn new(root: &Path) -> Node {
        let dir = root.join("node");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("policy.txt"), POLICY).unwrap();
        let port = |_| format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Node {
            addr: port(()),
            peer: port(()),
            metrics: free_port(),
            dir,
            runs: 0,
            child: None,
            snapshot_every: "5",
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("stderr-{}", self.runs))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts it the same way each time; a snapshot every 5 entries, so
    /// that a restart reads one.
    fn start(&mut self, root: &Path) {
        self.runs += 1;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayrate"));
        cmd.args(["node", "--id", "1", "--bootstrap", "--snapshot-every"])
            .arg(self.snapshot_every)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--peer-listen")
            .arg(self.peer.to_string())
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.metrics))
            .arg("--cluster-secret-file")
            .arg(test_secret_file(root))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--policy")
            .arg(self.dir.join("policy.txt"))
            .env("RELAYRATE_LOG", relayrate::logs::DEFAULT_FILTER)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.log_path()).unwrap());
        self.child = Some(cmd.spawn().unwrap());
    }

    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    fn ctl(&self, args: &[&str]) -> Value {
        let out = common::relayratectl(self.addr, &[args, &["--json"]].concat());
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The keys of `top --unusual`.
    fn unusual(&self) -> Vec<String> {
        let v = self.ctl(&["top", "--unusual"]);
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key"].as_str().unwrap().to_string())
            .collect()
    }

    async fn gauge(&self) -> Option<f64> {
        let text = scrape(self.metrics).await;
        text.lines()
            .find_map(|l| l.strip_prefix(r#"relayrate_unusual_keys{check="ConnRate"} "#))
            .map(|v| v.trim().parse().unwrap())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn limiter(addr: SocketAddr) -> LimiterClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    LimiterClient::new(ch)
}

fn connect(ip: &str, conn: u64) -> pb::DecideRequest {
    let event = Event::Connect {
        conn: ConnId { owner: 0, conn },
        client: Client::from_ip(ip.parse().unwrap()),
    };
    pb::DecideRequest {
        events: vec![event_to_pb(&event)],
    }
}

/// Sends Connects for `ip` until `n` were allowed (retrying while the
/// node starts).
async fn send(c: &mut LimiterClient<Channel>, ip: &str, n: u64, node: &Node) {
    let until = Instant::now() + DEADLINE;
    let mut allowed = 0;
    let mut conn = 0;
    while allowed < n {
        conn += 1;
        match c.decide(connect(ip, conn)).await {
            Ok(r) => {
                assert!(r.into_inner().verdicts[0].allowed, "under the limit");
                allowed += 1;
            }
            Err(e) => {
                assert!(Instant::now() < until, "{e}\n{}", node.log());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_is_logged_once_shown_counted_and_survives_a_restart() {
    clear_of_the_hour().await;
    let root = common::temp_root();
    let mut node = Node::new(root.path());
    node.start(root.path());
    let mut c = limiter(node.addr);
    // A quiet key: under the floor (10 in a bucket), never flagged.
    send(&mut c, "10.9.0.2", 3, &node).await;
    // A key with no history sending 15: flagged at its 10th.
    send(&mut c, "10.9.0.1", 15, &node).await;

    let top = node.ctl(&["top", "--unusual"]);
    let keys = top["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{top}");
    assert_eq!(keys[0]["key"], "10.9.0.1");
    assert_eq!(keys[0]["check"], "ConnRate");
    assert_eq!(keys[0]["unusual"], true);
    assert_eq!(keys[0]["count"], 15);
    assert_eq!(keys[0]["bucket_count"], 15);
    assert_eq!(keys[0]["limit"], 1000);
    assert_eq!(keys[0].get("baseline"), None, "no history: {top}");
    // The plain top lists both, the unusual one marked in JSON.
    let all = node.ctl(&["top", "--check", "ConnRate"]);
    assert_eq!(all["keys"].as_array().unwrap().len(), 2, "{all}");

    let lines: Vec<String> = node
        .log()
        .lines()
        .filter(|l| l.contains("relayrate::unusual"))
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 1, "one line, not one per event: {lines:#?}");
    for field in [
        "key=10.9.0.1",
        r#"check="ConnRate""#,
        "count=10",
        "limit=1000",
        "baseline=-",
    ] {
        assert!(lines[0].contains(field), "{field} in {}", lines[0]);
    }
    eventually_async("the gauge", DEADLINE, || async {
        node.gauge().await == Some(1.0)
    })
    .await;

    // More entries, so that a snapshot taken after the flag is what the
    // restart reads (the log before it is purged).
    send(&mut c, "10.9.0.4", 8, &node).await;
    node.kill();
    node.start(root.path());
    let mut c = limiter(node.addr);
    // Answers again (a quiet key: no new flag).
    send(&mut c, "10.9.0.3", 1, &node).await;
    assert_eq!(node.unusual(), ["10.9.0.1"], "{}", node.log());
    eventually_async("the gauge after the restart", DEADLINE, || async {
        node.gauge().await == Some(1.0)
    })
    .await;
}

/// A node that replays its log at start (no snapshot taken) applies the
/// flag's entry again: the key is unusual again, and the line is not
/// logged again (it was, when the entry was new).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_replayed_from_the_log_at_start_is_not_logged_again() {
    clear_of_the_hour().await;
    let root = common::temp_root();
    let mut node = Node::new(root.path());
    node.snapshot_every = "100000";
    node.start(root.path());
    let mut c = limiter(node.addr);
    send(&mut c, "10.9.0.1", 15, &node).await;
    let first = node.log();
    assert_eq!(
        first
            .lines()
            .filter(|l| l.contains("relayrate::unusual"))
            .count(),
        1,
        "{first}"
    );
    node.kill();
    node.start(root.path());
    let mut c = limiter(node.addr);
    send(&mut c, "10.9.0.3", 1, &node).await;
    assert_eq!(node.unusual(), ["10.9.0.1"], "{}", node.log());
    let replayed = node.log();
    let again: Vec<&str> = replayed
        .lines()
        .filter(|l| l.contains("relayrate::unusual"))
        .collect();
    assert!(again.is_empty(), "logged again at start: {again:#?}");
}
