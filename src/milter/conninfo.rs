//! The MTA's connect packet (SMFIC_CONNECT), brought to the form the
//! milter library reads. sendmail 8.15 and later write an IPv6 client's
//! address as `IPv6:2001:db8::6` (also in all 8 groups); indymilter reads
//! only the plain form and ends the whole session on any other, so such a
//! client was never counted (and with `F=T` every one was tempfailed).
//! This stream, read by indymilter in place of the socket, rewrites the
//! address of each connect packet to its plain form, by the one reader of
//! client addresses ([`parse_client_addr`]), IPv4-mapped addresses as
//! IPv4. An address that reader does not know is sent on as "unknown"
//! (family `U`): the session goes on, and the connect callback looks for
//! the client in `{client_addr}` and the host name. Every other packet
//! passes unchanged, once whole (indymilter reads whole packets only).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::policy::parse_client_addr;

/// Bytes read from the socket at once.
const READ_CHUNK: usize = 8 * 1024;
/// Buffer bytes an idle connection keeps: a large packet's (a body chunk's)
/// are given back once it has been read.
const KEPT_CAPACITY: usize = 16 * 1024;

/// A stream whose connect packets are rewritten; see the module.
pub struct ConnInfo<S> {
    io: S,
    /// Bytes read that do not yet make a whole packet. The stream below
    /// (the guard) refuses a packet over the cap on its length word, so
    /// this holds at most one packet and one read.
    partial: Vec<u8>,
    /// Whole packets, rewritten, not yet taken by the reader.
    ready: Vec<u8>,
    taken: usize,
    eof: bool,
}

impl<S> ConnInfo<S> {
    pub fn new(io: S) -> ConnInfo<S> {
        ConnInfo {
            io,
            partial: Vec::new(),
            ready: Vec::new(),
            taken: 0,
            eof: false,
        }
    }

    /// Moves the whole packets of `partial` to `ready`.
    fn take_packets(&mut self) {
        let mut at = 0;
        while let Some(head) = self.partial.get(at..at + 4) {
            let len = u32::from_be_bytes(head.try_into().expect("4 bytes")) as usize;
            let Some(packet) = self.partial.get(at..at + 4 + len) else {
                break;
            };
            match packet.get(4) {
                Some(b'C') => self.ready.extend(connect_packet(&packet[5..])),
                _ => self.ready.extend_from_slice(packet),
            }
            at += 4 + len;
        }
        self.partial.drain(..at);
        if self.partial.is_empty() {
            self.partial.shrink_to(KEPT_CAPACITY);
        }
    }
}

/// A connect packet for `payload` (host name, NUL, family, then for
/// `4` and `6` the port and the address, NUL), its address in plain form.
pub fn connect_packet(payload: &[u8]) -> Vec<u8> {
    let fixed = fix_connect(payload);
    let payload = fixed.as_deref().unwrap_or(payload);
    let mut p = Vec::with_capacity(payload.len() + 5);
    p.extend((payload.len() as u32 + 1).to_be_bytes());
    p.push(b'C');
    p.extend_from_slice(payload);
    p
}

/// The payload with its address rewritten, or `None` to send it as it is.
fn fix_connect(payload: &[u8]) -> Option<Vec<u8>> {
    let host_end = payload.iter().position(|&b| b == 0)?;
    let family = *payload.get(host_end + 1)?;
    if family != b'4' && family != b'6' {
        return None;
    }
    let rest = &payload[host_end + 2..];
    let port = rest.get(..2);
    let addr = rest
        .get(2..)
        .and_then(|a| a.strip_suffix(&[0]))
        .and_then(|a| std::str::from_utf8(a).ok());
    let mut fixed = payload[..=host_end].to_vec();
    match (port, addr.and_then(parse_client_addr)) {
        (Some(port), Some(ip)) => {
            let text = ip.to_string();
            if addr == Some(text.as_str()) && (family == b'4') == ip.is_ipv4() {
                return None;
            }
            fixed.push(if ip.is_ipv4() { b'4' } else { b'6' });
            fixed.extend_from_slice(port);
            fixed.extend_from_slice(text.as_bytes());
            fixed.push(0);
            tracing::debug!(
                from = %crate::bounds::cut(addr.unwrap_or_default()),
                to = %text,
                "milter: connect address rewritten to its plain form"
            );
        }
        _ => {
            let shown = String::from_utf8_lossy(rest.get(2..).unwrap_or_default());
            tracing::warn!(
                address = %crate::bounds::cut(shown.trim_end_matches('\0')),
                "milter: connect address in no known form: the client is looked \
                 for in {{client_addr}} and its host name"
            );
            fixed.push(b'U');
        }
    }
    Some(fixed)
}

impl<S: AsyncRead + Unpin> AsyncRead for ConnInfo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.taken);
                buf.put_slice(&this.ready[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.ready.len() {
                    this.ready.clear();
                    this.ready.shrink_to(KEPT_CAPACITY);
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A packet cut short: the reader sees it cut, as it was.
                if this.partial.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.ready = std::mem::take(&mut this.partial);
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => {
                    this.partial.extend_from_slice(read.filled());
                    this.take_packets();
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnInfo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn connect(host: &str, family: u8, addr: &str) -> Vec<u8> {
        let mut payload = host.as_bytes().to_vec();
        payload.push(0);
        payload.push(family);
        payload.extend(25u16.to_be_bytes());
        payload.extend(addr.as_bytes());
        payload.push(0);
        payload
    }

    fn packet(cmd: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = (payload.len() as u32 + 1).to_be_bytes().to_vec();
        p.push(cmd);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn sendmail_forms_become_plain() {
        for (family, addr, want_family, want) in [
            (b'6', "IPv6:2001:db8::6", b'6', "2001:db8::6"),
            (b'6', "IPv6:2001:0db8:0:0:0:0:0:6", b'6', "2001:db8::6"),
            (b'6', "::ffff:10.0.0.1", b'4', "10.0.0.1"),
            (b'6', "IPv6:::ffff:10.0.0.1", b'4', "10.0.0.1"),
        ] {
            let got = connect_packet(&connect("[IPv6:x]", family, addr));
            assert_eq!(got, packet(b'C', &connect("[IPv6:x]", want_family, want)));
        }
        // Plain forms and other families pass as they are.
        let plain = connect("h", b'4', "10.0.0.1");
        assert_eq!(connect_packet(&plain), packet(b'C', &plain));
        assert_eq!(connect_packet(b"h\0U"), packet(b'C', b"h\0U"));
        assert_eq!(
            connect_packet(b"h\0L\0\0/s\0"),
            packet(b'C', b"h\0L\0\0/s\0")
        );
        // An address in no known form: the session goes on, address unknown.
        let odd = connect("h", b'6', "IPv7:1");
        assert_eq!(connect_packet(&odd), packet(b'C', b"h\0U"));
    }

    #[tokio::test]
    async fn other_packets_pass_unchanged_however_the_bytes_are_cut() {
        let mut stream = packet(b'O', &[1; 12]);
        stream.extend(packet(b'D', b"C{client_addr}\0IPv6:2001:db8::6\0"));
        stream.extend(packet(b'C', &connect("h", b'6', "IPv6:2001:db8::6")));
        stream.extend(packet(b'H', b"helo\0"));
        let mut want = packet(b'O', &[1; 12]);
        want.extend(packet(b'D', b"C{client_addr}\0IPv6:2001:db8::6\0"));
        want.extend(packet(b'C', &connect("h", b'6', "2001:db8::6")));
        want.extend(packet(b'H', b"helo\0"));
        for cut in [1, 3, 7, stream.len()] {
            let (mut mta, milter) = tokio::io::duplex(4096);
            let mut c = ConnInfo::new(milter);
            for chunk in stream.chunks(cut) {
                mta.write_all(chunk).await.unwrap();
            }
            drop(mta);
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, want, "chunks of {cut}");
        }
    }
}
