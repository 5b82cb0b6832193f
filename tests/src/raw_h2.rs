//! A gRPC client written frame by frame, so it can send a `:authority` byte for byte: client
//! libraries built on h2 refuse to send one that is not a URI authority, and that is exactly
//! what grpc-go and grpcio send when they dial a Unix socket by path.
//!
//! Header blocks are encoded as grpc-go's HPACK encoder does: the first request on a
//! connection adds its fields to the dynamic table, later ones refer to them by index. Only
//! what a `ProxyService/Proxy` exchange needs is handled; anything else fails the test.

use anyhow::{Context, Result, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use tether_proto::Packet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// What the server sent on a stream.
#[derive(Debug)]
pub enum Event {
    Headers(Vec<(String, String)>),
    Packet(Packet),
    /// Trailers: the stream is over.
    Trailers(Vec<(String, String)>),
}

/// One HTTP/2 connection to the gRPC frontend.
pub struct RawH2<S> {
    io: S,
    authority: Vec<u8>,
    next_stream: u32,
    decoder: loona_hpack::Decoder<'static>,
    input: BytesMut,
    /// gRPC message bytes received per stream, not yet a whole message.
    partial: std::collections::HashMap<u32, BytesMut>,
    ready: std::collections::VecDeque<(u32, Event)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawH2<S> {
    /// Sends the connection preface and an empty SETTINGS frame.
    pub async fn handshake(mut io: S, authority: &[u8]) -> Result<Self> {
        io.write_all(PREFACE).await?;
        io.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
        Ok(RawH2 {
            io,
            authority: authority.to_vec(),
            next_stream: 1,
            decoder: loona_hpack::Decoder::new(),
            input: BytesMut::new(),
            partial: Default::default(),
            ready: Default::default(),
        })
    }

    /// Opens a `ProxyService/Proxy` stream; returns its ID.
    pub async fn open_proxy(&mut self) -> Result<u32> {
        let id = self.next_stream;
        self.next_stream += 2;
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
        if id == 1 {
            // With incremental indexing: dynamic entries 62 te, 63 content-type,
            // 64 :authority, 65 :path once this block is decoded.
            block.extend(literal(0x44, None, b"/ProxyService/Proxy"));
            block.extend(literal(0x41, None, &self.authority));
            block.extend(literal(0x5f, None, b"application/grpc"));
            block.extend(literal(0x40, Some(b"te"), b"trailers"));
        } else {
            block.extend([0x80 | 65, 0x80 | 64, 0x80 | 63, 0x80 | 62]);
        }
        self.io
            .write_all(&frame(HEADERS, END_HEADERS, id, &block))
            .await?;
        Ok(id)
    }

    /// Sends one gRPC message on `stream`.
    pub async fn send(&mut self, stream: u32, packet: &Packet, end_stream: bool) -> Result<()> {
        self.send_message(stream, &packet.encode_to_vec(), end_stream)
            .await
    }

    /// Sends `body` as one gRPC message, whatever it holds (a malformed one, say).
    pub async fn send_message(&mut self, stream: u32, body: &[u8], end_stream: bool) -> Result<()> {
        let mut message = vec![0];
        message.extend_from_slice(&u32::try_from(body.len())?.to_be_bytes());
        message.extend_from_slice(body);
        let flags = if end_stream { END_STREAM } else { 0 };
        self.io
            .write_all(&frame(DATA, flags, stream, &message))
            .await?;
        Ok(())
    }

    /// The next event on any stream. A reset stream or GOAWAY is an error naming its code.
    pub async fn next(&mut self) -> Result<(u32, Event)> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(event);
            }
            let (kind, flags, stream, payload) = self.read_frame().await?;
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    self.io.write_all(&frame(SETTINGS, ACK, 0, &[])).await?
                }
                PING if flags & ACK == 0 => {
                    self.io.write_all(&frame(PING, ACK, 0, &payload)).await?
                }
                RST_STREAM => bail!(
                    "stream {stream} reset with HTTP/2 error code {}",
                    u32::from_be_bytes(payload[..4].try_into()?)
                ),
                GOAWAY => bail!(
                    "connection closed with GOAWAY, error code {}",
                    u32::from_be_bytes(payload[4..8].try_into()?)
                ),
                HEADERS => {
                    let mut block = payload;
                    let mut end_headers = flags & END_HEADERS != 0;
                    while !end_headers {
                        let (kind, flags, _, more) = self.read_frame().await?;
                        if kind != CONTINUATION {
                            bail!("frame type {kind} inside a header block");
                        }
                        block.extend_from_slice(&more);
                        end_headers = flags & END_HEADERS != 0;
                    }
                    let headers = self
                        .decoder
                        .decode(&block)
                        .map_err(|err| anyhow::anyhow!("HPACK from the server: {err}"))?
                        .into_iter()
                        .map(|(n, v)| {
                            (
                                String::from_utf8_lossy(&n).into_owned(),
                                String::from_utf8_lossy(&v).into_owned(),
                            )
                        })
                        .collect();
                    let event = if flags & END_STREAM != 0 {
                        Event::Trailers(headers)
                    } else {
                        Event::Headers(headers)
                    };
                    return Ok((stream, event));
                }
                DATA => {
                    // Hand the window back at once: tests move little data.
                    if !payload.is_empty() {
                        let grant = u32::try_from(payload.len())?.to_be_bytes();
                        self.io.write_all(&frame(0x8, 0, 0, &grant)).await?;
                        self.io.write_all(&frame(0x8, 0, stream, &grant)).await?;
                    }
                    let partial = self.partial.entry(stream).or_default();
                    partial.extend_from_slice(&payload);
                    while partial.len() >= 5 {
                        let len = usize::try_from(u32::from_be_bytes(partial[1..5].try_into()?))?;
                        if partial.len() < 5 + len {
                            break;
                        }
                        partial.advance(5);
                        let message = partial.split_to(len);
                        let packet = Packet::decode(message.freeze())?;
                        self.ready.push_back((stream, Event::Packet(packet)));
                    }
                }
                _ => {}
            }
        }
    }

    async fn read_frame(&mut self) -> Result<(u8, u8, u32, BytesMut)> {
        loop {
            if self.input.len() >= 9 {
                let len = usize::from(self.input[0]) << 16
                    | usize::from(self.input[1]) << 8
                    | usize::from(self.input[2]);
                if self.input.len() >= 9 + len {
                    let head = self.input.split_to(9);
                    let stream = u32::from_be_bytes(head[5..9].try_into()?) & 0x7fff_ffff;
                    return Ok((head[3], head[4], stream, self.input.split_to(len)));
                }
            }
            self.input.reserve(16 * 1024);
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                self.io.read_buf(&mut self.input),
            )
            .await
            .context("no frame from the server within 20 s")??;
            if n == 0 {
                bail!("the server closed the connection");
            }
        }
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(9 + payload.len());
    let len = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
    out.put_slice(&len[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
    out.put_slice(payload);
    out.freeze()
}

/// A literal header field: `prefix` selects the representation and indexed name, `name` is
/// given when the name is new. Strings are not Huffman-coded.
fn literal(prefix: u8, name: Option<&[u8]>, value: &[u8]) -> Vec<u8> {
    let mut out = vec![prefix];
    for text in name.into_iter().chain([value]) {
        loona_hpack::encoder::encode_integer_into(text.len(), 7, 0, &mut out).unwrap_or_default();
        out.extend_from_slice(text);
    }
    out
}
