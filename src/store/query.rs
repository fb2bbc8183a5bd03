//! The query pool: `/api/*` history and analytics, answered off the reactors.
//!
//! The reactor parses the request ([`parse`]), hands an [`ApiQuery`] to [`QueryPool::submit`]
//! (refused with 503 when the pool's bounded queue is full) and writes the response that
//! comes back through its mailbox. Query threads each own a [`StoreReader`]; while idle they
//! ping the store so `/ready` knows whether it answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Analytics, Record, Store, StoreError, StoreReader, Take, UserRoom, Window};
use crate::http::{self, Status};
use crate::mailbox::{Mailbox, Reply};
use crate::metrics::Histogram;
use crate::protocol::{self, MAX_USER_ID, is_valid_id};

/// Default `limit` of the message lists.
pub const DEFAULT_LIMIT: usize = 1000;
/// Largest `limit` accepted.
pub const MAX_LIMIT: usize = 10_000;
/// Default `topN` of analytics.
pub const DEFAULT_TOP_N: usize = 10;
/// Largest `topN` accepted.
pub const MAX_TOP_N: usize = 1000;
/// Most points of the per-minute series in one answer (a week of minutes).
pub const MAX_SERIES_POINTS: usize = 7 * 24 * 60;

/// A parsed `/api/*` request that needs the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiQuery {
    /// `GET /api/rooms/{roomId}/messages?start&end&limit&take`.
    RoomMessages {
        /// The room.
        room: String,
        /// The window.
        window: Window,
        /// Most messages.
        limit: usize,
        /// Oldest or newest of the window.
        take: Take,
    },
    /// `GET /api/users/{userId}/messages?start&end&limit&take`.
    UserMessages {
        /// The user.
        user: i32,
        /// The window.
        window: Window,
        /// Most messages.
        limit: usize,
        /// Oldest or newest of the window.
        take: Take,
    },
    /// `GET /api/users/{userId}/rooms`.
    UserRooms {
        /// The user.
        user: i32,
    },
    /// `GET /api/active-users?start&end`.
    ActiveUsers {
        /// The window.
        window: Window,
    },
    /// `GET /api/analytics?start&end&topN`.
    Analytics {
        /// The window.
        window: Window,
        /// Length of the top lists.
        top_n: usize,
    },
    /// `GET /api/metrics?roomId&userId&startTime&endTime&topN`: everything in one document.
    Metrics {
        /// The room; the busiest one when absent.
        room: Option<String>,
        /// The user; the busiest one when absent.
        user: Option<i32>,
        /// The window's start; the oldest message when absent.
        start: Option<OffsetDateTime>,
        /// The window's end; just after the newest message when absent.
        end: Option<OffsetDateTime>,
        /// Length of the top lists.
        top_n: usize,
    },
}

impl ApiQuery {
    /// The room of a room-scoped query (a room's history, which room tokens open).
    pub fn room(&self) -> Option<&str> {
        match self {
            ApiQuery::RoomMessages { room, .. } => Some(room),
            _ => None,
        }
    }
}

/// The earliest time a window may name (an absent `start`).
pub fn time_min() -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH
}

/// The latest time a window may name (an absent `end`): 9999-12-31T23:59:59Z, which every
/// backend can store.
pub fn time_max() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(253_402_300_799).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Parses `/api/{rest}` with its query string. `Ok(None)` for routes that are not store
/// queries (presence); `Err((status, message))` for a bad path or parameter.
pub fn parse(rest: &[&str], query: &str) -> Result<Option<ApiQuery>, (Status, String)> {
    let bad = |m: String| Err((Status::BadRequest, m));
    let params = Params::new(query).map_err(|m| (Status::BadRequest, m))?;
    let q = match rest {
        ["rooms", room, "presence"] => {
            if !is_valid_id(room) {
                return bad(BAD_ROOM.into());
            }
            return Ok(None);
        }
        ["rooms", room, "messages"] => {
            if !is_valid_id(room) {
                return bad(BAD_ROOM.into());
            }
            ApiQuery::RoomMessages {
                room: (*room).to_string(),
                window: params.window("start", "end")?,
                limit: params.limit()?,
                take: params.take()?,
            }
        }
        ["users", user, "messages"] => ApiQuery::UserMessages {
            user: parse_user(user).ok_or((Status::BadRequest, BAD_USER.to_string()))?,
            window: params.window("start", "end")?,
            limit: params.limit()?,
            take: params.take()?,
        },
        ["users", user, "rooms"] => ApiQuery::UserRooms {
            user: parse_user(user).ok_or((Status::BadRequest, BAD_USER.to_string()))?,
        },
        ["active-users"] => ApiQuery::ActiveUsers {
            window: params.window("start", "end")?,
        },
        ["analytics"] => ApiQuery::Analytics {
            window: params.window("start", "end")?,
            top_n: params.top_n()?,
        },
        ["metrics"] => {
            let room = params.get("roomId").map(str::to_string);
            if room.as_deref().is_some_and(|r| !is_valid_id(r)) {
                return bad(BAD_ROOM.into());
            }
            let user = match params.get("userId") {
                Some(u) => Some(parse_user(u).ok_or((Status::BadRequest, BAD_USER.to_string()))?),
                None => None,
            };
            let start = params.time("startTime")?;
            let end = params.time("endTime")?;
            if let (Some(s), Some(e)) = (start, end)
                && s > e
            {
                return bad("startTime must not be after endTime".into());
            }
            ApiQuery::Metrics {
                room,
                user,
                start,
                end,
                top_n: params.top_n()?,
            }
        }
        _ => {
            return Err((
                Status::NotFound,
                format!("no route for /api/{}", rest.join("/")),
            ));
        }
    };
    Ok(Some(q))
}

const BAD_ROOM: &str = "roomId must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'";
const BAD_USER: &str = "userId must be an integer between 1 and 100000";

fn parse_user(s: &str) -> Option<i32> {
    if s.is_empty() || s.len() > 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_USER_ID).contains(n))
        .and_then(|n| i32::try_from(n).ok())
}

/// Query-string parameters, percent-decoded. `+` is kept as a plus sign (it appears in time
/// zone offsets), not read as a space.
struct Params(Vec<(String, String)>);

impl Params {
    fn new(query: &str) -> Result<Params, String> {
        let mut out = Vec::new();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let k = percent_decode(k).ok_or_else(|| format!("bad percent-encoding in {kv:?}"))?;
            let v = percent_decode(v).ok_or_else(|| format!("bad percent-encoding in {kv:?}"))?;
            out.push((k, v));
        }
        Ok(Params(out))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn time(&self, name: &str) -> Result<Option<OffsetDateTime>, (Status, String)> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match OffsetDateTime::parse(v, &Rfc3339) {
                Ok(t) if t >= time_min() && t <= time_max() => Ok(Some(t)),
                Ok(_) => Err((
                    Status::BadRequest,
                    format!("{name} must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z"),
                )),
                Err(_) => Err((
                    Status::BadRequest,
                    format!(
                        "{name} must be an RFC 3339 date-time with a zone, e.g. 2026-11-22T10:00:00Z (got {v:?})"
                    ),
                )),
            },
        }
    }

    fn window(&self, start: &str, end: &str) -> Result<Window, (Status, String)> {
        let s = self.time(start)?.unwrap_or_else(time_min);
        let e = self.time(end)?.unwrap_or_else(time_max);
        if s > e {
            return Err((
                Status::BadRequest,
                format!("{start} must not be after {end}"),
            ));
        }
        Ok(Window { start: s, end: e })
    }

    fn bounded(&self, name: &str, default: usize, max: usize) -> Result<usize, (Status, String)> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or((
                    Status::BadRequest,
                    format!("{name} must be an integer between 1 and {max} (got {v:?})"),
                )),
        }
    }

    fn limit(&self) -> Result<usize, (Status, String)> {
        self.bounded("limit", DEFAULT_LIMIT, MAX_LIMIT)
    }

    fn top_n(&self) -> Result<usize, (Status, String)> {
        self.bounded("topN", DEFAULT_TOP_N, MAX_TOP_N)
    }

    fn take(&self) -> Result<Take, (Status, String)> {
        match self.get("take") {
            None | Some("first") => Ok(Take::First),
            Some("last") => Ok(Take::Last),
            Some(v) => Err((
                Status::BadRequest,
                format!("take must be \"first\" or \"last\" (got {v:?})"),
            )),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ----- answers -----

fn ts(t: OffsetDateTime) -> String {
    let mut v = Vec::with_capacity(32);
    protocol::write_rfc3339_micros(&mut v, t);
    String::from_utf8(v).unwrap_or_default()
}

/// A stored message as JSON: the fields of a `message` frame, plus the node that took it.
pub fn record_json(r: &Record) -> Value {
    json!({
        "messageId": r.message_id.to_string(),
        "roomId": &*r.room_id,
        "userId": r.user_id,
        "username": r.username,
        "message": r.message,
        "messageType": r.message_type.as_str(),
        "timestamp": ts(r.client_ts),
        "serverTimestamp": ts(r.server_ts),
        "nodeId": &*r.node_id,
    })
}

fn rooms_json(rooms: &[UserRoom]) -> Value {
    Value::Array(
        rooms
            .iter()
            .map(|r| {
                json!({
                    "roomId": r.room_id,
                    "lastActivity": ts(r.last_activity),
                    "firstActivity": ts(r.first_activity),
                    "messageCount": r.message_count,
                })
            })
            .collect(),
    )
}

fn analytics_json(a: &Analytics, window: Window) -> Value {
    let start = super::minute_floor(window.start);
    let end = super::minute_ceil(window.end);
    let seconds = (end - start).as_seconds_f64();
    let minutes = seconds / 60.0;
    let rate = |per: f64| {
        if per > 0.0 { a.total as f64 / per } else { 0.0 }
    };
    let peak = a
        .per_minute
        .iter()
        .max_by_key(|(m, n)| (*n, std::cmp::Reverse(*m)));
    let truncated = a.per_minute.len() > MAX_SERIES_POINTS;
    json!({
        "start": ts(start),
        "end": ts(end),
        "totalMessages": a.total,
        "messagesPerSecond": rate(seconds),
        "messagesPerMinute": rate(minutes),
        "peakMinute": peak.map(|(m, n)| json!({"minute": ts(*m), "count": n})),
        "perMinute": a.per_minute.iter().take(MAX_SERIES_POINTS)
            .map(|(m, n)| json!({"minute": ts(*m), "count": n})).collect::<Vec<_>>(),
        "perMinuteTruncated": truncated,
        "topUsers": a.top_users.iter()
            .map(|(u, n)| json!({"userId": u, "messageCount": n})).collect::<Vec<_>>(),
        "topRooms": a.top_rooms.iter()
            .map(|(r, n)| json!({"roomId": r, "messageCount": n})).collect::<Vec<_>>(),
        "byType": {
            "TEXT": a.by_type[0],
            "JOIN": a.by_type[1],
            "LEAVE": a.by_type[2],
        },
    })
}

fn list(records: &[Record]) -> Value {
    Value::Array(records.iter().map(record_json).collect())
}

/// Runs one query; the JSON body of a 200.
pub fn execute(reader: &mut dyn StoreReader, q: &ApiQuery) -> Result<Value, StoreError> {
    Ok(match q {
        ApiQuery::RoomMessages {
            room,
            window,
            limit,
            take,
        } => list(&reader.room_messages(room, *window, *limit, *take)?),
        ApiQuery::UserMessages {
            user,
            window,
            limit,
            take,
        } => list(&reader.user_messages(*user, *window, *limit, *take)?),
        ApiQuery::UserRooms { user } => rooms_json(&reader.user_rooms(*user)?),
        ApiQuery::ActiveUsers { window } => json!({
            "count": reader.active_users(*window)?,
            "start": ts(window.start),
            "end": ts(window.end),
        }),
        ApiQuery::Analytics { window, top_n } => {
            analytics_json(&reader.analytics(*window, *top_n)?, *window)
        }
        ApiQuery::Metrics {
            room,
            user,
            start,
            end,
            top_n,
        } => metrics_document(reader, room.as_deref(), *user, *start, *end, *top_n)?,
    })
}

/// The combined document of `GET /api/metrics`.
fn metrics_document(
    reader: &mut dyn StoreReader,
    room: Option<&str>,
    user: Option<i32>,
    start: Option<OffsetDateTime>,
    end: Option<OffsetDateTime>,
    top_n: usize,
) -> Result<Value, StoreError> {
    let span = reader.span()?;
    let window = Window {
        start: start.or(span.map(|s| s.0)).unwrap_or_else(time_min),
        // Just past the newest message, since `end` is exclusive.
        end: end
            .or(span.map(|s| s.1 + time::Duration::MICROSECOND))
            .unwrap_or_else(time_max),
    };
    let analytics = reader.analytics(window, top_n.max(1))?;
    let room = room
        .map(str::to_string)
        .or_else(|| analytics.top_rooms.first().map(|r| r.0.clone()));
    let user = user.or_else(|| analytics.top_users.first().map(|u| u.0));
    let room_messages = match &room {
        Some(r) => list(&reader.room_messages(r, window, DEFAULT_LIMIT, Take::First)?),
        None => Value::Array(Vec::new()),
    };
    let (user_messages, user_rooms) = match user {
        Some(u) => (
            list(&reader.user_messages(u, window, DEFAULT_LIMIT, Take::First)?),
            rooms_json(&reader.user_rooms(u)?),
        ),
        None => (Value::Array(Vec::new()), Value::Array(Vec::new())),
    };
    let mut analytics_doc = analytics_json(&analytics, window);
    if let Some(obj) = analytics_doc.as_object_mut() {
        obj.truncate_top(top_n);
    }
    Ok(json!({
        "window": { "start": ts(window.start), "end": ts(window.end) },
        "roomId": room,
        "userId": user,
        "roomMessages": room_messages,
        "userMessages": user_messages,
        "userRooms": user_rooms,
        "activeUsers": reader.active_users(window)?,
        "analytics": analytics_doc,
    }))
}

trait TruncateTop {
    fn truncate_top(&mut self, n: usize);
}

impl TruncateTop for serde_json::Map<String, Value> {
    fn truncate_top(&mut self, n: usize) {
        for key in ["topUsers", "topRooms"] {
            if let Some(Value::Array(a)) = self.get_mut(key) {
                a.truncate(n);
            }
        }
    }
}

// ----- the pool -----

pub use crate::mailbox::ReplyTo;

struct Job {
    query: ApiQuery,
    reply_to: ReplyTo,
    head_only: bool,
    queued: Instant,
}

/// Counters of the query pool, for `/metrics`.
pub struct QueryStats {
    /// Queries answered (any status).
    pub answered: AtomicU64,
    /// Queries that failed because the store did not answer.
    pub failed: AtomicU64,
    /// Queries refused because the queue was full.
    pub refused: AtomicU64,
    /// Time from hand-off to answer, seconds.
    pub seconds: Histogram,
}

/// The query threads.
pub struct QueryPool {
    tx: Sender<Job>,
    /// Whether the latest ping (or query) reached the store.
    reachable: Arc<AtomicBool>,
    /// The latest reason the store was not reachable.
    last_error: Arc<parking_lot::Mutex<Option<String>>>,
    /// Counters.
    pub stats: Arc<QueryStats>,
    timeout: Duration,
}

impl QueryPool {
    /// Starts `threads` query threads with a queue of `capacity` requests; a request older
    /// than `timeout` when a thread takes it is answered 503 without running.
    pub fn start(
        store: &Arc<dyn Store>,
        threads: usize,
        capacity: usize,
        timeout: Duration,
        mailboxes: Arc<[Mailbox]>,
    ) -> Result<QueryPool, StoreError> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(capacity.max(1));
        let reachable = Arc::new(AtomicBool::new(true));
        let last_error = Arc::new(parking_lot::Mutex::new(None));
        let stats = Arc::new(QueryStats {
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            seconds: Histogram::new(super::writer::LATENCY_BUCKETS),
        });
        for i in 0..threads.max(1) {
            let reader = store.reader()?;
            let worker = QueryThread {
                store: store.clone(),
                reader: Some(reader),
                rx: rx.clone(),
                mailboxes: mailboxes.clone(),
                reachable: reachable.clone(),
                last_error: last_error.clone(),
                stats: stats.clone(),
                timeout,
            };
            // Threads stop when the pool (the only sender) is dropped and the queue is empty.
            std::thread::Builder::new()
                .name(format!("query-{i}"))
                .spawn(move || worker.run())
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start a query thread: {e}"))
                })?;
        }
        Ok(QueryPool {
            tx,
            reachable,
            last_error,
            stats,
            timeout,
        })
    }

    /// Queues a query. `Err` gives the 503 response to write now (queue full).
    pub fn submit(
        &self,
        query: ApiQuery,
        reply_to: ReplyTo,
        head_only: bool,
    ) -> Result<(), Vec<u8>> {
        let job = Job {
            query,
            reply_to,
            head_only,
            queued: Instant::now(),
        };
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(http::error_response(
                    Status::Unavailable,
                    "too many history and analytics queries are waiting; retry shortly",
                    head_only,
                ))
            }
        }
    }

    /// `Ok` while the store answers pings and queries; otherwise the latest error.
    pub fn reachable(&self) -> Result<(), String> {
        if self.reachable.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self
                .last_error
                .lock()
                .clone()
                .unwrap_or_else(|| "the store does not answer".into()))
        }
    }

    /// How long a request may wait for a query thread.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Requests waiting for a thread.
    pub fn depth(&self) -> usize {
        self.tx.len()
    }
}

/// How often an idle query thread pings the store.
const PING_EVERY: Duration = Duration::from_secs(2);

struct QueryThread {
    store: Arc<dyn Store>,
    reader: Option<Box<dyn StoreReader>>,
    rx: Receiver<Job>,
    mailboxes: Arc<[Mailbox]>,
    reachable: Arc<AtomicBool>,
    last_error: Arc<parking_lot::Mutex<Option<String>>>,
    stats: Arc<QueryStats>,
    timeout: Duration,
}

impl QueryThread {
    fn run(mut self) {
        loop {
            match self.rx.recv_timeout(PING_EVERY) {
                Ok(job) => self.answer(job),
                Err(RecvTimeoutError::Timeout) => {
                    let result = self.with_reader(|r| r.ping());
                    self.note(&result);
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    fn with_reader<T>(
        &mut self,
        f: impl FnOnce(&mut dyn StoreReader) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.reader.is_none() {
            self.reader = Some(self.store.reader()?);
        }
        match &mut self.reader {
            Some(r) => f(r.as_mut()),
            None => Err(StoreError::Unavailable("no reader".into())),
        }
    }

    fn note<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => {
                if !self.reachable.swap(true, Ordering::AcqRel) {
                    log::warn!("store answers queries again");
                }
            }
            Err(StoreError::Unavailable(e)) => {
                *self.last_error.lock() = Some(e.clone());
                if self.reachable.swap(false, Ordering::AcqRel) {
                    log::error!("store does not answer queries: {e}");
                }
            }
            Err(StoreError::Refused(_)) => {}
        }
    }

    fn answer(&mut self, job: Job) {
        let waited = job.queued.elapsed();
        let (status, body) = if waited > self.timeout {
            (
                Status::Unavailable,
                json!({"error": format!("the query waited {} ms for a query thread; the store is busy, retry shortly", waited.as_millis())}),
            )
        } else {
            // A bug in one query must not take the thread (and the pool) with it.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.with_reader(|r| execute(r, &job.query))
            }))
            .unwrap_or_else(|_| {
                self.reader = None;
                Err(StoreError::Unavailable(
                    "the query failed unexpectedly".into(),
                ))
            });
            self.note(&result);
            match result {
                Ok(v) => (Status::Ok, v),
                Err(e) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    (Status::Unavailable, json!({"error": e.to_string()}))
                }
            }
        };
        let bytes = http::response(status, "application/json", &body.to_string(), job.head_only);
        self.stats.answered.fetch_add(1, Ordering::Relaxed);
        self.stats
            .seconds
            .observe(job.queued.elapsed().as_secs_f64());
        if let Some(mailbox) = self.mailboxes.get(job.reply_to.reactor) {
            let _ = mailbox.send(Reply::Http {
                token: job.reply_to.token,
                conn: job.reply_to.conn,
                bytes,
                status: status.code(),
            });
        }
    }
}
