//! The limiter's state and its decisions: windowed counters by (check, key),
//! open-connection leases by (owner, connection id), and the verdict for
//! each event of an SMTP session (`docs/policy.md` §1).
//!
//! Deterministic and pure: no I/O, no clock. Every call takes `now` (seconds
//! since the epoch), so a Raft state machine, a single node and the milter's
//! fallback all decide the same from the same events.

use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::{Equivalent, HashMap};
use serde::{Deserialize, Serialize};

use crate::check::{Check, Measure, Reply};
use crate::policy::{Client, Policy};
use crate::window::{Window, WindowConfig};

/// Seconds since the Unix epoch.
pub type Time = u64;

/// An open connection: which node holds its lease, and its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId {
    pub owner: u64,
    pub conn: u64,
}

/// One step of an SMTP session, as the milter reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// Counts ConnRate; decides it and ConnOpen, and takes a ConnOpen
    /// lease only if the connection is admitted.
    Connect { conn: ConnId, client: Client },
    /// At HELO: ConnRate and ConnOpen again, counting nothing.
    Recheck { client: Client },
    /// At MAIL FROM: decides MaxMsgs and the message rates (MsgRate,
    /// MsgRateFrom, MsgRateAuth) and, if allowed, reserves the message's
    /// slot in each: decided and counted at once, so that N messages pass
    /// whatever the concurrency. `msgs_in_conn` counts this MAIL.
    Mail { client: Client, msgs_in_conn: u32 },
    /// At RCPT TO: counts the recipient rates; decides them, MaxRcpt and
    /// the connection checks. `rcpts_in_msg` counts this RCPT.
    Rcpt { client: Client, rcpts_in_msg: u32 },
    /// A message that reserved its slots at MAIL FROM `held_secs` ago and
    /// did not reach end of message (RSET, abort, no recipient accepted,
    /// the connection lost): gives them back. The time is the milter's own
    /// measure of the wait, so no two clocks are compared.
    GiveBack { client: Client, held_secs: u64 },
    /// The connection ended: releases its lease.
    Close { conn: ConnId },
}

impl Event {
    /// Whether applying the event changes the state (a write that must go
    /// through the log) or only reads it.
    pub fn is_write(&self) -> bool {
        !matches!(self, Event::Recheck { .. })
    }
}

/// The checks a message reserves at MAIL FROM.
pub const MESSAGE_RATES: [Check; 3] = [Check::MsgRate, Check::MsgRateFrom, Check::MsgRateAuth];
/// The checks a recipient counts at RCPT TO.
pub const RECIPIENT_RATES: [Check; 3] = [Check::RcptRate, Check::RcptRateFrom, Check::RcptRateAuth];

/// Whether any of the windowed `checks` counts `client` under `policy`:
/// switched on, with a limit for it, and a key to count it by. When none
/// does, the event that would count them need not be written.
pub fn counts_any(policy: &Policy, checks: &[Check], client: &Client) -> bool {
    checks.iter().any(|&check| {
        policy.is_enabled(check)
            && counter_key(policy, check, client).is_some()
            && policy.limit(check, client).is_some()
    })
}

/// Whether ConnRate or ConnOpen limits `client` under `policy`: when
/// neither does, a connection needs no write (and no lease) at all.
pub fn limits_connections(policy: &Policy, client: &Client) -> bool {
    counts_any(policy, &[Check::ConnRate], client)
        || (policy.is_enabled(Check::ConnOpen)
            && client.ip.is_some()
            && policy.limit(Check::ConnOpen, client).is_some())
}

/// A per-connection check (MaxMsgs, MaxRcpt, MaxRcptFrom) for the
/// `count`-th MAIL or RCPT: what the milter decides on its own counts.
pub fn per_connection(
    policy: &Policy,
    check: Check,
    client: &Client,
    count: u32,
) -> Option<Refusal> {
    let limit = policy.limit(check, client)?;
    let count = u64::from(count);
    (count > limit).then_some(Refusal {
        check,
        count,
        limit,
        window_secs: None,
        retry_after: 0,
    })
}

/// Why an event was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub check: Check,
    pub count: u64,
    pub limit: u64,
    /// The window the count is over; `None` for open connections and the
    /// per-connection counts.
    pub window_secs: Option<u32>,
    /// When trying again could succeed, in seconds (0: now, on a new
    /// connection or message).
    pub retry_after: u64,
}

impl Refusal {
    /// What the client hears.
    pub fn reply(&self) -> Reply {
        self.check.reply(self.count, self.limit, self.window_secs)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Allow,
    Refuse(Refusal),
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow)
    }

    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Verdict::Allow => None,
            Verdict::Refuse(r) => Some(r),
        }
    }
}

/// Who a windowed counter counts: a client address or a name (sender,
/// AUTH user).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CounterKey {
    Ip(IpAddr),
    Name(Box<str>),
}

impl std::fmt::Display for CounterKey {
    /// The address, or the name as written.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CounterKey::Ip(ip) => write!(f, "{ip}"),
            CounterKey::Name(name) => f.write_str(name),
        }
    }
}

/// One windowed counter: a check and who it counts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CounterId {
    pub check: Check,
    pub key: CounterKey,
}

/// A borrowed [`CounterKey`] for lookups without allocating. The variants
/// and fields mirror the owned ones, so both hash alike.
#[derive(Hash)]
enum CounterKeyRef<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

#[derive(Hash)]
struct CounterIdRef<'a> {
    check: Check,
    key: CounterKeyRef<'a>,
}

impl Equivalent<CounterId> for CounterIdRef<'_> {
    fn equivalent(&self, id: &CounterId) -> bool {
        self.check == id.check
            && match (&self.key, &id.key) {
                (CounterKeyRef::Ip(a), CounterKey::Ip(b)) => a == b,
                (CounterKeyRef::Name(a), CounterKey::Name(b)) => *a == &**b,
                _ => false,
            }
    }
}

impl CounterKeyRef<'_> {
    fn to_owned(&self) -> CounterKey {
        match *self {
            CounterKeyRef::Ip(ip) => CounterKey::Ip(ip),
            CounterKeyRef::Name(n) => CounterKey::Name(n.into()),
        }
    }
}

/// Whether the `count`-th event is the one that reaches 80% of `limit`.
fn crosses_near_limit(count: u64, limit: u64) -> bool {
    let (num, den) = NEAR_LIMIT;
    limit > 0 && count * den >= limit * num && (count - 1) * den < limit * num
}

/// The key a windowed check counts a client by, if the client has one:
/// an IPv6 address by its `IPv6Prefix` network.
fn counter_key<'a>(policy: &Policy, check: Check, client: &'a Client) -> Option<CounterKeyRef<'a>> {
    use crate::check::KeyKind;
    match check.key_kind() {
        KeyKind::Client => client
            .ip
            .map(|ip| CounterKeyRef::Ip(policy.counted_address(ip))),
        KeyKind::Sender => client.sender.as_deref().map(CounterKeyRef::Name),
        KeyKind::AuthUser => client.auth.as_deref().map(CounterKeyRef::Name),
    }
}

/// Who `check` counts `client` as, as logs and reports show it: the
/// address (an IPv6 client's `ADDRESS/N` network), the sender or the AUTH
/// user; `None` if the client has no such key.
pub fn counted_as(policy: &Policy, check: Check, client: &Client) -> Option<String> {
    use crate::check::KeyKind;
    match check.key_kind() {
        KeyKind::Client => client.ip.map(|ip| policy.counted_text(ip)),
        KeyKind::Sender => client.sender.clone(),
        KeyKind::AuthUser => client.auth.clone(),
    }
}

/// The engine's counters and leases, to store and send. Windows are kept
/// in the shape of the policy's window at the time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EngineState {
    pub counters: Vec<(CounterId, Window)>,
    pub leases: Vec<(ConnId, IpAddr)>,
    pub swept: u64,
}

/// The limiter state.
#[derive(Clone, Debug)]
pub struct Engine {
    policy: Arc<Policy>,
    window: WindowConfig,
    counters: HashMap<CounterId, Window>,
    /// Open connections and the address each counts against.
    leases: HashMap<ConnId, IpAddr>,
    /// Open connections per address; an address with none has no entry.
    open: HashMap<IpAddr, u32>,
    /// The bucket in which idle counters were last swept away.
    swept: u64,
    /// How often a key's count climbed to 80% of its limit, by check: a
    /// figure for monitoring, not part of the decisions or of snapshots.
    near_limit: [u64; Check::ALL.len()],
}

/// The share of a limit at which a count is "near" it: 4/5.
const NEAR_LIMIT: (u64, u64) = (4, 5);

impl Engine {
    pub fn new(policy: Arc<Policy>) -> Engine {
        Engine {
            window: policy.window(),
            policy,
            counters: HashMap::new(),
            leases: HashMap::new(),
            open: HashMap::new(),
            swept: 0,
            near_limit: [0; Check::ALL.len()],
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Puts a new policy in force and keeps every count. If the window
    /// changed, each count moves to the new bucket of its time. If
    /// `IPv6Prefix` changed, IPv6 clients' counts start again under their
    /// new networks (the old ones would never be matched again);
    /// connections already open stay counted where they were.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        let (from, to) = (self.window, policy.window());
        if from != to {
            for w in self.counters.values_mut() {
                *w = w.rebucket(from, to);
            }
        }
        if policy.ipv6_prefix() != self.policy.ipv6_prefix() {
            self.counters
                .retain(|id, _| !matches!(id.key, CounterKey::Ip(IpAddr::V6(_))));
        }
        self.window = to;
        self.policy = policy;
    }

    /// Applies one event at `now` and returns its verdict.
    pub fn apply(&mut self, event: &Event, now: Time) -> Verdict {
        self.sweep_if_due(now);
        match event {
            Event::Connect { conn, client } => {
                self.count(&[Check::ConnRate], client, now);
                // A refused connection takes no slot: it must not lock out
                // the ones admitted before it.
                let verdict = self
                    .over(Check::ConnRate, client, now, 0)
                    .or_else(|| self.over_open(*conn, client, now))
                    .map_or(Verdict::Allow, Verdict::Refuse);
                if let (Verdict::Allow, Some(ip)) = (&verdict, client.ip) {
                    self.acquire(*conn, self.policy.counted_address(ip));
                }
                verdict
            }
            Event::Recheck { .. } => self.read(event, now),
            Event::Mail { client, .. } => {
                let verdict = self.read(event, now);
                if verdict.is_allowed() {
                    self.count(&MESSAGE_RATES, client, now);
                }
                verdict
            }
            Event::GiveBack { client, held_secs } => {
                let at = now.saturating_sub(*held_secs);
                self.take_back(&MESSAGE_RATES, client, at, now);
                Verdict::Allow
            }
            Event::Rcpt {
                client,
                rcpts_in_msg,
            } => {
                const RATES: [Check; 3] = RECIPIENT_RATES;
                self.count(&RATES, client, now);
                match self.connection_verdict(client, now) {
                    Verdict::Allow => [Check::MaxRcpt, Check::MaxRcptFrom]
                        .into_iter()
                        .find_map(|c| self.per_connection(c, client, *rcpts_in_msg))
                        .or_else(|| RATES.into_iter().find_map(|c| self.over(c, client, now, 0)))
                        .map_or(Verdict::Allow, Verdict::Refuse),
                    refused => refused,
                }
            }
            Event::Close { conn } => {
                self.release(*conn);
                Verdict::Allow
            }
        }
    }

    /// Decides a Recheck, or what a Mail would be answered, without
    /// changing anything. Other events are answered as if allowed.
    pub fn read(&self, event: &Event, now: Time) -> Verdict {
        match event {
            Event::Recheck { client } => self.connection_verdict(client, now),
            Event::Mail {
                client,
                msgs_in_conn,
            } => self
                .per_connection(Check::MaxMsgs, client, *msgs_in_conn)
                .or_else(|| self.message_rates(client, now))
                .map_or(Verdict::Allow, Verdict::Refuse),
            _ => Verdict::Allow,
        }
    }

    /// Everything but the policy, to snapshot.
    pub fn state(&self) -> EngineState {
        EngineState {
            counters: self
                .counters
                .iter()
                .map(|(id, w)| (id.clone(), w.clone()))
                .collect(),
            leases: self.leases.iter().map(|(c, ip)| (*c, *ip)).collect(),
            swept: self.swept,
        }
    }

    /// An engine with a snapshot's state, deciding with `policy`.
    pub fn from_state(policy: Arc<Policy>, state: EngineState) -> Engine {
        let mut engine = Engine::new(policy);
        engine.counters = state.counters.into_iter().collect();
        for (conn, ip) in state.leases {
            engine.acquire(conn, ip);
        }
        engine.swept = state.swept;
        engine
    }

    pub fn lease_ids(&self) -> impl Iterator<Item = &ConnId> {
        self.leases.keys()
    }

    /// The count of a windowed check for a client at `now`.
    pub fn count_of(&self, check: Check, client: &Client, now: Time) -> u64 {
        match check.measure() {
            Measure::Window => counter_key(&self.policy, check, client)
                .and_then(|key| self.counters.get(&CounterIdRef { check, key }))
                .map_or(0, |w| u64::from(w.count(self.window, now))),
            Measure::Open => client
                .ip
                .map_or(0, |ip| self.open_count(self.policy.counted_address(ip))),
            Measure::PerConnection => 0,
        }
    }

    /// Open connections counted under `ip` (an IPv6 client's network's
    /// first address: see [`Policy::counted_address`]).
    pub fn open_count(&self, ip: IpAddr) -> u64 {
        self.open.get(&ip).copied().map_or(0, u64::from)
    }

    /// How many (check, key) counters are kept.
    pub fn counters_len(&self) -> usize {
        self.counters.len()
    }

    pub fn leases_len(&self) -> usize {
        self.leases.len()
    }

    /// Releases every lease of a node (a node that stopped heartbeating).
    pub fn release_owner(&mut self, owner: u64) -> usize {
        let gone: Vec<ConnId> = self
            .leases
            .keys()
            .filter(|c| c.owner == owner)
            .copied()
            .collect();
        gone.iter().for_each(|c| self.release(*c));
        gone.len()
    }

    /// Adds one event to each enabled windowed check of `checks`.
    fn count(&mut self, checks: &[Check], client: &Client, now: Time) {
        for &check in checks {
            if !self.policy.is_enabled(check) {
                continue;
            }
            let Some(key) = counter_key(&self.policy, check, client) else {
                continue;
            };
            let window = self.window;
            let lookup = CounterIdRef { check, key };
            let count = match self.counters.get_mut(&lookup) {
                Some(w) => w.add(window, now, 1),
                None => {
                    let mut w = Window::new(window);
                    let count = w.add(window, now, 1);
                    self.counters.insert(
                        CounterId {
                            check,
                            key: lookup.key.to_owned(),
                        },
                        w,
                    );
                    count
                }
            };
            if let Some(limit) = self.policy.limit(check, client) {
                if crosses_near_limit(u64::from(count), limit) {
                    self.near_limit[check.index()] += 1;
                }
            }
        }
    }

    /// Takes back one event of each enabled windowed check of `checks`
    /// that was counted at `at`.
    fn take_back(&mut self, checks: &[Check], client: &Client, at: Time, now: Time) {
        for &check in checks {
            if !self.policy.is_enabled(check) {
                continue;
            }
            let Some(key) = counter_key(&self.policy, check, client) else {
                continue;
            };
            if let Some(w) = self.counters.get_mut(&CounterIdRef { check, key }) {
                w.take_back(self.window, at, now);
            }
        }
    }

    /// How often a count climbed to 80% of its limit, per check (in
    /// [`Check::ALL`] order), since this engine was made.
    pub fn near_limit_crossings(&self) -> [u64; Check::ALL.len()] {
        self.near_limit
    }

    /// Every windowed counter with its count at `now` (idle ones included
    /// until the next sweep).
    pub fn counts(&self, now: Time) -> impl Iterator<Item = (&CounterId, u64)> + '_ {
        self.counters
            .iter()
            .map(move |(id, w)| (id, u64::from(w.count(self.window, now))))
    }

    /// Open connections by client address.
    pub fn open_counts(&self) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        self.open.iter().map(|(ip, n)| (*ip, u64::from(*n)))
    }

    /// Forgets the windowed counts of `key`, for one check or all of them;
    /// returns how many counters were cleared. An IPv6 address resets its
    /// network's counts. Open connections stay: they are real connections
    /// and end at their close.
    pub fn reset(&mut self, key: &CounterKey, check: Option<Check>) -> usize {
        let counted;
        let key = match key {
            CounterKey::Ip(ip) => {
                counted = CounterKey::Ip(self.policy.counted_address(*ip));
                &counted
            }
            other => other,
        };
        let before = self.counters.len();
        self.counters
            .retain(|id, _| !(&id.key == key && check.is_none_or(|c| c == id.check)));
        before - self.counters.len()
    }

    fn acquire(&mut self, conn: ConnId, ip: IpAddr) {
        // A retried Connect must not take a second slot.
        if self.leases.insert(conn, ip).is_none() {
            *self.open.entry(ip).or_insert(0) += 1;
        }
    }

    fn release(&mut self, conn: ConnId) {
        let Some(ip) = self.leases.remove(&conn) else {
            return;
        };
        if let Some(n) = self.open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }

    /// ConnOpen at connect: refused when this connection would be one too
    /// many. A retried Connect that already holds its slot is counted in.
    fn over_open(&self, conn: ConnId, client: &Client, now: Time) -> Option<Refusal> {
        let pending = u64::from(!self.leases.contains_key(&conn));
        // The reply names the connection that would be one too many: (6/5).
        self.over(Check::ConnOpen, client, now, pending)
            .map(|r| Refusal {
                count: r.count + pending,
                ..r
            })
    }

    /// ConnRate then ConnOpen, as at helo and every rcpt: an admitted
    /// connection is counted among the open ones, so it is refused only if
    /// the limit was lowered below what is open.
    fn connection_verdict(&self, client: &Client, now: Time) -> Verdict {
        self.over(Check::ConnRate, client, now, 0)
            .or_else(|| self.over(Check::ConnOpen, client, now, 0))
            .map_or(Verdict::Allow, Verdict::Refuse)
    }

    /// MsgRate, MsgRateFrom, MsgRateAuth at MAIL FROM: the message about to
    /// be sent must fit, so N messages pass and the (N+1)-th is refused.
    fn message_rates(&self, client: &Client, now: Time) -> Option<Refusal> {
        MESSAGE_RATES
            .into_iter()
            .find_map(|c| self.over(c, client, now, 1))
    }

    /// Refuses when `count + pending` exceeds the limit of a windowed or
    /// open-connection check.
    fn over(&self, check: Check, client: &Client, now: Time, pending: u64) -> Option<Refusal> {
        let limit = self.policy.limit(check, client)?;
        let count = self.count_of(check, client, now);
        if count + pending <= limit {
            return None;
        }
        let (window, retry_after) = match check.measure() {
            Measure::Window => {
                let w = counter_key(&self.policy, check, client)
                    .and_then(|key| self.counters.get(&CounterIdRef { check, key }));
                let retry = w.map_or(0, |w| w.retry_after(self.window, now, limit));
                (Some(self.window.window_secs()), retry)
            }
            // Nobody knows when a connection will close; a bucket is a fair wait.
            _ => (None, u64::from(self.window.bucket_secs())),
        };
        Some(Refusal {
            check,
            count,
            limit,
            window_secs: window,
            retry_after,
        })
    }

    /// MaxMsgs, MaxRcpt, MaxRcptFrom: counts the milter keeps per connection.
    fn per_connection(&self, check: Check, client: &Client, count: u32) -> Option<Refusal> {
        per_connection(&self.policy, check, client, count)
    }

    /// Forgets counters with nothing left in their window, once per bucket,
    /// so memory follows the active clients, not every client ever seen.
    fn sweep_if_due(&mut self, now: Time) {
        let bucket = self.window.bucket_of(now);
        if bucket > self.swept {
            let window = self.window;
            self.counters.retain(|_, w| !w.is_idle(window, now));
            self.swept = bucket;
        }
    }
}
