//! The milter's listener, wrapped for indymilter: it keeps the register of
//! open MTA connections and the connection cap, and never fails.
//!
//! indymilter stops accepting at its own cap until a connection ends, and
//! ends its whole run on the first failed accept. Here its cap is set out
//! of reach and this listener enforces one instead: at the cap, it takes
//! the new connection and closes the one idle longest, choosing first
//! among those that have not negotiated. An MTA sends OPTNEG as soon as
//! it connects, so a connection still silent is the least likely to be
//! an MTA, and the one idle longest is the least likely to be mid-message;
//! idle or half-open connections, however many, thus never lock the MTA
//! out, and it is the flood's own connections that go. A failed accept
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
                        negotiated = closed.negotiated,
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
    negotiated: bool,
    last_active: Instant,
}

impl Open {
    fn evict_one(&mut self) -> Option<Closed> {
        let seen = self.conns.iter().map(|(id, state)| {
            let st = guard::lock(state);
            (*id, st.negotiated, st.last_active)
        });
        let (id, negotiated, last_active) = pick_victim(seen)?;
        let state = self.conns.remove(&id)?;
        guard::evict(&state);
        crate::metrics::record_milter_cut(Cut::Evicted.name());
        crate::metrics::set_milter_connections(self.conns.len());
        Some(Closed {
            negotiated,
            last_active,
        })
    }
}

/// The connection to close for room, from (id, negotiated, last active):
/// among those that have not negotiated if any, the one idle longest.
fn pick_victim(conns: impl Iterator<Item = (u64, bool, Instant)>) -> Option<(u64, bool, Instant)> {
    conns.min_by_key(|&(id, negotiated, last_active)| (negotiated, last_active, id))
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
    type Io = Guarded<L::Io>;

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
                    return Poll::Ready(Ok(self.registry.admit(io)));
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
    fn the_victim_is_unnegotiated_first_then_idle_longest() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let conns = [
            (1, true, at(0)),
            (2, false, at(30)),
            (3, false, at(10)),
            (4, true, at(5)),
        ];
        assert_eq!(pick_victim(conns.into_iter()).map(|v| v.0), Some(3));
        let negotiated = [(1, true, at(20)), (2, true, at(5)), (3, true, at(10))];
        assert_eq!(pick_victim(negotiated.into_iter()).map(|v| v.0), Some(2));
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
