//! One SMTP connection as the milter sees it: who the client is, and the
//! per-connection counts MaxMsgs and MaxRcpt are decided on.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::engine::ConnId;
use crate::policy::Client;

/// Connection numbers: unique in this process, and unlikely to meet
/// another milter's on the same node (the start is time- and pid-based).
static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

fn next_conn() -> u64 {
    if NEXT_CONN.load(Ordering::Relaxed) == 0 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let seed = (nanos << 16) ^ u64::from(std::process::id());
        let _ = NEXT_CONN.compare_exchange(0, seed.max(1), Ordering::Relaxed, Ordering::Relaxed);
    }
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

#[derive(Debug)]
pub struct Session {
    /// The lease of this connection (the node fills in the owner).
    pub conn: ConnId,
    pub client: Client,
    /// MAIL commands in this connection, the current one included; never
    /// reset inside the connection (MaxMsgs).
    pub msgs_in_conn: u32,
    /// RCPT commands in the current message (MaxRcpt).
    pub rcpts_in_msg: u32,
    /// The MTA's queue id of the current message, for the log.
    pub queue_id: Option<String>,
    /// Whether the cluster was told of this connection (its Connect was
    /// sent), so that its Close is sent too.
    pub announced: bool,
    /// The current message's slots in the message rates, taken at MAIL
    /// FROM, until it reaches its end or is given up.
    pub reserved: Option<Reserved>,
    /// The give-back of an aborted message, on its way in the background;
    /// the session's next MAIL waits for it (see `on_mail`).
    pub giving_back: Option<tokio::task::JoinHandle<()>>,
}

/// A message's slots in the message rates: who took them, and when.
#[derive(Debug)]
pub struct Reserved {
    /// The client as it was at MAIL FROM (sender and AUTH user included).
    pub client: Client,
    pub at: Instant,
}

impl Session {
    /// `name` is `{client_name}` or the host name of connect; Postfix
    /// gives `[1.2.3.4]` or `unknown` for a client without one, sendmail
    /// `[1.2.3.4]` or `[IPv6:2001:db8::6]`.
    pub fn new(ip: Option<IpAddr>, name: &str) -> Session {
        let mut client = ip.map(Client::from_ip).unwrap_or_default();
        if !name.starts_with('[') {
            client = client.with_host(name);
        }
        Session {
            conn: ConnId {
                owner: 0,
                conn: next_conn(),
            },
            client,
            msgs_in_conn: 0,
            rcpts_in_msg: 0,
            queue_id: None,
            announced: false,
            reserved: None,
            giving_back: None,
        }
    }

    /// The current message took its slots (its MAIL was allowed); returns
    /// an earlier message's reservation that was never settled, to give
    /// back.
    pub fn reserve(&mut self) -> Option<Reserved> {
        self.reserved.replace(Reserved {
            client: self.client.clone(),
            at: Instant::now(),
        })
    }

    /// RSET, abort or a lost connection: the message counts start again,
    /// and a reservation not settled by an end of message is returned, to
    /// give back.
    pub fn abort_message(&mut self) -> Option<Reserved> {
        self.rcpts_in_msg = 0;
        self.reserved.take()
    }

    /// MAIL FROM: a new message, from `sender`, by AUTH user `auth`.
    pub fn begin_message(
        &mut self,
        sender: Option<&str>,
        auth: Option<&str>,
        queue_id: Option<String>,
    ) {
        self.msgs_in_conn += 1;
        self.rcpts_in_msg = 0;
        self.client.sender = None;
        self.client.auth = None;
        if let Some(s) = sender {
            self.client = std::mem::take(&mut self.client).with_sender(s);
        }
        if let Some(a) = auth {
            self.client = std::mem::take(&mut self.client).with_auth(a);
        }
        self.queue_id = queue_id;
    }

    /// End of message: the message counts start again, and its
    /// reservation stands.
    pub fn end_message(&mut self) {
        self.rcpts_in_msg = 0;
        self.reserved = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_connection_and_per_message() {
        let mut s = Session::new(Some("10.0.0.1".parse().unwrap()), "Web1.Example.com");
        assert_eq!(s.client.host.as_deref(), Some("web1.example.com"));
        s.begin_message(Some("<A@B.example>"), Some("Alice"), None);
        s.rcpts_in_msg += 2;
        s.end_message();
        s.begin_message(Some("<>"), None, Some("Q1".into()));
        assert_eq!((s.msgs_in_conn, s.rcpts_in_msg), (2, 0));
        // The null sender is a sender, counted under `<>`.
        assert_eq!(
            (s.client.sender.as_deref(), s.client.auth.as_deref()),
            (Some("<>"), None)
        );
        let unnamed = Session::new(Some("10.0.0.2".parse().unwrap()), "[10.0.0.2]");
        assert_eq!(unnamed.client.host, None);
        // sendmail's literal of an IPv6 client is no host name either.
        let v6 = Session::new(Some("2001:db8::6".parse().unwrap()), "[IPv6:2001:db8::6]");
        assert_eq!(v6.client.host, None);
        assert_ne!(unnamed.conn, s.conn);
    }
}
