//! What can go wrong loading, attaching, pinning and reading the agent's eBPF programs: the
//! guard's and the dial hooks' alike.

use std::io;
use std::path::PathBuf;

use aya::EbpfError;
use aya::maps::MapError;
use aya::programs::ProgramError;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
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
    #[error(
        "this kernel attached the XDP guard to {interface} without a BPF link, which cannot be \
         pinned; Linux 5.9 or newer is needed for the guard to survive restarts"
    )]
    NoLink { interface: String },
    #[error("could not read eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot map the guard's config into memory (BPF_F_MMAPABLE needs Linux 5.5 or newer)")]
    MapConfig(#[source] io::Error),
    #[error("could not start reading eBPF logs")]
    Logs(#[source] io::Error),
    #[error("could not read the guard's drop events")]
    Events(#[source] io::Error),
    #[error("policy has {count} {what}; the guard holds at most {max}")]
    PolicyTooLarge {
        what: &'static str,
        count: usize,
        max: u32,
    },
    #[error("running the guard on a test packet failed")]
    TestRun(#[source] ProgramError),
    #[error(
        "{path} is not on a BPF filesystem, so --bpffs-root {root} cannot hold the guard's pins; \
         mount one (mount -t bpf bpf /sys/fs/bpf) or, in a pod, mount the host's /sys/fs/bpf/tether there"
    )]
    NotBpffs { path: PathBuf, root: PathBuf },
    #[error("{action} {path}")]
    Pin {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("nothing is pinned under {0}: no guard to inspect")]
    NothingPinned(PathBuf),
    #[error(
        "the guard pinned under {root} is {found}, which this tether-agent cannot read; starting \
         this agent replaces it without a gap, `tether-agent guard detach` removes it"
    )]
    IncompatiblePins { root: PathBuf, found: String },
    #[error("the embedded eBPF object cannot be parsed")]
    Object(#[source] aya_obj::ParseError),
    #[error("cannot duplicate the descriptor of eBPF map {name}")]
    Duplicate {
        name: &'static str,
        #[source]
        source: io::Error,
    },
}

pub fn map_error(name: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

pub fn is_permission_error(err: &EbpfError) -> bool {
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
