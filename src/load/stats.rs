//! What a load thread counts in one phase, and how the threads' counts are merged.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use crate::protocol::ErrorCode;

/// Latencies are recorded in nanoseconds up to ten minutes (a message can wait through five
/// retries and their ack timeouts), with 3 significant digits.
pub(crate) const HIST_MAX_NS: u64 = 600_000_000_000;
/// Per-bucket latency histograms are coarser (microseconds, 2 digits): there is one per
/// throughput bucket, and a long run has many.
const BUCKET_HIST_MAX_US: u64 = 600_000_000;

/// The resolution of the throughput timeline: fine enough to draw a one-second run, coarse
/// enough that an hour costs 36,000 entries.
pub(crate) const TICK_NS: u64 = 100_000_000;

pub(crate) fn latency_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts: failing here is a bug in this file.
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("constant histogram bounds are valid")
}

fn bucket_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, BUCKET_HIST_MAX_US, 2)
        .expect("constant histogram bounds are valid")
}

/// How a message ended, as the per-message CSV spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// The server refused it with one of the protocol's error codes.
    Refused(ErrorCode),
    /// An error code this tester does not know.
    OtherError,
    /// The last attempt's connection broke before an answer.
    ConnectionLost,
    /// The last attempt got no answer within `--ack-timeout-ms`.
    Timeout,
    /// No connection of the message's room could be opened.
    NoConnection,
    /// Still unanswered when the run ended.
    Unanswered,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Refused(code) => code.as_str(),
            Outcome::OtherError => "ERROR",
            Outcome::ConnectionLost => "CONNECTION_LOST",
            Outcome::Timeout => "TIMEOUT",
            Outcome::NoConnection => "NO_CONNECTION",
            Outcome::Unanswered => "UNANSWERED",
        }
    }

    /// The outcome for a server error code.
    pub(crate) fn from_code(code: &str) -> Outcome {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == code)
            .map_or(Outcome::OtherError, Outcome::Refused)
    }
}

/// One row of the per-message CSV, kept compact: a run can have millions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    /// When the message was (first) meant to go, in microseconds since the Unix epoch.
    pub unix_us: u64,
    /// Send to answer (or to giving up), microseconds, saturating.
    pub latency_us: u32,
    pub room: u32,
    pub outcome: Outcome,
    /// Index in `MessageType::ALL`.
    pub kind: u8,
}

/// Distinct error codes kept by name; a server inventing endless codes cannot grow our maps.
const MAX_CODES: usize = 64;

/// Adds one to `map[key]`, folding keys past `MAX_CODES` into "(other)".
pub(crate) fn count_code(map: &mut BTreeMap<String, u64>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else if map.len() < MAX_CODES {
        map.insert(key.to_string(), 1);
    } else {
        *map.entry("(other)".to_string()).or_default() += 1;
    }
}

/// Counts of one load thread in one phase (merged over threads by the coordinator).
pub(crate) struct PhaseStats {
    /// Messages taken from the generator.
    pub taken: u64,
    /// Messages sent at least once. At the end `sent == acked + failed`.
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    /// Resends after an error, a broken connection or a timeout.
    pub retries: u64,
    /// Taken from the generator but never sent: a duration run ended first.
    pub unsent: u64,
    /// WebSocket upgrades that succeeded, first ones and reconnections.
    pub connections_opened: u64,
    pub reconnections: u64,
    /// Connection attempts that failed (refused, timed out, upgrade refused).
    pub connect_failures: u64,
    /// Open connections that broke, the server's close included.
    pub disconnects: u64,
    /// Connections dropped by us because an answer was overdue.
    pub ack_timeouts: u64,
    /// `message` frames received (broadcasts of the room's messages).
    pub deliveries: u64,
    /// `error` frames received, by code.
    pub error_frames: BTreeMap<String, u64>,
    /// Failed messages by final outcome.
    pub failed_by: BTreeMap<String, u64>,
    /// Connection failures by reason.
    pub connect_errors: BTreeMap<String, u64>,
    /// Frames that were neither ack, message nor error, or not valid UTF-8 text.
    pub other_frames: u64,
    /// Answers that matched none of the connection's unanswered messages (duplicates).
    pub unmatched_answers: u64,
    /// Error frames without one of our ids on a connection whose server echoes ids: about no
    /// message we can name, so charged to none.
    pub unmatched_errors: u64,
    /// Open loop, duration run: messages due before the end that were never sent.
    pub late_unsent: u64,
    /// ... and the longest any of them had waited at the end, ns.
    pub late_unsent_max_wait_ns: u64,
    /// Send to ack, nanoseconds (from the intended send time of the first attempt).
    pub ack_latency: Histogram<u64>,
    /// Send to receipt at each member (fan-out phases).
    pub delivery_latency: Histogram<u64>,
    /// Open loop: how late first sends left against the schedule.
    pub schedule_lag: Histogram<u64>,
    /// Acked messages per room index.
    pub per_room: Vec<u64>,
    /// Sent messages per type (index in `MessageType::ALL`).
    pub per_type: [u64; 3],
    /// Per tick (`TICK_NS`) since the phase start: (acked, failed).
    pub per_tick: Vec<[u64; 2]>,
    /// Per throughput bucket since the phase start: ack latency (microseconds).
    pub bucket_latency: Vec<Histogram<u32>>,
    /// First and last actual first-send times (ns on the run clock); for the achieved rate.
    pub first_send_ns: u64,
    pub last_send_ns: u64,
    /// When this thread's last message was answered or given up (ns on the run clock).
    pub finished_ns: u64,
    /// CPU seconds this load thread used between the start signal and its end.
    pub thread_cpu_s: f64,
    /// Connections open when this thread was done (idle mode: at the end of the hold).
    pub open_at_end: u64,
    /// Per-message rows the CSV writer could not take in time (dropped, counted).
    pub records_dropped: u64,
}

impl PhaseStats {
    pub(crate) fn new(rooms: usize) -> Self {
        PhaseStats {
            taken: 0,
            sent: 0,
            acked: 0,
            failed: 0,
            retries: 0,
            unsent: 0,
            connections_opened: 0,
            reconnections: 0,
            connect_failures: 0,
            disconnects: 0,
            ack_timeouts: 0,
            deliveries: 0,
            error_frames: BTreeMap::new(),
            failed_by: BTreeMap::new(),
            connect_errors: BTreeMap::new(),
            other_frames: 0,
            unmatched_answers: 0,
            unmatched_errors: 0,
            late_unsent: 0,
            late_unsent_max_wait_ns: 0,
            ack_latency: latency_histogram(),
            delivery_latency: latency_histogram(),
            schedule_lag: latency_histogram(),
            per_room: vec![0; rooms],
            per_type: [0; 3],
            per_tick: Vec::new(),
            bucket_latency: Vec::new(),
            first_send_ns: u64::MAX,
            last_send_ns: 0,
            finished_ns: 0,
            thread_cpu_s: 0.0,
            open_at_end: 0,
            records_dropped: 0,
        }
    }

    /// Counts one answer or failure at `offset_ns` after the phase start.
    pub(crate) fn on_resolved(
        &mut self,
        offset_ns: u64,
        ok: bool,
        latency_ns: u64,
        bucket_secs: u64,
    ) {
        let tick = (offset_ns / TICK_NS) as usize;
        if self.per_tick.len() <= tick {
            self.per_tick.resize(tick + 1, [0, 0]);
        }
        self.per_tick[tick][usize::from(!ok)] += 1;
        if ok {
            let b = (offset_ns / (bucket_secs.max(1) * 1_000_000_000)) as usize;
            while self.bucket_latency.len() <= b {
                self.bucket_latency.push(bucket_histogram());
            }
            self.bucket_latency[b].saturating_record((latency_ns / 1000).max(1));
        }
    }

    pub(crate) fn merge(&mut self, o: PhaseStats) {
        self.taken += o.taken;
        self.sent += o.sent;
        self.acked += o.acked;
        self.failed += o.failed;
        self.retries += o.retries;
        self.unsent += o.unsent;
        self.connections_opened += o.connections_opened;
        self.reconnections += o.reconnections;
        self.connect_failures += o.connect_failures;
        self.disconnects += o.disconnects;
        self.ack_timeouts += o.ack_timeouts;
        self.deliveries += o.deliveries;
        for (map, other) in [
            (&mut self.error_frames, o.error_frames),
            (&mut self.failed_by, o.failed_by),
            (&mut self.connect_errors, o.connect_errors),
        ] {
            for (k, v) in other {
                *map.entry(k).or_default() += v;
            }
        }
        self.other_frames += o.other_frames;
        self.unmatched_answers += o.unmatched_answers;
        self.unmatched_errors += o.unmatched_errors;
        self.late_unsent += o.late_unsent;
        self.late_unsent_max_wait_ns = self.late_unsent_max_wait_ns.max(o.late_unsent_max_wait_ns);
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.ack_latency.add(&o.ack_latency);
        let _ = self.delivery_latency.add(&o.delivery_latency);
        let _ = self.schedule_lag.add(&o.schedule_lag);
        if self.per_room.len() < o.per_room.len() {
            self.per_room.resize(o.per_room.len(), 0);
        }
        for (a, b) in self.per_room.iter_mut().zip(o.per_room) {
            *a += b;
        }
        for (a, b) in self.per_type.iter_mut().zip(o.per_type) {
            *a += b;
        }
        if self.per_tick.len() < o.per_tick.len() {
            self.per_tick.resize(o.per_tick.len(), [0, 0]);
        }
        for (a, b) in self.per_tick.iter_mut().zip(o.per_tick) {
            a[0] += b[0];
            a[1] += b[1];
        }
        for (i, h) in o.bucket_latency.into_iter().enumerate() {
            if i < self.bucket_latency.len() {
                let _ = self.bucket_latency[i].add(&h);
            } else {
                self.bucket_latency.push(h);
            }
        }
        self.first_send_ns = self.first_send_ns.min(o.first_send_ns);
        self.last_send_ns = self.last_send_ns.max(o.last_send_ns);
        self.finished_ns = self.finished_ns.max(o.finished_ns);
        self.thread_cpu_s += o.thread_cpu_s;
        self.open_at_end += o.open_at_end;
        self.records_dropped += o.records_dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_server_codes_and_unknown_ones() {
        assert_eq!(
            Outcome::from_code("OVERLOADED"),
            Outcome::Refused(ErrorCode::Overloaded)
        );
        assert_eq!(Outcome::from_code("OK"), Outcome::OtherError);
        assert_eq!(Outcome::from_code("NEW_THING"), Outcome::OtherError);
        assert_eq!(Outcome::from_code("TIMEOUT"), Outcome::OtherError);
    }

    #[test]
    fn merging_adds_counts_histograms_and_timelines() {
        let mut a = PhaseStats::new(2);
        let mut b = PhaseStats::new(2);
        a.acked = 3;
        b.acked = 4;
        a.per_room[0] = 1;
        b.per_room[1] = 2;
        a.on_resolved(500_000_000, true, 1_000_000, 10);
        b.on_resolved(12_000_000_000, false, 1_000_000, 10);
        b.on_resolved(12_000_000_000, true, 2_000_000, 10);
        count_code(&mut b.failed_by, "TIMEOUT");
        a.merge(b);
        assert_eq!(a.acked, 7);
        assert_eq!(a.per_room, vec![1, 2]);
        assert_eq!(a.per_tick.len(), 121);
        assert_eq!(a.per_tick[5], [1, 0]);
        assert_eq!(a.per_tick[120], [1, 1]);
        assert_eq!(a.bucket_latency.len(), 2);
        assert_eq!(a.bucket_latency[1].len(), 1);
        assert_eq!(a.failed_by.get("TIMEOUT"), Some(&1));
    }

    #[test]
    fn code_maps_stay_bounded() {
        let mut m = BTreeMap::new();
        for i in 0..1000 {
            count_code(&mut m, &format!("C{i}"));
        }
        assert_eq!(m.len(), MAX_CODES + 1);
        assert_eq!(m.get("(other)"), Some(&(1000 - MAX_CODES as u64)));
    }
}
