//! Lets any `:authority` through to the gRPC frontend.
//!
//! grpc-go and grpcio send the percent-encoded socket path as `:authority` when they dial a Unix
//! socket by path (`%2Fetc%2Fkubernetes%2F…socket`), which is what konnectivity-client inside
//! kube-apiserver does. That is not a URI authority, and h2 resets such a stream with
//! PROTOCOL_ERROR; it has no setting to relax the check. The authority means nothing on this
//! hop (the socket or the client certificate says who is calling), so this adapter, placed
//! between the frontend's socket and h2, removes an `:authority` that does not parse and leaves
//! everything else as the client sent it.
//!
//! HPACK makes a header block depend on every block before it on the connection, so the adapter
//! decodes every block the client sends (keeping the client's dynamic table) and hands h2 each
//! block re-encoded as plain literals that never touch h2's table; one rewritten block can then
//! never leave the two tables out of step. Frames other than HEADERS and CONTINUATION are not
//! touched, and large DATA payloads are read straight into h2's buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface, passed through as it is.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Every HTTP/2 endpoint accepts frames this large; h2's frontend advertises no more.
const MAX_OUT_FRAME: usize = 16 * 1024;
/// HPACK's default table size, which is all h2 allows its peers (it advertises no other).
const HPACK_TABLE: usize = 4096;
/// A header block larger than this is refused: gRPC requests carry a few hundred bytes.
const MAX_BLOCK: usize = 256 * 1024;
/// Bytes read from the socket per call while parsing frames.
const READ_SIZE: usize = 64 * 1024;
/// Pass-through payloads at least this large go straight into h2's buffer.
const DIRECT_READ: usize = 8 * 1024;

pub struct AuthorityFilter<S> {
    inner: S,
    /// Bytes from the client not yet looked at; empty (and unallocated) while idle.
    input: BytesMut,
    /// Frames ready for h2: rewritten header blocks and the frame headers of passed frames.
    output: BytesMut,
    /// Bytes of the current frame (or the preface) that go to h2 unchanged.
    passthrough: usize,
    /// A header block whose CONTINUATION frames are still to come.
    block: Option<Block>,
    decoder: Decoder<'static>,
    eof: bool,
    /// A parse error found after bytes were already handed out in the same read.
    error: Option<io::Error>,
}

struct Block {
    stream_id: u32,
    end_stream: bool,
    fragment: BytesMut,
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl<S> AuthorityFilter<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE);
        AuthorityFilter {
            inner,
            input: BytesMut::new(),
            output: BytesMut::new(),
            passthrough: PREFACE_LEN,
            block: None,
            decoder,
            eof: false,
            error: None,
        }
    }

    /// Looks at the next frame in `input`. Returns false when more bytes are needed.
    fn parse_frame(&mut self) -> io::Result<bool> {
        if self.input.len() < FRAME_HEADER_LEN {
            return Ok(false);
        }
        let head = &self.input[..FRAME_HEADER_LEN];
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let in_block = self.block.is_some();
        if !(kind == HEADERS && !in_block || kind == CONTINUATION && in_block) {
            if in_block {
                return Err(invalid(format!(
                    "HTTP/2 frame of type {kind} inside a header block"
                )));
            }
            self.output.extend_from_slice(head);
            self.input.advance(FRAME_HEADER_LEN);
            self.passthrough = len;
            return Ok(true);
        }
        let buffered = self.block.as_ref().map_or(0, |b| b.fragment.len());
        if buffered + len > MAX_BLOCK {
            return Err(invalid(format!(
                "HTTP/2 header block over {MAX_BLOCK} bytes"
            )));
        }
        if self.input.len() < FRAME_HEADER_LEN + len {
            return Ok(false);
        }
        self.input.advance(FRAME_HEADER_LEN);
        let mut payload = self.input.split_to(len);
        let block = match self.block.take() {
            Some(block) if block.stream_id == stream_id => block,
            Some(_) => return Err(invalid("CONTINUATION for another stream".into())),
            None => {
                strip_padding_and_priority(&mut payload, flags)?;
                Block {
                    stream_id,
                    end_stream: flags & END_STREAM != 0,
                    fragment: BytesMut::new(),
                }
            }
        };
        let mut block = block;
        block.fragment.extend_from_slice(&payload);
        if flags & END_HEADERS == 0 {
            self.block = Some(block);
        } else {
            self.rewrite(&block)?;
        }
        Ok(true)
    }

    /// Decodes a complete header block and queues it for h2 as literals, without an
    /// `:authority` that is not a URI authority.
    fn rewrite(&mut self, block: &Block) -> io::Result<()> {
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        let mut result = Ok(());
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                if &*name == b":authority" && http::uri::Authority::try_from(&*value).is_err() {
                    tracing::debug!(
                        authority = %String::from_utf8_lossy(&value),
                        "dropped an :authority that is not a URI authority"
                    );
                    return;
                }
                if result.is_ok() {
                    result = encode_literal(&name, &value, &mut encoded);
                }
            })
            .map_err(|err| invalid(format!("HPACK: {err}")))?;
        result?;
        // Split into HEADERS and CONTINUATION frames; an empty block is still one HEADERS.
        let mut rest: &[u8] = &encoded;
        let mut kind = HEADERS;
        loop {
            let (piece, tail) = rest.split_at(rest.len().min(MAX_OUT_FRAME));
            let mut flags = 0;
            if kind == HEADERS && block.end_stream {
                flags |= END_STREAM;
            }
            if tail.is_empty() {
                flags |= END_HEADERS;
            }
            let len = u32::try_from(piece.len()).unwrap_or(0);
            self.output.put_slice(&len.to_be_bytes()[1..]);
            self.output.put_u8(kind);
            self.output.put_u8(flags);
            self.output.put_u32(block.stream_id);
            self.output.put_slice(piece);
            if tail.is_empty() {
                break;
            }
            rest = tail;
            kind = CONTINUATION;
        }
        Ok(())
    }
}

/// HEADERS may carry padding and a priority section around its header block fragment; h2
/// ignores priorities, so both are dropped.
fn strip_padding_and_priority(payload: &mut BytesMut, flags: u8) -> io::Result<()> {
    if flags & PADDED != 0 {
        let pad = usize::from(
            *payload
                .first()
                .ok_or_else(|| invalid("empty padded HEADERS".into()))?,
        );
        if pad + 1 > payload.len() {
            return Err(invalid("HEADERS padding longer than the frame".into()));
        }
        payload.advance(1);
        payload.truncate(payload.len() - pad);
    }
    if flags & PRIORITY != 0 {
        if payload.len() < 5 {
            return Err(invalid("HEADERS priority section cut short".into()));
        }
        payload.advance(5);
    }
    Ok(())
}

/// RFC 7541 §6.2.2: literal header field without indexing, new name, no Huffman coding.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    out.push(0);
    for text in [name, value] {
        loona_hpack::encoder::encode_integer_into(text.len(), 7, 0, out)?;
        out.extend_from_slice(text);
    }
    Ok(())
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFilter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(err) = this.error.take() {
            return Poll::Ready(Err(err));
        }
        let start = out.filled().len();
        loop {
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.output.is_empty() {
                let n = out.remaining().min(this.output.len());
                out.put_slice(&this.output[..n]);
                this.output.advance(n);
                continue;
            }
            if this.passthrough > 0 {
                if !this.input.is_empty() {
                    let n = out.remaining().min(this.input.len()).min(this.passthrough);
                    out.put_slice(&this.input[..n]);
                    this.input.advance(n);
                    this.passthrough -= n;
                    continue;
                }
                if this.passthrough >= DIRECT_READ && out.remaining() >= DIRECT_READ {
                    let limit = this.passthrough.min(out.remaining());
                    let filled_before = out.filled().len() > start;
                    let mut direct = out.take(limit);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut direct) {
                        Poll::Pending if filled_before => return Poll::Ready(Ok(())),
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                        Poll::Ready(Ok(())) => {
                            let n = direct.filled().len();
                            // SAFETY: `direct` is a view of `out`'s unfilled part, and the
                            // reader initialised and filled its first `n` bytes.
                            unsafe { out.assume_init(n) };
                            out.advance(n);
                            this.passthrough -= n;
                            if n == 0 {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                    }
                }
            } else {
                match this.parse_frame() {
                    Ok(true) => continue,
                    Ok(false) => {}
                    // Bytes already handed out go first; the error comes with the next read.
                    Err(err) if out.filled().len() > start => {
                        this.error = Some(err);
                        return Poll::Ready(Ok(()));
                    }
                    Err(err) => return Poll::Ready(Err(err)),
                }
            }
            if this.eof {
                // A frame cut short: give h2 what there is, and let it report the error.
                if !this.input.is_empty() {
                    this.passthrough = this.input.len();
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            this.input.reserve(READ_SIZE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.input) {
                Poll::Pending => {
                    if this.input.is_empty() {
                        this.input = BytesMut::new();
                    }
                    if out.filled().len() > start {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFilter<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> S::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFilter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use loona_hpack::Encoder;
    use tokio::io::AsyncReadExt;

    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut out = len[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Runs `input` through the filter, reading in pieces of `read_size`.
    async fn filter(input: Vec<u8>, read_size: usize) -> Vec<u8> {
        let mut filter = AuthorityFilter::new(input.as_slice());
        let mut out = Vec::new();
        let mut buf = vec![0; read_size];
        loop {
            let n = filter.read(&mut buf).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// Splits h2's view of the stream back into frames (after the preface).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let mut rest = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let id = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            out.push((rest[3], rest[4], id, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        out
    }

    fn request(authority: &'static [u8]) -> Vec<(&'static [u8], &'static [u8])> {
        vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/ProxyService/Proxy"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
    }

    fn literal(prefix: u8, name: Option<&[u8]>, value: &[u8]) -> Vec<u8> {
        let mut out = vec![prefix];
        for text in name.into_iter().chain([value]) {
            out.push(u8::try_from(text.len()).unwrap());
            out.extend_from_slice(text);
        }
        out
    }

    #[tokio::test]
    async fn drops_a_socket_path_authority_in_every_block_of_a_connection() {
        let path: &[u8] = b"%2Fetc%2Fkubernetes%2Fkonnectivity-server%2Fkonnectivity-server.socket";
        // As grpc-go encodes it: the first request adds :path, :authority and te to the dynamic
        // table (with incremental indexing), the next request refers to them by index.
        let mut first = vec![0x83, 0x86]; // :method POST, :scheme http
        first.extend(literal(0x44, None, b"/ProxyService/Proxy")); // :path, indexed name 4
        first.extend(literal(0x41, None, path)); // :authority, indexed name 1
        first.extend(literal(0x40, Some(b"te"), b"trailers"));
        // Dynamic table now: 62 te, 63 :authority, 64 :path.
        let second = vec![0x83, 0x86, 0x80 | 64, 0x80 | 63, 0x80 | 62];
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        let output = filter(input, 7).await;
        let frames = frames(&output);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].1, END_HEADERS | END_STREAM);
        let mut decoder = Decoder::new();
        for (kind, _, _, payload) in frames {
            assert_eq!(kind, HEADERS);
            let headers = decoder.decode(&payload).unwrap();
            let expected: Vec<(Vec<u8>, Vec<u8>)> = [
                (&b":method"[..], &b"POST"[..]),
                (b":scheme", b"http"),
                (b":path", b"/ProxyService/Proxy"),
                (b"te", b"trailers"),
            ]
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
            assert_eq!(headers, expected);
        }
    }

    #[tokio::test]
    async fn keeps_a_valid_authority_and_everything_else_byte_for_byte() {
        let mut encoder = Encoder::new();
        let block = encoder.encode(request(b"konnectivity-server:8090"));
        // HEADERS with padding and a priority section, continued in a CONTINUATION frame.
        let (first, second) = block.split_at(block.len() / 2);
        let mut padded = vec![3u8, 0, 0, 0, 0, 16];
        padded.extend_from_slice(first);
        padded.extend_from_slice(&[0; 3]);
        let data = vec![0x5a; 40_000];
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, second));
        input.extend(frame(0x0, 0, 1, &data));
        for read_size in [5, 1000, 64 * 1024] {
            let output = filter(input.clone(), read_size).await;
            let frames = frames(&output);
            assert_eq!(frames[0], (0x4, 0, 0, settings[9..].to_vec()));
            let (kind, flags, id, payload) = &frames[1];
            assert_eq!((*kind, *flags, *id), (HEADERS, END_STREAM | END_HEADERS, 1));
            let headers = Decoder::new().decode(payload).unwrap();
            assert!(
                headers.contains(&(b":authority".to_vec(), b"konnectivity-server:8090".to_vec()))
            );
            assert_eq!(headers.len(), 6);
            assert_eq!(frames[2], (0x0, 0, 1, data.clone()));
        }
    }

    #[tokio::test]
    async fn splits_a_block_that_grows_past_one_frame() {
        let mut encoder = Encoder::new();
        let big = vec![b'a'; 20_000];
        let fields = vec![(&b":path"[..], &b"/x"[..]), (&b"x-big"[..], big.as_slice())];
        // Indexed by the client, so the literal re-encoding is repeated in the second block.
        let mut input = PREFACE.to_vec();
        for stream_id in [1, 3] {
            let block = encoder.encode(fields.clone());
            let (a, b) = block.split_at(block.len().min(MAX_OUT_FRAME));
            if b.is_empty() {
                input.extend(frame(HEADERS, END_HEADERS, stream_id, a));
            } else {
                input.extend(frame(HEADERS, 0, stream_id, a));
                input.extend(frame(CONTINUATION, END_HEADERS, stream_id, b));
            }
        }
        let output = filter(input, 4096).await;
        let frames = frames(&output);
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut current = Vec::new();
        for (kind, flags, _, payload) in frames {
            assert!(payload.len() <= MAX_OUT_FRAME);
            assert_eq!(
                kind,
                if current.is_empty() {
                    HEADERS
                } else {
                    CONTINUATION
                }
            );
            current.extend(payload);
            if flags & END_HEADERS != 0 {
                blocks.push(decoder.decode(&std::mem::take(&mut current)).unwrap());
            }
        }
        assert_eq!(blocks.len(), 2);
        for headers in blocks {
            assert_eq!(headers[1], (b"x-big".to_vec(), big.clone()));
        }
    }

    #[tokio::test]
    async fn refuses_other_frames_inside_a_header_block() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"x"));
        let mut filter = AuthorityFilter::new(input.as_slice());
        let mut out = Vec::new();
        let err = filter.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
