//! The worked cases of docs/policy.md §4, on the seed's configuration, and
//! the replies of §1, through the engine.

use std::net::IpAddr;
use std::sync::Arc;

use relayrate::check::Check;
use relayrate::engine::{ConnId, Engine, Event, Verdict};
use relayrate::policy::{Client, Policy};

const SEED: &str = include_str!("../examples/ze-policy.txt");
/// A bucket boundary, so that "within 100 s" stays inside known buckets.
const T0: u64 = 1_800_000_000;

fn engine(text: &str) -> Engine {
    Engine::new(Arc::new(Policy::parse_str("ze-policy.txt", text).unwrap()))
}

fn client(ip: &str) -> Client {
    Client::from_ip(ip.parse::<IpAddr>().unwrap())
}

fn conn(n: u64) -> ConnId {
    ConnId { owner: 1, conn: n }
}

fn connect(e: &mut Engine, n: u64, ip: &str, now: u64) -> Verdict {
    e.apply(
        &Event::Connect {
            conn: conn(n),
            client: client(ip),
        },
        now,
    )
}

fn close(e: &mut Engine, n: u64, now: u64) {
    assert!(e.apply(&Event::Close { conn: conn(n) }, now).is_allowed());
}

#[track_caller]
fn refused(v: &Verdict, check: Check, code: u16) -> String {
    let r = v.refusal().expect("a refusal");
    let reply = r.reply();
    assert_eq!((r.check, reply.code), (check, code), "{r:?}");
    reply.to_string()
}

#[test]
fn fifty_connections_in_100s_pass_the_51st_is_refused_and_counted_then_they_expire() {
    let mut e = engine(SEED);
    for i in 0..50 {
        let now = T0 + i * 2; // 50 connections within 100 s
        assert!(
            connect(&mut e, i, "1.1.1.11", now).is_allowed(),
            "connection {}",
            i + 1
        );
        close(&mut e, i, now);
    }
    let v = connect(&mut e, 50, "1.1.1.11", T0 + 100);
    let reply = refused(&v, Check::ConnRate, 421);
    assert_eq!(
        reply,
        "421 4.5.1 Connection rate too high (51/50 in 600s) - try again later"
    );
    close(&mut e, 50, T0 + 100);
    let c = client("1.1.1.11");
    assert_eq!(e.count_of(Check::ConnRate, &c, T0 + 100), 51);
    // The first ones (t0 .. t0+29, bucket 0) leave the window at t0+600.
    assert_eq!(e.count_of(Check::ConnRate, &c, T0 + 599), 51);
    assert_eq!(e.count_of(Check::ConnRate, &c, T0 + 600), 36);
    // The refusal said when to come back: once one connection has left.
    assert_eq!(v.refusal().unwrap().retry_after, 500);
    assert!(connect(&mut e, 51, "1.1.1.11", T0 + 600).is_allowed());
}

#[test]
fn limits_per_entry_prefix_and_default() {
    let p = Policy::parse_str(
        "p",
        "CHECK_CONN_RATE YES\nConnRate:1.1.1.11 50\nConnRate:1.1.1 5\nConnRate:default 15\n",
    )
    .unwrap();
    let limit = |ip| p.limit(Check::ConnRate, &client(ip));
    assert_eq!(limit("1.1.1.11"), Some(50));
    assert_eq!(limit("1.1.1.12"), Some(5));
    assert_eq!(limit("2.2.2.2"), Some(15));
}

#[test]
fn a_sixth_open_connection_is_refused_until_one_closes() {
    let mut e = engine(SEED);
    for i in 0..5 {
        assert!(connect(&mut e, i, "1.1.1.11", T0 + i).is_allowed());
    }
    let v = connect(&mut e, 5, "1.1.1.11", T0 + 5);
    assert_eq!(
        refused(&v, Check::ConnOpen, 421),
        "421 4.5.1 Too many open connections (6/5) - try again later"
    );
    close(&mut e, 5, T0 + 5); // the MTA drops the refused connection
    assert_eq!(e.open_count("1.1.1.11".parse().unwrap()), 5);
    // Still five open: another is refused too.
    assert!(!connect(&mut e, 6, "1.1.1.11", T0 + 6).is_allowed());
    close(&mut e, 6, T0 + 6);
    close(&mut e, 2, T0 + 7); // one of the five ends
    assert!(connect(&mut e, 7, "1.1.1.11", T0 + 8).is_allowed());
    // Other clients are not affected.
    assert!(connect(&mut e, 8, "1.1.1.12", T0 + 8).is_allowed());
}

#[test]
fn a_message_with_60_recipients_gets_50_through_and_the_next_message_starts_from_0() {
    let mut e = engine(SEED);
    let c = client("1.1.1.11");
    let rcpt = |e: &mut Engine, n| {
        e.apply(
            &Event::Rcpt {
                client: c.clone(),
                rcpts_in_msg: n,
            },
            T0 + 1,
        )
    };
    for n in 1..=50 {
        assert!(rcpt(&mut e, n).is_allowed(), "rcpt {n}");
    }
    for n in 51..=60 {
        let v = rcpt(&mut e, n);
        let reply = refused(&v, Check::MaxRcpt, 451);
        assert_eq!(
            reply,
            format!("451 4.3.2 Too many recipients for this message ({n}/50) - try again later")
        );
    }
    // The milter resets its per-message count at end of message.
    assert!(rcpt(&mut e, 1).is_allowed());
}

#[test]
fn ten_mails_a_connection_pass_the_eleventh_is_refused_a_new_connection_starts_from_0() {
    let mut e = engine(SEED);
    let c = client("1.1.1.11");
    let mail = |e: &mut Engine, n| {
        e.apply(
            &Event::Mail {
                client: c.clone(),
                msgs_in_conn: n,
            },
            T0,
        )
    };
    for n in 1..=10 {
        assert!(mail(&mut e, n).is_allowed(), "MAIL {n}");
    }
    assert_eq!(
        refused(&mail(&mut e, 11), Check::MaxMsgs, 451),
        "451 4.3.2 Too many messages for this connection (11/10) - try again later"
    );
    assert!(mail(&mut e, 1).is_allowed());
}

#[test]
fn forty_messages_in_the_window_pass_and_the_41st_is_refused_at_mail_from() {
    let mut e = engine(SEED);
    let c = client("1.1.1.11");
    for i in 0..40 {
        let now = T0 + i;
        let m = Event::Mail {
            client: c.clone(),
            msgs_in_conn: 1,
        };
        assert!(e.apply(&m, now).is_allowed(), "message {}", i + 1);
    }
    let v = e.apply(
        &Event::Mail {
            client: c.clone(),
            msgs_in_conn: 1,
        },
        T0 + 40,
    );
    assert_eq!(
        refused(&v, Check::MsgRate, 451),
        "451 4.3.2 Message rate too high (40/40 in 600s) - try again later"
    );
    assert_eq!(e.count_of(Check::MsgRate, &c, T0 + 40), 40);
}

#[test]
fn a_zero_limit_is_no_limit_and_does_not_fall_through() {
    let mut e = engine("CHECK_NB_RCPT YES\nMaxRcpt:1.1.1.11 0\nMaxRcpt:default 100\n");
    let v = e.apply(
        &Event::Rcpt {
            client: client("1.1.1.11"),
            rcpts_in_msg: 10_000,
        },
        T0,
    );
    assert!(v.is_allowed());
    let v = e.apply(
        &Event::Rcpt {
            client: client("1.1.1.12"),
            rcpts_in_msg: 101,
        },
        T0,
    );
    refused(&v, Check::MaxRcpt, 451);
}

#[test]
fn with_the_switch_off_nothing_is_refused_for_connection_rate() {
    let mut e = engine("CHECK_CONN_RATE NO\nConnRate:1.1.1.11 1\nConnRate:default 1\n");
    for i in 0..100 {
        assert!(connect(&mut e, i, "1.1.1.11", T0).is_allowed());
        close(&mut e, i, T0);
    }
    // An absent switch is off too, whatever the built-in default says.
    let mut e = engine("ConnRate:default 1\n");
    for i in 0..100 {
        assert!(connect(&mut e, i, "2.2.2.2", T0).is_allowed());
        close(&mut e, i, T0);
    }
}

#[test]
fn recipient_rates_count_every_rcpt_and_refuse_the_one_over() {
    let mut e = engine(
        "CHECK_RCPT_RATE YES\nRcptRate:default 5\nRcptRateFrom:default 0\nRcptRateAuth:bob 3\n",
    );
    let anon = client("10.0.0.1");
    for n in 1..=5 {
        let v = e.apply(
            &Event::Rcpt {
                client: anon.clone(),
                rcpts_in_msg: n,
            },
            T0,
        );
        assert!(v.is_allowed());
    }
    let v = e.apply(
        &Event::Rcpt {
            client: anon.clone(),
            rcpts_in_msg: 6,
        },
        T0,
    );
    assert_eq!(
        refused(&v, Check::RcptRate, 451),
        "451 4.3.2 Recipient rate too high (6/5 in 600s) - try again later"
    );
    // Per AUTH user, from any address: the 4th recipient of bob is refused.
    let bob = |i: u8| client(&format!("10.0.1.{i}")).with_auth("Bob");
    for i in 1..=3 {
        let rcpt = Event::Rcpt {
            client: bob(i),
            rcpts_in_msg: 1,
        };
        assert!(e.apply(&rcpt, T0).is_allowed());
    }
    let v = e.apply(
        &Event::Rcpt {
            client: bob(4),
            rcpts_in_msg: 1,
        },
        T0,
    );
    refused(&v, Check::RcptRateAuth, 451);
}

#[test]
fn a_sender_rate_catches_one_account_spread_over_many_addresses() {
    let mut e = engine("CHECK_MSG_RATE YES\nMsgRate:default 0\nMsgRateFrom:@webmail.example 3\n");
    let from = |i: u8| client(&format!("10.0.0.{i}")).with_sender("<Alice@Webmail.Example>");
    for i in 1..=3 {
        let mail = Event::Mail {
            client: from(i),
            msgs_in_conn: 1,
        };
        assert!(e.apply(&mail, T0).is_allowed());
    }
    let v = e.apply(
        &Event::Mail {
            client: from(9),
            msgs_in_conn: 1,
        },
        T0,
    );
    assert_eq!(
        refused(&v, Check::MsgRateFrom, 451),
        "451 4.3.2 Message rate too high (3/3 in 600s) - try again later"
    );
}

#[test]
fn helo_and_rcpt_recheck_the_connection_limits() {
    let mut e = engine("CHECK_CONN_RATE YES\nConnRate:default 2\n");
    let c = client("10.0.0.1");
    assert!(connect(&mut e, 1, "10.0.0.1", T0).is_allowed());
    let recheck = Event::Recheck { client: c.clone() };
    assert!(e.apply(&recheck, T0).is_allowed());
    // Two more connections arrive meanwhile: the first one's HELO is refused.
    connect(&mut e, 2, "10.0.0.1", T0);
    connect(&mut e, 3, "10.0.0.1", T0);
    refused(&e.apply(&recheck, T0), Check::ConnRate, 421);
    let rcpt = Event::Rcpt {
        client: c,
        rcpts_in_msg: 1,
    };
    refused(&e.apply(&rcpt, T0), Check::ConnRate, 421);
}

#[test]
fn idle_counters_are_forgotten_and_leases_of_a_node_can_be_released() {
    let mut e = engine("CHECK_CONN_RATE YES\nCHECK_OPEN_CONNECTIONS YES\n");
    for i in 0..1000u64 {
        let ip = format!("10.0.{}.{}", i / 256, i % 256);
        connect(&mut e, i, &ip, T0);
    }
    assert_eq!(e.counters_len(), 1000);
    assert_eq!(e.leases_len(), 1000);
    // After the window, the next event sweeps the idle counters away.
    connect(&mut e, 5000, "10.9.9.9", T0 + 600);
    assert_eq!(e.counters_len(), 1);
    assert_eq!(e.release_owner(1), 1001);
    assert_eq!(e.leases_len(), 0);
    assert_eq!(e.open_count("10.0.0.1".parse().unwrap()), 0);
}

#[test]
fn a_new_policy_keeps_the_counts() {
    let mut e = engine("CHECK_CONN_RATE YES\nConnRate:default 100\n");
    for i in 0..10 {
        connect(&mut e, i, "10.0.0.1", T0);
        close(&mut e, i, T0);
    }
    let stricter = Policy::parse_str("p2", "CHECK_CONN_RATE YES\nConnRate:default 10\n").unwrap();
    e.set_policy(Arc::new(stricter));
    let v = connect(&mut e, 10, "10.0.0.1", T0 + 1);
    assert_eq!(v.refusal().map(|r| (r.count, r.limit)), Some((11, 10)));
}
