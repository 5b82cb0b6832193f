//! Packet decoding as both peers do it: any bytes either fail to decode or give a Packet that
//! reads as a message without panicking and re-encodes (through the zero-copy framing the
//! agent and server send with) to bytes that decode to the same Packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tether_proto::{Packet, framing};

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = Packet::decode(data) else {
        return;
    };
    let canonical = packet.encode_to_vec();
    let mut framed = BytesMut::new();
    let tail = framing::encode(packet.clone(), &mut framed);
    if let Some(tail) = tail {
        framed.extend_from_slice(&tail);
    }
    assert_eq!(framed[0], 0, "framing set the compressed flag");
    let len = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
    assert_eq!(
        len,
        framed.len() - 5,
        "length prefix disagrees with the message"
    );
    assert_eq!(
        &framed[5..],
        &canonical[..],
        "zero-copy framing is not the canonical encoding"
    );
    let again = Packet::decode(&framed[5..]).expect("re-encoded packet does not decode");
    assert_eq!(again, packet, "round trip changed the packet");
    let _ = packet.into_message().type_name();
});
