//! Dials the destinations the control plane asks for, with a deadline, and words failures the
//! way upstream's Go agent does: kube-apiserver and the HTTP CONNECT frontend map these texts to
//! statuses (`i/o timeout` → 504, `connection refused` → 502, …).

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::dial_plane::policy::DialPolicy;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialError {
    /// Text for DIAL_RSP.error.
    pub text: String,
    /// Metric reason: `timeout` or `unknown`, as upstream; `policy` when the dial policy
    /// denied every address.
    pub reason: &'static str,
}

/// Connects to `address` (`host:port`, IPv6 in brackets, or a DNS name) within `limit`, to
/// the first of its addresses `policy` allows.
pub async fn dial(
    address: &str,
    limit: Duration,
    policy: &DialPolicy,
) -> Result<TcpStream, DialError> {
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
        let mut denied = None;
        for addr in addrs {
            let verdict = policy.decide(addr);
            if !verdict.allowed {
                denied.get_or_insert_with(|| policy.refusal(addr, verdict));
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(err) => last = Some((addr, err)),
            }
        }
        Err(match (last, denied) {
            (None, Some(refusal)) => DialError {
                text: refusal,
                reason: "policy",
            },
            (Some((addr, err)), _) => DialError {
                text: format!("dial tcp {addr}: connect: {}", os_text(&err)),
                reason: "unknown",
            },
            (None, None) => DialError {
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
        let err = dial(
            &format!("127.0.0.1:{port}"),
            Duration::from_secs(5),
            &open_policy(),
        )
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
        let err = dial("localhost", Duration::from_secs(5), &open_policy())
            .await
            .unwrap_err();
        assert!(err.text.contains("missing port"), "{}", err.text);
    }

    /// Loopback allowed, as these tests dial it.
    fn open_policy() -> DialPolicy {
        DialPolicy::new(&["127.0.0.0/8".parse().unwrap()], &[], Vec::new())
    }

    #[tokio::test]
    async fn a_denied_destination_is_never_connected_to_and_the_rule_is_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let err = dial(
            &addr.to_string(),
            Duration::from_secs(5),
            &DialPolicy::new(&[], &[], Vec::new()),
        )
        .await
        .unwrap_err();
        assert_eq!(err.reason, "policy");
        assert_eq!(
            err.text,
            format!(
                "dial tcp {addr}: denied by tether-agent's dial policy: deny 127.0.0.0/8 (default: loopback, the node's local-only services)"
            )
        );
        assert!(
            listener.accept().is_err(),
            "the destination saw a connection"
        );
    }
}
