//! Time stamps at the start of a syslog line: the classic one
//! (`Nov 30 23:11:47`, no year, no zone) and RFC 3339
//! (`2026-11-30T23:11:47.123+01:00`). Classic stamps are taken as UTC and
//! their year is inferred (see [`YearGuess`]).

use crate::engine::Time;

/// The year of classic stamps, which carry none: starts at a given year
/// and moves on by one when the month steps back by six or more (December
/// to January); a small step back (lines slightly out of order) keeps it.
#[derive(Clone, Copy, Debug)]
pub struct YearGuess {
    year: i32,
    last_month: u32,
}

impl YearGuess {
    pub fn new(year: i32) -> YearGuess {
        YearGuess {
            year,
            last_month: 0,
        }
    }

    /// The year of a stamp of `month` (1 to 12), the next after the last.
    fn year_of(&mut self, month: u32) -> i32 {
        if self.last_month != 0 && month + 6 <= self.last_month {
            self.year += 1;
        }
        self.last_month = month;
        self.year
    }
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
pub fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// `YYYY-MM-DD` of a time in seconds since the epoch.
pub fn day_text(time: Time) -> String {
    let (y, m, d) = civil_from_days((time / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a time in seconds since the epoch.
pub fn time_text(time: Time) -> String {
    let s = time % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        day_text(time),
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

fn clock(b: &[u8]) -> Option<u32> {
    if b.len() != 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let (h, m, s) = (digits(&b[0..2])?, digits(&b[3..5])?, digits(&b[6..8])?);
    (h < 24 && m < 60 && s <= 60).then_some(h * 3600 + m * 60 + s.min(59))
}

fn epoch(year: i32, month: u32, day: u32, secs: i64) -> Option<Time> {
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || !(1970..=9999).contains(&year) {
        return None;
    }
    let t = days_from_civil(year, month, day) * 86_400 + secs;
    u64::try_from(t).ok()
}

/// Reads the stamp at the start of `line`: its time and the rest of the
/// line after the stamp and one space. `None` if the line starts with
/// neither form.
pub fn parse<'a>(line: &'a str, years: &mut YearGuess) -> Option<(Time, &'a str)> {
    let b = line.as_bytes();
    if b.len() > 16 && b[3] == b' ' && b[6] == b' ' && b[15] == b' ' {
        let month = MONTHS.iter().position(|m| &b[0..3] == *m)? as u32 + 1;
        let day = digits(b[4..6].trim_ascii_start())?;
        let secs = clock(&b[7..15])?;
        let year = years.year_of(month);
        return Some((epoch(year, month, day, i64::from(secs))?, &line[16..]));
    }
    rfc3339(line)
}

fn rfc3339(line: &str) -> Option<(Time, &str)> {
    let b = line.as_bytes();
    if b.len() < 21 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let year = digits(&b[0..4])? as i32;
    let (month, day) = (digits(&b[5..7])?, digits(&b[8..10])?);
    let secs = clock(&b[11..19])?;
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    let offset: i64 = match b.get(i)? {
        b'Z' | b'z' => {
            i += 1;
            0
        }
        sign @ (b'+' | b'-') => {
            let z = b.get(i + 1..i + 6)?;
            if z[2] != b':' {
                return None;
            }
            let off = i64::from(digits(&z[0..2])? * 3600 + digits(&z[3..5])? * 60);
            i += 6;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    if b.get(i) != Some(&b' ') {
        return None;
    }
    let time = epoch(year, month, day, i64::from(secs) - offset)?;
    Some((time, &line[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_and_rfc3339_stamps() {
        let mut y = YearGuess::new(2026);
        let (t, rest) = parse("Nov 30 23:11:47 mx postfix/smtpd[1]: x", &mut y).unwrap();
        assert_eq!(time_text(t), "2026-11-30T23:11:47Z");
        assert_eq!(rest, "mx postfix/smtpd[1]: x");
        let (t, _) = parse("Dec  1 00:00:00 mx p: x", &mut y).unwrap();
        assert_eq!(time_text(t), "2026-12-01T00:00:00Z");
        let (t, rest) = parse("2026-11-30T23:11:47.123456+01:00 mx p: x", &mut y).unwrap();
        assert_eq!(time_text(t), "2026-11-30T22:11:47Z");
        assert_eq!(rest, "mx p: x");
        assert!(parse("Foo 30 23:11:47 mx p: x", &mut y).is_none());
        assert!(parse("2026-13-30T23:11:47Z mx", &mut y).is_none());
    }

    #[test]
    fn year_moves_on_at_new_year_only() {
        let mut y = YearGuess::new(2025);
        let t = |y: &mut YearGuess, l: &str| time_text(parse(l, y).unwrap().0);
        assert_eq!(t(&mut y, "Dec 31 23:59:59 h p: x"), "2025-12-31T23:59:59Z");
        // A line slightly out of order keeps the year.
        assert_eq!(t(&mut y, "Dec 31 23:59:58 h p: x"), "2025-12-31T23:59:58Z");
        assert_eq!(t(&mut y, "Jan  1 00:00:01 h p: x"), "2026-01-01T00:00:01Z");
        assert_eq!(t(&mut y, "Jan  1 00:00:02 h p: x"), "2026-01-01T00:00:02Z");
        assert_eq!(t(&mut y, "Dec 31 23:59:59 h p: x"), "2026-12-31T23:59:59Z");
        assert_eq!(t(&mut y, "Jan  1 00:00:00 h p: x"), "2027-01-01T00:00:00Z");
    }

    #[test]
    fn civil_round_trip() {
        for d in [-1, 0, 59, 10_000, 20_000, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }
}
