//! Limits chosen from what the logs show.
//!
//! The events go through an engine whose every check is on with no
//! effective limit, so it counts everything and refuses nothing. For each
//! key (client address, sender, AUTH user) and each window of the policy's
//! length from the epoch on in which the key was seen, the peak of each
//! check's count is kept, as a histogram. A limit L delays a window whose
//! peak is over L. Per key, the limits start at the peaks (nothing
//! delayed) and step down, cheapest first, while the windows they delay,
//! summed over the checks, stay within the share P of the key's windows.
//! A check's `default` is the 90th percentile of its keys' limits; keys
//! above it get an entry of their own. Replayed over the same logs, no
//! key is refused in more than a share P of its windows: a replay counts
//! at most what this engine counted (refused messages and connections
//! count less), so a window whose peaks are within the limits has no
//! refusal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::HashMap;

use super::stamp::{day_text, time_text};
use super::LogEvent;
use crate::check::{Check, KeyKind, Switch};
use crate::engine::{ConnId, Engine, Event, Time};
use crate::peaks::{HourlyPeaks, MAX_PEAK};
use crate::policy::{Client, Policy};

/// Keys followed; past this many, new keys are left out (and counted).
pub const MAX_KEYS: usize = 1_000_000;

/// The checks of each kind of key.
fn checks_of(kind: KeyKind) -> impl Iterator<Item = Check> {
    Check::ALL.into_iter().filter(move |c| c.key_kind() == kind)
}

#[derive(Default)]
struct KeyPeaks {
    windows: u64,
    window: Option<u64>,
    /// The current window's peak per check.
    current: [u32; Check::ALL.len()],
    /// Per check: window peak → number of windows.
    hist: [BTreeMap<u32, u32>; Check::ALL.len()],
    /// Per check: the highest peak and when.
    max: [(u32, Time); Check::ALL.len()],
}

impl KeyPeaks {
    fn enter(&mut self, window: u64) {
        if self.window != Some(window) {
            self.flush();
            self.window = Some(window);
            self.windows += 1;
        }
    }

    fn flush(&mut self) {
        for (i, peak) in self.current.iter_mut().enumerate() {
            if *peak > 0 {
                *self.hist[i].entry(*peak).or_default() += 1;
            }
            *peak = 0;
        }
    }

    fn value(&mut self, check: Check, value: u64, time: Time) {
        let v = u32::try_from(value).unwrap_or(u32::MAX);
        let i = check.index();
        self.current[i] = self.current[i].max(v);
        if v > self.max[i].0 {
            self.max[i] = (v, time);
        }
    }
}

struct Conn {
    client: Client,
    msgs: u32,
}

/// Counts in progress.
pub struct Suggest {
    engine: Engine,
    window_secs: u64,
    conns: HashMap<u64, Conn>,
    clients: HashMap<IpAddr, KeyPeaks>,
    senders: HashMap<Box<str>, KeyPeaks>,
    auths: HashMap<Box<str>, KeyPeaks>,
    pub untracked_keys: u64,
    first: Option<Time>,
    last: Time,
}

/// A policy that counts everything and refuses nothing.
fn counting_policy() -> Policy {
    let mut text = String::new();
    for s in Switch::ALL {
        let _ = writeln!(text, "{} YES", s.name());
    }
    for c in Check::ALL {
        let _ = writeln!(text, "{}:default 4294967295", c.name());
    }
    Policy::parse_str("counting", &text).expect("the counting policy is valid")
}

impl Default for Suggest {
    fn default() -> Self {
        Self::new()
    }
}

impl Suggest {
    pub fn new() -> Suggest {
        let policy = Arc::new(counting_policy());
        Suggest {
            window_secs: u64::from(policy.window().window_secs()),
            engine: Engine::new(policy),
            conns: HashMap::new(),
            clients: HashMap::new(),
            senders: HashMap::new(),
            auths: HashMap::new(),
            untracked_keys: 0,
            first: None,
            last: 0,
        }
    }

    fn keys(&mut self, kind: KeyKind, client: &Client, time: Time) -> Option<&mut KeyPeaks> {
        let tracked = self.clients.len() + self.senders.len() + self.auths.len();
        let full = tracked >= MAX_KEYS;
        let window = time / self.window_secs;
        let peaks = match kind {
            KeyKind::Client => {
                let ip = self.engine.policy().counted_address(client.ip?);
                if full && !self.clients.contains_key(&ip) {
                    None
                } else {
                    Some(self.clients.entry(ip).or_default())
                }
            }
            KeyKind::Sender | KeyKind::AuthUser => {
                let (map, key) = if kind == KeyKind::Sender {
                    (&mut self.senders, client.sender.as_deref()?)
                } else {
                    (&mut self.auths, client.auth.as_deref()?)
                };
                if !map.contains_key(key) && full {
                    None
                } else {
                    Some(map.entry_ref(key).or_insert_with(KeyPeaks::default))
                }
            }
        };
        match peaks {
            Some(p) => {
                p.enter(window);
                Some(p)
            }
            None => {
                self.untracked_keys += 1;
                None
            }
        }
    }

    /// Counts one event.
    pub fn apply(&mut self, event: &LogEvent) {
        let time = event.time();
        self.first.get_or_insert(time);
        self.last = self.last.max(time);
        match event {
            LogEvent::Connect {
                session, ip, host, ..
            } => {
                let client = Client::from_ip(*ip).with_host(host);
                let conn = ConnId {
                    owner: 0,
                    conn: *session,
                };
                let ev = Event::Connect {
                    conn,
                    client: client.clone(),
                };
                self.engine.apply(&ev, time);
                self.connection_counts(&client, time);
                self.conns.insert(*session, Conn { client, msgs: 0 });
            }
            LogEvent::Mail {
                session,
                ip,
                sender,
                auth,
                rcpts,
                ..
            } => {
                let conn = self.conns.entry(*session).or_insert_with(|| Conn {
                    client: Client::from_ip(*ip),
                    msgs: 0,
                });
                conn.msgs += 1;
                let msgs = conn.msgs;
                let mut client = conn.client.clone().with_sender(sender);
                if let Some(a) = auth {
                    client = client.with_auth(a);
                }
                let mail = Event::Mail {
                    client: client.clone(),
                    msgs_in_conn: msgs,
                };
                self.engine.apply(&mail, time);
                for i in 1..=*rcpts {
                    let rcpt = Event::Rcpt {
                        client: client.clone(),
                        rcpts_in_msg: i,
                    };
                    self.engine.apply(&rcpt, time);
                }
                // Counts only grow through the message: its last recipient
                // holds the peaks.
                let mut values = Vec::with_capacity(Check::ALL.len());
                for c in Check::ALL {
                    let v = match c {
                        Check::MaxMsgs => u64::from(msgs),
                        Check::MaxRcpt | Check::MaxRcptFrom => u64::from(*rcpts),
                        c => self.engine.count_of(c, &client, time),
                    };
                    values.push((c, v));
                }
                for kind in [KeyKind::Client, KeyKind::Sender, KeyKind::AuthUser] {
                    if let Some(p) = self.keys(kind, &client, time) {
                        for &(c, v) in values.iter().filter(|(c, _)| c.key_kind() == kind) {
                            p.value(c, v, time);
                        }
                    }
                }
            }
            LogEvent::Close { session, .. } => {
                if self.conns.remove(session).is_some() {
                    let conn = ConnId {
                        owner: 0,
                        conn: *session,
                    };
                    self.engine.apply(&Event::Close { conn }, time);
                }
            }
        }
    }

    fn connection_counts(&mut self, client: &Client, time: Time) {
        let rate = self.engine.count_of(Check::ConnRate, client, time);
        let open = self.engine.count_of(Check::ConnOpen, client, time);
        if let Some(p) = self.keys(KeyKind::Client, client, time) {
            p.value(Check::ConnRate, rate, time);
            p.value(Check::ConnOpen, open, time);
        }
    }

    /// The policy text, with at most a share `share` (0 to 1) of each
    /// key's windows delayed.
    pub fn policy_text(mut self, share: f64, lines: u64) -> String {
        let mut chosen: [Vec<Choice>; Check::ALL.len()] = Default::default();
        let window = self.window_secs;
        for (ip, p) in self.clients.iter_mut() {
            let key = self.engine.policy().counted_text(*ip);
            choose(KeyKind::Client, key, p, share, window, &mut chosen);
        }
        for (kind, map) in [
            (KeyKind::Sender, &mut self.senders),
            (KeyKind::AuthUser, &mut self.auths),
        ] {
            for (name, p) in map.iter_mut() {
                choose(kind, name.to_string(), p, share, window, &mut chosen);
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# relayrate suggest: {lines} log lines, {} to {}.",
            self.first.map_or("-".into(), time_text),
            time_text(self.last)
        );
        let _ = writeln!(
            out,
            "# Limits per {window} s window; replayed over the same logs, at most {:.2}% of each",
            share * 100.0
        );
        let _ = writeln!(
            out,
            "# key's windows would see a refusal. Check with `relayrate replay` before use."
        );
        for s in Switch::ALL {
            let _ = writeln!(out, "{:<24} YES", s.name());
        }
        for c in Check::ALL {
            write_check(&mut out, c, &mut chosen[c.index()], "windows");
        }
        out
    }
}

/// Whether `p` is a share a suggestion can promise: 0 to 1, not -0 or NaN.
pub fn is_share(p: f64) -> bool {
    (0.0..=1.0).contains(&p) && p.is_sign_positive()
}

/// A `--delay-share` argument, for both `suggest`s' command lines.
pub fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if is_share(p) => Ok(p),
        _ => Err("a share from 0 to 1, such as 0.01".to_string()),
    }
}

/// What a cluster kept, for [`policy_from_hourly_peaks`].
pub struct ClusterPeaks<'a> {
    /// Each (check, key) and its hourly peaks.
    pub keys: Vec<(crate::engine::CounterId, HourlyPeaks)>,
    /// The policy in force: its window, IPv6 prefix and baselines' setting.
    pub policy: &'a Policy,
    /// The cluster's time, in seconds since the epoch.
    pub now: Time,
}

/// A policy text chosen, like [`Suggest::policy_text`], from what a
/// cluster kept: each (check, key)'s highest window count in each hour of
/// the last 7 days. A key's hours with any count stand for its windows: a
/// limit under an hour's peak delays that hour, and at most a share
/// `share` of each key's hours is delayed. Only windowed checks are kept
/// by a cluster: the others' switches are left out, with a comment. The
/// text keeps the policy's window and IPv6 prefix (the peaks are in its
/// units) and starts in dry run, to be merged into the operator's policy.
pub fn policy_from_hourly_peaks(cluster: ClusterPeaks<'_>, share: f64) -> String {
    let ClusterPeaks { keys, policy, now } = cluster;
    let window_secs = u64::from(policy.window().window_secs());
    // Per key: its checks' hourly peaks, and the hours it counted in.
    let mut by_key: HashMap<(KeyKind, String), (KeyPeaks, std::collections::BTreeSet<u64>)> =
        HashMap::new();
    let (mut first, mut last) = (u64::MAX, 0);
    for (id, peaks) in &keys {
        let kind = id.check.key_kind();
        let text = match &id.key {
            crate::engine::CounterKey::Ip(ip) => policy.counted_text(*ip),
            other => other.to_string(),
        };
        let (p, seen) = by_key.entry((kind, text)).or_default();
        let i = id.check.index();
        for (hour, peak) in peaks.hours(now / 3600) {
            seen.insert(hour);
            *p.hist[i].entry(peak).or_default() += 1;
            if peak > p.max[i].0 {
                p.max[i] = (peak, hour * 3600);
            }
            first = first.min(hour);
            last = last.max(hour);
        }
    }
    drop(keys);
    let mut chosen: [Vec<Choice>; Check::ALL.len()] = Default::default();
    let mut sorted: Vec<_> = by_key.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let n = sorted.len();
    for ((kind, key), (mut p, seen)) in sorted {
        p.windows = seen.len() as u64;
        choose(kind, key, &mut p, share, window_secs, &mut chosen);
    }
    let mut out = String::new();
    let span = if first <= last {
        format!(
            "{} to {}",
            time_text(first * 3600),
            time_text(last * 3600 + 3599)
        )
    } else {
        "no traffic".to_string()
    };
    let _ = writeln!(
        out,
        "# relayratectl suggest: the cluster's hourly peaks of {n} keys, {span} (asked {}).",
        time_text(now)
    );
    let _ = writeln!(
        out,
        "# Limits per {window_secs} s window; at most {:.2}% of the hours in which each key",
        share * 100.0
    );
    let _ = writeln!(
        out,
        "# counted would have seen a refusal. Counts are what the policy in force counted (a key"
    );
    let _ = writeln!(
        out,
        "# held at a limit shows that limit, not what it tried). A peak's time is the start of"
    );
    let _ = writeln!(
        out,
        "# its hour. Only the rates are here: merge these limits into your"
    );
    let _ = writeln!(
        out,
        "# policy (NetClass, per-connection checks), check it with `relayrate policy check`"
    );
    let _ = writeln!(
        out,
        "# (and `relayrate replay` if you have the mail logs), then leave dry run."
    );
    if !policy.unusual().is_on() {
        let _ = writeln!(
            out,
            "# Baselines are off (UnusualFactor 0): no peaks have been kept since; these are older."
        );
    }
    let _ = writeln!(out, "DryRun                   YES");
    let w = policy.window();
    let _ = writeln!(out, "RateWindow               {}", w.window_secs());
    let _ = writeln!(out, "RateBucket               {}", w.bucket_secs());
    let _ = writeln!(out, "IPv6Prefix               {}", policy.ipv6_prefix());
    let windowed = |c: &Check| c.measure() == crate::check::Measure::Window;
    for s in Switch::ALL {
        let checks = || Check::ALL.into_iter().filter(move |c| c.switch() == s);
        if !checks().any(|c| policy.is_enabled(c)) {
            let _ = writeln!(
                out,
                "# {}: off in the policy in force; nothing counted, nothing suggested.",
                s.name()
            );
        } else if checks().any(|c| windowed(&c)) {
            let _ = writeln!(out, "{:<24} YES", s.name());
        } else {
            let _ = writeln!(
                out,
                "# {}: not a windowed check, not kept by the cluster \
                 (`relayrate suggest --maillog` chooses it from logs).",
                s.name()
            );
        }
    }
    for c in Check::ALL
        .into_iter()
        .filter(|c| windowed(c) && policy.is_enabled(*c))
    {
        write_check(&mut out, c, &mut chosen[c.index()], "hours");
    }
    out
}

/// One key's limit for one check, and the figures behind it.
struct Choice {
    key: String,
    limit: u32,
    peak: u32,
    peak_at: Time,
    p99: u32,
    windows: u64,
}

fn choose(
    kind: KeyKind,
    key: String,
    p: &mut KeyPeaks,
    share: f64,
    _window: u64,
    chosen: &mut [Vec<Choice>; Check::ALL.len()],
) {
    p.flush();
    let budget = (share * p.windows as f64).floor() as u64;
    let checks: Vec<Check> = checks_of(kind)
        .filter(|c| !p.hist[c.index()].is_empty())
        .collect();
    // Per check: its peaks from the highest down, and how far the limit
    // has come down them (0: at the highest peak).
    let levels: Vec<Vec<(u32, u32)>> = checks
        .iter()
        .map(|c| {
            p.hist[c.index()]
                .iter()
                .rev()
                .map(|(&v, &n)| (v, n))
                .collect()
        })
        .collect();
    let mut at = vec![0usize; checks.len()];
    let mut used = 0u64;
    loop {
        // The cheapest step: lowering a limit below its current level
        // delays that level's windows.
        let step = (0..checks.len())
            .filter(|&i| at[i] + 1 < levels[i].len())
            .map(|i| (u64::from(levels[i][at[i]].1), i))
            .filter(|&(cost, _)| used + cost <= budget)
            .min();
        let Some((cost, i)) = step else { break };
        used += cost;
        at[i] += 1;
    }
    for (i, c) in checks.iter().enumerate() {
        let hist = &p.hist[c.index()];
        chosen[c.index()].push(Choice {
            key: key.clone(),
            limit: levels[i][at[i]].0.max(1),
            peak: p.max[c.index()].0,
            peak_at: p.max[c.index()].1,
            p99: percentile(hist, p.windows, 0.99),
            windows: p.windows,
        });
    }
}

/// The `q` quantile (0 to 1) of window peaks, windows with none at 0.
fn percentile(hist: &BTreeMap<u32, u32>, windows: u64, q: f64) -> u32 {
    let rank = (q * windows as f64).ceil() as u64;
    let mut seen = windows.saturating_sub(hist.values().map(|&n| u64::from(n)).sum());
    if seen >= rank {
        return 0;
    }
    for (&v, &n) in hist {
        seen += u64::from(n);
        if seen >= rank {
            return v;
        }
    }
    hist.keys().next_back().copied().unwrap_or(0)
}

/// The longest key written as an entry: a longer one is held to the
/// default, so that a suggestion stays small.
const MAX_ENTRY_KEY: usize = 256;
/// Entries written per check, the highest limits first; the others are
/// held to the default (and counted in a comment). With keys of at most
/// [`MAX_ENTRY_KEY`] bytes, a suggestion stays well under 4 MiB.
const MAX_ENTRIES: usize = 1000;

/// Format characters that show nothing (or turn the text around) when
/// printed: a key with one could read as another key or value.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{AD}' | '\u{600}'..='\u{605}' | '\u{61C}' | '\u{6DD}' | '\u{70F}' | '\u{180E}'
        | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
        | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}' | '\u{110BD}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E007F}')
}

/// Whether `key` can be written as an entry of `check` that applies to
/// that one key: of visible characters, at most [`MAX_ENTRY_KEY`] bytes,
/// not a pattern (a sender without a local part, such as `com` or
/// `@example.org`, would cover a whole domain; `default` and `*` are not
/// users), and parsed back as an entry. Anyone can send any sender, so
/// a key that fails is held to the default rather than written.
fn valid_key(check: Check, key: &str) -> bool {
    if key.is_empty()
        || key.len() > MAX_ENTRY_KEY
        || key
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || is_invisible(c))
    {
        return false;
    }
    let one_key = match check.key_kind() {
        KeyKind::Client => true,
        KeyKind::Sender => {
            key == "<>"
                || key.split_once('@').is_some_and(|(local, domain)| {
                    !local.is_empty() && !domain.is_empty() && !domain.contains('@')
                })
        }
        KeyKind::AuthUser => !key.eq_ignore_ascii_case("default") && key != "*",
    };
    one_key && crate::policy::parse_key(check.key_kind(), key).is_ok()
}

/// Writes a check's `default` (the 90th percentile of the limits of the
/// keys that can be entries) and an entry, with its figures, for each of
/// those above it; a key that cannot be an entry is held to the default,
/// never lifts it (anyone can send any sender), and is counted in a
/// comment. `unit` names what a key's count of windows counts.
fn write_check(out: &mut String, check: Check, choices: &mut [Choice], unit: &str) {
    let _ = writeln!(out);
    if choices.is_empty() {
        let _ = writeln!(out, "# {check}: no traffic seen; no limit.");
        let _ = writeln!(out, "{check}:default 0");
        return;
    }
    choices.sort_by(|a, b| b.limit.cmp(&a.limit).then_with(|| a.key.cmp(&b.key)));
    let writable: Vec<bool> = choices.iter().map(|c| valid_key(check, &c.key)).collect();
    let mut limits: Vec<u32> = choices
        .iter()
        .zip(&writable)
        .filter(|(_, w)| **w)
        .map(|(c, _)| c.limit)
        .collect();
    limits.sort_unstable();
    let default = match limits.len() {
        0 => choices.iter().map(|c| c.limit).min().unwrap_or(0),
        n => limits[((n * 9).div_ceil(10)).max(1) - 1],
    };
    let _ = writeln!(
        out,
        "# {check}: the 90th percentile of {} keys' limits ({} keys in all).",
        limits.len(),
        choices.len()
    );
    let _ = writeln!(out, "{check}:default {default}");
    let (mut written, mut held, mut left_out) = (0, 0, 0);
    for (c, writable) in choices
        .iter()
        .zip(&writable)
        .filter(|(c, _)| c.limit > default)
    {
        if !writable {
            held += 1;
            continue;
        }
        if written == MAX_ENTRIES {
            left_out += 1;
            continue;
        }
        written += 1;
        let peak = if c.peak >= MAX_PEAK && unit == "hours" {
            format!("{MAX_PEAK} or more (kept no higher: raise it by hand if the key is yours)")
        } else {
            c.peak.to_string()
        };
        let _ = writeln!(
            out,
            "# peak {peak} on {} ({}), 99th percentile {}, over {} {unit}",
            day_text(c.peak_at),
            time_text(c.peak_at),
            c.p99,
            c.windows
        );
        let _ = writeln!(out, "{check}:{} {}", c.key, c.limit);
    }
    if held > 0 {
        let _ = writeln!(
            out,
            "# {held} more keys above the default cannot be an entry of their own (not one \
             address or user, or a character that does not show): they are held to the default."
        );
    }
    if left_out > 0 {
        let _ = writeln!(
            out,
            "# {left_out} more keys above the default are left out (at most {MAX_ENTRIES} \
             entries a check): they are held to the default."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CounterId, CounterKey};

    fn at(check: Check, key: CounterKey, peak: u32) -> (CounterId, HourlyPeaks) {
        let mut p = HourlyPeaks::default();
        p.note(1000, peak);
        (CounterId { check, key }, p)
    }

    fn sender(key: &str, peak: u32) -> (CounterId, HourlyPeaks) {
        at(Check::MsgRateFrom, CounterKey::Name(key.into()), peak)
    }

    fn suggest(keys: Vec<(CounterId, HourlyPeaks)>, policy: &str) -> String {
        let policy = Policy::parse_str("p", policy).unwrap();
        let now = 1001 * 3600;
        let text = policy_from_hourly_peaks(
            ClusterPeaks {
                keys,
                policy: &policy,
                now,
            },
            0.01,
        );
        Policy::parse_str("suggested", &text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        text
    }

    fn entries<'a>(text: &'a str, check: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(check)).collect()
    }

    /// Anyone can send any sender: one that is not one address (or does
    /// not show) must neither get an entry nor lift everyone's default.
    #[test]
    fn keys_that_cannot_be_one_entry_are_held_to_the_default_and_never_lift_it() {
        let mut keys: Vec<_> = (0..100)
            .map(|i| sender(&format!("u{i}@example.net"), 2))
            .collect();
        let long = format!("{}@example.org", "x".repeat(300));
        for bad in [
            "a@b@c",
            "com",
            "@gmail.com",
            "example.org",
            "zw\u{200b}sp@example.org",
            "admin\u{202e}@moc.elpmaxe",
            long.as_str(),
        ] {
            keys.push(sender(bad, 64));
        }
        // A third of the keys made up, far above the others: still held.
        for i in 0..25 {
            keys.push(sender(&format!("j{i}@b@c"), 500));
            keys.push(sender(&format!("d{i}.example.org"), 500));
        }
        keys.push(sender("big@example.org", 90));
        for user in ["default", "*", "bob"] {
            keys.push(at(Check::MsgRateAuth, CounterKey::Name(user.into()), 50));
        }
        for i in 0..40 {
            let user = CounterKey::Name(format!("user{i}").into());
            keys.push(at(Check::MsgRateAuth, user, 1));
        }
        let text = suggest(keys, "CHECK_MSG_RATE YES\n");
        assert!(
            text.contains("# CHECK_CONN_RATE: off in the policy in force"),
            "{text}"
        );
        assert!(!text.contains("CHECK_CONN_RATE    "), "{text}");
        assert_eq!(
            entries(&text, "MsgRateFrom:"),
            ["MsgRateFrom:default 2", "MsgRateFrom:big@example.org 90"],
            "{text}"
        );
        assert!(
            text.contains("# 57 more keys above the default cannot be an entry"),
            "{text}"
        );
        assert_eq!(
            entries(&text, "MsgRateAuth:"),
            ["MsgRateAuth:default 1", "MsgRateAuth:bob 50"],
            "{text}"
        );
    }

    #[test]
    fn it_keeps_the_window_and_prefix_starts_in_dry_run_and_caps_entries() {
        let v6 = CounterKey::Ip("2001:db8:1::".parse().unwrap());
        let mut keys = vec![at(Check::MsgRate, v6, 70_000)];
        for i in 0..12u8 {
            let ip = CounterKey::Ip(std::net::IpAddr::from([192, 0, 2, i]));
            keys.push(at(Check::MsgRate, ip, 5));
        }
        // More senders above the default than a check writes.
        keys.extend((0..1100).map(|i| sender(&format!("s{i}@example.net"), 10)));
        keys.extend((0..20_000).map(|i| sender(&format!("q{i}@example.net"), 1)));
        let text = suggest(
            keys,
            "RateWindow 300\nRateBucket 30\nIPv6Prefix 48\nCHECK_MSG_RATE YES\n",
        );
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "DryRun                   YES",
            "RateWindow               300",
            "IPv6Prefix               48",
            "MsgRate:default 5",
            // A peak kept at its cap: limited there, said so.
            "MsgRate:2001:db8:1::/48 65535",
            "MsgRateFrom:default 1",
        ] {
            assert!(lines.contains(&want), "no {want:?} in:\n{text}");
        }
        assert!(text.contains("# peak 65535 or more"), "{text}");
        assert_eq!(entries(&text, "MsgRateFrom:").len(), 1 + MAX_ENTRIES);
        assert!(text.contains("# 100 more keys above the default are left out"));
    }
}
