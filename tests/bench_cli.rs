//! `relayrate bench` as a process against a one-node cluster running the
//! seed's policy: its figures add up and the built-in limits show, in the
//! closed loop and the open loop (`--rate`).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use relayrate::node::{self, NodeConfig, NodeHandle, Start};
use relayrate::policy::PolicyFile;
use tempfile::TempDir;

/// A one-node cluster deciding with the seed's policy, where ConnRate for
/// 10.77.0.x is the built-in 15.
async fn seed_node() -> (TempDir, NodeHandle) {
    let dir = TempDir::new().unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = NodeConfig::new(1, listen, dir.path().to_path_buf(), Start::Bootstrap);
    config.policy = vec![PolicyFile {
        name: "seed".into(),
        text: include_str!("../examples/ze-policy.txt").into(),
    }];
    let handle = node::start(config).await.unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while !handle.node.is_ready() {
        assert!(Instant::now() < until, "the policy never came in force");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (dir, handle)
}

/// Runs `relayrate [global] bench --target NODE --json [args]`; its report.
async fn bench(global: &[&str], node: &NodeHandle, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayrate"));
    cmd.args(global)
        .args(["bench", "--json", "--target"])
        .arg(format!("http://{}", node.addr))
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn n(report: &serde_json::Value, k: &str) -> u64 {
    report[k]
        .as_u64()
        .unwrap_or_else(|| panic!("{k} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_decisions_and_the_limit_holds_per_key() {
    let (_dir, handle) = seed_node().await;
    // On two threads, not its default one.
    let args = ["--keys", "4", "--concurrency", "2", "--duration", "3"];
    let report = bench(&["--threads", "2"], &handle, &args).await;
    let n = |k: &str| n(&report, k);
    assert_eq!(n("errors"), 0);
    assert_eq!(n("decisions"), n("allowed") + n("denied"));
    assert!(
        n("decisions") > 60,
        "too few decisions to reach the limits: {report}"
    );
    assert_eq!(n("allowed"), 4 * 15, "{report}");
    assert!(report["per_second"].as_f64().unwrap() > 0.0);
    assert!(n("p50_us") <= n("p99_us"));
    handle.shutdown().await;
}

/// The open loop starts its sessions on a schedule: 100 a second for 2
/// seconds is 200 decisions, whatever the answers, at about 100 a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_at_a_rate_offers_that_load() {
    let (_dir, handle) = seed_node().await;
    let args = ["--keys", "4", "--rate", "100", "--duration", "2"];
    let report = bench(&[], &handle, &args).await;
    let n = |k: &str| n(&report, k);
    assert_eq!(n("errors"), 0, "{report}");
    assert_eq!(n("decisions"), 200, "{report}");
    // 50 connects for each of 4 addresses, 15 of them allowed.
    assert_eq!(n("allowed"), 4 * 15, "{report}");
    let per_second = report["per_second"].as_f64().unwrap();
    assert!((80.0..=101.0).contains(&per_second), "{report}");
    assert!(0 < n("p50_us") && n("p50_us") <= n("p99_us"), "{report}");
    handle.shutdown().await;
}

/// A node that hangs (SIGSTOP: it takes connections and answers nothing)
/// does not hold the run past `--duration`: sessions in flight at the end
/// are abandoned, and counted as such. Both loops, 2 s runs, each ended
/// within 2 s and a margin of 1.5 s (before: each Connect waited for its
/// 5 s call deadline, then its Close for another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ends_on_time_against_a_node_that_hangs() {
    let root = tempfile::tempdir().unwrap();
    let node = common::NodeProc::start(root.path(), 1, Some("CHECK_CONN_RATE YES\n"), None);
    node.wait_deciding().await;
    node.signal("STOP");
    for extra in [&[][..], &["--rate", "50"][..]] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relayrate"));
        cmd.args(["bench", "--json", "--duration", "2", "--concurrency", "4"])
            .arg("--target")
            .arg(format!("http://{}", node.addr))
            .args(extra);
        let began = Instant::now();
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let took = began.elapsed();
        eprintln!("{extra:?}: a 2 s run against a hung node took {took:?}");
        assert!(
            took < Duration::from_millis(3_500),
            "{extra:?}: a 2 s run took {took:?}"
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(n(&report, "decisions"), 0, "{report}");
        assert!(n(&report, "abandoned") >= 1, "{extra:?}: {report}");
    }
    node.signal("CONT");
}
