//! What the dashboard charts and lists, kept in this process and bounded:
//! the decision totals sampled every [`SAMPLE_EVERY`] for the last hour,
//! and the latest refusals the milter gave.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// How often the history takes a sample.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept: one hour at [`SAMPLE_EVERY`], and the one before it (the
/// first difference).
pub const SAMPLES: usize = 361;
/// Refusals kept, newest first.
pub const REFUSALS: usize = 100;
/// Bytes of one text field of a refusal kept (keys are the clients').
const FIELD_BYTES: usize = 256;

/// Events this process decided, allowed and refused, since it started.
static ALLOWED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
/// Refusals the milter gave (or, in a dry run, would have given).
static MILTER_REFUSED: AtomicU64 = AtomicU64::new(0);

static HISTORY: Mutex<VecDeque<Sample>> = Mutex::new(VecDeque::new());
static LATEST: Mutex<VecDeque<RefusalEvent>> = Mutex::new(VecDeque::new());

/// The totals at one time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Wall clock, ms since the Unix epoch.
    pub unix_ms: u64,
    /// Events decided and allowed, since the process started.
    pub allowed: u64,
    /// Events decided and refused.
    pub refused: u64,
    /// Refusals the milter gave.
    pub milter_refused: u64,
}

/// One refusal, as the `relayrate::refusal` log line has it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RefusalEvent {
    pub unix_ms: u64,
    pub client: String,
    pub host: String,
    pub check: &'static str,
    pub counted: String,
    pub count: u64,
    pub limit: u64,
    pub stage: &'static str,
    pub sender: String,
    pub auth: String,
    pub dry_run: bool,
}

/// Counts decided events.
pub fn count_decisions(allowed: u64, refused: u64) {
    ALLOWED.fetch_add(allowed, Ordering::Relaxed);
    REFUSED.fetch_add(refused, Ordering::Relaxed);
}

/// Keeps a refusal the milter gave; the oldest goes past [`REFUSALS`].
/// Text fields are cut to 256 bytes.
pub fn record_refusal(mut r: RefusalEvent) {
    MILTER_REFUSED.fetch_add(1, Ordering::Relaxed);
    for field in [
        &mut r.client,
        &mut r.host,
        &mut r.counted,
        &mut r.sender,
        &mut r.auth,
    ] {
        truncate(field, FIELD_BYTES);
    }
    push_bounded(&mut LATEST.lock().expect("refusals lock"), r, REFUSALS);
}

/// The totals now, stamped `unix_ms`.
pub fn now(unix_ms: u64) -> Sample {
    Sample {
        unix_ms,
        allowed: ALLOWED.load(Ordering::Relaxed),
        refused: REFUSED.load(Ordering::Relaxed),
        milter_refused: MILTER_REFUSED.load(Ordering::Relaxed),
    }
}

/// Takes a sample of the totals, stamped `unix_ms`.
pub fn sample(unix_ms: u64) {
    push_bounded(
        &mut HISTORY.lock().expect("history lock"),
        now(unix_ms),
        SAMPLES,
    );
}

/// The samples kept, oldest first.
pub fn samples() -> Vec<Sample> {
    HISTORY
        .lock()
        .expect("history lock")
        .iter()
        .copied()
        .collect()
}

/// The refusals kept, newest first.
pub fn latest_refusals() -> Vec<RefusalEvent> {
    LATEST
        .lock()
        .expect("refusals lock")
        .iter()
        .rev()
        .cloned()
        .collect()
}

/// Appends `item`, dropping the oldest past `cap`.
fn push_bounded<T>(ring: &mut VecDeque<T>, item: T, cap: usize) {
    while ring.len() >= cap {
        ring.pop_front();
    }
    ring.push_back(item);
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_keeps_the_newest() {
        let mut ring = VecDeque::new();
        for i in 0..10 {
            push_bounded(&mut ring, i, 3);
        }
        assert_eq!(ring, [7, 8, 9]);
    }

    #[test]
    fn fields_are_cut_on_a_character_boundary() {
        let mut s = "é".repeat(200);
        truncate(&mut s, 255);
        assert_eq!(s.len(), 254);
        let mut short = "abc".to_string();
        truncate(&mut short, 256);
        assert_eq!(short, "abc");
    }
}
