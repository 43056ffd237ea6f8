//! Gathers the events of concurrent callers into one log entry: the
//! node's own milters' events, and on the leader the batches its followers
//! forward. At the leader, while a batch is being written, new events wait
//! and pile up, so the batch grows with the load: one fsync and one
//! replication round then serve many decisions. A follower forwards each
//! batch at once, without waiting for the answer to the one before: its
//! events then join the leader's next entry instead of waiting a whole
//! forward for their turn. The leader of several voters writes several
//! batches at once ([`MAX_WRITES`]). Batches leave at most one per
//! [`WRITE_PACE`], so that under load more events share an entry.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{Node, NodeError};
use crate::bounds::{cut, MAX_ENTRY_BYTES, MAX_ENTRY_EVENTS};
use crate::engine::{Event, Verdict};
use crate::raft::validate::event_bytes;
use crate::raft::{Command, RequestId, Response, Sender};

/// Batches being written at once at the leader of several voters. A
/// commit there waits for the leader's fsync, an AppendEntries round trip
/// and a follower's fsync; meanwhile the next batch is appended (its
/// fsync overlaps the round trip) and its AppendEntries carries the
/// commit of the one before, which otherwise goes in a message of its
/// own. Measured through Postfix with 3 nodes and the seed's checks
/// (2026-12-01): 0.39 to 0.64 of the no-op milter's throughput with one
/// batch at a time, 0.63 to 0.70 with 8; with every check on, 0.40 to
/// 0.49 either way.
pub const MAX_WRITES: usize = 8;
/// The least time between two batches leaving this node (written or
/// forwarded; tokio's timer rounds up to its next 1 ms tick, so 1.5 to
/// about 2.5 ms). Under load the events of one pace share a log entry, so
/// the entries, fsyncs and AppendEntries a second stay under 1 / pace
/// whatever the rate of events; when events are further apart than this,
/// none waits. A follower's events are paced there and again in the
/// leader's batch. Each entry costs an fsync, and sled 0.34 hands each
/// fsync to its I/O threads, waking all of them: measured (2026-12-01,
/// seed's checks through Postfix) 0.25 to 0.4 ms of CPU per entry on each
/// node in those threads alone. Measured the same way, 1.5 ms took the
/// log entries per message from 1.8 to 1.1 (1 node) and 1.9 to 1.4 (3
/// nodes), and 3 nodes' CPU per message from 3.8 to 3.2 ms; 3 ms cut
/// entries by another 30% but not the CPU, and each decision waits longer
/// (BENCHMARKS.md).
pub const WRITE_PACE: std::time::Duration = std::time::Duration::from_micros(1500);
/// Batches a follower has forwarded and not yet had answered, at most.
pub const MAX_FORWARDS: usize = 16;
/// Events after which a batch stops gathering (it may pass this by one
/// caller's events, within [`MAX_ENTRY_EVENTS`] and [`MAX_ENTRY_BYTES`]).
pub const MAX_EVENTS: usize = 2048;

/// One caller's events, with their request ids, and where to send their
/// verdicts.
pub struct Pending {
    pub sender: Sender,
    pub events: Vec<(RequestId, Event)>,
    pub reply: oneshot::Sender<Result<Vec<Verdict>, NodeError>>,
}

/// The batches out at once: being written at the leader, or forwarded by
/// a follower.
pub struct InFlight {
    writes: Arc<Semaphore>,
    forwards: Arc<Semaphore>,
}

impl Default for InFlight {
    fn default() -> InFlight {
        InFlight {
            writes: Arc::new(Semaphore::new(MAX_WRITES)),
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
        }
    }
}

impl InFlight {
    /// Waits for room for one more batch, written here if `leading`, else
    /// forwarded. (Leadership may change before the batch leaves; it then
    /// goes the other way, which is only slower.) The only voter writes
    /// one batch at a time: its commit is its own fsync, with no round
    /// trip to overlap, and the next batch grows meanwhile (fewer entries
    /// and fsyncs).
    async fn acquire(&self, leading: bool, alone: bool) -> OwnedSemaphorePermit {
        if !leading {
            return self
                .forwards
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
        }
        let weight = if alone { MAX_WRITES } else { 1 };
        self.writes
            .clone()
            .acquire_many_owned(weight as u32)
            .await
            .expect("never closed")
    }

    /// Whether no batch is out.
    pub fn is_idle(&self) -> bool {
        self.writes.available_permits() == MAX_WRITES
            && self.forwards.available_permits() == MAX_FORWARDS
    }
}

/// The events of a batch, and their bytes as a log entry bounds them.
#[derive(Clone, Copy, Default)]
struct Size {
    events: usize,
    bytes: usize,
}

impl Size {
    fn of(p: &Pending) -> Size {
        Size {
            events: p.events.len(),
            bytes: p.events.iter().map(|(_, e)| event_bytes(e)).sum(),
        }
    }

    /// Whether `more` joins within the bounds of one entry. A caller's
    /// events were checked against them where they came in, so they
    /// always fit in a batch of their own.
    fn fits(self, more: Size) -> bool {
        self.events + more.events <= MAX_ENTRY_EVENTS && self.bytes + more.bytes <= MAX_ENTRY_BYTES
    }
}

/// How long events that only give back (closes, give-backs) wait for an
/// event that must be written now, to ride in its entry: nobody waits for
/// their answer (the milter settles them in the background), and alone
/// they would cost an entry and an fsync of their own. While they wait
/// the slots stay counted, which errs on the side of the limit.
pub const GIVE_BACK_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether every event of `p` only gives back what was counted.
fn gives_back_only(p: &Pending) -> bool {
    p.events
        .iter()
        .all(|(_, e)| matches!(e, Event::Close { .. } | Event::GiveBack { .. }))
}

/// A batch being gathered, and its size.
struct Gathering {
    batch: Vec<Pending>,
    size: Size,
}

impl Gathering {
    fn new(first: Pending) -> Gathering {
        Gathering {
            size: Size::of(&first),
            batch: vec![first],
        }
    }

    /// Whether the batch may take more callers.
    fn open(&self) -> bool {
        self.size.events < MAX_EVENTS
    }

    /// Adds `p`, or hands it back when it would not fit in this entry.
    fn add(&mut self, p: Pending) -> Result<(), Pending> {
        let more = Size::of(&p);
        if !self.size.fits(more) {
            return Err(p);
        }
        self.size.events += more.events;
        self.size.bytes += more.bytes;
        self.batch.push(p);
        Ok(())
    }
}

pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Pending>) {
    // A caller's events that did not fit in the last batch open the next.
    let mut held: Option<Pending> = None;
    let mut last_sent = tokio::time::Instant::now();
    loop {
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let mut waiting = gives_back_only(&first);
        let mut gathering = Gathering::new(first);
        // Give-backs wait a little for company (GIVE_BACK_WAIT), until a
        // caller that must be written now joins them.
        let until = tokio::time::Instant::now() + GIVE_BACK_WAIT;
        while waiting && gathering.open() {
            let Ok(Some(p)) = tokio::time::timeout_at(until, rx.recv()).await else {
                break;
            };
            waiting = gives_back_only(&p);
            if let Err(p) = gathering.add(p) {
                held = Some(p);
                break;
            }
        }
        // Paced: callers that come within WRITE_PACE of the last batch
        // join this one.
        let next = last_sent + WRITE_PACE;
        while held.is_none() && gathering.open() {
            let Ok(Some(p)) = tokio::time::timeout_at(next, rx.recv()).await else {
                break;
            };
            if let Err(p) = gathering.add(p) {
                held = Some(p);
            }
        }
        let permit = node
            .in_flight
            .acquire(node.is_leader(), node.voters() == 1)
            .await;
        while held.is_none() && gathering.open() {
            let Ok(p) = rx.try_recv() else { break };
            if let Err(p) = gathering.add(p) {
                held = Some(p);
            }
        }
        let batch = gathering.batch;
        // A caller that gave up (its milter decided without the cluster)
        // must not be counted here as well.
        let (gone, batch): (Vec<_>, Vec<_>) = batch.into_iter().partition(|p| p.reply.is_closed());
        abandon(&node, &gone);
        if batch.is_empty() {
            continue;
        }
        last_sent = tokio::time::Instant::now();
        let node = node.clone();
        tokio::spawn(async move {
            decide_batch(&node, batch).await;
            drop(permit);
        });
    }
}

/// Decides a batch: one log entry if it counts anything, else (rechecks
/// only) a read of this node's applied state; then hands each caller its
/// verdicts.
async fn decide_batch(node: &Node, batch: Vec<Pending>) {
    let mut senders: Vec<Sender> = Vec::new();
    for p in &batch {
        if !senders.iter().any(|s| s.origin == p.sender.origin) {
            senders.push(p.sender);
        }
    }
    let events: Vec<(RequestId, Event)> = batch
        .iter()
        .flat_map(|p| p.events.iter().cloned())
        .collect();
    let result = if events.iter().any(|(_, e)| e.is_write()) {
        crate::metrics::record_batch(events.len());
        let wanted = || batch.iter().any(|p| !p.reply.is_closed());
        match node
            .propose_while(Command::Decide { senders, events }, &wanted)
            .await
        {
            Ok(Response::Verdicts(v)) => Ok(v),
            Ok(other) => Err(NodeError::Raft(format!(
                "unexpected response {}",
                cut(&format!("{other:?}"))
            ))),
            Err(e) => Err(e),
        }
    } else {
        Ok(node.read_local(events.iter().map(|(_, e)| e)))
    };
    match result {
        Ok(verdicts) => {
            let mut verdicts = verdicts.into_iter();
            for p in batch {
                let mine = verdicts.by_ref().take(p.events.len()).collect();
                let _ = p.reply.send(Ok(mine));
            }
        }
        Err(NodeError::Abandoned) => abandon(node, &batch),
        Err(e) => {
            let why = e.to_string();
            for p in batch {
                let _ = p.reply.send(Err(NodeError::NoLeader(why.clone())));
            }
        }
    }
}

/// Drops the events of callers that all gave up: counted and logged, and
/// not sent (again) to the leader.
fn abandon(node: &Node, gone: &[Pending]) {
    let events: usize = gone.iter().map(|p| p.events.len()).sum();
    if events == 0 {
        return;
    }
    node.abandoned.fetch_add(events as u64, Ordering::Relaxed);
    crate::metrics::record_abandoned(events);
    tracing::warn!(
        events,
        "events dropped: every caller gave up before the cluster answered"
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether `acquire` gets its room within a moment.
    async fn gets_room(f: &InFlight, alone: bool) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout(Duration::from_millis(50), f.acquire(true, alone))
            .await
            .ok()
    }

    #[tokio::test]
    async fn the_leader_of_several_voters_writes_several_batches_at_once_a_lone_voter_one() {
        let f = InFlight::default();
        // With followers, a second batch goes while the first is out...
        let mut out = vec![gets_room(&f, false).await.expect("room for the first")];
        out.push(
            gets_room(&f, false)
                .await
                .expect("the second waited for the first"),
        );
        // ...and so on up to MAX_WRITES.
        while out.len() < MAX_WRITES {
            out.push(
                gets_room(&f, false)
                    .await
                    .expect("fewer than MAX_WRITES out"),
            );
        }
        assert!(
            gets_room(&f, false).await.is_none(),
            "more than MAX_WRITES out"
        );
        out.clear();
        assert!(f.is_idle());

        let only = gets_room(&f, true).await.expect("room for the first");
        assert!(
            gets_room(&f, true).await.is_none(),
            "a lone voter wrote two at once"
        );
        assert!(gets_room(&f, false).await.is_none());
        drop(only);
        assert!(gets_room(&f, true).await.is_some());
    }
}
