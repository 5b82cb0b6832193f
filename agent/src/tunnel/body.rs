//! The Connect request's body: the agent's packets as gRPC messages, written by hand instead of
//! through tonic's codec so a DATA payload goes to HTTP/2 as the buffer the endpoint was read
//! into (see `tether_proto::framing`).
//!
//! Small packets that are ready together share one chunk, as a codec's buffer would; a large
//! payload follows its message head as a chunk of its own, which HTTP/2 writes without copying.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http_body::{Body, Frame};
use tether_proto::Packet;
use tether_proto::framing;

/// Chunk size at which buffered small packets are handed on without waiting for more.
const FLUSH_AT: usize = 32 * 1024;

pub struct PacketBody {
    packets: Pin<Box<dyn Stream<Item = Packet> + Send>>,
    /// Encoded packets not yet handed to HTTP/2.
    buffered: BytesMut,
    /// A payload whose message head is the chunk handed on before it.
    payload: Option<Bytes>,
    ended: bool,
}

impl PacketBody {
    pub fn new(packets: impl Stream<Item = Packet> + Send + 'static) -> Self {
        PacketBody {
            packets: Box::pin(packets),
            buffered: BytesMut::new(),
            payload: None,
            ended: false,
        }
    }

    fn chunk(&mut self) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(Frame::data(self.buffered.split().freeze()))))
    }
}

impl Body for PacketBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(payload) = this.payload.take() {
            return Poll::Ready(Some(Ok(Frame::data(payload))));
        }
        while !this.ended {
            match this.packets.poll_next_unpin(cx) {
                Poll::Ready(Some(packet)) => {
                    if let Some(payload) = framing::encode(packet, &mut this.buffered) {
                        this.payload = Some(payload);
                        return this.chunk();
                    }
                    if this.buffered.len() >= FLUSH_AT {
                        return this.chunk();
                    }
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Pending if this.buffered.is_empty() => return Poll::Pending,
                Poll::Pending => return this.chunk(),
            }
        }
        if this.buffered.is_empty() {
            Poll::Ready(None)
        } else {
            this.chunk()
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.payload.is_none() && self.buffered.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use prost::Message as _;
    use tether_proto::Message;

    use super::*;

    /// Splits a body's bytes back into packets, as the server's decoder does.
    fn decode_all(mut bytes: &[u8]) -> Vec<Packet> {
        let mut packets = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0], 0, "uncompressed");
            let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
            packets.push(Packet::decode(&bytes[5..5 + len]).unwrap());
            bytes = &bytes[5 + len..];
        }
        packets
    }

    #[tokio::test]
    async fn packets_arrive_whole_and_in_order_with_large_payloads_uncopied() {
        let big = Bytes::from(vec![9u8; 100_000]);
        let sent = vec![
            Packet::dial_response(1, 1, ""),
            Packet::data(1, Bytes::from_static(b"hello")),
            Packet::data(1, big.clone()),
            Packet::close_response(1, ""),
        ];
        let mut body = PacketBody::new(futures_util::stream::iter(sent.clone()));
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            chunks.push(frame.unwrap().into_data().unwrap());
        }
        assert!(body.is_end_stream());
        // Head of the small packets and the big one's head, the payload itself, the last one.
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[1].as_ptr(), big.as_ptr());
        let all: Vec<u8> = chunks.concat();
        let got = decode_all(&all);
        assert_eq!(got, sent);
        assert!(matches!(
            got[2].clone().into_message(),
            Message::Data(d) if d.data == big
        ));
    }
}
