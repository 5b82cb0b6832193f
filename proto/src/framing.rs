//! Length-prefixed gRPC messages (a flag byte, a big-endian u32 length, the protobuf) written
//! without copying a DATA packet's payload.
//!
//! A codec that encodes into one buffer copies every payload once more before TLS copies it
//! again; for bulk traffic that is a tenth of the sender's CPU. [`encode`] writes everything up
//! to the payload's bytes and hands the payload back, so the caller sends the two pieces in
//! order and the payload leaves as the same `Bytes` the endpoint read into. The result is the
//! canonical encoding: DATA's payload is its highest-numbered field, so prost would put it last
//! too.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::{Data, Packet, Payload};

/// Payloads at least this long travel uncopied; below it one copy costs less than sending the
/// payload as a separate piece.
pub const ZERO_COPY_FROM: usize = 4 * 1024;

/// `Packet.payload`'s tag for DATA and `Data.data`'s tag.
const PACKET_DATA_TAG: u32 = 4;
const DATA_BYTES_TAG: u32 = 3;

/// Appends `packet` to `out` as one uncompressed gRPC message. When it is a DATA packet whose
/// payload is at least [`ZERO_COPY_FROM`] bytes, `out` ends just before the payload, which is
/// returned: the message is `out`'s new bytes followed by it.
pub fn encode(packet: Packet, out: &mut BytesMut) -> Option<Bytes> {
    let Packet { r#type, payload } = packet;
    match payload {
        Some(Payload::Data(data)) if data.data.len() >= ZERO_COPY_FROM => {
            let Data {
                connect_id,
                error,
                data: bytes,
            } = data;
            let head = Data {
                connect_id,
                error,
                data: Bytes::new(),
            };
            let inner_len = head.encoded_len()
                + key_len(DATA_BYTES_TAG)
                + encoded_len_varint(bytes.len() as u64)
                + bytes.len();
            let bare = Packet {
                r#type,
                payload: None,
            };
            let total = bare.encoded_len()
                + key_len(PACKET_DATA_TAG)
                + encoded_len_varint(inner_len as u64)
                + inner_len;
            out.reserve(5 + total - bytes.len());
            put_prefix(out, total);
            bare.encode_raw(out);
            encode_key(PACKET_DATA_TAG, WireType::LengthDelimited, out);
            encode_varint(inner_len as u64, out);
            head.encode_raw(out);
            encode_key(DATA_BYTES_TAG, WireType::LengthDelimited, out);
            encode_varint(bytes.len() as u64, out);
            Some(bytes)
        }
        payload => {
            let packet = Packet { r#type, payload };
            let len = packet.encoded_len();
            out.reserve(5 + len);
            put_prefix(out, len);
            packet.encode_raw(out);
            None
        }
    }
}

fn put_prefix(out: &mut BytesMut, len: usize) {
    out.put_u8(0);
    // Packets are bounded far below 4 GiB by the peers' message limits.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a one-buffer codec would produce.
    fn reference(packet: &Packet) -> Vec<u8> {
        let body = packet.encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        framed
    }

    fn joined(packet: Packet) -> (Vec<u8>, bool) {
        let mut out = BytesMut::new();
        let tail = encode(packet, &mut out);
        let split = tail.is_some();
        let mut all = out.to_vec();
        all.extend_from_slice(&tail.unwrap_or_default());
        (all, split)
    }

    #[test]
    fn large_data_is_split_before_its_payload_and_matches_prost() {
        for len in [ZERO_COPY_FROM, 200_000, 256 * 1024] {
            let payload: Bytes = (0..len).map(|i| i as u8).collect::<Vec<u8>>().into();
            let packet = Packet::data(1 << 40, payload.clone());
            let mut out = BytesMut::new();
            let tail = encode(packet.clone(), &mut out).expect("payload kept apart");
            assert_eq!(tail.as_ptr(), payload.as_ptr(), "the payload is not copied");
            let (all, _) = joined(packet.clone());
            assert_eq!(all, reference(&packet), "len {len}");
        }
    }

    #[test]
    fn other_packets_are_one_piece_and_match_prost() {
        for packet in [
            Packet::data(3, Bytes::from_static(b"ping")),
            Packet::data(3, Bytes::from(vec![7; ZERO_COPY_FROM - 1])),
            Packet::data(3, Bytes::new()),
            Packet::dial_response(5, 7, "dial tcp: connection refused"),
            Packet::close_response(9, ""),
            Packet::drain(),
        ] {
            let (all, split) = joined(packet.clone());
            assert!(!split);
            assert_eq!(all, reference(&packet));
        }
    }

    #[test]
    fn appends_behind_what_is_already_buffered() {
        let mut out = BytesMut::new();
        assert!(encode(Packet::close_response(1, ""), &mut out).is_none());
        let first = out.len();
        let big = Packet::data(2, Bytes::from(vec![1; 10_000]));
        let tail = encode(big.clone(), &mut out).unwrap();
        let mut second = out[first..].to_vec();
        second.extend_from_slice(&tail);
        assert_eq!(second, reference(&big));
        assert_eq!(
            &out[..first],
            &reference(&Packet::close_response(1, ""))[..]
        );
    }
}
