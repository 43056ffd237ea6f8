//! Prometheus metrics. The code records through the `metrics` facade
//! (a no-op until a recorder is installed, as in tests that run nodes in
//! process); [`serve`] installs the Prometheus recorder and answers
//! `GET /metrics` on its own port, and a node's live dashboard beside it
//! ([`crate::dashboard`]).
//!
//! What is measured, and where:
//! - `relayrate_decisions_total{event,verdict,check}`: the Limiter service;
//! - `relayrate_decision_seconds`: one Decide call, as its caller waits;
//! - `relayrate_batch_events`: events per log entry (the batcher);
//! - `relayrate_near_limit_total{check}`: counts that reached 80% of their
//!   limit (the engine counts; [`watch_node`] copies);
//! - `relayrate_unusual_keys{check}`: keys unusual now against their own
//!   baseline, and `relayrate_baselines`: baselines kept ([`watch_node`]);
//! - `relayrate_abandoned_events_total`: events a node dropped because
//!   every caller of their batch had given up (the batcher);
//! - `relayrate_milter_fallbacks_total{mode}`,
//!   `relayrate_milter_refusals_total{check,stage,dry_run}`,
//!   `relayrate_milter_connections`,
//!   `relayrate_milter_connections_cut_total{reason}` and
//!   `relayrate_milter_accept_errors_total`: the milter;
//! - `relayrate_raft_*`: term, leader, log, commit, apply and snapshot
//!   indexes, apply lag, members, whether the core stopped
//!   ([`watch_node`]); `relayrate_ready`, `relayrate_policy_differs`,
//!   `relayrate_data_dir_writable`;
//! - where a write's time goes: `relayrate_raft_write_seconds{command}` (a
//!   log write at the leader, until applied), `relayrate_forward_seconds
//!   {proposal}` (a follower waiting for the leader),
//!   `relayrate_append_entries_seconds{kind}` (the leader's AppendEntries
//!   round trips, with entries or empty), `relayrate_log_flush_seconds` and
//!   `relayrate_log_flush_appends` (one group flush of the log).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::check::Check;
use crate::dashboard::Dashboard;
use crate::engine::{Event, Verdict};
use crate::node::Node;

/// Buckets of the decision latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Buckets of the batch size histogram, in events.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0, 1024.0, 2048.0];

/// Installs the Prometheus recorder for this process and serves it on
/// `listen` until the process ends, with the live dashboard at `/` when
/// given one; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    dashboard: Option<Arc<Dashboard>>,
) -> std::io::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("relayrate_batch_events".into()),
                &BATCH_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("relayrate_log_flush_appends".into()),
                &BATCH_BUCKETS,
            )
        })
        .map_err(std::io::Error::other)?
        .install_recorder()
        .map_err(std::io::Error::other)?;
    describe();
    zero_known_series();
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(http(listener, handle, dashboard));
    Ok(addr)
}

async fn http(listener: TcpListener, handle: PrometheusHandle, dashboard: Option<Arc<Dashboard>>) {
    use axum::routing::get;
    let render = move || {
        let handle = handle.clone();
        async move { handle.render() }
    };
    let mut app = axum::Router::new().route("/metrics", get(render));
    if let Some(dashboard) = dashboard {
        tokio::spawn(crate::dashboard::sample_history());
        app = app.merge(crate::dashboard::router(dashboard));
    }
    // The dashboard's API asks who is calling (loopback or not).
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

/// Puts every counter and gauge the README lists at zero, with the label
/// values it can take, so that a dashboard or an alert finds the series
/// from the start: an absent series reads as "no data", not as 0.
fn zero_known_series() {
    use crate::milter::guard::Cut;
    for event in ["connect", "recheck", "mail", "rcpt", "give_back", "close"] {
        counter!("relayrate_decisions_total", "event" => event, "verdict" => "allow", "check" => "none")
            .increment(0);
    }
    for check in Check::ALL {
        counter!("relayrate_near_limit_total", "check" => check.name()).increment(0);
        if check.measure() == crate::check::Measure::Window {
            gauge!("relayrate_unusual_keys", "check" => check.name()).set(0.0);
        }
        for stage in milter_stages(check) {
            for dry_run in [false, true] {
                counter!(
                    "relayrate_milter_refusals_total",
                    "check" => check.name(),
                    "stage" => *stage,
                    "dry_run" => dry_run_label(dry_run)
                )
                .increment(0);
            }
        }
    }
    for mode in ["local", "open", "tempfail"] {
        counter!("relayrate_milter_fallbacks_total", "mode" => mode).increment(0);
    }
    for cut in Cut::ALL {
        counter!("relayrate_milter_connections_cut_total", "reason" => cut.name()).increment(0);
    }
    for method in ["append_entries", "vote", "install_snapshot", "propose"] {
        counter!("relayrate_peer_refusals_total", "method" => method).increment(0);
    }
    counter!("relayrate_abandoned_events_total").increment(0);
    counter!("relayrate_milter_accept_errors_total").increment(0);
    gauge!("relayrate_milter_connections").set(0.0);
    // Not `relayrate_ready`: a node sets it as it starts, and a milter
    // alone has no node (a 0 there would read as a node not ready).
}

/// The SMTP stages at which the milter may refuse for `check`
/// (`docs/policy.md` §1, "checked at").
fn milter_stages(check: Check) -> &'static [&'static str] {
    match check {
        Check::ConnRate | Check::ConnOpen => &["connect", "helo", "rcpt"],
        Check::MsgRate | Check::MaxMsgs | Check::MsgRateFrom | Check::MsgRateAuth => &["mail"],
        _ => &["rcpt"],
    }
}

/// The one spelling of a dry run in labels, as in the refusal log's
/// `dry_run` field: `true` or `false`.
fn dry_run_label(dry_run: bool) -> &'static str {
    if dry_run {
        "true"
    } else {
        "false"
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "relayrate_peer_refusals_total",
        "Calls to the peer listener refused (no valid proof of membership, or not a member), by method"
    );
    describe_counter!(
        "relayrate_decisions_total",
        "Events decided by this node, by event, verdict and refusing check"
    );
    describe_histogram!(
        "relayrate_decision_seconds",
        Unit::Seconds,
        "Time to answer one Decide call (a batch of a session's events)"
    );
    describe_histogram!(
        "relayrate_batch_events",
        "Events in one log entry written by this node"
    );
    describe_counter!(
        "relayrate_near_limit_total",
        "Times a key's count reached 80% of its limit, cluster-wide"
    );
    describe_gauge!(
        "relayrate_unusual_keys",
        "Keys whose count in a bucket stands well above their own baseline now, by check"
    );
    describe_gauge!(
        "relayrate_baselines",
        "(check, key) baselines of usual activity kept in memory"
    );
    describe_counter!(
        "relayrate_abandoned_events_total",
        "Events dropped unanswered: every caller gave up before the cluster answered"
    );
    describe_counter!(
        "relayrate_milter_fallbacks_total",
        "Milter calls the node did not answer in time, by fail mode"
    );
    describe_counter!(
        "relayrate_milter_refusals_total",
        "Refusals the milter gave (or, in a dry run, would have given)"
    );
    describe_gauge!(
        "relayrate_milter_connections",
        "MTA connections open to the milter"
    );
    describe_counter!(
        "relayrate_milter_connections_cut_total",
        "MTA connections the milter closed, by reason: a deadline missed, a packet too large, room made at the cap"
    );
    describe_counter!(
        "relayrate_milter_accept_errors_total",
        "Failed accepts on the milter's socket (retried)"
    );
    describe_histogram!(
        "relayrate_raft_write_seconds",
        Unit::Seconds,
        "A log write at the leader, from proposal until applied, by command"
    );
    describe_histogram!(
        "relayrate_forward_seconds",
        Unit::Seconds,
        "A proposal forwarded to the leader, until its answer, by proposal"
    );
    describe_histogram!(
        "relayrate_append_entries_seconds",
        Unit::Seconds,
        "AppendEntries round trips from this leader, with entries or empty"
    );
    describe_histogram!(
        "relayrate_log_flush_seconds",
        Unit::Seconds,
        "One flush of the log to disk (group commit)"
    );
    describe_histogram!(
        "relayrate_log_flush_appends",
        "Log appends made durable by one flush"
    );
    describe_gauge!("relayrate_raft_term", "Current Raft term");
    describe_gauge!("relayrate_raft_leader_id", "Leader's node id, 0 if none");
    describe_gauge!("relayrate_raft_is_leader", "1 on the leader");
    describe_gauge!(
        "relayrate_raft_last_log_index",
        "Last log index on this node"
    );
    describe_gauge!(
        "relayrate_raft_commit_index",
        "Highest index a quorum holds (only the leader knows it)"
    );
    describe_gauge!("relayrate_raft_applied_index", "Last applied log index");
    describe_gauge!(
        "relayrate_raft_snapshot_index",
        "Last log index of this node's snapshot (built or installed), 0 if none"
    );
    describe_gauge!(
        "relayrate_raft_apply_lag",
        "Log entries held but not yet applied"
    );
    describe_gauge!("relayrate_raft_members", "Members of the cluster");
    describe_gauge!("relayrate_counters", "Windowed counters kept");
    describe_gauge!("relayrate_leases", "Open-connection leases held");
    describe_gauge!("relayrate_ready", "1 when this node decides events");
    describe_gauge!(
        "relayrate_raft_stopped",
        "1 once this node's Raft core stopped (a storage error, such as a full disk)"
    );
    describe_gauge!(
        "relayrate_data_dir_writable",
        "0 while the node waits for room in its data dir to start"
    );
    describe_gauge!(
        "relayrate_policy_differs",
        "1 when this node's --policy is not the cluster's policy in force"
    );
    describe_gauge!(
        "relayrate_clock_offset_seconds",
        Unit::Seconds,
        "How far this host's wall clock is ahead of the cluster's time (negative: behind)"
    );
}

/// How far this host's wall clock is ahead of the cluster's time, in ms.
pub fn set_clock_offset(offset_ms: i64) {
    gauge!("relayrate_clock_offset_seconds").set(offset_ms as f64 / 1000.0);
}

pub fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Connect { .. } => "connect",
        Event::Recheck { .. } => "recheck",
        Event::Mail { .. } => "mail",
        Event::Rcpt { .. } => "rcpt",
        Event::GiveBack { .. } => "give_back",
        Event::Close { .. } => "close",
    }
}

/// Counts a Decide call's events by verdict, and its latency.
pub fn record_decisions(kinds: &[&'static str], verdicts: &[Verdict], elapsed: Duration) {
    histogram!("relayrate_decision_seconds").record(elapsed.as_secs_f64());
    let refused = verdicts.iter().filter(|v| v.refusal().is_some()).count() as u64;
    crate::dashboard::history::count_decisions(verdicts.len() as u64 - refused, refused);
    for (kind, verdict) in kinds.iter().zip(verdicts) {
        let (verdict, check) = match verdict.refusal() {
            None => ("allow", "none"),
            Some(r) => ("refuse", r.check.name()),
        };
        counter!(
            "relayrate_decisions_total",
            "event" => *kind,
            "verdict" => verdict,
            "check" => check
        )
        .increment(1);
    }
}

pub fn record_batch(events: usize) {
    histogram!("relayrate_batch_events").record(events as f64);
}

pub fn record_raft_write(command: &'static str, elapsed: Duration) {
    histogram!("relayrate_raft_write_seconds", "command" => command).record(elapsed.as_secs_f64());
}

pub fn record_forward(proposal: &'static str, elapsed: Duration) {
    histogram!("relayrate_forward_seconds", "proposal" => proposal).record(elapsed.as_secs_f64());
}

/// One AppendEntries round trip; `with_entries` false for the empty ones
/// (heartbeats, commit notices, leadership checks).
pub fn record_append_entries(with_entries: bool, elapsed: Duration) {
    let kind = if with_entries { "entries" } else { "empty" };
    histogram!("relayrate_append_entries_seconds", "kind" => kind).record(elapsed.as_secs_f64());
}

pub fn record_log_flush(appends: usize, elapsed: Duration) {
    histogram!("relayrate_log_flush_seconds").record(elapsed.as_secs_f64());
    histogram!("relayrate_log_flush_appends").record(appends as f64);
}

/// Whether the node can write its data dir (0 while it waits for room
/// to start).
pub fn set_data_dir_writable(writable: bool) {
    gauge!("relayrate_data_dir_writable").set(if writable { 1.0 } else { 0.0 });
}

/// A call to the peer listener refused: no valid proof, or not a member.
pub fn record_peer_refusal(method: &'static str) {
    counter!("relayrate_peer_refusals_total", "method" => method).increment(1);
}

pub fn record_abandoned(events: usize) {
    counter!("relayrate_abandoned_events_total").increment(events as u64);
}

pub fn record_fallback(mode: &'static str) {
    counter!("relayrate_milter_fallbacks_total", "mode" => mode).increment(1);
}

pub fn set_milter_connections(open: usize) {
    gauge!("relayrate_milter_connections").set(open as f64);
}

pub fn record_milter_cut(reason: &'static str) {
    counter!("relayrate_milter_connections_cut_total", "reason" => reason).increment(1);
}

pub fn record_milter_accept_error() {
    counter!("relayrate_milter_accept_errors_total").increment(1);
}

pub fn record_milter_refusal(check: Check, stage: &'static str, dry_run: bool) {
    counter!(
        "relayrate_milter_refusals_total",
        "check" => check.name(),
        "stage" => stage,
        "dry_run" => dry_run_label(dry_run)
    )
    .increment(1);
}

/// Copies the node's Raft figures and state sizes into gauges, every
/// `every`, until the task is dropped.
pub async fn watch_node(node: Arc<Node>, every: Duration) {
    loop {
        record_node(&node);
        tokio::time::sleep(every).await;
    }
}

fn record_node(node: &Node) {
    {
        let metrics = node.raft.metrics();
        let m = metrics.borrow();
        let last = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        let leading = m.current_leader == Some(node.id);
        gauge!("relayrate_raft_term").set(m.current_term as f64);
        gauge!("relayrate_raft_leader_id").set(m.current_leader.unwrap_or(0) as f64);
        gauge!("relayrate_raft_is_leader").set(if leading { 1.0 } else { 0.0 });
        gauge!("relayrate_raft_last_log_index").set(last as f64);
        gauge!("relayrate_raft_applied_index").set(applied as f64);
        gauge!("relayrate_raft_snapshot_index").set(m.snapshot.map_or(0, |l| l.index) as f64);
        gauge!("relayrate_raft_apply_lag").set(last.saturating_sub(applied) as f64);
        let membership = m.membership_config.membership();
        gauge!("relayrate_raft_members").set(membership.nodes().count() as f64);
        if let (true, Some(replication)) = (leading, &m.replication) {
            // The commit index: the highest index a majority of voters hold.
            let mut held: Vec<u64> = membership
                .voter_ids()
                .map(|id| match id == node.id {
                    true => last,
                    false => replication
                        .get(&id)
                        .copied()
                        .flatten()
                        .map_or(0, |l| l.index),
                })
                .collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            if let Some(commit) = held.get(held.len() / 2) {
                gauge!("relayrate_raft_commit_index").set(*commit as f64);
            }
        }
    }
    gauge!("relayrate_ready").set(if node.is_ready() { 1.0 } else { 0.0 });
    let stopped = node.raft_stopped().is_some();
    gauge!("relayrate_raft_stopped").set(if stopped { 1.0 } else { 0.0 });
    let differs = node.is_ready() && node.policy_differs().is_some();
    gauge!("relayrate_policy_differs").set(if differs { 1.0 } else { 0.0 });
    let state = node.state().read().expect("state lock");
    let engine = state.engine();
    gauge!("relayrate_counters").set(engine.counters_len() as f64);
    gauge!("relayrate_leases").set(engine.leases_len() as f64);
    for (check, n) in Check::ALL.iter().zip(engine.near_limit_crossings()) {
        counter!("relayrate_near_limit_total", "check" => check.name()).absolute(n);
    }
    gauge!("relayrate_baselines").set(engine.baselines_len() as f64);
    for (check, n) in Check::ALL.iter().zip(engine.unusual_counts()) {
        if check.measure() == crate::check::Measure::Window {
            gauge!("relayrate_unusual_keys", "check" => check.name()).set(n as f64);
        }
    }
}
