//! SIGHUP: a node re-reads its --policy file and puts it in force, keeping
//! the counts; a broken file is logged with FILE:LINE:COL and changes
//! nothing.

mod common;

use std::time::Duration;

use common::{eventually, eventually_async, temp_root, NodeProc};
use relayrate::proto::v1::admin_client::AdminClient;
use relayrate::proto::v1::{ShowPolicyRequest, ShowRequest};
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);

async fn conn_rate(admin: &mut AdminClient<Channel>, ip: &str) -> (u64, u64) {
    let shown = admin
        .show(ShowRequest { key: ip.into() })
        .await
        .unwrap()
        .into_inner();
    let c = &shown.checks[0];
    assert_eq!(c.key, ip);
    (c.count, c.limit)
}

#[tokio::test]
async fn sighup_reloads_the_policy_and_keeps_counts() {
    let root = temp_root();
    let node = NodeProc::start(
        root.path(),
        1,
        Some("CHECK_CONN_RATE YES\nConnRate:default 30\n"),
        None,
    );
    // Deciding means counting: one connect of 10.77.0.1 (bench's first key).
    node.wait_deciding().await;
    let mut admin = AdminClient::connect(format!("http://{}", node.addr))
        .await
        .unwrap();
    let (count, limit) = conn_rate(&mut admin, "10.77.0.1").await;
    assert!(count >= 1);
    assert_eq!(limit, 30);
    let hash = |a: &mut AdminClient<Channel>| {
        let mut a = a.clone();
        async move {
            a.show_policy(ShowPolicyRequest {})
                .await
                .unwrap()
                .into_inner()
                .hash
        }
    };
    let before = hash(&mut admin).await;

    let policy = node.dir.join("policy.txt");
    std::fs::write(&policy, "CHECK_CONN_RATE YES\nConnRate:default 40\n").unwrap();
    node.signal("HUP");
    eventually_async("the new limit in force", DEADLINE, || {
        let mut a = admin.clone();
        async move { conn_rate(&mut a, "10.77.0.1").await.1 == 40 }
    })
    .await;
    let after = hash(&mut admin).await;
    assert_ne!(after, before);
    assert_eq!(
        conn_rate(&mut admin, "10.77.0.1").await.0,
        count,
        "counts kept"
    );

    // A broken file: named with its line and column in the log, and the
    // policy in force stays.
    std::fs::write(&policy, "CHECK_CONN_RATE YES\nConnRat:default 50\n").unwrap();
    node.signal("HUP");
    let place = format!("{}:2:1", policy.display());
    eventually("the error in the log", DEADLINE, || {
        node.log()
            .lines()
            .any(|l| l.contains("policy not reloaded") && l.contains(&place))
    })
    .await;
    assert_eq!(hash(&mut admin).await, after);
    assert_eq!(conn_rate(&mut admin, "10.77.0.1").await.1, 40);

    // A file with warnings: the log says each, as `policy check` does.
    std::fs::write(
        &policy,
        "CHECK_CONN_RATE YES\nConnRate:default 40\nMsgRate:10.1.1.1 5\nConnRate:default 41\n",
    )
    .unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_relayrate"))
        .args(["policy", "check"])
        .arg(&policy)
        .output()
        .unwrap();
    let warnings: Vec<String> = String::from_utf8_lossy(&check.stderr)
        .lines()
        .filter(|l| l.contains("warning:"))
        .map(String::from)
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    node.signal("HUP");
    eventually("each warning of policy check in the log", DEADLINE, || {
        let log = node.log();
        warnings.iter().all(|w| {
            log.lines()
                .any(|l| l.contains("SIGHUP") && l.contains(w.as_str()))
        })
    })
    .await;
}
