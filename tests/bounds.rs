//! Hostile input, sent the way it was when a node was attacked: request
//! ids that jump by 2^62, a 3 MB client address, a policy of 100,000
//! errors, a Latin-1 comment, a policy re-applied under another name. Each
//! must be answered promptly, with a short INVALID_ARGUMENT where it is
//! refused, and leave the node answering.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command as Process;
use std::time::Duration;

use common::{eventually_async, temp_root, NodeProc};
use relayrate::engine::{ConnId, Event};
use relayrate::node::{Forwarded, Proposal, ProposalReply};
use relayrate::policy::Client;
use relayrate::proto::v1::admin_client::AdminClient;
use relayrate::proto::v1::limiter_client::LimiterClient;
use relayrate::proto::v1::raft_client::RaftClient;
use relayrate::proto::v1::{self as pb};
use relayrate::raft::network;
use relayrate::raft::peer_auth::PeerAuth;
use relayrate::raft::{Command, RequestId, Sender};
use tonic::transport::Channel;
use tonic::Code;

const POLICY: &str = "CHECK_CONN_RATE YES\nConnRate:default 1000\n";
/// How long an answer may take: a node that loops on its input misses it.
const PROMPT: Duration = Duration::from_secs(10);
const START: Duration = Duration::from_secs(60);

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(PROMPT)
        .connect_lazy()
}

/// Starts a one-node cluster and waits until its policy is in force.
async fn node(root: &Path) -> NodeProc {
    let node = NodeProc::start(root, 1, Some(POLICY), None);
    wait_ready(&node).await;
    node
}

async fn wait_ready(node: &NodeProc) {
    let ch = channel(node.addr).await;
    eventually_async("the node to be ready", START, || {
        let mut admin = AdminClient::new(ch.clone());
        async move {
            admin
                .status(pb::StatusRequest {})
                .await
                .is_ok_and(|s| s.get_ref().ready)
        }
    })
    .await;
}

/// Status answers within [`PROMPT`].
async fn assert_answers(node: &NodeProc, what: &str) {
    let mut admin = AdminClient::new(channel(node.addr).await);
    let status = tokio::time::timeout(PROMPT, admin.status(pb::StatusRequest {})).await;
    assert!(
        matches!(&status, Ok(Ok(_))),
        "{what}: Status does not answer: {status:?}\n{}",
        node.log()
    );
}

/// One Connect through the Limiter service, answered within [`PROMPT`].
async fn assert_decides(node: &NodeProc, what: &str) {
    let mut limiter = LimiterClient::new(channel(node.addr).await);
    let event = relayrate::convert::event_to_pb(&Event::Connect {
        conn: ConnId { owner: 0, conn: 1 },
        client: Client::from_ip("192.0.2.1".parse().unwrap()),
    });
    let request = pb::DecideRequest {
        events: vec![event],
    };
    let reply = tokio::time::timeout(PROMPT, limiter.decide(request)).await;
    assert!(
        matches!(&reply, Ok(Ok(r)) if r.get_ref().verdicts.len() == 1),
        "{what}: Decide does not answer: {reply:?}\n{}",
        node.log()
    );
}

/// A forwarded batch of one Connect, with the request id `seq` of node
/// incarnation `origin`, as a follower sends it to the leader.
fn forwarded_connect(origin: u64, seq: u64) -> Proposal {
    let event = Event::Connect {
        conn: ConnId {
            owner: origin,
            conn: seq,
        },
        client: Client::from_ip("192.0.2.9".parse().unwrap()),
    };
    Proposal::Command(Command::Decide {
        senders: vec![Sender {
            origin,
            ttl_ms: 60_000,
        }],
        events: vec![(RequestId { origin, seq }, event)],
    })
}

/// Node 1 as its peers reach it: signed with the cluster secret, as a
/// member (node 1 itself) would, so that what is tested is the bounds,
/// not the authentication (`tests/peers.rs`).
fn as_member() -> PeerAuth {
    PeerAuth::new(1, Some(common::test_secret()), false)
}

/// A signed call of `method` to the node's peer listener.
fn signed(method: &str, payload: pb::RaftPayload) -> tonic::Request<pb::RaftPayload> {
    let mut request = network::signed_request(&as_member(), method, payload);
    request.set_timeout(PROMPT);
    request
}

async fn propose(peer: SocketAddr, proposal: &Proposal) -> Result<ProposalReply, tonic::Status> {
    let mut raft = RaftClient::new(channel(peer).await);
    let forwarded = Forwarded {
        proposal: proposal.clone(),
        admin_token: None,
    };
    let reply = raft
        .propose(signed("propose", network::encode(&forwarded)))
        .await?;
    network::decode(reply.get_ref())
}

#[tokio::test]
async fn request_ids_that_jump_by_2_62_are_applied_at_once_and_replayed_at_once() {
    let root = temp_root();
    let node = node(root.path()).await;
    let origin = 0xbad;
    for seq in [0, 1 << 62] {
        let reply =
            tokio::time::timeout(PROMPT, propose(node.peer, &forwarded_connect(origin, seq)))
                .await
                .unwrap_or_else(|_| {
                    panic!("seq {seq}: no answer within {PROMPT:?}\n{}", node.log())
                });
        assert!(
            matches!(&reply, Ok(ProposalReply::Response(_))),
            "seq {seq}: {reply:?}"
        );
    }
    assert_answers(&node, "after the jump").await;
    assert_decides(&node, "after the jump").await;

    // The milter's own ids are the node's: ids in the request are ignored.
    let mut limiter = LimiterClient::new(channel(node.addr).await);
    let mut events: Vec<pb::Event> = (0..2)
        .map(|i| {
            relayrate::convert::event_to_pb(&Event::Connect {
                conn: ConnId { owner: 0, conn: i },
                client: Client::from_ip("192.0.2.2".parse().unwrap()),
            })
        })
        .collect();
    events[1].seq = 1 << 62;
    events[1].origin = origin;
    let reply = tokio::time::timeout(PROMPT, limiter.decide(pb::DecideRequest { events })).await;
    assert!(matches!(&reply, Ok(Ok(_))), "{reply:?}");

    // After a restart the node replays the entries, and answers.
    let dir = node.dir.clone();
    drop(node);
    let node = NodeProc::start(root.path(), 1, None, None);
    assert_eq!(node.dir, dir);
    wait_ready(&node).await;
    assert_answers(&node, "after a restart").await;
    assert_decides(&node, "after a restart").await;
}

/// The entry as the log holds it, applied by the state machine every
/// node runs (and runs again on restart).
#[tokio::test]
async fn a_raw_entry_with_request_ids_2_62_apart_is_applied_at_once() {
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};
    use relayrate::raft::state_machine::StateMachine;
    use relayrate::raft::{Entry, Request};

    let dir = tempfile::TempDir::new().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let mut sm = StateMachine::open(&db).unwrap();
    let shared = sm.shared();
    let entry = |index: u64, seq: u64| {
        let Proposal::Command(command) = forwarded_connect(7, seq) else {
            unreachable!()
        };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request {
                stamp_ms: 1_000,
                command,
            }),
        }
    };
    // On a thread of its own, left behind if it never returns: applying
    // holds the state lock and does not yield.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let applied = block_on(sm.apply([entry(1, 0), entry(2, 1 << 62)]));
        let _ = tx.send(applied);
    });
    let applied = tokio::time::timeout(PROMPT, rx)
        .await
        .expect("applied within the deadline")
        .unwrap()
        .unwrap();
    assert_eq!(applied.len(), 2);
    // The state is free for readers again.
    let state = shared.try_read().expect("the state lock is free");
    assert_eq!(state.leases().count(), 2);
}

/// Runs a future to completion on this thread.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[tokio::test]
async fn a_decide_with_a_3_mb_address_is_refused_with_a_short_message() {
    let root = temp_root();
    let node = node(root.path()).await;
    let mut limiter = LimiterClient::new(channel(node.addr).await);
    let huge = "9".repeat(3 << 20);
    type Set = fn(&mut pb::Client, String);
    let fields: [(&str, Set); 4] = [
        ("ip", |c, v| c.ip = v),
        ("host", |c, v| c.host = v),
        ("sender", |c, v| c.sender = v),
        ("auth", |c, v| c.auth = v),
    ];
    for (field, set) in fields {
        let mut client = pb::Client {
            ip: "192.0.2.3".into(),
            ..Default::default()
        };
        set(&mut client, huge.clone());
        let event = pb::Event {
            kind: Some(pb::event::Kind::GiveBack(pb::GiveBack {
                client: Some(client),
                held_secs: 0,
            })),
            ..Default::default()
        };
        let reply = tokio::time::timeout(
            PROMPT,
            limiter.decide(pb::DecideRequest {
                events: vec![event],
            }),
        )
        .await
        .expect("an answer");
        let status = reply.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().len() < 1024,
            "{field}: {} bytes of message",
            status.message().len()
        );
        assert!(
            status.message().contains(field) && status.message().contains("3145728"),
            "{field}: {}",
            status.message()
        );
    }
    // Too many events in one call.
    let event = relayrate::convert::event_to_pb(&Event::GiveBack {
        client: Client::from_ip("192.0.2.4".parse().unwrap()),
        held_secs: 0,
    });
    let events = vec![event; 100_000];
    let status = limiter
        .decide(pb::DecideRequest { events })
        .await
        .expect_err("100,000 events");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_answers(&node, "after the refusals").await;
}

#[tokio::test]
async fn a_policy_of_100000_errors_is_refused_with_its_first_errors_and_a_count() {
    let root = temp_root();
    let node = node(root.path()).await;
    let mut admin = AdminClient::new(channel(node.addr).await);
    let text = "ConnRat:x 1\n".repeat(100_000);
    let files = vec![pb::PolicyFile {
        name: "big.txt".into(),
        text,
    }];
    let status = admin
        .apply_policy(pb::ApplyPolicyRequest { files })
        .await
        .expect_err("a policy of errors");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let message = status.message();
    assert!(message.len() < 64 * 1024, "{} bytes", message.len());
    assert!(
        message.starts_with("big.txt:1:1: unknown check"),
        "{message}"
    );
    assert!(message.contains("big.txt:50:1: "), "{message}");
    assert!(message.ends_with("... and 99950 more errors"), "{message}");

    // Under a 1 KB file name, fewer lines fit: the first always does.
    let name = format!("{}.txt", "n".repeat(1000));
    let files = vec![pb::PolicyFile {
        name: name.clone(),
        text: "ConnRate:x é\n".repeat(100),
    }];
    let status = admin
        .apply_policy(pb::ApplyPolicyRequest { files })
        .await
        .expect_err("a policy of errors");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let message = status.message();
    assert!(message.len() <= 16 * 1024, "{} bytes", message.len());
    assert!(message.starts_with(&format!("{name}:1:12: ")), "{message}");
    assert!(message.contains(" more errors"), "{message}");
    assert_answers(&node, "after the refusal").await;
}

#[tokio::test]
async fn the_same_policy_under_another_name_is_a_change() {
    let root = temp_root();
    let node = node(root.path()).await;
    let mut admin = AdminClient::new(channel(node.addr).await);
    let apply = |name: &str| pb::ApplyPolicyRequest {
        files: vec![pb::PolicyFile {
            name: name.into(),
            text: POLICY.into(),
        }],
    };
    let first = admin.apply_policy(apply("one.txt")).await.unwrap();
    let again = admin.apply_policy(apply("one.txt")).await.unwrap();
    assert!(!again.get_ref().changed, "the same name and text");
    let renamed = admin.apply_policy(apply("two.txt")).await.unwrap();
    assert!(renamed.get_ref().changed, "a new name");
    assert_ne!(renamed.get_ref().hash, first.get_ref().hash);
    let shown = admin
        .show_policy(pb::ShowPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.files[0].name, "two.txt");
    assert_eq!(shown.hash, renamed.get_ref().hash);
}

/// `relayrate policy check` on files written as bytes.
fn policy_check(files: &[(&str, &[u8])]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    Process::new(env!("CARGO_BIN_EXE_relayrate"))
        .current_dir(dir.path())
        .arg("policy")
        .arg("check")
        .args(files.iter().map(|(n, _)| n))
        .output()
        .unwrap()
}

#[test]
fn a_latin_1_comment_is_read_and_a_latin_1_key_is_placed() {
    // "# Règles du relais" and "# café" in Latin-1, as old ze-filter files are.
    let good: &[u8] =
        b"# R\xe8gles du relais\n  # caf\xe9\nCHECK_CONN_RATE YES\nConnRate:default 5\n";
    let o = policy_check(&[("old.txt", good)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("old.txt: valid; 1 entries"), "{out}");

    // Outside a comment a byte that is not UTF-8 is an error at its place.
    let bad: &[u8] = b"# ok\nConnRate:default 5\nConnRate:caf\xe9.example 3\n";
    let o = policy_check(&[("old.txt", good), ("bad.txt", bad)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.starts_with("bad.txt:3:13: invalid UTF-8"),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn assert_refused<T: std::fmt::Debug>(what: &str, reply: Result<T, tonic::Status>) {
    let status = reply.expect_err(what);
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert!(
        status.message().len() < 1024,
        "{what}: {} bytes of message",
        status.message().len()
    );
}

#[tokio::test]
async fn admin_requests_out_of_bounds_are_refused_with_a_short_message() {
    let root = temp_root();
    let node = node(root.path()).await;
    let mut admin = AdminClient::new(channel(node.addr).await);
    let huge = "k".repeat(3 << 20);
    let reset = pb::ResetRequest {
        key: huge.clone(),
        ..Default::default()
    };
    assert_refused("reset of a 3 MB key", admin.reset(reset).await);
    let reset = pb::ResetRequest {
        key: "192.0.2.1".into(),
        requested_by: huge.clone(),
        ..Default::default()
    };
    assert_refused("reset by a 3 MB name", admin.reset(reset).await);
    let show = pb::ShowRequest { key: huge.clone() };
    assert_refused("show of a 3 MB key", admin.show(show).await);
    let top = pb::TopRequest {
        limit: u32::MAX,
        ..Default::default()
    };
    assert_refused("top of 4 billion keys", admin.top(top).await);
    let add = pb::AddNodeRequest { id: 2, addr: huge };
    assert_refused("a node at a 3 MB address", admin.add_node(add).await);
    let files = (0..300)
        .map(|i| pb::PolicyFile {
            name: format!("f{i}"),
            text: String::new(),
        })
        .collect();
    let apply = pb::ApplyPolicyRequest { files };
    assert_refused("a policy of 300 files", admin.apply_policy(apply).await);
    assert_answers(&node, "after the refusals").await;
}

/// What a peer sends, forged: a batch whose events are not its own, a
/// read that writes, a 3 MB address, an entry of a 3 MB sender, a length
/// prefix of 2^60, and a snapshot chunk 16 TiB past the first.
#[tokio::test]
async fn peer_payloads_out_of_bounds_are_refused() {
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest};
    use openraft::{CommittedLeaderId, EntryPayload, LogId, SnapshotMeta, Vote};
    use relayrate::raft::{Entry, Request, TypeConfig};

    let root = temp_root();
    let node = node(root.path()).await;
    let connect = |origin: u64, sender: &str| Event::Connect {
        conn: ConnId {
            owner: origin,
            conn: 1,
        },
        client: Client::from_ip("192.0.2.5".parse().unwrap()).with_sender(sender),
    };
    let not_its_own = Proposal::Command(Command::Decide {
        senders: vec![Sender {
            origin: 1,
            ttl_ms: 1_000,
        }],
        events: vec![(RequestId { origin: 2, seq: 1 }, connect(2, "a@b"))],
    });
    assert_refused(
        "events of another node",
        propose(node.peer, &not_its_own).await,
    );
    let join = Proposal::Join {
        id: 9,
        addr: "a".repeat(3 << 20),
        fresh: true,
    };
    assert_refused(
        "a join from a 3 MB address",
        propose(node.peer, &join).await,
    );

    let mut raft = RaftClient::new(channel(node.peer).await)
        .max_encoding_message_size(network::MAX_MESSAGE_BYTES);
    let Proposal::Command(command) = forwarded_connect(3, 1) else {
        unreachable!()
    };
    let mut command = command;
    if let Command::Decide { events, .. } = &mut command {
        events[0].1 = connect(3, &"s".repeat(3 << 20));
    }
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        entries: vec![Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1_000),
            payload: EntryPayload::Normal(Request {
                stamp_ms: 1_000,
                command,
            }),
        }],
        leader_commit: None,
    };
    assert_refused(
        "an entry of a 3 MB sender",
        raft.append_entries(signed("append_entries", network::encode(&append)))
            .await,
    );
    // A Join (variant 2) from node 9 whose address claims 2^60 bytes.
    let mut forged = 2u32.to_le_bytes().to_vec();
    forged.extend(9u64.to_le_bytes());
    forged.extend((1u64 << 60).to_le_bytes());
    let payload = pb::RaftPayload { data: forged };
    assert_refused(
        "a length of 2^60",
        raft.propose(signed("propose", payload)).await,
    );

    // A snapshot's first chunk, then one 16 TiB further, from a leader
    // that is not a member: refused before its bytes are looked at (the
    // chunks' own bounds are unit-tested in src/raft/validate.rs).
    let status = AdminClient::new(channel(node.addr).await)
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let chunk = |offset: u64| InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(status.term + 1, 99),
        meta: SnapshotMeta {
            last_log_id: None,
            last_membership: Default::default(),
            snapshot_id: "forged".into(),
        },
        offset,
        data: vec![1],
        done: false,
    };
    for offset in [0, 1 << 44] {
        let reply = tokio::time::timeout(
            PROMPT,
            raft.install_snapshot(signed("install_snapshot", network::encode(&chunk(offset)))),
        )
        .await;
        assert!(
            matches!(&reply, Ok(Err(s)) if s.code() == Code::PermissionDenied),
            "chunk at {offset}: {reply:?}\n{}",
            node.log()
        );
    }
    assert_answers(&node, "after the forged payloads").await;
}
