//! The tunnel: streams to the proxy server replicas and the connections they carry.

mod body;
pub mod client_set;
pub mod lease_count;
pub mod scheduler;
pub mod server_stream;
pub mod transport;
