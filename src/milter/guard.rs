//! One MTA connection, guarded. indymilter reads a whole packet under one
//! long timeout and allocates it on its length word; this stream, which
//! indymilter reads through, holds each wait to the deadline meant for it
//! (`ConnLimits`), refuses a packet over [`MAX_PACKET`](super::MAX_PACKET)
//! on its length, and fails at once when the listener closes the
//! connection to make room at the cap. A failed read or write ends the
//! indymilter session, which closes the socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::frame::Framer;
use super::limits::ConnLimits;
use super::listener::Registry;

/// Why the milter closed a connection, as counted in
/// `relayrate_milter_connections_cut_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// No OPTNEG within the negotiation deadline.
    Negotiate,
    /// No command within the idle timeout.
    Idle,
    /// Nothing from DATA to the end of the message within the data timeout.
    Data,
    /// A packet begun and not finished within the idle timeout.
    SlowPacket,
    /// A reply the MTA did not take within the idle timeout.
    Write,
    /// A packet announced over the cap.
    TooLarge,
    /// Closed to make room for a new connection (cap or open-file limit).
    Evicted,
}

impl Cut {
    /// Every reason, for the metrics' series at zero.
    pub const ALL: [Cut; 7] = [
        Cut::Negotiate,
        Cut::Idle,
        Cut::Data,
        Cut::SlowPacket,
        Cut::Write,
        Cut::TooLarge,
        Cut::Evicted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cut::Negotiate => "negotiate_timeout",
            Cut::Idle => "idle_timeout",
            Cut::Data => "data_timeout",
            Cut::SlowPacket => "packet_timeout",
            Cut::Write => "write_timeout",
            Cut::TooLarge => "packet_too_large",
            Cut::Evicted => "evicted",
        }
    }

    fn error(self) -> io::Error {
        let kind = match self {
            Cut::TooLarge => io::ErrorKind::InvalidData,
            Cut::Evicted => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::TimedOut,
        };
        io::Error::new(kind, format!("milter connection closed: {}", self.name()))
    }
}

/// What the stream and the listener's registry both see of a connection.
#[derive(Debug)]
pub struct ConnState {
    /// The MTA's OPTNEG has arrived.
    pub negotiated: bool,
    /// An SMTP session is under way: its connect has come (SMFIC_CONNECT).
    pub in_session: bool,
    /// Between DATA and the end of the message (or abort, or quit).
    pub in_data: bool,
    /// When the conversation last moved: the accept, the last complete
    /// packet read, the last reply written.
    pub last_active: Instant,
    /// Closed to make room: the next read or write fails.
    evicted: bool,
    /// The task waiting on the stream, woken when it is evicted.
    waker: Option<Waker>,
}

pub type SharedState = Arc<Mutex<ConnState>>;

pub fn new_state(now: Instant) -> SharedState {
    Arc::new(Mutex::new(ConnState {
        negotiated: false,
        in_session: false,
        in_data: false,
        last_active: now,
        evicted: false,
        waker: None,
    }))
}

pub fn lock(state: &Mutex<ConnState>) -> MutexGuard<'_, ConnState> {
    // The state is plain values, whole after any panic.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Closes the connection from outside: its stream fails at its next poll,
/// and a task waiting on it is woken to see that.
pub fn evict(state: &Mutex<ConnState>) {
    let mut st = lock(state);
    st.evicted = true;
    if let Some(w) = st.waker.take() {
        w.wake();
    }
}

/// The stream indymilter reads and writes in place of the socket.
pub struct Guarded<S> {
    io: S,
    id: u64,
    state: SharedState,
    registry: Arc<Registry>,
    limits: ConnLimits,
    framer: Framer,
    /// When the first byte of the packet in progress came.
    packet_began: Option<Instant>,
    /// When the reply being written first found the socket full.
    write_began: Option<Instant>,
    /// Fires at the deadline of the current wait.
    timer: Pin<Box<Sleep>>,
    /// Set once the connection is cut: every later poll fails.
    cut: Option<Cut>,
}

impl<S> Guarded<S> {
    pub fn new(
        io: S,
        id: u64,
        state: SharedState,
        registry: Arc<Registry>,
        limits: ConnLimits,
    ) -> Guarded<S> {
        let first = lock(&state).last_active + limits.negotiate_timeout;
        Guarded {
            io,
            id,
            state,
            registry,
            limits,
            framer: Framer::default(),
            packet_began: None,
            write_began: None,
            timer: Box::pin(tokio::time::sleep_until(first)),
            cut: None,
        }
    }

    fn fail<T>(&mut self, cut: Cut) -> Poll<io::Result<T>> {
        if self.cut.is_none() {
            self.cut = Some(cut);
            crate::metrics::record_milter_cut(cut.name());
            tracing::debug!(reason = cut.name(), "milter: closing an MTA connection");
        }
        Poll::Ready(Err(cut.error()))
    }

    /// When the read now waiting must have got somewhere, and what it is.
    fn read_deadline(&self, st: &ConnState) -> (Instant, Cut) {
        let (wait, cut) = if !st.negotiated {
            (self.limits.negotiate_timeout, Cut::Negotiate)
        } else if st.in_data {
            (self.limits.data_timeout, Cut::Data)
        } else {
            (self.limits.idle_timeout, Cut::Idle)
        };
        let next_command = st.last_active + wait;
        match self.packet_began {
            Some(began) if began + self.limits.idle_timeout < next_command => {
                (began + self.limits.idle_timeout, Cut::SlowPacket)
            }
            _ => (next_command, cut),
        }
    }

    /// Parks the task until `deadline` too (and until an eviction, with
    /// the lock held by the caller); whether the deadline has passed.
    fn wait_until(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }

    /// Takes the bytes just read: packet boundaries, the cap.
    fn took(&mut self, bytes: &[u8], now: Instant) -> Result<(), ()> {
        let mut st = lock(&self.state);
        let mut completed = false;
        let result = self.framer.feed(bytes, |command| {
            completed = true;
            st.last_active = now;
            match command {
                b'O' => st.negotiated = true,
                b'C' => st.in_session = true,
                b'T' => st.in_data = true,
                // End of message, abort, quit.
                b'E' | b'A' | b'Q' => st.in_data = false,
                // Quit, the connection kept for a new session.
                b'K' => (st.in_data, st.in_session) = (false, false),
                _ => {}
            }
        });
        drop(st);
        if let Err(e) = result {
            tracing::debug!(error = %e, "milter: refusing a packet");
            return Err(());
        }
        self.packet_began = match self.packet_began {
            _ if !self.framer.in_packet() => None,
            Some(began) if !completed => Some(began),
            _ => Some(now),
        };
        Ok(())
    }
}

impl<S> Drop for Guarded<S> {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(cut) = this.cut {
            return Poll::Ready(Err(cut.error()));
        }
        if lock(&this.state).evicted {
            return this.fail(Cut::Evicted);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let now = Instant::now();
                if this.took(&buf.filled()[before..], now).is_err() {
                    buf.set_filled(before);
                    return this.fail(Cut::TooLarge);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let (deadline, cut) = {
                    let mut st = lock(&this.state);
                    if st.evicted {
                        drop(st);
                        return this.fail(Cut::Evicted);
                    }
                    st.waker = Some(cx.waker().clone());
                    this.read_deadline(&st)
                };
                if this.wait_until(deadline, cx) {
                    return this.fail(cut);
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(cut) = this.cut {
            return Poll::Ready(Err(cut.error()));
        }
        if lock(&this.state).evicted {
            return this.fail(Cut::Evicted);
        }
        match Pin::new(&mut this.io).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                this.write_began = None;
                let now = Instant::now();
                lock(&this.state).last_active = now;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                {
                    let mut st = lock(&this.state);
                    if st.evicted {
                        drop(st);
                        return this.fail(Cut::Evicted);
                    }
                    st.waker = Some(cx.waker().clone());
                }
                let began = *this.write_began.get_or_insert_with(Instant::now);
                if this.wait_until(began + this.limits.idle_timeout, cx) {
                    return this.fail(Cut::Write);
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn limits(ms: u64) -> ConnLimits {
        ConnLimits {
            negotiate_timeout: Duration::from_millis(ms),
            idle_timeout: Duration::from_millis(ms),
            data_timeout: Duration::from_millis(ms * 10),
            max_connections: NonZeroUsize::new(10).unwrap(),
        }
    }

    fn kind<T>(r: io::Result<T>) -> io::ErrorKind {
        r.err().expect("an error").kind()
    }

    #[tokio::test]
    async fn a_reply_the_mta_does_not_take_is_cut_at_the_idle_timeout() {
        let (_mta, milter) = tokio::io::duplex(16);
        let mut g = Registry::new(limits(100)).admit(milter);
        let start = std::time::Instant::now();
        let r = g.write_all(&[b'x'; 64]).await;
        assert_eq!(kind(r), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(90));
        assert_eq!(g.cut, Some(Cut::Write));
    }

    #[tokio::test]
    async fn an_eviction_wakes_a_waiting_read() {
        let (_mta, milter) = tokio::io::duplex(64);
        let mut g = Registry::new(limits(10_000)).admit(milter);
        let state = g.state.clone();
        let read = tokio::spawn(async move { g.read_u8().await });
        tokio::task::yield_now().await;
        evict(&state);
        let r = tokio::time::timeout(Duration::from_secs(1), read).await;
        assert_eq!(
            kind(r.expect("woken").unwrap()),
            io::ErrorKind::ConnectionAborted
        );
    }

    #[tokio::test]
    async fn the_state_follows_the_commands() {
        let (mut mta, milter) = tokio::io::duplex(1024);
        let mut g = Registry::new(limits(10_000)).admit(milter);
        let mut buf = [0; 256];
        let mut send = async |bytes: &[u8]| {
            mta.write_all(bytes).await.unwrap();
            let _ = g.read(&mut buf).await.unwrap();
            let st = lock(&g.state);
            (st.negotiated, st.in_data)
        };
        assert_eq!(send(&[0, 0, 0, 13, b'O']).await, (false, false));
        assert_eq!(send(&[0; 12]).await, (true, false));
        assert_eq!(send(&[0, 0, 0, 1, b'T']).await, (true, true));
        assert_eq!(send(&[0, 0, 0, 1, b'E']).await, (true, false));
        // 1 MiB announced: refused on the length word.
        mta.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        assert_eq!(kind(g.read(&mut buf).await), io::ErrorKind::InvalidData);
        assert_eq!(g.cut, Some(Cut::TooLarge));
    }
}
