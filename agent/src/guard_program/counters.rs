//! The guard's counters: per reason and per interface, summed over CPUs, readable while the
//! guard runs.

use std::borrow::Borrow;
use std::os::fd::AsFd;

use aya::maps::{Map, MapData, MapError, PerCpuArray, PerCpuValues};
use tether_agent_common::{
    COUNTER_SLOTS, COUNTERS_MAP, Counter, DROP_COUNTER_ENTRIES, DropCounters,
    INTERFACE_COUNTERS_MAP, INTERFACE_SLOTS, RETIRED_SLOT, Reason, counter_slot,
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
    interfaces: PerCpuArray<MapData, DropCounters>,
}

impl GuardProgram {
    /// Counts drops per interface for exactly these interfaces from now on: each claims the
    /// slot of its ifindex, keeping its counts when it had it already. Returns the interfaces
    /// left uncounted because another in the list holds their slot.
    ///
    /// A slot given to another interface starts from zero; what it counted before moves to
    /// the retired slot, so the totals lose nothing.
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
        let config = self.config()?;
        let changes: Vec<(u32, u32)> = (0..INTERFACE_SLOTS)
            .filter_map(|slot| {
                let wanted = owners.get(&slot).copied().unwrap_or(0);
                (config.interface_slot(slot as usize) != wanted).then_some((slot, wanted))
            })
            .collect();
        if changes.is_empty() {
            return Ok(uncounted);
        }
        // Drops on these interfaces go to the unclaimed slot from the next packet on. Once the
        // runs that read the old owners are over, the program no longer writes the slots.
        for &(slot, _) in &changes {
            config.set_interface_slot(slot as usize, 0);
        }
        wait_for_running_programs();
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| BpfError::Map {
            name: INTERFACE_COUNTERS_MAP,
            source: MapError::IoError(source),
        })?;
        let mut map =
            PerCpuArray::<_, DropCounters>::try_from(self.map_mut(INTERFACE_COUNTERS_MAP)?)
                .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
        let mut retired: Vec<DropCounters> = map
            .get(&RETIRED_SLOT, 0)
            .map_err(map_error(INTERFACE_COUNTERS_MAP))?
            .iter()
            .copied()
            .collect();
        let per_cpu = |values: Vec<DropCounters>| {
            PerCpuValues::try_from(values).map_err(|source| BpfError::Map {
                name: INTERFACE_COUNTERS_MAP,
                source: MapError::IoError(source),
            })
        };
        let mut fresh = Vec::new();
        for &(slot, wanted) in &changes {
            let old = map
                .get(&slot, 0)
                .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
            for (sum, old) in retired.iter_mut().zip(old.iter()) {
                for (sum, old) in sum.slots.iter_mut().zip(&old.slots) {
                    add(sum, old);
                }
            }
            let value = DropCounters {
                ifindex: wanted,
                ..DropCounters::default()
            };
            fresh.push((slot, per_cpu(vec![value; cpus])?));
        }
        // Retired before the slots are cleared: an agent stopped in between counts some drops
        // twice rather than never.
        map.set(RETIRED_SLOT, per_cpu(retired)?, 0)
            .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
        for (slot, values) in fresh {
            map.set(slot, values, 0)
                .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
        }
        for (slot, wanted) in changes {
            config.set_interface_slot(slot as usize, wanted);
        }
        Ok(uncounted)
    }

    /// The guard's counters, summed over CPUs, one entry per reason.
    pub fn counters(&self) -> Result<Vec<ReasonCounts>, BpfError> {
        let map = |name: &'static str| {
            self.ebpf
                .map(name)
                .ok_or(BpfError::Missing { kind: "map", name })
        };
        let array = PerCpuArray::<_, Counter>::try_from(map(COUNTERS_MAP)?)
            .map_err(map_error(COUNTERS_MAP))?;
        let drops = PerCpuArray::<_, DropCounters>::try_from(map(INTERFACE_COUNTERS_MAP)?)
            .map_err(map_error(INTERFACE_COUNTERS_MAP))?;
        totals(&array, &read_drop_slots(&drops)?)
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

    /// The totals and every interface's counts, from one read of each slot, so that the
    /// interfaces never add up to more than the totals.
    pub fn read(&self) -> Result<Counts, BpfError> {
        let drops = read_drop_slots(&self.interfaces)?;
        Ok(Counts {
            totals: totals(&self.array, &drops)?,
            per_interface: per_interface(&drops),
        })
    }
}

/// What [`Counters::read`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Summed over CPUs, one entry per reason.
    pub totals: Vec<ReasonCounts>,
    /// What each guarded interface dropped (or would drop), per reason, summed over CPUs;
    /// sorted by interface.
    pub per_interface: Vec<InterfaceCounts>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

/// Every slot of `drops` (interfaces', unclaimed and retired), read once.
fn read_drop_slots<U: Borrow<MapData>>(
    drops: &PerCpuArray<U, DropCounters>,
) -> Result<Vec<PerCpuValues<DropCounters>>, BpfError> {
    (0..DROP_COUNTER_ENTRIES)
        .map(|index| {
            drops
                .get(&index, 0)
                .map_err(map_error(INTERFACE_COUNTERS_MAP))
        })
        .collect()
}

/// The totals: what passed, from `array`, and what was dropped or would have been, from every
/// drop slot.
fn totals<T: Borrow<MapData>>(
    array: &PerCpuArray<T, Counter>,
    drops: &[PerCpuValues<DropCounters>],
) -> Result<Vec<ReasonCounts>, BpfError> {
    let mut totals = [Counter::default(); COUNTER_SLOTS as usize];
    for (slot, total) in totals.iter_mut().enumerate() {
        let per_cpu = array
            .get(&(slot as u32), 0)
            .map_err(map_error(COUNTERS_MAP))?;
        for c in per_cpu.iter() {
            add(total, c);
        }
    }
    for per_cpu in drops {
        for c in per_cpu.iter() {
            for (total, c) in totals.iter_mut().zip(&c.slots) {
                add(total, c);
            }
        }
    }
    Ok(Reason::ALL
        .into_iter()
        .map(|reason| ReasonCounts {
            reason,
            passed: totals[counter_slot(reason, false) as usize],
            dropped: totals[counter_slot(reason, true) as usize],
        })
        .collect())
}

/// The claimed interface slots among `drops`, named and summed over CPUs.
fn per_interface(drops: &[PerCpuValues<DropCounters>]) -> Vec<InterfaceCounts> {
    let mut out = Vec::new();
    for per_cpu in drops.iter().take(INTERFACE_SLOTS as usize) {
        let index = per_cpu.first().map_or(0, |c| c.ifindex);
        if index == 0 {
            continue;
        }
        let sum = |slot: u32| {
            let mut total = Counter::default();
            for c in per_cpu.iter() {
                add(&mut total, &c.slots[slot as usize]);
            }
            total
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
    out
}

fn add(total: &mut Counter, c: &Counter) {
    total.packets += c.packets;
    total.bytes += c.bytes;
}

/// Returns once every run of the guard that started before the call is over.
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for an RCU grace period, and XDP programs run
/// inside RCU read-side sections. Where it is not available (nohz_full CPUs), a pause far
/// longer than any run.
fn wait_for_running_programs() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let done = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) } == 0;
    if !done {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
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
