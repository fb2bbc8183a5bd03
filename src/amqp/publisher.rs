//! A publisher thread: takes accepted messages from its queue, publishes them in envelopes
//! with publisher confirms, and tells the senders' reactors when the broker has them.
//!
//! The thread owns one connection and one channel (amiquip's channels are not `Sync`). Its
//! loop, one turn at a time:
//!
//! 1. apply the confirms that arrived (each settles the chat messages of one envelope);
//! 2. settle with an error what waited longer than `confirm_timeout` since it was accepted;
//! 3. while fewer than `confirm_window` envelopes are unconfirmed, take what is queued, group
//!    it by room into envelopes of up to `batch_max` messages and publish them (no waiting
//!    per message: the batch is what is queued at that moment, so a quiet node publishes each
//!    message at once and a busy one fills envelopes);
//! 4. tell the reactors, one [`Reply::Settled`] per reactor, and wait for a confirm or a job.
//!
//! On a lost connection the unconfirmed envelopes go back to the front of the line, in order,
//! and are published again after the reconnect: the broker may have them already, and the
//! store and clients drop the duplicates by `messageId`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, Channel, Confirm, ConfirmSmoother, Connection, Publish};
use crossbeam_channel::{Receiver, Select, TryRecvError};

use super::envelope;
use super::link::{self, Backoff};
use super::{Job, Role, Shared, Topology};
use crate::mailbox::{Completion, Origin, Reply};

/// Most jobs taken from the queue in one turn, so confirms are looked at often under load.
const MAX_DRAIN: usize = 16_384;
/// Longest wait in one turn, so shutdown and timeouts are noticed.
const TICK: Duration = Duration::from_millis(100);

/// Chat messages of one room on their way to the broker as one AMQP message.
struct Envelope {
    room: Arc<str>,
    /// The encoded envelope; closed (`]}`) once sealed.
    body: Vec<u8>,
    /// Senders waiting for the confirm.
    origins: Vec<Origin>,
    /// Senders waiting for the commit (`ack_after = persisted`), by index in the envelope:
    /// listed in it for the persist consumer, told here only if publishing fails.
    waiting: Vec<(usize, Origin)>,
    messages: usize,
    sealed: bool,
    /// When its oldest message was accepted.
    oldest: Instant,
}

/// An envelope published and not yet confirmed.
struct InFlight {
    tag: u64,
    env: Envelope,
    sent: Instant,
}

/// One connection, its channel with confirms, and the confirm bookkeeping of that channel
/// (delivery tags restart at 1 on each channel).
struct Link {
    // Field order is drop order: the channel closes before its connection.
    channel: Channel,
    confirms: Receiver<Confirm>,
    smoother: ConfirmSmoother,
    next_tag: u64,
    conn: Connection,
}

impl Link {
    fn open(shared: &Shared, id: usize) -> Result<Link, String> {
        let mut conn = shared.open(Role::Publisher(id))?;
        let set_up = |conn: &mut Connection| -> amiquip::Result<(Channel, Receiver<Confirm>)> {
            let channel = conn.open_channel(None)?;
            link::declare_core(&channel, &shared.topology)?;
            // The listener first: confirms sent before it exists would be lost.
            let confirms = channel.listen_for_publisher_confirms()?;
            channel.enable_publisher_confirms()?;
            Ok((channel, confirms))
        };
        let (channel, confirms) = set_up(&mut conn).map_err(|e| shared.describe(&e))?;
        Ok(Link {
            channel,
            confirms,
            smoother: ConfirmSmoother::new(),
            next_tag: 1,
            conn,
        })
    }
}

pub(super) struct PublisherThread {
    id: usize,
    shared: Arc<Shared>,
    jobs: Receiver<Job>,
    link: Option<Link>,
    /// Envelopes to publish, oldest first (after a reconnect, the unconfirmed ones lead).
    pending: VecDeque<Envelope>,
    /// Published, waiting for the confirm, in delivery-tag order.
    unconfirmed: VecDeque<InFlight>,
    /// Completions per reactor, sent at the end of the turn.
    settled: Vec<Vec<Completion>>,
    backoff: Backoff,
    connected_once: bool,
    /// When the link last made progress: connected, a confirm came, or something was
    /// published with nothing outstanding. A link with no progress for `confirm_timeout`
    /// while envelopes are outstanding is stuck, not merely slow.
    progress: Instant,
    properties: AmqpProperties,
    /// Scratch: the open envelope of each room during one drain.
    open: HashMap<Arc<str>, usize>,
    /// Scratch for smoothed confirms.
    confirmed: Vec<Confirm>,
}

impl PublisherThread {
    pub(super) fn new(id: usize, shared: Arc<Shared>, jobs: Receiver<Job>) -> PublisherThread {
        let reactors = shared.mailboxes.len();
        PublisherThread {
            id,
            jobs,
            link: None,
            pending: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            settled: (0..reactors).map(|_| Vec::new()).collect(),
            backoff: Backoff::new(),
            connected_once: false,
            progress: Instant::now(),
            properties: AmqpProperties::default()
                .with_content_type(envelope::CONTENT_TYPE.into())
                .with_delivery_mode(2)
                .with_type_(envelope::ENVELOPE_TYPE.into())
                .with_app_id("chatflow".into()),
            open: HashMap::new(),
            confirmed: Vec::new(),
            shared,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            if self.finished() {
                break;
            }
            if self.link.is_none() {
                // Jobs accepted before the breaker opened wait here, not in the reactors'
                // queue, so they can time out like the rest.
                let room = self
                    .queue_capacity()
                    .saturating_sub(self.pending_messages());
                self.take_jobs(room);
                self.expire(Instant::now());
                self.flush_settled();
                if !self.reconnect() {
                    self.backoff
                        .wait(&self.shared.control, |c| c.past_deadline());
                }
                continue;
            }
            self.take_confirms();
            self.expire(Instant::now());
            self.publish_pending();
            self.flush_settled();
            self.wait();
        }
        self.flush_settled();
        if let Some(link) = self.link.take() {
            drop(link.channel);
            if let Err(e) = link.conn.close() {
                log::debug!("amqp publisher {}: close: {e}", self.id);
            }
        }
        self.set_outstanding();
        log::debug!("amqp publisher {} stopped", self.id);
    }

    fn queue_capacity(&self) -> usize {
        self.shared.queues[self.id].slots.capacity()
    }

    fn pending_messages(&self) -> usize {
        self.pending.iter().map(|e| e.messages).sum()
    }

    /// At shutdown: done once everything queued is confirmed, or the deadline has passed
    /// (then what is left is settled as failed).
    fn finished(&mut self) -> bool {
        let control = &self.shared.control;
        if !control.stopping() {
            return false;
        }
        if self.jobs.is_empty() && self.pending.is_empty() && self.unconfirmed.is_empty() {
            return true;
        }
        if !control.past_deadline() {
            return false;
        }
        self.take_jobs(usize::MAX);
        let why = "the node shut down before RabbitMQ confirmed this message";
        let mut lost = 0;
        for f in std::mem::take(&mut self.unconfirmed) {
            lost += f.env.messages;
            self.settle(f.env, Err(why.into()));
        }
        for env in std::mem::take(&mut self.pending) {
            lost += env.messages;
            self.settle(env, Err(why.into()));
        }
        log::error!(
            "amqp publisher {}: {lost} message(s) not confirmed by the shutdown deadline; other nodes and the store may not have them",
            self.id
        );
        true
    }

    /// One connection attempt; true when connected.
    fn reconnect(&mut self) -> bool {
        let shared = self.shared.clone();
        shared.breaker.probe(true);
        let opened = Link::open(&shared, self.id);
        shared.breaker.probe(false);
        match opened {
            Ok(link) => {
                self.link = Some(link);
                self.progress = Instant::now();
                self.backoff.reset();
                shared.set_health(Role::Publisher(self.id), None);
                shared.breaker.regained();
                if self.connected_once {
                    shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "amqp publisher {}: reconnected; republishing {} unconfirmed envelope(s)",
                        self.id,
                        self.pending.len()
                    );
                }
                self.connected_once = true;
                true
            }
            Err(why) => {
                log::debug!("amqp publisher {}: connect failed: {why}", self.id);
                shared.set_health(Role::Publisher(self.id), Some(why));
                false
            }
        }
    }

    /// Drops the connection after an error; what was not confirmed goes back to the front of
    /// the line, in order, to be published again.
    fn lose_link(&mut self, why: String) {
        if self.link.take().is_none() {
            return;
        }
        let back = self.unconfirmed.len();
        while let Some(f) = self.unconfirmed.pop_back() {
            self.pending.push_front(f.env);
        }
        self.set_outstanding();
        log::warn!(
            "amqp publisher {}: connection lost ({why}); {back} envelope(s) unconfirmed, messages refused until it is back",
            self.id
        );
        let shared = &self.shared;
        shared.set_health(Role::Publisher(self.id), Some(why));
        shared.breaker.lost();
    }

    /// Takes up to `limit` jobs from the queue into envelopes at the back of `pending`.
    fn take_jobs(&mut self, limit: usize) -> usize {
        let batch_max = self.shared.settings.batch_max;
        let node = self.shared.settings.node_id.as_str();
        let mut taken = 0;
        while taken < limit {
            let Ok(job) = self.jobs.try_recv() else {
                break;
            };
            taken += 1;
            let at = match self.open.get(&job.room) {
                Some(&i) if self.pending[i].messages < batch_max => i,
                full => {
                    if let Some(&i) = full {
                        seal(&mut self.pending[i], self.shared.epoch);
                    }
                    let mut body = Vec::with_capacity(64 + job.payload.len() * 2);
                    envelope::begin(&mut body, node, &job.room);
                    self.pending.push_back(Envelope {
                        room: job.room.clone(),
                        body,
                        origins: Vec::new(),
                        waiting: Vec::new(),
                        messages: 0,
                        sealed: false,
                        oldest: job.accepted,
                    });
                    let i = self.pending.len() - 1;
                    self.open.insert(job.room.clone(), i);
                    i
                }
            };
            let env = &mut self.pending[at];
            envelope::push(&mut env.body, &job.payload, env.messages == 0);
            match job.origin {
                Some(o) if job.persisted => env.waiting.push((env.messages, o)),
                Some(o) => env.origins.push(o),
                None => {}
            }
            env.messages += 1;
        }
        for (_, i) in self.open.drain() {
            seal(&mut self.pending[i], self.shared.epoch);
        }
        taken
    }

    /// Publishes pending envelopes while the window has room, taking more jobs when none are
    /// pending.
    fn publish_pending(&mut self) {
        let window = self.shared.settings.confirm_window;
        loop {
            while self.unconfirmed.len() < window && !self.pending.is_empty() {
                if !self.publish_front() {
                    return;
                }
            }
            if self.unconfirmed.len() >= window || !self.pending.is_empty() {
                return;
            }
            let room = (window - self.unconfirmed.len())
                .saturating_mul(self.shared.settings.batch_max)
                .min(MAX_DRAIN);
            if self.take_jobs(room) == 0 {
                return;
            }
        }
    }

    /// Publishes the first pending envelope; false when the connection failed.
    fn publish_front(&mut self) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        let Some(env) = self.pending.front() else {
            return true;
        };
        let publish = Publish::with_properties(
            &env.body,
            Topology::routing_key(&env.room),
            self.properties.clone(),
        );
        match link
            .channel
            .basic_publish(self.shared.topology.exchange.as_str(), publish)
        {
            Ok(()) => {
                let tag = link.next_tag;
                link.next_tag += 1;
                if self.unconfirmed.is_empty() {
                    self.progress = Instant::now();
                }
                if let Some(env) = self.pending.pop_front() {
                    let stats = &self.shared.stats;
                    stats
                        .published
                        .fetch_add(env.messages as u64, Ordering::Relaxed);
                    stats.envelopes.fetch_add(1, Ordering::Relaxed);
                    stats.envelope_messages.observe(env.messages as f64);
                    self.unconfirmed.push_back(InFlight {
                        tag,
                        env,
                        sent: Instant::now(),
                    });
                }
                self.set_outstanding();
                true
            }
            Err(e) => {
                let why = self.shared.describe(&e);
                self.lose_link(why);
                false
            }
        }
    }

    /// Applies the confirms that have arrived.
    fn take_confirms(&mut self) {
        loop {
            let Some(link) = self.link.as_mut() else {
                return;
            };
            match link.confirms.try_recv() {
                Ok(raw) => {
                    // The smoother turns out-of-order and `multiple` confirms into one confirm
                    // per tag, in tag order; its iterator must be run to the end.
                    self.confirmed.extend(link.smoother.process(raw));
                    let confirmed = std::mem::take(&mut self.confirmed);
                    for c in &confirmed {
                        self.confirm(*c);
                    }
                    self.confirmed = confirmed;
                    self.confirmed.clear();
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.lose_link("the connection closed".into());
                    return;
                }
            }
        }
    }

    fn confirm(&mut self, confirm: Confirm) {
        let (tag, acked) = match confirm {
            Confirm::Ack(p) => (p.delivery_tag, true),
            Confirm::Nack(p) => (p.delivery_tag, false),
        };
        let now = Instant::now();
        self.progress = now;
        // Tags below the front were settled already (timed out); a tag above it cannot come
        // before the front's own from the smoother.
        while self.unconfirmed.front().is_some_and(|f| f.tag <= tag) {
            let Some(f) = self.unconfirmed.pop_front() else {
                break;
            };
            let stats = &self.shared.stats;
            stats
                .confirm_seconds
                .observe(now.duration_since(f.sent).as_secs_f64());
            if acked {
                self.settle(f.env, Ok(()));
            } else {
                stats.nacks.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "amqp publisher {}: RabbitMQ refused (nack) an envelope of {} message(s) for room {}",
                    self.id,
                    f.env.messages,
                    f.env.room
                );
                self.settle(
                    f.env,
                    Err("RabbitMQ refused the message (nack); it was not sent".into()),
                );
            }
        }
        self.set_outstanding();
    }

    /// Settles with an error what was accepted longer than `confirm_timeout` ago.
    ///
    /// An unconfirmed envelope that times out is dropped, not republished: its senders are
    /// told `UNAVAILABLE` and may retry (with the same `clientMessageId`, a retry keeps its
    /// id). When no confirm at all came for that long, the link is stuck (a half-dead
    /// connection the heartbeat has not caught yet), so the connection is reopened; confirms
    /// that merely come slowly (a broker under flow control) do not make it reconnect, which
    /// would only add republished load.
    fn expire(&mut self, now: Instant) {
        let timeout = self.shared.settings.confirm_timeout;
        let late = |oldest: Instant| now.duration_since(oldest) >= timeout;
        let mut stalled = false;
        let mut dropped = 0;
        while self.unconfirmed.front().is_some_and(|f| late(f.env.oldest)) {
            if let Some(f) = self.unconfirmed.pop_front() {
                stalled = now.duration_since(self.progress) >= timeout;
                dropped += self.time_out(f.env);
            }
        }
        while self.pending.front().is_some_and(|e| late(e.oldest)) {
            if let Some(env) = self.pending.pop_front() {
                dropped += self.time_out(env);
            }
        }
        if dropped == 0 {
            return;
        }
        self.set_outstanding();
        log::warn!(
            "amqp publisher {}: {dropped} message(s) not confirmed within {timeout:?} of their acceptance; dropped, senders told UNAVAILABLE",
            self.id
        );
        if stalled {
            self.lose_link(format!("no confirm within {timeout:?}"));
        }
    }

    fn time_out(&mut self, env: Envelope) -> usize {
        let n = env.messages;
        self.shared
            .stats
            .confirm_timeouts
            .fetch_add(n as u64, Ordering::Relaxed);
        self.settle(
            env,
            Err("RabbitMQ did not confirm this message in time; it may not have been sent".into()),
        );
        n
    }

    /// Tells the senders waiting for `env`'s confirm; on a failure, also those waiting for
    /// its commit, which will not come.
    fn settle(&mut self, env: Envelope, result: Result<(), String>) {
        let waiting = if result.is_err() {
            env.waiting
        } else {
            Vec::new()
        };
        let senders = env
            .origins
            .into_iter()
            .chain(waiting.into_iter().map(|(_, o)| o));
        for o in senders {
            if let Some(list) = self.settled.get_mut(o.reactor) {
                list.push(Completion {
                    token: o.token,
                    conn: o.conn,
                    seq: o.seq,
                    result: result.clone(),
                });
            }
        }
    }

    /// Tells each reactor about its settled messages, one reply per reactor.
    fn flush_settled(&mut self) {
        for (reactor, list) in self.settled.iter_mut().enumerate() {
            if list.is_empty() {
                continue;
            }
            let completions = std::mem::take(list);
            if let Some(mailbox) = self.shared.mailboxes.get(reactor) {
                // Waits while that mailbox is full (its reactor drains it every turn); fails
                // only when the reactor has stopped, and then nobody waits for these.
                let _ = mailbox.send(Reply::Settled(completions));
            }
        }
    }

    /// Waits for a confirm, or for a job when the window has room, at most until the next
    /// timeout or a tick.
    fn wait(&mut self) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        let now = Instant::now();
        let timeout = self.shared.settings.confirm_timeout;
        let next_expiry = self
            .unconfirmed
            .front()
            .map(|f| f.env.oldest)
            .into_iter()
            .chain(self.pending.front().map(|e| e.oldest))
            .min()
            .map_or(TICK, |oldest| {
                (oldest + timeout).saturating_duration_since(now)
            });
        let mut select = Select::new();
        select.recv(&link.confirms);
        let window_open = self.unconfirmed.len() < self.shared.settings.confirm_window;
        if window_open && self.pending.is_empty() {
            select.recv(&self.jobs);
        }
        // Readiness is enough: the next turn takes what is there.
        let _ = select.ready_timeout(next_expiry.min(TICK));
    }

    fn set_outstanding(&self) {
        self.shared.stats.outstanding[self.id].store(self.unconfirmed.len(), Ordering::Relaxed);
    }
}

fn seal(env: &mut Envelope, epoch: u64) {
    if !env.sealed {
        envelope::finish_waiting(&mut env.body, epoch, &env.waiting);
        env.sealed = true;
    }
}
