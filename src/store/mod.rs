//! Persistence: every accepted message is stored once, and history and analytics are read back.
//!
//! A [`Store`] is one backend: PostgreSQL ([`postgres`]), SQLite ([`sqlite`], the embedded
//! default) or memory ([`memory`], for benchmarks of the server alone). It hands out one
//! [`StoreWriter`] per writer thread and one [`StoreReader`] per query thread; the
//! [`writer`] pool batches, retries, dead-letters and guards the backend with a breaker, and
//! the [`query`] pool answers `/api/*` off the reactors. `docs/storage.md` explains the schema,
//! the indexes and what each costs.
//!
//! Time windows are on the server's timestamp (`serverTimestamp`): the server's clock orders
//! what it stored, a client's clock can say anything. `start` is inclusive, `end` exclusive.

pub mod memory;
pub mod postgres;
pub mod query;
pub mod sqlite;
pub mod writer;

use std::sync::Arc;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::protocol::MessageType;

/// One stored chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The server-assigned id; the primary key, so a retry is stored once.
    pub message_id: Uuid,
    /// The room.
    pub room_id: Arc<str>,
    /// 1..=100000.
    pub user_id: i32,
    /// The sender's name as sent.
    pub username: String,
    /// The text (1..=500 characters).
    pub message: String,
    /// TEXT, JOIN or LEAVE.
    pub message_type: MessageType,
    /// The client's timestamp.
    pub client_ts: OffsetDateTime,
    /// When the server accepted the message.
    pub server_ts: OffsetDateTime,
    /// The node that accepted it.
    pub node_id: Arc<str>,
}

/// The code stored for a message type (`smallint` in PostgreSQL, `INTEGER` in SQLite).
pub fn type_code(t: MessageType) -> i16 {
    match t {
        MessageType::Text => 0,
        MessageType::Join => 1,
        MessageType::Leave => 2,
    }
}

/// The message type of a stored code; `None` for a code no version of ChatFlow writes.
pub fn type_of_code(code: i16) -> Option<MessageType> {
    match code {
        0 => Some(MessageType::Text),
        1 => Some(MessageType::Join),
        2 => Some(MessageType::Leave),
        _ => None,
    }
}

/// A time window: `start` inclusive, `end` exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Inclusive.
    pub start: OffsetDateTime,
    /// Exclusive.
    pub end: OffsetDateTime,
}

impl Window {
    /// Whether `t` is in the window.
    pub fn contains(&self, t: OffsetDateTime) -> bool {
        self.start <= t && t < self.end
    }
}

/// Which end of a window a limited list is taken from. Either way the list is oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Take {
    /// The oldest `limit` messages of the window (the default; page forward from the last one).
    #[default]
    First,
    /// The newest `limit` messages of the window (a chat page's recent history).
    Last,
}

/// One room of a user's, for `GET /api/users/{userId}/rooms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRoom {
    /// The room.
    pub room_id: String,
    /// The user's first message there.
    pub first_activity: OffsetDateTime,
    /// The user's latest message there.
    pub last_activity: OffsetDateTime,
    /// How many messages the user sent there.
    pub message_count: i64,
}

/// Counts for a window, from the rollups.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Analytics {
    /// Messages in the window.
    pub total: i64,
    /// Messages per minute, oldest first: (minute, count), minutes without messages omitted.
    pub per_minute: Vec<(OffsetDateTime, i64)>,
    /// The busiest users: (userId, count), most first, ties by userId.
    pub top_users: Vec<(i32, i64)>,
    /// The busiest rooms: (roomId, count), most first, ties by roomId.
    pub top_rooms: Vec<(String, i64)>,
    /// Messages by type: TEXT, JOIN, LEAVE (index = [`type_code`]).
    pub by_type: [i64; 3],
}

/// A row the store refused, kept with the reason in the dead-letter table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message.
    pub record: Record,
    /// Why it could not be stored.
    pub reason: String,
}

/// Why a store call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or failed as a whole (connection lost, disk full, pool
    /// exhausted): retry later; repeated, it opens the breaker.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend refused this data (e.g. a value its column cannot hold): retrying the same
    /// rows fails the same way, so the writer splits the batch to find them.
    #[error("store refused the data: {0}")]
    Refused(String),
}

/// One backend. Shared by every thread; all blocking work happens in what it hands out.
pub trait Store: Send + Sync {
    /// `postgres`, `sqlite` or `memory`.
    fn kind(&self) -> &'static str;

    /// Creates or upgrades the schema to the current version. Idempotent; safe to run from
    /// several nodes at once.
    fn migrate(&self) -> Result<(), StoreError>;

    /// The schema version [`Store::migrate`] brings the store to (0: the store has none).
    fn schema_version(&self) -> i64 {
        0
    }

    /// A writer for one writer thread.
    fn writer(&self) -> Result<Box<dyn StoreWriter>, StoreError>;

    /// A reader for one query thread.
    fn reader(&self) -> Result<Box<dyn StoreReader>, StoreError>;

    /// Most writer threads worth running: SQLite has one writer at a time.
    fn max_writers(&self) -> usize {
        usize::MAX
    }
}

/// Writes batches; owned by one writer thread.
pub trait StoreWriter: Send {
    /// Stores `batch` in one transaction together with its rollups and commits. A message
    /// whose id is already stored is skipped, not an error. Returns how many rows were new.
    fn write(&mut self, batch: &[Record]) -> Result<usize, StoreError>;

    /// Stores rows that cannot be written in the dead-letter table, with the reason, and
    /// commits.
    fn dead_letter(&mut self, rows: &[DeadLetter]) -> Result<(), StoreError>;

    /// Housekeeping between batches, which the writer pool asks for every few seconds;
    /// `now` is the node's clock. PostgreSQL merges the per-batch rows of closed minutes of
    /// `user_minute_batch`. Returns how much it did (0: nothing was due). Nothing by default.
    fn maintain(&mut self, _now: time::OffsetDateTime) -> Result<usize, StoreError> {
        Ok(0)
    }
}

/// Answers queries; owned by one query thread. Lists are oldest first (`server_ts`, then
/// `message_id`).
pub trait StoreReader: Send {
    /// A room's messages in `window`, at most `limit`.
    fn room_messages(
        &mut self,
        room: &str,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError>;

    /// A user's messages in all rooms in `window`, at most `limit`.
    fn user_messages(
        &mut self,
        user: i32,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError>;

    /// The rooms a user has written in, most recent activity first (ties by room id).
    fn user_rooms(&mut self, user: i32) -> Result<Vec<UserRoom>, StoreError>;

    /// Distinct users with a message in `window` (exact at the window's edges).
    fn active_users(&mut self, window: Window) -> Result<i64, StoreError>;

    /// Rollup counts for the whole minutes that `window` touches: `window.start` is rounded
    /// down and `window.end` up to the minute. `top_n` limits both top lists.
    fn analytics(&mut self, window: Window, top_n: usize) -> Result<Analytics, StoreError>;

    /// The `server_ts` of the oldest and the newest stored message; `None` when empty.
    fn span(&mut self) -> Result<Option<(OffsetDateTime, OffsetDateTime)>, StoreError>;

    /// Rows in the dead-letter table, oldest first, at most `limit`.
    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;

    /// A cheap round trip, for `/ready`.
    fn ping(&mut self) -> Result<(), StoreError>;
}

/// Rounds `t` down to its minute.
pub fn minute_floor(t: OffsetDateTime) -> OffsetDateTime {
    let secs = t.unix_timestamp();
    OffsetDateTime::from_unix_timestamp(secs - secs.rem_euclid(60)).unwrap_or(t)
}

/// Rounds `t` up to a minute (unchanged when already on one, or at the end of time).
pub fn minute_ceil(t: OffsetDateTime) -> OffsetDateTime {
    let floor = minute_floor(t);
    if floor == t {
        t
    } else {
        floor.checked_add(time::Duration::MINUTE).unwrap_or(t)
    }
}

/// Opens the store a `--store` value names: `sqlite:PATH`, `postgres://...` (or
/// `postgresql://...`) or `memory`. Runs the migrations.
pub fn open(spec: &str, options: &StoreOptions) -> Result<Arc<dyn Store>, StoreError> {
    let store: Arc<dyn Store> = if spec == "memory" {
        Arc::new(memory::MemoryStore::new(options.memory_max_rows))
    } else if let Some(path) = spec.strip_prefix("sqlite:") {
        Arc::new(sqlite::SqliteStore::open(path)?)
    } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        Arc::new(postgres::PgStore::open(spec, options.pool_size)?)
    } else {
        return Err(StoreError::Unavailable(format!(
            "unknown store {spec:?}: use sqlite:PATH, postgres://... or memory"
        )));
    };
    store.migrate()?;
    Ok(store)
}

/// Backend settings that come from the configuration.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most connections a PostgreSQL pool opens.
    pub pool_size: u32,
    /// Most messages the memory store keeps (oldest dropped first).
    pub memory_max_rows: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            pool_size: 8,
            memory_max_rows: 1_000_000,
        }
    }
}

/// Appends the store's metrics (writer pool and query pool) to a `/metrics` text.
pub fn render_metrics(out: &mut String, queue: &writer::StoreQueue, queries: &query::QueryPool) {
    use crate::metrics::single;
    use std::sync::atomic::Ordering::Relaxed;
    let w = &queue.stats;
    let counters: [(&str, &str, u64); 9] = [
        (
            "chatflow_store_batches_total",
            "Write batches committed.",
            w.batches.load(Relaxed),
        ),
        (
            "chatflow_store_rows_total",
            "Messages newly stored.",
            w.rows.load(Relaxed),
        ),
        (
            "chatflow_store_duplicates_total",
            "Messages already stored (retries), skipped.",
            w.duplicates.load(Relaxed),
        ),
        (
            "chatflow_store_dead_letters_total",
            "Messages the store refused, kept in the dead-letter table.",
            w.dead_lettered.load(Relaxed),
        ),
        (
            "chatflow_store_write_errors_total",
            "Failed write attempts (each retry counts).",
            w.write_errors.load(Relaxed),
        ),
        (
            "chatflow_store_abandoned_total",
            "Messages given up at shutdown because the store stayed unreachable.",
            w.abandoned.load(Relaxed),
        ),
        (
            "chatflow_store_queue_full_total",
            "Messages refused because the writers' queue was full.",
            w.refused_full.load(Relaxed),
        ),
        (
            "chatflow_store_housekeeping_total",
            "Store housekeeping done (PostgreSQL: minutes of user_minute_batch merged).",
            w.housekeeping.load(Relaxed),
        ),
        (
            "chatflow_store_housekeeping_errors_total",
            "Store housekeeping attempts that failed (tried again later).",
            w.housekeeping_errors.load(Relaxed),
        ),
    ];
    for (name, help, v) in counters {
        single(out, name, "counter", help, v);
    }
    single(
        out,
        "chatflow_store_queue_depth",
        "gauge",
        "Messages waiting for a writer.",
        queue.depth(),
    );
    single(
        out,
        "chatflow_store_queue_capacity",
        "gauge",
        "Most messages the writers' queue holds.",
        queue.capacity(),
    );
    let state = match queue.breaker.state() {
        writer::BreakerState::Closed => 0,
        writer::BreakerState::Open => 1,
        writer::BreakerState::HalfOpen => 2,
    };
    single(
        out,
        "chatflow_store_breaker_state",
        "gauge",
        "Store circuit breaker: 0 closed, 1 open, 2 half-open.",
        state,
    );
    single(
        out,
        "chatflow_store_breaker_opened_total",
        "counter",
        "Times the store's breaker opened.",
        queue.breaker.times_opened(),
    );
    w.batch_size.render(
        out,
        "chatflow_store_batch_size",
        "Messages per write batch.",
    );
    w.write_seconds.render(
        out,
        "chatflow_store_write_seconds",
        "Time to write and commit one batch (retries included).",
    );
    w.commit_lag_seconds.render(
        out,
        "chatflow_store_commit_lag_seconds",
        "Time from a message's hand-off to the writers to its commit.",
    );
    let q = &queries.stats;
    single(
        out,
        "chatflow_queries_total",
        "counter",
        "/api/* queries answered.",
        q.answered.load(Relaxed),
    );
    single(
        out,
        "chatflow_query_failures_total",
        "counter",
        "/api/* queries the store could not answer.",
        q.failed.load(Relaxed),
    );
    single(
        out,
        "chatflow_queries_refused_total",
        "counter",
        "/api/* queries refused because the queue was full.",
        q.refused.load(Relaxed),
    );
    single(
        out,
        "chatflow_query_queue_depth",
        "gauge",
        "/api/* queries waiting for a thread.",
        queries.depth(),
    );
    q.seconds.render(
        out,
        "chatflow_query_seconds",
        "Time from an /api/* request to its answer.",
    );
}

/// Redacts the password in a store URL for logs and `/ready`.
pub fn redact(spec: &str) -> String {
    let Some((scheme, rest)) = spec.split_once("://") else {
        return spec.to_string();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return spec.to_string();
    };
    let user = userinfo.split(':').next().unwrap_or("");
    let slash = if rest.contains('/') { "/" } else { "" };
    format!("{scheme}://{user}:***@{host}{slash}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_round() {
        let t = OffsetDateTime::from_unix_timestamp(125).unwrap();
        assert_eq!(minute_floor(t).unix_timestamp(), 120);
        assert_eq!(minute_ceil(t).unix_timestamp(), 180);
        let m = OffsetDateTime::from_unix_timestamp(180).unwrap();
        assert_eq!(minute_ceil(m), m);
        let last = query::time_max();
        assert_eq!(minute_ceil(last), last, "no overflow at the end of time");
        let neg = OffsetDateTime::from_unix_timestamp(-1).unwrap();
        assert_eq!(minute_floor(neg).unix_timestamp(), -60);
    }

    #[test]
    fn type_codes_round_trip() {
        for t in [MessageType::Text, MessageType::Join, MessageType::Leave] {
            assert_eq!(type_of_code(type_code(t)), Some(t));
        }
        assert_eq!(type_of_code(7), None);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact("sqlite:./x.db"), "sqlite:./x.db");
    }
}
