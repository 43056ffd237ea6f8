//! The processes' log lines, on stderr: for people, or one JSON object a
//! line for collectors. Every field and message of a line for people is
//! escaped as [`crate::terminal`] does, whatever it holds and whoever logs
//! it (relayrate, openraft, tonic): a value from outside with a line break
//! in it cannot write a line of its own, nor reach a terminal's escape
//! sequences. JSON escapes its strings itself; what it keeps unprintable
//! (C1 controls, bidirectional overrides) is written as `\uXXXX` too.
//!
//! Colours only when stderr is a terminal and `NO_COLOR` is not set, so
//! that a log file holds plain text that `grep` finds.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatFields, Writer};
use tracing_subscriber::EnvFilter;

use crate::terminal::{escape_json, Escaper};

/// Filter when `RELAYRATE_LOG` is not set. openraft's replication logs
/// every failed call to a peer that is down, twice a second, at ERROR and
/// WARN: muted here, and said once per change by
/// [`crate::raft::network::Reachability`].
pub const DEFAULT_FILTER: &str =
    "info,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=error";

/// Sends the process's logs to stderr, filtered by `RELAYRATE_LOG`; as
/// JSON objects if `json`. Call once, first thing.
pub fn init(json: bool) {
    let filter =
        EnvFilter::try_from_env("RELAYRATE_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours());
    if json {
        logs.json()
            .flatten_event(true)
            .with_writer(|| JsonSafe(std::io::stderr()))
            .init();
    } else {
        logs.fmt_fields(EscapedFields)
            .with_writer(std::io::stderr)
            .init();
    }
}

/// Whether log lines may be coloured: stderr is a terminal and `NO_COLOR`
/// (<https://no-color.org>) is unset or empty.
fn colours() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// A writer of whole JSON lines (the formatter writes each line in one
/// call) that escapes what JSON keeps unprintable.
struct JsonSafe<W>(W);

impl<W: std::io::Write> std::io::Write for JsonSafe<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(line) => self.0.write_all(escape_json(line).as_bytes())?,
            Err(_) => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Writes an event's fields as `message name=value ...`, each escaped.
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut line = FieldsLine {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut line);
        line.result
    }
}

struct FieldsLine<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl FieldsLine<'_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>) -> fmt::Result {
        let name = field.name();
        // Metadata of events from the `log` crate, shown by the line's head.
        if name.starts_with("log.") {
            return Ok(());
        }
        if !self.first {
            self.writer.write_char(' ')?;
        }
        self.first = false;
        if name != "message" {
            write!(self.writer, "{}=", name.trim_start_matches("r#"))?;
        }
        Escaper::new(&mut self.writer, false).write_fmt(value)
    }
}

impl Visit for FieldsLine<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // Strings in quotes, the message as it is: as tracing's own format.
        if self.result.is_ok() {
            self.result = match field.name() {
                "message" => self.write(field, format_args!("{value}")),
                _ => self.write(field, format_args!("{value:?}")),
            };
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = self.write(field, format_args!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn every_kind_of_field_is_escaped() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .finish();
        let forged = "x\nWARN relayrate::refusal: refused 1/1\x1b[2J";
        tracing::subscriber::with_default(subscriber, || {
            let err = std::io::Error::other(forged);
            tracing::warn!(
                shown = %forged,
                debugged = ?forged,
                plain = forged,
                error = &err as &dyn std::error::Error,
                "said {forged}"
            );
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        let escaped = "x\\nWARN relayrate::refusal: refused 1/1\\x1b[2J";
        assert!(text.contains(&format!("said {escaped} ")), "{text}");
        assert!(text.contains(&format!("shown={escaped} ")), "{text}");
        assert!(text.contains(&format!("error={escaped}")), "{text}");
        // Strings keep tracing's quotes and escapes.
        assert!(text.contains("plain=\"x\\nWARN"), "{text}");
        assert!(text.contains("debugged=\"x\\nWARN"), "{text}");
    }
}
