//! The guard's pins on a BPF filesystem: where they live, and reading or removing them without
//! a running agent (`tether-agent guard status|detach`).
//!
//! Layout under the root: `v<PIN_LAYOUT>/maps/<MAP>` for every map in `PINNED_MAPS`,
//! `v<PIN_LAYOUT>/program` and `v<PIN_LAYOUT>/tether_guard_ip` for the programs the links run
//! (on Ethernet and on IP-first devices), and `links/<interface>` for each
//! interface's XDP link. Links hold no layout, so they outlive a layout change: the new
//! program takes them over. The first release pinned its maps and program straight under the
//! root; that is layout 1.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap, Map, MapData};
use aya::pin::PinError;
use aya::programs::links::{FdLink, PinnedLink};
use tether_agent_common::{
    ALLOW_V4_MAP, ALLOW_V6_MAP, CONFIG_MAP, CONTROL_PLANE_V4_MAP, CONTROL_PLANE_V6_MAP,
    COUNTERS_MAP, Mode, PIN_LAYOUT, PORT_PROTECTED, PORT_TUNNEL, PORTS_MAP, TUNNEL_PROTOCOLS,
    tunnel_bit,
};

use super::shared_config::SharedConfig;
use super::{
    BpfError, Cidr, Counters, InterfaceCounts, Policy, ReasonCounts, map_error, trie_prefixes,
};

/// `statfs` magic of a BPF filesystem (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Pins { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn layout(&self) -> PathBuf {
        self.root.join(format!("v{PIN_LAYOUT}"))
    }

    pub(super) fn map(&self, name: &str) -> PathBuf {
        self.layout().join("maps").join(name)
    }

    pub(super) fn link(&self, interface: &str) -> PathBuf {
        self.root.join("links").join(interface)
    }

    /// The Ethernet program keeps the name the first layouts gave their one program.
    pub(super) fn program(&self, name: &str) -> PathBuf {
        if name == tether_agent_common::GUARD_PROGRAM {
            self.layout().join("program")
        } else {
            self.layout().join(name)
        }
    }

    /// Whether an earlier agent left a guard here, of any layout.
    pub fn exist(&self) -> bool {
        self.map(CONFIG_MAP).exists() || !self.other_layouts().is_empty()
    }

    /// Pins of layouts other than this agent's: (path, layout number). Layout 1 is the maps
    /// directory and program straight under the root.
    fn other_layouts(&self) -> Vec<(PathBuf, u32)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut found: Vec<(PathBuf, u32)> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let layout = match name.as_str() {
                    "maps" | "program" => 1,
                    _ => name.strip_prefix('v')?.parse().ok()?,
                };
                (layout != PIN_LAYOUT).then(|| (entry.path(), layout))
            })
            .collect();
        found.sort();
        found
    }

    /// What is pinned here, judged against the maps this agent's program defines.
    pub(super) fn inspect(&self, expected: &[(&'static str, MapShape)]) -> Found {
        if let Some((_, layout)) = self.other_layouts().first() {
            return Found::Incompatible(format!(
                "pin layout v{layout} (this agent uses v{PIN_LAYOUT})"
            ));
        }
        let present: Vec<bool> = expected
            .iter()
            .map(|(name, _)| self.map(name).exists())
            .collect();
        if present.iter().all(|p| !p) {
            return Found::Nothing;
        }
        for (name, want) in expected {
            let path = self.map(name);
            let shape = MapInfo::from_pin(&path).ok().and_then(|info| {
                Some(MapShape {
                    kind: info.map_type().ok()? as u32,
                    key_size: info.key_size(),
                    value_size: info.value_size(),
                    max_entries: info.max_entries(),
                    flags: info.map_flags(),
                })
            });
            match shape {
                None => {
                    return Found::Incompatible(format!(
                        "pin layout v{PIN_LAYOUT} without a readable map {name}"
                    ));
                }
                Some(found) if found != *want => {
                    return Found::Incompatible(format!(
                        "pin layout v{PIN_LAYOUT} whose map {name} differs ({found}; this agent's: {want})"
                    ));
                }
                Some(_) => {}
            }
        }
        Found::Compatible
    }

    /// Removes every pin of every layout except the links.
    pub(super) fn remove_layouts(&self) -> Result<(), BpfError> {
        let mut paths: Vec<PathBuf> = self.other_layouts().into_iter().map(|(p, _)| p).collect();
        paths.push(self.layout());
        for path in paths {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(BpfError::Pin {
                        action: "cannot remove",
                        path,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks the root is on a BPF filesystem and creates its directories.
    pub(super) fn prepare(&self) -> Result<(), BpfError> {
        let mut existing = self.root.as_path();
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        if !on_bpffs(existing) {
            return Err(BpfError::NotBpffs {
                path: existing.to_owned(),
                root: self.root.clone(),
            });
        }
        for dir in [self.layout().join("maps"), self.root.join("links")] {
            std::fs::create_dir_all(&dir).map_err(|source| BpfError::Pin {
                action: "cannot create",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Interfaces with a pinned link, sorted.
    pub(super) fn linked_interfaces(&self) -> Result<Vec<String>, BpfError> {
        let dir = self.root.join("links");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(BpfError::Pin {
                    action: "cannot list",
                    path: dir,
                    source,
                });
            }
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// What an agent finds under its bpffs root before loading.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    Nothing,
    /// This agent's layout, every map as its program defines it: adopted as is.
    Compatible,
    /// Something this agent cannot adopt, described: replaced.
    Incompatible(String),
}

/// What the kernel fixes about a map when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MapShape {
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.kind, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// A guard found pinned under a root, opened without loading anything.
pub struct PinnedGuard {
    pins: Pins,
}

/// What `guard status` reports.
#[derive(Debug)]
pub struct Status {
    pub mode: Option<Mode>,
    /// Interface and the ID of the program its link runs (`None` when the link cannot be read).
    pub interfaces: Vec<(String, Option<u32>)>,
    pub policy: Policy,
    pub counters: Vec<ReasonCounts>,
    pub per_interface: Vec<InterfaceCounts>,
}

impl PinnedGuard {
    /// The guard pinned under `pins`, if an agent left one there; an error when it is one this
    /// agent cannot read (another release's layout).
    pub fn find(pins: Pins) -> Result<Option<Self>, BpfError> {
        match pins.inspect(&super::expected_shapes()?) {
            Found::Nothing => Ok(None),
            Found::Compatible => Ok(Some(PinnedGuard { pins })),
            Found::Incompatible(found) => Err(BpfError::IncompatiblePins {
                root: pins.root,
                found,
            }),
        }
    }

    /// As [`PinnedGuard::find`], with nothing pinned an error.
    pub fn open(pins: Pins) -> Result<Self, BpfError> {
        let root = pins.root.clone();
        Self::find(pins)?.ok_or(BpfError::NothingPinned(root))
    }

    fn open_map(&self, name: &'static str) -> Result<Map, BpfError> {
        let data = MapData::from_pin(self.pins.map(name)).map_err(map_error(name))?;
        Map::from_map_data(data).map_err(map_error(name))
    }

    /// Sets the mode the pinned program reads on every packet.
    pub fn set_mode(&self, mode: Mode) -> Result<(), BpfError> {
        SharedConfig::new(&self.open_map(CONFIG_MAP)?)?.set_mode(mode as u32);
        Ok(())
    }

    pub fn counters(&self) -> Result<Counters, BpfError> {
        Counters::from_maps(
            MapData::from_pin(self.pins.map(COUNTERS_MAP)).map_err(map_error(COUNTERS_MAP))?,
            MapData::from_pin(self.pins.map(tether_agent_common::INTERFACE_COUNTERS_MAP))
                .map_err(map_error(tether_agent_common::INTERFACE_COUNTERS_MAP))?,
        )
    }

    pub fn status(&self) -> Result<Status, BpfError> {
        let config = SharedConfig::new(&self.open_map(CONFIG_MAP)?)?;
        let (mode, tunnels) = (config.mode(), config.tunnels());
        let mode = [Mode::Off, Mode::Monitor, Mode::Enforce]
            .into_iter()
            .find(|m| *m as u32 == mode);
        let interfaces = self
            .pins
            .linked_interfaces()?
            .into_iter()
            .map(|name| {
                let program = PinnedLink::from_pin(self.pins.link(&name))
                    .ok()
                    .and_then(|link| FdLink::from(link).info().ok())
                    .map(|info| info.program_id());
                (name, program)
            })
            .collect();
        let ports = HashMap::<MapData, u16, u8>::try_from(self.open_map(PORTS_MAP)?)
            .map_err(map_error(PORTS_MAP))?;
        let mut flagged: Vec<(u16, u8)> = ports.iter().filter_map(Result::ok).collect();
        flagged.sort_unstable();
        let with = |flag: u8| -> Vec<u16> {
            flagged
                .iter()
                .filter(|(_, f)| f & flag != 0)
                .map(|(p, _)| *p)
                .collect()
        };
        let counts = self.counters()?.read()?;
        Ok(Status {
            mode,
            interfaces,
            policy: Policy {
                control_plane: self.prefixes(CONTROL_PLANE_V4_MAP, CONTROL_PLANE_V6_MAP)?,
                protected_ports: with(PORT_PROTECTED),
                allowed: self.prefixes(ALLOW_V4_MAP, ALLOW_V6_MAP)?,
                tunnel_protocols: TUNNEL_PROTOCOLS
                    .iter()
                    .map(|(protocol, _)| *protocol)
                    .filter(|p| tunnels & tunnel_bit(*p) != 0)
                    .collect(),
                tunnel_ports: with(PORT_TUNNEL),
            },
            counters: counts.totals,
            per_interface: counts.per_interface,
        })
    }

    fn prefixes(&self, v4: &'static str, v6: &'static str) -> Result<Vec<Cidr>, BpfError> {
        let trie4 =
            LpmTrie::<MapData, [u8; 4], u8>::try_from(self.open_map(v4)?).map_err(map_error(v4))?;
        let trie6 = LpmTrie::<MapData, [u8; 16], u8>::try_from(self.open_map(v6)?)
            .map_err(map_error(v6))?;
        let mut prefixes = trie_prefixes(&trie4, IpAddr::from).map_err(map_error(v4))?;
        prefixes.extend(trie_prefixes(&trie6, IpAddr::from).map_err(map_error(v6))?);
        prefixes.sort_by_key(|c| (c.addr, c.len));
        Ok(prefixes)
    }
}

impl Pins {
    /// Removes every pin of any layout, links first: the guard stops at once, even on
    /// interfaces an agent still runs on, and the maps go when no program uses them any more.
    /// Returns the interfaces that were guarded, `None` when nothing was pinned.
    /// Where the dial policy's cgroup hooks are pinned.
    pub fn dial_links(&self) -> PathBuf {
        self.root.join("dial-links")
    }

    pub fn detach(&self) -> Result<Option<Vec<String>>, BpfError> {
        if !self.exist() && self.linked_interfaces()?.is_empty() {
            return Ok(None);
        }
        let interfaces = self.linked_interfaces()?;
        for interface in &interfaces {
            remove_if_present(&self.link(interface))?;
        }
        self.remove_layouts()?;
        // The dial policy's hooks, pinned beside the guard, come off with it.
        if let Ok(entries) = std::fs::read_dir(self.dial_links()) {
            for entry in entries.flatten() {
                remove_if_present(&entry.path())?;
            }
        }
        for dir in [
            self.root.join("links"),
            self.dial_links(),
            self.root.clone(),
        ] {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                // The root is a mount point in a pod that mounts only tether's directory of
                // the host's BPF filesystem: emptied, it is as good as gone.
                Err(err) if dir == self.root && err.kind() == io::ErrorKind::ResourceBusy => {}
                Err(source) => {
                    return Err(BpfError::Pin {
                        action: "cannot remove",
                        path: dir,
                        source,
                    });
                }
            }
        }
        Ok(Some(interfaces))
    }
}

fn on_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into the zeroed struct it is given; `path` is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut stat) == 0 && stat.f_type == BPF_FS_MAGIC
    }
}

pub(crate) fn remove_if_present(path: &Path) -> Result<(), BpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::Pin {
            action: "cannot unpin",
            path: path.to_owned(),
            source,
        }),
    }
}

pub(crate) fn pin_error(action: &'static str, path: &Path, err: PinError) -> BpfError {
    BpfError::Pin {
        action,
        path: path.to_owned(),
        source: io::Error::other(err),
    }
}
