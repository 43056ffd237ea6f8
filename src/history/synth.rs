//! A made-up Postfix log for tests and the benchmark: sessions of a few
//! clients with uneven traffic, some authenticated, over days. The same
//! `seed` gives the same log.

use std::io::{self, Write};

use super::stamp::civil_from_days;
use crate::engine::Time;

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn stamp(t: Time) -> String {
    let (_, m, d) = civil_from_days((t / 86_400) as i64);
    let s = t % 86_400;
    format!(
        "{} {d:>2} {:02}:{:02}:{:02}",
        MONTHS[m as usize - 1],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Writes at least `lines` lines of Postfix log from `start` (seconds
/// since the epoch, a classic stamp: the reader must be told the year),
/// with `clients` client addresses (1 to 65,000); returns the lines written.
pub fn write_log(
    out: &mut impl Write,
    lines: u64,
    start: Time,
    clients: u32,
    seed: u64,
) -> io::Result<u64> {
    let mut rng = Rng(seed | 1);
    let clients = u64::from(clients.clamp(1, 65_000));
    let (mut t, mut pid, mut queue, mut written) = (start, 1000u64, 1u64, 0u64);
    while written < lines {
        // Busy hours and quiet ones; a few clients send most.
        let hour = (t / 3600) % 24;
        t += if (8..20).contains(&hour) {
            rng.below(3)
        } else {
            rng.below(12)
        };
        let c = rng
            .below(clients)
            .min(rng.below(clients))
            .min(rng.below(clients));
        let ip = format!("10.{}.{}.{}", c >> 16, (c >> 8) & 255, c & 255);
        pid += 1;
        let (s, p) = (stamp(t), pid % 100_000);
        writeln!(
            out,
            "{s} mx postfix/smtpd[{p}]: connect from web{c}.example[{ip}]"
        )?;
        let auth = c
            .is_multiple_of(3)
            .then(|| format!(", sasl_method=PLAIN, sasl_username=user{c}"));
        let messages = 1 + rng.below(3);
        for _ in 0..messages {
            queue += 1;
            let sender = format!("app{}@web{c}.example", rng.below(3));
            let nrcpt = 1 + rng.below(5) * rng.below(3);
            writeln!(
                out,
                "{s} mx postfix/smtpd[{p}]: {queue:X}: client=web{c}.example[{ip}]{}",
                auth.as_deref().unwrap_or("")
            )?;
            writeln!(
                out,
                "{s} mx postfix/cleanup[9]: {queue:X}: message-id=<{queue}@web{c}.example>"
            )?;
            writeln!(
                out,
                "{s} mx postfix/qmgr[7]: {queue:X}: from=<{sender}>, size={}, nrcpt={nrcpt} (queue active)",
                300 + rng.below(5000)
            )?;
            writeln!(out, "{s} mx postfix/qmgr[7]: {queue:X}: removed")?;
            written += 4;
        }
        writeln!(
            out,
            "{s} mx postfix/smtpd[{p}]: disconnect from web{c}.example[{ip}] ehlo=1 mail={messages} rcpt={messages} data={messages} quit=1"
        )?;
        written += 2;
    }
    Ok(written)
}
