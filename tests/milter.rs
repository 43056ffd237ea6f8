//! Milter conversations (indymilter-test speaks as an MTA would) against
//! the milter and a real one-node cluster: each check at the stage
//! `docs/policy.md` §1 names, with the exact reply; and the fail modes.

use std::ffi::CString;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indymilter_test::{MacroStage, Status, TestConnection};
use relayrate::check::Check;
use relayrate::milter::{self, Decider, FailMode, ListenAddr, MilterConfig, MilterListener};
use relayrate::node::{self, NodeConfig, NodeHandle, Start};
use relayrate::policy::{Client, PolicyFile};
use tempfile::TempDir;
use tokio::sync::oneshot;

mod common;

const DEADLINE: Duration = Duration::from_secs(10);
use common::{eventually, free_port};

struct Relay {
    _dir: TempDir,
    node: Option<NodeHandle>,
    node_config: NodeConfig,
    milter: SocketAddr,
    decider: Arc<Decider>,
    stop: Option<oneshot::Sender<()>>,
}

async fn wait_ready(h: &NodeHandle) {
    let until = Instant::now() + Duration::from_secs(30);
    while !h.node.is_ready() {
        assert!(Instant::now() < until, "policy not in force");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A lone voter with `policy` in force, its data in `dir`: its config
/// (for a restart) and its handle.
async fn lone_node(dir: &TempDir, policy: &str) -> (NodeConfig, NodeHandle) {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = NodeConfig::new(1, listen, dir.path().to_path_buf(), Start::Bootstrap);
    config.policy = vec![PolicyFile {
        name: "test".into(),
        text: policy.into(),
    }];
    let node = node::start(config.clone()).await.unwrap();
    wait_ready(&node).await;
    (config, node)
}

impl Relay {
    async fn start(policy: &str, tune: impl FnOnce(&mut MilterConfig)) -> Relay {
        let dir = TempDir::new().unwrap();
        let (mut config, node) = lone_node(&dir, policy).await;
        config.listen = node.addr;
        config.peer_listen = Some(node.peer_addr);
        config.start = Start::Resume;
        let mut mc = MilterConfig::new(format!("http://{}", node.addr));
        // These tests are about what the node decides: a slow fsync on a
        // busy machine (over the default 250 ms) must not turn a decision
        // into the fail mode's. Tests of the timeout set their own.
        mc.timeout = Duration::from_secs(5);
        tune(&mut mc);
        let (milter, decider, stop) = start_milter(mc).await;
        Relay {
            _dir: dir,
            node: Some(node),
            node_config: config,
            milter,
            decider,
            stop: Some(stop),
        }
    }

    async fn conn(&self) -> TestConnection {
        TestConnection::open(self.milter).await.unwrap()
    }

    fn count(&self, check: Check, ip: &str) -> u64 {
        let state = self.node.as_ref().unwrap().node.state().read().unwrap();
        let client = Client::from_ip(ip.parse().unwrap());
        state
            .engine()
            .count_of(check, &client, state.now_ms() / 1000)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start_milter(config: MilterConfig) -> (SocketAddr, Arc<Decider>, oneshot::Sender<()>) {
    let listener = MilterListener::bind(&ListenAddr::Inet("127.0.0.1:0".into()))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let decider = Arc::new(Decider::new(&config).unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = decider.clone();
    tokio::spawn(async move { milter::serve(listener, serving, &config, stopped).await });
    (addr, decider, stop)
}

fn tempfail(text: &str) -> Status {
    Status::Tempfail {
        message: Some(CString::new(text).unwrap()),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conn_rate_refuses_at_connect_with_421() {
    let r = Relay::start("CHECK_CONN_RATE YES\nConnRate:10.9.0.1 2\n", |_| {}).await;
    for _ in 0..2 {
        let mut c = r.conn().await;
        assert_eq!(
            c.connect("web1.example", ip("10.9.0.1")).await.unwrap(),
            Status::Continue
        );
        c.close().await.unwrap();
    }
    let mut c = r.conn().await;
    assert_eq!(
        c.connect("web1.example", ip("10.9.0.1")).await.unwrap(),
        tempfail("421 4.5.1 Connection rate too high (3/2 in 600s) - try again later")
    );
    // Another client is not affected.
    let mut other = r.conn().await;
    assert_eq!(
        other.connect("web2.example", ip("10.9.0.2")).await.unwrap(),
        Status::Continue
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conn_open_refuses_a_third_open_connection_until_one_closes() {
    let r = Relay::start("CHECK_OPEN_CONNECTIONS YES\nConnOpen:10.9.0.3 2\n", |_| {}).await;
    let mut first = r.conn().await;
    assert_eq!(
        first.connect("h", ip("10.9.0.3")).await.unwrap(),
        Status::Continue
    );
    let mut second = r.conn().await;
    assert_eq!(
        second.connect("h", ip("10.9.0.3")).await.unwrap(),
        Status::Continue
    );
    let mut third = r.conn().await;
    assert_eq!(
        third.connect("h", ip("10.9.0.3")).await.unwrap(),
        tempfail("421 4.5.1 Too many open connections (3/2) - try again later")
    );
    third.close().await.unwrap();
    first.close().await.unwrap();
    eventually("two leases released", Duration::from_secs(10), || {
        r.count(Check::ConnOpen, "10.9.0.3") == 1
    })
    .await;
    let mut fourth = r.conn().await;
    assert_eq!(
        fourth.connect("h", ip("10.9.0.3")).await.unwrap(),
        Status::Continue
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helo_rechecks_the_connection_rate() {
    let r = Relay::start("CHECK_CONN_RATE YES\nConnRate:10.9.0.4 2\n", |_| {}).await;
    let mut first = r.conn().await;
    assert_eq!(
        first.connect("h", ip("10.9.0.4")).await.unwrap(),
        Status::Continue
    );
    assert_eq!(first.helo("h").await.unwrap(), Status::Continue);
    for _ in 0..2 {
        let mut c = r.conn().await;
        c.connect("h", ip("10.9.0.4")).await.unwrap();
        c.close().await.unwrap();
    }
    assert_eq!(
        first.helo("h").await.unwrap(),
        tempfail("421 4.5.1 Connection rate too high (3/2 in 600s) - try again later")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_msgs_refuses_the_eleventh_mail_of_a_connection() {
    let r = Relay::start("CHECK_NB_MSGS YES\nMaxMsgs:10.9.0.5 10\n", |_| {}).await;
    let mut c = r.conn().await;
    c.connect("h", ip("10.9.0.5")).await.unwrap();
    for n in 1..=10 {
        assert_eq!(
            c.mail(["<a@example.org>"]).await.unwrap(),
            Status::Continue,
            "MAIL {n}"
        );
        c.abort().await.unwrap();
    }
    assert_eq!(
        c.mail(["<a@example.org>"]).await.unwrap(),
        tempfail("451 4.3.2 Too many messages for this connection (11/10) - try again later")
    );
    // A new connection starts from 0.
    let mut fresh = r.conn().await;
    fresh.connect("h", ip("10.9.0.5")).await.unwrap();
    assert_eq!(
        fresh.mail(["<a@example.org>"]).await.unwrap(),
        Status::Continue
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rcpt_refuses_recipients_over_the_limit_and_resets_per_message() {
    let r = Relay::start("CHECK_NB_RCPT YES\nMaxRcpt:10.9.0.6 3\n", |_| {}).await;
    let mut c = r.conn().await;
    c.connect("h", ip("10.9.0.6")).await.unwrap();
    c.mail(["<a@example.org>"]).await.unwrap();
    for n in 1..=3 {
        assert_eq!(
            c.rcpt([format!("<r{n}@example.com>")]).await.unwrap(),
            Status::Continue
        );
    }
    for n in 4..=5 {
        assert_eq!(
            c.rcpt([format!("<r{n}@example.com>")]).await.unwrap(),
            tempfail(&format!(
                "451 4.3.2 Too many recipients for this message ({n}/3) - try again later"
            ))
        );
    }
    // DATA is answered (not negotiated away): Postfix would otherwise send
    // its data macros unanswered and stall the end of message 40 ms.
    assert_eq!(c.data().await.unwrap(), Status::Continue);
    let (_, status) = c.eom().await.unwrap();
    assert_eq!(status, Status::Continue);
    c.mail(["<a@example.org>"]).await.unwrap();
    assert_eq!(
        c.rcpt(["<r1@example.com>"]).await.unwrap(),
        Status::Continue
    );
}

/// A message takes its MsgRate slot at MAIL FROM: a second session's MAIL
/// is refused while the first message is still in flight, and nothing is
/// asked at end of message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_rate_reserves_at_mail_so_parallel_sessions_get_exactly_n() {
    let r = Relay::start("CHECK_MSG_RATE YES\nMsgRate:10.9.0.7 2\n", |_| {}).await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let mut c = r.conn().await;
        c.connect("h", ip("10.9.0.7")).await.unwrap();
        sessions.push(c);
    }
    // All three reach MAIL FROM before any message ends.
    let mut answers = Vec::new();
    for c in &mut sessions {
        answers.push(c.mail(["<a@example.org>"]).await.unwrap());
    }
    assert_eq!(answers[..2], [Status::Continue, Status::Continue]);
    assert_eq!(
        answers[2],
        tempfail("451 4.3.2 Message rate too high (2/2 in 600s) - try again later")
    );
    for c in &mut sessions[..2] {
        c.rcpt(["<r@example.com>"]).await.unwrap();
        let (_, status) = c.eom().await.unwrap();
        assert_eq!(status, Status::Continue);
    }
    assert_eq!(r.count(Check::MsgRate, "10.9.0.7"), 2);
}

/// A message given up (abort: RSET, or the connection lost) returns its
/// slot, so another message may go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_or_dropped_message_gives_its_slot_back() {
    let r = Relay::start("CHECK_MSG_RATE YES\nMsgRate:10.9.0.8 1\n", |_| {}).await;
    let mut c = r.conn().await;
    c.connect("h", ip("10.9.0.8")).await.unwrap();
    assert_eq!(c.mail(["<a@example.org>"]).await.unwrap(), Status::Continue);
    c.rcpt(["<r@example.com>"]).await.unwrap();
    c.abort().await.unwrap();
    eventually("the slot given back after abort", DEADLINE, || {
        r.count(Check::MsgRate, "10.9.0.8") == 0
    })
    .await;
    assert_eq!(c.mail(["<a@example.org>"]).await.unwrap(), Status::Continue);
    // The connection goes before end of message: given back too.
    c.close().await.unwrap();
    eventually("the slot given back at close", DEADLINE, || {
        r.count(Check::MsgRate, "10.9.0.8") == 0
    })
    .await;
    let mut again = r.conn().await;
    again.connect("h", ip("10.9.0.8")).await.unwrap();
    assert_eq!(send(&mut again, "<a@example.org>").await, Status::Continue);
    assert_eq!(r.count(Check::MsgRate, "10.9.0.8"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rcpt_rate_refuses_at_rcpt() {
    let r = Relay::start("CHECK_RCPT_RATE YES\nRcptRate:10.9.0.8 2\n", |_| {}).await;
    let mut c = r.conn().await;
    c.connect("h", ip("10.9.0.8")).await.unwrap();
    c.mail(["<a@example.org>"]).await.unwrap();
    c.rcpt(["<r1@example.com>"]).await.unwrap();
    c.rcpt(["<r2@example.com>"]).await.unwrap();
    assert_eq!(
        c.rcpt(["<r3@example.com>"]).await.unwrap(),
        tempfail("451 4.3.2 Recipient rate too high (3/2 in 600s) - try again later")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_and_auth_user_rates_follow_the_account_across_addresses() {
    let r = Relay::start(
        "CHECK_MSG_RATE YES\nMsgRate:default 0\nMsgRateFrom:@webmail.example 1\nMsgRateAuth:alice 1\n",
        |_| {},
    )
    .await;
    let mut a = r.conn().await;
    a.connect("h", ip("10.9.1.1")).await.unwrap();
    assert_eq!(
        send(&mut a, "<bob@webmail.example>").await,
        Status::Continue
    );
    let mut b = r.conn().await;
    b.connect("h", ip("10.9.1.2")).await.unwrap();
    // The same sender from another address: the sender's count is 1.
    assert_eq!(
        send(&mut b, "<Bob@webmail.example>").await,
        tempfail("451 4.3.2 Message rate too high (1/1 in 600s) - try again later")
    );
    // By AUTH user, whatever the sender.
    let mut c = r.conn().await;
    c.connect("h", ip("10.9.1.3")).await.unwrap();
    c.macros(MacroStage::Mail, [("{auth_authen}", "Alice")])
        .await
        .unwrap();
    assert_eq!(send(&mut c, "<x@a.example>").await, Status::Continue);
    c.macros(MacroStage::Mail, [("{auth_authen}", "alice")])
        .await
        .unwrap();
    assert_eq!(
        send(&mut c, "<y@b.example>").await,
        tempfail("451 4.3.2 Message rate too high (1/1 in 600s) - try again later")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_are_counted_per_prefix_and_limited_by_their_entries() {
    let r = Relay::start("CHECK_CONN_RATE YES\nConnRate:2001:db8::/64 1\n", |_| {}).await;
    let mut c = r.conn().await;
    assert_eq!(
        c.connect("h", ip("2001:db8::25")).await.unwrap(),
        Status::Continue
    );
    let mut d = r.conn().await;
    assert_eq!(
        d.connect("h", ip("2001:db8::25")).await.unwrap(),
        tempfail("421 4.5.1 Connection rate too high (2/1 in 600s) - try again later")
    );
    // Another address of the same /64 is the same client (IPv6Prefix 64):
    // a fresh address per connection meets the limit all the same.
    let mut e = r.conn().await;
    assert_eq!(
        e.connect("h", ip("2001:db8::26")).await.unwrap(),
        tempfail("421 4.5.1 Connection rate too high (3/1 in 600s) - try again later")
    );
    assert_eq!(r.count(Check::ConnRate, "2001:db8::ffff"), 3);
    // Outside the /64: its own count, under the built-in 15.
    for _ in 0..3 {
        let mut f = r.conn().await;
        assert_eq!(
            f.connect("h", ip("2001:db8:1::1")).await.unwrap(),
            Status::Continue
        );
    }
}

/// One milter packet: length (command byte included), command, payload.
fn packet(command: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = (payload.len() as u32 + 1).to_be_bytes().to_vec();
    p.push(command);
    p.extend_from_slice(payload);
    p
}

/// An MTA's side of one SMTP connect, spoken byte for byte as sendmail
/// does: OPTNEG, the connect macros, then SMFIC_CONNECT with `family` and
/// `addr` as written. Returns the milter's reply to connect: its command
/// byte and payload; `None` if the milter closed the connection instead.
async fn raw_connect(
    milter: SocketAddr,
    host: &str,
    family: u8,
    addr: &str,
) -> Option<(u8, Vec<u8>)> {
    raw_connect_with(milter, host, family, addr, addr).await
}

/// As [`raw_connect`], with `{client_addr}` given apart.
async fn raw_connect_with(
    milter: SocketAddr,
    host: &str,
    family: u8,
    addr: &str,
    client_addr: &str,
) -> Option<(u8, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(milter).await.unwrap();
    let mut optneg = 6u32.to_be_bytes().to_vec();
    optneg.extend(0x1ffu32.to_be_bytes());
    optneg.extend(0x1f_ffffu32.to_be_bytes());
    s.write_all(&packet(b'O', &optneg)).await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut reply = vec![0; len as usize];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[0], b'O', "OPTNEG reply");
    let macros = format!("C{{client_addr}}\0{client_addr}\0{{client_name}}\0{host}\0");
    s.write_all(&packet(b'D', macros.as_bytes())).await.unwrap();
    let mut connect = format!("{host}\0").into_bytes();
    connect.push(family);
    connect.extend(25_000u16.to_be_bytes());
    connect.extend(format!("{addr}\0").into_bytes());
    s.write_all(&packet(b'C', &connect)).await.unwrap();
    let len = tokio::time::timeout(DEADLINE, s.read_u32())
        .await
        .expect("an answer within the deadline")
        .ok()?;
    let mut reply = vec![0; len as usize];
    s.read_exact(&mut reply).await.ok()?;
    let _ = s.write_all(&packet(b'Q', b"")).await;
    Some((reply[0], reply[1..].to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendmail_ipv6_form_is_the_same_client_as_the_plain_address() {
    // The report: sendmail 8.15+ sends `IPv6:2001:db8::6` at connect; the
    // milter dropped the connection, counting nothing (and with F=T the
    // MTA tempfailed every IPv6 client).
    let r = Relay::start("CHECK_CONN_RATE YES\nConnRate:2001:db8::6 3\n", |_| {}).await;
    let literal = "[IPv6:2001:db8::6]";
    for addr in [
        "IPv6:2001:db8::6",
        "IPv6:2001:0db8:0000:0000:0000:0000:0000:0006",
    ] {
        let reply = raw_connect(r.milter, literal, b'6', addr).await;
        assert_eq!(reply, Some((b'c', vec![])), "{addr}: continue");
    }
    // The plain form (Postfix's) is the same client: its third connection.
    let mut c = r.conn().await;
    assert_eq!(
        c.connect("h", ip("2001:db8::6")).await.unwrap(),
        Status::Continue
    );
    assert_eq!(r.count(Check::ConnRate, "2001:db8::6"), 3);
    // And the fourth, in sendmail's form, is refused by the entry of the
    // full address, with the reply of the limit.
    let reply = raw_connect(r.milter, literal, b'6', "IPv6:2001:db8::6").await;
    let (cmd, text) = reply.expect("an answer, not a dropped connection");
    assert_eq!(cmd, b'y', "a reply code");
    assert_eq!(
        String::from_utf8_lossy(&text).trim_end_matches('\0'),
        "421 4.5.1 Connection rate too high (4/3 in 600s) - try again later"
    );
    // An IPv4-mapped address in sendmail's form is its IPv4 address.
    let reply = raw_connect(r.milter, "[10.9.0.8]", b'6', "IPv6:::ffff:10.9.0.8").await;
    assert_eq!(reply, Some((b'c', vec![])));
    assert_eq!(r.count(Check::ConnRate, "10.9.0.8"), 1);
    // A connect address in no known form does not end the session: the
    // client is taken from {client_addr} (here in sendmail's form)...
    let reply = raw_connect_with(r.milter, "h", b'6', "2001:db8::9%x", "IPv6:2001:db8::9").await;
    assert_eq!(reply, Some((b'c', vec![])));
    // The /64 of ::6: its 4 connections (the refused one too) and this one.
    assert_eq!(r.count(Check::ConnRate, "2001:db8::9"), 5);
    // ...or from a host name that is an address literal.
    let reply = raw_connect_with(r.milter, "[IPv6:2001:db8:5::1]", b'6', "?", "").await;
    assert_eq!(reply, Some((b'c', vec![])));
    assert_eq!(r.count(Check::ConnRate, "2001:db8:5::1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_refuses_nothing_but_still_counts() {
    let r = Relay::start(
        "DryRun YES\nCHECK_CONN_RATE YES\nConnRate:10.9.0.9 1\n",
        |_| {},
    )
    .await;
    // The milter learns DryRun from the node's policy.
    let decider = r.decider.clone();
    eventually("the policy fetched", Duration::from_secs(10), || {
        decider.has_policy()
    })
    .await;
    for _ in 0..3 {
        let mut c = r.conn().await;
        assert_eq!(
            c.connect("h", ip("10.9.0.9")).await.unwrap(),
            Status::Continue
        );
        c.close().await.unwrap();
    }
    // Refused by the node (ConnRate 1), counted, let through.
    assert!(r.count(Check::ConnRate, "10.9.0.9") >= 3);
    assert!(decider.policy_dry_run());
    // --dry-run on the command line does the same without the policy saying so.
    let strict = Relay::start("CHECK_CONN_RATE YES\nConnRate:10.9.0.10 1\n", |m| {
        m.dry_run = true
    })
    .await;
    for _ in 0..3 {
        let mut c = strict.conn().await;
        assert_eq!(
            c.connect("h", ip("10.9.0.10")).await.unwrap(),
            Status::Continue
        );
    }
}

/// One message from `from`: MAIL, and if accepted RCPT and end of message.
async fn send(c: &mut TestConnection, from: &str) -> Status {
    let s = c.mail([from]).await.unwrap();
    if s == Status::Continue {
        c.rcpt(["<r@example.com>"]).await.unwrap();
        c.eom().await.unwrap();
    }
    s
}

/// A port nobody listens on.
fn dead_node() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_node_down_each_fail_mode_answers_within_its_timeout() {
    for (mode, expected) in [
        (FailMode::Open, Status::Continue),
        (
            FailMode::Tempfail,
            tempfail("451 4.3.0 Rate limiter unavailable - try again later"),
        ),
        // No policy ever seen: the local fallback has nothing to decide
        // with, and tempfails rather than let everything through.
        (
            FailMode::Local,
            tempfail("451 4.3.0 Rate limiter unavailable - try again later"),
        ),
    ] {
        let mut config = MilterConfig::new(dead_node());
        config.fail_mode = mode;
        config.timeout = Duration::from_millis(250);
        let (addr, _decider, _stop) = start_milter(config).await;
        let mut c = TestConnection::open(addr).await.unwrap();
        let asked = Instant::now();
        assert_eq!(
            c.connect("h", ip("10.9.2.1")).await.unwrap(),
            expected,
            "{mode:?}"
        );
        let took = asked.elapsed();
        assert!(took < Duration::from_millis(1000), "{mode:?} took {took:?}");
    }
}

/// `relayrate milter --policy FILE`, the node down, fail mode local: the
/// milter decides with the file's policy from its first connection
/// (ConnRate 2: the third connection is refused), where without it it
/// could only tempfail; a broken file stops it at start with the file's
/// line and column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_milter_given_a_policy_file_decides_with_it_while_the_node_is_down() {
    let dir = TempDir::new().unwrap();
    let policy = dir.path().join("policy.txt");
    std::fs::write(&policy, "CHECK_CONN_RATE YES\nConnRate:10.9.2.5 2\n").unwrap();
    let port = free_port();
    let milter = |policy: &std::path::Path, port: u16| {
        std::process::Command::new(env!("CARGO_BIN_EXE_relayrate"))
            .args(["milter", "--fail-mode", "local", "--timeout-ms", "200"])
            .arg("--listen")
            .arg(format!("inet:127.0.0.1:{port}"))
            .arg("--node")
            .arg(dead_node())
            .arg("--policy")
            .arg(policy)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = milter(&policy, port);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < until, "the milter never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut replies = Vec::new();
    for _ in 0..3 {
        let mut c = TestConnection::open(addr).await.unwrap();
        replies.push(c.connect("h", ip("10.9.2.5")).await.unwrap());
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        replies,
        [
            Status::Continue,
            Status::Continue,
            tempfail("421 4.5.1 Connection rate too high (3/2 in 600s) - try again later")
        ]
    );

    std::fs::write(&policy, "CHECK_CONN_RATE YES\nConnRat:10.9.2.5 2\n").unwrap();
    let out = milter(&policy, free_port()).wait_with_output().unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("{}:2:1", policy.display())),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_is_not_waited_for_beyond_the_timeout() {
    let (url, _hung) = common::hung_node().await;
    let mut config = MilterConfig::new(url);
    config.fail_mode = FailMode::Open;
    config.timeout = Duration::from_millis(200);
    let (addr, _decider, _stop) = start_milter(config).await;
    let mut c = TestConnection::open(addr).await.unwrap();
    let asked = Instant::now();
    assert_eq!(
        c.connect("h", ip("10.9.2.2")).await.unwrap(),
        Status::Continue
    );
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(800),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_divides_the_limits_and_the_node_is_used_again_when_back() {
    let mut r = Relay::start("CHECK_CONN_RATE YES\nConnRate:10.9.3.1 4\n", |m| {
        m.relays = 2
    })
    .await;
    // Let the milter fetch the policy, then stop the node.
    let mut c = r.conn().await;
    assert_eq!(
        c.connect("h", ip("10.9.3.1")).await.unwrap(),
        Status::Continue
    );
    c.close().await.unwrap();
    let decider = r.decider.clone();
    eventually("the milter has the policy", Duration::from_secs(10), || {
        decider.has_policy()
    })
    .await;
    // Its close too has reached the node, so the fallbacks below are the
    // new connections' only.
    eventually(
        "the first connection closed",
        Duration::from_secs(10),
        || r.count(Check::ConnOpen, "10.9.3.1") == 0,
    )
    .await;
    r.node.take().unwrap().kill().await;
    let before = r.decider.fallbacks();
    // Alone, this relay allows 4 / 2 = 2 connections.
    for _ in 0..2 {
        let mut c = r.conn().await;
        assert_eq!(
            c.connect("h", ip("10.9.3.1")).await.unwrap(),
            Status::Continue
        );
        c.close().await.unwrap();
    }
    let mut c = r.conn().await;
    assert_eq!(
        c.connect("h", ip("10.9.3.1")).await.unwrap(),
        tempfail("421 4.5.1 Connection rate too high (3/2 in 600s) - try again later")
    );
    // The node comes back on the same port and data: the milter uses it.
    let mut restarted = None;
    let until = Instant::now() + Duration::from_secs(20);
    while restarted.is_none() {
        match node::start(r.node_config.clone()).await {
            Ok(h) => restarted = Some(h),
            Err(e) => {
                assert!(Instant::now() < until, "restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // The three connects were decided alone; the closes wait for the node
    // (and release the fallback's leases at once).
    assert_eq!(r.decider.fallbacks() - before, 3);
    let h = restarted.unwrap();
    wait_ready(&h).await;
    r.node = Some(h);
    let other = "10.9.3.2";
    connect_until_the_node_counts(&r, other).await;
    assert!(r.count(Check::ConnRate, other) >= 1);
}

/// Connects until the node (not the fallback) has counted `ip`.
async fn connect_until_the_node_counts(r: &Relay, ip_text: &str) {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let mut c = r.conn().await;
        c.connect("h", ip(ip_text)).await.unwrap();
        c.close().await.unwrap();
        if r.count(Check::ConnRate, ip_text) > 0 {
            return;
        }
        assert!(
            Instant::now() < until,
            "the milter never used the node again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `relayrate node --milter-listen`: the node serves the milter itself and
/// the milter asks it in-process; the limits hold as over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_its_own_milter_in_process() {
    let root = common::temp_root();
    let port = free_port();
    let listen = format!("inet:127.0.0.1:{port}");
    let node = common::NodeProc::start_with_args(
        root.path(),
        1,
        Some("CHECK_CONN_RATE YES\nCHECK_MSG_RATE YES\nConnRate:10.9.9.1 2\nMsgRate:10.9.9.1 1\n"),
        None,
        &["--milter-listen".as_ref(), listen.as_ref()],
    );
    node.wait_deciding().await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = TestConnection::open(addr).await.unwrap();
    assert_eq!(
        c.connect("h", ip("10.9.9.1")).await.unwrap(),
        Status::Continue
    );
    assert_eq!(c.mail(["<a@example.org>"]).await.unwrap(), Status::Continue);
    let mut second = TestConnection::open(addr).await.unwrap();
    assert_eq!(
        second.connect("h", ip("10.9.9.1")).await.unwrap(),
        Status::Continue
    );
    assert_eq!(
        second.mail(["<b@example.org>"]).await.unwrap(),
        tempfail("451 4.3.2 Message rate too high (1/1 in 600s) - try again later")
    );
    let mut third = TestConnection::open(addr).await.unwrap();
    assert_eq!(
        third.connect("h", ip("10.9.9.1")).await.unwrap(),
        tempfail("421 4.5.1 Connection rate too high (3/2 in 600s) - try again later")
    );
    assert!(
        !node.log().contains("node unavailable"),
        "no fallback:\n{}",
        node.log()
    );
}

/// Only what counts is written: a session whose client has no windowed
/// limit in force (only per-message and per-connection counts) adds
/// nothing to the Raft log; with a recipient rate in force, its RCPTs do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_no_rate_in_force_writes_nothing() {
    let session = |r: &Relay, ip_text: &'static str| {
        let milter = r.milter;
        async move {
            let mut c = TestConnection::open(milter).await.unwrap();
            assert_eq!(c.connect("h", ip(ip_text)).await.unwrap(), Status::Continue);
            assert_eq!(c.helo("client.test").await.unwrap(), Status::Continue);
            assert_eq!(send(&mut c, "<a@example.org>").await, Status::Continue);
            assert_eq!(
                c.mail(["<a@example.org>"]).await.unwrap(),
                tempfail("451 4.3.2 Too many messages for this connection (2/1) - try again later")
            );
            c.close().await.unwrap();
        }
    };
    let r = Relay::start(
        "CHECK_NB_MSGS YES\nCHECK_NB_RCPT YES\nCHECK_RCPT_RATE YES\n\
         MaxMsgs:default 1\nMaxRcpt:default 5\nRcptRate:default 0\nRcptRate:10.9.0.60 100\n",
        |_| {},
    )
    .await;
    let decider = r.decider.clone();
    eventually("the milter holds the policy", DEADLINE, || {
        decider.policy().is_some()
    })
    .await;
    let last = |r: &Relay| {
        let node = r.node.as_ref().unwrap();
        node.node.raft.metrics().borrow().last_log_index
    };
    let before = last(&r);
    session(&r, "10.9.0.61").await;
    assert_eq!(last(&r), before, "a session with no rate in force wrote");
    // With a recipient rate for the client, its RCPT is a write.
    session(&r, "10.9.0.60").await;
    assert!(last(&r) > before, "a counted RCPT was not written");
    assert_eq!(r.count(Check::RcptRate, "10.9.0.60"), 1);
}

/// A close is waited for by nobody: it waits (up to 20 ms) for an event
/// that must be written now and rides in its log entry, instead of an
/// entry and an fsync of its own. Twenty close-then-connect pairs, each
/// connect 3 ms after its close: far fewer entries than events (written
/// at once, each close took an entry of its own: 40); and a close alone
/// is still written and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_rides_in_the_entry_of_the_next_write() {
    let dir = TempDir::new().unwrap();
    let (_, h) = lone_node(&dir, "CHECK_OPEN_CONNECTIONS YES\nConnOpen:default 100\n").await;
    let node = h.node.clone();
    let last = || node.raft.metrics().borrow().last_log_index.unwrap_or(0);
    let client = Client::from_ip(ip("10.9.7.1"));
    let conn = |n| relayrate::engine::ConnId { owner: 1, conn: n };
    let connect = |n| relayrate::engine::Event::Connect {
        conn: conn(n),
        client: client.clone(),
    };
    let close = |n| relayrate::engine::Event::Close { conn: conn(n) };
    node.decide(vec![connect(0)]).await.unwrap();

    let before = last();
    for n in 1..=20 {
        let closing = tokio::spawn({
            let node = node.clone();
            let event = close(n - 1);
            async move { node.decide(vec![event]).await }
        });
        // The next connection comes a little after the close (the delay
        // is the scenario, not a wait for something): by then the close
        // has reached the batcher on its own.
        tokio::time::sleep(Duration::from_millis(3)).await;
        let verdicts = node.decide(vec![connect(n)]).await.unwrap();
        assert!(verdicts[0].is_allowed());
        closing.await.unwrap().unwrap();
    }
    let entries = last() - before;
    assert!(entries <= 30, "{entries} entries for 40 events");

    // Alone, a close is written within its wait.
    let before = last();
    let asked = Instant::now();
    node.decide(vec![close(20)]).await.unwrap();
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert_eq!(last() - before, 1);
    let state = node.state().read().unwrap();
    assert_eq!(
        state
            .engine()
            .count_of(Check::ConnOpen, &client, state.now_ms() / 1000),
        0
    );
}

/// Batches leave at most one per `WRITE_PACE`: callers that come within a
/// pace of the last batch share the next entry. Forty connects 0.75 ms
/// apart, as a busy MTA's sessions come (one fsync each is well under a
/// pace here, so unpaced most would take an entry of their own): n
/// entries need (n - 1) paces, so they are at most 1 + elapsed / pace
/// (and one more for a heartbeat entry). Each connect is still decided and
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_come_within_a_pace_share_an_entry() {
    let dir = TempDir::new().unwrap();
    let (_, h) = lone_node(&dir, "CHECK_CONN_RATE YES\nConnRate:default 1000\n").await;
    let node = h.node.clone();
    let last = || node.raft.metrics().borrow().last_log_index.unwrap_or(0);
    let client = Client::from_ip(ip("10.9.7.2"));
    let before = last();
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_micros(750));
    let mut callers = Vec::new();
    for n in 0..40 {
        ticks.tick().await;
        let node = node.clone();
        let event = relayrate::engine::Event::Connect {
            conn: relayrate::engine::ConnId { owner: 1, conn: n },
            client: client.clone(),
        };
        callers.push(tokio::spawn(async move { node.decide(vec![event]).await }));
    }
    for c in callers {
        let verdicts = c.await.unwrap().unwrap();
        assert!(verdicts[0].is_allowed());
    }
    let elapsed = started.elapsed();
    let entries = last() - before;
    let most = 2 + (elapsed.as_micros() / node::batcher::WRITE_PACE.as_micros()) as u64;
    assert!(
        entries <= most,
        "{entries} entries for 40 connects in {elapsed:?}: more than {most}"
    );
    let state = node.state().read().unwrap();
    assert_eq!(
        state
            .engine()
            .count_of(Check::ConnRate, &client, state.now_ms() / 1000),
        40
    );
}

/// On one thread (a current-thread runtime, as `--threads 1`, the
/// default), a blocking thread that holds the state's read lock, as a
/// snapshot's copy or `top` does, must hold up the writes only: before,
/// the entry's `apply` parked the only thread in `write()`, and with it
/// every milter answer, timer and read, until the lock was let go.
#[tokio::test]
async fn a_read_lock_held_elsewhere_holds_up_writes_not_the_runtime() {
    use relayrate::engine::{ConnId, Event, Verdict};
    let dir = TempDir::new().unwrap();
    let (_config, node) = lone_node(&dir, "CHECK_CONN_RATE YES\nConnRate:default 100\n").await;
    let client = Client::from_ip("192.0.2.7".parse().unwrap());

    // Another thread holds the read lock until told, for 20 s at most.
    let state = node.node.state().clone();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (held_tx, held) = oneshot::channel();
    let holder = std::thread::spawn(move || {
        let _read = state.read().unwrap();
        held_tx.send(()).unwrap();
        released.recv_timeout(Duration::from_secs(20)).is_ok()
    });
    held.await.unwrap();

    let (n, c) = (node.node.clone(), client.clone());
    let write = tokio::spawn(async move {
        let connect = Event::Connect {
            conn: ConnId { owner: 0, conn: 1 },
            client: c,
        };
        n.decide(vec![connect]).await
    });
    // The entry reaches the log; its apply then waits for the lock. On
    // one thread, the apply runs as soon as the entry is flushed, before
    // the timer of this wait fires again: seeing the entry logged means
    // the runtime went on while the apply waited.
    let raft = node.node.raft.clone();
    let logged_not_applied = || {
        let m = raft.metrics().borrow().clone();
        m.last_log_index > m.last_applied.map(|l| l.index)
    };
    eventually(
        "the entry logged",
        Duration::from_secs(10),
        logged_not_applied,
    )
    .await;
    // A recheck reads meanwhile.
    let recheck = Event::Recheck {
        client: client.clone(),
    };
    assert_eq!(
        node.node.read_local([&recheck].into_iter()),
        [Verdict::Allow]
    );
    assert!(!write.is_finished(), "the write did not wait for the lock");
    release.send(()).unwrap();
    assert!(
        holder.join().unwrap(),
        "the runtime was parked until the lock holder gave up"
    );
    let verdicts = write.await.unwrap().expect("decided once the lock is free");
    assert_eq!(verdicts, [Verdict::Allow]);
}
