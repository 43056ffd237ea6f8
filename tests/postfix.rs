//! End to end with a real Postfix on loopback: clients bound to 127.0.0.11
//! and 127.0.0.12 send through Postfix, with relayrate's milter attached,
//! into smtp-sink. The seed's checks refuse at the right message with the
//! right code, the other client is not affected, and every accepted
//! message arrives.

mod common;

use std::time::Duration;

use common::{eventually, postfix_available, temp_root, Postfix, Relayrate, Sink, Smtp};

/// The seed's configuration with smaller figures, for 127.0.0.11.
const POLICY: &str = "\
CHECK_CONN_RATE YES
CHECK_OPEN_CONNECTIONS YES
CHECK_NB_RCPT YES
CHECK_MSG_RATE YES
CHECK_NB_MSGS YES
ConnRate:127.0.0.11 8
ConnOpen:127.0.0.11 5
MaxRcpt:127.0.0.11 3
MsgRate:127.0.0.11 5
MaxMsgs:127.0.0.11 2
ConnOpen:127.0.0.13 2
";

const A: &str = "127.0.0.11";
const B: &str = "127.0.0.12";
/// Open connections are shown with a client of their own: A's earlier
/// connections may still be closing in the milter when the test goes on.
const C: &str = "127.0.0.13";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_checks_through_a_real_postfix() {
    if !postfix_available("the_seeds_checks_through_a_real_postfix") {
        return;
    }
    let root = temp_root();
    let sink = Sink::start(root.path());
    let rr = Relayrate::run(root.path(), "a", POLICY);
    rr.wait_ready().await;
    let pf = Postfix::start(root.path(), "relay-a", &rr.milter(), sink.port);
    pf.wait_ready().await;
    let mut accepted = Vec::new();
    let mut b_count = 0;
    // Client B sends alongside A throughout; nothing of A's touches it.
    let mut send_b = |b: &mut Vec<String>| {
        b_count += 1;
        let subject = format!("b-{b_count}");
        b.push(subject.clone());
        subject
    };

    // Connection 1 (A): MaxRcpt 3 refuses the 4th recipient; MaxMsgs 2
    // refuses the 3rd MAIL.
    let mut c = Smtp::connect(A, pf.port).await.unwrap();
    assert!(c.banner.starts_with("220"), "{}", c.banner);
    c.ehlo().await;
    let (mail, rcpts, end) = c
        .send(
            "web@a.test",
            &["r1@x.test", "r2@x.test", "r3@x.test", "r4@x.test"],
            "a-1",
        )
        .await;
    assert!(mail.starts_with("250"), "{mail}");
    assert!(rcpts[..3].iter().all(|r| r.starts_with("250")), "{rcpts:?}");
    assert!(
        rcpts[3].starts_with("451 4.3.2 Too many recipients for this message (4/3)"),
        "{}",
        rcpts[3]
    );
    assert!(end.starts_with("250"), "{end}");
    accepted.push("a-1".to_string());
    let (_, _, end) = c.send("web@a.test", &["r1@x.test"], "a-2").await;
    assert!(end.starts_with("250"), "{end}");
    accepted.push("a-2".to_string());
    let (mail, _, _) = c.send("web@a.test", &["r1@x.test"], "a-3").await;
    assert!(
        mail.starts_with("451 4.3.2 Too many messages for this connection (3/2)"),
        "{mail}"
    );
    c.quit().await.unwrap();

    let mut b = Smtp::connect(B, pf.port).await.unwrap();
    b.ehlo().await;
    let subject = send_b(&mut accepted);
    let (_, _, end) = b.send("app@b.test", &["r@x.test"], &subject).await;
    assert!(end.starts_with("250"), "B: {end}");

    // Connections 2 and 3: three more messages reach MsgRate 5; the 6th
    // MAIL is refused.
    for (conn, subjects) in [(2, vec!["a-4", "a-5"]), (3, vec!["a-6"])] {
        let mut c = Smtp::connect(A, pf.port).await.unwrap();
        assert!(
            c.banner.starts_with("220"),
            "connection {conn}: {}",
            c.banner
        );
        c.ehlo().await;
        for s in subjects {
            let (_, _, end) = c.send("web@a.test", &["r1@x.test"], s).await;
            assert!(end.starts_with("250"), "{s}: {end}");
            accepted.push(s.to_string());
        }
        if conn == 3 {
            let (mail, _, _) = c.send("web@a.test", &["r1@x.test"], "a-7").await;
            assert!(
                mail.starts_with("451 4.3.2 Message rate too high (5/5 in 600s)"),
                "{mail}"
            );
        }
        c.quit().await.unwrap();
    }
    let subject = send_b(&mut accepted);
    let (mail, _, end) = b.send("app@b.test", &["r@x.test"], &subject).await;
    assert!(end.starts_with("250"), "B after A's refusals: {mail} {end}");

    // ConnOpen 2: a third simultaneous connection gets Postfix's 421, and
    // once one has closed, another is accepted.
    let mut open1 = Smtp::connect(C, pf.port).await.unwrap();
    let mut open2 = Smtp::connect(C, pf.port).await.unwrap();
    assert!(open1.banner.starts_with("220") && open2.banner.starts_with("220"));
    let third = Smtp::connect(C, pf.port).await.unwrap();
    assert!(
        third.banner.starts_with("421"),
        "third open connection: {}",
        third.banner
    );
    drop(third);
    open1.quit().await.unwrap();
    drop(open1);
    let mut again = None;
    for _ in 0..50 {
        let c = Smtp::connect(C, pf.port).await.unwrap();
        if c.banner.starts_with("220") {
            again = Some(c);
            break;
        }
        // The closes are still on their way through the milter.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut again = again.expect("a connection accepted once one closed");
    again.quit().await.unwrap();
    open2.quit().await.unwrap();

    // ConnRate 8: A has made three connections; five more pass, the
    // ninth is refused.
    for n in 4..=8 {
        let mut c = Smtp::connect(A, pf.port).await.unwrap();
        assert!(c.banner.starts_with("220"), "connection {n}: {}", c.banner);
        c.quit().await.unwrap();
    }
    let ninth = Smtp::connect(A, pf.port).await.unwrap();
    assert!(
        ninth.banner.starts_with("421"),
        "ninth connection: {}",
        ninth.banner
    );
    drop(ninth);

    // B is still served.
    let subject = send_b(&mut accepted);
    let (_, _, end) = b.send("app@b.test", &["r@x.test"], &subject).await;
    assert!(end.starts_with("250"), "B at the end: {end}");
    b.quit().await.unwrap();

    // Every accepted message arrives at the sink, and nothing else.
    accepted.sort();
    eventually(
        "every accepted message at the sink",
        Duration::from_secs(60),
        || sink.subjects() == accepted,
    )
    .await;
    // Postfix logged the milter's reply; relayrate logged each refusal.
    let maillog = pf.maillog();
    assert!(
        maillog.contains("4.5.1 Too many open connections"),
        "{maillog}"
    );
    let log = rr.log();
    let refusals = [
        ("MaxRcpt", A, "rcpt"),
        ("MaxMsgs", A, "mail"),
        ("MsgRate", A, "mail"),
        ("ConnOpen", C, "connect"),
        ("ConnRate", A, "connect"),
    ];
    for (check, client, stage) in refusals {
        let wanted = [
            "refused".to_string(),
            format!("client={client}"),
            format!("check=\"{check}\""),
            format!("stage=\"{stage}\""),
        ];
        assert!(
            log.lines()
                .any(|l| wanted.iter().all(|w| l.contains(w.as_str()))),
            "no refusal line {wanted:?} in:\n{log}"
        );
    }
}

/// The report: with these two lines, `<app@example.org>` was refused at
/// its third message but the null sender `<>` passed every message and
/// 6 recipients.
const NULL_SENDER_POLICY: &str = "\
CHECK_MSG_RATE YES
CHECK_RCPT_RATE YES
MsgRateFrom:default 2
RcptRateFrom:default 4
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_null_sender_is_counted_through_a_real_postfix() {
    if !postfix_available("the_null_sender_is_counted_through_a_real_postfix") {
        return;
    }
    let root = temp_root();
    let sink = Sink::start(root.path());
    let rr = Relayrate::run(root.path(), "a", NULL_SENDER_POLICY);
    rr.wait_ready().await;
    let pf = Postfix::start(root.path(), "relay-a", &rr.milter(), sink.port);
    pf.wait_ready().await;
    let mut c = Smtp::connect(A, pf.port).await.unwrap();
    c.ehlo().await;
    // Bounces, 3 recipients each: RcptRateFrom 4 lets the first message's
    // 3 and the second's first through, MsgRateFrom 2 refuses the third.
    let rcpts = ["r1@x.test", "r2@x.test", "r3@x.test"];
    let (mail, replies, end) = c.send("", &rcpts, "bounce-1").await;
    assert!(mail.starts_with("250"), "{mail}");
    assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");
    assert!(end.starts_with("250"), "{end}");
    let (mail, replies, end) = c.send("", &rcpts, "bounce-2").await;
    assert!(mail.starts_with("250"), "{mail}");
    assert!(replies[0].starts_with("250"), "{replies:?}");
    for (r, n) in replies[1..].iter().zip([5, 6]) {
        assert!(
            r.starts_with(&format!(
                "451 4.3.2 Recipient rate too high ({n}/4 in 600s)"
            )),
            "{replies:?}"
        );
    }
    assert!(end.starts_with("250"), "{end}");
    let (mail, _, _) = c.send("", &["r1@x.test"], "bounce-3").await;
    assert!(
        mail.starts_with("451 4.3.2 Message rate too high (2/2 in 600s)"),
        "{mail}"
    );
    c.quit().await.unwrap();
    // Another sender is counted on its own.
    let mut b = Smtp::connect(B, pf.port).await.unwrap();
    b.ehlo().await;
    let (_, _, end) = b.send("app@example.org", &["r1@x.test"], "app-1").await;
    assert!(end.starts_with("250"), "{end}");
    b.quit().await.unwrap();
    eventually(
        "the accepted messages at the sink",
        Duration::from_secs(60),
        || sink.subjects() == ["app-1", "bounce-1", "bounce-2"],
    )
    .await;
    let log = rr.log();
    assert!(
        log.lines().any(|l| l.contains("check=\"MsgRateFrom\"")
            && l.contains("counted=\"<>\"")
            && l.contains("sender=\"<>\"")),
        "no MsgRateFrom refusal of <> in:\n{log}"
    );
}
