//! The sendmail line a replay needs: `QUEUEID: from=<s>, size=N, ...,
//! nrcpts=N, ..., relay=host [addr]`, one per message accepted.

use std::net::IpAddr;

use crate::policy::address::parse_client_addr;

/// One accepted message.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub sender: &'a str,
    pub nrcpts: u32,
    pub host: &'a str,
    pub ip: IpAddr,
}

/// Reads a sendmail message line: `Ok(None)` for the other lines (the
/// `to=` lines, `relay=` lines without `from=`, ...).
pub fn message(msg: &str) -> Result<Option<Message<'_>>, &'static str> {
    let Some((_, rest)) = msg.split_once(": ") else {
        return Ok(None);
    };
    let Some(from) = rest.strip_prefix("from=") else {
        return Ok(None);
    };
    let sender = match from.strip_prefix('<') {
        Some(s) => &s[..s.find('>').ok_or("no > after the sender")?],
        None => from.split(',').next().unwrap_or(""),
    };
    let mut nrcpts = None;
    let mut relay = None;
    for field in rest.split(", ") {
        if let Some(n) = field.strip_prefix("nrcpts=") {
            nrcpts = Some(n.parse().map_err(|_| "nrcpts= is not a number")?);
        } else if let Some(r) = field.strip_prefix("relay=") {
            relay = Some(r);
        }
    }
    let nrcpts = nrcpts.ok_or("no nrcpts=")?;
    // A locally submitted message has no relay address: not a client.
    let Some(relay) = relay else {
        return Ok(None);
    };
    let (host, addr) = match relay.find('[') {
        Some(i) => {
            let end = relay[i..].find(']').ok_or("no ] after the address")? + i;
            (relay[..i].trim_end(), &relay[i + 1..end])
        }
        None => return Ok(None),
    };
    let ip = parse_client_addr(addr).ok_or("the relay address does not parse")?;
    Ok(Some(Message {
        sender,
        nrcpts,
        host,
        ip,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_lines() {
        let m = message("x1UN0aB1001234: from=<a@b.example>, size=812, class=0, nrcpts=2, msgid=<1@b>, proto=ESMTP, daemon=MTA, relay=web1.example [IPv6:2001:db8::1]")
            .unwrap()
            .unwrap();
        assert_eq!(m.sender, "a@b.example");
        assert_eq!(m.nrcpts, 2);
        assert_eq!(m.ip, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            message("x1UN0aB1001234: to=<c@d>, delay=00:00:01").unwrap(),
            None
        );
        assert!(message("x1: from=<a@b>, size=1, relay=h [1.2.3.4]").is_err());
        assert!(message("x1: from=<a@b>, nrcpts=1, relay=h [1.2.3]").is_err());
    }
}
