//! The Prometheus endpoint of real processes: after known traffic, the
//! decision counters, near-limit count, milter refusals and fallbacks, and
//! the Raft figures read what happened.

mod common;

use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually_async, free_port, NodeProc, Relayrate};
use indymilter_test::{Status, TestConnection};
use relayrate::convert::event_to_pb;
use relayrate::engine::{ConnId, Event};
use relayrate::policy::Client;
use relayrate::proto::v1::limiter_client::LimiterClient;
use relayrate::proto::v1::DecideRequest;
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(30);

use common::scrape;

/// The value of the sample whose name and labels are `series` exactly.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn connect(ip: &str, conn: u64) -> Event {
    Event::Connect {
        conn: ConnId { owner: 0, conn },
        client: Client::from_ip(ip.parse().unwrap()),
    }
}

#[tokio::test]
async fn metrics_count_what_the_node_and_the_milter_decided() {
    let root = tempfile::tempdir().unwrap();
    let policy = "CHECK_CONN_RATE YES\nConnRate:default 5\n";
    let relay = Relayrate::run(root.path(), "m", policy);
    relay.wait_ready().await;

    // 7 connects for one address with a limit of 5: 5 allowed, 2 refused;
    // the 4th reaches 80% of the limit. Each connect is closed.
    let mut limiter = LimiterClient::connect(format!("http://{}", relay.node))
        .await
        .unwrap();
    let mut refused = 0;
    for conn in 1..=7 {
        let events = vec![
            event_to_pb(&connect("10.66.0.1", conn)),
            event_to_pb(&Event::Close {
                conn: ConnId { owner: 0, conn },
            }),
        ];
        let reply = limiter.decide(DecideRequest { events }).await.unwrap();
        if !reply.into_inner().verdicts[0].allowed {
            refused += 1;
        }
    }
    assert_eq!(refused, 2);

    // The milter refuses the same address at connect, and releases the
    // connection's lease when it closes (one more close).
    let milter: SocketAddr = format!("127.0.0.1:{}", relay.milter_port).parse().unwrap();
    let mut c = TestConnection::open(milter).await.unwrap();
    let ip: IpAddr = "10.66.0.1".parse().unwrap();
    let status = c.connect("web.example", (ip, 40000)).await.unwrap();
    assert!(matches!(status, Status::Tempfail { .. }), "{status:?}");
    drop(c);

    let port = relay.metrics_port;
    let series = [
        (
            r#"relayrate_decisions_total{event="connect",verdict="allow",check="none"}"#,
            5.0,
        ),
        (
            r#"relayrate_decisions_total{event="connect",verdict="refuse",check="ConnRate"}"#,
            3.0,
        ),
        (
            r#"relayrate_decisions_total{event="close",verdict="allow",check="none"}"#,
            8.0,
        ),
        (r#"relayrate_near_limit_total{check="ConnRate"}"#, 1.0),
        (
            r#"relayrate_milter_refusals_total{check="ConnRate",stage="connect",dry_run="false"}"#,
            1.0,
        ),
        ("relayrate_raft_is_leader", 1.0),
        ("relayrate_raft_members", 1.0),
        ("relayrate_ready", 1.0),
        // 7 calls of ours, the milter's connect and its close.
        ("relayrate_decision_seconds_count", 9.0),
    ];
    // Gauges are copied every second: wait for them, with a deadline.
    let until = std::time::Instant::now() + DEADLINE;
    let text = loop {
        let text = scrape(port).await;
        let wrong: Vec<_> = series
            .iter()
            .filter(|(s, v)| sample(&text, s) != Some(*v))
            .map(|(s, v)| format!("{s}: want {v}, got {:?}", sample(&text, s)))
            .collect();
        if wrong.is_empty() {
            break text;
        }
        assert!(std::time::Instant::now() < until, "{wrong:#?}\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let applied = sample(&text, "relayrate_raft_applied_index").unwrap();
    let commit = sample(&text, "relayrate_raft_commit_index").unwrap();
    assert!(applied >= 8.0, "8 written batches at least: {applied}");
    assert_eq!(
        commit,
        sample(&text, "relayrate_raft_last_log_index").unwrap()
    );
    assert_eq!(sample(&text, "relayrate_raft_apply_lag"), Some(0.0));
    assert!(text.contains("relayrate_batch_events_bucket"));
}

/// The figures of where a write's time goes, on a 3-node cluster of
/// processes: 5 Decide calls, one after the other, through a follower are
/// 5 forwards there, and 5 log writes at the leader, each flushed and
/// sent to the followers with its entries.
#[tokio::test]
async fn a_cluster_shows_where_a_writes_time_goes() {
    let root = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let listen: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let metrics_on = |i: usize| [OsStr::new("--metrics-listen"), OsStr::new(&listen[i])];
    let policy = "CHECK_CONN_RATE YES\nConnRate:default 100\n";
    let first = NodeProc::start_with_args(root.path(), 1, Some(policy), None, &metrics_on(0));
    first.wait_deciding().await;
    let seed = Some(first.peer);
    let nodes = [
        first,
        NodeProc::start_with_args(root.path(), 2, None, seed, &metrics_on(1)),
        NodeProc::start_with_args(root.path(), 3, None, seed, &metrics_on(2)),
    ];
    for n in &nodes {
        n.wait_deciding().await;
    }

    // The leader as its gauge says (copied every second).
    let until = std::time::Instant::now() + DEADLINE;
    let leader = 'found: loop {
        for (i, port) in ports.iter().enumerate() {
            if sample(&scrape(*port).await, "relayrate_raft_is_leader") == Some(1.0) {
                break 'found i;
            }
        }
        assert!(
            std::time::Instant::now() < until,
            "no leader in the metrics"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let follower = (leader + 1) % 3;

    let write = r#"relayrate_raft_write_seconds_count{command="decide"}"#;
    let forward = r#"relayrate_forward_seconds_count{proposal="decide"}"#;
    let entries = r#"relayrate_append_entries_seconds_count{kind="entries"}"#;
    let flushes = "relayrate_log_flush_seconds_count";
    let count = |text: &str, series: &str| sample(text, series).unwrap_or(0.0);
    let at_leader = scrape(ports[leader]).await;
    let at_follower = scrape(ports[follower]).await;

    let mut limiter = LimiterClient::connect(format!("http://{}", nodes[follower].addr))
        .await
        .unwrap();
    for conn in 1..=5 {
        let events = vec![event_to_pb(&connect("10.66.0.9", conn))];
        let reply = limiter.decide(DecideRequest { events }).await.unwrap();
        assert!(reply.into_inner().verdicts[0].allowed);
    }

    let leader_after = scrape(ports[leader]).await;
    let follower_after = scrape(ports[follower]).await;
    let grew =
        |before: &str, after: &str, series: &str| count(after, series) - count(before, series);
    assert_eq!(
        grew(&at_follower, &follower_after, forward),
        5.0,
        "{follower_after}"
    );
    assert_eq!(
        grew(&at_leader, &leader_after, write),
        5.0,
        "{leader_after}"
    );
    assert!(
        grew(&at_leader, &leader_after, entries) >= 5.0,
        "{leader_after}"
    );
    assert!(
        grew(&at_leader, &leader_after, flushes) >= 5.0,
        "{leader_after}"
    );
    // A follower writes no log entry itself, and the leader forwards none.
    assert_eq!(grew(&at_follower, &follower_after, write), 0.0);
    assert_eq!(grew(&at_leader, &leader_after, forward), 0.0);
    // One flush makes one or more appends durable.
    assert_eq!(
        count(&leader_after, flushes),
        count(&leader_after, "relayrate_log_flush_appends_count")
    );
    assert!(
        count(&leader_after, "relayrate_log_flush_appends_sum") >= count(&leader_after, flushes)
    );
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_milter_counts_its_fallbacks_by_fail_mode() {
    let milter_port = free_port();
    let metrics_port = free_port();
    let dead_node = free_port();
    let _milter = Killed(
        Command::new(env!("CARGO_BIN_EXE_relayrate"))
            .args(["milter", "--fail-mode", "open", "--timeout-ms", "100"])
            .arg("--listen")
            .arg(format!("inet:127.0.0.1:{milter_port}"))
            .arg("--node")
            .arg(format!("http://127.0.0.1:{dead_node}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let milter: SocketAddr = format!("127.0.0.1:{milter_port}").parse().unwrap();
    eventually_async("the milter listening", DEADLINE, || async {
        TcpStream::connect(milter).await.is_ok()
    })
    .await;
    let mut c = TestConnection::open(milter).await.unwrap();
    let ip: IpAddr = "10.66.0.9".parse().unwrap();
    assert_eq!(
        c.connect("web.example", (ip, 40000)).await.unwrap(),
        Status::Continue,
        "fail mode open accepts"
    );
    let text = scrape(metrics_port).await;
    assert_eq!(
        sample(&text, r#"relayrate_milter_fallbacks_total{mode="open"}"#),
        Some(1.0),
        "{text}"
    );
}

/// Every counter and gauge README names is there at the first scrape of a
/// node that has decided nothing yet (a dashboard or an alert on a series
/// that does not exist reads "no data", not 0), and the milter's refusals
/// are labelled `dry_run="false"` as the refusal log says `dry_run=false`.
/// Histograms (`_seconds`, `relayrate_batch_events`,
/// `relayrate_log_flush_appends`) have no zero: they appear with their
/// first observation, as README says.
#[tokio::test]
async fn every_metric_the_readme_lists_exists_from_the_start() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut listed: Vec<&str> = readme
        .match_indices("relayrate_")
        .map(|(i, _)| {
            let rest = &readme[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        // `relayrate_raft_*` names a family; the full names follow it.
        .filter(|name| !name.ends_with('_'))
        .filter(|name| {
            !(name.ends_with("_seconds")
                || *name == "relayrate_batch_events"
                || *name == "relayrate_log_flush_appends")
        })
        .collect();
    listed.sort_unstable();
    listed.dedup();
    assert!(listed.len() >= 10, "{listed:?}");

    let root = common::temp_root();
    let relay = Relayrate::run(root.path(), "a", "CHECK_CONN_RATE YES\n");
    relay.wait_ready().await;
    let text = scrape(relay.metrics_port).await;
    let missing: Vec<&&str> = listed
        .iter()
        .filter(|name| {
            !text
                .lines()
                .any(|l| !l.starts_with('#') && l.starts_with(**name))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not in the first scrape: {missing:?}\n{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"relayrate_milter_refusals_total{check="MsgRate",stage="mail",dry_run="false"}"#
        ),
        Some(0.0),
        "{text}"
    );
}
