//! The dial policy in the kernel: cgroup hooks on the agent's own cgroup that refuse
//! `connect()` (TCP and UDP) and unconnected UDP `sendmsg()` to destinations the policy denies,
//! whatever code in the agent asks. They read the rules the agent's userspace policy tries, in
//! the same order, so both decide alike; a refused call fails with EPERM.
#![no_std]
#![no_main]

use aya_ebpf::macros::{cgroup_sock_addr, map};
use aya_ebpf::maps::{Array, PerCpuArray};
use aya_ebpf::programs::SockAddrContext;
use tether_agent_common::{DialConfig, DialRule, MAX_DIAL_RULES};

#[map]
static DIAL_RULES: Array<DialRule> = Array::with_max_entries(MAX_DIAL_RULES, 0);
#[map]
static DIAL_CONFIG: Array<DialConfig> = Array::with_max_entries(1, 0);
/// Decisions per rule index; the last slot counts what no rule matched.
#[map]
static DIAL_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_DIAL_RULES + 1, 0);

const ALLOW: i32 = 1;
const DENY: i32 = 0;

fn count(slot: u32) {
    if let Some(hits) = DIAL_HITS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, written only by this CPU with preemption off.
        unsafe { *hits += 1 };
    }
}

/// The first rule that matches `family`, `addr` (network byte order) and `port` decides.
fn decide(family: u8, addr: [u32; 4], port: u16) -> i32 {
    let Some(config) = DIAL_CONFIG.get(0) else {
        // No policy written yet: the agent writes it before attaching, so this is never hit.
        return ALLOW;
    };
    let rules = config.rules;
    let mut index = 0;
    while index < MAX_DIAL_RULES {
        if index >= rules {
            break;
        }
        if let Some(rule) = DIAL_RULES.get(index)
            && rule.family == family
            && port >= rule.first_port
            && port <= rule.last_port
            && addr[0] & rule.mask[0] == rule.addr[0]
            && addr[1] & rule.mask[1] == rule.addr[1]
            && addr[2] & rule.mask[2] == rule.addr[2]
            && addr[3] & rule.mask[3] == rule.addr[3]
        {
            count(index);
            return if rule.allow == 1 { ALLOW } else { DENY };
        }
        index += 1;
    }
    count(MAX_DIAL_RULES);
    if config.otherwise_allow == 1 {
        ALLOW
    } else {
        DENY
    }
}

fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this call.
    let raw = unsafe { (*ctx.sock_addr).user_port };
    u16::from_be(raw as u16)
}

fn check4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `port`.
    let ip = unsafe { (*ctx.sock_addr).user_ip4 };
    decide(4, [ip, 0, 0, 0], port(ctx))
}

/// `::ffff:a.b.c.d` in network byte order, word by word.
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

fn check6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `port`; the kernel allows 4-byte reads of each word.
    let ip = unsafe {
        let sa = ctx.sock_addr;
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    };
    // An IPv6 socket reaches IPv4 through mapped addresses: judge them as IPv4.
    if ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_PREFIX {
        return decide(4, [ip[3], 0, 0, 0], port(ctx));
    }
    decide(6, ip, port(ctx))
}

#[cgroup_sock_addr(connect4)]
pub fn tether_dial_connect4(ctx: SockAddrContext) -> i32 {
    check4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn tether_dial_connect6(ctx: SockAddrContext) -> i32 {
    check6(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tether_dial_sendmsg4(ctx: SockAddrContext) -> i32 {
    check4(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tether_dial_sendmsg6(ctx: SockAddrContext) -> i32 {
    check6(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
