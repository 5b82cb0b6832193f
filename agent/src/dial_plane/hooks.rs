//! The dial policy's cgroup hooks (`connect4/6`, `sendmsg4/6`, `getpeername4/6`): loaded from
//! their own embedded object, given the policy's rules in the order userspace tries them and
//! the Services to steer, attached to the cgroup the agent runs in, and read back as per-rule
//! and per-Service counters.
//!
//! The hooks police the processes of one cgroup: the agent's own, and whatever joins it (an
//! exec into its container). The agent attaches them before it dials anything the control
//! plane asks for; pinned, they outlive the agent until the next one replaces them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use aya::maps::{Array, HashMap as AyaHashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use tether_agent_common::{
    BACKENDS_MAP, DIAL_CONFIG_MAP, DIAL_HITS_MAP, DIAL_PROGRAMS, DIAL_RULES_MAP, DialConfig,
    DialRule, Endpoint, MAX_BACKENDS, MAX_DIAL_RULES, MAX_SERVICES, SERVICE_NEXT_MAP, SERVICES_MAP,
    ServiceKey, ServiceValue,
};

use super::policy::{Action, DialPolicy, Ports};
use super::services::{Service, ServiceMap};
use crate::guard_program::{BpfError, is_permission_error, map_error, pins};

static DIAL_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TETHER_DIAL_OBJECT"));

/// Backends are written to one half of the array while the hooks read the other, then the
/// Services are pointed at the new half: a reload never shows a Service a half-written list.
const HALF: u32 = MAX_BACKENDS / 2;

#[derive(Debug, thiserror::Error)]
pub enum DialHooksError {
    #[error(
        "the dial policy has {0} rules and the kernel hooks hold at most {MAX_DIAL_RULES}; merge some --dial-allow/--dial-deny prefixes"
    )]
    TooManyRules(usize),
    #[error("cannot open cgroup {0}")]
    Cgroup(String, #[source] std::io::Error),
    #[error("cannot attach the dial-policy hook {program} to cgroup {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the dial-policy hook {program} is not a BPF link, which cannot be pinned")]
    Unpinnable {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// The loaded hooks. Dropping it detaches them.
pub struct DialHooks {
    ebpf: Ebpf,
    /// Each steered Service's counter slot.
    ids: HashMap<Service, u32>,
    /// Which half of the backend array the Services point at.
    upper: bool,
    /// Services of the last map that did not fit the hooks' maps, so are not steered.
    not_steered: usize,
}

/// The Services of `services` the hooks can hold, in the map's order, and those left out:
/// at most [`MAX_SERVICES`] Services and half the backend array (the other half is the one
/// being replaced). A Service is steered to all of its backends or not at all.
pub fn fit(services: &ServiceMap) -> (ServiceMap, Vec<Service>) {
    let mut kept = ServiceMap::new();
    let mut left_out = Vec::new();
    let mut backends = 0;
    for (service, list) in services {
        if kept.len() < MAX_SERVICES as usize && backends + list.len() <= HALF as usize {
            backends += list.len();
            kept.insert(*service, list.clone());
        } else {
            left_out.push(*service);
        }
    }
    (kept, left_out)
}

/// An address as the hooks hold it: network byte order, word by word.
fn words(ip: IpAddr) -> (u8, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (4, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            (
                6,
                std::array::from_fn(|i| {
                    u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
                }),
            )
        }
    }
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    let (family, addr_words) = words(addr.ip());
    Endpoint {
        addr: addr_words,
        port: addr.port(),
        family,
        _pad: 0,
    }
}

fn service_key(service: &Service) -> ServiceKey {
    let (family, addr) = words(service.addr.ip());
    ServiceKey {
        addr,
        port: service.addr.port(),
        family,
        protocol: service.protocol.number(),
    }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, BpfError> {
    ebpf.map_mut(name)
        .ok_or(BpfError::Missing { kind: "map", name })
}

fn map_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, BpfError> {
    ebpf.map(name)
        .ok_or(BpfError::Missing { kind: "map", name })
}

/// A policy rule as the hooks read it.
fn kernel_rule(rule: &crate::dial_plane::policy::Rule) -> DialRule {
    // The prefix's network and its mask, as addresses, in the words the hooks compare.
    let len = u32::from(rule.prefix.len);
    let (network, mask): (IpAddr, IpAddr) = match rule.prefix.addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            (
                Ipv4Addr::from_bits(v4.to_bits() & mask).into(),
                Ipv4Addr::from_bits(mask).into(),
            )
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            (
                Ipv6Addr::from_bits(v6.to_bits() & mask).into(),
                Ipv6Addr::from_bits(mask).into(),
            )
        }
    };
    let (family, addr) = words(network);
    let (_, mask) = words(mask);
    let Ports { first, last } = rule.ports;
    DialRule {
        family,
        allow: u8::from(rule.action == Action::Allow),
        _pad: [0; 2],
        first_port: first,
        last_port: last,
        addr,
        mask,
    }
}

impl DialHooks {
    /// Loads the hooks with `policy`'s rules (not yet attached).
    pub fn load(policy: &DialPolicy) -> Result<Self, DialHooksError> {
        let rules = policy.rules();
        if rules.len() > MAX_DIAL_RULES as usize {
            return Err(DialHooksError::TooManyRules(rules.len()));
        }
        let mut ebpf = EbpfLoader::new().load(DIAL_OBJECT).map_err(|err| {
            DialHooksError::Bpf(if is_permission_error(&err) {
                BpfError::NotPermitted(err)
            } else {
                BpfError::Load(err)
            })
        })?;
        {
            let map = map_mut(&mut ebpf, DIAL_RULES_MAP)?;
            let mut table: Array<&mut MapData, DialRule> =
                Array::try_from(map).map_err(|source| map_error(DIAL_RULES_MAP)(source))?;
            for (index, rule) in rules.iter().enumerate() {
                table
                    .set(index as u32, kernel_rule(rule), 0)
                    .map_err(|source| map_error(DIAL_RULES_MAP)(source))?;
            }
        }
        {
            let map = map_mut(&mut ebpf, DIAL_CONFIG_MAP)?;
            let mut config: Array<&mut MapData, DialConfig> =
                Array::try_from(map).map_err(|source| map_error(DIAL_CONFIG_MAP)(source))?;
            let value = DialConfig {
                rules: rules.len() as u32,
                otherwise_allow: u32::from(!policy.denies_by_default()),
            };
            config
                .set(0, value, 0)
                .map_err(|source| map_error(DIAL_CONFIG_MAP)(source))?;
        }
        for name in DIAL_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(BpfError::Missing {
                    kind: "program",
                    name,
                })?;
            program
                .load()
                .map_err(|source| BpfError::ProgramLoad { name, source })?;
        }
        Ok(DialHooks {
            ebpf,
            ids: HashMap::new(),
            upper: false,
            not_steered: 0,
        })
    }

    /// Makes `services` what the hooks steer: backends that left are gone from the next
    /// connect on, new ones take their turn. What does not fit (see [`fit`]) is left out,
    /// and only it: the rest is steered as the map says. Returns what is steered.
    pub fn set_services(&mut self, services: &ServiceMap) -> Result<ServiceMap, DialHooksError> {
        let (services, left_out) = fit(services);
        self.not_steered = left_out.len();
        let services = &services;
        let base = if self.upper { 0 } else { HALF };
        {
            let map = map_mut(&mut self.ebpf, BACKENDS_MAP)?;
            let mut table: Array<&mut MapData, Endpoint> =
                Array::try_from(map).map_err(map_error(BACKENDS_MAP))?;
            for (slot, addr) in (base..).zip(services.values().flatten()) {
                table
                    .set(slot, endpoint(*addr), 0)
                    .map_err(map_error(BACKENDS_MAP))?;
            }
        }
        self.ids.retain(|service, _| services.contains_key(service));
        let map = map_mut(&mut self.ebpf, SERVICES_MAP)?;
        let mut table: AyaHashMap<&mut MapData, ServiceKey, ServiceValue> =
            AyaHashMap::try_from(map).map_err(map_error(SERVICES_MAP))?;
        let wanted: std::collections::HashSet<ServiceKey> =
            services.keys().map(service_key).collect();
        let stale: Vec<ServiceKey> = table
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted.contains(key))
            .collect();
        for key in stale {
            let _ = table.remove(&key);
        }
        // Counter slots kept by the Services that stay; new ones take the free slots in turn
        // (a map of thousands of Services must not cost a scan of every slot per Service).
        let mut taken = vec![false; MAX_SERVICES as usize];
        for id in self.ids.values() {
            taken[*id as usize] = true;
        }
        let mut free = (0..MAX_SERVICES).filter(|id| !taken[*id as usize]);
        let mut first = base;
        for (service, list) in services {
            let id = match self.ids.get(service) {
                Some(id) => *id,
                None => {
                    // `fit` keeps at most MAX_SERVICES, so a slot is always free.
                    let id = free.next().unwrap_or(0);
                    self.ids.insert(*service, id);
                    id
                }
            };
            let value = ServiceValue {
                first,
                count: list.len() as u32,
                id,
                _pad: 0,
            };
            table
                .insert(service_key(service), value, 0)
                .map_err(map_error(SERVICES_MAP))?;
            first += list.len() as u32;
        }
        self.upper = !self.upper;
        Ok(services.clone())
    }

    /// How many Services of the last map the hooks could not hold.
    pub fn not_steered(&self) -> usize {
        self.not_steered
    }

    /// Connects steered so far, per Service.
    pub fn service_hits(&self) -> Result<Vec<(Service, u64)>, BpfError> {
        let map = map_ref(&self.ebpf, SERVICE_NEXT_MAP)?;
        let hits: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_error(SERVICE_NEXT_MAP))?;
        self.ids
            .iter()
            .map(|(service, id)| {
                hits.get(id, 0)
                    .map(|values| (*service, values.iter().sum()))
                    .map_err(map_error(SERVICE_NEXT_MAP))
            })
            .collect()
    }

    /// Attaches every hook to `cgroup` (a cgroup v2 directory), beside whatever else is there.
    ///
    /// With `pins` (a directory on a BPF filesystem) each link is pinned there, so the hooks
    /// outlive this process: a restarted agent finds its cgroup still policed. The links an
    /// earlier agent pinned are replaced only once the new ones are attached, so there is no
    /// moment without them. Returns how many earlier links it replaced.
    pub fn attach(&mut self, cgroup: &Path, pins: Option<&Path>) -> Result<usize, DialHooksError> {
        let shown = cgroup.display().to_string();
        let dir = std::fs::File::open(cgroup)
            .map_err(|err| DialHooksError::Cgroup(shown.clone(), err))?;
        let mut links = Vec::new();
        for name in DIAL_PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(BpfError::Missing {
                    kind: "program",
                    name,
                })?;
            let attach_error = |source| DialHooksError::Attach {
                program: name,
                cgroup: shown.clone(),
                source,
            };
            let link = program
                // A link (what this kernel makes) always lives beside other programs on the
                // cgroup; link_create refuses the multi-attach flag itself.
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            if pins.is_some() {
                let link = program.take_link(link).map_err(attach_error)?;
                let link = FdLink::try_from(link).map_err(|source| DialHooksError::Unpinnable {
                    program: name,
                    source,
                })?;
                links.push((name, link));
            }
        }
        let Some(pins) = pins else { return Ok(0) };
        std::fs::create_dir_all(pins).map_err(|source| BpfError::Pin {
            action: "cannot create",
            path: pins.to_path_buf(),
            source,
        })?;
        let mut replaced = 0;
        for (name, link) in links {
            let path = pins.join(name);
            if let Ok(old) = PinnedLink::from_pin(&path) {
                // Unpinned, the earlier link ends with this handle: its hook comes off now
                // that the new one runs.
                if old.unpin().is_ok() {
                    replaced += 1;
                }
            }
            pins::remove_if_present(&path)?;
            link.pin(&path)
                .map_err(|err| pins::pin_error("cannot pin the dial hook at", &path, err))?;
        }
        Ok(replaced)
    }

    /// Decisions per rule index (in the policy's order), then the count of what no rule
    /// matched.
    pub fn hits(&self) -> Result<Vec<u64>, BpfError> {
        let map = map_ref(&self.ebpf, DIAL_HITS_MAP)?;
        let hits: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| map_error(DIAL_HITS_MAP)(source))?;
        (0..=MAX_DIAL_RULES)
            .map(|slot| {
                hits.get(&slot, 0)
                    .map(|values| values.iter().sum())
                    .map_err(|source| map_error(DIAL_HITS_MAP)(source))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_defines_every_map_and_program_agent_common_names() {
        let object = aya_obj::Object::parse(DIAL_OBJECT).unwrap();
        for name in tether_agent_common::DIAL_MAPS {
            assert!(object.maps.contains_key(name), "no map {name}");
        }
        for name in DIAL_PROGRAMS {
            assert!(object.programs.contains_key(name), "no program {name}");
        }
    }

    fn rule(text: &str) -> DialRule {
        let target: crate::dial_plane::policy::Target = text.parse().unwrap();
        kernel_rule(&crate::dial_plane::policy::Rule {
            action: Action::Deny,
            prefix: target.prefix,
            ports: target.ports,
            origin: crate::dial_plane::policy::Origin::Flag,
        })
    }

    #[test]
    fn rules_are_in_network_byte_order_as_the_kernel_hands_addresses() {
        let r = rule("169.254.0.0/16:80");
        assert_eq!(r.family, 4);
        assert_eq!(r.addr[0].to_ne_bytes(), [169, 254, 0, 0]);
        assert_eq!(r.mask[0].to_ne_bytes(), [255, 255, 0, 0]);
        assert_eq!((r.first_port, r.last_port), (80, 80));
        let r = rule("fe80::/10");
        assert_eq!(r.family, 6);
        assert_eq!(r.addr[0].to_ne_bytes(), [0xfe, 0x80, 0, 0]);
        assert_eq!(r.mask[0].to_ne_bytes(), [0xff, 0xc0, 0, 0]);
        assert_eq!(r.mask[1], 0);
        assert_eq!((r.first_port, r.last_port), (0, u16::MAX));
        let r = rule("0.0.0.0/0");
        assert_eq!((r.addr[0], r.mask[0]), (0, 0));
        let r = rule("::1");
        assert_eq!(r.mask, [u32::MAX; 4]);
        assert_eq!(r.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    fn service(i: u32, port: u16) -> Service {
        Service {
            addr: SocketAddr::new(Ipv4Addr::from(0x0a60_0000 + i).into(), port),
            protocol: crate::dial_plane::services::Protocol::Tcp,
        }
    }

    #[test]
    fn a_map_too_large_keeps_whole_services_up_to_the_limits() {
        let backend: SocketAddr = "10.244.0.1:8080".parse().unwrap();
        let many: ServiceMap = (0..MAX_SERVICES + 3)
            .map(|i| (service(i, 80), vec![backend]))
            .collect();
        let (kept, left_out) = fit(&many);
        assert_eq!(kept.len(), MAX_SERVICES as usize);
        assert_eq!(
            left_out,
            (MAX_SERVICES..MAX_SERVICES + 3)
                .map(|i| service(i, 80))
                .collect::<Vec<_>>(),
            "the last in the map's order are left out"
        );

        // Backends: a Service that would overflow half the array is left out whole, and a
        // later, smaller one still fits.
        let backends = |n: u32| vec![backend; n as usize];
        let heavy: ServiceMap = [
            (service(1, 80), backends(HALF - 10)),
            (service(2, 80), backends(20)),
            (service(3, 80), backends(10)),
        ]
        .into_iter()
        .collect();
        let (kept, left_out) = fit(&heavy);
        assert_eq!(left_out, [service(2, 80)]);
        assert_eq!(kept.values().map(Vec::len).sum::<usize>(), HALF as usize);
        let (kept, left_out) = fit(&kept);
        assert!(left_out.is_empty() && kept.len() == 2, "what fits, fits");
    }
}
