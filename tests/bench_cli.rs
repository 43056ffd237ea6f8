//! `relayrate bench` as a process against a one-node cluster running the
//! seed's policy: its figures add up and the built-in limits show, in the
//! closed loop and the open loop (`--rate`).

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
