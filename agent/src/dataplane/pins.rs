//! The guard's pins on a BPF filesystem: where they live, and reading or removing them without
//! a running agent (`tether-agent guard status|detach`).
//!
//! Layout under the root: `maps/<MAP>` for every map in `PINNED_MAPS`, `links/<interface>` for
//! each interface's XDP link, and `program` for the program the links run.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use aya::pin::PinError;
use aya::programs::links::{FdLink, PinnedLink};
use tether_agent_common::{
    ALLOW_V4_MAP, ALLOW_V6_MAP, CONFIG_MAP, CONTROL_PLANE_V4_MAP, CONTROL_PLANE_V6_MAP,
    COUNTERS_MAP, GuardConfig, Mode, PINNED_MAPS, PORTS_MAP,
};

use super::{Cidr, Counters, DataplaneError, Policy, ReasonCounts, map_error, write_mode};

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

    pub(super) fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub(super) fn link(&self, interface: &str) -> PathBuf {
        self.root.join("links").join(interface)
    }

    pub(super) fn program(&self) -> PathBuf {
        self.root.join("program")
    }

    /// Whether an earlier agent left a guard here.
    pub fn exist(&self) -> bool {
        self.map(CONFIG_MAP).exists()
    }

    /// Checks the root is on a BPF filesystem and creates its directories.
    pub(super) fn prepare(&self) -> Result<(), DataplaneError> {
        let mut existing = self.root.as_path();
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        if !on_bpffs(existing) {
            return Err(DataplaneError::NotBpffs {
                path: existing.to_owned(),
                root: self.root.clone(),
            });
        }
        for dir in [self.root.join("maps"), self.root.join("links")] {
            std::fs::create_dir_all(&dir).map_err(|source| DataplaneError::Pin {
                action: "cannot create",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Interfaces with a pinned link, sorted.
    pub(super) fn linked_interfaces(&self) -> Result<Vec<String>, DataplaneError> {
        let dir = self.root.join("links");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(DataplaneError::Pin {
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
}

impl PinnedGuard {
    /// The guard pinned under `pins`, if an agent left one there.
    pub fn find(pins: Pins) -> Option<Self> {
        pins.exist().then_some(PinnedGuard { pins })
    }

    /// As [`PinnedGuard::find`], with nothing pinned an error.
    pub fn open(pins: Pins) -> Result<Self, DataplaneError> {
        let root = pins.root.clone();
        Self::find(pins).ok_or(DataplaneError::NothingPinned(root))
    }

    fn open_map(&self, name: &'static str) -> Result<Map, DataplaneError> {
        let data = MapData::from_pin(self.pins.map(name)).map_err(map_error(name))?;
        Map::from_map_data(data).map_err(map_error(name))
    }

    /// Sets the mode the pinned program reads on every packet.
    pub fn set_mode(&self, mode: Mode) -> Result<(), DataplaneError> {
        let mut config = Array::<MapData, GuardConfig>::try_from(self.open_map(CONFIG_MAP)?)
            .map_err(map_error(CONFIG_MAP))?;
        write_mode(&mut config, mode)
    }

    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        match self.open_map(COUNTERS_MAP)? {
            Map::PerCpuArray(data) => Counters::from_map(data),
            _ => Err(DataplaneError::Missing {
                kind: "per-CPU array",
                name: COUNTERS_MAP,
            }),
        }
    }

    pub fn status(&self) -> Result<Status, DataplaneError> {
        let config = Array::<MapData, GuardConfig>::try_from(self.open_map(CONFIG_MAP)?)
            .map_err(map_error(CONFIG_MAP))?;
        let mode = config.get(&0, 0).map_err(map_error(CONFIG_MAP))?.mode;
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
        let mut protected_ports: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
        protected_ports.sort_unstable();
        Ok(Status {
            mode,
            interfaces,
            policy: Policy {
                control_plane: self.prefixes(CONTROL_PLANE_V4_MAP, CONTROL_PLANE_V6_MAP)?,
                protected_ports,
                allowed: self.prefixes(ALLOW_V4_MAP, ALLOW_V6_MAP)?,
            },
            counters: self.counters()?.read()?,
        })
    }

    fn prefixes(&self, v4: &'static str, v6: &'static str) -> Result<Vec<Cidr>, DataplaneError> {
        let trie4 =
            LpmTrie::<MapData, [u8; 4], u8>::try_from(self.open_map(v4)?).map_err(map_error(v4))?;
        let trie6 = LpmTrie::<MapData, [u8; 16], u8>::try_from(self.open_map(v6)?)
            .map_err(map_error(v6))?;
        let to_cidr = |addr: IpAddr, len: u32| Cidr {
            addr,
            len: u8::try_from(len).unwrap_or(u8::MAX),
        };
        let mut prefixes: Vec<Cidr> = trie4
            .keys()
            .map(|k| k.map(|k| to_cidr(IpAddr::from(k.data()), k.prefix_len())))
            .collect::<Result<_, MapError>>()
            .map_err(map_error(v4))?;
        for key in trie6.keys() {
            let key = key.map_err(map_error(v6))?;
            prefixes.push(to_cidr(IpAddr::from(key.data()), key.prefix_len()));
        }
        prefixes.sort_by_key(|c| (c.addr, c.len));
        Ok(prefixes)
    }

    /// Removes every pin, links first: the guard stops at once, even on interfaces an agent
    /// still runs on, and the maps go when no program uses them any more. Returns the
    /// interfaces that were guarded.
    pub fn detach(self) -> Result<Vec<String>, DataplaneError> {
        let interfaces = self.pins.linked_interfaces()?;
        for interface in &interfaces {
            remove_if_present(&self.pins.link(interface))?;
        }
        remove_if_present(&self.pins.program())?;
        for map in PINNED_MAPS {
            remove_if_present(&self.pins.map(map))?;
        }
        for dir in [
            self.pins.root.join("links"),
            self.pins.root.join("maps"),
            self.pins.root.clone(),
        ] {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DataplaneError::Pin {
                        action: "cannot remove",
                        path: dir,
                        source,
                    });
                }
            }
        }
        Ok(interfaces)
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

pub(super) fn remove_if_present(path: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Pin {
            action: "cannot unpin",
            path: path.to_owned(),
            source,
        }),
    }
}

pub(super) fn pin_error(action: &'static str, path: &Path, err: PinError) -> DataplaneError {
    DataplaneError::Pin {
        action,
        path: path.to_owned(),
        source: io::Error::other(err),
    }
}
