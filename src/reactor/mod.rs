//! One reactor thread: a `mio` poll loop owning a listener and the connections it accepted.
//!
//! The loop: flush queued output, hand broadcasts to the bus, wait for events, accept, read and
//! answer, deliver broadcasts from other reactors, and every tick enforce timeouts and limits.
//! Nothing here blocks: no lock is held across I/O and no database or broker is called.
//! `docs/lifetime-of-a-connection.md` follows one connection through this file.

mod output;

use std::collections::VecDeque;
use std::io::{self, Read};
use std::mem;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use time::OffsetDateTime;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error as WsError, Message};

pub use output::{BufPool, OutQueue, WsIo, shared_text_frame, write_text_header};

use crate::auth;
use crate::bus::{Accepted, Batch, Bus, Fanout, Inbox, Joined, Outgoing, PublishError, Publisher};
use crate::chat::{ConnJoins, Presence, PresenceChange, RateLimiter, RoomMembers};
use crate::config::{AckAfter, Config, normalize_origin};
use crate::http::{self, Route, Status};
use crate::mailbox::{Completion, Mailbox, Origin, Reply, ReplyTo};
use crate::metrics::{Disconnect, NodeGauges, ReactorStats, SharedStats};
use crate::protocol::{self, ChatMessage, ErrorCode, MessageType, Rejection};
use crate::store::Record;
use crate::store::query::QueryPool;
use crate::store::writer::{Persist, StoreQueue};

/// Token of the listener.
const LISTENER: Token = Token(usize::MAX);
/// Token of the admin listener (reactor 0 only, when `admin_listen` is set).
const ADMIN_LISTENER: Token = Token(usize::MAX - 2);
/// Token of the waker other threads use.
pub const WAKER: Token = Token(usize::MAX - 1);
/// How often timeouts and limits are checked.
const TICK: Duration = Duration::from_millis(250);
/// Messages read from one connection before others get a turn.
const READ_BUDGET: usize = 64;
/// Messages read from one connection when a drain begins, so what it already sent gets acks
/// but a client that keeps sending cannot hold the drain up.
const DRAIN_READ_BUDGET: usize = 1024;
/// How long a closing connection may take to finish (peer's close reply, then EOF).
const CLOSING_LINGER: Duration = Duration::from_secs(2);
/// Pause before accepting again after the process ran out of file descriptors.
const EMFILE_BACKOFF: Duration = Duration::from_millis(100);
/// Most connections open on the admin listener at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// The browser chat client, served at `/` (embedded: no build step, no CDN).
const CHAT_PAGE: &str = include_str!("../../web/chat.html");
/// The live node dashboard, served at `/dashboard`.
const DASHBOARD_PAGE: &str = include_str!("../../web/dashboard.html");
const HTML: &str = "text/html; charset=utf-8";
/// Most users listed by `GET /api/rooms/{roomId}/presence` (`count` still gives the total).
const PRESENCE_LIST_MAX: usize = 1000;
/// A ping frame with no payload.
const PING_FRAME: [u8; 2] = [0x89, 0x00];
/// Messages of one connection waiting for their commit (`ack_after = persisted`) before the
/// reactor stops reading that connection; reading resumes below half.
const MAX_PENDING_ACKS: usize = 1024;

/// The node's store as the reactors see it: the writers' queue and breaker, and the query pool.
pub struct StoreHandle {
    /// `postgres`, `sqlite` or `memory`.
    pub kind: &'static str,
    /// Where accepted messages go.
    pub queue: Arc<StoreQueue>,
    /// Who answers `/api/*`.
    pub queries: QueryPool,
}

/// What all reactors of a node share. Read-mostly; the only lock is inside [`Presence`].
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// This node's id.
    pub node_id: String,
    /// Who is present in each room.
    pub presence: Presence,
    /// Each reactor's counters (index = reactor id).
    pub stats: Vec<Arc<SharedStats>>,
    /// Each reactor's broadcast inbox (index = reactor id).
    pub inboxes: Arc<[Inbox]>,
    /// The message bus.
    pub bus: Box<dyn Bus>,
    /// The store.
    pub store: StoreHandle,
    /// Each reactor's mailbox for commits and query answers (index = reactor id).
    pub mailboxes: Arc<[Mailbox]>,
    /// The access-token secret; `None` when tokens are not required.
    pub auth_key: Option<Vec<u8>>,
    /// Set once to begin a graceful shutdown.
    pub draining: AtomicBool,
    /// When the server started.
    pub started: Instant,
}

impl Shared {
    /// Asks every reactor to drain and stop.
    pub fn begin_shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for inbox in self.inboxes.iter() {
            inbox.wake();
        }
    }

    /// Open WebSocket sessions on the node.
    pub fn websockets(&self) -> u64 {
        self.stats.iter().map(|s| s.websockets.get()).sum()
    }

    /// The Prometheus text of `GET /metrics`.
    pub fn render_metrics(&self) -> String {
        let stats: Vec<&ReactorStats> = self.stats.iter().map(|s| &***s).collect();
        let mut text = crate::metrics::render(
            &stats,
            &NodeGauges {
                node_id: &self.node_id,
                reactor_queue_depths: self.inboxes.iter().map(Inbox::depth).collect(),
                reactor_queue_capacity: self.inboxes.first().map_or(0, Inbox::capacity),
                presence_entries: self.presence.entries(),
                uptime_secs: self.started.elapsed().as_secs_f64(),
                draining: self.draining.load(Ordering::Relaxed),
            },
        );
        crate::store::render_metrics(&mut text, &self.store.queue, &self.store.queries);
        self.bus.render_metrics(&mut text);
        text
    }

    /// `Ok` while the store takes writes and answers queries; otherwise why not.
    pub fn store_ready(&self) -> Result<(), String> {
        if self.store.queue.breaker.is_open() {
            return Err(format!(
                "writes are failing (breaker {:?})",
                self.store.queue.breaker.state()
            ));
        }
        self.store.queries.reachable()
    }
}

/// Where a connection is in its life. See `docs/lifetime-of-a-connection.md`.
enum Phase {
    /// Reading an HTTP request head (an upgrade or a plain request).
    Request {
        /// The bytes received so far.
        head: Vec<u8>,
    },
    /// An upgrade that was admitted, waiting for the bus to carry the room's messages to this
    /// node before its `101` is written; input is left unread.
    Joining(Box<Joining>),
    /// A WebSocket session in a room.
    Open(Box<Session>),
    /// Waiting for the query pool's answer to an HTTP request; input is left unread.
    Waiting,
    /// Flushing the last output (a response or a close frame); input is read and discarded.
    Closing {
        /// True once our side of the TCP stream has been shut down.
        write_shut: bool,
    },
}

/// An admitted upgrade waiting for [`Reply::Joined`].
struct Joining {
    room: Arc<str>,
    /// How the bus knows this connection among the room's waiters.
    joiner: ReplyTo,
    accept: String,
    /// Bytes read past the request head (frames sent before the `101`).
    leftover: Vec<u8>,
    /// The access token's user and expiry.
    token: Option<(u32, u64)>,
}

/// The state of an open WebSocket.
struct Session {
    ctx: WebSocketContext,
    room: Arc<str>,
    rate: Option<RateLimiter>,
    joins: ConnJoins,
    /// Reading stopped because this client's output is above the soft limit.
    paused: bool,
    /// The user the access token was issued to; every message must carry this `userId`.
    user: Option<u32>,
    /// When the access token expires (Unix seconds); the session is closed then.
    expires: Option<u64>,
    /// With `ack_after = persisted`: messages waiting for their commit, in arrival order. Their
    /// acks (or errors) are written in this order as commits arrive.
    pending: VecDeque<PendingAck>,
    /// The sequence number of the next message that waits for its commit.
    next_seq: u64,
    /// Reading stopped because `pending` is full.
    pending_full: bool,
    /// A drain wants to close this session once `pending` is empty.
    close_when_settled: bool,
}

/// A message accepted with `ack_after = persisted`, waiting for its commit.
struct PendingAck {
    seq: u64,
    /// The echo fields of the ack (the JSON after `{"type":"ack","status":"OK",`).
    echo: Vec<u8>,
    client_message_id: Option<String>,
    since: Instant,
    /// `None` until the writer reports; then `Ok` or why it was not stored.
    outcome: Option<Result<(), String>>,
}

struct Conn {
    sock: TcpStream,
    /// Unique on this reactor for its lifetime (slab keys are reused).
    uid: u64,
    out: OutQueue,
    phase: Phase,
    /// When the current phase began.
    since: Instant,
    /// When anything was last received.
    last_in: Instant,
    ping_outstanding: bool,
    /// Whether WRITABLE interest is registered (only while output is queued).
    writable_armed: bool,
    /// Since when the output has been above the soft limit.
    over_soft_since: Option<Instant>,
    /// Already in the reactor's dirty list.
    dirty: bool,
    /// Accepted on the admin listener.
    admin: bool,
}

/// Everything one reactor thread owns.
pub struct Reactor {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    listening: bool,
    /// The admin listener, on reactor 0 when `admin_listen` is set. Never paused: admin
    /// connections are few and short.
    admin_listener: Option<TcpListener>,
    accept_retry_at: Option<Instant>,
    /// accept() last failed for lack of descriptors or memory (logged once per episode).
    accept_starved: bool,
    conn_cap: usize,
    conns: Slab<Conn>,
    shared: Arc<Shared>,
    stats: Arc<SharedStats>,
    inbox: Receiver<Batch>,
    /// Commits and query answers from the store's threads.
    replies: Receiver<Reply>,
    next_uid: u64,
    /// The bus carries messages to the store itself (see [`Bus::stores_messages`]).
    bus_stores: bool,
    /// This node's id, shared by every stored record.
    node_id: Arc<str>,
    publisher: Box<dyn Publisher>,
    members: RoomMembers,
    ws_config: WebSocketConfig,
    pool: BufPool,
    scratch: Vec<u8>,
    /// Connections with output queued since the last flush.
    dirty: Vec<usize>,
    /// Connections to read again without waiting for an event (budget used up, or unpaused).
    again: Vec<usize>,
    /// Connections to drop for exceeding the hard output limit.
    slow: Vec<usize>,
    now: Instant,
    next_tick: Instant,
    drain_deadline: Option<Instant>,
    websockets: u64,
    /// Open connections accepted on the admin listener.
    admin_conns: usize,
}

impl Reactor {
    /// A reactor with its own poll, listener and inbox.
    pub fn new(
        id: usize,
        poll: Poll,
        mut listener: TcpListener,
        mut admin_listener: Option<TcpListener>,
        inbox: Receiver<Batch>,
        replies: Receiver<Reply>,
        shared: Arc<Shared>,
    ) -> io::Result<Reactor> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        if let Some(admin) = &mut admin_listener {
            poll.registry()
                .register(admin, ADMIN_LISTENER, Interest::READABLE)?;
        }
        let config = &shared.config;
        let reactors = shared.stats.len().max(1);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_bytes)
            // tungstenite writes only pongs and close frames, straight into our queue.
            .write_buffer_size(0)
            .max_write_buffer_size(16 * 1024)
            .max_message_size(Some(config.max_message_bytes))
            .max_frame_size(Some(config.max_message_bytes));
        let now = Instant::now();
        let node_id: Arc<str> = shared.node_id.as_str().into();
        let bus_stores = shared.bus.stores_messages();
        Ok(Reactor {
            id,
            poll,
            listener: Some(listener),
            listening: true,
            admin_listener,
            accept_retry_at: None,
            accept_starved: false,
            conn_cap: config.max_connections.div_ceil(reactors),
            conns: Slab::with_capacity(1024),
            stats: shared.stats[id].clone(),
            publisher: shared.bus.publisher(id),
            shared,
            inbox,
            replies,
            next_uid: 0,
            bus_stores,
            node_id,
            members: RoomMembers::default(),
            ws_config,
            pool: BufPool::new(1024),
            scratch: Vec::with_capacity(2048),
            dirty: Vec::new(),
            again: Vec::new(),
            slow: Vec::new(),
            now,
            next_tick: now + TICK,
            drain_deadline: None,
            websockets: 0,
            admin_conns: 0,
        })
    }

    /// Runs until a shutdown has drained every connection or its deadline passed.
    pub fn run(mut self) {
        if self.shared.config.pin_reactors {
            pin_to_core(self.id);
        }
        let mut events = Events::with_capacity(1024);
        loop {
            self.drop_slow();
            // Broadcasts are handed to the other reactors before this turn's acks are written.
            let dropped = self.publisher.flush();
            if dropped > 0 {
                self.stats.fanout_dropped.add(dropped as u64);
            }
            self.flush_dirty();
            if let Some(deadline) = self.drain_deadline
                && (self.conns.is_empty() || self.now >= deadline)
            {
                break;
            }
            let timeout = if self.again.is_empty() {
                self.next_tick.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("reactor {}: poll failed: {e}", self.id);
                break;
            }
            self.now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    ADMIN_LISTENER => self.accept_admin(),
                    WAKER => {}
                    Token(t) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_ready(t);
                        }
                        if event.is_writable() {
                            self.flush(t);
                        }
                    }
                }
            }
            self.deliver_inbox();
            self.deliver_replies();
            for t in mem::take(&mut self.again) {
                self.read_ready(t);
            }
            if self.now >= self.next_tick {
                self.tick();
                self.next_tick = self.now + TICK;
            }
            if self.drain_deadline.is_none() && self.shared.draining.load(Ordering::SeqCst) {
                self.begin_drain();
            }
        }
        log::debug!(
            "reactor {} stopped with {} connections",
            self.id,
            self.conns.len()
        );
    }

    // ----- accepting -----

    fn accept(&mut self) {
        loop {
            if self.conns.len() >= self.conn_cap {
                // Policy: at the limit stop accepting; new clients wait in the kernel backlog
                // and accepting resumes below 90% (see `maybe_resume_accept`).
                self.pause_accept(None);
                return;
            }
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((sock, _)) => {
                    self.accept_starved = false;
                    self.stats.accepted.inc();
                    self.admit(sock, false);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stats.accept_errors.inc();
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) {
                        // Out of descriptors or memory: retrying at once would spin. Back off;
                        // closing connections frees descriptors meanwhile.
                        if !self.accept_starved {
                            log::warn!("reactor {}: accept failed ({e}); pausing accepts", self.id);
                            self.accept_starved = true;
                        }
                        self.pause_accept(Some(self.now + EMFILE_BACKOFF));
                        return;
                    }
                    if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EPROTO)) {
                        // The client gave up before we accepted: that one connection only.
                        continue;
                    }
                    // Anything else may repeat on every call: back off instead of spinning.
                    log::warn!("reactor {}: accept failed ({e}); pausing accepts", self.id);
                    self.pause_accept(Some(self.now + EMFILE_BACKOFF));
                    return;
                }
            }
        }
    }

    /// Accepts on the admin listener until it would block. A failure (out of descriptors)
    /// is retried at the next tick, since no new readiness edge may come. At most
    /// `ADMIN_MAX_CONNECTIONS` are open at once; more wait in the backlog until the next tick.
    fn accept_admin(&mut self) {
        loop {
            if self.admin_conns >= ADMIN_MAX_CONNECTIONS {
                return;
            }
            let Some(listener) = &self.admin_listener else {
                return;
            };
            match listener.accept() {
                Ok((sock, _)) => {
                    self.stats.accepted.inc();
                    self.admit(sock, true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stats.accept_errors.inc();
                    log::debug!("reactor {}: admin accept failed: {e}", self.id);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut sock: TcpStream, admin: bool) {
        if admin {
            self.admin_conns += 1;
        }
        let config = &self.shared.config;
        let sref = socket2::SockRef::from(&sock);
        if config.tcp_keepalive_secs > 0 {
            let idle = Duration::from_secs(config.tcp_keepalive_secs);
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval((idle / 3).max(Duration::from_secs(1)))
                .with_retries(3);
            let _ = sref.set_tcp_keepalive(&keepalive);
        }
        // Socket options are tuning: a failure leaves the kernel default in place.
        let _ = sref.set_tcp_nodelay(config.tcp_nodelay);
        if config.socket_send_buffer_bytes > 0 {
            let _ = sref.set_send_buffer_size(config.socket_send_buffer_bytes);
        }
        if config.socket_recv_buffer_bytes > 0 {
            let _ = sref.set_recv_buffer_size(config.socket_recv_buffer_bytes);
        }
        let entry = self.conns.vacant_entry();
        let token = Token(entry.key());
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, token, Interest::READABLE)
        {
            log::warn!("reactor {}: cannot register a connection: {e}", self.id);
            return;
        }
        self.next_uid += 1;
        entry.insert(Conn {
            sock,
            uid: self.next_uid,
            out: OutQueue::default(),
            phase: Phase::Request {
                head: Vec::with_capacity(1024),
            },
            since: self.now,
            last_in: self.now,
            ping_outstanding: false,
            writable_armed: false,
            over_soft_since: None,
            dirty: false,
            admin,
        });
        self.stats.connections.set(self.conns.len() as u64);
    }

    fn pause_accept(&mut self, retry_at: Option<Instant>) {
        if self.listening {
            if let Some(listener) = &mut self.listener {
                let _ = self.poll.registry().deregister(listener);
            }
            self.listening = false;
            self.stats.accept_paused.inc();
        }
        self.accept_retry_at = retry_at;
    }

    fn maybe_resume_accept(&mut self) {
        if self.listening || self.drain_deadline.is_some() {
            return;
        }
        if self.conns.len() * 10 >= self.conn_cap * 9 {
            return;
        }
        if self.accept_retry_at.is_some_and(|at| self.now < at) {
            return;
        }
        let Some(listener) = &mut self.listener else {
            return;
        };
        if self
            .poll
            .registry()
            .register(listener, LISTENER, Interest::READABLE)
            .is_ok()
        {
            self.listening = true;
            self.accept_retry_at = None;
            self.accept();
        }
    }

    // ----- reading -----

    fn read_ready(&mut self, t: usize) {
        match self.conns.get(t).map(|c| &c.phase) {
            Some(Phase::Request { .. }) => self.read_request(t),
            Some(Phase::Open(_)) => self.read_messages(t),
            Some(Phase::Closing { .. }) => self.discard_input(t),
            Some(Phase::Waiting | Phase::Joining(_)) | None => {}
        }
    }

    fn read_request(&mut self, t: usize) {
        let max = self.shared.config.max_request_head_bytes;
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        let Phase::Request { head } = &mut conn.phase else {
            return;
        };
        let mut buf = [0u8; 2048];
        let mut gone = false;
        while head.len() < max {
            let room = (max - head.len()).min(buf.len());
            match conn.sock.read(&mut buf[..room]) {
                Ok(0) => {
                    gone = true;
                    break;
                }
                Ok(n) => {
                    head.extend_from_slice(&buf[..n]);
                    self.stats.bytes_in.add(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        match http::parse_head(head) {
            Ok(Some(parsed)) => {
                let leftover = head.split_off(parsed.len);
                self.answer(t, parsed, leftover);
            }
            Ok(None) if gone => self.remove(t, Some(Disconnect::PeerGone)),
            Ok(None) if head.len() >= max => {
                self.stats.disconnect(Disconnect::BadRequest);
                let body = format!("the request head is over {max} bytes");
                self.respond(
                    t,
                    http::error_response(Status::HeadersTooLarge, &body, false),
                    431,
                );
            }
            Ok(None) => {}
            Err(message) => {
                self.stats.disconnect(Disconnect::BadRequest);
                self.respond(
                    t,
                    http::error_response(Status::BadRequest, &message, false),
                    400,
                );
            }
        }
    }

    /// Answers a complete request head: upgrades to a WebSocket or writes one HTTP response.
    fn answer(&mut self, t: usize, parsed: http::Head, leftover: Vec<u8>) {
        let head_only = parsed.head_only;
        let json = |status: Status, body: String| (status, "application/json", body);
        let on_admin = self.conns.get(t).is_some_and(|c| c.admin);
        let split = self.shared.config.admin_addr().is_some();
        // Where each route may be served: the admin address serves no chat; with a split the
        // public one serves no operator routes; room-scoped routes (presence, a room's
        // history) stay public for the chat page and follow the room's token instead.
        let denial = match &parsed.route {
            Route::Upgrade { .. } if on_admin => Some((
                Status::NotFound,
                "no WebSockets on the admin address".to_string(),
            )),
            Route::ChatPage if on_admin => Some((
                Status::NotFound,
                "the chat page is on the public address".to_string(),
            )),
            Route::Metrics | Route::Dashboard if split && !on_admin => Some((
                Status::NotFound,
                "this route is served on the admin address".to_string(),
            )),
            Route::Api { query, .. } if query.room().is_none() && split && !on_admin => Some((
                Status::NotFound,
                "this route is served on the admin address".to_string(),
            )),
            Route::Presence { room, token } if !on_admin => self
                .room_access(room, token.as_deref())
                .err()
                .map(|m| (Status::Unauthorized, m)),
            // A room's history follows the room's token. The operator routes read every
            // user's messages, so with tokens on (and no admin address) they need a token
            // that opens every room (`chatflow token --rooms '*'`).
            Route::Api { query, token } if !on_admin => self
                .room_access(query.room().unwrap_or("*"), token.as_deref())
                .err()
                .map(|m| {
                    let m = if query.room().is_none() {
                        format!("{m} (operator routes need a token for every room: --rooms '*')")
                    } else {
                        m
                    };
                    (Status::Unauthorized, m)
                }),
            _ => None,
        };
        let route = match denial {
            Some((status, message)) => Route::Error(status, message),
            None => parsed.route,
        };
        let (status, content_type, body) = match route {
            Route::Upgrade {
                room,
                accept,
                token,
                origin,
            } => match self.admission(&room, token.as_deref(), origin.as_deref()) {
                Ok(user) => {
                    self.upgrade(t, &room, &accept, leftover, user);
                    return;
                }
                Err((status, message)) => {
                    let bytes = http::error_response(status, &message, head_only);
                    self.respond(t, bytes, status.code());
                    return;
                }
            },
            Route::ChatPage => (Status::Ok, HTML, CHAT_PAGE.into()),
            Route::Dashboard => (Status::Ok, HTML, DASHBOARD_PAGE.into()),
            Route::Health => json(
                Status::Ok,
                serde_json::json!({
                    "status": "UP",
                    "timestamp": protocol::now_rfc3339(),
                    "nodeId": self.shared.node_id,
                    "connections": self.shared.websockets(),
                })
                .to_string(),
            ),
            Route::Ready => {
                let bus = self.shared.bus.ready();
                let store = self.shared.store_ready();
                let draining = self.shared.draining.load(Ordering::Relaxed);
                let ready = bus.is_ok() && store.is_ok() && !draining;
                let queue = &self.shared.store.queue;
                let body = serde_json::json!({
                    "status": if ready { "READY" } else { "NOT_READY" },
                    "nodeId": self.shared.node_id,
                    "draining": draining,
                    "bus": { "kind": self.shared.bus.name(), "up": bus.is_ok(), "error": bus.err() },
                    "store": {
                        "kind": self.shared.store.kind,
                        "up": store.is_ok(),
                        "error": store.err(),
                        "breaker": format!("{:?}", queue.breaker.state()).to_lowercase(),
                        "queued": queue.depth(),
                        "capacity": queue.capacity(),
                    },
                    "ackAfter": self.shared.config.ack_after,
                });
                let ok = body["status"] == "READY";
                json(
                    if ok { Status::Ok } else { Status::Unavailable },
                    body.to_string(),
                )
            }
            Route::Metrics => (
                Status::Ok,
                "text/plain; version=0.0.4; charset=utf-8",
                self.shared.render_metrics(),
            ),
            Route::Presence { room, .. } => {
                let (count, users) = self.shared.presence.users(&room, PRESENCE_LIST_MAX);
                let users: Vec<_> = users
                    .into_iter()
                    .map(|u| serde_json::json!({ "userId": u.user_id, "username": u.username }))
                    .collect();
                let truncated = users.len() < count;
                json(
                    Status::Ok,
                    serde_json::json!({
                        "roomId": room,
                        "count": count,
                        "users": users,
                        "truncated": truncated,
                    })
                    .to_string(),
                )
            }
            Route::Api { query, .. } => {
                let Some(conn) = self.conns.get_mut(t) else {
                    return;
                };
                let reply_to = ReplyTo {
                    reactor: self.id,
                    token: t,
                    conn: conn.uid,
                };
                match self.shared.store.queries.submit(query, reply_to, head_only) {
                    Ok(()) => {
                        conn.phase = Phase::Waiting;
                        conn.since = self.now;
                    }
                    Err(bytes) => self.respond(t, bytes, Status::Unavailable.code()),
                }
                return;
            }
            Route::Error(status, message) => {
                let bytes = http::error_response(status, &message, head_only);
                self.respond(t, bytes, status.code());
                return;
            }
        };
        let bytes = http::response(status, content_type, &body, head_only);
        self.respond(t, bytes, status.code());
    }

    fn respond(&mut self, t: usize, bytes: Vec<u8>, status: u16) {
        self.stats.http_response(status);
        if let Some(conn) = self.conns.get_mut(t) {
            conn.out.push_owned(&bytes, &mut self.pool);
            conn.phase = Phase::Closing { write_shut: false };
            conn.since = self.now;
            self.mark_dirty(t);
            self.discard_input(t);
        }
    }

    /// With tokens configured, a room-scoped HTTP route needs a token that opens the room.
    fn room_access(&self, room: &str, token: Option<&str>) -> Result<(), String> {
        let Some(key) = &self.shared.auth_key else {
            return Ok(());
        };
        let token = token.ok_or(auth::TokenError::Missing);
        token
            .and_then(|t| auth::verify(key, t, room, auth::unix_now()))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Checks the origin and the access token of an upgrade; returns the token's user and
    /// its expiry.
    fn admission(
        &self,
        room: &str,
        token: Option<&str>,
        origin: Option<&str>,
    ) -> Result<Option<(u32, u64)>, (Status, String)> {
        let allowed = &self.shared.config.allowed_origins;
        if let Some(origin) = origin
            && !allowed.is_empty()
        {
            let theirs = normalize_origin(origin);
            let listed = theirs.is_some() && allowed.iter().any(|a| normalize_origin(a) == theirs);
            if !listed {
                return Err((Status::Forbidden, format!("origin {origin} is not allowed")));
            }
        }
        let Some(key) = &self.shared.auth_key else {
            return Ok(None);
        };
        let token = token.ok_or(auth::TokenError::Missing);
        match token.and_then(|t| auth::verify(key, t, room, auth::unix_now())) {
            Ok(claims) => Ok(Some((claims.sub, claims.exp))),
            Err(e) => Err((Status::Unauthorized, e.to_string())),
        }
    }

    /// Starts the session of an admitted upgrade, or parks it until the bus has subscribed
    /// this node to the room (see [`Bus::join`]).
    fn upgrade(
        &mut self,
        t: usize,
        room: &str,
        accept: &str,
        leftover: Vec<u8>,
        token: Option<(u32, u64)>,
    ) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        let room: Arc<str> = Arc::from(room);
        let joiner = ReplyTo {
            reactor: self.id,
            token: t,
            conn: conn.uid,
        };
        match self.shared.bus.join(&room, joiner) {
            Joined::Now => self.open_session(t, &room, accept, leftover, token),
            Joined::Later => {
                conn.phase = Phase::Joining(Box::new(Joining {
                    room,
                    joiner,
                    accept: accept.to_string(),
                    leftover,
                    token,
                }));
                conn.since = self.now;
                self.stats.joins_waited.inc();
            }
        }
    }

    /// Answers the upgrade with `101` and opens the session.
    fn open_session(
        &mut self,
        t: usize,
        room: &str,
        accept: &str,
        leftover: Vec<u8>,
        token: Option<(u32, u64)>,
    ) {
        let config = &self.shared.config;
        let rate = (config.rate_limit_per_sec > 0).then(|| {
            RateLimiter::new(config.rate_limit_per_sec, config.rate_limit_burst, self.now)
        });
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        conn.out
            .push_owned(&http::upgrade_response(accept), &mut self.pool);
        let session = Session {
            ctx: WebSocketContext::from_partially_read(
                leftover,
                Role::Server,
                Some(self.ws_config),
            ),
            room: self.members.join(room, t),
            rate,
            joins: ConnJoins::default(),
            paused: false,
            user: token.map(|(user, _)| user),
            expires: token.map(|(_, exp)| exp),
            pending: VecDeque::new(),
            next_seq: 0,
            pending_full: false,
            close_when_settled: false,
        };
        conn.phase = Phase::Open(Box::new(session));
        conn.since = self.now;
        conn.last_in = self.now;
        self.websockets += 1;
        self.stats.websockets.set(self.websockets);
        self.stats.upgrades.inc();
        self.mark_dirty(t);
        // Frames may have arrived with the request; edge-triggered readiness will not repeat.
        self.read_messages(t);
    }

    /// Reads and handles WebSocket messages until the socket would block, the budget is spent
    /// or the client's output is over the soft limit. `draining` reads once more, paused or
    /// not, up to a larger budget and the hard limit.
    fn read_messages(&mut self, t: usize) {
        let soft = self.shared.config.output_soft_limit_bytes;
        let hard = self.shared.config.output_hard_limit_bytes;
        let draining = self.drain_deadline.is_some();
        let budget = if draining {
            DRAIN_READ_BUDGET
        } else {
            READ_BUDGET
        };
        let mut handled = 0;
        loop {
            let Some(conn) = self.conns.get_mut(t) else {
                return;
            };
            let Phase::Open(session) = &mut conn.phase else {
                return;
            };
            if draining {
                if conn.out.len() > hard || handled >= budget {
                    return;
                }
            } else if session.paused || conn.out.len() > soft {
                // Policy: a client that does not read its acks is not read either; reading
                // resumes when its output drains to half the soft limit.
                session.paused = true;
                return;
            } else if session.pending.len() >= MAX_PENDING_ACKS {
                // Policy: a client with too many messages waiting for their commit is not read
                // until half of them are settled.
                session.pending_full = true;
                return;
            }
            let mut io = WsIo {
                sock: &mut conn.sock,
                out: &mut conn.out,
                pool: &mut self.pool,
                read_bytes: 0,
            };
            let result = session.ctx.read(&mut io);
            let read_bytes = io.read_bytes;
            if read_bytes > 0 {
                self.stats.bytes_in.add(read_bytes);
                conn.last_in = self.now;
                conn.ping_outstanding = false;
            }
            let has_output = !conn.out.is_empty();
            match result {
                Ok(message) => {
                    self.stats.frames_in.inc();
                    if has_output {
                        self.mark_dirty(t);
                    }
                    match message {
                        Message::Text(text) => self.on_text(t, text.as_str()),
                        Message::Binary(_) => self.reject(
                            t,
                            &Rejection::whole(
                                ErrorCode::UnsupportedFrame,
                                "binary frames are not supported; send JSON in text frames",
                            ),
                        ),
                        // tungstenite queued the pong or close reply; nothing else to do.
                        Message::Ping(_)
                        | Message::Pong(_)
                        | Message::Close(_)
                        | Message::Frame(_) => {}
                    }
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    if has_output {
                        self.mark_dirty(t);
                    }
                    return;
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(WsError::ConnectionClosed) => {
                    // The client closed and tungstenite queued our reply.
                    self.start_closing(t, Disconnect::ClientClose);
                    return;
                }
                Err(
                    WsError::Io(_)
                    | WsError::AlreadyClosed
                    | WsError::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ),
                ) => {
                    self.remove(t, Some(Disconnect::PeerGone));
                    return;
                }
                Err(WsError::Protocol(e)) => {
                    self.close_ws(
                        t,
                        CloseCode::Protocol,
                        &e.to_string(),
                        Disconnect::ProtocolError,
                    );
                    return;
                }
                Err(WsError::Utf8(_)) => {
                    self.close_ws(
                        t,
                        CloseCode::Invalid,
                        "text is not UTF-8",
                        Disconnect::InvalidUtf8,
                    );
                    return;
                }
                Err(WsError::Capacity(e)) => {
                    self.close_ws(
                        t,
                        CloseCode::Size,
                        &e.to_string(),
                        Disconnect::MessageTooLarge,
                    );
                    return;
                }
                Err(e) => {
                    self.close_ws(
                        t,
                        CloseCode::Protocol,
                        &e.to_string(),
                        Disconnect::ProtocolError,
                    );
                    return;
                }
            }
            handled += 1;
            if handled >= budget && !draining {
                // Fairness: others get a turn; this connection is read again before the next wait.
                self.again.push(t);
                return;
            }
        }
    }

    fn discard_input(&mut self, t: usize) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match conn.sock.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.stats.bytes_in.add(n as u64),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // The peer is done. Remove now unless a response is still being written, in which case
        // the flush finishes the job (a peer may half-close after sending its request).
        if conn.out.is_empty() {
            self.remove(t, None);
        }
    }

    // ----- messages -----

    fn on_text(&mut self, t: usize, text: &str) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        let Phase::Open(session) = &mut conn.phase else {
            return;
        };
        if let Some(rate) = &mut session.rate
            && !rate.allow(self.now)
        {
            let limit = self.shared.config.rate_limit_per_sec;
            let mut r = Rejection::whole(
                ErrorCode::RateLimited,
                format!("more than {limit} messages per second; this message was dropped"),
            );
            r.client_message_id = client_message_id_of(text);
            self.reject(t, &r);
            return;
        }
        let room = session.room.clone();
        let token_user = session.user;
        match protocol::parse_message(text, &room) {
            Ok(msg) if token_user.is_some_and(|u| u != msg.user_id) => {
                let mut r = Rejection::whole(
                    ErrorCode::Unauthorized,
                    "userId differs from the user of this connection's access token",
                );
                r.client_message_id = msg.client_message_id.as_deref().map(str::to_owned);
                self.reject(t, &r);
            }
            Ok(msg) => self.accept_message(t, &room, &msg),
            Err(r) => self.reject(t, &r),
        }
    }

    fn accept_message(&mut self, t: usize, room: &Arc<str>, msg: &ChatMessage<'_>) {
        let id = msg.message_id();
        let server_ts = OffsetDateTime::now_utc();
        let ack_after = self.shared.config.ack_after;
        // A broker-backed bus carries every message to the store itself (its persist queue);
        // otherwise the reactor hands it to the store's writers.
        let bus_stores = self.bus_stores;
        let client_message_id = || msg.client_message_id.as_deref().map(str::to_owned);

        // Policy: room in the store's queue is reserved before anyone sees the message, so a
        // message that is broadcast can always be stored; without room it is refused whole.
        if !bus_stores {
            let queue = &self.shared.store.queue;
            let refusal = if ack_after == AckAfter::Persisted && queue.breaker.is_open() {
                Some((
                    ErrorCode::Unavailable,
                    "the store is failing; this message was not stored; retry later",
                ))
            } else if !queue.reserve() {
                Some(if queue.breaker.is_open() {
                    (
                        ErrorCode::Unavailable,
                        "the store is unreachable and its queue is full; this message was not stored; retry later",
                    )
                } else {
                    (
                        ErrorCode::Overloaded,
                        "the store's queue is full; the server is shedding load; retry later",
                    )
                })
            } else {
                None
            };
            if let Some((code, why)) = refusal {
                let mut r = Rejection::whole(code, why);
                r.client_message_id = client_message_id();
                self.reject(t, &r);
                return;
            }
        }

        // Whether the ack waits for a settlement (a commit, or the broker's confirm), and the
        // sequence number it waits under.
        let waits = match ack_after {
            AckAfter::Received => false,
            AckAfter::Published => bus_stores,
            AckAfter::Persisted => true,
        };
        let origin = match self.conns.get_mut(t).map(|c| (c.uid, &mut c.phase)) {
            Some((uid, Phase::Open(session))) if waits => {
                session.next_seq += 1;
                Some(Origin {
                    reactor: self.id,
                    token: t,
                    conn: uid,
                    seq: session.next_seq,
                })
            }
            _ => None,
        };

        let mut body = mem::take(&mut self.scratch);
        body.clear();
        body.extend_from_slice(protocol::BROADCAST_PREFIX);
        protocol::write_echo_fields(&mut body, msg, id, room, server_ts);

        let local_others = self.members.members(room).len() > 1;
        let remote = self.shared.inboxes.len() > 1;
        let mut accepted = Accepted::Now;
        if local_others || remote || bus_stores {
            let fanout = Fanout {
                room: room.clone(),
                frame: shared_text_frame(&body),
            };
            if remote || bus_stores {
                let out = Outgoing {
                    fanout: &fanout,
                    payload: &body,
                    // With a bus that stores, `persisted` waits for the commit notice of
                    // whichever node's persist consumer stores the message.
                    origin: match ack_after {
                        AckAfter::Published => origin,
                        AckAfter::Persisted if bus_stores => origin,
                        _ => None,
                    },
                    persisted: ack_after == AckAfter::Persisted,
                };
                match self.publisher.publish(&out) {
                    Ok(a) => accepted = a,
                    Err(e) => {
                        if !bus_stores {
                            self.shared.store.queue.unreserve();
                        }
                        let (code, why) = match e {
                            PublishError::Overloaded => (
                                ErrorCode::Overloaded,
                                "the server is shedding load; retry later",
                            ),
                            PublishError::Unavailable => (
                                ErrorCode::Unavailable,
                                "the message bus is unreachable; this message was not sent or stored; retry later",
                            ),
                        };
                        let mut r = Rejection::whole(code, why);
                        r.client_message_id = client_message_id();
                        self.scratch = body;
                        self.reject(t, &r);
                        return;
                    }
                }
            }
            self.deliver(&fanout, Some(t));
        }

        if msg.message_type != MessageType::Text {
            self.update_presence(t, room, msg);
        }

        if !bus_stores {
            let record = Record {
                message_id: id,
                room_id: room.clone(),
                user_id: i32::try_from(msg.user_id).unwrap_or(i32::MAX),
                username: msg.username.to_string(),
                message: msg.message.to_string(),
                message_type: msg.message_type,
                client_ts: msg.client_time,
                server_ts,
                node_id: self.node_id.clone(),
            };
            let origin = if ack_after == AckAfter::Persisted {
                origin
            } else {
                None
            };
            let persist = Persist {
                record,
                origin,
                delivery: None,
            };
            if !self.shared.store.queue.send_reserved(persist) {
                // Only possible once the writers have stopped, which happens after the reactors.
                log::error!("reactor {}: the store's writers are gone", self.id);
            }
        }
        self.stats.message(msg.message_type);

        let echo = &body[protocol::BROADCAST_PREFIX.len()..];
        let Some(conn) = self.conns.get_mut(t) else {
            self.scratch = body;
            return;
        };
        let pending = match (origin, &mut conn.phase) {
            (Some(o), Phase::Open(session))
                if ack_after == AckAfter::Persisted || accepted == Accepted::Later =>
            {
                session.pending.push_back(PendingAck {
                    seq: o.seq,
                    echo: echo.to_vec(),
                    client_message_id: client_message_id(),
                    since: self.now,
                    outcome: None,
                });
                true
            }
            _ => false,
        };
        if !pending {
            let mut header = [0u8; 10];
            let n = write_text_header(protocol::ACK_PREFIX.len() + echo.len(), &mut header);
            conn.out.push_owned(&header[..n], &mut self.pool);
            conn.out.push_owned(protocol::ACK_PREFIX, &mut self.pool);
            conn.out.push_owned(echo, &mut self.pool);
            self.stats.acks.inc();
            self.stats.frames_out.inc();
            self.mark_dirty(t);
        }
        self.scratch = body;
    }

    /// Applies commits and query answers from the store's threads.
    fn deliver_replies(&mut self) {
        self.shared.mailboxes[self.id].clear_notified();
        while let Ok(reply) = self.replies.try_recv() {
            match reply {
                Reply::Settled(completions) => {
                    let mut touched = Vec::new();
                    for c in completions {
                        if self.record_outcome(&c) && touched.last() != Some(&c.token) {
                            touched.push(c.token);
                        }
                    }
                    for t in touched {
                        self.release_acks(t);
                    }
                }
                Reply::Joined { token, conn } => self.joined(token, conn),
                Reply::Http {
                    token,
                    conn,
                    bytes,
                    status,
                } => {
                    let waiting = self
                        .conns
                        .get(token)
                        .is_some_and(|c| c.uid == conn && matches!(c.phase, Phase::Waiting));
                    if waiting {
                        self.respond(token, bytes, status);
                    }
                }
            }
        }
    }

    /// The bus has subscribed this node to the room `token` waits to join: answer its upgrade.
    fn joined(&mut self, token: usize, uid: u64) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.uid != uid || !matches!(conn.phase, Phase::Joining(_)) {
            return;
        }
        if let Phase::Joining(j) = mem::replace(&mut conn.phase, Phase::Waiting) {
            let Joining {
                room,
                accept,
                leftover,
                token: user,
                ..
            } = *j;
            self.open_session(token, &room, &accept, leftover, user);
        }
    }

    /// Gives up an upgrade parked in [`Phase::Joining`]: the client gets `status` and
    /// `message` instead of `101`, and the bus stops counting it as a member.
    fn abandon_join(&mut self, t: usize, status: Status, message: &str) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        if let Phase::Joining(j) = mem::replace(&mut conn.phase, Phase::Waiting) {
            self.shared.bus.leave_joining(&j.room, j.joiner);
            let bytes = http::error_response(status, message, false);
            self.respond(t, bytes, status.code());
        }
    }

    /// Notes a commit on its connection; false when the connection is gone.
    fn record_outcome(&mut self, c: &Completion) -> bool {
        let Some(conn) = self.conns.get_mut(c.token) else {
            return false;
        };
        if conn.uid != c.conn {
            return false;
        }
        let Phase::Open(session) = &mut conn.phase else {
            return false;
        };
        // Sequence numbers are increasing in the queue; entries may already have timed out.
        if let Ok(i) = session.pending.binary_search_by_key(&c.seq, |p| p.seq)
            && session.pending[i].outcome.is_none()
        {
            session.pending[i].outcome = Some(c.result.clone());
        }
        true
    }

    /// Writes the acks (or errors) of the settled messages at the front of `t`'s queue, in
    /// arrival order.
    fn release_acks(&mut self, t: usize) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        let Phase::Open(session) = &mut conn.phase else {
            return;
        };
        let mut wrote = false;
        let mut body = mem::take(&mut self.scratch);
        while session.pending.front().is_some_and(|p| p.outcome.is_some()) {
            let Some(p) = session.pending.pop_front() else {
                break;
            };
            match p.outcome {
                Some(Ok(())) => {
                    let mut header = [0u8; 10];
                    let n =
                        write_text_header(protocol::ACK_PREFIX.len() + p.echo.len(), &mut header);
                    conn.out.push_owned(&header[..n], &mut self.pool);
                    conn.out.push_owned(protocol::ACK_PREFIX, &mut self.pool);
                    conn.out.push_owned(&p.echo, &mut self.pool);
                    self.stats.acks.inc();
                }
                Some(Err(why)) => {
                    let mut r = Rejection::whole(ErrorCode::Unavailable, why);
                    r.client_message_id = p.client_message_id;
                    body.clear();
                    protocol::write_error(&mut body, &r);
                    conn.out.push_text_frame(&body, &mut self.pool);
                    self.stats.error(ErrorCode::Unavailable);
                }
                None => {}
            }
            self.stats.frames_out.inc();
            wrote = true;
        }
        self.scratch = body;
        let resume = session.pending_full && session.pending.len() <= MAX_PENDING_ACKS / 2;
        if resume {
            session.pending_full = false;
        }
        let settled = session.close_when_settled && session.pending.is_empty();
        if wrote {
            self.mark_dirty(t);
        }
        if resume {
            self.again.push(t);
        }
        if settled {
            self.close_ws(
                t,
                CloseCode::Away,
                "server shutting down",
                Disconnect::Shutdown,
            );
        }
    }

    fn update_presence(&mut self, t: usize, room: &Arc<str>, msg: &ChatMessage<'_>) {
        let Some(Phase::Open(session)) = self.conns.get_mut(t).map(|c| &mut c.phase) else {
            return;
        };
        let presence = &self.shared.presence;
        if msg.message_type == MessageType::Join {
            match presence.join(room, msg.user_id, &msg.username, (self.id, t)) {
                PresenceChange::Full => self.stats.presence_dropped.inc(),
                _ => session.joins.joined(msg.user_id),
            }
        } else {
            presence.leave(room, msg.user_id);
            session.joins.left(msg.user_id);
        }
    }

    fn reject(&mut self, t: usize, r: &Rejection) {
        let mut body = mem::take(&mut self.scratch);
        body.clear();
        protocol::write_error(&mut body, r);
        if let Some(conn) = self.conns.get_mut(t) {
            conn.out.push_text_frame(&body, &mut self.pool);
            self.stats.error(r.code);
            self.stats.frames_out.inc();
            self.mark_dirty(t);
        }
        self.scratch = body;
    }

    /// Queues a broadcast to this reactor's members of its room, except `except`.
    fn deliver(&mut self, fanout: &Fanout, except: Option<usize>) {
        let hard = self.shared.config.output_hard_limit_bytes;
        let soft = self.shared.config.output_soft_limit_bytes;
        let mut delivered = 0;
        for &m in self.members.members(&fanout.room) {
            if Some(m) == except {
                continue;
            }
            let Some(conn) = self.conns.get_mut(m) else {
                continue;
            };
            if conn.out.len() > hard {
                // Already condemned this turn: queue nothing more for it.
                continue;
            }
            conn.out.push_shared(fanout.frame.clone());
            delivered += 1;
            let queued = conn.out.len();
            if queued > hard {
                // Policy: past the hard limit a slow reader is dropped at the end of this turn.
                self.slow.push(m);
            } else if queued > soft && conn.over_soft_since.is_none() {
                conn.over_soft_since = Some(self.now);
            }
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(m);
            }
        }
        self.stats.fanout_deliveries.add(delivered);
        self.stats.frames_out.add(delivered);
    }

    fn deliver_inbox(&mut self) {
        self.shared.inboxes[self.id].clear_notified();
        while let Ok(batch) = self.inbox.try_recv() {
            for fanout in &batch {
                self.deliver(fanout, None);
            }
        }
    }

    // ----- writing -----

    fn mark_dirty(&mut self, t: usize) {
        if let Some(conn) = self.conns.get_mut(t)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(t);
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = mem::take(&mut self.dirty);
        for &t in &dirty {
            if let Some(conn) = self.conns.get_mut(t) {
                conn.dirty = false;
                self.flush(t);
            }
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    /// Writes what the socket takes and arms WRITABLE only while output remains.
    fn flush(&mut self, t: usize) {
        let soft = self.shared.config.output_soft_limit_bytes;
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        match conn.out.write_to(&mut conn.sock, &mut self.pool) {
            Ok(n) => self.stats.bytes_out.add(n as u64),
            Err(_) => {
                let why = matches!(conn.phase, Phase::Open(_)).then_some(Disconnect::PeerGone);
                self.remove(t, why);
                return;
            }
        }
        let queued = conn.out.len();
        let want_writable = queued > 0;
        if want_writable != conn.writable_armed {
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if self
                .poll
                .registry()
                .reregister(&mut conn.sock, Token(t), interest)
                .is_ok()
            {
                conn.writable_armed = want_writable;
            }
        }
        if queued <= soft {
            conn.over_soft_since = None;
        }
        match &mut conn.phase {
            Phase::Open(session) if session.paused && queued <= soft / 2 => {
                session.paused = false;
                self.again.push(t);
            }
            Phase::Closing { write_shut } if queued == 0 && !*write_shut => {
                // Everything is written: send FIN, then wait for the peer's EOF (or the linger).
                *write_shut = true;
                let _ = conn.sock.shutdown(std::net::Shutdown::Write);
                self.discard_input(t);
            }
            _ => {}
        }
    }

    // ----- closing -----

    /// Queues a close frame with `code` and moves the connection to `Closing`.
    fn close_ws(&mut self, t: usize, code: CloseCode, reason: &str, why: Disconnect) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        // A connection already closing has been counted and has sent its close frame.
        let Phase::Open(session) = &mut conn.phase else {
            return;
        };
        {
            // A close reason must fit a control frame (125 bytes, 2 of them the code).
            let mut end = reason.len().min(120);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            let frame = CloseFrame {
                code,
                reason: reason[..end].to_owned().into(),
            };
            let mut io = WsIo {
                sock: &mut conn.sock,
                out: &mut conn.out,
                pool: &mut self.pool,
                read_bytes: 0,
            };
            // Writes into our queue; an error only means tungstenite thinks it is closed already.
            let _ = session.ctx.close(&mut io, Some(frame));
        }
        self.start_closing(t, why);
    }

    fn start_closing(&mut self, t: usize, why: Disconnect) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        let phase = mem::replace(&mut conn.phase, Phase::Closing { write_shut: false });
        conn.since = self.now;
        match phase {
            Phase::Open(session) => self.end_session(t, &session),
            Phase::Joining(j) => self.shared.bus.leave_joining(&j.room, j.joiner),
            _ => {}
        }
        self.stats.disconnect(why);
        self.mark_dirty(t);
        self.discard_input(t);
    }

    fn end_session(&mut self, t: usize, session: &Session) {
        self.members.leave(&session.room, t);
        self.shared.bus.leave(&session.room);
        if !session.joins.users().is_empty() {
            self.shared
                .presence
                .drop_holder(&session.room, (self.id, t), session.joins.users());
        }
        self.websockets -= 1;
        self.stats.websockets.set(self.websockets);
    }

    /// Closes the socket now. `why` is counted unless the reason was counted already.
    fn remove(&mut self, t: usize, why: Option<Disconnect>) {
        if !self.conns.contains(t) {
            return;
        }
        let mut conn = self.conns.remove(t);
        if conn.admin {
            self.admin_conns -= 1;
        }
        match &conn.phase {
            Phase::Open(session) => self.end_session(t, session),
            Phase::Joining(j) => self.shared.bus.leave_joining(&j.room, j.joiner),
            _ => {}
        }
        conn.out.clear(&mut self.pool);
        let _ = self.poll.registry().deregister(&mut conn.sock);
        if let Some(why) = why {
            self.stats.disconnect(why);
        }
        self.stats.connections.set(self.conns.len() as u64);
        self.maybe_resume_accept();
    }

    fn drop_slow(&mut self) {
        while let Some(t) = self.slow.pop() {
            let hard = self.shared.config.output_hard_limit_bytes;
            if self.conns.get(t).is_some_and(|c| c.out.len() > hard) {
                self.remove(t, Some(Disconnect::SlowConsumer));
            }
        }
    }

    // ----- timers -----

    fn tick(&mut self) {
        let config = &self.shared.config;
        let handshake_timeout = config.handshake_timeout();
        let idle_timeout = config.idle_timeout();
        let ping_interval = config.ping_interval();
        let soft_window = config.output_soft_limit_window();
        let now = self.now;
        let unix_now = auth::unix_now();
        let mut queued = 0;
        let mut expired: Vec<(usize, Option<Disconnect>)> = Vec::new();
        let mut pings = Vec::new();
        let query_wait = self.shared.store.queries.timeout() + TICK;
        let persist_timeout = config.persist_timeout();
        let mut unanswered = Vec::new();
        let mut unjoined = Vec::new();
        let mut uncommitted = Vec::new();
        for (t, conn) in &mut self.conns {
            queued += conn.out.len();
            if let Phase::Open(session) = &conn.phase
                && session
                    .pending
                    .front()
                    .is_some_and(|p| p.outcome.is_none() && now - p.since >= persist_timeout)
            {
                uncommitted.push(t);
            }
            match &conn.phase {
                Phase::Request { .. } if now - conn.since >= handshake_timeout => {
                    expired.push((t, Some(Disconnect::HandshakeTimeout)));
                }
                Phase::Waiting if now - conn.since >= query_wait => unanswered.push(t),
                Phase::Joining(_) if now - conn.since >= handshake_timeout => unjoined.push(t),
                Phase::Open(session) => {
                    if session.expires.is_some_and(|exp| exp <= unix_now) {
                        expired.push((t, Some(Disconnect::TokenExpired)));
                    } else if conn.over_soft_since.is_some_and(|s| now - s >= soft_window) {
                        expired.push((t, Some(Disconnect::SlowConsumer)));
                    } else if now - conn.last_in >= idle_timeout {
                        expired.push((t, Some(Disconnect::IdleTimeout)));
                    } else if let Some(every) = ping_interval
                        && now - conn.last_in >= every
                        && !conn.ping_outstanding
                    {
                        conn.ping_outstanding = true;
                        pings.push(t);
                    }
                }
                Phase::Closing { .. } if now - conn.since >= CLOSING_LINGER => {
                    expired.push((t, None));
                }
                _ => {}
            }
        }
        self.stats.queued_bytes.set(queued as u64);
        if self.admin_listener.is_some() {
            self.accept_admin();
        }
        self.stats.rooms.set(self.members.room_count() as u64);
        for t in pings {
            if let Some(conn) = self.conns.get_mut(t) {
                conn.out.push_owned(&PING_FRAME, &mut self.pool);
                self.mark_dirty(t);
            }
        }
        for t in unanswered {
            let message = format!(
                "the store did not answer within {} ms; retry shortly",
                query_wait.as_millis()
            );
            let bytes = http::error_response(Status::Unavailable, &message, false);
            self.respond(t, bytes, Status::Unavailable.code());
        }
        for t in unjoined {
            let message = format!(
                "the message bus did not subscribe this node to the room within {} ms; retry shortly",
                handshake_timeout.as_millis()
            );
            self.abandon_join(t, Status::Unavailable, &message);
        }
        for t in uncommitted {
            self.expire_pending(t, persist_timeout);
        }
        for (t, why) in expired {
            match why {
                Some(Disconnect::TokenExpired) => {
                    self.close_ws(
                        t,
                        CloseCode::Policy,
                        "access token expired",
                        Disconnect::TokenExpired,
                    );
                }
                Some(Disconnect::IdleTimeout) => {
                    self.close_ws(
                        t,
                        CloseCode::Normal,
                        "idle timeout",
                        Disconnect::IdleTimeout,
                    );
                }
                _ => self.remove(t, why),
            }
        }
        self.maybe_resume_accept();
    }

    /// Gives up waiting for the commits of `t`'s messages older than `timeout`: their senders
    /// get `UNAVAILABLE` (a retry with the same `clientMessageId` is stored once).
    fn expire_pending(&mut self, t: usize, timeout: Duration) {
        let now = self.now;
        if let Some(Phase::Open(session)) = self.conns.get_mut(t).map(|c| &mut c.phase) {
            for p in session.pending.iter_mut() {
                if now - p.since < timeout {
                    break;
                }
                if p.outcome.is_none() {
                    p.outcome = Some(Err(format!(
                        "the store did not confirm this message within {} ms; it may still be stored; retry with the same clientMessageId",
                        timeout.as_millis()
                    )));
                }
            }
        }
        self.release_acks(t);
    }

    /// Stops accepting, answers what clients already sent, and closes every WebSocket with 1001.
    fn begin_drain(&mut self) {
        self.drain_deadline = Some(self.now + self.shared.config.shutdown_timeout());
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        if let Some(mut admin) = self.admin_listener.take() {
            let _ = self.poll.registry().deregister(&mut admin);
        }
        self.listening = false;
        let tokens: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
        for t in tokens {
            match self.conns.get(t).map(|c| &c.phase) {
                Some(Phase::Request { .. }) => self.remove(t, None),
                Some(Phase::Joining(_)) => {
                    self.abandon_join(t, Status::Unavailable, "server shutting down");
                }
                Some(Phase::Open(_)) => {
                    // Messages already in the socket get their acks before the close frame;
                    // with `ack_after = persisted` the close waits for their commits (up to
                    // the drain deadline).
                    self.read_messages(t);
                    if let Some(Phase::Open(session)) = self.conns.get_mut(t).map(|c| &mut c.phase)
                        && !session.pending.is_empty()
                    {
                        session.close_when_settled = true;
                        continue;
                    }
                    self.close_ws(
                        t,
                        CloseCode::Away,
                        "server shutting down",
                        Disconnect::Shutdown,
                    );
                }
                _ => {}
            }
        }
    }
}

/// The `clientMessageId` of a frame, if it is a valid one, for echoing in an error frame.
fn client_message_id_of(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Key {
        client_message_id: Option<String>,
    }
    serde_json::from_str::<Key>(text)
        .ok()
        .and_then(|k| k.client_message_id)
        .filter(|k| protocol::is_valid_id(k))
}

/// Pins the calling thread to one of the CPUs this process may use: the `id`-th allowed CPU,
/// wrapping around, so an operator's `taskset` or `CPUAffinity=` mask is respected.
fn pin_to_core(id: usize) {
    // SAFETY: cpu_set_t is plain data that sched_getaffinity fills and sched_setaffinity reads;
    // CPU_ISSET/CPU_SET index below CPU_SETSIZE (they check the bound themselves).
    let rc = unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) != 0 {
            -1
        } else {
            let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &allowed))
                .collect();
            match cpus.get(id % cpus.len().max(1)) {
                Some(&cpu) => {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
                }
                None => -1,
            }
        }
    };
    if rc != 0 {
        log::warn!(
            "reactor {id}: cannot pin to a core: {}",
            io::Error::last_os_error()
        );
    }
}
