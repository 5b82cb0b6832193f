//! Listening sockets.

use std::io;

use tokio::net::TcpListener;

/// Binds `host:port`; an empty host means every interface (IPv6 and IPv4 when the kernel has
/// IPv6, IPv4 alone otherwise), as Go's `:port` does.
pub async fn bind_tcp(host: &str, port: u16) -> io::Result<TcpListener> {
    if host.is_empty() {
        return match TcpListener::bind(("::", port)).await {
            Err(err) if err.kind() != io::ErrorKind::AddrInUse => {
                TcpListener::bind(("0.0.0.0", port)).await
            }
            result => result,
        };
    }
    TcpListener::bind((host.trim_start_matches('[').trim_end_matches(']'), port)).await
}
