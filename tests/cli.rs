//! `relayrate policy check` and `relayrate policy explain`, run as a process
//! the way an administrator runs them.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};
use tempfile::TempDir;

const CHECKS: [&str; 11] = [
    "ConnRate",
    "ConnOpen",
    "MaxRcpt",
    "MsgRate",
    "MaxMsgs",
    "RcptRate",
    "MsgRateFrom",
    "RcptRateFrom",
    "MaxRcptFrom",
    "MsgRateAuth",
    "RcptRateAuth",
];

/// Runs the binary in `dir` (so that relative file names stay short).
fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relayrate"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run relayrate")
}

/// Runs the binary in the crate's directory, where `examples/` is.
fn run_in_crate(args: &[&str]) -> Output {
    run(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("utf-8 stderr")
}

/// A temporary directory holding `files`.
fn dir_with(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// `policy explain ... --json`, parsed; the run must succeed.
fn explain_json(dir: &Path, args: &[&str]) -> Value {
    let mut all = vec!["policy", "explain"];
    all.extend_from_slice(args);
    all.push("--json");
    let o = run(dir, &all);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("JSON on stdout")
}

fn check<'a>(v: &'a Value, name: &str) -> &'a Value {
    &v["checks"][name]
}

const EXAMPLE: &str = "examples/ze-policy.txt";

// ---------------------------------------------------------------- check

#[test]
fn check_of_the_example_prints_one_summary_line() {
    let o = run_in_crate(&["policy", "check", EXAMPLE]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "examples/ze-policy.txt: valid; 5 entries (ConnRate 1, ConnOpen 1, MaxRcpt 1, \
         MsgRate 1, MaxMsgs 1); switches on: CHECK_CONN_RATE, CHECK_OPEN_CONNECTIONS, \
         CHECK_NB_RCPT, CHECK_MSG_RATE, CHECK_NB_MSGS; window 600s in 30s buckets\n"
    );
    assert_eq!(stderr(&o), "");
}

#[test]
fn check_of_a_broken_file_prints_every_error_and_exits_1() {
    let dir = dir_with(&[(
        "bad.txt",
        "\
CHECK_CONN_RATE YES
ConnRat:1.1.1.11 50
ConnRate:1.1.1.12 60
FOO BAR
  ConnRate: 50
ConnRate:10.1.2.3/16 5
ConnRate:1.1.1.13 5x
ConnRate:1.1.1.14 50 # fifty
",
    )]);
    let o = run(dir.path(), &["policy", "check", "bad.txt"]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![
            "bad.txt:2:1: unknown check `ConnRat`; expected one of ConnRate, ConnOpen, \
             MaxRcpt, MsgRate, MaxMsgs, RcptRate, MsgRateFrom, RcptRateFrom, MaxRcptFrom, \
             MsgRateAuth, RcptRateAuth, NetClass",
            "bad.txt:4:1: expected `Check:Key Value` or a setting such as CHECK_CONN_RATE YES, \
             found `FOO`",
            "bad.txt:5:12: expected a key after `ConnRate:`",
            "bad.txt:6:10: invalid network `10.1.2.3/16`: bits are set after the prefix \
             (did you mean 10.1.0.0/16?)",
            "bad.txt:7:19: expected a limit (a whole number, optionally with k or m), found `5x`",
            "bad.txt:8:22: expected the end of the line after the value, found `# fifty` \
             (comments go on a line of their own)",
        ]
    );
    // No summary for a refused policy.
    assert!(!out.contains(": valid;"), "{out}");
}

#[test]
fn check_names_the_second_file_and_prints_warnings_on_stderr() {
    let dir = dir_with(&[
        ("site.txt", "CHECK_CONN_RATE YES\nConnRate:1.1.1.11 50\n"),
        (
            "defaults.txt",
            "ConnRate:1.1.1.11 15\nConnRate:default abc\n",
        ),
    ]);
    let o = run(dir.path(), &["policy", "check", "site.txt", "defaults.txt"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "defaults.txt:2:18: expected a limit (a whole number, optionally with k or m), \
         found `abc`\n"
    );

    // Valid: exit 0, the summary names both files, warnings go to stderr.
    let dir = dir_with(&[
        ("site.txt", "CHECK_CONN_RATE YES\nConnRate:1.1.1.11 50\n"),
        (
            "defaults.txt",
            "ConnRate:1.1.1.11 15\nConnRate:default 15\nMsgRate:default 100\n",
        ),
    ]);
    let o = run(dir.path(), &["policy", "check", "site.txt", "defaults.txt"]);
    assert_eq!(o.status.code(), Some(0), "stdout: {}", stdout(&o));
    assert_eq!(
        stdout(&o),
        "site.txt, defaults.txt: valid; 3 entries (ConnRate 2, MsgRate 1); \
         switches on: CHECK_CONN_RATE; window 600s in 30s buckets\n"
    );
    let err = stderr(&o);
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        vec![
            "defaults.txt:1:1: warning: duplicate entry `ConnRate:1.1.1.11`: \
             the first one (site.txt:2) wins",
            "defaults.txt:3:1: warning: MsgRate entries present but CHECK_MSG_RATE is off: \
             they are ignored",
        ]
    );
}

#[test]
fn check_of_an_unreadable_file_exits_1_naming_it() {
    let dir = dir_with(&[("good.txt", "CHECK_CONN_RATE YES\n")]);
    let o = run(dir.path(), &["policy", "check", "good.txt", "missing.txt"]);
    assert_eq!(o.status.code(), Some(1));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        all.lines()
            .any(|l| l.starts_with("missing.txt: cannot read: ")),
        "{all}"
    );
    assert!(!all.contains(": valid;"), "{all}");

    // A directory cannot be read as a policy either.
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let o = run(dir.path(), &["policy", "check", "sub"]);
    assert_eq!(o.status.code(), Some(1));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        all.lines().any(|l| l.starts_with("sub: cannot read: ")),
        "{all}"
    );
}

#[test]
fn check_without_files_is_a_usage_error() {
    let o = run_in_crate(&["policy", "check"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stdout(&o), "");
}

// ---------------------------------------------------------------- explain

#[test]
fn explain_json_has_the_documented_shape() {
    let v = explain_json(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        &[EXAMPLE, "--ip", "1.1.1.11"],
    );
    let top: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(top, vec!["checks"]);
    let names: Vec<&str> = v["checks"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(names, CHECKS);
    for name in CHECKS {
        let fields: Vec<&str> = check(&v, name)
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            fields,
            ["enabled", "limit", "matched", "source", "note"],
            "{name}"
        );
    }
    let entry = |name: &str, limit: u64, line: u32| {
        json!({
            "enabled": true,
            "limit": limit,
            "matched": format!("{name}:1.1.1.11"),
            "source": format!("examples/ze-policy.txt:{line}"),
            "note": null,
        })
    };
    assert_eq!(*check(&v, "ConnRate"), entry("ConnRate", 50, 19));
    assert_eq!(*check(&v, "ConnOpen"), entry("ConnOpen", 5, 21));
    assert_eq!(*check(&v, "MaxRcpt"), entry("MaxRcpt", 50, 23));
    assert_eq!(*check(&v, "MsgRate"), entry("MsgRate", 40, 25));
    assert_eq!(*check(&v, "MaxMsgs"), entry("MaxMsgs", 10, 27));
    let builtin = |enabled: bool, note: String| json!({"enabled": enabled, "limit": null, "matched": "built-in default", "source": null, "note": note});
    // CHECK_RCPT_RATE is absent from the example: off, and said so.
    for name in ["RcptRate", "RcptRateFrom", "RcptRateAuth"] {
        let off = "off: CHECK_RCPT_RATE is not YES".to_string();
        assert_eq!(*check(&v, name), builtin(false, off), "{name}");
    }
    // On, but the built-in default of the per-sender and AUTH checks is no
    // limit: the note says why nothing is refused.
    for name in ["MsgRateFrom", "MaxRcptFrom", "MsgRateAuth"] {
        let why = format!("no limit: no entry matches, and {name} has no built-in default");
        assert_eq!(*check(&v, name), builtin(true, why), "{name}");
    }
}

#[test]
fn explain_says_why_a_check_that_is_on_sets_no_limit() {
    let dir = dir_with(&[(
        "p.txt",
        "CHECK_NB_RCPT YES\nMaxRcpt:1.1.1.11 0\nMaxRcpt:default 100\n",
    )]);
    let v = explain_json(dir.path(), &["p.txt", "--ip", "1.1.1.11"]);
    assert_eq!(check(&v, "MaxRcpt")["limit"], Value::Null);
    assert_eq!(
        check(&v, "MaxRcpt")["note"],
        "no limit: the entry that matches says 0"
    );
    let text = stdout(&run(
        dir.path(),
        &["policy", "explain", "p.txt", "--ip", "1.1.1.11"],
    ));
    let line = text.lines().find(|l| l.starts_with("MaxRcpt ")).unwrap();
    assert!(
        line.ends_with("p.txt:2                  no limit: the entry that matches says 0"),
        "{text}"
    );
}

#[test]
fn explain_json_falls_back_to_the_built_in_defaults() {
    let v = explain_json(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        &[EXAMPLE, "--ip", "1.1.1.12"],
    );
    let limits: Vec<(&str, bool, Value, &str)> = CHECKS
        .iter()
        .map(|name| {
            let c = check(&v, name);
            assert_eq!(c["source"], Value::Null, "{name}");
            (
                *name,
                c["enabled"].as_bool().unwrap(),
                c["limit"].clone(),
                c["matched"].as_str().unwrap(),
            )
        })
        .collect();
    let b = "built-in default";
    assert_eq!(
        limits,
        vec![
            ("ConnRate", true, json!(15), b),
            ("ConnOpen", true, json!(10), b),
            ("MaxRcpt", true, json!(200), b),
            ("MsgRate", true, json!(100), b),
            ("MaxMsgs", true, json!(100), b),
            ("RcptRate", false, Value::Null, b),
            ("MsgRateFrom", true, Value::Null, b),
            ("RcptRateFrom", false, Value::Null, b),
            ("MaxRcptFrom", true, Value::Null, b),
            ("MsgRateAuth", true, Value::Null, b),
            ("RcptRateAuth", false, Value::Null, b),
        ]
    );
}

const KEYED: &str = "\
CHECK_CONN_RATE YES
CHECK_MSG_RATE YES
CHECK_RCPT_RATE YES
CHECK_NB_RCPT YES
ConnRate:example.com 7
ConnRate:default 20
MsgRate:web1.example.com 8
MsgRateFrom:@example.com 21
MsgRateFrom:joe@example.com 22
RcptRateFrom:example.com 23
MaxRcptFrom:default 0
MsgRateAuth:joe 30
RcptRateAuth:default 31
ConnRate:3.3.3 4
";

#[test]
fn explain_picks_host_sender_and_auth_entries() {
    let dir = dir_with(&[("p.txt", KEYED)]);
    let v = explain_json(
        dir.path(),
        &[
            "p.txt",
            "--ip",
            "2.2.2.2",
            "--host",
            "Web1.Example.COM.",
            "--from",
            "<Joe@Example.com>",
            "--auth",
            "JOE",
        ],
    );
    let got = |name: &str| {
        let c = check(&v, name);
        (
            c["limit"].clone(),
            c["matched"].as_str().unwrap().to_string(),
            c["source"].clone(),
        )
    };
    // Host name, then its parent domain.
    assert_eq!(
        got("ConnRate"),
        (json!(7), "ConnRate:example.com".into(), json!("p.txt:5"))
    );
    assert_eq!(
        got("MsgRate"),
        (
            json!(8),
            "MsgRate:web1.example.com".into(),
            json!("p.txt:7")
        )
    );
    // Sender: the full address beats `@domain`; the domain is found too.
    assert_eq!(
        got("MsgRateFrom"),
        (
            json!(22),
            "MsgRateFrom:joe@example.com".into(),
            json!("p.txt:9")
        )
    );
    assert_eq!(
        got("RcptRateFrom"),
        (
            json!(23),
            "RcptRateFrom:example.com".into(),
            json!("p.txt:10")
        )
    );
    // A 0 entry is no limit, and still names the entry.
    assert_eq!(
        got("MaxRcptFrom"),
        (Value::Null, "MaxRcptFrom:default".into(), json!("p.txt:11"))
    );
    // AUTH user, then the default.
    assert_eq!(
        got("MsgRateAuth"),
        (json!(30), "MsgRateAuth:joe".into(), json!("p.txt:12"))
    );
    assert_eq!(
        got("RcptRateAuth"),
        (json!(31), "RcptRateAuth:default".into(), json!("p.txt:13"))
    );

    // Another sender of the domain gets `@domain`; the AUTH check falls
    // to built-in without --auth.
    let v = explain_json(
        dir.path(),
        &["p.txt", "--ip", "2.2.2.2", "--from", "ann@example.com"],
    );
    assert_eq!(check(&v, "MsgRateFrom")["limit"], json!(21));
    assert_eq!(
        check(&v, "MsgRateFrom")["matched"],
        json!("MsgRateFrom:@example.com")
    );
    assert_eq!(
        check(&v, "MsgRateAuth")["matched"],
        json!("built-in default")
    );
    assert_eq!(check(&v, "MsgRateAuth")["limit"], Value::Null);
    // No host: the default entry.
    assert_eq!(check(&v, "ConnRate")["matched"], json!("ConnRate:default"));
    assert_eq!(check(&v, "ConnRate")["limit"], json!(20));

    // The client address beats the host name.
    let v = explain_json(
        dir.path(),
        &["p.txt", "--ip", "3.3.3.3", "--host", "web1.example.com"],
    );
    assert_eq!(check(&v, "ConnRate")["matched"], json!("ConnRate:3.3.3"));
    assert_eq!(check(&v, "ConnRate")["limit"], json!(4));
}

#[test]
fn explain_an_ipv6_client() {
    let dir = dir_with(&[(
        "v6.txt",
        "\
CHECK_CONN_RATE YES
ConnRate:2001:db8::/32 9
ConnRate:2001:DB8::5 4
ConnRate:2001:db8:1::/48 6
ConnRate:1.1.1.11 50
",
    )]);
    let conn = |ip: &str| {
        let v = explain_json(dir.path(), &["v6.txt", "--ip", ip]);
        let c = check(&v, "ConnRate");
        (
            c["limit"].clone(),
            c["matched"].as_str().unwrap().to_string(),
            c["source"].clone(),
        )
    };
    assert_eq!(
        conn("2001:db8::5"),
        (json!(4), "ConnRate:2001:DB8::5".into(), json!("v6.txt:3"))
    );
    assert_eq!(
        conn("2001:db8:1::7"),
        (
            json!(6),
            "ConnRate:2001:db8:1::/48".into(),
            json!("v6.txt:4")
        )
    );
    assert_eq!(
        conn("2001:db8:2::1"),
        (json!(9), "ConnRate:2001:db8::/32".into(), json!("v6.txt:2"))
    );
    assert_eq!(
        conn("2001:db9::1"),
        (json!(15), "built-in default".into(), Value::Null)
    );
    // An IPv4-mapped address is the IPv4 client.
    assert_eq!(
        conn("::ffff:1.1.1.11"),
        (json!(50), "ConnRate:1.1.1.11".into(), json!("v6.txt:5"))
    );
}

#[test]
fn explain_in_words_has_one_row_per_check() {
    let o = run_in_crate(&["policy", "explain", EXAMPLE, "--ip", "1.1.1.11"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "client 1.1.1.11 host - sender - auth - class -");
    fn words(l: &str) -> Vec<&str> {
        l.split_whitespace().collect()
    }
    assert_eq!(
        words(lines[1]),
        ["check", "enabled", "limit", "matched", "source", "note"]
    );
    let rows = &lines[2..];
    assert_eq!(rows.len(), CHECKS.len(), "{out}");
    for (row, name) in rows.iter().zip(CHECKS) {
        assert_eq!(words(row)[0], name, "{out}");
    }
    assert_eq!(
        words(rows[0]),
        [
            "ConnRate",
            "yes",
            "50",
            "ConnRate:1.1.1.11",
            "examples/ze-policy.txt:19",
            "-"
        ]
    );
    assert_eq!(
        words(rows[4]),
        [
            "MaxMsgs",
            "yes",
            "10",
            "MaxMsgs:1.1.1.11",
            "examples/ze-policy.txt:27",
            "-"
        ]
    );
    assert_eq!(
        words(rows[5]).join(" "),
        "RcptRate no no limit built-in default - off: CHECK_RCPT_RATE is not YES"
    );
    assert_eq!(
        words(rows[6]).join(" "),
        "MsgRateFrom yes no limit built-in default - \
         no limit: no entry matches, and MsgRateFrom has no built-in default"
    );

    // The first line names what was given.
    let o = run_in_crate(&[
        "policy",
        "explain",
        EXAMPLE,
        "--ip",
        "127.0.0.1",
        "--host",
        "Web1.Example.COM",
        "--from",
        "<Joe@Example.com>",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        stdout(&o).lines().next(),
        Some("client 127.0.0.1 host web1.example.com sender joe@example.com auth - class local")
    );
}

#[test]
fn explain_refuses_a_bad_ip() {
    for bad in ["nope", "1.1.1.256", "1.1.1", "2001:db8::zz", ""] {
        let o = run_in_crate(&["policy", "explain", EXAMPLE, "--ip", bad]);
        assert_eq!(o.status.code(), Some(2), "--ip {bad:?}");
        assert_eq!(stdout(&o), "", "--ip {bad:?}");
        let err = stderr(&o);
        assert!(err.contains("--ip"), "{err}");
        assert!(err.contains(&format!("'{bad}'")), "{err}");
    }
    // --ip is required.
    let o = run_in_crate(&["policy", "explain", EXAMPLE]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--ip"), "{}", stderr(&o));
}

#[test]
fn explain_of_a_broken_file_prints_its_errors_and_exits_1() {
    let dir = dir_with(&[("bad.txt", "CHECK_CONN_RATE YES\nConnRate:1.1.1.11\n")]);
    let o = run(
        dir.path(),
        &["policy", "explain", "bad.txt", "--ip", "1.1.1.11", "--json"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "bad.txt:2:18: expected a value after `ConnRate:1.1.1.11`\n"
    );
}

/// A cluster secret that others may read is reported at start (here, the
/// node cannot bind its port and stops right after).
#[test]
fn a_cluster_secret_readable_by_others_is_reported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir_with(&[("secret", "0123456789abcdef0123456789abcdef")]);
    let secret = dir.path().join("secret");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "node",
        "--id",
        "1",
        "--listen",
        listen.as_str(),
        "--data-dir",
        "data",
        "--bootstrap",
        "--cluster-secret-file",
        "secret",
    ];
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = run(dir.path(), &args);
        assert!(!out.status.success(), "the port is taken");
        assert_eq!(
            stderr(&out).contains("chmod 600"),
            warned,
            "mode {mode:o}: {}",
            stderr(&out)
        );
    }
}

// ------------------------------------------------ keys of every form

#[test]
fn explain_of_the_null_sender_tells_what_applies() {
    // The report: `--from '<>'` claimed the default's limits, which never
    // applied to `<>`. Now `<>` is a key, and the default applies to it.
    let dir = dir_with(&[(
        "p.txt",
        "CHECK_MSG_RATE YES\nCHECK_RCPT_RATE YES\nMsgRateFrom:<> 3\nMsgRateFrom:default 2\n\
         RcptRateFrom:default 4\n",
    )]);
    let v = explain_json(dir.path(), &["p.txt", "--ip", "10.0.0.1", "--from", "<>"]);
    assert_eq!(check(&v, "MsgRateFrom")["matched"], "MsgRateFrom:<>");
    assert_eq!(check(&v, "MsgRateFrom")["limit"], 3);
    assert_eq!(check(&v, "RcptRateFrom")["matched"], "RcptRateFrom:default");
    let o = run(
        dir.path(),
        &[
            "policy", "explain", "p.txt", "--ip", "10.0.0.1", "--from", "<>",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).starts_with("client 10.0.0.1 host - sender <> auth - class -\n"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn check_accepts_utf8_keys_and_explain_matches_both_domain_forms() {
    // The report: this line made `policy check` refuse the whole file.
    let dir = dir_with(&[(
        "p.txt",
        "CHECK_MSG_RATE YES\nMsgRateFrom:jörg@example.org 2\nMsgRateFrom:@bücher.example 5\n",
    )]);
    let o = run(dir.path(), &["policy", "check", "p.txt"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let v = explain_json(
        dir.path(),
        &["p.txt", "--ip", "10.0.0.1", "--from", "<Jörg@example.org>"],
    );
    assert_eq!(check(&v, "MsgRateFrom")["limit"], 2);
    for from in ["<a@bücher.example>", "<a@xn--bcher-kva.example>"] {
        let v = explain_json(dir.path(), &["p.txt", "--ip", "10.0.0.1", "--from", from]);
        assert_eq!(
            check(&v, "MsgRateFrom")["matched"],
            "MsgRateFrom:@bücher.example"
        );
    }
    // A control character in a key is an error at its place.
    let dir = dir_with(&[(
        "p.txt",
        "CHECK_MSG_RATE YES\nMsgRateFrom:j\u{1}rg@example.org 2\n",
    )]);
    let o = run(dir.path(), &["policy", "check", "p.txt"]);
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).starts_with("p.txt:2:13: invalid key `j\\x01rg@example.org`"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn ipv6_prefix_is_shown_by_check_and_explain() {
    let dir = dir_with(&[("p.txt", "CHECK_CONN_RATE YES\nIPv6Prefix 48\n")]);
    let o = run(dir.path(), &["policy", "check", "p.txt"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert!(
        stdout(&o).contains("; IPv6 clients counted per /48"),
        "{}",
        stdout(&o)
    );
    let o = run(
        dir.path(),
        &["policy", "explain", "p.txt", "--ip", "2001:db8:1:2::9"],
    );
    assert!(
        stdout(&o).starts_with("client 2001:db8:1:2::9 (counted as 2001:db8:1::/48) host -"),
        "{}",
        stdout(&o)
    );
    let dir = dir_with(&[("p.txt", "CHECK_CONN_RATE YES\nIPv6Prefix 129\n")]);
    let o = run(dir.path(), &["policy", "check", "p.txt"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).starts_with("p.txt:2:12: expected an IPv6 prefix length from 1 to 128"),
        "{}",
        stdout(&o)
    );
}
