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

use crate::baseline::{Baseline, UnusualConfig};
use crate::check::{Check, Measure, Reply};
use crate::peaks::HourlyPeaks;
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

impl CounterId {
    fn as_lookup(&self) -> CounterIdRef<'_> {
        let key = match &self.key {
            CounterKey::Ip(ip) => CounterKeyRef::Ip(*ip),
            CounterKey::Name(n) => CounterKeyRef::Name(n),
        };
        CounterIdRef {
            check: self.check,
            key,
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
    /// Each counter's window and its peak since its baseline caught up.
    pub counters: Vec<(CounterId, Window, u32)>,
    pub leases: Vec<(ConnId, IpAddr)>,
    pub swept: u64,
    /// What is usual for each key, and the counters unusual now.
    pub baselines: Vec<(CounterId, Baseline)>,
    pub unusual: Vec<CounterId>,
}

/// A key's hourly peaks as the engine holds them: those its baseline
/// kept (shared), and the peak of its counter in the hour in progress
/// (hour since the Unix epoch, count), not yet folded in.
#[derive(Clone, Debug)]
pub struct PeaksNow {
    kept: HourlyPeaks,
    now: Option<(u64, u32)>,
}

impl PeaksNow {
    /// The peaks, the hour in progress included (a copy of 336 bytes if
    /// that hour raises one).
    pub fn peaks(self) -> HourlyPeaks {
        let mut peaks = self.kept;
        if let Some((hour, peak)) = self.now {
            peaks.note(hour, peak);
        }
        peaks
    }
}

/// A windowed counter and where it stands against its baseline.
#[derive(Clone, Debug)]
struct Counter {
    window: Window,
    /// The count in one bucket at which the key becomes unusual, from its
    /// baseline for the hour of the bucket after its last learned one
    /// (`u32::MAX`: never).
    trip: u32,
    unusual: bool,
    /// The bucket from which its key's baseline is due to catch up again
    /// (worked out from [`Baseline::last`] by [`due_bucket`], to know
    /// without a lookup), or [`NO_BASELINE`]. A `u32` like the window's
    /// buckets, so that a counter takes 40 bytes.
    due: u32,
    /// The highest count in the window since the baseline last caught
    /// up, for its hourly peaks.
    peak: u32,
}

/// [`Counter::due`] of a key with no baseline (off, or no room).
const NO_BASELINE: u32 = u32::MAX;

/// When a baseline that has learned up to bucket `last` is due to catch
/// up: a window on, less a bucket of slack (a give-back may have moved the
/// ring on without an event that would have caught up), or at the first
/// bucket of the next hour, as each hour has its usual count. Below
/// [`NO_BASELINE`] (bucket numbers reach it in 2106 with 1 s buckets).
fn due_bucket(last: u64, window: WindowConfig) -> u32 {
    let size = u64::from(window.bucket_secs());
    let next_hour = ((last + 1) * size / 3600 + 1) * 3600;
    let due = (last + u64::from(window.buckets()) - 1).min(next_hour.div_ceil(size));
    due.min(u64::from(NO_BASELINE - 1)) as u32
}

impl Counter {
    fn new(window: WindowConfig) -> Counter {
        Counter {
            window: Window::new(window),
            trip: u32::MAX,
            unusual: false,
            due: NO_BASELINE,
            peak: 0,
        }
    }
}

/// A key that became unusual: its count in the window and in the bucket
/// that tripped, and its usual count per bucket (`None`: no history).
#[derive(Clone, Debug, PartialEq)]
pub struct Flag {
    pub check: Check,
    pub key: CounterKey,
    pub count: u64,
    pub bucket_count: u64,
    pub usual: Option<f32>,
    pub limit: Option<u64>,
}

/// Seconds a give-back's slot is looked for before the time its
/// `held_secs` gives (see [`Engine::apply`]).
const GIVE_BACK_SLACK_SECS: u64 = 2;

/// Flags kept until the caller takes them; more are counted, not kept.
const MAX_PENDING_FLAGS: usize = 1024;

/// The limiter state.
#[derive(Clone, Debug)]
pub struct Engine {
    policy: Arc<Policy>,
    window: WindowConfig,
    counters: HashMap<CounterId, Counter>,
    /// What is usual per (check, key), kept after a counter goes idle; at
    /// most `UnusualKeys` of them after each sweep.
    baselines: HashMap<CounterId, Baseline>,
    /// Counters unusual now, by check.
    unusual: [u64; Check::ALL.len()],
    /// Keys that became unusual, for the caller to log.
    flags: Vec<Flag>,
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
            baselines: HashMap::new(),
            unusual: [0; Check::ALL.len()],
            flags: Vec::new(),
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
            for c in self.counters.values_mut() {
                c.window = c.window.rebucket(from, to);
            }
            // Usual counts are per bucket: a bigger bucket holds more.
            let ratio = to.bucket_secs() as f32 / from.bucket_secs() as f32;
            let rebucket = |b: u64| b * u64::from(from.bucket_secs()) / u64::from(to.bucket_secs());
            for b in self.baselines.values_mut() {
                b.rescale(ratio, rebucket(b.last()));
            }
            self.swept = rebucket(self.swept);
        }
        if policy.ipv6_prefix() != self.policy.ipv6_prefix() {
            let v4 = |id: &CounterId| !matches!(id.key, CounterKey::Ip(IpAddr::V6(_)));
            self.counters.retain(|id, _| v4(id));
            self.baselines.retain(|id, _| v4(id));
        }
        self.window = to;
        self.policy = policy;
        self.retrip();
    }

    /// Sets every counter's copy of its baseline's last bucket and its
    /// trip from them, as its latest catch-up did, and recounts the
    /// unusual ones (after a policy change or a restore).
    fn retrip(&mut self) {
        let config = self.policy.unusual();
        let size = u64::from(self.window.bucket_secs());
        self.unusual = [0; Check::ALL.len()];
        for (id, c) in &mut self.counters {
            (c.due, c.trip) = match self.baselines.get(id) {
                Some(b) if config.is_on() => {
                    let next = b.last() + 1;
                    let due = due_bucket(b.last(), self.window);
                    (due, config.trip(b.usual(next * size)))
                }
                _ => (NO_BASELINE, u32::MAX),
            };
            c.unusual &= config.is_on();
            self.unusual[id.check.index()] += u64::from(c.unusual);
        }
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
                // The milter counts whole seconds on its own clock, and the
                // stamps of the reservation and of this event are the
                // leader's: the slot was taken up to a moment later than
                // `held_secs` says. A take-back looks from `at` on to newer
                // buckets, so `at` must not be later than the slot.
                let at = now.saturating_sub(held_secs.saturating_add(GIVE_BACK_SLACK_SECS));
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

    /// Lets time pass with no event: the once-a-bucket sweep runs if due,
    /// so that on a quiet cluster idle counters go and flags of keys that
    /// stopped clear (the state machine calls it at each heartbeat entry,
    /// with the leader's stamp, so every node sweeps alike).
    pub fn tick(&mut self, now: Time) {
        self.sweep_if_due(now);
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
                .map(|(id, c)| (id.clone(), c.window.clone(), c.peak))
                .collect(),
            leases: self.leases.iter().map(|(c, ip)| (*c, *ip)).collect(),
            swept: self.swept,
            baselines: self
                .baselines
                .iter()
                .map(|(id, b)| (id.clone(), b.clone()))
                .collect(),
            unusual: self
                .counters
                .iter()
                .filter(|(_, c)| c.unusual)
                .map(|(id, _)| id.clone())
                .collect(),
        }
    }

    /// An engine with a snapshot's state, deciding with `policy`.
    pub fn from_state(policy: Arc<Policy>, state: EngineState) -> Engine {
        let policy_window = policy.window();
        let mut engine = Engine::new(policy);
        engine.counters = state
            .counters
            .into_iter()
            .map(|(id, window, peak)| {
                let c = Counter {
                    window,
                    peak,
                    ..Counter::new(policy_window)
                };
                (id, c)
            })
            .collect();
        for (conn, ip) in state.leases {
            engine.acquire(conn, ip);
        }
        engine.swept = state.swept;
        engine.baselines = state.baselines.into_iter().collect();
        for id in state.unusual {
            if let Some(c) = engine.counters.get_mut(&id) {
                c.unusual = true;
            }
        }
        engine.retrip();
        engine
    }

    /// Counters unusual now, per check (in [`Check::ALL`] order).
    pub fn unusual_counts(&self) -> [u64; Check::ALL.len()] {
        self.unusual
    }

    /// Whether a windowed counter is unusual at `now`: flagged, and
    /// counting in this bucket or the one before (a flag is cleared at the
    /// first event of a later bucket; one seen before then is not shown).
    pub fn is_unusual(&self, id: &CounterId, now: Time) -> bool {
        let bucket = self.window.bucket_of(now);
        self.counters
            .get(id)
            .is_some_and(|c| c.unusual && c.window.newest() + 1 >= bucket)
    }

    /// The usual count per bucket of a (check, key) at `now`, if it has
    /// a history.
    pub fn usual(&self, id: &CounterId, now: Time) -> Option<f32> {
        self.baselines.get(id).and_then(|b| b.usual(now))
    }

    /// Events of a windowed counter in the bucket of `now`.
    pub fn bucket_count(&self, id: &CounterId, now: Time) -> u64 {
        let bucket = self.window.bucket_of(now);
        self.counters
            .get(id)
            .map_or(0, |c| u64::from(c.window.bucket_count(bucket)))
    }

    /// The windowed counter a check counts `client` by, if it has a key.
    pub fn counted_id(&self, check: Check, client: &Client) -> Option<CounterId> {
        counter_key(&self.policy, check, client).map(|key| CounterId {
            check,
            key: key.to_owned(),
        })
    }

    /// Each (check, key) with a baseline, and its hourly peaks, the hour
    /// in progress included. At most `UnusualKeys` keys. The peaks are
    /// shared, not copied ([`PeaksNow::peaks`] copies them), so that a
    /// caller holding a lock collects them quickly and copies after.
    pub fn hourly_peaks(&self) -> impl Iterator<Item = (&CounterId, PeaksNow)> {
        let size = u64::from(self.window.bucket_secs());
        self.baselines.iter().map(move |(id, b)| {
            let now = self
                .counters
                .get(id)
                .filter(|c| c.peak > 0)
                .map(|c| (c.window.newest() * size / 3600, c.peak));
            let shared = PeaksNow {
                kept: b.peaks().clone(),
                now,
            };
            (id, shared)
        })
    }

    /// How many baselines are kept.
    pub fn baselines_len(&self) -> usize {
        self.baselines.len()
    }

    /// The keys that became unusual since the last call, oldest first
    /// (at most 1024; the others are only counted in the gauge).
    pub fn take_flags(&mut self) -> Vec<Flag> {
        std::mem::take(&mut self.flags)
    }

    pub fn lease_ids(&self) -> impl Iterator<Item = &ConnId> {
        self.leases.keys()
    }

    /// The count of a windowed check for a client at `now`.
    pub fn count_of(&self, check: Check, client: &Client, now: Time) -> u64 {
        match check.measure() {
            Measure::Window => counter_key(&self.policy, check, client)
                .and_then(|key| self.counters.get(&CounterIdRef { check, key }))
                .map_or(0, |c| u64::from(c.window.count(self.window, now))),
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
        let config = self.policy.unusual();
        let bucket = self.window.bucket_of(now);
        for &check in checks {
            if !self.policy.is_enabled(check) {
                continue;
            }
            let Some(key) = counter_key(&self.policy, check, client) else {
                continue;
            };
            let window = self.window;
            let lookup = CounterIdRef { check, key };
            let mut fresh = false;
            let c = match self.counters.get_mut(&lookup) {
                Some(c) => c,
                None => {
                    fresh = true;
                    let id = CounterId {
                        check,
                        key: lookup.key.to_owned(),
                    };
                    self.counters.entry(id).or_insert(Counter::new(window))
                }
            };
            // A counter's first event in a bucket judges the bucket before;
            // the others cost one comparison.
            if config.is_on() && (fresh || c.window.newest() < bucket) {
                let judge = Judge {
                    config,
                    window,
                    baselines: &mut self.baselines,
                    unusual: &mut self.unusual[check.index()],
                };
                judge.bucket_starts(&lookup, c, bucket, fresh);
            }
            let count = c.window.add(window, now, 1);
            c.peak = c.peak.max(count);
            let newly_unusual = !c.unusual && c.window.newest_count() >= c.trip;
            if newly_unusual {
                c.unusual = true;
                let bucket_count = u64::from(c.window.newest_count());
                self.became_unusual(check, &lookup.key, client, count, bucket_count, now);
            }
            if let Some(limit) = self.policy.limit(check, client) {
                if crosses_near_limit(u64::from(count), limit) {
                    self.near_limit[check.index()] += 1;
                }
            }
        }
    }

    fn became_unusual(
        &mut self,
        check: Check,
        key: &CounterKeyRef<'_>,
        client: &Client,
        count: u32,
        bucket_count: u64,
        now: Time,
    ) {
        self.unusual[check.index()] += 1;
        if self.flags.len() < MAX_PENDING_FLAGS {
            let key = key.to_owned();
            let id = CounterId { check, key };
            let usual = self.usual(&id, now);
            self.flags.push(Flag {
                check,
                key: id.key,
                count: u64::from(count),
                bucket_count,
                usual,
                limit: self.policy.limit(check, client),
            });
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
            if let Some(c) = self.counters.get_mut(&CounterIdRef { check, key }) {
                c.window.take_back(self.window, at, now);
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
            .map(move |(id, c)| (id, u64::from(c.window.count(self.window, now))))
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
        let gone = |id: &CounterId| &id.key == key && check.is_none_or(|c| c == id.check);
        self.counters.retain(|id, _| !gone(id));
        // A reset key starts anew: no history, not unusual.
        self.baselines.retain(|id, _| !gone(id));
        let cleared = before - self.counters.len();
        self.retrip();
        cleared
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
                let c = counter_key(&self.policy, check, client)
                    .and_then(|key| self.counters.get(&CounterIdRef { check, key }));
                let retry = c.map_or(0, |c| c.window.retry_after(self.window, now, limit));
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
    ///
    /// With baselines on, a counter going idle first learns the buckets it
    /// had not learned, and an unusual one whose last bucket was usual is
    /// cleared (live counters are judged at their first event in a bucket;
    /// see [`Judge::bucket_starts`]). When the baselines are full, the
    /// least recent of idle keys are forgotten, once a window.
    fn sweep_if_due(&mut self, now: Time) {
        let bucket = self.window.bucket_of(now);
        if bucket <= self.swept {
            return;
        }
        let window = self.window;
        let config = self.policy.unusual();
        let (baselines, unusual) = (&mut self.baselines, &mut self.unusual);
        self.counters.retain(|id, c| {
            let idle = c.window.is_idle(window, now);
            let unusual = &mut unusual[id.check.index()];
            if config.is_on() && !idle && c.unusual {
                Judge::clear_if_usual(c, bucket, unusual);
            }
            if config.is_on() && idle && c.due != NO_BASELINE {
                let judge = Judge {
                    config,
                    window,
                    baselines: &mut *baselines,
                    unusual: &mut *unusual,
                };
                judge.catch_up(&id.as_lookup(), c, bucket, false, false);
            }
            if idle && c.unusual {
                c.unusual = false;
                *unusual -= 1;
            }
            !idle
        });
        let len = u64::from(window.buckets());
        let full = self.baselines.len() >= config.keys as usize;
        if full && bucket / len > self.swept / len {
            self.forget_least_recent(config.keys as usize);
        }
        self.swept = bucket;
    }

    /// Forgets the least recent baselines of keys with no live counter
    /// (ties in key order, so that every node keeps the same) until
    /// `keep * 9 / 10` (at least one fewer than `keep`) are left, or none
    /// of them is. Live keys keep theirs:
    /// a key new when the table is full of live ones is not judged, rather
    /// than judged in turns with the others.
    fn forget_least_recent(&mut self, keep: usize) {
        let keep = keep - (keep / 10).max(1);
        let Some(excess) = self.baselines.len().checked_sub(keep).filter(|n| *n > 0) else {
            return;
        };
        let counters = &self.counters;
        let mut idle: Vec<(u64, &CounterId)> = self
            .baselines
            .iter()
            .filter(|(id, _)| !counters.contains_key(*id))
            .map(|(id, b)| (b.last(), id))
            .collect();
        let oldest_first = |a: &(u64, &CounterId), b: &(u64, &CounterId)| {
            a.0.cmp(&b.0)
                .then(a.1.check.cmp(&b.1.check))
                .then_with(|| key_order(&a.1.key, &b.1.key))
        };
        if idle.len() > excess {
            idle.select_nth_unstable_by(excess, oldest_first);
            idle.truncate(excess);
        }
        let gone: Vec<CounterId> = idle.into_iter().map(|(_, id)| id.clone()).collect();
        for id in gone {
            self.baselines.remove(&id);
        }
    }
}

/// What judging one counter against its key's baseline needs, borrowed
/// apart from the counter table.
struct Judge<'a> {
    config: UnusualConfig,
    window: WindowConfig,
    baselines: &'a mut HashMap<CounterId, Baseline>,
    /// Counters unusual now, of the counter's check.
    unusual: &'a mut u64,
}

impl Judge<'_> {
    /// A counter's first event in `bucket` (`fresh`: it has just been
    /// made): the flag clears if the bucket before was under the trip, and
    /// the baseline catches up when due: once a window, at the start of an
    /// hour (each hour has its usual count), and for a key that has no
    /// baseline, when there is room for one. So a key costs a baseline
    /// lookup once a window, not once a bucket.
    fn bucket_starts(self, id: &CounterIdRef<'_>, c: &mut Counter, bucket: u64, fresh: bool) {
        if c.unusual {
            Judge::clear_if_usual(c, bucket, self.unusual);
        }
        let due = if fresh {
            true
        } else if c.due == NO_BASELINE {
            self.baselines.len() < self.config.keys as usize
        } else {
            bucket >= u64::from(c.due)
        };
        if due {
            self.catch_up(id, c, bucket, true, fresh);
        }
    }

    /// Clears an unusual counter's flag if its count in the bucket before
    /// `bucket` was under the trip it had then.
    fn clear_if_usual(c: &mut Counter, bucket: u64, unusual: &mut u64) {
        let last = bucket.saturating_sub(1);
        if c.unusual && c.window.bucket_count(last) < c.trip {
            c.unusual = false;
            *unusual -= 1;
        }
    }

    /// Brings a counter's baseline up to `bucket`: learns the buckets
    /// before it that it has not learned (at most a window of them; a
    /// bucket that reached the trip is learned as unusual, slowly), and
    /// sets the counter's trip for the hour of `bucket`. A key without a
    /// baseline gets one if there is room and `make` (its counter is not
    /// going away); otherwise it is not judged. A `fresh` counter learns
    /// nothing from before `bucket`: its key had no counter then. Every
    /// node does this at the same events, so all keep the same baselines.
    fn catch_up(
        self,
        id: &CounterIdRef<'_>,
        c: &mut Counter,
        bucket: u64,
        make: bool,
        fresh: bool,
    ) {
        let size = u64::from(self.window.bucket_secs());
        let room = self.baselines.len() < self.config.keys as usize;
        let b = match self.baselines.get_mut(id) {
            Some(b) => b,
            None if make && room => {
                let owned = CounterId {
                    check: id.check,
                    key: id.key.to_owned(),
                };
                self.baselines.entry(owned).or_default()
            }
            None => {
                (c.due, c.trip, c.peak) = (NO_BASELINE, u32::MAX, 0);
                return;
            }
        };
        if fresh || c.due == NO_BASELINE {
            b.skip_until(bucket);
        }
        // Every event since the last catch-up was in the hour of the
        // newest bucket: a catch-up is due at each hour's start.
        b.note_peak(c.window.newest() * size / 3600, std::mem::take(&mut c.peak));
        let oldest = bucket.saturating_sub(u64::from(self.window.buckets()));
        for k in (b.last() + 1).max(oldest)..bucket {
            let n = c.window.bucket_count(k);
            b.learn(k, k * size, n, n >= c.trip);
        }
        c.due = due_bucket(b.last(), self.window);
        c.trip = self.config.trip(b.usual((b.last() + 1) * size));
    }
}

/// An order of keys that is the same on every node.
fn key_order(a: &CounterKey, b: &CounterKey) -> std::cmp::Ordering {
    match (a, b) {
        (CounterKey::Ip(a), CounterKey::Ip(b)) => a.cmp(b),
        (CounterKey::Name(a), CounterKey::Name(b)) => a.cmp(b),
        (CounterKey::Ip(_), CounterKey::Name(_)) => std::cmp::Ordering::Less,
        (CounterKey::Name(_), CounterKey::Ip(_)) => std::cmp::Ordering::Greater,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "CHECK_CONN_RATE YES\nConnRate:default 1000\n";

    fn engine(extra: &str) -> Engine {
        let text = format!("{POLICY}{extra}");
        Engine::new(Arc::new(Policy::parse_str("p", &text).unwrap()))
    }

    fn connect(e: &mut Engine, ip: &str, now: Time) -> Verdict {
        let client = Client::from_ip(ip.parse().unwrap());
        let conn = ConnId { owner: 1, conn: 1 };
        let v = e.apply(&Event::Connect { conn, client }, now);
        e.apply(&Event::Close { conn }, now);
        v
    }

    /// `per_bucket(bucket)` connections in each 30 s bucket from `from`
    /// (a bucket number), spread over it; returns the flags raised.
    fn drive(
        e: &mut Engine,
        ip: &str,
        buckets: std::ops::Range<u64>,
        mut per_bucket: impl FnMut(u64) -> u64,
    ) -> Vec<(u64, Flag)> {
        let mut flags = Vec::new();
        for b in buckets {
            let n = per_bucket(b);
            for i in 0..n {
                let now = b * 30 + i * 30 / n.max(1);
                assert!(connect(e, ip, now).is_allowed(), "under the limit");
                flags.extend(e.take_flags().into_iter().map(|f| (now, f)));
            }
        }
        flags
    }

    /// A deterministic spread of `lo..=hi`.
    fn jitter(seed: u64, lo: u64, hi: u64) -> u64 {
        let x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (x >> 33) % (hi - lo + 1)
    }

    const DAY: u64 = 86_400 / 30;

    #[test]
    fn five_times_the_usual_rate_is_flagged_within_one_bucket() {
        let mut e = engine("");
        let start = 1_000_000 / 30 * 30 / 30;
        // Two hours at 4 per bucket: its usual. A new key sending 4 is
        // under the floor, so it is not flagged.
        assert!(drive(&mut e, "10.0.0.1", start..start + 240, |_| 4).is_empty());
        // Then 20 per bucket, still under the limit (1000 per 600 s).
        let at = start + 240;
        let flags = drive(&mut e, "10.0.0.1", at..at + 3, |_| 20);
        assert_eq!(flags.len(), 1, "flagged once, not on every event");
        let (when, flag) = &flags[0];
        assert!(*when < (at + 1) * 30, "within the first bucket: {when}");
        assert_eq!(flag.check, Check::ConnRate);
        assert_eq!(flag.key.to_string(), "10.0.0.1");
        assert_eq!(flag.usual, Some(4.0));
        assert_eq!(flag.limit, Some(1000));
        assert!(flag.count < 1000);
        assert_eq!(e.unusual_counts()[Check::ConnRate.index()], 1);
        // Back to usual: the flag clears at the next bucket's start.
        drive(&mut e, "10.0.0.1", at + 3..at + 5, |_| 4);
        assert_eq!(e.unusual_counts()[Check::ConnRate.index()], 0);
        // Flagged again, then nothing at all: time passing clears it.
        drive(&mut e, "10.0.0.1", at + 5..at + 6, |_| 40);
        assert_eq!(e.unusual_counts()[Check::ConnRate.index()], 1);
        e.tick((at + 7) * 30);
        assert_eq!(e.unusual_counts()[Check::ConnRate.index()], 0);
    }

    #[test]
    fn a_steady_key_is_never_flagged_over_a_week() {
        let mut e = engine("");
        // Busy days (20 to 40 a bucket from 09:00 to 17:00), quiet nights
        // (0 to 5), for a first day that learns, then a week.
        let rate = |b: u64| {
            let hour = (b % DAY) * 30 / 3600;
            if (9..17).contains(&hour) {
                jitter(b, 20, 40)
            } else {
                jitter(b, 0, 5)
            }
        };
        let first = drive(&mut e, "10.0.0.2", 0..DAY, rate);
        // What it had never done: sending above the floor at 09:00.
        assert!(!first.is_empty());
        let week = drive(&mut e, "10.0.0.2", DAY..8 * DAY, rate);
        assert_eq!(week, vec![], "no flag in the week");
        assert_eq!(e.unusual_counts(), [0; Check::ALL.len()]);
    }

    #[test]
    fn a_new_key_is_flagged_above_the_floor_only() {
        let mut e = engine("UnusualFloor 5\n");
        assert!(drive(&mut e, "10.0.0.3", 100..101, |_| 4).is_empty());
        let flags = drive(&mut e, "10.0.0.4", 100..101, |_| 5);
        assert_eq!(flags.len(), 1);
        assert_eq!(flags[0].1.usual, None);
    }

    #[test]
    fn factor_0_switches_baselines_off() {
        let mut e = engine("UnusualFactor 0\n");
        assert!(drive(&mut e, "10.0.0.5", 100..200, |b| (b - 95).min(40)).is_empty());
        assert_eq!(e.baselines_len(), 0);
    }

    #[test]
    fn baselines_are_capped_least_recent_first() {
        let mut e = engine("UnusualKeys 10\n");
        // Each key idle before the next sends, so each is learned last
        // in its own bucket.
        for i in 0..30u64 {
            connect(&mut e, &format!("10.1.0.{i}"), 1_000 + i * 700);
        }
        connect(&mut e, "10.1.1.1", 1_000 + 31 * 700);
        assert!(e.baselines_len() <= 10, "{}", e.baselines_len());
        let newest = CounterId {
            check: Check::ConnRate,
            key: CounterKey::Ip("10.1.0.29".parse().unwrap()),
        };
        assert!(e.baselines.contains_key(&newest));
    }

    #[test]
    fn a_key_with_no_room_for_a_baseline_is_not_judged() {
        let mut e = engine("UnusualKeys 2\n");
        // The first two keys to send take the room, in the order of events.
        for ip in ["10.2.0.3", "10.2.0.1", "10.2.0.2"] {
            drive(&mut e, ip, 100..101, |_| 4);
        }
        let has = |e: &Engine, ip: &str| {
            let id = CounterId {
                check: Check::ConnRate,
                key: CounterKey::Ip(ip.parse().unwrap()),
            };
            e.baselines.contains_key(&id)
        };
        assert!(has(&e, "10.2.0.3") && has(&e, "10.2.0.1") && !has(&e, "10.2.0.2"));
        // Sending far above the floor, 10.2.0.2 is not flagged as new, and
        // the live keys keep their baselines.
        assert!(drive(&mut e, "10.2.0.2", 101..103, |_| 30).is_empty());
        assert!(has(&e, "10.2.0.3") && has(&e, "10.2.0.1"));
    }

    #[test]
    fn baselines_of_idle_keys_go_first() {
        let mut e = engine("UnusualKeys 3\n");
        drive(&mut e, "10.3.0.1", 100..101, |_| 4);
        // 10.3.0.1 is idle a window later; the two others stay live.
        for b in 100..125 {
            drive(&mut e, "10.3.0.2", b..b + 1, |_| 2);
            drive(&mut e, "10.3.0.3", b..b + 1, |_| 2);
        }
        // Full: the next window's start forgets the idle key's baseline,
        // and the newcomer takes its room.
        drive(&mut e, "10.3.0.4", 140..141, |_| 2);
        drive(&mut e, "10.3.0.4", 141..142, |_| 2);
        let keys: Vec<String> = {
            let mut k: Vec<String> = e.baselines.keys().map(|id| id.key.to_string()).collect();
            k.sort();
            k
        };
        assert_eq!(keys, ["10.3.0.2", "10.3.0.3", "10.3.0.4"]);
    }

    /// Reserved at 59 s (the bucket of 30 to 59 s), given back at 60 s
    /// after less than a whole second held: the slot must come back,
    /// though 60 s - 0 s is in the next bucket. (CI saw a RSET's slot not
    /// come back, once in 50 rounds.)
    #[test]
    fn a_give_back_across_a_bucket_start_frees_the_slot() {
        let mut e = engine("CHECK_MSG_RATE YES\nMsgRate:default 1\n");
        let client = Client::from_ip("10.6.0.1".parse().unwrap());
        let mail = Event::Mail {
            client: client.clone(),
            msgs_in_conn: 1,
        };
        assert!(e.apply(&mail, 59).is_allowed());
        let back = Event::GiveBack {
            client: client.clone(),
            held_secs: 0,
        };
        e.apply(&back, 60);
        assert!(e.apply(&mail, 60).is_allowed(), "the slot came back");
        assert!(!e.apply(&mail, 61).is_allowed(), "and is taken again");
    }

    #[test]
    fn a_catch_up_is_due_a_window_on_or_at_the_next_hour() {
        let w = WindowConfig::new(600, 30).unwrap();
        // Hour 0 is buckets 0 to 119.
        assert_eq!(due_bucket(100, w), 119, "a window less a bucket on");
        assert_eq!(due_bucket(105, w), 120, "hour 1's first bucket");
        assert_eq!(due_bucket(119, w), 138, "learned to the hour's end");
        // 7 s buckets: bucket 514 starts at 3598 s, in hour 0; 515 is
        // the first to start in hour 1.
        let w = WindowConfig::new(700, 7).unwrap();
        assert_eq!(due_bucket(500, w), 515);
        let one = WindowConfig::new(30, 30).unwrap();
        assert_eq!(due_bucket(100, one), 100, "every bucket");
    }

    #[test]
    fn hourly_peaks_are_kept_per_hour_and_survive_a_snapshot() {
        let mut e = engine("");
        // 120 buckets of 30 s an hour.
        let (h, b0) = (500u64, 500 * 120);
        drive(&mut e, "10.5.0.1", b0..b0 + 2, |_| 3);
        // An hour later the window holds only the new hour's events.
        drive(&mut e, "10.5.0.1", b0 + 120..b0 + 121, |_| 2);
        let id = CounterId {
            check: Check::ConnRate,
            key: CounterKey::Ip("10.5.0.1".parse().unwrap()),
        };
        let at = |e: &Engine, now_hour: u64| {
            e.hourly_peaks()
                .find(|(i, _)| **i == id)
                .map(|(_, p)| p.peaks().hours(now_hour).collect::<Vec<_>>())
                .unwrap()
        };
        let peaks = |e: &Engine| at(e, h + 1);
        assert_eq!(peaks(&e), [(h, 6), (h + 1, 2)]);
        let snap = e.state();
        let r = Engine::from_state(e.policy().clone(), snap.clone());
        assert_eq!(peaks(&r), peaks(&e));
        // A week on, the first hour has left.
        assert_eq!(at(&e, h + 168), [(h + 1, 2)]);
        // The snapshot shares the block of peaks (its copy under the
        // state's lock is short), and keeps the peaks of then when the
        // engine notes hour h + 1 at its next catch-up.
        let kept = |e: &Engine| e.baselines[&id].peaks().clone();
        let (_, b) = &snap.baselines[0];
        assert!(b.peaks().same_block(&kept(&e)), "copied");
        drive(&mut e, "10.5.0.1", b0 + 240..b0 + 241, |_| 1);
        assert!(!b.peaks().same_block(&kept(&e)), "changed in place");
        assert_eq!(b.peaks().hours(h + 2).collect::<Vec<_>>(), [(h, 6)]);
        assert_eq!(
            kept(&e).hours(h + 2).collect::<Vec<_>>(),
            [(h, 6), (h + 1, 2)]
        );
    }

    /// A node that restores a snapshot and one that applied every event
    /// must go on alike: same baselines, trips and flags.
    #[test]
    fn a_restored_engine_goes_on_like_the_one_it_came_from() {
        let mut e = engine("UnusualKeys 50\n");
        let ips: Vec<String> = (0..80).map(|i| format!("10.4.0.{i}")).collect();
        // Bucket `b` for the keys `keys`; returns the flags raised.
        let step = |e: &mut Engine, b: u64, keys: std::ops::Range<usize>| {
            let mut flags = Vec::new();
            for i in keys {
                let n = jitter(b * 131 + i as u64, 0, 6) + if b % 97 == i as u64 { 40 } else { 0 };
                if !(b + i as u64).is_multiple_of(5) {
                    flags.extend(drive(e, &ips[i], b..b + 1, |_| n));
                }
            }
            flags
        };
        for b in 1000..1200 {
            step(&mut e, b, 0..80);
        }
        // The snapshot is taken halfway through a bucket.
        step(&mut e, 1200, 0..40);
        let mut r = Engine::from_state(e.policy().clone(), e.state());
        // A key that counted in this bucket before the snapshot bursts
        // after it: both must flag it at the same event.
        let burst = drive(&mut e, &ips[6], 1200..1201, |_| 40);
        assert!(!burst.is_empty());
        assert_eq!(drive(&mut r, &ips[6], 1200..1201, |_| 40), burst);
        let mut flags = 0;
        for b in 1200..1500 {
            let keys = if b == 1200 { 40..80 } else { 0..80 };
            let f = step(&mut e, b, keys.clone());
            flags += f.len();
            assert_eq!(step(&mut r, b, keys), f, "bucket {b}");
        }
        assert!(flags > 0);
        let sorted = |e: &Engine| {
            let mut v: Vec<String> = e
                .baselines
                .iter()
                .map(|(id, b)| format!("{id:?} {b:?}"))
                .collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&r), sorted(&e));
        assert_eq!(r.unusual_counts(), e.unusual_counts());
    }

    #[test]
    fn flags_and_baselines_survive_a_snapshot() {
        let mut e = engine("");
        drive(&mut e, "10.0.0.6", 1000..1100, |_| 4);
        drive(&mut e, "10.0.0.6", 1100..1101, |_| 20);
        assert_eq!(e.unusual_counts()[0], 1);
        let state = e.state();
        let r = Engine::from_state(e.policy().clone(), state);
        assert_eq!(r.unusual_counts(), e.unusual_counts());
        let id = CounterId {
            check: Check::ConnRate,
            key: CounterKey::Ip("10.0.0.6".parse().unwrap()),
        };
        assert!(r.is_unusual(&id, 1100 * 30 + 29));
        assert_eq!(r.usual(&id, 1100 * 30), e.usual(&id, 1100 * 30));
    }
}
