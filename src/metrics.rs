//! Counters kept by each reactor and their Prometheus text rendering for `GET /metrics`.
//!
//! Each reactor owns one [`ReactorStats`] and is its only writer, so a bump is a plain load and
//! store (no locked instruction, no shared cache line between reactors). Readers sum them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crossbeam_utils::CachePadded;

use crate::protocol::{ErrorCode, MessageType};

/// Why a connection ended. Each is one label value of `chatflow_disconnects_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disconnect {
    /// The client completed the close handshake.
    ClientClose,
    /// The socket ended without a close handshake (EOF, reset, write error).
    PeerGone,
    /// The client broke RFC 6455 (closed with 1002).
    ProtocolError,
    /// A text message was not UTF-8 (closed with 1007).
    InvalidUtf8,
    /// A message was over `max_message_bytes` (closed with 1009).
    MessageTooLarge,
    /// The client did not read its output fast enough.
    SlowConsumer,
    /// Nothing received for `idle_timeout_ms`.
    IdleTimeout,
    /// The HTTP request or upgrade did not complete in `handshake_timeout_ms`.
    HandshakeTimeout,
    /// The request was not a valid HTTP request or upgrade.
    BadRequest,
    /// The server is shutting down (closed with 1001).
    Shutdown,
    /// The session's access token expired (closed with 1008).
    TokenExpired,
}

impl Disconnect {
    /// Every reason, in label order.
    pub const ALL: [Disconnect; 11] = [
        Disconnect::ClientClose,
        Disconnect::PeerGone,
        Disconnect::ProtocolError,
        Disconnect::InvalidUtf8,
        Disconnect::MessageTooLarge,
        Disconnect::SlowConsumer,
        Disconnect::IdleTimeout,
        Disconnect::HandshakeTimeout,
        Disconnect::BadRequest,
        Disconnect::Shutdown,
        Disconnect::TokenExpired,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Disconnect::ClientClose => "client_close",
            Disconnect::PeerGone => "peer_gone",
            Disconnect::ProtocolError => "protocol_error",
            Disconnect::InvalidUtf8 => "invalid_utf8",
            Disconnect::MessageTooLarge => "message_too_large",
            Disconnect::SlowConsumer => "slow_consumer",
            Disconnect::IdleTimeout => "idle_timeout",
            Disconnect::HandshakeTimeout => "handshake_timeout",
            Disconnect::BadRequest => "bad_request",
            Disconnect::Shutdown => "shutdown",
            Disconnect::TokenExpired => "token_expired",
        }
    }
}

/// A counter or gauge written by one thread only.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning reactor calls this, so load + store cannot lose updates.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    /// Reads the value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// One reactor's counters and gauges.
#[derive(Default, Debug)]
pub struct ReactorStats {
    /// Gauge: connections in any state.
    pub connections: Counter,
    /// Gauge: open WebSocket sessions.
    pub websockets: Counter,
    /// Connections accepted.
    pub accepted: Counter,
    /// accept() failures other than WouldBlock.
    pub accept_errors: Counter,
    /// Times accepting paused at the connection limit or on EMFILE.
    pub accept_paused: Counter,
    /// Completed WebSocket upgrades.
    pub upgrades: Counter,
    /// Upgrades that waited for the bus to subscribe the node to their room.
    pub joins_waited: Counter,
    /// HTTP requests answered (not upgrades), by status class index 2..=5.
    pub http_responses: [Counter; 4],
    /// WebSocket frames received (data and control).
    pub frames_in: Counter,
    /// Frames queued to clients.
    pub frames_out: Counter,
    /// Bytes read from sockets.
    pub bytes_in: Counter,
    /// Bytes written to sockets.
    pub bytes_out: Counter,
    /// Accepted chat messages by type.
    pub messages: [Counter; 3],
    /// Acks sent.
    pub acks: Counter,
    /// Error frames by code.
    pub errors: [Counter; 8],
    /// Broadcast frames queued to room members on this reactor.
    pub fanout_deliveries: Counter,
    /// Broadcasts lost because their target reactor had stopped (only during shutdown).
    pub fanout_dropped: Counter,
    /// JOINs not recorded because presence was full.
    pub presence_dropped: Counter,
    /// Ended connections by reason.
    pub disconnects: [Counter; 11],
    /// Gauge: bytes queued to clients on this reactor.
    pub queued_bytes: Counter,
    /// Gauge: rooms with members on this reactor.
    pub rooms: Counter,
}

impl ReactorStats {
    /// Counts an accepted message.
    pub fn message(&self, t: MessageType) {
        self.messages[t.index()].inc();
    }

    /// Counts an error frame.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code.index()].inc();
    }

    /// Counts an ended connection.
    pub fn disconnect(&self, why: Disconnect) {
        self.disconnects[why as usize].inc();
    }

    /// Counts an HTTP response by status.
    pub fn http_response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(2, 5) - 2;
        self.http_responses[class].inc();
    }
}

/// Per-reactor stats, padded so two reactors never share a cache line.
pub type SharedStats = CachePadded<ReactorStats>;

/// Values the renderer needs besides the reactors' counters.
pub struct NodeGauges<'a> {
    /// The node id label.
    pub node_id: &'a str,
    /// Depth of each reactor's incoming broadcast queue (batches).
    pub reactor_queue_depths: Vec<usize>,
    /// Capacity of each reactor's queue.
    pub reactor_queue_capacity: usize,
    /// (room, user) pairs in presence.
    pub presence_entries: usize,
    /// Process uptime in seconds.
    pub uptime_secs: f64,
    /// True while shutting down.
    pub draining: bool,
}

/// A metric that is one summed counter: name, type, help, and which field.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ReactorStats) -> &Counter,
);

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sum(stats: &[&ReactorStats], f: impl Fn(&ReactorStats) -> &Counter) -> u64 {
    stats.iter().map(|s| f(s).get()).sum()
}

/// Renders every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render(stats: &[&ReactorStats], node: &NodeGauges<'_>) -> String {
    let mut out = String::with_capacity(8192);
    let simple: [Family; 15] = [
        (
            "chatflow_connections",
            "gauge",
            "Open connections in any state.",
            |s| &s.connections,
        ),
        (
            "chatflow_websockets",
            "gauge",
            "Open WebSocket sessions.",
            |s| &s.websockets,
        ),
        (
            "chatflow_connections_accepted_total",
            "counter",
            "TCP connections accepted.",
            |s| &s.accepted,
        ),
        (
            "chatflow_accept_errors_total",
            "counter",
            "accept() failures (EMFILE and others).",
            |s| &s.accept_errors,
        ),
        (
            "chatflow_accept_paused_total",
            "counter",
            "Times a reactor paused accepting (connection limit or EMFILE).",
            |s| &s.accept_paused,
        ),
        (
            "chatflow_upgrades_total",
            "counter",
            "Completed WebSocket upgrades.",
            |s| &s.upgrades,
        ),
        (
            "chatflow_upgrades_waited_total",
            "counter",
            "Upgrades held until the bus subscribed this node to the room (a broker round trip).",
            |s| &s.joins_waited,
        ),
        (
            "chatflow_frames_in_total",
            "counter",
            "WebSocket frames received.",
            |s| &s.frames_in,
        ),
        (
            "chatflow_frames_out_total",
            "counter",
            "WebSocket frames queued to clients.",
            |s| &s.frames_out,
        ),
        (
            "chatflow_bytes_in_total",
            "counter",
            "Bytes read from client sockets.",
            |s| &s.bytes_in,
        ),
        (
            "chatflow_bytes_out_total",
            "counter",
            "Bytes written to client sockets.",
            |s| &s.bytes_out,
        ),
        (
            "chatflow_acks_total",
            "counter",
            "Acks sent to senders.",
            |s| &s.acks,
        ),
        (
            "chatflow_fanout_deliveries_total",
            "counter",
            "Broadcast frames queued to room members.",
            |s| &s.fanout_deliveries,
        ),
        (
            "chatflow_presence_dropped_total",
            "counter",
            "JOINs not recorded because presence was full.",
            |s| &s.presence_dropped,
        ),
        (
            "chatflow_output_queued_bytes",
            "gauge",
            "Bytes queued to clients and not yet written.",
            |s| &s.queued_bytes,
        ),
    ];
    for (name, kind, help, get) in simple {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {}", sum(stats, get));
    }

    family(
        &mut out,
        "chatflow_rooms",
        "gauge",
        "Rooms with members, counted per reactor holding them.",
    );
    let _ = writeln!(out, "chatflow_rooms {}", sum(stats, |s| &s.rooms));

    family(
        &mut out,
        "chatflow_messages_total",
        "counter",
        "Accepted chat messages by type.",
    );
    for t in MessageType::ALL {
        let n: u64 = stats.iter().map(|s| s.messages[t.index()].get()).sum();
        let _ = writeln!(
            out,
            "chatflow_messages_total{{type=\"{}\"}} {n}",
            t.as_str()
        );
    }

    family(
        &mut out,
        "chatflow_errors_total",
        "counter",
        "Error frames sent, by code.",
    );
    for c in ErrorCode::ALL {
        let n: u64 = stats.iter().map(|s| s.errors[c.index()].get()).sum();
        let _ = writeln!(out, "chatflow_errors_total{{code=\"{}\"}} {n}", c.as_str());
    }

    family(
        &mut out,
        "chatflow_disconnects_total",
        "counter",
        "Ended connections by reason.",
    );
    for d in Disconnect::ALL {
        let n: u64 = stats.iter().map(|s| s.disconnects[d as usize].get()).sum();
        let _ = writeln!(
            out,
            "chatflow_disconnects_total{{reason=\"{}\"}} {n}",
            d.as_str()
        );
    }

    family(
        &mut out,
        "chatflow_http_responses_total",
        "counter",
        "HTTP responses by status class.",
    );
    for (i, class) in ["2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
        let n: u64 = stats.iter().map(|s| s.http_responses[i].get()).sum();
        let _ = writeln!(
            out,
            "chatflow_http_responses_total{{class=\"{class}\"}} {n}"
        );
    }

    family(
        &mut out,
        "chatflow_fanout_dropped_total",
        "counter",
        "Broadcasts lost because the target reactor had stopped (shutdown only).",
    );
    let _ = writeln!(
        out,
        "chatflow_fanout_dropped_total {}",
        sum(stats, |s| &s.fanout_dropped)
    );

    family(
        &mut out,
        "chatflow_reactor_queue_depth",
        "gauge",
        "Broadcast batches waiting for each reactor.",
    );
    for (i, d) in node.reactor_queue_depths.iter().enumerate() {
        let _ = writeln!(out, "chatflow_reactor_queue_depth{{reactor=\"{i}\"}} {d}");
    }
    family(
        &mut out,
        "chatflow_reactor_queue_capacity",
        "gauge",
        "Capacity of each reactor's broadcast queue.",
    );
    let _ = writeln!(
        out,
        "chatflow_reactor_queue_capacity {}",
        node.reactor_queue_capacity
    );
    family(
        &mut out,
        "chatflow_reactor_connections",
        "gauge",
        "Open connections per reactor.",
    );
    for (i, s) in stats.iter().enumerate() {
        let _ = writeln!(
            out,
            "chatflow_reactor_connections{{reactor=\"{i}\"}} {}",
            s.connections.get()
        );
    }

    family(
        &mut out,
        "chatflow_presence_entries",
        "gauge",
        "(room, user) pairs in presence.",
    );
    let _ = writeln!(out, "chatflow_presence_entries {}", node.presence_entries);
    family(
        &mut out,
        "chatflow_draining",
        "gauge",
        "1 while the node shuts down.",
    );
    let _ = writeln!(out, "chatflow_draining {}", u8::from(node.draining));
    family(
        &mut out,
        "chatflow_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
    );
    let _ = writeln!(out, "chatflow_uptime_seconds {:.3}", node.uptime_secs);
    family(
        &mut out,
        "chatflow_build_info",
        "gauge",
        "Version and node of this server.",
    );
    let _ = writeln!(
        out,
        "chatflow_build_info{{version=\"{}\",node_id=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        node.node_id
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_reactors_and_labels_every_code() {
        let a = ReactorStats::default();
        let b = ReactorStats::default();
        a.acks.add(3);
        b.acks.add(4);
        a.error(ErrorCode::RateLimited);
        b.disconnect(Disconnect::SlowConsumer);
        b.message(MessageType::Join);
        let text = render(
            &[&a, &b],
            &NodeGauges {
                node_id: "n1",
                reactor_queue_depths: vec![0, 2],
                reactor_queue_capacity: 10,
                presence_entries: 5,
                uptime_secs: 1.0,
                draining: false,
            },
        );
        assert!(text.contains("\nchatflow_acks_total 7\n"));
        assert!(text.contains("chatflow_errors_total{code=\"RATE_LIMITED\"} 1"));
        assert!(text.contains("chatflow_errors_total{code=\"OVERLOADED\"} 0"));
        assert!(text.contains("chatflow_disconnects_total{reason=\"slow_consumer\"} 1"));
        assert!(text.contains("chatflow_messages_total{type=\"JOIN\"} 1"));
        assert!(text.contains("chatflow_reactor_queue_depth{reactor=\"1\"} 2"));
        // Every sample line belongs to a family declared before it.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} lacks a TYPE line"
            );
        }
    }
}

/// A Prometheus histogram shared by several threads (the writers, the query pool).
#[derive(Default)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative; summed when rendered).
    counts: Box<[AtomicU64]>,
    /// Observations above the last bound.
    over: AtomicU64,
    /// The sum of observations, as f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram with these upper bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            over: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        match self.bounds.iter().position(|&b| v <= b) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.over.fetch_add(1, Relaxed),
        };
        let mut old = self.sum.load(Relaxed);
        loop {
            let new = (f64::from_bits(old) + v).to_bits();
            match self.sum.compare_exchange_weak(old, new, Relaxed, Relaxed) {
                Ok(_) => break,
                Err(now) => old = now,
            }
        }
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum::<u64>() + self.over.load(Relaxed)
    }

    /// Appends the histogram's family in the text exposition format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        family(out, name, "histogram", help);
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(self.counts.iter()) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.over.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", f64::from_bits(self.sum.load(Relaxed)));
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Appends one family with a single unlabelled sample.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}
