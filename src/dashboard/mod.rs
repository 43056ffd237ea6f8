//! The live dashboard every node serves on its metrics port: the page at
//! `/` (HTML, JS and CSS built in: nothing is fetched from elsewhere) and
//! the JSON it refreshes itself from, `/api/status`, `/api/policy`,
//! `/api/top`, `/api/history` and `/api/refusals`. The API reads what `relayratectl`
//! reads, through the node's Admin service called in-process.
//!
//! Who may read: with an admin token, the API needs it
//! (`Authorization: Bearer TOKEN`; the page asks for it once). Without
//! one, only this host's own connections (loopback) get data. A node with
//! TLS guards its reads with client certificates, which this plain-HTTP
//! port cannot: without an admin token it serves no data (403).

pub mod history;

use std::sync::{Arc, OnceLock};

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tonic::Request;

use crate::node::{same_secret, AdminService, Node};
use crate::proto::v1 as pb;
use crate::proto::v1::admin_server::Admin;

/// Keys the page lists, nearest their limits first.
pub const TOP_KEYS: u32 = 20;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");
/// The page runs only its own script and style, and talks only to this
/// port.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// Why the API does not answer: the status and a message.
type Denied = (StatusCode, &'static str);

/// The dashboard of one process: its node once started, and who may read.
pub struct Dashboard {
    admin: OnceLock<AdminService>,
    token: Option<String>,
    tls: bool,
}

impl Dashboard {
    /// `token`: the node's admin token, if any; `tls`: whether the node
    /// serves its gRPC ports with TLS.
    pub fn new(token: Option<String>, tls: bool) -> Arc<Dashboard> {
        Arc::new(Dashboard {
            admin: OnceLock::new(),
            token,
            tls,
        })
    }

    /// The node to show, once started; until then the API answers 503.
    pub fn attach(&self, node: Arc<Node>) {
        let _ = self.admin.set(AdminService::new(node, self.token.clone()));
    }

    /// The node's Admin service, once the node serves; the API's answer
    /// otherwise.
    fn admin(&self) -> Result<&AdminService, Denied> {
        self.admin
            .get()
            .ok_or((StatusCode::SERVICE_UNAVAILABLE, "the node is starting"))
    }

    /// Who may read: with a token, whoever gives it; without one, this
    /// host only (the metrics port is often open to the scrapers, the
    /// client port's reads are not), and nobody where TLS guards them.
    fn check(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Denied> {
        let Some(token) = &self.token else {
            if self.tls {
                return Err((
                    StatusCode::FORBIDDEN,
                    "this node uses TLS and has no admin token: the dashboard serves no data \
                     in clear without one (see --admin-token-file)",
                ));
            }
            if !peer.ip().to_canonical().is_loopback() {
                return Err((
                    StatusCode::FORBIDDEN,
                    "this node has no admin token: the dashboard serves its data to this \
                     host only (see --admin-token-file)",
                ));
            }
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if same_secret(g.as_bytes(), token.as_bytes()) => Ok(()),
            _ => Err((
                StatusCode::UNAUTHORIZED,
                "this node needs its admin token (Authorization: Bearer TOKEN)",
            )),
        }
    }
}

/// The page, its assets and its API, to merge into the metrics router.
pub fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .nest("/api", api(dashboard.clone()))
        .with_state(dashboard)
}

/// The JSON the page reads, each call let through by [`guard`] first.
fn api(dashboard: Arc<Dashboard>) -> Router<Arc<Dashboard>> {
    Router::new()
        .route("/status", get(status))
        .route("/policy", get(policy))
        .route("/top", get(top))
        .route("/history", get(history_json))
        .route("/refusals", get(refusals))
        .route_layer(axum::middleware::from_fn_with_state(dashboard, guard))
}

/// Refuses a caller who may not read the API ([`Dashboard::check`]).
async fn guard(
    State(d): State<Arc<Dashboard>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match d.check(peer, request.headers()) {
        Ok(()) => next.run(request).await,
        Err((code, why)) => error(code, why),
    }
}

/// Takes a sample of the decision totals every [`history::SAMPLE_EVERY`],
/// until the task is dropped.
pub async fn sample_history() {
    let mut every = tokio::time::interval(history::SAMPLE_EVERY);
    loop {
        every.tick().await;
        history::sample(unix_ms());
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn data(value: Value) -> Response {
    let mut r = value.to_string().into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn error(code: StatusCode, message: &str) -> Response {
    let mut r = data(json!({ "error": message }));
    *r.status_mut() = code;
    r
}

/// An Admin call's error as the API answers it.
fn failed(status: tonic::Status) -> Response {
    let message = crate::bounds::cut(status.message()).to_string();
    error(StatusCode::BAD_GATEWAY, &message)
}

async fn status(State(d): State<Arc<Dashboard>>) -> Response {
    let admin = match d.admin() {
        Ok(a) => a,
        Err((code, why)) => return error(code, why),
    };
    let s = match admin.status(Request::new(pb::StatusRequest {})).await {
        Ok(s) => s.into_inner(),
        Err(e) => return failed(e),
    };
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "addr": m.addr,
                "voter": m.voter,
                "health": m.health,
                "matched_index": m.matched_index,
            })
        })
        .collect();
    data(json!({
        "id": s.id,
        "role": s.role,
        "term": s.term,
        "leader_id": s.leader_id,
        "leader_addr": s.leader_addr,
        "last_log_index": s.last_log_index,
        "last_applied_index": s.last_applied_index,
        "ready": s.ready,
        "members": members,
        "policy_hash": s.policy_hash,
        "policy_applied_unix_ms": s.policy_applied_unix_ms,
        "counters": s.counters,
        "leases": s.leases,
    }))
}

/// The policy in force, from the leader: its files' text, which the page
/// fetches when the hash in `/api/status` changes.
async fn policy(State(d): State<Arc<Dashboard>>) -> Response {
    let admin = match d.admin() {
        Ok(a) => a,
        Err((code, why)) => return error(code, why),
    };
    let p = match admin
        .show_policy(Request::new(pb::ShowPolicyRequest {}))
        .await
    {
        Ok(p) => p.into_inner(),
        Err(e) => return failed(e),
    };
    let files: Vec<Value> = p
        .files
        .iter()
        .map(|f| json!({ "name": f.name, "text": f.text }))
        .collect();
    data(json!({ "hash": p.hash, "applied_unix_ms": p.applied_unix_ms, "files": files }))
}

async fn top(State(d): State<Arc<Dashboard>>) -> Response {
    let admin = match d.admin() {
        Ok(a) => a,
        Err((code, why)) => return error(code, why),
    };
    // The keys nearest their limits, and the keys unusual now (their
    // count in this bucket well above their own baseline).
    let mut lists = Vec::new();
    for unusual in [false, true] {
        let request = pb::TopRequest {
            check: pb::Check::Unspecified.into(),
            limit: TOP_KEYS,
            unusual,
        };
        match admin.top(Request::new(request)).await {
            Ok(t) => lists.push(t.into_inner().keys.iter().map(key_json).collect::<Vec<_>>()),
            Err(e) => return failed(e),
        }
    }
    let unusual = lists.pop().unwrap_or_default();
    let keys = lists.pop().unwrap_or_default();
    data(json!({ "keys": keys, "unusual": unusual }))
}

/// One key of a Top answer, for the page.
fn key_json(k: &pb::KeyCount) -> Value {
    let check = pb::Check::try_from(k.check)
        .ok()
        .and_then(|c| crate::check::Check::try_from(c).ok())
        .map_or("unknown", |c| c.name());
    json!({
        "check": check,
        "key": k.key,
        "count": k.count,
        "limit": k.limit,
        "percent": k.percent,
        "window_secs": k.window_secs,
        "enabled": k.enabled,
        "unusual": k.unusual,
        "bucket_count": k.bucket_count,
        "baseline": k.baseline,
    })
}

async fn history_json() -> Response {
    let mut samples = history::samples();
    // The totals now end the series, so that the charts move before the
    // next sample.
    samples.push(history::now(unix_ms()));
    data(json!({
        "every_secs": history::SAMPLE_EVERY.as_secs(),
        "samples": samples,
    }))
}

async fn refusals() -> Response {
    data(json!({ "refusals": history::latest_refusals() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn code(r: Result<(), Denied>) -> Option<StatusCode> {
        r.err().map(|(c, _)| c)
    }

    #[test]
    fn without_a_token_only_this_host_reads() {
        let d = Dashboard::new(None, false);
        let none = HeaderMap::new();
        assert_eq!(code(d.check(from("127.0.0.1"), &none)), None);
        assert_eq!(code(d.check(from("::1"), &none)), None);
        assert_eq!(code(d.check(from("::ffff:127.0.0.1"), &none)), None);
        for outside in ["10.1.2.3", "192.0.2.7", "2001:db8::1", "::ffff:10.1.2.3"] {
            assert_eq!(
                code(d.check(from(outside), &none)),
                Some(StatusCode::FORBIDDEN),
                "{outside}"
            );
        }
    }

    #[test]
    fn a_token_opens_the_api_to_whoever_gives_it() {
        let d = Dashboard::new(Some("tok-en".into()), true);
        for peer in ["127.0.0.1", "10.1.2.3"] {
            let p = from(peer);
            assert_eq!(code(d.check(p, &bearer("tok-en"))), None, "{peer}");
            let wrong = code(d.check(p, &bearer("tok-eN")));
            assert_eq!(wrong, Some(StatusCode::UNAUTHORIZED));
            let none = code(d.check(p, &HeaderMap::new()));
            assert_eq!(none, Some(StatusCode::UNAUTHORIZED));
        }
    }

    #[test]
    fn tls_without_a_token_serves_nobody() {
        let d = Dashboard::new(None, true);
        let denied = code(d.check(from("127.0.0.1"), &HeaderMap::new()));
        assert_eq!(denied, Some(StatusCode::FORBIDDEN));
    }
}
