//! The batching client of the `Limiter` service against a real one-node
//! cluster: concurrent callers share calls and each gets the verdict of
//! its own event; a node that never answers fails its callers at the
//! deadline and does not hold the calls after it.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use relayrate::check::Check;
use relayrate::engine::{ConnId, Event, Verdict};
use relayrate::limiter_client::BatchingClient;
use relayrate::node::{self, NodeConfig, Start};
use relayrate::policy::{Client, PolicyFile};
use tempfile::TempDir;
use tonic::transport::Endpoint;

mod common;
use common::eventually;

fn connect(n: u64, ip: &str) -> Event {
    Event::Connect {
        conn: ConnId { owner: 0, conn: n },
        client: Client::from_ip(ip.parse::<IpAddr>().unwrap()),
    }
}

fn client(url: String, deadline: Duration) -> BatchingClient {
    let channel = Endpoint::from_shared(url).unwrap().connect_lazy();
    BatchingClient::new(channel, deadline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_calls_and_each_gets_its_own_verdict() {
    let dir = TempDir::new().unwrap();
    let mut config = NodeConfig::new(
        1,
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
        Start::Bootstrap,
    );
    config.policy = vec![PolicyFile {
        name: "test".into(),
        text: "CHECK_CONN_RATE YES\nConnRate:10.9.9.1 3\nConnRate:default 1000\n".into(),
    }];
    let node = node::start(config).await.unwrap();
    let ready = node.node.clone();
    eventually("policy in force", Duration::from_secs(30), || {
        ready.is_ready()
    })
    .await;

    let limiter = client(format!("http://{}", node.addr), Duration::from_secs(5));
    // 20 connections of the limited client and 20 of 20 others, at once.
    let callers: Vec<_> = (0..40u64)
        .map(|n| {
            let limiter = limiter.clone();
            let ip = if n % 2 == 0 {
                "10.9.9.1".to_string()
            } else {
                format!("10.9.8.{n}")
            };
            tokio::spawn(async move { (ip.clone(), limiter.decide(&connect(n, &ip)).await) })
        })
        .collect();
    let mut limited_allowed = 0;
    for caller in callers {
        let (ip, verdict) = caller.await.unwrap();
        let verdict = verdict.expect("the node answers");
        if ip == "10.9.9.1" {
            limited_allowed += u32::from(verdict.is_allowed());
            if let Verdict::Refuse(r) = &verdict {
                assert_eq!((r.check, r.limit), (Check::ConnRate, 3), "{r:?}");
            }
        } else {
            assert!(verdict.is_allowed(), "{ip}: {verdict:?}");
        }
    }
    assert_eq!(limited_allowed, 3, "the limit holds across shared calls");
    assert!(
        limiter.calls() < 40,
        "40 concurrent events took {} calls",
        limiter.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_fails_callers_at_the_deadline_and_holds_no_later_call() {
    let (url, _hung) = common::hung_node().await;
    let deadline = Duration::from_millis(200);
    let limiter = client(url, deadline);
    // More rounds than calls in flight: each round must still end at its
    // deadline, not wait behind the calls of the round before.
    for round in 0..4u64 {
        let asked = Instant::now();
        let event = connect(round, "10.9.7.1");
        let answered = tokio::time::timeout(Duration::from_secs(2), limiter.decide(&event))
            .await
            .unwrap_or_else(|_| panic!("round {round}: no answer at all within 2 s"));
        let took = asked.elapsed();
        let status = answered.expect_err("a hung node gives no verdict");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_millis(1000),
            "round {round} took {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_caller_gave_up_is_not_sent() {
    let (url, _hung) = common::hung_node().await;
    let limiter = client(url, Duration::from_millis(200));
    // Two callers hold both calls in flight, one call each.
    let mut held = Vec::new();
    for n in 0..2u64 {
        let l = limiter.clone();
        held.push(tokio::spawn(async move {
            l.decide(&connect(n, "10.9.6.1")).await
        }));
        let l = limiter.clone();
        eventually("the call is out", Duration::from_secs(2), move || {
            l.calls() == n + 1
        })
        .await;
    }
    // A third waits behind them and gives up, deciding without the node
    // (as the milter's fail mode does).
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        limiter.decide(&connect(2, "10.9.6.1")),
    )
    .await;
    assert!(gave_up.is_err(), "nothing can answer within 50 ms");
    for h in held {
        let status = h.await.unwrap().expect_err("hung");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    }
    // The next event goes out as the third call: the abandoned one never
    // went.
    let status = limiter
        .decide(&connect(3, "10.9.6.1"))
        .await
        .expect_err("hung");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(limiter.calls(), 3, "the abandoned event was sent");
}

/// Events of long senders: those past the node's bounds are refused alone,
/// and the others leave in calls small enough for the node to take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_past_the_bounds_fails_alone_and_big_events_are_split_into_calls() {
    let dir = TempDir::new().unwrap();
    let config = NodeConfig::new(
        1,
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
        Start::Bootstrap,
    );
    let node = node::start(config).await.unwrap();
    let ready = node.node.clone();
    eventually("ready", Duration::from_secs(30), || ready.is_ready()).await;
    let limiter = client(format!("http://{}", node.addr), Duration::from_secs(10));
    let message = |sender: String| Event::GiveBack {
        client: Client::from_ip("10.9.7.1".parse::<IpAddr>().unwrap()).with_sender(&sender),
        held_secs: 0,
    };
    // 400 events of 3 KB senders: 1.2 MB, more than one call takes.
    let mut callers: Vec<_> = (0..400)
        .map(|n| {
            let limiter = limiter.clone();
            let event = message(format!("{n}{}@example.org", "s".repeat(3000)));
            tokio::spawn(async move { limiter.decide(&event).await })
        })
        .collect();
    let too_long = message(format!("{}@example.org", "s".repeat(5000)));
    callers.push({
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.decide(&too_long).await })
    });
    let too_long = callers.pop().unwrap().await.unwrap();
    let status = too_long.expect_err("a 5 KB sender");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    for caller in callers {
        let verdict = caller.await.unwrap();
        assert!(matches!(verdict, Ok(Verdict::Allow)), "{verdict:?}");
    }
    assert!(limiter.calls() >= 3, "{} calls", limiter.calls());
}
