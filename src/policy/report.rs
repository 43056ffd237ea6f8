//! What `relayrate policy check` and `policy explain` tell an administrator.

use serde::Serialize;

use super::{Client, Matched, Policy};
use crate::check::{Check, Switch};

/// One line: entries per check, switches, window.
pub fn summary(policy: &Policy) -> String {
    let names: Vec<&str> = policy.files().iter().map(|f| f.name.as_str()).collect();
    let mut counts: Vec<String> = Check::ALL
        .iter()
        .filter(|c| !policy.entries(**c).is_empty())
        .map(|c| format!("{c} {}", policy.entries(*c).len()))
        .collect();
    if !policy.netclass_entries().is_empty() {
        counts.push(format!("NetClass {}", policy.netclass_entries().len()));
    }
    let total: usize = Check::ALL
        .iter()
        .map(|c| policy.entries(*c).len())
        .sum::<usize>()
        + policy.netclass_entries().len();
    let on: Vec<&str> = Switch::ALL
        .iter()
        .filter(|s| policy.switch(**s))
        .map(|s| s.name())
        .collect();
    let w = policy.window();
    let prefix = match policy.ipv6_prefix() {
        super::DEFAULT_IPV6_PREFIX => String::new(),
        128 => "; IPv6 clients counted per address".to_string(),
        n => format!("; IPv6 clients counted per /{n}"),
    };
    format!(
        "{}: valid; {total} entries ({}); switches on: {}; window {}s in {}s buckets{prefix}{}",
        names.join(", "),
        if counts.is_empty() {
            "none".to_string()
        } else {
            counts.join(", ")
        },
        if on.is_empty() {
            "none".to_string()
        } else {
            on.join(", ")
        },
        w.window_secs(),
        w.bucket_secs(),
        if policy.dry_run() { "; dry run" } else { "" },
    )
}

/// How one check resolves for a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckExplanation {
    pub enabled: bool,
    /// `None` is no limit.
    pub limit: Option<u64>,
    /// `ConnRate:1.1.1.11`, or `built-in default`.
    pub matched: String,
    /// `FILE:LINE` of the entry; `None` for the built-in default.
    pub source: Option<String>,
}

/// Every check of `docs/policy.md` §1, in its order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub checks: serde_json::Map<String, serde_json::Value>,
}

pub fn explain_check(policy: &Policy, check: Check, client: &Client) -> CheckExplanation {
    let r = policy.resolve(check, client);
    let (matched, source) = match r.matched {
        Matched::Entry(o) => (
            format!("{check}:{}", o.key),
            Some(format!("{}:{}", o.file, o.line)),
        ),
        Matched::BuiltIn => ("built-in default".to_string(), None),
    };
    CheckExplanation {
        enabled: r.enabled,
        limit: r.limit,
        matched,
        source,
    }
}

pub fn explain(policy: &Policy, client: &Client) -> Explanation {
    let checks = Check::ALL
        .iter()
        .map(|&c| {
            let e = explain_check(policy, c, client);
            (
                c.name().to_string(),
                serde_json::to_value(e).expect("plain struct"),
            )
        })
        .collect();
    Explanation { checks }
}
