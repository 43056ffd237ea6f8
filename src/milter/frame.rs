//! Milter packet boundaries in the bytes an MTA sends: a 4-byte
//! big-endian length (command byte included), the command byte, the
//! payload. The guard reads them as they pass, to know when a command is
//! complete and to refuse a packet too large before indymilter allocates
//! its buffer (it takes up to 1 MiB on the length's word alone).

/// The largest packet accepted, in bytes, command byte included.
///
/// An MTA's largest packets are body chunks of at most 65,535 bytes
/// (MILTER_CHUNK_SIZE; larger ones only for a milter that asks for them
/// with SMFIP_MDS_*, which indymilter does not), and libmilter itself
/// refuses any packet over 65,535 bytes (MILTER_MAX_DATA_SIZE), so MTAs
/// keep to that. Twice that leaves room, and a header within Postfix's
/// header_size_limit (102,400 bytes) still fits should headers ever be
/// asked for. A connection that announces more is closed at once.
pub const MAX_PACKET: u32 = 128 * 1024;

/// A packet the MTA announced that the milter will not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Its length, in bytes, is over [`MAX_PACKET`].
    #[error("milter packet of {0} bytes announced, the most accepted is {MAX_PACKET}")]
    TooLarge(u32),
    /// A length of 0 (no command byte): libmilter refuses it too.
    #[error("milter packet of length 0")]
    Empty,
}

/// Where the reader stands in the stream of packets.
#[derive(Debug, Default)]
pub struct Framer {
    /// Bytes of the current length word received so far (0 to 3 while
    /// reading it).
    header: [u8; 4],
    header_len: usize,
    /// Bytes of the current packet still to come after its length word
    /// (command byte included); 0 between packets.
    remaining: u32,
    /// The current packet's command byte, once received.
    command: Option<u8>,
}

impl Framer {
    /// Takes the next bytes of the stream; calls `on_packet` with the
    /// command byte of each packet they complete.
    ///
    /// # Errors
    /// A length word over [`MAX_PACKET`] or of 0; the stream cannot be
    /// read on after that.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_packet: impl FnMut(u8),
    ) -> Result<(), FrameError> {
        while !bytes.is_empty() {
            if self.remaining == 0 {
                let take = (4 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len < 4 {
                    return Ok(());
                }
                let len = u32::from_be_bytes(self.header);
                if len == 0 {
                    return Err(FrameError::Empty);
                }
                if len > MAX_PACKET {
                    return Err(FrameError::TooLarge(len));
                }
                self.remaining = len;
                self.header_len = 0;
                continue;
            }
            if self.command.is_none() {
                self.command = Some(bytes[0]);
            }
            let take = (self.remaining as usize).min(bytes.len());
            self.remaining -= take as u32;
            bytes = &bytes[take..];
            if self.remaining == 0 {
                on_packet(self.command.take().expect("set above"));
            }
        }
        Ok(())
    }

    /// Whether part of a packet has arrived and the rest has not.
    pub fn in_packet(&self) -> bool {
        self.header_len > 0 || self.remaining > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(cmd: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = (payload.len() as u32 + 1).to_be_bytes().to_vec();
        p.push(cmd);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn packets_are_found_however_the_bytes_are_cut() {
        let mut stream = packet(b'O', &[0; 12]);
        stream.extend(packet(b'D', b"Cj\0relay\0"));
        stream.extend(packet(b'Q', b""));
        for cut in 1..stream.len() {
            let mut f = Framer::default();
            let mut seen = Vec::new();
            for chunk in stream.chunks(cut) {
                f.feed(chunk, |c| seen.push(c)).unwrap();
            }
            assert_eq!(seen, b"ODQ", "chunks of {cut}");
            assert!(!f.in_packet());
        }
    }

    #[test]
    fn a_half_sent_packet_is_in_progress() {
        let mut f = Framer::default();
        let p = packet(b'B', &[7; 100]);
        f.feed(&p[..2], |_| panic!("not complete")).unwrap();
        assert!(f.in_packet());
        f.feed(&p[2..50], |_| panic!("not complete")).unwrap();
        assert!(f.in_packet());
        let mut done = None;
        f.feed(&p[50..], |c| done = Some(c)).unwrap();
        assert_eq!(done, Some(b'B'));
        assert!(!f.in_packet());
    }

    #[test]
    fn the_largest_body_chunk_passes_and_more_than_the_cap_does_not() {
        let mut f = Framer::default();
        let mut n = 0;
        f.feed(&packet(b'B', &vec![0; 65_535]), |_| n += 1).unwrap();
        assert_eq!(n, 1);
        let at_cap = MAX_PACKET.to_be_bytes();
        assert_eq!(Framer::default().feed(&at_cap, |_| {}), Ok(()));
        let over = (MAX_PACKET + 1).to_be_bytes();
        assert_eq!(
            Framer::default().feed(&over, |_| {}),
            Err(FrameError::TooLarge(MAX_PACKET + 1))
        );
        // The attack: a 1 MiB packet, refused on its length word alone.
        let mib = (1u32 << 20).to_be_bytes();
        let mut f = Framer::default();
        assert_eq!(f.feed(&mib[..3], |_| {}), Ok(()));
        assert_eq!(
            f.feed(&mib[3..], |_| {}),
            Err(FrameError::TooLarge(1 << 20))
        );
        assert_eq!(
            Framer::default().feed(&[0, 0, 0, 0], |_| {}),
            Err(FrameError::Empty)
        );
    }
}
