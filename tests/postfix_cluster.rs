//! Two Postfix relays, each with its own milter and its own node of one
//! 3-node cluster: a client alternating between the relays gets exactly
//! its limit in total, not twice it.

mod common;

use std::time::Duration;

use common::{eventually, postfix_available, temp_root, MilterProc, NodeProc, Postfix, Sink, Smtp};

const POLICY: &str = "\
CHECK_MSG_RATE YES
CHECK_CONN_RATE YES
MsgRate:127.0.0.21 6
ConnRate:127.0.0.21 1k
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_alternating_between_two_relays_gets_its_limit_once() {
    if !postfix_available("a_client_alternating_between_two_relays_gets_its_limit_once") {
        return;
    }
    let root = temp_root();
    let sink = Sink::start(root.path());
    let n1 = NodeProc::start(root.path(), 1, Some(POLICY), None);
    n1.wait_deciding().await;
    let n2 = NodeProc::start(root.path(), 2, None, Some(n1.peer));
    let n3 = NodeProc::start(root.path(), 3, None, Some(n1.peer));
    n2.wait_deciding().await;
    n3.wait_deciding().await;
    // Relay A asks node 1, relay B asks node 2.
    let ma = MilterProc::start(root.path(), "a", n1.addr);
    let mb = MilterProc::start(root.path(), "b", n2.addr);
    ma.wait_listening().await;
    mb.wait_listening().await;
    let pa = Postfix::start(root.path(), "relay-a", &ma.addr(), sink.port);
    let pb = Postfix::start(root.path(), "relay-b", &mb.addr(), sink.port);
    pa.wait_ready().await;
    pb.wait_ready().await;

    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for i in 0..14 {
        let relay = if i % 2 == 0 { &pa } else { &pb };
        let mut c = Smtp::connect("127.0.0.21", relay.port).await.unwrap();
        assert!(c.banner.starts_with("220"), "{}", c.banner);
        c.ehlo().await;
        let subject = format!("m-{i:02}");
        let (mail, _, end) = c.send("web@w.test", &["r@x.test"], &subject).await;
        if mail.starts_with("250") {
            assert!(end.starts_with("250"), "{subject}: {end}");
            accepted.push(subject);
        } else {
            assert!(
                mail.starts_with("451 4.3.2 Message rate too high (6/6 in 600s)"),
                "{subject}: {mail}"
            );
            refused.push(subject);
        }
        c.quit().await.unwrap();
    }
    assert_eq!(accepted.len(), 6, "accepted {accepted:?}");
    assert_eq!(refused.len(), 8);
    // Both relays refused: the limit held for the sum.
    assert!(refused
        .iter()
        .any(|s| s.ends_with(['0', '2', '4', '6', '8'])));
    assert!(refused
        .iter()
        .any(|s| s.ends_with(['1', '3', '5', '7', '9'])));
    accepted.sort();
    eventually(
        "the accepted messages at the sink",
        Duration::from_secs(60),
        || sink.subjects() == accepted,
    )
    .await;
    drop((n3, ma, mb));
}
