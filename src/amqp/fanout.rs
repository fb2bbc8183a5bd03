//! The fan-out consumer: brings other nodes' messages to this node's members, and keeps this
//! node's queue bound to exactly the rooms it has members in.
//!
//! One thread owns the connection, its channel and the consumer (a consumer borrows its
//! channel). It waits for deliveries and for nudges from [`Bus::join`](crate::bus::Bus::join)
//! and [`Bus::leave`](crate::bus::Bus::leave); bindings change between batches of deliveries,
//! on the same channel.
//!
//! A delivery is acknowledged only after its messages are in every reactor's inbox. When an
//! inbox is full the thread waits and retries: it never drops what it took, the broker keeps
//! the rest (at most `prefetch` deliveries are unacknowledged), and past the queue's length
//! limit the broker drops the oldest.
//!
//! A connection that joins a room this node does not serve yet waits for its `101` until the
//! binding is made (a broker round trip, about a millisecond here): the consumer tells its
//! reactor (`Reply::Joined`) right after `queue.bind` returns. From then on every message
//! published to the room reaches this node's queue, so the member hears everything sent after
//! its upgrade. A room is taken out of `subscribed` *before* it is unbound, so a joiner that
//! arrives during an unbind waits for the rebind instead of trusting a binding on its way out.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amiquip::{
    Channel, Connection, ConsumerMessage, ConsumerOptions, Delivery, FieldTable, QueueDeleteOptions,
};
use crossbeam_channel::{Receiver, Select, TryRecvError};

use super::envelope::{self, EnvelopeError};
use super::link::{self, Backoff};
use super::{Role, Shared, Topology};
use crate::bus::{Batch, Fanout, Inbox};
use crate::mailbox::{Completion, Reply, ReplyTo};
use crate::reactor::shared_text_frame;

/// Most chat messages handed to the reactors in one batch.
const MAX_BATCH_MESSAGES: usize = 1024;
/// Longest wait in one turn, so shutdown is noticed.
const TICK: Duration = Duration::from_millis(100);

pub(super) struct FanoutThread {
    shared: Arc<Shared>,
    inboxes: Arc<[Inbox]>,
    nudged: Receiver<()>,
    /// Rooms the node queue may be bound to: added after a successful bind, removed after a
    /// successful unbind. Kept across reconnects (the queue outlives a connection), so a
    /// reconnect unbinds what was left while the connection was down.
    bound: HashSet<Arc<str>>,
    backoff: Backoff,
    connected_once: bool,
}

/// How a session ended.
enum End {
    /// Shutdown: the consumer was cancelled.
    Stopped,
    /// The connection or channel failed (why).
    Lost(String),
}

impl FanoutThread {
    pub(super) fn new(
        shared: Arc<Shared>,
        inboxes: Arc<[Inbox]>,
        nudged: Receiver<()>,
    ) -> FanoutThread {
        FanoutThread {
            shared,
            inboxes,
            nudged,
            bound: HashSet::new(),
            backoff: Backoff::new(),
            connected_once: false,
        }
    }

    pub(super) fn run(mut self) {
        let shared = self.shared.clone();
        while !shared.control.stopping() {
            let opened = shared.open_channel(Role::Fanout);
            let (conn, channel) = match opened {
                Ok(c) => c,
                Err(why) => {
                    log::debug!("amqp fan-out: connect failed: {why}");
                    shared.set_health(Role::Fanout, Some(why));
                    self.backoff.wait(&shared.control, |c| c.stopping());
                    continue;
                }
            };
            match self.session(&channel) {
                End::Stopped => {
                    self.close(conn, channel);
                    break;
                }
                End::Lost(why) => {
                    log::warn!("amqp fan-out: connection lost ({why}); reconnecting");
                    shared.set_health(Role::Fanout, Some(why));
                    // The bindings may be gone with the queue (a broker restart, the
                    // queue's expiry): joiners wait for the full reconcile after the
                    // reconnect instead of trusting them.
                    shared.rooms.lock().subscribed.clear();
                    drop(channel);
                    drop(conn);
                    // Also after a session that failed at once (e.g. a refused declare), so
                    // a broker that keeps refusing is not hammered.
                    self.backoff.wait(&shared.control, |c| c.stopping());
                }
            }
        }
        log::debug!("amqp fan-out consumer stopped");
    }

    /// At shutdown: the node queue is deleted now rather than after `node_queue_ttl`, so the
    /// broker stops routing copies to a node that is gone. A restart declares it again.
    fn close(&self, conn: Connection, channel: Channel) {
        let t = &self.shared.topology;
        let deleted = channel.queue_delete(
            t.node_queue.as_str(),
            QueueDeleteOptions {
                if_unused: true,
                if_empty: false,
            },
        );
        if let Err(e) = deleted {
            log::debug!("amqp fan-out: could not delete {}: {e}", t.node_queue);
        }
        drop(channel);
        if let Err(e) = conn.close() {
            log::debug!("amqp fan-out: close: {e}");
        }
    }

    fn session(&mut self, channel: &Channel) -> End {
        let shared = self.shared.clone();
        let s = &shared.settings;
        let t = &shared.topology;
        let lost = |e: amiquip::Error| End::Lost(self.shared.describe(&e));
        if let Err(e) = link::declare_node_queue(channel, t, s) {
            return lost(e);
        }
        if let Err(e) = channel.qos(0, s.prefetch, false) {
            return lost(e);
        }
        if let Err(e) = self.reconcile(channel, true) {
            return End::Lost(self.shared.describe(&e));
        }
        let consumer =
            match channel.basic_consume(t.node_queue.as_str(), ConsumerOptions::default()) {
                Ok(c) => c,
                Err(e) => return End::Lost(self.shared.describe(&e)),
            };
        shared.set_health(Role::Fanout, None);
        self.backoff.reset();
        if self.connected_once {
            shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            log::warn!("amqp fan-out: reconnected");
        }
        self.connected_once = true;

        loop {
            if shared.control.stopping() {
                // Unacknowledged deliveries go back to the queue when the channel closes.
                link::cancel(&consumer);
                return End::Stopped;
            }
            {
                let mut select = Select::new();
                select.recv(consumer.receiver());
                select.recv(&self.nudged);
                let _ = select.ready_timeout(TICK);
            }
            if self.nudged.try_recv().is_ok()
                && let Err(e) = self.reconcile(channel, false)
            {
                return End::Lost(self.shared.describe(&e));
            }
            if let Err(end) = self.take_deliveries(consumer.receiver(), |d, ack| {
                if ack {
                    consumer.ack_multiple(d)
                } else {
                    consumer.nack(d, false)
                }
            }) {
                return end;
            }
        }
    }

    /// Binds the rooms that gained members and unbinds those that lost them (`full`: every
    /// room, after a (re)connect).
    fn reconcile(&mut self, channel: &Channel, full: bool) -> amiquip::Result<()> {
        let changes: Vec<(Arc<str>, bool)> = {
            let mut rooms = self.shared.rooms.lock();
            let changes: Vec<(Arc<str>, bool)> = if full {
                rooms.dirty.clear();
                let mut all: Vec<(Arc<str>, bool)> =
                    rooms.counts.keys().map(|r| (r.clone(), true)).collect();
                all.extend(
                    self.bound
                        .iter()
                        .filter(|r| !rooms.counts.contains_key(*r))
                        .map(|r| (r.clone(), false)),
                );
                all
            } else {
                let dirty = std::mem::take(&mut rooms.dirty);
                dirty
                    .into_iter()
                    .map(|r| {
                        let want = rooms.counts.contains_key(&r);
                        (r, want)
                    })
                    .collect()
            };
            // Before the unbind, not after: a joiner from now on waits for the rebind.
            for (room, want) in &changes {
                if !want {
                    rooms.subscribed.remove(room);
                }
            }
            changes
        };
        let t = &self.shared.topology;
        let result = (|| {
            for (room, want) in changes {
                let key = Topology::routing_key(&room);
                if want && (full || !self.bound.contains(&room)) {
                    channel.queue_bind(
                        t.node_queue.as_str(),
                        t.exchange.as_str(),
                        key,
                        FieldTable::new(),
                    )?;
                    self.bound.insert(room.clone());
                    let joiners = self.shared.rooms.lock().bound(&room);
                    tell_joined(&self.shared, joiners);
                } else if want {
                    // Bound already (a join and a leave in between): answer anyone waiting.
                    let joiners = self.shared.rooms.lock().bound(&room);
                    tell_joined(&self.shared, joiners);
                } else if self.bound.contains(&room) {
                    channel.queue_unbind(
                        t.node_queue.as_str(),
                        t.exchange.as_str(),
                        key,
                        FieldTable::new(),
                    )?;
                    self.bound.remove(&room);
                }
            }
            Ok(())
        })();
        self.shared
            .stats
            .bound_rooms
            .store(self.bound.len(), Ordering::Relaxed);
        result
    }

    /// Takes the deliveries that have arrived, hands their messages to the reactors, and
    /// acknowledges them. `settle(delivery, true)` acks it and every earlier one,
    /// `settle(delivery, false)` rejects it.
    fn take_deliveries(
        &mut self,
        receiver: &Receiver<ConsumerMessage>,
        settle: impl Fn(Delivery, bool) -> amiquip::Result<()>,
    ) -> Result<(), End> {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let mut batch: Batch = Vec::new();
        let mut settled: Vec<Vec<Completion>> = Vec::new();
        let mut last: Option<Delivery> = None;
        let mut taken = 0;
        while batch.len() < MAX_BATCH_MESSAGES && taken < usize::from(shared.settings.prefetch) {
            let mut d = match receiver.try_recv() {
                Ok(ConsumerMessage::Delivery(d)) => d,
                Ok(other) => return Err(End::Lost(format!("the consumer ended: {other:?}"))),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    return Err(End::Lost("the connection closed".into()));
                }
            };
            taken += 1;
            if d.redelivered {
                stats.redeliveries.fetch_add(1, Ordering::Relaxed);
            }
            let notice = d.properties.type_().as_deref() == Some(envelope::NOTICE_TYPE);
            let read = if notice {
                self.notice(&d.body, &mut settled)
            } else {
                self.frames(&d.body, &mut batch)
            };
            match read {
                Ok(()) => {
                    d.body = Vec::new();
                    last = Some(d);
                }
                Err(e) => {
                    stats.fanout_rejected.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "amqp fan-out: dropped a delivery from {} (routing key {}): {e}",
                        shared.topology.node_queue,
                        d.routing_key
                    );
                    settle(d, false).map_err(|e| End::Lost(self.shared.describe(&e)))?;
                }
            }
        }
        for (reactor, completions) in settled.into_iter().enumerate() {
            if let (false, Some(mailbox)) =
                (completions.is_empty(), self.shared.mailboxes.get(reactor))
            {
                // Err: that reactor has stopped; nobody waits any more.
                let _ = mailbox.send(Reply::Settled(completions));
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            if !self.hand_over(batch) {
                // Shutting down: not acknowledged, so the broker keeps them.
                return Ok(());
            }
            stats.delivered.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(d) = last {
            settle(d, true).map_err(|e| End::Lost(self.shared.describe(&e)))?;
        }
        Ok(())
    }

    /// Sorts a commit notice's senders by reactor into `settled`.
    fn notice(&self, body: &[u8], settled: &mut Vec<Vec<Completion>>) -> Result<(), EnvelopeError> {
        let (epoch, notice) = envelope::decode_notice(body)?;
        let stats = &self.shared.stats;
        if epoch != self.shared.epoch {
            // For the senders of an earlier process under this node id: gone.
            stats
                .notices_dropped
                .fetch_add(notice.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        stats
            .notices_received
            .fetch_add(notice.len() as u64, Ordering::Relaxed);
        for (o, result) in notice {
            if o.reactor >= self.shared.mailboxes.len() {
                continue;
            }
            if settled.len() <= o.reactor {
                settled.resize_with(o.reactor + 1, Vec::new);
            }
            settled[o.reactor].push(Completion {
                token: o.token,
                conn: o.conn,
                seq: o.seq,
                result,
            });
        }
        Ok(())
    }

    /// Appends the framed messages of an envelope from another node to `batch`; nothing for
    /// this node's own envelopes.
    fn frames(&self, body: &[u8], batch: &mut Batch) -> Result<(), EnvelopeError> {
        let env = envelope::decode(body)?;
        if env.node == self.shared.settings.node_id {
            return Ok(());
        }
        let room: Arc<str> = Arc::from(env.room.as_ref());
        batch.extend(env.messages.iter().map(|m| Fanout {
            room: room.clone(),
            frame: shared_text_frame(m.get().as_bytes()),
        }));
        Ok(())
    }

    /// Gives `batch` to every reactor (each delivers to its own members), waiting while an
    /// inbox is full; false when shutdown interrupted it.
    fn hand_over(&self, mut batch: Batch) -> bool {
        let n = self.inboxes.len();
        for (i, inbox) in self.inboxes.iter().enumerate() {
            let mut pause = Duration::from_micros(200);
            while !inbox.reserve() {
                if self.shared.control.stopping() {
                    return false;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            let b = if i + 1 == n {
                std::mem::take(&mut batch)
            } else {
                batch.clone()
            };
            // Err: that reactor has stopped (shutdown); its members are gone.
            let _ = inbox.send_reserved(b);
        }
        true
    }
}

/// Lets the reactors answer the upgrades that waited for a binding.
fn tell_joined(shared: &Shared, joiners: Vec<ReplyTo>) {
    for j in joiners {
        if let Some(mailbox) = shared.mailboxes.get(j.reactor) {
            // Err: that reactor has stopped; its connections are gone.
            let _ = mailbox.send(Reply::Joined {
                token: j.token,
                conn: j.conn,
            });
        }
    }
}
