//! Mail logs read back into the sessions they record, for `relayrate
//! replay` and `relayrate suggest`: one pass, streaming, in the order of
//! the files given and of their lines.
//!
//! - [`reader`]: lines of plain or gzipped files, each bounded.
//! - [`stamp`]: the syslog time stamps (classic, with the year inferred;
//!   RFC 3339).
//! - [`postfix`] and [`sendmail`]: what their lines say.
//! - [`sessions`]: those lines put back together into [`LogEvent`]s.
//! - [`replay`]: the events through the engine under a policy.
//! - [`suggest`]: limits chosen from the events.

pub mod postfix;
pub mod reader;
pub mod replay;
pub mod sendmail;
pub mod sessions;
pub mod stamp;
pub mod suggest;
pub mod synth;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::engine::Time;

/// One step of a session read from a log, at its log time (seconds since
/// the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogEvent {
    /// A client connected. `session` numbers the connection (a process id
    /// is reused; this is not).
    Connect {
        time: Time,
        session: u64,
        ip: IpAddr,
        host: String,
    },
    /// A message was tried in a connection, with `rcpts` recipients
    /// (accepted and refused ones).
    Mail {
        time: Time,
        session: u64,
        ip: IpAddr,
        sender: String,
        auth: Option<String>,
        rcpts: u32,
    },
    /// The connection ended.
    Close { time: Time, session: u64 },
}

impl LogEvent {
    pub fn time(&self) -> Time {
        match self {
            LogEvent::Connect { time, .. }
            | LogEvent::Mail { time, .. }
            | LogEvent::Close { time, .. } => *time,
        }
    }
}

/// A line of a known program that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    pub file: PathBuf,
    /// Counted from 1.
    pub line: u64,
    pub why: &'static str,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.why)
    }
}

/// How many malformed lines are kept to show; the others are counted.
pub const MAX_MALFORMED_SHOWN: usize = 20;

/// What a read went through.
#[derive(Clone, Debug, Default)]
pub struct ReadStats {
    pub lines: u64,
    /// Lines of other programs, or with no stamp we read.
    pub skipped: u64,
    /// Lines of Postfix or sendmail that could not be read; the first
    /// [`MAX_MALFORMED_SHOWN`] are in `malformed`.
    pub malformed_count: u64,
    pub malformed: Vec<Malformed>,
    /// Sessions or queued messages forgotten to stay within bounds.
    pub evicted: u64,
    pub first: Option<Time>,
    pub last: Option<Time>,
}

impl ReadStats {
    fn malformed(&mut self, file: &Path, line: u64, why: &'static str) {
        self.malformed_count += 1;
        if self.malformed.len() < MAX_MALFORMED_SHOWN {
            self.malformed.push(Malformed {
                file: file.to_path_buf(),
                line,
                why,
            });
        }
    }
}

/// How to read the logs.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// The year of the first classic (year-less) stamp of each file; `None`:
    /// the year of the file's modification time, one less if the first
    /// line's month is later than that time's month.
    pub year: Option<i32>,
}

/// Reads `paths` in order and hands each session event to `sink`, in log
/// order. Errors: a file that cannot be opened or read.
pub fn read_logs(
    paths: &[PathBuf],
    options: &ReadOptions,
    sink: impl FnMut(&LogEvent),
) -> std::io::Result<ReadStats> {
    read_logs_with_progress(paths, options, sink, |_, _| {})
}

/// Lines between two calls of a progress callback.
pub const PROGRESS_EVERY: u64 = 1 << 18;

/// As [`read_logs`], calling `progress` with the file and the lines read
/// so far (all files) every [`PROGRESS_EVERY`] lines.
pub fn read_logs_with_progress(
    paths: &[PathBuf],
    options: &ReadOptions,
    mut sink: impl FnMut(&LogEvent),
    mut progress: impl FnMut(&Path, u64),
) -> std::io::Result<ReadStats> {
    let mut stats = ReadStats::default();
    let mut sessions = sessions::Sessions::default();
    for path in paths {
        let mut lines = reader::open(path)?;
        let mut years = None;
        let mut number = 0u64;
        while let Some((line, cut)) = lines.next_line()? {
            number += 1;
            stats.lines += 1;
            if stats.lines % PROGRESS_EVERY == 0 {
                progress(path, stats.lines);
            }
            let years = years
                .get_or_insert_with(|| stamp::YearGuess::new(first_year(path, &line, options)));
            let Some((time, rest)) = stamp::parse(&line, years) else {
                stats.skipped += 1;
                continue;
            };
            stats.first.get_or_insert(time);
            stats.last = Some(time);
            match sessions.line(time, rest, &mut sink) {
                sessions::Outcome::Read if cut => stats.malformed(path, number, "line too long"),
                sessions::Outcome::Read => {}
                sessions::Outcome::Skipped => stats.skipped += 1,
                sessions::Outcome::Malformed(why) => stats.malformed(path, number, why),
            }
        }
    }
    sessions.finish(stats.last.unwrap_or(0), &mut sink);
    stats.evicted = sessions.evicted;
    Ok(stats)
}

/// The year to start a file's classic stamps with.
fn first_year(path: &Path, first_line: &str, options: &ReadOptions) -> i32 {
    if let Some(y) = options.year {
        return y;
    }
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let (year, month, _) = stamp::civil_from_days((modified / 86_400) as i64);
    let mut probe = stamp::YearGuess::new(year);
    match stamp::parse(first_line, &mut probe) {
        // Month of the first line later than the file's last change: the
        // file began the year before.
        Some((t, _)) if stamp::civil_from_days((t / 86_400) as i64).1 > month => year - 1,
        _ => year,
    }
}
