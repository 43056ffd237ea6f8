//! Where the milter's verdicts come from: the local node, in this process
//! (`relayrate run`, `relayrate node --milter-listen`) or over gRPC
//! (`relayrate milter`), within a bounded time; when it cannot answer in
//! time, the fail mode decides (an in-process engine with the last policy
//! seen, accept, or tempfail). The MTA never waits longer than the timeout.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::MilterConfig;
use crate::engine::{ConnId, Engine, Event, Verdict};
use crate::limiter_client::BatchingClient;
use crate::node::Node;
use crate::policy::{Policy, PolicyFile};
use crate::proto::v1::{GetPolicyRequest, GetPolicyResponse};
use crate::raft::state::policy_hash;
use crate::tls::endpoint;
use tonic::Status;

/// An event as the node of this process takes it: leases are owned by the
/// node (over gRPC the node's service does the same).
fn owned_by(event: &Event, owner: u64) -> Event {
    let owned = |conn: &ConnId| ConnId {
        owner,
        conn: conn.conn,
    };
    match event {
        Event::Connect { conn, client } => Event::Connect {
            conn: owned(conn),
            client: client.clone(),
        },
        Event::Close { conn } => Event::Close { conn: owned(conn) },
        other => other.clone(),
    }
}

/// What to do when the node does not answer in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Decide with an in-process engine, the last policy seen and each
    /// cluster-wide limit divided by the number of relays; as `Tempfail`
    /// while no policy has been seen.
    Local,
    /// Accept.
    Open,
    /// Answer 451 4.3.0 and let the client retry.
    Tempfail,
}

impl FromStr for FailMode {
    type Err = String;

    fn from_str(s: &str) -> Result<FailMode, String> {
        match s {
            "local" => Ok(FailMode::Local),
            "open" => Ok(FailMode::Open),
            "tempfail" => Ok(FailMode::Tempfail),
            other => Err(format!(
                "unknown fail mode `{other}`: expected local, open or tempfail"
            )),
        }
    }
}

impl FailMode {
    pub fn name(self) -> &'static str {
        match self {
            FailMode::Local => "local",
            FailMode::Open => "open",
            FailMode::Tempfail => "tempfail",
        }
    }
}

/// A verdict and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The node's verdict.
    Node(Verdict),
    /// The node did not answer; the fail mode's verdict.
    Fallback(FailMode, Verdict),
    /// Fail mode `tempfail`: 451 4.3.0.
    Unavailable,
}

/// How long a background event (a Close) is retried.
const SETTLE_FOR: Duration = Duration::from_secs(60);

/// How the milter reaches its node.
enum Link {
    /// Over gRPC: the events of all the milter's sessions share its calls.
    Grpc(BatchingClient),
    /// The node of this process: no hop, no encoding; its batcher gathers
    /// the events of all sessions into one log entry all the same.
    InProcess(Arc<Node>),
}

/// The milter's client of its node, with the fallback.
pub struct Decider {
    link: Link,
    timeout: Duration,
    fail_mode: FailMode,
    relays: u64,
    /// The fallback engine, on the last policy seen (divided); `None`
    /// until a policy has been seen.
    local: Mutex<Option<Engine>>,
    /// Hash of the policy last fetched from the node.
    policy_hash: Mutex<String>,
    dry_run_policy: std::sync::atomic::AtomicBool,
    fallbacks: AtomicU64,
    /// Woken when the node decided with a policy other than the one held.
    stale: tokio::sync::Notify,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Decider {
    /// A decider asking the node of `config` (over TLS if configured).
    pub fn new(config: &MilterConfig) -> Result<Decider, tonic::transport::Error> {
        let link = match &config.in_process {
            Some(node) => Link::InProcess(node.clone()),
            None => {
                let channel = endpoint(&config.node, config.tls.as_ref())?
                    .tcp_nodelay(true)
                    .connect_timeout(config.timeout)
                    .connect_lazy();
                Link::Grpc(BatchingClient::new(channel, config.timeout))
            }
        };
        let relays = config.relays.max(1);
        // A policy given to the milter stands in until the node's is
        // fetched; the node's replaces it (its hash differs) at once.
        let (local, hash, dry_run) = match &config.fallback_policy {
            Some(policy) => (
                Some(Engine::new(Arc::new(policy.divided(relays)))),
                policy_hash(policy.files()),
                policy.dry_run(),
            ),
            None => (None, String::new(), false),
        };
        Ok(Decider {
            link,
            timeout: config.timeout,
            fail_mode: config.fail_mode,
            relays,
            local: Mutex::new(local),
            policy_hash: Mutex::new(hash),
            dry_run_policy: std::sync::atomic::AtomicBool::new(dry_run),
            fallbacks: AtomicU64::new(0),
            stale: tokio::sync::Notify::new(),
        })
    }

    /// How many verdicts came from the fail mode.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Whether a policy has been fetched from the node for the fallback.
    pub fn has_policy(&self) -> bool {
        self.local.lock().expect("local engine lock").is_some()
    }

    /// The policy last fetched from the node (each cluster-wide limit
    /// divided by the relays; per-connection limits as they are), or
    /// `None` before the first: what the milter decides the per-connection
    /// checks with, and whether an event needs the cluster at all.
    pub fn policy(&self) -> Option<Arc<Policy>> {
        if !self.policy_current() {
            return None;
        }
        let local = self.local.lock().expect("local engine lock");
        local.as_ref().map(|engine| engine.policy().clone())
    }

    /// Whether the policy held is the one the node last decided with; if
    /// not, the refresher is woken.
    fn policy_current(&self) -> bool {
        let held = self.policy_hash.lock().expect("hash lock");
        let current = match &self.link {
            Link::Grpc(client) => client.policy_is(&held),
            Link::InProcess(node) => {
                node.state().read().expect("state lock").policy_hash() == *held
            }
        };
        if !current {
            self.stale.notify_one();
        }
        current
    }

    /// Waits until the node is seen deciding with another policy.
    pub async fn policy_changed(&self) {
        self.stale.notified().await
    }

    /// Whether the policy last seen says `DryRun YES`.
    pub fn policy_dry_run(&self) -> bool {
        self.dry_run_policy.load(Ordering::Relaxed)
    }

    /// Decides one event: at the node if it answers within the timeout,
    /// else by the fail mode.
    pub async fn decide(&self, event: &Event) -> Decision {
        let asked = tokio::time::timeout(self.timeout, self.ask(event)).await;
        let why = match asked {
            Ok(Ok(verdict)) => {
                // Over gRPC the node's hash arrives with its answer: see
                // now whether the policy held is still its. (In-process,
                // `policy` reads the node's own hash when it is asked.)
                if matches!(self.link, Link::Grpc(_)) {
                    self.policy_current();
                }
                return Decision::Node(verdict);
            }
            Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
            Err(_) => format!("no answer within {} ms", self.timeout.as_millis()),
        };
        self.fallback(event, &why)
    }

    /// Sends an event whose answer nobody waits for (a Close, a GiveBack)
    /// to the node, never to the fail mode: the cluster must hear it. A
    /// Close, which applied twice does no harm, is retried with back-off
    /// for up to [`SETTLE_FOR`]; a GiveBack, which must not be applied
    /// twice, is sent once (a lost one leaves the slot counted, which errs
    /// on the side of the limit).
    pub async fn settle(&self, event: &Event) {
        let retry = matches!(event, Event::Close { .. });
        if retry {
            // A lease the fallback took (the node was away at connect)
            // is the fallback's to release; none there, nothing happens.
            if let Some(engine) = self.local.lock().expect("local engine lock").as_mut() {
                engine.apply(event, now_secs());
            }
        }
        let until = std::time::Instant::now() + SETTLE_FOR;
        let mut wait = Duration::from_millis(100);
        loop {
            let why = match tokio::time::timeout(SETTLE_FOR, self.ask(event)).await {
                Ok(Ok(_)) => return,
                Ok(Err(status)) => status.message().to_string(),
                Err(_) => "no answer".to_string(),
            };
            if !retry || std::time::Instant::now() + wait > until {
                tracing::warn!(event = crate::metrics::event_name(event), %why, "not settled with the node");
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    async fn ask(&self, event: &Event) -> Result<Verdict, Status> {
        match &self.link {
            Link::Grpc(client) => client.decide(event).await,
            Link::InProcess(node) => {
                let event = owned_by(event, node.incarnation);
                let kinds = [crate::metrics::event_name(&event)];
                let started = std::time::Instant::now();
                let mut verdicts = node
                    .decide(vec![event])
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                // As the Limiter service records the decisions it serves.
                crate::metrics::record_decisions(&kinds, &verdicts, started.elapsed());
                verdicts
                    .pop()
                    .ok_or_else(|| Status::internal("no verdict for the event"))
            }
        }
    }

    fn fallback(&self, event: &Event, why: &str) -> Decision {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        let mode = self.fail_mode;
        crate::metrics::record_fallback(mode.name());
        tracing::warn!(fail_mode = mode.name(), %why, "node unavailable: deciding by the fail mode");
        match mode {
            FailMode::Open => Decision::Fallback(mode, Verdict::Allow),
            FailMode::Tempfail => Decision::Unavailable,
            FailMode::Local => {
                let mut local = self.local.lock().expect("local engine lock");
                match local.as_mut() {
                    Some(engine) => Decision::Fallback(mode, engine.apply(event, now_secs())),
                    // With no policy to decide with, accepting would let
                    // a flood through unlimited: tempfail instead.
                    None => {
                        tracing::warn!("no policy seen yet: the local fallback tempfails");
                        Decision::Unavailable
                    }
                }
            }
        }
    }

    /// Fetches the node's policy, and puts it in the fallback engine when
    /// it changed. Returns whether the node answered.
    pub async fn refresh_policy(&self) -> bool {
        let reply = match &self.link {
            Link::Grpc(client) => {
                let mut client = client.inner();
                let get = client.get_policy(GetPolicyRequest {});
                let Ok(Ok(reply)) = tokio::time::timeout(self.timeout * 4, get).await else {
                    return false;
                };
                reply.into_inner()
            }
            Link::InProcess(node) if !node.is_ready() => return false,
            Link::InProcess(node) => {
                let state = node.state().read().expect("state lock");
                GetPolicyResponse {
                    files: state.policy().files().iter().map(Into::into).collect(),
                    hash: state.policy_hash().to_string(),
                }
            }
        };
        if *self.policy_hash.lock().expect("hash lock") == reply.hash {
            return true;
        }
        let files: Vec<PolicyFile> = reply.files.into_iter().map(PolicyFile::from).collect();
        if policy_hash(&files) != reply.hash {
            tracing::warn!("the node's policy does not match its hash; ignored");
            return true;
        }
        match Policy::parse(files) {
            Ok(policy) => {
                self.dry_run_policy
                    .store(policy.dry_run(), Ordering::Relaxed);
                let divided = Arc::new(policy.divided(self.relays));
                let mut local = self.local.lock().expect("local engine lock");
                match local.as_mut() {
                    Some(engine) => engine.set_policy(divided),
                    None => *local = Some(Engine::new(divided)),
                }
                *self.policy_hash.lock().expect("hash lock") = reply.hash.clone();
                tracing::info!(hash = %reply.hash, "policy for the local fallback updated");
            }
            Err(e) => tracing::warn!(error = %e, "the node's policy does not parse; ignored"),
        }
        true
    }
}
