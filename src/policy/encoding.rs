//! A policy file's bytes as text. Policy files are UTF-8, but old
//! ze-filter files often carry Latin-1 comments: a comment line that is
//! not UTF-8 is read with its stray bytes as Latin-1 (it is ignored
//! anyway). Anywhere else a byte that is not UTF-8 is an error at its
//! line and column.

use super::Diagnostic;

const BOM: &[u8] = b"\xef\xbb\xbf";

/// The text of file `name`; the error names the first byte that is not
/// UTF-8 outside a comment.
pub(super) fn decode(name: &str, bytes: &[u8]) -> Result<String, Diagnostic> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Ok(text.to_string());
    }
    let mut text = String::with_capacity(bytes.len() + bytes.len() / 8);
    for (i, line) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
        let error = match std::str::from_utf8(line) {
            Ok(s) => {
                text.push_str(s);
                continue;
            }
            Err(e) => e,
        };
        // Columns are counted as the parser counts them: after a BOM.
        let body = match i {
            0 => line.strip_prefix(BOM).unwrap_or(line),
            _ => line,
        };
        if is_comment(body) {
            for chunk in line.utf8_chunks() {
                text.push_str(chunk.valid());
                text.extend(chunk.invalid().iter().map(|b| char::from(*b)));
            }
            continue;
        }
        let at = error.valid_up_to();
        let before = &line[..at][line.len() - body.len()..];
        let column = String::from_utf8_lossy(before).chars().count() + 1;
        return Err(Diagnostic {
            file: name.into(),
            line: u32::try_from(i + 1).unwrap_or(u32::MAX),
            column: u32::try_from(column).unwrap_or(u32::MAX),
            message: format!(
                "invalid UTF-8 (byte 0x{:02X}): policy files are UTF-8, other \
                 encodings are read in # comments only",
                line[at]
            ),
        });
    }
    Ok(text)
}

/// Whether a line's first non-blank byte is `#`.
fn is_comment(line: &[u8]) -> bool {
    line.iter()
        .find(|b| !(b.is_ascii() && char::from(**b).is_whitespace()))
        .is_some_and(|b| *b == b'#')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin_1_in_a_comment_is_read_as_latin_1() {
        let text = decode("p", b"# caf\xe9 \xc3\xa9\n\t# \xff\nConnRate:default 5\n").unwrap();
        assert_eq!(text, "# café é\n\t# ÿ\nConnRate:default 5\n");
    }

    #[test]
    fn elsewhere_a_bad_byte_is_an_error_at_its_place() {
        let e = decode("p", b"# ok\nConnRate:\xc3\xa9x\xe9 5\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 12));
        assert!(e.message.starts_with("invalid UTF-8 (byte 0xE9)"), "{e}");
        // After a BOM, as the parser counts.
        let e = decode("p", b"\xef\xbb\xbfab\xe9\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 3));
        // A cut UTF-8 sequence at the very end.
        let e = decode("p", b"x\xc3").unwrap_err();
        assert_eq!((e.line, e.column), (1, 2));
    }
}
