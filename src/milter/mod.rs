//! The milter an MTA calls: turns each SMTP session into events for the
//! local node (`docs/design.md`, "The flow of one SMTP session") and the
//! node's verdicts into SMTP replies (`docs/policy.md` §1).
//!
//! - `decider`: the node's client, the timeout and the fail modes;
//! - `session`: what one SMTP connection has said so far, and its counts;
//! - `limits`: how long an MTA connection may idle, how many may be open;
//! - `listener`, `guard`, `frame`: those limits kept around indymilter,
//!   on each accept and on each read of a connection's packets.

mod conninfo;
pub mod decider;
mod frame;
pub(crate) mod guard;
mod limits;
mod listener;
mod session;

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use indymilter::{Callbacks, Config, Context, MacroStage, SetErrorReply, SocketInfo, Status};
use tokio::net::{TcpListener, UnixListener};

pub use decider::{Decider, Decision, FailMode};
pub use frame::MAX_PACKET;
pub use limits::{ConnLimits, LimitArgs};
use listener::GuardedListener;
pub use listener::NoDelay;
use session::{Reserved, Session};

use crate::check::Check;
use crate::engine::{self, Event, Refusal, Verdict};
use crate::policy::parse_client_addr;

/// Where the milter listens: `inet:HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Inet(String),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    /// As the MTA's configuration spells it: `inet:HOST:PORT`, `unix:PATH`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Inet(addr) => write!(f, "inet:{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenAddr, String> {
        if let Some(addr) = s.strip_prefix("inet:") {
            Ok(ListenAddr::Inet(addr.to_string()))
        } else if let Some(path) = s.strip_prefix("unix:") {
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else {
            Err(format!("expected inet:HOST:PORT or unix:PATH, found `{s}`"))
        }
    }
}

#[derive(Clone, Debug)]
pub struct MilterConfig {
    /// Node URL, e.g. `http://127.0.0.1:7450`.
    pub node: String,
    /// Longest wait for a verdict before the fail mode decides.
    pub timeout: Duration,
    pub fail_mode: FailMode,
    /// Relays sharing the limits: the local fallback divides by this.
    pub relays: u64,
    /// Log and count refusals, refuse nothing.
    pub dry_run: bool,
    /// TLS to the node, when it requires it.
    pub tls: Option<crate::tls::Tls>,
    /// Deadlines and the connection cap on MTA connections.
    pub limits: ConnLimits,
    /// The node of this process, asked directly instead of `node`.
    pub in_process: Option<std::sync::Arc<crate::node::Node>>,
    /// The policy the local fail mode decides with until the node's has
    /// been fetched (`relayrate milter --policy`); without it, the local
    /// fail mode tempfails until then.
    pub fallback_policy: Option<crate::policy::Policy>,
}

impl MilterConfig {
    pub fn new(node: impl Into<String>) -> MilterConfig {
        MilterConfig {
            node: node.into(),
            timeout: Duration::from_millis(250),
            fail_mode: FailMode::Local,
            relays: 1,
            dry_run: false,
            tls: None,
            limits: ConnLimits::default(),
            in_process: None,
            fallback_policy: None,
        }
    }
}

/// What the callbacks share.
struct Shared {
    decider: Arc<Decider>,
    dry_run: bool,
}

/// A bound milter listener, so the address is known before serving.
pub enum MilterListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl MilterListener {
    pub async fn bind(addr: &ListenAddr) -> io::Result<MilterListener> {
        match addr {
            ListenAddr::Inet(a) => Ok(MilterListener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(path) => {
                // A socket left by an earlier run would make bind fail.
                let _ = std::fs::remove_file(path);
                Ok(MilterListener::Unix(
                    UnixListener::bind(path)?,
                    path.clone(),
                ))
            }
        }
    }

    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            MilterListener::Tcp(l) => l.local_addr().ok(),
            MilterListener::Unix(..) => None,
        }
    }
}

/// Serves milter connections until `shutdown` completes.
///
/// # Errors
/// A node URL that cannot be used. A failed accept is not one: it is
/// logged and retried (`listener.rs`), so serving ends only at `shutdown`.
pub async fn run(
    listener: MilterListener,
    config: MilterConfig,
    shutdown: impl Future,
) -> io::Result<()> {
    let decider = Decider::new(&config)
        .map_err(|e| io::Error::other(format!("bad node URL {}: {e}", config.node)))?;
    serve(listener, Arc::new(decider), &config, shutdown).await
}

/// Serves with a decider the caller keeps (to watch its fallbacks);
/// `config` gives the dry run and the connection limits.
pub async fn serve(
    listener: MilterListener,
    decider: Arc<Decider>,
    config: &MilterConfig,
    shutdown: impl Future,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        decider,
        dry_run: config.dry_run,
    });
    let refresher = tokio::spawn(refresh_policy(shared.clone()));
    let limits = config.limits;
    // The guarded listener and streams enforce the cap and the deadlines
    // (listener.rs); indymilter's own are set beyond them, as backstops.
    let milter_config = Config {
        max_connections: tokio::sync::Semaphore::MAX_PERMITS,
        connection_timeout: limits.longest_wait() + Duration::from_secs(5),
        ..Default::default()
    };
    let result = match listener {
        MilterListener::Tcp(l) => {
            let l = GuardedListener::new(NoDelay(l), limits);
            indymilter::run(l, callbacks(shared), milter_config, shutdown).await
        }
        MilterListener::Unix(l, path) => {
            let l = GuardedListener::new(l, limits);
            let r = indymilter::run(l, callbacks(shared), milter_config, shutdown).await;
            let _ = std::fs::remove_file(path);
            r
        }
    };
    refresher.abort();
    result
}

/// Keeps the milter's policy current: at start (retried from 200 ms up
/// to 30 s while the node does not answer), every 30 s, and at once when
/// the node is seen deciding with another.
async fn refresh_policy(shared: Arc<Shared>) {
    let mut wait = Duration::from_millis(200);
    loop {
        if shared.decider.refresh_policy().await {
            wait = Duration::from_secs(30);
        } else {
            wait = (wait * 2).min(Duration::from_secs(30));
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.decider.policy_changed() => {
                // A burst of stale answers wakes this once; don't hammer
                // a node that has just changed its policy.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Asks the MTA for the macros the milter reads, stage by stage. Postfix
/// sends no macro of a stage left out of these lists.
pub fn ask_for_macros(requested: &mut HashMap<MacroStage, CString>) {
    let ask = [
        (MacroStage::Connect, "j {client_name} {client_addr}"),
        (MacroStage::Helo, "{client_name}"),
        (MacroStage::Mail, "i {auth_authen}"),
        (MacroStage::Rcpt, "i {auth_authen}"),
        (MacroStage::Eom, "i"),
    ];
    for (stage, names) in ask {
        requested.insert(stage, CString::new(names).expect("no NUL"));
    }
}

fn callbacks(shared: Arc<Shared>) -> Callbacks<Session> {
    let (s1, s2, s3, s4, s5, s5b, s6) = (
        shared.clone(),
        shared.clone(),
        shared.clone(),
        shared.clone(),
        shared.clone(),
        shared.clone(),
        shared,
    );
    Callbacks::new()
        .on_negotiate(|cx, _, _| {
            Box::pin(async move {
                ask_for_macros(&mut cx.requested_macros);
                Status::Continue
            })
        })
        .on_connect(move |cx, host, socket| {
            let shared = s1.clone();
            Box::pin(async move { handle_connect(&shared, cx, host, socket).await })
        })
        .on_helo(move |cx, _| {
            let shared = s2.clone();
            Box::pin(async move {
                let Some(s) = cx.data.as_ref() else {
                    return Status::Continue;
                };
                if let Some(policy) = shared.decider.policy() {
                    if !engine::limits_connections(&policy, &s.client) {
                        return Status::Continue;
                    }
                }
                let event = Event::Recheck {
                    client: s.client.clone(),
                };
                answer(&shared, cx, &event, "helo").await
            })
        })
        .on_mail(move |cx, args| {
            let shared = s3.clone();
            Box::pin(async move {
                let auth = macro_value(cx, c"{auth_authen}");
                let queue_id = macro_value(cx, c"i");
                let Some(s) = cx.data.as_mut() else {
                    return Status::Continue;
                };
                let sender = args.first().map(|a| a.to_string_lossy().into_owned());
                s.begin_message(sender.as_deref(), auth.as_deref(), queue_id);
                let (client, count) = (s.client.clone(), s.msgs_in_conn);
                let giving_back = s.giving_back.take();
                // MaxMsgs is this connection's own count; the cluster is
                // asked only when a message rate counts this message.
                let policy = shared.decider.policy();
                if let Some(policy) = &policy {
                    let refusal = engine::per_connection(policy, Check::MaxMsgs, &client, count);
                    if let Some(r) = refusal {
                        let status = respond(&shared, cx, &Verdict::Refuse(r), "mail");
                        if status != Status::Continue {
                            return status;
                        }
                    }
                    if !engine::counts_any(policy, &engine::MESSAGE_RATES, &client) {
                        return Status::Continue;
                    }
                }
                // Postfix sends the abort of an RSET only ahead of the
                // session's next command: this MAIL must not be decided
                // before the slot that abort gave back is free again.
                if let Some(pending) = giving_back {
                    let _ = pending.await;
                }
                let event = Event::Mail {
                    client,
                    // 0: decided here, the node need not.
                    msgs_in_conn: if policy.is_some() { 0 } else { count },
                };
                let (status, decision) = answer_with(&shared, cx, &event, "mail").await;
                // A MAIL the cluster allowed took its slot in the message
                // rates: it is given back unless the message reaches its
                // end. (One the fail mode let through took no slot there.)
                if let (Some(s), Decision::Node(Verdict::Allow)) = (cx.data.as_mut(), decision) {
                    if let Some(earlier) = s.reserve() {
                        give_back(&shared, earlier);
                    }
                }
                status
            })
        })
        .on_rcpt(move |cx, _| {
            let shared = s4.clone();
            Box::pin(async move {
                let queue_id = macro_value(cx, c"i");
                let Some(s) = cx.data.as_mut() else {
                    return Status::Continue;
                };
                s.rcpts_in_msg += 1;
                if queue_id.is_some() {
                    s.queue_id = queue_id;
                }
                let (client, count) = (s.client.clone(), s.rcpts_in_msg);
                // MaxRcpt(From) on this message's own count; with no
                // recipient rate counting it, only the connection checks
                // are read again (no write).
                let Some(policy) = shared.decider.policy() else {
                    let event = Event::Rcpt {
                        client,
                        rcpts_in_msg: count,
                    };
                    return answer(&shared, cx, &event, "rcpt").await;
                };
                let refusal = [Check::MaxRcpt, Check::MaxRcptFrom]
                    .into_iter()
                    .find_map(|c| engine::per_connection(&policy, c, &client, count));
                if let Some(r) = refusal {
                    let status = respond(&shared, cx, &Verdict::Refuse(r), "rcpt");
                    if status != Status::Continue {
                        return status;
                    }
                }
                let event = if engine::counts_any(&policy, &engine::RECIPIENT_RATES, &client) {
                    // 0: decided here, the node need not.
                    Event::Rcpt {
                        client,
                        rcpts_in_msg: 0,
                    }
                } else if engine::limits_connections(&policy, &client) {
                    Event::Recheck { client }
                } else {
                    return Status::Continue;
                };
                answer(&shared, cx, &event, "rcpt").await
            })
        })
        .on_eom(move |cx| {
            let shared = s5.clone();
            Box::pin(async move {
                let queue_id = cx
                    .macros
                    .get(c"i")
                    .map(|v| v.to_string_lossy().into_owned());
                let Some(s) = cx.data.as_mut() else {
                    return Status::Continue;
                };
                if queue_id.is_some() {
                    s.queue_id = queue_id;
                }
                // The message is in: its reservation stands, nothing to ask.
                s.end_message();
                let _ = &shared;
                Status::Continue
            })
        })
        // Counting nothing here, but answering DATA matters: with the stage
        // negotiated away, Postfix still sends its macros, unanswered, and
        // the end of message then waits on Nagle and a delayed ACK (40 ms).
        .on_data(|_| Box::pin(async { Status::Continue }))
        .on_abort(move |cx| {
            let shared = s5b.clone();
            Box::pin(async move {
                if let Some(s) = cx.data.as_mut() {
                    if let Some(reserved) = s.abort_message() {
                        s.giving_back = Some(give_back(&shared, reserved));
                    }
                }
                Status::Continue
            })
        })
        .on_close(move |cx| {
            let shared = s6.clone();
            Box::pin(async move {
                if let Some(mut s) = cx.data.take() {
                    if let Some(reserved) = s.abort_message() {
                        give_back(&shared, reserved);
                    }
                    // The MTA has nothing to wait for: the lease is
                    // released in the background.
                    if s.announced {
                        tokio::spawn(async move {
                            shared.decider.settle(&Event::Close { conn: s.conn }).await;
                        });
                    }
                }
                Status::Continue
            })
        })
}

fn macro_value(cx: &Context<Session>, name: &CStr) -> Option<String> {
    cx.macros
        .get(name)
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
}

async fn handle_connect(
    shared: &Shared,
    cx: &mut Context<Session>,
    host: CString,
    socket: SocketInfo,
) -> Status {
    let host = host.to_string_lossy();
    // The connect's address (brought to its plain form by `conninfo`);
    // one in no known form came as "unknown": then `{client_addr}`, then
    // a host name that is an address literal, read by the same reader.
    let ip = match socket {
        SocketInfo::Inet(addr) => Some(crate::policy::canonical_ip(addr.ip())),
        SocketInfo::Unknown => macro_value(cx, c"{client_addr}")
            .as_deref()
            .and_then(parse_client_addr)
            .or_else(|| parse_client_addr(&host)),
        SocketInfo::Unix(_) => None,
    };
    let name = macro_value(cx, c"{client_name}").unwrap_or_else(|| host.into_owned());
    let mut session = Session::new(ip, &name);
    // No connection limit for this client: nothing to count, no lease.
    if let Some(policy) = shared.decider.policy() {
        if !engine::limits_connections(&policy, &session.client) {
            cx.data = Some(session);
            return Status::Continue;
        }
    }
    let event = Event::Connect {
        conn: session.conn,
        client: session.client.clone(),
    };
    session.announced = true;
    cx.data = Some(session);
    answer(shared, cx, &event, "connect").await
}

/// Gives a message's reserved slots back, in the background: the MTA
/// has nothing to wait for. If the cluster does not take it, the slots
/// stay counted, which errs on the side of the limit. The task ends once
/// the give-back is decided (within the decider's timeout).
fn give_back(shared: &Arc<Shared>, reserved: Reserved) -> tokio::task::JoinHandle<()> {
    let shared = shared.clone();
    tokio::spawn(async move {
        let event = Event::GiveBack {
            client: reserved.client,
            held_secs: reserved.at.elapsed().as_secs(),
        };
        shared.decider.settle(&event).await;
    })
}

/// Asks for the verdict of `event` and turns it into the milter's answer,
/// with the reply of `docs/policy.md` §1 and one log line per refusal.
async fn answer(
    shared: &Shared,
    cx: &mut Context<Session>,
    event: &Event,
    stage: &'static str,
) -> Status {
    answer_with(shared, cx, event, stage).await.0
}

/// As [`answer`], with the decision: the cluster's verdict, the fail
/// mode's, or none.
async fn answer_with(
    shared: &Shared,
    cx: &mut Context<Session>,
    event: &Event,
    stage: &'static str,
) -> (Status, Decision) {
    let decision = shared.decider.decide(event).await;
    let status = match &decision {
        Decision::Node(v) | Decision::Fallback(_, v) => respond(shared, cx, v, stage),
        Decision::Unavailable => {
            let _ = cx.reply.set_error_reply(
                "451",
                Some("4.3.0"),
                ["Rate limiter unavailable - try again later"],
            );
            Status::Tempfail
        }
    };
    (status, decision)
}

/// Turns a verdict (the cluster's, the fallback's or the milter's own)
/// into the milter's answer: a refusal is logged and replied, unless in
/// dry run.
fn respond(
    shared: &Shared,
    cx: &mut Context<Session>,
    verdict: &Verdict,
    stage: &'static str,
) -> Status {
    let Verdict::Refuse(refusal) = verdict else {
        return Status::Continue;
    };
    let dry_run = shared.dry_run || shared.decider.policy_dry_run();
    if let Some(s) = cx.data.as_ref() {
        let counted = shared
            .decider
            .policy()
            .and_then(|p| engine::counted_as(&p, refusal.check, &s.client));
        log_refusal(s, refusal, stage, dry_run, counted.as_deref());
    }
    if dry_run {
        return Status::Continue;
    }
    let reply = refusal.reply();
    let code = reply.code.to_string();
    if let Err(e) = cx
        .reply
        .set_error_reply(&code, Some(reply.enhanced), [reply.text.as_str()])
    {
        tracing::error!(error = %e, "reply not accepted by the milter library");
    }
    Status::Tempfail
}

/// One line an operator can grep: who, which check, the figures, where,
/// and who was counted (`counted`: an IPv6 client's network, the sender,
/// the AUTH user; `-` for a per-connection count).
fn log_refusal(
    s: &Session,
    r: &Refusal,
    stage: &'static str,
    dry_run: bool,
    counted: Option<&str>,
) {
    crate::metrics::record_milter_refusal(r.check, stage, dry_run);
    let client = s.client.ip.map_or("-".to_string(), |ip| ip.to_string());
    let counted = if r.check.measure() == crate::check::Measure::PerConnection {
        "-"
    } else {
        counted.unwrap_or("-")
    };
    crate::dashboard::history::record_refusal(crate::dashboard::history::RefusalEvent {
        unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        client: client.clone(),
        host: s.client.host.as_deref().unwrap_or("-").to_string(),
        check: r.check.name(),
        counted: counted.to_string(),
        count: r.count,
        limit: r.limit,
        stage,
        sender: s.client.sender.as_deref().unwrap_or("-").to_string(),
        auth: s.client.auth.as_deref().unwrap_or("-").to_string(),
        dry_run,
    });
    tracing::warn!(
        target: "relayrate::refusal",
        client = %client,
        host = s.client.host.as_deref().unwrap_or("-"),
        check = r.check.name(),
        counted,
        count = r.count,
        limit = r.limit,
        stage,
        sender = s.client.sender.as_deref().unwrap_or("-"),
        auth = s.client.auth.as_deref().unwrap_or("-"),
        queue_id = s.queue_id.as_deref().unwrap_or("-"),
        dry_run,
        "{} {}/{}",
        if dry_run { "would refuse" } else { "refused" },
        r.count,
        r.limit,
    );
}
