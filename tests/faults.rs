//! Faults a node must come through keeping its word, with real `relayrate`
//! processes and real sled files: a leader cut off from its peers while
//! they elect another and snapshot, then healed; a restart after
//! `relayratectl policy apply`; a Raft core that stops.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{free_port, NodeProc};
use relayrate::convert::event_to_pb;
use relayrate::engine::{ConnId, Event};
use relayrate::node::{Proposal, ProposalReply};
use relayrate::policy::Client;
use relayrate::proto::v1 as pb;
use relayrate::proto::v1::limiter_client::LimiterClient;
use relayrate::raft::peer_auth::PeerAuth;
use tonic::transport::{Channel, Endpoint};

/// How long a node may keep a caller waiting, whatever happens (the
/// node's deadline, 10 s, and a margin for a busy machine).
const ANSWER_WITHIN: Duration = Duration::from_secs(13);
/// Deadline for any one step (an election, a restart, a heal).
const STEP: Duration = Duration::from_secs(60);

fn limiter(addr: SocketAddr) -> LimiterClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("an address")
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    LimiterClient::new(channel)
}

/// A Connect of `ip` at the node at `addr`: its verdict, or the error it
/// answered, or "no answer" after `wait`; and how long it took.
async fn connect(
    addr: SocketAddr,
    ip: &str,
    conn: u64,
    wait: Duration,
) -> (Result<pb::Verdict, String>, Duration) {
    let event = Event::Connect {
        conn: ConnId { owner: 0, conn },
        client: Client::from_ip(ip.parse().unwrap()),
    };
    let request = tonic::Request::new(pb::DecideRequest {
        events: vec![event_to_pb(&event)],
    });
    let started = Instant::now();
    let mut client = limiter(addr);
    let answer = match tokio::time::timeout(wait, client.decide(request)).await {
        Err(_) => Err(format!("no answer within {wait:?}")),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Ok(Ok(reply)) => reply
            .into_inner()
            .verdicts
            .into_iter()
            .next()
            .ok_or_else(|| "no verdict".into()),
    };
    (answer, started.elapsed())
}

/// Whether the node at peer address `peer` leads (only a leader answers
/// `Members` itself).
async fn leads(peer: SocketAddr) -> bool {
    let as_node_1 = PeerAuth::new(1, Some(common::test_secret()), false);
    let peer = peer.to_string();
    let call = common::peer_propose(&peer, None, &as_node_1, Proposal::Members);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), call).await,
        Ok(Ok(ProposalReply::Members(_)))
    )
}

/// GET /metrics on loopback `port`, or `None` while nothing answers.
async fn scrape_or_none(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.ok()?;
    reply.starts_with("HTTP/1.1 200").then_some(reply)
}

/// A gauge's value in a /metrics text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

const CUT_POLICY: &str = "CHECK_CONN_RATE YES\nConnRate:default 1000000\n";

/// Issue 14, item 10. The leader is cut off from both peers (they are
/// stopped), callers write to it; then it is stopped in turn while the
/// peers elect another leader and snapshot past its log; then it comes
/// back. While cut off, each Decide it is asked ends with an error within
/// the deadline; after the heal (through a snapshot) it decides again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_fails_writes_in_time_and_decides_again_after_a_snapshot_heal() {
    let root = common::temp_root();
    let metrics: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let args = |i: usize| -> Vec<std::ffi::OsString> {
        vec![
            "--snapshot-every".into(),
            "20".into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", metrics[i]).into(),
        ]
    };
    let mut nodes: Vec<NodeProc> = Vec::new();
    for id in 1..=3u64 {
        let a = args(id as usize - 1);
        let a: Vec<&std::ffi::OsStr> = a.iter().map(|s| s.as_os_str()).collect();
        let (policy, seed) = match nodes.first() {
            None => (Some(CUT_POLICY), None),
            Some(first) => (None, Some(first.peer)),
        };
        nodes.push(NodeProc::start_with_args(root.path(), id, policy, seed, &a));
        nodes[0].wait_deciding().await;
    }
    for n in &nodes[1..] {
        n.wait_deciding().await;
    }
    let until = Instant::now() + STEP;
    let leader = loop {
        let mut found = None;
        for (i, n) in nodes.iter().enumerate() {
            if leads(n.peer).await {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        assert!(Instant::now() < until, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let old = nodes[leader].addr;

    // The cut: the leader's peers stop answering.
    for &i in &others {
        nodes[i].signal("STOP");
    }
    let mut cut = Vec::new();
    for c in 0..3u64 {
        cut.push(tokio::spawn(connect(
            old,
            "10.66.0.1",
            c,
            ANSWER_WITHIN * 2,
        )));
    }
    for task in cut {
        let (answer, took) = task.await.unwrap();
        assert!(
            answer.is_err() && took <= ANSWER_WITHIN,
            "a Decide at the cut-off leader answered {answer:?} after {took:?}, \
             not an error within {ANSWER_WITHIN:?}"
        );
    }
    // A write still pending at the leader when the peers move on.
    let pending = tokio::spawn(connect(old, "10.66.0.1", 10, ANSWER_WITHIN * 2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[leader].signal("STOP");
    for &i in &others {
        nodes[i].signal("CONT");
    }

    // The others elect a leader and write until their snapshots pass the
    // old leader's log.
    let until = Instant::now() + STEP;
    let mut written = 0;
    for conn in 100.. {
        let (answer, _) = connect(nodes[others[0]].addr, "10.66.0.2", conn, ANSWER_WITHIN).await;
        written += u32::from(answer.is_ok());
        if written == 100 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the others never decided: {answer:?}"
        );
    }
    let snapshots: Vec<f64> = {
        let mut v = Vec::new();
        for &i in &others {
            let text = common::scrape(metrics[i]).await;
            v.push(gauge(&text, "relayrate_raft_snapshot_index").unwrap_or(0.0));
        }
        v
    };

    // The heal.
    nodes[leader].signal("CONT");
    let (answer, took) = pending.await.unwrap();
    assert!(
        took <= ANSWER_WITHIN,
        "the pending Decide answered {answer:?} after {took:?}"
    );
    let until = Instant::now() + STEP;
    let mut conn = 1000;
    loop {
        let (answer, took) = connect(old, "10.66.0.3", conn, ANSWER_WITHIN * 2).await;
        conn += 1;
        assert!(
            took <= ANSWER_WITHIN,
            "a Decide at the old leader after the heal answered {answer:?} after {took:?}\n{}",
            nodes[leader].log()
        );
        if answer.is_ok() {
            break;
        }
        assert!(
            Instant::now() < until,
            "the old leader never decided after the heal: {answer:?}\n{}",
            nodes[leader].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The heal went through a snapshot.
    assert!(
        nodes[leader]
            .log()
            .contains("snapshot installed from the leader"),
        "no heal through a snapshot (the others' at {snapshots:?}):\n{}",
        nodes[leader].log()
    );
    // Still answering, in time, a few more.
    for c in 0..5 {
        let (answer, took) = connect(old, "10.66.0.3", 2000 + c, ANSWER_WITHIN * 2).await;
        assert!(
            answer.is_ok() && took <= ANSWER_WITHIN,
            "{answer:?} after {took:?}"
        );
    }
}

/// `relayrate run` as a process, on the same ports and data dir at each
/// start.
struct Run {
    dir: std::path::PathBuf,
    node: SocketAddr,
    milter: u16,
    metrics: u16,
    runs: u32,
    child: Option<std::process::Child>,
}

impl Run {
    fn new(root: &std::path::Path) -> Run {
        let dir = root.join("run");
        std::fs::create_dir_all(&dir).unwrap();
        Run {
            dir,
            node: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            milter: free_port(),
            metrics: free_port(),
            runs: 0,
            child: None,
        }
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.join(format!("stderr-{}", self.runs))
    }

    /// Starts it, with these `--policy` files if any.
    fn start(&mut self, policy: &[&std::path::Path]) {
        self.runs += 1;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_relayrate"));
        cmd.arg("run")
            .arg("--listen")
            .arg(self.node.to_string())
            .arg("--milter-listen")
            .arg(format!("inet:127.0.0.1:{}", self.milter))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.metrics))
            .arg("--data-dir")
            .arg(self.dir.join("data"));
        for p in policy {
            cmd.arg("--policy").arg(p);
        }
        cmd.env("RELAYRATE_LOG", "info,openraft=warn")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.log_path()).unwrap());
        self.child = Some(cmd.spawn().unwrap());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops it with SIGTERM and waits for a clean exit.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let until = Instant::now() + STEP;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "exit {status}:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < until, "no exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the node decides a Connect.
    async fn wait_deciding(&self) {
        let until = Instant::now() + STEP;
        for conn in 0.. {
            let (answer, _) = connect(self.node, "10.67.0.1", conn, ANSWER_WITHIN).await;
            if answer.is_ok() {
                return;
            }
            assert!(
                Instant::now() < until,
                "never decided: {answer:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// relayratectl `args` against it; its stdout, checked to succeed.
    fn ctl(&self, args: &[&std::ffi::OsStr]) -> String {
        let out = common::relayratectl(self.node, args);
        assert!(
            out.status.success(),
            "relayratectl {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The hash of the policy in force.
    fn policy_hash(&self) -> String {
        let show = self.ctl(&["policy".as_ref(), "show".as_ref(), "--json".as_ref()]);
        let v: serde_json::Value = serde_json::from_str(&show).unwrap();
        v["hash"].as_str().unwrap().to_string()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn file_hash(path: &std::path::Path) -> String {
    let policy = relayrate::policy::Policy::from_paths(&[path.to_path_buf()]).unwrap();
    relayrate::raft::state::policy_hash(policy.files())
}

/// Issue 14, item 6. `relayrate run` with no --policy starts a cluster
/// with the built-in policy; `relayratectl policy apply` puts another in
/// force; SIGTERM and `relayrate run` again: the applied policy is still
/// in force. Only an explicit --policy replaces it, and says so, naming
/// both hashes; a node whose --policy the cluster no longer has says so
/// in its log and in `relayrate_policy_differs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_policy_applied_and_only_an_explicit_policy_replaces_it() {
    let root = common::temp_root();
    let mut run = Run::new(root.path());
    run.start(&[]);
    run.wait_deciding().await;
    let built_in = run.policy_hash();
    let applied = root.path().join("applied.txt");
    std::fs::write(&applied, "CHECK_CONN_RATE YES\nConnRate:default 50\n").unwrap();
    run.ctl(&["policy".as_ref(), "apply".as_ref(), applied.as_os_str()]);
    assert_eq!(run.policy_hash(), file_hash(&applied));
    assert_ne!(built_in, file_hash(&applied));

    // Restarted as it was started: the applied policy stays.
    run.stop().await;
    run.start(&[]);
    run.wait_deciding().await;
    assert_eq!(
        run.policy_hash(),
        file_hash(&applied),
        "the restart put another policy in force:\n{}",
        run.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(run.policy_hash(), file_hash(&applied));

    // An explicit --policy replaces it, loudly.
    let explicit = root.path().join("explicit.txt");
    std::fs::write(&explicit, "CHECK_CONN_RATE YES\nConnRate:default 30\n").unwrap();
    run.stop().await;
    run.start(&[&explicit]);
    run.wait_deciding().await;
    assert_eq!(run.policy_hash(), file_hash(&explicit));
    let log = run.log();
    let warned = log.lines().any(|l| {
        l.contains("WARN") && l.contains(&file_hash(&explicit)) && l.contains(&file_hash(&applied))
    });
    assert!(warned, "no warning naming both hashes:\n{log}");

    // Another policy applied while this node runs with its --policy.
    run.ctl(&["policy".as_ref(), "apply".as_ref(), applied.as_os_str()]);
    let until = Instant::now() + STEP;
    loop {
        let metrics = common::scrape(run.metrics).await;
        let log = run.log();
        let warned = log.lines().filter(|l| l.contains("WARN")).any(|l| {
            l.contains("not this node's --policy")
                && l.contains(&file_hash(&explicit))
                && l.contains(&file_hash(&applied))
        });
        if warned && gauge(&metrics, "relayrate_policy_differs") == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < until,
            "no warning or metric of a --policy the cluster no longer has:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run.stop().await;
}

/// A tmpfs of `size` mounted at `at` for as long as this lives.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {} (needs root)", at.display());
        Tmpfs(at.to_path_buf())
    }

    /// Fills it: a file grows until the disk is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `relayrate node` joining `seed`, with its data dir `data` and fixed
/// ports, so that it can be started again as a supervisor would.
struct Supervised {
    args: Vec<std::ffi::OsString>,
    log_dir: std::path::PathBuf,
    addr: SocketAddr,
    metrics: u16,
    runs: u32,
    child: Option<Child>,
}

impl Supervised {
    fn new(root: &std::path::Path, id: u64, data: &std::path::Path, seed: SocketAddr) -> Self {
        let join = ["--join".into(), seed.to_string().into()];
        Supervised::with(root, id, data, &join)
    }

    /// Node `id` with `start` (`--bootstrap`, or `--join ADDR`, and any
    /// other arguments).
    fn with(
        root: &std::path::Path,
        id: u64,
        data: &std::path::Path,
        start: &[std::ffi::OsString],
    ) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics = free_port();
        let peer: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log_dir = root.join(format!("supervised-{id}"));
        std::fs::create_dir_all(&log_dir).unwrap();
        let args: Vec<std::ffi::OsString> = vec![
            "node".into(),
            "--id".into(),
            id.to_string().into(),
            "--listen".into(),
            addr.to_string().into(),
            "--peer-listen".into(),
            peer.to_string().into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}").into(),
            "--cluster-secret-file".into(),
            common::test_secret_file(root).into(),
            "--data-dir".into(),
            data.into(),
        ];
        let args = args.into_iter().chain(start.iter().cloned()).collect();
        Supervised {
            args,
            log_dir,
            addr,
            metrics,
            runs: 0,
            child: None,
        }
    }

    fn start(&mut self) {
        self.runs += 1;
        let child = Command::new(env!("CARGO_BIN_EXE_relayrate"))
            .args(&self.args)
            .env("RELAYRATE_LOG", "info,openraft=warn")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.log_path()).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.log_dir.join(format!("stderr-{}", self.runs))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    async fn wait_deciding(&mut self) {
        let until = Instant::now() + STEP;
        for conn in 0.. {
            let (answer, _) = connect(self.addr, "10.68.0.1", conn, ANSWER_WITHIN).await;
            if answer.is_ok() {
                return;
            }
            assert!(
                Instant::now() < until && self.exited().is_none(),
                "never decided ({answer:?}, exit {:?}):\n{}",
                self.exited(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Issue 14, item 11. A follower's data dir is a small tmpfs that fills
/// up: its Raft core stops, and the node says why and exits (70) instead
/// of staying "ready"; started again as its supervisor would while the
/// disk is still full, it waits, not ready, saying why (log, and
/// `relayrate_data_dir_writable` 0); once there is room it starts and
/// decides by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_node_and_it_resumes_by_itself_when_there_is_room() {
    let root = common::temp_root();
    let n1 = NodeProc::start(root.path(), 1, Some(CUT_POLICY), None);
    n1.wait_deciding().await;
    let n2 = NodeProc::start(root.path(), 2, None, Some(n1.peer));
    n2.wait_deciding().await;
    let disk = Tmpfs::mount(&root.path().join("disk-3"), "4m");
    let data = disk.0.join("data");
    let mut n3 = Supervised::new(root.path(), 3, &data, n1.peer);
    n3.start();
    n3.wait_deciding().await;

    let filler = disk.fill();
    // Writes through the leader reach node 3's log, which cannot grow.
    let until = Instant::now() + STEP;
    let mut conn = 0;
    let status = loop {
        if let Some(status) = n3.exited() {
            break status;
        }
        for _ in 0..20 {
            conn += 1;
            let _ = connect(n1.addr, "10.68.0.2", conn, ANSWER_WITHIN).await;
        }
        assert!(
            Instant::now() < until,
            "node 3 still runs on a full disk:\n{}",
            n3.log()
        );
    };
    assert_eq!(status.code(), Some(70), "{}", n3.log());
    assert!(
        n3.log().contains("the Raft core stopped"),
        "no reason given:\n{}",
        n3.log()
    );

    // Started again while the disk is still full: it waits, not ready.
    n3.start();
    let until = Instant::now() + STEP;
    loop {
        let metrics = scrape_or_none(n3.metrics).await;
        let waiting = metrics
            .as_deref()
            .and_then(|m| gauge(m, "relayrate_data_dir_writable"))
            == Some(0.0);
        if waiting && n3.log().contains("cannot write the data dir") {
            break;
        }
        assert!(
            Instant::now() < until && n3.exited().is_none(),
            "no word of a full disk (exit {:?}):\n{}",
            n3.exited(),
            n3.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (answer, _) = connect(n3.addr, "10.68.0.3", 1, ANSWER_WITHIN).await;
    assert!(answer.is_err(), "decided with a full disk: {answer:?}");

    // Room again: it starts and decides, by itself (the same process).
    std::fs::remove_file(filler).unwrap();
    n3.wait_deciding().await;
    assert_eq!(n3.runs, 2);
    assert!(n3.exited().is_none());
}

/// The readiness probe's answer for the node at `addr`: the status of
/// service `""`, or `None` when it does not answer.
async fn health(addr: SocketAddr) -> Option<i32> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .ok()?;
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let reply = HealthClient::new(channel).check(request).await.ok()?;
    Some(reply.into_inner().status)
}

/// Issue 14, item 7: a Raft core that ends without a word (as after a
/// panic) makes the node not ready: health NOT_SERVING, no verdicts, and
/// the reason kept for the process to exit on (`relayrate` exits 70, as
/// the full-disk test shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_raft_core_ended_is_not_ready() {
    use relayrate::node::{self, NodeConfig, Start};
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::TempDir::new().unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = NodeConfig::new(1, listen, dir.path().to_path_buf(), Start::Bootstrap);
    config.raft = common::fast_raft();
    let handle = node::start(config).await.unwrap();
    let serving = ServingStatus::Serving as i32;
    common::eventually_async("ready", STEP, || async {
        health(handle.addr).await == Some(serving)
    })
    .await;
    assert!(connect(handle.addr, "10.69.0.1", 1, ANSWER_WITHIN)
        .await
        .0
        .is_ok());

    // The core ends behind the node's back.
    handle.node.raft.shutdown().await.unwrap();
    let not_serving = ServingStatus::NotServing as i32;
    common::eventually_async("not ready", STEP, || async {
        health(handle.addr).await == Some(not_serving)
    })
    .await;
    let node = handle.node.clone();
    common::eventually("the stop noticed", STEP, || {
        node.raft_stopped().is_some() && !node.is_ready()
    })
    .await;
    let (answer, took) = connect(handle.addr, "10.69.0.1", 2, ANSWER_WITHIN * 2).await;
    assert!(
        answer.is_err() && took <= ANSWER_WITHIN,
        "{answer:?} after {took:?}"
    );
    let why = tokio::time::timeout(ANSWER_WITHIN, handle.node.wait_raft_stopped()).await;
    assert!(why.is_ok(), "nothing tells the process the core stopped");
    handle.kill().await;
}
