//! `--log-format json`: every log line is one JSON object with the
//! level, the target and the fields, for log collectors.

mod common;

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
