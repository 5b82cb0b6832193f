//! The guard's policy: which sources are the control plane, which ports only some may reach,
//! which tunnels are dropped, written into the maps the program reads while it runs.

use std::borrow::Borrow;
use std::net::IpAddr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, MapError};
use tether_agent_common::{
    ALLOW_V4_MAP, ALLOW_V6_MAP, CONTROL_PLANE_V4_MAP, CONTROL_PLANE_V6_MAP, MAX_PORTS,
    MAX_PREFIXES, PORT_PROTECTED, PORT_TUNNEL, PORTS_MAP, tunnel_bit,
};

use super::table::Table;
use super::{BpfError, Cidr, GuardProgram, cidr, map_error};

/// What the guard drops (see `agent-common`'s `Reason` for the verdicts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Sources whose new connections, fragments, tunnels and malformed packets are dropped.
    pub control_plane: Vec<Cidr>,
    /// Ports a TCP SYN or UDP datagram may reach only from `allowed`.
    pub protected_ports: Vec<u16>,
    pub allowed: Vec<Cidr>,
    /// IP protocols (of `TUNNEL_PROTOCOLS`) dropped from the control plane as tunnels.
    pub tunnel_protocols: Vec<u8>,
    /// UDP ports dropped from the control plane as tunnels.
    pub tunnel_ports: Vec<u16>,
}

impl GuardProgram {
    /// Replaces the policy in the maps the program reads (no reload; entries not in `policy`
    /// are removed after the new ones are in place).
    pub fn set_policy(&mut self, policy: &Policy) -> Result<(), BpfError> {
        let mut ports: Vec<(u16, u8)> = Vec::new();
        for (list, flag) in [
            (&policy.protected_ports, PORT_PROTECTED),
            (&policy.tunnel_ports, PORT_TUNNEL),
        ] {
            for port in list {
                match ports.iter_mut().find(|(p, _)| p == port) {
                    Some((_, flags)) => *flags |= flag,
                    None => ports.push((*port, flag)),
                }
            }
        }
        for (what, count, max) in [
            (
                "control-plane prefixes",
                policy.control_plane.len(),
                MAX_PREFIXES,
            ),
            ("allowed prefixes", policy.allowed.len(), MAX_PREFIXES),
            ("protected and tunnel ports", ports.len(), MAX_PORTS),
        ] {
            if count > usize::try_from(max).unwrap_or(usize::MAX) {
                return Err(BpfError::PolicyTooLarge { what, count, max });
            }
        }
        // Where the table's answer changes, the program asks the tries while they change; the
        // new table goes in once they hold the new policy.
        let table = Table::compile(&policy.control_plane);
        let mut config = self.config()?;
        table.defer_changes(&mut config.tables());
        self.replace_prefixes(
            CONTROL_PLANE_V4_MAP,
            CONTROL_PLANE_V6_MAP,
            &policy.control_plane,
        )?;
        table.install(&mut config.tables());
        self.replace_prefixes(ALLOW_V4_MAP, ALLOW_V6_MAP, &policy.allowed)?;
        let map = self.map_mut(PORTS_MAP)?;
        let mut map = HashMap::<_, u16, u8>::try_from(map).map_err(map_error(PORTS_MAP))?;
        for (port, flags) in &ports {
            map.insert(port, flags, 0).map_err(map_error(PORTS_MAP))?;
        }
        let stale: Vec<u16> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !ports.iter().any(|(q, _)| q == p))
            .collect();
        for port in stale {
            map.remove(&port).map_err(map_error(PORTS_MAP))?;
        }
        let tunnels = policy
            .tunnel_protocols
            .iter()
            .fold(0, |bits, p| bits | tunnel_bit(*p));
        config.set_tunnels(tunnels);
        Ok(())
    }

    fn replace_prefixes(
        &mut self,
        v4: &'static str,
        v6: &'static str,
        prefixes: &[Cidr],
    ) -> Result<(), BpfError> {
        let mut trie4 =
            LpmTrie::<_, [u8; 4], u8>::try_from(self.map_mut(v4)?).map_err(map_error(v4))?;
        let wanted4: Vec<Key<[u8; 4]>> = prefixes
            .iter()
            .filter_map(|c| match c.addr {
                IpAddr::V4(a) => Some(Key::new(u32::from(c.len), cidr::masked(a.octets(), c.len))),
                IpAddr::V6(_) => None,
            })
            .collect();
        replace_trie(&mut trie4, &wanted4).map_err(map_error(v4))?;
        let mut trie6 =
            LpmTrie::<_, [u8; 16], u8>::try_from(self.map_mut(v6)?).map_err(map_error(v6))?;
        let wanted6: Vec<Key<[u8; 16]>> = prefixes
            .iter()
            .filter_map(|c| match c.addr {
                IpAddr::V6(a) => Some(Key::new(u32::from(c.len), cidr::masked(a.octets(), c.len))),
                IpAddr::V4(_) => None,
            })
            .collect();
        replace_trie(&mut trie6, &wanted6).map_err(map_error(v6))
    }
}

/// The prefixes an LPM trie holds.
pub(super) fn trie_prefixes<T: Borrow<MapData>, const N: usize>(
    trie: &LpmTrie<T, [u8; N], u8>,
    address: fn([u8; N]) -> IpAddr,
) -> Result<Vec<Cidr>, MapError> {
    trie.keys()
        .map(|key| {
            key.map(|key| Cidr {
                addr: address(key.data()),
                len: u8::try_from(key.prefix_len()).unwrap_or(u8::MAX),
            })
        })
        .collect()
}

fn replace_trie<const N: usize>(
    trie: &mut LpmTrie<&mut MapData, [u8; N], u8>,
    wanted: &[Key<[u8; N]>],
) -> Result<(), MapError> {
    for key in wanted {
        trie.insert(key, 1, 0)?;
    }
    let stale: Vec<Key<[u8; N]>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            !wanted
                .iter()
                .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
        })
        .collect();
    for key in stale {
        trie.remove(&key)?;
    }
    Ok(())
}
