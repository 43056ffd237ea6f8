//! `relayrate replay` and `relayrate suggest`: mail logs read back
//! (`relayrate::history`) and what a policy would have done with them.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use relayrate::history::replay::{KeyReport, Replay, RETRY_MODEL};
use relayrate::history::stamp::time_text;
use relayrate::history::suggest::Suggest;
use relayrate::history::{read_logs_with_progress, ReadOptions, ReadStats};

/// Reads the logs, with a progress line on stderr when it is a terminal.
fn read(
    logs: &[PathBuf],
    year: Option<i32>,
    sink: impl FnMut(&relayrate::history::LogEvent),
) -> std::io::Result<ReadStats> {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let result = read_logs_with_progress(logs, &ReadOptions { year }, sink, |path, lines| {
        if terminal {
            print_err(&format!(
                "\r{} lines read, now {}",
                lines,
                Escaped(path.display())
            ));
        }
    });
    if terminal {
        print_err("\r\x1b[K");
    }
    result
}
use relayrate::terminal::{escape_json, print_err, print_out, Escaped};

/// Says on stderr what could not be read; `false` if the logs could not
/// be read at all.
fn report_read(result: &std::io::Result<ReadStats>) -> bool {
    match result {
        Err(e) => {
            print_err(&format!("cannot read the mail logs: {}\n", Escaped(e)));
            false
        }
        Ok(stats) => {
            for m in &stats.malformed {
                print_err(&format!("{}\n", Escaped(m)));
            }
            let more = stats.malformed_count - stats.malformed.len() as u64;
            if more > 0 {
                print_err(&format!(
                    "... and {more} more lines that could not be read\n"
                ));
            }
            true
        }
    }
}

pub fn replay(policy: &[PathBuf], logs: &[PathBuf], year: Option<i32>, json: bool) -> ExitCode {
    let Some(policy) = super::load_policy(policy) else {
        return ExitCode::from(super::EXIT_CONFIG);
    };
    let mut replay = Replay::new(Arc::new(policy));
    let read = read(logs, year, |e| replay.apply(e));
    if !report_read(&read) {
        return ExitCode::FAILURE;
    }
    let stats = read.expect("checked above");
    let mut keys: Vec<(&str, String, &KeyReport)> = Vec::new();
    keys.extend(
        replay
            .clients
            .iter()
            .map(|(ip, r)| ("client", replay.client_text(*ip), r)),
    );
    keys.extend(
        replay
            .senders
            .iter()
            .map(|(s, r)| ("sender", s.to_string(), r)),
    );
    keys.extend(replay.auths.iter().map(|(a, r)| ("auth", a.to_string(), r)));
    keys.retain(|(_, _, r)| !r.checks.is_empty());
    keys.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    if json {
        let totals: serde_json::Map<String, serde_json::Value> = replay
            .totals()
            .into_iter()
            .map(|(c, conns, msgs, rcpts)| {
                (
                    c.name().to_string(),
                    serde_json::json!({"connections": conns, "messages": msgs, "recipients": rcpts}),
                )
            })
            .collect();
        let keys: Vec<serde_json::Value> = keys
            .iter()
            .map(|(kind, key, r)| {
                serde_json::json!({
                    "kind": kind, "key": key, "windows": r.windows,
                    "delayed_windows": r.delayed_windows, "checks": r.checks,
                })
            })
            .collect();
        let out = serde_json::json!({
            "lines": stats.lines, "skipped": stats.skipped,
            "malformed": stats.malformed_count, "evicted": stats.evicted,
            "first": stats.first, "last": stats.last,
            "untracked_keys": replay.untracked_keys,
            "retry_model": RETRY_MODEL,
            "totals": totals, "keys": keys,
        });
        let text = serde_json::to_string_pretty(&out).expect("plain data");
        print_out(&format!("{}\n", escape_json(&text)));
        return ExitCode::SUCCESS;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} lines ({} skipped, {} not readable), {} to {}",
        stats.lines,
        stats.skipped,
        stats.malformed_count,
        stats.first.map_or("-".into(), time_text),
        stats.last.map_or("-".into(), time_text),
    );
    let _ = writeln!(out, "retry model: {RETRY_MODEL}");
    let _ = writeln!(out, "\nrefused, by check:");
    let _ = writeln!(
        out,
        "{:<13} {:>11} {:>9} {:>10}",
        "check", "connections", "messages", "recipients"
    );
    let totals = replay.totals();
    if totals.is_empty() {
        let _ = writeln!(out, "(nothing)");
    }
    for (c, conns, msgs, rcpts) in totals {
        let _ = writeln!(out, "{:<13} {conns:>11} {msgs:>9} {rcpts:>10}", c.name());
    }
    let _ = writeln!(out, "\nrefused, by key:");
    let _ = writeln!(
        out,
        "{:<7} {:<32} {:<13} {:>5} {:>5} {:>5} {:<20} {:<20} {:>8} {:>8} {:>8}",
        "kind",
        "key",
        "check",
        "conns",
        "msgs",
        "rcpts",
        "first",
        "last",
        "wait_max",
        "wait_avg",
        "delayed"
    );
    for (kind, key, r) in &keys {
        for (check, c) in &r.checks {
            // Waits are of delayed messages; a refused connection that
            // carried none has no wait to show.
            let wait = |secs: Option<u64>| secs.map_or("-".to_string(), |s| format!("{s}s"));
            let max = wait((c.waits > 0).then_some(c.wait_max));
            let avg = wait(c.wait_total.checked_div(c.waits));
            let _ = writeln!(
                out,
                "{:<7} {:<32} {:<13} {:>5} {:>5} {:>5} {:<20} {:<20} {:>8} {:>8} {:>4}/{}",
                kind,
                Escaped(key).to_string(),
                check,
                c.connections,
                c.messages,
                c.recipients,
                time_text(c.first),
                time_text(c.last),
                max,
                avg,
                r.delayed_windows,
                r.windows,
            );
        }
    }
    if replay.untracked_keys > 0 {
        let _ = writeln!(
            out,
            "({} events of keys past the bound not followed)",
            replay.untracked_keys
        );
    }
    print_out(&out);
    ExitCode::SUCCESS
}

pub fn suggest(logs: &[PathBuf], year: Option<i32>, share: f64) -> ExitCode {
    let mut suggest = Suggest::new();
    let read = read(logs, year, |e| suggest.apply(e));
    if !report_read(&read) {
        return ExitCode::FAILURE;
    }
    let stats = read.expect("checked above");
    print_out(&suggest.policy_text(share, stats.lines));
    ExitCode::SUCCESS
}
