//! The writer pool: reactors hand accepted messages to writer threads, which store them in
//! batches and tell the senders' reactors once a batch has committed.
//!
//! - **Hand-off.** One bounded queue shared by the writers. A reactor first reserves a slot
//!   ([`StoreQueue::reserve`]), then publishes the message to the room, then sends it into the
//!   slot: a message the bus accepted always has room to be stored, and a message with no room
//!   is refused whole (`OVERLOADED`, or `UNAVAILABLE` while the breaker is open) before anyone
//!   sees it.
//! - **Batches.** A writer takes what is queued, up to `batch_max` messages, waiting at most
//!   `batch_max_age` after the first one for more; then it writes the batch in one transaction.
//! - **Failures.** A batch that fails because the store is unreachable is retried with
//!   exponential backoff until it commits (the writer holds it meanwhile, so nothing accepted
//!   is dropped; the queue fills behind it and senders are refused). A batch the store refuses
//!   is split in halves until the rows it refuses are found; those go to the dead-letter table
//!   with the reason. Repeated failures open the [`Breaker`]; it half-opens on the next retry
//!   and closes when a write succeeds.
//! - **Acks.** Only after COMMIT does a writer send each waiting sender's reactor a
//!   [`Completion`]; with `ack_after = persisted` that is when the client's ack is written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{DeadLetter, Record, Store, StoreError, StoreWriter};
use crate::bus::Reservations;
pub use crate::mailbox::Origin;
use crate::mailbox::{Completion, Mailbox, Reply};
use crate::metrics::Histogram;

/// A message on its way to the store.
#[derive(Debug)]
pub struct Persist {
    /// What to store.
    pub record: Record,
    /// Who waits for the commit (with `ack_after = persisted`).
    pub origin: Option<Origin>,
    /// The broker delivery the message came in, acknowledged to the broker after the commit.
    pub delivery: Option<DeliveryRef>,
}

/// A message's place in a broker delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryRef {
    /// The delivery, as its consumer names it.
    pub key: u64,
    /// The message's position in it.
    pub index: u32,
}

/// The fate of the messages of broker deliveries, after their batch: stored (`Ok`) or
/// dead-lettered (`Err` with what to tell a sender waiting for the commit). A message given
/// up at shutdown is not reported: the broker redelivers.
pub type DeliveryOutcomes = Vec<(DeliveryRef, Result<(), String>)>;

/// Writer pool settings.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Writer threads (capped by the store's own limit).
    pub threads: usize,
    /// Most messages in one batch.
    pub batch_max: usize,
    /// Longest a batch waits for more messages after its first.
    pub batch_max_age: Duration,
    /// Most messages queued for the writers.
    pub queue_capacity: usize,
    /// Consecutive failed writes that open the breaker.
    pub breaker_failures: u32,
    /// Longest pause between retries of a failed batch.
    pub retry_max: Duration,
}

/// The circuit breaker in front of the store, shared by the writers (who trip and reset it)
/// and the reactors and `/ready` (who read it).
#[derive(Default)]
pub struct Breaker {
    state: AtomicU8,
    failures: AtomicU32,
    opened: AtomicU64,
}

/// The breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Writes succeed.
    Closed,
    /// Writes failed repeatedly; `persisted` messages are refused.
    Open,
    /// A retry is in progress after the breaker opened.
    HalfOpen,
}

impl Breaker {
    /// The current state.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            0 => BreakerState::Closed,
            1 => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// True unless closed.
    pub fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) != 0
    }

    /// How many times the breaker has opened.
    pub fn times_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn failure(&self, threshold: u32, why: &StoreError) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= threshold && self.state.swap(1, Ordering::AcqRel) == 0 {
            self.opened.fetch_add(1, Ordering::Relaxed);
            log::error!("store breaker opened after {n} failed writes: {why}");
        }
    }

    fn probing(&self) {
        let _ = self
            .state
            .compare_exchange(1, 2, Ordering::AcqRel, Ordering::Acquire);
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.state.swap(0, Ordering::AcqRel) != 0 {
            log::warn!("store breaker closed: writes succeed again");
        }
    }
}

/// Counters of the writer pool, for `/metrics`.
#[derive(Default)]
pub struct WriterStats {
    /// Batches committed.
    pub batches: AtomicU64,
    /// Rows newly stored.
    pub rows: AtomicU64,
    /// Messages that were already stored (retries, redeliveries).
    pub duplicates: AtomicU64,
    /// Rows moved to the dead-letter table.
    pub dead_lettered: AtomicU64,
    /// Failed write attempts (each retry counts).
    pub write_errors: AtomicU64,
    /// Messages given up at shutdown because the store stayed unreachable.
    pub abandoned: AtomicU64,
    /// Messages refused because the queue was full.
    pub refused_full: AtomicU64,
    /// Housekeeping done by the store (PostgreSQL: minutes of `user_minute_batch` merged).
    pub housekeeping: AtomicU64,
    /// Housekeeping attempts that failed (logged; tried again later).
    pub housekeeping_errors: AtomicU64,
    /// Batch sizes.
    pub batch_size: Histogram,
    /// Time from the start of a write to its commit, seconds.
    pub write_seconds: Histogram,
    /// Time from a message's hand-off to its commit, seconds.
    pub commit_lag_seconds: Histogram,
}

/// Buckets for batch sizes.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 50000.0,
];
/// Buckets for write and commit latencies, seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The reactors' side of the writer pool: reserve, send, and read the breaker.
pub struct StoreQueue {
    tx: Sender<(Persist, Instant)>,
    slots: Reservations,
    /// The breaker.
    pub breaker: Breaker,
    /// Counters.
    pub stats: WriterStats,
}

impl StoreQueue {
    /// Promises one slot to a message that will be sent with [`StoreQueue::send_reserved`];
    /// false when the queue is full.
    pub fn reserve(&self) -> bool {
        let ok = self.slots.reserve(self.tx.len());
        if !ok {
            self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Gives back a slot that will not be used.
    pub fn unreserve(&self) {
        self.slots.release();
    }

    /// Sends into a reserved slot. False when the writers are gone (after shutdown).
    pub fn send_reserved(&self, p: Persist) -> bool {
        let sent = self.tx.try_send((p, Instant::now())).is_ok();
        self.unreserve();
        sent
    }

    /// Messages waiting for a writer.
    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    /// Most messages the queue holds.
    pub fn capacity(&self) -> usize {
        self.slots.capacity()
    }
}

/// The writer threads.
pub struct WriterPool {
    queue: Arc<StoreQueue>,
    /// Set by [`WriterPool::close`]: when writers stop retrying. Its presence means "closing".
    closing: Arc<OnceLock<Instant>>,
    threads: Vec<JoinHandle<()>>,
}

impl WriterPool {
    /// Starts the writers for `store`; completions go to `mailboxes` (index = reactor id), and
    /// those of broker deliveries to `deliveries`.
    pub fn start(
        store: &Arc<dyn Store>,
        options: &WriterOptions,
        mailboxes: Arc<[Mailbox]>,
        deliveries: Option<Sender<DeliveryOutcomes>>,
    ) -> Result<WriterPool, StoreError> {
        let threads = options.threads.clamp(1, store.max_writers().max(1));
        let (tx, rx) = crossbeam_channel::bounded(options.queue_capacity.max(1));
        let queue = Arc::new(StoreQueue {
            tx,
            slots: Reservations::new(options.queue_capacity.max(1)),
            breaker: Breaker::default(),
            stats: WriterStats {
                batch_size: Histogram::new(BATCH_SIZE_BUCKETS),
                write_seconds: Histogram::new(LATENCY_BUCKETS),
                commit_lag_seconds: Histogram::new(LATENCY_BUCKETS),
                ..WriterStats::default()
            },
        });
        let closing = Arc::new(OnceLock::new());
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let writer = store.writer()?;
            let mut w = Writer {
                id: i,
                store: store.clone(),
                writer,
                rx: rx.clone(),
                queue: queue.clone(),
                mailboxes: mailboxes.clone(),
                deliveries: deliveries.clone(),
                options: options.clone(),
                closing: closing.clone(),
                next_maintenance: Instant::now() + MAINTENANCE_EVERY,
            };
            let handle = std::thread::Builder::new()
                .name(format!("writer-{i}"))
                .spawn(move || w.run())
                .map_err(|e| StoreError::Unavailable(format!("cannot start a writer: {e}")))?;
            handles.push(handle);
        }
        Ok(WriterPool {
            queue,
            closing,
            threads: handles,
        })
    }

    /// The reactors' handle.
    pub fn queue(&self) -> Arc<StoreQueue> {
        self.queue.clone()
    }

    /// Writes what is queued and stops; a batch the store still refuses to take after
    /// `deadline` is given up (counted in `abandoned` and logged).
    pub fn close(self, deadline: Duration) {
        let _ = self.closing.set(Instant::now() + deadline);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

struct Writer {
    id: usize,
    store: Arc<dyn Store>,
    writer: Box<dyn StoreWriter>,
    rx: Receiver<(Persist, Instant)>,
    queue: Arc<StoreQueue>,
    mailboxes: Arc<[Mailbox]>,
    deliveries: Option<Sender<DeliveryOutcomes>>,
    options: WriterOptions,
    closing: Arc<OnceLock<Instant>>,
    /// When to ask the store for its housekeeping next ([`StoreWriter::maintain`]).
    next_maintenance: Instant,
}

/// How often each writer asks the store for its housekeeping. PostgreSQL lets one writer of
/// the deployment do it at a time and the others skip it; when nothing is due it costs a
/// millisecond.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);

/// What became of one message of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fate {
    Stored,
    DeadLettered(String),
    Abandoned(String),
}

impl Writer {
    fn run(&mut self) {
        let max = self.options.batch_max.max(1);
        let mut batch: Vec<(Persist, Instant)> = Vec::with_capacity(max.min(65_536));
        loop {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(p) => batch.push(p),
                Err(RecvTimeoutError::Timeout) => {
                    if self.closing.get().is_some() && self.rx.is_empty() {
                        break;
                    }
                    self.maintain_if_due();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let deadline = Instant::now() + self.options.batch_max_age;
            while batch.len() < max {
                match self.rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => match self.rx.recv_deadline(deadline) {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    },
                }
            }
            self.commit(&mut batch);
            self.maintain_if_due();
        }
        log::debug!("writer {} stopped", self.id);
    }

    /// The store's housekeeping, between batches, when it is due and the store is up. A
    /// failure is only logged: it changes no stored row, and it is tried again next time.
    fn maintain_if_due(&mut self) {
        let now = Instant::now();
        if now < self.next_maintenance
            || self.closing.get().is_some()
            || self.queue.breaker.is_open()
        {
            return;
        }
        self.next_maintenance = now + MAINTENANCE_EVERY;
        let stats = &self.queue.stats;
        match self.writer.maintain(time::OffsetDateTime::now_utc()) {
            Ok(0) => {}
            Ok(n) => {
                stats.housekeeping.fetch_add(n as u64, Ordering::Relaxed);
                log::debug!(
                    "writer {}: housekeeping did {n} in {:?}",
                    self.id,
                    now.elapsed()
                );
            }
            Err(e) => {
                stats.housekeeping_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("writer {}: housekeeping failed: {e}", self.id);
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<(Persist, Instant)>) {
        let records: Vec<Record> = batch.iter().map(|(p, _)| p.record.clone()).collect();
        let mut fates = vec![Fate::Stored; records.len()];
        let started = Instant::now();
        self.settle(&records, &mut fates);
        let stats = &self.queue.stats;
        stats.write_seconds.observe(started.elapsed().as_secs_f64());
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.batch_size.observe(records.len() as f64);
        let now = Instant::now();
        let mut by_reactor: HashMap<usize, Vec<Completion>> = HashMap::new();
        let mut outcomes = DeliveryOutcomes::new();
        for ((p, queued), fate) in batch.drain(..).zip(fates) {
            stats
                .commit_lag_seconds
                .observe(now.duration_since(queued).as_secs_f64());
            if let Some(d) = p.delivery {
                match &fate {
                    Fate::Stored => outcomes.push((d, Ok(()))),
                    Fate::DeadLettered(why) => outcomes.push((d, Err(refused(why)))),
                    Fate::Abandoned(_) => {}
                }
            }
            if let Some(o) = p.origin {
                let result = match fate {
                    Fate::Stored => Ok(()),
                    Fate::DeadLettered(why) => Err(refused(&why)),
                    Fate::Abandoned(why) => Err(format!(
                        "the store was unreachable until shutdown ({why}); it was not stored"
                    )),
                };
                by_reactor.entry(o.reactor).or_default().push(Completion {
                    token: o.token,
                    conn: o.conn,
                    seq: o.seq,
                    result,
                });
            }
        }
        if !outcomes.is_empty()
            && let Some(tx) = &self.deliveries
        {
            // The consumer has stopped when this fails; the broker redelivers what it holds.
            let _ = tx.send(outcomes);
        }
        for (reactor, completions) in by_reactor {
            if let Some(mailbox) = self.mailboxes.get(reactor) {
                // A reactor that has stopped no longer has anyone to ack.
                let _ = mailbox.send(Reply::Settled(completions));
            }
        }
    }

    /// Writes `rows`, retrying while the store is unreachable and splitting when it refuses
    /// rows, and records each row's fate.
    fn settle(&mut self, rows: &[Record], fates: &mut [Fate]) {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.queue.breaker.is_open() {
                self.queue.breaker.probing();
            }
            match self.writer.write(rows) {
                Ok(new) => {
                    self.queue.breaker.success();
                    let stats = &self.queue.stats;
                    stats.rows.fetch_add(new as u64, Ordering::Relaxed);
                    stats
                        .duplicates
                        .fetch_add(rows.len().saturating_sub(new) as u64, Ordering::Relaxed);
                    return;
                }
                Err(StoreError::Refused(why)) => {
                    self.queue.breaker.success();
                    if rows.len() == 1 {
                        self.dead_letter(&rows[0], &why, &mut fates[0]);
                        return;
                    }
                    let mid = rows.len() / 2;
                    let (left, right) = rows.split_at(mid);
                    let (fl, fr) = fates.split_at_mut(mid);
                    self.settle(left, fl);
                    self.settle(right, fr);
                    return;
                }
                Err(e @ StoreError::Unavailable(_)) => {
                    self.queue
                        .stats
                        .write_errors
                        .fetch_add(1, Ordering::Relaxed);
                    self.queue
                        .breaker
                        .failure(self.options.breaker_failures, &e);
                    log::warn!(
                        "writer {}: a batch of {} failed, retrying in {backoff:?}: {e}",
                        self.id,
                        rows.len()
                    );
                    if self.past_deadline() {
                        self.abandon(rows.len(), &e, fates);
                        return;
                    }
                    std::thread::sleep(jitter(backoff));
                    backoff = (backoff * 2).min(self.options.retry_max);
                    if let Ok(w) = self.store.writer() {
                        self.writer = w;
                    }
                }
            }
        }
    }

    fn dead_letter(&mut self, row: &Record, why: &str, fate: &mut Fate) {
        let letter = [DeadLetter {
            record: row.clone(),
            reason: why.to_string(),
        }];
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.writer.dead_letter(&letter) {
                Ok(()) => {
                    log::warn!(
                        "writer {}: message {} dead-lettered: {why}",
                        self.id,
                        row.message_id
                    );
                    self.queue
                        .stats
                        .dead_lettered
                        .fetch_add(1, Ordering::Relaxed);
                    *fate = Fate::DeadLettered(why.to_string());
                    return;
                }
                Err(e) => {
                    self.queue
                        .stats
                        .write_errors
                        .fetch_add(1, Ordering::Relaxed);
                    if self.past_deadline() {
                        self.abandon(1, &e, std::slice::from_mut(fate));
                        return;
                    }
                    if let StoreError::Unavailable(_) = e {
                        self.queue
                            .breaker
                            .failure(self.options.breaker_failures, &e);
                    }
                    std::thread::sleep(jitter(backoff));
                    backoff = (backoff * 2).min(self.options.retry_max);
                }
            }
        }
    }

    fn past_deadline(&self) -> bool {
        self.closing.get().is_some_and(|d| Instant::now() >= *d)
    }

    fn abandon(&mut self, n: usize, e: &StoreError, fates: &mut [Fate]) {
        log::error!(
            "writer {}: giving up {n} messages at shutdown, the store is unreachable: {e}",
            self.id
        );
        self.queue
            .stats
            .abandoned
            .fetch_add(n as u64, Ordering::Relaxed);
        for f in fates {
            *f = Fate::Abandoned(e.to_string());
        }
    }
}

/// `d` give or take a quarter, so writers that failed together do not retry together.
fn jitter(d: Duration) -> Duration {
    let quarter = d / 4;
    d - quarter + quarter.mul_f64(fastrand::f64() * 2.0)
}

/// What a sender waiting for the commit is told about a message the store refused.
fn refused(why: &str) -> String {
    format!("the store refused this message ({why}); it was not stored")
}
