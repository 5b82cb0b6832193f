//! What the agent may dial: `--dial-allow` and `--dial-deny` rules over destination prefixes
//! and ports, with safe defaults. The control plane chooses every destination, so without a
//! policy a compromised control plane could use the agent as a pivot to the cloud metadata
//! endpoint or to admin ports on the node's loopback.
//!
//! Rules are tried most specific first (longer prefix, then narrower port range); at equal
//! specificity the operator's rules come before the built-in ones (so `--dial-allow=127.0.0.0/8`
//! lifts the default loopback denial), and a deny before an allow; the first rule that matches
//! decides. What no rule
//! matches is allowed, unless an allow list was given: then it is denied. The same ordered
//! list is what the kernel hooks enforce on the agent's own sockets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tether_proto::cidr::{BadCidr, Cidr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// An inclusive port range; `0..=65535` is any port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    pub const ANY: Ports = Ports {
        first: 0,
        last: u16::MAX,
    };

    fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    fn width(self) -> u32 {
        u32::from(self.last - self.first)
    }
}

/// Where a rule came from, which its explanation names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Built in; the text says what the prefix holds.
    Default(&'static str),
    /// `--dial-allow` or `--dial-deny`.
    Flag,
    /// The proxy server, which the agent must always reach.
    ProxyServer,
    /// A nameserver in /etc/resolv.conf, which the agent's lookups need.
    Resolver,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub prefix: Cidr,
    pub ports: Ports,
    pub origin: Origin,
}

impl Rule {
    fn matches(&self, addr: SocketAddr) -> bool {
        self.prefix.contains(canonical(addr.ip())) && self.ports.contains(addr.port())
    }

    /// The rule as a flag would write it: `10.0.0.0/8`, `10.0.0.0/8:443`, `[fd00::/8]:80-90`.
    pub fn target(&self) -> String {
        let ports = match self.ports {
            Ports::ANY => return self.prefix.to_string(),
            Ports { first, last } if first == last => first.to_string(),
            Ports { first, last } => format!("{first}-{last}"),
        };
        match self.prefix.addr {
            IpAddr::V4(_) => format!("{}:{ports}", self.prefix),
            IpAddr::V6(_) => format!("[{}]:{ports}", self.prefix),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{action} {}", self.target())?;
        match &self.origin {
            Origin::Default(what) => write!(f, " (default: {what})"),
            Origin::Flag => match self.action {
                Action::Allow => write!(f, " (--dial-allow)"),
                Action::Deny => write!(f, " (--dial-deny)"),
            },
            Origin::ProxyServer => write!(f, " (the proxy server)"),
            Origin::Resolver => write!(f, " (a nameserver in /etc/resolv.conf)"),
        }
    }
}

/// IPv4 in its mapped IPv6 form is IPv4: an IPv6 socket can reach it that way.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadRule {
    #[error("{0:?}: {1}")]
    Prefix(String, BadCidr),
    #[error(
        "{0:?} is not a dial rule (examples: 10.0.0.0/8, 10.0.0.0/8:443, 192.0.2.7:8000-8999, [fd00::/8]:443, fd00::/8)"
    )]
    Syntax(String),
    #[error("{0:?}: the port range ends before it starts")]
    Backwards(String),
}

/// A rule's target as written in a flag: a prefix or address, optionally `:PORT` or
/// `:FIRST-LAST`; IPv6 with a port goes in brackets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub prefix: Cidr,
    pub ports: Ports,
}

impl FromStr for Target {
    type Err = BadRule;

    fn from_str(text: &str) -> Result<Self, BadRule> {
        let syntax = || BadRule::Syntax(text.to_owned());
        let (prefix, ports) = if let Some(rest) = text.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or_else(syntax)?;
            let ports = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(syntax)?),
            };
            (inside, ports)
        } else if let Some((addr, rest)) = text.split_once('/') {
            // After the slash come digits, so a colon there can only start the ports.
            match rest.split_once(':') {
                Some((len, ports)) => (&text[..addr.len() + 1 + len.len()], Some(ports)),
                None => (text, None),
            }
        } else if text.parse::<IpAddr>().is_ok() {
            (text, None)
        } else {
            // `192.0.2.7:80`: only IPv4 may carry a port without brackets.
            let (addr, ports) = text.rsplit_once(':').ok_or_else(syntax)?;
            if addr.parse::<Ipv4Addr>().is_err() {
                return Err(syntax());
            }
            (addr, Some(ports))
        };
        let prefix: Cidr = prefix
            .parse()
            .map_err(|err| BadRule::Prefix(text.to_owned(), err))?;
        let ports = match ports {
            None => Ports::ANY,
            Some(ports) => {
                let (first, last) = ports.split_once('-').unwrap_or((ports, ports));
                let first: u16 = first.parse().map_err(|_| syntax())?;
                let last: u16 = last.parse().map_err(|_| syntax())?;
                if last < first {
                    return Err(BadRule::Backwards(text.to_owned()));
                }
                Ports { first, last }
            }
        };
        Ok(Target { prefix, ports })
    }
}

/// The built-in denials: link-local (cloud metadata lives there), loopback, the unspecified
/// addresses Linux connects to the node itself, and the cloud metadata endpoints outside
/// link-local.
fn defaults() -> Vec<Rule> {
    let deny = |addr: IpAddr, len, what| Rule {
        action: Action::Deny,
        prefix: Cidr { addr, len },
        ports: Ports::ANY,
        origin: Origin::Default(what),
    };
    let link_local = "link-local, which holds cloud metadata endpoints";
    let loopback = "loopback, the node's local-only services";
    let mut rules = vec![
        deny(Ipv4Addr::new(169, 254, 0, 0).into(), 16, link_local),
        deny(
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0).into(),
            10,
            link_local,
        ),
        deny(Ipv4Addr::new(127, 0, 0, 0).into(), 8, loopback),
        deny(Ipv6Addr::LOCALHOST.into(), 128, loopback),
        // connect() to 0.0.0.0 or :: reaches the local host (its loopback listeners too),
        // and a mapped `::ffff:0.0.0.0` is judged as the IPv4 it is. The IPv4-compatible
        // form (`::a.b.c.d`, deprecated) has no use but to smuggle an address past a rule.
        deny(
            Ipv4Addr::UNSPECIFIED.into(),
            8,
            "this network (0.0.0.0/8): Linux connects 0.0.0.0 to the node itself",
        ),
        deny(
            Ipv6Addr::UNSPECIFIED.into(),
            96,
            "unspecified and IPv4-compatible IPv6: Linux connects :: to the node itself",
        ),
    ];
    rules.extend(
        CLOUD_METADATA
            .iter()
            .map(|(addr, len, what)| deny(*addr, *len, what)),
    );
    rules
}

/// Cloud metadata and credential endpoints outside link-local, denied like link-local: each
/// hands the node's (or its pods') cloud credentials to whoever asks from the node.
/// docs/threat-model.md names where each is documented.
const CLOUD_METADATA: [(IpAddr, u8, &str); 9] = [
    (
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
        128,
        "cloud metadata: AWS instance metadata over IPv6",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
        128,
        "cloud metadata: EKS Pod Identity credentials over IPv6",
    ),
    (
        IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
        32,
        "cloud metadata: Alibaba Cloud instance metadata",
    ),
    (
        IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
        32,
        "cloud metadata: Azure WireServer",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254)),
        128,
        "cloud metadata: Google Cloud metadata server over IPv6",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xc1, 0, 0, 0, 0, 0xa9fe, 0xa9fe)),
        128,
        "cloud metadata: Oracle Cloud instance metadata over IPv6",
    ),
    (
        IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
        32,
        "cloud metadata: Oracle Cloud at Customer instance metadata",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xa9fe, 0xa9fe, 0, 0, 0, 0, 1)),
        128,
        "cloud metadata: Akamai (Linode) metadata over IPv6",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x42, 0, 0, 0, 0, 0, 0x42)),
        128,
        "cloud metadata: Scaleway instance metadata over IPv6",
    ),
];

/// The ordered rules and what happens to a destination none of them matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialPolicy {
    rules: Vec<Rule>,
    /// An allow list was given: what no rule allows is denied.
    allow_list: bool,
}

/// Which rule decided, by index into [`DialPolicy::rules`]; `None` is the fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub rule: Option<usize>,
}

impl DialPolicy {
    /// The defaults, the operator's rules, and the destinations the agent itself needs
    /// (`needed`: the proxy server's and the nameservers' addresses and ports).
    pub fn new(allow: &[Target], deny: &[Target], needed: Vec<Rule>) -> Self {
        let flag = |action| {
            move |t: &Target| Rule {
                action,
                prefix: t.prefix,
                ports: t.ports,
                origin: Origin::Flag,
            }
        };
        let mut rules = defaults();
        rules.extend(deny.iter().map(flag(Action::Deny)));
        rules.extend(allow.iter().map(flag(Action::Allow)));
        rules.extend(needed);
        rules.sort_by_key(|r| {
            (
                std::cmp::Reverse(r.prefix.len),
                r.ports.width(),
                matches!(r.origin, Origin::Default(_)),
                r.action == Action::Allow,
            )
        });
        DialPolicy {
            rules,
            allow_list: !allow.is_empty(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether what no rule matches is denied.
    pub fn denies_by_default(&self) -> bool {
        self.allow_list
    }

    pub fn decide(&self, addr: SocketAddr) -> Verdict {
        match self.rules.iter().position(|r| r.matches(addr)) {
            Some(index) => Verdict {
                allowed: self.rules[index].action == Action::Allow,
                rule: Some(index),
            },
            None => Verdict {
                allowed: !self.allow_list,
                rule: None,
            },
        }
    }

    /// Why `verdict` came out as it did, in words an operator can act on.
    pub fn explain(&self, verdict: Verdict) -> String {
        match verdict.rule {
            Some(index) => self.rules[index].to_string(),
            None if self.allow_list => "not in any --dial-allow".to_owned(),
            None => "no rule matches; allowed (no --dial-allow list)".to_owned(),
        }
    }

    /// The DIAL_RSP error for a denied destination; the server's client sees it verbatim.
    pub fn refusal(&self, addr: SocketAddr, verdict: Verdict) -> String {
        format!(
            "dial tcp {addr}: denied by tether-agent's dial policy: {}",
            self.explain(verdict)
        )
    }
}

/// The agent needs these whatever the policy says: each address the proxy server resolves to,
/// on its port, and each nameserver, on port 53.
pub fn needed(server: &[SocketAddr], nameservers: &[IpAddr]) -> Vec<Rule> {
    let host = |ip: IpAddr, port: u16, origin: Origin| {
        let ip = canonical(ip);
        Rule {
            action: Action::Allow,
            prefix: Cidr {
                addr: ip,
                len: if ip.is_ipv4() { 32 } else { 128 },
            },
            ports: Ports {
                first: port,
                last: port,
            },
            origin,
        }
    };
    server
        .iter()
        .map(|a| host(a.ip(), a.port(), Origin::ProxyServer))
        .chain(nameservers.iter().map(|ip| host(*ip, 53, Origin::Resolver)))
        .collect()
}

/// The nameservers in a resolv.conf text.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        // A scoped IPv6 nameserver (`fe80::1%eth0`) names its address before the `%`.
        .filter_map(|ns| ns.split('%').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(list: &[&str]) -> Vec<Target> {
        list.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn policy(allow: &[&str], deny: &[&str]) -> DialPolicy {
        DialPolicy::new(&targets(allow), &targets(deny), Vec::new())
    }

    fn allowed(policy: &DialPolicy, addr: &str) -> bool {
        policy.decide(addr.parse().unwrap()).allowed
    }

    #[test]
    fn targets_parse_with_and_without_ports() {
        let t = |s: &str| s.parse::<Target>().unwrap();
        assert_eq!(t("10.0.0.0/8").ports, Ports::ANY);
        assert_eq!(
            t("10.0.0.0/8:443").ports,
            Ports {
                first: 443,
                last: 443
            }
        );
        assert_eq!(t("10.0.0.0/8:443").prefix.len, 8);
        assert_eq!(
            t("192.0.2.7:8000-8999").ports,
            Ports {
                first: 8000,
                last: 8999
            }
        );
        assert_eq!(t("192.0.2.7:8000-8999").prefix.len, 32);
        assert_eq!(t("192.0.2.7").ports, Ports::ANY);
        assert_eq!(t("fd00::/8").prefix.len, 8);
        assert_eq!(t("fd00::/8:443").ports.first, 443);
        assert_eq!(t("[fd00::/8]:443").ports.first, 443);
        assert_eq!(t("[fd00::1]:80").prefix.len, 128);
        assert_eq!(t("fd00::1").ports, Ports::ANY);
        assert_eq!(
            t("::ffff:10.0.0.0/104").prefix,
            "10.0.0.0/8".parse().unwrap()
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/8:",
            "10.0.0.0/8:99999",
            "[fd00::/8",
            "[fd00::]443",
            "host:80",
            "fd00::1:80x",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            "10.0.0.0/8:90-80".parse::<Target>(),
            Err(BadRule::Backwards("10.0.0.0/8:90-80".into()))
        );
    }

    #[test]
    fn defaults_deny_link_local_loopback_unspecified_and_metadata_and_allow_the_rest() {
        let p = policy(&[], &[]);
        assert!(!allowed(&p, "169.254.169.254:80"));
        assert!(!allowed(&p, "[fe80::a9fe:a9fe]:80"));
        assert!(!allowed(&p, "127.0.0.1:10250"));
        assert!(!allowed(&p, "[::1]:10250"));
        assert!(
            !allowed(&p, "[::ffff:169.254.169.254]:80"),
            "the mapped form is IPv4"
        );
        for local in [
            "0.0.0.0:10250",
            "0.255.0.1:10250",
            "[::]:10250",
            "[::ffff:0.0.0.0]:10250",
            "[::127.0.0.1]:10250",
        ] {
            assert!(!allowed(&p, local), "{local} reaches the node itself");
        }
        assert!(!allowed(&p, "[fd00:ec2::254]:80"));
        assert!(!allowed(&p, "100.100.100.200:80"));
        assert!(allowed(&p, "100.100.100.201:80"));
        assert!(allowed(&p, "10.0.3.7:10250"));
        assert!(allowed(&p, "[fd00::7]:10250"));
        assert!(allowed(&p, "[::1:0:0:1]:80"), "just past ::/96");
        let verdict = p.decide("169.254.169.254:80".parse().unwrap());
        assert_eq!(
            p.refusal("169.254.169.254:80".parse().unwrap(), verdict),
            "dial tcp 169.254.169.254:80: denied by tether-agent's dial policy: deny 169.254.0.0/16 (default: link-local, which holds cloud metadata endpoints)"
        );
    }

    #[test]
    fn the_most_specific_rule_decides_and_deny_wins_a_tie() {
        // A loopback port the operator allows, inside the default loopback denial.
        let p = policy(&["127.0.0.1/32:10250"], &[]);
        assert!(allowed(&p, "127.0.0.1:10250"));
        assert!(!allowed(&p, "127.0.0.1:10251"));
        // An allow list denies everything else.
        assert!(!allowed(&p, "10.0.3.7:10250"));
        assert_eq!(
            p.explain(p.decide("10.0.3.7:1".parse().unwrap())),
            "not in any --dial-allow"
        );

        // Overlaps: the narrower prefix wins either way round.
        let p = policy(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        assert!(allowed(&p, "10.2.0.1:80"));
        assert!(!allowed(&p, "10.1.0.1:80"));
        let p = policy(&["10.1.0.0/16"], &["10.0.0.0/8"]);
        assert!(allowed(&p, "10.1.0.1:80"));
        assert!(!allowed(&p, "10.2.0.1:80"));
        // Same prefix: the narrower port range wins; same range: deny wins.
        let p = policy(&["10.0.0.0/8:443"], &["10.0.0.0/8"]);
        assert!(allowed(&p, "10.0.0.1:443"));
        assert!(!allowed(&p, "10.0.0.1:80"));
        let p = policy(&["10.0.0.0/8:443"], &["10.0.0.0/8:443"]);
        assert!(!allowed(&p, "10.0.0.1:443"));
        // The operator's rule overrides a built-in one of the same specificity.
        let p = policy(&["127.0.0.0/8", "0.0.0.0/0"], &[]);
        assert!(allowed(&p, "127.0.0.1:80"));
        assert!(!allowed(&p, "169.254.169.254:80"));
        // Families never cross.
        let p = policy(&["0.0.0.0/0"], &[]);
        assert!(!allowed(&p, "[fd00::1]:80"));
        assert!(allowed(&p, "192.0.2.1:80"));
        assert!(
            !allowed(&p, "169.254.169.254:80"),
            "the default is more specific than /0"
        );
        let p = policy(&["::/0"], &["fd00::/8:22"]);
        assert!(allowed(&p, "[fd00::1]:80"));
        assert!(!allowed(&p, "[fd00::1]:22"));
    }

    #[test]
    fn the_agents_own_needs_are_allowed_through_an_allow_list() {
        let needed = needed(
            &["127.0.0.1:8091".parse().unwrap()],
            &["169.254.20.10".parse().unwrap()],
        );
        let p = DialPolicy::new(&targets(&["10.0.0.0/8"]), &[], needed);
        assert!(allowed(&p, "127.0.0.1:8091"), "the proxy server");
        assert!(!allowed(&p, "127.0.0.1:8092"));
        assert!(allowed(&p, "169.254.20.10:53"), "node-local DNS");
        assert!(!allowed(&p, "169.254.20.10:80"));
    }

    #[test]
    fn nameservers_come_from_resolv_conf() {
        let text = "# generated\nsearch cluster.local\nnameserver 169.254.20.10\nnameserver fe80::1%eth0\nnameserver  10.96.0.10 \noptions ndots:5\n";
        let found: Vec<String> = nameservers(text).iter().map(ToString::to_string).collect();
        assert_eq!(found, ["169.254.20.10", "fe80::1", "10.96.0.10"]);
    }
}
