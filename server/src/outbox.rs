//! The send side of one agent stream.
//!
//! DATA and DIAL_REQ wait for room, which pushes back on the one frontend that sends faster
//! than the agent takes. Control packets (CLOSE_REQ, DIAL_CLS, WINDOW) come from code that must
//! not wait, such as the agent stream's own receive loop, so they never do: they go ahead of
//! DATA, in a queue with a limit. An agent that stops reading while it makes the server answer
//! it (DATA for connections it does not have, say) fills that queue, and is cut off rather than
//! allowed to grow it, or the tasks behind it, without end.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tether_proto::Packet;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

/// Control packets queued toward one agent before it counts as not reading.
pub const CONTROL_LIMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("the agent stream is closed")]
pub struct AgentGone;

/// Where packets for one agent go. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    data: mpsc::Sender<Packet>,
}

struct Shared {
    control: Mutex<VecDeque<Packet>>,
    /// The stream's consumer, woken when a control packet arrives.
    waker: AtomicWaker,
    /// Cancelled when the stream is over: the agent left, or was cut off.
    over: CancellationToken,
    /// Set when the server stops: the stream ends once what is queued has gone out.
    finishing: AtomicBool,
    control_limit: usize,
}

/// The packets in the order they go on the wire; ends once the outbox is closed.
pub struct OutboxStream {
    shared: Arc<Shared>,
    data: mpsc::Receiver<Packet>,
}

impl Outbox {
    /// `data_packets` DATA packets may wait in line; `control_limit` control packets.
    pub fn new(data_packets: usize, control_limit: usize) -> (Outbox, OutboxStream) {
        let (tx, rx) = mpsc::channel(data_packets.max(1));
        let shared = Arc::new(Shared {
            control: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            over: CancellationToken::new(),
            finishing: AtomicBool::new(false),
            control_limit,
        });
        (
            Outbox {
                shared: shared.clone(),
                data: tx,
            },
            OutboxStream { shared, data: rx },
        )
    }

    /// Queues DATA or a DIAL_REQ, waiting for room.
    pub async fn send(&self, packet: Packet) -> Result<(), AgentGone> {
        if self.shared.over.is_cancelled() {
            return Err(AgentGone);
        }
        // Room first, then the packet: a pending `send` would hold the packet inside the
        // channel's future, and this future lives in every frontend connection's task.
        let permit = tokio::select! {
            permit = self.data.reserve() => permit.map_err(|_| AgentGone)?,
            () = self.shared.over.cancelled() => return Err(AgentGone),
        };
        permit.send(packet);
        Ok(())
    }

    /// Queues a control packet ahead of DATA without waiting. Past the limit the agent is
    /// not reading what it asked for: the stream is ended (`Err`), and the caller counts it.
    pub fn send_control(&self, packet: Packet) -> Result<(), Overflow> {
        if self.shared.over.is_cancelled() {
            return Err(Overflow::Gone);
        }
        {
            let mut control = self.shared.lock();
            if control.len() >= self.shared.control_limit {
                drop(control);
                self.close();
                return Err(Overflow::CutOff);
            }
            control.push_back(packet);
        }
        self.shared.waker.wake();
        Ok(())
    }

    /// Ends the stream: the consumer sees its end after what is queued, senders get `Err`.
    pub fn close(&self) {
        self.shared.over.cancel();
        self.shared.waker.wake();
    }

    /// Ends the stream once what is queued now has gone out (the server is stopping, and the
    /// CLOSE_REQs of its last connections should reach the agent); `closed` then resolves.
    pub fn finish(&self) {
        self.shared.finishing.store(true, Ordering::Release);
        self.shared.waker.wake();
    }

    /// Resolves once the stream is over.
    pub async fn closed(&self) {
        self.shared.over.cancelled().await;
    }

    /// Control packets waiting right now.
    pub fn control_queued(&self) -> usize {
        self.shared.lock().len()
    }
}

/// Why a control packet was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The stream had already ended.
    Gone,
    /// This packet found the queue full: the agent was cut off just now.
    CutOff,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Packet>> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Stream for OutboxStream {
    type Item = Packet;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Packet>> {
        self.shared.waker.register(cx.waker());
        if self.shared.over.is_cancelled() {
            // The agent is gone or cut off: nothing more is worth sending.
            return Poll::Ready(None);
        }
        if let Some(packet) = self.shared.lock().pop_front() {
            return Poll::Ready(Some(packet));
        }
        match self.data.poll_recv(cx) {
            Poll::Ready(Some(packet)) => Poll::Ready(Some(packet)),
            // Every sender is gone: so is every user of this stream.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if self.shared.finishing.load(Ordering::Acquire) => {
                self.shared.over.cancel();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn control_goes_first_and_an_agent_that_does_not_read_is_cut_off() {
        let (outbox, mut stream) = Outbox::new(4, 3);
        outbox
            .send(Packet::data(1, bytes::Bytes::new()))
            .await
            .unwrap();
        outbox.send_control(Packet::close_request(7)).unwrap();
        assert_eq!(
            stream.next().await.map(|p| p.type_name()),
            Some("CLOSE_REQ")
        );
        assert_eq!(stream.next().await.map(|p| p.type_name()), Some("DATA"));
        for id in 0..3 {
            outbox.send_control(Packet::close_request(id)).unwrap();
        }
        assert_eq!(
            outbox.send_control(Packet::close_request(9)),
            Err(Overflow::CutOff)
        );
        assert_eq!(stream.next().await, None, "the stream ends when cut off");
        assert!(
            outbox
                .send(Packet::data(1, bytes::Bytes::new()))
                .await
                .is_err()
        );
    }
}
