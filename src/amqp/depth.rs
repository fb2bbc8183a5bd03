//! The queue sampler: every [`SAMPLE_EVERY`], reads how many messages are ready in
//! `chat.persist`, `chat.dlq` and this node's queue, for `/metrics`.
//!
//! It asks the broker with passive declares (`queue.declare` with `passive`: the queue's
//! counts, nothing created or changed) on a connection of its own, so a slow broker delays
//! only the figures, never a publish, a delivery or an ack. A figure that could not be read
//! (the broker is unreachable, the queue does not exist yet) is left out of `/metrics`
//! instead of repeating an old one. The sampler does not count towards `/ready`: the other
//! threads already say when the broker is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection};

use super::Shared;
use super::link::{self, Backoff};

/// How often the queues are read.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Longest wait in one turn, so shutdown is noticed.
const TICK: Duration = Duration::from_millis(100);

/// The sampled queues, in the order they are read and rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sampled {
    Persist,
    Dlq,
    Node,
}

impl Sampled {
    pub(super) const ALL: [Sampled; 3] = [Sampled::Persist, Sampled::Dlq, Sampled::Node];

    /// The `queue` label of the metric.
    pub(super) fn label(self) -> &'static str {
        match self {
            Sampled::Persist => "persist",
            Sampled::Dlq => "dlq",
            Sampled::Node => "node",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The last figures read; -1 when unknown.
pub(super) struct QueueDepths {
    ready: [AtomicI64; 3],
}

impl QueueDepths {
    pub(super) fn new() -> QueueDepths {
        QueueDepths {
            ready: [AtomicI64::new(-1), AtomicI64::new(-1), AtomicI64::new(-1)],
        }
    }

    /// Ready messages in `queue` at the last sample, if it could be read.
    pub(super) fn get(&self, queue: Sampled) -> Option<u64> {
        u64::try_from(self.ready[queue.index()].load(Ordering::Relaxed)).ok()
    }

    fn set(&self, queue: Sampled, ready: Option<u32>) {
        let v = ready.map_or(-1, i64::from);
        self.ready[queue.index()].store(v, Ordering::Relaxed);
    }

    fn forget(&self) {
        for q in Sampled::ALL {
            self.set(q, None);
        }
    }
}

pub(super) struct DepthThread {
    shared: Arc<Shared>,
    backoff: Backoff,
}

impl DepthThread {
    pub(super) fn new(shared: Arc<Shared>) -> DepthThread {
        DepthThread {
            shared,
            backoff: Backoff::new(),
        }
    }

    pub(super) fn run(mut self) {
        let shared = self.shared.clone();
        let name = format!("chatflow node {}: queue sampler", shared.settings.node_id);
        while !shared.control.stopping() {
            let mut conn = match shared.broker.open(&name) {
                Ok(c) => c,
                Err(why) => {
                    log::debug!(
                        "amqp queue sampler: connect failed: {}",
                        link::scrub(&why, &shared.settings.url)
                    );
                    shared.depths.forget();
                    self.backoff.wait(&shared.control, |c| c.stopping());
                    continue;
                }
            };
            self.backoff.reset();
            let why = self.session(&mut conn);
            shared.depths.forget();
            if let Err(e) = conn.close() {
                log::debug!("amqp queue sampler: close: {e}");
            }
            match why {
                None => break,
                Some(why) => {
                    log::debug!("amqp queue sampler: connection lost ({why}); reconnecting");
                    self.backoff.wait(&shared.control, |c| c.stopping());
                }
            }
        }
        log::debug!("amqp queue sampler stopped");
    }

    /// Samples until shutdown (`None`) or until the connection fails (`Some(why)`).
    fn session(&mut self, conn: &mut Connection) -> Option<String> {
        let shared = self.shared.clone();
        let mut channel: Option<Channel> = None;
        let mut next = Instant::now();
        loop {
            if shared.control.stopping() {
                return None;
            }
            let now = Instant::now();
            if now < next {
                std::thread::sleep(TICK.min(next - now));
                continue;
            }
            next = now + SAMPLE_EVERY;
            for queue in Sampled::ALL {
                let ch = match channel.as_ref() {
                    Some(ch) => ch,
                    None => match conn.open_channel(None) {
                        Ok(ch) => channel.insert(ch),
                        Err(e) => return Some(shared.describe(&e)),
                    },
                };
                let name = match queue {
                    Sampled::Persist => &shared.topology.persist,
                    Sampled::Dlq => &shared.topology.dlq,
                    Sampled::Node => &shared.topology.node_queue,
                };
                let read = ch
                    .queue_declare_passive(name.as_str())
                    .map(|q| q.declared_message_count());
                match read {
                    Ok(ready) => shared.depths.set(queue, ready),
                    Err(e) => {
                        // A missing queue closes the channel (404); open another for the
                        // next one. A lost connection fails that open and ends the session.
                        log::debug!("amqp queue sampler: {name}: {}", shared.describe(&e));
                        shared.depths.set(queue, None);
                        channel = None;
                    }
                }
            }
        }
    }
}
