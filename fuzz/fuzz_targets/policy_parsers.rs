//! The parsers behind the guard's and the dial policy's flags (`--control-plane-cidr`,
//! `--allowed-cidr`, `--dial-allow`/`--dial-deny`, `--guard-allow-tunnel`, durations), and the
//! dial policy's decision: deny wins over allow at the same specificity, and nothing less
//! specific than a matching deny may allow.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tether_agent::config::AllowedTunnel;
use tether_agent::dial_plane::policy::{Action, DialPolicy, Origin, Rule, Target};
use tether_proto::cidr::Cidr;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    cidr: &'a str,
    allow: Vec<&'a str>,
    deny: Vec<&'a str>,
    destination: ([u8; 16], bool, u16),
    tunnel: &'a str,
    duration: &'a str,
}

fn specificity(rule: &Rule) -> (u8, std::cmp::Reverse<u32>, bool) {
    (
        rule.prefix.len,
        std::cmp::Reverse(u32::from(rule.ports.last - rule.ports.first)),
        !matches!(rule.origin, Origin::Default(_)),
    )
}

fn matches(rule: &Rule, addr: SocketAddr) -> bool {
    rule.prefix.contains(addr.ip().to_canonical())
        && (rule.ports.first..=rule.ports.last).contains(&addr.port())
}

fuzz_target!(|input: Input<'_>| {
    if let Ok(cidr) = input.cidr.parse::<Cidr>() {
        assert!(
            cidr.contains(cidr.addr),
            "{cidr} does not contain its own address"
        );
        let again: Cidr = cidr
            .to_string()
            .parse()
            .expect("a printed prefix does not parse");
        assert_eq!(again, cidr, "printing and parsing changed the prefix");
    }
    let parse = |texts: &[&str]| -> Vec<Target> {
        texts
            .iter()
            .filter_map(|t| t.parse::<Target>().ok())
            .inspect(|target| {
                let rule = Rule {
                    action: Action::Allow,
                    prefix: target.prefix,
                    ports: target.ports,
                    origin: Origin::Flag,
                };
                let again: Target = rule
                    .target()
                    .parse()
                    .expect("a printed rule does not parse");
                assert_eq!(&again, target, "printing and parsing changed the rule");
            })
            .collect()
    };
    let allow = parse(&input.allow);
    let deny = parse(&input.deny);
    let policy = DialPolicy::new(&allow, &deny, Vec::new());
    let (bytes, v4, port) = input.destination;
    let ip = if v4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    let addr = SocketAddr::new(ip, port);
    let verdict = policy.decide(addr);
    let matching: Vec<&Rule> = policy.rules().iter().filter(|r| matches(r, addr)).collect();
    match verdict.rule {
        None => {
            assert!(matching.is_empty(), "a matching rule was not applied");
            assert_eq!(verdict.allowed, allow.is_empty(), "wrong fallback");
        }
        Some(index) => {
            let chosen = &policy.rules()[index];
            assert!(matches(chosen, addr), "the deciding rule does not match");
            assert_eq!(verdict.allowed, chosen.action == Action::Allow);
            for other in &matching {
                assert!(
                    specificity(other) <= specificity(chosen),
                    "{chosen} decided although {other} is more specific"
                );
                if verdict.allowed && other.action == Action::Deny {
                    assert!(
                        specificity(other) < specificity(chosen),
                        "{chosen} allowed although {other} denies at the same specificity"
                    );
                }
            }
        }
    }
    let _ = policy.refusal(addr, verdict);
    if let Ok(AllowedTunnel::Udp(port)) = input.tunnel.parse::<AllowedTunnel>() {
        assert_ne!(port, 0, "UDP port 0 accepted");
    }
    if let Ok(duration) = tether_runtime::flags::go_duration(input.duration) {
        assert!(!input.duration.is_empty());
        let _ = duration.as_nanos();
    }
});
