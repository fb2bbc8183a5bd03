//! The message bus: how a message accepted on one reactor reaches the room's members elsewhere.
//!
//! A reactor delivers to its own members directly and hands the message to its [`Publisher`]
//! for everyone else. The in-process bus ([`LocalBus`]) passes pre-framed broadcasts to the
//! other reactors of this process; a broker-backed bus implements the same traits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;

/// A broadcast frame for one room, serialized and framed once. Every recipient on every reactor
/// writes these same bytes.
#[derive(Clone, Debug)]
pub struct Fanout {
    /// The room.
    pub room: Arc<str>,
    /// A complete WebSocket text frame (header and JSON payload).
    pub frame: Arc<[u8]>,
}

/// Broadcasts for one reactor, handed over together to pay for one channel send and at most
/// one wake-up per batch instead of per message.
pub type Batch = Vec<Fanout>;

/// Why a publish was refused. The sender gets the matching error frame and no ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// A queue on the way is (nearly) full: the client gets `OVERLOADED`.
    #[error("a reactor's broadcast queue is full")]
    Overloaded,
}

/// A reactor's handle for publishing; owned by that reactor thread.
pub trait Publisher: Send {
    /// Accepts `fanout` for every member outside the calling reactor, or refuses it whole.
    fn publish(&mut self, fanout: &Fanout) -> Result<(), PublishError>;

    /// Hands over what `publish` buffered. Called before the reactor waits for events.
    /// Returns how many broadcasts were dropped because a queue filled after `publish`
    /// accepted them.
    fn flush(&mut self) -> usize;
}

/// A message bus for one node.
pub trait Bus: Send + Sync {
    /// A publisher for reactor `reactor`.
    fn publisher(&self, reactor: usize) -> Box<dyn Publisher>;

    /// `Ok` while the bus can carry messages; otherwise why not (for `/ready`).
    fn ready(&self) -> Result<(), String>;

    /// A short name for logs and `/ready`.
    fn name(&self) -> &'static str;
}

/// Where other threads put broadcasts for one reactor: a bounded channel and the reactor's
/// waker.
///
/// Policy when full: [`LocalPublisher::publish`] refuses new messages once a target queue is 90%
/// full, so the sender gets `OVERLOADED` and nothing is half-delivered; a batch that still finds
/// the queue full (a race between publishers) is dropped and counted.
pub struct Inbox {
    tx: Sender<Batch>,
    waker: Arc<Waker>,
    /// Set when a wake-up is pending, so a burst of batches costs one `eventfd` write.
    notified: AtomicBool,
    capacity: usize,
}

impl Inbox {
    /// An inbox of `capacity` batches waking `waker`; returns the receiving end too.
    pub fn new(capacity: usize, waker: Arc<Waker>) -> (Inbox, Receiver<Batch>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (
            Inbox {
                tx,
                waker,
                notified: AtomicBool::new(false),
                capacity,
            },
            rx,
        )
    }

    /// Sends a batch; `Err` returns it when the queue is full or the reactor is gone.
    pub fn send(&self, batch: Batch) -> Result<(), Batch> {
        match self.tx.try_send(batch) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => Err(b),
        }
    }

    /// Wakes the reactor unless a wake-up is already pending.
    pub fn wake(&self) {
        if !self.notified.swap(true, Ordering::SeqCst) {
            // A failed wake means the reactor's poll is gone: it is shutting down.
            let _ = self.waker.wake();
        }
    }

    /// Called by the reactor when it wakes, before it drains the channel: a batch sent after
    /// this point wakes it again.
    pub fn clear_notified(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }

    /// Batches waiting.
    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    /// Batches the queue holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn nearly_full(&self) -> bool {
        self.tx.len() * 10 >= self.capacity * 9
    }
}

/// The in-process bus: reactors of one node hand broadcasts to each other.
pub struct LocalBus {
    inboxes: Arc<[Inbox]>,
}

impl LocalBus {
    /// A bus over the reactors' inboxes (index = reactor id).
    pub fn new(inboxes: Arc<[Inbox]>) -> Self {
        LocalBus { inboxes }
    }
}

impl Bus for LocalBus {
    fn publisher(&self, reactor: usize) -> Box<dyn Publisher> {
        Box::new(LocalPublisher {
            me: reactor,
            inboxes: self.inboxes.clone(),
            pending: (0..self.inboxes.len()).map(|_| Vec::new()).collect(),
            dropped: 0,
        })
    }

    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "local"
    }
}

/// Most broadcasts in one batch; a full batch is sent at once rather than at the next flush.
const MAX_BATCH: usize = 256;

struct LocalPublisher {
    me: usize,
    inboxes: Arc<[Inbox]>,
    /// Broadcasts buffered per target reactor until the next flush.
    pending: Vec<Batch>,
    /// Broadcasts dropped since the last flush (a full batch met a full queue).
    dropped: usize,
}

impl LocalPublisher {
    fn send(&mut self, target: usize) -> usize {
        let batch = std::mem::take(&mut self.pending[target]);
        match self.inboxes[target].send(batch) {
            Ok(()) => 0,
            Err(lost) => lost.len(),
        }
    }
}

impl Publisher for LocalPublisher {
    fn publish(&mut self, fanout: &Fanout) -> Result<(), PublishError> {
        let me = self.me;
        if self
            .inboxes
            .iter()
            .enumerate()
            .any(|(i, inbox)| i != me && inbox.nearly_full())
        {
            return Err(PublishError::Overloaded);
        }
        for target in 0..self.inboxes.len() {
            if target == me {
                continue;
            }
            self.pending[target].push(fanout.clone());
            if self.pending[target].len() >= MAX_BATCH {
                self.dropped += self.send(target);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> usize {
        let mut dropped = std::mem::take(&mut self.dropped);
        for target in 0..self.pending.len() {
            if !self.pending[target].is_empty() {
                dropped += self.send(target);
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Poll, Token};

    fn inboxes(n: usize, cap: usize) -> (Vec<Poll>, Arc<[Inbox]>, Vec<Receiver<Batch>>) {
        let mut polls = Vec::new();
        let mut boxes = Vec::new();
        let mut rxs = Vec::new();
        for _ in 0..n {
            let poll = Poll::new().expect("poll");
            let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("waker"));
            let (inbox, rx) = Inbox::new(cap, waker);
            polls.push(poll);
            boxes.push(inbox);
            rxs.push(rx);
        }
        (polls, boxes.into(), rxs)
    }

    fn fanout() -> Fanout {
        Fanout {
            room: "1".into(),
            frame: Arc::from(&b"x"[..]),
        }
    }

    #[test]
    fn reaches_every_other_reactor_once_per_flush() {
        let (_polls, boxes, rxs) = inboxes(3, 10);
        let bus = LocalBus::new(boxes);
        let mut p = bus.publisher(1);
        p.publish(&fanout()).expect("room");
        p.publish(&fanout()).expect("room");
        assert!(rxs[0].is_empty(), "nothing is sent before the flush");
        assert_eq!(p.flush(), 0);
        assert_eq!(rxs[0].try_recv().map(|b| b.len()), Ok(2));
        assert_eq!(rxs[2].try_recv().map(|b| b.len()), Ok(2));
        assert!(
            rxs[1].is_empty(),
            "the publishing reactor delivers locally itself"
        );
    }

    #[test]
    fn a_nearly_full_reactor_makes_publish_refuse() {
        let (_polls, boxes, _rxs) = inboxes(2, 10);
        let bus = LocalBus::new(boxes);
        let mut p = bus.publisher(0);
        for _ in 0..9 {
            p.publish(&fanout()).expect("room");
            p.flush();
        }
        assert_eq!(p.publish(&fanout()), Err(PublishError::Overloaded));
    }
}
