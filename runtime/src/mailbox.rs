//! A bounded, never-blocking queue toward one tunnelled connection.
//!
//! The shared stream's receive loop hands each packet to the connection it belongs to; if that
//! hand-off could block, one stalled peer would stall every connection on the stream
//! (upstream's head-of-line bug). A mailbox instead refuses a push that would exceed its byte
//! limit, so the caller can close that one connection and move on. An idle mailbox holds no
//! heap buffer, and the buffer a burst grew is released once the burst has drained.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::backpressure::{Budget, Pressure};

/// How many bytes an item counts for against the mailbox's limit.
pub trait Weigh {
    fn weight(&self) -> usize;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("queue limit of {limit} bytes reached")]
    Full { limit: usize },
    #[error("connection already closed")]
    Closed,
}

pub struct Mailbox<T> {
    state: Mutex<State<T>>,
    ready: Notify,
    limit: usize,
    /// The tunnel stream's total, charged with everything queued here.
    budget: Option<Arc<Budget>>,
}

struct State<T> {
    items: VecDeque<T>,
    bytes: usize,
    closed: bool,
}

/// Capacity above which an emptied queue gives its buffer back.
const KEEP_CAPACITY: usize = 4;

impl<T: Weigh> Mailbox<T> {
    pub fn new(limit: usize) -> Self {
        Self::build(limit, None)
    }

    /// A mailbox whose queued bytes also count against `budget`.
    pub fn with_budget(limit: usize, budget: Arc<Budget>) -> Self {
        Self::build(limit, Some(budget))
    }

    fn build(limit: usize, budget: Option<Arc<Budget>>) -> Self {
        Mailbox {
            state: Mutex::new(State {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
            }),
            ready: Notify::new(),
            limit,
            budget,
        }
    }

    /// Queues `item` unless that would exceed the byte limit. A single item larger than the
    /// limit is accepted into an empty mailbox, so oversized packets still make progress.
    pub fn push(&self, item: T) -> Result<(), PushError> {
        self.push_inner(item, false)
    }

    /// Queues `item` regardless of the limit: for the few control messages per connection
    /// (dial result, close) that must never be lost, and for data from a peer without flow
    /// control, whose stream then waits out [`Mailbox::pressure`].
    pub fn push_control(&self, item: T) -> Result<(), PushError> {
        self.push_inner(item, true)
    }

    /// Why the stream feeding connection `id` must wait after a push, if it must: this queue
    /// is past its limit, or the stream's queues together are past their budget.
    pub fn pressure(&self, id: i64) -> Option<Pressure> {
        if self.queued_bytes() > self.limit {
            Some(Pressure::Conn(id))
        } else if self.budget.as_ref().is_some_and(|b| b.exhausted()) {
            Some(Pressure::Budget)
        } else {
            None
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn push_inner(&self, item: T, control: bool) -> Result<(), PushError> {
        let weight = item.weight();
        {
            let mut state = self.lock();
            if state.closed {
                return Err(PushError::Closed);
            }
            if !control && !state.items.is_empty() && state.bytes + weight > self.limit {
                return Err(PushError::Full { limit: self.limit });
            }
            state.bytes += weight;
            state.items.push_back(item);
        }
        if let Some(budget) = &self.budget {
            budget.charge(weight);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Takes the next item, waiting for one; `None` once closed and drained. One consumer only.
    pub async fn pop(&self) -> Option<T> {
        loop {
            {
                let mut state = self.lock();
                if let Some(item) = state.items.pop_front() {
                    let weight = item.weight();
                    state.bytes -= weight;
                    if state.items.is_empty() && state.items.capacity() > KEEP_CAPACITY {
                        state.items = VecDeque::new();
                    }
                    drop(state);
                    if let Some(budget) = &self.budget {
                        budget.release(weight);
                    }
                    return Some(item);
                }
                if state.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Drops everything queued (a connection given up on: its bytes leave the budget now, not
    /// when its stalled consumer lets go).
    pub fn discard(&self) {
        let dropped = {
            let mut state = self.lock();
            state.bytes = 0;
            std::mem::take(&mut state.items)
        };
        if let Some(budget) = &self.budget {
            budget.release(dropped.iter().map(Weigh::weight).sum());
        }
    }

    /// Refuses further pushes; what is queued can still be popped.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Resolves once the mailbox is closed. It shares the consumer's wakeups, so only the one
    /// consumer may wait here, and only while it is not in `pop`.
    pub async fn closed(&self) {
        while !self.is_closed() {
            self.ready.notified().await;
        }
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Bytes queued right now.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is
        // a single push or pop), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<T> Drop for Mailbox<T> {
    /// What was never taken leaves the stream's total with the connection.
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
            budget.release(state.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weigh for Vec<u8> {
        fn weight(&self) -> usize {
            self.len()
        }
    }

    #[tokio::test]
    async fn refuses_pushes_beyond_the_byte_limit_without_blocking() {
        let mailbox = Mailbox::new(10);
        mailbox.push(vec![0; 6]).unwrap();
        assert_eq!(mailbox.push(vec![0; 6]), Err(PushError::Full { limit: 10 }));
        mailbox.push(vec![0; 4]).unwrap();
        assert_eq!(mailbox.queued_bytes(), 10);
        // Control messages always get through.
        mailbox.push_control(vec![0; 100]).unwrap();
        assert_eq!(mailbox.pop().await.map(|v| v.len()), Some(6));
        assert_eq!(mailbox.queued_bytes(), 104);
    }

    #[tokio::test]
    async fn accepts_one_oversized_item_when_empty() {
        let mailbox = Mailbox::new(10);
        mailbox.push(vec![0; 50]).unwrap();
        assert!(mailbox.push(vec![0; 1]).is_err());
    }

    #[tokio::test]
    async fn drains_after_close_then_ends() {
        let mailbox = Mailbox::new(100);
        mailbox.push(vec![1]).unwrap();
        mailbox.close();
        assert_eq!(mailbox.push(vec![2]), Err(PushError::Closed));
        assert_eq!(mailbox.pop().await, Some(vec![1]));
        assert_eq!(mailbox.pop().await, None);
    }

    #[tokio::test]
    async fn wakes_a_waiting_consumer() {
        let mailbox = std::sync::Arc::new(Mailbox::new(100));
        let consumer = tokio::spawn({
            let mailbox = mailbox.clone();
            async move { mailbox.pop().await }
        });
        tokio::task::yield_now().await;
        mailbox.push(vec![7]).unwrap();
        assert_eq!(consumer.await.unwrap(), Some(vec![7]));
    }

    #[tokio::test]
    async fn charges_the_budget_until_taken_or_dropped() {
        let budget = Arc::new(Budget::new(10));
        let a = Mailbox::with_budget(100, budget.clone());
        let b = Mailbox::with_budget(100, budget.clone());
        a.push(vec![0; 6]).unwrap();
        b.push_control(vec![0; 8]).unwrap();
        assert!(budget.exhausted());
        a.pop().await.unwrap();
        assert_eq!(budget.used(), 8);
        a.push(vec![0; 5]).unwrap();
        a.discard();
        assert_eq!((a.queued_bytes(), budget.used()), (0, 8));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn gives_back_the_buffer_of_a_drained_burst() {
        let mailbox = Mailbox::new(1 << 20);
        for _ in 0..100 {
            mailbox.push(vec![0; 10]).unwrap();
        }
        for _ in 0..100 {
            mailbox.pop().await.unwrap();
        }
        assert_eq!(mailbox.lock().items.capacity(), 0);
    }
}
