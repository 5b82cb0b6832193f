//! Who an agent is, as its credential says (client certificate or bound service-account
//! token), whether what it claims (agent ID, identifiers) matches, and how many agent streams
//! one identity may hold.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tether_proto::identifiers::Identifiers;

/// What an agent's claims are checked against (`--bind-agent-identity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Binding {
    /// Claims are taken as given (upstream's behaviour).
    Off,
    /// The agent ID and identifiers must be names and addresses of the client certificate.
    Certificate,
    /// The agent ID and identifiers must be the node the service-account token is bound to.
    Token,
}

/// The names and addresses a client certificate vouches for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertNames {
    /// Subject common names and DNS subject alternative names, lowercased; for a
    /// `system:node:<name>` common name (kubelet-style), `<name>` too.
    pub names: Vec<String>,
    /// IP address subject alternative names.
    pub addresses: Vec<IpAddr>,
}

impl CertNames {
    /// Reads a DER certificate the TLS handshake has already verified.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut out = CertNames::default();
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                let cn = cn.to_ascii_lowercase();
                if let Some(node) = cn.strip_prefix("system:node:") {
                    out.names.push(node.to_owned());
                }
                out.names.push(cn);
            }
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => out.names.push(dns.to_ascii_lowercase()),
                    GeneralName::IPAddress(bytes) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                            out.addresses.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                            out.addresses.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        Some(out)
    }
}

/// What a credential vouches for, in the terms of an agent's claims.
#[derive(Clone, Debug)]
pub struct Vouched {
    /// How logs, errors and the per-identity stream limit name it.
    pub label: String,
    pub names: Vec<String>,
    pub addresses: Vec<IpAddr>,
}

impl Vouched {
    pub fn certificate(cert: &CertNames) -> Self {
        Vouched {
            label: format!(
                "certificate {}",
                cert.names.first().map_or("(no name)", String::as_str)
            ),
            names: cert.names.clone(),
            addresses: cert.addresses.clone(),
        }
    }

    pub fn node(node: &str, addresses: Vec<IpAddr>) -> Self {
        Vouched {
            label: format!("node {node}"),
            names: vec![node.to_ascii_lowercase()],
            addresses,
        }
    }
}

/// A claim the credential does not back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Mismatch {
    #[error("agent ID {agent_id:?} is not a name of the agent's {vouched}")]
    AgentId { agent_id: String, vouched: String },
    #[error("identifier host={host} is not a name of the agent's {vouched}")]
    Host { host: String, vouched: String },
    #[error("identifier {address} is not an address of the agent's {vouched}")]
    Address { address: IpAddr, vouched: String },
    #[error(
        "identifier {what} cannot be bound to a credential; with --bind-agent-identity an agent claims only its host names and addresses"
    )]
    Unbindable { what: String },
}

/// Whether the claims name any address, which a token-bound node's status must then list.
pub fn claims_addresses(ids: &Identifiers) -> bool {
    !ids.addresses.is_empty() || ids.hosts.iter().any(|h| h.parse::<IpAddr>().is_ok())
}

/// An address and its IPv4-mapped IPv6 form are one address to the registry (and to the
/// kernel): either spelling of a vouched address backs a claim in the other.
fn vouched_address(vouched: &Vouched, address: IpAddr) -> bool {
    vouched
        .addresses
        .iter()
        .any(|v| v.to_canonical() == address.to_canonical())
}

/// Checks an agent's claims against what its credential vouches for.
pub fn check(agent_id: &str, ids: &Identifiers, vouched: &Vouched) -> Result<(), Mismatch> {
    let named = |name: &str| vouched.names.iter().any(|n| n.eq_ignore_ascii_case(name));
    if !named(agent_id) {
        return Err(Mismatch::AgentId {
            agent_id: agent_id.to_owned(),
            vouched: vouched.label.clone(),
        });
    }
    if let Some(host) = ids.hosts.iter().find(|h| !named(h)) {
        return Err(Mismatch::Host {
            host: host.clone(),
            vouched: vouched.label.clone(),
        });
    }
    // A host name that is an IP literal serves dials to that address, so it is an address
    // claim too: a node named `10.0.0.6` (a joining kubelet picks its own name) does not
    // thereby get another node's 10.0.0.6.
    let literals = ids.hosts.iter().filter_map(|h| h.parse::<IpAddr>().ok());
    if let Some(address) = ids
        .addresses
        .iter()
        .copied()
        .chain(literals)
        .find(|a| !vouched_address(vouched, *a))
    {
        return Err(Mismatch::Address {
            address,
            vouched: vouched.label.clone(),
        });
    }
    if let Some(cidr) = ids.cidrs.first() {
        return Err(Mismatch::Unbindable {
            what: format!("cidr={cidr}"),
        });
    }
    if ids.default_route {
        return Err(Mismatch::Unbindable {
            what: "default-route=true".into(),
        });
    }
    Ok(())
}

/// Agent streams held per identity.
pub struct StreamLimit {
    max: usize,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamLimit {
    pub fn new(max: usize) -> Self {
        StreamLimit {
            max,
            held: Arc::default(),
        }
    }

    /// A slot for one more stream of `identity`, or `None` when it holds its limit already.
    pub fn take(&self, identity: &str) -> Option<StreamSlot> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(identity.to_owned()).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(StreamSlot {
            held: self.held.clone(),
            identity: identity.to_owned(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// One stream's place in its identity's count, given back when dropped.
pub struct StreamSlot {
    held: Arc<Mutex<HashMap<String, usize>>>,
    identity: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.identity) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vouched() -> Vouched {
        Vouched {
            label: "certificate node-a".into(),
            names: vec!["node-a".into(), "node-a.example".into()],
            addresses: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        }
    }

    #[test]
    fn claims_within_the_credential_pass() {
        let ids = Identifiers::parse("host=Node-A.example&ipv4=10.0.0.5&ipv6=fd00::5").unwrap();
        assert_eq!(check("node-a", &ids, &vouched()), Ok(()));
        assert_eq!(check("NODE-A", &Identifiers::default(), &vouched()), Ok(()));
        // The mapped IPv6 form of a vouched IPv4 address is that address.
        let mapped = Identifiers::parse("ipv6=::ffff:10.0.0.5").unwrap();
        assert_eq!(check("node-a", &mapped, &vouched()), Ok(()));
    }

    #[test]
    fn claims_beyond_the_credential_are_named() {
        let v = vouched();
        let refused = |agent: &str, ids: &str| {
            check(agent, &Identifiers::parse(ids).unwrap(), &v)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused("node-b", ""),
            "agent ID \"node-b\" is not a name of the agent's certificate node-a"
        );
        assert!(refused("node-a", "host=node-b").contains("host=node-b"));
        assert!(refused("node-a", "ipv4=10.0.0.6").contains("10.0.0.6"));
        assert!(refused("node-a", "cidr=0.0.0.0/0").contains("cidr=0.0.0.0/0"));
        assert!(refused("node-a", "default-route=true").contains("default-route"));
        // A node named as an address claims that address by its name only if it is its own.
        let named_by_address = Vouched {
            label: "node 10.0.0.6".into(),
            names: vec!["10.0.0.6".into()],
            addresses: vec!["10.0.0.9".parse().unwrap()],
        };
        let ids = Identifiers::parse("host=10.0.0.6").unwrap();
        assert_eq!(
            check("10.0.0.6", &ids, &named_by_address)
                .unwrap_err()
                .to_string(),
            "identifier 10.0.0.6 is not an address of the agent's node 10.0.0.6"
        );
        assert_eq!(
            check("10.0.0.6", &Identifiers::default(), &named_by_address),
            Ok(())
        );
    }

    #[test]
    fn an_identity_holds_at_most_its_streams() {
        let limit = StreamLimit::new(2);
        let a = [limit.take("a").unwrap(), limit.take("a").unwrap()];
        assert!(limit.take("a").is_none());
        assert!(limit.take("b").is_some());
        drop(a);
        assert!(limit.take("a").is_some());
    }

    #[test]
    fn certificate_names_and_addresses_are_read() {
        let mut params = rcgen::CertificateParams::new(vec!["node-a.example".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("10.0.0.5".parse().unwrap()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:Node-A");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let names = CertNames::from_der(cert.der()).unwrap();
        assert_eq!(
            names.names,
            ["node-a", "system:node:node-a", "node-a.example"]
        );
        assert_eq!(names.addresses, ["10.0.0.5".parse::<IpAddr>().unwrap()]);
    }
}
