//! Writes a made-up Postfix log to stdout, for `scripts/bench-replay`:
//! `maillog LINES [CLIENTS] [SEED]`. Stamps start on 2026-11-28 (pass
//! `--year 2026` to relayrate).

use std::io::{BufWriter, Write};

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u64>().expect("a number"));
    let lines = args.next().unwrap_or(1_000_000);
    let clients = args.next().unwrap_or(200) as u32;
    let seed = args.next().unwrap_or(1);
    let mut out = BufWriter::new(std::io::stdout().lock());
    // 2026-11-28T00:00:00Z
    relayrate::history::synth::write_log(&mut out, lines, 1_795_824_000, clients, seed)
        .expect("stdout");
    out.flush().expect("stdout");
}
