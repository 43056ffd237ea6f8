//! How much may come in from outside, and how much of it an error message
//! shows. Everything a node takes from a milter, an operator or a peer is
//! held to these bounds where it enters (the `Limiter` and `Admin`
//! services, the Raft payloads), so no input makes a node work, allocate
//! or answer without bound.

use std::fmt;

/// Events in one `Decide` call of a milter (`limiter_client` sends at
/// most 1024).
pub const MAX_DECIDE_EVENTS: usize = 4096;
/// Events in one `Decide` log entry, or one read at the leader: a batch
/// gathers several calls (the batcher keeps below this).
pub const MAX_ENTRY_EVENTS: usize = 16 * 1024;
/// Bytes of the events of one `Decide` call or entry, as
/// `raft::validate::event_bytes` counts them. openraft sends up to 64
/// entries in one AppendEntries, which must stay below the 64 MiB of a
/// message between nodes.
pub const MAX_ENTRY_BYTES: usize = 512 * 1024;
/// Nodes whose events one `Decide` entry carries.
pub const MAX_SENDERS: usize = 1024;
/// Bytes of a short text: a client address or host name, an envelope
/// sender, an AUTH user, a counter key, who asked for a reset, a node's
/// address, a snapshot id. Longer than any SMTP command line (Postfix
/// reads 2048 bytes at most).
pub const MAX_FIELD_BYTES: usize = 4096;
/// Bytes of a domain name converted between its Unicode and `xn--` forms
/// (DNS's limit): a longer one is no domain, refused as a policy key and
/// kept as written in an envelope, so converting grows a value by at most
/// this much.
pub const MAX_DOMAIN_BYTES: usize = 253;
/// Bytes of a client address in any form an MTA writes it (`[IPv6:` and 8
/// groups of 4 hex digits and `]` are 46): a longer text is no address.
pub const MAX_ADDRESS_BYTES: usize = 64;
/// Latest leader stamp taken: the end of the year 9999, in ms.
pub const MAX_STAMP_MS: u64 = 253_402_300_799_999;
/// Files in one policy.
pub const MAX_POLICY_FILES: usize = 256;
/// Bytes of a policy file's name (a path, as given to `--policy` or
/// `relayratectl policy apply`): it starts every diagnostic, which must
/// fit in a gRPC status.
pub const MAX_POLICY_NAME_BYTES: usize = 1024;
/// Bytes of all the files of a policy together: what one Admin call
/// carries (tonic's 4 MiB).
pub const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;
/// Keys `top` may ask for.
pub const MAX_TOP: usize = 10_000;
/// Members of the cluster.
pub const MAX_MEMBERS: usize = 1024;
/// Bytes of a snapshot received from the leader.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;
/// Errors (and warnings) of a policy kept and shown; the rest are counted.
pub const MAX_DIAGNOSTICS: usize = 50;
/// Bytes of diagnostics one message shows past the first (always shown),
/// as [`status_len`] counts them. A gRPC status message travels in an
/// HTTP/2 header, and clients take 16 KiB of headers (hyper's default):
/// past that the client sees a protocol error and no message at all.
pub const MAX_STATUS_BYTES: usize = 12 * 1024;
/// Bytes of an outside value an error message shows.
pub const SHOWN_BYTES: usize = 200;

/// A value from outside as an error message shows it: in backquotes, cut
/// to about [`SHOWN_BYTES`] (on a character boundary) with an ellipsis
/// and its length in bytes when longer. The one way such a value goes into
/// a message.
pub fn cut(value: &str) -> Cut<'_> {
    Cut(value)
}

/// See [`cut`].
pub struct Cut<'a>(&'a str);

impl fmt::Display for Cut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.len() <= SHOWN_BYTES {
            return write!(f, "`{v}`");
        }
        let mut end = SHOWN_BYTES;
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "`{}…` ({} bytes)", &v[..end], v.len())
    }
}

/// The length of `text` as a gRPC status message on the wire: tonic
/// percent-encodes control characters, bytes past ASCII and
/// `` "#%<>`?{}`` and space, three bytes each.
pub fn status_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            0x21..=0x7e if !b"\"#%<>`?{}".contains(&b) => 1,
            _ => 3,
        })
        .sum()
}

/// Input refused: the message says what and why. Served as
/// `INVALID_ARGUMENT`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<Invalid> for tonic::Status {
    fn from(e: Invalid) -> tonic::Status {
        tonic::Status::invalid_argument(e.0)
    }
}

/// Refuses a text longer than `max` bytes.
pub fn text(what: &str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.len() <= max {
        return Ok(());
    }
    Err(Invalid(format!(
        "{what} too long (at most {max} bytes): {}",
        cut(value)
    )))
}

/// Refuses more than `max` items.
pub fn count(what: &str, n: usize, max: usize) -> Result<(), Invalid> {
    if n <= max {
        return Ok(());
    }
    Err(Invalid(format!("too many {what}: {n}, at most {max}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_shown_whole() {
        assert_eq!(cut("abc").to_string(), "`abc`");
        let edge = "x".repeat(SHOWN_BYTES);
        assert_eq!(cut(&edge).to_string(), format!("`{edge}`"));
    }

    #[test]
    fn long_values_are_cut_on_a_char_boundary_with_their_length() {
        // 'é' is two bytes: byte 200 falls inside one.
        let v = format!("a{}", "é".repeat(1_000));
        let shown = cut(&v).to_string();
        assert_eq!(shown, format!("`a{}…` (2001 bytes)", "é".repeat(99)));
        let huge = "9".repeat(3 << 20);
        assert!(cut(&huge).to_string().len() < SHOWN_BYTES + 32);
    }

    #[test]
    fn status_length_counts_what_is_percent_encoded() {
        assert_eq!(status_len("a:1:2"), 5);
        assert_eq!(status_len("a b"), 5);
        assert_eq!(status_len("`é`\n"), 15);
        // What tonic sends for the same text.
        let text = "f.txt:1:1: unknown check `x é` {#}\n?";
        let status = tonic::Status::invalid_argument(text);
        let mut header = tonic::metadata::MetadataMap::new().into_headers();
        status.add_header(&mut header).unwrap();
        assert_eq!(header["grpc-message"].len(), status_len(text));
    }

    #[test]
    fn limits_name_what_and_how_much() {
        assert!(text("sender", "a@b", 10).is_ok());
        let e = text("sender", &"a".repeat(11), 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sender too long (at most 10 bytes): `aaaaaaaaaaa`"
        );
        assert_eq!(
            count("events", 5, 4).unwrap_err().to_string(),
            "too many events: 5, at most 4"
        );
    }
}
