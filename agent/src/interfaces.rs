//! Which interfaces can carry the control plane's traffic to this node, and when that may have
//! changed: every interface with a route that overlaps a control-plane prefix (the default
//! route overlaps them all) plus the ones the operator names. Routes are read from every
//! routing table and every nexthop of a multipath route, through rtnetlink: policy routing
//! (`ip rule` into other tables, as cloud VPC CNIs do for secondary interfaces) and ECMP
//! uplinks carry the control plane's traffic as much as the main table's first nexthop does.
//! Then the interfaces below those, where their frames really enter: a bridge's ports and the
//! device a macvlan or VLAN sits on hand pods their frames without passing the interface the
//! routes name. Also which UDP ports the node's tunnel devices receive on. Changes are
//! announced by rtnetlink too.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoBareUdp, InfoData, InfoGeneve, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
};
use tether_proto::cidr::Cidr;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::guard_program::Layout;

/// A unicast route: where a prefix goes, and through which interfaces (one per nexthop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Cidr,
    pub interfaces: Vec<u32>,
    pub table: u32,
}

/// `RT_TABLE_MAIN`.
const MAIN_TABLE: u32 = 254;

/// An interface the guard should be on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    /// `None` when no interface has the name (only an operator-named one can be missing).
    pub link: Option<Link>,
    /// When it is wanted because frames for another interface enter through it (a port of
    /// that bridge, the device that macvlan sits on), that interface.
    pub upper: Option<Link>,
}

/// An interface as rtnetlink describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Its device type (`ARPHRD_*`), which says where its frames' IP header is.
    pub device_type: u16,
    /// For a tunnel device (VXLAN, Geneve, bare UDP), the UDP port the kernel takes packets
    /// apart on.
    pub tunnel_port: Option<u16>,
    /// The bridge (or Open vSwitch datapath, or bond) it is a port of.
    pub controller: Option<u32>,
    /// For a device stacked on another one of this namespace (VLAN, macvlan, macvtap, ipvlan,
    /// ipvtap), that one: the frames of both arrive there, readable. (A MACsec device is
    /// guarded itself: below it the guard would see only ciphertext.)
    pub lower: Option<u32>,
    pub role: Role,
}

/// What an interface is to the frames that pass it, as far as where to guard goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// A Linux bridge, whose ports hand each other frames it never sees, or a VRF, whose
    /// devices take in frames for it.
    Bridge,
    /// An Open vSwitch internal port (`br-ex`, say): its datapath switches frames between the
    /// datapath's other ports without it.
    OvsInternal,
    /// One pod's or VM's own link: a veth whose peer is in another network namespace, a tap,
    /// a netkit device. Frames from the network do not enter the node there, and a guard on
    /// it would judge the pod's traffic to its neighbours.
    Endpoint,
    #[default]
    Other,
}

impl Link {
    /// How the guard reads this interface's frames, or `Err` with the device type's name when
    /// the guard cannot read them.
    pub fn layout(&self) -> Result<Layout, DeviceType> {
        layout(self.device_type)
    }
}

/// A device type the guard has no program for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceType(pub u16);

impl std::fmt::Display for DeviceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            ARPHRD_IPGRE => "ipgre",
            ARPHRD_IP6GRE => "ip6gre",
            ARPHRD_INFINIBAND => "infiniband",
            ARPHRD_LOOPBACK => "loopback",
            ARPHRD_VOID => "void",
            _ => "unknown",
        };
        write!(f, "{name} (ARPHRD {})", self.0)
    }
}

// Device types (linux/if_arp.h).
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_INFINIBAND: u16 = 32;
const ARPHRD_PPP: u16 = 512;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_TUNNEL: u16 = 768;
const ARPHRD_TUNNEL6: u16 = 769;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_SIT: u16 = 776;
const ARPHRD_IPGRE: u16 = 778;
const ARPHRD_IP6GRE: u16 = 823;
const ARPHRD_NONE: u16 = 0xfffe;
const ARPHRD_VOID: u16 = 0xffff;

/// Ethernet (veth, bridges, bonds, VLANs, vxlan, macvlan, ipvlan, tap) carries a 14-byte
/// header; tun, WireGuard and xfrm (NONE), raw-IP modems, PPP, ipip, ip6tnl and sit hand the
/// stack the IP header first. GRE devices are left out: one without a remote address (NBMA)
/// hands XDP the outer IP and GRE headers, so the guard would judge the tunnel's endpoint
/// instead of the packet inside.
fn layout(device_type: u16) -> Result<Layout, DeviceType> {
    match device_type {
        ARPHRD_ETHER => Ok(Layout::Ethernet),
        ARPHRD_NONE | ARPHRD_RAWIP | ARPHRD_PPP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT => {
            Ok(Layout::Ip)
        }
        other => Err(DeviceType(other)),
    }
}

/// Interfaces among `links` that can carry traffic from `control_plane`, plus `named`, sorted
/// by name.
pub fn carrying(
    links: &BTreeMap<u32, Link>,
    control_plane: &[Cidr],
    named: &[String],
) -> io::Result<Vec<Wanted>> {
    let names = select(&routes()?, links, control_plane, named);
    Ok(entry_points(links, names)
        .into_iter()
        .map(|(name, upper)| {
            let find = |name: &str| links.values().find(|l| l.name == name).cloned();
            Wanted {
                link: find(&name),
                upper: upper.as_deref().and_then(find),
                name,
            }
        })
        .collect())
}

/// Where the guard goes for `chosen`: on each one itself or, when frames for it enter through
/// other interfaces first, on those instead, down to where they enter the node. Each comes
/// with the name of the chosen interface it stands for, if it was not chosen itself; sorted
/// by name. Never on a device and one below it together: the kernel refuses XDP on a device
/// whose upper device has it.
fn entry_points(
    links: &BTreeMap<u32, Link>,
    chosen: Vec<String>,
) -> BTreeMap<String, Option<String>> {
    let mut wanted = BTreeMap::new();
    for name in chosen {
        let Some(top) = links.values().find(|link| link.name == name) else {
            wanted.insert(name, None);
            continue;
        };
        let mut seen = BTreeSet::from([top.index]);
        let mut queue = vec![top];
        while let Some(link) = queue.pop() {
            let below: Vec<&Link> = entries(links, link)
                .filter(|entry| seen.insert(entry.index))
                .collect();
            if !below.is_empty() {
                queue.extend(below);
            } else if link.index == top.index {
                wanted.insert(name.clone(), None);
            } else {
                wanted
                    .entry(link.name.clone())
                    .or_insert_with(|| Some(name.clone()));
            }
        }
    }
    wanted
}

/// Where frames for `upper` enter before they reach it: the device it is stacked on, and the
/// ports of its bridge (or of its Open vSwitch datapath) other than pods' and VMs' own links
/// and the datapath's other internal ports.
fn entries<'a>(links: &'a BTreeMap<u32, Link>, upper: &'a Link) -> impl Iterator<Item = &'a Link> {
    let bridge = match upper.role {
        Role::Bridge => Some(upper.index),
        Role::OvsInternal => upper.controller,
        _ => None,
    };
    let ports = links.values().filter(move |link| {
        bridge.is_some()
            && link.controller == bridge
            && !matches!(link.role, Role::Endpoint | Role::OvsInternal)
    });
    upper
        .lower
        .and_then(|index| links.get(&index))
        .into_iter()
        .chain(ports)
}

/// The node's own addresses: those on the interfaces of its default routes in the main table,
/// without loopback and link-local ones; sorted.
pub fn node_addresses() -> Vec<IpAddr> {
    let (Ok(routes), Ok(links)) = (routes(), links()) else {
        return Vec::new();
    };
    let uplinks: BTreeSet<&str> = routes
        .iter()
        .filter(|r| r.destination.len == 0 && r.table == MAIN_TABLE)
        .flat_map(|r| &r.interfaces)
        .filter_map(|index| links.get(index))
        .map(|link| link.name.as_str())
        .filter(|name| *name != "lo")
        .collect();
    let mut found: Vec<IpAddr> = addresses()
        .into_iter()
        .filter(|(interface, address)| {
            let link_local = match address {
                IpAddr::V4(a) => a.is_link_local(),
                IpAddr::V6(a) => a.is_unicast_link_local(),
            };
            uplinks.contains(interface.as_str()) && !link_local && !address.is_loopback()
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

fn select(
    routes: &[Route],
    links: &BTreeMap<u32, Link>,
    control_plane: &[Cidr],
    named: &[String],
) -> Vec<String> {
    let mut names: BTreeSet<String> = named.iter().cloned().collect();
    for route in routes {
        let overlaps = control_plane
            .iter()
            .any(|cp| route.destination.contains(cp.addr) || cp.contains(route.destination.addr));
        if !overlaps {
            continue;
        }
        for index in &route.interfaces {
            if let Some(link) = links.get(index)
                && link.name != "lo"
            {
                names.insert(link.name.clone());
            }
        }
    }
    names.into_iter().collect()
}

/// Every interface of this network namespace, by index.
pub fn links() -> io::Result<BTreeMap<u32, Link>> {
    let replies = dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    Ok(replies
        .into_iter()
        .filter_map(|reply| match reply {
            RouteNetlinkMessage::NewLink(link) => {
                let name = link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                })?;
                let (role, lower) = placement(&link);
                let controller = link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Controller(index) => Some(*index),
                    _ => None,
                });
                Some((
                    link.header.index,
                    Link {
                        index: link.header.index,
                        name,
                        device_type: u16::from(link.header.link_layer_type),
                        tunnel_port: tunnel_port(&link),
                        controller,
                        lower,
                        role,
                    },
                ))
            }
            _ => None,
        })
        .collect())
}

/// A link's [`Role`], and the device of this namespace it is stacked on, from its kind and
/// its link attributes.
fn placement(link: &LinkMessage) -> (Role, Option<u32>) {
    let mut kind = None;
    let mut peer = None;
    let mut peer_elsewhere = false;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind),
                    _ => None,
                });
            }
            LinkAttribute::Link(index) => peer = Some(*index),
            // The linked device (a veth's peer, a macvlan's lower device) is in another
            // network namespace, where its index means another interface.
            LinkAttribute::LinkNetNsId(_) => peer_elsewhere = true,
            _ => {}
        }
    }
    let role = match kind {
        Some(InfoKind::Bridge | InfoKind::Vrf) => Role::Bridge,
        Some(InfoKind::Other(other)) if other == "openvswitch" => Role::OvsInternal,
        Some(InfoKind::Veth) if peer_elsewhere => Role::Endpoint,
        Some(InfoKind::Tun | InfoKind::Netkit) => Role::Endpoint,
        _ => Role::Other,
    };
    let stacked = matches!(
        kind,
        Some(
            InfoKind::Vlan
                | InfoKind::MacVlan
                | InfoKind::MacVtap
                | InfoKind::IpVlan
                | InfoKind::IpVtap
        )
    );
    let lower = peer.filter(|_| stacked && !peer_elsewhere);
    (role, lower)
}

/// The UDP ports on which the kernel takes packets apart for a tunnel device among `links`
/// (VXLAN, Geneve, bare UDP), each with the name of a device that uses it. Such a port is a
/// tunnel whatever number it has: overlays do not all keep to the IANA ports.
pub fn udp_tunnel_ports(links: &BTreeMap<u32, Link>) -> BTreeMap<u16, String> {
    links
        .values()
        .filter_map(|link| Some((link.tunnel_port?, link.name.clone())))
        .collect()
}

/// The UDP port a tunnel device receives on, from its link info.
fn tunnel_port(link: &LinkMessage) -> Option<u16> {
    let infos = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    })?;
    infos.iter().find_map(|info| match info {
        LinkInfo::Data(InfoData::Vxlan(data)) => data.iter().find_map(|d| match d {
            InfoVxlan::Port(port) => Some(*port),
            _ => None,
        }),
        LinkInfo::Data(InfoData::Geneve(data)) => data.iter().find_map(|d| match d {
            InfoGeneve::Port(port) => Some(*port),
            _ => None,
        }),
        LinkInfo::Data(InfoData::BareUdp(data)) => data.iter().find_map(|d| match d {
            InfoBareUdp::Port(port) => Some(*port),
            _ => None,
        }),
        _ => None,
    })
}

/// The unicast routes of every table, IPv4 and IPv6.
fn routes() -> io::Result<Vec<Route>> {
    let replies = dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))?;
    Ok(replies
        .iter()
        .filter_map(|reply| match reply {
            RouteNetlinkMessage::NewRoute(route) => unicast(route),
            _ => None,
        })
        .collect())
}

/// A unicast route's destination and every interface it leaves through; `None` for the other
/// kinds (local, broadcast, blackhole, unreachable…), which carry nothing out of an
/// interface.
fn unicast(route: &RouteMessage) -> Option<Route> {
    if route.header.kind != RouteType::Unicast {
        return None;
    }
    let len = route.header.destination_prefix_length;
    let mut destination = None;
    let mut table = u32::from(route.header.table);
    let mut interfaces = Vec::new();
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                destination = Some(IpAddr::V4(*a));
            }
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                destination = Some(IpAddr::V6(*a));
            }
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(index) => interfaces.push(*index),
            RouteAttribute::MultiPath(hops) => {
                interfaces.extend(hops.iter().map(|hop| hop.interface_index));
            }
            _ => {}
        }
    }
    let addr = match (destination, route.header.address_family) {
        (Some(addr), _) => addr,
        (None, netlink_packet_route::AddressFamily::Inet) => Ipv4Addr::UNSPECIFIED.into(),
        (None, netlink_packet_route::AddressFamily::Inet6) => Ipv6Addr::UNSPECIFIED.into(),
        (None, _) => return None,
    };
    interfaces.sort_unstable();
    interfaces.dedup();
    Some(Route {
        destination: Cidr { addr, len },
        interfaces,
        table,
    })
}

/// Sends one rtnetlink dump request and collects every reply until the dump is done.
fn dump(request: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(request));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut replies = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = datagram.as_slice();
        while !rest.is_empty() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::Error(err) if err.code.is_some() => return Err(err.to_io()),
                NetlinkPayload::InnerMessage(reply) => replies.push(reply),
                _ => {}
            }
            if length == 0 || length > rest.len() {
                break;
            }
            rest = &rest[length..];
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read or follow interfaces and routes through rtnetlink")]
pub struct WatchError(#[from] std::io::Error);

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

    /// Links 1 (lo), 2 (eth1), … 5 (eth4), 6 (eth5), 7 (wg0, a WireGuard device).
    fn links() -> BTreeMap<u32, Link> {
        ["lo", "eth1", "eth2", "eth3", "eth4", "eth5", "wg0"]
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let index = u32::try_from(i).unwrap() + 1;
                let device_type = match name {
                    "lo" => ARPHRD_LOOPBACK,
                    "wg0" => ARPHRD_NONE,
                    _ => ARPHRD_ETHER,
                };
                (
                    index,
                    Link {
                        index,
                        name: name.into(),
                        device_type,
                        ..Link::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn interfaces_routing_to_the_control_plane_are_chosen() {
        let route = |d: &str, interfaces: &[u32], table| Route {
            destination: cidr(d),
            interfaces: interfaces.to_vec(),
            table,
        };
        let links = links();
        let routes = [
            route("10.88.0.0/24", &[2], MAIN_TABLE),
            route("10.0.0.0/8", &[3], MAIN_TABLE),
            route("192.168.0.0/16", &[4], MAIN_TABLE),
            route("fd77::/64", &[5], MAIN_TABLE),
            route("::/0", &[1], MAIN_TABLE),
            // A policy-routing table and a multipath route.
            route("0.0.0.0/0", &[6, 7], 100),
        ];
        let select = |cp: &[Cidr], named: &[String]| select(&routes, &links, cp, named);
        assert_eq!(
            select(&[cidr("10.88.0.1/32")], &[]),
            ["eth1", "eth2", "eth5", "wg0"],
            "a route covering the prefix, a wider one, and each nexthop of another table's default"
        );
        assert_eq!(
            select(&[cidr("fd77::1/128")], &["eth9".into()]),
            ["eth4", "eth9"],
            "named interfaces are guarded whatever they route; lo never"
        );
        assert!(select(&[cidr("172.16.0.0/12")], &[]) == ["eth5", "wg0"]);
        assert_eq!(links[&7].layout(), Ok(Layout::Ip));
        assert_eq!(links[&2].layout(), Ok(Layout::Ethernet));
        assert_eq!(
            layout(ARPHRD_IPGRE).unwrap_err().to_string(),
            "ipgre (ARPHRD 778)"
        );
    }

    /// One link for [`node`]: name, index, controller, lower, role.
    type Row<'a> = (&'a str, u32, Option<u32>, Option<u32>, Role);

    /// A node's links for [`entry_points`].
    fn node(links: &[Row<'_>]) -> BTreeMap<u32, Link> {
        links
            .iter()
            .map(|&(name, index, controller, lower, role)| {
                (
                    index,
                    Link {
                        index,
                        name: name.into(),
                        device_type: ARPHRD_ETHER,
                        controller,
                        lower,
                        role,
                        ..Link::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn the_guard_goes_where_frames_enter_the_node() {
        use Role::{Bridge, Endpoint, Other, OvsInternal};
        let chosen = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
        let pick = |links: &BTreeMap<u32, Link>, names: &[&str]| -> Vec<(String, Option<String>)> {
            entry_points(links, chosen(names)).into_iter().collect()
        };
        let at = |name: &str, upper: Option<&str>| (name.to_owned(), upper.map(str::to_owned));

        // A bridge over a VLAN of a bond, beside a pod's veth and a VM's tap; a macvlan over
        // the same VLAN.
        let stacked = node(&[
            ("bond0", 2, None, None, Other),
            ("bond0.7", 3, Some(4), Some(2), Other),
            ("br0", 4, None, None, Bridge),
            ("veth1", 5, Some(4), None, Endpoint),
            ("tap0", 6, Some(4), None, Endpoint),
            ("mv0", 7, None, Some(3), Other),
            ("cni0", 8, None, None, Bridge),
            ("veth2", 9, Some(8), None, Endpoint),
        ]);
        assert_eq!(
            pick(&stacked, &["br0"]),
            [at("bond0", Some("br0"))],
            "through the VLAN port down to the device the frames arrive on"
        );
        assert_eq!(pick(&stacked, &["mv0", "bond0"]), [at("bond0", None)]);
        assert_eq!(
            pick(&stacked, &["cni0", "eth9"]),
            [at("cni0", None), at("eth9", None)],
            "a bridge of pods' ports only is guarded itself; a missing name is kept"
        );

        // Open vSwitch, as OVN-Kubernetes has it: the node's address on br-ex, an internal
        // port of the datapath ovs-system, whose other ports are the NIC, the Geneve device,
        // br-int and pods.
        let ovs = node(&[
            ("ovs-system", 2, None, None, OvsInternal),
            ("br-ex", 3, Some(2), None, OvsInternal),
            ("br-int", 4, Some(2), None, OvsInternal),
            ("eth0", 5, Some(2), None, Other),
            ("genev_sys_6081", 6, Some(2), None, Other),
            ("pod1", 7, Some(2), None, Endpoint),
        ]);
        assert_eq!(
            pick(&ovs, &["br-ex"]),
            [
                at("eth0", Some("br-ex")),
                at("genev_sys_6081", Some("br-ex"))
            ]
        );
    }

    #[test]
    fn a_links_place_comes_from_its_kind_and_link_attributes() {
        use netlink_packet_route::link::{LinkAttribute as A, LinkInfo as I};
        let message = |kind: InfoKind, attributes: &[A]| {
            let mut link = LinkMessage::default();
            link.attributes = vec![A::LinkInfo(vec![I::Kind(kind)])];
            link.attributes.extend_from_slice(attributes);
            link
        };
        assert_eq!(
            placement(&message(InfoKind::Veth, &[A::Link(9)])),
            (Role::Other, None)
        );
        assert_eq!(
            placement(&message(InfoKind::Veth, &[A::Link(2), A::LinkNetNsId(1)])),
            (Role::Endpoint, None),
            "a veth into another namespace is a pod's"
        );
        assert_eq!(
            placement(&message(InfoKind::Tun, &[])),
            (Role::Endpoint, None)
        );
        assert_eq!(
            placement(&message(InfoKind::Bridge, &[])),
            (Role::Bridge, None)
        );
        assert_eq!(
            placement(&message(InfoKind::Vrf, &[])),
            (Role::Bridge, None)
        );
        assert_eq!(
            placement(&message(InfoKind::Other("openvswitch".into()), &[])),
            (Role::OvsInternal, None)
        );
        assert_eq!(
            placement(&message(InfoKind::MacVlan, &[A::Link(2)])),
            (Role::Other, Some(2))
        );
        assert_eq!(
            placement(&message(InfoKind::Vlan, &[A::Link(2), A::LinkNetNsId(0)])),
            (Role::Other, None),
            "a lower device in another namespace is out of reach"
        );
        assert_eq!(
            placement(&message(InfoKind::Vxlan, &[A::Link(2)])),
            (Role::Other, None)
        );
    }

    #[test]
    fn every_nexthop_of_a_route_message_is_read() {
        use netlink_packet_route::AddressFamily;
        use netlink_packet_route::route::RouteNextHop;
        let hop = |index| {
            let mut hop = RouteNextHop::default();
            hop.interface_index = index;
            hop
        };
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.kind = RouteType::Unicast;
        message.header.table = 252;
        message.attributes = vec![
            RouteAttribute::Table(1000),
            RouteAttribute::MultiPath(vec![hop(4), hop(3), hop(4)]),
        ];
        assert_eq!(
            unicast(&message),
            Some(Route {
                destination: cidr("0.0.0.0/0"),
                interfaces: vec![3, 4],
                table: 1000,
            })
        );
        message.header.kind = RouteType::Local;
        assert_eq!(unicast(&message), None, "local routes carry nothing out");
    }
}
