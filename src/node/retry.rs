//! What the node's retry loops (joining, policy sync, heartbeats) share:
//! a wait between attempts that grows, and a log line for a failure only
//! when its reason is new, so that a cause that lasts hours writes one
//! line, not thousands.

use std::time::Duration;

/// Waits between the attempts of a retry loop: `first`, then twice as
/// long each time, up to `max`.
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            next: first,
            max,
        }
    }

    /// Sleeps the current delay, and doubles the next one (up to `max`).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.advance()).await;
    }

    /// The current delay; the next one is doubled (up to `max`).
    fn advance(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// The next wait is `first` again: things changed.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Remembers the reason of the last failure logged.
#[derive(Default)]
pub struct Reasons {
    last: Option<String>,
}

impl Reasons {
    /// Whether `why` differs from the reason before (which it replaces):
    /// log it then; else a line at debug level is enough.
    pub fn is_new(&mut self, why: &str) -> bool {
        if self.last.as_deref() == Some(why) {
            return false;
        }
        self.last = Some(why.to_string());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_new_once_until_another_comes() {
        let mut r = Reasons::default();
        assert!(r.is_new("no leader"));
        assert!(!r.is_new("no leader"));
        assert!(r.is_new("refused"));
        assert!(r.is_new("no leader"));
    }

    #[test]
    fn waits_double_up_to_the_most_and_start_again_after_a_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<u128> = (0..4).map(|_| b.advance().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.advance(), Duration::from_millis(100));
    }
}
