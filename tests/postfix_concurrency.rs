//! The concurrency cases measured in the issue, through a real Postfix
//! with relayrate's milter attached, into smtp-sink (`docs/policy.md` §1):
//! a message takes its slot in MsgRate at MAIL FROM, so sessions in flight
//! together cannot pass the limit; a message that does not reach its end
//! gives its slot back; a refused connection takes no ConnOpen slot.
//! Each test has its own relay (Postfix, `relayrate run`, sink) and its
//! own client address (127.0.0.21, .41, .42, .43).

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{postfix_available, temp_root, Postfix, Relayrate, Sink, Smtp};
use tempfile::TempDir;

/// Longest wait for anything the tests expect: a session's replies, a
/// close reaching the node, a message reaching the sink.
const DEADLINE: Duration = Duration::from_secs(30);

/// One relay: Postfix asking `relayrate run`, delivering to a sink.
/// Fields drop in order: Postfix first, the directory last.
struct Relay {
    pf: Postfix,
    rr: Relayrate,
    sink: Sink,
    _root: TempDir,
}

impl Relay {
    async fn start(policy: &str) -> Relay {
        let root = temp_root();
        let sink = Sink::start(root.path());
        let rr = Relayrate::run(root.path(), "a", policy);
        rr.wait_ready().await;
        let pf = Postfix::start(root.path(), "relay-a", &rr.milter(), sink.port);
        pf.wait_ready().await;
        Relay {
            pf,
            rr,
            sink,
            _root: root,
        }
    }

    /// What went on, for a failure's message: the milter's and the node's
    /// log (fallbacks, refusals) and Postfix's.
    fn logs(&self) -> String {
        format!(
            "relayrate:\n{}\nmaillog:\n{}",
            self.rr.log(),
            self.pf.maillog()
        )
    }

    /// A session from `source` that was greeted with 220 and said EHLO.
    async fn session(&self, source: &str) -> Smtp {
        let mut s = Smtp::connect(source, self.pf.port).await.unwrap();
        assert!(s.banner.starts_with("220"), "banner: {}", s.banner);
        let ehlo = s.ehlo().await;
        assert!(ehlo.starts_with("250"), "EHLO: {ehlo}");
        s
    }

    /// Waits until the sink holds exactly the messages `subjects`.
    async fn delivered(&self, subjects: &[String]) {
        let mut wanted = subjects.to_vec();
        wanted.sort();
        let until = Instant::now() + DEADLINE;
        while self.sink.subjects() != wanted {
            assert!(
                Instant::now() < until,
                "the sink holds {:?}, not {wanted:?}\n{}",
                self.sink.subjects(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node's count of open connections from `ip` (ConnOpen in
    /// `relayratectl show IP --json`), `None` if it did not answer.
    fn open_count(&self, ip: &str) -> Option<u64> {
        open_count(self.rr.node, ip)
    }

    /// Waits until the node counts `n` connections open from `ip`.
    async fn open_becomes(&self, ip: &str, n: u64) {
        let until = Instant::now() + DEADLINE;
        loop {
            let now = self.open_count(ip);
            if now == Some(n) {
                return;
            }
            assert!(
                Instant::now() < until,
                "open connections from {ip}: {now:?}, never {n}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn open_count(node: SocketAddr, ip: &str) -> Option<u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_relayratectl"))
        .arg("--node")
        .arg(format!("http://{node}"))
        .args(["show", ip, "--json"])
        .env_remove("RELAYRATE_NODE")
        .env_remove("RELAYRATE_ADMIN_TOKEN_FILE")
        .output()
        .expect("run relayratectl");
    if !out.status.success() {
        return None;
    }
    let show: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    show["checks"]
        .as_array()?
        .iter()
        .find(|c| c["check"] == "ConnOpen")?["count"]
        .as_u64()
}

/// `future`, or a failure naming `what` once [`DEADLINE`] has passed.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {DEADLINE:?}"))
}

/// One command on `s`, with the deadline.
async fn cmd(s: &mut Smtp, line: &str) -> String {
    within(line, s.cmd(line)).await.unwrap()
}

/// DATA, then a message with `subject`: the reply to the end of data.
async fn data(s: &mut Smtp, subject: &str) -> String {
    let go = cmd(s, "DATA").await;
    assert!(go.starts_with("354"), "DATA: {go}");
    let body = format!("Subject: {subject}\r\nFrom: <web@w.test>\r\n\r\ntest message\r\n.");
    cmd(s, &body).await
}

/// MsgRate 1 and two sessions in flight: both send MAIL and RCPT, then
/// both DATA. The second MAIL finds the first message's slot taken: one
/// message is delivered, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_in_flight_deliver_one_message_under_msgrate_1() {
    if !postfix_available("two_sessions_in_flight_deliver_one_message_under_msgrate_1") {
        return;
    }
    const IP: &str = "127.0.0.41";
    let relay = Relay::start("CHECK_MSG_RATE YES\nMsgRate:127.0.0.41 1\n").await;
    let mut one = within("session one", relay.session(IP)).await;
    let mut two = within("session two", relay.session(IP)).await;

    let mail_one = cmd(&mut one, "MAIL FROM:<web@w.test>").await;
    let mail_two = cmd(&mut two, "MAIL FROM:<web@w.test>").await;
    let rcpt_one = cmd(&mut one, "RCPT TO:<r@x.test>").await;
    let rcpt_two = cmd(&mut two, "RCPT TO:<r@x.test>").await;
    assert!(mail_one.starts_with("250"), "first MAIL: {mail_one}");
    assert!(
        mail_two.starts_with("451 4.3.2 Message rate too high (1/1 in 600s)"),
        "second MAIL, the first message in flight: {mail_two}\n{}",
        relay.logs()
    );
    assert!(rcpt_one.starts_with("250"), "first RCPT: {rcpt_one}");
    // Postfix: no MAIL, no transaction.
    assert!(rcpt_two.starts_with("503"), "second RCPT: {rcpt_two}");

    let end_one = data(&mut one, "one").await;
    assert!(end_one.starts_with("250"), "first end of data: {end_one}");
    let data_two = cmd(&mut two, "DATA").await;
    assert!(data_two.starts_with("503"), "second DATA: {data_two}");
    cmd(&mut one, "QUIT").await;
    cmd(&mut two, "QUIT").await;

    relay.delivered(&["one".to_string()]).await;
}

/// MsgRate 5 and twenty one-message sessions started at once (all
/// greeted, then all send): exactly five messages are delivered, the
/// fifteen others refused at MAIL FROM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_at_once_deliver_exactly_msgrate_5() {
    if !postfix_available("twenty_sessions_at_once_deliver_exactly_msgrate_5") {
        return;
    }
    const IP: &str = "127.0.0.21";
    let relay = Relay::start("CHECK_MSG_RATE YES\nMsgRate:127.0.0.21 5\n").await;
    let port = relay.pf.port;
    // All greeted, then all send at once.
    let greeted = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let sessions: Vec<_> = (0..20)
        .map(|i| {
            let greeted = greeted.clone();
            tokio::spawn(async move {
                let subject = format!("m-{i:02}");
                let mut s = Smtp::connect(IP, port).await.unwrap();
                assert!(s.banner.starts_with("220"), "{subject}: {}", s.banner);
                s.ehlo().await;
                greeted.wait().await;
                let (mail, rcpts, end) = s.send("web@w.test", &["r@x.test"], &subject).await;
                let _ = s.quit().await;
                (subject, mail, rcpts, end)
            })
        })
        .collect();
    let mut delivered = Vec::new();
    let mut refused = Vec::new();
    for session in sessions {
        let (subject, mail, rcpts, end) = within("a session of twenty", session)
            .await
            .expect("session task");
        if mail.starts_with("250") {
            assert!(
                rcpts[0].starts_with("250") && end.starts_with("250"),
                "{subject}: {rcpts:?} {end}"
            );
            delivered.push(subject);
        } else {
            assert!(
                mail.starts_with("451 4.3.2 Message rate too high (5/5 in 600s)"),
                "{subject}: {mail}\n{}",
                relay.logs()
            );
            refused.push(subject);
        }
    }
    assert_eq!(
        (delivered.len(), refused.len()),
        (5, 15),
        "delivered {delivered:?}\n{}",
        relay.logs()
    );
    relay.delivered(&delivered).await;
}

/// ConnOpen 2: A and B admitted, C refused (Postfix answers 421 and
/// closes it); C took no slot, so A and B, rechecked at HELO and RCPT
/// right after C's refusal, go on sending. Then three bursts of six
/// connections at once each admit exactly two, which go on likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_takes_no_connopen_slot() {
    if !postfix_available("a_refused_connection_takes_no_connopen_slot") {
        return;
    }
    const IP: &str = "127.0.0.42";
    let relay = Relay::start("CHECK_OPEN_CONNECTIONS YES\nConnOpen:127.0.0.42 2\n").await;
    let port = relay.pf.port;
    let mut a = within("A", Smtp::connect(IP, port)).await.unwrap();
    let mut b = within("B", Smtp::connect(IP, port)).await.unwrap();
    assert!(a.banner.starts_with("220"), "A: {}", a.banner);
    assert!(b.banner.starts_with("220"), "B: {}", b.banner);
    let mut c = within("C", Smtp::connect(IP, port)).await.unwrap();
    assert!(
        c.banner.starts_with("421") && c.banner.contains("Service unavailable"),
        "C, a third open connection: {}",
        c.banner
    );
    // At once, while C may still be closing: A and B are rechecked at
    // HELO, and C must not be counted among the open connections.
    let (ehlo_a, ehlo_b) = within("EHLO of A and B", async {
        tokio::join!(a.ehlo(), b.ehlo())
    })
    .await;
    assert!(
        ehlo_a.starts_with("250") && ehlo_b.starts_with("250"),
        "EHLO of A: {ehlo_a}EHLO of B: {ehlo_b}\n{}",
        relay.logs()
    );
    // Postfix closes C itself.
    let after = within("C's close", c.reply()).await.unwrap();
    assert_eq!(after, "", "C after its 421");
    assert_eq!(relay.open_count(IP), Some(2), "{}", relay.logs());

    let mut delivered = Vec::new();
    for (s, subject) in [(&mut a, "a"), (&mut b, "b")] {
        let (mail, rcpts, end) =
            within("a message", s.send("web@w.test", &["r@x.test"], subject)).await;
        assert!(
            mail.starts_with("250") && rcpts[0].starts_with("250") && end.starts_with("250"),
            "{subject}: {mail} {rcpts:?} {end}\n{}",
            relay.logs()
        );
        delivered.push(subject.to_string());
    }
    cmd(&mut a, "QUIT").await;
    cmd(&mut b, "QUIT").await;
    drop((a, b, c));
    relay.open_becomes(IP, 0).await;

    for burst in 1..=3 {
        // Each admitted connection says EHLO, MAIL and RCPT at once,
        // while the refused ones of its burst may still be closing.
        let tries: Vec<_> = (0..6)
            .map(|_| {
                tokio::spawn(async move {
                    let mut s = Smtp::connect(IP, port).await.unwrap();
                    let mut replies = Vec::new();
                    if s.banner.starts_with("220") {
                        let lines = ["EHLO client.test", "MAIL FROM:<web@w.test>"];
                        for line in lines.into_iter().chain(["RCPT TO:<r@x.test>", "RSET"]) {
                            // A refusal ends the session: stop at it.
                            let reply = s.cmd(line).await.unwrap_or_else(|e| format!("{e}"));
                            let refused = !reply.starts_with("250");
                            replies.push(format!("{line}: {reply}"));
                            if refused {
                                break;
                            }
                        }
                    }
                    (s, replies)
                })
            })
            .collect();
        let mut admitted = Vec::new();
        let mut banners = Vec::new();
        for one in tries {
            let (s, replies) = within("a connection of a burst", one)
                .await
                .expect("connection task");
            banners.push(s.banner.clone());
            if s.banner.starts_with("220") {
                assert!(
                    replies.len() == 4 && replies.iter().all(|r| r.contains(": 250")),
                    "burst {burst}, an admitted connection: {replies:?}\n{}",
                    relay.logs()
                );
                admitted.push(s);
            } else {
                assert!(s.banner.starts_with("421"), "burst {burst}: {}", s.banner);
            }
        }
        assert_eq!(
            admitted.len(),
            2,
            "burst {burst}: {banners:?}\n{}",
            relay.logs()
        );
        relay.open_becomes(IP, 2).await;
        for mut s in admitted {
            cmd(&mut s, "QUIT").await;
        }
        relay.open_becomes(IP, 0).await;
    }
    relay.delivered(&delivered).await;
}

/// MsgRate 1: a message that does not reach its end gives its slot back,
/// whether its session says RSET or is cut after MAIL and RCPT. While the
/// slot is held, another session's MAIL is refused; once given back, a
/// new message is delivered.
///
/// Postfix does not send the milter its abort at RSET: it holds it and
/// sends it ahead of the session's next command (MAIL, HELO) or its end.
/// So the slot comes back at the next MAIL of the same session, which
/// must then find it free, every time; or when the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_not_sent_gives_its_slot_back() {
    if !postfix_available("a_message_not_sent_gives_its_slot_back") {
        return;
    }
    const IP: &str = "127.0.0.43";
    let relay = Relay::start("CHECK_MSG_RATE YES\nMsgRate:127.0.0.43 1\n").await;

    // RSET, then MAIL again in the same session, many times over: each
    // MAIL finds the slot the RSET gave back.
    let mut held = within("the RSET session", relay.session(IP)).await;
    for round in 0..50 {
        let mail = cmd(&mut held, "MAIL FROM:<web@w.test>").await;
        assert!(
            mail.starts_with("250"),
            "MAIL after RSET, round {round}: {mail}\n{}",
            relay.logs()
        );
        assert!(cmd(&mut held, "RCPT TO:<r@x.test>")
            .await
            .starts_with("250"));
        if round == 0 {
            refused_while_held(&relay, IP).await;
        }
        let rset = cmd(&mut held, "RSET").await;
        assert!(rset.starts_with("250"), "RSET: {rset}");
    }
    let (mail, rcpts, end) = within(
        "a message after RSET",
        held.send("web@w.test", &["r@x.test"], "after-rset"),
    )
    .await;
    assert!(
        mail.starts_with("250") && rcpts[0].starts_with("250") && end.starts_with("250"),
        "after RSET: {mail} {rcpts:?} {end}\n{}",
        relay.logs()
    );
    cmd(&mut held, "QUIT").await;

    // The delivered message holds the only slot for 600 s: clear it.
    reset_msgrate(relay.rr.node, IP);

    // RSET, then QUIT: the slot comes back at the end of the session.
    let mut quitting = within("the RSET and QUIT session", relay.session(IP)).await;
    assert!(cmd(&mut quitting, "MAIL FROM:<web@w.test>")
        .await
        .starts_with("250"));
    assert!(cmd(&mut quitting, "RCPT TO:<r@x.test>")
        .await
        .starts_with("250"));
    refused_while_held(&relay, IP).await;
    assert!(cmd(&mut quitting, "RSET").await.starts_with("250"));
    cmd(&mut quitting, "QUIT").await;
    send_once_given_back(&relay, IP, "after-rset-quit").await;

    reset_msgrate(relay.rr.node, IP);

    // A connection cut after MAIL and RCPT, without QUIT.
    let mut cut = within("the cut session", relay.session(IP)).await;
    assert!(cmd(&mut cut, "MAIL FROM:<web@w.test>")
        .await
        .starts_with("250"));
    assert!(cmd(&mut cut, "RCPT TO:<r@x.test>").await.starts_with("250"));
    refused_while_held(&relay, IP).await;
    drop(cut);
    send_once_given_back(&relay, IP, "after-cut").await;

    relay
        .delivered(&[
            "after-cut".to_string(),
            "after-rset".to_string(),
            "after-rset-quit".to_string(),
        ])
        .await;
}

/// Another session's MAIL is refused: the slot is held.
async fn refused_while_held(relay: &Relay, ip: &str) {
    let mut other = within("another session", relay.session(ip)).await;
    let mail = cmd(&mut other, "MAIL FROM:<web@w.test>").await;
    assert!(
        mail.starts_with("451 4.3.2 Message rate too high (1/1 in 600s)"),
        "MAIL while the slot is held: {mail}\n{}",
        relay.logs()
    );
    cmd(&mut other, "QUIT").await;
}

/// Sends one message from `ip` as soon as a MAIL is accepted (the slot
/// given back in the background), each try on a new session: Postfix
/// slows a session down after ten errors.
async fn send_once_given_back(relay: &Relay, ip: &str, subject: &str) {
    let until = Instant::now() + DEADLINE;
    loop {
        let mut s = within("a session", relay.session(ip)).await;
        let (mail, rcpts, end) =
            within("a message", s.send("web@w.test", &["r@x.test"], subject)).await;
        cmd(&mut s, "QUIT").await;
        if mail.starts_with("250") {
            assert!(
                rcpts[0].starts_with("250") && end.starts_with("250"),
                "{subject}: {rcpts:?} {end}"
            );
            return;
        }
        assert!(
            mail.starts_with("451 4.3.2 Message rate too high (1/1 in 600s)"),
            "{subject}: {mail}"
        );
        assert!(
            Instant::now() < until,
            "{subject}: the slot was never given back\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `relayratectl reset IP --check MsgRate`.
fn reset_msgrate(node: SocketAddr, ip: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_relayratectl"))
        .arg("--node")
        .arg(format!("http://{node}"))
        .args(["reset", ip, "--check", "MsgRate"])
        .env_remove("RELAYRATE_NODE")
        .env_remove("RELAYRATE_ADMIN_TOKEN_FILE")
        .output()
        .expect("run relayratectl");
    assert!(
        out.status.success(),
        "reset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
