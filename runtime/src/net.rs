//! Listening sockets, and what a connected socket says about its peer.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use tokio::net::TcpListener;

/// Binds `host:port`; an empty host means every interface (IPv6 and IPv4 when the kernel has
/// IPv6, IPv4 alone otherwise), as Go's `:port` does.
pub async fn bind_tcp(host: &str, port: u16) -> io::Result<TcpListener> {
    if host.is_empty() {
        return match listen(([0u16; 8], port).into()) {
            Err(err) if err.kind() != io::ErrorKind::AddrInUse => listen(([0u8; 4], port).into()),
            result => result,
        };
    }
    let mut last = None;
    for address in
        tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port)).await?
    {
        match listen(address) {
            Ok(listener) => return Ok(listener),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind")))
}

/// Connections the kernel queues for `accept` (it clamps this to net.core.somaxconn, 4096 by
/// default). Thousands of agents reconnect at once when a server restarts; with tokio's 1024,
/// the rest had their SYNs dropped and came back only at their second or third SYN
/// retransmission, seconds later.
const BACKLOG: u32 = 4096;

fn listen(address: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
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

/// Makes a connection notice a peer that vanished without a FIN or RST (its host died, a
/// partition): an idle connection sends a TCP keepalive probe every `interval`, and one whose
/// peer acknowledges nothing, data or probe, for `timeout`, idle or not, is closed by the
/// kernel. A network that drops everything for less than `timeout` (a blip) costs nothing.
pub fn probe_peer(
    tcp: &tokio::net::TcpStream,
    interval: Duration,
    timeout: Duration,
) -> io::Result<()> {
    // The kernel counts keepalive time in whole seconds, and at most 127 probes.
    let interval = interval.max(Duration::from_secs(1));
    let timeout = timeout.max(interval * 2);
    let probes = u32::try_from(timeout.as_secs() / interval.as_secs().max(1))
        .unwrap_or(u32::MAX)
        .clamp(1, 127);
    let socket = socket2::SockRef::from(tcp);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(interval)
            .with_interval(interval)
            .with_retries(probes),
    )?;
    socket.set_tcp_user_timeout(Some(timeout))
}

/// Whether the peer of stream socket `fd` has closed its side (or the connection broke),
/// without reading anything: a Unix socket says so as soon as the peer closes; TCP once the
/// peer's FIN has arrived behind its data.
pub fn peer_hung_up(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call; a zero timeout never blocks. An fd that is not
    // open reads as POLLNVAL, which counts as hung up.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0
        && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

#[cfg(test)]
mod hang_up_tests {
    use std::os::fd::AsRawFd;

    use super::peer_hung_up;

    #[test]
    fn sees_a_unix_peer_close_behind_unread_bytes() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut &theirs, b"unread").unwrap();
        assert!(!peer_hung_up(ours.as_raw_fd()), "peer still there");
        drop(theirs);
        assert!(peer_hung_up(ours.as_raw_fd()), "peer closed");
    }
}
