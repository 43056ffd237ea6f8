//! The Postfix lines a replay needs, from `smtpd` and `qmgr`. Other
//! messages of these programs are [`Line::Other`]; a line of a form we
//! read that does not parse is an error naming what is wrong.

use std::net::IpAddr;

use crate::policy::address::parse_client_addr;

/// What one `smtpd` or `qmgr` message says.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// smtpd: `connect from host[addr]`.
    Connect { host: &'a str, ip: IpAddr },
    /// smtpd: `disconnect from host[addr] ...`.
    Disconnect,
    /// smtpd: `QUEUEID: client=host[addr][, sasl_method=M, sasl_username=U]`:
    /// a message got a queue file.
    Client {
        queue_id: &'a str,
        auth: Option<&'a str>,
    },
    /// smtpd: `NOQUEUE|QUEUEID: [milter-]reject: STAGE from host[addr]: ...;
    /// from=<s> ...`: a command refused (by the milter or by Postfix).
    Reject {
        queue_id: Option<&'a str>,
        stage: Stage,
        sender: Option<&'a str>,
    },
    /// qmgr: `QUEUEID: from=<s>, size=N, nrcpt=N (queue active)`.
    Queued {
        queue_id: &'a str,
        sender: &'a str,
        nrcpt: u32,
    },
    /// Anything else of these programs.
    Other,
}

/// The SMTP stage of a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    Other,
}

/// `host[addr]` at the start of `text`: the host, the address and the rest.
fn host_addr(text: &str) -> Result<(&str, Option<IpAddr>, &str), &'static str> {
    let open = text.find('[').ok_or("no [address] after the host")?;
    let close = text[open..].find(']').ok_or("no ] after the address")? + open;
    let addr = &text[open + 1..close];
    let ip = if addr == "unknown" {
        None
    } else {
        Some(parse_client_addr(addr).ok_or("the address does not parse")?)
    };
    Ok((&text[..open], ip, &text[close + 1..]))
}

/// The text between `<` and `>` after `key` (`from=`), if `key` is there.
fn angle<'a>(text: &'a str, key: &str) -> Result<Option<&'a str>, &'static str> {
    let Some(at) = text.find(key) else {
        return Ok(None);
    };
    let rest = text[at + key.len()..]
        .strip_prefix('<')
        .ok_or("no < after from=")?;
    let end = rest.find('>').ok_or("no > after the sender")?;
    Ok(Some(&rest[..end]))
}

/// A queue id: what precedes `: ` at the start (letters and digits).
fn queue_id(text: &str) -> Option<(&str, &str)> {
    let (id, rest) = text.split_once(": ")?;
    (!id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some((id, rest))
}

/// Reads the message of an `smtpd` line.
pub fn smtpd(msg: &str) -> Result<Line<'_>, &'static str> {
    if let Some(rest) = msg.strip_prefix("connect from ") {
        let (host, ip, _) = host_addr(rest)?;
        return Ok(match ip {
            Some(ip) => Line::Connect { host, ip },
            None => Line::Other,
        });
    }
    if msg.starts_with("disconnect from ") {
        return Ok(Line::Disconnect);
    }
    let Some((id, rest)) = queue_id(msg) else {
        return Ok(Line::Other);
    };
    let queue = (id != "NOQUEUE").then_some(id);
    if let Some(client) = rest.strip_prefix("client=") {
        let queue_id = queue.ok_or("client= without a queue id")?;
        host_addr(client)?;
        let auth = client
            .split(", ")
            .find_map(|f| f.strip_prefix("sasl_username="));
        return Ok(Line::Client { queue_id, auth });
    }
    let reject = rest
        .strip_prefix("reject: ")
        .or_else(|| rest.strip_prefix("milter-reject: "));
    if let Some(r) = reject {
        let (stage, after) = r.split_once(" from ").ok_or("no `from` in the reject")?;
        let stage = match stage {
            "CONNECT" => Stage::Connect,
            "EHLO" | "HELO" => Stage::Helo,
            "MAIL" => Stage::Mail,
            "RCPT" => Stage::Rcpt,
            "DATA" | "END-OF-MESSAGE" => Stage::Data,
            _ => Stage::Other,
        };
        host_addr(after)?;
        // The envelope follows the reply: `...; from=<s> to=<r> proto=...`.
        let envelope = after.rsplit_once("; ").map_or("", |(_, e)| e);
        let sender = angle(envelope, "from=")?;
        return Ok(Line::Reject {
            queue_id: queue,
            stage,
            sender,
        });
    }
    Ok(Line::Other)
}

/// Reads the message of a `qmgr` line.
pub fn qmgr(msg: &str) -> Result<Line<'_>, &'static str> {
    let Some((queue_id, rest)) = queue_id(msg) else {
        return Ok(Line::Other);
    };
    if !rest.starts_with("from=") {
        return Ok(Line::Other);
    }
    let sender = angle(rest, "from=")?.ok_or("no sender")?;
    let nrcpt = rest
        .split(", ")
        .find_map(|f| f.strip_prefix("nrcpt="))
        .ok_or("no nrcpt=")?;
    let nrcpt = nrcpt.split(' ').next().unwrap_or("");
    let nrcpt = nrcpt.parse().map_err(|_| "nrcpt= is not a number")?;
    Ok(Line::Queued {
        queue_id,
        sender,
        nrcpt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lines_of_a_session() {
        assert_eq!(
            smtpd("connect from web1.example[192.0.2.1]").unwrap(),
            Line::Connect {
                host: "web1.example",
                ip: "192.0.2.1".parse().unwrap()
            }
        );
        assert_eq!(
            smtpd(
                "4ZxY1234AB: client=web1.example[192.0.2.1], sasl_method=PLAIN, sasl_username=joe"
            )
            .unwrap(),
            Line::Client {
                queue_id: "4ZxY1234AB",
                auth: Some("joe")
            }
        );
        assert_eq!(
            smtpd("NOQUEUE: milter-reject: MAIL from h[192.0.2.1]: 451 4.3.2 Message rate too high (5/5 in 600s) - try again later; from=<a@b.example> proto=ESMTP helo=<h>")
                .unwrap(),
            Line::Reject { queue_id: None, stage: Stage::Mail, sender: Some("a@b.example") }
        );
        assert_eq!(
            qmgr("4ZxY1234AB: from=<a@b.example>, size=300, nrcpt=3 (queue active)").unwrap(),
            Line::Queued {
                queue_id: "4ZxY1234AB",
                sender: "a@b.example",
                nrcpt: 3
            }
        );
        assert_eq!(
            smtpd("disconnect from h[192.0.2.1] ehlo=1 mail=1 quit=1").unwrap(),
            Line::Disconnect
        );
        assert_eq!(
            smtpd("lost connection after RCPT from h[192.0.2.1]").unwrap(),
            Line::Other
        );
        assert_eq!(qmgr("4ZxY1234AB: removed").unwrap(), Line::Other);
    }

    #[test]
    fn broken_lines_are_errors() {
        assert!(smtpd("connect from h[192.0.2").is_err());
        assert!(smtpd("connect from h[192.0.2.300]").is_err());
        assert!(qmgr("4ZxY1234AB: from=<a@b>, size=3").is_err());
        assert!(qmgr("4ZxY1234AB: from=<a@b>, size=3, nrcpt=x (queue active)").is_err());
        assert!(
            smtpd("NOQUEUE: reject: RCPT from h[192.0.2.1]: 450; from=<a@b proto=ESMTP").is_err()
        );
    }
}
