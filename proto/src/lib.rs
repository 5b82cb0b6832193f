//! The Konnectivity wire protocol (kubernetes-sigs/apiserver-network-proxy), written from its
//! published field numbers and enum values.
//!
//! Upstream's proto files declare no package: message names are bare (`Packet`, …) and the
//! routes are `/AgentService/Connect` and `/ProxyService/Proxy`. Field tags and enum values here
//! are the normative facts; everything must encode byte-identically to upstream.
//!
//! Build packets with the constructors on [`Packet`]: they always set the payload matching the
//! type, because upstream Go receivers dereference it unconditionally and crash on a missing one.
//! Read packets with [`Packet::into_message`], which tolerates a missing payload and unknown types.

use bytes::Bytes;

pub mod cidr;
pub mod codec;
pub mod framing;
pub mod identifiers;

/// gRPC metadata keys (HTTP/2 lowercases them on the wire).
pub mod metadata {
    /// Agent → server: the agent's ID (exactly one value).
    pub const AGENT_ID: &str = "agentid";
    /// Agent → server: URL query string of identifiers (`host=…&ipv4=…`), possibly empty.
    pub const AGENT_IDENTIFIERS: &str = "agentidentifiers";
    /// Agent → server: `Bearer <token>` when token authentication is used.
    pub const AUTHORIZATION: &str = "authorization";
    /// Server → agent (initial response headers): the server instance's ID.
    pub const SERVER_ID: &str = "serverid";
    /// Server → agent (initial response headers): how many server instances exist, decimal.
    pub const SERVER_COUNT: &str = "servercount";
    /// tether extension, both directions: `1` offers (agent) or accepts (server) per-connection
    /// flow control with WINDOW packets. Upstream peers ignore unknown metadata, so they never
    /// see a WINDOW packet.
    pub const FLOW_CONTROL: &str = "tether-flow-control";
    /// tether extension, frontend → server (gRPC metadata or a CONNECT request header): asks
    /// the server to name the agent that served the dial (`tether-server probe` sends it).
    pub const PROBE: &str = "tether-probe";
    /// tether extension, server → frontend: the agent that served a probe's dial, in gRPC
    /// response metadata or a header of the CONNECT 200.
    pub const PROBE_AGENT: &str = "tether-agent-id";

    /// An agent ID as the [`PROBE_AGENT`] value: printable ASCII only, so an agent cannot
    /// inject headers.
    pub fn probe_agent_value(agent_id: &str) -> String {
        agent_id.escape_default().to_string()
    }
}

/// Bytes of DATA either side may send on a new connection before the receiver grants more,
/// when flow control was negotiated.
pub const INITIAL_WINDOW: usize = 512 * 1024;

/// The largest HTTP/2 frame a tunnel stream accepts (advertised in SETTINGS; peers send
/// frames up to the size the receiver advertises). HTTP/2's 16 KiB default splits a 256 KiB
/// DATA packet into 16 frames, each its own write on the sending side; at 256 KiB it leaves
/// in one. Interleaving is unaffected: every tunnelled connection shares one gRPC stream, so
/// frames never interleave across tunnels anyway.
pub const MAX_HTTP2_FRAME: u32 = 256 * 1024;

/// A gRPC status code as grpc-go names it (`Canceled`, `Unavailable`, …): the `code` label of
/// upstream's `stream_errors_total` metrics.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// `AgentService` (agent → server, `/AgentService/Connect`).
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/.AgentService.rs"));
}

/// `ProxyService` (kube-apiserver → server, `/ProxyService/Proxy`).
pub mod proxy {
    include!(concat!(env!("OUT_DIR"), "/.ProxyService.rs"));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PacketType {
    DialReq = 0,
    DialRsp = 1,
    CloseReq = 2,
    CloseRsp = 3,
    Data = 4,
    DialCls = 5,
    Drain = 6,
    /// tether extension: grants the peer more send window for one connection. Far from
    /// upstream's numbers so a future upstream type cannot collide.
    Window = 1000,
}

impl PacketType {
    /// The upstream enum name, used as the `packet_type` metric label.
    pub fn as_str_name(self) -> &'static str {
        match self {
            PacketType::DialReq => "DIAL_REQ",
            PacketType::DialRsp => "DIAL_RSP",
            PacketType::CloseReq => "CLOSE_REQ",
            PacketType::CloseRsp => "CLOSE_RSP",
            PacketType::Data => "DATA",
            PacketType::DialCls => "DIAL_CLS",
            PacketType::Drain => "DRAIN",
            PacketType::Window => "WINDOW",
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Packet {
    #[prost(enumeration = "PacketType", tag = "1")]
    pub r#type: i32,
    #[prost(oneof = "Payload", tags = "2, 3, 4, 5, 6, 7, 8, 100")]
    pub payload: Option<Payload>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    #[prost(message, tag = "2")]
    DialRequest(DialRequest),
    #[prost(message, tag = "3")]
    DialResponse(DialResponse),
    #[prost(message, tag = "4")]
    Data(Data),
    #[prost(message, tag = "5")]
    CloseRequest(CloseRequest),
    #[prost(message, tag = "6")]
    CloseResponse(CloseResponse),
    #[prost(message, tag = "7")]
    CloseDial(CloseDial),
    #[prost(message, tag = "8")]
    Drain(Drain),
    #[prost(message, tag = "100")]
    Window(Window),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DialRequest {
    /// Network to dial; clients always send `tcp`.
    #[prost(string, tag = "1")]
    pub protocol: String,
    /// `host:port`, IPv6 literals in brackets; may be a DNS name.
    #[prost(string, tag = "2")]
    pub address: String,
    /// Dial ID chosen by the frontend; echoed in the response.
    #[prost(int64, tag = "3")]
    pub random: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DialResponse {
    /// Empty on success.
    #[prost(string, tag = "1")]
    pub error: String,
    /// Agent-allocated; 0 on failure.
    #[prost(int64, tag = "2")]
    pub connect_id: i64,
    #[prost(int64, tag = "3")]
    pub random: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseRequest {
    #[prost(int64, tag = "1")]
    pub connect_id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseResponse {
    #[prost(string, tag = "1")]
    pub error: String,
    #[prost(int64, tag = "2")]
    pub connect_id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseDial {
    #[prost(int64, tag = "1")]
    pub random: i64,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Drain {}

/// tether extension: `bytes` more of DATA may be sent on `connect_id`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Window {
    #[prost(int64, tag = "1")]
    pub connect_id: i64,
    #[prost(int64, tag = "2")]
    pub bytes: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Data {
    #[prost(int64, tag = "1")]
    pub connect_id: i64,
    /// Reserved upstream: never set, never read.
    #[prost(string, tag = "2")]
    pub error: String,
    #[prost(bytes = "bytes", tag = "3")]
    pub data: Bytes,
}

/// A received packet, decoded by its type.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    DialRequest(DialRequest),
    DialResponse(DialResponse),
    Data(Data),
    CloseRequest(CloseRequest),
    CloseResponse(CloseResponse),
    CloseDial(CloseDial),
    Drain,
    Window(Window),
    /// A type value this implementation does not know (proto3 enums are open).
    Unknown(i32),
}

impl Message {
    /// The upstream enum name, or `UNKNOWN` (metric label).
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::DialRequest(_) => "DIAL_REQ",
            Message::DialResponse(_) => "DIAL_RSP",
            Message::Data(_) => "DATA",
            Message::CloseRequest(_) => "CLOSE_REQ",
            Message::CloseResponse(_) => "CLOSE_RSP",
            Message::CloseDial(_) => "DIAL_CLS",
            Message::Drain => "DRAIN",
            Message::Window(_) => "WINDOW",
            Message::Unknown(_) => "UNKNOWN",
        }
    }
}

impl Packet {
    pub fn dial_request(address: impl Into<String>, random: i64) -> Self {
        Self::with(
            PacketType::DialReq,
            Payload::DialRequest(DialRequest {
                protocol: "tcp".into(),
                address: address.into(),
                random,
            }),
        )
    }

    pub fn dial_response(random: i64, connect_id: i64, error: impl Into<String>) -> Self {
        Self::with(
            PacketType::DialRsp,
            Payload::DialResponse(DialResponse {
                error: error.into(),
                connect_id,
                random,
            }),
        )
    }

    pub fn data(connect_id: i64, data: Bytes) -> Self {
        Self::with(
            PacketType::Data,
            Payload::Data(Data {
                connect_id,
                error: String::new(),
                data,
            }),
        )
    }

    pub fn close_request(connect_id: i64) -> Self {
        Self::with(
            PacketType::CloseReq,
            Payload::CloseRequest(CloseRequest { connect_id }),
        )
    }

    pub fn close_response(connect_id: i64, error: impl Into<String>) -> Self {
        Self::with(
            PacketType::CloseRsp,
            Payload::CloseResponse(CloseResponse {
                error: error.into(),
                connect_id,
            }),
        )
    }

    pub fn close_dial(random: i64) -> Self {
        Self::with(
            PacketType::DialCls,
            Payload::CloseDial(CloseDial { random }),
        )
    }

    pub fn drain() -> Self {
        Self::with(PacketType::Drain, Payload::Drain(Drain {}))
    }

    pub fn window(connect_id: i64, bytes: i64) -> Self {
        Self::with(
            PacketType::Window,
            Payload::Window(Window { connect_id, bytes }),
        )
    }

    fn with(kind: PacketType, payload: Payload) -> Self {
        Packet {
            r#type: kind as i32,
            payload: Some(payload),
        }
    }

    /// The upstream name of this packet's type, or `UNKNOWN` (metric label), without decoding
    /// or copying the payload.
    pub fn type_name(&self) -> &'static str {
        PacketType::try_from(self.r#type).map_or("UNKNOWN", PacketType::as_str_name)
    }

    /// Decodes by `type`. A payload that is missing or does not match the type reads as the
    /// type's default message, as proto3 receivers do.
    pub fn into_message(self) -> Message {
        let Ok(kind) = PacketType::try_from(self.r#type) else {
            return Message::Unknown(self.r#type);
        };
        let payload = self.payload;
        macro_rules! field {
            ($variant:ident) => {
                match payload {
                    Some(Payload::$variant(inner)) => inner,
                    _ => Default::default(),
                }
            };
        }
        match kind {
            PacketType::DialReq => Message::DialRequest(field!(DialRequest)),
            PacketType::DialRsp => Message::DialResponse(field!(DialResponse)),
            PacketType::Data => Message::Data(field!(Data)),
            PacketType::CloseReq => Message::CloseRequest(field!(CloseRequest)),
            PacketType::CloseRsp => Message::CloseResponse(field!(CloseResponse)),
            PacketType::DialCls => Message::CloseDial(field!(CloseDial)),
            PacketType::Drain => Message::Drain,
            PacketType::Window => Message::Window(field!(Window)),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn hex(packet: &Packet) -> String {
        packet
            .encode_to_vec()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn encodings_match_hand_computed_bytes() {
        // Tag bytes: (field << 3) | wire type. DIAL_REQ is 0, so no type field at all.
        assert_eq!(
            hex(&Packet::dial_request("a:1", 5)),
            "12 0c 0a 03 74 63 70 12 03 61 3a 31 18 05"
        );
        assert_eq!(
            hex(&Packet::dial_response(5, 7, "")),
            "08 01 1a 04 10 07 18 05"
        );
        assert_eq!(
            hex(&Packet::dial_response(5, 0, "x")),
            "08 01 1a 05 0a 01 78 18 05"
        );
        assert_eq!(hex(&Packet::close_request(7)), "08 02 2a 02 08 07");
        assert_eq!(hex(&Packet::close_response(7, "")), "08 03 32 02 10 07");
        assert_eq!(
            hex(&Packet::data(7, Bytes::from_static(b"hi"))),
            "08 04 22 06 08 07 1a 02 68 69"
        );
        assert_eq!(hex(&Packet::close_dial(5)), "08 05 3a 02 08 05");
        // An empty payload still serialises, preserving presence for Go receivers.
        assert_eq!(hex(&Packet::drain()), "08 06 42 00");
        // type 1000 = e8 07; field 100, wire type 2 = a2 06.
        assert_eq!(hex(&Packet::window(7, 4)), "08 e8 07 a2 06 04 08 07 10 04");
        assert_eq!(hex(&Packet::close_request(0)), "08 02 2a 00");
    }

    #[test]
    fn every_packet_type_round_trips() {
        let packets = [
            Packet::dial_request("[fd00::1]:10250", i64::MAX),
            Packet::dial_response(-1, 3, "dial tcp: refused"),
            Packet::data(9, Bytes::from(vec![0u8; 70_000])),
            Packet::close_request(4),
            Packet::close_response(4, "Unknown connectID"),
            Packet::close_dial(77),
            Packet::drain(),
            Packet::window(3, 65536),
        ];
        for packet in packets {
            let decoded = Packet::decode(packet.encode_to_vec().as_slice()).unwrap();
            assert_eq!(decoded, packet);
        }
    }

    #[test]
    fn missing_payload_and_unknown_types_decode_without_failing() {
        // `08 02` is CLOSE_REQ with no payload: reads as connectID 0.
        let packet = Packet::decode(&[0x08, 0x02][..]).unwrap();
        assert_eq!(
            packet.into_message(),
            Message::CloseRequest(CloseRequest { connect_id: 0 })
        );
        // An empty buffer is a DIAL_REQ with every field at its default.
        let packet = Packet::decode(&[][..]).unwrap();
        assert_eq!(
            packet.into_message(),
            Message::DialRequest(DialRequest::default())
        );
        let packet = Packet::decode(&[0x08, 0x2a][..]).unwrap();
        assert_eq!(packet.into_message(), Message::Unknown(42));
    }

    #[test]
    fn mismatched_payload_reads_as_the_types_default() {
        let mut packet = Packet::data(7, Bytes::from_static(b"x"));
        packet.r#type = PacketType::CloseReq as i32;
        assert_eq!(
            packet.into_message(),
            Message::CloseRequest(CloseRequest::default())
        );
    }

    #[test]
    fn type_names_match_the_decoded_message() {
        for packet in [
            Packet::data(1, Bytes::new()),
            Packet::drain(),
            Packet::window(1, 1),
        ] {
            assert_eq!(
                packet.type_name(),
                packet.clone().into_message().type_name()
            );
        }
        assert_eq!(
            Packet {
                r#type: 99,
                payload: None
            }
            .type_name(),
            "UNKNOWN"
        );
    }

    #[test]
    fn generated_routes_have_no_package() {
        assert_eq!(agent::agent_service_server::SERVICE_NAME, "AgentService");
        assert_eq!(proxy::proxy_service_server::SERVICE_NAME, "ProxyService");
    }
}
