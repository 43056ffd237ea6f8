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
    /// Why the check is off or sets no limit, in words (see
    /// [`why_no_limit`]); `None` when it applies a limit.
    pub note: Option<String>,
}

/// Why `check` refuses nothing for a client, in words, for `policy
/// explain` and `relayratectl show`; `None` when it applies a limit.
/// `from_entry`: whether an entry of the policy matched (`None` when not
/// known, as for the counts a node shows: then the check's built-in
/// default tells, since a check with one falls back to it).
pub fn why_no_limit(
    check: Check,
    enabled: bool,
    has_limit: bool,
    from_entry: Option<bool>,
) -> Option<String> {
    if !enabled {
        return Some(format!("off: {} is not YES", check.switch().name()));
    }
    if has_limit {
        return None;
    }
    let has_builtin = check.builtin_default().is_some();
    Some(match (from_entry, has_builtin) {
        (Some(true), _) | (None, true) => "no limit: the entry that matches says 0".to_string(),
        (Some(false), _) => {
            format!("no limit: no entry matches, and {check} has no built-in default")
        }
        (None, false) => format!(
            "no limit: an entry of 0 matches, or none does and {check} has no built-in default"
        ),
    })
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
    let from_entry = source.is_some();
    CheckExplanation {
        enabled: r.enabled,
        limit: r.limit,
        matched,
        source,
        note: why_no_limit(check, r.enabled, r.limit.is_some(), Some(from_entry)),
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
