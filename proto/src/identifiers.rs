//! `agentidentifiers`: what an agent says it serves, as a URL query string
//! (`host=node1&ipv4=10.0.0.5&cidr=10.1.0.0/16&default-route=true`). Wire format, so both ends
//! parse it here: the agent refuses keys it does not know before sending (as upstream's agent
//! does), the server ignores them (forward compatibility, as upstream's server does).

use std::net::IpAddr;

use crate::cidr::Cidr;

/// The keys upstream defines.
pub const KEYS: [&str; 5] = ["ipv4", "ipv6", "cidr", "host", "default-route"];

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identifiers {
    /// Lowercased host names.
    pub hosts: Vec<String>,
    /// `ipv4` and `ipv6` values.
    pub addresses: Vec<IpAddr>,
    pub cidrs: Vec<Cidr>,
    /// Only the first `default-route` counts, as upstream.
    pub default_route: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IdentifiersError {
    #[error("agent identifiers {0:?}: ';' is not a separator (use '&')")]
    Semicolon(String),
    #[error("agent identifier {key}={value:?} is not a valid {what}")]
    Invalid {
        key: String,
        value: String,
        what: &'static str,
    },
    #[error("unknown agent identifier key {0:?} (known: ipv4, ipv6, cidr, host, default-route)")]
    UnknownKey(String),
}

impl Identifiers {
    /// Parses identifiers as a server does: keys it does not know are skipped.
    pub fn parse(query: &str) -> Result<Self, IdentifiersError> {
        Self::parse_with(query, false)
    }

    /// Parses identifiers as an agent must before sending them: every key must be known.
    pub fn parse_strict(query: &str) -> Result<Self, IdentifiersError> {
        Self::parse_with(query, true)
    }

    fn parse_with(query: &str, strict: bool) -> Result<Self, IdentifiersError> {
        if query.contains(';') {
            return Err(IdentifiersError::Semicolon(query.to_owned()));
        }
        let mut ids = Identifiers::default();
        let mut saw_default_route = false;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let invalid = |what| IdentifiersError::Invalid {
                key: key.to_string(),
                value: value.to_string(),
                what,
            };
            match key.as_ref() {
                "host" => ids.hosts.push(value.to_ascii_lowercase()),
                "ipv4" | "ipv6" => {
                    let ip: IpAddr = value.parse().map_err(|_| invalid("IP address"))?;
                    // `::ffff:a.b.c.d` is a.b.c.d to the kernel that dials it, so to us.
                    ids.addresses.push(ip.to_canonical());
                }
                "cidr" => ids.cidrs.push(value.parse().map_err(|_| invalid("CIDR"))?),
                "default-route" if !saw_default_route => {
                    saw_default_route = true;
                    ids.default_route = go_bool(&value).ok_or_else(|| invalid("boolean"))?;
                }
                "default-route" => {}
                other if strict => return Err(IdentifiersError::UnknownKey(other.to_owned())),
                _ => {}
            }
        }
        Ok(ids)
    }

    /// Whether this agent serves `host` (a dial address without its port): it is one of the
    /// host names (an IP literal given as `host=` included, as upstream, where every
    /// identifier is a key), or an IP that compares canonically with the addresses or falls in
    /// the CIDRs.
    pub fn serves(&self, host: &str) -> bool {
        self.serves_destination(&Destination::new(host))
    }

    /// [`Identifiers::serves`] for a destination parsed once, for checking many agents.
    pub fn serves_destination(&self, destination: &Destination<'_>) -> bool {
        self.hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(destination.host))
            || destination.ip.is_some_and(|ip| {
                self.addresses.contains(&ip) || self.cidrs.iter().any(|c| c.contains(ip))
            })
    }

    /// Whether it names any destination at all (host, address or CIDR).
    pub fn names_destinations(&self) -> bool {
        !(self.hosts.is_empty() && self.addresses.is_empty() && self.cidrs.is_empty())
    }
}

/// A dial's host, with its address parsed once: a dial is checked against every agent, and
/// parsing the host again for each cost most of a dial's time with thousands of agents.
pub struct Destination<'a> {
    pub host: &'a str,
    pub ip: Option<IpAddr>,
}

impl<'a> Destination<'a> {
    pub fn new(host: &'a str) -> Self {
        Destination {
            host,
            ip: host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical()),
        }
    }
}

/// Go's `strconv.ParseBool`, which upstream uses for `default-route`.
fn go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The host part of a dial address: `host:port` → `host`, `[v6]:port` → `v6`.
pub fn dial_host(address: &str) -> &str {
    if address.matches(':').count() <= 1 {
        return address.split(':').next().unwrap_or(address);
    }
    let host = match address.rfind(':') {
        Some(i) if address.contains('[') => &address[..i],
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_a_query_string() {
        let ids = Identifiers::parse(
            "host=Node1.example&ipv4=10.0.0.5&ipv6=fd00:0::1&cidr=10.1.0.0/16&default-route=true&default-route=false&future=x",
        )
        .unwrap();
        assert_eq!(ids.hosts, vec!["node1.example"]);
        assert!(ids.default_route, "only the first default-route counts");
        assert!(ids.serves("node1.EXAMPLE"));
        assert!(ids.serves("fd00::1"), "IPv6 addresses compare canonically");
        assert!(ids.serves("10.0.0.5"));
        assert!(ids.serves("10.1.200.7"));
        assert!(!ids.serves("10.2.0.1"));
        // Found by the identifiers fuzz target: an address written as a host name.
        let named = Identifiers::parse("host=10.0.0.5").unwrap();
        assert!(named.serves("10.0.0.5"));
        // An IPv4-mapped IPv6 address is the IPv4 address, claimed or dialled.
        let mapped = Identifiers::parse("ipv6=::ffff:10.0.0.5").unwrap();
        assert_eq!(mapped.addresses, ["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert!(mapped.serves("10.0.0.5"));
        assert!(ids.serves("::ffff:10.0.0.5"));
        assert_eq!(
            Identifiers::parse("host=a;ipv4=1.2.3.4"),
            Err(IdentifiersError::Semicolon("host=a;ipv4=1.2.3.4".into()))
        );
        assert!(Identifiers::parse("ipv4=not-an-ip").is_err());
        assert!(Identifiers::parse("default-route=yes").is_err());
        assert_eq!(Identifiers::parse("").unwrap(), Identifiers::default());
    }

    #[test]
    fn an_agent_refuses_keys_upstream_does_not_define() {
        assert_eq!(
            Identifiers::parse_strict("host=a&uid=x"),
            Err(IdentifiersError::UnknownKey("uid".into()))
        );
        assert!(Identifiers::parse("host=a&uid=x").is_ok());
    }

    #[test]
    fn dial_host_strips_ports_and_brackets() {
        assert_eq!(dial_host("node1:10250"), "node1");
        assert_eq!(dial_host("10.0.0.1:80"), "10.0.0.1");
        assert_eq!(dial_host("[fd00::1]:10250"), "fd00::1");
        assert_eq!(dial_host("fd00::1"), "fd00::1");
        assert_eq!(dial_host("node1"), "node1");
    }
}
