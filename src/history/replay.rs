//! Session events through the pure engine under a policy, in log time:
//! what the policy would have refused, whom, when, and how long a refused
//! message would have waited in the sender's queue.
//!
//! The retry model is Postfix's defaults (`queue_run_delay` and
//! `minimal_backoff_time` 300 s, `maximal_backoff_time` 4000 s): a deferred
//! message is tried again 300 s after the refusal, then after 600, 1200,
//! 2400 and 4000 s, and every 4000 s after that. A refused message waits
//! until the first of those tries that comes when the engine's
//! retry-after has passed (that is, when its count has fallen under the
//! limit, were nothing else sent meanwhile).

use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::HashMap;
use serde::Serialize;

use super::LogEvent;
use crate::check::{Check, KeyKind};
use crate::engine::{per_connection, ConnId, Engine, Event, Refusal, Time};
use crate::policy::{Client, Policy};

/// The retry model in words, as reports state it.
pub const RETRY_MODEL: &str = "Postfix defaults: tries again 300 s after a refusal, then the wait doubles (600, 1200, 2400 s) up to 4000 s; a refused message waits until the first try after the engine's retry-after";

/// Keys (client addresses, senders, AUTH users) a report follows; past
/// this many, new keys are counted in `untracked_keys` only.
pub const MAX_KEYS: usize = 1_000_000;

/// How long a message refused at `time` with the engine's `retry_after`
/// (seconds) waits under [`RETRY_MODEL`], in seconds.
pub fn queue_wait(retry_after: u64) -> u64 {
    let (mut at, mut step) = (300u64, 300u64);
    while at < retry_after {
        step = (step * 2).min(4000);
        at += step;
    }
    at
}

/// The refusals of one check for one key.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub connections: u64,
    pub messages: u64,
    pub recipients: u64,
    /// Seconds since the epoch.
    pub first: Time,
    pub last: Time,
    /// Delayed messages' waits under the retry model, in seconds: those
    /// refused at MAIL FROM or by the connection, and those with refused
    /// recipients (`waits` counts them).
    pub wait_max: u64,
    pub wait_total: u64,
    pub waits: u64,
}

/// One key's activity and refusals. Windows are the policy's window
/// lengths (`RateWindow`) from the epoch on: `windows` counts those in
/// which the key was seen, `delayed_windows` those in which it was
/// refused at least once.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KeyReport {
    pub windows: u64,
    pub delayed_windows: u64,
    #[serde(skip)]
    last_window: Option<u64>,
    #[serde(skip)]
    last_delayed: Option<u64>,
    pub checks: std::collections::BTreeMap<&'static str, CheckReport>,
}

impl KeyReport {
    /// The share of the key's windows with a refusal, 0 to 1.
    pub fn delayed_share(&self) -> f64 {
        if self.windows == 0 {
            0.0
        } else {
            self.delayed_windows as f64 / self.windows as f64
        }
    }
}

#[derive(Debug)]
struct Conn {
    client: Client,
    msgs: u32,
    /// The refusal that closed (or never opened) the connection.
    closed_by: Option<Refusal>,
}

/// What was refused.
#[derive(Clone, Copy)]
enum What {
    Connection,
    /// A message refused at MAIL FROM, or carried by a refused connection.
    Message,
    /// Recipients refused at RCPT TO.
    Recipients(u64),
    /// A message with recipients refused: it waits, and counts no more.
    Delayed,
}

/// A replay in progress.
pub struct Replay {
    engine: Engine,
    policy: Arc<Policy>,
    window_secs: u64,
    conns: HashMap<u64, Conn>,
    pub clients: HashMap<IpAddr, KeyReport>,
    pub senders: HashMap<Box<str>, KeyReport>,
    pub auths: HashMap<Box<str>, KeyReport>,
    pub untracked_keys: u64,
    /// Refusals by check: connections, messages, recipients.
    pub totals: [[u64; 3]; Check::ALL.len()],
}

fn key_report<'a, K: std::hash::Hash + Eq>(
    map: &'a mut HashMap<K, KeyReport>,
    key: K,
    tracked: usize,
    untracked: &mut u64,
) -> Option<&'a mut KeyReport> {
    if tracked >= MAX_KEYS && !map.contains_key(&key) {
        *untracked += 1;
        return None;
    }
    Some(map.entry(key).or_default())
}

fn name_report<'a>(
    map: &'a mut HashMap<Box<str>, KeyReport>,
    key: &str,
    tracked: usize,
    untracked: &mut u64,
) -> Option<&'a mut KeyReport> {
    if tracked >= MAX_KEYS && !map.contains_key(key) {
        *untracked += 1;
        return None;
    }
    Some(map.entry_ref(key).or_default())
}

impl Replay {
    pub fn new(policy: Arc<Policy>) -> Replay {
        Replay {
            engine: Engine::new(policy.clone()),
            window_secs: u64::from(policy.window().window_secs()),
            policy,
            conns: HashMap::new(),
            clients: HashMap::new(),
            senders: HashMap::new(),
            auths: HashMap::new(),
            untracked_keys: 0,
            totals: [[0; 3]; Check::ALL.len()],
        }
    }

    /// How a client key (a counted address) is shown: an IPv6 client's
    /// network as `ADDRESS/N`.
    pub fn client_text(&self, counted: IpAddr) -> String {
        self.policy.counted_text(counted)
    }

    fn tracked(&self) -> usize {
        self.clients.len() + self.senders.len() + self.auths.len()
    }

    /// The report of the key `check` counts `client` by.
    fn report(&mut self, kind: KeyKind, client: &Client) -> Option<&mut KeyReport> {
        let tracked = self.tracked();
        match kind {
            KeyKind::Client => {
                let ip = self.policy.counted_address(client.ip?);
                key_report(&mut self.clients, ip, tracked, &mut self.untracked_keys)
            }
            KeyKind::Sender => {
                let s = client.sender.as_deref()?;
                name_report(&mut self.senders, s, tracked, &mut self.untracked_keys)
            }
            KeyKind::AuthUser => {
                let a = client.auth.as_deref()?;
                name_report(&mut self.auths, a, tracked, &mut self.untracked_keys)
            }
        }
    }

    fn seen(&mut self, kind: KeyKind, client: &Client, time: Time) {
        let window = time / self.window_secs;
        if let Some(r) = self.report(kind, client) {
            if r.last_window != Some(window) {
                r.last_window = Some(window);
                r.windows += 1;
            }
        }
    }

    fn refused(&mut self, r: &Refusal, client: &Client, what: What, time: Time) {
        let window = time / self.window_secs;
        let t = &mut self.totals[r.check.index()];
        match what {
            What::Connection => t[0] += 1,
            What::Message => t[1] += 1,
            What::Recipients(n) => t[2] += n,
            What::Delayed => {}
        }
        let Some(k) = self.report(r.check.key_kind(), client) else {
            return;
        };
        if k.last_delayed != Some(window) {
            k.last_delayed = Some(window);
            k.delayed_windows += 1;
        }
        let c = k.checks.entry(r.check.name()).or_default();
        if c.connections + c.messages + c.recipients == 0 {
            c.first = time;
        }
        c.last = time;
        match what {
            What::Connection => c.connections += 1,
            What::Recipients(n) => c.recipients += n,
            What::Message | What::Delayed => {
                if matches!(what, What::Message) {
                    c.messages += 1;
                }
                let wait = queue_wait(r.retry_after);
                c.wait_max = c.wait_max.max(wait);
                c.wait_total += wait;
                c.waits += 1;
            }
        }
    }

    /// Replays one event.
    pub fn apply(&mut self, event: &LogEvent) {
        match event {
            LogEvent::Connect {
                time,
                session,
                ip,
                host,
            } => {
                let client = Client::from_ip(*ip).with_host(host);
                self.seen(KeyKind::Client, &client, *time);
                let conn = ConnId {
                    owner: 0,
                    conn: *session,
                };
                let verdict = self.engine.apply(
                    &Event::Connect {
                        conn,
                        client: client.clone(),
                    },
                    *time,
                );
                let closed_by = verdict.refusal().cloned();
                if let Some(r) = &closed_by {
                    self.refused(r, &client, What::Connection, *time);
                }
                self.conns.insert(
                    *session,
                    Conn {
                        client,
                        msgs: 0,
                        closed_by,
                    },
                );
            }
            LogEvent::Mail {
                time,
                session,
                ip,
                sender,
                auth,
                rcpts,
            } => self.mail(*time, *session, *ip, sender, auth.as_deref(), *rcpts),
            LogEvent::Close { time, session } => {
                if self.conns.remove(session).is_some() {
                    let conn = ConnId {
                        owner: 0,
                        conn: *session,
                    };
                    self.engine.apply(&Event::Close { conn }, *time);
                }
            }
        }
    }

    fn mail(
        &mut self,
        time: Time,
        session: u64,
        ip: IpAddr,
        sender: &str,
        auth: Option<&str>,
        rcpts: u32,
    ) {
        let conn = self.conns.entry(session).or_insert_with(|| Conn {
            client: Client::from_ip(ip),
            msgs: 0,
            closed_by: None,
        });
        conn.msgs += 1;
        let msgs_in_conn = conn.msgs;
        let closed_by = conn.closed_by.clone();
        let mut client = conn.client.clone().with_sender(sender);
        if let Some(a) = auth {
            client = client.with_auth(a);
        }
        self.seen(KeyKind::Client, &client, time);
        self.seen(KeyKind::Sender, &client, time);
        self.seen(KeyKind::AuthUser, &client, time);
        // A connection refused (or closed by a 421) carries no message:
        // the message waits for a new connection.
        if let Some(r) = closed_by {
            self.refused(&r, &client, What::Message, time);
            return;
        }
        let mail = Event::Mail {
            client: client.clone(),
            msgs_in_conn,
        };
        if let Some(r) = self.engine.apply(&mail, time).refusal() {
            self.refused(r, &client, What::Message, time);
            return;
        }
        let mut refused = 0;
        for i in 1..=rcpts {
            // The milter decides MaxRcpt and MaxRcptFrom on its own: such a
            // recipient never reaches the engine and is not counted.
            let own = [Check::MaxRcpt, Check::MaxRcptFrom]
                .into_iter()
                .find_map(|c| per_connection(&self.policy, c, &client, i));
            let r = match own {
                Some(r) => r,
                None => {
                    let rcpt = Event::Rcpt {
                        client: client.clone(),
                        rcpts_in_msg: i,
                    };
                    match self.engine.apply(&rcpt, time).refusal() {
                        Some(r) => r.clone(),
                        None => continue,
                    }
                }
            };
            refused += 1;
            if refused == 1 {
                // The message is delayed (in part): one wait per message.
                self.refused(&r, &client, What::Delayed, time);
            }
            self.refused(&r, &client, What::Recipients(1), time);
            if matches!(r.check, Check::ConnRate | Check::ConnOpen) {
                // A 421 closes the connection: the rest of the message and
                // the connection's next messages wait for a new one.
                if let Some(c) = self.conns.get_mut(&session) {
                    c.closed_by = Some(r);
                }
                refused = rcpts;
                break;
            }
        }
        if refused == rcpts {
            // No recipient accepted: the message never ends, its slots go back.
            let back = Event::GiveBack {
                client,
                held_secs: 0,
            };
            self.engine.apply(&back, time);
        }
    }

    /// Refusals by check, as (check, connections, messages, recipients),
    /// checks with none left out.
    pub fn totals(&self) -> Vec<(Check, u64, u64, u64)> {
        Check::ALL
            .into_iter()
            .map(|c| {
                let t = self.totals[c.index()];
                (c, t[0], t[1], t[2])
            })
            .filter(|&(_, a, b, c)| a + b + c > 0)
            .collect()
    }
}
