//! The queue sampler: every [`SAMPLE_EVERY`], reads how many messages are ready in
//! `chat.persist`, `chat.dlq` and this node's queue, for `/metrics`.
//!
//! It asks the broker with passive declares (`queue.declare` with `passive`: the queue's
//! counts, nothing created or changed) on a connection of its own, so a slow broker delays
//! only the figures, never a publish, a delivery or an ack. A figure that could not be read
//! (the broker is unreachable, the queue does not exist yet) is left out of `/metrics`, and
//! so is one older than two rounds (a broker call that hangs), instead of repeating an old
//! figure. The node's own queue is read only while the fan-out consumer is connected (it
//! declares that queue; before that, and while it is being recreated, a passive declare
//! would only fail). The sampler does not count towards `/ready`: the other threads already
//! say when the broker is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection};
use parking_lot::Mutex;

use super::link::{self, Backoff};
use super::{Role, Shared, Topology};

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

    /// The queue's name in `topology`.
    fn queue(self, topology: &Topology) -> &str {
        match self {
            Sampled::Persist => &topology.persist,
            Sampled::Dlq => &topology.dlq,
            Sampled::Node => &topology.node_queue,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A figure older than this is not shown: two rounds, so one slow round does not blank it.
const FRESH_FOR: Duration = Duration::from_secs(2 * SAMPLE_EVERY.as_secs());

/// The last figures read, with when they were read.
pub(super) struct QueueDepths {
    ready: Mutex<[Option<(u32, Instant)>; 3]>,
}

impl QueueDepths {
    pub(super) fn new() -> QueueDepths {
        QueueDepths {
            ready: Mutex::new([None; 3]),
        }
    }

    /// Ready messages in `queue`, if a read in the last [`FRESH_FOR`] gave them.
    pub(super) fn get(&self, queue: Sampled) -> Option<u64> {
        let (n, at) = self.ready.lock()[queue.index()]?;
        (at.elapsed() <= FRESH_FOR).then_some(u64::from(n))
    }

    fn set(&self, queue: Sampled, ready: Option<u32>) {
        self.ready.lock()[queue.index()] = ready.map(|n| (n, Instant::now()));
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
            let mut all_read = true;
            for queue in Sampled::ALL {
                if shared.control.stopping() {
                    return None;
                }
                if queue == Sampled::Node && shared.health_slot(Role::Fanout).lock().is_some() {
                    shared.depths.set(queue, None);
                    continue;
                }
                let ch = match channel.as_ref() {
                    Some(ch) => ch,
                    None => match conn.open_channel(None) {
                        Ok(ch) => channel.insert(ch),
                        Err(e) => return Some(shared.describe(&e)),
                    },
                };
                let name = queue.queue(&shared.topology);
                let read = ch
                    .queue_declare_passive(name)
                    .map(|q| q.declared_message_count());
                match read {
                    Ok(ready) => shared.depths.set(queue, ready),
                    Err(e) => {
                        // A missing queue closes the channel (404); open another for the
                        // next one. A lost connection fails that open and ends the session.
                        log::debug!("amqp queue sampler: {name}: {}", shared.describe(&e));
                        shared.depths.set(queue, None);
                        channel = None;
                        all_read = false;
                    }
                }
            }
            if all_read {
                // Only a round that worked resets the backoff, so a connection that opens
                // but cannot serve a channel is not retried every 100 ms.
                self.backoff.reset();
            }
        }
    }
}
