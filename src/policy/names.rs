//! Sender, domain and user names in the one form keys are kept in, for a
//! policy key and an envelope value alike, so that both meet: ASCII
//! letters in lower case (as ever: other letters keep their case, so a
//! local part's rules do not change); a domain with a non-ASCII label, or
//! an A-label, as its lower-case A-label (`xn--...`, by the `idna` crate's
//! UTS #46 processing), so that `bücher.example` and
//! `xn--bcher-kva.example` are one key; the null sender as `<>`.

use std::borrow::Cow;

use crate::bounds::MAX_DOMAIN_BYTES;

/// The key of the null sender (`MAIL FROM:<>`).
pub const NULL_SENDER: &str = "<>";

/// A domain as keys keep it; `None` when it has a non-ASCII or `xn--`
/// label and is not a valid internationalized domain name (of at most 253
/// bytes in either form).
pub fn domain(raw: &str) -> Option<Cow<'_, str>> {
    let needs_idna = !raw.is_ascii()
        || raw
            .split('.')
            .any(|l| l.len() >= 4 && l[..4].eq_ignore_ascii_case("xn--"));
    if !needs_idna {
        return Some(if raw.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(raw.to_ascii_lowercase())
        } else {
            Cow::Borrowed(raw)
        });
    }
    // A name past DNS's 253 bytes is no domain: refused as a key, kept as
    // written in an envelope (which bounds how much a value can grow here).
    if raw.len() > MAX_DOMAIN_BYTES {
        return None;
    }
    idna::domain_to_ascii(raw)
        .ok()
        .filter(|d| d.len() <= MAX_DOMAIN_BYTES)
        .map(Cow::Owned)
}

/// An envelope sender (with or without its angle brackets) as keys keep
/// it: `<>` for the null sender, else `local@domain` with the domain as
/// [`domain`] gives it. A domain that is not valid is kept as written (in
/// lower case): it is still counted, under its own key.
pub fn envelope_sender(raw: &str) -> String {
    let s = raw.trim();
    let s = s.strip_prefix('<').unwrap_or(s);
    let s = s.strip_suffix('>').unwrap_or(s);
    if s.is_empty() {
        return NULL_SENDER.to_string();
    }
    match s.rsplit_once('@') {
        Some((local, dom)) => {
            let dom = dom.trim_end_matches('.');
            let dom = domain(dom).unwrap_or(Cow::Owned(dom.to_ascii_lowercase()));
            format!("{}@{dom}", local.to_ascii_lowercase())
        }
        None => s.to_ascii_lowercase(),
    }
}

/// A client host name as keys keep it: without its trailing dot, the
/// domain form of [`domain`] (as written, in lower case, if not valid).
pub fn host(raw: &str) -> String {
    let h = raw.trim_end_matches('.');
    domain(h).map_or_else(|| h.to_ascii_lowercase(), Cow::into_owned)
}

/// The first character a key may not hold: a control character (C0, DEL,
/// C1) or white space of any kind.
pub fn bad_char(text: &str) -> Option<char> {
    text.chars().find(|c| c.is_control() || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_meet_in_one_form() {
        assert_eq!(domain("Example.ORG").unwrap(), "example.org");
        assert_eq!(domain("bücher.example").unwrap(), "xn--bcher-kva.example");
        assert_eq!(domain("BÜCHER.example").unwrap(), "xn--bcher-kva.example");
        assert_eq!(
            domain("XN--BCHER-KVA.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert!(domain("xn--zz-.example").is_none());
        assert!(domain(&format!("{}.example", "ü.".repeat(100))).is_none());
        assert!(matches!(domain("plain.example"), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn envelope_senders_keep_the_local_part_rule() {
        assert_eq!(envelope_sender("<>"), "<>");
        assert_eq!(envelope_sender(""), "<>");
        assert_eq!(envelope_sender(" <A@B.Example> "), "a@b.example");
        // Only ASCII letters are lowered in a local part, as before.
        assert_eq!(
            envelope_sender("<JÖrg@Bücher.example.>"),
            "jÖrg@xn--bcher-kva.example"
        );
        assert_eq!(envelope_sender("<x@xn--zz-.Example>"), "x@xn--zz-.example");
        assert_eq!(envelope_sender("<Postmaster>"), "postmaster");
    }
}
