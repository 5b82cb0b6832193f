//! The dial policy in the kernel: cgroup hooks on the agent's own cgroup that refuse
//! `connect()` (TCP and UDP) and unconnected UDP `sendmsg()` to destinations the policy denies,
//! whatever code in the agent asks. They read the rules the agent's userspace policy tries, in
//! the same order, so both decide alike; a refused call fails with EPERM.
//!
//! They also steer: a `connect()` to a Service address in `SERVICES` is rewritten to one of its
//! ready backends, in turn (per CPU), so Service dials work without kube-proxy; the backend must
//! pass the policy too. `getpeername()` on such a socket still shows the Service's address.
#![no_std]
#![no_main]

use aya_ebpf::EbpfContext;
use aya_ebpf::helpers::bpf_get_socket_cookie;
use aya_ebpf::macros::{cgroup_sock_addr, map};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::SockAddrContext;
use tether_agent_common::{
    DialConfig, DialRule, Endpoint, MAX_BACKENDS, MAX_DIAL_RULES, MAX_SERVICES,
    MAX_STEERED_SOCKETS, ServiceKey, ServiceValue,
};

#[map(name = "DIAL_RULES")]
static DIAL_RULES: Array<DialRule> = Array::with_max_entries(MAX_DIAL_RULES, 0);
#[map(name = "DIAL_CONFIG")]
static DIAL_CONFIG: Array<DialConfig> = Array::with_max_entries(1, 0);
/// Decisions per rule index; the last slot counts what no rule matched.
#[map(name = "DIAL_HITS")]
static DIAL_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_DIAL_RULES + 1, 0);

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map(name = "BACKENDS")]
static BACKENDS: Array<Endpoint> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Per Service id: connects steered so far on this CPU, which also picks the next backend.
#[map(name = "SERVICE_NEXT")]
static SERVICE_NEXT: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
/// Socket cookie → the Service address it was dialled as, for `getpeername()`.
#[map(name = "STEERED")]
static STEERED: LruHashMap<u64, Endpoint> = LruHashMap::with_max_entries(MAX_STEERED_SOCKETS, 0);

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

// The context's fields are read and written at fixed offsets, one function per family: the
// verifier refuses a context pointer that was offset and then dereferenced.

fn destination4(ctx: &SockAddrContext) -> Endpoint {
    // SAFETY: as in `port`.
    let ip = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) };
    Endpoint {
        addr: [ip, 0, 0, 0],
        port: port(ctx),
        family: 4,
        _pad: 0,
    }
}

fn destination6(ctx: &SockAddrContext) -> Endpoint {
    // SAFETY: as in `port`.
    let addr = unsafe {
        let sa = ctx.sock_addr;
        [
            core::ptr::read_volatile(&(*sa).user_ip6[0]),
            core::ptr::read_volatile(&(*sa).user_ip6[1]),
            core::ptr::read_volatile(&(*sa).user_ip6[2]),
            core::ptr::read_volatile(&(*sa).user_ip6[3]),
        ]
    };
    Endpoint {
        addr,
        port: port(ctx),
        family: 6,
        _pad: 0,
    }
}

fn rewrite4(ctx: &SockAddrContext, to: &Endpoint) {
    // SAFETY: connect and getpeername hooks may write the user address and port.
    unsafe {
        let sa = ctx.sock_addr;
        core::ptr::write_volatile(&mut (*sa).user_ip4, to.addr[0]);
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(to.port.to_be()));
    }
}

fn rewrite6(ctx: &SockAddrContext, to: &Endpoint) {
    // SAFETY: as in `rewrite4`.
    unsafe {
        let sa = ctx.sock_addr;
        core::ptr::write_volatile(&mut (*sa).user_ip6[0], to.addr[0]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[1], to.addr[1]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[2], to.addr[2]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[3], to.addr[3]);
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(to.port.to_be()));
    }
}

/// The backend a connect to `dialled` goes to, when `target` (the dialled address, or the
/// IPv4 address inside a mapped one) is a Service's: `Err` refuses the connect (no ready
/// backend, or one the policy denies), `Ok(None)` leaves it alone. `dialled` is what
/// `getpeername()` shows afterwards.
fn steer(
    ctx: &SockAddrContext,
    dialled: &Endpoint,
    target: &Endpoint,
) -> Result<Option<Endpoint>, ()> {
    // SAFETY: as in `port`.
    let protocol = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).protocol) } as u8;
    let key = ServiceKey {
        addr: target.addr,
        port: target.port,
        family: target.family,
        protocol,
    };
    let Some(service) = SERVICES.get_ptr(&key) else {
        return Ok(None);
    };
    // SAFETY: a hash value the verifier bounds-checked; userspace replaces values whole.
    let service = unsafe { *service };
    if service.count == 0 {
        // No ready backend: refuse rather than dial an address nothing answers.
        return Err(());
    }
    let next = SERVICE_NEXT.get_ptr_mut(service.id).ok_or(())?;
    // SAFETY: a per-CPU slot, written only by this CPU with preemption off.
    let turn = unsafe {
        let turn = *next;
        *next = turn + 1;
        turn
    };
    let slot = service.first + (turn % u64::from(service.count)) as u32;
    let backend = *BACKENDS.get(slot).ok_or(())?;
    if backend.family != target.family || decide(backend.family, backend.addr, backend.port) == DENY
    {
        return Err(());
    }
    // SAFETY: the context is the kernel's for this call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = STEERED.insert(&cookie, dialled, 0);
    Ok(Some(backend))
}

/// The Service a steered socket was dialled as, for `getpeername()`.
fn dialled_as(ctx: &SockAddrContext) -> Option<Endpoint> {
    // SAFETY: the context is the kernel's for this call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: an LRU value written whole by `steer`.
    STEERED.get_ptr(&cookie).map(|dialled| unsafe { *dialled })
}

#[cgroup_sock_addr(connect4)]
pub fn tether_dial_connect4(ctx: SockAddrContext) -> i32 {
    if check4(&ctx) == DENY {
        return DENY;
    }
    let dialled = destination4(&ctx);
    match steer(&ctx, &dialled, &dialled) {
        Ok(Some(backend)) => rewrite4(&ctx, &backend),
        Ok(None) => {}
        Err(()) => return DENY,
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn tether_dial_connect6(ctx: SockAddrContext) -> i32 {
    if check6(&ctx) == DENY {
        return DENY;
    }
    let dialled = destination6(&ctx);
    // An IPv6 socket reaches an IPv4 Service through its mapped address: steered like the
    // IPv4 address itself, to the backend's mapped address. Left alone, whatever steers
    // after these hooks (kube-proxy's NAT, another program) would pick a backend the policy
    // never judged.
    let mapped = dialled.addr[0] == 0 && dialled.addr[1] == 0 && dialled.addr[2] == MAPPED_PREFIX;
    let target = if mapped {
        Endpoint {
            addr: [dialled.addr[3], 0, 0, 0],
            family: 4,
            ..dialled
        }
    } else {
        dialled
    };
    match steer(&ctx, &dialled, &target) {
        Ok(Some(backend)) if mapped => rewrite6(
            &ctx,
            &Endpoint {
                addr: [0, 0, MAPPED_PREFIX, backend.addr[0]],
                family: 6,
                ..backend
            },
        ),
        Ok(Some(backend)) => rewrite6(&ctx, &backend),
        Ok(None) => {}
        Err(()) => return DENY,
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn tether_dial_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(dialled) = dialled_as(&ctx) {
        rewrite4(&ctx, &dialled);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn tether_dial_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(dialled) = dialled_as(&ctx) {
        rewrite6(&ctx, &dialled);
    }
    ALLOW
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
