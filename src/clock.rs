//! The cluster's time: what a leader stamps on the entries it writes.
//!
//! A leader's wall clock cannot be trusted to agree with the previous
//! leader's: one running ahead would end every window early when it takes
//! office. So the cluster's time is carried forward from the stamps in the
//! log: the latest stamp seen, advanced by the monotonic time elapsed since
//! it was seen. It never runs backwards and never faster than real time,
//! whichever node leads. A node's own wall clock is used only when no
//! stamp is known at all (a new cluster).
//!
//! Pure: the caller passes the instants and wall-clock readings in.

use std::time::Instant;

/// How far a node's wall clock may stray from the cluster's before it is
/// reported, in ms.
pub const OFFSET_WARN_MS: u64 = 1_000;

/// The cluster's time as one node knows it.
#[derive(Clone, Debug, Default)]
pub struct ClusterClock {
    /// The latest cluster time known (ms since the Unix epoch) and the
    /// monotonic instant it was known at.
    anchor: Option<(u64, Instant)>,
}

impl ClusterClock {
    /// The cluster's time at `at`, in ms since the Unix epoch; `None`
    /// while no stamp is known.
    pub fn now_ms(&self, at: Instant) -> Option<u64> {
        self.anchor.map(|(stamp, seen)| {
            let elapsed = at.saturating_duration_since(seen).as_millis();
            stamp.saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX))
        })
    }

    /// Takes in a stamp (ms) from the log, seen at `at`. A stamp behind the
    /// time already carried forward changes nothing: the clock never runs
    /// backwards, and a leader's own stamps, seen a little after they were
    /// made, do not slow it down.
    pub fn observe(&mut self, stamp_ms: u64, at: Instant) {
        if self.now_ms(at).is_none_or(|now| stamp_ms > now) {
            self.anchor = Some((stamp_ms, at));
        }
    }

    /// The stamp for an entry written at `at` by the leader, whose wall
    /// clock reads `wall_ms`: the cluster's time; the wall clock only when
    /// no stamp is known yet, and from then on carried forward.
    pub fn stamp(&mut self, at: Instant, wall_ms: u64) -> u64 {
        match self.now_ms(at) {
            Some(now) => now,
            None => {
                self.anchor = Some((wall_ms, at));
                wall_ms
            }
        }
    }

    /// How far the wall clock (`wall_ms`, read at `at`) is ahead of the
    /// cluster's time, in ms (negative: behind); `None` while no stamp is
    /// known.
    pub fn offset_ms(&self, at: Instant, wall_ms: u64) -> Option<i64> {
        self.now_ms(at)
            .map(|now| i64::try_from(i128::from(wall_ms) - i128::from(now)).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: u64 = 1_000;

    #[test]
    fn with_no_stamp_the_wall_clock_starts_it() {
        let t0 = Instant::now();
        let mut c = ClusterClock::default();
        assert_eq!(c.now_ms(t0), None);
        assert_eq!(c.stamp(t0, 5_000 * S), 5_000 * S);
        // From then on it is carried forward, whatever the wall clock says.
        assert_eq!(c.stamp(t0 + Duration::from_secs(2), 9_000 * S), 5_002 * S);
    }

    #[test]
    fn a_leader_whose_clock_runs_ahead_carries_the_last_stamp_forward() {
        // The old leader's last stamp, seen by the new leader at t0; its
        // own clock is 700 s ahead.
        let t0 = Instant::now();
        let mut c = ClusterClock::default();
        c.observe(1_000 * S, t0);
        let later = t0 + Duration::from_secs(13);
        assert_eq!(c.stamp(later, (1_000 + 700 + 13) * S), 1_013 * S);
    }

    #[test]
    fn never_runs_backwards() {
        let t0 = Instant::now();
        let mut c = ClusterClock::default();
        c.observe(1_000 * S, t0);
        // A stamp from a leader whose clock is behind changes nothing.
        c.observe(400 * S, t0 + Duration::from_secs(1));
        assert_eq!(c.now_ms(t0 + Duration::from_secs(1)), Some(1_001 * S));
        // An instant before the anchor (another thread's) reads the anchor.
        c.observe(1_050 * S, t0 + Duration::from_secs(1));
        assert_eq!(c.now_ms(t0), Some(1_050 * S));
    }

    #[test]
    fn never_faster_than_real_time_between_stamps_it_made() {
        let t0 = Instant::now();
        let mut c = ClusterClock::default();
        c.observe(1_000 * S, t0);
        // The leader's own stamps come back applied a little later: they
        // neither slow the clock down nor push it.
        let s1 = c.stamp(t0 + Duration::from_millis(100), 0);
        c.observe(s1, t0 + Duration::from_millis(130));
        assert_eq!(
            c.now_ms(t0 + Duration::from_millis(500)),
            Some(1_000 * S + 500)
        );
    }

    #[test]
    fn follows_a_newer_stamp_from_the_log() {
        let t0 = Instant::now();
        let mut c = ClusterClock::default();
        c.observe(1_000 * S, t0);
        c.observe(1_050 * S, t0 + Duration::from_secs(1));
        assert_eq!(c.now_ms(t0 + Duration::from_secs(2)), Some(1_051 * S));
    }

    #[test]
    fn offset_is_the_wall_clock_minus_the_clusters() {
        let t0 = Instant::now();
        let mut c = ClusterClock::default();
        assert_eq!(c.offset_ms(t0, 0), None);
        c.observe(1_000 * S, t0);
        assert_eq!(c.offset_ms(t0, 1_030 * S), Some(30_000));
        assert_eq!(c.offset_ms(t0, 990 * S), Some(-10_000));
    }
}
