//! One load thread: a `mio` event loop that opens its share of a phase's connections, sends
//! the generator's messages on them, matches every answer to its message, retries, reconnects,
//! and counts.
//!
//! Sockets are non-blocking and edge-triggered, so every readiness event is followed by
//! reading until `WouldBlock`. tungstenite does the framing and masks our frames; `write` only
//! buffers, and every connection written to in a loop turn is flushed once at the end of it,
//! so a burst of sends costs one syscall per connection.
//!
//! A message's life: taken from the generator's queue into its room's wait queue; sent on a
//! connection of that room that has room in its window; answered (ack or error) in the order
//! sent on that connection; on a retryable error, a broken connection or an overdue answer it
//! goes back to the room's queue after an exponential backoff, keeping its `clientMessageId`
//! so the server's idempotency makes the resend harmless; after `--retries` resends it fails.
//! Every message taken ends exactly once, acked or failed (or, in a duration run, unsent).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::stats::{HIST_MAX_NS, Outcome, PhaseStats, Record, count_code};
use super::sys;
use super::wire::{self, ClientMessageId, FrameKind};
use super::workload::Msg;

/// The clock every thread measures against, so a send time stamped in one thread can be
/// compared with a receive time taken in another, and turned into wall-clock time for the CSV.
pub(crate) struct RunClock {
    pub base: Instant,
    pub base_unix_us: u64,
}

impl RunClock {
    pub(crate) fn new() -> Self {
        let base = Instant::now();
        let base_unix_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        RunClock { base, base_unix_us }
    }

    pub(crate) fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.ns(Instant::now())
    }
}

/// Everything a load thread needs to know about the phase it runs.
pub(crate) struct PhaseSpec {
    pub name: &'static str,
    /// The servers of `--url`; connections are dealt over them (see [`PhaseSpec::target_of`]).
    pub targets: Vec<Target>,
    /// Room ids by index.
    pub rooms: Arc<Vec<String>>,
    pub conns: usize,
    /// Connections `0..senders` send; the others only receive (fan-out members).
    pub senders: usize,
    pub fanout: bool,
    /// Messages in flight per connection.
    pub window: usize,
    pub rate: Option<f64>,
    pub duration: Option<Duration>,
    /// Idle mode: nothing is sent; the phase ends this long after its start signal.
    pub idle_hold: Option<Duration>,
    pub threads: usize,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub ack_timeout: Duration,
    pub connect_timeout: Duration,
    /// Consecutive failed attempts after which a connection is given up.
    pub connect_attempts: u32,
    /// Connection attempts in progress at once, over all threads.
    pub connect_batch: usize,
    /// Give up on connections not open this long after the phase began connecting.
    pub ramp_timeout: Duration,
    pub read_buf: usize,
    pub source_ips: Arc<Vec<IpAddr>>,
    pub bucket_secs: u64,
    pub run_id: u32,
}

/// One server of the `--url` list.
pub(crate) struct Target {
    pub addr: SocketAddr,
    /// `ws://host:port[/prefix]/chat/{room}` for each room index.
    pub room_urls: Vec<String>,
}

impl PhaseSpec {
    /// Room index of connection `global`.
    pub(crate) fn room_of(&self, global: usize) -> u32 {
        if self.fanout {
            0
        } else {
            (global % self.rooms.len().max(1)) as u32
        }
    }

    /// Target index of connection `global`. The members of each room are dealt round-robin
    /// over the targets, each room starting one target further than the one before, so a
    /// room's members land on different servers and every server gets an even share.
    pub(crate) fn target_of(&self, global: usize) -> usize {
        let n = self.targets.len();
        if n <= 1 {
            return 0;
        }
        let rooms = if self.fanout {
            1
        } else {
            self.rooms.len().max(1)
        };
        (global / rooms + self.room_of(global) as usize) % n
    }
}

/// Live counters the coordinator shows in the progress bar; workers add to them once a
/// millisecond at most.
#[derive(Default)]
pub(crate) struct Progress {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    pub open: AtomicU64,
}

/// State shared by the coordinator and the load threads of one phase.
pub(crate) struct PhaseShared {
    pub clock: Arc<RunClock>,
    /// Run-clock nanoseconds at which sending starts; u64::MAX until every thread is ready.
    pub start_ns: AtomicU64,
    /// Threads whose connections are all open (or given up on).
    pub ready: AtomicUsize,
    /// Threads with every message answered or given up.
    pub done_sending: AtomicUsize,
    /// Load threads that have exited, however (counted by a drop guard).
    pub exited: AtomicUsize,
    /// The phase must end now: nothing connected, or a load thread failed or panicked.
    pub abort: AtomicBool,
    pub progress: Progress,
}

impl PhaseShared {
    /// A phase that has not started: no thread ready, done or exited.
    pub(crate) fn new(clock: Arc<RunClock>) -> PhaseShared {
        PhaseShared {
            clock,
            start_ns: AtomicU64::new(u64::MAX),
            ready: AtomicUsize::new(0),
            done_sending: AtomicUsize::new(0),
            exited: AtomicUsize::new(0),
            abort: AtomicBool::new(false),
            progress: Default::default(),
        }
    }
}

/// A chunk of per-message rows on its way to the CSV writer.
pub(crate) struct RecordChunk {
    pub rooms: Arc<Vec<String>>,
    /// The phase the rows belong to (the CSV's last column).
    pub phase: &'static str,
    pub rows: Vec<Record>,
}

/// Rows per chunk handed to the CSV writer.
const RECORD_CHUNK: usize = 16_384;
/// Keep reading this long after the last answer, so trailing broadcasts are counted and the
/// server does not see a reset while it still writes to us.
const LINGER_QUIET: Duration = Duration::from_millis(200);
/// ... but never longer than this after every thread is done.
const LINGER_MAX: Duration = Duration::from_secs(3);
/// Open loop: messages waiting for a connection before we stop taking more from the schedule.
/// Past this the schedule falls behind and the lag shows in the latency (measured from the
/// scheduled time), instead of memory growing without bound.
const OPEN_LOOP_PARK_CAP: usize = 100_000;
/// Fan-out: if the probe member sees nothing for this long while senders wait on it, its
/// count is resynchronised (a broadcast it should have seen was lost or never made).
const PROBE_STALL: Duration = Duration::from_millis(500);
/// Frames one `read_all` call handles before it moves on; a connection that had more is read
/// again next loop turn (edge-triggered epoll will not say so again), so a server flooding one
/// connection cannot keep the thread from its other connections, its sends and its timers.
const READ_BUDGET_FRAMES: usize = 512;
/// Token of the open-loop timer; connections use their index.
const TIMER: Token = Token(usize::MAX);
/// Not yet sent: `first_ns` is set by the first send (closed loop) or the schedule.
const UNSET: u64 = u64::MAX;

/// The socket as tungstenite sees it. A read that returns less than asked for has emptied
/// the kernel buffer; with edge-triggered epoll any later data raises a new event, so the next
/// read can report WouldBlock without the syscall that would only say EAGAIN. Under fan-out
/// most reads carry one frame, so this halves the receive syscalls.
///
/// The one exception: when the peer's FIN came with the data, the event that woke us was the
/// last one this socket will raise, so once an event says the read side is closed every read
/// goes to the kernel until it reports the end.
pub(crate) struct Sock {
    stream: TcpStream,
    drained: bool,
    read_closed: bool,
    /// Reads that went to the kernel and returned data: a new count means new bytes, so the
    /// receive clock is taken again.
    reads: u64,
}

impl io::Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained && !self.read_closed {
            self.drained = false;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.stream.read(buf)?;
        self.drained = n > 0 && n < buf.len();
        self.reads += 1;
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

/// A connection's life.
enum ConnState {
    /// Not connected: queued for a first attempt or waiting out a reconnect backoff.
    Idle,
    Connecting(TcpStream),
    Handshaking(Box<MidHandshake<ClientHandshake<Sock>>>),
    Open(Box<WebSocket<Sock>>),
    /// Given up on after too many failed attempts, or closed at the end.
    Dead,
}

/// A message between being taken from the generator and being answered.
#[derive(Clone, Copy)]
struct Pending {
    msg: Msg,
    /// Latency is measured from here: the scheduled time in open loop (so a wait for a
    /// window or a stall counts), just before the first send in closed loop; retries keep it,
    /// so their backoff counts either way.
    first_ns: u64,
    /// When the current attempt went out (for the answer timeout).
    sent_ns: u64,
    /// Sends so far.
    attempts: u32,
}

struct Conn {
    global: usize,
    room: u32,
    /// Index of its server in `PhaseSpec::targets`.
    target: usize,
    sender: bool,
    state: ConnState,
    /// Sent and unanswered, oldest first; answers come in send order.
    outstanding: VecDeque<Pending>,
    /// Listed in its room's `free` queue.
    in_free: bool,
    /// Consecutive failed connection attempts; an upgrade lost before any frame came counts
    /// as one (a server that accepts and closes at once must not cause endless reconnects).
    failures: u32,
    ever_opened: bool,
    /// A frame came on the current connection since it opened.
    answered: bool,
    /// The server has echoed one of our `clientMessageId`s on this connection: answers
    /// without one are then not attributed to a message by order.
    echoes_ids: bool,
    /// Listed in `read_again`: hit the read budget with frames possibly left.
    read_again: bool,
    attempt_started: Instant,
    /// Listed in `dirty` for a flush at the end of this loop turn.
    dirty: bool,
}

#[derive(Default)]
struct Room {
    /// Open sending connections that may have window space (checked when taken).
    free: VecDeque<usize>,
    /// Messages waiting for a connection: retries at the front, new ones at the back.
    queue: VecDeque<Pending>,
    /// Sending connections of this room in this thread.
    senders: usize,
    /// ... of which given up on.
    dead: usize,
}

/// A retry waiting out its backoff; ordered by due time (then seq, to be total).
struct Retry {
    due_ns: u64,
    p: Pending,
}

impl PartialEq for Retry {
    fn eq(&self, o: &Self) -> bool {
        (self.due_ns, self.p.msg.seq) == (o.due_ns, o.p.msg.seq)
    }
}
impl Eq for Retry {}
impl PartialOrd for Retry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Retry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due_ns, self.p.msg.seq).cmp(&(o.due_ns, o.p.msg.seq))
    }
}

/// Fan-out back-pressure: a message leaves this thread's window only once it is acked AND
/// this thread's probe member (the last receiver to join) has it, so senders cannot outrun
/// what the receivers read and the server's per-member queues stay bounded.
struct FanoutGate {
    probe: usize,
    cap: u64,
    sent: u64,
    seen: u64,
    errors: u64,
    last_seen: Instant,
}

impl FanoutGate {
    fn open(&mut self, probe_alive: bool) -> bool {
        if !probe_alive {
            return true;
        }
        let waiting = self.sent.saturating_sub(self.seen + self.errors);
        if waiting < self.cap {
            return true;
        }
        if self.last_seen.elapsed() > PROBE_STALL {
            // Something the probe should have seen never came: stop waiting for it.
            self.seen = self.sent.saturating_sub(self.errors);
            self.last_seen = Instant::now();
            return true;
        }
        false
    }
}

pub(crate) struct Worker {
    spec: Arc<PhaseSpec>,
    shared: Arc<PhaseShared>,
    thread: usize,
    input: Receiver<Vec<Msg>>,
    inbuf: VecDeque<Msg>,
    input_done: bool,
    records: Option<(Sender<RecordChunk>, Vec<Record>)>,
    poll: Poll,
    conns: Vec<Conn>,
    rooms: Vec<Room>,
    parked: usize,
    park_cap: usize,
    retry_heap: BinaryHeap<Reverse<Retry>>,
    /// Connections due for an attempt now.
    connect_queue: VecDeque<usize>,
    /// Connections waiting out a reconnect backoff: (due ns, index).
    reconnect_heap: BinaryHeap<Reverse<(u64, usize)>>,
    connecting: usize,
    connect_cap: usize,
    dirty: Vec<usize>,
    /// Connections that hit the read budget; read again next turn.
    read_again: Vec<usize>,
    gate: Option<FanoutGate>,
    /// Taken and not yet answered or given up.
    unresolved: u64,
    start_ns: u64,
    /// Run-clock ns after which no new message is taken (duration runs).
    stop_taking_ns: u64,
    /// Run-clock ns after which unanswered messages are failed (duration runs).
    give_up_ns: u64,
    /// Idle mode: run-clock ns at which the hold ends (0 otherwise).
    hold_until_ns: u64,
    interval_ns: Option<f64>,
    ws_config: WebSocketConfig,
    timer: sys::Timer,
    clock: wire::Clock,
    rng: fastrand::Rng,
    stats: PhaseStats,
    published: [u64; 4],
    published_open: u64,
    open: u64,
}

impl Worker {
    pub(crate) fn new(
        spec: Arc<PhaseSpec>,
        shared: Arc<PhaseShared>,
        thread: usize,
        input: Receiver<Vec<Msg>>,
        records: Option<Sender<RecordChunk>>,
    ) -> io::Result<Worker> {
        let now = Instant::now();
        let mut conns = Vec::new();
        let mut rooms: Vec<Room> = (0..spec.rooms.len()).map(|_| Room::default()).collect();
        let mut global = thread;
        while global < spec.conns {
            let room = spec.room_of(global);
            let sender = global < spec.senders;
            if sender && let Some(r) = rooms.get_mut(room as usize) {
                r.senders += 1;
            }
            conns.push(Conn {
                global,
                room,
                target: spec.target_of(global),
                sender,
                state: ConnState::Idle,
                outstanding: VecDeque::new(),
                in_free: false,
                failures: 0,
                ever_opened: false,
                answered: false,
                echoes_ids: false,
                read_again: false,
                attempt_started: now,
                dirty: false,
            });
            global += spec.threads;
        }
        let sender_count = conns.iter().filter(|c| c.sender).count();
        let gate = if spec.fanout && spec.rate.is_none() {
            conns
                .iter()
                .rposition(|c| !c.sender)
                .map(|probe| FanoutGate {
                    probe,
                    cap: (sender_count * spec.window) as u64,
                    sent: 0,
                    seen: 0,
                    errors: 0,
                    last_seen: now,
                })
        } else {
            None
        };
        // Closed loop: enough waiting messages to refill every window once, so a room whose
        // connections are all busy never holds up the others.
        let park_cap = match spec.rate {
            Some(_) => OPEN_LOOP_PARK_CAP,
            None => (sender_count * spec.window).clamp(256, OPEN_LOOP_PARK_CAP),
        };
        let connect_cap = (spec.connect_batch / spec.threads.max(1)).max(1);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(spec.read_buf)
            // A server frame is a chat message of at most ~2 KB; a peer sending megabytes
            // is broken, and must not make us buffer them.
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20));
        let poll = Poll::new()?;
        let timer = sys::Timer::new()?;
        poll.registry().register(
            &mut mio::unix::SourceFd(&timer.raw_fd()),
            TIMER,
            Interest::READABLE,
        )?;
        let rooms_len = spec.rooms.len();
        Ok(Worker {
            connect_queue: (0..conns.len()).collect(),
            conns,
            rooms,
            parked: 0,
            park_cap,
            retry_heap: BinaryHeap::new(),
            reconnect_heap: BinaryHeap::new(),
            connecting: 0,
            connect_cap,
            dirty: Vec::new(),
            read_again: Vec::new(),
            gate,
            unresolved: 0,
            start_ns: u64::MAX,
            stop_taking_ns: u64::MAX,
            give_up_ns: u64::MAX,
            hold_until_ns: 0,
            interval_ns: spec.rate.map(|r| 1e9 / r),
            ws_config,
            timer,
            clock: wire::Clock::new(),
            rng: fastrand::Rng::with_seed(u64::from(spec.run_id) ^ (thread as u64) << 32),
            stats: PhaseStats::new(rooms_len),
            published: [0; 4],
            published_open: 0,
            open: 0,
            input,
            inbuf: VecDeque::new(),
            input_done: false,
            records: records.map(|tx| (tx, Vec::with_capacity(RECORD_CHUNK))),
            poll,
            spec,
            shared,
            thread,
        })
    }

    fn now_ns(&self) -> u64 {
        self.shared.clock.now_ns()
    }

    /// Runs the phase to its end and returns this thread's counts.
    pub(crate) fn run(mut self) -> io::Result<PhaseStats> {
        let mut events = Events::with_capacity(1024);
        let ramp_deadline = Instant::now() + self.spec.ramp_timeout;
        let mut ready = false;
        let mut last_scan = Instant::now();
        let mut start_cpu = 0.0;
        let mut finished_at: Option<Instant> = None;
        let mut last_frame = Instant::now();
        let mut all_done_at: Option<Instant> = None;
        loop {
            let timeout = self.poll_timeout()?;
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e);
            }
            self.clock.refresh();
            let mut had_frames = !self.read_again.is_empty();
            // Connections cut off by the read budget last turn, before any new event.
            for ci in std::mem::take(&mut self.read_again) {
                self.conns[ci].read_again = false;
                self.read_all(ci);
            }
            for ev in events.iter() {
                if ev.token() == TIMER {
                    self.timer.clear();
                } else if ev.token().0 < self.conns.len() {
                    had_frames = true;
                    let closed = ev.is_read_closed() || ev.is_error();
                    self.on_event(ev.token().0, closed);
                }
            }
            let now = Instant::now();
            if had_frames {
                last_frame = now;
            }
            let now_ns = self.shared.clock.ns(now);
            // The coordinator ends the phase now: nothing connected, or another thread failed.
            if self.shared.abort.load(Ordering::SeqCst) {
                self.flush_records(true);
                self.close_all();
                return Ok(self.stats);
            }
            if finished_at.is_none() {
                self.start_connects(now_ns);
                if now.duration_since(last_scan) >= Duration::from_millis(50) {
                    last_scan = now;
                    self.expire_connects(now);
                    if self.start_ns != u64::MAX {
                        self.expire_answers(now_ns);
                        // Rooms held by the fan-out gate or by dead connections get a
                        // look even when no frame arrives to trigger one.
                        for room in 0..self.rooms.len() {
                            if !self.rooms[room].queue.is_empty() {
                                self.pump(room);
                            }
                        }
                    }
                }
            }

            if self.start_ns == u64::MAX {
                if !ready && now >= ramp_deadline {
                    self.abandon_connects();
                }
                if !ready && self.settled() {
                    ready = true;
                    self.shared.ready.fetch_add(1, Ordering::SeqCst);
                }
                let start = self.shared.start_ns.load(Ordering::SeqCst);
                if ready && start != u64::MAX && self.now_ns() >= start {
                    self.begin(start);
                    start_cpu = sys::thread_cpu_seconds();
                }
            }

            if self.start_ns != u64::MAX && finished_at.is_none() {
                let now_ns = self.now_ns();
                self.release_retries(now_ns);
                self.take_messages(now_ns);
                if now_ns >= self.give_up_ns {
                    self.give_up_all();
                }
                if self.input_done && self.unresolved == 0 && now_ns >= self.hold_until_ns {
                    self.stats.finished_ns = self.now_ns();
                    self.stats.thread_cpu_s = sys::thread_cpu_seconds() - start_cpu;
                    self.stats.open_at_end = self.open;
                    finished_at = Some(Instant::now());
                    self.shared.done_sending.fetch_add(1, Ordering::SeqCst);
                }
            }
            self.flush_dirty();
            self.publish(false);

            if finished_at.is_some() {
                let all_done = self.shared.done_sending.load(Ordering::SeqCst) >= self.spec.threads;
                if all_done && all_done_at.is_none() {
                    all_done_at = Some(Instant::now());
                }
                if let Some(t) = all_done_at
                    && (last_frame.elapsed() >= LINGER_QUIET || t.elapsed() >= LINGER_MAX)
                {
                    self.publish(true);
                    self.flush_records(true);
                    self.close_all();
                    return Ok(self.stats);
                }
            }
        }
    }

    /// How long the next poll may sleep; in open loop also arms the timer for the next send.
    fn poll_timeout(&mut self) -> io::Result<Duration> {
        let now_ns = self.now_ns();
        if !self.read_again.is_empty() {
            // Frames may wait in sockets no new event will report.
            return Ok(Duration::ZERO);
        }
        if self.start_ns == u64::MAX {
            // Connecting, or waiting for the start signal: wake on time for it.
            let start = self.shared.start_ns.load(Ordering::SeqCst);
            let wait = Duration::from_nanos(start.saturating_sub(now_ns));
            return Ok(wait.min(Duration::from_millis(5)));
        }
        // Deadlines wake us only while they are ahead: one already past has been acted on
        // (or has nothing left to do, as the stop in the drain), and waking for it again
        // would spin.
        let mut until = now_ns + 50_000_000;
        let mut wake = |t: u64| {
            if t > now_ns {
                until = until.min(t);
            }
        };
        if let Some(Reverse(r)) = self.retry_heap.peek() {
            wake(r.due_ns);
        }
        if let Some(Reverse((due, _))) = self.reconnect_heap.peek() {
            wake(*due);
        }
        wake(self.stop_taking_ns);
        wake(self.give_up_ns);
        wake(self.hold_until_ns);
        // The schedule's next message matters only while there is room to take it.
        if let Some(due) = self.next_due_ns()
            && due < until
            && !self.input_done
            && self.parked < self.park_cap
        {
            if due <= now_ns {
                return Ok(Duration::ZERO);
            }
            // epoll sleeps in whole milliseconds and would send up to 1 ms late; the
            // timerfd wakes us on the microsecond.
            self.timer.arm(Duration::from_nanos(due - now_ns))?;
        }
        Ok(Duration::from_nanos(until.saturating_sub(now_ns)))
    }

    fn begin(&mut self, start_ns: u64) {
        self.start_ns = start_ns;
        if let Some(d) = self.spec.duration {
            self.stop_taking_ns = start_ns + d.as_nanos() as u64;
            // Answers still missing one answer timeout after the end are failed.
            self.give_up_ns = self.stop_taking_ns + self.spec.ack_timeout.as_nanos() as u64;
        }
        if let Some(hold) = self.spec.idle_hold {
            self.hold_until_ns = start_ns + hold.as_nanos() as u64;
        }
        if let Some(g) = self.gate.as_mut() {
            g.last_seen = Instant::now();
        }
        for ci in 0..self.conns.len() {
            self.slot_free(ci);
        }
    }

    /// Sends published to the progress bar: at most once a millisecond, or now.
    fn publish(&mut self, force: bool) {
        let now = [
            self.stats.sent,
            self.stats.acked,
            self.stats.failed,
            self.stats.retries,
        ];
        if !force && now == self.published && self.open == self.published_open {
            return;
        }
        let p = &self.shared.progress;
        p.sent
            .fetch_add(now[0] - self.published[0], Ordering::Relaxed);
        p.acked
            .fetch_add(now[1] - self.published[1], Ordering::Relaxed);
        p.failed
            .fetch_add(now[2] - self.published[2], Ordering::Relaxed);
        p.retries
            .fetch_add(now[3] - self.published[3], Ordering::Relaxed);
        if self.open >= self.published_open {
            p.open
                .fetch_add(self.open - self.published_open, Ordering::Relaxed);
        } else {
            p.open
                .fetch_sub(self.published_open - self.open, Ordering::Relaxed);
        }
        self.published = now;
        self.published_open = self.open;
    }

    // ---- taking messages ------------------------------------------------------------------

    /// The next message from the generator, refilling the local batch; None when the queue is
    /// empty for now (or for good: then `input_done` is set).
    fn peek_msg(&mut self) -> Option<Msg> {
        if self.inbuf.is_empty() && !self.input_done {
            match self.input.try_recv() {
                Ok(batch) => self.inbuf.extend(batch),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => self.input_done = true,
            }
        }
        self.inbuf.front().copied()
    }

    /// Open loop: when message `index` of the phase is due.
    fn due_ns(&self, msg: &Msg) -> Option<u64> {
        self.interval_ns
            // `as` saturates, so an absurdly slow rate cannot overflow the schedule.
            .map(|i| self.start_ns.saturating_add((msg.index as f64 * i) as u64))
    }

    fn next_due_ns(&self) -> Option<u64> {
        let msg = self.inbuf.front()?;
        self.due_ns(msg)
    }

    fn take_messages(&mut self, now_ns: u64) {
        if self.input_done {
            return;
        }
        if now_ns >= self.stop_taking_ns {
            self.stop_taking();
            return;
        }
        while self.parked < self.park_cap {
            let Some(msg) = self.peek_msg() else {
                return;
            };
            let first_ns = match self.due_ns(&msg) {
                Some(due) if due > now_ns => return,
                // Due after the end: nothing more to take; the stop itself comes at its time.
                Some(due) if due >= self.stop_taking_ns => return,
                Some(due) => due,
                None => UNSET,
            };
            self.inbuf.pop_front();
            self.stats.taken += 1;
            self.unresolved += 1;
            let room = msg.room as usize;
            if room >= self.rooms.len() {
                // The generator only draws rooms of this phase; a bad index is a bug, and the
                // message fails rather than vanishing from the accounting.
                let p = Pending {
                    msg,
                    first_ns: now_ns,
                    sent_ns: now_ns,
                    attempts: 1,
                };
                self.stats.sent += 1;
                self.fail(p, Outcome::NoConnection, now_ns);
                continue;
            }
            self.rooms[room].queue.push_back(Pending {
                msg,
                first_ns,
                sent_ns: 0,
                attempts: 0,
            });
            self.parked += 1;
            self.pump(room);
        }
    }

    /// A duration run has reached its end: take nothing more, and drop what waits unsent.
    ///
    /// Open loop: messages the schedule had due before the end but that never went (waiting
    /// for a window, in the local batch or the generator's queue) are counted as
    /// `late_unsent` with the longest such wait, so the end of a run that fell behind does
    /// not hide the lag (coordinated omission).
    fn stop_taking(&mut self) {
        if self.input_done && self.inbuf.is_empty() && self.parked == 0 {
            return;
        }
        self.input_done = true;
        let end = self.stop_taking_ns.min(self.now_ns());
        let mut late_waits: Vec<u64> = Vec::new();
        if self.interval_ns.is_some() {
            while let Ok(batch) = self.input.try_recv() {
                self.inbuf.extend(batch);
            }
            for m in &self.inbuf {
                if let Some(due) = self.due_ns(m)
                    && due < self.stop_taking_ns
                {
                    late_waits.push(end.saturating_sub(due));
                }
            }
        }
        self.inbuf.clear();
        for r in 0..self.rooms.len() {
            let before = self.rooms[r].queue.len();
            let open_loop = self.interval_ns.is_some();
            self.rooms[r].queue.retain(|p| {
                if p.attempts == 0 && open_loop && p.first_ns != UNSET {
                    late_waits.push(end.saturating_sub(p.first_ns));
                }
                p.attempts > 0
            });
            let dropped = (before - self.rooms[r].queue.len()) as u64;
            self.parked -= dropped as usize;
            self.stats.unsent += dropped;
            self.unresolved -= dropped;
        }
        self.stats.late_unsent += late_waits.len() as u64;
        if let Some(w) = late_waits.into_iter().max() {
            self.stats.late_unsent_max_wait_ns = self.stats.late_unsent_max_wait_ns.max(w);
        }
    }

    /// Fails everything still unanswered (a duration run's drain time is over).
    fn give_up_all(&mut self) {
        self.stop_taking();
        let now_ns = self.now_ns();
        let mut left: Vec<Pending> = Vec::new();
        for c in &mut self.conns {
            left.extend(c.outstanding.drain(..));
        }
        for r in &mut self.rooms {
            left.extend(r.queue.drain(..));
        }
        self.parked = 0;
        left.extend(self.retry_heap.drain().map(|Reverse(r)| r.p));
        for p in left {
            self.fail(p, Outcome::Unanswered, now_ns);
        }
    }

    fn release_retries(&mut self, now_ns: u64) {
        while let Some(Reverse(r)) = self.retry_heap.peek() {
            if r.due_ns > now_ns {
                break;
            }
            let Some(Reverse(r)) = self.retry_heap.pop() else {
                break;
            };
            let room = r.p.msg.room as usize;
            self.rooms[room].queue.push_front(r.p);
            self.parked += 1;
            self.pump(room);
        }
    }

    /// Sends waiting messages of `room` while it has a connection with window space.
    fn pump(&mut self, room: usize) {
        loop {
            if self.rooms[room].queue.is_empty() {
                return;
            }
            if self.rooms[room].senders == self.rooms[room].dead {
                // No connection of this room will ever open again here.
                let now_ns = self.now_ns();
                let waiting: Vec<Pending> = self.rooms[room].queue.drain(..).collect();
                self.parked -= waiting.len();
                for mut p in waiting {
                    if p.attempts == 0 {
                        p.first_ns = p.first_ns.min(now_ns);
                        p.attempts = 1;
                        self.stats.sent += 1;
                        self.stats.per_type[p.msg.kind.index()] += 1;
                    }
                    self.fail(p, Outcome::NoConnection, now_ns);
                }
                return;
            }
            if let Some(g) = self.gate.as_mut() {
                let probe_alive = matches!(self.conns[g.probe].state, ConnState::Open(_));
                if !g.open(probe_alive) {
                    return;
                }
            }
            let Some(ci) = self.rooms[room].free.pop_front() else {
                return;
            };
            let c = &mut self.conns[ci];
            if !matches!(c.state, ConnState::Open(_)) || c.outstanding.len() >= self.spec.window {
                c.in_free = false;
                continue;
            }
            let Some(p) = self.rooms[room].queue.pop_front() else {
                return;
            };
            self.parked -= 1;
            self.send_on(ci, p);
            let c = &mut self.conns[ci];
            if matches!(c.state, ConnState::Open(_)) && c.outstanding.len() < self.spec.window {
                self.rooms[room].free.push_back(ci);
            } else {
                c.in_free = false;
            }
        }
    }

    /// A connection may have window space again: list it and send what its room has waiting.
    fn slot_free(&mut self, ci: usize) {
        let c = &mut self.conns[ci];
        if !c.sender || !matches!(c.state, ConnState::Open(_)) {
            return;
        }
        let room = c.room as usize;
        if !c.in_free {
            c.in_free = true;
            self.rooms[room].free.push_back(ci);
        }
        self.pump(room);
    }

    fn send_on(&mut self, ci: usize, mut p: Pending) {
        let now_ns = self.now_ns();
        if p.attempts == 0 {
            if p.first_ns == UNSET {
                p.first_ns = now_ns;
            } else {
                let lag = now_ns.saturating_sub(p.first_ns);
                self.stats.schedule_lag.saturating_record(lag.max(1));
            }
            self.stats.sent += 1;
            self.stats.per_type[p.msg.kind.index()] += 1;
            self.stats.first_send_ns = self.stats.first_send_ns.min(now_ns);
            self.stats.last_send_ns = self.stats.last_send_ns.max(now_ns);
        } else {
            self.stats.retries += 1;
        }
        p.attempts += 1;
        p.sent_ns = now_ns;
        let id = ClientMessageId {
            run: self.spec.run_id,
            thread: self.thread as u32,
            seq: p.msg.seq,
            nanos: p.first_ns,
        };
        let room = &self.spec.rooms[p.msg.room as usize];
        let mut body = String::with_capacity(256);
        wire::write_message(&mut body, &p.msg, room, self.clock.now(), &id);
        if let Some(g) = self.gate.as_mut() {
            g.sent += 1;
        }
        let c = &mut self.conns[ci];
        c.outstanding.push_back(p);
        let ConnState::Open(ws) = &mut c.state else {
            return;
        };
        match ws.write(Message::text(body)) {
            Ok(()) => {}
            // The frame stays in tungstenite's buffer; the end-of-turn flush or a writable
            // event sends it.
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                self.lost(ci, Outcome::ConnectionLost);
                return;
            }
        }
        self.mark_dirty(ci);
    }

    // ---- answers ---------------------------------------------------------------------------

    /// The unanswered message an answer belongs to: normally the oldest, since answers come in
    /// send order; by id if the server answered out of order; the oldest if the answer carries
    /// no id of ours (a server that does not echo it).
    ///
    /// An error without one of our ids on a connection whose server does echo ids is about
    /// no message of ours (a frame it could not parse, say): None, and the caller counts it.
    fn take_answered(
        &mut self,
        ci: usize,
        id: Option<ClientMessageId>,
        is_error: bool,
    ) -> Option<Pending> {
        let run = self.spec.run_id;
        let c = &mut self.conns[ci];
        let out = &mut c.outstanding;
        match id {
            Some(id) if id.run == run => {
                c.echoes_ids = true;
                if out.front().is_some_and(|p| p.msg.seq == id.seq) {
                    out.pop_front()
                } else {
                    let pos = out.iter().position(|p| p.msg.seq == id.seq)?;
                    out.remove(pos)
                }
            }
            _ if is_error && c.echoes_ids => None,
            _ => out.pop_front(),
        }
    }

    fn on_text(&mut self, ci: usize, text: &str, now_ns: u64) {
        match wire::frame_kind(text) {
            FrameKind::Ack => {
                let id = wire::frame_client_message_id(text);
                match self.take_answered(ci, id, false) {
                    Some(p) => {
                        self.acked(p, now_ns);
                        self.slot_free(ci);
                    }
                    None => self.stats.unmatched_answers += 1,
                }
            }
            FrameKind::Message => {
                self.stats.deliveries += 1;
                if !self.spec.fanout {
                    return;
                }
                let Some(id) = wire::frame_client_message_id(text) else {
                    return;
                };
                if id.run != self.spec.run_id {
                    return;
                }
                let _ = self
                    .stats
                    .delivery_latency
                    .record(now_ns.saturating_sub(id.nanos).clamp(1, HIST_MAX_NS));
                let thread = self.thread as u32;
                if let Some(g) = self.gate.as_mut()
                    && g.probe == ci
                    && id.thread == thread
                {
                    g.seen += 1;
                    g.last_seen = Instant::now();
                    self.pump(0);
                }
            }
            FrameKind::Error => {
                let code = wire::str_field(text, &wire::CODE_KEY).unwrap_or("(none)");
                count_code(&mut self.stats.error_frames, code);
                let outcome = Outcome::from_code(code);
                let retryable = wire::is_retryable(code);
                let id = wire::frame_client_message_id(text);
                let ours = id.is_some_and(|id| id.run == self.spec.run_id);
                if !ours && self.conns[ci].echoes_ids {
                    // Not about a message we can name: counted, charged to none.
                    self.stats.unmatched_errors += 1;
                    return;
                }
                match self.take_answered(ci, id, true) {
                    Some(p) => {
                        if let Some(g) = self.gate.as_mut() {
                            // A rejected message makes no broadcast for the probe to see.
                            g.errors += 1;
                        }
                        if retryable {
                            self.retry_or_fail(p, outcome, now_ns);
                        } else {
                            self.fail(p, outcome, now_ns);
                        }
                        self.slot_free(ci);
                    }
                    None => self.stats.unmatched_answers += 1,
                }
            }
            FrameKind::Other => self.stats.other_frames += 1,
        }
    }

    fn acked(&mut self, p: Pending, now_ns: u64) {
        let latency = now_ns.saturating_sub(p.first_ns);
        self.stats.acked += 1;
        let _ = self.stats.ack_latency.record(latency.clamp(1, HIST_MAX_NS));
        if let Some(n) = self.stats.per_room.get_mut(p.msg.room as usize) {
            *n += 1;
        }
        self.resolved(p, Outcome::Ok, now_ns, latency);
    }

    fn fail(&mut self, p: Pending, outcome: Outcome, now_ns: u64) {
        let latency = now_ns.saturating_sub(p.first_ns.min(now_ns));
        self.stats.failed += 1;
        count_code(&mut self.stats.failed_by, outcome.as_str());
        self.resolved(p, outcome, now_ns, latency);
    }

    fn resolved(&mut self, p: Pending, outcome: Outcome, now_ns: u64, latency_ns: u64) {
        self.unresolved = self.unresolved.saturating_sub(1);
        let offset = now_ns.saturating_sub(self.start_ns.min(now_ns));
        self.stats.on_resolved(
            offset,
            outcome == Outcome::Ok,
            latency_ns,
            self.spec.bucket_secs,
        );
        if let Some((_, rows)) = self.records.as_mut() {
            rows.push(Record {
                unix_us: self.shared.clock.base_unix_us + p.first_ns.min(now_ns) / 1000,
                latency_us: u32::try_from(latency_ns / 1000).unwrap_or(u32::MAX),
                room: p.msg.room,
                outcome,
                kind: p.msg.kind.index() as u8,
            });
            if rows.len() >= RECORD_CHUNK {
                self.flush_records(false);
            }
        }
    }

    /// Hands the collected rows to the CSV writer. While running, a full writer queue drops
    /// the rows (counted) rather than stall the load thread; at the end we wait for it.
    fn flush_records(&mut self, at_end: bool) {
        let Some((tx, rows)) = self.records.as_mut() else {
            return;
        };
        if rows.is_empty() {
            return;
        }
        let chunk = RecordChunk {
            rooms: self.spec.rooms.clone(),
            phase: self.spec.name,
            rows: std::mem::replace(rows, Vec::with_capacity(RECORD_CHUNK)),
        };
        let n = chunk.rows.len() as u64;
        let sent = if at_end {
            tx.send(chunk).is_ok()
        } else {
            match tx.try_send(chunk) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            }
        };
        if !sent {
            self.stats.records_dropped += n;
        }
    }

    /// Schedules a resend after an exponential backoff, or fails the message when its retries
    /// are spent.
    fn retry_or_fail(&mut self, p: Pending, outcome: Outcome, now_ns: u64) {
        if p.attempts > self.spec.retries || now_ns >= self.give_up_ns {
            self.fail(p, outcome, now_ns);
            return;
        }
        let due_ns = now_ns + self.backoff(self.spec.retry_backoff, p.attempts).as_nanos() as u64;
        self.retry_heap.push(Reverse(Retry { due_ns, p }));
    }

    /// base x 2^(n-1), capped at 5 s, with +-20% jitter so retries of one burst spread out.
    fn backoff(&mut self, base: Duration, n: u32) -> Duration {
        let exp = base.saturating_mul(1u32 << n.saturating_sub(1).min(16));
        let capped = exp.min(Duration::from_secs(5));
        capped.mul_f64(0.8 + 0.4 * self.rng.f64())
    }

    // ---- connections -----------------------------------------------------------------------

    fn settled(&self) -> bool {
        self.connect_queue.is_empty() && self.reconnect_heap.is_empty() && self.connecting == 0
    }

    fn source_ip(&self, global: usize) -> Option<IpAddr> {
        let ips = &self.spec.source_ips;
        (!ips.is_empty()).then(|| ips[global % ips.len()])
    }

    /// Opens connections while fewer than `connect_cap` are in progress, so the server never
    /// sees thousands of SYNs at once (an overflowing listen backlog drops SYNs and costs a
    /// one-second retransmit).
    fn start_connects(&mut self, now_ns: u64) {
        while let Some(Reverse((due, ci))) = self.reconnect_heap.peek().copied() {
            if due > now_ns {
                break;
            }
            self.reconnect_heap.pop();
            self.connect_queue.push_back(ci);
        }
        while self.connecting < self.connect_cap {
            let Some(ci) = self.connect_queue.pop_front() else {
                break;
            };
            if !matches!(self.conns[ci].state, ConnState::Idle) {
                continue;
            }
            self.connecting += 1;
            self.conns[ci].attempt_started = Instant::now();
            let source = self.source_ip(self.conns[ci].global);
            let addr = self.spec.targets[self.conns[ci].target].addr;
            match sys::start_connect(addr, source) {
                Ok(mut stream) => {
                    match self.poll.registry().register(
                        &mut stream,
                        Token(ci),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        Ok(()) => self.conns[ci].state = ConnState::Connecting(stream),
                        Err(e) => self.connect_failed(ci, &format!("register: {e}")),
                    }
                }
                Err(e) => self.connect_failed(ci, &connect_error(&e)),
            }
        }
    }

    fn expire_connects(&mut self, now: Instant) {
        for ci in 0..self.conns.len() {
            let c = &self.conns[ci];
            let pending = matches!(
                c.state,
                ConnState::Connecting(_) | ConnState::Handshaking(_)
            );
            if pending && now.duration_since(c.attempt_started) > self.spec.connect_timeout {
                self.conns[ci].state = ConnState::Idle;
                self.connect_failed(ci, "timed out");
            }
        }
    }

    /// Drops connections whose oldest unanswered message is overdue; its messages are resent
    /// on a new connection (a half-dead connection would otherwise hold them forever).
    fn expire_answers(&mut self, now_ns: u64) {
        let limit = self.spec.ack_timeout.as_nanos() as u64;
        for ci in 0..self.conns.len() {
            let overdue = self.conns[ci]
                .outstanding
                .front()
                .is_some_and(|p| now_ns.saturating_sub(p.sent_ns) > limit);
            if overdue && matches!(self.conns[ci].state, ConnState::Open(_)) {
                self.stats.ack_timeouts += 1;
                self.lost(ci, Outcome::Timeout);
            }
        }
    }

    /// The ramp took too long: give up on every connection not yet open.
    fn abandon_connects(&mut self) {
        self.connect_queue.clear();
        self.reconnect_heap.clear();
        self.connecting = 0;
        for ci in 0..self.conns.len() {
            if !matches!(self.conns[ci].state, ConnState::Open(_) | ConnState::Dead) {
                self.conns[ci].state = ConnState::Dead;
                self.stats.connect_failures += 1;
                count_code(
                    &mut self.stats.connect_errors,
                    "not open when the connect ramp timed out",
                );
                self.mark_dead(ci);
            }
        }
    }

    fn mark_dead(&mut self, ci: usize) {
        let c = &mut self.conns[ci];
        c.state = ConnState::Dead;
        if c.sender {
            let room = c.room as usize;
            self.rooms[room].dead += 1;
            self.pump(room);
        }
    }

    /// One attempt failed: retry after a backoff, or give the connection up.
    fn connect_failed(&mut self, ci: usize, why: &str) {
        self.connecting = self.connecting.saturating_sub(1);
        self.stats.connect_failures += 1;
        count_code(&mut self.stats.connect_errors, why);
        self.conns[ci].state = ConnState::Idle;
        self.conns[ci].failures += 1;
        if self.conns[ci].failures >= self.spec.connect_attempts {
            self.mark_dead(ci);
        } else {
            let wait = self.backoff(Duration::from_millis(50), self.conns[ci].failures);
            let due = self.now_ns() + wait.as_nanos() as u64;
            self.reconnect_heap.push(Reverse((due, ci)));
        }
    }

    /// An open connection broke (or we dropped it): its unanswered messages go back for a
    /// retry, and it reconnects after a short backoff.
    fn lost(&mut self, ci: usize, why: Outcome) {
        if !matches!(self.conns[ci].state, ConnState::Open(_)) {
            return;
        }
        self.conns[ci].state = ConnState::Idle;
        self.conns[ci].in_free = false;
        self.open = self.open.saturating_sub(1);
        if why == Outcome::ConnectionLost {
            self.stats.disconnects += 1;
        }
        let now_ns = self.now_ns();
        let unanswered: Vec<Pending> = self.conns[ci].outstanding.drain(..).collect();
        for p in unanswered {
            self.retry_or_fail(p, why, now_ns);
        }
        if !self.conns[ci].answered {
            // Upgraded, then lost before the server said anything: a failed attempt, so a
            // server that accepts and closes at once is given up on like one that refuses.
            self.stats.connect_failures += 1;
            count_code(
                &mut self.stats.connect_errors,
                "closed by the server before answering",
            );
            self.conns[ci].failures += 1;
            if self.conns[ci].failures >= self.spec.connect_attempts {
                self.mark_dead(ci);
                return;
            }
            let failures = self.conns[ci].failures;
            let wait = self.backoff(Duration::from_millis(50), failures);
            self.reconnect_heap
                .push(Reverse((now_ns + wait.as_nanos() as u64, ci)));
            return;
        }
        let wait = self.backoff(Duration::from_millis(10), 1);
        self.reconnect_heap
            .push(Reverse((now_ns + wait.as_nanos() as u64, ci)));
    }

    fn opened(&mut self, ci: usize, ws: WebSocket<Sock>) {
        self.connecting = self.connecting.saturating_sub(1);
        let c = &mut self.conns[ci];
        c.state = ConnState::Open(Box::new(ws));
        // `failures` is reset by the first frame the server sends, not by the upgrade.
        c.answered = false;
        self.stats.connections_opened += 1;
        if c.ever_opened {
            self.stats.reconnections += 1;
        }
        c.ever_opened = true;
        self.open += 1;
        // The handshake may have read frames along with the 101; no new event will say so.
        self.read_all(ci);
        if self.start_ns != u64::MAX {
            self.slot_free(ci);
        }
    }

    fn handshake_result(
        &mut self,
        ci: usize,
        r: Result<
            (WebSocket<Sock>, tungstenite::handshake::client::Response),
            HandshakeError<ClientHandshake<Sock>>,
        >,
    ) {
        match r {
            Ok((ws, _)) => self.opened(ci, ws),
            Err(HandshakeError::Interrupted(mid)) => {
                self.conns[ci].state = ConnState::Handshaking(Box::new(mid));
            }
            Err(HandshakeError::Failure(e)) => {
                let why = match &e {
                    tungstenite::Error::Http(resp) => {
                        format!("upgrade refused: HTTP {}", resp.status().as_u16())
                    }
                    tungstenite::Error::Io(e) => connect_error(e),
                    other => format!("handshake: {other}"),
                };
                self.connect_failed(ci, &why);
            }
        }
    }

    fn on_event(&mut self, ci: usize, read_closed: bool) {
        match std::mem::replace(&mut self.conns[ci].state, ConnState::Idle) {
            ConnState::Connecting(stream) => {
                match stream.take_error() {
                    Ok(Some(e)) | Err(e) => return self.connect_failed(ci, &connect_error(&e)),
                    Ok(None) => {}
                }
                match stream.peer_addr() {
                    Ok(_) => {
                        let c = &self.conns[ci];
                        let url = &self.spec.targets[c.target].room_urls[c.room as usize];
                        let r = tungstenite::client::client_with_config(
                            url.as_str(),
                            Sock {
                                stream,
                                drained: false,
                                read_closed: false,
                                reads: 0,
                            },
                            Some(self.ws_config),
                        );
                        self.handshake_result(ci, r);
                    }
                    // A wakeup before the connect finished.
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                        self.conns[ci].state = ConnState::Connecting(stream);
                    }
                    Err(e) => self.connect_failed(ci, &connect_error(&e)),
                }
            }
            ConnState::Handshaking(mut mid) => {
                if read_closed {
                    mid.get_mut().get_mut().read_closed = true;
                }
                let r = mid.handshake();
                self.handshake_result(ci, r);
            }
            ConnState::Open(mut ws) => {
                if read_closed {
                    ws.get_mut().read_closed = true;
                }
                self.conns[ci].state = ConnState::Open(ws);
                // Readable and writable alike: read everything, then flush what is buffered.
                self.read_all(ci);
                self.mark_dirty(ci);
            }
            other => self.conns[ci].state = other,
        }
    }

    fn mark_dirty(&mut self, ci: usize) {
        if !self.conns[ci].dirty {
            self.conns[ci].dirty = true;
            self.dirty.push(ci);
        }
    }

    /// Reads what the connection has, up to `READ_BUDGET_FRAMES` frames; past that it is
    /// listed for another read next turn.
    fn read_all(&mut self, ci: usize) {
        let mut now_ns = 0;
        let mut reads_seen = u64::MAX;
        for _ in 0..READ_BUDGET_FRAMES {
            let ConnState::Open(ws) = &mut self.conns[ci].state else {
                return;
            };
            let frame = ws.read();
            // One clock read per socket read: the frames of one read arrived together, and a
            // later read's frames arrived later.
            let reads = ws.get_ref().reads;
            if reads != reads_seen {
                reads_seen = reads;
                now_ns = self.now_ns();
            }
            match frame {
                Ok(Message::Text(t)) => {
                    let c = &mut self.conns[ci];
                    if !c.answered {
                        // The server talks on this connection: it counts as a good attempt.
                        c.answered = true;
                        c.failures = 0;
                    }
                    self.on_text(ci, t.as_str(), now_ns)
                }
                // tungstenite queued the pong or the close reply; get it flushed.
                Ok(Message::Ping(_)) | Ok(Message::Close(_)) => self.mark_dirty(ci),
                Ok(_) => self.stats.other_frames += 1,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.lost(ci, Outcome::ConnectionLost);
                    return;
                }
            }
        }
        let c = &mut self.conns[ci];
        if matches!(c.state, ConnState::Open(_)) && !c.read_again {
            c.read_again = true;
            self.read_again.push(ci);
        }
    }

    fn flush_dirty(&mut self) {
        while let Some(ci) = self.dirty.pop() {
            self.conns[ci].dirty = false;
            if let ConnState::Open(ws) = &mut self.conns[ci].state {
                match ws.flush() {
                    Ok(()) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => self.lost(ci, Outcome::ConnectionLost),
                }
            }
        }
    }

    fn close_all(&mut self) {
        for c in &mut self.conns {
            if let ConnState::Open(ws) = &mut c.state {
                // Best effort: a close frame, then drop. The server sees the close frame
                // followed by EOF either way.
                let _ = ws.close(None);
                let _ = ws.flush();
            }
            c.state = ConnState::Dead;
        }
        self.open = 0;
        self.publish(true);
    }
}

/// A connection error as a short reason; errno names group well in the report.
fn connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::AddrNotAvailable => {
            "no local address or port left (EADDRNOTAVAIL): spread --source-ips".into()
        }
        io::ErrorKind::TimedOut => "timed out".into(),
        _ if e.raw_os_error() == Some(libc::EMFILE) => {
            "too many open files (EMFILE): raise ulimit -n".into()
        }
        _ => format!("connect: {e}"),
    }
}
