//! A client of a node's `Limiter` service that gathers the events of
//! concurrent callers into one `Decide` call.
//!
//! A milter serves many SMTP sessions at once, and each session waits for
//! its verdict before its next event. Sending each event as its own call
//! costs a whole HTTP/2 request on both sides, which on a busy relay costs
//! more CPU than deciding. Here, while one call is out, the events that
//! arrive meanwhile wait and leave together in the next call: at low load
//! an event leaves at once, at high load one call carries many events.
//! The node decides a call's events in order and answers each caller with
//! its own verdict.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::Channel;
use tonic::Status;

use crate::bounds::MAX_ENTRY_BYTES;
use crate::convert::event_to_pb;
use crate::engine::{Event, Verdict};
use crate::proto::v1::limiter_client::LimiterClient;
use crate::proto::v1::DecideRequest;
use crate::raft::validate::{self, event_bytes};

/// Calls out at once on one client. Two: the next batch is on the wire
/// while the node still decides the one before it.
const CALLS_IN_FLIGHT: usize = 2;
/// Events in one call at most; their bytes stay within what the node
/// takes in one call ([`MAX_ENTRY_BYTES`]).
const MAX_EVENTS: usize = 1024;

struct Waiting {
    event: crate::proto::v1::Event,
    /// As the node counts them.
    bytes: usize,
    reply: oneshot::Sender<Result<Verdict, Status>>,
}

/// A cheap handle: clones share one channel and one gathering task.
#[derive(Clone)]
pub struct BatchingClient {
    tx: mpsc::UnboundedSender<Waiting>,
    client: LimiterClient<Channel>,
    calls: Arc<AtomicU64>,
    /// The policy hash of the node's last answer ("" before the first).
    policy_hash: Arc<Mutex<String>>,
}

impl BatchingClient {
    /// Starts the gathering task on the current Tokio runtime; it stops
    /// when the last handle is dropped. A call not answered within
    /// `deadline` is given up (its callers get DEADLINE_EXCEEDED), so that
    /// a hung node never holds the calls after it.
    pub fn new(channel: Channel, deadline: Duration) -> BatchingClient {
        let client = LimiterClient::new(channel);
        let (tx, rx) = mpsc::unbounded_channel();
        let calls = Arc::new(AtomicU64::new(0));
        let policy_hash = Arc::new(Mutex::new(String::new()));
        tokio::spawn(gather(
            client.clone(),
            rx,
            deadline,
            calls.clone(),
            policy_hash.clone(),
        ));
        BatchingClient {
            tx,
            client,
            calls,
            policy_hash,
        }
    }

    /// Whether the node's last answer was decided with policy `hash`
    /// (true before any answer: nothing says otherwise).
    pub fn policy_is(&self, hash: &str) -> bool {
        let last = self.policy_hash.lock().expect("policy hash lock");
        last.is_empty() || *last == hash
    }

    /// `Decide` calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The plain client, for the other calls of the service.
    pub fn inner(&self) -> LimiterClient<Channel> {
        self.client.clone()
    }

    /// Decides one event, in a call shared with the events of other
    /// callers waiting at the same time. An event the node would refuse
    /// (a text past its bounds) is refused here with INVALID_ARGUMENT,
    /// so that it never makes the other callers' call fail.
    pub async fn decide(&self, event: &Event) -> Result<Verdict, Status> {
        validate::event(event)?;
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            event: event_to_pb(event),
            bytes: event_bytes(event),
            reply,
        };
        if self.tx.send(waiting).is_err() {
            return Err(Status::unavailable("limiter client stopped"));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Status::internal("limiter client dropped the call")))
    }
}

async fn gather(
    client: LimiterClient<Channel>,
    mut rx: mpsc::UnboundedReceiver<Waiting>,
    deadline: Duration,
    calls: Arc<AtomicU64>,
    policy_hash: Arc<Mutex<String>>,
) {
    let in_flight = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    // An event that did not fit in the last call opens the next.
    let mut held: Option<Waiting> = None;
    loop {
        let first = match held.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => break,
            },
        };
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_EVENTS {
            match rx.try_recv() {
                Ok(w) if bytes + w.bytes > MAX_ENTRY_BYTES => {
                    held = Some(w);
                    break;
                }
                Ok(w) => {
                    bytes += w.bytes;
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        // A caller that gave up waiting (its deadline passed while a hung
        // node held the calls) has decided without the node: its event
        // must not be counted there as well.
        batch.retain(|w| !w.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        calls.fetch_add(1, Ordering::Relaxed);
        let mut client = client.clone();
        let policy_hash = policy_hash.clone();
        tokio::spawn(async move {
            let (events, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|w| (w.event, w.reply)).unzip();
            let call = client.decide(DecideRequest { events });
            let answered = match tokio::time::timeout(deadline, call).await {
                Ok(answered) => answered.map(|r| {
                    let r = r.into_inner();
                    let mut last = policy_hash.lock().expect("policy hash lock");
                    if *last != r.policy_hash {
                        *last = r.policy_hash;
                    }
                    r.verdicts
                }),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {} ms",
                    deadline.as_millis()
                ))),
            };
            drop(permit);
            hand_out(answered, replies);
        });
    }
}

/// Gives each caller its verdict, in order, or the call's error.
fn hand_out(
    answered: Result<Vec<crate::proto::v1::Verdict>, Status>,
    replies: Vec<oneshot::Sender<Result<Verdict, Status>>>,
) {
    match answered {
        Ok(verdicts) if verdicts.len() == replies.len() => {
            for (verdict, reply) in verdicts.iter().zip(replies) {
                let verdict = Verdict::try_from(verdict)
                    .map_err(|e| Status::internal(format!("bad verdict: {e}")));
                let _ = reply.send(verdict);
            }
        }
        Ok(verdicts) => {
            let why = format!("{} verdicts for {} events", verdicts.len(), replies.len());
            for reply in replies {
                let _ = reply.send(Err(Status::internal(why.clone())));
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}
