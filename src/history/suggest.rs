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
            write_check(&mut out, c, &mut chosen[c.index()]);
        }
        out
    }
}

/// A policy text chosen, like [`Suggest::policy_text`], from what a
/// cluster kept: each (check, key)'s highest window count in each hour of
/// the last 7 days (see [`Engine::hourly_peaks`]), with a window of
/// `window_secs`. A key's hours with any count stand for its windows: a
/// limit under an hour's peak delays that hour, and at most a share
/// `share` of each key's hours is delayed. Only windowed checks are kept
/// by a cluster: the others' switches are left out, with a comment. A
/// client key is written with `key_text` (an IPv6 network as
/// `prefix/len`).
pub fn policy_from_hourly_peaks<'a>(
    peaks: impl Iterator<Item = (&'a crate::engine::CounterId, Vec<(u64, u32)>)>,
    key_text: impl Fn(&crate::engine::CounterKey) -> String,
    share: f64,
    window_secs: u64,
    now: Time,
) -> String {
    // Per key: its checks' hourly peaks, and the hours it counted in.
    let mut keys: HashMap<(KeyKind, String), (KeyPeaks, std::collections::BTreeSet<u64>)> =
        HashMap::new();
    let (mut first, mut last) = (u64::MAX, 0);
    for (id, hours) in peaks {
        let kind = id.check.key_kind();
        let (p, seen) = keys.entry((kind, key_text(&id.key))).or_default();
        let i = id.check.index();
        for (hour, peak) in hours {
            seen.insert(hour);
            *p.hist[i].entry(peak).or_default() += 1;
            if peak > p.max[i].0 {
                p.max[i] = (peak, hour * 3600);
            }
            first = first.min(hour);
            last = last.max(hour);
        }
    }
    let mut chosen: [Vec<Choice>; Check::ALL.len()] = Default::default();
    let mut sorted: Vec<_> = keys.into_iter().collect();
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
        "# counted would have seen a refusal. Check with `relayrate replay` before use."
    );
    let windowed = |c: &Check| c.measure() == crate::check::Measure::Window;
    for s in Switch::ALL {
        if Check::ALL.iter().any(|c| c.switch() == s && windowed(c)) {
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
    for c in Check::ALL.into_iter().filter(windowed) {
        write_check(&mut out, c, &mut chosen[c.index()]);
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

/// Whether `key` can be written as an entry of `check`.
fn valid_key(check: Check, key: &str) -> bool {
    let text = format!(
        "{} YES\n{}:{} 1\n",
        check.switch().name(),
        check.name(),
        key
    );
    !key.is_empty()
        && !key.chars().any(char::is_whitespace)
        && Policy::parse_str("key", &text).is_ok()
}

fn write_check(out: &mut String, check: Check, choices: &mut [Choice]) {
    let _ = writeln!(out);
    if choices.is_empty() {
        let _ = writeln!(out, "# {check}: no traffic seen; no limit.");
        let _ = writeln!(out, "{check}:default 0");
        return;
    }
    choices.sort_by(|a, b| b.limit.cmp(&a.limit).then_with(|| a.key.cmp(&b.key)));
    let mut limits: Vec<u32> = choices.iter().map(|c| c.limit).collect();
    limits.sort_unstable();
    let p90 = limits[((limits.len() * 9).div_ceil(10)).max(1) - 1];
    // A key that cannot be an entry lives under the default: raise it.
    let mut default = p90;
    for c in choices
        .iter()
        .filter(|c| c.limit > p90 && !valid_key(check, &c.key))
    {
        default = default.max(c.limit);
    }
    let _ = writeln!(
        out,
        "# {check}: the 90th percentile of {} keys' limits.",
        choices.len()
    );
    let _ = writeln!(out, "{check}:default {default}");
    for c in choices.iter().filter(|c| c.limit > default) {
        let _ = writeln!(
            out,
            "# peak {} on {} ({}), 99th percentile {}, over {} windows",
            c.peak,
            day_text(c.peak_at),
            time_text(c.peak_at),
            c.p99,
            c.windows
        );
        let _ = writeln!(out, "{check}:{} {}", c.key, c.limit);
    }
}
