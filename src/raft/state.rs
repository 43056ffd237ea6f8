//! The replicated limiter state: the engine, the policy in force, which
//! request ids were already counted, and which nodes are alive to hold
//! open-connection leases. Every node applies the same commands with the
//! leader's time stamps and so holds the same state. Pure: no I/O, no clock.

use std::collections::{HashMap, VecDeque};
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
}

/// Remembers which sequence numbers of one origin were applied, for the
/// last [`SEEN_SPAN`] numbers, and the refusals among them, so a retry
/// answers what the first attempt answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    /// Sequence number of bit 0 of `bits[0]`.
    base: u64,
    bits: VecDeque<u64>,
    refusals: HashMap<u64, Verdict>,
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
        }
        while seq >= self.base + SEEN_SPAN {
            self.bits.pop_front();
            self.base += 64;
            let base = self.base;
            self.refusals.retain(|s, _| *s >= base);
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

/// SHA-256 over the files' names and contents.
pub fn policy_hash(files: &[PolicyFile]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in files {
        h.update((f.text.len() as u64).to_be_bytes());
        h.update(f.text.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
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
        }
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

    pub fn apply(&mut self, request: &Request) -> Response {
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
                Response::Done
            }
            Command::Reset {
                key,
                check,
                requested_by,
            } => {
                let cleared = self.engine.reset(key, *check);
                tracing::info!(?key, ?check, %requested_by, cleared, "counts reset");
                Response::Cleared(cleared as u64)
            }
        }
    }

    /// Decides read-only events against the state as it is, at the latest
    /// stamp: what a leader answers without a log entry.
    pub fn read(&self, event: &Event) -> Verdict {
        debug_assert!(!event.is_write());
        self.engine.read(event, self.now_ms / 1000)
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
        let deadline_ms = self.now_ms + ttl_ms;
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

    /// Rebuilds the state from a snapshot; fails only if its policy does
    /// not parse (it was valid when it was put in force).
    pub fn from_snapshot(s: LimiterSnapshot) -> Result<LimiterState, crate::policy::PolicyError> {
        let policy = Arc::new(Policy::parse(s.policy.clone())?);
        Ok(LimiterState {
            policy_hash: policy_hash(&s.policy),
            engine: Engine::from_state(policy, s.engine),
            policy_applied_ms: s.policy_applied_ms,
            seen: s.seen.into_iter().collect(),
            owners: s.owners.into_iter().collect(),
            now_ms: s.now_ms,
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
