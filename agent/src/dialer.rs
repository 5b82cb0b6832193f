//! Dials the destinations the control plane asks for, with a deadline, and words failures the
//! way upstream's Go agent does: kube-apiserver and the HTTP CONNECT frontend map these texts to
//! statuses (`i/o timeout` → 504, `connection refused` → 502, …).

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialError {
    /// Text for DIAL_RSP.error.
    pub text: String,
    /// Metric reason: `timeout` or `unknown`, as upstream.
    pub reason: &'static str,
}

/// Connects to `address` (`host:port`, IPv6 in brackets, or a DNS name) within `limit`.
pub async fn dial(address: &str, limit: Duration) -> Result<TcpStream, DialError> {
    let timeout = || DialError {
        text: format!("dial tcp {address}: i/o timeout"),
        reason: "timeout",
    };
    let attempt = async {
        let addrs: Vec<_> = tokio::net::lookup_host(address)
            .await
            .map_err(|err| DialError {
                text: lookup_text(address, &err),
                reason: "unknown",
            })?
            .collect();
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(err) => last = Some((addr, err)),
            }
        }
        Err(match last {
            Some((addr, err)) => DialError {
                text: format!("dial tcp {addr}: connect: {}", os_text(&err)),
                reason: "unknown",
            },
            None => DialError {
                text: format!("dial tcp: lookup {address}: no such host"),
                reason: "unknown",
            },
        })
    };
    tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| Err(timeout()))
}

fn lookup_text(address: &str, err: &io::Error) -> String {
    if !address.contains(':') || address.ends_with(':') {
        return format!("dial tcp {address}: address {address}: missing port in address");
    }
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    format!("dial tcp: lookup {host}: no such host ({})", os_text(err))
}

/// The OS error in Go's lowercase wording, without Rust's "(os error N)" suffix.
fn os_text(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".into(),
        io::ErrorKind::NetworkUnreachable => "network is unreachable".into(),
        io::ErrorKind::HostUnreachable => "no route to host".into(),
        io::ErrorKind::TimedOut => "i/o timeout".into(),
        _ => {
            let text = err.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text);
            text.to_lowercase()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_dials_read_like_go() {
        // Bind then drop to get a local port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = dial(&format!("127.0.0.1:{port}"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(
            err.text,
            format!("dial tcp 127.0.0.1:{port}: connect: connection refused")
        );
        assert_eq!(err.reason, "unknown");
    }

    #[tokio::test]
    async fn a_missing_port_is_named() {
        let err = dial("localhost", Duration::from_secs(5)).await.unwrap_err();
        assert!(err.text.contains("missing port"), "{}", err.text);
    }
}
