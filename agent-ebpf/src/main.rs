//! tether's kernel programs. Built for `bpfel-unknown-none` by `cargo xtask build-ebpf` and
//! embedded in `tether-agent`; the layouts they share with userspace live in `agent-common`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
};
use aya_log_ebpf::info;
use tether_agent_common::{Counter, Reason};

/// Per-CPU packet and byte counts, one slot per [`Reason`]; userspace sums the CPUs at scrape
/// time, so the fast path never contends on a shared cache line.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[xdp]
pub fn tether_guard(ctx: XdpContext) -> u32 {
    let verdict = Reason::Pass;
    count(&ctx, verdict);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(ctx: &XdpContext, reason: Reason) {
    let len = (ctx.data_end() - ctx.data()) as u64;
    if let Some(slot) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from a successful per-CPU map lookup, so it is valid for
        // this CPU's slot, and XDP programs do not migrate between CPUs while running.
        let counter = unsafe { &mut *slot };
        if counter.packets == 0 {
            info!(
                ctx,
                "tether_guard: first packet on this CPU ({} bytes)", len
            );
        }
        counter.packets += 1;
        counter.bytes += len;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF has no unwinding; the verifier rejects any path that could reach here.
    loop {}
}

// The ring-buffer helpers behind aya-log are GPL-only, so the programs are GPL-licensed.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
