//! The guard's counters: per reason and per interface, summed over CPUs, readable while the
//! guard runs.

use std::borrow::Borrow;
use std::os::fd::AsFd;

use aya::maps::{Map, MapData, MapError, PerCpuArray, PerCpuValues};
use tether_agent_common::{
    COUNTERS_MAP, Counter, INTERFACE_COUNTERS_MAP, INTERFACE_SLOTS, InterfaceCounters, Reason,
    counter_slot,
};

use super::{BpfError, GuardProgram, interface_index, map_error};

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

/// The guard's per-CPU counters, readable while the guard runs (by `/metrics`, for one).
pub struct Counters {
    array: PerCpuArray<MapData, Counter>,
    interfaces: PerCpuArray<MapData, InterfaceCounters>,
}

impl GuardProgram {
    /// Counts drops per interface for exactly these interfaces from now on: each claims the
    /// slot of its ifindex, keeping its counts when it had it already. Returns the interfaces
    /// left uncounted because another in the list holds their slot.
    pub fn count_interfaces(&mut self, interfaces: &[String]) -> Result<Vec<String>, BpfError> {
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
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| BpfError::Map {
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
            let values =
                PerCpuValues::try_from(vec![fresh; cpus]).map_err(|source| BpfError::Map {
                    name: INTERFACE_COUNTERS_MAP,
                    source: MapError::IoError(source),
                })?;
            map.set(slot, values, 0)
                .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
        }
        Ok(uncounted)
    }

    /// The guard's counters, summed over CPUs, one entry per reason.
    pub fn counters(&self) -> Result<Vec<ReasonCounts>, BpfError> {
        let map = self.ebpf.map(COUNTERS_MAP).ok_or(BpfError::Missing {
            kind: "map",
            name: COUNTERS_MAP,
        })?;
        let array = PerCpuArray::<_, Counter>::try_from(map).map_err(map_error(COUNTERS_MAP))?;
        read_counters(&array)
    }

    /// A handle on the counters that outlives borrows of the program.
    pub fn counters_handle(&self) -> Result<Counters, BpfError> {
        // Second descriptors for the same maps. Looking a map up by ID instead
        // (bpf_map_get_fd_by_id) needs CAP_SYS_ADMIN, which the agent does not have.
        let duplicate = |name: &'static str| -> Result<MapData, BpfError> {
            let map = self
                .ebpf
                .map(name)
                .ok_or(BpfError::Missing { kind: "map", name })?;
            let data = match map {
                Map::PerCpuArray(data) => data,
                _ => {
                    return Err(BpfError::Missing {
                        kind: "per-CPU map",
                        name,
                    });
                }
            };
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| BpfError::Duplicate { name, source })?;
            MapData::from_fd(fd).map_err(map_error(name))
        };
        Counters::from_maps(duplicate(COUNTERS_MAP)?, duplicate(INTERFACE_COUNTERS_MAP)?)
    }
}

impl Counters {
    pub(super) fn from_maps(array: MapData, interfaces: MapData) -> Result<Self, BpfError> {
        let array =
            PerCpuArray::try_from(Map::PerCpuArray(array)).map_err(map_error(COUNTERS_MAP))?;
        let interfaces = PerCpuArray::try_from(Map::PerCpuArray(interfaces))
            .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
        Ok(Counters { array, interfaces })
    }

    /// Counts per reason, summed over CPUs.
    pub fn read(&self) -> Result<Vec<ReasonCounts>, BpfError> {
        read_counters(&self.array)
    }

    /// What each guarded interface dropped (or would drop), per reason, summed over CPUs;
    /// sorted by interface.
    pub fn read_interfaces(&self) -> Result<Vec<InterfaceCounts>, BpfError> {
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

fn read_counters<T: Borrow<MapData>>(
    array: &PerCpuArray<T, Counter>,
) -> Result<Vec<ReasonCounts>, BpfError> {
    let sum = |slot: u32| -> Result<Counter, BpfError> {
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
