//! Reference XDP programs for `cargo xtask bench guard`: the floors the guard is measured
//! against, and the packet generator (`XDP_TX` run with `BPF_F_TEST_XDP_LIVE_FRAMES`, which
//! sends every frame out of the interface it names). Never loaded by the agent.
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;

#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Drops after reading what any filter of the control plane's SYNs reads: the ethertype, the
/// source address and the TCP flags. The packet's cache lines arrive from the generator's CPU;
/// the no-op drop never asks for them.
#[xdp]
pub fn bench_read_drop(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 54 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the 54 bytes read lie inside the packet (checked above).
    let (ethertype, source, flags) = unsafe {
        (
            core::ptr::read_volatile((start + 12) as *const u16),
            core::ptr::read_volatile((start + 26) as *const [u8; 4]),
            core::ptr::read_volatile((start + 47) as *const u8),
        )
    };
    if ethertype == 0x0008 && source[0] == 10 && flags & 0x12 == 0x02 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[xdp]
pub fn bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
