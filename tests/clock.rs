//! The cluster's time on a 3-node cluster of processes whose clocks
//! disagree (libfaketime): a leader whose clock runs ahead must not end
//! the windows early when it takes office.

mod common;

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use common::{faketime_available, free_port, scrape, NodeProc, LIBFAKETIME};
use relayrate::convert::event_to_pb;
use relayrate::engine::{ConnId, Event};
use relayrate::policy::Client;
use relayrate::proto::v1::limiter_client::LimiterClient;
use relayrate::proto::v1::{Check, DecideRequest};
use tonic::transport::{Channel, Endpoint};

const DEADLINE: Duration = Duration::from_secs(30);

/// The value of the sample whose name and labels are `series` exactly.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn limiter(addr: std::net::SocketAddr) -> LimiterClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    LimiterClient::new(channel)
}

/// One Connect of `ip`: `Ok(allowed)`, or the error (no leader yet...).
async fn connect(c: &mut LimiterClient<Channel>, ip: &str, conn: u64) -> Result<bool, String> {
    let event = Event::Connect {
        conn: ConnId { owner: 0, conn },
        client: Client::from_ip(ip.parse().unwrap()),
    };
    let events = vec![event_to_pb(&event)];
    let reply = c
        .decide(DecideRequest { events })
        .await
        .map_err(|s| s.to_string())?;
    let v = reply.into_inner().verdicts.remove(0);
    assert!(v.allowed || v.check == Check::ConnRate as i32, "{v:?}");
    Ok(v.allowed)
}

/// The reported case, scaled: `RateWindow 60` and a limit of 20 used up
/// under a leader with a true clock; then the only nodes left run 120 s
/// ahead (inside the peers' 5-minute MAC window) and one of them takes
/// office. Stamped by its own clock the window would be over and the
/// whole limit granted again; carried forward from the log's stamps, the
/// count still holds. The fast nodes say their clock is off, in the log
/// and in `relayrate_clock_offset_seconds`.
#[tokio::test]
async fn a_leader_whose_clock_runs_ahead_does_not_grant_the_limit_twice() {
    if !faketime_available("a_leader_whose_clock_runs_ahead_does_not_grant_the_limit_twice") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let policy = "CHECK_CONN_RATE YES\nRateWindow 60\nConnRate:10.91.0.1 20\n";
    let first = NodeProc::start(root.path(), 1, Some(policy), None);
    first.wait_deciding().await;
    let ahead = [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME", "+120s"),
        // Only the wall clock is shifted; tokio's timers keep real time.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let metrics: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let fast: Vec<NodeProc> = (0..2)
        .map(|i| {
            // A short lease: heartbeat entries every second, and the
            // offset warned about 6 s after it shows.
            let args = [
                OsStr::new("--metrics-listen"),
                OsStr::new(&metrics[i]),
                OsStr::new("--lease-ttl-secs"),
                OsStr::new("3"),
            ];
            NodeProc::start_with_env(
                root.path(),
                2 + i as u64,
                None,
                Some(first.peer),
                &args,
                &ahead,
            )
        })
        .collect();
    for n in &fast {
        n.wait_deciding().await;
    }

    // The whole limit, under node 1 (the bootstrapping leader).
    let mut c1 = limiter(first.addr);
    let mut conn = 0;
    for _ in 0..20 {
        conn += 1;
        assert_eq!(connect(&mut c1, "10.91.0.1", conn).await, Ok(true));
    }
    conn += 1;
    assert_eq!(connect(&mut c1, "10.91.0.1", conn).await, Ok(false));

    // Node 1 dies: a node whose clock runs 120 s ahead takes office.
    let began = Instant::now();
    drop(first);
    let mut c2 = limiter(fast[0].addr);
    let (mut allowed, mut refused) = (0, 0);
    while refused + allowed < 20 {
        conn += 1;
        match connect(&mut c2, "10.91.0.1", conn).await {
            Ok(true) => allowed += 1,
            Ok(false) => refused += 1,
            Err(e) => {
                assert!(began.elapsed() < DEADLINE, "no new leader: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for (i, m) in metrics.iter().enumerate() {
        let port = m.rsplit(':').next().unwrap().parse().unwrap();
        let text = scrape(port).await;
        let offset = sample(&text, "relayrate_clock_offset_seconds").unwrap();
        assert!(
            (100.0..140.0).contains(&offset),
            "node {}: offset {offset} s",
            i + 2
        );
    }
    assert_eq!(
        (allowed, refused),
        (0, 20),
        "a new leader 120 s ahead, {:?} after the limit was used up",
        began.elapsed()
    );
    for (i, n) in fast.iter().enumerate() {
        let warned = || {
            n.log()
                .contains("clock differs from the cluster's time by more than a second")
        };
        common::eventually("the fast node warns", DEADLINE, warned).await;
        assert!(
            !n.log().contains("agrees with the cluster's time again"),
            "node {}",
            i + 2
        );
    }
}

/// Scrapes `series` on `port` until it shows; its value.
async fn wait_sample(port: u16, series: &str) -> f64 {
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = sample(&scrape(port).await, series) {
            return v;
        }
        assert!(Instant::now() < until, "{series} never showed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The time a whole cluster is down still passes: a node stopped and
/// started again 90 s later (its clock moved on by 90 s: libfaketime)
/// resumes the cluster's time from its clock and the offset it measured
/// before the stop, not from the log's last stamp. With `RateWindow 60`
/// the count made before the stop has left the window.
#[tokio::test]
async fn the_time_a_stopped_cluster_was_down_still_passes() {
    if !faketime_available("the_time_a_stopped_cluster_was_down_still_passes") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let policy = "CHECK_CONN_RATE YES\nRateWindow 60\nConnRate:10.92.0.1 3\n";
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [OsStr::new("--metrics-listen"), OsStr::new(&listen)];
    let node = NodeProc::start_with_args(root.path(), 1, Some(policy), None, &args);
    node.wait_deciding().await;
    let mut c = limiter(node.addr);
    for conn in 1..=3 {
        assert_eq!(connect(&mut c, "10.92.0.1", conn).await, Ok(true));
    }
    assert_eq!(connect(&mut c, "10.92.0.1", 4).await, Ok(false));
    // The offset is stored before the metric shows it.
    let offset = wait_sample(port, "relayrate_clock_offset_seconds").await;
    assert!(offset.abs() < 1.0, "offset {offset} s");
    drop(node);

    let later = [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME", "+90s"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [OsStr::new("--metrics-listen"), OsStr::new(&listen)];
    let node = NodeProc::start_with_env(root.path(), 1, Some(policy), None, &args, &later);
    node.wait_deciding().await;
    let mut c = limiter(node.addr);
    let allowed = {
        let mut n = 0;
        for conn in 5..=7 {
            n += u32::from(connect(&mut c, "10.92.0.1", conn).await == Ok(true));
        }
        n
    };
    let offset = wait_sample(port, "relayrate_clock_offset_seconds").await;
    assert!(offset.abs() < 5.0, "offset {offset} s after the restart");
    assert_eq!(
        allowed,
        3,
        "90 s after the window's counts:\n{}",
        node.log()
    );
}
