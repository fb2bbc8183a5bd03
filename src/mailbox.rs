//! Replies from blocking threads (store writers, the query pool, the bus) back to a reactor: a bounded
//! channel and the reactor's waker, as for broadcasts.
//!
//! Policy when full: the sending thread waits. Writers, query threads and the bus's threads
//! are the only senders, and what each can have outstanding is bounded (by its own queue, the
//! confirm window, or the connections waiting to join), so the wait is short and memory stays
//! bounded; a reactor never waits on them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

/// Where to report that a message is settled: the sender's reactor, connection and the
/// message's sequence number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The sender's reactor.
    pub reactor: usize,
    /// The connection's slab key there.
    pub token: usize,
    /// The connection's unique id, so a reused slab key is not mistaken for it.
    pub conn: u64,
    /// The message's sequence number on that connection.
    pub seq: u64,
}

/// A connection waiting for an answer: a query's response, or the bus's word that the
/// connection's room is subscribed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    /// The reactor.
    pub reactor: usize,
    /// The connection's slab key.
    pub token: usize,
    /// The connection's unique id, so a reused slab key is not mistaken for it.
    pub conn: u64,
}

/// A message's commit or publisher confirm (or failure) reported to its sender's reactor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The connection's slab key.
    pub token: usize,
    /// The connection's unique id on its reactor.
    pub conn: u64,
    /// The message's sequence number on the connection.
    pub seq: u64,
    /// `Ok` once committed; otherwise why it was not stored.
    pub result: Result<(), String>,
}

/// What a reactor can be told.
#[derive(Debug)]
pub enum Reply {
    /// Messages of this reactor's connections are settled (committed, or confirmed by the
    /// broker) or failed.
    Settled(Vec<Completion>),
    /// The HTTP response to a query a connection is waiting for.
    Http {
        /// The connection's slab key.
        token: usize,
        /// The connection's unique id.
        conn: u64,
        /// The whole response.
        bytes: Vec<u8>,
        /// Its status code, for the metrics.
        status: u16,
    },
    /// The bus now carries other nodes' messages for the room this connection asked to join:
    /// its upgrade can be answered.
    Joined {
        /// The connection's slab key.
        token: usize,
        /// The connection's unique id.
        conn: u64,
    },
}

/// One reactor's mailbox.
pub struct Mailbox {
    tx: Sender<Reply>,
    waker: Arc<Waker>,
    notified: AtomicBool,
}

impl Mailbox {
    /// A mailbox of `capacity` replies waking `waker`; returns the receiving end too.
    pub fn new(capacity: usize, waker: Arc<Waker>) -> (Mailbox, Receiver<Reply>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        (
            Mailbox {
                tx,
                waker,
                notified: AtomicBool::new(false),
            },
            rx,
        )
    }

    /// Delivers `reply`, waiting while the mailbox is full. `Err` when the reactor has stopped.
    pub fn send(&self, reply: Reply) -> Result<(), Reply> {
        self.tx.send(reply).map_err(|e| e.into_inner())?;
        if !self.notified.swap(true, Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
        Ok(())
    }

    /// Called by the reactor before it drains the channel.
    pub fn clear_notified(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }

    /// Replies waiting.
    pub fn depth(&self) -> usize {
        self.tx.len()
    }
}
