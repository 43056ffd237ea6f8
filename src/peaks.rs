//! A key's highest window count in each of the last 168 hours (7 days),
//! kept beside its baseline so that `relayratectl suggest` can choose
//! limits from what the cluster has seen. Pure: hours and counts in.
//!
//! 168 hours × 2 bytes, in a block of its own made at the first peak:
//! 336 bytes, its reference counts and the allocator's header per key
//! (`BENCHMARKS.md`). The block is shared by the copies of the peaks that
//! a Raft snapshot or `suggest` takes under the state's lock, and copied
//! only when the peaks change while a copy holds it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Hours kept: 7 days.
pub const HOURS: usize = 168;

/// Peaks above this are kept as this (a window count of 65,535 is over
/// 100 events a second for a 600 s window).
pub const MAX_PEAK: u32 = u16::MAX as u32;

/// The highest window count of each of the last [`HOURS`] hours.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourlyPeaks {
    /// The newest hour noted, in hours since the epoch.
    newest: u64,
    /// `peaks[h % HOURS]` holds hour `h`, for the `HOURS` hours up to
    /// `newest`; empty until the first peak. Shared by copies.
    peaks: Arc<[u16]>,
}

impl HourlyPeaks {
    /// Notes a window count of `peak` in `hour` (hours since the epoch).
    /// An hour older than the newest counts in its slot if still kept.
    pub fn note(&mut self, hour: u64, peak: u32) {
        if peak == 0 {
            return;
        }
        if self.peaks.is_empty() {
            self.peaks = vec![0; HOURS].into();
            self.newest = hour;
        }
        if hour + (HOURS as u64) <= self.newest {
            return;
        }
        let slot = (hour % HOURS as u64) as usize;
        let peak = peak.min(MAX_PEAK) as u16;
        if hour <= self.newest && self.peaks[slot] >= peak {
            return; // nothing changes: a shared block stays shared
        }
        let peaks = Arc::make_mut(&mut self.peaks);
        if hour > self.newest {
            let gone = (hour - self.newest).min(HOURS as u64);
            for h in hour + 1 - gone..=hour {
                peaks[(h % HOURS as u64) as usize] = 0;
            }
            self.newest = hour;
        }
        peaks[slot] = peaks[slot].max(peak);
    }

    /// The hours with a peak among the [`HOURS`] up to `now_hour`, as
    /// (hour since the epoch, peak), oldest first.
    pub fn hours(&self, now_hour: u64) -> impl Iterator<Item = (u64, u32)> + '_ {
        let from = (now_hour + 1).saturating_sub(HOURS as u64);
        let to = self.newest.min(now_hour);
        let kept = (self.newest + 1).saturating_sub(HOURS as u64);
        (from.max(kept)..=to)
            .filter(|_| !self.peaks.is_empty())
            .map(|h| (h, u32::from(self.peaks[(h % HOURS as u64) as usize])))
            .filter(|(_, p)| *p > 0)
    }

    /// Whether `self` and `other` share one block of peaks.
    #[cfg(test)]
    pub(crate) fn same_block(&self, other: &HourlyPeaks) -> bool {
        Arc::ptr_eq(&self.peaks, &other.peaks)
    }

    /// Whether this code could have made it: no ring, or one of [`HOURS`].
    pub fn is_sound(&self) -> bool {
        self.peaks.is_empty() || self.peaks.len() == HOURS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_highest_of_each_hour_for_a_week() {
        let mut p = HourlyPeaks::default();
        assert_eq!(p.hours(1000).count(), 0);
        p.note(1000, 5);
        p.note(1000, 3);
        p.note(1001, 7);
        assert_eq!(p.hours(1001).collect::<Vec<_>>(), [(1000, 5), (1001, 7)]);
        // A week later, hour 1000 has left; 1001 is the oldest kept.
        p.note(1000 + 168, 2);
        assert_eq!(p.hours(1168).collect::<Vec<_>>(), [(1001, 7), (1168, 2)]);
        // Far later: only the new hour.
        p.note(5000, 70_000);
        assert_eq!(p.hours(5000).collect::<Vec<_>>(), [(5000, MAX_PEAK)]);
        // Asked about a later time, the hours older than a week are left out.
        assert_eq!(p.hours(5000 + 168).count(), 0);
        // An hour older than the ring is not noted.
        p.note(10, 9);
        assert_eq!(p.hours(5000).count(), 1);
        assert!(p.is_sound());
    }

    /// A copy shares the block; a change to either copies it, and the
    /// other keeps what it had.
    #[test]
    fn a_copy_shares_the_peaks_until_one_changes() {
        let mut p = HourlyPeaks::default();
        p.note(1000, 5);
        let copy = p.clone();
        assert!(p.same_block(&copy));
        p.note(1000, 4); // lower: nothing changes
        assert!(p.same_block(&copy));
        p.note(1000, 6);
        p.note(1001, 1);
        assert!(!p.same_block(&copy));
        assert_eq!(copy.hours(1001).collect::<Vec<_>>(), [(1000, 5)]);
        assert_eq!(p.hours(1001).collect::<Vec<_>>(), [(1000, 6), (1001, 1)]);
    }
}
