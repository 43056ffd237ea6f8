//! What reaches a terminal or a log line: text that came from outside
//! (SMTP values, admin requests, policy files, peers' error messages)
//! shown with its control and other unprintable characters escaped, so
//! that it can neither start a line of its own nor send escape sequences to
//! a terminal; and output written without panicking when its reader has
//! gone (`relayrate policy check FILE | head`).
//!
//! Escapes: `\n`, `\r`, `\t`; other ASCII controls as `\x1b`; other
//! unprintable characters (C1 controls, line separators, bidirectional
//! overrides, ...) as `\u{85}`. Printable text, backslashes and quotes
//! included, passes as it is: the point is that nothing is hidden or
//! forged, not that the text can be read back exactly.

use std::fmt::{self, Write as _};
use std::io::Write as _;

/// Shows `T`'s text on one line, escaped: `format!("{}", Escaped(key))`.
/// Width and alignment flags are not applied; pad `Escaped(x).to_string()`.
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(Escaper::new(f, false), "{}", self.0)
    }
}

/// As [`Escaped`], but keeps line breaks and tabs: for text shown whole,
/// as a policy file.
pub struct EscapedText<T>(pub T);

impl<T: fmt::Display> fmt::Display for EscapedText<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(Escaper::new(f, true), "{}", self.0)
    }
}

/// A writer that escapes what passes through it.
pub struct Escaper<'a, W: ?Sized> {
    out: &'a mut W,
    /// Whether `\n` and `\t` pass unescaped.
    layout: bool,
}

impl<'a, W: fmt::Write + ?Sized> Escaper<'a, W> {
    pub fn new(out: &'a mut W, layout: bool) -> Self {
        Escaper { out, layout }
    }
}

impl<W: fmt::Write + ?Sized> fmt::Write for Escaper<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain_from = 0;
        for (i, c) in s.char_indices() {
            if is_plain(c, self.layout) {
                continue;
            }
            self.out.write_str(&s[plain_from..i])?;
            match c {
                '\n' => self.out.write_str("\\n")?,
                '\r' => self.out.write_str("\\r")?,
                '\t' => self.out.write_str("\\t")?,
                c if c.is_ascii() => write!(self.out, "\\x{:02x}", c as u32)?,
                c => write!(self.out, "\\u{{{:x}}}", c as u32)?,
            }
            plain_from = i + c.len_utf8();
        }
        self.out.write_str(&s[plain_from..])
    }
}

/// Printable: shown as it is.
fn is_plain(c: char, layout: bool) -> bool {
    match c {
        ' '..='~' => true,
        '\n' | '\t' => layout,
        c if c.is_ascii() => false,
        // std's own table of printable characters decides the rest.
        c => c.escape_debug().len() == 1,
    }
}

/// JSON text with every unprintable character written as a `\uXXXX`
/// escape: serde_json escapes ASCII controls but keeps, for instance, the
/// C1 control U+009B that some terminals read as an escape sequence. The
/// JSON means the same.
pub fn escape_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if is_plain(c, true) {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

/// Writes `text` to stdout. A reader that went away (`| head`, `| true`)
/// is not an error: the command ends with its own exit code.
pub fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Writes `text` to stderr, as [`print_out`] does to stdout.
pub fn print_err(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_printable_text_is_kept() {
        let forged = "alice\nWARN relayrate::refusal: refused\r\x1b[2J\x07\x7f";
        assert_eq!(
            Escaped(forged).to_string(),
            "alice\\nWARN relayrate::refusal: refused\\r\\x1b[2J\\x07\\x7f"
        );
        assert_eq!(
            Escaped("a \"b\" \\n é ü 日本").to_string(),
            "a \"b\" \\n é ü 日本"
        );
        assert_eq!(Escaped("").to_string(), "");
    }

    #[test]
    fn unprintable_unicode_is_escaped() {
        // C1 control, line separator, right-to-left override, BOM.
        assert_eq!(
            Escaped("a\u{85}b\u{2028}c\u{202e}d\u{feff}").to_string(),
            "a\\u{85}b\\u{2028}c\\u{202e}d\\u{feff}"
        );
    }

    #[test]
    fn text_keeps_its_lines_and_tabs() {
        assert_eq!(
            EscapedText("a\tb\nc\x1b[2J\r\n").to_string(),
            "a\tb\nc\\x1b[2J\\r\n"
        );
    }

    #[test]
    fn json_keeps_its_meaning_without_unprintable_characters() {
        let value = serde_json::json!({"key": "a\u{9b}2J\u{202e}b\u{e0001}\n\u{1b}"});
        let json = serde_json::to_string(&value).unwrap();
        let escaped = escape_json(&json);
        assert!(escaped.chars().all(|c| is_plain(c, false)), "{escaped}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&escaped).unwrap(),
            value
        );
        assert_eq!(escape_json("{\"a\": \"é\"}\n"), "{\"a\": \"é\"}\n");
    }

    #[test]
    fn anything_displayable_is_escaped() {
        let addr = format!("{}", Escaped(format_args!("{}:{}", "h\no", 7)));
        assert_eq!(addr, "h\\no:7");
    }
}
