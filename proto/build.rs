//! Generates the two Konnectivity gRPC services from a Rust description instead of a `.proto`
//! file (the messages are hand-written prost derives in `src/lib.rs`). Neither upstream service
//! has a package, so the routes are exactly `/AgentService/Connect` and `/ProxyService/Proxy`.

use tonic_build::manual::{Builder, Method, Service};

fn bidi_stream(service: &str, rpc: &str, method: &str) -> Service {
    Service::builder()
        .name(service)
        .package("")
        .method(
            Method::builder()
                .name(method)
                .route_name(rpc)
                .input_type("crate::Packet")
                .output_type("crate::Packet")
                .codec_path("crate::codec::PacketCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build()
}

fn main() {
    // No transport constructors: the generated `connect(dst)` would collide with the
    // `Connect` RPC's method, and both binaries build their own TLS channels anyway.
    Builder::new().build_transport(false).compile(&[
        bidi_stream("AgentService", "Connect", "connect"),
        bidi_stream("ProxyService", "Proxy", "proxy"),
    ]);
}
