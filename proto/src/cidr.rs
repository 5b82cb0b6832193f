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
#[error("{0:?} is not an IP prefix (examples: 10.0.0.0/8, fd00::/8, 192.0.2.7)")]
pub struct BadCidr(pub String);

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
        let bad = || BadCidr(text.to_owned());
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
}
