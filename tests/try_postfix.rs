//! README's "Trying it with a real Postfix": `scripts/try-postfix` starts
//! relayrate and a throwaway Postfix, sends 5 messages under a limit of 3,
//! and shows the refusals; run here as a newcomer would, with this build's
//! binaries.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::{free_port, postfix_available};

/// A base port whose +0..+3 and +10 (the script's node, milter, metrics,
/// sink and peer ports) are all free now.
fn free_base() -> u16 {
    loop {
        let base = free_port();
        if base > 32_000 {
            continue;
        }
        let free = [0, 1, 2, 3, 10]
            .iter()
            .all(|d| TcpListener::bind(("127.0.0.1", base + d)).is_ok());
        if free {
            return base;
        }
    }
}

#[test]
fn try_postfix_shows_three_messages_accepted_and_two_refused() {
    if !postfix_available("try_postfix_shows_three_messages_accepted_and_two_refused") {
        return;
    }
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_relayrate")).parent().unwrap();
    let out = Command::new("scripts/try-postfix")
        .env("TRY_BIN_DIR", bin_dir)
        .env("TRY_SMTP_PORT", free_port().to_string())
        .env("TRY_PORT_BASE", free_base().to_string())
        .output()
        .expect("run scripts/try-postfix");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let queued = stdout.matches("250 2.0.0 Ok: queued as").count();
    let refused = stdout
        .lines()
        .filter(|l| l.contains("MAIL FROM:<web@client.example>"))
        .filter(|l| l.contains("451 4.3.2 Message rate too high (3/3 in 600s) - try again later"))
        .count();
    assert_eq!((queued, refused), (3, 2), "{stdout}\n{stderr}");
    let counted = stdout
        .lines()
        .find(|l| l.starts_with("MsgRate "))
        .expect("relayratectl show's MsgRate line");
    assert_eq!(
        counted.split_whitespace().take(3).collect::<Vec<_>>(),
        ["MsgRate", "3", "3"],
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("  milter-reject: MAIL from").count(),
        2,
        "{stdout}"
    );
}
