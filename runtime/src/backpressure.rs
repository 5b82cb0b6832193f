//! Backpressure toward a peer that has no per-connection flow control (upstream Konnectivity).
//!
//! Such a peer sends every connection's bytes down one stream as fast as its clients write.
//! When one destination reads slowly, its queue grows, and the only push-back the protocol
//! has is to stop reading the shared stream, which holds up every connection on it. Closing
//! the slow connection instead would cut off `kubectl cp` to a slow disk or `kubectl logs -f`
//! into a slow pipe. So the stream's reader pauses while one connection is over its queue
//! limit or the stream's queues together are over their [`Budget`], and resumes as soon as the
//! readers catch up. Only a destination that takes nothing at all for the stall timeout
//! (measured with [`Progress`]) is closed, which frees the stream for everyone else.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Bytes queued across every connection of one tunnel stream.
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
    drained: Notify,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget {
            used: AtomicUsize::new(0),
            limit,
            drained: Notify::new(),
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Over the limit: the stream's reader must wait.
    pub fn exhausted(&self) -> bool {
        self.used() > self.limit
    }

    pub(crate) fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Bytes left the queues (taken by a consumer, or dropped with a closed connection).
    pub(crate) fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.drained.notify_waiters();
        }
    }
}

/// Whether a destination is taking what was queued for it: bytes written to its socket, and
/// what is still waiting in the socket's send queue. Counting writes alone would miss a slow
/// reader: the kernel wakes a blocked writer only once a good part of the send buffer is free,
/// which a reader of a few KiB/s takes minutes to do, while the send queue shrinks with every
/// segment the peer accepts (TCP) or every buffer it reads whole (Unix sockets).
pub struct Progress {
    written: AtomicU64,
    fd: AtomicI32,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            written: AtomicU64::new(0),
            fd: AtomicI32::new(-1),
        }
    }
}

impl Progress {
    /// Also watch this stream socket's send queue (TCP or Unix).
    pub fn watch_socket(&self, fd: RawFd) {
        self.fd.store(fd, Ordering::Release);
    }

    /// The consumer passed `n` more bytes on.
    pub fn wrote(&self, n: usize) {
        self.written
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::AcqRel);
    }

    /// A value that changes whenever the destination takes anything.
    pub fn mark(&self) -> u64 {
        let written = self.written.load(Ordering::Acquire);
        let fd = self.fd.load(Ordering::Acquire);
        if fd < 0 {
            return written;
        }
        written.wrapping_sub(unsent(fd))
    }
}

fn unsent(fd: RawFd) -> u64 {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int through the pointer, which points at `queued`. The fd
    // belongs to a socket its owner keeps open while it is registered here; if the call fails
    // nothing was written and the error reads as an empty queue.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    if rc < 0 {
        return 0;
    }
    u64::try_from(queued).unwrap_or(0)
}

/// Finds destinations that took nothing for `limit` while the stream waited for them.
struct StallWatch {
    limit: Duration,
    seen: HashMap<i64, (u64, Instant)>,
}

impl StallWatch {
    fn new(limit: Duration) -> Self {
        StallWatch {
            limit,
            seen: HashMap::new(),
        }
    }

    /// Records connection `id`'s [`Progress::mark`]; true once it has stood still for the
    /// limit.
    fn stalled(&mut self, id: i64, mark: u64, now: Instant) -> bool {
        let entry = self.seen.entry(id).or_insert((mark, now));
        if entry.0 != mark {
            *entry = (mark, now);
            return false;
        }
        now.duration_since(entry.1) >= self.limit
    }

    /// How often to look: often enough to notice a stall soon after the limit.
    fn tick(&self) -> Duration {
        (self.limit / 4).max(Duration::from_millis(20))
    }
}

/// Why a stream's reader must wait before taking its next packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    /// This connection's queue is past its limit.
    Conn(i64),
    /// The stream's queues together are past their budget.
    Budget,
}

/// One stream's connections, as [`hold`] sees them.
pub trait Queues {
    /// Bytes queued for connection `id` and its queue limit, while it is open.
    fn queued(&self, id: i64) -> Option<(usize, usize)>;
    /// The [`Progress::mark`] of connection `id`, or of every connection holding queued bytes.
    fn marks(&self, only: Option<i64>) -> Vec<(i64, u64)>;
    /// Gives up on a connection whose reader took nothing for the stall timeout.
    fn close_stalled(&self, id: i64);
}

/// Holds the stream (its reader calls this instead of taking the next packet) until the
/// readers behind `pressure` catch up: the connection down to half its limit, or the stream's
/// queues to three quarters of the budget, so the stream does not stop again at the very next
/// packet. A reader that takes nothing for `stall_timeout` meanwhile is closed.
pub async fn hold(
    budget: &Budget,
    stall_timeout: Duration,
    pressure: Pressure,
    queues: &impl Queues,
) {
    let pressing = || match pressure {
        Pressure::Conn(id) => {
            budget.exhausted()
                || queues
                    .queued(id)
                    .is_some_and(|(queued, limit)| queued > limit / 2)
        }
        Pressure::Budget => budget.used() > budget.limit / 4 * 3,
    };
    let mut stalls = StallWatch::new(stall_timeout);
    let only = match pressure {
        Pressure::Conn(id) => Some(id),
        Pressure::Budget => None,
    };
    let tick = stalls.tick();
    let mut next_tick = Instant::now() + tick;
    loop {
        let drained = budget.drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        if !pressing() {
            return;
        }
        tokio::select! {
            _ = &mut drained => {}
            _ = tokio::time::sleep_until(next_tick) => {
                let now = Instant::now();
                for (id, mark) in queues.marks(only) {
                    if stalls.stalled(id, mark, now) {
                        queues.close_stalled(id);
                    }
                }
                next_tick = Instant::now() + tick;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn progress_stands_still_while_a_full_socket_is_not_read() {
        let (mut writer, mut reader) = UnixStream::pair().unwrap();
        writer.set_nonblocking(true).unwrap();
        let progress = Progress::default();
        progress.watch_socket(writer.as_raw_fd());
        let chunk = [7u8; 4096];
        let mut total = 0;
        while let Ok(n) = writer.write(&chunk) {
            progress.wrote(n);
            total += n;
        }
        let full = progress.mark();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(progress.mark(), full, "nothing was read");
        let mut buf = vec![0; total];
        std::io::Read::read_exact(&mut reader, &mut buf).unwrap();
        assert_ne!(progress.mark(), full, "the reader took everything");
    }

    #[test]
    fn a_stall_is_no_progress_for_the_whole_limit() {
        let mut watch = StallWatch::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(!watch.stalled(1, 10, t0));
        assert!(!watch.stalled(1, 10, t0 + Duration::from_secs(4)));
        assert!(
            !watch.stalled(1, 11, t0 + Duration::from_secs(6)),
            "it moved"
        );
        assert!(!watch.stalled(1, 11, t0 + Duration::from_secs(10)));
        assert!(watch.stalled(1, 11, t0 + Duration::from_secs(11)));
    }

    /// One connection, queue and progress under the test's control.
    struct One {
        budget: std::sync::Arc<Budget>,
        queued: std::sync::atomic::AtomicUsize,
        mark: AtomicU64,
        closed: std::sync::atomic::AtomicBool,
    }

    impl Queues for One {
        fn queued(&self, _: i64) -> Option<(usize, usize)> {
            (!self.closed.load(Ordering::Relaxed))
                .then(|| (self.queued.load(Ordering::Relaxed), 100))
        }
        fn marks(&self, _: Option<i64>) -> Vec<(i64, u64)> {
            vec![(1, self.mark.load(Ordering::Relaxed))]
        }
        fn close_stalled(&self, _: i64) {
            self.closed.store(true, Ordering::Relaxed);
            self.budget.release(self.queued.swap(0, Ordering::Relaxed));
        }
    }

    fn one(queued: usize) -> std::sync::Arc<One> {
        let budget = std::sync::Arc::new(Budget::new(1000));
        budget.charge(queued);
        std::sync::Arc::new(One {
            budget,
            queued: queued.into(),
            mark: AtomicU64::new(0),
            closed: false.into(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_holds_the_stream_until_half_drained_and_is_never_closed() {
        let conn = one(150);
        let held = tokio::spawn({
            let conn = conn.clone();
            async move {
                hold(
                    &conn.budget,
                    Duration::from_secs(5),
                    Pressure::Conn(1),
                    &*conn,
                )
                .await
            }
        });
        // It takes 10 bytes a second: slow, but never still for 5 seconds.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!held.is_finished());
            conn.queued.fetch_sub(10, Ordering::Relaxed);
            conn.mark.fetch_add(10, Ordering::Relaxed);
            conn.budget.release(10);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(held.is_finished(), "50 of 100 queued: the stream goes on");
        assert!(!conn.closed.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_nothing_is_closed_after_the_stall_timeout() {
        let conn = one(150);
        let start = tokio::time::Instant::now();
        hold(
            &conn.budget,
            Duration::from_secs(5),
            Pressure::Conn(1),
            &*conn,
        )
        .await;
        assert!(conn.closed.load(Ordering::Relaxed));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(7),
            "closed after {waited:?}"
        );
    }
}
