//! Per-connection credit flow control: the sender spends a [`SendWindow`]; the receiver counts
//! what its consumer took with [`Grants`] and hands credit back in batches.
//!
//! With this, a slow-but-alive consumer slows only its own sender, and a stalled one stops it,
//! instead of filling a queue until the connection must be closed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Semaphore;

/// More credit than this is never held, whatever a (possibly hostile) peer grants.
const MAX_CREDIT: usize = 64 << 20;

pub struct SendWindow {
    credit: Semaphore,
    granted: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("connection closed while waiting for send window")]
pub struct WindowClosed;

impl SendWindow {
    pub fn new(initial: usize) -> Self {
        SendWindow {
            credit: Semaphore::new(initial.min(MAX_CREDIT)),
            granted: AtomicU64::new(0),
        }
    }

    /// Spends `n` bytes of credit, waiting for grants when there is not enough.
    pub async fn take(&self, n: usize) -> Result<(), WindowClosed> {
        let n = u32::try_from(n).map_err(|_| WindowClosed)?;
        self.credit
            .acquire_many(n)
            .await
            .map_err(|_| WindowClosed)?
            .forget();
        Ok(())
    }

    /// Adds credit the peer granted (negative or absurd grants are ignored or capped).
    pub fn grant(&self, bytes: i64) {
        let Ok(bytes) = usize::try_from(bytes) else {
            return;
        };
        self.granted.fetch_add(bytes as u64, Ordering::Relaxed);
        let room = MAX_CREDIT.saturating_sub(self.credit.available_permits());
        self.credit.add_permits(bytes.min(room));
    }

    /// Bytes the peer has granted so far: it grows as long as the consumer takes anything.
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }

    /// Wakes every waiter with an error: the connection is gone.
    pub fn close(&self) {
        self.credit.close();
    }
}

/// Counts bytes the consumer took; returns a grant once enough has accumulated.
pub struct Grants {
    consumed: AtomicUsize,
    batch: usize,
}

impl Grants {
    /// `batch` must be at most the window minus the largest DATA packet, or the sender can
    /// wait for a grant the receiver is still saving up.
    pub fn new(batch: usize) -> Self {
        Grants {
            consumed: AtomicUsize::new(0),
            batch,
        }
    }

    pub fn consumed(&self, n: usize) -> Option<i64> {
        let total = self.consumed.fetch_add(n, Ordering::AcqRel) + n;
        if total < self.batch {
            return None;
        }
        let grant = self.consumed.swap(0, Ordering::AcqRel);
        (grant > 0).then(|| i64::try_from(grant).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_sender_waits_until_granted() {
        let window = Arc::new(SendWindow::new(10));
        window.take(10).await.unwrap();
        let waiting = tokio::spawn({
            let window = window.clone();
            async move { window.take(5).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "took credit it did not have");
        window.grant(5);
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn closing_releases_waiters_with_an_error() {
        let window = Arc::new(SendWindow::new(0));
        let waiting = tokio::spawn({
            let window = window.clone();
            async move { window.take(1).await }
        });
        tokio::task::yield_now().await;
        window.close();
        assert!(waiting.await.unwrap().is_err());
    }

    #[test]
    fn hostile_grants_are_capped_or_ignored() {
        let window = SendWindow::new(0);
        window.grant(-5);
        window.grant(i64::MAX);
        assert_eq!(window.credit.available_permits(), MAX_CREDIT);
    }

    #[test]
    fn grants_come_in_batches() {
        let grants = Grants::new(100);
        assert_eq!(grants.consumed(60), None);
        assert_eq!(grants.consumed(60), Some(120));
        assert_eq!(grants.consumed(10), None);
    }
}
