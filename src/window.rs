//! A sliding-window event counter over fixed time buckets, as ze-filter
//! keeps it: 600 s as 20 buckets of 30 s, so an event stops counting
//! between 571 and 600 s after it happened. Pure: time is passed in, in
//! whole seconds; nothing here reads a clock.

use serde::{Deserialize, Serialize};

/// Window length and bucket size, shared by every counter of a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowConfig {
    bucket_secs: u32,
    buckets: u32,
}

/// Why a window configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("RateWindow and RateBucket must be greater than 0")]
    Zero,
    #[error("RateWindow {window} is not a multiple of RateBucket {bucket}")]
    NotMultiple { window: u32, bucket: u32 },
    #[error("RateWindow {window} / RateBucket {bucket} makes more than {max} buckets")]
    TooManyBuckets { window: u32, bucket: u32, max: u32 },
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig::DEFAULT
    }
}

impl WindowConfig {
    /// ze-filter's 600 s window of 30 s buckets.
    pub const DEFAULT: WindowConfig = WindowConfig {
        bucket_secs: 30,
        buckets: 20,
    };
    /// Memory per counter grows with the bucket count; this bounds it.
    pub const MAX_BUCKETS: u32 = 1024;

    pub fn new(window_secs: u32, bucket_secs: u32) -> Result<WindowConfig, WindowError> {
        if window_secs == 0 || bucket_secs == 0 {
            return Err(WindowError::Zero);
        }
        if !window_secs.is_multiple_of(bucket_secs) {
            return Err(WindowError::NotMultiple {
                window: window_secs,
                bucket: bucket_secs,
            });
        }
        let buckets = window_secs / bucket_secs;
        if buckets > Self::MAX_BUCKETS {
            return Err(WindowError::TooManyBuckets {
                window: window_secs,
                bucket: bucket_secs,
                max: Self::MAX_BUCKETS,
            });
        }
        Ok(WindowConfig {
            bucket_secs,
            buckets,
        })
    }

    pub fn window_secs(self) -> u32 {
        self.bucket_secs * self.buckets
    }

    pub fn bucket_secs(self) -> u32 {
        self.bucket_secs
    }

    pub fn buckets(self) -> u32 {
        self.buckets
    }

    /// The bucket number of an instant (seconds since the epoch).
    pub fn bucket_of(self, now: u64) -> u64 {
        now / u64::from(self.bucket_secs)
    }
}

/// Event counts of the last `buckets` buckets, as a ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// `counts[b % len]` holds bucket `b`, for `b` in `newest-len+1 ..= newest`.
    counts: Box<[u32]>,
    /// The latest bucket the ring has been moved to. A `u32`, so that a
    /// window fits in 24 bytes: bucket numbers reach 2^32 in 2106 with 1 s
    /// buckets; later instants count in that last bucket.
    newest: u32,
    /// The sum of `counts`.
    total: u32,
}

impl Window {
    /// The bucket of `now` as the ring numbers them: at most `u32::MAX`.
    fn bucket(config: WindowConfig, now: u64) -> u64 {
        config.bucket_of(now).min(u64::from(u32::MAX))
    }

    pub fn new(config: WindowConfig) -> Window {
        Window {
            counts: vec![0; config.buckets as usize].into_boxed_slice(),
            newest: 0,
            total: 0,
        }
    }

    fn slot(&self, bucket: u64) -> usize {
        (bucket % self.counts.len() as u64) as usize
    }

    /// Moves the ring to `now`, dropping the buckets that left the window.
    /// An instant before the newest bucket counts in the newest bucket, so a
    /// clock stepping back never loses or misplaces events.
    fn advance(&mut self, config: WindowConfig, now: u64) {
        let bucket = Self::bucket(config, now);
        if bucket <= self.newest() {
            return;
        }
        if bucket - self.newest() >= self.counts.len() as u64 {
            self.counts.fill(0);
            self.total = 0;
        } else {
            for b in self.newest() + 1..=bucket {
                let slot = self.slot(b);
                self.total -= self.counts[slot];
                self.counts[slot] = 0;
            }
        }
        self.newest = bucket as u32; // at most u32::MAX: see above
    }

    /// Counts `n` events at `now` and returns the count in the window,
    /// these events included.
    pub fn add(&mut self, config: WindowConfig, now: u64, n: u32) -> u32 {
        self.advance(config, now);
        let slot = self.slot(self.newest());
        self.counts[slot] = self.counts[slot].saturating_add(n);
        self.total = self.total.saturating_add(n);
        self.total
    }

    /// Takes back one event counted at `at` (a reservation given back),
    /// if it still counts at `now`: from `at`'s bucket, or, if that one is
    /// empty (the event was counted in the newest bucket because the clock
    /// had stepped back), from the next newer one that holds an event.
    /// Returns whether an event was taken back.
    pub fn take_back(&mut self, config: WindowConfig, at: u64, now: u64) -> bool {
        self.advance(config, now);
        let len = self.counts.len() as u64;
        let oldest = (self.newest() + 1).saturating_sub(len);
        let from = Self::bucket(config, at).clamp(oldest, self.newest());
        if Self::bucket(config, at) < oldest {
            return false;
        }
        for b in from..=self.newest() {
            let slot = self.slot(b);
            if self.counts[slot] > 0 {
                self.counts[slot] -= 1;
                self.total -= 1;
                return true;
            }
        }
        false
    }

    /// The events in the window at `now`, without changing anything.
    pub fn count(&self, config: WindowConfig, now: u64) -> u32 {
        let bucket = Self::bucket(config, now);
        if bucket <= self.newest() {
            return self.total;
        }
        if bucket - self.newest() >= self.counts.len() as u64 {
            return 0;
        }
        let leaving: u32 = (self.newest() + 1..=bucket)
            .map(|b| self.counts[self.slot(b)])
            .sum();
        self.total - leaving
    }

    /// The events counted in bucket `bucket` (0 once it left the ring or
    /// before the ring reached it).
    pub fn bucket_count(&self, bucket: u64) -> u32 {
        let len = self.counts.len() as u64;
        if bucket > self.newest() || bucket + len <= self.newest() {
            return 0;
        }
        self.counts[self.slot(bucket)]
    }

    /// The newest bucket the ring has reached.
    pub fn newest(&self) -> u64 {
        u64::from(self.newest)
    }

    /// The events in the newest bucket the ring has reached.
    pub fn newest_count(&self) -> u32 {
        self.counts[self.slot(self.newest())]
    }

    /// Whether the ring is of `config`'s shape and its total is its
    /// (saturated) sum, as this code keeps it: a snapshot's windows are
    /// checked with it.
    pub fn fits(&self, config: WindowConfig) -> bool {
        let sum: u64 = self.counts.iter().map(|c| u64::from(*c)).sum();
        self.counts.len() == config.buckets as usize
            && sum.min(u64::from(u32::MAX)) == u64::from(self.total)
    }

    /// Nothing left in the window at `now`: the counter can be forgotten.
    pub fn is_idle(&self, config: WindowConfig, now: u64) -> bool {
        self.count(config, now) == 0
    }

    /// Seconds from `now` until the count has dropped below `limit`, that is
    /// until one more event would be allowed. 0 when it already is.
    pub fn retry_after(&self, config: WindowConfig, now: u64, limit: u64) -> u64 {
        let count = u64::from(self.count(config, now));
        if count < limit {
            return 0;
        }
        let must_leave = count - limit + 1;
        let len = self.counts.len() as u64;
        let current = Self::bucket(config, now).max(self.newest());
        let mut left = 0u64;
        // Oldest live bucket first; bucket b stops counting at (b + len) * size.
        for b in (current + 1).saturating_sub(len)..=current {
            if b > self.newest() {
                break;
            }
            left += u64::from(self.counts[self.slot(b)]);
            if left >= must_leave {
                let expires = (b + len) * u64::from(config.bucket_secs);
                return expires.saturating_sub(now);
            }
        }
        u64::from(config.window_secs())
    }
}

impl Window {
    /// The same events in a window of another shape: each bucket's events
    /// move to the bucket of `to` holding the old bucket's start; what falls
    /// out of the new window is dropped.
    pub fn rebucket(&self, from: WindowConfig, to: WindowConfig) -> Window {
        let mut moved = Window::new(to);
        let len = self.counts.len() as u64;
        for b in (self.newest() + 1).saturating_sub(len)..=self.newest() {
            let n = self.counts[self.slot(b)];
            if n > 0 {
                moved.add(to, b * u64::from(from.bucket_secs), n);
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: WindowConfig = WindowConfig::DEFAULT;

    #[test]
    fn an_event_stops_counting_between_571_and_600_seconds_later() {
        // Happened at the start of a bucket: counts for 599 s.
        let mut w = Window::new(C);
        w.add(C, 1_000_020, 1); // 1_000_020 is a multiple of 30
        assert_eq!(w.count(C, 1_000_020 + 599), 1);
        assert_eq!(w.count(C, 1_000_020 + 600), 0);
        // Happened at the end of a bucket: counts for 570 s.
        let mut w = Window::new(C);
        w.add(C, 1_000_049, 1);
        assert_eq!(w.count(C, 1_000_049 + 570), 1);
        assert_eq!(w.count(C, 1_000_049 + 571), 0);
    }

    #[test]
    fn add_returns_the_count_including_the_new_events() {
        let mut w = Window::new(C);
        assert_eq!(w.add(C, 100, 1), 1);
        assert_eq!(w.add(C, 130, 2), 3);
        assert_eq!(w.add(C, 10_000, 1), 1);
    }

    #[test]
    fn instants_past_the_last_bucket_number_count_in_it() {
        let config = WindowConfig::new(10, 1).unwrap();
        let mut w = Window::new(config);
        let last = u64::from(u32::MAX);
        assert_eq!(w.add(config, last - 1, 1), 1);
        assert_eq!(w.add(config, last + 5, 1), 2);
        assert_eq!(w.add(config, u64::MAX, 1), 3);
        assert_eq!(w.newest(), last);
        assert_eq!(w.bucket_count(last), 2);
        assert_eq!(w.count(config, u64::MAX), 3);
        assert!(!w.is_idle(config, u64::MAX));
    }

    #[test]
    fn a_clock_stepping_back_counts_in_the_newest_bucket() {
        let mut w = Window::new(C);
        w.add(C, 1000, 1);
        assert_eq!(w.add(C, 900, 1), 2);
        assert_eq!(w.count(C, 1000 + 600), 0);
    }

    #[test]
    fn retry_after_is_when_enough_events_have_left() {
        let mut w = Window::new(C);
        w.add(C, 0, 3); // bucket 0, leaves at 600
        w.add(C, 60, 2); // bucket 2, leaves at 660
        assert_eq!(w.retry_after(C, 100, 6), 0);
        assert_eq!(w.retry_after(C, 100, 5), 500); // one must leave
        assert_eq!(w.retry_after(C, 100, 2), 560); // four must leave
    }

    #[test]
    fn rebucket_keeps_what_fits_the_new_window() {
        let mut w = Window::new(C);
        w.add(C, 0, 1);
        w.add(C, 300, 2);
        w.add(C, 590, 3);
        let to = WindowConfig::new(300, 60).unwrap();
        let moved = w.rebucket(C, to);
        // Events from buckets starting at 300 and 570 are within 300 s of 590.
        assert_eq!(moved.count(to, 590), 5);
        assert_eq!(w.rebucket(C, C).count(C, 590), 6);
    }

    #[test]
    fn take_back_removes_one_event_of_its_bucket_while_it_counts() {
        let c = WindowConfig::default();
        let mut w = Window::new(c);
        w.add(c, 1000, 1);
        w.add(c, 1100, 2);
        assert!(w.take_back(c, 1000, 1200));
        assert_eq!(w.count(c, 1200), 2);
        // Bucket of 1000 is empty now: the next newer event goes.
        assert!(w.take_back(c, 1000, 1200));
        assert_eq!(w.count(c, 1200), 1);
        // An event whose bucket left the window is not taken back twice.
        assert!(!w.take_back(c, 1000, 1620));
        assert_eq!(w.count(c, 1620), 1);
        assert!(w.take_back(c, 1100, 1620));
        assert!(!w.take_back(c, 1100, 1620));
        assert_eq!(w.count(c, 1620), 0);
    }

    #[test]
    fn config_is_validated() {
        assert_eq!(WindowConfig::new(600, 30), Ok(WindowConfig::DEFAULT));
        assert_eq!(WindowConfig::new(0, 30), Err(WindowError::Zero));
        assert!(matches!(
            WindowConfig::new(600, 7),
            Err(WindowError::NotMultiple { .. })
        ));
        assert!(WindowConfig::new(100_000, 1).is_err());
    }
}
