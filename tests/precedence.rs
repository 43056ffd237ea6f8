//! Which entry applies (docs/policy.md §3, "Which entry applies"), rule by
//! rule, IPv4 and IPv6, hosts, classes, senders and AUTH users.

use std::net::IpAddr;

use relayrate::check::Check;
use relayrate::policy::{Client, Matched, Policy};

fn policy(lines: &str) -> Policy {
    let text = format!(
        "CHECK_CONN_RATE YES\nCHECK_MSG_RATE YES\nCHECK_NB_RCPT YES\nCHECK_RCPT_RATE YES\n{lines}"
    );
    Policy::parse_str("p", &text).unwrap()
}

fn ip(s: &str) -> Client {
    Client::from_ip(s.parse::<IpAddr>().unwrap())
}

/// The key of the entry that gave the ConnRate limit, or "built-in".
fn matched(p: &Policy, c: &Client) -> String {
    matched_for(p, Check::ConnRate, c)
}

fn matched_for(p: &Policy, check: Check, c: &Client) -> String {
    match p.resolve(check, c).matched {
        Matched::Entry(o) => o.key.to_string(),
        Matched::BuiltIn => "built-in".to_string(),
    }
}

#[test]
fn exact_address_then_octet_prefixes_longest_first() {
    let p = policy(
        "ConnRate:1 1\nConnRate:1.1 2\nConnRate:1.1.1 3\nConnRate:1.1.1.11 4\nConnRate:default 5\n",
    );
    assert_eq!(matched(&p, &ip("1.1.1.11")), "1.1.1.11");
    assert_eq!(matched(&p, &ip("1.1.1.12")), "1.1.1");
    assert_eq!(matched(&p, &ip("1.1.2.1")), "1.1");
    assert_eq!(matched(&p, &ip("1.2.0.1")), "1");
    assert_eq!(matched(&p, &ip("2.0.0.1")), "default");
    // The order of the lines does not matter, only the prefix length.
    let p = policy("ConnRate:1.1.1 3\nConnRate:1.1.1.11 4\n");
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(4));
}

#[test]
fn an_address_is_not_a_string_prefix() {
    let p = policy("ConnRate:1.1.1.1 7\n");
    assert_eq!(matched(&p, &ip("1.1.1.11")), "built-in");
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(15));
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.1")), Some(7));
}

#[test]
fn cidr_keys_sit_among_octet_prefixes_by_length() {
    let p = policy(
        "ConnRate:10.1 1\nConnRate:10.1.16.0/20 2\nConnRate:10.1.17 3\nConnRate:0.0.0.0/0 4\n",
    );
    assert_eq!(matched(&p, &ip("10.1.17.5")), "10.1.17");
    assert_eq!(matched(&p, &ip("10.1.18.5")), "10.1.16.0/20");
    assert_eq!(matched(&p, &ip("10.1.99.5")), "10.1");
    assert_eq!(matched(&p, &ip("192.0.2.1")), "0.0.0.0/0");
}

#[test]
fn an_octet_prefix_and_the_same_cidr_are_one_key_and_the_first_wins() {
    let p = policy("ConnRate:10.1.0.0/16 1\nConnRate:10.1 2\n");
    assert_eq!(p.limit(Check::ConnRate, &ip("10.1.2.3")), Some(1));
    assert_eq!(p.warnings().len(), 1, "{:?}", p.warnings());
    assert!(p.warnings()[0].message.contains("first one (p:5) wins"));
}

#[test]
fn ipv6_exact_then_cidr_longest_first() {
    let p = policy(
        "ConnRate:2001:db8::/32 1\nConnRate:2001:db8:1::/48 2\nConnRate:2001:db8:1:2::/64 3\n\
         ConnRate:2001:DB8:1:2::25 4\n",
    );
    assert_eq!(matched(&p, &ip("2001:db8:1:2::25")), "2001:DB8:1:2::25");
    assert_eq!(matched(&p, &ip("2001:db8:1:2::26")), "2001:db8:1:2::/64");
    assert_eq!(matched(&p, &ip("2001:db8:1:3::1")), "2001:db8:1::/48");
    assert_eq!(matched(&p, &ip("2001:db8:ffff::1")), "2001:db8::/32");
    assert_eq!(matched(&p, &ip("2001:db9::1")), "built-in");
    // IPv4 entries never match IPv6 clients and the reverse.
    let p = policy("ConnRate:0.0.0.0/0 1\n");
    assert_eq!(matched(&p, &ip("::2")), "built-in");
}

#[test]
fn an_ipv4_mapped_client_matches_ipv4_entries() {
    let p = policy("ConnRate:1.1.1.11 50\n");
    assert_eq!(p.limit(Check::ConnRate, &ip("::ffff:1.1.1.11")), Some(50));
}

#[test]
fn the_address_wins_over_the_host_name() {
    let p = policy("ConnRate:web1.example.com 1\nConnRate:1.1.1 2\n");
    let c = ip("1.1.1.11").with_host("web1.example.com");
    assert_eq!(matched(&p, &c), "1.1.1");
}

#[test]
fn host_name_then_each_parent_domain() {
    let p = policy("ConnRate:Web1.Example.COM 1\nConnRate:example.com 2\nConnRate:com 3\n");
    let host = |h: &str| ip("192.0.2.1").with_host(h);
    assert_eq!(matched(&p, &host("WEB1.example.com.")), "Web1.Example.COM");
    assert_eq!(matched(&p, &host("web2.example.com")), "example.com");
    assert_eq!(matched(&p, &host("a.b.example.com")), "example.com");
    assert_eq!(matched(&p, &host("other.com")), "com");
    assert_eq!(matched(&p, &host("example.org")), "built-in");
    // "ample.com" is not a parent of "example.com".
    let p = policy("ConnRate:ample.com 1\n");
    assert_eq!(matched(&p, &host("example.com")), "built-in");
}

#[test]
fn the_host_name_wins_over_the_class_and_the_class_over_the_default() {
    let p = policy(
        "NetClass:192.0.2.0/24 FRIEND\nConnRate:FRIEND 100\nConnRate:web.example 5\nConnRate:* 9\n",
    );
    assert_eq!(
        matched(&p, &ip("192.0.2.7").with_host("web.example")),
        "web.example"
    );
    assert_eq!(matched(&p, &ip("192.0.2.7")), "FRIEND");
    assert_eq!(p.limit(Check::ConnRate, &ip("192.0.2.7")), Some(100));
    assert_eq!(matched(&p, &ip("198.51.100.1")), "*");
}

#[test]
fn classes_by_address_by_domain_loopback_and_auth() {
    let p = policy(
        "NetClass:10.0.0.0/8 FRIEND\nNetClass:10.9 DOMAIN\nNetClass:partner.example Partner\n\
         ConnRate:LOCAL 1\nConnRate:FRIEND 2\nConnRate:DOMAIN 3\nConnRate:partner 4\nConnRate:AUTH 5\n",
    );
    let limit = |c: &Client| p.limit(Check::ConnRate, c);
    assert_eq!(p.class_of(&ip("127.0.0.1")), Some("local"));
    assert_eq!(limit(&ip("127.0.0.1")), Some(1));
    assert_eq!(limit(&ip("10.1.2.3")), Some(2));
    assert_eq!(limit(&ip("10.9.2.3")), Some(3), "longest class prefix wins");
    assert_eq!(
        limit(&ip("192.0.2.1").with_host("mx.partner.example")),
        Some(4)
    );
    assert_eq!(limit(&ip("10.1.2.3").with_auth("bob")), Some(5));
    assert_eq!(limit(&ip("192.0.2.1")), Some(15));
    // 127.0.0.1 can be classed otherwise.
    let p = policy("NetClass:127.0.0.1 OTHER\nConnRate:OTHER 8\nConnRate:LOCAL 1\n");
    assert_eq!(p.limit(Check::ConnRate, &ip("127.0.0.1")), Some(8));
}

#[test]
fn default_spellings_and_builtins() {
    for spelling in ["default", "DEFAULT", "*"] {
        let p = policy(&format!("ConnRate:{spelling} 33\n"));
        assert_eq!(p.limit(Check::ConnRate, &ip("192.0.2.1")), Some(33));
    }
    let p = policy("");
    let c = ip("192.0.2.1").with_sender("a@b.example").with_auth("u");
    let builtin = [
        (Check::ConnRate, Some(15)),
        (Check::MaxRcpt, Some(200)),
        (Check::MsgRate, Some(100)),
        (Check::RcptRate, Some(100)),
        (Check::MsgRateFrom, None),
        (Check::RcptRateFrom, None),
        (Check::MaxRcptFrom, None),
        (Check::MsgRateAuth, None),
        (Check::RcptRateAuth, None),
    ];
    for (check, limit) in builtin {
        assert_eq!(p.limit(check, &c), limit, "{check}");
    }
    // Switched off (absent): no limit at all.
    assert_eq!(p.limit(Check::ConnOpen, &c), None);
    assert_eq!(p.limit(Check::MaxMsgs, &c), None);
}

#[test]
fn a_zero_entry_is_no_limit_and_stops_the_search() {
    let p = policy("ConnRate:1.1.1.11 0\nConnRate:1.1.1 5\nConnRate:default -1\n");
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), None);
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.12")), Some(5));
    assert_eq!(p.limit(Check::ConnRate, &ip("9.9.9.9")), None);
}

#[test]
fn sender_address_then_at_domain_then_domain_and_parents_then_default() {
    let p = policy(
        "MsgRateFrom:Alice@Mail.Example.com 1\nMsgRateFrom:@mail.example.com 2\n\
         MsgRateFrom:example.com 3\nMsgRateFrom:com 4\nMsgRateFrom:default 5\n",
    );
    let from = |s: &str| ip("192.0.2.1").with_sender(s);
    let m = |s: &str| matched_for(&p, Check::MsgRateFrom, &from(s));
    assert_eq!(m("<alice@mail.example.com>"), "Alice@Mail.Example.com");
    assert_eq!(m("bob@mail.example.com"), "@mail.example.com");
    assert_eq!(m("bob@other.example.com"), "example.com");
    assert_eq!(m("bob@x.com"), "com");
    assert_eq!(m("bob@x.org"), "default");
    // No sender (before MAIL FROM, or the null sender): the default.
    assert_eq!(m("<>"), "default");
    // Sender entries are their own table: the client address plays no part.
    assert_eq!(
        matched_for(&p, Check::RcptRateFrom, &from("a@x.com")),
        "built-in"
    );
}

#[test]
fn auth_user_then_default() {
    let p = policy("MsgRateAuth:Alice 7\nMsgRateAuth:default 70\n");
    let c = |u: &str| ip("192.0.2.1").with_auth(u);
    assert_eq!(p.limit(Check::MsgRateAuth, &c("ALICE")), Some(7));
    assert_eq!(p.limit(Check::MsgRateAuth, &c("bob")), Some(70));
    assert_eq!(p.limit(Check::MsgRateAuth, &ip("192.0.2.1")), Some(70));
}

#[test]
fn several_files_are_read_in_order_and_the_first_duplicate_wins() {
    use relayrate::policy::PolicyFile;
    let site = PolicyFile {
        name: "site.txt".into(),
        text: "CHECK_CONN_RATE YES\nConnRate:1.1.1.11 50\n".into(),
    };
    let defaults = PolicyFile {
        name: "defaults.txt".into(),
        text: "CHECK_CONN_RATE NO\nConnRate:1.1.1.11 5\nConnRate:default 20\n".into(),
    };
    let p = Policy::parse(vec![site, defaults]).unwrap();
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.11")), Some(50));
    assert_eq!(p.limit(Check::ConnRate, &ip("1.1.1.12")), Some(20));
    let msgs: Vec<String> = p.warnings().iter().map(|w| w.to_string()).collect();
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("defaults.txt:2:1: duplicate entry")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("defaults.txt:1:1: `CHECK_CONN_RATE` is set again")),
        "{msgs:?}"
    );
}

#[test]
fn a_policy_divided_among_relays_divides_cluster_limits_only() {
    let p = Policy::parse_str(
        "p",
        "CHECK_CONN_RATE YES\nCHECK_OPEN_CONNECTIONS YES\nCHECK_NB_RCPT YES\n\
         ConnRate:default 50\nConnOpen:default 2\nMaxRcpt:default 50\n",
    )
    .unwrap();
    let third = p.divided(3);
    let c = ip("192.0.2.1");
    assert_eq!(third.limit(Check::ConnRate, &c), Some(16));
    assert_eq!(third.limit(Check::ConnOpen, &c), Some(1), "never below 1");
    assert_eq!(
        third.limit(Check::MaxRcpt, &c),
        Some(50),
        "per connection: whole"
    );
    assert_eq!(third.limit(Check::MsgRate, &c), None, "switched off");
    assert_eq!(p.limit(Check::ConnRate, &c), Some(50));
}
