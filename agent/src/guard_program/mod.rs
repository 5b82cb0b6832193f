//! The kernel side of the agent: loads the embedded eBPF object, attaches the XDP guard, keeps
//! it pinned across restarts and reads its counters and drop events. This is the only module
//! that uses aya.

mod cidr;
mod events;
pub(crate) mod pins;
mod shared_config;
mod table;

use std::borrow::Borrow;
use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};
use aya_log::EbpfLogger;
use tether_agent_common::{
    ALLOW_V4_MAP, ALLOW_V6_MAP, CONFIG_MAP, CONTROL_PLANE_V4_MAP, CONTROL_PLANE_V6_MAP,
    COUNTERS_MAP, Counter, EVENTS_MAP, GUARD_IP_PROGRAM, GUARD_PROGRAM, INTERFACE_COUNTERS_MAP,
    INTERFACE_SLOTS, InterfaceCounters, MAX_PORTS, MAX_PREFIXES, Mode, PINNED_MAPS, PORT_PROTECTED,
    PORT_TUNNEL, PORTS_MAP, Reason, counter_slot, tunnel_bit,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub use events::{DropEvents, GuardEvent};
use pins::{Found, MapShape};
pub use pins::{PinnedGuard, Pins, Status};
use shared_config::SharedConfig;
use table::Table;
pub use tether_proto::cidr::{BadCidr, Cidr};

/// The eBPF object `cargo xtask build-ebpf` produced; `build.rs` refuses a missing or stale one.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TETHER_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading eBPF is not permitted: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or root)"
    )]
    NotPermitted(#[source] EbpfError),
    #[error("could not load the embedded eBPF object")]
    Load(#[source] EbpfError),
    #[error("the embedded eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("the kernel rejected eBPF program {name}")]
    ProgramLoad {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("network interface {interface:?} does not exist")]
    NoSuchInterface { interface: String },
    #[error("could not attach the XDP guard to {interface} (native or generic)")]
    Attach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "this kernel attached the XDP guard to {interface} without a BPF link, which cannot be \
         pinned; Linux 5.9 or newer is needed for the guard to survive restarts"
    )]
    NoLink { interface: String },
    #[error("could not read eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot map the guard's config into memory (BPF_F_MMAPABLE needs Linux 5.5 or newer)")]
    MapConfig(#[source] io::Error),
    #[error("could not start reading eBPF logs")]
    Logs(#[source] io::Error),
    #[error("could not read the guard's drop events")]
    Events(#[source] io::Error),
    #[error("policy has {count} {what}; the guard holds at most {max}")]
    PolicyTooLarge {
        what: &'static str,
        count: usize,
        max: u32,
    },
    #[error("running the guard on a test packet failed")]
    TestRun(#[source] ProgramError),
    #[error(
        "{path} is not on a BPF filesystem, so --bpffs-root {root} cannot hold the guard's pins; \
         mount one (mount -t bpf bpf /sys/fs/bpf) or, in a pod, mount the host's /sys/fs/bpf/tether there"
    )]
    NotBpffs { path: PathBuf, root: PathBuf },
    #[error("{action} {path}")]
    Pin {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("nothing is pinned under {0}: no guard to inspect")]
    NothingPinned(PathBuf),
    #[error(
        "the guard pinned under {root} is {found}, which this tether-agent cannot read; starting \
         this agent replaces it without a gap, `tether-agent guard detach` removes it"
    )]
    IncompatiblePins { root: PathBuf, found: String },
    #[error("the embedded eBPF object cannot be parsed")]
    Object(#[source] aya_obj::ParseError),
    #[error("cannot duplicate the descriptor of eBPF map {name}")]
    Duplicate {
        name: &'static str,
        #[source]
        source: io::Error,
    },
}

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

/// Counts for one reason, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonCounts {
    pub reason: Reason,
    /// Passed, including what monitor mode would have dropped.
    pub passed: Counter,
    pub dropped: Counter,
}

/// Counts of what the guard dropped (or would drop) on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceCounts {
    /// The interface's name now, or `#<ifindex>` when it is gone.
    pub interface: String,
    pub counts: Vec<ReasonCounts>,
}

/// Where an interface's frames put the IP header, which picks the guard program for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// After a 14-byte Ethernet header (and any VLAN tags).
    Ethernet,
    /// At the start: tun, WireGuard, ipip, sit, PPP and raw-IP devices.
    Ip,
}

impl Layout {
    const ALL: [Layout; 2] = [Layout::Ethernet, Layout::Ip];

    fn program(self) -> &'static str {
        match self {
            Layout::Ethernet => GUARD_PROGRAM,
            Layout::Ip => GUARD_IP_PROGRAM,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Layout::Ethernet => "ethernet",
            Layout::Ip => "ip",
        }
    }
}

/// How the guard ended up on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// In the driver, before an skb exists (the fast path).
    Native,
    /// In the generic network stack, for drivers without XDP support.
    Generic,
    /// A pinned link from an earlier agent now runs this agent's program; the swap is atomic,
    /// and the link keeps the mode it was created with.
    Replaced,
}

impl Attached {
    pub fn label(self) -> &'static str {
        match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
            Attached::Replaced => "replaced on pinned link",
        }
    }
}

/// The loaded eBPF programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pins: Option<Pins>,
    /// With pins: whether the maps are new and still to be pinned by [`Dataplane::commit_pins`]
    /// (with a description of the incompatible guard they replace, if any).
    unpinned: Option<Option<String>>,
}

/// Log records written by the kernel programs with aya-log, forwarded to `tracing`.
///
/// Holding this keeps the log ring buffer's fd open; the programs keep running without it, but
/// their log records are then lost.
pub struct KernelLogs {
    logger: EbpfLogger<&'static dyn log::Log>,
}

/// The guard's per-CPU counters, readable while the guard runs (by `/metrics`, for one).
pub struct Counters {
    array: PerCpuArray<MapData, Counter>,
    interfaces: PerCpuArray<MapData, InterfaceCounters>,
}

impl Dataplane {
    /// Loads the embedded object and the guard program into the kernel (not yet attached).
    ///
    /// With `pins`, the policy, mode and counter maps are the ones an earlier agent pinned
    /// there when they are of this agent's layout, and the program is pinned too. Otherwise
    /// the maps are new, and [`Dataplane::commit_pins`] pins them once the program runs on the
    /// links: whatever was pinned before keeps guarding until then.
    pub fn load(pins: Option<Pins>) -> Result<(Self, KernelLogs), DataplaneError> {
        let mut loader = EbpfLoader::new();
        let mut unpinned = None;
        if let Some(pins) = &pins {
            pins.prepare()?;
            match pins.inspect(&expected_shapes()?) {
                Found::Compatible => {
                    for map in PINNED_MAPS {
                        loader.map_pin_path(map, pins.map(map));
                    }
                }
                Found::Nothing => unpinned = Some(None),
                Found::Incompatible(found) => unpinned = Some(Some(found)),
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|err| {
            if is_permission_error(&err) {
                DataplaneError::NotPermitted(err)
            } else {
                DataplaneError::Load(err)
            }
        })?;
        // The logger must exist before the programs load: it owns the log map they reference.
        let logger = EbpfLogger::init(&mut ebpf).map_err(|_| DataplaneError::Missing {
            kind: "map",
            name: "AYA_LOGS",
        })?;
        let mut dataplane = Dataplane {
            ebpf,
            pins,
            unpinned,
        };
        for layout in Layout::ALL {
            dataplane.guard_program(layout)?.load().map_err(|source| {
                DataplaneError::ProgramLoad {
                    name: layout.program(),
                    source,
                }
            })?;
        }
        if dataplane.unpinned.is_none() {
            dataplane.pin_programs()?;
        }
        Ok((dataplane, KernelLogs { logger }))
    }

    /// Whether the maps were created by this load rather than adopted from pins.
    pub fn maps_are_new(&self) -> bool {
        self.pins.is_none() || self.unpinned.is_some()
    }

    fn pin_programs(&mut self) -> Result<(), DataplaneError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        for layout in Layout::ALL {
            let path = pins.program(layout.program());
            // The pin names the program now running; the old one lives on only through links
            // that are about to be switched over.
            pins::remove_if_present(&path)?;
            self.guard_program(layout)?
                .pin(&path)
                .map_err(|err| pins::pin_error("cannot pin the guard program at", &path, err))?;
        }
        Ok(())
    }

    /// Pins new maps and the program once every guarded link runs this program, replacing
    /// whatever an earlier agent pinned (links aside). Returns what was replaced, when it was
    /// an incompatible guard. Does nothing when the maps were adopted or nothing is pinned.
    pub fn commit_pins(&mut self) -> Result<Option<String>, DataplaneError> {
        let (Some(pins), Some(replaced)) = (self.pins.clone(), self.unpinned.take()) else {
            return Ok(None);
        };
        pins.remove_layouts()?;
        pins.prepare()?;
        for name in PINNED_MAPS {
            let path = pins.map(name);
            self.map_mut(name)?
                .pin(&path)
                .map_err(|err| pins::pin_error("cannot pin eBPF map at", &path, err))?;
        }
        self.pin_programs()?;
        Ok(replaced)
    }

    /// Puts the guard for frames of `layout` on `interface` in the calling thread's network
    /// namespace.
    ///
    /// When pinned and a link from an earlier agent is pinned for the interface, the program on
    /// that link is replaced atomically: enforcement has no gap. Otherwise it attaches natively
    /// when the driver supports XDP, in generic mode if not, and pins the new link.
    pub fn attach(&mut self, interface: &str, layout: Layout) -> Result<Attached, DataplaneError> {
        let if_index = interface_index(interface)?;
        let link_pin = self.pins.as_ref().map(|p| p.link(interface));
        if let Some(path) = link_pin.as_deref().filter(|p| p.exists()) {
            match self.replace_on_link(path, layout) {
                Ok(()) => return Ok(Attached::Replaced),
                Err(err) => {
                    // A link whose interface went away cannot be updated; start afresh.
                    tracing::warn!(interface, error = %tether_runtime::error_chain(&err), "cannot reuse the pinned XDP link; attaching anew");
                    pins::remove_if_present(path)?;
                }
            }
        }
        let program = self.guard_program(layout)?;
        let (link, attached) = match program.attach_to_if_index(if_index, XdpMode::Driver) {
            Ok(link) => (link, Attached::Native),
            Err(native) => {
                tracing::debug!(interface, error = %native, "native XDP unavailable, trying generic");
                let link =
                    program
                        .attach_to_if_index(if_index, XdpMode::Skb)
                        .map_err(|source| DataplaneError::Attach {
                            interface: interface.to_owned(),
                            source,
                        })?;
                (link, Attached::Generic)
            }
        };
        if let Some(path) = link_pin {
            let link = program
                .take_link(link)
                .map_err(|source| DataplaneError::Attach {
                    interface: interface.to_owned(),
                    source,
                })?;
            let link = FdLink::try_from(link).map_err(|_| DataplaneError::NoLink {
                interface: interface.to_owned(),
            })?;
            // Only the pin holds the link from here on, so `guard detach` detaches at once even
            // while this agent runs.
            link.pin(&path)
                .map_err(|err| pins::pin_error("cannot pin the XDP link at", &path, err))?;
        }
        Ok(attached)
    }

    fn replace_on_link(
        &mut self,
        path: &std::path::Path,
        layout: Layout,
    ) -> Result<(), DataplaneError> {
        let pinned = PinnedLink::from_pin(path).map_err(|err| DataplaneError::Pin {
            action: "cannot open the pinned XDP link",
            path: path.to_owned(),
            source: io::Error::other(err),
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|err| DataplaneError::Pin {
            action: "not an XDP link:",
            path: path.to_owned(),
            source: io::Error::other(err),
        })?;
        let program = self.guard_program(layout)?;
        let attach_error = |source| DataplaneError::Attach {
            interface: path.display().to_string(),
            source,
        };
        let id = program.attach_to_link(link).map_err(attach_error)?;
        // Dropping the taken link closes this process's fd; the pin keeps the link.
        drop(program.take_link(id).map_err(attach_error)?);
        Ok(())
    }

    /// Unpins the links of interfaces not in `keep`, detaching the guard from them. Returns
    /// their names.
    pub fn release_other_interfaces(&self, keep: &[String]) -> Result<Vec<String>, DataplaneError> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let mut released = Vec::new();
        for interface in pins.linked_interfaces()? {
            if !keep.contains(&interface) {
                pins::remove_if_present(&pins.link(&interface))?;
                released.push(interface);
            }
        }
        Ok(released)
    }

    /// Counts drops per interface for exactly these interfaces from now on: each claims the
    /// slot of its ifindex, keeping its counts when it had it already. Returns the interfaces
    /// left uncounted because another in the list holds their slot.
    pub fn count_interfaces(
        &mut self,
        interfaces: &[String],
    ) -> Result<Vec<String>, DataplaneError> {
        let mut owners: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
        let mut uncounted = Vec::new();
        for name in interfaces {
            let index = interface_index(name)?;
            match owners.entry(index % INTERFACE_SLOTS) {
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(index);
                }
                std::collections::btree_map::Entry::Occupied(_) => uncounted.push(name.clone()),
            }
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Map {
            name: INTERFACE_COUNTERS_MAP,
            source: MapError::IoError(source),
        })?;
        let mut map =
            PerCpuArray::<_, InterfaceCounters>::try_from(self.map_mut(INTERFACE_COUNTERS_MAP)?)
                .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
        for slot in 0..INTERFACE_SLOTS {
            let held = map
                .get(&slot, 0)
                .map_err(map_error(INTERFACE_COUNTERS_MAP))?
                .first()
                .map_or(0, |c| c.ifindex);
            let wanted = owners.get(&slot).copied().unwrap_or(0);
            if held == wanted {
                continue;
            }
            let fresh = InterfaceCounters {
                ifindex: wanted,
                ..InterfaceCounters::default()
            };
            let values = PerCpuValues::try_from(vec![fresh; cpus]).map_err(|source| {
                DataplaneError::Map {
                    name: INTERFACE_COUNTERS_MAP,
                    source: MapError::IoError(source),
                }
            })?;
            map.set(slot, values, 0)
                .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
        }
        Ok(uncounted)
    }

    /// The guard's counters, summed over CPUs, one entry per reason.
    pub fn counters(&self) -> Result<Vec<ReasonCounts>, DataplaneError> {
        let map = self.ebpf.map(COUNTERS_MAP).ok_or(DataplaneError::Missing {
            kind: "map",
            name: COUNTERS_MAP,
        })?;
        let array = PerCpuArray::<_, Counter>::try_from(map).map_err(map_error(COUNTERS_MAP))?;
        read_counters(&array)
    }

    /// A handle on the counters that outlives borrows of the dataplane.
    pub fn counters_handle(&self) -> Result<Counters, DataplaneError> {
        // Second descriptors for the same maps. Looking a map up by ID instead
        // (bpf_map_get_fd_by_id) needs CAP_SYS_ADMIN, which the agent does not have.
        let duplicate = |name: &'static str| -> Result<MapData, DataplaneError> {
            let map = self
                .ebpf
                .map(name)
                .ok_or(DataplaneError::Missing { kind: "map", name })?;
            let data = match map {
                Map::PerCpuArray(data) => data,
                _ => {
                    return Err(DataplaneError::Missing {
                        kind: "per-CPU map",
                        name,
                    });
                }
            };
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| DataplaneError::Duplicate { name, source })?;
            MapData::from_fd(fd).map_err(map_error(name))
        };
        Counters::from_maps(duplicate(COUNTERS_MAP)?, duplicate(INTERFACE_COUNTERS_MAP)?)
    }

    /// Takes the drop-event ring buffer; call once.
    pub fn drop_events(&mut self) -> Result<DropEvents, DataplaneError> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or(DataplaneError::Missing {
                kind: "map",
                name: EVENTS_MAP,
            })?;
        let ring = RingBuf::try_from(map).map_err(map_error(EVENTS_MAP))?;
        Ok(DropEvents::new(ring))
    }

    /// Switches enforce / monitor / off; takes effect on the next packet.
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), DataplaneError> {
        self.config()?.set_mode(mode as u32);
        Ok(())
    }

    fn config(&mut self) -> Result<SharedConfig, DataplaneError> {
        SharedConfig::new(self.map_mut(CONFIG_MAP)?)
    }

    /// Replaces the policy in the maps the program reads (no reload; entries not in `policy`
    /// are removed after the new ones are in place).
    pub fn set_policy(&mut self, policy: &Policy) -> Result<(), DataplaneError> {
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
                return Err(DataplaneError::PolicyTooLarge { what, count, max });
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
    ) -> Result<(), DataplaneError> {
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

    /// Runs the Ethernet guard once on `packet` in the kernel (BPF_PROG_TEST_RUN); returns the
    /// XDP action. The packet is not sent anywhere.
    pub fn run_packet(&mut self, packet: &[u8]) -> Result<u32, DataplaneError> {
        self.run_packet_as(Layout::Ethernet, packet)
    }

    /// [`Dataplane::run_packet`] with the guard for frames of `layout`.
    pub fn run_packet_as(&mut self, layout: Layout, packet: &[u8]) -> Result<u32, DataplaneError> {
        let program = self.guard_program(layout)?;
        let mut out = vec![0u8; packet.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .map_err(DataplaneError::TestRun)?;
        Ok(result.return_value)
    }

    /// Runs the guard `repeat` times on `packet` in the kernel, for benchmarks; returns the
    /// XDP action and the kernel's average time per run (whole nanoseconds).
    pub fn time_packet(
        &mut self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), DataplaneError> {
        let program = self.guard_program(Layout::Ethernet)?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat,
                ..TestRunOptions::new()
            })
            .map_err(DataplaneError::TestRun)?;
        Ok((result.return_value, result.duration))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, DataplaneError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::Missing { kind: "map", name })
    }

    fn guard_program(&mut self, layout: Layout) -> Result<&mut Xdp, DataplaneError> {
        let name = layout.program();
        let missing = DataplaneError::Missing {
            kind: "XDP program",
            name,
        };
        match self.ebpf.program_mut(name) {
            Some(program) => program.try_into().map_err(|_| missing),
            None => Err(missing),
        }
    }
}

impl Counters {
    fn from_maps(array: MapData, interfaces: MapData) -> Result<Self, DataplaneError> {
        let array =
            PerCpuArray::try_from(Map::PerCpuArray(array)).map_err(map_error(COUNTERS_MAP))?;
        let interfaces = PerCpuArray::try_from(Map::PerCpuArray(interfaces))
            .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
        Ok(Counters { array, interfaces })
    }

    /// Counts per reason, summed over CPUs.
    pub fn read(&self) -> Result<Vec<ReasonCounts>, DataplaneError> {
        read_counters(&self.array)
    }

    /// What each guarded interface dropped (or would drop), per reason, summed over CPUs;
    /// sorted by interface.
    pub fn read_interfaces(&self) -> Result<Vec<InterfaceCounts>, DataplaneError> {
        let mut out = Vec::new();
        for slot in 0..INTERFACE_SLOTS {
            let per_cpu = self
                .interfaces
                .get(&slot, 0)
                .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
            let index = per_cpu.first().map_or(0, |c| c.ifindex);
            if index == 0 {
                continue;
            }
            let sum = |slot: u32| {
                per_cpu.iter().fold(Counter::default(), |acc, c| {
                    let c = c.slots[slot as usize];
                    Counter {
                        packets: acc.packets + c.packets,
                        bytes: acc.bytes + c.bytes,
                    }
                })
            };
            out.push(InterfaceCounts {
                interface: interface_name(index).unwrap_or_else(|| format!("#{index}")),
                counts: Reason::ALL
                    .into_iter()
                    .filter(|r| *r != Reason::Pass)
                    .map(|reason| ReasonCounts {
                        reason,
                        passed: sum(counter_slot(reason, false)),
                        dropped: sum(counter_slot(reason, true)),
                    })
                    .collect(),
            });
        }
        out.sort_by(|a, b| a.interface.cmp(&b.interface));
        Ok(out)
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

impl KernelLogs {
    /// Forwards every pending log record now.
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// Forwards log records as they arrive, until the task is dropped.
    pub async fn forward(self) -> Result<(), DataplaneError> {
        // SAFETY: the logger owns the ring buffer's fd; it stays open and unchanged for as long
        // as the AsyncFd owns the logger.
        let mut fd = unsafe { AsyncFd::register_with_interest(self.logger, Interest::READABLE) }
            .map_err(|err| DataplaneError::Logs(err.into()))?;
        loop {
            let mut ready = fd.readable_mut().await.map_err(DataplaneError::Logs)?;
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}

fn read_counters<T: Borrow<MapData>>(
    array: &PerCpuArray<T, Counter>,
) -> Result<Vec<ReasonCounts>, DataplaneError> {
    let sum = |slot: u32| -> Result<Counter, DataplaneError> {
        let per_cpu = array.get(&slot, 0).map_err(map_error(COUNTERS_MAP))?;
        Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    };
    Reason::ALL
        .into_iter()
        .map(|reason| {
            Ok(ReasonCounts {
                reason,
                passed: sum(counter_slot(reason, false))?,
                dropped: sum(counter_slot(reason, true))?,
            })
        })
        .collect()
}

/// The prefixes an LPM trie holds.
fn trie_prefixes<T: Borrow<MapData>, const N: usize>(
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

/// The pinned maps as the embedded program defines them.
fn expected_shapes() -> Result<Vec<(&'static str, MapShape)>, DataplaneError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(DataplaneError::Object)?;
    PINNED_MAPS
        .iter()
        .map(|name| {
            let map = object
                .maps
                .get(*name)
                .ok_or(DataplaneError::Missing { kind: "map", name })?;
            Ok((
                *name,
                MapShape {
                    kind: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: map.max_entries(),
                    flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

pub(crate) fn map_error(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
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

pub fn interface_index(interface: &str) -> Result<u32, DataplaneError> {
    let missing = || DataplaneError::NoSuchInterface {
        interface: interface.to_owned(),
    };
    let name = CString::new(interface).map_err(|_| missing())?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(missing())
    } else {
        Ok(index)
    }
}

pub(crate) fn is_permission_error(err: &EbpfError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        source = err.source();
    }
    false
}
