//! Plumbing shared by tether-agent and tether-server. Nothing here knows about the
//! Konnectivity protocol or about eBPF.

pub mod admin;
pub mod backpressure;
pub mod exposition;
pub mod flags;
pub mod handshake;
pub mod kube_client;
pub mod leases;
pub mod listen_addresses;
pub mod mailbox;
pub mod net;
pub mod process_metrics;
pub mod read_ahead;
pub mod shutdown;
pub mod sparse;
pub mod telemetry;
pub mod tls;
pub mod window;

/// Raises the soft open-files limit to the hard limit: every tunnelled connection costs a
/// descriptor, and the usual soft limit of 1024 would cap a node at about a thousand
/// (Go raises it the same way for upstream's binaries).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %err, "could not raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "could not read the open-files limit"),
    }
}

/// Fixes glibc's allocation thresholds. By default they adapt: the first freed 256 KiB read
/// buffer lifts the mmap threshold just past it and the trim threshold to twice that, so a bulk
/// transfer keeps returning the top of the heap to the kernel and faulting it back in (about 40
/// thousand page faults per GiB through the agent, 440 with these settings). Freed memory
/// still goes back: above 4 MiB at once, and all of it in [`trim_memory_when_idle`].
fn tune_allocator() {
    // SAFETY: mallopt only sets the allocator's parameters, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

/// Gives freed heap memory back to the kernel once `open` connections have dropped well below
/// their recent peak. glibc keeps freed memory in its arenas indefinitely, so without this a
/// burst of connections would leave the process at its peak size.
pub async fn trim_memory_when_idle(open: impl Fn() -> usize) {
    let mut peak = open();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = open();
        if now + 64 <= peak {
            // SAFETY: malloc_trim only touches the allocator's own free lists.
            unsafe { libc::malloc_trim(0) };
            peak = now;
        } else {
            peak = peak.max(now);
        }
    }
}

/// How both binaries start: the tokio runtime (one worker by default: the work per packet is
/// small, and cross-thread wakeups cost more CPU than they save, as measured in
/// docs/benchmarks.md), logging, the open-files limit and the signal handlers; then `body`.
pub fn main<F, Fut>(process: &flags::Process, body: F) -> std::process::ExitCode
where
    F: FnOnce(shutdown::Signals) -> Fut,
    Fut: std::future::Future<Output = std::process::ExitCode>,
{
    tune_allocator();
    // One worker is the main thread itself: the multi-threaded scheduler would add a thread
    // hand-off and work-stealing bookkeeping to every wakeup for no parallelism.
    let runtime = if process.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(process.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        if let Err(err) = telemetry::init(process) {
            eprintln!("invalid configuration: {}", error_chain(&err));
            return std::process::ExitCode::from(2);
        }
        raise_fd_limit();
        match shutdown::Signals::install() {
            Ok(signals) => body(signals).await,
            Err(err) => {
                tracing::error!(error = %err, "cannot install signal handlers");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// An error and its sources on one line. Sources whose text the line already contains are
/// skipped (some libraries repeat their source in their own message).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read config")]
    struct Wraps(#[source] std::io::Error);

    #[test]
    fn error_chain_appends_sources_once() {
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(
            super::error_chain(&Wraps(io())),
            "cannot read config: disk on fire"
        );
        assert_eq!(super::error_chain(&Repeats(io())), "outer: disk on fire");
    }
}
