//! Gathers the events of concurrent callers into one log entry: the
//! node's own milters' events, and on the leader the batches its followers
//! forward. At the leader, while a batch is being written, new events wait
//! and pile up, so the batch grows with the load: one fsync and one
//! replication round then serve many decisions. A follower forwards each
//! batch at once, without waiting for the answer to the one before: its
//! events then join the leader's next entry instead of waiting a whole
//! forward for their turn.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{Node, NodeError};
use crate::bounds::{cut, MAX_ENTRY_BYTES, MAX_ENTRY_EVENTS};
use crate::engine::{Event, Verdict};
use crate::raft::validate::event_bytes;
use crate::raft::{Command, RequestId, Response, Sender};

/// Batches being written at once at the leader. One: the next batch
/// gathers while the current one commits, which measured faster than
/// several small ones.
pub const MAX_WRITES: usize = 1;
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
    /// goes the other way, which is only slower.)
    async fn acquire(&self, leading: bool) -> OwnedSemaphorePermit {
        let room = if leading {
            &self.writes
        } else {
            &self.forwards
        };
        room.clone().acquire_owned().await.expect("never closed")
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
        let permit = node.in_flight.acquire(node.is_leader()).await;
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
