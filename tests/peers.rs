//! Nobody but the cluster can change the cluster: each test makes one of
//! the attacks that worked on the Raft service before peers had to prove
//! membership, against real nodes over real gRPC.
//!
//! Before: a raw `Propose` of an empty policy put it in force on a
//! token-protected node; a made-up "node 66" got an AppendEntries applied
//! and pushed the term up with votes; a `Membership { member: false }`
//! notice from anyone marked a node removed for good; a node without the
//! admin token joined a token-protected cluster.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{eventually, fast_raft, peer_call, peer_propose, test_secret};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};
use relayrate::check::Check;
use relayrate::engine::CounterKey;
use relayrate::node::{self, NodeConfig, NodeHandle, Proposal, ProposalReply, Start};
use relayrate::policy::PolicyFile;
use relayrate::proto::v1::raft_client::RaftClient;
use relayrate::raft::peer_auth::{ClusterSecret, PeerAuth};
use relayrate::raft::{network, Command, Entry, Request, TypeConfig};
use tempfile::TempDir;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(30);
const POLICY: &str = "CHECK_CONN_RATE YES\nConnRate:default 5\n";
const TOKEN: &str = "admin-token-of-the-tests";

fn config(id: u64, dir: &TempDir, start: Start) -> NodeConfig {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = NodeConfig::new(id, listen, dir.path().to_path_buf(), start);
    config.raft = fast_raft();
    config.cluster_secret = Some(test_secret());
    config.admin_token = Some(TOKEN.into());
    config
}

/// One node, token-protected, with [`POLICY`] in force.
async fn one_node(dir: &TempDir) -> NodeHandle {
    let mut c = config(1, dir, Start::Bootstrap);
    c.policy = vec![PolicyFile {
        name: "policy".into(),
        text: POLICY.into(),
    }];
    let h = node::start(c).await.expect("node starts");
    let n = h.node.clone();
    eventually("leader and ready", DEADLINE, || {
        n.is_leader() && n.is_ready()
    })
    .await;
    h
}

fn policy_text(h: &NodeHandle) -> String {
    let state = h.node.state().read().unwrap();
    state.policy().files()[0].text.clone()
}

fn term(h: &NodeHandle) -> u64 {
    h.node.raft.metrics().borrow().current_term
}

/// A call refused for who made it: no valid proof, or not a member.
#[track_caller]
fn assert_refused_caller<T: std::fmt::Debug>(who: &str, reply: Result<T, tonic::Status>) {
    let refused = reply.expect_err(who);
    assert!(
        matches!(
            refused.code(),
            Code::Unauthenticated | Code::PermissionDenied
        ),
        "{who}: {refused:?}"
    );
}

/// A secret holder that is not a member, and an outsider without it.
fn intruders() -> [(&'static str, PeerAuth); 2] {
    let other = ClusterSecret::new(b"not-the-cluster-secret-at-all", "x").unwrap();
    [
        (
            "node 66 (secret, not a member)",
            PeerAuth::new(66, Some(test_secret()), false),
        ),
        (
            "an outsider (wrong secret)",
            PeerAuth::new(1, Some(other), false),
        ),
    ]
}

#[tokio::test]
async fn a_raw_propose_cannot_replace_the_policy_or_reset_counts() {
    let dir = TempDir::new().unwrap();
    let h = one_node(&dir).await;
    let peer = h.peer_addr.to_string();
    let empty = Proposal::Command(Command::SetPolicy { files: vec![] });
    let reset = Proposal::Command(Command::Reset {
        key: CounterKey::Ip("192.0.2.1".parse().unwrap()),
        check: Some(Check::ConnRate),
        requested_by: "attacker".into(),
    });

    // The 52-byte Propose as it was sent: unsigned, bare proposal.
    let raw = network::encode(&empty);
    let channel = network::channel(&peer, None).unwrap();
    let refused = RaftClient::new(channel.clone())
        .propose(raw.clone())
        .await
        .expect_err("an unsigned Propose is refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // Garbage without a proof is refused on its headers: nothing of it is
    // decoded (before, it reached the decoder: "bad payload: ...").
    let garbage = relayrate::proto::v1::RaftPayload {
        data: vec![0xff; 4096],
    };
    let refused = RaftClient::new(channel.clone())
        .vote(garbage)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(!refused.message().contains("payload"), "{refused:?}");
    // The client port does not serve the Raft service at all.
    let client_port = network::channel(&h.addr.to_string(), None).unwrap();
    let refused = RaftClient::new(client_port).propose(raw).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");

    for (who, auth) in intruders() {
        for p in [empty.clone(), reset.clone()] {
            assert_refused_caller(who, peer_propose(&peer, None, &auth, p).await);
        }
    }

    // Even a member's signature does not stand in for the admin token.
    let member = PeerAuth::new(1, Some(test_secret()), false);
    for p in [empty, reset] {
        let reply = peer_propose(&peer, None, &member, p).await.unwrap();
        assert!(
            matches!(&reply, ProposalReply::Refused(why) if why.contains("admin token")),
            "{reply:?}"
        );
    }
    assert_eq!(policy_text(&h), POLICY);
    h.shutdown().await;
}

/// An AppendEntries from a made-up leader "node 66", one entry at term+10
/// carrying an empty policy, and a burst of its vote requests.
#[tokio::test]
async fn a_made_up_leader_neither_appends_nor_moves_the_term() {
    let dir = TempDir::new().unwrap();
    let h = one_node(&dir).await;
    let peer = h.peer_addr.to_string();
    let before = term(&h);
    let last = h.node.raft.metrics().borrow().last_log_index.unwrap();
    let prev = h.node.raft.metrics().borrow().last_applied;
    let forged_term = before + 10;
    let log_id = LogId::new(CommittedLeaderId::new(forged_term, 66), last + 1);
    let entry = Entry {
        log_id,
        payload: EntryPayload::Normal(Request {
            stamp_ms: node::now_ms(),
            command: Command::SetPolicy { files: vec![] },
        }),
    };
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(forged_term, 66),
        prev_log_id: prev,
        entries: vec![entry],
        leader_commit: Some(log_id),
    };
    let vote = |t: u64| VoteRequest::new(Vote::new(t, 66), prev);

    for (who, auth) in intruders() {
        assert_refused_caller(
            who,
            peer_call(
                &peer,
                None,
                &auth,
                "append_entries",
                network::encode(&append),
            )
            .await,
        );
        for i in 0..51 {
            let r = peer_call(
                &peer,
                None,
                &auth,
                "vote",
                network::encode(&vote(before + 1 + i)),
            )
            .await;
            assert!(r.is_err(), "{who}: vote {i} answered");
        }
    }
    // A member may not speak for another: node 1's signature on a message
    // of node 66 is refused too.
    let as_1 = PeerAuth::new(1, Some(test_secret()), false);
    let refused = peer_call(
        &peer,
        None,
        &as_1,
        "append_entries",
        network::encode(&append),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    assert_eq!(term(&h), before, "the term moved");
    assert!(h.node.is_leader());
    assert_eq!(policy_text(&h), POLICY);
    h.shutdown().await;
}

/// The "you are removed" notice from anyone but the leader is refused,
/// and the node keeps deciding.
#[tokio::test]
async fn only_the_leader_can_tell_a_node_it_was_removed() {
    let dir = TempDir::new().unwrap();
    let h = one_node(&dir).await;
    let peer = h.peer_addr.to_string();
    let notice = Proposal::Membership {
        id: 1,
        member: false,
    };
    for (who, auth) in intruders() {
        assert_refused_caller(who, peer_propose(&peer, None, &auth, notice.clone()).await);
    }
    // Signed as a member, but node 1 is not its own leader's sender: a
    // node never sends the notice to itself over the network.
    let as_2 = PeerAuth::new(2, Some(test_secret()), false);
    let refused = peer_propose(&peer, None, &as_2, notice).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(!h.node.is_removed());
    assert!(h.node.is_ready());
    h.shutdown().await;
}

/// A second node joins a token-protected cluster only with the token.
#[tokio::test]
async fn joining_needs_the_admin_token() {
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().unwrap()).collect();
    let first = one_node(&dirs[0]).await;
    let seed = first.peer_addr.to_string();

    let mut tokenless = config(2, &dirs[1], Start::Join(seed.clone()));
    tokenless.admin_token = None;
    let second = node::start(tokenless).await.expect("node starts");
    // It asks, and asks again, and is refused: the leader never adds it,
    // not even as a learner.
    let leader = first.node.raft.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let m = leader.metrics().borrow().clone();
        assert_eq!(
            m.membership_config.membership().nodes().count(),
            1,
            "a node without the token was added"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.shutdown().await;

    let third = node::start(config(3, &dirs[2], Start::Join(seed)))
        .await
        .expect("node starts");
    eventually("node 3 a voter", DEADLINE, || {
        let m = leader.metrics().borrow().clone();
        m.membership_config.membership().voter_ids().any(|v| v == 3)
    })
    .await;
    third.shutdown().await;
    first.shutdown().await;
}

/// A node with neither a secret nor TLS serves alone, accepts no peer,
/// and refuses to start a join it could not prove.
#[tokio::test]
async fn without_a_secret_or_tls_no_peer_is_accepted() {
    let dirs: Vec<TempDir> = (0..2).map(|_| TempDir::new().unwrap()).collect();
    let mut c = config(1, &dirs[0], Start::Bootstrap);
    c.cluster_secret = None;
    let h = node::start(c).await.expect("a lone node starts");
    let member = PeerAuth::new(1, Some(test_secret()), false);
    let refused = peer_propose(&h.peer_addr.to_string(), None, &member, Proposal::Members)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    h.shutdown().await;

    let mut joiner = config(2, &dirs[1], Start::Join("127.0.0.1:1".into()));
    joiner.cluster_secret = None;
    let err = node::start(joiner).await.err().expect("refused");
    assert!(err.to_string().contains("--cluster-secret-file"), "{err}");
}

/// A signed admin write captured on the wire and sent again within the
/// clock window is refused the second time; so is a removal notice meant
/// for another node.
#[tokio::test]
async fn a_replayed_admin_write_or_a_notice_for_another_node_is_refused() {
    let dir = TempDir::new().unwrap();
    let h = one_node(&dir).await;
    let peer = h.peer_addr.to_string();
    let reset = relayrate::node::Forwarded {
        proposal: Proposal::Command(Command::Reset {
            key: CounterKey::Ip("192.0.2.1".parse().unwrap()),
            check: Some(Check::ConnRate),
            requested_by: "operator".into(),
        }),
        admin_token: Some(TOKEN.into()),
    };
    let as_member = PeerAuth::new(1, Some(test_secret()), false);
    let captured = network::encode(&reset);
    let mut client = RaftClient::new(network::channel(&peer, None).unwrap());
    let stamp = node::now_ms();
    let send = |c: &mut RaftClient<tonic::transport::Channel>| {
        let mut request = tonic::Request::new(captured.clone());
        as_member.sign("propose", &mut request, stamp);
        let mut c = c.clone();
        async move { c.propose(request).await }
    };
    let first = send(&mut client).await.expect("the first is taken");
    let first: ProposalReply = network::decode(first.get_ref()).unwrap();
    assert!(matches!(first, ProposalReply::Response(_)), "{first:?}");
    let again = send(&mut client).await.expect_err("the replay is refused");
    assert_eq!(again.code(), Code::PermissionDenied, "{again:?}");

    let for_node_2 = Proposal::Membership {
        id: 2,
        member: false,
    };
    let reply = peer_propose(&peer, None, &as_member, for_node_2)
        .await
        .unwrap();
    assert!(matches!(reply, ProposalReply::Refused(_)), "{reply:?}");
    assert!(!h.node.is_removed());
    h.shutdown().await;
}
