//! A client address in every form an MTA gives one, read in one place:
//! the address of the milter's connect, `{client_addr}`, and a host name
//! that is an address literal (`[1.2.3.4]`). sendmail (8.15 and later)
//! writes IPv6 as `IPv6:2001:db8::6`, compressed or in all 8 groups, and
//! its literal host names as `[IPv6:2001:db8::6]`; Postfix writes the
//! plain address. All are the same client, and so are an IPv4-mapped IPv6
//! address and its IPv4 address (see [`canonical_ip`](super::canonical_ip)).

use std::net::IpAddr;

use crate::bounds::MAX_ADDRESS_BYTES;

/// The client address `text` names, IPv4-mapped IPv6 as IPv4; `None` if
/// it is no address (a host name, `unknown`, a form not listed above).
pub fn parse_client_addr(text: &str) -> Option<IpAddr> {
    if text.len() > MAX_ADDRESS_BYTES {
        return None;
    }
    let text = text.trim();
    let text = match text.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']')?,
        None => text,
    };
    let (v6_tag, rest) = match text.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => (true, &text[5..]),
        _ => (false, text),
    };
    let ip: IpAddr = rest.parse().ok()?;
    if v6_tag && ip.is_ipv4() {
        return None;
    }
    Some(super::canonical_ip(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendmail_and_postfix_forms_are_one_client() {
        let want: IpAddr = "2001:db8::6".parse().unwrap();
        for form in [
            "2001:db8::6",
            "IPv6:2001:db8::6",
            "IPV6:2001:0DB8:0:0:0:0:0:6",
            "[IPv6:2001:db8::6]",
        ] {
            assert_eq!(parse_client_addr(form), Some(want), "{form}");
        }
        assert_eq!(
            parse_client_addr("::ffff:10.0.0.1"),
            Some("10.0.0.1".parse().unwrap())
        );
        for bad in [
            "IPv6:10.0.0.1",
            "[10.0.0.1",
            "unknown",
            "IPv6",
            &"1".repeat(65),
        ] {
            assert_eq!(parse_client_addr(bad), None, "{bad}");
        }
    }
}
