//! The gRPC codec both services use: prost's, with buffers sized for a tunnel that is mostly
//! idle.
//!
//! tonic allocates an encode and a decode buffer for every stream when it opens, 8 KiB each by
//! default, and keeps them for the stream's life. A server holds one stream per agent, most of
//! them carrying nothing but HTTP/2 pings, so at fleet sizes those two buffers were a third of
//! the server's memory per agent. Starting small costs nothing on busy streams: both buffers
//! grow to the messages they carry and keep that capacity.

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

use crate::Packet;

/// Big enough for every control packet (dial request and response, close) without growing.
/// Not zero: tonic divides by it when it sizes (de)compression buffers.
const INITIAL_BUFFER: usize = 512;

/// tonic's default: how much encoded data it gathers before handing it to HTTP/2.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`Packet`] in both directions, as `application/grpc+proto`.
#[derive(Debug, Clone, Copy)]
pub struct PacketCodec {
    buffers: BufferSettings,
}

impl Default for PacketCodec {
    fn default() -> Self {
        PacketCodec {
            buffers: BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD),
        }
    }
}

impl Codec for PacketCodec {
    type Encode = Packet;
    type Decode = Packet;
    type Encoder = ProstEncoder<Packet>;
    type Decoder = ProstDecoder<Packet>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(self.buffers)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(self.buffers)
    }
}
