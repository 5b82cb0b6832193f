//! IP prefixes, as agent identifiers (`cidr=`) and the guard's policy flags write them. One
//! type for the workspace.

use std::net::IpAddr;
use std::str::FromStr;

/// An IP prefix (`10.0.0.0/8`, `fd00::/8`, or a bare address for a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadCidr {
    #[error("{0:?} is not an IP prefix (examples: 10.0.0.0/8, fd00::/8, 192.0.2.7)")]
    Syntax(String),
    #[error(
        "{0:?} is an IPv4-mapped IPv6 prefix shorter than /96: it reaches beyond the mapped range; write the IPv4 prefix instead"
    )]
    MappedTooShort(String),
}

impl Cidr {
    /// Whether `ip` falls inside this prefix (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, bits) = match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                (u128::from(n.to_bits()), u128::from(i.to_bits()), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => (n.to_bits(), i.to_bits(), 128),
            _ => return false,
        };
        if self.len == 0 {
            return true;
        }
        let shift = bits - u32::from(self.len);
        (net >> shift) == (ip >> shift)
    }
}

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Self, BadCidr> {
        let bad = || BadCidr::Syntax(text.to_owned());
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        // IPv4 arrives as IPv4 on the wire, never in its mapped IPv6 form: a mapped prefix
        // would match nothing, so it means the IPv4 prefix it maps.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            let len = len
                .checked_sub(96)
                .ok_or_else(|| BadCidr::MappedTooShort(text.to_owned()))?;
            return Ok(Cidr {
                addr: IpAddr::V4(v4),
                len,
            });
        }
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prefixes_and_bare_addresses() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.7".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(
            !net.contains("::ffff:10.1.0.1".parse().unwrap()),
            "families never mix"
        );
        let host: Cidr = "fd00::1".parse().unwrap();
        assert_eq!(host.len, 128);
        assert!(host.contains("fd00:0::1".parse().unwrap()));
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("192.0.2.1".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "fd00::/129", "nope/8", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv4_mapped_prefixes_mean_their_ipv4_prefix() {
        let mapped: Cidr = "::ffff:10.1.0.0/112".parse().unwrap();
        assert_eq!(mapped, "10.1.0.0/16".parse().unwrap());
        assert!(mapped.contains("10.1.2.3".parse().unwrap()));
        let host: Cidr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(host, "192.0.2.7/32".parse().unwrap());
        assert_eq!(
            "::ffff:0:0/96".parse::<Cidr>().unwrap(),
            "0.0.0.0/0".parse().unwrap()
        );
        assert!(matches!(
            "::ffff:10.0.0.0/64".parse::<Cidr>(),
            Err(BadCidr::MappedTooShort(_))
        ));
        // Not mapped: IPv4-compatible and NAT64 prefixes stay IPv6.
        assert!("64:ff9b::/96".parse::<Cidr>().unwrap().addr.is_ipv6());
    }
}
