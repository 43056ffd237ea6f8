//! Lines of a log file, plain or gzipped (told by the gzip magic bytes, not
//! the name), each at most [`MAX_LINE_BYTES`]; a longer line is cut there
//! and flagged.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

/// The longest line kept, in bytes. Mail log lines are well under 2 KiB.
pub const MAX_LINE_BYTES: usize = 8192;

/// A log file read line by line.
pub struct Lines {
    input: Box<dyn BufRead>,
    buf: Vec<u8>,
}

/// Opens `path`; a file that starts with the gzip magic bytes is
/// decompressed as it is read (several members, as `cat a.gz b.gz`).
pub fn open(path: &Path) -> io::Result<Lines> {
    let mut file = BufReader::with_capacity(256 * 1024, File::open(path)?);
    let gzip = file.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let input: Box<dyn BufRead> = if gzip {
        Box::new(BufReader::with_capacity(
            256 * 1024,
            MultiGzDecoder::new(file),
        ))
    } else {
        Box::new(file)
    };
    Ok(Lines {
        input,
        buf: Vec::with_capacity(MAX_LINE_BYTES),
    })
}

impl Lines {
    /// A reader over any input (tests).
    pub fn from_reader(input: impl Read + 'static) -> Lines {
        Lines {
            input: Box::new(BufReader::new(input)),
            buf: Vec::with_capacity(MAX_LINE_BYTES),
        }
    }

    /// The next line without its end, and whether it was cut at
    /// [`MAX_LINE_BYTES`]; `None` at the end of the file. Bytes that are
    /// not UTF-8 are replaced.
    pub fn next_line(&mut self) -> io::Result<Option<(std::borrow::Cow<'_, str>, bool)>> {
        self.buf.clear();
        let mut cut = false;
        let mut any = false;
        loop {
            let chunk = self.input.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            let room = MAX_LINE_BYTES - self.buf.len();
            if take > room {
                cut = true;
            }
            self.buf.extend_from_slice(&chunk[..take.min(room)]);
            self.input.consume(take + usize::from(done));
            if done {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        Ok(Some((String::from_utf8_lossy(&self.buf), cut)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_and_flagged() {
        let mut text = "a".repeat(MAX_LINE_BYTES + 10);
        text.push_str("\nb\r\nc");
        let mut lines = Lines::from_reader(io::Cursor::new(text.into_bytes()));
        let (l, cut) = lines.next_line().unwrap().unwrap();
        assert_eq!((l.len(), cut), (MAX_LINE_BYTES, true));
        assert_eq!(lines.next_line().unwrap().unwrap().0, "b");
        assert_eq!(lines.next_line().unwrap().unwrap().0, "c");
        assert!(lines.next_line().unwrap().is_none());
    }
}
