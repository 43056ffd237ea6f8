//! The live dashboard on the metrics port, in a real headless browser
//! (Debian's chromium): it loads with no console error and shows a key
//! driven over its limit and the latest refusal, with the clients' text
//! as text, never as markup. Its API honours the admin token.

mod common;

use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{skip, Relayrate};
use indymilter_test::{Status, TestConnection};
use relayrate::convert::event_to_pb;
use relayrate::engine::{ConnId, Event};
use relayrate::policy::Client;
use relayrate::proto::v1::limiter_client::LimiterClient;
use relayrate::proto::v1::DecideRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A sender that is markup, as a client may choose it.
const EVIL_SENDER: &str = "\"<img src=x onerror=alert(1)>\"@evil.example";

/// `program` on PATH, if there.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// GET `path` on the metrics port: the status code and the body.
async fn get(port: u16, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    let code = reply[9..12].parse().unwrap();
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_string())
}

fn connect(ip: &str, conn: u64) -> Event {
    Event::Connect {
        conn: ConnId { owner: 0, conn },
        client: Client::from_ip(ip.parse().unwrap()),
    }
}

/// Where the screenshot is kept: the target dir, beside `tmp`.
fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("dashboard.png")
}

/// Runs headless chromium on `url` with `args`; its stdout and stderr.
fn chromium(browser: &Path, profile: &Path, url: &str, args: &[&str]) -> (String, String) {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--enable-logging=stderr",
            "--v=0",
            // Lets the page's fetches and first refresh run before the
            // dump or the screenshot.
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Console messages and uncaught errors chromium logged for the page.
fn console_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_key_over_its_limit_and_the_latest_refusal() {
    let test = "the_page_shows_a_key_over_its_limit_and_the_latest_refusal";
    let Some(browser) = on_path("chromium") else {
        skip(test, "chromium is not installed (apt-get install chromium)");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let policy = "CHECK_CONN_RATE YES\nConnRate:default 2\n\
                  CHECK_MSG_RATE YES\nMsgRateFrom:default 1\n";
    let relay = Relayrate::run(root.path(), "dash", policy);
    relay.wait_ready().await;

    // 10.88.0.1 over its limit: 4 connects, a limit of 2.
    let mut limiter = LimiterClient::connect(format!("http://{}", relay.node))
        .await
        .unwrap();
    for conn in 1..=4 {
        let events = vec![
            event_to_pb(&connect("10.88.0.1", conn)),
            event_to_pb(&Event::Close {
                conn: ConnId { owner: 0, conn },
            }),
        ];
        limiter.decide(DecideRequest { events }).await.unwrap();
    }
    // The milter refuses a second message of the evil sender while the
    // first one holds its slot.
    let milter: SocketAddr = format!("127.0.0.1:{}", relay.milter_port).parse().unwrap();
    let client: IpAddr = "10.88.0.2".parse().unwrap();
    let mut first = TestConnection::open(milter).await.unwrap();
    first.connect("web.example", (client, 40000)).await.unwrap();
    let sender = format!("<{EVIL_SENDER}>");
    assert_eq!(
        first.mail([sender.as_str()]).await.unwrap(),
        Status::Continue
    );
    let mut second = TestConnection::open(milter).await.unwrap();
    second
        .connect("web.example", (client, 40001))
        .await
        .unwrap();
    let status = second.mail([sender.as_str()]).await.unwrap();
    assert!(matches!(status, Status::Tempfail { .. }), "{status:?}");

    let url = format!("http://127.0.0.1:{}/", relay.metrics_port);
    let profile = root.path().join("chromium");
    let (dom, stderr) = chromium(&browser, &profile, &url, &["--dump-dom"]);
    // The script ran, and every part loaded (a failed part, or an
    // exception in showing it, is written in #problem).
    assert!(dom.contains("updated "), "never refreshed:\n{dom}");
    assert!(
        dom.contains("<p id=\"problem\" hidden=\"\"></p>"),
        "a problem shown:\n{dom}"
    );
    assert!(dom.contains("10.88.0.1"), "the key over its limit:\n{dom}");
    assert!(dom.contains("ConnRate"), "{dom}");
    // The unusual keys' table was filled (a row, a key or "no unusual key").
    let unusual = dom
        .split("<table id=\"unusual\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_default();
    assert!(unusual.contains("<tbody><tr>"), "the unusual keys:\n{dom}");
    // The refusal, with the sender as text: escaped in the DOM, and no
    // element made of it.
    assert!(
        dom.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "the evil sender as text:\n{dom}"
    );
    assert!(!dom.contains("<img"), "markup from a client:\n{dom}");
    assert!(dom.contains("MsgRateFrom"), "{dom}");
    // The cluster and the policy in force.
    assert!(dom.contains("1 (leader)"), "{dom}");
    assert!(dom.contains("MsgRateFrom:default 1"), "the policy:\n{dom}");
    let console = console_lines(&stderr);
    assert!(console.is_empty(), "console: {console:#?}");

    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    let (_, stderr) = chromium(
        &browser,
        &profile,
        &url,
        &[
            "--window-size=1280,1400",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let console = console_lines(&stderr);
    assert!(console.is_empty(), "console: {console:#?}");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "no screenshot at {shot:?}");
    drop((first, second));
}

#[tokio::test]
async fn the_api_needs_the_admin_token_when_the_node_has_one() {
    let root = tempfile::tempdir().unwrap();
    let token_file = root.path().join("token");
    std::fs::write(&token_file, "s3cret-token-of-the-admin\n").unwrap();
    let args = [OsStr::new("--admin-token-file"), token_file.as_os_str()];
    let relay = Relayrate::run_with(root.path(), "tok", "CHECK_CONN_RATE YES\n", &args);
    relay.wait_ready().await;
    let port = relay.metrics_port;

    // The page itself holds no data: served to anyone.
    let (code, page) = get(port, "/", "").await;
    assert_eq!(code, 200);
    assert!(page.contains("dashboard.js"), "{page}");
    for path in [
        "/api/status",
        "/api/policy",
        "/api/top",
        "/api/history",
        "/api/refusals",
    ] {
        assert_eq!(get(port, path, "").await.0, 401, "{path} without a token");
        let wrong = "Authorization: Bearer s3cret-token-of-the-admiN\r\n";
        assert_eq!(get(port, path, wrong).await.0, 401, "{path}, wrong token");
        let right = "Authorization: Bearer s3cret-token-of-the-admin\r\n";
        let (code, body) = get(port, path, right).await;
        assert_eq!(code, 200, "{path}: {body}");
        let _: serde_json::Value = serde_json::from_str(&body).unwrap();
    }
    let right = "Authorization: Bearer s3cret-token-of-the-admin\r\n";
    let status: serde_json::Value =
        serde_json::from_str(&get(port, "/api/status", right).await.1).unwrap();
    assert_eq!(status["role"], "leader", "{status}");
    assert_eq!(status["ready"], true, "{status}");
    // /metrics is Prometheus's, as before.
    assert_eq!(get(port, "/metrics", "").await.0, 200);

    // In a browser, the page asks for the token and shows no data.
    let Some(browser) = on_path("chromium") else {
        skip(
            "the_api_needs_the_admin_token_when_the_node_has_one",
            "chromium is not installed (apt-get install chromium)",
        );
        return;
    };
    let url = format!("http://127.0.0.1:{port}/");
    let profile = root.path().join("chromium");
    let (dom, stderr) = chromium(&browser, &profile, &url, &["--dump-dom"]);
    assert!(
        dom.contains("<form id=\"login\">"),
        "the token asked:\n{dom}"
    );
    assert!(!dom.contains("leader"), "data without the token:\n{dom}");
    let console = console_lines(&stderr);
    assert!(console.is_empty(), "console: {console:#?}");
}

/// A CA and a certificate for 127.0.0.1 it signed, as PEM files in `dir`:
/// (certificate, key, CA).
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&paths.0, cert.pem()).unwrap();
    std::fs::write(&paths.1, key.serialize_pem()).unwrap();
    std::fs::write(&paths.2, ca_cert.pem()).unwrap();
    paths
}

/// A node whose gRPC reads need a client certificate does not hand them
/// out over the plain metrics port to anyone: without an admin token its
/// API refuses; with one, the token opens it.
#[tokio::test]
async fn a_tls_node_serves_its_data_only_with_the_admin_token() {
    let root = tempfile::tempdir().unwrap();
    let (cert, key, ca) = make_certs(root.path());
    let tls: Vec<&OsStr> = vec![
        "--tls-cert".as_ref(),
        cert.as_os_str(),
        "--tls-key".as_ref(),
        key.as_os_str(),
        "--tls-client-ca".as_ref(),
        ca.as_os_str(),
    ];
    let policy = "CHECK_CONN_RATE YES\n";
    let open = Relayrate::run_with(root.path(), "tls", policy, &tls);
    open.wait_ready().await;
    for path in [
        "/api/status",
        "/api/policy",
        "/api/top",
        "/api/history",
        "/api/refusals",
    ] {
        let (code, body) = get(open.metrics_port, path, "").await;
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("admin token"), "{body}");
    }
    assert_eq!(get(open.metrics_port, "/", "").await.0, 200);
    drop(open);

    let token_file = root.path().join("token");
    std::fs::write(&token_file, "tls-node-admin-token\n").unwrap();
    let mut args = tls.clone();
    args.extend(["--admin-token-file".as_ref(), token_file.as_os_str()]);
    let guarded = Relayrate::run_with(root.path(), "tls-token", policy, &args);
    guarded.wait_ready().await;
    let port = guarded.metrics_port;
    assert_eq!(get(port, "/api/status", "").await.0, 401);
    let right = "Authorization: Bearer tls-node-admin-token\r\n";
    let (code, body) = get(port, "/api/status", right).await;
    assert_eq!(code, 200, "{body}");
    let _ = Duration::ZERO;
}
