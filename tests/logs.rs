//! `--log-format json`: every log line is one JSON object with the
//! level, the target and the fields, for log collectors.

mod common;

use std::ffi::OsString;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, free_port};

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = std::fs::File::create(dir.path().join("stderr")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_relayrate"))
        .args(["--log-format", "json", "node", "--id", "1", "--bootstrap"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RELAYRATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    eventually("the node serving", Duration::from_secs(30), || {
        log().contains("node serving")
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let text = log();
    let mut serving = None;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["target"].is_string(), "{line}");
        if v["message"] == "node serving" {
            serving = Some(v);
        }
    }
    let serving = serving.expect("a 'node serving' line");
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["id"], 1, "fields are members: {serving}");
}

/// A line the attacks below try to write into a log as a line of its own.
const FORGED: &str = "WARN relayrate::refusal: refused 99/1 client=6.6.6.6";

/// Every line of a human log comes from the logger: it starts with the
/// timestamp, and none starts with the forged text.
fn assert_no_forged_line(log: &str) {
    for line in log.lines() {
        assert!(
            line.starts_with(|c: char| c.is_ascii_digit()) && !line.starts_with(FORGED),
            "a line not written by the logger: {line:?} in:\n{log}"
        );
    }
}

/// A process of ours with its stderr in a file; killed when dropped.
struct Proc {
    child: std::process::Child,
    stderr: std::path::PathBuf,
}

impl Proc {
    /// Starts `relayrate ARGS` with `RELAYRATE_LOG=info,openraft=warn`,
    /// `NO_COLOR` unset, stderr to the file `stderr`.
    fn relayrate(args: &[OsString], stderr: &std::path::Path) -> Proc {
        let child = Command::new(env!("CARGO_BIN_EXE_relayrate"))
            .args(args)
            .env("RELAYRATE_LOG", "info,openraft=warn")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap();
        Proc {
            child,
            stderr: stderr.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// CPU time used so far (user and system), in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        // utime and stime are fields 14 and 15 of the whole line.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// SIGTERM, then the exit status within `limit` (None: still running).
    async fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// Command-line arguments, from strings and paths alike.
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(OsString::from($a)),*] };
}

const POLICY: &str = "CHECK_CONN_RATE YES\nConnRate:10.9.0.1 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_restarted_waits_quietly_and_stops_on_sigterm() {
    use relayrate::proto::v1::admin_client::AdminClient;
    use relayrate::proto::v1::RemoveNodeRequest;

    let root = tempfile::tempdir().unwrap();
    let first = common::NodeProc::start(root.path(), 1, Some(POLICY), None);
    let second = common::NodeProc::start(root.path(), 2, None, Some(first.peer));
    eventually("node 2 joined", Duration::from_secs(60), || {
        second.log().contains("joined the cluster")
    })
    .await;
    let mut admin = AdminClient::connect(format!("http://{}", first.addr))
        .await
        .unwrap();
    admin
        .remove_node(RemoveNodeRequest { id: 2 })
        .await
        .expect("node 2 removed");
    eventually("node 2 told", Duration::from_secs(30), || {
        second.log().contains("removed from the cluster")
    })
    .await;
    let (addr, peer, dir) = (second.addr, second.peer, second.dir.clone());
    drop(second);

    // Restarted on its data with a policy to put in force: it cannot, and
    // must neither spin nor fill its log.
    std::fs::write(dir.join("policy.txt"), POLICY).unwrap();
    let args = args![
        "node",
        "--id",
        "2",
        "--listen",
        addr.to_string(),
        "--peer-listen",
        peer.to_string(),
        "--cluster-secret-file",
        common::test_secret_file(root.path()),
        "--data-dir",
        dir.join("data"),
        "--policy",
        dir.join("policy.txt"),
    ];
    let mut node = Proc::relayrate(&args, &dir.join("restarted.stderr"));
    eventually("the restart logged", Duration::from_secs(30), || {
        node.log().contains("node serving")
    })
    .await;
    let cpu_before = node.cpu_ticks();
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        let lines = node.log().lines().count();
        assert!(lines <= 20, "{lines} lines in {:?}", watched.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Clock ticks are hundredths of a second: waiting, not spinning.
    let cpu = node.cpu_ticks() - cpu_before;
    assert!(cpu < 50, "{cpu} ticks of CPU in 3 s");
    let log = node.log();
    assert_eq!(
        log.matches("removed").count(),
        1,
        "said once that it was removed:\n{log}"
    );

    let status = node.terminate(Duration::from_secs(15)).await;
    let status = status.unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", node.log()));
    assert!(status.success(), "{status}:\n{}", node.log());
}

#[tokio::test]
async fn sigterm_stops_a_node_still_joining() {
    let root = tempfile::tempdir().unwrap();
    let nobody = format!("127.0.0.1:{}", free_port());
    let args = args![
        "node",
        "--id",
        "5",
        "--listen",
        format!("127.0.0.1:{}", free_port()),
        "--data-dir",
        root.path().join("data"),
        "--cluster-secret-file",
        common::test_secret_file(root.path()),
        "--join",
        nobody,
    ];
    let mut node = Proc::relayrate(&args, &root.path().join("stderr"));
    eventually("a join attempt", Duration::from_secs(30), || {
        node.log().contains("join: not yet")
    })
    .await;
    let status = node.terminate(Duration::from_secs(15)).await;
    let status = status.unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", node.log()));
    assert!(status.success(), "{status}:\n{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_fields_cannot_forge_log_lines() {
    use relayrate::proto::v1::admin_client::AdminClient;
    use relayrate::proto::v1::{AddNodeRequest, ResetRequest};

    let root = tempfile::tempdir().unwrap();
    let node = common::NodeProc::start(root.path(), 1, Some(POLICY), None);
    let url = format!("http://{}", node.addr);
    eventually("the policy in force", Duration::from_secs(30), || {
        node.log().contains("policy in force")
    })
    .await;
    let mut admin = AdminClient::connect(url.clone()).await.unwrap();
    let attack = format!("\n{FORGED}\x1b[2J\n");
    admin
        .reset(ResetRequest {
            key: format!("10.9.0.1{attack}"),
            check: 0,
            requested_by: format!("mallory{attack}"),
        })
        .await
        .expect("reset done");
    // Refused or not, the request is logged.
    let _ = admin
        .add_node(AddNodeRequest {
            id: 7,
            addr: format!("127.0.0.1:1{attack}"),
        })
        .await;
    eventually("the requests logged", Duration::from_secs(30), || {
        let log = node.log();
        log.contains("admin: reset") && log.contains("admin: add node")
    })
    .await;
    let log = node.log();
    assert_no_forged_line(&log);
    assert!(!log.contains('\x1b'), "{log:?}");

    // relayratectl shows the keys it is given escaped too.
    let out = Command::new(env!("CARGO_BIN_EXE_relayratectl"))
        .args(["--node", &url, "show", &format!("10.9.0.1{attack}")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(!stdout.contains('\x1b'), "{stdout:?}");
    assert!(!stdout.lines().any(|l| l.starts_with(FORGED)), "{stdout}");

    // Its output to a reader that has gone: quiet, with the command's code.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_relayratectl"))
        .args(["--node", &url, "status"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_lines_in_a_file_are_plain_and_escaped() {
    use indymilter_test::{Status, TestConnection};

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.txt"), POLICY).unwrap();
    let milter = free_port();
    let args = args![
        "run",
        "--listen",
        format!("127.0.0.1:{}", free_port()),
        "--metrics-listen",
        format!("127.0.0.1:{}", free_port()),
        "--milter-listen",
        format!("inet:127.0.0.1:{milter}"),
        "--data-dir",
        dir.path().join("data"),
        "--policy",
        dir.path().join("policy.txt"),
    ];
    let relay = Proc::relayrate(&args, &dir.path().join("stderr"));
    eventually("the policy in force", Duration::from_secs(30), || {
        relay.log().contains("policy in force")
    })
    .await;
    let client: std::net::IpAddr = "10.9.0.1".parse().unwrap();
    let host = format!("web.example\n{FORGED}\x1b[2J");
    let mut refused = false;
    for _ in 0..2 {
        let mut c = loop {
            match TestConnection::open(("127.0.0.1", milter)).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let status = c.connect(host.as_str(), client).await.unwrap();
        refused |= matches!(status, Status::Tempfail { .. });
        let _ = c.close().await;
    }
    assert!(refused, "the second connection is refused");
    eventually("the refusal logged", Duration::from_secs(30), || {
        relay.log().contains("refused 2/1")
    })
    .await;
    let log = relay.log();
    assert!(
        !log.contains('\x1b'),
        "colours or an escape in a file: {log:?}"
    );
    // README: grep -E '^[^ ]+ +WARN relayrate::refusal: ' finds it.
    let line = log
        .lines()
        .find(|l| {
            l.split_once(' ').is_some_and(|(time, rest)| {
                !time.is_empty()
                    && rest
                        .trim_start_matches(' ')
                        .starts_with("WARN relayrate::refusal: refused 2/1")
            })
        })
        .unwrap_or_else(|| panic!("no refusal line in:\n{log}"));
    assert!(line.contains("client=10.9.0.1"), "{line}");
    assert_no_forged_line(&log);
}

#[test]
fn policy_check_and_explain_print_no_raw_control_characters() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.txt");
    std::fs::write(
        &bad,
        "ConnRate:\x1b[2Jevil.example 5\nConnRate:a\u{85}b.example 6\n",
    )
    .unwrap();
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "CHECK_CONN_RATE YES\nConnRate:web.example 5\n").unwrap();
    let relayrate = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_relayrate"))
            .args(args)
            .output()
            .unwrap()
    };
    let runs = [
        relayrate(&[os("policy"), os("check"), bad.as_os_str()]),
        relayrate(&[
            os("policy"),
            os("explain"),
            good.as_os_str(),
            os("--ip"),
            os("10.0.0.1"),
            os("--host"),
            os("\x1b[2Jweb.example"),
            os("--from"),
            os("a\n@b.example"),
        ]),
    ];
    for out in runs {
        for stream in [&out.stdout, &out.stderr] {
            let text = String::from_utf8_lossy(stream);
            assert!(
                !text.contains(['\x1b', '\u{85}']),
                "raw control characters: {text:?}"
            );
            assert!(!text.contains("\n@b.example"), "{text:?}");
        }
    }
}

#[test]
fn policy_check_to_a_closed_pipe_ends_with_its_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "CHECK_CONN_RATE YES\nConnRate:web.example 5\n").unwrap();
    let bad = dir.path().join("bad.txt");
    let errors: String = (0..5000).map(|i| format!("ConnRate:{i} x\n")).collect();
    std::fs::write(&bad, errors).unwrap();
    let cases = [
        (vec![os("policy"), os("check"), good.as_os_str()], 0),
        (vec![os("policy"), os("check"), bad.as_os_str()], 1),
        (
            vec![
                os("policy"),
                os("explain"),
                good.as_os_str(),
                os("--ip"),
                os("10.0.0.1"),
            ],
            0,
        ),
    ];
    for (args, code) in cases {
        // The reader is gone before the command writes a byte.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_relayrate"))
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// What an operator must not find in relayrate's own log lines: Rust's
/// `Debug` forms of options and enums. (openraft's WARN lines are its
/// own words.)
fn assert_plain_words(log: &str) {
    for form in [
        "Some(", "None", "Inet(", "Unix(", "Ip(", "Name(", "Failed(", "Metrics{",
    ] {
        let line = log
            .lines()
            .filter(|l| !l.contains(" openraft::"))
            .find(|l| l.contains(form));
        assert!(line.is_none(), "a Debug form {form:?} in: {line:?}\n{log}");
    }
}

fn reset(node: std::net::SocketAddr, key: &str) {
    let out = common::relayratectl(node, &["reset", key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A reset is logged once, as the operator's action, where it was asked;
/// a node that replays its log at start does not log it again; the
/// milter's address and the stop line are in plain words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_replayed_at_start_is_not_logged_as_a_new_action() {
    let root = common::temp_root();
    let milter = format!("inet:127.0.0.1:{}", free_port());
    let n1 = common::NodeProc::start_with_args(
        root.path(),
        1,
        Some(POLICY),
        None,
        &[os("--milter-listen"), os(&milter)],
    );
    n1.wait_deciding().await;
    reset(n1.addr, "10.9.0.1");
    let first = n1.log();
    assert_eq!(
        first.lines().filter(|l| l.contains("admin: reset")).count(),
        1,
        "{first}"
    );
    assert!(first.contains("key=10.9.0.1 check=all"), "{first}");
    n1.signal("TERM");
    eventually("node 1 stops", Duration::from_secs(30), || {
        n1.log().contains(" stopped ")
    })
    .await;
    let stopped = n1.log();
    assert_plain_words(&stopped);
    let stdout = std::fs::read_to_string(n1.dir.join("stdout")).unwrap();
    assert!(
        stdout.contains(&format!("relayrate milter listening on {milter}")),
        "{stdout}"
    );
    drop(n1);

    // The same data dir again: it replays its log, the reset included.
    let again = common::NodeProc::start_with_args(root.path(), 1, None, None, &[]);
    again.wait_deciding().await;
    let replayed = again.log();
    assert!(
        !replayed.contains("reset"),
        "a replayed reset logged:\n{replayed}"
    );
    assert_plain_words(&replayed);
}

/// A normal join logs no ERROR; a peer that stops answering is logged
/// once (openraft's own error for every retry, twice a second, is muted),
/// and nothing in Debug forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_logs_no_error_and_a_lost_peer_is_logged_once() {
    let root = common::temp_root();
    let n1 = common::NodeProc::start(root.path(), 1, Some(POLICY), None);
    n1.wait_deciding().await;
    let n2 = common::NodeProc::start(root.path(), 2, None, Some(n1.peer));
    n2.wait_deciding().await;
    for (name, log) in [("node 1", n1.log()), ("node 2", n2.log())] {
        let error = log.lines().find(|l| l.contains(" ERROR "));
        assert!(error.is_none(), "{name} on a normal join: {error:?}\n{log}");
        assert_plain_words(&log);
    }
    drop(n2);
    eventually(
        "node 1 says node 2 is unreachable",
        Duration::from_secs(30),
        || n1.log().contains("peer unreachable"),
    )
    .await;
    // Two seconds of calls to node 1 while openraft retries node 2 (four
    // times, each one an ERROR line before).
    let out = Command::new(env!("CARGO_BIN_EXE_relayrate"))
        .args(["bench", "--keys", "1", "--duration", "2", "--json"])
        .arg("--target")
        .arg(format!("http://{}", n1.addr))
        .output()
        .unwrap();
    assert!(out.status.success() || !out.stdout.is_empty());
    let log = n1.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("peer unreachable"))
            .count(),
        1,
        "{log}"
    );
    let error = log.lines().find(|l| l.contains(" ERROR "));
    assert!(error.is_none(), "node 1 with a peer down: {error:?}\n{log}");
    assert_plain_words(&log);
}
