//! `relayrate bench` as a process against a one-node cluster running the
//! seed's policy: its figures add up and the built-in limits show.

use std::net::SocketAddr;
use std::process::Command;

use relayrate::node::{self, NodeConfig, Start};
use relayrate::policy::PolicyFile;
use tempfile::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_decisions_and_the_limit_holds_per_key() {
    let dir = TempDir::new().unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = NodeConfig::new(1, listen, dir.path().to_path_buf(), Start::Bootstrap);
    config.policy = vec![PolicyFile {
        name: "seed".into(),
        text: include_str!("../examples/ze-policy.txt").into(),
    }];
    let handle = node::start(config).await.unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !handle.node.is_ready() {
        assert!(
            std::time::Instant::now() < until,
            "the policy never came in force"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let target = format!("http://{}", handle.addr);
    // The seed's policy: ConnRate for 10.77.0.x is the built-in 15.
    let out = tokio::task::spawn_blocking(move || {
        // On two threads, not its default one.
        Command::new(env!("CARGO_BIN_EXE_relayrate"))
            .args(["--threads", "2"])
            .args([
                "bench",
                "--target",
                &target,
                "--keys",
                "4",
                "--concurrency",
                "2",
            ])
            .args(["--duration", "3", "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = |k: &str| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };
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
