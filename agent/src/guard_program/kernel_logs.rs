//! The kernel programs' aya-log records, forwarded to `tracing`.

use aya_log::EbpfLogger;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::BpfError;

/// Log records written by the kernel programs with aya-log, forwarded to `tracing`.
///
/// Holding this keeps the log ring buffer's fd open; the programs keep running without it, but
/// their log records are then lost.
pub struct KernelLogs {
    pub(super) logger: EbpfLogger<&'static dyn log::Log>,
}

impl KernelLogs {
    /// Forwards every pending log record now.
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// Forwards log records as they arrive, until the task is dropped.
    pub async fn forward(self) -> Result<(), BpfError> {
        // SAFETY: the logger owns the ring buffer's fd; it stays open and unchanged for as long
        // as the AsyncFd owns the logger.
        let mut fd = unsafe { AsyncFd::register_with_interest(self.logger, Interest::READABLE) }
            .map_err(|err| BpfError::Logs(err.into()))?;
        loop {
            let mut ready = fd.readable_mut().await.map_err(BpfError::Logs)?;
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }
}
