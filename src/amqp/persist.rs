//! The persist consumer: feeds the store from the durable `chat.persist` queue and
//! acknowledges a delivery only once all its messages are committed.
//!
//! Every node runs one, on the same queue: the broker gives each delivery to one of them
//! (competing consumers), so every message is stored by one node. A delivery's messages go
//! to the store's writers tagged with the delivery; the writers report each message's fate
//! after COMMIT (stored, or moved to the store's dead-letter table), and when all of a
//! delivery's messages are reported it is done. Deliveries are acknowledged in order, with
//! `multiple` once the lowest outstanding ones are all done: an ack never covers a delivery
//! that is still being written. If this node dies first, the broker redelivers to another
//! node and the store skips what it has already (same `messageId`).
//!
//! An envelope that cannot be read, or holds a message that cannot be stored as it is, is
//! rejected whole to the dead-letter queue (`chat.dlq`): nothing of it is stored, so an
//! operator can fix and republish it without making duplicates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amiquip::{Channel, Consumer, ConsumerMessage, ConsumerOptions, Delivery};
use crossbeam_channel::{Receiver, Select, TryRecvError};

use super::envelope::{self, Settled};
use super::link::{self, Backoff};
use super::notice::Notice;
use super::{Role, Shared};
use crate::mailbox::{Completion, Origin, Reply};
use crate::store::writer::{DeliveryOutcomes, DeliveryRef, Persist, StoreQueue};

/// Longest wait in one turn, so shutdown is noticed.
const TICK: Duration = Duration::from_millis(100);

/// What the writers are given as a delivery's id: the channel's generation in the high bits
/// and its delivery tag in the low ones. Tags restart at 1 on every channel, so an outcome
/// that arrives after a reconnect for the old channel's delivery 5 must not ack the new
/// channel's delivery 5 (the broker redelivers the old one anyway).
const TAG_BITS: u32 = 44;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;

fn delivery_key(generation: u64, tag: u64) -> u64 {
    (generation << TAG_BITS) | tag
}

/// A delivery handed to the writers, waiting for its messages' outcomes.
struct Taken {
    /// Kept to acknowledge it (its body is dropped once parsed).
    delivery: Delivery,
    /// Messages not reported yet.
    remaining: usize,
    /// The node that accepted the messages, and its process's epoch.
    node: String,
    epoch: u64,
    /// Its senders waiting for the commit: (index in the envelope, sender), by index.
    waiting: Vec<(usize, Origin)>,
    /// Their fates so far, for the commit notice.
    settled: Vec<Settled>,
}

/// How a session ended.
enum End {
    /// Shutdown (or the writers are gone): stop.
    Stopped,
    /// The connection or channel failed (why): reconnect.
    Lost(String),
}

pub(super) struct PersistThread {
    shared: Arc<Shared>,
    store: Arc<StoreQueue>,
    outcomes: Receiver<DeliveryOutcomes>,
    /// Counts channels; see [`delivery_key`].
    generation: u64,
    backoff: Backoff,
    connected_once: bool,
}

impl PersistThread {
    pub(super) fn new(
        shared: Arc<Shared>,
        store: Arc<StoreQueue>,
        outcomes: Receiver<DeliveryOutcomes>,
    ) -> PersistThread {
        PersistThread {
            shared,
            store,
            outcomes,
            generation: 0,
            backoff: Backoff::new(),
            connected_once: false,
        }
    }

    pub(super) fn run(mut self) {
        let shared = self.shared.clone();
        while !shared.control.stopping() {
            // Outcomes of a lost channel's deliveries: the broker redelivers those, and the
            // writers must not wait on a full channel meanwhile.
            while self.outcomes.try_recv().is_ok() {}
            let opened = shared.open_channel(Role::Persist);
            let (conn, channel) = match opened {
                Ok(c) => c,
                Err(why) => {
                    log::debug!("amqp persist: connect failed: {why}");
                    shared.set_health(Role::Persist, Some(why));
                    self.wait_backoff();
                    continue;
                }
            };
            match self.session(&channel) {
                End::Stopped => {
                    drop(channel);
                    if let Err(e) = conn.close() {
                        log::debug!("amqp persist: close: {e}");
                    }
                    break;
                }
                End::Lost(why) => {
                    log::warn!("amqp persist: connection lost ({why}); reconnecting");
                    shared.set_health(Role::Persist, Some(why));
                    drop(channel);
                    drop(conn);
                    self.wait_backoff();
                }
            }
        }
        log::debug!("amqp persist consumer stopped");
    }

    fn wait_backoff(&mut self) {
        let outcomes = self.outcomes.clone();
        self.backoff.wait(&self.shared.control, |c| {
            while outcomes.try_recv().is_ok() {}
            c.stopping()
        });
    }

    fn session(&mut self, channel: &Channel) -> End {
        let shared = self.shared.clone();
        let t = &shared.topology;
        let setup = link::declare_core(channel, t)
            .and_then(|()| channel.qos(0, shared.settings.prefetch, false))
            .and_then(|()| channel.basic_consume(t.persist.as_str(), ConsumerOptions::default()));
        let consumer = match setup {
            Ok(c) => c,
            Err(e) => return End::Lost(self.shared.describe(&e)),
        };
        self.generation += 1;
        shared.set_health(Role::Persist, None);
        self.backoff.reset();
        if self.connected_once {
            shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            log::warn!("amqp persist: reconnected");
        }
        self.connected_once = true;

        let mut taken: BTreeMap<u64, Taken> = BTreeMap::new();
        let mut consuming = true;
        loop {
            let control = &shared.control;
            if consuming && control.stopping() {
                // Take nothing more; finish what the writers have, then close.
                link::cancel(&consumer);
                consuming = false;
            }
            if !consuming && (taken.is_empty() || control.past_deadline()) {
                if !taken.is_empty() {
                    log::warn!(
                        "amqp persist: {} deliveries not stored by the shutdown deadline; RabbitMQ will deliver them again",
                        taken.len()
                    );
                }
                return End::Stopped;
            }
            {
                let mut select = Select::new();
                select.recv(&self.outcomes);
                if consuming {
                    select.recv(consumer.receiver());
                }
                let _ = select.ready_timeout(TICK);
            }
            if let Err(end) = self.apply_outcomes(&mut taken, &consumer) {
                return end;
            }
            if consuming && let Err(end) = self.take_deliveries(&mut taken, &consumer) {
                return end;
            }
        }
    }

    /// Takes the deliveries that have arrived and hands their messages to the writers.
    fn take_deliveries(
        &self,
        taken: &mut BTreeMap<u64, Taken>,
        consumer: &Consumer<'_>,
    ) -> Result<(), End> {
        for _ in 0..usize::from(self.shared.settings.prefetch) {
            match consumer.receiver().try_recv() {
                Ok(ConsumerMessage::Delivery(d)) => self.take(d, taken, consumer)?,
                Ok(other) => return Err(End::Lost(format!("the consumer ended: {other:?}"))),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    return Err(End::Lost("the connection closed".into()));
                }
            }
        }
        Ok(())
    }

    fn take(
        &self,
        mut d: Delivery,
        taken: &mut BTreeMap<u64, Taken>,
        consumer: &Consumer<'_>,
    ) -> Result<(), End> {
        let stats = &self.shared.stats;
        stats.persist_deliveries.fetch_add(1, Ordering::Relaxed);
        if d.redelivered {
            stats.redeliveries.fetch_add(1, Ordering::Relaxed);
        }
        let parsed = envelope::decode(&d.body).and_then(|env| {
            let records = envelope::records(&env)?;
            Ok((records, env.node.into_owned(), env.epoch, env.waiting))
        });
        let (records, node, epoch, waiting) = match parsed {
            Ok(r) => r,
            Err(e) => {
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "amqp persist: delivery (routing key {}) sent to {}: {e}",
                    d.routing_key,
                    self.shared.topology.dlq
                );
                return consumer
                    .nack(d, false)
                    .map_err(|e| End::Lost(self.shared.describe(&e)));
            }
        };
        let tag = d.delivery_tag();
        if tag > TAG_MASK {
            return Err(End::Lost("delivery tags exhausted on this channel".into()));
        }
        d.body = Vec::new();
        taken.insert(
            tag,
            Taken {
                delivery: d,
                remaining: records.len(),
                node,
                epoch,
                settled: Vec::with_capacity(waiting.len()),
                waiting,
            },
        );
        let key = delivery_key(self.generation, tag);
        for (index, record) in records.into_iter().enumerate() {
            let mut pause = Duration::from_micros(200);
            // Policy when the writers' queue is full: wait, acknowledging what completes
            // meanwhile; the broker holds the rest (prefetch). Looking at the depth first
            // keeps a long wait from counting as thousands of refusals in the store's
            // metrics.
            while !(self.store.depth() < self.store.capacity() && self.store.reserve()) {
                self.apply_outcomes(taken, consumer)?;
                if self.shared.control.past_deadline() {
                    // Part of this delivery is with the writers; unacknowledged, it comes
                    // back and the store skips what it has.
                    return Ok(());
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            let persist = Persist {
                record,
                origin: None,
                delivery: Some(DeliveryRef {
                    key,
                    // Envelopes hold at most amqp_batch_max (u16-sized) messages; a
                    // larger index cannot name a waiting sender anyway.
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                }),
            };
            if !self.store.send_reserved(persist) {
                log::error!("amqp persist: the store's writers have stopped; consuming stops");
                self.shared.set_health(
                    Role::Persist,
                    Some("the store's writers have stopped".into()),
                );
                return Err(End::Stopped);
            }
        }
        Ok(())
    }

    /// Counts the writers' reports, acknowledges the deliveries that are done, lowest first,
    /// and then tells the senders who waited for those commits.
    fn apply_outcomes(
        &self,
        taken: &mut BTreeMap<u64, Taken>,
        consumer: &Consumer<'_>,
    ) -> Result<(), End> {
        let generation = self.generation & (u64::MAX >> TAG_BITS);
        while let Ok(outcomes) = self.outcomes.try_recv() {
            // Stored or dead-lettered by the store: either way the message is settled.
            for (d, result) in outcomes {
                if d.key >> TAG_BITS != generation {
                    continue;
                }
                if let Some(t) = taken.get_mut(&(d.key & TAG_MASK)) {
                    t.remaining = t.remaining.saturating_sub(1);
                    let index = d.index as usize;
                    if let Ok(i) = t.waiting.binary_search_by_key(&index, |(i, _)| *i) {
                        t.settled.push((t.waiting[i].1, result));
                    }
                }
            }
        }
        let mut last = None;
        let mut notices: HashMap<(String, u64), Vec<Settled>> = HashMap::new();
        while let Some(first) = taken.first_entry() {
            if first.get().remaining > 0 {
                break;
            }
            let done = first.remove();
            if !done.settled.is_empty() {
                notices
                    .entry((done.node, done.epoch))
                    .or_default()
                    .extend(done.settled);
            }
            last = Some(done.delivery);
        }
        if let Some(d) = last {
            // Every delivery up to this one is done or was rejected already.
            consumer
                .ack_multiple(d)
                .map_err(|e| End::Lost(self.shared.describe(&e)))?;
        }
        for ((node, epoch), settled) in notices {
            self.notify(node, epoch, settled);
        }
        Ok(())
    }

    /// Tells `node`'s senders their messages are committed (or refused): this process's own
    /// reactors directly, another node through the notice sender (see [`super::notice`]).
    fn notify(&self, node: String, epoch: u64, settled: Vec<Settled>) {
        let shared = &self.shared;
        let n = settled.len() as u64;
        if node == shared.settings.node_id && epoch == shared.epoch {
            shared.stats.commit_notices.fetch_add(n, Ordering::Relaxed);
            let mut by_reactor: HashMap<usize, Vec<Completion>> = HashMap::new();
            for (o, result) in settled {
                by_reactor.entry(o.reactor).or_default().push(Completion {
                    token: o.token,
                    conn: o.conn,
                    seq: o.seq,
                    result,
                });
            }
            for (reactor, completions) in by_reactor {
                if let Some(mailbox) = shared.mailboxes.get(reactor) {
                    // Err: that reactor has stopped; nobody waits any more.
                    let _ = mailbox.send(Reply::Settled(completions));
                }
            }
        } else if node == shared.settings.node_id {
            // An earlier process under this node id accepted them; its senders are gone.
            shared.stats.notices_dropped.fetch_add(n, Ordering::Relaxed);
        } else {
            let notice = Notice {
                node,
                epoch,
                settled,
            };
            match shared.notices.try_send(notice) {
                Ok(()) => {
                    shared.stats.commit_notices.fetch_add(n, Ordering::Relaxed);
                }
                Err(_) => {
                    shared.stats.notices_dropped.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_generations_apart() {
        let a = delivery_key(1, 5);
        let b = delivery_key(2, 5);
        assert_ne!(a, b);
        assert_eq!(a & TAG_MASK, 5);
        assert_eq!(b >> TAG_BITS, 2);
    }
}
