//! Fair scheduling of what goes up one server stream.
//!
//! Every tunnelled connection has its own lane; the stream takes one packet from each lane with
//! something queued, in turn, so a bulk download and an interactive exec share the stream by
//! packet rather than by who queued first. Control packets that belong to no connection (errors
//! for unknown IDs, DRAIN, dial results) jump the queue. A connection's DIAL_RSP and CLOSE_RSP
//! travel in its own lane when order matters: CLOSE_RSP must follow the connection's last DATA.
//!
//! Each lane's bytes are bounded by the permits its reader holds (see `conn`), so a reader that
//! outpaces the stream waits, which in turn pushes back on its endpoint through TCP. Control
//! packets are answers to what the server sends; past [`CONTROL_BACKLOG`] of them unsent, the
//! stream's reader waits for [`Scheduler::control_drained`] before it reads more, so a server
//! that sends without reading cannot grow the queue without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tether_proto::Packet;
use tether_runtime::sparse::ShrinkWhenSparse;
use tokio::sync::{Notify, OwnedSemaphorePermit};

struct Item {
    packet: Packet,
    _credit: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct Lanes {
    control: VecDeque<Packet>,
    lanes: HashMap<i64, VecDeque<Item>>,
    /// Connections with something queued, in service order.
    ready: VecDeque<i64>,
    closed: bool,
    /// End the stream once everything queued is sent.
    finishing: bool,
}

impl Lanes {
    /// Drops an emptied lane; after a burst of closes the tables give their peak size back.
    fn remove(&mut self, id: i64) {
        self.lanes.remove(&id);
        self.lanes.shrink_when_sparse();
        self.ready.shrink_when_sparse();
    }
}

/// Unsent control packets at which the stream's reader stops reading from the server.
pub const CONTROL_BACKLOG: usize = 1024;

#[derive(Default)]
pub struct Scheduler {
    lanes: Mutex<Lanes>,
    wake: Notify,
    /// Woken when the control backlog falls to half of [`CONTROL_BACKLOG`], or on close.
    drained: Notify,
}

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a packet ahead of all connection traffic.
    pub fn push_control(&self, packet: Packet) {
        {
            let mut lanes = self.lock();
            if lanes.closed {
                return;
            }
            lanes.control.push_back(packet);
        }
        self.wake.notify_one();
    }

    /// Queues a packet in connection `id`'s lane; `credit` is released once the packet has been
    /// handed to the stream.
    pub fn push(&self, id: i64, packet: Packet, credit: Option<OwnedSemaphorePermit>) {
        {
            let mut lanes = self.lock();
            if lanes.closed {
                return;
            }
            let lane = lanes.lanes.entry(id).or_default();
            let was_idle = lane.is_empty();
            lane.push_back(Item {
                packet,
                _credit: credit,
            });
            if was_idle {
                lanes.ready.push_back(id);
            }
        }
        self.wake.notify_one();
    }

    /// The next packet to send, waiting for one; `None` once closed.
    pub async fn next(&self) -> Option<Packet> {
        loop {
            {
                let mut lanes = self.lock();
                if lanes.closed {
                    return None;
                }
                if let Some(packet) = lanes.control.pop_front() {
                    lanes.control.shrink_when_sparse();
                    if lanes.control.len() == CONTROL_BACKLOG / 2 {
                        self.drained.notify_waiters();
                    }
                    return Some(packet);
                }
                while let Some(id) = lanes.ready.pop_front() {
                    let Some(lane) = lanes.lanes.get_mut(&id) else {
                        continue;
                    };
                    let Some(item) = lane.pop_front() else {
                        lanes.remove(id);
                        continue;
                    };
                    if lane.is_empty() {
                        lanes.remove(id);
                    } else {
                        lanes.ready.push_back(id);
                    }
                    return Some(item.packet);
                }
                if lanes.finishing {
                    return None;
                }
            }
            self.wake.notified().await;
        }
    }

    /// Control packets queued and not yet handed to the stream.
    pub fn control_backlog(&self) -> usize {
        self.lock().control.len()
    }

    /// Waits until the control backlog is at most half of [`CONTROL_BACKLOG`], or the stream is
    /// closed.
    pub async fn control_drained(&self) {
        loop {
            let drained = self.drained.notified();
            {
                let lanes = self.lock();
                if lanes.closed || lanes.control.len() <= CONTROL_BACKLOG / 2 {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Ends the stream after what is queued: `next` returns `None` once the queue is empty.
    pub fn finish(&self) {
        self.lock().finishing = true;
        self.wake.notify_one();
    }

    /// Ends the stream: `next` returns `None` and queued packets are dropped.
    pub fn close(&self) {
        let mut lanes = self.lock();
        lanes.closed = true;
        lanes.control.clear();
        lanes.lanes.clear();
        lanes.ready.clear();
        drop(lanes);
        self.wake.notify_one();
        self.drained.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tether_proto::Message;

    use super::*;

    fn id_of(packet: Packet) -> i64 {
        match packet.into_message() {
            Message::Data(d) => d.connect_id,
            Message::CloseResponse(c) => c.connect_id,
            _ => -1,
        }
    }

    #[tokio::test]
    async fn serves_lanes_in_turn_and_control_first() {
        let scheduler = Scheduler::new();
        for _ in 0..5 {
            scheduler.push(1, Packet::data(1, Bytes::from_static(b"bulk")), None);
        }
        scheduler.push(2, Packet::data(2, Bytes::from_static(b"ping")), None);
        scheduler.push_control(Packet::drain());
        let mut order = Vec::new();
        for _ in 0..7 {
            order.push(id_of(scheduler.next().await.unwrap()));
        }
        // DRAIN first, then the interactive packet right after the bulk lane's first.
        assert_eq!(order, vec![-1, 1, 2, 1, 1, 1, 1]);
    }

    #[tokio::test]
    async fn keeps_order_within_a_lane() {
        let scheduler = Scheduler::new();
        scheduler.push(3, Packet::data(3, Bytes::from_static(b"a")), None);
        scheduler.push(3, Packet::close_response(3, ""), None);
        assert!(matches!(
            scheduler.next().await.unwrap().into_message(),
            Message::Data(_)
        ));
        assert!(matches!(
            scheduler.next().await.unwrap().into_message(),
            Message::CloseResponse(_)
        ));
    }

    #[tokio::test]
    async fn releases_credit_when_a_packet_leaves() {
        let credits = std::sync::Arc::new(tokio::sync::Semaphore::new(10));
        let scheduler = Scheduler::new();
        let permit = credits.clone().acquire_many_owned(10).await.unwrap();
        scheduler.push(1, Packet::data(1, Bytes::from_static(b"x")), Some(permit));
        assert_eq!(credits.available_permits(), 0);
        scheduler.next().await.unwrap();
        assert_eq!(credits.available_permits(), 10);
    }

    #[tokio::test]
    async fn finish_ends_the_stream_after_what_is_queued() {
        let scheduler = Scheduler::new();
        scheduler.push(1, Packet::close_response(1, ""), None);
        scheduler.finish();
        assert!(matches!(
            scheduler.next().await.unwrap().into_message(),
            Message::CloseResponse(_)
        ));
        assert!(scheduler.next().await.is_none());
    }

    #[tokio::test]
    async fn close_ends_the_stream() {
        let scheduler = Scheduler::new();
        scheduler.push(1, Packet::data(1, Bytes::from_static(b"x")), None);
        scheduler.close();
        assert!(scheduler.next().await.is_none());
    }

    #[tokio::test]
    async fn a_control_backlog_is_reported_and_drains_at_half() {
        let scheduler = std::sync::Arc::new(Scheduler::new());
        for id in 0..CONTROL_BACKLOG as i64 {
            scheduler.push_control(Packet::close_response(id, "Unknown connectID"));
        }
        assert_eq!(scheduler.control_backlog(), CONTROL_BACKLOG);
        let waiter = tokio::spawn({
            let scheduler = scheduler.clone();
            async move { scheduler.control_drained().await }
        });
        for _ in 0..CONTROL_BACKLOG / 2 - 1 {
            scheduler.next().await.unwrap();
        }
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "woke before the backlog halved");
        scheduler.next().await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("not woken at half")
            .unwrap();
    }
}
