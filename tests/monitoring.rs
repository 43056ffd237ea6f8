//! deploy/monitoring: the alert rules pass `promtool check rules`, and
//! every metric the rules and the Grafana dashboard name is served by a
//! running node (a rule on a misspelt metric never fires).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{scrape, skip, Relayrate};
use relayrate::convert::event_to_pb;
use relayrate::engine::{ConnId, Event};
use relayrate::policy::Client;
use relayrate::proto::v1::limiter_client::LimiterClient;
use relayrate::proto::v1::DecideRequest;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/monitoring/alerts.yaml");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/monitoring/grafana-dashboard.json"
);

/// `program` on PATH, if there.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Some(promtool) = on_path("promtool") else {
        skip(
            "promtool_accepts_the_alert_rules",
            "promtool is not installed (apt-get install prometheus)",
        );
        return;
    };
    let out = Command::new(promtool)
        .args(["check", "rules", RULES])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `relayrate_*` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("relayrate_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The PromQL expressions of the alert rules and of the dashboard's panels
/// (not their titles or descriptions).
fn expressions() -> Vec<(String, String)> {
    let rules: serde_json::Value =
        yaml_serde::from_str(&std::fs::read_to_string(RULES).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_string();
            exprs.push((name, rule["expr"].as_str().unwrap().to_string()));
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let name = format!("panel {}", panel["title"].as_str().unwrap());
            exprs.push((name, target["expr"].as_str().unwrap().to_string()));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            exprs.push((format!("variable {}", var["name"]), q.to_string()));
        }
    }
    exprs
}

/// The sample names `/metrics` serves (histograms as `_bucket`, `_sum`,
/// `_count`, as PromQL names them).
fn served(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("relayrate_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn connect(ip: &str, conn: u64) -> Event {
    Event::Connect {
        conn: ConnId { owner: 0, conn },
        client: Client::from_ip(ip.parse().unwrap()),
    }
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_name_is_served() {
    let exprs = expressions();
    let named: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    // What the issue asks the rules to watch, by name.
    for must in [
        "relayrate_milter_refusals_total",
        "relayrate_milter_fallbacks_total",
        "relayrate_raft_leader_id",
        "relayrate_raft_apply_lag",
        "relayrate_raft_applied_index",
        "relayrate_ready",
        "relayrate_raft_stopped",
        "relayrate_clock_offset_seconds",
        "relayrate_unusual_keys",
    ] {
        assert!(named.contains(must), "no rule or panel uses {must}");
    }

    let root = tempfile::tempdir().unwrap();
    let relay = Relayrate::run(
        root.path(),
        "mon",
        "CHECK_CONN_RATE YES\nConnRate:default 2\n",
    );
    relay.wait_ready().await;
    // Traffic, so that the histograms have their first observations: 3
    // connects of one address with a limit of 2.
    let mut limiter = LimiterClient::connect(format!("http://{}", relay.node))
        .await
        .unwrap();
    for conn in 1..=3 {
        let events = vec![
            event_to_pb(&connect("10.77.0.1", conn)),
            event_to_pb(&Event::Close {
                conn: ConnId { owner: 0, conn },
            }),
        ];
        limiter.decide(DecideRequest { events }).await.unwrap();
    }

    let missing = |text: &str| {
        let served = served(text);
        let mut missing: Vec<String> = named
            .iter()
            .filter(|n| !served.contains(*n))
            // Counted by the unusual-activity detection (issue 16 item 1),
            // which is not in this branch yet: required once it serves it.
            .filter(|n| *n != "relayrate_unusual_keys" || text.contains("relayrate_unusual_keys"))
            .cloned()
            .collect();
        missing.sort();
        missing
    };
    // Gauges are copied every second: wait for them, with a deadline.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = scrape(relay.metrics_port).await;
        if missing(&text).is_empty() || std::time::Instant::now() > until {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing = missing(&text);
    let users: Vec<String> = exprs
        .iter()
        .filter(|(_, e)| missing.iter().any(|m| metric_names(e).contains(m)))
        .map(|(n, _)| n.clone())
        .collect();
    assert!(
        missing.is_empty(),
        "named but not served: {missing:?} (by {users:?})\n{text}"
    );
}
