//! Keys the MTA may send in more than one form, and keys of every kind of
//! text: the null sender `<>`, UTF-8 senders and internationalized
//! domains, IPv6 clients counted per prefix, and sendmail's `IPv6:`
//! address form. Each test is an input a field report gave.

use std::net::IpAddr;
use std::sync::Arc;

use relayrate::check::Check;
use relayrate::engine::{ConnId, Engine, Event};
use relayrate::policy::{Client, Policy};

fn policy(lines: &str) -> Policy {
    Policy::parse_str("p", lines).unwrap()
}

fn from(sender: &str) -> Client {
    Client::from_ip("10.0.0.1".parse::<IpAddr>().unwrap()).with_sender(sender)
}

/// MAIL FROM then `rcpts` RCPTs; how many MAILs and RCPTs were allowed.
fn send(e: &mut Engine, client: &Client, messages: u32, rcpts: u32) -> (u32, u32) {
    let (mut mails, mut recipients) = (0, 0);
    for _ in 0..messages {
        let mail = Event::Mail {
            client: client.clone(),
            msgs_in_conn: 1,
        };
        if !e.apply(&mail, 1_000).is_allowed() {
            continue;
        }
        mails += 1;
        for n in 1..=rcpts {
            let rcpt = Event::Rcpt {
                client: client.clone(),
                rcpts_in_msg: n,
            };
            if e.apply(&rcpt, 1_000).is_allowed() {
                recipients += 1;
            }
        }
    }
    (mails, recipients)
}

const SENDER_RATES: &str = "CHECK_MSG_RATE YES\nCHECK_RCPT_RATE YES\n\
    MsgRateFrom:default 2\nRcptRateFrom:default 4\n";

#[test]
fn the_null_sender_is_counted_under_default() {
    let mut e = Engine::new(Arc::new(policy(SENDER_RATES)));
    // The report: <app@example.org> refused at its third message...
    assert_eq!(send(&mut e, &from("<app@example.org>"), 3, 2), (2, 4));
    // ...and <> passed every message and 6 recipients.
    assert_eq!(send(&mut e, &from("<>"), 3, 2), (2, 4));
    assert_eq!(from("<>").sender.as_deref(), Some("<>"));
    assert_eq!(e.count_of(Check::MsgRateFrom, &from("<>"), 1_000), 2);
}

#[test]
fn the_null_sender_has_its_own_key() {
    let p = policy("CHECK_MSG_RATE YES\nMsgRateFrom:<> 1\nMsgRateFrom:default 5\n");
    assert_eq!(p.limit(Check::MsgRateFrom, &from("<>")), Some(1));
    assert_eq!(p.limit(Check::MsgRateFrom, &from("<a@b.example>")), Some(5));
    let mut e = Engine::new(Arc::new(p));
    assert_eq!(send(&mut e, &from("<>"), 3, 0), (1, 0));
    // A message with no sender at all (no MAIL FROM yet) is not `<>`.
    let none = Client::from_ip("10.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(none.sender, None);
}

#[test]
fn utf8_sender_keys_are_accepted_and_match() {
    let p = policy("CHECK_MSG_RATE YES\nMsgRateFrom:jörg@example.org 2\n");
    assert_eq!(
        p.limit(Check::MsgRateFrom, &from("<jörg@example.org>")),
        Some(2)
    );
    // Local parts keep today's rule: ASCII letters in lower case.
    assert_eq!(
        p.limit(Check::MsgRateFrom, &from("<JöRG@Example.ORG>")),
        Some(2)
    );
    let mut e = Engine::new(Arc::new(p));
    assert_eq!(send(&mut e, &from("<jörg@example.org>"), 3, 0), (2, 0));
}

#[test]
fn an_internationalized_domain_matches_in_both_forms() {
    for key in ["bücher.example", "xn--bcher-kva.example", "BÜCHER.example"] {
        for check_key in [
            format!("MsgRateFrom:@{key} 3"),
            format!("MsgRateFrom:{key} 3"),
            format!("MsgRateFrom:info@{key} 3"),
        ] {
            let p = policy(&format!("CHECK_MSG_RATE YES\n{check_key}\n"));
            for sender in ["<info@bücher.example>", "<info@XN--BCHER-KVA.example>"] {
                assert_eq!(
                    p.limit(Check::MsgRateFrom, &from(sender)),
                    Some(3),
                    "{check_key} for {sender}"
                );
            }
        }
    }
    // Both forms of the envelope count against one key.
    let p = policy("CHECK_MSG_RATE YES\nMsgRateFrom:default 2\n");
    let mut e = Engine::new(Arc::new(p));
    assert_eq!(send(&mut e, &from("<info@bücher.example>"), 1, 0), (1, 0));
    assert_eq!(
        send(&mut e, &from("<info@xn--bcher-kva.example>"), 2, 0),
        (1, 0)
    );
}

#[test]
fn utf8_client_domain_and_auth_user_keys_are_accepted() {
    let p = policy(
        "CHECK_CONN_RATE YES\nCHECK_MSG_RATE YES\nConnRate:bücher.example 4\n\
         MsgRateAuth:jörg 6\n",
    );
    let c = Client::from_ip("10.0.0.1".parse::<IpAddr>().unwrap())
        .with_host("web.xn--bcher-kva.example")
        .with_auth("jörg");
    assert_eq!(p.limit(Check::ConnRate, &c), Some(4));
    assert_eq!(p.limit(Check::MsgRateAuth, &c), Some(6));
}

#[test]
fn keys_with_control_characters_or_bad_labels_are_refused_at_their_place() {
    for (line, col) in [
        ("MsgRateFrom:jörg\u{7}@example.org 2", 13),
        ("MsgRateAuth:jö\u{1b}rg 2", 13),
        ("MsgRateFrom:a@b@c 2", 13),
        ("MsgRateFrom:<a@b> 2", 13),
        ("ConnRate:bü\u{0}cher.example 2", 10),
        ("MsgRateFrom:@xn--zz-.example 2", 13),
    ] {
        let text = format!("CHECK_MSG_RATE YES\nCHECK_CONN_RATE YES\n{line}\n");
        let e = Policy::parse_str("p", &text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("p:3:{col}: ")), "{line:?}: {e}");
    }
}

fn v6(s: &str) -> Client {
    Client::from_ip(s.parse::<IpAddr>().unwrap())
}

fn connect(e: &mut Engine, client: &Client, conn: u64) -> bool {
    let event = Event::Connect {
        conn: ConnId { owner: 1, conn },
        client: client.clone(),
    };
    e.apply(&event, 1_000).is_allowed()
}

#[test]
fn ipv6_clients_are_counted_per_64_by_default() {
    // The report: each address of the /32 had its own count.
    let p = policy("CHECK_CONN_RATE YES\nConnRate:2001:db8::/32 2\n");
    assert_eq!(p.ipv6_prefix(), 64);
    let mut e = Engine::new(Arc::new(p));
    let allowed: Vec<bool> = (1..=4)
        .map(|n| connect(&mut e, &v6(&format!("2001:db8:0:1::{n}")), n))
        .collect();
    assert_eq!(allowed, [true, true, false, false]);
    // Another /64 of the same /32 has its own count.
    assert!(connect(&mut e, &v6("2001:db8:0:2::1"), 10));
    assert_eq!(
        e.count_of(Check::ConnRate, &v6("2001:db8:0:1::ffff"), 1_000),
        4
    );
}

#[test]
fn ipv6_prefix_sets_the_width_and_128_counts_each_address() {
    let p = policy("CHECK_CONN_RATE YES\nIPv6Prefix 128\nConnRate:2001:db8::/32 2\n");
    let mut e = Engine::new(Arc::new(p));
    for n in 1..=4 {
        assert!(connect(&mut e, &v6(&format!("2001:db8::{n}")), n));
    }
    let p = policy("CHECK_CONN_RATE YES\nIPv6Prefix 48\nConnRate:default 1\n");
    let mut e = Engine::new(Arc::new(p));
    assert!(connect(&mut e, &v6("2001:db8:1:1::1"), 1));
    assert!(!connect(&mut e, &v6("2001:db8:1:2::1"), 2));
    assert!(connect(&mut e, &v6("2001:db8:2::1"), 3));
    // IPv4 is counted per address whatever the prefix.
    assert!(connect(&mut e, &v6("10.0.0.1"), 4));
    assert!(connect(&mut e, &v6("10.0.0.2"), 5));
}

#[test]
fn ipv6_entries_still_match_the_full_address() {
    let p = policy("CHECK_CONN_RATE YES\nConnRate:2001:db8::1 1\nConnRate:default 3\n");
    assert_eq!(p.limit(Check::ConnRate, &v6("2001:db8::1")), Some(1));
    assert_eq!(p.limit(Check::ConnRate, &v6("2001:db8::2")), Some(3));
    let mut e = Engine::new(Arc::new(p));
    // One count for the /64; each address under its own limit.
    assert!(connect(&mut e, &v6("2001:db8::2"), 1));
    assert!(!connect(&mut e, &v6("2001:db8::1"), 2));
    assert!(connect(&mut e, &v6("2001:db8::3"), 3));
    assert!(!connect(&mut e, &v6("2001:db8::4"), 4));
}

#[test]
fn ipv6_open_connections_are_counted_per_prefix_too() {
    let p = policy("CHECK_OPEN_CONNECTIONS YES\nConnOpen:default 2\n");
    let mut e = Engine::new(Arc::new(p));
    assert!(connect(&mut e, &v6("2001:db8::1"), 1));
    assert!(connect(&mut e, &v6("2001:db8::2"), 2));
    assert!(!connect(&mut e, &v6("2001:db8::3"), 3));
    e.apply(
        &Event::Close {
            conn: ConnId { owner: 1, conn: 1 },
        },
        1_000,
    );
    assert!(connect(&mut e, &v6("2001:db8::3"), 4));
}

#[test]
fn ipv6_prefix_is_validated_where_it_is_written() {
    for (value, ok) in [
        ("0", false),
        ("1", true),
        ("64", true),
        ("128", true),
        ("129", false),
        ("x", false),
    ] {
        let text = format!("CHECK_CONN_RATE YES\n  IPv6Prefix {value}\n");
        match Policy::parse_str("p", &text) {
            Ok(p) => {
                assert!(ok, "{value} accepted");
                assert_eq!(p.ipv6_prefix().to_string(), value);
            }
            Err(e) => {
                assert!(!ok, "{value} refused: {e}");
                assert!(e.to_string().starts_with("p:2:14: "), "{e}");
            }
        }
    }
}

#[test]
fn every_form_of_an_ipv6_client_is_the_same_client() {
    use relayrate::policy::parse_client_addr;
    let want: IpAddr = "2001:db8::6".parse().unwrap();
    for form in [
        "2001:db8::6",
        "IPv6:2001:db8::6",
        "ipv6:2001:DB8::6",
        "IPv6:2001:0db8:0000:0000:0000:0000:0000:0006",
        "2001:db8:0:0:0:0:0:6",
        "[IPv6:2001:db8::6]",
        "[2001:db8::6]",
    ] {
        assert_eq!(parse_client_addr(form), Some(want), "{form}");
    }
    let v4: IpAddr = "192.0.2.1".parse().unwrap();
    for form in [
        "192.0.2.1",
        "[192.0.2.1]",
        "::ffff:192.0.2.1",
        "IPv6:::ffff:192.0.2.1",
        "[IPv6:::ffff:c000:201]",
    ] {
        assert_eq!(parse_client_addr(form), Some(v4), "{form}");
    }
    for bad in [
        "",
        "IPv6:",
        "web1.example",
        "[IPv6:2001:db8::6",
        "IPv6:1.2.3.4.5",
    ] {
        assert_eq!(parse_client_addr(bad), None, "{bad}");
    }
}

#[test]
fn a_long_internationalized_sender_stays_bounded() {
    use relayrate::policy::names::envelope_sender;
    // `bü.` is `xn--b-xga.`, 10 bytes: 24 of them and `example` fit in
    // 253 bytes, 25 do not.
    for labels in [1, 24, 25, 1000] {
        let raw = format!("<a@{}example>", "bü.".repeat(labels));
        let kept = envelope_sender(&raw);
        assert!(
            kept.len() <= raw.len() + 253,
            "{labels} labels: {}",
            kept.len()
        );
        // Converted only within DNS's 253 bytes; past them kept as written.
        assert_eq!(kept.starts_with("a@xn--"), labels <= 24, "{labels}: {kept}");
    }
    // A policy key past 253 bytes of domain is refused, not cut.
    let key = format!("MsgRateFrom:@{}example 1", "bü.".repeat(100));
    assert!(Policy::parse_str("p", &format!("CHECK_MSG_RATE YES\n{key}\n")).is_err());
}

#[test]
fn top_show_and_reset_name_the_counted_network() {
    use relayrate::inspect::{parse_key, show, top};
    let p = policy("CHECK_CONN_RATE YES\nCHECK_MSG_RATE YES\nConnRate:default 10\n");
    let mut e = Engine::new(Arc::new(p));
    for n in 1..=3 {
        connect(&mut e, &v6(&format!("2001:db8:0:1::{n}")), n);
    }
    let t = top(&e, Some(Check::ConnRate), 5, false, 1_000);
    assert_eq!(
        t.iter()
            .map(|k| (k.key.as_str(), k.count))
            .collect::<Vec<_>>(),
        [("2001:db8:0:1::/64", 3)]
    );
    // An address the operator types is shown as its network's count.
    let shown = show(&e, &parse_key("2001:db8:0:1::ab"), 1_000);
    assert_eq!(
        (shown[0].key.as_str(), shown[0].count),
        ("2001:db8:0:1::/64", 3)
    );
    let shown = show(&e, &parse_key("IPv6:2001:db8:0:1::1"), 1_000);
    assert_eq!(shown[0].count, 3);
    // A UTF-8 sender as typed, in either form of its domain.
    let sender = from("<info@bücher.example>");
    e.apply(
        &Event::Mail {
            client: sender,
            msgs_in_conn: 1,
        },
        1_000,
    );
    assert_eq!(
        parse_key("Info@XN--BCHER-KVA.example"),
        parse_key("<info@bücher.example>")
    );
    let shown = show(&e, &parse_key("info@bücher.example"), 1_000);
    assert_eq!((shown[0].check, shown[0].count), (Check::MsgRateFrom, 1));
    assert_eq!(e.reset(&parse_key("2001:db8:0:1::77"), None), 1);
    assert_eq!(
        e.count_of(Check::ConnRate, &v6("2001:db8:0:1::1"), 1_000),
        0
    );
}

#[test]
fn a_new_ipv6_prefix_starts_ipv6_counts_again() {
    let mut e = Engine::new(Arc::new(policy(
        "CHECK_CONN_RATE YES\nConnRate:default 2\n",
    )));
    connect(&mut e, &v6("2001:db8::1"), 1);
    connect(&mut e, &v6("10.0.0.1"), 2);
    e.set_policy(Arc::new(policy(
        "CHECK_CONN_RATE YES\nIPv6Prefix 48\nConnRate:default 2\n",
    )));
    assert_eq!(e.count_of(Check::ConnRate, &v6("2001:db8::1"), 1_000), 0);
    assert_eq!(e.count_of(Check::ConnRate, &v6("10.0.0.1"), 1_000), 1);
}
