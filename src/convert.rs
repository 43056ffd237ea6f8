//! Conversions between the gRPC messages of `proto/relayrate/v1` and the
//! engine's types, and the checks of the requests the `Limiter` and
//! `Admin` services take. A message that cannot be converted, or is out of
//! [`crate::bounds`], is refused with `InvalidArgument`, never panicked on.

use tonic::Status;

use crate::bounds::{count, cut, text, MAX_DECIDE_EVENTS, MAX_FIELD_BYTES, MAX_TOP};
use crate::check::Check;
use crate::engine::{ConnId, CounterKey, Event, Refusal, Verdict};
use crate::inspect::parse_key;
use crate::policy::{Client, PolicyFile};
use crate::proto::v1 as pb;
use crate::raft::validate;

impl From<Check> for pb::Check {
    fn from(c: Check) -> pb::Check {
        match c {
            Check::ConnRate => pb::Check::ConnRate,
            Check::ConnOpen => pb::Check::ConnOpen,
            Check::MaxRcpt => pb::Check::MaxRcpt,
            Check::MsgRate => pb::Check::MsgRate,
            Check::MaxMsgs => pb::Check::MaxMsgs,
            Check::RcptRate => pb::Check::RcptRate,
            Check::MsgRateFrom => pb::Check::MsgRateFrom,
            Check::RcptRateFrom => pb::Check::RcptRateFrom,
            Check::MaxRcptFrom => pb::Check::MaxRcptFrom,
            Check::MsgRateAuth => pb::Check::MsgRateAuth,
            Check::RcptRateAuth => pb::Check::RcptRateAuth,
        }
    }
}

impl TryFrom<pb::Check> for Check {
    type Error = Status;

    fn try_from(c: pb::Check) -> Result<Check, Status> {
        Ok(match c {
            pb::Check::Unspecified => return Err(Status::invalid_argument("check unspecified")),
            pb::Check::ConnRate => Check::ConnRate,
            pb::Check::ConnOpen => Check::ConnOpen,
            pb::Check::MaxRcpt => Check::MaxRcpt,
            pb::Check::MsgRate => Check::MsgRate,
            pb::Check::MaxMsgs => Check::MaxMsgs,
            pb::Check::RcptRate => Check::RcptRate,
            pb::Check::MsgRateFrom => Check::MsgRateFrom,
            pb::Check::RcptRateFrom => Check::RcptRateFrom,
            pb::Check::MaxRcptFrom => Check::MaxRcptFrom,
            pb::Check::MsgRateAuth => Check::MsgRateAuth,
            pb::Check::RcptRateAuth => Check::RcptRateAuth,
        })
    }
}

impl From<&Client> for pb::Client {
    fn from(c: &Client) -> pb::Client {
        pb::Client {
            ip: c.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            host: c.host.clone().unwrap_or_default(),
            sender: c.sender.clone().unwrap_or_default(),
            auth: c.auth.clone().unwrap_or_default(),
        }
    }
}

impl TryFrom<Option<pb::Client>> for Client {
    type Error = Status;

    fn try_from(c: Option<pb::Client>) -> Result<Client, Status> {
        let c = c.ok_or_else(|| Status::invalid_argument("event without a client"))?;
        for (what, value) in [
            ("client ip", &c.ip),
            ("client host", &c.host),
            ("client sender", &c.sender),
            ("client auth", &c.auth),
        ] {
            text(what, value, MAX_FIELD_BYTES)?;
        }
        let mut client = if c.ip.is_empty() {
            Client::default()
        } else {
            let ip = crate::policy::parse_client_addr(&c.ip)
                .ok_or_else(|| Status::invalid_argument(format!("bad client ip {}", cut(&c.ip))))?;
            Client::from_ip(ip)
        };
        if !c.host.is_empty() {
            client = client.with_host(&c.host);
        }
        if !c.sender.is_empty() {
            client = client.with_sender(&c.sender);
        }
        if !c.auth.is_empty() {
            client = client.with_auth(&c.auth);
        }
        Ok(client)
    }
}

fn conn_id(c: Option<pb::ConnId>, owner: u64) -> Result<ConnId, Status> {
    let c = c.ok_or_else(|| Status::invalid_argument("event without a connection id"))?;
    Ok(ConnId {
        owner,
        conn: c.conn,
    })
}

/// An event from a milter. Leases are owned by the node that takes them,
/// so `owner` (this node's incarnation) replaces what the caller sent.
pub fn event_from_pb(e: pb::Event, owner: u64) -> Result<Event, Status> {
    use pb::event::Kind;
    let kind = e
        .kind
        .ok_or_else(|| Status::invalid_argument("event without a kind"))?;
    Ok(match kind {
        Kind::Connect(c) => Event::Connect {
            conn: conn_id(c.conn, owner)?,
            client: c.client.try_into()?,
        },
        Kind::Recheck(r) => Event::Recheck {
            client: r.client.try_into()?,
        },
        Kind::Mail(m) => Event::Mail {
            client: m.client.try_into()?,
            msgs_in_conn: m.msgs_in_conn,
        },
        Kind::Rcpt(r) => {
            text("rcpt", &r.rcpt, MAX_FIELD_BYTES)?;
            Event::Rcpt {
                client: r.client.try_into()?,
                rcpts_in_msg: r.rcpts_in_msg,
            }
        }
        Kind::GiveBack(g) => Event::GiveBack {
            client: g.client.try_into()?,
            held_secs: g.held_secs,
        },
        Kind::Close(c) => Event::Close {
            conn: conn_id(c.conn, owner)?,
        },
    })
}

/// The events of a `Decide` call: at most [`MAX_DECIDE_EVENTS`], each
/// converted with [`event_from_pb`], and not larger together than a log
/// entry takes. The ids a caller sets are ignored: the node numbers the
/// events itself.
pub fn decide_events(r: pb::DecideRequest, owner: u64) -> Result<Vec<Event>, Status> {
    count("events in one call", r.events.len(), MAX_DECIDE_EVENTS)?;
    let events = r
        .events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            event_from_pb(e, owner)
                .map_err(|s| Status::invalid_argument(format!("event {i}: {}", s.message())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    validate::events(events.iter())?;
    Ok(events)
}

/// An optional check of an Admin request: `CHECK_UNSPECIFIED` means every
/// check.
pub fn check_filter(raw: i32) -> Result<Option<Check>, Status> {
    match pb::Check::try_from(raw) {
        Ok(pb::Check::Unspecified) => Ok(None),
        Ok(c) => Check::try_from(c).map(Some),
        Err(_) => Err(Status::invalid_argument(format!("unknown check {raw}"))),
    }
}

/// A counter key an operator typed (`show`, `reset`).
pub fn key_from_pb(key: &str, what: &str) -> Result<CounterKey, Status> {
    text("key", key, MAX_FIELD_BYTES)?;
    if key.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{what} needs a key")));
    }
    Ok(parse_key(key))
}

/// `top`: the check (or all) and how many keys, 10 when not said.
pub fn top_from_pb(r: &pb::TopRequest) -> Result<(Option<Check>, usize), Status> {
    let check = check_filter(r.check)?;
    let n = match r.limit {
        0 => 10,
        n => n as usize,
    };
    count("keys asked of top", n, MAX_TOP)?;
    Ok((check, n))
}

/// `reset`: the key, the check (or all), and who asked as they said.
pub fn reset_from_pb(r: &pb::ResetRequest) -> Result<(CounterKey, Option<Check>), Status> {
    let key = key_from_pb(&r.key, "reset")?;
    text("requested_by", &r.requested_by, MAX_FIELD_BYTES)?;
    Ok((key, check_filter(r.check)?))
}

/// `add-node`: an id > 0 and the address the other nodes reach it at.
pub fn add_node_from_pb(r: &pb::AddNodeRequest) -> Result<(), Status> {
    validate::node_addr(&r.addr)?;
    if r.id == 0 || r.addr.trim().is_empty() {
        return Err(Status::invalid_argument(
            "add-node needs an id > 0 and an address",
        ));
    }
    Ok(())
}

/// `policy apply`: at least one file, within the bounds of a policy.
pub fn policy_files_from_pb(r: pb::ApplyPolicyRequest) -> Result<Vec<PolicyFile>, Status> {
    let files: Vec<PolicyFile> = r.files.into_iter().map(PolicyFile::from).collect();
    if files.is_empty() {
        return Err(Status::invalid_argument("no policy file given"));
    }
    validate::policy_files(&files)?;
    Ok(files)
}

/// An event as a milter sends it (the node fills in the ids).
pub fn event_to_pb(e: &Event) -> pb::Event {
    use pb::event::Kind;
    let conn = |c: &ConnId| {
        Some(pb::ConnId {
            owner: c.owner,
            conn: c.conn,
        })
    };
    let kind = match e {
        Event::Connect { conn: c, client } => Kind::Connect(pb::Connect {
            conn: conn(c),
            client: Some(client.into()),
        }),
        Event::Recheck { client } => Kind::Recheck(pb::Recheck {
            client: Some(client.into()),
        }),
        Event::Mail {
            client,
            msgs_in_conn,
        } => Kind::Mail(pb::Mail {
            client: Some(client.into()),
            msgs_in_conn: *msgs_in_conn,
        }),
        Event::Rcpt {
            client,
            rcpts_in_msg,
        } => Kind::Rcpt(pb::Rcpt {
            client: Some(client.into()),
            rcpts_in_msg: *rcpts_in_msg,
            rcpt: String::new(),
        }),
        Event::GiveBack { client, held_secs } => Kind::GiveBack(pb::GiveBack {
            client: Some(client.into()),
            held_secs: *held_secs,
        }),
        Event::Close { conn: c } => Kind::Close(pb::Close { conn: conn(c) }),
    };
    pb::Event {
        origin: 0,
        seq: 0,
        kind: Some(kind),
    }
}

impl From<&Verdict> for pb::Verdict {
    fn from(v: &Verdict) -> pb::Verdict {
        match v {
            Verdict::Allow => pb::Verdict {
                allowed: true,
                ..Default::default()
            },
            Verdict::Refuse(r) => {
                let reply = r.reply();
                pb::Verdict {
                    allowed: false,
                    check: pb::Check::from(r.check) as i32,
                    count: r.count,
                    limit: r.limit,
                    reply: Some(pb::Reply {
                        code: u32::from(reply.code),
                        enhanced: reply.enhanced.to_string(),
                        text: reply.text,
                    }),
                    retry_after_secs: r.retry_after,
                    window_secs: r.window_secs.unwrap_or(0),
                }
            }
        }
    }
}

impl TryFrom<&pb::Verdict> for Verdict {
    type Error = Status;

    fn try_from(v: &pb::Verdict) -> Result<Verdict, Status> {
        if v.allowed {
            return Ok(Verdict::Allow);
        }
        let check = pb::Check::try_from(v.check)
            .map_err(|_| Status::invalid_argument("unknown check"))?
            .try_into()?;
        Ok(Verdict::Refuse(Refusal {
            check,
            count: v.count,
            limit: v.limit,
            window_secs: (v.window_secs > 0).then_some(v.window_secs),
            retry_after: v.retry_after_secs,
        }))
    }
}

impl From<&PolicyFile> for pb::PolicyFile {
    fn from(f: &PolicyFile) -> pb::PolicyFile {
        pb::PolicyFile {
            name: f.name.clone(),
            text: f.text.clone(),
        }
    }
}

impl From<pb::PolicyFile> for PolicyFile {
    fn from(f: pb::PolicyFile) -> PolicyFile {
        PolicyFile {
            name: f.name,
            text: f.text,
        }
    }
}
