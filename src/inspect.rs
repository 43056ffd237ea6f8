//! What an operator asks of the limiter state: who is near a limit, and
//! every count of one key. Pure, like the engine: the state and `now` in,
//! plain data out.
//!
//! A counter is keyed by a client address, sender or AUTH user alone, so
//! its limit is looked up with that key alone: an entry for a host name
//! or NetClass that the address had at connect is not seen here.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::check::{Check, KeyKind, Measure};
use crate::engine::{CounterId, CounterKey, Engine, Time};
use crate::policy::{canonical_ip, names, parse_client_addr, Client, Policy};

/// One count against its limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyCount {
    pub check: Check,
    pub key: String,
    pub count: u64,
    /// `None`: no limit applies.
    pub limit: Option<u64>,
    /// The window of a windowed check, in seconds.
    pub window_secs: Option<u32>,
    pub enabled: bool,
    /// Unusual now against the key's own baseline.
    pub unusual: bool,
    /// Events in the current bucket (windowed checks; 0 otherwise).
    pub bucket_count: u64,
    /// The key's usual count per bucket now, if it has a history.
    pub baseline: Option<f64>,
}

impl KeyCount {
    /// The count as a share of the limit, in percent; 0 without a limit.
    pub fn percent(&self) -> f64 {
        match self.limit {
            Some(0) => f64::INFINITY,
            Some(l) => self.count as f64 * 100.0 / l as f64,
            None => 0.0,
        }
    }
}

/// A key as an operator types it: an address in any form a milter gets
/// one (an IPv6 network `ADDRESS/N` too), else a sender (`<>` for the
/// null sender) or AUTH user name, normalized as the milter normalizes
/// them.
pub fn parse_key(text: &str) -> CounterKey {
    let text = text.trim();
    if let Some(ip) = parse_client_addr(text) {
        return CounterKey::Ip(ip);
    }
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return CounterKey::Ip(canonical_ip(net.network()));
    }
    if text == names::NULL_SENDER || text.contains('@') {
        return CounterKey::Name(names::envelope_sender(text).into());
    }
    CounterKey::Name(text.to_ascii_lowercase().into())
}

/// The client a check's limit is looked up for, knowing only the key.
fn client_of(kind: KeyKind, key: &CounterKey) -> Option<Client> {
    match (kind, key) {
        (KeyKind::Client, CounterKey::Ip(ip)) => Some(Client::from_ip(*ip)),
        (KeyKind::Sender, CounterKey::Name(n)) => Some(Client::default().with_sender(n)),
        (KeyKind::AuthUser, CounterKey::Name(n)) => Some(Client::default().with_auth(n)),
        _ => None,
    }
}

/// A key as counted: an IPv6 client's network as `ADDRESS/N`.
fn key_text(policy: &Policy, key: &CounterKey) -> String {
    match key {
        CounterKey::Ip(ip) => policy.counted_text(*ip),
        CounterKey::Name(n) => n.to_string(),
    }
}

fn key_count(policy: &Policy, check: Check, key: &CounterKey, count: u64) -> KeyCount {
    let client = client_of(check.key_kind(), key).unwrap_or_default();
    KeyCount {
        check,
        key: key_text(policy, key),
        count,
        limit: policy.limit(check, &client),
        window_secs: (check.measure() == Measure::Window).then(|| policy.window().window_secs()),
        enabled: policy.is_enabled(check),
        unusual: false,
        bucket_count: 0,
        baseline: None,
    }
}

/// A windowed count with where it stands against its baseline.
fn windowed(engine: &Engine, id: &CounterId, count: u64, now: Time) -> KeyCount {
    KeyCount {
        unusual: engine.is_unusual(id, now),
        bucket_count: engine.bucket_count(id, now),
        baseline: engine.usual(id, now).map(f64::from),
        ..key_count(engine.policy(), id.check, &id.key, count)
    }
}

/// The `n` counts nearest their limits (highest share first, then highest
/// count), of one check or of all windowed and open-connection checks;
/// with `unusual`, of the keys unusual now only. Counts with no limit come
/// after every count with one.
pub fn top(
    engine: &Engine,
    check: Option<Check>,
    n: usize,
    unusual: bool,
    now: Time,
) -> Vec<KeyCount> {
    rank(top_candidates(engine, check, unusual, now), n)
}

/// The counts [`top`] ranks, unsorted: every nonzero one of `check` (or
/// of all), of unusual keys only with `unusual`. The part of `top` that
/// reads the engine, for a caller that sorts after letting go of it.
pub fn top_candidates(
    engine: &Engine,
    check: Option<Check>,
    unusual: bool,
    now: Time,
) -> Vec<KeyCount> {
    let policy = engine.policy();
    let wanted = |c: Check| check.is_none_or(|w| w == c);
    let windowed = engine
        .counts(now)
        .filter(|(id, count)| *count > 0 && wanted(id.check))
        .filter(|(id, _)| !unusual || engine.is_unusual(id, now))
        .map(|(id, count)| windowed(engine, id, count, now));
    let open = engine
        .open_counts()
        .filter(|_| wanted(Check::ConnOpen) && !unusual)
        .map(|(ip, count)| key_count(policy, Check::ConnOpen, &CounterKey::Ip(ip), count));
    windowed.chain(open).collect()
}

/// The first `n` of `all` in [`top`]'s order.
pub fn rank(mut all: Vec<KeyCount>, n: usize) -> Vec<KeyCount> {
    let rank = |k: &KeyCount| (k.limit.is_some(), k.percent(), k.count);
    // Ties in key order, so that the same state always lists the same.
    all.sort_by(|a, b| {
        let (ra, rb) = (rank(a), rank(b));
        rb.0.cmp(&ra.0)
            .then(rb.1.partial_cmp(&ra.1).unwrap_or(Ordering::Equal))
            .then(rb.2.cmp(&ra.2))
            .then_with(|| (a.check, &a.key).cmp(&(b.check, &b.key)))
    });
    all.truncate(n);
    all
}

/// Every check that counts by this kind of key, in policy order, with its
/// count (0 for per-connection checks: those live in the milter's
/// sessions), limit and window.
pub fn show(engine: &Engine, key: &CounterKey, now: Time) -> Vec<KeyCount> {
    let policy = engine.policy();
    Check::ALL
        .into_iter()
        .filter_map(|check| {
            let client = client_of(check.key_kind(), key)?;
            let count = match check.measure() {
                Measure::PerConnection => 0,
                _ => engine.count_of(check, &client, now),
            };
            if check.measure() == Measure::Window {
                let id = engine.counted_id(check, &client)?;
                return Some(windowed(engine, &id, count, now));
            }
            Some(key_count(policy, check, key, count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ConnId, Event};
    use std::sync::Arc;

    const POLICY: &str = "CHECK_CONN_RATE YES\nCHECK_MSG_RATE YES\nCHECK_OPEN_CONNECTIONS YES\n\
        ConnRate:default 10\nConnRate:10.0.0.2 4\nMsgRate:default 100\nConnOpen:default 5\n";

    fn engine_with_traffic() -> Engine {
        let mut e = Engine::new(Arc::new(Policy::parse_str("p", POLICY).unwrap()));
        let mut conn = 0;
        for (ip, n) in [("10.0.0.1", 6), ("10.0.0.2", 3), ("10.0.0.3", 1)] {
            let client = Client::from_ip(ip.parse().unwrap());
            for _ in 0..n {
                conn += 1;
                let conn = ConnId { owner: 1, conn };
                let event = Event::Connect {
                    conn,
                    client: client.clone(),
                };
                e.apply(&event, 1_000);
                e.apply(&Event::Close { conn }, 1_000);
            }
        }
        e
    }

    #[test]
    fn top_ranks_by_share_of_the_limit_not_by_count() {
        let e = engine_with_traffic();
        let top = top(&e, Some(Check::ConnRate), 2, false, 1_000);
        let keys: Vec<_> = top.iter().map(|k| (k.key.as_str(), k.count)).collect();
        // 3 of 4 (75%) comes before 6 of 10 (60%).
        assert_eq!(keys, [("10.0.0.2", 3), ("10.0.0.1", 6)]);
        assert_eq!(top[0].limit, Some(4));
        assert_eq!(top[0].percent(), 75.0);
        assert_eq!(top[0].window_secs, Some(600));
    }

    #[test]
    fn show_gives_every_client_check_of_an_address() {
        let e = engine_with_traffic();
        let shown = show(&e, &parse_key("10.0.0.1"), 1_000);
        let checks: Vec<Check> = shown.iter().map(|k| k.check).collect();
        assert_eq!(
            checks,
            [
                Check::ConnRate,
                Check::ConnOpen,
                Check::MaxRcpt,
                Check::MsgRate,
                Check::MaxMsgs,
                Check::RcptRate
            ]
        );
        assert_eq!(shown[0].count, 6);
        assert_eq!(shown[0].limit, Some(10));
        assert_eq!(shown[1].count, 0, "every connection was closed");
    }

    #[test]
    fn a_name_key_shows_sender_and_auth_checks() {
        let e = engine_with_traffic();
        let shown = show(&e, &parse_key("Joe@Example.org"), 1_000);
        assert_eq!(shown.len(), 5);
        assert!(shown.iter().all(|k| k.key == "joe@example.org"));
    }

    #[test]
    fn reset_clears_one_key_only() {
        let mut e = engine_with_traffic();
        assert_eq!(e.reset(&parse_key("10.0.0.1"), None), 1);
        let c1 = Client::from_ip("10.0.0.1".parse().unwrap());
        let c2 = Client::from_ip("10.0.0.2".parse().unwrap());
        assert_eq!(e.count_of(Check::ConnRate, &c1, 1_000), 0);
        assert_eq!(e.count_of(Check::ConnRate, &c2, 1_000), 3);
        assert_eq!(e.reset(&parse_key("10.0.0.2"), Some(Check::MsgRate)), 0);
    }

    #[test]
    fn reaching_80_percent_is_counted_once_per_climb() {
        let mut e = engine_with_traffic();
        // 10.0.0.2 is at 3 of 4 (75%), 10.0.0.1 at 6 of 10: none near yet.
        assert_eq!(e.near_limit_crossings()[Check::ConnRate.index()], 0);
        let client = Client::from_ip("10.0.0.2".parse().unwrap());
        for conn in 100..103 {
            let conn = ConnId { owner: 1, conn };
            e.apply(
                &Event::Connect {
                    conn,
                    client: client.clone(),
                },
                1_000,
            );
        }
        // 4, 5, 6 of 4: crossed once, at 4.
        assert_eq!(e.near_limit_crossings()[Check::ConnRate.index()], 1);
    }
}
