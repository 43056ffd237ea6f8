//! Puts the lines of Postfix and sendmail back together into sessions.
//!
//! Postfix: `smtpd` lines are tied by process id (one connection at a
//! time per process), queued messages by queue id. A message that got a
//! queue file is one [`LogEvent::Mail`] when `qmgr` logs `from=<...>,
//! nrcpt=N`, with N plus the recipients refused under its queue id. A MAIL
//! refused is a message of one recipient (how many it would have had is
//! not logged). Recipients refused before any was accepted (`NOQUEUE:
//! reject: RCPT`) make a message of their own, ended by the next MAIL,
//! queue file or the disconnect.
//!
//! sendmail logs messages, not connections: each `from=` line is a
//! connection of its own with one message.
//!
//! Sessions and queued messages held are bounded: past the bound the
//! oldest are forgotten (and counted).

use std::net::IpAddr;

use hashbrown::HashMap;

use super::postfix::{self, Line, Stage};
use super::{sendmail, LogEvent};
use crate::engine::Time;

/// Connections held open at once.
pub const MAX_SESSIONS: usize = 65_536;
/// Messages held between their queue file and qmgr's line.
pub const MAX_QUEUED: usize = 262_144;

/// What became of a line.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Read,
    Skipped,
    Malformed(&'static str),
}

#[derive(Debug)]
struct Session {
    id: u64,
    ip: IpAddr,
    start: Time,
    auth: Option<String>,
    /// Recipients refused before a queue file: (time, sender, count).
    pending: Option<(Time, String, u32)>,
}

#[derive(Debug)]
struct Queued {
    session: u64,
    ip: IpAddr,
    since: Time,
    auth: Option<String>,
    /// Recipients refused under this queue id.
    refused_rcpts: u32,
}

#[derive(Default)]
pub struct Sessions {
    next_id: u64,
    by_pid: HashMap<u32, Session>,
    queued: HashMap<Box<str>, Queued>,
    pub evicted: u64,
}

/// `host program[pid]: message` → (program, pid, message).
fn program(rest: &str) -> Option<(&str, Option<u32>, &str)> {
    let (_host, rest) = rest.split_once(' ')?;
    let (tag, msg) = rest.split_once(": ")?;
    match tag.split_once('[') {
        Some((name, pid)) => Some((name, pid.strip_suffix(']')?.parse().ok(), msg)),
        None => Some((tag, None, msg)),
    }
}

impl Sessions {
    /// Reads one line (after its stamp) at `time`.
    pub fn line(&mut self, time: Time, rest: &str, sink: &mut impl FnMut(&LogEvent)) -> Outcome {
        let Some((name, pid, msg)) = program(rest) else {
            return Outcome::Skipped;
        };
        // `postfix/smtpd`, `postfix-out/submission/smtpd`, ...
        if let Some((prefix, service)) = name.rsplit_once('/') {
            if !prefix.starts_with("postfix") {
                return Outcome::Skipped;
            }
            let parsed = match service {
                "smtpd" => postfix::smtpd(msg),
                "qmgr" => postfix::qmgr(msg),
                _ => return Outcome::Read,
            };
            return match (parsed, pid) {
                (Err(why), _) => Outcome::Malformed(why),
                (Ok(line), Some(pid)) => {
                    self.postfix(time, pid, line, sink);
                    Outcome::Read
                }
                (Ok(_), None) => Outcome::Malformed("no process id"),
            };
        }
        if name == "sendmail" || name == "sm-mta" {
            return match sendmail::message(msg) {
                Err(why) => Outcome::Malformed(why),
                Ok(None) => Outcome::Read,
                Ok(Some(m)) => {
                    let session = self.new_id();
                    sink(&LogEvent::Connect {
                        time,
                        session,
                        ip: m.ip,
                        host: m.host.to_string(),
                    });
                    sink(&LogEvent::Mail {
                        time,
                        session,
                        ip: m.ip,
                        sender: m.sender.to_string(),
                        auth: None,
                        rcpts: m.nrcpts,
                    });
                    sink(&LogEvent::Close { time, session });
                    Outcome::Read
                }
            };
        }
        Outcome::Skipped
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn postfix(&mut self, time: Time, pid: u32, line: Line<'_>, sink: &mut impl FnMut(&LogEvent)) {
        match line {
            Line::Connect { host, ip } => {
                // A process that logs a new connect has ended the last one.
                self.close(time, pid, sink);
                if self.by_pid.len() >= MAX_SESSIONS {
                    self.evict_sessions();
                }
                let id = self.new_id();
                self.by_pid.insert(
                    pid,
                    Session {
                        id,
                        ip,
                        start: time,
                        auth: None,
                        pending: None,
                    },
                );
                sink(&LogEvent::Connect {
                    time,
                    session: id,
                    ip,
                    host: host.to_string(),
                });
            }
            Line::Disconnect => self.close(time, pid, sink),
            Line::Client { queue_id, auth } => {
                let Some(s) = self.by_pid.get_mut(&pid) else {
                    return;
                };
                if let Some(a) = auth {
                    s.auth = Some(a.to_string());
                }
                // Recipients refused before this queue file was opened are
                // this message's.
                let refused_rcpts = s.pending.take().map_or(0, |(_, _, n)| n);
                let q = Queued {
                    session: s.id,
                    ip: s.ip,
                    since: time,
                    auth: s.auth.clone(),
                    refused_rcpts,
                };
                if self.queued.len() >= MAX_QUEUED {
                    self.evict_queued();
                }
                self.queued.insert(queue_id.into(), q);
            }
            Line::Reject {
                queue_id,
                stage,
                sender,
            } => {
                if let Some(q) = queue_id.and_then(|id| self.queued.get_mut(id)) {
                    if stage == Stage::Rcpt {
                        q.refused_rcpts += 1;
                    }
                    return;
                }
                let Some(s) = self.by_pid.get_mut(&pid) else {
                    return;
                };
                match (stage, sender) {
                    (Stage::Mail, Some(sender)) => {
                        let (id, ip, auth) = (s.id, s.ip, s.auth.clone());
                        let pending = s.pending.take();
                        flush(id, ip, &auth, pending, sink);
                        sink(&LogEvent::Mail {
                            time,
                            session: id,
                            ip,
                            sender: sender.to_string(),
                            auth,
                            rcpts: 1,
                        });
                    }
                    (Stage::Rcpt, Some(sender)) => match &mut s.pending {
                        Some((_, from, n)) if from == sender => *n += 1,
                        pending => {
                            let old = pending.replace((time, sender.to_string(), 1));
                            let (id, ip, auth) = (s.id, s.ip, s.auth.clone());
                            flush(id, ip, &auth, old, sink);
                        }
                    },
                    _ => {}
                }
            }
            Line::Queued {
                queue_id,
                sender,
                nrcpt,
            } => {
                // qmgr logs a message again when it comes back from the
                // deferred queue: only the first time is the client's.
                if let Some(q) = self.queued.remove(queue_id) {
                    sink(&LogEvent::Mail {
                        time,
                        session: q.session,
                        ip: q.ip,
                        sender: sender.to_string(),
                        auth: q.auth,
                        rcpts: nrcpt.saturating_add(q.refused_rcpts),
                    });
                }
            }
            Line::Other => {}
        }
    }

    fn close(&mut self, time: Time, pid: u32, sink: &mut impl FnMut(&LogEvent)) {
        if let Some(s) = self.by_pid.remove(&pid) {
            flush(s.id, s.ip, &s.auth, s.pending, sink);
            sink(&LogEvent::Close {
                time,
                session: s.id,
            });
        }
    }

    /// Ends every session still open, at `time` (the end of the logs).
    pub fn finish(&mut self, time: Time, sink: &mut impl FnMut(&LogEvent)) {
        let pids: Vec<u32> = self.by_pid.keys().copied().collect();
        for pid in pids {
            self.close(time, pid, sink);
        }
    }

    /// Forgets the oldest eighth of the sessions (their disconnect was not
    /// logged, or the logs start mid-way).
    fn evict_sessions(&mut self) {
        let mut starts: Vec<Time> = self.by_pid.values().map(|s| s.start).collect();
        let cut = starts.len() / 8;
        let (_, &mut oldest, _) = starts.select_nth_unstable(cut);
        let before = self.by_pid.len();
        self.by_pid.retain(|_, s| s.start > oldest);
        self.evicted += (before - self.by_pid.len()) as u64;
    }

    fn evict_queued(&mut self) {
        let mut since: Vec<Time> = self.queued.values().map(|q| q.since).collect();
        let cut = since.len() / 8;
        let (_, &mut oldest, _) = since.select_nth_unstable(cut);
        let before = self.queued.len();
        self.queued.retain(|_, q| q.since > oldest);
        self.evicted += (before - self.queued.len()) as u64;
    }
}

/// A message whose recipients were all refused before a queue file.
fn flush(
    session: u64,
    ip: IpAddr,
    auth: &Option<String>,
    pending: Option<(Time, String, u32)>,
    sink: &mut impl FnMut(&LogEvent),
) {
    if let Some((time, sender, rcpts)) = pending {
        sink(&LogEvent::Mail {
            time,
            session,
            ip,
            sender,
            auth: auth.clone(),
            rcpts,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(lines: &[&str]) -> Vec<LogEvent> {
        let mut s = Sessions::default();
        let mut out = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(
                s.line(i as Time, l, &mut |e| out.push(e.clone())),
                Outcome::Read,
                "{l}"
            );
        }
        out
    }

    #[test]
    fn recipients_refused_before_a_queue_file_are_a_message() {
        let ev = run(&[
            "mx postfix/smtpd[5]: connect from h[192.0.2.1]",
            "mx postfix/smtpd[5]: NOQUEUE: milter-reject: RCPT from h[192.0.2.1]: 451 4.3.2 x; from=<a@b.test> to=<c@d.test> proto=ESMTP helo=<h>",
            "mx postfix/smtpd[5]: NOQUEUE: milter-reject: RCPT from h[192.0.2.1]: 451 4.3.2 x; from=<a@b.test> to=<e@d.test> proto=ESMTP helo=<h>",
            "mx postfix/smtpd[5]: disconnect from h[192.0.2.1] ehlo=1 mail=1 rcpt=0/2 quit=1",
        ]);
        let mails: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                LogEvent::Mail { rcpts, sender, .. } => Some((sender.as_str(), *rcpts)),
                _ => None,
            })
            .collect();
        assert_eq!(mails, [("a@b.test", 2)]);
        assert!(matches!(ev.last(), Some(LogEvent::Close { .. })));
    }

    #[test]
    fn a_queued_message_counts_its_refused_recipients() {
        let ev = run(&[
            "mx postfix/smtpd[5]: connect from h[192.0.2.1]",
            "mx postfix/smtpd[5]: 4ZQ1: client=h[192.0.2.1], sasl_method=PLAIN, sasl_username=joe",
            "mx postfix/smtpd[5]: 4ZQ1: milter-reject: RCPT from h[192.0.2.1]: 451 4.3.2 x; from=<a@b.test> to=<c@d.test> proto=ESMTP helo=<h>",
            "mx postfix/qmgr[7]: 4ZQ1: from=<a@b.test>, size=3, nrcpt=2 (queue active)",
            // qmgr again after a deferral: not the client's.
            "mx postfix/qmgr[7]: 4ZQ1: from=<a@b.test>, size=3, nrcpt=2 (queue active)",
        ]);
        let mails: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                LogEvent::Mail { rcpts, auth, .. } => Some((auth.clone(), *rcpts)),
                _ => None,
            })
            .collect();
        assert_eq!(mails, [(Some("joe".to_string()), 3)]);
    }

    #[test]
    fn sessions_held_stay_within_their_bound() {
        let mut s = Sessions::default();
        let n = MAX_SESSIONS as u32 + 1000;
        for pid in 0..n {
            let line = format!("mx postfix/smtpd[{pid}]: connect from h[192.0.2.1]");
            s.line(Time::from(pid), &line, &mut |_| {});
        }
        assert!(s.by_pid.len() <= MAX_SESSIONS);
        assert!(s.evicted > 0);
    }
}
