//! Which interfaces can carry the control plane's traffic to this node, and when that may have
//! changed: every interface with a route that overlaps a control-plane prefix (the default
//! route overlaps them all) plus the ones the operator names. Routes are read from the main
//! tables in /proc; changes are announced by rtnetlink.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
};
use tether_proto::cidr::Cidr;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A route of the main table: where a prefix goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Cidr,
    pub interface: String,
}

/// Interfaces that can carry traffic from `control_plane`, plus `named`, sorted.
pub fn carrying(control_plane: &[Cidr], named: &[String]) -> Vec<String> {
    select(&routes(), control_plane, named)
}

fn routes() -> Vec<Route> {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    let mut routes = routes_v4(&read("/proc/net/route"));
    routes.extend(routes_v6(&read("/proc/net/ipv6_route")));
    routes
}

/// The node's own addresses: those on the interfaces of its default routes, without loopback
/// and link-local ones; sorted.
pub fn node_addresses() -> Vec<IpAddr> {
    let uplinks: BTreeSet<String> = routes()
        .into_iter()
        .filter(|r| r.destination.len == 0 && r.interface != "lo")
        .map(|r| r.interface)
        .collect();
    let mut found: Vec<IpAddr> = addresses()
        .into_iter()
        .filter(|(interface, address)| {
            let link_local = match address {
                IpAddr::V4(a) => a.is_link_local(),
                IpAddr::V6(a) => a.is_unicast_link_local(),
            };
            uplinks.contains(interface) && !link_local && !address.is_loopback()
        })
        .map(|(_, address)| address)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Every address on an interface of this network namespace: (interface, address).
pub fn addresses() -> Vec<(String, IpAddr)> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addresses
        .filter_map(|a| {
            let address = a.address?;
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(address.as_sockaddr_in6()?.ip())
            };
            Some((a.interface_name, ip))
        })
        .collect()
}

fn select(routes: &[Route], control_plane: &[Cidr], named: &[String]) -> Vec<String> {
    let mut names: BTreeSet<String> = named.iter().cloned().collect();
    for route in routes {
        let overlaps = control_plane
            .iter()
            .any(|cp| route.destination.contains(cp.addr) || cp.contains(route.destination.addr));
        if overlaps && route.interface != "lo" {
            names.insert(route.interface.clone());
        }
    }
    names.into_iter().collect()
}

/// `/proc/net/route`: Iface, Destination, Gateway, Flags, …, Mask (columns 0, 1, 3, 7), the
/// addresses as the host-order hex of their network-order bytes.
fn routes_v4(table: &str) -> Vec<Route> {
    const RTF_UP: u32 = 0x1;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| cols.get(i).and_then(|c| u32::from_str_radix(c, 16).ok());
            if hex(3)? & RTF_UP == 0 {
                return None;
            }
            let address = Ipv4Addr::from(hex(1)?.to_le_bytes());
            let len = u8::try_from(hex(7)?.count_ones()).ok()?;
            Some(Route {
                destination: Cidr {
                    addr: IpAddr::V4(address),
                    len,
                },
                interface: (*cols.first()?).to_owned(),
            })
        })
        .collect()
}

/// `/proc/net/ipv6_route`: destination, prefix length, …, flags, interface (columns 0, 1, 8,
/// 9), in hex. The kernel lists an unreachable default on `lo`; `select` skips `lo`.
fn routes_v6(table: &str) -> Vec<Route> {
    const RTF_UP: u32 = 0x1;
    table
        .lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(cols.get(8)?, 16).ok()?;
            if flags & RTF_UP == 0 {
                return None;
            }
            let address = Ipv6Addr::from(u128::from_str_radix(cols.first()?, 16).ok()?);
            Some(Route {
                destination: Cidr {
                    addr: IpAddr::V6(address),
                    len: u8::from_str_radix(cols.get(1)?, 16).ok()?,
                },
                interface: (*cols.get(9)?).to_owned(),
            })
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
#[error("cannot subscribe to rtnetlink for interface and route changes")]
pub struct WatchError(#[source] std::io::Error);

/// Wakes when links or routes change in this network namespace.
pub struct Changes {
    socket: AsyncFd<OwnedFd>,
}

impl Changes {
    pub fn subscribe() -> Result<Self, WatchError> {
        // Multicast groups (linux/rtnetlink.h): RTMGRP_LINK, RTMGRP_IPV4_ROUTE,
        // RTMGRP_IPV6_ROUTE.
        const GROUPS: u32 = 0x1 | 0x40 | 0x400;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|e| WatchError(e.into()))?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, GROUPS),
        )
        .map_err(|e| WatchError(e.into()))?;
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until it drops.
        let socket = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|err| WatchError(err.into()))?;
        Ok(Changes { socket })
    }

    /// Waits for the next change and swallows the burst it came in (an interface coming up
    /// announces itself, its addresses and its routes in a few messages).
    pub async fn next(&mut self) -> Result<(), WatchError> {
        self.drain().await?;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // What arrived during the pause belongs to the same change.
        let mut buf = [0u8; 8192];
        while nix::unistd::read(self.socket.get_ref(), &mut buf).is_ok_and(|n| n > 0) {}
        Ok(())
    }

    async fn drain(&mut self) -> Result<(), WatchError> {
        let mut buf = [0u8; 8192];
        loop {
            let mut ready = self.socket.readable().await.map_err(WatchError)?;
            match ready.try_io(|fd| {
                nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(_)) => return Ok(()),
                // ENOBUFS: more changed than the socket buffer held; a change all the same.
                Ok(Err(err)) if err.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
                Ok(Err(err)) => return Err(WatchError(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    #[test]
    fn v4_routes_are_read_with_their_prefixes() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth1\t0000580A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth2\t0000590A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            routes_v4(table),
            [
                Route {
                    destination: cidr("0.0.0.0/0"),
                    interface: "eth0".into()
                },
                Route {
                    destination: cidr("10.88.0.0/24"),
                    interface: "eth1".into()
                },
            ]
        );
    }

    #[test]
    fn v6_routes_are_read_with_their_prefixes() {
        let zero = "00000000000000000000000000000000";
        let table = format!(
            "{zero} 00 {zero} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 ens5\n\
             fd770000000000000000000000000000 40 {zero} 00 {zero} 00000100 00000001 00000000 00000001 ens6\n\
             {zero} 00 {zero} 00 {zero} ffffffff 00000001 00000000 00200200 lo\n"
        );
        let routes = routes_v6(&table);
        assert_eq!(routes[1].destination, cidr("fd77::/64"));
        assert_eq!(routes[1].interface, "ens6");
        assert_eq!(routes.len(), 2, "the route that is not up is left out");
    }

    #[test]
    fn interfaces_routing_to_the_control_plane_are_chosen() {
        let route = |d: &str, i: &str| Route {
            destination: cidr(d),
            interface: i.into(),
        };
        let routes = [
            route("10.88.0.0/24", "eth1"),
            route("10.0.0.0/8", "eth2"),
            route("192.168.0.0/16", "eth3"),
            route("fd77::/64", "eth4"),
            route("::/0", "lo"),
        ];
        assert_eq!(
            select(&routes, &[cidr("10.88.0.1/32")], &[]),
            ["eth1", "eth2"],
            "a route covering the prefix, and a wider one"
        );
        assert_eq!(
            select(&routes, &[cidr("10.0.0.0/8")], &[]),
            ["eth1", "eth2"],
            "a narrower route inside the prefix carries part of it"
        );
        assert_eq!(
            select(&routes, &[cidr("fd77::1/128")], &["eth9".into()]),
            ["eth4", "eth9"],
            "named interfaces are guarded whatever they route"
        );
        assert!(select(&routes, &[cidr("172.16.0.0/12")], &[]).is_empty());
    }
}
