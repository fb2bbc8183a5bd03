//! The RabbitMQ bus: several `chatflow serve` nodes share every room through one broker.
//!
//! # Where a message goes
//!
//! ```text
//! reactor ──publish()──► publish queue (one per publisher thread, bounded)
//!    │                        │  all messages of a room go to the same thread: order holds
//!    │ LocalPublisher         ▼
//!    ▼                   publisher thread ──envelopes (≤ batch_max of one room)──► {ns}chat.exchange
//! this node's reactors        ▲ confirms ⇒ Reply::Settled to the senders' reactors      │ topic
//!                             │                                             room.{id} │ room.#
//!                                                         ┌─────────────────────────┘    │
//!                                                         ▼                              ▼
//!                                         {ns}chat.node.{node} (one per node)    {ns}chat.persist
//!                                                         │                     (durable, DLX)
//!                                      fan-out consumer ◄─┘                              │
//!                          (skips its own node's envelopes)        persist consumer ◄────┘
//!                                    │                                    │ StoreQueue
//!                                    ▼                                    ▼
//!                          every reactor's Inbox                   store writers ─► ack after COMMIT
//! ```
//!
//! - **Publishing.** A reactor's [`Publisher`] delivers to this node's other reactors in process
//!   (a [`LocalPublisher`]) and queues the message for the publisher thread that owns the room.
//!   That thread takes what is queued, groups it by room into [`envelope`]s of up to
//!   `batch_max` chat messages, publishes them as persistent messages on a channel with
//!   publisher confirms, and keeps at most `confirm_window` unconfirmed. When the broker
//!   confirms an envelope, the senders of its messages are told
//!   ([`Reply::Settled`](crate::mailbox::Reply::Settled)); with `ack_after = published` that
//!   is when their acks are written. A nack, or no confirm within
//!   `confirm_timeout` of the message's acceptance, settles them with an error (the client gets
//!   `UNAVAILABLE`).
//! - **Fan-out.** Each node has its own queue, bound to `room.{id}` only while the node has
//!   members in that room ([`Bus::join`], [`Bus::leave`]). A connection joining a room the
//!   node does not serve yet gets its `101` only once the binding is made, so it hears every
//!   message sent after its upgrade, whichever node took it. Its consumer frames every message from
//!   *another* node once and hands the batch to every reactor; this node's own messages were
//!   delivered in process already.
//! - **Storage.** One durable queue, `chat.persist`, gets every envelope. Each node consumes it
//!   (competing consumers: each delivery goes to one node), hands the messages to the store's
//!   writers and acks a delivery only after all its messages are committed (or dead-lettered
//!   by the store). A crash before the ack makes the broker redeliver; the store dedupes by
//!   `messageId`. So every message is stored exactly once, whichever node accepted it.
//! - **Broker loss.** Every thread owns its connection. On any error it drops the connection,
//!   reconnects with exponential backoff (100 ms to 5 s), declares the topology again, binds
//!   the node's rooms again, and a publisher republishes what was published but not confirmed
//!   (the duplicates are dropped by `messageId`). While a publisher is disconnected the
//!   [`breaker`](BusBreaker) is open and `publish` refuses with `UNAVAILABLE`, so nothing is
//!   buffered without bound and no ack claims what could still be lost.
//!
//! # Queues and what happens when they are full
//!
//! | queue | bound | when full |
//! |---|---|---|
//! | publish queue (per publisher thread) | `queue_messages / publishers` messages | `publish` refuses: `OVERLOADED` |
//! | envelopes held by a publisher | `confirm_window` unconfirmed + one drain | the thread stops taking from its queue |
//! | node queue (broker) | `node_queue_max_length`, `node_queue_ttl` | the broker drops the oldest (`drop-head`): members of this node miss them |
//! | fan-out consumer → reactor inboxes | the inbox's capacity | the consumer waits and retries; the broker holds the rest (prefetch) |
//! | persist consumer → store writers | the writers' queue | the consumer waits and retries; the broker holds the rest (prefetch) |
//! | writers → persist consumer (outcomes) | set by the server (4 × prefetch) | writers wait; the consumer drains it even while it waits itself |
//!
//! # Naming and connections
//!
//! Exchange and queue names are prefixed by `amqp_namespace`, so separate deployments (and
//! tests) share one broker. A node's queue is named after its node id: node ids must be unique
//! in a deployment. When the URL sets no `heartbeat` or `connection_timeout`, this module asks
//! for a 15 s heartbeat and a 5 s connection timeout, so a silent broker is noticed in seconds
//! rather than minutes. Connections are opened with `TCP_NODELAY` (see `link::Broker`), and
//! each is named in the management UI after its node and thread.

mod depth;
pub mod envelope;
mod fanout;
mod link;
mod notice;
mod persist;
mod publisher;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;

use crate::bus::{
    Accepted, Bus, Inbox, Joined, LocalPublisher, Outgoing, PublishError, Publisher, Reservations,
};
use crate::mailbox::{Mailbox, Origin, ReplyTo};
use crate::metrics::{Histogram, single};
use crate::store::writer::{DeliveryOutcomes, LATENCY_BUCKETS, StoreQueue};

/// What the RabbitMQ bus needs from the configuration.
#[derive(Clone, Debug)]
pub struct AmqpSettings {
    /// `amqp://USER:PASS@HOST:PORT/VHOST`.
    pub url: String,
    /// Prefix of every exchange and queue name.
    pub namespace: String,
    /// This node's id (its fan-out queue's name, and the envelope's `node`).
    pub node_id: String,
    /// Publisher threads.
    pub publishers: usize,
    /// Most chat messages of one room per AMQP message.
    pub batch_max: usize,
    /// Most unconfirmed AMQP messages per publisher.
    pub confirm_window: usize,
    /// Messages waiting for the publishers.
    pub queue_messages: usize,
    /// Longest wait for a confirm.
    pub confirm_timeout: Duration,
    /// The node queue's expiry and message TTL.
    pub node_queue_ttl: Duration,
    /// The node queue's length limit.
    pub node_queue_max_length: u64,
    /// Consumers' prefetch.
    pub prefetch: u16,
}

/// The names of the exchanges and queues, with the namespace applied.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The topic exchange every envelope is published to, routing key `room.{roomId}`.
    pub exchange: String,
    /// The dead-letter exchange of the persist queue (fanout).
    pub dlx: String,
    /// The queue that keeps what the persist consumers rejected.
    pub dlq: String,
    /// The durable queue the store is fed from, bound to `room.#`.
    pub persist: String,
    /// This node's fan-out queue.
    pub node_queue: String,
}

impl Topology {
    /// The names for `namespace` and `node_id`.
    pub fn new(namespace: &str, node_id: &str) -> Topology {
        Topology {
            exchange: format!("{namespace}chat.exchange"),
            dlx: format!("{namespace}chat.dlx"),
            dlq: format!("{namespace}chat.dlq"),
            persist: format!("{namespace}chat.persist"),
            node_queue: format!("{namespace}chat.node.{node_id}"),
        }
    }

    /// The routing key of a room's envelopes.
    pub fn routing_key(room: &str) -> String {
        format!("room.{room}")
    }
}

/// The breaker in front of the broker, shared by the publisher threads (who open and close
/// it) and the reactors (who refuse messages while it is not closed).
///
/// It opens as soon as a publisher loses its connection: a message queued to a dead link
/// could only time out, so the sender is better told `UNAVAILABLE` at once. It is half-open
/// while a publisher is reconnecting and closes when every publisher is connected again.
#[derive(Default)]
pub struct BusBreaker {
    /// Publishers without a working connection.
    down: AtomicUsize,
    /// Publishers trying to reconnect right now.
    probing: AtomicUsize,
    /// How many times it opened.
    opened: AtomicU64,
}

/// The breaker's state, as in the store's breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusState {
    /// Every publisher is connected.
    Closed,
    /// A publisher has lost its connection; messages are refused.
    Open,
    /// A publisher is reconnecting; messages are still refused.
    HalfOpen,
}

impl BusBreaker {
    fn starting(publishers: usize) -> BusBreaker {
        BusBreaker {
            down: AtomicUsize::new(publishers),
            ..BusBreaker::default()
        }
    }

    /// The current state.
    pub fn state(&self) -> BusState {
        if self.down.load(Ordering::Acquire) == 0 {
            BusState::Closed
        } else if self.probing.load(Ordering::Acquire) > 0 {
            BusState::HalfOpen
        } else {
            BusState::Open
        }
    }

    /// True when messages may be accepted.
    pub fn is_closed(&self) -> bool {
        self.down.load(Ordering::Acquire) == 0
    }

    /// How many times the breaker has opened.
    pub fn times_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn lost(&self) {
        if self.down.fetch_add(1, Ordering::AcqRel) == 0 {
            self.opened.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn regained(&self) {
        self.down.fetch_sub(1, Ordering::AcqRel);
    }

    fn probe(&self, on: bool) {
        if on {
            self.probing.fetch_add(1, Ordering::AcqRel);
        } else {
            self.probing.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Counters of the bus, for `/metrics`.
pub struct AmqpStats {
    /// Chat messages published (republished ones count again).
    pub published: AtomicU64,
    /// AMQP messages (envelopes) published.
    pub envelopes: AtomicU64,
    /// Chat messages per envelope.
    pub envelope_messages: Histogram,
    /// Time from publishing an envelope to its confirm, seconds.
    pub confirm_seconds: Histogram,
    /// Envelopes published and not yet confirmed, per publisher.
    outstanding: Box<[AtomicUsize]>,
    /// Envelopes the broker nacked.
    pub nacks: AtomicU64,
    /// Chat messages settled with an error because no confirm came in time.
    pub confirm_timeouts: AtomicU64,
    /// Chat messages from other nodes handed to this node's reactors.
    pub delivered: AtomicU64,
    /// Deliveries of the node queue that were dropped because they did not parse.
    pub fanout_rejected: AtomicU64,
    /// Deliveries taken from the persist queue.
    pub persist_deliveries: AtomicU64,
    /// Deliveries (of either queue) the broker marked as redelivered.
    pub redeliveries: AtomicU64,
    /// Persist deliveries sent to the dead-letter queue because they did not parse.
    pub dead_lettered: AtomicU64,
    /// Connections reopened after a loss, by any thread.
    pub reconnects: AtomicU64,
    /// Rooms the node queue is bound to.
    pub bound_rooms: AtomicUsize,
    /// Senders (`ack_after = persisted`) this node's persist consumer told of their commit.
    pub commit_notices: AtomicU64,
    /// Such senders of this node told by a notice from another node's persist consumer.
    pub notices_received: AtomicU64,
    /// Senders whose commit notice was not delivered: the notice queue was full, the notice
    /// sender could not publish, or the notice was for an earlier process (another epoch).
    pub notices_dropped: AtomicU64,
}

/// Buckets for chat messages per envelope.
const ENVELOPE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

impl AmqpStats {
    fn new(publishers: usize) -> AmqpStats {
        AmqpStats {
            published: AtomicU64::new(0),
            envelopes: AtomicU64::new(0),
            envelope_messages: Histogram::new(ENVELOPE_BUCKETS),
            confirm_seconds: Histogram::new(LATENCY_BUCKETS),
            outstanding: (0..publishers).map(|_| AtomicUsize::new(0)).collect(),
            nacks: AtomicU64::new(0),
            confirm_timeouts: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            fanout_rejected: AtomicU64::new(0),
            persist_deliveries: AtomicU64::new(0),
            redeliveries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            bound_rooms: AtomicUsize::new(0),
            commit_notices: AtomicU64::new(0),
            notices_received: AtomicU64::new(0),
            notices_dropped: AtomicU64::new(0),
        }
    }

    /// Envelopes published and not yet confirmed, all publishers together.
    pub fn outstanding_confirms(&self) -> usize {
        self.outstanding
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .sum()
    }
}

/// One accepted chat message on its way to a publisher thread.
struct Job {
    room: Arc<str>,
    /// The broadcast JSON, verbatim.
    payload: Box<[u8]>,
    /// Whom to tell about the confirm (or, with `persisted`, about a failure to publish).
    origin: Option<Origin>,
    /// The sender waits for the commit: listed in the envelope's `waiting`.
    persisted: bool,
    /// When the reactor accepted it: the confirm timeout counts from here.
    accepted: Instant,
}

/// A publisher thread's queue: bounded, with slots reserved before the message is accepted.
///
/// Policy when full: [`AmqpPublisher::publish`] refuses the message whole (`OVERLOADED`)
/// before any member sees it. A slot is reserved first and the in-process part is queued
/// second, so a message either reaches both or neither.
struct PublishQueue {
    tx: Sender<Job>,
    slots: Reservations,
}

impl PublishQueue {
    fn reserve(&self) -> bool {
        self.slots.reserve(self.tx.len())
    }

    fn unreserve(&self) {
        self.slots.release();
    }

    /// Sends into a reserved slot; `false` only when the thread is gone (after shutdown).
    fn send_reserved(&self, job: Job) -> bool {
        let sent = match self.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        };
        self.slots.release();
        sent
    }
}

/// When the bus's threads stop: set once by [`Bus::shutdown`] (or when the bus is dropped).
#[derive(Default)]
struct Control {
    stopping: AtomicBool,
    deadline: OnceLock<Instant>,
}

impl Control {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn past_deadline(&self) -> bool {
        self.deadline.get().is_some_and(|d| Instant::now() >= *d)
    }

    fn stop(&self, deadline: Instant) {
        let _ = self.deadline.set(deadline);
        self.stopping.store(true, Ordering::Release);
    }
}

/// The rooms this node has members in, kept for the fan-out consumer, which owns the
/// bindings.
///
/// Reactors change the counts; the consumer reads which rooms changed (`dirty`) and binds or
/// unbinds them. Both sets are bounded by the number of rooms with members (plus the rooms
/// left since the consumer last looked), so a flapping room costs nothing extra: this is why
/// the consumer is nudged rather than sent a command per change.
///
/// A connection joining a room that is not `subscribed` yet waits in `waiters` (its upgrade
/// unanswered) until the consumer has bound the room, so a member hears every message sent
/// after its upgrade, from every node. A connection that gives up takes its entry out
/// ([`Bus::leave_joining`]), so `waiters` holds only connections being upgraded now.
#[derive(Default)]
struct RoomBindings {
    /// Members (and joining connections) per room, all reactors together; a room is present
    /// while its count is above 0.
    counts: HashMap<Arc<str>, usize>,
    /// Rooms whose presence changed since the consumer last reconciled.
    dirty: HashSet<Arc<str>>,
    /// Rooms whose binding is in place and not being removed: a joiner of one of these is
    /// answered at once.
    subscribed: HashSet<Arc<str>>,
    /// Connections waiting for their room's binding.
    waiters: HashMap<Arc<str>, Vec<ReplyTo>>,
}

impl RoomBindings {
    /// Counts one more member of `room`; true when the room is new to this node.
    fn add(&mut self, room: &Arc<str>) -> bool {
        let n = self.counts.entry(room.clone()).or_insert(0);
        *n += 1;
        let new = *n == 1;
        if new {
            self.dirty.insert(room.clone());
        }
        new
    }

    /// Counts one member fewer; true when the room has none left on this node.
    fn remove(&mut self, room: &Arc<str>) -> bool {
        match self.counts.get_mut(room) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(room);
                // Whoever waited has given up (each waiter is counted).
                self.waiters.remove(room);
                self.dirty.insert(room.clone());
                true
            }
            None => false,
        }
    }

    /// The room is bound now: the connections waiting for it, to be told.
    fn bound(&mut self, room: &Arc<str>) -> Vec<ReplyTo> {
        self.subscribed.insert(room.clone());
        self.waiters.remove(room).unwrap_or_default()
    }
}

/// Which thread a health slot belongs to.
#[derive(Clone, Copy, Debug)]
enum Role {
    Publisher(usize),
    Fanout,
    Persist,
    Notices,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Publisher(i) => write!(f, "publisher {i}"),
            Role::Fanout => f.write_str("fan-out consumer"),
            Role::Persist => f.write_str("persist consumer"),
            Role::Notices => f.write_str("notice sender"),
        }
    }
}

/// What every thread of the bus shares.
struct Shared {
    settings: AmqpSettings,
    topology: Topology,
    /// Where the broker is, parsed from the URL.
    broker: link::Broker,
    breaker: BusBreaker,
    stats: AmqpStats,
    control: Control,
    /// Per thread (publishers, then fan-out, then persist): `None` while connected, else why
    /// not.
    health: Box<[Mutex<Option<String>>]>,
    rooms: Mutex<RoomBindings>,
    /// Wakes the fan-out consumer when `rooms.dirty` has news. Capacity 1: a nudge that finds
    /// it full is already pending, so none is lost and none piles up.
    nudge: Sender<()>,
    queues: Box<[PublishQueue]>,
    mailboxes: Arc<[Mailbox]>,
    /// Drawn at start; names this process in envelopes with waiting senders and in the
    /// commit notices for them (see [`envelope`]).
    epoch: u64,
    /// Commit notices for other nodes, to the notice sender (bounded; dropped when full).
    notices: Sender<notice::Notice>,
    /// Ready messages in the broker's queues, as the queue sampler last read them.
    depths: depth::QueueDepths,
}

impl Shared {
    fn health_slot(&self, role: Role) -> &Mutex<Option<String>> {
        let n = self.settings.publishers;
        let i = match role {
            Role::Publisher(i) => i,
            Role::Fanout => n,
            Role::Persist => n + 1,
            Role::Notices => n + 2,
        };
        &self.health[i]
    }

    fn set_health(&self, role: Role, why: Option<String>) {
        *self.health_slot(role).lock() = why;
    }

    /// Opens a connection for `role`, named after this node and the role in RabbitMQ's
    /// management UI.
    fn open(&self, role: Role) -> Result<amiquip::Connection, String> {
        self.broker
            .open(&format!("chatflow node {}: {role}", self.settings.node_id))
            .map_err(|e| link::scrub(&e, &self.settings.url))
    }

    /// A connection for `role` with one channel on it (what each consumer thread holds).
    pub(super) fn open_channel(
        &self,
        role: Role,
    ) -> Result<(amiquip::Connection, amiquip::Channel), String> {
        let mut conn = self.open(role)?;
        let channel = conn.open_channel(None).map_err(|e| self.describe(&e))?;
        Ok((conn, channel))
    }

    /// An amiquip error as text, with the URL's password scrubbed.
    pub(super) fn describe(&self, e: &amiquip::Error) -> String {
        link::scrub(&e.to_string(), &self.settings.url)
    }

    /// Wakes the fan-out consumer to reconcile the bindings. Full means a nudge is already
    /// pending; disconnected means the consumer has stopped.
    fn nudge_fanout(&self) {
        let _ = self.nudge.try_send(());
    }

    /// The publisher thread that carries `room`: always the same one, so a sender's messages
    /// stay in order.
    fn publisher_for(&self, room: &str) -> usize {
        let mut h = std::hash::DefaultHasher::new();
        room.hash(&mut h);
        (h.finish() % self.queues.len() as u64) as usize
    }
}

/// The RabbitMQ bus.
pub struct AmqpBus {
    shared: Arc<Shared>,
    inboxes: Arc<[Inbox]>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Longest `start` waits for every thread's first connection.
const START_WAIT: Duration = Duration::from_secs(15);

impl AmqpBus {
    /// Connects, declares the topology and starts the publisher and consumer threads; returns
    /// once every thread is connected, or why one could not connect.
    ///
    /// The node's queue left by an earlier run under the same node id is deleted first: its
    /// messages were for connections that are gone, and its bindings for rooms this run may
    /// never serve.
    pub fn start(
        settings: AmqpSettings,
        inboxes: Arc<[Inbox]>,
        mailboxes: Arc<[Mailbox]>,
        store: Arc<StoreQueue>,
        deliveries: Receiver<DeliveryOutcomes>,
    ) -> Result<AmqpBus, String> {
        if settings.publishers == 0
            || settings.batch_max == 0
            || settings.confirm_window == 0
            || settings.queue_messages == 0
            || settings.prefetch == 0
        {
            return Err("publishers, batch_max, confirm_window, queue_messages and prefetch must be at least 1".into());
        }
        let broker = link::Broker::parse(&settings.url)
            .map_err(|e| format!("bad URL {}: {e}", crate::store::redact(&settings.url)))?;
        let topology = Topology::new(&settings.namespace, &settings.node_id);
        link::prepare(&broker, &settings.node_id, &topology)
            .map_err(|e| link::scrub(&e, &settings.url))?;

        let publishers = settings.publishers;
        let per_queue = settings.queue_messages.div_ceil(publishers).max(1);
        let mut queues = Vec::with_capacity(publishers);
        let mut job_rxs = Vec::with_capacity(publishers);
        for _ in 0..publishers {
            let (tx, rx) = crossbeam_channel::bounded(per_queue);
            queues.push(PublishQueue {
                tx,
                slots: Reservations::new(per_queue),
            });
            job_rxs.push(rx);
        }
        let (nudge, nudged) = crossbeam_channel::bounded(1);
        let (notices, notices_rx) = crossbeam_channel::bounded(notice::QUEUE_NOTICES);
        let shared = Arc::new(Shared {
            broker,
            topology,
            breaker: BusBreaker::starting(publishers),
            stats: AmqpStats::new(publishers),
            control: Control::default(),
            health: (0..publishers + 3)
                .map(|_| Mutex::new(Some("not connected yet".into())))
                .collect(),
            rooms: Mutex::new(RoomBindings::default()),
            nudge,
            queues: queues.into(),
            mailboxes,
            epoch: fastrand::u64(1..),
            notices,
            depths: depth::QueueDepths::new(),
            settings,
        });
        let bus = AmqpBus {
            shared: shared.clone(),
            inboxes: inboxes.clone(),
            threads: Mutex::new(Vec::new()),
        };
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| format!("cannot start an amqp thread: {e}"))
        };
        for (i, rx) in job_rxs.into_iter().enumerate() {
            let t = publisher::PublisherThread::new(i, shared.clone(), rx);
            let handle = spawn(format!("amqp-pub-{i}"), Box::new(move || t.run()))?;
            bus.threads.lock().push(handle);
        }
        let f = fanout::FanoutThread::new(shared.clone(), inboxes, nudged);
        let handle = spawn("amqp-fanout".into(), Box::new(move || f.run()))?;
        bus.threads.lock().push(handle);
        let p = persist::PersistThread::new(shared.clone(), store, deliveries);
        let handle = spawn("amqp-persist".into(), Box::new(move || p.run()))?;
        bus.threads.lock().push(handle);
        let n = notice::NoticeThread::new(shared.clone(), notices_rx);
        let handle = spawn("amqp-notices".into(), Box::new(move || n.run()))?;
        bus.threads.lock().push(handle);
        let d = depth::DepthThread::new(shared.clone());
        let handle = spawn("amqp-depth".into(), Box::new(move || d.run()))?;
        bus.threads.lock().push(handle);

        let until = Instant::now() + START_WAIT;
        loop {
            match bus.ready() {
                Ok(()) => break,
                Err(why) if Instant::now() >= until => {
                    bus.shutdown(Duration::ZERO);
                    return Err(why);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        log::info!(
            "amqp bus on {} (namespace {:?}, node queue {}), {} publisher(s), batches of up to {}",
            crate::store::redact(&shared.settings.url),
            shared.settings.namespace,
            shared.topology.node_queue,
            publishers,
            shared.settings.batch_max
        );
        Ok(bus)
    }

    /// The breaker's state.
    pub fn breaker(&self) -> BusState {
        self.shared.breaker.state()
    }

    /// The bus's counters.
    pub fn stats(&self) -> &AmqpStats {
        &self.shared.stats
    }
}

impl Drop for AmqpBus {
    fn drop(&mut self) {
        // Without a shutdown (a failed server start), the threads stop at once; the broker
        // redelivers whatever they held.
        self.shared.control.stop(Instant::now());
    }
}

/// A reactor's publisher: this node's other reactors in process, everyone else through
/// RabbitMQ.
pub struct AmqpPublisher {
    local: LocalPublisher,
    shared: Arc<Shared>,
}

impl Publisher for AmqpPublisher {
    fn publish(&mut self, out: &Outgoing<'_>) -> Result<Accepted, PublishError> {
        let shared = &self.shared;
        if !shared.breaker.is_closed() {
            return Err(PublishError::Unavailable);
        }
        let queue = &shared.queues[shared.publisher_for(&out.fanout.room)];
        // Broker first, then local: a refusal by either leaves nothing behind.
        if !queue.reserve() {
            return Err(PublishError::Overloaded);
        }
        if let Err(e) = self.local.publish_fanout(out.fanout) {
            queue.unreserve();
            return Err(e);
        }
        let job = Job {
            room: out.fanout.room.clone(),
            payload: out.payload.into(),
            origin: out.origin,
            persisted: out.persisted,
            accepted: Instant::now(),
        };
        if !queue.send_reserved(job) {
            // Only after shutdown, when the publisher threads are gone; this node's reactors
            // have the message already, nobody else will.
            log::error!("amqp: a message was accepted after the publishers stopped");
            return Err(PublishError::Unavailable);
        }
        Ok(if out.origin.is_some() {
            Accepted::Later
        } else {
            Accepted::Now
        })
    }

    fn flush(&mut self) -> usize {
        self.local.flush_batches()
    }
}

impl Bus for AmqpBus {
    fn publisher(&self, reactor: usize) -> Box<dyn Publisher> {
        Box::new(AmqpPublisher {
            local: LocalPublisher::new(reactor, self.inboxes.clone()),
            shared: self.shared.clone(),
        })
    }

    fn ready(&self) -> Result<(), String> {
        let shared = &self.shared;
        let n = shared.settings.publishers;
        let roles = (0..n)
            .map(Role::Publisher)
            .chain([Role::Fanout, Role::Persist, Role::Notices]);
        let down: Vec<String> = roles
            .filter_map(|role| {
                let why = shared.health_slot(role).lock().clone()?;
                Some(format!("{role}: {why}"))
            })
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "rabbitmq at {} unreachable: {}",
                crate::store::redact(&shared.settings.url),
                down.join("; ")
            ))
        }
    }

    fn name(&self) -> &'static str {
        "amqp"
    }

    fn stores_messages(&self) -> bool {
        true
    }

    fn join(&self, room: &Arc<str>, joiner: ReplyTo) -> Joined {
        let (new, joined) = {
            let mut rooms = self.shared.rooms.lock();
            let new = rooms.add(room);
            if rooms.subscribed.contains(room) {
                (new, Joined::Now)
            } else {
                rooms.waiters.entry(room.clone()).or_default().push(joiner);
                (new, Joined::Later)
            }
        };
        if new {
            self.shared.nudge_fanout();
        }
        joined
    }

    fn leave(&self, room: &Arc<str>) {
        let gone = self.shared.rooms.lock().remove(room);
        if gone {
            self.shared.nudge_fanout();
        }
    }

    fn leave_joining(&self, room: &Arc<str>, joiner: ReplyTo) {
        let gone = {
            let mut rooms = self.shared.rooms.lock();
            if let Some(waiting) = rooms.waiters.get_mut(room) {
                waiting.retain(|w| *w != joiner);
            }
            rooms.remove(room)
        };
        if gone {
            self.shared.nudge_fanout();
        }
    }

    fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let s = &self.shared.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters: [(&str, &str, u64); 13] = [
            (
                "chatflow_amqp_published_total",
                "Chat messages published to RabbitMQ (republished ones count again).",
                load(&s.published),
            ),
            (
                "chatflow_amqp_envelopes_published_total",
                "AMQP messages (envelopes of up to amqp_batch_max chat messages) published.",
                load(&s.envelopes),
            ),
            (
                "chatflow_amqp_nacks_total",
                "Envelopes RabbitMQ refused (nack); their senders got UNAVAILABLE.",
                load(&s.nacks),
            ),
            (
                "chatflow_amqp_confirm_timeouts_total",
                "Chat messages not confirmed within amqp_confirm_timeout_ms; their senders got UNAVAILABLE.",
                load(&s.confirm_timeouts),
            ),
            (
                "chatflow_amqp_delivered_total",
                "Chat messages from other nodes handed to this node's reactors.",
                load(&s.delivered),
            ),
            (
                "chatflow_amqp_fanout_rejected_total",
                "Node-queue deliveries dropped because they were not a known envelope.",
                load(&s.fanout_rejected),
            ),
            (
                "chatflow_amqp_persist_deliveries_total",
                "Deliveries taken from the persist queue.",
                load(&s.persist_deliveries),
            ),
            (
                "chatflow_amqp_redeliveries_total",
                "Deliveries RabbitMQ marked as redelivered (a consumer died or its connection was lost before acking).",
                load(&s.redeliveries),
            ),
            (
                "chatflow_amqp_dead_lettered_total",
                "Persist-queue deliveries sent to the dead-letter queue because they were not a known envelope.",
                load(&s.dead_lettered),
            ),
            (
                "chatflow_amqp_reconnects_total",
                "Connections to RabbitMQ reopened after a loss.",
                load(&s.reconnects),
            ),
            (
                "chatflow_amqp_commit_notices_sent_total",
                "Senders waiting for the commit (ack_after = persisted) whose messages this node's persist consumer settled.",
                load(&s.commit_notices),
            ),
            (
                "chatflow_amqp_commit_notices_received_total",
                "Senders on this node settled by a commit notice from another node's persist consumer.",
                load(&s.notices_received),
            ),
            (
                "chatflow_amqp_commit_notices_dropped_total",
                "Senders whose commit notice was dropped (queue full, broker unreachable, or meant for an earlier process); they get UNAVAILABLE at persist_timeout_ms.",
                load(&s.notices_dropped),
            ),
        ];
        for (name, help, v) in counters {
            single(out, name, "counter", help, v);
        }
        s.confirm_seconds.render(
            out,
            "chatflow_amqp_confirm_seconds",
            "Time from publishing an envelope to RabbitMQ's confirm, seconds.",
        );
        s.envelope_messages.render(
            out,
            "chatflow_amqp_envelope_messages",
            "Chat messages per published envelope.",
        );
        single(
            out,
            "chatflow_amqp_outstanding_confirms",
            "gauge",
            "Envelopes published and not yet confirmed.",
            s.outstanding_confirms(),
        );
        single(
            out,
            "chatflow_amqp_publish_queue_depth",
            "gauge",
            "Chat messages waiting for a publisher thread.",
            self.shared.queues.iter().map(|q| q.tx.len()).sum::<usize>(),
        );
        single(
            out,
            "chatflow_amqp_bound_rooms",
            "gauge",
            "Rooms this node's fan-out queue is bound to (rooms with members here).",
            s.bound_rooms.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP chatflow_amqp_queue_ready_messages Messages ready in a RabbitMQ queue (persist: chat.persist, dlq: chat.dlq, node: this node's queue), read every {} s; no sample while unknown.",
            depth::SAMPLE_EVERY.as_secs()
        );
        let _ = writeln!(out, "# TYPE chatflow_amqp_queue_ready_messages gauge");
        for q in depth::Sampled::ALL {
            if let Some(v) = self.shared.depths.get(q) {
                let _ = writeln!(
                    out,
                    "chatflow_amqp_queue_ready_messages{{queue=\"{}\"}} {v}",
                    q.label()
                );
            }
        }
        let state = match self.shared.breaker.state() {
            BusState::Closed => 0,
            BusState::Open => 1,
            BusState::HalfOpen => 2,
        };
        single(
            out,
            "chatflow_amqp_breaker_state",
            "gauge",
            "RabbitMQ breaker: 0 closed, 1 open (messages refused with UNAVAILABLE), 2 half-open (reconnecting).",
            state,
        );
    }

    fn shutdown(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        self.shared.control.stop(until);
        let threads = std::mem::take(&mut *self.threads.lock());
        // A thread stuck in a broker call past the deadline is left behind rather than
        // holding up the process's exit; a second of grace lets connections close cleanly.
        let give_up = until + Duration::from_secs(1);
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in threads {
            if t.is_finished() {
                if t.join().is_err() {
                    log::error!("an amqp thread panicked");
                }
            } else {
                log::warn!(
                    "amqp thread {:?} did not stop in time; leaving it",
                    t.thread().name()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joiners_wait_for_the_binding_and_leavers_take_their_wait_with_them() {
        let mut rooms = RoomBindings::default();
        let room: Arc<str> = Arc::from("r");
        let joiner = |token| ReplyTo {
            reactor: 0,
            token,
            conn: token as u64,
        };
        assert!(rooms.add(&room), "new to the node");
        rooms
            .waiters
            .entry(room.clone())
            .or_default()
            .push(joiner(1));
        assert!(!rooms.add(&room), "a second member");
        rooms
            .waiters
            .entry(room.clone())
            .or_default()
            .push(joiner(2));
        assert!(rooms.dirty.contains(&room));
        assert_eq!(rooms.bound(&room), vec![joiner(1), joiner(2)]);
        assert!(rooms.subscribed.contains(&room));
        assert!(rooms.bound(&room).is_empty(), "each waiter is told once");

        // Everyone leaves before a binding is made: nobody is left waiting.
        let other: Arc<str> = Arc::from("o");
        rooms.add(&other);
        rooms
            .waiters
            .entry(other.clone())
            .or_default()
            .push(joiner(3));
        assert!(rooms.remove(&other));
        assert!(!rooms.waiters.contains_key(&other));
        assert!(!rooms.counts.contains_key(&other));
        assert!(!rooms.remove(&other), "an unknown room is left alone");
    }

    #[test]
    fn names_carry_the_namespace_and_the_node() {
        let t = Topology::new("prod.", "n1");
        assert_eq!(t.exchange, "prod.chat.exchange");
        assert_eq!(t.persist, "prod.chat.persist");
        assert_eq!(t.dlx, "prod.chat.dlx");
        assert_eq!(t.dlq, "prod.chat.dlq");
        assert_eq!(t.node_queue, "prod.chat.node.n1");
        assert_eq!(Topology::routing_key("7"), "room.7");
    }

    #[test]
    fn the_breaker_opens_on_a_loss_and_closes_when_all_are_back() {
        let b = BusBreaker::starting(2);
        assert_eq!(b.state(), BusState::Open);
        b.regained();
        b.regained();
        assert_eq!(b.state(), BusState::Closed);
        b.lost();
        assert_eq!(b.state(), BusState::Open);
        assert_eq!(b.times_opened(), 1);
        b.lost();
        assert_eq!(b.times_opened(), 1, "already open");
        b.probe(true);
        assert_eq!(b.state(), BusState::HalfOpen);
        b.probe(false);
        b.regained();
        assert!(!b.is_closed(), "one publisher is still down");
        b.regained();
        assert!(b.is_closed());
    }
}
