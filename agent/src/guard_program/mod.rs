//! The XDP guard's program in the kernel: loads the embedded eBPF object, attaches the guard
//! to an interface, keeps it pinned across restarts, and gives access to what it holds.
//!
//! `policy` writes what the guard drops into its maps; `counters` reads what it counted;
//! `events` and `kernel_logs` forward its drop events and log records; `pins` is the layout
//! under `--bpffs-root` that lets the guard outlive the agent (the dial hooks pin there too);
//! `table` and `shared_config` are the memory-mapped lookup table in front of the tries;
//! `test_run` runs the program on a packet without sending it, for tests and benchmarks.
//! `error` is shared with the dial plane's hooks. This module and `dial_plane::hooks` are the
//! only users of aya.

mod cidr;
mod counters;
mod error;
mod events;
mod kernel_logs;
pub(crate) mod pins;
mod policy;
mod shared_config;
mod table;
mod test_run;

use std::ffi::CString;
use std::io;

use aya::maps::{Map, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use tether_agent_common::{
    CONFIG_MAP, EVENTS_MAP, GUARD_IP_PROGRAM, GUARD_PROGRAM, Mode, PINNED_MAPS,
};

pub use counters::{Counters, Counts, InterfaceCounts, ReasonCounts};
pub use error::{BpfError, is_permission_error, map_error};
pub use events::{DropEvents, GuardEvent};
pub use kernel_logs::KernelLogs;
use pins::{Found, MapShape};
pub use pins::{PinnedGuard, Pins, Status};
pub use policy::Policy;
use policy::trie_prefixes;
use shared_config::SharedConfig;
pub use tether_proto::cidr::{BadCidr, Cidr};

/// The eBPF object `cargo xtask build-ebpf` produced; `build.rs` refuses a missing or stale one.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TETHER_EBPF_OBJECT"));

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
pub struct GuardProgram {
    ebpf: Ebpf,
    pins: Option<Pins>,
    /// With pins: whether the maps are new and still to be pinned by [`GuardProgram::commit_pins`]
    /// (with a description of the incompatible guard they replace, if any).
    unpinned: Option<Option<String>>,
}

impl GuardProgram {
    /// Loads the embedded object and the guard program into the kernel (not yet attached).
    ///
    /// With `pins`, the policy, mode and counter maps are the ones an earlier agent pinned
    /// there when they are of this agent's layout, and the program is pinned too. Otherwise
    /// the maps are new, and [`GuardProgram::commit_pins`] pins them once the program runs on the
    /// links: whatever was pinned before keeps guarding until then.
    pub fn load(pins: Option<Pins>) -> Result<(Self, KernelLogs), BpfError> {
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
                BpfError::NotPermitted(err)
            } else {
                BpfError::Load(err)
            }
        })?;
        // The logger must exist before the programs load: it owns the log map they reference.
        let logger = EbpfLogger::init(&mut ebpf).map_err(|_| BpfError::Missing {
            kind: "map",
            name: "AYA_LOGS",
        })?;
        let mut program = GuardProgram {
            ebpf,
            pins,
            unpinned,
        };
        for layout in Layout::ALL {
            program
                .guard_program(layout)?
                .load()
                .map_err(|source| BpfError::ProgramLoad {
                    name: layout.program(),
                    source,
                })?;
        }
        if program.unpinned.is_none() {
            program.pin_programs()?;
        }
        Ok((program, KernelLogs { logger }))
    }

    /// Whether the maps were created by this load rather than adopted from pins.
    pub fn maps_are_new(&self) -> bool {
        self.pins.is_none() || self.unpinned.is_some()
    }

    fn pin_programs(&mut self) -> Result<(), BpfError> {
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
    pub fn commit_pins(&mut self) -> Result<Option<String>, BpfError> {
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
    pub fn attach(&mut self, interface: &str, layout: Layout) -> Result<Attached, BpfError> {
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
                        .map_err(|source| BpfError::Attach {
                            interface: interface.to_owned(),
                            source,
                        })?;
                (link, Attached::Generic)
            }
        };
        if let Some(path) = link_pin {
            let link = program.take_link(link).map_err(|source| BpfError::Attach {
                interface: interface.to_owned(),
                source,
            })?;
            let link = FdLink::try_from(link).map_err(|_| BpfError::NoLink {
                interface: interface.to_owned(),
            })?;
            // Only the pin holds the link from here on, so `guard detach` detaches at once even
            // while this agent runs.
            link.pin(&path)
                .map_err(|err| pins::pin_error("cannot pin the XDP link at", &path, err))?;
        }
        Ok(attached)
    }

    fn replace_on_link(&mut self, path: &std::path::Path, layout: Layout) -> Result<(), BpfError> {
        let pinned = PinnedLink::from_pin(path).map_err(|err| BpfError::Pin {
            action: "cannot open the pinned XDP link",
            path: path.to_owned(),
            source: io::Error::other(err),
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|err| BpfError::Pin {
            action: "not an XDP link:",
            path: path.to_owned(),
            source: io::Error::other(err),
        })?;
        let program = self.guard_program(layout)?;
        let attach_error = |source| BpfError::Attach {
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
    pub fn release_other_interfaces(&self, keep: &[String]) -> Result<Vec<String>, BpfError> {
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

    /// Takes the drop-event ring buffer; call once.
    pub fn drop_events(&mut self) -> Result<DropEvents, BpfError> {
        let map = self.ebpf.take_map(EVENTS_MAP).ok_or(BpfError::Missing {
            kind: "map",
            name: EVENTS_MAP,
        })?;
        let ring = RingBuf::try_from(map).map_err(map_error(EVENTS_MAP))?;
        Ok(DropEvents::new(ring))
    }

    /// Switches enforce / monitor / off; takes effect on the next packet.
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), BpfError> {
        self.config()?.set_mode(mode as u32);
        Ok(())
    }

    fn config(&mut self) -> Result<SharedConfig, BpfError> {
        SharedConfig::new(self.map_mut(CONFIG_MAP)?)
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, BpfError> {
        self.ebpf
            .map_mut(name)
            .ok_or(BpfError::Missing { kind: "map", name })
    }

    fn guard_program(&mut self, layout: Layout) -> Result<&mut Xdp, BpfError> {
        let name = layout.program();
        let missing = BpfError::Missing {
            kind: "XDP program",
            name,
        };
        match self.ebpf.program_mut(name) {
            Some(program) => program.try_into().map_err(|_| missing),
            None => Err(missing),
        }
    }
}

/// The pinned maps as the embedded program defines them.
fn expected_shapes() -> Result<Vec<(&'static str, MapShape)>, BpfError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(BpfError::Object)?;
    PINNED_MAPS
        .iter()
        .map(|name| {
            let map = object
                .maps
                .get(*name)
                .ok_or(BpfError::Missing { kind: "map", name })?;
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

pub fn interface_index(interface: &str) -> Result<u32, BpfError> {
    let missing = || BpfError::NoSuchInterface {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_defines_every_map_and_program_agent_common_names() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        for name in PINNED_MAPS.into_iter().chain([EVENTS_MAP]) {
            assert!(object.maps.contains_key(name), "no map {name}");
        }
        for layout in Layout::ALL {
            let name = layout.program();
            assert!(object.programs.contains_key(name), "no program {name}");
        }
    }
}
