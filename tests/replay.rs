//! `relayrate replay` and `relayrate suggest` over mail logs: a real
//! Postfix's log replayed gives the refusals the milter gave live; the
//! hand-written logs cover sendmail, gzip, the year rollover of classic
//! stamps and lines that cannot be read; suggest's policy is valid and
//! keeps its promise when replayed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{eventually, postfix_available, temp_root, Postfix, Relayrate, Sink, Smtp};

fn relayrate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_relayrate"))
        .args(args)
        .output()
        .expect("relayrate runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/replay")
        .join(name)
}

/// `replay --json` of `logs` under `policy`: the whole report.
fn replay_json(policy: &Path, logs: &[&Path], extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "replay",
        "--json",
        "--policy",
        policy.to_str().unwrap(),
        "--maillog",
    ];
    args.extend(logs.iter().map(|p| p.to_str().unwrap()));
    args.extend(extra);
    let (ok, out, err) = relayrate(&args);
    assert!(ok, "replay failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Refusals by check and kind, from a replay report:
/// {"MsgRate": (connections, messages, recipients)}.
fn totals(report: &serde_json::Value) -> BTreeMap<String, (u64, u64, u64)> {
    report["totals"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(c, t)| {
            let n = |k: &str| t[k].as_u64().unwrap();
            (
                c.clone(),
                (n("connections"), n("messages"), n("recipients")),
            )
        })
        .collect()
}

/// The policy of the live test, its replay fixture's too.
const LIVE_POLICY: &str = "\
CHECK_CONN_RATE YES
CHECK_NB_RCPT YES
CHECK_MSG_RATE YES
CHECK_NB_MSGS YES
CHECK_RCPT_RATE YES
ConnRate:127.0.0.21 6
MsgRate:127.0.0.21 4
MaxRcpt:default 3
MaxMsgs:default 2
RcptRate:127.0.0.22 5
MsgRateFrom:busy@a.test 3
";

/// What the milter refused live, by check, read from its log lines
/// (`check=MsgRate ... stage=mail`): connect stage as connections, mail
/// as messages, rcpt as recipients.
fn live_refusals(log: &str) -> BTreeMap<String, (u64, u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("relayrate::refusal")) {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_default()
                .trim_matches('"')
                .to_string()
        };
        let e = out.entry(field("check=")).or_default();
        match field("stage=").as_str() {
            "connect" => e.0 += 1,
            "mail" => e.1 += 1,
            "rcpt" => e.2 += 1,
            other => panic!("stage {other}: {line}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_real_postfix_log_gives_the_live_refusals() {
    if !postfix_available("replay_of_a_real_postfix_log_gives_the_live_refusals") {
        return;
    }
    let root = temp_root();
    let sink = Sink::start(root.path());
    let rr = Relayrate::run(root.path(), "live", LIVE_POLICY);
    rr.wait_ready().await;
    let pf = Postfix::start(root.path(), "relay-r", &rr.milter(), sink.port);
    pf.wait_ready().await;
    let queued = |pf: &Postfix| pf.maillog().matches("(queue active)").count();
    let mut accepted = queued(&pf);
    // Each message accepted is waited for in qmgr's log, so the log holds
    // the messages in the order they were sent.
    macro_rules! send {
        ($c:expr, $from:expr, $rcpts:expr) => {{
            let (mail, rcpts, end) = $c.send($from, $rcpts, "s").await;
            if end.starts_with("250") {
                accepted += 1;
                eventually("qmgr logs the message", Duration::from_secs(20), || {
                    queued(&pf) >= accepted
                })
                .await;
            }
            (mail, rcpts, end)
        }};
    }
    // A (127.0.0.21): 8 connections of one message each: MsgRate 4 refuses
    // messages 5 and 6, ConnRate 6 refuses connections 7 and 8.
    for _ in 0..8 {
        let mut c = Smtp::connect("127.0.0.21", pf.port).await.unwrap();
        if c.banner.starts_with("220") {
            c.ehlo().await;
            send!(c, "web@a.test", &["r1@x.test"]);
            let _ = c.quit().await;
        }
    }
    // B (127.0.0.22): MaxRcpt 3 refuses the 4th recipient, MaxMsgs 2 the
    // third MAIL; RcptRate 5 refuses the 6th, 7th and 8th recipients it counts.
    for _ in 0..2 {
        let mut c = Smtp::connect("127.0.0.22", pf.port).await.unwrap();
        c.ehlo().await;
        send!(
            c,
            "b@b.test",
            &["r1@x.test", "r2@x.test", "r3@x.test", "r4@x.test"]
        );
        send!(c, "b@b.test", &["r5@x.test"]);
        send!(c, "b@b.test", &["r6@x.test"]);
        let _ = c.quit().await;
    }
    // C (127.0.0.23): MsgRateFrom 3 refuses busy@a.test's 4th and 5th.
    let mut c = Smtp::connect("127.0.0.23", pf.port).await.unwrap();
    c.ehlo().await;
    for _ in 0..2 {
        for _ in 0..2 {
            send!(c, "busy@a.test", &["r1@x.test"]);
        }
        let _ = c.cmd("RSET").await;
        // MaxMsgs 2: a new connection for the next two.
        let _ = c.quit().await;
        c = Smtp::connect("127.0.0.23", pf.port).await.unwrap();
        c.ehlo().await;
    }
    send!(c, "busy@a.test", &["r1@x.test"]);
    let _ = c.quit().await;
    // The 13 sessions' disconnects, not counting wait_ready's probes from
    // 127.0.0.1: postlogd may write a session's last lines after its client
    // has heard the reply.
    eventually("every disconnect logged", Duration::from_secs(20), || {
        pf.maillog()
            .matches(" disconnect from unknown[127.0.0.2")
            .count()
            >= 13
    })
    .await;
    let live = live_refusals(&rr.log());
    let expected: BTreeMap<String, (u64, u64, u64)> = [
        ("ConnRate", (2, 0, 0)),
        ("MaxMsgs", (0, 2, 0)),
        ("MaxRcpt", (0, 0, 2)),
        ("MsgRate", (0, 2, 0)),
        ("MsgRateFrom", (0, 2, 0)),
        ("RcptRate", (0, 0, 3)),
    ]
    .into_iter()
    .map(|(c, t)| (c.to_string(), t))
    .collect();
    assert_eq!(live, expected, "live milter log:\n{}", rr.log());

    let log = root.path().join("maillog");
    std::fs::write(&log, pf.maillog()).unwrap();
    if std::env::var_os("RELAYRATE_SAVE_FIXTURE").is_some() {
        std::fs::write(fixture("postfix-live.maillog"), pf.maillog()).unwrap();
    }
    let policy = root.path().join("policy.txt");
    std::fs::write(&policy, LIVE_POLICY).unwrap();
    let report = replay_json(&policy, &[&log], &[]);
    assert_eq!(report["malformed"], 0, "{report}");
    assert_eq!(
        totals(&report),
        live,
        "replay:\n{report}\nmaillog:\n{}",
        pf.maillog()
    );
}

fn expected(entries: &[(&str, (u64, u64, u64))]) -> BTreeMap<String, (u64, u64, u64)> {
    entries.iter().map(|(c, t)| (c.to_string(), *t)).collect()
}

fn write_policy(root: &Path, text: &str) -> PathBuf {
    let path = root.join("policy.txt");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_kept_postfix_log_replays_to_the_live_refusals() {
    let root = temp_root();
    let policy = write_policy(root.path(), LIVE_POLICY);
    let report = replay_json(
        &policy,
        &[&fixture("postfix-live.maillog")],
        &["--year", "2026"],
    );
    assert_eq!(report["malformed"], 0, "{report}");
    assert_eq!(
        totals(&report),
        expected(&[
            ("ConnRate", (2, 0, 0)),
            ("MaxMsgs", (0, 2, 0)),
            ("MaxRcpt", (0, 0, 2)),
            ("MsgRate", (0, 2, 0)),
            ("MsgRateFrom", (0, 2, 0)),
            ("RcptRate", (0, 0, 3)),
        ])
    );
    // Per key: the sender's refusals are the sender's, with first, last
    // and the queue wait of the retry model (300 s, the first retry).
    let keys = report["keys"].as_array().unwrap();
    let busy = keys
        .iter()
        .find(|k| k["kind"] == "sender" && k["key"] == "busy@a.test")
        .unwrap_or_else(|| panic!("{report}"));
    let c = &busy["checks"]["MsgRateFrom"];
    assert_eq!(
        (c["messages"].as_u64(), c["waits"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(c["first"].as_u64() <= c["last"].as_u64());
    assert!(c["wait_max"].as_u64().unwrap() >= 300, "{c}");
}

#[test]
fn sendmail_lines_are_one_connection_per_message() {
    let root = temp_root();
    // MsgRate 2 refuses web1's third message; MaxRcpt 3 the 4th recipient
    // of the IPv6 client (sendmail's `IPv6:` form); ConnRate 2 counts each
    // message as a connection. The local submission (no relay address) is
    // no client; dovecot's line is skipped.
    let policy = write_policy(
        root.path(),
        "CHECK_MSG_RATE YES\nCHECK_NB_RCPT YES\nCHECK_CONN_RATE YES\nMsgRate:default 2\nMaxRcpt:default 3\nConnRate:default 2\n",
    );
    let report = replay_json(
        &policy,
        &[&fixture("sendmail.maillog")],
        &["--year", "2026"],
    );
    assert_eq!(
        totals(&report),
        expected(&[("ConnRate", (1, 1, 0)), ("MaxRcpt", (0, 0, 1))])
    );
    assert_eq!(report["skipped"], 1, "{report}");
    assert_eq!(report["malformed"], 0, "{report}");
}

#[test]
fn the_year_moves_on_at_new_year() {
    let root = temp_root();
    // Three connections in 15 s across midnight: ConnRate 2 refuses the
    // third only if January 1st follows December 31st.
    let policy = write_policy(root.path(), "CHECK_CONN_RATE YES\nConnRate:default 2\n");
    let report = replay_json(
        &policy,
        &[&fixture("rollover.maillog")],
        &["--year", "2025"],
    );
    assert_eq!(totals(&report), expected(&[("ConnRate", (1, 0, 0))]));
    // 2025-12-31T23:59:50Z and 2026-01-01T00:00:05Z.
    assert_eq!(report["first"], 1_767_225_590u64);
    assert_eq!(report["last"], 1_767_225_605u64);
}

#[test]
fn a_gzipped_log_is_read_as_it_is() {
    use std::io::Write;
    let root = temp_root();
    let policy = write_policy(root.path(), "CHECK_CONN_RATE YES\nConnRate:default 2\n");
    let gz = root.path().join("mail.log.2.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    enc.write_all(&std::fs::read(fixture("rollover.maillog")).unwrap())
        .unwrap();
    enc.finish().unwrap();
    let plain = replay_json(
        &policy,
        &[&fixture("rollover.maillog")],
        &["--year", "2025"],
    );
    let zipped = replay_json(&policy, &[&gz], &["--year", "2025"]);
    assert_eq!(zipped["lines"], 6);
    assert_eq!(totals(&zipped), totals(&plain));
    assert_eq!(zipped["keys"], plain["keys"]);
}

#[test]
fn lines_that_cannot_be_read_are_reported_with_file_and_line() {
    let root = temp_root();
    let policy = write_policy(root.path(), "CHECK_CONN_RATE YES\nConnRate:default 2\n");
    let log = fixture("malformed.maillog");
    let (ok, out, err) = relayrate(&[
        "replay",
        "--policy",
        policy.to_str().unwrap(),
        "--maillog",
        log.to_str().unwrap(),
        "--year",
        "2026",
    ]);
    assert!(ok, "{err}");
    let at = |n: u32| format!("{}:{n}: ", log.display());
    for n in [2, 3, 6, 7] {
        assert!(err.contains(&at(n)), "line {n} not reported:\n{err}");
    }
    for n in [1, 4, 5, 8] {
        assert!(!err.contains(&at(n)), "line {n} reported:\n{err}");
    }
    assert!(out.contains("8 lines (2 skipped, 4 not readable)"), "{out}");
}

#[test]
fn a_log_that_cannot_be_opened_is_an_error() {
    let root = temp_root();
    let policy = write_policy(root.path(), "CHECK_CONN_RATE YES\n");
    let (ok, _, err) = relayrate(&[
        "replay",
        "--policy",
        policy.to_str().unwrap(),
        "--maillog",
        "/nonexistent/mail.log",
    ]);
    assert!(!ok);
    assert!(err.contains("cannot read the mail logs"), "{err}");
}

#[test]
fn suggest_writes_a_valid_policy_that_keeps_its_delay_share() {
    let root = temp_root();
    // Three days of 40 clients, a few much busier than the rest.
    let log = root.path().join("mail.log");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
    relayrate::history::synth::write_log(&mut file, 120_000, 1_795_824_000, 40, 7).unwrap();
    drop(file);
    let share = 0.05;
    let (ok, policy_text, err) = relayrate(&[
        "suggest",
        "--maillog",
        log.to_str().unwrap(),
        "--year",
        "2026",
        "--delay-share",
        &share.to_string(),
    ]);
    assert!(ok, "{err}");
    // Every check has a default, and entries carry their figures.
    for check in relayrate::check::Check::ALL {
        assert!(
            policy_text.contains(&format!("\n{check}:default ")),
            "{check}:\n{policy_text}"
        );
    }
    assert!(policy_text.contains("# peak "), "{policy_text}");
    let policy = write_policy(root.path(), &policy_text);
    let (ok, out, err) = relayrate(&["policy", "check", policy.to_str().unwrap()]);
    assert!(ok, "policy check: {out}{err}\n{policy_text}");

    let report = replay_json(&policy, &[&log], &["--year", "2026"]);
    let keys = report["keys"].as_array().unwrap();
    let mut delayed_any = false;
    for k in keys {
        let (windows, delayed) = (
            k["windows"].as_u64().unwrap(),
            k["delayed_windows"].as_u64().unwrap(),
        );
        assert!(
            delayed as f64 <= share * windows as f64,
            "{} {}: {delayed} of {windows} windows delayed\n{policy_text}",
            k["kind"],
            k["key"]
        );
        delayed_any |= delayed > 0;
    }
    // Not the peaks: traffic is delayed from time to time.
    assert!(delayed_any, "nothing delayed:\n{policy_text}");
}

#[test]
fn suggest_refuses_a_share_out_of_range() {
    let (ok, _, err) = relayrate(&["suggest", "--maillog", "x", "--delay-share", "2"]);
    assert!(!ok);
    assert!(err.contains("a share from 0 to 1"), "{err}");
}

#[test]
fn rfc3339_stamps_are_read_with_their_offset() {
    let root = temp_root();
    // Two addresses of one /64 are one client: ConnRate 1 refuses the
    // second connection, one second after the first (11:00 at +01:00).
    let policy = write_policy(root.path(), "CHECK_CONN_RATE YES\nConnRate:default 1\n");
    let report = replay_json(&policy, &[&fixture("rfc3339.maillog")], &[]);
    assert_eq!(totals(&report), expected(&[("ConnRate", (1, 0, 0))]));
    // 2026-11-30T10:00:00Z.
    assert_eq!(report["first"], 1_796_032_800u64);
    assert_eq!(report["last"], 1_796_032_801u64);
    let keys = report["keys"].as_array().unwrap();
    assert_eq!(keys[0]["key"], "2001:db8:1:2::/64", "{report}");
}
