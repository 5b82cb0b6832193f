//! The guard's config map, mapped into this process.
//!
//! The program reads [`GuardConfig`] on every packet; with its control-plane table it is
//! 200 KiB. Reading and writing it whole through the map syscalls would put that on the stack
//! twice for every mode change and rewrite the table each time, racing any other writer (the
//! `guard` command beside a running agent). Mapped (`BPF_F_MMAPABLE`), each change is a store
//! to the fields it changes, which the program sees on its next packet.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;

use aya::maps::Map;
use tether_agent_common::{CONFIG_MAP, GuardConfig};

use super::BpfError;

pub(super) struct SharedConfig {
    config: NonNull<GuardConfig>,
    len: usize,
}

impl SharedConfig {
    pub fn new(map: &Map) -> Result<Self, BpfError> {
        let Map::Array(data) = map else {
            return Err(BpfError::Missing {
                kind: "array map",
                name: CONFIG_MAP,
            });
        };
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = size_of::<GuardConfig>().div_ceil(page) * page;
        // SAFETY: maps a fresh region (no address hint) of the map's page-rounded value area,
        // shared with the kernel; the result is checked before use.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(BpfError::MapConfig(io::Error::last_os_error()));
        }
        let config = NonNull::new(address.cast::<GuardConfig>())
            .ok_or_else(|| BpfError::MapConfig(io::Error::other("mmap returned null")))?;
        Ok(SharedConfig { config, len })
    }

    pub fn mode(&self) -> u32 {
        // SAFETY: the mapping holds a GuardConfig for as long as self lives; volatile because
        // other processes may write it.
        unsafe { std::ptr::addr_of!((*self.config.as_ptr()).mode).read_volatile() }
    }

    pub fn set_mode(&self, mode: u32) {
        // SAFETY: as in `mode`; an aligned u32 store, which the program never sees torn.
        unsafe { std::ptr::addr_of_mut!((*self.config.as_ptr()).mode).write_volatile(mode) }
    }

    pub fn tunnels(&self) -> u32 {
        // SAFETY: as in `mode`.
        unsafe { std::ptr::addr_of!((*self.config.as_ptr()).tunnels).read_volatile() }
    }

    pub fn set_tunnels(&self, tunnels: u32) {
        // SAFETY: as in `set_mode`.
        unsafe { std::ptr::addr_of_mut!((*self.config.as_ptr()).tunnels).write_volatile(tunnels) }
    }

    /// The interface that slot `slot` of the drop counters counts (0 for none).
    pub fn interface_slot(&self, slot: usize) -> u32 {
        // SAFETY: as in `mode`; `slot` is bounds-checked by the indexing.
        unsafe { std::ptr::addr_of!((*self.config.as_ptr()).interface_slots[slot]).read_volatile() }
    }

    pub fn set_interface_slot(&self, slot: usize, ifindex: u32) {
        // SAFETY: as in `set_mode`; `slot` is bounds-checked by the indexing.
        unsafe {
            std::ptr::addr_of_mut!((*self.config.as_ptr()).interface_slots[slot])
                .write_volatile(ifindex)
        }
    }

    /// The control-plane table, to change in place. Each entry is one byte (each bitmap word
    /// one aligned store), so the program reads every entry either before or after a change.
    pub fn tables(&mut self) -> Tables<'_> {
        // SAFETY: the mapping holds a GuardConfig for as long as self lives, and `&mut self`
        // keeps these the only references made through it; the kernel program only reads.
        let config = unsafe { self.config.as_mut() };
        Tables {
            v4_top: &mut config.v4_top,
            v6_top: &mut config.v6_top,
            v4_mid: &mut config.v4_mid,
            v4_low: &mut config.v4_low,
        }
    }
}

/// [`GuardConfig`]'s control-plane table.
pub(super) struct Tables<'a> {
    pub v4_top: &'a mut [u8; 65536],
    pub v6_top: &'a mut [u8; 65536],
    pub v4_mid: &'a mut [[u8; 256]; 256],
    pub v4_low: &'a mut [[u64; 4]; 256],
}

impl Drop for SharedConfig {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region `new` mapped; nothing refers to it after.
        unsafe { libc::munmap(self.config.as_ptr().cast(), self.len) };
    }
}
