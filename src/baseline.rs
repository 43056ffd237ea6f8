//! What is usual for a key: an exponentially weighted mean and spread of
//! its counts per bucket, one pair per hour of the day (UTC), and when a
//! count is unusual against it. Pure: hours and counts in, numbers out.
//!
//! A baseline is 224 bytes (24 × two `f32`, a mask of the hours learned,
//! the last bucket learned, the hourly peaks' header) and, once the key
//! has counted, a block of 352 bytes of hourly peaks (336 and two
//! reference counts: snapshots share it); with its key and
//! the engine's hash table, `BENCHMARKS.md` gives the bytes per key.

use serde::{Deserialize, Serialize};

use crate::peaks::HourlyPeaks;

/// Hours of the day, one slot each.
const SLOTS: usize = 24;

/// The weight of a new sample. A slot takes 120 samples an hour with the
/// default 30 s bucket, so it remembers about its last hour of each day.
const ALPHA: f32 = 1.0 / 128.0;
/// The weight of a bucket that was unusual (it reached the key's trip),
/// for the mean only:
/// a lasting change becomes usual in about an hour (5 times the rate) to
/// a few hours (10 times), instead of minutes, and the spread is not
/// widened by the very counts that are unusual.
const ALPHA_UNUSUAL: f32 = ALPHA / 16.0;

/// `UnusualFactor` when the policy does not set it.
pub const DEFAULT_FACTOR: u32 = 4;
/// `UnusualFloor` when the policy does not set it.
pub const DEFAULT_FLOOR: u32 = 10;
/// `UnusualKeys` when the policy does not set it: about 140 to 195 MB of
/// baselines (715 to 974 bytes each with its key and hourly peaks,
/// `BENCHMARKS.md`).
pub const DEFAULT_KEYS: u32 = 200_000;
/// The largest `UnusualKeys`: about 7.2 to 9.8 GB.
pub const MAX_KEYS: u32 = 10_000_000;
/// The largest `UnusualFactor` and `UnusualFloor`.
pub const MAX_FACTOR: u32 = 1_000;
pub const MAX_FLOOR: u32 = 1_000_000;

/// The policy's settings for unusual activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnusualConfig {
    /// How many times its usual rate a key's count in a bucket must exceed;
    /// 0 switches baselines and flags off.
    pub factor: u32,
    /// The least count in one bucket that can be unusual, so that quiet
    /// keys don't flap.
    pub floor: u32,
    /// The most (check, key) baselines kept; the least recent go first.
    pub keys: u32,
}

impl Default for UnusualConfig {
    fn default() -> Self {
        UnusualConfig {
            factor: DEFAULT_FACTOR,
            floor: DEFAULT_FLOOR,
            keys: DEFAULT_KEYS,
        }
    }
}

impl UnusualConfig {
    /// The settings given, the defaults for the others.
    pub fn new(factor: Option<u32>, floor: Option<u32>, keys: Option<u32>) -> UnusualConfig {
        let d = UnusualConfig::default();
        UnusualConfig {
            factor: factor.unwrap_or(d.factor),
            floor: floor.unwrap_or(d.floor),
            keys: keys.unwrap_or(d.keys),
        }
    }

    pub fn is_on(self) -> bool {
        self.factor > 0
    }

    /// The least count in a bucket that is unusual for a key whose usual
    /// count is `usual` (`None`: no history); `u32::MAX` when off.
    pub fn trip(self, usual: Option<f32>) -> u32 {
        if !self.is_on() {
            return u32::MAX;
        }
        let over = usual.map_or(0, |u| (u * self.factor as f32).floor() as u32 + 1);
        over.max(self.floor).max(1)
    }
}

/// A policy setting of this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    Factor,
    Floor,
    Keys,
}

impl Setting {
    pub fn from_name(word: &str) -> Option<Setting> {
        [
            ("UnusualFactor", Setting::Factor),
            ("UnusualFloor", Setting::Floor),
            ("UnusualKeys", Setting::Keys),
        ]
        .into_iter()
        .find(|(name, _)| word.eq_ignore_ascii_case(name))
        .map(|(_, s)| s)
    }

    /// The value, within its bounds; the error says which.
    pub fn parse(self, text: &str) -> Result<u32, String> {
        let (name, min, max, what) = match self {
            Setting::Factor => ("UnusualFactor", 0, MAX_FACTOR, " (0: off)"),
            Setting::Floor => ("UnusualFloor", 1, MAX_FLOOR, ""),
            Setting::Keys => ("UnusualKeys", 1, MAX_KEYS, ""),
        };
        match text.parse::<u32>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(format!(
                "expected a number from {min} to {max} after {name}{what}, found {}",
                crate::bounds::cut(text)
            )),
        }
    }
}

/// A key's usual count per bucket, per hour of the day.
///
/// The fields used at every bucket come first, and each hour's mean and
/// variance sit side by side, so that learning a bucket touches two cache
/// lines of the table entry, not four.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// The latest bucket learned or skipped: the next to learn is the one
    /// after it. Also orders the least recent keys, to forget first.
    last: u64,
    /// Bit h: hour h has been learned.
    learned: u32,
    /// Per hour: the mean and the variance.
    hours: [Hour; SLOTS],
    /// The highest window count of each of the last 7 days' hours.
    peaks: HourlyPeaks,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Hour {
    mean: f32,
    var: f32,
}

impl Default for Baseline {
    fn default() -> Self {
        Baseline {
            last: 0,
            learned: 0,
            hours: [Hour::default(); SLOTS],
            peaks: HourlyPeaks::default(),
        }
    }
}

/// The hour of the day (UTC) of an instant, in seconds since the epoch.
pub fn hour_of_day(secs: u64) -> usize {
    ((secs / 3600) % SLOTS as u64) as usize
}

impl Baseline {
    /// Takes in the `count` of `bucket`, which started at `start` (seconds),
    /// slowly if it was `unusual` (it reached the key's trip). An hour's
    /// first sample is its mean.
    pub fn learn(&mut self, bucket: u64, start: u64, count: u32, unusual: bool) {
        let h = hour_of_day(start);
        let x = count as f32;
        let known = self.learned & (1 << h) != 0;
        let slot = &mut self.hours[h];
        if !known {
            *slot = Hour { mean: x, var: 0.0 };
            self.learned |= 1 << h;
        } else if unusual {
            slot.mean += ALPHA_UNUSUAL * (x - slot.mean);
        } else {
            let d = x - slot.mean;
            slot.mean += ALPHA * d;
            slot.var = (1.0 - ALPHA) * (slot.var + ALPHA * d * d);
        }
        self.last = self.last.max(bucket);
    }

    /// The usual count per bucket at `secs`: mean plus one spread of that
    /// hour, or, for an hour not learned yet, the highest of the learned
    /// ones; `None` without any history.
    pub fn usual(&self, secs: u64) -> Option<f32> {
        let at = |h: usize| self.hours[h].mean + self.hours[h].var.sqrt();
        let h = hour_of_day(secs);
        if self.learned & (1 << h) != 0 {
            return Some(at(h));
        }
        (0..SLOTS)
            .filter(|h| self.learned & (1 << h) != 0)
            .map(at)
            .reduce(f32::max)
    }

    /// The latest bucket learned or skipped.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Notes the highest window count seen in `hour` (hours since the
    /// epoch).
    pub fn note_peak(&mut self, hour: u64, peak: u32) {
        self.peaks.note(hour, peak);
    }

    /// The highest window count of each of the last 7 days' hours.
    pub fn peaks(&self) -> &HourlyPeaks {
        &self.peaks
    }

    /// Skips the buckets before `bucket` not learned yet: a key back after
    /// a quiet spell, or new, is learned from `bucket` on.
    pub fn skip_until(&mut self, bucket: u64) {
        self.last = self.last.max(bucket.saturating_sub(1));
    }

    /// Counts per bucket scaled to a new bucket size: `ratio` is the new
    /// size over the old, and `last` becomes its bucket of the new size.
    pub fn rescale(&mut self, ratio: f32, last: u64) {
        self.last = last;
        for slot in &mut self.hours {
            slot.mean *= ratio;
            slot.var *= ratio * ratio;
        }
    }

    /// Whether this code could have made it: finite, non-negative numbers
    /// and only hours of the day learned. A snapshot's are checked with it.
    pub fn is_sound(&self) -> bool {
        self.learned < (1 << SLOTS)
            && self.peaks.is_sound()
            && self
                .hours
                .iter()
                .flat_map(|h| [h.mean, h.var])
                .all(|v| v.is_finite() && (0.0..=u32::MAX as f32).contains(&v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_count_is_its_own_usual() {
        let mut b = Baseline::default();
        assert_eq!(b.usual(0), None);
        for i in 0..200 {
            b.learn(i, i * 30, 7, false);
        }
        assert_eq!(b.usual(100), Some(7.0));
        // Another hour, not learned: the highest learned one.
        assert_eq!(b.usual(5 * 3600), Some(7.0));
    }

    #[test]
    fn trip_needs_both_the_factor_and_the_floor() {
        let c = UnusualConfig::default();
        assert_eq!(c.trip(None), 10);
        assert_eq!(c.trip(Some(1.0)), 10);
        assert_eq!(c.trip(Some(5.0)), 21);
        let off = UnusualConfig::new(Some(0), None, None);
        assert_eq!(off.trip(Some(1.0)), u32::MAX);
    }

    #[test]
    fn settings_are_bounded() {
        assert_eq!(Setting::Factor.parse("0"), Ok(0));
        assert!(Setting::Floor.parse("0").is_err());
        assert!(Setting::Keys.parse("10000001").is_err());
        assert!(Setting::Factor
            .parse("x")
            .unwrap_err()
            .contains("UnusualFactor"));
    }
}
