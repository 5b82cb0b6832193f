//! Why a TLS handshake failed, told apart so that the log says what to fix and a metric counts
//! each cause. Both ends of a handshake see a failure differently: the side that checks a
//! certificate knows exactly what is wrong with it, the other learns it from the alert it
//! receives (in TLS 1.3 only on its first read, after its own side of the handshake looked
//! complete), and a peer that does not speak TLS at all shows as a record that cannot be one.

use std::error::Error as StdError;
use std::io;

use rustls::{AlertDescription, CertificateError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The peer's certificate has expired.
    PeerCertificateExpired,
    /// The peer's certificate is not valid yet (or a clock is wrong).
    PeerCertificateNotYetValid,
    /// The peer's certificate is not signed by a CA we trust.
    PeerCertificateUnknownCa,
    /// The peer's certificate does not name the host we dialled.
    PeerCertificateWrongName,
    /// The peer sent no certificate where one is required.
    PeerSentNoCertificate,
    /// The peer refused our certificate as expired or not yet valid.
    OurCertificateExpired,
    /// The peer does not trust the CA that signed our certificate.
    OurCertificateUnknownCa,
    /// The peer refused our certificate for another reason (its name, its usage).
    OurCertificateRefused,
    /// The peer requires a certificate from us and we sent none.
    PeerRequiresCertificate,
    /// The peer does not speak TLS.
    Plaintext,
    /// Anything else TLS reported (its own message says what).
    Other,
}

impl HandshakeFailure {
    /// Finds the TLS error in `err`'s chain of sources; `None` when there is none (the
    /// connection failed for another reason, such as a refused TCP connection).
    pub fn find(err: &(dyn StdError + 'static)) -> Option<Self> {
        let mut next = Some(err);
        while let Some(err) = next {
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return Some(Self::of(tls));
            }
            // h2 keeps an I/O error only as its kind and text (its errors are cloned to every
            // stream), so an alert that arrives on the first HTTP/2 read is found by its text.
            if let Some(alert) = err.to_string().split("received fatal alert: ").nth(1) {
                let name = alert.split(|c: char| !c.is_ascii_alphanumeric()).next();
                return Some(Self::of(&rustls::Error::AlertReceived(alert_named(
                    name.unwrap_or(""),
                ))));
            }
            // An io::Error's source() is its inner error's source, skipping the inner error.
            next = match err.downcast_ref::<io::Error>() {
                Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
                None => err.source(),
            };
        }
        None
    }

    pub fn of(err: &rustls::Error) -> Self {
        use HandshakeFailure::*;
        match err {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    PeerCertificateExpired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    PeerCertificateNotYetValid
                }
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    PeerCertificateUnknownCa
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => PeerCertificateWrongName,
                _ => Other,
            },
            rustls::Error::NoCertificatesPresented => PeerSentNoCertificate,
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::CertificateExpired => OurCertificateExpired,
                AlertDescription::UnknownCA => OurCertificateUnknownCa,
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::DecryptError => OurCertificateRefused,
                AlertDescription::CertificateRequired => PeerRequiresCertificate,
                _ => Other,
            },
            // The first bytes are not a TLS record: an HTTP/2 preface, an HTTP request, an
            // HTTP/1 answer to our ClientHello.
            rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
                | rustls::InvalidMessage::UnknownProtocolVersion,
            ) => Plaintext,
            _ => Other,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        use HandshakeFailure::*;
        match self {
            PeerCertificateExpired => "peer_certificate_expired",
            PeerCertificateNotYetValid => "peer_certificate_not_yet_valid",
            PeerCertificateUnknownCa => "peer_certificate_unknown_ca",
            PeerCertificateWrongName => "peer_certificate_wrong_name",
            PeerSentNoCertificate => "peer_sent_no_certificate",
            OurCertificateExpired => "our_certificate_expired",
            OurCertificateUnknownCa => "our_certificate_unknown_ca",
            OurCertificateRefused => "our_certificate_refused",
            PeerRequiresCertificate => "peer_requires_certificate",
            Plaintext => "plaintext_peer",
            Other => "other",
        }
    }

    /// What went wrong, in words an operator can act on; `peer` names the other end
    /// ("the proxy server", "the agent at 10.0.0.7:40112").
    pub fn explain(self, peer: &str) -> String {
        use HandshakeFailure::*;
        match self {
            PeerCertificateExpired => format!("the certificate of {peer} has expired; renew it"),
            PeerCertificateNotYetValid => format!(
                "the certificate of {peer} is not valid yet; check its notBefore and both \
                 hosts' clocks"
            ),
            PeerCertificateUnknownCa => {
                format!("the certificate of {peer} is not signed by a CA this side trusts")
            }
            PeerCertificateWrongName => {
                format!("the certificate of {peer} does not name the host it was reached by")
            }
            PeerSentNoCertificate => {
                format!("{peer} sent no client certificate, and this port requires one")
            }
            OurCertificateExpired => format!(
                "{peer} refused this side's certificate as expired or not yet valid; renew it \
                 or check the clocks"
            ),
            OurCertificateUnknownCa => {
                format!("{peer} does not trust the CA that signed this side's certificate")
            }
            OurCertificateRefused => format!("{peer} refused this side's certificate"),
            PeerRequiresCertificate => {
                format!("{peer} requires a client certificate and this side presented none")
            }
            Plaintext => {
                format!("{peer} does not speak TLS (a plaintext port, or another service)")
            }
            Other => format!("the TLS handshake with {peer} failed"),
        }
    }
}

/// The alert rustls printed as `name` (its Debug form), for the alerts a handshake ends with.
fn alert_named(name: &str) -> AlertDescription {
    [
        AlertDescription::CertificateExpired,
        AlertDescription::UnknownCA,
        AlertDescription::BadCertificate,
        AlertDescription::UnsupportedCertificate,
        AlertDescription::CertificateUnknown,
        AlertDescription::DecryptError,
        AlertDescription::CertificateRequired,
    ]
    .into_iter()
    .find(|alert| format!("{alert:?}") == name)
    .unwrap_or(AlertDescription::HandshakeFailure)
}

/// The first bytes of a TLS client's connection: a handshake record (22) of TLS 1.x.
pub fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, ..] | [0x16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tls_error_under_io_and_transport_wrappers() {
        let tls = rustls::Error::InvalidCertificate(CertificateError::Expired);
        let io = io::Error::new(io::ErrorKind::InvalidData, tls);
        let outer = io::Error::other(io);
        assert_eq!(
            HandshakeFailure::find(&outer),
            Some(HandshakeFailure::PeerCertificateExpired)
        );
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(HandshakeFailure::find(&refused), None);
        assert_eq!(
            HandshakeFailure::of(&rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired
            )),
            HandshakeFailure::PeerRequiresCertificate
        );
        let h2 = io::Error::other("connection error: received fatal alert: CertificateRequired");
        assert_eq!(
            HandshakeFailure::find(&h2),
            Some(HandshakeFailure::PeerRequiresCertificate)
        );
        assert!(looks_like_tls(&[0x16, 0x03, 0x01]));
        assert!(!looks_like_tls(b"CONNECT"));
        assert!(!looks_like_tls(b"PRI * HTTP/2.0"));
    }
}
