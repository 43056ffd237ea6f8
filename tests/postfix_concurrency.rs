//! The concurrency cases measured in the issue, through real Postfix
//! with relayrate's milter attached, into smtp-sink (`docs/policy.md` §1):
//! a message takes its slot in MsgRate, MsgRateFrom and MsgRateAuth at
//! MAIL FROM, so sessions in flight together cannot pass the limit; a
//! message that does not reach its end gives its slot back; a refused
//! connection takes no ConnOpen slot. Each case runs on one relay
//! (`relayrate run`), and on two relays of one 3-node cluster. Postfix
//! has SMTP AUTH users (Cyrus SASL, sasldb) for MsgRateAuth.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    free_port, sasl_available, temp_root, MilterProc, NodeProc, Postfix, Relayrate, Sink, Smtp,
};
use tempfile::TempDir;

/// Longest wait for anything the tests expect: a session's replies, a
/// close reaching the node, a message reaching the sink.
const DEADLINE: Duration = Duration::from_secs(30);

/// The AUTH users of the relays, (name, password): a client logs in as
/// `name@relay.test`.
const USERS: &[(&str, &str)] = &[("alice", "alice-pw"), ("bob", "bob-pw")];

/// Where the relays' milters get their answers.
enum Nodes {
    /// `relayrate run`: one node, the milter in its process.
    Single(Relayrate),
    /// One 3-node cluster. Relay A's milter is in node 1's process
    /// (`relayrate node --milter-listen`); relay B's is a `relayrate
    /// milter` asking node 2 over gRPC.
    Cluster {
        nodes: Vec<NodeProc>,
        milter_b: MilterProc,
    },
}

/// One or two Postfix relays delivering to one sink. Fields drop in
/// order: Postfix first, the directory last.
struct Site {
    relays: Vec<Postfix>,
    nodes: Nodes,
    sink: Sink,
    _root: TempDir,
}

impl Site {
    /// One relay: Postfix asking `relayrate run`.
    async fn single(policy: &str) -> Site {
        Site::single_with(policy, &[]).await
    }

    /// [`Site::single`], `relayrate run` given more arguments.
    async fn single_with(policy: &str, args: &[&std::ffi::OsStr]) -> Site {
        let root = temp_root();
        let sink = Sink::start(root.path());
        let rr = Relayrate::run_with(root.path(), "a", policy, args);
        rr.wait_ready().await;
        let pf = Postfix::start_with_auth(root.path(), "relay-a", &rr.milter(), sink.port, USERS);
        pf.wait_ready().await;
        Site {
            relays: vec![pf],
            nodes: Nodes::Single(rr),
            sink,
            _root: root,
        }
    }

    /// Two relays on one 3-node cluster; see [`Nodes::Cluster`].
    async fn cluster(policy: &str) -> Site {
        let root = temp_root();
        let sink = Sink::start(root.path());
        let milter_a = format!("inet:127.0.0.1:{}", free_port());
        let n1 = NodeProc::start_with_args(
            root.path(),
            1,
            Some(policy),
            None,
            &["--milter-listen".as_ref(), milter_a.as_ref()],
        );
        n1.wait_deciding().await;
        let n2 = NodeProc::start(root.path(), 2, None, Some(n1.peer));
        let n3 = NodeProc::start(root.path(), 3, None, Some(n1.peer));
        n2.wait_deciding().await;
        n3.wait_deciding().await;
        let milter_b = MilterProc::start(root.path(), "b", n2.addr);
        milter_b.wait_listening().await;
        let pa = Postfix::start_with_auth(root.path(), "relay-a", &milter_a, sink.port, USERS);
        let pb =
            Postfix::start_with_auth(root.path(), "relay-b", &milter_b.addr(), sink.port, USERS);
        pa.wait_ready().await;
        pb.wait_ready().await;
        Site {
            relays: vec![pa, pb],
            nodes: Nodes::Cluster {
                nodes: vec![n1, n2, n3],
                milter_b,
            },
            sink,
            _root: root,
        }
    }

    /// The node that `relayratectl show` and `reset` ask.
    fn node(&self) -> SocketAddr {
        match &self.nodes {
            Nodes::Single(rr) => rr.node,
            Nodes::Cluster { nodes, .. } => nodes[0].addr,
        }
    }

    /// The Postfix port of relay `i`, counted round the relays.
    fn port(&self, i: usize) -> u16 {
        self.relays[i % self.relays.len()].port
    }

    /// What went on, for a failure's message: the nodes' and milters'
    /// logs (fallbacks, refusals) and Postfix's.
    fn logs(&self) -> String {
        let mut all = match &self.nodes {
            Nodes::Single(rr) => format!("relayrate:\n{}\n", rr.log()),
            Nodes::Cluster { nodes, milter_b } => {
                let mut all = String::new();
                for (i, n) in nodes.iter().enumerate() {
                    all += &format!("node {}:\n{}\n", i + 1, n.log());
                }
                all + &format!("milter b:\n{}\n", milter_b.log())
            }
        };
        for pf in &self.relays {
            all += &format!("maillog:\n{}\n", pf.maillog());
        }
        all
    }

    /// A session from `source` to relay `i` that was greeted with 220
    /// and said EHLO.
    async fn session(&self, i: usize, source: &str) -> Smtp {
        let mut s = Smtp::connect(source, self.port(i)).await.unwrap();
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
        open_count(self.node(), ip)
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
    let out = common::relayratectl(node, &["show", ip, "--json"]);
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

/// The message rates of the message tests: 1 and 5 for a client
/// address, an envelope sender and an AUTH user each (their built-in
/// defaults are 100 and no limit: far off).
const MSG_POLICY: &str = "\
CHECK_MSG_RATE YES
MsgRate:127.0.0.41 1
MsgRate:127.0.0.21 5
MsgRate:127.0.0.43 1
MsgRateFrom:one@w.test 1
MsgRateFrom:five@w.test 5
MsgRateAuth:bob@relay.test 1
MsgRateAuth:alice@relay.test 5
";

/// What joins the sessions of one case into one count: their client
/// address, their envelope sender or their AUTH user. In the sender and
/// user cases each session comes from an address of its own (127.0.1.x,
/// 127.0.2.x), so only the sender or the user is shared.
#[derive(Clone, Copy, Debug)]
enum By {
    Client,
    Sender,
    Auth,
}

impl By {
    /// Session `i`'s client address, for a count of `limit` (1 or 5).
    fn source(self, limit: u32, i: usize) -> String {
        match (self, limit) {
            (By::Client, 1) => "127.0.0.41".into(),
            (By::Client, _) => "127.0.0.21".into(),
            (By::Sender, _) => format!("127.0.1.{}", 10 + i),
            (By::Auth, _) => format!("127.0.2.{}", 10 + i),
        }
    }

    /// Logs session `s` in if this case counts AUTH users; the envelope
    /// sender its messages use.
    async fn begin(self, limit: u32, s: &mut Smtp, i: usize) -> String {
        let user = if limit == 1 { "bob" } else { "alice" };
        match self {
            By::Client => "web@w.test".into(),
            By::Sender => format!("{}@w.test", if limit == 1 { "one" } else { "five" }),
            By::Auth => {
                let password = format!("{user}-pw");
                let auth = within(
                    "AUTH",
                    s.auth_plain(&format!("{user}@relay.test"), &password),
                )
                .await;
                assert!(auth.starts_with("235"), "AUTH as {user}: {auth}");
                format!("s{i}@w.test")
            }
        }
    }
}

/// A message rate of 1 and two sessions in flight, each on its own relay
/// when there are two: both send MAIL and RCPT, then both DATA. The
/// second MAIL finds the first message's slot taken: one message is
/// delivered, not two.
async fn two_sessions_in_flight(site: &Site, by: By) {
    let mut one = within("session one", site.session(0, &by.source(1, 0))).await;
    let mut two = within("session two", site.session(1, &by.source(1, 1))).await;
    let from_one = by.begin(1, &mut one, 0).await;
    let from_two = by.begin(1, &mut two, 1).await;

    let mail_one = cmd(&mut one, &format!("MAIL FROM:<{from_one}>")).await;
    let mail_two = cmd(&mut two, &format!("MAIL FROM:<{from_two}>")).await;
    let rcpt_one = cmd(&mut one, "RCPT TO:<r@x.test>").await;
    let rcpt_two = cmd(&mut two, "RCPT TO:<r@x.test>").await;
    assert!(
        mail_one.starts_with("250"),
        "{by:?}, first MAIL: {mail_one}"
    );
    assert!(
        mail_two.starts_with("451 4.3.2 Message rate too high (1/1 in 600s)"),
        "{by:?}, second MAIL, the first message in flight: {mail_two}\n{}",
        site.logs()
    );
    assert!(
        rcpt_one.starts_with("250"),
        "{by:?}, first RCPT: {rcpt_one}"
    );
    // Postfix: no MAIL, no transaction.
    assert!(
        rcpt_two.starts_with("503"),
        "{by:?}, second RCPT: {rcpt_two}"
    );

    let subject = format!("one-{by:?}");
    let end_one = data(&mut one, &subject).await;
    assert!(
        end_one.starts_with("250"),
        "{by:?}, first end of data: {end_one}"
    );
    let data_two = cmd(&mut two, "DATA").await;
    assert!(
        data_two.starts_with("503"),
        "{by:?}, second DATA: {data_two}"
    );
    cmd(&mut one, "QUIT").await;
    cmd(&mut two, "QUIT").await;
}

/// A message rate of 5 and twenty one-message sessions started at once,
/// round the relays (all greeted, then all send): exactly five messages
/// are delivered, the fifteen others refused at MAIL FROM. The subjects
/// of the delivered ones are returned.
async fn twenty_sessions_at_once(site: &Site, by: By) -> Vec<String> {
    // All greeted, then all send at once.
    let greeted = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let sessions: Vec<_> = (0..20)
        .map(|i| {
            let greeted = greeted.clone();
            let port = site.port(i);
            let source = by.source(5, i);
            tokio::spawn(async move {
                let subject = format!("{by:?}-{i:02}");
                let mut s = Smtp::connect(&source, port).await.unwrap();
                assert!(s.banner.starts_with("220"), "{subject}: {}", s.banner);
                s.ehlo().await;
                let from = by.begin(5, &mut s, i).await;
                greeted.wait().await;
                let (mail, rcpts, end) = s.send(&from, &["r@x.test"], &subject).await;
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
                site.logs()
            );
            refused.push(subject);
        }
    }
    assert_eq!(
        (delivered.len(), refused.len()),
        (5, 15),
        "{by:?}: delivered {delivered:?}\n{}",
        site.logs()
    );
    delivered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_in_flight_deliver_one_message_under_msgrate_1() {
    if !sasl_available("two_sessions_in_flight_deliver_one_message_under_msgrate_1") {
        return;
    }
    let site = Site::single(MSG_POLICY).await;
    two_sessions_in_flight(&site, By::Client).await;
    site.delivered(&["one-Client".to_string()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_at_once_deliver_exactly_msgrate_5() {
    if !sasl_available("twenty_sessions_at_once_deliver_exactly_msgrate_5") {
        return;
    }
    let site = Site::single(MSG_POLICY).await;
    let delivered = twenty_sessions_at_once(&site, By::Client).await;
    site.delivered(&delivered).await;
}

/// The same on two threads (`--threads 2`; one is the default): the
/// milter's sessions then run in parallel with the node's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sessions_at_once_deliver_exactly_msgrate_5_on_two_threads() {
    if !sasl_available("twenty_sessions_at_once_deliver_exactly_msgrate_5_on_two_threads") {
        return;
    }
    let site = Site::single_with(MSG_POLICY, &["--threads".as_ref(), "2".as_ref()]).await;
    let delivered = twenty_sessions_at_once(&site, By::Client).await;
    site.delivered(&delivered).await;
}

/// The same two cases for MsgRateFrom and MsgRateAuth: sessions from
/// other addresses, one sender or one AUTH user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_and_auth_message_rates_hold_for_sessions_in_flight() {
    if !sasl_available("sender_and_auth_message_rates_hold_for_sessions_in_flight") {
        return;
    }
    let site = Site::single(MSG_POLICY).await;
    let mut delivered = Vec::new();
    for by in [By::Sender, By::Auth] {
        two_sessions_in_flight(&site, by).await;
        delivered.push(format!("one-{by:?}"));
        delivered.extend(twenty_sessions_at_once(&site, by).await);
    }
    site.delivered(&delivered).await;
}

/// Two relays on one 3-node cluster, one milter in-process and one over
/// gRPC: every message case holds for the sum of the relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rates_hold_across_two_relays_of_one_cluster() {
    if !sasl_available("message_rates_hold_across_two_relays_of_one_cluster") {
        return;
    }
    let site = Site::cluster(MSG_POLICY).await;
    let mut delivered = Vec::new();
    for by in [By::Client, By::Sender, By::Auth] {
        two_sessions_in_flight(&site, by).await;
        delivered.push(format!("one-{by:?}"));
        delivered.extend(twenty_sessions_at_once(&site, by).await);
    }
    slots_given_back(&site).await;
    delivered.extend(["after-cut", "after-rset", "after-rset-quit"].map(String::from));
    site.delivered(&delivered).await;
}

/// ConnOpen 2: A and B admitted, C refused (Postfix answers 421 and
/// closes it); C took no slot, so A and B, rechecked at HELO and RCPT
/// right after C's refusal, go on sending. Then three bursts of six
/// connections at once each admit exactly two, which go on likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_takes_no_connopen_slot() {
    if !sasl_available("a_refused_connection_takes_no_connopen_slot") {
        return;
    }
    let site = Site::single(CONN_POLICY).await;
    refused_connections_take_no_slot(&site).await;
}

/// The ConnOpen case across two relays of one 3-node cluster: the bursts
/// go round both relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connopen_admits_exactly_the_limit_across_two_relays_of_one_cluster() {
    if !sasl_available("connopen_admits_exactly_the_limit_across_two_relays_of_one_cluster") {
        return;
    }
    let site = Site::cluster(CONN_POLICY).await;
    refused_connections_take_no_slot(&site).await;
}

const CONN_POLICY: &str = "CHECK_OPEN_CONNECTIONS YES\nConnOpen:127.0.0.42 2\n";

async fn refused_connections_take_no_slot(site: &Site) {
    const IP: &str = "127.0.0.42";
    let mut a = within("A", Smtp::connect(IP, site.port(0))).await.unwrap();
    let mut b = within("B", Smtp::connect(IP, site.port(1))).await.unwrap();
    assert!(a.banner.starts_with("220"), "A: {}", a.banner);
    assert!(b.banner.starts_with("220"), "B: {}", b.banner);
    let mut c = within("C", Smtp::connect(IP, site.port(2))).await.unwrap();
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
        site.logs()
    );
    // Postfix closes C itself.
    let after = within("C's close", c.reply()).await.unwrap();
    assert_eq!(after, "", "C after its 421");
    site.open_becomes(IP, 2).await;

    let mut delivered = Vec::new();
    for (s, subject) in [(&mut a, "a"), (&mut b, "b")] {
        let (mail, rcpts, end) =
            within("a message", s.send("web@w.test", &["r@x.test"], subject)).await;
        assert!(
            mail.starts_with("250") && rcpts[0].starts_with("250") && end.starts_with("250"),
            "{subject}: {mail} {rcpts:?} {end}\n{}",
            site.logs()
        );
        delivered.push(subject.to_string());
    }
    cmd(&mut a, "QUIT").await;
    cmd(&mut b, "QUIT").await;
    drop((a, b, c));
    site.open_becomes(IP, 0).await;

    for burst in 1..=3 {
        // Each admitted connection says EHLO, MAIL and RCPT at once,
        // while the refused ones of its burst may still be closing.
        let tries: Vec<_> = (0..6)
            .map(|i| {
                let port = site.port(i);
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
                    site.logs()
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
            site.logs()
        );
        site.open_becomes(IP, 2).await;
        for mut s in admitted {
            cmd(&mut s, "QUIT").await;
        }
        site.open_becomes(IP, 0).await;
    }
    site.delivered(&delivered).await;
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
    if !sasl_available("a_message_not_sent_gives_its_slot_back") {
        return;
    }
    let site = Site::single(MSG_POLICY).await;
    slots_given_back(&site).await;
    site.delivered(&["after-cut", "after-rset", "after-rset-quit"].map(String::from))
        .await;
}

/// The cases of [`a_message_not_sent_gives_its_slot_back`], for
/// 127.0.0.43 (MsgRate 1); the held sessions on relay A, the others
/// round the relays. Delivers "after-rset", "after-rset-quit" and
/// "after-cut".
async fn slots_given_back(site: &Site) {
    const IP: &str = "127.0.0.43";
    // RSET, then MAIL again in the same session, many times over: each
    // MAIL finds the slot the RSET gave back.
    let mut held = within("the RSET session", site.session(0, IP)).await;
    for round in 0..50 {
        let mail = cmd(&mut held, "MAIL FROM:<web@w.test>").await;
        assert!(
            mail.starts_with("250"),
            "MAIL after RSET, round {round}: {mail}\n{}",
            site.logs()
        );
        assert!(cmd(&mut held, "RCPT TO:<r@x.test>")
            .await
            .starts_with("250"));
        if round == 0 {
            refused_while_held(site, IP).await;
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
        site.logs()
    );
    cmd(&mut held, "QUIT").await;

    // The delivered message holds the only slot for 600 s: clear it.
    reset_msgrate(site.node(), IP);

    // RSET, then QUIT: the slot comes back at the end of the session.
    let mut quitting = within("the RSET and QUIT session", site.session(0, IP)).await;
    assert!(cmd(&mut quitting, "MAIL FROM:<web@w.test>")
        .await
        .starts_with("250"));
    assert!(cmd(&mut quitting, "RCPT TO:<r@x.test>")
        .await
        .starts_with("250"));
    refused_while_held(site, IP).await;
    assert!(cmd(&mut quitting, "RSET").await.starts_with("250"));
    cmd(&mut quitting, "QUIT").await;
    send_once_given_back(site, IP, "after-rset-quit").await;

    reset_msgrate(site.node(), IP);

    // A connection cut after MAIL and RCPT, without QUIT.
    let mut cut = within("the cut session", site.session(0, IP)).await;
    assert!(cmd(&mut cut, "MAIL FROM:<web@w.test>")
        .await
        .starts_with("250"));
    assert!(cmd(&mut cut, "RCPT TO:<r@x.test>").await.starts_with("250"));
    refused_while_held(site, IP).await;
    drop(cut);
    send_once_given_back(site, IP, "after-cut").await;
}

/// Another session's MAIL is refused: the slot is held.
async fn refused_while_held(site: &Site, ip: &str) {
    let mut other = within("another session", site.session(1, ip)).await;
    let mail = cmd(&mut other, "MAIL FROM:<web@w.test>").await;
    assert!(
        mail.starts_with("451 4.3.2 Message rate too high (1/1 in 600s)"),
        "MAIL while the slot is held: {mail}\n{}",
        site.logs()
    );
    cmd(&mut other, "QUIT").await;
}

/// Sends one message from `ip` as soon as a MAIL is accepted (the slot
/// given back in the background), each try on a new session: Postfix
/// slows a session down after ten errors.
async fn send_once_given_back(site: &Site, ip: &str, subject: &str) {
    let until = Instant::now() + DEADLINE;
    loop {
        let mut s = within("a session", site.session(1, ip)).await;
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
            site.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `relayratectl reset IP --check MsgRate`.
fn reset_msgrate(node: SocketAddr, ip: &str) {
    let out = common::relayratectl(node, &["reset", ip, "--check", "MsgRate"]);
    assert!(
        out.status.success(),
        "reset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
