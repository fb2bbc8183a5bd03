//! The message bus: how a message accepted on one reactor reaches the room's members elsewhere.
//!
//! A reactor delivers to its own members directly and hands the message to its [`Publisher`]
//! for everyone else. The in-process bus ([`LocalBus`]) passes pre-framed broadcasts to the
//! other reactors of this process; a broker-backed bus implements the same traits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError};

pub use crate::mailbox::{Origin, ReplyTo};
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
    #[error("a queue on the way to the room is full")]
    Overloaded,
    /// The bus cannot carry messages now (a broker is down, its breaker open): the client
    /// gets `UNAVAILABLE`.
    #[error("the message bus is unavailable")]
    Unavailable,
}

/// One accepted message on its way to the rest of the room.
pub struct Outgoing<'a> {
    /// The room and the framed broadcast, for this node's reactors.
    pub fanout: &'a Fanout,
    /// The broadcast's JSON (the frame's payload), for other nodes and the store.
    pub payload: &'a [u8],
    /// Whom to tell when the bus holds the message durably (`ack_after = published`), or,
    /// with `persisted`, when it is committed to the store.
    pub origin: Option<Origin>,
    /// True when `origin` waits for the commit (`ack_after = persisted` on a bus that stores
    /// messages itself); the bus then reports only a failure to publish, and the store's
    /// commit settles the rest.
    pub persisted: bool,
}

/// When a published message is durably in the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Already: the in-process bus.
    Now,
    /// When the origin's reactor gets a [`crate::mailbox::Reply::Settled`] for it (a broker's
    /// publisher confirm).
    Later,
}

/// Whether a joining connection's upgrade can be answered now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joined {
    /// Now: the room's messages already reach this node.
    Now,
    /// When the reactor gets a [`Reply::Joined`](crate::mailbox::Reply::Joined) for it.
    Later,
}

/// A reactor's handle for publishing; owned by that reactor thread.
pub trait Publisher: Send {
    /// Accepts the message for every member outside the calling reactor, or refuses it whole.
    fn publish(&mut self, out: &Outgoing<'_>) -> Result<Accepted, PublishError>;

    /// Hands over what `publish` buffered. Called before the reactor writes the acks of this
    /// turn. Returns how many broadcasts were lost because a target reactor had stopped.
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

    /// True when the bus itself carries every message to the store (a broker's durable
    /// persist queue); then reactors do not hand messages to the store's writers.
    fn stores_messages(&self) -> bool {
        false
    }

    /// Called by a reactor for every connection that asks to join `room`, before its upgrade
    /// is answered. [`Joined::Now`] when the bus already carries the room's messages to this
    /// node; [`Joined::Later`] when it must subscribe first, and then tells the connection's
    /// reactor with a [`Reply::Joined`](crate::mailbox::Reply::Joined) (or never, if it cannot:
    /// the reactor gives up after the handshake timeout). Either way the connection counts as
    /// a member for the bus until [`Bus::leave`].
    fn join(&self, _room: &Arc<str>, _joiner: ReplyTo) -> Joined {
        Joined::Now
    }

    /// Called once for every [`Bus::join`] when that connection leaves the room, so a
    /// broker-backed bus unsubscribes the node from rooms it no longer serves.
    fn leave(&self, _room: &Arc<str>) {}

    /// Instead of [`Bus::leave`] for a connection that gives up while its join was
    /// [`Joined::Later`]: it is no longer waited for either.
    fn leave_joining(&self, room: &Arc<str>, _joiner: ReplyTo) {
        self.leave(room);
    }

    /// Appends the bus's own metrics to a `/metrics` text.
    fn render_metrics(&self, _out: &mut String) {}

    /// Called once the reactors have stopped: hand over what is buffered, settle what is in
    /// flight, and stop, within `deadline`.
    fn shutdown(&self, _deadline: std::time::Duration) {}
}

/// Slots promised ahead of a send into a bounded channel, so that whoever reserved one can
/// always send later: the invariant is queued + reserved <= capacity.
pub struct Reservations {
    reserved: AtomicUsize,
    capacity: usize,
}

impl Reservations {
    /// Room for `capacity` items, none reserved.
    pub fn new(capacity: usize) -> Reservations {
        Reservations {
            reserved: AtomicUsize::new(0),
            capacity,
        }
    }

    /// Reserves one slot unless `queued` (the channel's length now) plus the slots already
    /// reserved reach the capacity.
    pub fn reserve(&self, queued: usize) -> bool {
        let mut reserved = self.reserved.load(Ordering::Acquire);
        loop {
            if queued + reserved >= self.capacity {
                return false;
            }
            match self.reserved.compare_exchange_weak(
                reserved,
                reserved + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => reserved = now,
            }
        }
    }

    /// Gives back one slot (unused, or used now that its item is in the channel).
    pub fn release(&self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Where other threads put broadcasts for one reactor: a bounded channel and the reactor's
/// waker.
///
/// Policy when full: a publisher reserves a slot for every batch it starts *before* it accepts
/// the message, and [`LocalPublisher::publish`] refuses the message whole (the sender gets
/// `OVERLOADED`, no member anywhere gets it) when any target has no slot left. A reserved slot
/// cannot be taken by anyone else, so a batch that was reserved is never dropped and an ack
/// never claims a delivery that could still fail.
pub struct Inbox {
    tx: Sender<Batch>,
    waker: Arc<Waker>,
    /// Set when a wake-up is pending, so a burst of batches costs one `eventfd` write.
    notified: AtomicBool,
    /// Slots promised to batches being filled.
    slots: Reservations,
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
                slots: Reservations::new(capacity),
            },
            rx,
        )
    }

    /// Promises one slot to a batch that will be sent later; false when the queue is full.
    pub fn reserve(&self) -> bool {
        self.slots.reserve(self.tx.len())
    }

    /// Gives back a slot that will not be used.
    pub fn unreserve(&self) {
        self.slots.release();
    }

    /// Sends a batch into a slot reserved with [`Inbox::reserve`]. `Err` returns it only when
    /// the reactor is gone (it is shutting down).
    pub fn send_reserved(&self, batch: Batch) -> Result<(), Batch> {
        // The slot is counted as reserved until the batch is in the channel, so the sum never
        // drops below the truth while the hand-over happens.
        let result = match self.tx.try_send(batch) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => Err(b),
        };
        self.unreserve();
        result
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
        self.slots.capacity()
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

impl LocalPublisher {
    /// A publisher for reactor `me` over the node's inboxes.
    pub fn new(me: usize, inboxes: Arc<[Inbox]>) -> LocalPublisher {
        LocalPublisher {
            me,
            pending: (0..inboxes.len()).map(|_| Vec::new()).collect(),
            inboxes,
            dropped: 0,
        }
    }
}

impl Bus for LocalBus {
    fn publisher(&self, reactor: usize) -> Box<dyn Publisher> {
        Box::new(LocalPublisher::new(reactor, self.inboxes.clone()))
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

/// The in-process publisher; broker-backed publishers use it for this node's reactors.
pub struct LocalPublisher {
    me: usize,
    inboxes: Arc<[Inbox]>,
    /// Broadcasts buffered per target reactor until the next flush.
    pending: Vec<Batch>,
    /// Broadcasts lost since the last flush (a target reactor had stopped).
    dropped: usize,
}

impl LocalPublisher {
    /// Sends the batch for `target`, whose slot was reserved when the batch was started.
    fn send(&mut self, target: usize) {
        let batch = std::mem::take(&mut self.pending[target]);
        if let Err(lost) = self.inboxes[target].send_reserved(batch) {
            self.dropped += lost.len();
        }
    }
}

impl Publisher for LocalPublisher {
    fn publish(&mut self, out: &Outgoing<'_>) -> Result<Accepted, PublishError> {
        self.publish_fanout(out.fanout)?;
        Ok(Accepted::Now)
    }

    fn flush(&mut self) -> usize {
        self.flush_batches()
    }
}

impl LocalPublisher {
    /// Queues `fanout` for every other reactor, or refuses it whole.
    pub fn publish_fanout(&mut self, fanout: &Fanout) -> Result<(), PublishError> {
        let me = self.me;
        // Reserve a slot for every batch this message starts; all or none.
        for target in 0..self.inboxes.len() {
            if target == me || !self.pending[target].is_empty() {
                continue;
            }
            if !self.inboxes[target].reserve() {
                for undo in 0..target {
                    if undo != me && self.pending[undo].is_empty() {
                        self.inboxes[undo].unreserve();
                    }
                }
                return Err(PublishError::Overloaded);
            }
        }
        for target in 0..self.inboxes.len() {
            if target == me {
                continue;
            }
            self.pending[target].push(fanout.clone());
            if self.pending[target].len() >= MAX_BATCH {
                self.send(target);
            }
        }
        Ok(())
    }

    /// Hands over the batches; returns how many broadcasts were lost to stopped reactors.
    pub fn flush_batches(&mut self) -> usize {
        for target in 0..self.pending.len() {
            if !self.pending[target].is_empty() {
                self.send(target);
            }
        }
        std::mem::take(&mut self.dropped)
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

    fn out(f: &Fanout) -> Outgoing<'_> {
        Outgoing {
            fanout: f,
            payload: b"{}",
            origin: None,
            persisted: false,
        }
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
        p.publish(&out(&fanout())).expect("room");
        p.publish(&out(&fanout())).expect("room");
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
    fn a_full_reactor_makes_publish_refuse_whole_and_never_drop() {
        let (_polls, boxes, rxs) = inboxes(3, 4);
        let mut a = LocalPublisher::new(0, boxes.clone());
        let mut b = LocalPublisher::new(1, boxes);
        // Reactor 2 never drains: 4 slots in all.
        for _ in 0..2 {
            a.publish_fanout(&fanout()).expect("room");
            a.flush_batches();
            b.publish_fanout(&fanout()).expect("room");
            b.flush_batches();
        }
        // Each publisher may reach reactor 2 no more; nothing was dropped on the way.
        assert_eq!(a.publish_fanout(&fanout()), Err(PublishError::Overloaded));
        assert_eq!(b.publish_fanout(&fanout()), Err(PublishError::Overloaded));
        assert_eq!(rxs[2].len(), 4);
        // The refusal was whole: reactor 1 got nothing from the refused message.
        assert_eq!(a.flush_batches(), 0);
        assert_eq!(rxs[1].len(), 2);
        // A slot reserved while filling a batch holds until that batch is sent.
        let _ = rxs[2].try_recv();
        a.publish_fanout(&fanout()).expect("one slot free");
        assert_eq!(
            b.publish_fanout(&fanout()),
            Err(PublishError::Overloaded),
            "a's slot is taken"
        );
        assert_eq!(a.flush_batches(), 0);
        assert_eq!(rxs[2].len(), 4);
    }
}
