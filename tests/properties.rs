//! Property tests against brute-force models: the window's count, and the
//! precedence of `docs/policy.md` §3 over random policies and clients.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use relayrate::check::Check;
use relayrate::policy::{Client, Matched, Policy};
use relayrate::window::{Window, WindowConfig};

// ---------------------------------------------------------------- window

/// Brute force: an event at `t` counts at `now` while fewer than `buckets`
/// bucket boundaries lie between them.
fn model_count(events: &[(u64, u32)], cfg: WindowConfig, now: u64) -> u64 {
    events
        .iter()
        .filter(|(t, _)| cfg.bucket_of(now) - cfg.bucket_of(*t) < u64::from(cfg.buckets()))
        .map(|(_, n)| u64::from(*n))
        .sum()
}

#[derive(Debug, Clone)]
enum Op {
    Add { dt: u64, n: u32 },
    Query { dt: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    // Steps mostly within a window, sometimes far beyond it.
    let dt = prop_oneof![8 => 0u64..90, 1 => 0u64..5_000];
    prop_oneof![
        (dt.clone(), 1u32..5).prop_map(|(dt, n)| Op::Add { dt, n }),
        dt.prop_map(|dt| Op::Query { dt }),
    ]
}

proptest! {
    #[test]
    fn window_count_equals_the_model(
        bucket in 1u32..60,
        buckets in 1u32..25,
        start in 0u64..1_000_000,
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let cfg = WindowConfig::new(bucket * buckets, bucket).unwrap();
        let mut w = Window::new(cfg);
        let mut events = Vec::new();
        let mut now = start;
        for op in ops {
            match op {
                Op::Add { dt, n } => {
                    now += dt;
                    events.push((now, n));
                    let counted = w.add(cfg, now, n);
                    prop_assert_eq!(u64::from(counted), model_count(&events, cfg, now));
                }
                Op::Query { dt } => {
                    now += dt;
                    let count = u64::from(w.count(cfg, now));
                    prop_assert_eq!(count, model_count(&events, cfg, now));
                    // retry_after: the first instant at which the count is below the limit.
                    let limit = (count / 2).max(1);
                    let wait = w.retry_after(cfg, now, limit);
                    prop_assert!(model_count(&events, cfg, now + wait) < limit);
                    if wait > 0 {
                        prop_assert!(model_count(&events, cfg, now + wait - 1) >= limit);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- lookup

/// A small universe so that random entries and clients meet often.
const HOSTS: [&str; 4] = ["a.ex.com", "b.ex.com", "ex.com", "a.other.org"];
const LABELS: [&str; 3] = ["local", "friend", "auth"];

#[derive(Debug, Clone)]
enum KeySpec {
    /// An IPv4 network from the universe 10.{0,1}.{0,1}.{0..3}, by length.
    V4(u32, u8),
    V6(u128, u8),
    Name(&'static str),
    Default,
}

impl KeySpec {
    fn text(&self, octet_form: bool) -> String {
        match self {
            KeySpec::V4(bits, len) if octet_form && len % 8 == 0 && *len > 0 => {
                let o = Ipv4Addr::from(*bits).octets();
                o[..(*len / 8) as usize]
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(".")
            }
            KeySpec::V4(bits, 32) => Ipv4Addr::from(*bits).to_string(),
            KeySpec::V4(bits, len) => format!("{}/{len}", Ipv4Addr::from(*bits)),
            KeySpec::V6(bits, 128) => Ipv6Addr::from(*bits).to_string(),
            KeySpec::V6(bits, len) => format!("{}/{len}", Ipv6Addr::from(*bits)),
            KeySpec::Name(n) => n.to_string(),
            KeySpec::Default => "default".into(),
        }
    }

    /// (tier, specificity) of a match for `c`, lower tier first, higher
    /// specificity first; `None` when it does not match.
    fn rank(&self, c: &Client, class: Option<&str>) -> Option<(u8, u32)> {
        match (self, c.ip) {
            (KeySpec::V4(bits, len), Some(IpAddr::V4(ip))) => {
                let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
                (u32::from(ip) & mask == *bits).then_some((0, u32::from(*len)))
            }
            (KeySpec::V6(bits, len), Some(IpAddr::V6(ip))) => {
                let mask = if *len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                (u128::from(ip) & mask == *bits).then_some((0, u32::from(*len)))
            }
            (KeySpec::Name(n), _) => {
                let host = c.host.as_deref().unwrap_or("");
                let by_host = host == *n || host.ends_with(&format!(".{n}"));
                if by_host {
                    Some((1, n.split('.').count() as u32))
                } else if class == Some(n) {
                    Some((2, 0))
                } else {
                    None
                }
            }
            (KeySpec::Default, _) => Some((3, 0)),
            _ => None,
        }
    }
}

fn v4_key() -> impl Strategy<Value = KeySpec> {
    (
        0u32..2,
        0u32..2,
        0u32..4,
        prop::sample::select(vec![0u8, 8, 16, 20, 24, 30, 31, 32]),
    )
        .prop_map(|(b, c, d, len)| {
            let addr = u32::from(Ipv4Addr::new(10, b as u8, c as u8, d as u8));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            KeySpec::V4(addr & mask, len)
        })
}

fn v6_key() -> impl Strategy<Value = KeySpec> {
    (
        0u128..4,
        prop::sample::select(vec![32u8, 48, 64, 126, 127, 128]),
    )
        .prop_map(|(low, len)| {
            let addr = (0x2001_0db8u128 << 96) | low;
            let mask = u128::MAX << (128 - len);
            KeySpec::V6(addr & mask, len)
        })
}

fn key() -> impl Strategy<Value = KeySpec> {
    prop_oneof![
        4 => v4_key(),
        2 => v6_key(),
        2 => prop::sample::select(HOSTS.to_vec()).prop_map(KeySpec::Name),
        1 => prop::sample::select(vec!["com", "org", "other.org"]).prop_map(KeySpec::Name),
        1 => prop::sample::select(LABELS.to_vec()).prop_map(KeySpec::Name),
        1 => Just(KeySpec::Default),
    ]
}

fn client() -> impl Strategy<Value = Client> {
    let v4 = (0u8..2, 0u8..2, 0u8..4).prop_map(|(b, c, d)| IpAddr::V4(Ipv4Addr::new(10, b, c, d)));
    let v6 = (0u128..4).prop_map(|low| IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | low)));
    let loopback = Just(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let ip = prop_oneof![4 => v4, 2 => v6, 1 => loopback];
    let host = prop::option::of(prop::sample::select(HOSTS.to_vec()));
    let auth = prop::option::of(Just("user"));
    (ip, host, auth).prop_map(|(ip, host, auth)| {
        let mut c = Client::from_ip(ip);
        if let Some(h) = host {
            c = c.with_host(h);
        }
        if let Some(a) = auth {
            c = c.with_auth(a);
        }
        c
    })
}

/// The best-ranked entry; on a tie (a duplicate key) the earliest line.
fn model_best<'a, T>(
    entries: &'a [(KeySpec, T, u32)],
    c: &Client,
    class: Option<&str>,
) -> Option<&'a (KeySpec, T, u32)> {
    entries
        .iter()
        .filter_map(|e| {
            e.0.rank(c, class)
                .map(|(tier, spec)| ((tier, u32::MAX - spec, e.2), e))
        })
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, e)| e)
}

proptest! {
    #[test]
    fn lookup_equals_the_model_of_precedence(
        classes in prop::collection::vec((key(), prop::sample::select(vec!["friend", "domain", "other"])), 0..6),
        limits in prop::collection::vec((key(), 0u64..100), 0..20),
        octet_form in any::<bool>(),
        clients in prop::collection::vec(client(), 1..20),
    ) {
        // NetClass entries never key on labels or the default.
        let classes: Vec<_> = classes
            .into_iter()
            .filter(|(k, _)| !matches!(k, KeySpec::Default) && !LABELS.contains(&k.text(false).as_str()))
            .collect();
        let mut text = String::from("CHECK_CONN_RATE YES\n");
        let mut class_entries = Vec::new();
        let mut limit_entries = Vec::new();
        for (k, label) in &classes {
            text.push_str(&format!("NetClass:{} {}\n", k.text(octet_form), label.to_uppercase()));
            class_entries.push((k.clone(), *label, text.lines().count() as u32));
        }
        for (k, limit) in &limits {
            text.push_str(&format!("ConnRate:{} {}\n", k.text(octet_form), limit));
            limit_entries.push((k.clone(), *limit, text.lines().count() as u32));
        }
        let policy = Policy::parse_str("p", &text).unwrap();
        for c in &clients {
            let class = if c.auth.is_some() {
                Some("auth")
            } else {
                match model_best(&class_entries, c, None) {
                    Some(e) => Some(e.1),
                    None if c.ip == Some(IpAddr::V4(Ipv4Addr::LOCALHOST)) => Some("local"),
                    None => None,
                }
            };
            prop_assert_eq!(policy.class_of(c), class, "{}", text);
            let expected = model_best(&limit_entries, c, class);
            let resolved = policy.resolve(Check::ConnRate, c);
            match (expected, &resolved.matched) {
                (Some((_, limit, line)), Matched::Entry(origin)) => {
                    prop_assert_eq!(origin.line, *line, "{:?} in\n{}", c, text);
                    prop_assert_eq!(resolved.limit, (*limit > 0).then_some(*limit));
                }
                (None, Matched::BuiltIn) => prop_assert_eq!(resolved.limit, Some(15)),
                (e, m) => prop_assert!(false, "model {:?}, lookup {:?} for {:?} in\n{}", e, m, c, text),
            }
        }
    }
}
