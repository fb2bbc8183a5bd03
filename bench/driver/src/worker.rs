//! One event-loop thread: opens its share of the connections, drives the
//! workload on them and counts what comes back.
//!
//! Sockets are non-blocking and registered edge-triggered with mio, so every
//! readiness event is followed by reading or writing until WouldBlock.
//! tungstenite does the framing (and masks client frames); on a non-blocking
//! stream it reports WouldBlock as `Error::Io`, keeping unsent bytes buffered
//! until the next `flush`.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::MidHandshake;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::config::{Config, Mode};
use crate::proto::{self, FrameKind};
use crate::sys;

/// Latencies are recorded in nanoseconds, up to a minute, 3 significant digits.
pub const HIST_MAX_NS: u64 = 60_000_000_000;

pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; failure would be a bug.
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds")
}

/// State shared by the coordinator and all workers.
pub struct Shared {
    /// The clock every thread measures against, so a send time stamped by one
    /// thread can be compared with a receive time taken in another.
    pub base: Instant,
    /// Nanoseconds after `base` at which the run starts; u64::MAX until the
    /// coordinator has seen every connection upgraded.
    pub start_ns: AtomicU64,
    /// Workers that have settled all their connections (open or given up).
    pub ready_workers: AtomicUsize,
    pub connected: AtomicUsize,
    pub connect_failed: AtomicUsize,
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            base: Instant::now(),
            start_ns: AtomicU64::new(u64::MAX),
            ready_workers: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
            connect_failed: AtomicUsize::new(0),
        }
    }

    pub fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }
}

/// Counters of one worker; merged by the coordinator. "Window" counters only
/// count events whose receive (or send) time lies in the measured window.
pub struct Stats {
    pub sent: u64,
    pub acks: u64,
    pub deliveries: u64,
    pub errors: u64,
    pub sent_total: u64,
    pub acks_total: u64,
    pub deliveries_total: u64,
    pub errors_total: u64,
    pub other_frames: u64,
    pub disconnects: u64,
    pub connect_retries: u64,
    pub error_codes: BTreeMap<String, u64>,
    pub connect_errors: BTreeMap<String, u64>,
    pub ack_hist: Histogram<u64>,
    pub delivery_hist: Histogram<u64>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            sent: 0,
            acks: 0,
            deliveries: 0,
            errors: 0,
            sent_total: 0,
            acks_total: 0,
            deliveries_total: 0,
            errors_total: 0,
            other_frames: 0,
            disconnects: 0,
            connect_retries: 0,
            error_codes: BTreeMap::new(),
            connect_errors: BTreeMap::new(),
            ack_hist: new_histogram(),
            delivery_hist: new_histogram(),
        }
    }

    pub fn merge(&mut self, o: Stats) {
        self.sent += o.sent;
        self.acks += o.acks;
        self.deliveries += o.deliveries;
        self.errors += o.errors;
        self.sent_total += o.sent_total;
        self.acks_total += o.acks_total;
        self.deliveries_total += o.deliveries_total;
        self.errors_total += o.errors_total;
        self.other_frames += o.other_frames;
        self.disconnects += o.disconnects;
        self.connect_retries += o.connect_retries;
        for (k, v) in o.error_codes {
            *self.error_codes.entry(k).or_default() += v;
        }
        for (k, v) in o.connect_errors {
            *self.connect_errors.entry(k).or_default() += v;
        }
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.ack_hist.add(&o.ack_hist);
        let _ = self.delivery_hist.add(&o.delivery_hist);
    }
}

/// The socket as tungstenite sees it. A read that returns less than asked for
/// has emptied the kernel buffer; with edge-triggered epoll any later data
/// raises a new event, so the next read can report WouldBlock without the
/// syscall that would only say EAGAIN. Under fan-out most reads carry one
/// frame, so this halves the receive syscalls.
struct Sock {
    stream: TcpStream,
    drained: bool,
}

impl io::Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained {
            self.drained = false;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.stream.read(buf)?;
        self.drained = n > 0 && n < buf.len();
        Ok(n)
    }
}

impl io::Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

enum State {
    /// Queued for a (re)connect.
    Waiting,
    /// TCP connect in progress.
    Connecting(TcpStream),
    Handshaking(MidHandshake<ClientHandshake<Sock>>),
    Open(Box<WebSocket<Sock>>),
    /// Closed, or failed for good.
    Done,
}

/// Per-sender bookkeeping.
struct SendState {
    msg: proto::Sender,
    /// Sequence number of the next message; also the count sent so far.
    next_seq: u64,
    /// Acks + errors received; the server answers in send order.
    replied: u64,
    /// Fan-out window: messages known to have reached this thread's probe
    /// member (or to have been rejected, so no delivery will ever come).
    probe_done: u64,
    /// Send times (ns after base) of unanswered messages, oldest first;
    /// answers come in order, so the front belongs to the next answer.
    outstanding: VecDeque<u64>,
    /// Open loop: when the next message is due.
    next_due: Instant,
}

struct Conn {
    global: usize,
    room: String,
    state: State,
    attempts: u32,
    started: Instant,
    /// Queued in `dirty` for a flush at the end of this loop turn.
    dirty: bool,
    send: Option<SendState>,
}

/// Run phases, derived from the shared start time.
#[derive(Clone, Copy)]
struct Phases {
    start: Instant,
    measure_from_ns: u64,
    measure_to_ns: u64,
    stop_sending: Instant,
    close_at: Instant,
}

/// After the window closes, keep reading a moment so late answers do not
/// hit closed sockets as resets on the server (they are not counted).
const LINGER: Duration = Duration::from_millis(200);
/// Token of the open-loop send timer; connections use their index.
const TIMER: Token = Token(usize::MAX);
/// Delay before retrying a failed connection attempt.
const RETRY_DELAY: Duration = Duration::from_millis(200);

pub struct Worker {
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    thread_idx: usize,
    poll: Poll,
    conns: Vec<Conn>,
    fresh: VecDeque<usize>,
    retry: VecDeque<(Instant, usize)>,
    in_progress: usize,
    connect_cap: usize,
    dirty: Vec<usize>,
    /// Open-loop senders (local indexes).
    rate_senders: Vec<usize>,
    interval: Option<Duration>,
    /// Fan-out: local index of the member whose deliveries close the senders'
    /// windows. The highest-numbered receiver joined last, so when it has a
    /// message, most other members very likely have it too.
    probe: Option<usize>,
    phases: Option<Phases>,
    sending: bool,
    ws_config: WebSocketConfig,
    timer: sys::Timer,
    text: String,
    clock: proto::Clock,
    stats: Stats,
}

impl Worker {
    pub fn new(cfg: Arc<Config>, shared: Arc<Shared>, thread_idx: usize) -> io::Result<Worker> {
        let now = Instant::now();
        let mut conns = Vec::new();
        let mut global = thread_idx;
        while global < cfg.conns {
            let room = cfg.room_of(global);
            let send = (global < cfg.senders).then(|| SendState {
                msg: proto::Sender::new(global as u64, room.clone()),
                next_seq: 0,
                replied: 0,
                probe_done: 0,
                outstanding: VecDeque::new(),
                next_due: now,
            });
            conns.push(Conn {
                global,
                room,
                state: State::Waiting,
                attempts: 0,
                started: now,
                dirty: false,
                send,
            });
            global += cfg.threads;
        }
        let probe = if cfg.mode == Mode::Fanout {
            conns.iter().rposition(|c| c.send.is_none())
        } else {
            None
        };
        let rate_senders = match cfg.rate_per_sender {
            Some(_) => (0..conns.len())
                .filter(|&i| conns[i].send.is_some())
                .collect(),
            None => Vec::new(),
        };
        let connect_cap = (cfg.connect_batch / cfg.threads).max(1);
        let ws_config = WebSocketConfig::default().read_buffer_size(cfg.read_buf);
        let poll = Poll::new()?;
        let timer = sys::Timer::new()?;
        poll.registry().register(
            &mut mio::unix::SourceFd(&timer.raw_fd()),
            TIMER,
            Interest::READABLE,
        )?;
        Ok(Worker {
            fresh: (0..conns.len()).collect(),
            conns,
            retry: VecDeque::new(),
            in_progress: 0,
            connect_cap,
            dirty: Vec::new(),
            rate_senders,
            interval: cfg
                .rate_per_sender
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            probe,
            phases: None,
            sending: false,
            ws_config,
            text: proto::message_text(cfg.message_len),
            clock: proto::Clock::new(),
            stats: Stats::new(),
            poll,
            timer,
            cfg,
            shared,
            thread_idx,
        })
    }

    pub fn run(mut self) -> io::Result<Stats> {
        let mut events = Events::with_capacity(1024);
        let mut ready_reported = false;
        let mut last_timeout_scan = Instant::now();
        // A server that stops accepting (say at its connection cap) would
        // otherwise keep us retrying for connections x timeout x retries.
        let ramp_deadline = Instant::now() + self.cfg.ramp_timeout;
        loop {
            let timeout = self.poll_timeout()?;
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e);
            }
            self.clock.refresh();
            for ev in events.iter() {
                let idx = ev.token().0;
                if ev.token() == TIMER {
                    self.timer.clear();
                } else if idx < self.conns.len() {
                    self.on_event(idx);
                }
            }

            let now = Instant::now();
            if self.phases.is_none() {
                self.start_connects(now);
                if now.duration_since(last_timeout_scan) >= Duration::from_millis(100) {
                    last_timeout_scan = now;
                    self.expire_connects(now);
                }
                if !ready_reported && now >= ramp_deadline {
                    self.abandon_connects();
                }
                if !ready_reported && self.settled() {
                    ready_reported = true;
                    self.shared.ready_workers.fetch_add(1, Ordering::SeqCst);
                }
                let start_ns = self.shared.start_ns.load(Ordering::SeqCst);
                if ready_reported && start_ns != u64::MAX {
                    self.begin(start_ns);
                }
            }
            if let Some(p) = self.phases {
                let now = Instant::now();
                if self.sending && now >= p.stop_sending {
                    self.sending = false;
                } else if !self.sending && now >= p.start && now < p.stop_sending {
                    self.sending = true;
                    self.fill_windows();
                }
                if self.sending && self.interval.is_some() {
                    self.send_due(now);
                }
                if now >= p.close_at {
                    self.flush_dirty();
                    self.close_all();
                    return Ok(self.stats);
                }
            }
            self.flush_dirty();
        }
    }

    /// How long the next poll may sleep; in open-loop mode also arms the
    /// timer for the next due send.
    fn poll_timeout(&self) -> io::Result<Duration> {
        let Some(p) = self.phases else {
            // Still ramping connections or waiting for the start signal.
            return Ok(Duration::from_millis(5));
        };
        let now = Instant::now();
        let mut t = p.close_at.saturating_duration_since(now);
        if now < p.start {
            t = t.min(p.start - now);
        } else if now < p.stop_sending {
            t = t.min(p.stop_sending - now);
        }
        let next_due = self
            .rate_senders
            .iter()
            .filter_map(|&i| self.conns[i].send.as_ref().map(|s| s.next_due))
            .min();
        if self.sending
            && let Some(due) = next_due
        {
            let wait = due.saturating_duration_since(now);
            if wait.is_zero() {
                t = Duration::ZERO;
            } else {
                // epoll only sleeps in whole milliseconds, and a send up to
                // 1 ms late would count against the server in open-loop
                // latency; the timerfd wakes us on the microsecond.
                self.timer.arm(wait)?;
            }
        }
        Ok(t.min(Duration::from_millis(50)))
    }

    fn begin(&mut self, start_ns: u64) {
        let start = self.shared.base + Duration::from_nanos(start_ns);
        let measure_from = start + self.cfg.warmup;
        let measure_to = measure_from + self.cfg.duration;
        let linger = if self.cfg.mode == Mode::Idle {
            Duration::ZERO
        } else {
            LINGER
        };
        self.phases = Some(Phases {
            start,
            measure_from_ns: self.shared.ns(measure_from),
            measure_to_ns: self.shared.ns(measure_to),
            stop_sending: measure_to,
            close_at: measure_to + linger,
        });
        if let Some(interval) = self.interval {
            // Stagger the senders over one interval so they do not all fire
            // in the same instant.
            let n = self.cfg.senders.max(1) as f64;
            for &i in &self.rate_senders {
                let frac = self.conns[i].global as f64 / n;
                if let Some(s) = self.conns[i].send.as_mut() {
                    s.next_due = start + interval.mul_f64(frac);
                }
            }
        }
    }

    fn in_window(&self, ns: u64) -> bool {
        self.phases
            .is_some_and(|p| ns >= p.measure_from_ns && ns < p.measure_to_ns)
    }

    // ---- connection setup -------------------------------------------------

    fn settled(&self) -> bool {
        self.fresh.is_empty() && self.retry.is_empty() && self.in_progress == 0
    }

    fn source_ip(&self, global: usize) -> Option<IpAddr> {
        let ips = &self.cfg.source_ips;
        (!ips.is_empty()).then(|| ips[global % ips.len()])
    }

    /// Opens connections while fewer than `connect_cap` are in progress, so
    /// the server never sees thousands of SYNs at once. The default of 100 in
    /// all stays under the common listen backlog of 128: an overflowing accept
    /// queue drops SYNs and costs a one-second retransmit.
    fn start_connects(&mut self, now: Instant) {
        while self.in_progress < self.connect_cap {
            let idx = if self.retry.front().is_some_and(|&(due, _)| due <= now) {
                match self.retry.pop_front() {
                    Some((_, idx)) => idx,
                    None => break,
                }
            } else if let Some(idx) = self.fresh.pop_front() {
                idx
            } else {
                break;
            };
            self.in_progress += 1;
            let conn = &mut self.conns[idx];
            conn.started = now;
            conn.attempts += 1;
            let source = self.source_ip(self.conns[idx].global);
            match sys::start_connect(self.cfg.addr, source) {
                Ok(mut stream) => {
                    match self.poll.registry().register(
                        &mut stream,
                        Token(idx),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        Ok(()) => self.conns[idx].state = State::Connecting(stream),
                        Err(e) => self.connect_failed(idx, &format!("register: {e}")),
                    }
                }
                Err(e) => self.connect_failed(idx, &format!("connect: {e}")),
            }
        }
    }

    fn expire_connects(&mut self, now: Instant) {
        for idx in 0..self.conns.len() {
            let c = &self.conns[idx];
            let pending = matches!(c.state, State::Connecting(_) | State::Handshaking(_));
            if pending && now.duration_since(c.started) > self.cfg.connect_timeout {
                self.conns[idx].state = State::Done;
                self.connect_failed(idx, "timed out");
            }
        }
    }

    /// The ramp took too long: give up on every connection not yet open.
    fn abandon_connects(&mut self) {
        self.fresh.clear();
        self.retry.clear();
        self.in_progress = 0;
        let mut n = 0;
        for c in &mut self.conns {
            if !matches!(c.state, State::Open(_) | State::Done) {
                c.state = State::Done;
                n += 1;
            }
        }
        // Connections that failed for good are Done and counted already.
        if n > 0 {
            self.shared.connect_failed.fetch_add(n, Ordering::Relaxed);
            *self
                .stats
                .connect_errors
                .entry("not open when --ramp-timeout expired".to_string())
                .or_default() += n as u64;
        }
    }

    /// One attempt failed: retry later, or give up on this connection.
    fn connect_failed(&mut self, idx: usize, why: &str) {
        self.in_progress = self.in_progress.saturating_sub(1);
        self.conns[idx].state = State::Done;
        if self.conns[idx].attempts <= self.cfg.connect_retries {
            self.stats.connect_retries += 1;
            self.conns[idx].state = State::Waiting;
            self.retry.push_back((Instant::now() + RETRY_DELAY, idx));
        } else {
            self.shared.connect_failed.fetch_add(1, Ordering::Relaxed);
            *self
                .stats
                .connect_errors
                .entry(why.to_string())
                .or_default() += 1;
        }
    }

    fn handshake_result(
        &mut self,
        idx: usize,
        r: Result<
            (WebSocket<Sock>, tungstenite::handshake::client::Response),
            HandshakeError<ClientHandshake<Sock>>,
        >,
    ) {
        match r {
            Ok((ws, _response)) => {
                self.in_progress = self.in_progress.saturating_sub(1);
                self.conns[idx].state = State::Open(Box::new(ws));
                self.shared.connected.fetch_add(1, Ordering::Relaxed);
                // The handshake may have read frames along with the 101
                // response; edge-triggered readiness will not fire for them.
                self.read_all(idx);
            }
            Err(HandshakeError::Interrupted(mid)) => {
                self.conns[idx].state = State::Handshaking(mid);
            }
            Err(HandshakeError::Failure(e)) => {
                let why = match &e {
                    tungstenite::Error::Http(resp) => {
                        format!("upgrade refused: HTTP {}", resp.status())
                    }
                    other => format!("handshake: {other}"),
                };
                self.connect_failed(idx, &why);
            }
        }
    }

    // ---- events -------------------------------------------------------------

    fn on_event(&mut self, idx: usize) {
        match std::mem::replace(&mut self.conns[idx].state, State::Waiting) {
            State::Connecting(stream) => {
                match stream.take_error() {
                    Ok(Some(e)) | Err(e) => {
                        return self.connect_failed(idx, &format!("connect: {e}"));
                    }
                    Ok(None) => {}
                }
                match stream.peer_addr() {
                    Ok(_) => {
                        let url = format!("ws://{}/chat/{}", self.cfg.addr, self.conns[idx].room);
                        let r = tungstenite::client::client_with_config(
                            url.as_str(),
                            Sock {
                                stream,
                                drained: false,
                            },
                            Some(self.ws_config),
                        );
                        self.handshake_result(idx, r);
                    }
                    // Spurious wakeup: the connect has not finished yet.
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                        self.conns[idx].state = State::Connecting(stream);
                    }
                    Err(e) => self.connect_failed(idx, &format!("connect: {e}")),
                }
            }
            State::Handshaking(mid) => {
                let r = mid.handshake();
                self.handshake_result(idx, r);
            }
            State::Open(ws) => {
                self.conns[idx].state = State::Open(ws);
                // Readable and writable are handled alike: read everything,
                // then flush whatever is buffered.
                self.read_all(idx);
                self.mark_dirty(idx);
            }
            other => self.conns[idx].state = other,
        }
    }

    fn mark_dirty(&mut self, idx: usize) {
        if !self.conns[idx].dirty {
            self.conns[idx].dirty = true;
            self.dirty.push(idx);
        }
    }

    fn read_all(&mut self, idx: usize) {
        // One clock read per batch: the frames of one batch arrived together.
        let now_ns = self.shared.ns(Instant::now());
        loop {
            let State::Open(ws) = &mut self.conns[idx].state else {
                return;
            };
            match ws.read() {
                Ok(Message::Text(t)) => self.on_text(idx, t.as_str(), now_ns),
                // tungstenite queued the pong / close reply; get it flushed.
                Ok(Message::Ping(_)) | Ok(Message::Close(_)) => self.mark_dirty(idx),
                Ok(_) => self.stats.other_frames += 1,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.lost(idx);
                    return;
                }
            }
        }
    }

    /// The server closed the connection or it broke.
    fn lost(&mut self, idx: usize) {
        if matches!(self.conns[idx].state, State::Open(_)) {
            self.conns[idx].state = State::Done;
            // Closing connections during the linger is our doing, not a loss.
            let closing = self
                .phases
                .is_some_and(|p| Instant::now() >= p.stop_sending);
            if !closing {
                self.stats.disconnects += 1;
            }
        }
    }

    fn on_text(&mut self, idx: usize, text: &str, now_ns: u64) {
        let in_window = self.in_window(now_ns);
        match proto::frame_kind(text) {
            FrameKind::Ack => {
                self.stats.acks_total += 1;
                if in_window {
                    self.stats.acks += 1;
                }
                let Some(s) = self.conns[idx].send.as_mut() else {
                    return;
                };
                s.replied += 1;
                if let Some(sent_ns) = s.outstanding.pop_front()
                    && in_window
                {
                    let _ = self
                        .stats
                        .ack_hist
                        .record(now_ns.saturating_sub(sent_ns).clamp(1, HIST_MAX_NS));
                }
                self.refill(idx);
            }
            FrameKind::Message => {
                self.stats.deliveries_total += 1;
                let id = proto::str_field(text, &proto::CLIENT_MESSAGE_ID_KEY)
                    .and_then(proto::parse_client_message_id);
                if in_window {
                    self.stats.deliveries += 1;
                    if let Some(id) = id {
                        let _ = self
                            .stats
                            .delivery_hist
                            .record(now_ns.saturating_sub(id.nanos).clamp(1, HIST_MAX_NS));
                    }
                }
                if let Some(id) = id
                    && self.probe == Some(idx)
                {
                    self.probe_saw(id.sender as usize, id.seq + 1);
                }
            }
            FrameKind::Error => {
                self.stats.errors_total += 1;
                if in_window {
                    self.stats.errors += 1;
                }
                let code = proto::str_field(text, &proto::CODE_KEY).unwrap_or("?");
                match self.stats.error_codes.get_mut(code) {
                    Some(n) => *n += 1,
                    None => {
                        self.stats.error_codes.insert(code.to_string(), 1);
                    }
                }
                let Some(s) = self.conns[idx].send.as_mut() else {
                    return;
                };
                s.replied += 1;
                s.outstanding.pop_front();
                // A rejected message never reaches the probe; do not let it
                // hold the fan-out window shut.
                let seq = proto::str_field(text, &proto::CLIENT_MESSAGE_ID_KEY)
                    .and_then(proto::parse_client_message_id)
                    .map_or(s.replied, |id| id.seq + 1);
                s.probe_done = s.probe_done.max(seq);
                self.refill(idx);
            }
            FrameKind::Other => self.stats.other_frames += 1,
        }
    }

    /// The probe member has seen sender `global`'s messages up to `done`.
    fn probe_saw(&mut self, global: usize, done: u64) {
        if global % self.cfg.threads != self.thread_idx {
            return;
        }
        let local = global / self.cfg.threads;
        if let Some(s) = self.conns.get_mut(local).and_then(|c| c.send.as_mut()) {
            s.probe_done = s.probe_done.max(done);
            self.refill(local);
        }
    }

    // ---- sending ------------------------------------------------------------

    fn fill_windows(&mut self) {
        if self.interval.is_some() {
            return;
        }
        for idx in 0..self.conns.len() {
            if self.conns[idx].send.is_some() {
                self.refill(idx);
            }
        }
    }

    /// Closed loop: top the connection's window back up to `inflight`.
    fn refill(&mut self, idx: usize) {
        if !self.sending || self.interval.is_some() {
            return;
        }
        let probe_alive = self
            .probe
            .is_some_and(|p| matches!(self.conns[p].state, State::Open(_)));
        loop {
            let Some(s) = self.conns[idx].send.as_ref() else {
                return;
            };
            let done = if probe_alive {
                s.replied.min(s.probe_done)
            } else {
                s.replied
            };
            if s.next_seq.saturating_sub(done) >= self.cfg.inflight {
                return;
            }
            let now_ns = self.shared.ns(Instant::now());
            if !self.send_one(idx, now_ns) {
                return;
            }
        }
    }

    /// Open loop: send every message that has come due. The send time stamped
    /// into the message is the scheduled time, so a client or server stall
    /// shows up in the latency instead of silently lowering the load.
    fn send_due(&mut self, now: Instant) {
        let Some(interval) = self.interval else {
            return;
        };
        for k in 0..self.rate_senders.len() {
            let idx = self.rate_senders[k];
            // Bounded catch-up per turn keeps the loop responsive to reads.
            for _ in 0..1000 {
                let Some(s) = self.conns[idx].send.as_mut() else {
                    break;
                };
                if s.next_due > now {
                    break;
                }
                let due = s.next_due;
                s.next_due += interval;
                let due_ns = self.shared.ns(due);
                if !self.send_one(idx, due_ns) {
                    break;
                }
            }
        }
    }

    /// Queues one message on the connection; false if it cannot send.
    fn send_one(&mut self, idx: usize, stamp_ns: u64) -> bool {
        let conn = &mut self.conns[idx];
        let (State::Open(ws), Some(s)) = (&mut conn.state, conn.send.as_mut()) else {
            return false;
        };
        let body = s
            .msg
            .build(s.next_seq, stamp_ns, self.clock.now(), &self.text);
        match ws.write(Message::text(body)) {
            Ok(()) => {}
            // The frame stays in tungstenite's buffer; a writable event flushes it.
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                self.lost(idx);
                return false;
            }
        }
        s.next_seq += 1;
        s.outstanding.push_back(stamp_ns);
        self.stats.sent_total += 1;
        if self.in_window(stamp_ns) {
            self.stats.sent += 1;
        }
        self.mark_dirty(idx);
        true
    }

    fn flush_dirty(&mut self) {
        while let Some(idx) = self.dirty.pop() {
            self.conns[idx].dirty = false;
            if let State::Open(ws) = &mut self.conns[idx].state {
                match ws.flush() {
                    Ok(()) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => self.lost(idx),
                }
            }
        }
    }

    fn close_all(&mut self) {
        for c in &mut self.conns {
            if let State::Open(ws) = &mut c.state {
                // Best effort: a close frame then drop; the server sees the
                // close frame followed by EOF either way.
                let _ = ws.close(None);
                let _ = ws.flush();
            }
            c.state = State::Done;
        }
    }
}
