//! The message generator: one thread that makes the workload of PROTOCOL.md §6 and hands it
//! to the load threads through bounded queues, so senders never wait for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Sender, TrySendError};

pub(crate) use crate::protocol::MessageType;

/// The 50 message bodies (PROTOCOL.md §6: "message from a pool of 50"). Plain ASCII without
/// quotes or backslashes, so they go into the JSON as they are.
pub(crate) const TEXTS: [&str; 50] = [
    "hello room",
    "good morning everyone",
    "how is it going",
    "anyone here",
    "just joined",
    "back in five minutes",
    "that build is green again",
    "lunch at noon",
    "see you tomorrow",
    "nice work on the release",
    "who is on call tonight",
    "the deploy finished",
    "can someone review my change",
    "coffee break",
    "thanks a lot",
    "sounds good to me",
    "let me check",
    "I will take a look",
    "meeting moved to three",
    "the numbers look right",
    "great idea",
    "not sure about that",
    "give me a minute",
    "on my way",
    "happy friday",
    "the tests pass locally",
    "is the server up",
    "latency looks fine",
    "throughput doubled",
    "p99 went down",
    "restarting the node",
    "queue depth is zero",
    "ack received",
    "who broke main",
    "rolling back now",
    "all clear",
    "welcome aboard",
    "checking the logs",
    "that was fast",
    "try it again",
    "works for me",
    "merged",
    "shipping it",
    "one more thing",
    "see the dashboard",
    "reading the flamegraph",
    "the cache is warm",
    "good night",
    "brb",
    "ok",
];

/// Highest userId the protocol accepts (PROTOCOL.md §2).
pub(crate) const MAX_USER_ID: u32 = 100_000;

/// One message to send. Small and `Copy`: hundreds of thousands a second cross the queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Msg {
    /// Unique in the run; part of the `clientMessageId`.
    pub seq: u64,
    /// Position in its phase: the open-loop schedule sends it at `start + index / rate`.
    pub index: u64,
    /// 1..=100000, uniform.
    pub user: u32,
    /// Index into the phase's room names.
    pub room: u32,
    /// Index into [`TEXTS`].
    pub text: u8,
    pub kind: MessageType,
}

/// How a generated message is drawn.
#[derive(Debug, Clone)]
pub(crate) struct Mix {
    /// Rooms to draw from (uniform); the phase maps indexes to names.
    pub rooms: u32,
    /// Percent TEXT, then JOIN; LEAVE gets the rest.
    pub text_pct: u32,
    pub join_pct: u32,
}

impl Mix {
    /// PROTOCOL.md §6: 90% TEXT, 5% JOIN, 5% LEAVE.
    pub(crate) fn standard(rooms: u32) -> Mix {
        Mix {
            rooms,
            text_pct: 90,
            join_pct: 5,
        }
    }

    pub(crate) fn draw(&self, rng: &mut fastrand::Rng, seq: u64, index: u64) -> Msg {
        let roll = rng.u32(0..100);
        let kind = if roll < self.text_pct {
            MessageType::Text
        } else if roll < self.text_pct + self.join_pct {
            MessageType::Join
        } else {
            MessageType::Leave
        };
        Msg {
            seq,
            index,
            user: rng.u32(1..=MAX_USER_ID),
            room: rng.u32(0..self.rooms.max(1)),
            text: rng.u8(0..TEXTS.len() as u8),
            kind,
        }
    }
}

/// Messages per queue item: one channel operation per batch, not per message, keeps the
/// hand-off far below the cost of sending.
pub(crate) const BATCH: usize = 256;
/// Batches each load thread's queue holds: 64 x 256 = 16,384 messages ready to go. Full means
/// the load thread is behind and the generator waits; the load thread never waits unless the
/// generator is done.
pub(crate) const QUEUE_BATCHES: usize = 64;

/// Where the generator sends each message: `routes[room]` lists the load threads that have a
/// sending connection in that room; messages of a room go round-robin among them.
pub(crate) struct Routes {
    pub by_room: Vec<Vec<usize>>,
}

/// What the generator makes for one phase.
pub(crate) struct GeneratorPlan {
    pub mix: Mix,
    /// Exact count, or None to run until `stop` is set (duration runs).
    pub total: Option<u64>,
    /// First `seq` of this phase.
    pub first_seq: u64,
    pub seed: u64,
}

/// Runs on its own thread: draws messages and fills the per-thread queues. Returns when the
/// count is reached, `stop` is set, or every load thread has hung up; dropping the senders
/// then tells each load thread that no more messages will come.
pub(crate) fn generate(
    plan: GeneratorPlan,
    routes: Routes,
    queues: Vec<Sender<Vec<Msg>>>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let mut batches: Vec<Vec<Msg>> = queues.iter().map(|_| Vec::with_capacity(BATCH)).collect();
    let mut next_route = vec![0usize; routes.by_room.len()];
    let mut alive: Vec<bool> = vec![true; queues.len()];
    let mut index = 0u64;
    loop {
        if plan.total.is_some_and(|t| index >= t) || stop.load(Ordering::Relaxed) {
            break;
        }
        let msg = plan.mix.draw(&mut rng, plan.first_seq + index, index);
        index += 1;
        let Some(threads) = routes.by_room.get(msg.room as usize) else {
            continue;
        };
        if threads.is_empty() {
            continue;
        }
        let slot = &mut next_route[msg.room as usize];
        let thread = threads[*slot % threads.len()];
        *slot = slot.wrapping_add(1);
        batches[thread].push(msg);
        if batches[thread].len() >= BATCH {
            let full = std::mem::replace(&mut batches[thread], Vec::with_capacity(BATCH));
            if !push(&queues[thread], full, &stop) {
                alive[thread] = false;
                if !alive.iter().any(|a| *a) {
                    return;
                }
            }
        }
    }
    for (thread, batch) in batches.into_iter().enumerate() {
        if !batch.is_empty() && alive[thread] {
            push(&queues[thread], batch, &stop);
        }
    }
}

/// Hands a batch over, waiting while the queue is full (the load thread is ahead of us only
/// when it is idle). False if the load thread is gone or the phase was stopped.
fn push(queue: &Sender<Vec<Msg>>, batch: Vec<Msg>, stop: &AtomicBool) -> bool {
    let mut batch = batch;
    loop {
        match queue.try_send(batch) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(b)) => {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                batch = b;
                // A bounded wait, so a stop request is seen within a millisecond.
                match queue.send_timeout(batch, std::time::Duration::from_millis(1)) {
                    Ok(()) => return true,
                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return false,
                    Err(crossbeam_channel::SendTimeoutError::Timeout(b)) => batch = b,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_mix_is_90_5_5_over_20_rooms_and_valid_users() {
        let mix = Mix::standard(20);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut types = [0u32; 3];
        let mut rooms = [0u32; 20];
        for i in 0..100_000 {
            let m = mix.draw(&mut rng, i, i);
            types[m.kind.index()] += 1;
            rooms[m.room as usize] += 1;
            assert!((1..=MAX_USER_ID).contains(&m.user));
            assert!(usize::from(m.text) < TEXTS.len());
        }
        assert!((89_000..91_000).contains(&types[0]), "{types:?}");
        assert!((4_500..5_500).contains(&types[1]), "{types:?}");
        assert!((4_500..5_500).contains(&types[2]), "{types:?}");
        assert!(
            rooms.iter().all(|&n| (4_500..5_500).contains(&n)),
            "{rooms:?}"
        );
    }

    #[test]
    fn the_generator_makes_exactly_the_count_and_routes_by_room() {
        let (tx0, rx0) = crossbeam_channel::bounded(QUEUE_BATCHES);
        let (tx1, rx1) = crossbeam_channel::bounded(QUEUE_BATCHES);
        let plan = GeneratorPlan {
            mix: Mix::standard(2),
            total: Some(10_001),
            first_seq: 5,
            seed: 1,
        };
        let routes = Routes {
            by_room: vec![vec![0], vec![1]],
        };
        let stop = Arc::new(AtomicBool::new(false));
        let h = std::thread::spawn(move || generate(plan, routes, vec![tx0, tx1], stop));
        let mut seen = Vec::new();
        for (thread, rx) in [rx0, rx1].into_iter().enumerate() {
            for batch in rx.iter() {
                for m in batch {
                    assert_eq!(m.room as usize, thread);
                    seen.push(m.seq);
                }
            }
        }
        h.join().expect("generator");
        seen.sort_unstable();
        assert_eq!(seen, (5..10_006).collect::<Vec<_>>());
    }
}
