//! Stock gRPC clients on the Unix socket.
//!
//! gRPC C-core clients (Python grpcio, C++, Ruby, PHP) that dial `unix:/path/snapd.sock` send
//! the percent-encoded socket path as the HTTP/2 `:authority` (`var%2Flib%2Fsnapvm%2Fsnapd.sock`).
//! That is not a valid URI authority, so the HTTP/2 server under tonic resets every such stream
//! with a protocol error before any handler sees it, and the client gets INTERNAL with nothing
//! logged. [`AuthorityFix`] sits between the socket and the HTTP/2 server and repairs the
//! header blocks of such connections:
//!
//! - it reads the client's frames; everything but header blocks (HEADERS and their
//!   CONTINUATIONs) passes unchanged;
//! - it decodes the connection's first header block (HPACK, keeping the client's dynamic table);
//!   if its `:authority` is valid (or absent), as from Rust, Go and Java clients, the connection
//!   passes through untouched from then on, bytes as they came;
//! - otherwise every header block of the connection is decoded and re-encoded as plain literals
//!   (no indexing, so the server's decoder keeps no table to get out of step with), with an
//!   invalid `:authority` replaced by `localhost`, and sent as HEADERS and CONTINUATION frames
//!   of at most 16 KiB (the HTTP/2 default frame size every server accepts).
//!
//! Writes from the server pass through. Only the Unix socket is filtered: over TCP, clients send
//! the host they dialled.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame types and flags (RFC 9113, section 6).
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame payload sent (SETTINGS_MAX_FRAME_SIZE's default, which every peer accepts).
const MAX_FRAME: usize = 16 << 10;
/// Largest header block accepted (the client's problem beyond this: the connection is closed).
const MAX_BLOCK: usize = 1 << 20;
/// The dynamic table size the server allows the client (SETTINGS_HEADER_TABLE_SIZE's default).
const TABLE_SIZE: usize = 4096;
/// What an invalid `:authority` becomes.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// What the filter does with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No header block seen yet.
    Undecided,
    /// The client's authorities are fine: bytes pass as they come.
    Passthrough,
    /// Every header block is re-encoded.
    Rewrite,
}

/// A header block being collected.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// Its frames as they came.
    raw: Vec<u8>,
}

/// The read-side filter over the byte stream from the client (see the module docs).
pub struct Filter {
    mode: Mode,
    preface_done: bool,
    decoder: Decoder<'static>,
    block: Option<Block>,
}

impl Default for Filter {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            mode: Mode::Undecided,
            preface_done: false,
            decoder,
            block: None,
        }
    }
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Appends HPACK integer `v` with an `n`-bit prefix whose high bits are `first`.
fn put_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// Appends a header as a literal without indexing, with a literal name, no Huffman coding.
fn put_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    put_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    put_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

fn authority_ok(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

impl Filter {
    /// Moves what can be moved from `input` (bytes from the client, consumed as far as whole
    /// frames go) to `output` (bytes for the server).
    ///
    /// # Errors
    /// A header block that does not decode, or one too large: the connection is closed.
    pub fn process(&mut self, input: &mut Vec<u8>, output: &mut Vec<u8>) -> io::Result<()> {
        let mut at = 0;
        if !self.preface_done {
            if input.len() < PREFACE.len() {
                return Ok(());
            }
            if &input[..PREFACE.len()] != PREFACE {
                // Not HTTP/2 with prior knowledge: the server will say so.
                self.mode = Mode::Passthrough;
            }
            self.preface_done = true;
            at = PREFACE.len().min(input.len());
            output.extend_from_slice(&input[..at]);
        }
        while self.mode != Mode::Passthrough && input.len() - at >= 9 {
            let h = &input[at..at + 9];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if input.len() - at < 9 + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let frame = &input[at..at + 9 + len];
            let payload = &frame[9..];
            at += 9 + len;
            match kind {
                HEADERS => {
                    let mut p = payload;
                    let mut pad = 0;
                    if flags & PADDED != 0 {
                        pad = usize::from(*p.first().ok_or_else(|| bad("empty padded frame"))?);
                        p = &p[1..];
                    }
                    let mut priority = None;
                    if flags & PRIORITY != 0 {
                        let bytes: [u8; 5] = p
                            .get(..5)
                            .and_then(|b| b.try_into().ok())
                            .ok_or_else(|| bad("short priority"))?;
                        priority = Some(bytes);
                        p = &p[5..];
                    }
                    let end = p.len().checked_sub(pad).ok_or_else(|| bad("bad padding"))?;
                    self.block = Some(Block {
                        stream,
                        end_stream: flags & END_STREAM != 0,
                        priority,
                        fragment: p[..end].to_vec(),
                        raw: frame.to_vec(),
                    });
                }
                CONTINUATION => {
                    let block = self
                        .block
                        .as_mut()
                        .filter(|b| b.stream == stream)
                        .ok_or_else(|| bad("CONTINUATION without its HEADERS"))?;
                    block.fragment.extend_from_slice(payload);
                    block.raw.extend_from_slice(frame);
                    if block.fragment.len() > MAX_BLOCK {
                        return Err(bad("header block too large"));
                    }
                }
                _ => {
                    output.extend_from_slice(frame);
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                let block = self.block.take().expect("a block is being collected");
                self.finish(block, output)?;
            }
        }
        if self.mode == Mode::Passthrough {
            output.extend_from_slice(&input[at..]);
            at = input.len();
        }
        input.drain(..at);
        Ok(())
    }

    /// A whole header block: decide the connection's mode on the first, then pass it or
    /// rewrite it.
    fn finish(&mut self, block: Block, output: &mut Vec<u8>) -> io::Result<()> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.decoder
            .decode_with_cb(&block.fragment, |n, v| {
                headers.push((n.into_owned(), v.into_owned()));
            })
            .map_err(|e| bad(format!("header block: {e:?}")))?;
        let valid = headers
            .iter()
            .all(|(n, v)| n.as_slice() != b":authority" || authority_ok(v));
        if self.mode == Mode::Undecided {
            self.mode = if valid {
                Mode::Passthrough
            } else {
                Mode::Rewrite
            };
        }
        if self.mode == Mode::Passthrough {
            output.extend_from_slice(&block.raw);
            return Ok(());
        }
        let mut fragment = Vec::with_capacity(block.fragment.len() * 2);
        for (n, v) in &headers {
            let v = if n.as_slice() == b":authority" && !authority_ok(v) {
                LOCAL_AUTHORITY
            } else {
                v.as_slice()
            };
            put_literal(&mut fragment, n, v);
        }
        let mut rest: &[u8] = &fragment;
        let prio = block.priority.map_or(0, |_| 5);
        let first = rest.len().min(MAX_FRAME - prio);
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if first == rest.len() {
            flags |= END_HEADERS;
        }
        frame_header(output, first + prio, HEADERS, flags, block.stream);
        if let Some(p) = block.priority {
            output.extend_from_slice(&p);
        }
        output.extend_from_slice(&rest[..first]);
        rest = &rest[first..];
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME);
            let flags = if n == rest.len() { END_HEADERS } else { 0 };
            frame_header(output, n, CONTINUATION, flags, block.stream);
            output.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        Ok(())
    }
}

/// A connection whose client-to-server bytes go through a [`Filter`].
pub struct AuthorityFix<S> {
    inner: S,
    filter: Filter,
    raw: Vec<u8>,
    ready: Vec<u8>,
    ready_at: usize,
}

impl<S> AuthorityFix<S> {
    /// Filters `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            filter: Filter::default(),
            raw: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_at);
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready.clear();
                    this.ready_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.filter.mode == Mode::Passthrough && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 16 << 10];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        // End of stream: whatever is left (a cut frame) is dropped.
                        return Poll::Ready(Ok(()));
                    }
                    this.raw.extend_from_slice(rb.filled());
                    this.filter.process(&mut this.raw, &mut this.ready)?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's bytes: the preface, a SETTINGS frame, and one HEADERS frame per header list,
    /// encoded with a dynamic table (so later blocks refer to entries of earlier ones).
    fn client_bytes(lists: &[Vec<(&[u8], &[u8])>]) -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        let mut out = PREFACE.to_vec();
        frame_header(&mut out, 0, 0x4, 0, 0);
        for (i, list) in lists.iter().enumerate() {
            let block = enc.encode(list.iter().map(|(n, v)| (*n, *v)));
            frame_header(
                &mut out,
                block.len(),
                HEADERS,
                END_HEADERS,
                2 * i as u32 + 1,
            );
            out.extend_from_slice(&block);
        }
        out
    }

    /// The header lists in a server's view of `bytes`.
    fn server_view(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut dec = Decoder::new();
        let mut lists = Vec::new();
        let mut at = PREFACE.len();
        let mut block = Vec::new();
        while at < bytes.len() {
            let h = &bytes[at..at + 9];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let payload = &bytes[at + 9..at + 9 + len];
            at += 9 + len;
            if h[3] == HEADERS || h[3] == CONTINUATION {
                block.extend_from_slice(payload);
                if h[4] & END_HEADERS != 0 {
                    lists.push(dec.decode(&block).unwrap());
                    block.clear();
                }
            }
        }
        lists
    }

    fn request(authority: &'static [u8], n: usize) -> Vec<(&'static [u8], &'static [u8])> {
        let path: &'static [u8] = if n == 0 {
            b"/snapd.v1.Snapd/ListVms"
        } else {
            b"/grpc.health.v1.Health/Check"
        };
        vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
    }

    fn run(bytes: &[u8], chunk: usize) -> Vec<u8> {
        let mut f = Filter::default();
        let (mut input, mut output) = (Vec::new(), Vec::new());
        for piece in bytes.chunks(chunk) {
            input.extend_from_slice(piece);
            f.process(&mut input, &mut output).unwrap();
        }
        assert!(input.is_empty());
        output
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_in_every_block() {
        let bad: &'static [u8] = b"var%2Flib%2Fsnapvm%2Fsnapd.sock";
        let lists = [request(bad, 0), request(bad, 1), request(bad, 0)];
        let bytes = client_bytes(&lists);
        for chunk in [1, 7, 100, bytes.len()] {
            let seen = server_view(&run(&bytes, chunk));
            assert_eq!(seen.len(), 3);
            for (got, sent) in seen.iter().zip(&lists) {
                for ((n, v), (sn, sv)) in got.iter().zip(sent) {
                    assert_eq!(n.as_slice(), *sn);
                    if n.as_slice() == b":authority" {
                        assert_eq!(v.as_slice(), LOCAL_AUTHORITY);
                    } else {
                        assert_eq!(v.as_slice(), *sv);
                    }
                }
            }
        }
    }

    #[test]
    fn valid_authorities_pass_byte_for_byte() {
        let bytes = client_bytes(&[request(b"localhost", 0), request(b"localhost", 1)]);
        assert_eq!(run(&bytes, 5), bytes);
    }

    #[test]
    fn large_blocks_are_split_into_continuations() {
        let big = vec![b'x'; 40 << 10];
        let mut enc = loona_hpack::Encoder::new();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":authority", b"tmp%2Fx.sock"),
            (b"x-big", &big),
        ];
        let block = enc.encode(headers.iter().map(|(n, v)| (*n, *v)));
        let mut bytes = PREFACE.to_vec();
        // Sent as HEADERS + CONTINUATION, as a client must for a block this large.
        let (a, b) = block.split_at(10);
        frame_header(&mut bytes, a.len(), HEADERS, END_STREAM, 1);
        bytes.extend_from_slice(a);
        frame_header(&mut bytes, b.len(), CONTINUATION, END_HEADERS, 1);
        bytes.extend_from_slice(b);
        let out = run(&bytes, 4096);
        let seen = server_view(&out);
        assert_eq!(seen[0][1].1, LOCAL_AUTHORITY);
        assert_eq!(seen[0][2].1, big);
        // Every frame fits the default frame size, and END_STREAM stayed on the HEADERS frame.
        let mut at = PREFACE.len();
        let mut frames = 0;
        while at < out.len() {
            let len = (usize::from(out[at]) << 16)
                | (usize::from(out[at + 1]) << 8)
                | usize::from(out[at + 2]);
            assert!(len <= MAX_FRAME);
            if frames == 0 {
                assert_eq!(out[at + 3], HEADERS);
                assert_eq!(out[at + 4] & END_STREAM, END_STREAM);
            }
            frames += 1;
            at += 9 + len;
        }
        assert!(frames >= 3);
    }

    #[test]
    fn garbage_closes_the_connection() {
        let mut bytes = PREFACE.to_vec();
        frame_header(&mut bytes, 3, HEADERS, END_HEADERS, 1);
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let mut f = Filter::default();
        assert!(f.process(&mut bytes, &mut Vec::new()).is_err());
    }
}
