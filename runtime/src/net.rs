//! Listening sockets.

use std::io;
use std::time::Duration;

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

/// Waits after a failed accept (out of file descriptors, say) instead of spinning on it:
/// doubling from 5 ms to 1 s, and back to the start after a success.
pub struct AcceptBackoff(Duration);

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const LONGEST: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        AcceptBackoff(Self::FIRST)
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Self::LONGEST);
    }

    pub fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}
