//! The kernel side of the agent: loads the embedded eBPF object, attaches the XDP guard and
//! reads its counters. This is the only module that uses aya.

use std::ffi::CString;
use std::io;

use aya::maps::PerCpuArray;
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfError};
use aya_log::EbpfLogger;
use tether_agent_common::{COUNTERS_MAP, Counter, GUARD_PROGRAM, Reason};
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
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, DataplaneError> {
        let map_err = |source| DataplaneError::Map {
            name: COUNTERS_MAP,
            source,
        };
        let map = self.ebpf.map(COUNTERS_MAP).ok_or(DataplaneError::Missing {
            kind: "map",
            name: COUNTERS_MAP,
        })?;
        let array = PerCpuArray::<_, Counter>::try_from(map).map_err(map_err)?;
        Reason::ALL
            .into_iter()
            .map(|reason| {
                let per_cpu = array.get(&(reason as u32), 0).map_err(map_err)?;
                let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                });
                Ok((reason, total))
            })
            .collect()
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
