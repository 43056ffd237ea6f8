//! A test that cannot run here says so: at once, on the terminal of a
//! plain `cargo test` (not only under `--nocapture`), and in one summary
//! line when its test binary ends; as a non-root user it skips instead of
//! failing on `chown`. Each case runs this file's own binary again, on
//! `probe_a_postfix_test`, in the situation it names.

mod common;

use std::process::{Command, Output};

use common::{postfix_available, Postfix, Sink};

/// Stands for every Postfix test: skips when it cannot run, else starts
/// a throwaway Postfix (which chowns its directories) and sees it answer.
#[tokio::test]
async fn probe_a_postfix_test() {
    if !postfix_available("probe_a_postfix_test") {
        return;
    }
    let root = common::temp_root();
    let sink = Sink::start(root.path());
    let pf = Postfix::start(root.path(), "probe", "inet:127.0.0.1:9", sink.port);
    pf.wait_ready().await;
}

/// This binary run on the probe alone, as `env` and `wrap` set it up.
fn probe(env: &[(&str, &str)], wrap: &[&str]) -> Output {
    let me = std::env::current_exe().unwrap();
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&me);
            c
        }
        None => Command::new(&me),
    };
    cmd.args(["--exact", "probe_a_postfix_test", "--test-threads", "1"])
        .env_remove("RELAYRATE_REQUIRE_MTA")
        .env_remove("RELAYRATE_TEST_SBIN")
        .envs(env.iter().copied());
    cmd.output().unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn without_postfix_a_test_skips_loudly_and_the_binary_sums_up() {
    let empty = tempfile::tempdir().unwrap();
    let sbin = empty.path().to_str().unwrap();
    let out = probe(&[("RELAYRATE_TEST_SBIN", sbin)], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(
            "SKIPPED probe_a_postfix_test: Postfix is not installed (apt-get install postfix)"
        ),
        "the skip, as it happens: {stderr}"
    );
    // The summary comes after libtest's own report.
    let report = stdout.find("test result: ok").expect("libtest's report");
    assert!(report > 0);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("SKIPPED 1 test(s) of ")
            && last.ends_with(
                ": Postfix is not installed (apt-get install postfix) (probe_a_postfix_test)"
            ),
        "the summary, last: {stderr}"
    );
}

#[test]
fn without_postfix_and_required_the_test_fails() {
    let empty = tempfile::tempdir().unwrap();
    let sbin = empty.path().to_str().unwrap();
    let out = probe(
        &[
            ("RELAYRATE_TEST_SBIN", sbin),
            ("RELAYRATE_REQUIRE_MTA", "1"),
        ],
        &[],
    );
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("RELAYRATE_REQUIRE_MTA=1 forbids skipping"),
        "{stdout}{stderr}"
    );
}

/// As user nobody (when we are root to become it): a skip, not a panic
/// on `chown`.
#[test]
fn as_a_user_other_than_root_a_postfix_test_skips() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(
            "as_a_user_other_than_root_a_postfix_test_skips",
            "not root (it runs the probe as user nobody)",
        );
        return;
    }
    if !postfix_available("as_a_user_other_than_root_a_postfix_test_skips") {
        return;
    }
    let out = probe(
        &[],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("SKIPPED probe_a_postfix_test: not root"),
        "{stderr}"
    );
    assert!(stderr
        .lines()
        .last()
        .unwrap_or_default()
        .starts_with("SKIPPED 1 test(s)"));
}
