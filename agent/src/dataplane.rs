//! The kernel side of the agent: loads the embedded eBPF object, attaches the XDP guard and
//! reads its counters. This is the only module that uses aya.

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::str::FromStr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfError};
use aya_log::EbpfLogger;
use tether_agent_common::{
    ALLOW_V4_MAP, ALLOW_V6_MAP, CONFIG_MAP, CONTROL_PLANE_V4_MAP, CONTROL_PLANE_V6_MAP,
    COUNTERS_MAP, Counter, GUARD_PROGRAM, GuardConfig, MAX_PORTS, MAX_PREFIXES, Mode, PORTS_MAP,
    Reason, counter_slot,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The eBPF object `cargo xtask build-ebpf` produced; `build.rs` refuses a missing or stale one.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TETHER_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading eBPF is not permitted: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or root)"
    )]
    NotPermitted(#[source] EbpfError),
    #[error("could not load the embedded eBPF object")]
    Load(#[source] EbpfError),
    #[error("the embedded eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("the kernel rejected eBPF program {name}")]
    ProgramLoad {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("network interface {interface:?} does not exist")]
    NoSuchInterface { interface: String },
    #[error("could not attach the XDP guard to {interface} (native or generic)")]
    Attach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("could not read eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("could not start reading eBPF logs")]
    Logs(#[source] io::Error),
    #[error("policy has {count} {what}; the guard holds at most {max}")]
    PolicyTooLarge {
        what: &'static str,
        count: usize,
        max: u32,
    },
    #[error("running the guard on a test packet failed")]
    TestRun(#[source] ProgramError),
}

/// An IP prefix (`10.0.0.0/8`, `fd00::/8`, or a bare address for a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an IP prefix (examples: 10.0.0.0/8, fd00::/8, 192.0.2.7)")]
pub struct BadCidr(pub String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Self, BadCidr> {
        let bad = || BadCidr(text.to_owned());
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What the guard drops (see `agent-common`'s `Reason` for the verdicts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Sources whose new connections, fragments and malformed packets are dropped.
    pub control_plane: Vec<Cidr>,
    /// Ports a TCP SYN or UDP datagram may reach only from `allowed`.
    pub protected_ports: Vec<u16>,
    pub allowed: Vec<Cidr>,
}

/// Counts for one reason, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonCounts {
    pub reason: Reason,
    /// Passed, including what monitor mode would have dropped.
    pub passed: Counter,
    pub dropped: Counter,
}

/// How the XDP program ended up attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver, before an skb exists (the fast path).
    Native,
    /// In the generic network stack, for drivers without XDP support.
    Generic,
}

impl AttachMode {
    pub fn label(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

/// The loaded eBPF programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
}

/// Log records written by the kernel programs with aya-log, forwarded to `tracing`.
///
/// Holding this keeps the log ring buffer's fd open; the programs keep running without it, but
/// their log records are then lost.
pub struct KernelLogs {
    logger: EbpfLogger<&'static dyn log::Log>,
}

impl Dataplane {
    /// Loads the embedded object and the guard program into the kernel (not yet attached).
    pub fn load() -> Result<(Self, KernelLogs), DataplaneError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|err| {
            if is_permission_error(&err) {
                DataplaneError::NotPermitted(err)
            } else {
                DataplaneError::Load(err)
            }
        })?;
        // The logger must exist before the programs load: it owns the log map they reference.
        let logger = EbpfLogger::init(&mut ebpf).map_err(|_| DataplaneError::Missing {
            kind: "map",
            name: "AYA_LOGS",
        })?;
        let mut dataplane = Dataplane { ebpf };
        dataplane
            .guard_program()?
            .load()
            .map_err(|source| DataplaneError::ProgramLoad {
                name: GUARD_PROGRAM,
                source,
            })?;
        Ok((dataplane, KernelLogs { logger }))
    }

    /// Attaches the guard to `interface` in the calling thread's network namespace: natively
    /// when the driver supports XDP, in generic mode otherwise.
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, DataplaneError> {
        let if_index = interface_index(interface)?;
        let program = self.guard_program()?;
        match program.attach_to_if_index(if_index, XdpMode::Driver) {
            Ok(_) => Ok(AttachMode::Native),
            Err(native) => {
                tracing::debug!(interface, error = %native, "native XDP unavailable, trying generic");
                program
                    .attach_to_if_index(if_index, XdpMode::Skb)
                    .map(|_| AttachMode::Generic)
                    .map_err(|source| DataplaneError::Attach {
                        interface: interface.to_owned(),
                        source,
                    })
            }
        }
    }

    /// The guard's counters, summed over CPUs, one entry per reason.
    pub fn counters(&self) -> Result<Vec<ReasonCounts>, DataplaneError> {
        let map = self.ebpf.map(COUNTERS_MAP).ok_or(DataplaneError::Missing {
            kind: "map",
            name: COUNTERS_MAP,
        })?;
        let array = PerCpuArray::<_, Counter>::try_from(map).map_err(map_error(COUNTERS_MAP))?;
        let sum = |slot: u32| -> Result<Counter, DataplaneError> {
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

    /// Switches enforce / monitor / off; takes effect on the next packet.
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), DataplaneError> {
        let map = self.map_mut(CONFIG_MAP)?;
        let mut config = Array::<_, GuardConfig>::try_from(map).map_err(map_error(CONFIG_MAP))?;
        config
            .set(
                0,
                GuardConfig {
                    mode: mode as u32,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_error(CONFIG_MAP))
    }

    /// Replaces the policy in the maps the program reads (no reload; entries not in `policy`
    /// are removed after the new ones are in place).
    pub fn set_policy(&mut self, policy: &Policy) -> Result<(), DataplaneError> {
        for (what, count, max) in [
            (
                "control-plane prefixes",
                policy.control_plane.len(),
                MAX_PREFIXES,
            ),
            ("allowed prefixes", policy.allowed.len(), MAX_PREFIXES),
            ("protected ports", policy.protected_ports.len(), MAX_PORTS),
        ] {
            if count > usize::try_from(max).unwrap_or(usize::MAX) {
                return Err(DataplaneError::PolicyTooLarge { what, count, max });
            }
        }
        self.replace_prefixes(
            CONTROL_PLANE_V4_MAP,
            CONTROL_PLANE_V6_MAP,
            &policy.control_plane,
        )?;
        self.replace_prefixes(ALLOW_V4_MAP, ALLOW_V6_MAP, &policy.allowed)?;
        let map = self.map_mut(PORTS_MAP)?;
        let mut ports = HashMap::<_, u16, u8>::try_from(map).map_err(map_error(PORTS_MAP))?;
        for port in &policy.protected_ports {
            ports.insert(port, 1, 0).map_err(map_error(PORTS_MAP))?;
        }
        let stale: Vec<u16> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !policy.protected_ports.contains(p))
            .collect();
        for port in stale {
            ports.remove(&port).map_err(map_error(PORTS_MAP))?;
        }
        Ok(())
    }

    fn replace_prefixes(
        &mut self,
        v4: &'static str,
        v6: &'static str,
        prefixes: &[Cidr],
    ) -> Result<(), DataplaneError> {
        let mut trie4 =
            LpmTrie::<_, [u8; 4], u8>::try_from(self.map_mut(v4)?).map_err(map_error(v4))?;
        let wanted4: Vec<Key<[u8; 4]>> = prefixes
            .iter()
            .filter_map(|c| match c.addr {
                IpAddr::V4(a) => Some(Key::new(u32::from(c.len), masked(a.octets(), c.len))),
                IpAddr::V6(_) => None,
            })
            .collect();
        replace_trie(&mut trie4, &wanted4).map_err(map_error(v4))?;
        let mut trie6 =
            LpmTrie::<_, [u8; 16], u8>::try_from(self.map_mut(v6)?).map_err(map_error(v6))?;
        let wanted6: Vec<Key<[u8; 16]>> = prefixes
            .iter()
            .filter_map(|c| match c.addr {
                IpAddr::V6(a) => Some(Key::new(u32::from(c.len), masked(a.octets(), c.len))),
                IpAddr::V4(_) => None,
            })
            .collect();
        replace_trie(&mut trie6, &wanted6).map_err(map_error(v6))
    }

    /// Runs the guard once on `packet` in the kernel (BPF_PROG_TEST_RUN); returns the XDP
    /// action. The packet is not sent anywhere.
    pub fn run_packet(&mut self, packet: &[u8]) -> Result<u32, DataplaneError> {
        let program = self.guard_program()?;
        let mut out = vec![0u8; packet.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .map_err(DataplaneError::TestRun)?;
        Ok(result.return_value)
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::Missing { kind: "map", name })
    }

    fn guard_program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        let missing = DataplaneError::Missing {
            kind: "XDP program",
            name: GUARD_PROGRAM,
        };
        match self.ebpf.program_mut(GUARD_PROGRAM) {
            Some(program) => program.try_into().map_err(|_| missing),
            None => Err(missing),
        }
    }
}

impl KernelLogs {
    /// Forwards every pending log record now.
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// Forwards log records as they arrive, until the task is dropped.
    pub async fn forward(self) -> Result<(), DataplaneError> {
        // SAFETY: the logger owns the ring buffer's fd; it stays open and unchanged for as long
        // as the AsyncFd owns the logger.
        let mut fd = unsafe { AsyncFd::register_with_interest(self.logger, Interest::READABLE) }
            .map_err(|err| DataplaneError::Logs(err.into()))?;
        loop {
            let mut ready = fd.readable_mut().await.map_err(DataplaneError::Logs)?;
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// The address with the bits beyond the prefix cleared, as the trie stores keys.
fn masked<const N: usize>(mut bytes: [u8; N], len: u8) -> [u8; N] {
    let len = usize::from(len);
    for (i, byte) in bytes.iter_mut().enumerate() {
        let keep = len.saturating_sub(i * 8).min(8);
        *byte &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    bytes
}

fn replace_trie<const N: usize>(
    trie: &mut LpmTrie<&mut MapData, [u8; N], u8>,
    wanted: &[Key<[u8; N]>],
) -> Result<(), aya::maps::MapError> {
    for key in wanted {
        trie.insert(key, 1, 0)?;
    }
    let stale: Vec<Key<[u8; N]>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            !wanted
                .iter()
                .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
        })
        .collect();
    for key in stale {
        trie.remove(&key)?;
    }
    Ok(())
}

fn interface_index(interface: &str) -> Result<u32, DataplaneError> {
    let missing = || DataplaneError::NoSuchInterface {
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

fn is_permission_error(err: &EbpfError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        source = err.source();
    }
    false
}
