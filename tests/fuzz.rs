//! Arbitrary bytes where a node takes input: policy files, every gRPC
//! request message, every Raft payload. Each is decoded, checked as the
//! node checks it, and what passes is applied to a scratch state: no
//! panic, each case in bounded time, and every error message short.
//!
//! `RELAYRATE_FUZZ_CASES=N` sets the cases per target (default 1000, about
//! 10 s in all for a debug build); raise it for a longer hunt.

use std::time::{Duration, Instant};

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use relayrate::bounds::MAX_DIAGNOSTICS;
use relayrate::convert;
use relayrate::engine::Event;
use relayrate::inspect;
use relayrate::node::{validate_proposal, Proposal, ProposalReply};
use relayrate::policy::{Policy, PolicyError, PolicyFile};
use relayrate::proto::v1 as pb;
use relayrate::raft::state::{LimiterSnapshot, LimiterState};
use relayrate::raft::validate::{self, SnapshotChunks};
use relayrate::raft::{
    decode_bounded, Command, Entry, NodeId, Request, RequestId, Sender, TypeConfig,
};

/// What one case may take, decoding and applying included.
const CASE_TIME: Duration = Duration::from_secs(2);
/// The longest error message taken, percent-encoded as a gRPC status
/// travels: what a client takes in its headers, less room for the others.
const MAX_MESSAGE: usize = 15 * 1024;

fn cases() -> u32 {
    std::env::var("RELAYRATE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

/// Runs `check` on `cases()` inputs of `strategy`, each within [`CASE_TIME`].
fn fuzz<S: Strategy>(strategy: S, check: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |input| {
            let started = Instant::now();
            check(input);
            let took = started.elapsed();
            prop_assert!(took < CASE_TIME, "one case took {took:?}");
            Ok(())
        })
        .unwrap();
}

/// Arbitrary bytes, bytes of a well-formed encoding, and those with a
/// few bytes changed (so that decoding gets past the first field).
fn bytes_like(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let flips = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4);
    let changed = (valid, flips).prop_map(|(mut bytes, flips)| {
        if !bytes.is_empty() {
            for (at, b) in flips {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
        }
        bytes
    });
    prop_oneof![1 => prop::collection::vec(any::<u8>(), 0..512), 4 => changed]
}

/// Texts of every length class: empty, short, around the bounds, huge.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        16 => "[ -~]{0,24}",
        4 => "\\PC{0,16}",
        1 => (0usize..3).prop_map(|k| "x".repeat([4096, 4097, 3 << 20][k])),
    ]
}

fn scratch() -> LimiterState {
    let text = "CHECK_CONN_RATE YES\nCHECK_OPEN_CONNECTIONS YES\nCHECK_MSG_RATE YES\n\
                CHECK_RCPT_RATE YES\nCHECK_NB_RCPT YES\nCHECK_NB_MSGS YES\n\
                ConnRate:default 5\nMsgRateFrom:default 3\nRcptRateAuth:default 3\n";
    LimiterState::new(std::sync::Arc::new(Policy::parse_str("p", text).unwrap()))
}

fn assert_short(message: &str) {
    let len = relayrate::bounds::status_len(message);
    assert!(
        len <= MAX_MESSAGE,
        "{len} bytes of message: {}",
        relayrate::bounds::cut(message)
    );
}

/// Validates a request as the leader would, then applies it: a request
/// that passes is applied as such, one that does not changes nothing.
fn apply_checked(state: &mut LimiterState, request: &Request) {
    let valid = validate::request(request);
    if let Err(e) = &valid {
        assert_short(&e.0);
    }
    let response = state.apply(request);
    let invalid = matches!(response, relayrate::raft::Response::Invalid(_));
    assert_eq!(invalid, valid.is_err(), "{response:?}");
    if let (Command::Decide { events, .. }, relayrate::raft::Response::Verdicts(v)) =
        (&request.command, &response)
    {
        assert_eq!(v.len(), events.len());
    }
}

// ---------------------------------------------------------------- policy

/// Lines of policy words, numbers, keys and stray bytes.
fn policy_bytes() -> impl Strategy<Value = Vec<u8>> {
    let word = prop_oneof![
        Just(b"ConnRate:".to_vec()),
        Just(b"NetClass:".to_vec()),
        Just(b"MsgRateFrom:".to_vec()),
        Just(b"CHECK_CONN_RATE".to_vec()),
        Just(b"RateWindow".to_vec()),
        Just(b"RateBucket".to_vec()),
        Just(b"DryRun".to_vec()),
        Just(b"YES".to_vec()),
        Just(b"default".to_vec()),
        Just(b"#".to_vec()),
        Just(b"10.1.0.0/16".to_vec()),
        Just(b"2001:db8::/48".to_vec()),
        Just(b"@example.org".to_vec()),
        Just(b"IPv6Prefix".to_vec()),
        Just(b"MsgRateAuth:".to_vec()),
        Just(b"<>".to_vec()),
        Just("jörg@bücher.example".as_bytes().to_vec()),
        Just(b"@xn--bcher-kva.example".to_vec()),
        Just(b"xn--zz-".to_vec()),
        Just(b"IPv6:2001:db8::6".to_vec()),
        Just(b"\x01".to_vec()),
        Just(b"4294967296k".to_vec()),
        "[0-9]{1,12}[kKmM]?".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 1..8),
    ];
    let line = prop::collection::vec(
        (word, prop::sample::select(vec![&b""[..], b" ", b"\t"])),
        0..6,
    )
    .prop_map(|words| {
        let mut line = Vec::new();
        for (w, sep) in words {
            line.extend_from_slice(&w);
            line.extend_from_slice(sep);
        }
        line.push(b'\n');
        line
    });
    prop::collection::vec(line, 0..40).prop_map(|lines| lines.concat())
}

fn parse_policy_bytes(bytes: &[u8]) {
    let file = match PolicyFile::from_bytes("f.txt".into(), bytes) {
        Ok(f) => f,
        Err(d) => {
            assert!(d.line >= 1 && d.column >= 1, "{d}");
            assert_short(&d.to_string());
            return;
        }
    };
    match Policy::parse(vec![file.clone()]) {
        Ok(p) => {
            assert!(p.warnings().len() <= MAX_DIAGNOSTICS);
            let mut state = scratch();
            apply_checked(
                &mut state,
                &Request {
                    stamp_ms: 1_000,
                    command: Command::SetPolicy { files: vec![file] },
                },
            );
        }
        Err(e @ PolicyError::Invalid { .. }) => {
            let PolicyError::Invalid { errors, .. } = &e else {
                unreachable!()
            };
            assert!(!errors.is_empty() && errors.len() <= MAX_DIAGNOSTICS);
            assert!(errors.iter().all(|d| d.line >= 1 && d.column >= 1));
            assert_short(&e.to_string());
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn policy_files_of_arbitrary_bytes() {
    fuzz(bytes_like(policy_bytes()), |bytes| {
        parse_policy_bytes(&bytes)
    });
}

// ---------------------------------------------------------------- gRPC

fn pb_client() -> impl Strategy<Value = pb::Client> {
    let ip = prop_oneof![
        Just(String::new()),
        Just("192.0.2.1".to_string()),
        Just("::ffff:10.0.0.1".to_string()),
        Just("IPv6:2001:db8::6".to_string()),
        Just("[IPv6:2001:0db8:0:0:0:0:0:6]".to_string()),
        text(),
    ];
    (ip, text(), text(), text()).prop_map(|(ip, host, sender, auth)| pb::Client {
        ip,
        host,
        sender,
        auth,
    })
}

fn pb_event() -> impl Strategy<Value = pb::Event> {
    use pb::event::Kind;
    let conn = (any::<u64>(), any::<u64>()).prop_map(|(owner, conn)| pb::ConnId { owner, conn });
    let client = || proptest::option::weighted(0.9, pb_client());
    let kind = prop_oneof![
        (proptest::option::of(conn.clone()), client())
            .prop_map(|(conn, client)| Kind::Connect(pb::Connect { conn, client })),
        client().prop_map(|client| Kind::Recheck(pb::Recheck { client })),
        (client(), any::<u32>()).prop_map(|(client, n)| Kind::Mail(pb::Mail {
            client,
            msgs_in_conn: n
        })),
        (client(), any::<u32>(), text()).prop_map(|(client, n, rcpt)| Kind::Rcpt(pb::Rcpt {
            client,
            rcpts_in_msg: n,
            rcpt
        })),
        (client(), any::<u64>())
            .prop_map(|(client, held_secs)| Kind::GiveBack(pb::GiveBack { client, held_secs })),
        proptest::option::of(conn).prop_map(|conn| Kind::Close(pb::Close { conn })),
    ];
    (
        any::<u64>(),
        any::<u64>(),
        proptest::option::weighted(0.95, kind),
    )
        .prop_map(|(origin, seq, kind)| pb::Event { origin, seq, kind })
}

fn encoded<M: Message>(m: impl Strategy<Value = M>) -> impl Strategy<Value = Vec<u8>> {
    m.prop_map(|m| m.encode_to_vec())
}

/// What the Limiter service does with a `Decide`, then the entry it makes.
fn decide(bytes: &[u8]) {
    let Ok(req) = pb::DecideRequest::decode(bytes) else {
        return;
    };
    let events = match convert::decide_events(req, 1) {
        Ok(events) => events,
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_short(status.message());
            return;
        }
    };
    let events: Vec<(RequestId, Event)> = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            (
                RequestId {
                    origin: 1,
                    seq: i as u64,
                },
                e,
            )
        })
        .collect();
    let mut state = scratch();
    let request = Request {
        stamp_ms: 1_000,
        command: Command::Decide {
            senders: vec![Sender {
                origin: 1,
                ttl_ms: 60_000,
            }],
            events,
        },
    };
    assert!(
        validate::request(&request).is_ok(),
        "a call that passed fits in an entry"
    );
    apply_checked(&mut state, &request);
}

#[test]
fn limiter_decide_requests_of_arbitrary_bytes() {
    let valid = encoded(
        prop::collection::vec(pb_event(), 0..6).prop_map(|events| pb::DecideRequest { events }),
    );
    fuzz(bytes_like(valid), |bytes| decide(&bytes));
}

/// Every Admin request, as the Admin service checks it, and then what it
/// asks of the state.
fn admin(which: u8, bytes: &[u8]) {
    let mut state = scratch();
    let refused = |s: tonic::Status| {
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert_short(s.message());
    };
    match which % 11 {
        0 => {
            let _ = pb::StatusRequest::decode(bytes);
            let _ = pb::MembersRequest::decode(bytes);
            let _ = pb::ShowPolicyRequest::decode(bytes);
            let _ = pb::GetPolicyRequest::decode(bytes);
            let _ = pb::RemoveNodeRequest::decode(bytes);
        }
        1 => {
            if let Ok(r) = pb::AddNodeRequest::decode(bytes) {
                if let Err(s) = convert::add_node_from_pb(&r) {
                    refused(s);
                }
            }
        }
        2 => {
            if let Ok(r) = pb::TopRequest::decode(bytes) {
                match convert::top_from_pb(&r) {
                    Ok((check, n)) => {
                        inspect::top(state.engine(), check, n, r.unusual, 1);
                    }
                    Err(s) => refused(s),
                }
            }
        }
        3 => {
            if let Ok(r) = pb::ShowRequest::decode(bytes) {
                match convert::key_from_pb(&r.key, "show") {
                    Ok(key) => {
                        inspect::show(state.engine(), &key, 1);
                    }
                    Err(s) => refused(s),
                }
            }
        }
        4 => {
            if let Ok(r) = pb::ResetRequest::decode(bytes) {
                match convert::reset_from_pb(&r) {
                    Ok((key, check)) => apply_checked(
                        &mut state,
                        &Request {
                            stamp_ms: 1_000,
                            command: Command::Reset {
                                key,
                                check,
                                requested_by: r.requested_by,
                            },
                        },
                    ),
                    Err(s) => refused(s),
                }
            }
        }
        _ => {
            if let Ok(r) = pb::ApplyPolicyRequest::decode(bytes) {
                match convert::policy_files_from_pb(r) {
                    Ok(files) => match Policy::parse(files.clone()) {
                        Ok(_) => apply_checked(
                            &mut state,
                            &Request {
                                stamp_ms: 1_000,
                                command: Command::SetPolicy { files },
                            },
                        ),
                        Err(e) => assert_short(&e.to_string()),
                    },
                    Err(s) => refused(s),
                }
            }
        }
    }
}

/// Admin requests of each kind, with the kind [`admin`] decodes them as.
fn admin_bytes() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let check = || -2i32..14;
    let files = prop::collection::vec((text(), policy_bytes()), 0..3).prop_map(|files| {
        pb::ApplyPolicyRequest {
            files: files
                .into_iter()
                .map(|(name, text)| pb::PolicyFile {
                    name,
                    text: String::from_utf8_lossy(&text).into_owned(),
                })
                .collect(),
        }
    });
    prop_oneof![
        encoded((any::<u64>(), text()).prop_map(|(id, addr)| pb::AddNodeRequest { id, addr }))
            .prop_map(|b| (1, b)),
        encoded(
            (check(), prop_oneof![0u32..20_000, any::<u32>()]).prop_map(|(check, limit)| {
                pb::TopRequest {
                    check,
                    limit,
                    unusual: false,
                }
            })
        )
        .prop_map(|b| (2, b)),
        encoded(text().prop_map(|key| pb::ShowRequest { key })).prop_map(|b| (3, b)),
        encoded(
            (text(), check(), text()).prop_map(|(key, check, requested_by)| pb::ResetRequest {
                key,
                check,
                requested_by
            })
        )
        .prop_map(|b| (4, b)),
        encoded(files).prop_map(|b| (5, b)),
    ]
}

#[test]
fn admin_requests_of_arbitrary_bytes() {
    let kinds =
        admin_bytes().prop_flat_map(|(which, valid)| (Just(which), bytes_like(Just(valid))));
    let any_kind = (any::<u8>(), prop::collection::vec(any::<u8>(), 0..512));
    fuzz(prop_oneof![4 => kinds, 1 => any_kind], |(which, bytes)| {
        admin(which, &bytes)
    });
}

// ---------------------------------------------------------------- Raft

fn client() -> impl Strategy<Value = relayrate::policy::Client> {
    let ip = proptest::option::of(prop_oneof![
        any::<[u8; 4]>().prop_map(std::net::IpAddr::from),
        any::<[u8; 16]>().prop_map(std::net::IpAddr::from),
    ]);
    (
        ip,
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
    )
        .prop_map(|(ip, host, sender, auth)| relayrate::policy::Client {
            ip,
            host,
            sender,
            auth,
        })
}

fn event() -> impl Strategy<Value = Event> {
    use relayrate::engine::ConnId;
    let conn = (0u64..4, any::<u64>()).prop_map(|(owner, conn)| ConnId { owner, conn });
    prop_oneof![
        (conn.clone(), client()).prop_map(|(conn, client)| Event::Connect { conn, client }),
        client().prop_map(|client| Event::Recheck { client }),
        (client(), any::<u32>()).prop_map(|(client, msgs_in_conn)| Event::Mail {
            client,
            msgs_in_conn
        }),
        (client(), any::<u32>()).prop_map(|(client, rcpts_in_msg)| Event::Rcpt {
            client,
            rcpts_in_msg
        }),
        (client(), any::<u64>())
            .prop_map(|(client, held_secs)| Event::GiveBack { client, held_secs }),
        conn.prop_map(|conn| Event::Close { conn }),
    ]
}

/// Commands with ids anywhere in u64, senders that may not match.
fn command() -> impl Strategy<Value = Command> {
    let seq = prop_oneof![0u64..1_000, any::<u64>(), Just(1 << 62), Just(u64::MAX)];
    let id = (0u64..4, seq).prop_map(|(origin, seq)| RequestId { origin, seq });
    let sender = (0u64..4, any::<u64>()).prop_map(|(origin, ttl_ms)| Sender { origin, ttl_ms });
    prop_oneof![
        (
            prop::collection::vec(sender, 0..3),
            prop::collection::vec((id, event()), 0..6)
        )
            .prop_map(|(senders, events)| Command::Decide { senders, events }),
        prop::collection::vec((text(), policy_bytes()), 0..3).prop_map(|files| {
            Command::SetPolicy {
                files: files
                    .into_iter()
                    .map(|(name, text)| PolicyFile {
                        name,
                        text: String::from_utf8_lossy(&text).into_owned(),
                    })
                    .collect(),
            }
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(origin, ttl_ms)| Command::Heartbeat { origin, ttl_ms }),
        (
            text(),
            proptest::option::of(Just(relayrate::check::Check::MsgRate)),
            text()
        )
            .prop_map(|(key, check, requested_by)| Command::Reset {
                key: inspect::parse_key(&key),
                check,
                requested_by
            }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop_oneof![0u64..2_000_000_000_000, any::<u64>()],
        command(),
    )
        .prop_map(|(stamp_ms, command)| Request { stamp_ms, command })
}

fn proposal() -> impl Strategy<Value = Proposal> {
    prop_oneof![
        command().prop_map(Proposal::Command),
        (any::<u64>(), text(), any::<bool>()).prop_map(|(id, addr, fresh)| Proposal::Join {
            id,
            addr,
            fresh
        }),
        any::<u64>().prop_map(|id| Proposal::Remove { id }),
        Just(Proposal::Policy),
        Just(Proposal::Members),
    ]
}

fn bincode_of<T: serde::Serialize>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<u8>> {
    s.prop_map(|v| bincode::serialize(&v).unwrap())
}

fn raft_payload(which: u8, bytes: &[u8]) {
    let mut state = scratch();
    match which % 8 {
        0 => {
            let Ok(p) = decode_bounded::<Proposal>(bytes) else {
                return;
            };
            match (validate_proposal(&p), p) {
                (Ok(()), Proposal::Command(command)) => apply_checked(
                    &mut state,
                    &Request {
                        stamp_ms: 1_000,
                        command,
                    },
                ),
                (Ok(()), _) => {}
                (Err(e), _) => assert_short(&e.0),
            }
        }
        1 => {
            let Ok(req) = decode_bounded::<AppendEntriesRequest<TypeConfig>>(bytes) else {
                return;
            };
            match validate::append_entries(&req) {
                Ok(()) => {
                    for e in &req.entries {
                        if let openraft::EntryPayload::Normal(r) = &e.payload {
                            apply_checked(&mut state, r);
                        }
                    }
                }
                Err(e) => assert_short(&e.0),
            }
        }
        2 => {
            let _ = decode_bounded::<VoteRequest<NodeId>>(bytes);
        }
        3 => {
            let Ok(req) = decode_bounded::<InstallSnapshotRequest<TypeConfig>>(bytes) else {
                return;
            };
            let _ = SnapshotChunks::default().receive(&req);
        }
        4 => {
            let Ok(e) = decode_bounded::<Entry>(bytes) else {
                return;
            };
            if let openraft::EntryPayload::Normal(r) = &e.payload {
                apply_checked(&mut state, r);
            }
        }
        5 => {
            let Ok(c) = decode_bounded::<Command>(bytes) else {
                return;
            };
            apply_checked(
                &mut state,
                &Request {
                    stamp_ms: 1_000,
                    command: c,
                },
            );
        }
        6 => {
            let Ok(r) = decode_bounded::<Request>(bytes) else {
                return;
            };
            apply_checked(&mut state, &r);
        }
        _ => {
            let _ = decode_bounded::<ProposalReply>(bytes);
            let Ok(snap) = decode_bounded::<LimiterSnapshot>(bytes) else {
                return;
            };
            if let Ok(mut restored) = LimiterState::from_snapshot(snap) {
                let r = Request {
                    stamp_ms: 1_000,
                    command: Command::Heartbeat {
                        origin: 1,
                        ttl_ms: 1,
                    },
                };
                restored.apply(&r);
            }
        }
    }
}

fn raft_bytes() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let entry = |index: u64, r: Request| Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: openraft::EntryPayload::Normal(r),
    };
    prop_oneof![
        bincode_of(proposal()).prop_map(|b| (0, b)),
        bincode_of(prop::collection::vec(request(), 0..3).prop_map(move |rs| {
            AppendEntriesRequest::<TypeConfig> {
                vote: openraft::Vote::new_committed(1, 1),
                prev_log_id: None,
                entries: rs
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| entry(i as u64 + 1, r))
                    .collect(),
                leader_commit: None,
            }
        }))
        .prop_map(|b| (1, b)),
        (
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..64),
            text()
        )
            .prop_map(|(offset, data, id)| {
                let req = InstallSnapshotRequest::<TypeConfig> {
                    vote: openraft::Vote::new_committed(1, 1),
                    meta: openraft::SnapshotMeta {
                        last_log_id: None,
                        last_membership: Default::default(),
                        snapshot_id: id,
                    },
                    offset,
                    data,
                    done: false,
                };
                (3, bincode::serialize(&req).unwrap())
            }),
        bincode_of(request().prop_map(move |r| entry(1, r))).prop_map(|b| (4, b)),
        bincode_of(command()).prop_map(|b| (5, b)),
        bincode_of(request()).prop_map(|b| (6, b)),
        bincode_of(Just(scratch().snapshot())).prop_map(|b| (7, b)),
    ]
}

#[test]
fn raft_payloads_of_arbitrary_bytes() {
    let mixed = raft_bytes().prop_flat_map(|(which, valid)| (Just(which), bytes_like(Just(valid))));
    let any_kind = (any::<u8>(), prop::collection::vec(any::<u8>(), 0..512));
    fuzz(prop_oneof![4 => mixed, 1 => any_kind], |(which, bytes)| {
        raft_payload(which, &bytes)
    });
}
