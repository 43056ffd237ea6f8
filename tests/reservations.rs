//! Limits that hold whatever the concurrency (`docs/policy.md` §1): a
//! message takes its slot in the message rates at MAIL FROM and gives it
//! back if it never reaches its end; a refused connection takes no
//! ConnOpen slot. On the engine, time passed in.

use std::net::IpAddr;
use std::sync::Arc;

use relayrate::check::Check;
use relayrate::engine::{ConnId, Engine, Event, Verdict};
use relayrate::policy::{Client, Policy};

const T0: u64 = 1_800_000_000;

fn engine(text: &str) -> Engine {
    Engine::new(Arc::new(Policy::parse_str("ze-policy.txt", text).unwrap()))
}

fn client(ip: &str) -> Client {
    Client::from_ip(ip.parse::<IpAddr>().unwrap())
}

fn mail(e: &mut Engine, c: &Client, now: u64) -> Verdict {
    e.apply(
        &Event::Mail {
            client: c.clone(),
            msgs_in_conn: 1,
        },
        now,
    )
}

fn give_back(e: &mut Engine, c: &Client, held_secs: u64, now: u64) {
    let event = Event::GiveBack {
        client: c.clone(),
        held_secs,
    };
    assert!(e.apply(&event, now).is_allowed());
}

fn connect(e: &mut Engine, n: u64, c: &Client, now: u64) -> Verdict {
    let conn = ConnId { owner: 1, conn: n };
    e.apply(
        &Event::Connect {
            conn,
            client: c.clone(),
        },
        now,
    )
}

/// The first case: `MsgRate:127.0.0.41 1`, two sessions both
/// pass MAIL before either ends. Counting at end of message let both
/// through; the reservation refuses the second at its MAIL FROM.
#[test]
fn a_second_session_in_flight_is_refused_at_mail_from() {
    let mut e = engine("CHECK_MSG_RATE YES\nMsgRate:127.0.0.41 1\n");
    let c = client("127.0.0.41");
    assert!(mail(&mut e, &c, T0).is_allowed());
    let second = mail(&mut e, &c, T0);
    let r = second.refusal().expect("refused");
    assert_eq!((r.check, r.count, r.limit), (Check::MsgRate, 1, 1));
    assert_eq!(
        r.reply().to_string(),
        "451 4.3.2 Message rate too high (1/1 in 600s) - try again later"
    );
}

/// Twenty sessions that all reach MAIL FROM before any ends, limit 5:
/// exactly 5 pass, for the address, the sender and the AUTH user alike.
#[test]
fn exactly_n_of_many_parallel_messages_pass_for_each_message_rate() {
    for (policy, who) in [
        (
            "CHECK_MSG_RATE YES\nMsgRate:127.0.0.21 5\n",
            client("127.0.0.21"),
        ),
        (
            "CHECK_MSG_RATE YES\nMsgRateFrom:app@example.org 5\n",
            client("10.0.0.1").with_sender("<app@example.org>"),
        ),
        (
            "CHECK_MSG_RATE YES\nMsgRateAuth:alice 5\n",
            client("10.0.0.2").with_auth("alice"),
        ),
    ] {
        let mut e = engine(policy);
        let passed = (0..20)
            .filter(|_| mail(&mut e, &who, T0).is_allowed())
            .count();
        assert_eq!(passed, 5, "{policy}");
    }
}

/// A message that does not reach its end gives its slot back, so the
/// limit counts messages sent, not attempts.
#[test]
fn a_given_back_slot_is_free_again_and_only_once() {
    let mut e = engine("CHECK_MSG_RATE YES\nMsgRate:default 2\n");
    let c = client("192.0.2.7");
    assert!(mail(&mut e, &c, T0).is_allowed());
    assert!(mail(&mut e, &c, T0 + 40).is_allowed());
    assert!(!mail(&mut e, &c, T0 + 41).is_allowed());
    // The second one was RSET after 5 s: its slot is back.
    give_back(&mut e, &c, 5, T0 + 45);
    assert_eq!(e.count_of(Check::MsgRate, &c, T0 + 45), 1);
    assert!(mail(&mut e, &c, T0 + 46).is_allowed());
    assert!(!mail(&mut e, &c, T0 + 47).is_allowed());
    // A refused MAIL reserved nothing: nothing of it is given back, and a
    // give-back of a slot that already left the window takes nothing.
    give_back(&mut e, &c, 700, T0 + 700);
    assert_eq!(e.count_of(Check::MsgRate, &c, T0 + 700), 0);
}

/// The second case: `ConnOpen 2`, A and B admitted, C refused.
/// C takes no slot, so while C is still connected A and B pass their
/// rechecks; when C goes, nothing is freed; when A goes, D is admitted.
#[test]
fn a_refused_connection_takes_no_slot_and_locks_no_one_out() {
    let mut e = engine("CHECK_OPEN_CONNECTIONS YES\nConnOpen:192.0.2.42 2\n");
    let c = client("192.0.2.42");
    assert!(connect(&mut e, 1, &c, T0).is_allowed());
    assert!(connect(&mut e, 2, &c, T0).is_allowed());
    let refused = connect(&mut e, 3, &c, T0);
    assert_eq!(
        refused.refusal().expect("C refused").reply().to_string(),
        "421 4.5.1 Too many open connections (3/2) - try again later"
    );
    assert_eq!(e.open_count("192.0.2.42".parse().unwrap()), 2);
    let recheck = Event::Recheck { client: c.clone() };
    assert!(e.apply(&recheck, T0 + 1).is_allowed(), "A's and B's HELO");
    e.apply(
        &Event::Close {
            conn: ConnId { owner: 1, conn: 3 },
        },
        T0 + 2,
    );
    assert_eq!(e.open_count("192.0.2.42".parse().unwrap()), 2);
    e.apply(
        &Event::Close {
            conn: ConnId { owner: 1, conn: 1 },
        },
        T0 + 3,
    );
    assert!(connect(&mut e, 4, &c, T0 + 3).is_allowed());
    // A retried Connect of an admitted connection keeps its one slot.
    assert!(connect(&mut e, 4, &c, T0 + 3).is_allowed());
    assert_eq!(e.open_count("192.0.2.42".parse().unwrap()), 2);
}

/// Bursts of 6 connections, limit 2: each burst admits exactly the first
/// 2 (before, refused connections held slots: 2, then 0, then 2).
#[test]
fn every_burst_admits_exactly_its_first_n() {
    let mut e = engine("CHECK_OPEN_CONNECTIONS YES\nConnOpen:192.0.2.42 2\n");
    let c = client("192.0.2.42");
    let mut n = 0;
    for burst in 0..3 {
        let now = T0 + burst * 10;
        let admitted: Vec<u64> = (0..6)
            .map(|_| {
                n += 1;
                n
            })
            .filter(|&id| connect(&mut e, id, &c, now).is_allowed())
            .collect();
        assert_eq!(admitted, [n - 5, n - 4], "burst {burst}");
        for id in n - 5..=n {
            e.apply(
                &Event::Close {
                    conn: ConnId { owner: 1, conn: id },
                },
                now + 1,
            );
        }
    }
}
