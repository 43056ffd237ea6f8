//! The milter's listener, wrapped for indymilter: it keeps the register of
//! open MTA connections and the connection cap, and never fails.
//!
//! indymilter stops accepting at its own cap until a connection ends, and
//! ends its whole run on the first failed accept. Here its cap is set out
//! of reach and this listener enforces one instead: at the cap, it takes
//! the new connection and closes one that has done the least, idle
//! longest among those: first one that never negotiated, then one that
//! negotiated but carries no SMTP session, then one in a session, and
//! last one in the middle of a message's DATA. An MTA negotiates at once
//! and opens a session for every SMTP client, so idle or half-open
//! connections, or fresh ones that only negotiate, however many, go before
//! the MTA's. (A client that speaks the whole milter protocol can still
//! compete with the MTA: keep the milter's socket on loopback or a unix
//! socket only the MTA may open.) A failed accept
//! (out of file descriptors, a connection aborted before it was taken) is
//! logged and retried after a growing pause; when file descriptors are
//! out, a connection is closed as at the cap to free one.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use indymilter::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use super::conninfo::ConnInfo;
use super::guard::{self, Cut, Guarded, SharedState};
use super::limits::ConnLimits;

/// indymilter does not set TCP_NODELAY; without it a reply written in
/// several pieces stalls 40 ms on Nagle's algorithm and delayed ACKs.
pub struct NoDelay(pub TcpListener);

impl Listener for NoDelay {
    type Io = TcpStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        self.0.poll_accept(cx).map_ok(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        })
    }
}

/// How often a repeated warning (cap reached, accept failing) is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The first pause after a failed accept, doubled on each failure in a
/// row up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// The open MTA connections.
pub struct Registry {
    limits: ConnLimits,
    inner: Mutex<Open>,
}

struct Open {
    conns: HashMap<u64, SharedState>,
    next_id: u64,
    cap_log: Throttle,
}

impl Registry {
    pub fn new(limits: ConnLimits) -> Arc<Registry> {
        Arc::new(Registry {
            limits,
            inner: Mutex::new(Open {
                conns: HashMap::new(),
                next_id: 0,
                cap_log: Throttle::new(LOG_EVERY),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // A map of handles, whole after any panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection, making room at the cap.
    pub(super) fn admit<S>(self: &Arc<Self>, io: S) -> Guarded<S> {
        let now = Instant::now();
        let state = guard::new_state(now);
        let mut open = self.lock();
        if open.conns.len() >= self.limits.max_connections.get() {
            if let Some(closed) = open.evict_one() {
                if let Some(held) = open.cap_log.ready(now) {
                    tracing::warn!(
                        max_connections = self.limits.max_connections.get(),
                        stage = closed.stage.name(),
                        idle_ms = now.duration_since(closed.last_active).as_millis() as u64,
                        more_since_last_line = held,
                        "milter: connection cap reached: closed the connection idle longest \
                         to take a new one (see --milter-max-connections)"
                    );
                }
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        open.conns.insert(id, state.clone());
        crate::metrics::set_milter_connections(open.conns.len());
        drop(open);
        Guarded::new(io, id, state, self.clone(), self.limits)
    }

    /// Closes a connection as at the cap, to free its file descriptor;
    /// whether there was one to close.
    fn evict_for_room(&self) -> bool {
        self.lock().evict_one().is_some()
    }

    /// Forgets a connection that has closed.
    pub fn remove(&self, id: u64) {
        let mut open = self.lock();
        if open.conns.remove(&id).is_some() {
            crate::metrics::set_milter_connections(open.conns.len());
        }
    }
}

/// What the cap's log line tells of the connection it closed.
struct Closed {
    stage: Stage,
    last_active: Instant,
}

/// How far a connection has come, least first: the order in which the cap
/// closes connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Unnegotiated,
    Negotiated,
    InSession,
    InData,
}

impl Stage {
    fn of(st: &guard::ConnState) -> Stage {
        match (st.negotiated, st.in_session, st.in_data) {
            (false, _, _) => Stage::Unnegotiated,
            (true, _, true) => Stage::InData,
            (true, true, false) => Stage::InSession,
            (true, false, false) => Stage::Negotiated,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Stage::Unnegotiated => "unnegotiated",
            Stage::Negotiated => "negotiated",
            Stage::InSession => "in session",
            Stage::InData => "in data",
        }
    }
}

impl Open {
    fn evict_one(&mut self) -> Option<Closed> {
        let seen = self.conns.iter().map(|(id, state)| {
            let st = guard::lock(state);
            (*id, Stage::of(&st), st.last_active)
        });
        let (id, stage, last_active) = pick_victim(seen)?;
        let state = self.conns.remove(&id)?;
        guard::evict(&state);
        crate::metrics::record_milter_cut(Cut::Evicted.name());
        crate::metrics::set_milter_connections(self.conns.len());
        Some(Closed { stage, last_active })
    }
}

/// The connection to close for room, from (id, stage, last active): of
/// the least advanced stage, the one idle longest.
fn pick_victim(
    conns: impl Iterator<Item = (u64, Stage, Instant)>,
) -> Option<(u64, Stage, Instant)> {
    conns.min_by_key(|&(id, stage, last_active)| (stage, last_active, id))
}

/// Lets a repeated log line through at most once per `every`, counting
/// the ones held back in between.
struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            held: 0,
        }
    }

    /// Some(lines held back since the last one) if a line may go now.
    fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// What a failed accept calls for.
#[derive(Debug, PartialEq, Eq)]
enum AcceptFailure {
    /// That one connection went wrong (reset or aborted before it was
    /// taken); the next can be taken at once.
    Connection,
    /// Out of file descriptors: close a connection, then pause.
    Descriptors,
    /// Anything else (out of memory or buffers, ...): pause and retry.
    Other,
}

fn classify(e: &io::Error) -> AcceptFailure {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => AcceptFailure::Descriptors,
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EINTR) => {
            AcceptFailure::Connection
        }
        _ if e.kind() == io::ErrorKind::Interrupted => AcceptFailure::Connection,
        _ => AcceptFailure::Other,
    }
}

/// A listener indymilter can run on that never fails, and guards each
/// connection it gives.
pub struct GuardedListener<L> {
    inner: L,
    registry: Arc<Registry>,
    /// Set after a failed accept: no accept until it fires.
    pause: Option<Pin<Box<Sleep>>>,
    next_pause: Duration,
    error_log: Throttle,
}

impl<L> GuardedListener<L> {
    pub fn new(inner: L, limits: ConnLimits) -> GuardedListener<L> {
        GuardedListener {
            inner,
            registry: Registry::new(limits),
            pause: None,
            next_pause: FIRST_PAUSE,
            error_log: Throttle::new(LOG_EVERY),
        }
    }

    fn accept_failed(&mut self, e: io::Error) {
        crate::metrics::record_milter_accept_error();
        let failure = classify(&e);
        if failure == AcceptFailure::Connection {
            tracing::debug!(error = %e, "milter: a connection failed before it was accepted");
            return;
        }
        let freed = failure == AcceptFailure::Descriptors && self.registry.evict_for_room();
        let pause = self.next_pause;
        self.next_pause = (pause * 2).min(MAX_PAUSE);
        self.pause = Some(Box::pin(tokio::time::sleep(pause)));
        if let Some(held) = self.error_log.ready(Instant::now()) {
            tracing::error!(
                error = %e,
                retry_in_ms = pause.as_millis() as u64,
                closed_one_for_room = freed,
                more_since_last_line = held,
                "milter: cannot accept a connection; retrying"
            );
        }
    }
}

impl<L: Listener> Listener for GuardedListener<L> {
    type Io = ConnInfo<Guarded<L::Io>>;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.pause = None;
            }
            match self.inner.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(io)) => {
                    self.next_pause = FIRST_PAUSE;
                    return Poll::Ready(Ok(ConnInfo::new(self.registry.admit(io))));
                }
                Poll::Ready(Err(e)) => self.accept_failed(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_victim_has_done_the_least_then_idled_longest() {
        use Stage::*;
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let conns = [
            (1, Negotiated, at(0)),
            (2, Unnegotiated, at(30)),
            (3, Unnegotiated, at(10)),
            (4, InSession, at(5)),
        ];
        assert_eq!(pick_victim(conns.into_iter()).map(|v| v.0), Some(3));
        // A flood of fresh connections that only negotiate goes before an
        // MTA session idle for longer.
        let flood = [
            (1, InSession, at(0)),
            (2, Negotiated, at(900)),
            (3, Negotiated, at(950)),
        ];
        assert_eq!(pick_victim(flood.into_iter()).map(|v| v.0), Some(2));
        let sessions = [
            (1, InData, at(0)),
            (2, InSession, at(5)),
            (3, InSession, at(10)),
        ];
        assert_eq!(pick_victim(sessions.into_iter()).map(|v| v.0), Some(2));
        assert_eq!(pick_victim(std::iter::empty()), None);
    }

    #[test]
    fn the_throttle_counts_what_it_holds_back() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(10));
        assert_eq!(t.ready(t0), Some(0));
        assert_eq!(t.ready(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.ready(t0 + Duration::from_secs(9)), None);
        assert_eq!(t.ready(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(t.ready(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn accept_failures_are_sorted_by_what_they_call_for() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(classify(&os(libc::EMFILE)), AcceptFailure::Descriptors);
        assert_eq!(classify(&os(libc::ENFILE)), AcceptFailure::Descriptors);
        assert_eq!(classify(&os(libc::ECONNABORTED)), AcceptFailure::Connection);
        assert_eq!(classify(&os(libc::ENOBUFS)), AcceptFailure::Other);
        assert_eq!(classify(&os(libc::ENOMEM)), AcceptFailure::Other);
    }
}
