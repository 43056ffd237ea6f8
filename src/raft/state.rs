//! The replicated limiter state: the engine, the policy in force, which
//! request ids were already counted, and which nodes are alive to hold
//! open-connection leases. Every node applies the same commands with the
//! leader's time stamps and so holds the same state. Pure: no I/O, no clock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::check::Check;
use crate::engine::{ConnId, CounterKey, Engine, EngineState, Event, Verdict};
use crate::policy::{Policy, PolicyFile};

/// Milliseconds since the Unix epoch, as stamped by the leader.
pub type StampMs = u64;

/// How long a node's leases live after its last word, by default.
pub const DEFAULT_LEASE_TTL_MS: u64 = 60_000;

/// Which node first received an event, and its sequence there: a retried
/// event keeps its id and is counted once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The node's incarnation (a new one at each start), also the owner of
    /// the leases it takes.
    pub origin: u64,
    pub seq: u64,
}

/// A node that sent events, and how long its leases outlive its silence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub origin: u64,
    pub ttl_ms: u64,
}

/// A log entry's command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A batch of events, decided in order, gathered from the nodes in
    /// `senders`, whose leases live their TTL past this entry.
    Decide {
        senders: Vec<Sender>,
        events: Vec<(RequestId, Event)>,
    },
    /// Puts a policy in force; counters are kept.
    SetPolicy { files: Vec<PolicyFile> },
    /// A node is alive; its leases live `ttl_ms` past this entry.
    Heartbeat { origin: u64, ttl_ms: u64 },
    /// Clears the counts of a key (one check or all), as an operator asked.
    Reset {
        key: CounterKey,
        check: Option<Check>,
        requested_by: String,
    },
}

impl Command {
    /// The command's name in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Decide { .. } => "decide",
            Command::SetPolicy { .. } => "set_policy",
            Command::Heartbeat { .. } => "heartbeat",
            Command::Reset { .. } => "reset",
        }
    }
}

/// A command with the leader's clock at proposal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub stamp_ms: StampMs,
    pub command: Command,
}

/// What applying a command answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    #[default]
    Done,
    Verdicts(Vec<Verdict>),
    /// A policy command that could not be put in force (the old stays).
    PolicyRefused(String),
    /// Counters a reset cleared.
    Cleared(u64),
    /// A command out of bounds (see `validate`), refused whole: nothing
    /// changed. The leader refuses such a command before proposing it.
    Invalid(String),
}

/// Remembers which sequence numbers of one origin were applied, for the
/// last [`SEEN_SPAN`] numbers, and the refusals among them, so a retry
/// answers what the first attempt answered. Each event costs O(1)
/// (amortized) whatever its number: a number past the span moves the span
/// in one step, and one far past it starts the span anew.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    /// Sequence number of bit 0 of `bits[0]`.
    base: u64,
    bits: VecDeque<u64>,
    /// In order, so that those before `base` go from the front.
    refusals: BTreeMap<u64, Verdict>,
}

/// Sequence numbers remembered per origin: 32 KiB of bits.
const SEEN_SPAN: u64 = 1 << 18;

enum Recall {
    New,
    /// Applied before; this was its verdict.
    Again(Verdict),
}

impl Seen {
    fn recall(&self, seq: u64) -> Recall {
        if seq < self.base {
            // Too old to remember: assume it was counted, and let it pass.
            return Recall::Again(Verdict::Allow);
        }
        let off = seq - self.base;
        let word = self.bits.get((off / 64) as usize).copied().unwrap_or(0);
        if word & (1 << (off % 64)) == 0 {
            Recall::New
        } else {
            Recall::Again(self.refusals.get(&seq).cloned().unwrap_or(Verdict::Allow))
        }
    }

    fn remember(&mut self, seq: u64, verdict: &Verdict) {
        if self.bits.is_empty() {
            self.base = seq - seq % 64;
        } else if seq < self.base {
            // Too old to remember (`recall` lets it pass).
            return;
        } else if seq - self.base >= SEEN_SPAN {
            self.slide(seq);
        }
        let off = seq - self.base;
        let word = (off / 64) as usize;
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        self.bits[word] |= 1 << (off % 64);
        if !verdict.is_allowed() {
            self.refusals.insert(seq, verdict.clone());
        }
    }

    /// Moves the span forward just enough to hold `seq`, forgetting the
    /// words and refusals that fall out; starts it anew at `seq` when
    /// nothing would be left.
    fn slide(&mut self, seq: u64) {
        // Words to drop: seq < base + 64 * words + SEEN_SPAN.
        let words = (seq - self.base - SEEN_SPAN) / 64 + 1;
        if words >= self.bits.len() as u64 {
            self.bits.clear();
            self.refusals.clear();
            self.base = seq - seq % 64;
            return;
        }
        self.bits.drain(..words as usize);
        self.base += 64 * words;
        while let Some(entry) = self.refusals.first_entry() {
            if *entry.key() >= self.base {
                break;
            }
            entry.remove();
        }
    }

    /// Whether a snapshot's record is one this code could have made.
    fn is_sound(&self) -> bool {
        self.bits.len() as u64 <= SEEN_SPAN / 64 && self.base.is_multiple_of(64)
    }
}

/// A node that has spoken: when its leases end unless it speaks again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    deadline_ms: StampMs,
}

/// The replicated state.
#[derive(Clone, Debug)]
pub struct LimiterState {
    engine: Engine,
    /// SHA-256 of the policy's files, to compare a node's `--policy`.
    policy_hash: String,
    /// When the policy was put in force (leader stamp).
    policy_applied_ms: StampMs,
    seen: HashMap<u64, Seen>,
    owners: HashMap<u64, Owner>,
    /// The latest stamp applied; time never runs backwards here.
    now_ms: StampMs,
    /// Whether the entries applied now are this node's log replayed at
    /// start: their unusual keys were logged when first applied. Not part
    /// of the stored state.
    replaying: bool,
}

/// Everything of [`LimiterState`], in a form to store and send.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LimiterSnapshot {
    policy: Vec<PolicyFile>,
    policy_applied_ms: StampMs,
    engine: EngineState,
    seen: Vec<(u64, Seen)>,
    owners: Vec<(u64, Owner)>,
    now_ms: StampMs,
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum BadSnapshot {
    #[error("the snapshot's policy does not parse: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("the snapshot's {0} are not of a shape this version makes")]
    Shape(&'static str),
}

/// SHA-256 over the files' names and contents, in order, each preceded by
/// its length: the same text under another name is another policy (its
/// diagnostics and `explain` name the file).
pub fn policy_hash(files: &[PolicyFile]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in files {
        for part in [&f.name, &f.text] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// One line when a key becomes unusual: who, which check, its count in
/// the window against its limit, and its count in the bucket against its
/// usual count per bucket. Every node logs it as it applies the event
/// (not when it replays that entry of its log at start).
fn log_unusual(policy: &Policy, flag: &crate::engine::Flag) {
    let key = match &flag.key {
        CounterKey::Ip(ip) => policy.counted_text(*ip),
        CounterKey::Name(n) => n.to_string(),
    };
    let baseline = flag
        .usual
        .map_or_else(|| "-".to_string(), |u| format!("{u:.1}"));
    let limit = flag
        .limit
        .map_or_else(|| "-".to_string(), |l| l.to_string());
    tracing::warn!(
        target: "relayrate::unusual",
        key = %key,
        check = flag.check.name(),
        count = flag.count,
        limit = %limit,
        bucket_count = flag.bucket_count,
        baseline = %baseline,
        "unusual: {} in one bucket, usually {} (window count {}/{})",
        flag.bucket_count,
        baseline,
        flag.count,
        limit,
    );
}

impl LimiterState {
    pub fn new(policy: Arc<Policy>) -> LimiterState {
        LimiterState {
            policy_hash: policy_hash(policy.files()),
            engine: Engine::new(policy),
            policy_applied_ms: 0,
            seen: HashMap::new(),
            owners: HashMap::new(),
            now_ms: 0,
            replaying: false,
        }
    }

    /// Says whether the entries applied from now on are this node's own
    /// log replayed at start (see `replaying`).
    pub fn set_replaying(&mut self, replaying: bool) {
        self.replaying = replaying;
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn policy(&self) -> &Arc<Policy> {
        self.engine.policy()
    }

    pub fn policy_hash(&self) -> &str {
        &self.policy_hash
    }

    pub fn policy_applied_ms(&self) -> StampMs {
        self.policy_applied_ms
    }

    /// The latest leader stamp applied.
    pub fn now_ms(&self) -> StampMs {
        self.now_ms
    }

    /// Nodes whose leases are alive, with the stamp their leases end at
    /// unless they speak again.
    pub fn owners(&self) -> impl Iterator<Item = (u64, StampMs)> + '_ {
        self.owners.iter().map(|(id, o)| (*id, o.deadline_ms))
    }

    /// Applies one entry's request. A request out of bounds changes
    /// nothing and answers [`Response::Invalid`]; no work here grows with
    /// a number the request carries.
    pub fn apply(&mut self, request: &Request) -> Response {
        if let Err(e) = super::validate::request(request) {
            tracing::warn!(error = %e, "log entry refused");
            return Response::Invalid(e.to_string());
        }
        self.now_ms = self.now_ms.max(request.stamp_ms);
        self.expire_silent_owners();
        match &request.command {
            Command::Decide { senders, events } => {
                for s in senders {
                    self.heard_from(s.origin, s.ttl_ms);
                }
                let now = self.now_ms / 1000;
                let verdicts = events
                    .iter()
                    .map(|(id, event)| self.decide_once(*id, event, now))
                    .collect();
                for flag in self.engine.take_flags() {
                    if !self.replaying {
                        log_unusual(self.engine.policy(), &flag);
                    }
                }
                Response::Verdicts(verdicts)
            }
            Command::SetPolicy { files } => match Policy::parse(files.clone()) {
                Ok(policy) => {
                    self.policy_hash = policy_hash(files);
                    self.policy_applied_ms = self.now_ms;
                    self.engine.set_policy(Arc::new(policy));
                    Response::Done
                }
                Err(e) => Response::PolicyRefused(e.to_string()),
            },
            Command::Heartbeat { origin, ttl_ms } => {
                self.heard_from(*origin, *ttl_ms);
                // Time passes on a quiet cluster too.
                self.engine.tick(self.now_ms / 1000);
                Response::Done
            }
            Command::Reset {
                key,
                check,
                requested_by,
            } => {
                let cleared = self.engine.reset(key, *check);
                // Every node applies it, and again when it replays its log
                // at start: the operator's action is logged once, where it
                // was asked (`admin: reset`).
                tracing::debug!(%key, check = %check.map_or_else(|| "all".to_string(), |c| c.to_string()), %requested_by, cleared, "counts reset applied");
                Response::Cleared(cleared as u64)
            }
        }
    }

    fn decide_once(&mut self, id: RequestId, event: &Event, now: u64) -> Verdict {
        if !event.is_write() {
            return self.engine.read(event, now);
        }
        let seen = self.seen.entry(id.origin).or_default();
        match seen.recall(id.seq) {
            Recall::Again(verdict) => verdict,
            Recall::New => {
                let verdict = self.engine.apply(event, now);
                seen.remember(id.seq, &verdict);
                verdict
            }
        }
    }

    fn heard_from(&mut self, origin: u64, ttl_ms: u64) {
        let deadline_ms = self.now_ms.saturating_add(ttl_ms);
        self.owners.insert(origin, Owner { deadline_ms });
    }

    /// Releases the leases of nodes silent past their TTL, and forgets
    /// their request ids.
    fn expire_silent_owners(&mut self) {
        let now = self.now_ms;
        let silent: Vec<u64> = self
            .owners
            .iter()
            .filter(|(_, o)| o.deadline_ms < now)
            .map(|(id, _)| *id)
            .collect();
        for origin in silent {
            let released = self.engine.release_owner(origin);
            self.owners.remove(&origin);
            self.seen.remove(&origin);
            tracing::info!(
                origin,
                released,
                "node silent past its lease TTL: leases released"
            );
        }
    }

    pub fn snapshot(&self) -> LimiterSnapshot {
        LimiterSnapshot {
            policy: self.policy().files().to_vec(),
            policy_applied_ms: self.policy_applied_ms,
            engine: self.engine.state(),
            seen: self.seen.iter().map(|(k, v)| (*k, v.clone())).collect(),
            owners: self.owners.iter().map(|(k, v)| (*k, *v)).collect(),
            now_ms: self.now_ms,
        }
    }

    /// Rebuilds the state from a snapshot; fails if its policy does not
    /// parse (it was valid when it was put in force) or its records are
    /// not of a shape this code makes (a snapshot from a forged peer).
    pub fn from_snapshot(s: LimiterSnapshot) -> Result<LimiterState, BadSnapshot> {
        let policy = Arc::new(Policy::parse(s.policy.clone())?);
        if !s.seen.iter().all(|(_, seen)| seen.is_sound()) {
            return Err(BadSnapshot::Shape("request ids"));
        }
        let window = policy.window();
        if !s.engine.counters.iter().all(|(_, w, _)| w.fits(window)) {
            return Err(BadSnapshot::Shape("counters"));
        }
        if !s.engine.baselines.iter().all(|(_, b)| b.is_sound()) {
            return Err(BadSnapshot::Shape("baselines"));
        }
        Ok(LimiterState {
            policy_hash: policy_hash(&s.policy),
            engine: Engine::from_state(policy, s.engine),
            policy_applied_ms: s.policy_applied_ms,
            seen: s.seen.into_iter().collect(),
            owners: s.owners.into_iter().collect(),
            now_ms: s.now_ms,
            replaying: false,
        })
    }

    pub fn leases(&self) -> impl Iterator<Item = &ConnId> {
        self.engine.lease_ids()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ConnId;
    use crate::policy::Client;

    fn state(text: &str) -> LimiterState {
        LimiterState::new(Arc::new(Policy::parse_str("p", text).unwrap()))
    }

    fn connect(origin: u64, seq: u64, conn: u64) -> (RequestId, Event) {
        let client = Client::from_ip("10.0.0.1".parse().unwrap());
        let conn = ConnId {
            owner: origin,
            conn,
        };
        (RequestId { origin, seq }, Event::Connect { conn, client })
    }

    fn decide(
        s: &mut LimiterState,
        stamp_ms: u64,
        events: Vec<(RequestId, Event)>,
    ) -> Vec<Verdict> {
        let origin = events[0].0.origin;
        let r = s.apply(&Request {
            stamp_ms,
            command: Command::Decide {
                senders: vec![Sender {
                    origin,
                    ttl_ms: 5_000,
                }],
                events,
            },
        });
        match r {
            Response::Verdicts(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_retried_request_id_is_counted_once_and_answers_the_same() {
        let mut s = state("CHECK_CONN_RATE YES\nConnRate:default 1\n");
        let first = decide(&mut s, 1_000, vec![connect(7, 1, 1), connect(7, 2, 2)]);
        assert!(first[0].is_allowed());
        assert!(!first[1].is_allowed());
        // The same batch again (a retry after a leader change).
        let again = decide(&mut s, 2_000, vec![connect(7, 1, 1), connect(7, 2, 2)]);
        assert_eq!(again, first);
        let c = Client::from_ip("10.0.0.1".parse().unwrap());
        assert_eq!(s.engine().count_of(crate::check::Check::ConnRate, &c, 2), 2);
    }

    #[test]
    fn seen_forgets_old_numbers_but_still_does_not_count_them() {
        let mut seen = Seen::default();
        seen.remember(5, &Verdict::Allow);
        assert!(matches!(seen.recall(5), Recall::Again(_)));
        assert!(matches!(seen.recall(6), Recall::New));
        seen.remember(5 + SEEN_SPAN + 100, &Verdict::Allow);
        assert!(matches!(seen.recall(5), Recall::Again(Verdict::Allow)));
        assert!(seen.bits.len() as u64 <= SEEN_SPAN / 64 + 1);
    }

    /// Runs `f` on a thread and fails if it does not return within
    /// `limit` (the thread is left behind).
    fn within<T: Send + 'static>(
        limit: std::time::Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit).expect("returns in time")
    }

    #[test]
    fn request_ids_far_apart_are_remembered_at_once() {
        let limit = std::time::Duration::from_secs(5);
        let s = within(limit, || {
            let mut s = state("CHECK_CONN_RATE YES\nConnRate:default 10\n");
            for seq in [0, 1 << 62, (1 << 62) + 1, u64::MAX - 1, u64::MAX] {
                assert!(decide(&mut s, 1_000, vec![connect(7, seq, seq)])[0].is_allowed());
            }
            // The same ids again are answered, not counted.
            decide(&mut s, 1_000, vec![connect(7, u64::MAX, 1)]);
            s
        });
        let c = Client::from_ip("10.0.0.1".parse().unwrap());
        assert_eq!(s.engine().count_of(crate::check::Check::ConnRate, &c, 1), 5);
        let seen = &s.seen[&7];
        assert!(seen.bits.len() as u64 <= SEEN_SPAN / 64);
    }

    #[test]
    fn the_span_moves_in_one_step_and_keeps_the_refusals_within_it() {
        let refused = Verdict::Refuse(crate::engine::Refusal {
            check: crate::check::Check::ConnRate,
            count: 2,
            limit: 1,
            window_secs: Some(600),
            retry_after: 30,
        });
        let mut seen = Seen::default();
        seen.remember(10, &refused);
        seen.remember(SEEN_SPAN / 2, &refused);
        seen.remember(SEEN_SPAN - 1, &Verdict::Allow);
        // Half a span further: 10 falls out, SEEN_SPAN / 2 stays.
        seen.remember(SEEN_SPAN + SEEN_SPAN / 4, &Verdict::Allow);
        assert_eq!(seen.base, SEEN_SPAN / 4 + 64);
        assert!(matches!(seen.recall(10), Recall::Again(Verdict::Allow)));
        assert!(matches!(
            seen.recall(SEEN_SPAN / 2),
            Recall::Again(Verdict::Refuse(_))
        ));
        assert!(matches!(
            seen.recall(SEEN_SPAN - 1),
            Recall::Again(Verdict::Allow)
        ));
        assert!(matches!(seen.recall(SEEN_SPAN), Recall::New));
        assert_eq!(seen.refusals.len(), 1);
        assert!(seen.bits.len() as u64 <= SEEN_SPAN / 64);
        // Past the whole span: it starts anew there.
        seen.remember(5 * SEEN_SPAN + 3, &refused);
        assert_eq!((seen.base, seen.bits.len()), (5 * SEEN_SPAN, 1));
        assert_eq!(
            seen.refusals.keys().collect::<Vec<_>>(),
            [&(5 * SEEN_SPAN + 3)]
        );
    }

    #[test]
    fn an_entry_out_of_bounds_changes_nothing() {
        let mut s = state("CHECK_CONN_RATE YES\nConnRate:default 10\n");
        // An event of a node that is not among the senders.
        let r = s.apply(&Request {
            stamp_ms: 1_000,
            command: Command::Decide {
                senders: vec![Sender {
                    origin: 1,
                    ttl_ms: 5_000,
                }],
                events: vec![connect(2, 1, 1)],
            },
        });
        assert!(
            matches!(&r, Response::Invalid(m) if m.contains("not among")),
            "{r:?}"
        );
        assert_eq!(s.now_ms(), 0);
        assert_eq!(s.leases().count(), 0);
        assert_eq!(s.owners().count(), 0);
        // A sender of 3 MB.
        let mut big = connect(1, 1, 1);
        if let Event::Connect { client, .. } = &mut big.1 {
            client.sender = Some("x".repeat(3 << 20));
        }
        let r = s.apply(&Request {
            stamp_ms: 1_000,
            command: Command::Decide {
                senders: vec![Sender {
                    origin: 1,
                    ttl_ms: 5_000,
                }],
                events: vec![big],
            },
        });
        assert!(matches!(&r, Response::Invalid(m) if m.len() < 400), "{r:?}");
        assert_eq!(s.engine().counters_len(), 0);
    }

    #[test]
    fn the_policy_hash_covers_the_file_names() {
        let f = |name: &str, text: &str| PolicyFile {
            name: name.into(),
            text: text.into(),
        };
        let text = "CHECK_CONN_RATE YES\n";
        assert_eq!(policy_hash(&[f("a", text)]), policy_hash(&[f("a", text)]));
        assert_ne!(policy_hash(&[f("a", text)]), policy_hash(&[f("b", text)]));
        // Names and texts do not run into each other.
        assert_ne!(policy_hash(&[f("ab", "c")]), policy_hash(&[f("a", "bc")]));
    }

    #[test]
    fn a_snapshot_of_a_shape_this_code_never_makes_is_refused() {
        let mut s = state("CHECK_CONN_RATE YES\n");
        decide(&mut s, 1_000, vec![connect(1, 1, 1)]);
        let mut snap = s.snapshot();
        snap.seen[0].1.bits = vec![0; (SEEN_SPAN / 64 + 1) as usize].into();
        assert!(matches!(
            LimiterState::from_snapshot(snap),
            Err(BadSnapshot::Shape(_))
        ));
        let mut snap = s.snapshot();
        snap.engine.counters[0].1 =
            crate::window::Window::new(crate::window::WindowConfig::new(60, 30).unwrap());
        assert!(matches!(
            LimiterState::from_snapshot(snap),
            Err(BadSnapshot::Shape(_))
        ));
    }

    #[test]
    fn leases_of_a_silent_node_are_released_after_its_ttl() {
        let mut s = state("CHECK_OPEN_CONNECTIONS YES\n");
        let hb = |origin, stamp_ms| Request {
            stamp_ms,
            command: Command::Heartbeat {
                origin,
                ttl_ms: 5_000,
            },
        };
        s.apply(&hb(1, 0));
        s.apply(&hb(2, 0));
        decide(&mut s, 100, vec![connect(1, 1, 1)]);
        decide(&mut s, 100, vec![connect(2, 1, 1)]);
        assert_eq!(s.leases().count(), 2);
        // Node 2 keeps talking, node 1 falls silent.
        s.apply(&hb(2, 4_000));
        s.apply(&hb(2, 5_150));
        assert_eq!(s.leases().count(), 1);
        assert!(s.leases().all(|c| c.owner == 2));
    }

    #[test]
    fn a_snapshot_restores_the_same_state() {
        let mut s = state("CHECK_CONN_RATE YES\nCHECK_OPEN_CONNECTIONS YES\nConnRate:default 3\n");
        decide(&mut s, 1_000, vec![connect(1, 1, 1), connect(1, 2, 2)]);
        let bytes = bincode::serialize(&s.snapshot()).unwrap();
        let mut r = LimiterState::from_snapshot(bincode::deserialize(&bytes).unwrap()).unwrap();
        assert_eq!(r.policy_hash(), s.policy_hash());
        assert_eq!(r.leases().count(), 2);
        // Counts and dedupe survive: a retry is not counted, a new one is.
        let v = decide(
            &mut r,
            2_000,
            vec![connect(1, 2, 2), connect(1, 3, 3), connect(1, 4, 4)],
        );
        assert_eq!(v.iter().filter(|v| v.is_allowed()).count(), 2);
    }

    #[test]
    fn a_new_policy_keeps_counts_and_a_bad_one_is_refused() {
        let mut s = state("CHECK_CONN_RATE YES\nConnRate:default 10\n");
        decide(&mut s, 1_000, (1..=3).map(|i| connect(1, i, i)).collect());
        let files = vec![PolicyFile {
            name: "new".into(),
            text: "CHECK_CONN_RATE YES\nConnRate:default 3\n".into(),
        }];
        let before = s.policy_hash().to_string();
        assert_eq!(
            s.apply(&Request {
                stamp_ms: 2_000,
                command: Command::SetPolicy { files }
            }),
            Response::Done
        );
        assert_ne!(s.policy_hash(), before);
        assert!(!decide(&mut s, 2_000, vec![connect(1, 4, 4)])[0].is_allowed());
        let bad = vec![PolicyFile {
            name: "bad".into(),
            text: "ConnRat:x 1\n".into(),
        }];
        let r = s.apply(&Request {
            stamp_ms: 3_000,
            command: Command::SetPolicy { files: bad },
        });
        assert!(matches!(r, Response::PolicyRefused(m) if m.starts_with("bad:1:1:")));
        assert_eq!(
            s.policy()
                .limit(crate::check::Check::ConnRate, &Client::default()),
            Some(3)
        );
    }
}
