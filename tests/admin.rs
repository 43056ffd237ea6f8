//! The operator's side of a node, in process: the health service and
//! reflection, the admin token on writes, and mutual TLS on the gRPC port
//! (Raft, Limiter and Admin alike). `relayratectl` as a process is tested
//! in `tests/ctl.rs`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, eventually_async, fast_raft};
use relayrate::node::{self, NodeConfig, NodeHandle, Proposal, ProposalReply, Start};
use relayrate::policy::PolicyFile;
use relayrate::proto::v1::admin_client::AdminClient;
use relayrate::proto::v1::{self as pb, ResetRequest, StatusRequest};
use relayrate::raft::network;
use relayrate::raft::peer_auth::PeerAuth;
use relayrate::raft::Command;
use relayrate::tls::{endpoint, Tls};
use tempfile::TempDir;
use tonic::transport::Channel;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(30);
const POLICY: &str = "CHECK_CONN_RATE YES\nConnRate:default 5\n";

/// `n` nodes on loopback, node 1 bootstrapping with [`POLICY`], the others
/// joining it; `tune` adjusts each config.
async fn cluster(n: u64, dirs: &[TempDir], tune: impl Fn(&mut NodeConfig)) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for id in 1..=n {
        let start = match nodes.first() {
            None => Start::Bootstrap,
            Some(first) => Start::Join(first.peer_addr.to_string()),
        };
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let dir = dirs[id as usize - 1].path().to_path_buf();
        let mut config = NodeConfig::new(id, listen, dir, start);
        config.raft = fast_raft();
        config.cluster_secret = Some(common::test_secret());
        if id == 1 {
            config.policy = vec![PolicyFile {
                name: "policy".into(),
                text: POLICY.into(),
            }];
        }
        tune(&mut config);
        nodes.push(node::start(config).await.expect("node starts"));
    }
    for h in &nodes {
        let raft = h.node.raft.clone();
        eventually("every voter and a leader", DEADLINE, || {
            let m = raft.metrics().borrow().clone();
            m.current_leader.is_some()
                && m.membership_config.membership().voter_ids().count() == n as usize
        })
        .await;
    }
    nodes
}

fn temp_dirs(n: usize) -> Vec<TempDir> {
    (0..n).map(|_| TempDir::new().unwrap()).collect()
}

async fn admin(addr: SocketAddr, tls: Option<&Tls>) -> Result<AdminClient<Channel>, String> {
    let channel = endpoint(&addr.to_string(), tls)
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(AdminClient::new(channel))
}

#[tokio::test]
async fn health_serves_once_ready_and_reflection_lists_the_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dirs = temp_dirs(1);
    let nodes = cluster(1, &dirs, |_| {}).await;
    let channel = network::channel(&nodes[0].addr.to_string(), None).unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = |service: &str| {
        let mut health = health.clone();
        let request = HealthCheckRequest {
            service: service.into(),
        };
        async move {
            health
                .check(request)
                .await
                .map(|r| r.into_inner().status)
                .ok()
        }
    };
    assert_eq!(
        status("liveness").await,
        Some(ServingStatus::Serving as i32)
    );
    eventually_async("the node serving", DEADLINE, || async {
        status("").await == Some(ServingStatus::Serving as i32)
    })
    .await;
    assert_eq!(
        status("relayrate.v1.Limiter").await,
        Some(ServingStatus::Serving as i32)
    );
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a service list: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in [
        "relayrate.v1.Admin",
        "relayrate.v1.Limiter",
        "relayrate.v1.Raft",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }
}

#[tokio::test]
async fn writes_need_the_admin_token_when_one_is_set() {
    let dirs = temp_dirs(1);
    let nodes = cluster(1, &dirs, |c| c.admin_token = Some("s3cret".into())).await;
    let mut client = admin(nodes[0].addr, None).await.unwrap();
    let reset = |token: Option<&str>| {
        let mut request = tonic::Request::new(ResetRequest {
            key: "10.0.0.1".into(),
            check: 0,
            requested_by: "test".into(),
        });
        if let Some(t) = token {
            let value = format!("Bearer {t}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        request
    };
    let refused = client.reset(reset(None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let wrong = client.reset(reset(Some("guess"))).await.unwrap_err();
    assert_eq!(wrong.code(), Code::PermissionDenied, "{wrong:?}");
    let apply = client
        .apply_policy(pb::ApplyPolicyRequest {
            files: vec![pb::PolicyFile {
                name: "p".into(),
                text: POLICY.into(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(apply.code(), Code::Unauthenticated);
    client
        .reset(reset(Some("s3cret")))
        .await
        .expect("the right token");
    // Reads need no token.
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.role, "leader");
}

/// PEM files under `dir`: a CA, a certificate it signs for localhost and
/// 127.0.0.1 (the nodes', usable by servers and clients), and another it
/// signs for `milter.example` (a milter host's).
struct Certs {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    milter_cert: PathBuf,
    milter_key: PathBuf,
}

fn make_ca(dir: &Path, name: &str) -> Certs {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let path = |what: &str| dir.join(format!("{name}-{what}.pem"));
    let sign = |names: Vec<String>, what: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(path(&format!("{what}-cert")), cert.pem()).unwrap();
        std::fs::write(path(&format!("{what}-key")), key.serialize_pem()).unwrap();
    };
    sign(vec!["localhost".into(), "127.0.0.1".into()], "node");
    sign(vec!["milter.example".into()], "milter");
    std::fs::write(path("ca"), ca_cert.pem()).unwrap();
    Certs {
        cert: path("node-cert"),
        key: path("node-key"),
        ca: path("ca"),
        milter_cert: path("milter-cert"),
        milter_key: path("milter-key"),
    }
}

#[tokio::test]
async fn tls_admits_only_certificates_of_the_cluster_ca() {
    let certs = TempDir::new().unwrap();
    let Certs { cert, key, ca, .. } = make_ca(certs.path(), "cluster");
    let other = make_ca(certs.path(), "other");
    let tls = Tls::from_options(Some(cert.clone()), Some(key.clone()), Some(ca.clone()))
        .unwrap()
        .unwrap();

    // Three nodes that elect, join and replicate over mutual TLS, known
    // to each other by their certificates alone (no cluster secret).
    let dirs = temp_dirs(3);
    let nodes = cluster(3, &dirs, |c| {
        c.tls = Some(tls.clone());
        c.cluster_secret = None;
    })
    .await;
    let addr = nodes[2].addr;
    let leader = nodes.iter().find(|h| h.node.is_leader()).unwrap();
    let peer = leader.peer_addr.to_string();
    let as_node_1 = PeerAuth::new(1, None, true);

    // The right certificate: the admin and Raft services answer.
    let mut good = admin(addr, Some(&tls))
        .await
        .expect("connects with the cluster's certificate");
    let status = good.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.members.len(), 3);
    let reply = common::peer_propose(&peer, Some(&tls), &as_node_1, Proposal::Members)
        .await
        .expect("the peer port answers a member with the cluster's certificate");
    assert!(
        matches!(&reply, ProposalReply::Members(m) if m.len() == 3),
        "{reply:?}"
    );

    // No TLS at all, TLS without a client certificate, and a certificate
    // of another CA: each is refused, on the client and the peer port.
    let no_identity = Tls::client(&ca, None).unwrap();
    let other_ca = Tls::client(&ca, Some((other.cert.as_path(), other.key.as_path()))).unwrap();
    for (what, client_tls) in [
        ("plain text", None),
        ("no client certificate", Some(&no_identity)),
        ("a certificate of another CA", Some(&other_ca)),
    ] {
        let admin_refused = match admin(addr, client_tls).await {
            Err(_) => true,
            Ok(mut c) => c.status(StatusRequest {}).await.is_err(),
        };
        assert!(admin_refused, "admin with {what} must be refused");
        let raft = common::peer_propose(&peer, client_tls, &as_node_1, Proposal::Members).await;
        assert!(raft.is_err(), "Raft with {what} must be refused");
    }
}

/// Every milter host holds a certificate of the cluster's CA: on the peer
/// port it must not pass for a member, nor change the policy.
#[tokio::test]
async fn a_milter_certificate_of_the_cluster_ca_is_not_a_peer() {
    let certs = TempDir::new().unwrap();
    let c = make_ca(certs.path(), "cluster");
    let tls = Tls::from_options(
        Some(c.cert.clone()),
        Some(c.key.clone()),
        Some(c.ca.clone()),
    )
    .unwrap()
    .unwrap();
    let dirs = temp_dirs(1);
    let nodes = cluster(1, &dirs, |conf| {
        conf.tls = Some(tls.clone());
        conf.cluster_secret = None;
    })
    .await;
    let peer = nodes[0].peer_addr.to_string();
    let milter_tls = Tls::client(
        &c.ca,
        Some((c.milter_cert.as_path(), c.milter_key.as_path())),
    )
    .unwrap();
    let as_node_1 = PeerAuth::new(1, None, true);
    let empty = Proposal::Command(Command::SetPolicy { files: vec![] });
    let refused = common::peer_propose(&peer, Some(&milter_tls), &as_node_1, empty)
        .await
        .expect_err("a milter's certificate may not propose");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // The policy in force is the one the cluster was started with.
    let mut client = admin(nodes[0].addr, Some(&tls)).await.unwrap();
    let shown = client
        .show_policy(pb::ShowPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.files.len(), 1);
    assert_eq!(shown.files[0].text, POLICY);
}

#[tokio::test]
async fn a_node_joins_through_the_first_seed_that_answers() {
    let dirs = temp_dirs(2);
    let nodes = cluster(1, &dirs, |_| {}).await;
    let dead = format!("127.0.0.1:{}", common::free_port());
    let seeds = format!("{dead},{}", nodes[0].peer_addr);
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = NodeConfig::new(2, listen, dirs[1].path().into(), Start::Join(seeds));
    config.raft = fast_raft();
    config.cluster_secret = Some(common::test_secret());
    let second = node::start(config).await.expect("node starts");
    let raft = second.node.raft.clone();
    eventually("node 2 a voter", DEADLINE, || {
        let m = raft.metrics().borrow().clone();
        m.membership_config.membership().voter_ids().count() == 2
    })
    .await;
}

#[tokio::test]
async fn a_removed_node_stays_removed_across_a_restart_until_added_back() {
    use relayrate::convert::event_to_pb;
    use relayrate::engine::{ConnId, Event};
    use relayrate::policy::Client;
    use relayrate::proto::v1::limiter_client::LimiterClient;

    let dirs = temp_dirs(3);
    let mut nodes = cluster(3, &dirs, |_| {}).await;
    let mut admin1 = admin(nodes[0].addr, None).await.unwrap();
    admin1
        .remove_node(pb::RemoveNodeRequest { id: 3 })
        .await
        .expect("node 3 removed");
    let third = nodes.pop().unwrap();
    let addr3 = third.addr;
    let peer3 = third.peer_addr;
    let told = third.node.clone();
    eventually("node 3 told", DEADLINE, || told.is_removed()).await;
    // The node (and its sled files) must be let go of to be reopened.
    drop(told);
    third.kill().await;

    // Restarted on its data: it still knows, decides nothing, and says so.
    let mut config = NodeConfig::new(3, addr3, dirs[2].path().into(), Start::Resume);
    config.raft = fast_raft();
    config.peer_listen = Some(peer3);
    config.cluster_secret = Some(common::test_secret());
    let until = std::time::Instant::now() + DEADLINE;
    let restarted = loop {
        match node::start(config.clone()).await {
            Ok(h) => break h,
            // The killed server's port may take a moment to be free.
            Err(e) if std::time::Instant::now() < until => eprintln!("restart: {e}"),
            Err(e) => panic!("restart failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(restarted.node.is_removed());
    assert!(!restarted.node.is_ready());
    let channel = network::channel(&addr3.to_string(), None).unwrap();
    let connect = Event::Connect {
        conn: ConnId { owner: 0, conn: 1 },
        client: Client::from_ip("10.0.0.3".parse().unwrap()),
    };
    let refused = LimiterClient::new(channel)
        .decide(pb::DecideRequest {
            events: vec![event_to_pb(&connect)],
        })
        .await
        .expect_err("a removed node decides nothing");
    assert_eq!(refused.code(), Code::Unavailable);

    // Added back: it decides again, as a voter.
    admin1
        .add_node(pb::AddNodeRequest {
            id: 3,
            addr: peer3.to_string(),
        })
        .await
        .expect("node 3 added back");
    let back = restarted.node.clone();
    eventually("node 3 a member again", DEADLINE, || {
        !back.is_removed() && back.is_ready()
    })
    .await;
}
