//! The embedded SQLite store: one database file in WAL mode, one writer beside many readers.
//!
//! - **Schema.** `messages` is a `WITHOUT ROWID` table clustered on the 16-byte message id, so
//!   a duplicate is found by the key itself and time-ordered (v7) ids append at the end. Its
//!   secondary indexes are (room, time), (user, time) and time; in a `WITHOUT ROWID` table
//!   every index entry also carries the primary key, so `ORDER BY server_ts, message_id` is
//!   read straight from the index without a sort. Four rollups (`room_minute`, `user_minute`,
//!   `type_minute`, `user_rooms`) are updated in the transaction that inserts the rows, so
//!   they always equal the raw counts and analytics never scan `messages`.
//! - **Values.** Times are INTEGER microseconds since the Unix epoch (UTC), minute keys INTEGER
//!   Unix seconds of the minute, message types the codes of [`type_code`]. Tables are `STRICT`,
//!   so a value of the wrong type is refused instead of stored.
//! - **Concurrency.** SQLite has one writer at a time ([`Store::max_writers`] is 1); WAL lets
//!   readers, each on its own connection, read a consistent snapshot while it writes.
//! - **Durability.** `synchronous = FULL`: every commit is on disk before the writer acks it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, Row, Transaction, TransactionBehavior, params};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Analytics, DeadLetter, Record, Store, StoreError, StoreReader, StoreWriter, Take, UserRoom,
    Window, type_code, type_of_code,
};

/// How long a connection waits for a lock before giving up with `SQLITE_BUSY`. In WAL mode
/// readers never wait for the writer; the writer waits only for another process writing the
/// same file or for a checkpoint, which take milliseconds. Five seconds rides out a slow disk
/// without hiding a stuck one from the breaker for long.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Page cache of the writer connection, in KiB (a negative `cache_size` is KiB). Index upkeep
/// touches the hot leaves of three indexes and four rollups per batch; 32 MiB keeps them in
/// memory at tens of millions of rows, where SQLite's 2 MiB default would re-read them.
const WRITER_CACHE_KIB: i64 = 32 * 1024;

/// Microseconds in a minute.
const MICROS_PER_MINUTE: i128 = 60_000_000;

/// The schema, one entry per version: entry `i` upgrades version `i` to `i + 1`. Add a new
/// entry to change the schema; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    "CREATE TABLE messages (
         message_id   BLOB    NOT NULL PRIMARY KEY,
         room_id      TEXT    NOT NULL,
         user_id      INTEGER NOT NULL,
         username     TEXT    NOT NULL,
         message      TEXT    NOT NULL,
         message_type INTEGER NOT NULL,
         client_ts    INTEGER NOT NULL,
         server_ts    INTEGER NOT NULL,
         node_id      TEXT    NOT NULL
     ) STRICT, WITHOUT ROWID;
     CREATE INDEX messages_room_ts ON messages (room_id, server_ts);
     CREATE INDEX messages_user_ts ON messages (user_id, server_ts);
     CREATE INDEX messages_ts ON messages (server_ts);

     CREATE TABLE room_minute (
         minute   INTEGER NOT NULL,
         room_id  TEXT    NOT NULL,
         messages INTEGER NOT NULL,
         PRIMARY KEY (minute, room_id)
     ) STRICT, WITHOUT ROWID;
     CREATE TABLE user_minute (
         minute   INTEGER NOT NULL,
         user_id  INTEGER NOT NULL,
         messages INTEGER NOT NULL,
         PRIMARY KEY (minute, user_id)
     ) STRICT, WITHOUT ROWID;
     CREATE TABLE type_minute (
         minute       INTEGER NOT NULL,
         message_type INTEGER NOT NULL,
         messages     INTEGER NOT NULL,
         PRIMARY KEY (minute, message_type)
     ) STRICT, WITHOUT ROWID;
     CREATE TABLE user_rooms (
         user_id  INTEGER NOT NULL,
         room_id  TEXT    NOT NULL,
         first_ts INTEGER NOT NULL,
         last_ts  INTEGER NOT NULL,
         messages INTEGER NOT NULL,
         PRIMARY KEY (user_id, room_id)
     ) STRICT, WITHOUT ROWID;

     -- The text is a BLOB: a row may be here precisely because its text could not be stored
     -- as TEXT somewhere, and its bytes must survive as they came.
     CREATE TABLE dead_letters (
         id           INTEGER PRIMARY KEY AUTOINCREMENT,
         message_id   BLOB    NOT NULL,
         room_id      TEXT    NOT NULL,
         user_id      INTEGER NOT NULL,
         username     TEXT    NOT NULL,
         message      BLOB    NOT NULL,
         message_type INTEGER NOT NULL,
         client_ts    INTEGER NOT NULL,
         server_ts    INTEGER NOT NULL,
         node_id      TEXT    NOT NULL,
         reason       TEXT    NOT NULL,
         failed_at    INTEGER NOT NULL
     ) STRICT;",
];

// `ON CONFLICT (message_id) DO NOTHING` rather than `INSERT OR IGNORE`: both skip a duplicate
// id with `changes() == 0`, but OR IGNORE would also silently skip a row that breaks any other
// constraint (NOT NULL, a STRICT type), reporting it as a duplicate instead of refusing it.
const INSERT_MESSAGE: &str = "INSERT INTO messages (message_id, room_id, user_id, username, \
     message, message_type, client_ts, server_ts, node_id) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (message_id) DO NOTHING";
const UPSERT_ROOM_MINUTE: &str = "INSERT INTO room_minute (minute, room_id, messages) \
     VALUES (?1, ?2, ?3) \
     ON CONFLICT (minute, room_id) DO UPDATE SET messages = messages + excluded.messages";
const UPSERT_USER_MINUTE: &str = "INSERT INTO user_minute (minute, user_id, messages) \
     VALUES (?1, ?2, ?3) \
     ON CONFLICT (minute, user_id) DO UPDATE SET messages = messages + excluded.messages";
const UPSERT_TYPE_MINUTE: &str = "INSERT INTO type_minute (minute, message_type, messages) \
     VALUES (?1, ?2, ?3) \
     ON CONFLICT (minute, message_type) DO UPDATE SET messages = messages + excluded.messages";
const UPSERT_USER_ROOM: &str = "INSERT INTO user_rooms \
     (user_id, room_id, first_ts, last_ts, messages) VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (user_id, room_id) DO UPDATE SET \
     first_ts = min(first_ts, excluded.first_ts), \
     last_ts = max(last_ts, excluded.last_ts), \
     messages = messages + excluded.messages";
const INSERT_DEAD_LETTER: &str = "INSERT INTO dead_letters (message_id, room_id, user_id, \
     username, message, message_type, client_ts, server_ts, node_id, reason, failed_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// The columns of a [`Record`], in the order [`decode_record`] reads them.
macro_rules! record_columns {
    () => {
        "message_id, room_id, user_id, username, message, message_type, client_ts, server_ts, \
         node_id"
    };
}

// Window lists: the oldest `limit` ascending, or the newest `limit` descending (reversed in
// Rust). The tie-break on message_id keeps pages stable when timestamps collide.
const ROOM_FIRST: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM messages WHERE room_id = ?1 AND server_ts >= ?2 AND server_ts < ?3 \
     ORDER BY server_ts, message_id LIMIT ?4"
);
const ROOM_LAST: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM messages WHERE room_id = ?1 AND server_ts >= ?2 AND server_ts < ?3 \
     ORDER BY server_ts DESC, message_id DESC LIMIT ?4"
);
const USER_FIRST: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM messages WHERE user_id = ?1 AND server_ts >= ?2 AND server_ts < ?3 \
     ORDER BY server_ts, message_id LIMIT ?4"
);
const USER_LAST: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM messages WHERE user_id = ?1 AND server_ts >= ?2 AND server_ts < ?3 \
     ORDER BY server_ts DESC, message_id DESC LIMIT ?4"
);
const USER_ROOMS: &str = "SELECT room_id, first_ts, last_ts, messages FROM user_rooms \
     WHERE user_id = ?1 ORDER BY last_ts DESC, room_id";
// Whole minutes from the rollup, the partial minutes at either edge from the rows (through
// the time index); UNION removes the users counted twice.
const ACTIVE_USERS: &str = "SELECT count(*) FROM ( \
     SELECT user_id FROM user_minute WHERE minute >= ?1 AND minute < ?2 \
     UNION SELECT user_id FROM messages WHERE server_ts >= ?3 AND server_ts < ?4 \
     UNION SELECT user_id FROM messages WHERE server_ts >= ?5 AND server_ts < ?6)";
// type_minute has at most three rows a minute: the cheapest source of totals.
const PER_MINUTE: &str = "SELECT minute, sum(messages) FROM type_minute \
     WHERE minute >= ?1 AND minute < ?2 GROUP BY minute ORDER BY minute";
const BY_TYPE: &str = "SELECT message_type, sum(messages) FROM type_minute \
     WHERE minute >= ?1 AND minute < ?2 GROUP BY message_type";
const TOP_USERS: &str = "SELECT user_id, sum(messages) AS n FROM user_minute \
     WHERE minute >= ?1 AND minute < ?2 GROUP BY user_id ORDER BY n DESC, user_id LIMIT ?3";
const TOP_ROOMS: &str = "SELECT room_id, sum(messages) AS n FROM room_minute \
     WHERE minute >= ?1 AND minute < ?2 GROUP BY room_id ORDER BY n DESC, room_id LIMIT ?3";
// Two subqueries, not min() and max() in one SELECT: SQLite answers a lone min() or max()
// from one end of the index, but both together make it scan.
const SPAN: &str =
    "SELECT (SELECT min(server_ts) FROM messages), (SELECT max(server_ts) FROM messages)";
const DEAD_LETTERS: &str = "SELECT message_id, room_id, user_id, username, message, \
     message_type, client_ts, server_ts, node_id, reason FROM dead_letters ORDER BY id LIMIT ?1";

/// The embedded store: a SQLite database file in WAL mode.
///
/// Opening creates the file (and its directory) if missing and switches it to WAL; the
/// store itself holds no connection: each writer and reader opens its own.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating) the database at `path`, creating its parent directory if missing, and
    /// puts it in WAL mode. Run [`Store::migrate`] before writing.
    pub fn open(path: &str) -> Result<Self, StoreError> {
        if path.is_empty() || path == ":memory:" || path.starts_with("file::memory:") {
            // Each connection to an in-memory SQLite database gets its own empty database, so
            // the writer and the readers would not see each other.
            return Err(StoreError::Unavailable(format!(
                "sqlite path {path:?} is not a file: give a file path, or use --store memory"
            )));
        }
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let conn = connect(&path, true)?;
        enable_wal(&conn, &path)?;
        Ok(SqliteStore { path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn schema_version(&self) -> i64 {
        MIGRATIONS.len() as i64
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = writer_connection(&self.path)?;
        let ctx = |e| classify("migrate", e);
        // IMMEDIATE takes the write lock before reading the version, so two processes
        // migrating the same file at once run one after the other.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(ctx)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            .map_err(ctx)?;
        let current: Option<i64> = tx
            .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
            .map_err(ctx)?;
        let current = current.unwrap_or(0);
        let latest = MIGRATIONS.len() as i64;
        if current > latest {
            return Err(StoreError::Unavailable(format!(
                "database {} has schema version {current}, newer than this ChatFlow \
                 understands ({latest}): upgrade ChatFlow",
                self.path.display()
            )));
        }
        let from = usize::try_from(current).unwrap_or(0);
        for (i, ddl) in MIGRATIONS.iter().enumerate().skip(from) {
            tx.execute_batch(ddl).map_err(ctx)?;
            tx.execute("DELETE FROM schema_version", []).map_err(ctx)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [i as i64 + 1],
            )
            .map_err(ctx)?;
        }
        tx.commit().map_err(ctx)
    }

    fn writer(&self) -> Result<Box<dyn StoreWriter>, StoreError> {
        Ok(Box::new(SqliteWriter::open(&self.path)?))
    }

    fn reader(&self) -> Result<Box<dyn StoreReader>, StoreError> {
        Ok(Box::new(SqliteReader::open(&self.path)?))
    }

    fn max_writers(&self) -> usize {
        1
    }
}

/// Opens a connection with the busy timeout set. Only [`SqliteStore::open`] may create the
/// file: a writer or reader whose file has vanished must fail, not start an empty database.
fn connect(path: &Path, create: bool) -> Result<Connection, StoreError> {
    // NO_MUTEX: each connection is owned by one thread, so SQLite's own locking is waste.
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| classify(&format!("open {}", path.display()), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| classify("busy_timeout", e))?;
    Ok(conn)
}

/// Switches the file to WAL (a property of the file, kept across connections) and checks
/// that it took: without WAL, readers and the writer block each other.
fn enable_wal(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| classify("journal_mode", e))?;
    if mode.eq_ignore_ascii_case("wal") {
        Ok(())
    } else {
        Err(StoreError::Unavailable(format!(
            "{} cannot use WAL mode (journal_mode is {mode:?}); the file system may not \
             support the shared memory file WAL needs",
            path.display()
        )))
    }
}

/// A connection that writes: WAL checked, every commit synced.
fn writer_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = connect(path, false)?;
    enable_wal(&conn, path)?;
    // FULL syncs the WAL at every commit, so a batch acked after COMMIT survives a power cut
    // or kernel crash. NORMAL would sync only at checkpoints: still safe against a crash of
    // ChatFlow itself, but a power loss could roll back the last commits, which were already
    // acked as persisted.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| classify("synchronous", e))?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
        .map_err(|e| classify("cache_size", e))?;
    Ok(conn)
}

/// Sorts a rusqlite error into what the writer pool does with it: `Refused` only when the
/// data of these rows is at fault (retrying them fails the same way, so the batch is split to
/// find them); everything else (locks, I/O, a full disk, a missing or corrupt file, a schema
/// that is not there) is the store as a whole and is retried.
fn classify(context: &str, err: rusqlite::Error) -> StoreError {
    let refused = match &err {
        rusqlite::Error::SqliteFailure(e, _) => matches!(
            e.code,
            // A row breaking a constraint (NOT NULL, a STRICT column type), a value of the
            // wrong type, or a string or blob over SQLite's size limit.
            ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig
        ),
        // A value that cannot be bound as a parameter.
        rusqlite::Error::ToSqlConversionFailure(_) => true,
        _ => false,
    };
    let text = format!("sqlite {context}: {err}");
    if refused {
        StoreError::Refused(text)
    } else {
        StoreError::Unavailable(text)
    }
}

/// Microseconds since the epoch, rounded down: how a time is stored.
pub(crate) fn micros_floor(t: OffsetDateTime) -> i64 {
    clamp_i64(t.unix_timestamp_nanos().div_euclid(1000))
}

/// Microseconds since the epoch, rounded up: a window edge. Stored times are whole
/// microseconds, so `ts >= start` is `ts >= ceil(start)` and `ts < end` is `ts < ceil(end)`.
pub(crate) fn micros_ceil(t: OffsetDateTime) -> i64 {
    clamp_i64(-(-t.unix_timestamp_nanos()).div_euclid(1000))
}

/// The analytics range of `window` in Unix seconds: `start` rounded down and `end` rounded up
/// to the minute ([`super::minute_floor`], [`super::minute_ceil`]), computed in integers so
/// that a window ending at the last representable minute cannot overflow. `None` when the
/// window is empty.
pub(crate) fn minute_range(window: Window) -> Option<(i64, i64)> {
    let start = window.start.unix_timestamp_nanos();
    let end = window.end.unix_timestamp_nanos();
    if start >= end {
        return None;
    }
    let minute = MICROS_PER_MINUTE * 1000;
    let lo = start.div_euclid(minute) * 60;
    let hi = -(-end).div_euclid(minute) * 60;
    Some((clamp_i64(lo), clamp_i64(hi)))
}

fn clamp_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// A stored time (microseconds) back to a time; out of range is a damaged database.
fn time_of_micros(us: i64, what: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).map_err(|_| {
        StoreError::Unavailable(format!(
            "sqlite: stored {what} {us} µs is outside the representable time range"
        ))
    })
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The rollup increments of one batch, summed in memory and written once per key at the end
/// of the transaction: rows that share a minute and a room (or type) make one upsert, so a
/// 10k-row batch over 20 rooms costs about 20 room and 3 type upserts instead of 10k each.
#[derive(Default)]
struct BatchRollups {
    room_minute: HashMap<(i64, Arc<str>), i64>,
    user_minute: HashMap<(i64, i32), i64>,
    type_minute: HashMap<(i64, i16), i64>,
    /// (user, room) → (first_ts, last_ts, messages).
    user_rooms: HashMap<(i32, Arc<str>), (i64, i64, i64)>,
}

impl BatchRollups {
    fn add(&mut self, record: &Record, server_us: i64) {
        let minute = server_us.div_euclid(MICROS_PER_MINUTE as i64) * 60;
        *self
            .room_minute
            .entry((minute, record.room_id.clone()))
            .or_default() += 1;
        *self
            .user_minute
            .entry((minute, record.user_id))
            .or_default() += 1;
        *self
            .type_minute
            .entry((minute, type_code(record.message_type)))
            .or_default() += 1;
        let e = self
            .user_rooms
            .entry((record.user_id, record.room_id.clone()))
            .or_insert((server_us, server_us, 0));
        e.0 = e.0.min(server_us);
        e.1 = e.1.max(server_us);
        e.2 += 1;
    }

    fn flush(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let mut stmt = tx.prepare_cached(UPSERT_ROOM_MINUTE)?;
        for ((minute, room), n) in self.room_minute.drain() {
            stmt.execute(params![minute, &*room, n])?;
        }
        let mut stmt = tx.prepare_cached(UPSERT_USER_MINUTE)?;
        for ((minute, user), n) in self.user_minute.drain() {
            stmt.execute(params![minute, user, n])?;
        }
        let mut stmt = tx.prepare_cached(UPSERT_TYPE_MINUTE)?;
        for ((minute, code), n) in self.type_minute.drain() {
            stmt.execute(params![minute, code, n])?;
        }
        let mut stmt = tx.prepare_cached(UPSERT_USER_ROOM)?;
        for ((user, room), (first, last, n)) in self.user_rooms.drain() {
            stmt.execute(params![user, &*room, first, last, n])?;
        }
        Ok(())
    }

    fn clear(&mut self) {
        self.room_minute.clear();
        self.user_minute.clear();
        self.type_minute.clear();
        self.user_rooms.clear();
    }
}

/// The one writer: its own connection, one IMMEDIATE transaction per batch.
struct SqliteWriter {
    conn: Connection,
    rollups: BatchRollups,
}

impl SqliteWriter {
    fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(SqliteWriter {
            conn: writer_connection(path)?,
            rollups: BatchRollups::default(),
        })
    }

    /// Makes sure no transaction is left open by an earlier failure (SQLite rolls some
    /// failures back by itself, and a failed ROLLBACK on drop is silent), so the next batch
    /// starts clean.
    fn ensure_clean(&self) -> Result<(), StoreError> {
        if self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn
            .execute_batch("ROLLBACK")
            .map_err(|e| classify("rollback", e))
    }

    fn write_batch(&mut self, batch: &[Record]) -> Result<usize, StoreError> {
        let ctx = |e| classify("write", e);
        // IMMEDIATE takes the write lock now, under the busy timeout, instead of upgrading
        // from a read lock mid-batch (which can fail at once with SQLITE_BUSY).
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(ctx)?;
        let mut inserted = 0;
        {
            let mut stmt = tx.prepare_cached(INSERT_MESSAGE).map_err(ctx)?;
            for r in batch {
                let client_us = micros_floor(r.client_ts);
                let server_us = micros_floor(r.server_ts);
                let changed = stmt
                    .execute(params![
                        r.message_id.as_bytes(),
                        &*r.room_id,
                        r.user_id,
                        r.username,
                        r.message,
                        type_code(r.message_type),
                        client_us,
                        server_us,
                        &*r.node_id,
                    ])
                    .map_err(ctx)?;
                // Zero rows changed: the id is already stored (a retry); its rollups were
                // counted when it was first written.
                if changed == 1 {
                    inserted += 1;
                    self.rollups.add(r, server_us);
                }
            }
        }
        self.rollups.flush(&tx).map_err(ctx)?;
        tx.commit().map_err(ctx)?;
        Ok(inserted)
    }
}

impl StoreWriter for SqliteWriter {
    fn write(&mut self, batch: &[Record]) -> Result<usize, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        self.ensure_clean()?;
        // On error the transaction is rolled back as it is dropped; the summed rollups of
        // the failed batch must go with it.
        let result = self.write_batch(batch);
        self.rollups.clear();
        result
    }

    fn dead_letter(&mut self, rows: &[DeadLetter]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.ensure_clean()?;
        let ctx = |e| classify("dead letter", e);
        let failed_at = micros_floor(OffsetDateTime::now_utc());
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(ctx)?;
        {
            let mut stmt = tx.prepare_cached(INSERT_DEAD_LETTER).map_err(ctx)?;
            for d in rows {
                let r = &d.record;
                stmt.execute(params![
                    r.message_id.as_bytes(),
                    &*r.room_id,
                    r.user_id,
                    r.username,
                    r.message.as_bytes(),
                    type_code(r.message_type),
                    micros_floor(r.client_ts),
                    micros_floor(r.server_ts),
                    &*r.node_id,
                    d.reason,
                    failed_at,
                ])
                .map_err(ctx)?;
            }
        }
        tx.commit().map_err(ctx)
    }
}

/// Most distinct room and node names a reader keeps shared between queries.
const NAMES_KEPT: usize = 4096;

/// One query thread's connection.
struct SqliteReader {
    conn: Connection,
    /// Room and node names already read, so the rows of a query share one allocation per
    /// name instead of one per row.
    names: HashSet<Arc<str>>,
}

impl SqliteReader {
    fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path, false)?;
        // A reader never writes; this makes a mistake in a query an error, not a write.
        conn.pragma_update(None, "query_only", true)
            .map_err(|e| classify("query_only", e))?;
        Ok(SqliteReader {
            conn,
            names: HashSet::new(),
        })
    }

    fn window_list(
        &mut self,
        sql: &str,
        key: &dyn rusqlite::ToSql,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError> {
        let (start, end) = (micros_ceil(window.start), micros_ceil(window.end));
        if limit == 0 || start >= end {
            return Ok(Vec::new());
        }
        if self.names.len() > NAMES_KEPT {
            self.names.clear();
        }
        let ctx = |e| classify("messages query", e);
        let mut stmt = self.conn.prepare_cached(sql).map_err(ctx)?;
        let mut rows = stmt
            .query(params![key, start, end, limit_param(limit)])
            .map_err(ctx)?;
        let mut out = Vec::with_capacity(limit.min(1024));
        while let Some(row) = rows.next().map_err(ctx)? {
            out.push(decode_record(row, &mut self.names)?);
        }
        if take == Take::Last {
            out.reverse();
        }
        Ok(out)
    }
}

impl StoreReader for SqliteReader {
    fn room_messages(
        &mut self,
        room: &str,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError> {
        let sql = match take {
            Take::First => ROOM_FIRST,
            Take::Last => ROOM_LAST,
        };
        self.window_list(sql, &room, window, limit, take)
    }

    fn user_messages(
        &mut self,
        user: i32,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError> {
        let sql = match take {
            Take::First => USER_FIRST,
            Take::Last => USER_LAST,
        };
        self.window_list(sql, &user, window, limit, take)
    }

    fn user_rooms(&mut self, user: i32) -> Result<Vec<UserRoom>, StoreError> {
        let ctx = |e| classify("user rooms", e);
        let mut stmt = self.conn.prepare_cached(USER_ROOMS).map_err(ctx)?;
        let mut rows = stmt.query([user]).map_err(ctx)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(ctx)? {
            out.push(UserRoom {
                room_id: column_str(row, 0, "user_rooms.room_id")?.to_owned(),
                first_activity: time_of_micros(column_i64(row, 1, "first_ts")?, "first_ts")?,
                last_activity: time_of_micros(column_i64(row, 2, "last_ts")?, "last_ts")?,
                message_count: column_i64(row, 3, "user_rooms.messages")?,
            });
        }
        Ok(out)
    }

    fn active_users(&mut self, window: Window) -> Result<i64, StoreError> {
        let (start, end) = (micros_ceil(window.start), micros_ceil(window.end));
        if start >= end {
            return Ok(0);
        }
        // Whole minutes inside the window: [first minute at or after start, last minute at or
        // before end). When there are none, the rows of the whole window are read directly.
        let m = MICROS_PER_MINUTE;
        let first_whole = -(-i128::from(start)).div_euclid(m) * m;
        let last_whole = i128::from(end).div_euclid(m) * m;
        let (whole, head, tail) = if first_whole < last_whole {
            (
                (
                    clamp_i64(first_whole / 1_000_000),
                    clamp_i64(last_whole / 1_000_000),
                ),
                (start, clamp_i64(first_whole)),
                (clamp_i64(last_whole), end),
            )
        } else {
            ((0, 0), (start, end), (0, 0))
        };
        let ctx = |e| classify("active users", e);
        let mut stmt = self.conn.prepare_cached(ACTIVE_USERS).map_err(ctx)?;
        stmt.query_row(
            params![whole.0, whole.1, head.0, head.1, tail.0, tail.1],
            |r| r.get(0),
        )
        .map_err(ctx)
    }

    fn analytics(&mut self, window: Window, top_n: usize) -> Result<Analytics, StoreError> {
        let Some((lo, hi)) = minute_range(window) else {
            return Ok(Analytics::default());
        };
        let ctx = |e| classify("analytics", e);
        // One read transaction: every figure comes from the same snapshot, so the total
        // equals the sum of the series even while the writer commits.
        let tx = self.conn.transaction().map_err(ctx)?;
        let mut out = Analytics::default();
        {
            let mut stmt = tx.prepare_cached(PER_MINUTE).map_err(ctx)?;
            let mut rows = stmt.query([lo, hi]).map_err(ctx)?;
            while let Some(row) = rows.next().map_err(ctx)? {
                let minute = column_i64(row, 0, "type_minute.minute")?;
                let n = column_i64(row, 1, "type_minute.messages")?;
                let t = OffsetDateTime::from_unix_timestamp(minute).map_err(|_| {
                    StoreError::Unavailable(format!(
                        "sqlite: stored minute {minute} is outside the representable time range"
                    ))
                })?;
                out.total += n;
                out.per_minute.push((t, n));
            }
        }
        {
            let mut stmt = tx.prepare_cached(BY_TYPE).map_err(ctx)?;
            let mut rows = stmt.query([lo, hi]).map_err(ctx)?;
            while let Some(row) = rows.next().map_err(ctx)? {
                let t = decode_type(column_i64(row, 0, "type_minute.message_type")?)?;
                out.by_type[type_code(t) as usize] = column_i64(row, 1, "type_minute.messages")?;
            }
        }
        if top_n > 0 {
            let n = limit_param(top_n);
            let mut stmt = tx.prepare_cached(TOP_USERS).map_err(ctx)?;
            let mut rows = stmt.query([lo, hi, n]).map_err(ctx)?;
            while let Some(row) = rows.next().map_err(ctx)? {
                let user = decode_user(column_i64(row, 0, "user_minute.user_id")?)?;
                out.top_users
                    .push((user, column_i64(row, 1, "user_minute.messages")?));
            }
            drop(rows);
            drop(stmt);
            let mut stmt = tx.prepare_cached(TOP_ROOMS).map_err(ctx)?;
            let mut rows = stmt.query([lo, hi, n]).map_err(ctx)?;
            while let Some(row) = rows.next().map_err(ctx)? {
                out.top_rooms.push((
                    column_str(row, 0, "room_minute.room_id")?.to_owned(),
                    column_i64(row, 1, "room_minute.messages")?,
                ));
            }
        }
        tx.commit().map_err(ctx)?;
        Ok(out)
    }

    fn span(&mut self) -> Result<Option<(OffsetDateTime, OffsetDateTime)>, StoreError> {
        let ctx = |e| classify("span", e);
        let mut stmt = self.conn.prepare_cached(SPAN).map_err(ctx)?;
        let (oldest, newest): (Option<i64>, Option<i64>) = stmt
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(ctx)?;
        match (oldest, newest) {
            (Some(a), Some(b)) => Ok(Some((
                time_of_micros(a, "server_ts")?,
                time_of_micros(b, "server_ts")?,
            ))),
            _ => Ok(None),
        }
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let ctx = |e| classify("dead letters", e);
        let mut stmt = self.conn.prepare_cached(DEAD_LETTERS).map_err(ctx)?;
        let mut rows = stmt.query([limit_param(limit)]).map_err(ctx)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(ctx)? {
            let record = decode_record(row, &mut self.names)?;
            let reason = column_str(row, 9, "dead_letters.reason")?.to_owned();
            out.push(DeadLetter { record, reason });
        }
        Ok(out)
    }

    fn ping(&mut self) -> Result<(), StoreError> {
        self.conn
            .query_row("SELECT 1", [], |_| Ok(()))
            .map_err(|e| classify("ping", e))
    }
}

/// A row of [`record_columns!`] (from `messages` or `dead_letters`, whose text column is a
/// BLOB) to a record. Any value ChatFlow would not have written is a damaged database.
fn decode_record(row: &Row<'_>, names: &mut HashSet<Arc<str>>) -> Result<Record, StoreError> {
    let id = column_blob(row, 0, "message_id")?;
    let message_id = Uuid::from_slice(id).map_err(|_| {
        StoreError::Unavailable(format!(
            "sqlite: stored message_id is {} bytes, not a 16-byte uuid",
            id.len()
        ))
    })?;
    let message = match column(row, 4, "message")? {
        ValueRef::Text(b) | ValueRef::Blob(b) => std::str::from_utf8(b)
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "sqlite: stored text of message {message_id} is not UTF-8"
                ))
            })?
            .to_owned(),
        other => return Err(wrong_type("message", other)),
    };
    Ok(Record {
        message_id,
        room_id: intern(names, column_str(row, 1, "room_id")?),
        user_id: decode_user(column_i64(row, 2, "user_id")?)?,
        username: column_str(row, 3, "username")?.to_owned(),
        message,
        message_type: decode_type(column_i64(row, 5, "message_type")?)?,
        client_ts: time_of_micros(column_i64(row, 6, "client_ts")?, "client_ts")?,
        server_ts: time_of_micros(column_i64(row, 7, "server_ts")?, "server_ts")?,
        node_id: intern(names, column_str(row, 8, "node_id")?),
    })
}

fn intern(names: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
    if let Some(a) = names.get(s) {
        return a.clone();
    }
    let a: Arc<str> = Arc::from(s);
    names.insert(a.clone());
    a
}

fn decode_type(code: i64) -> Result<crate::protocol::MessageType, StoreError> {
    i16::try_from(code)
        .ok()
        .and_then(type_of_code)
        .ok_or_else(|| StoreError::Unavailable(format!("sqlite: unknown message type code {code}")))
}

fn decode_user(user: i64) -> Result<i32, StoreError> {
    i32::try_from(user).map_err(|_| {
        StoreError::Unavailable(format!("sqlite: stored user_id {user} is out of range"))
    })
}

fn column<'r>(row: &'r Row<'_>, idx: usize, what: &str) -> Result<ValueRef<'r>, StoreError> {
    row.get_ref(idx).map_err(|e| classify(what, e))
}

fn column_i64(row: &Row<'_>, idx: usize, what: &str) -> Result<i64, StoreError> {
    match column(row, idx, what)? {
        ValueRef::Integer(v) => Ok(v),
        other => Err(wrong_type(what, other)),
    }
}

fn column_str<'r>(row: &'r Row<'_>, idx: usize, what: &str) -> Result<&'r str, StoreError> {
    match column(row, idx, what)? {
        ValueRef::Text(b) => std::str::from_utf8(b)
            .map_err(|_| StoreError::Unavailable(format!("sqlite: stored {what} is not UTF-8"))),
        other => Err(wrong_type(what, other)),
    }
}

fn column_blob<'r>(row: &'r Row<'_>, idx: usize, what: &str) -> Result<&'r [u8], StoreError> {
    match column(row, idx, what)? {
        ValueRef::Blob(b) => Ok(b),
        other => Err(wrong_type(what, other)),
    }
}

fn wrong_type(what: &str, value: ValueRef<'_>) -> StoreError {
    StoreError::Unavailable(format!(
        "sqlite: stored {what} has type {}, not what ChatFlow writes",
        value.data_type()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageType;

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "chatflow-sqlite-{name}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }

        fn db(&self) -> String {
            // A directory that does not exist yet: open must create it.
            self.0
                .join("data")
                .join("chatflow.db")
                .display()
                .to_string()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn record(i: u128, room: &str, user: i32, secs: i64) -> Record {
        let ts = OffsetDateTime::from_unix_timestamp(secs).unwrap();
        Record {
            message_id: Uuid::from_u128(i),
            room_id: Arc::from(room),
            user_id: user,
            username: format!("user{user}"),
            message: format!("hello {i}"),
            message_type: MessageType::Text,
            client_ts: ts,
            server_ts: ts + time::Duration::microseconds(i as i64 % 1000),
            node_id: Arc::from("node-a"),
        }
    }

    fn open(dir: &TempDir) -> SqliteStore {
        let store = SqliteStore::open(&dir.db()).unwrap();
        store.migrate().unwrap();
        store
    }

    fn plan(conn: &Connection, sql: &str, key: &dyn rusqlite::ToSql) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map(params![key, 0i64, 1i64, 10i64], |r| r.get::<_, String>(3))
            .unwrap();
        rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("; ")
    }

    #[test]
    fn open_creates_the_directory_and_turns_on_wal() {
        let dir = TempDir::new("wal");
        let store = open(&dir);
        assert!(store.path().exists());
        let conn = Connection::open(store.path()).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let writer = SqliteWriter::open(store.path()).unwrap();
        let sync: i64 = writer
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous = FULL");
        assert_eq!(store.max_writers(), 1);
    }

    #[test]
    fn migrate_is_idempotent() {
        let dir = TempDir::new("migrate");
        let store = open(&dir);
        store.migrate().unwrap();
        let conn = Connection::open(store.path()).unwrap();
        let v: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
    }

    #[test]
    fn memory_paths_are_refused() {
        assert!(matches!(
            SqliteStore::open(":memory:"),
            Err(StoreError::Unavailable(_))
        ));
    }

    #[test]
    fn rows_survive_reopening_the_file() {
        let dir = TempDir::new("reopen");
        let batch: Vec<Record> = (1..=50).map(|i| record(i, "r1", 7, 1_000_000)).collect();
        {
            let store = open(&dir);
            let mut w = store.writer().unwrap();
            assert_eq!(w.write(&batch).unwrap(), 50);
        }
        let store = open(&dir);
        let mut r = store.reader().unwrap();
        let all = Window {
            start: OffsetDateTime::UNIX_EPOCH,
            end: OffsetDateTime::from_unix_timestamp(2_000_000).unwrap(),
        };
        let got = r.room_messages("r1", all, 100, Take::First).unwrap();
        let mut want = batch.clone();
        want.sort_by_key(|r| (r.server_ts, r.message_id));
        assert_eq!(got, want);
        // The store still knows the ids: writing them again adds nothing.
        let mut w = store.writer().unwrap();
        assert_eq!(w.write(&batch).unwrap(), 0);
    }

    #[test]
    fn window_queries_use_their_indexes_without_sorting() {
        let dir = TempDir::new("plan");
        let store = open(&dir);
        let conn = Connection::open(store.path()).unwrap();
        for sql in [ROOM_FIRST, ROOM_LAST] {
            let p = plan(&conn, sql, &"r1");
            assert!(p.contains("USING INDEX messages_room_ts"), "{p}");
            assert!(!p.contains("TEMP B-TREE"), "{p}");
        }
        for sql in [USER_FIRST, USER_LAST] {
            let p = plan(&conn, sql, &7);
            assert!(p.contains("USING INDEX messages_user_ts"), "{p}");
            assert!(!p.contains("TEMP B-TREE"), "{p}");
        }
    }

    #[test]
    fn active_users_reads_the_time_index_at_the_edges() {
        let dir = TempDir::new("plan-active");
        let store = open(&dir);
        let conn = Connection::open(store.path()).unwrap();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {ACTIVE_USERS}"))
            .unwrap();
        let p = stmt
            .query_map(params![0, 60, 0, 1, 2, 3], |r| r.get::<_, String>(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>()
            .join("; ");
        assert!(p.contains("USING INDEX messages_ts"), "{p}");
        assert!(!p.contains("SCAN messages"), "{p}");
    }

    #[test]
    fn a_failed_batch_leaves_the_writer_clean() {
        let dir = TempDir::new("rollback");
        let store = open(&dir);
        let mut w = SqliteWriter::open(store.path()).unwrap();
        // A row refused by a constraint (here a trigger, raising SQLITE_CONSTRAINT): the
        // batch fails as a whole, classified as the data's fault, and nothing of it stays.
        w.conn
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN new.user_id = 13 \
                 BEGIN SELECT RAISE(ABORT, 'refused for the test'); END",
            )
            .unwrap();
        let bad = vec![record(1, "r1", 1, 60), record(2, "r1", 13, 60)];
        assert!(matches!(w.write(&bad), Err(StoreError::Refused(_))));
        assert!(w.conn.is_autocommit());
        let good = vec![record(1, "r1", 1, 60)];
        assert_eq!(w.write(&good).unwrap(), 1);
        let mut r = store.reader().unwrap();
        let a = r
            .analytics(
                Window {
                    start: OffsetDateTime::UNIX_EPOCH,
                    end: OffsetDateTime::from_unix_timestamp(3600).unwrap(),
                },
                10,
            )
            .unwrap();
        assert_eq!(a.total, 1);
    }

    #[test]
    fn damaged_values_are_errors_not_panics() {
        let dir = TempDir::new("damaged");
        let store = open(&dir);
        let mut w = store.writer().unwrap();
        w.write(&[record(1, "r1", 1, 60)]).unwrap();
        let conn = Connection::open(store.path()).unwrap();
        conn.execute("UPDATE messages SET message_type = 9", [])
            .unwrap();
        let mut r = store.reader().unwrap();
        let all = Window {
            start: OffsetDateTime::UNIX_EPOCH,
            end: OffsetDateTime::from_unix_timestamp(3600).unwrap(),
        };
        let err = r.room_messages("r1", all, 10, Take::First).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(ref m) if m.contains("type code 9")));
        conn.execute(
            "UPDATE messages SET message_type = 0, message_id = x'0102'",
            [],
        )
        .unwrap();
        let err = r.room_messages("r1", all, 10, Take::First).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(ref m) if m.contains("uuid")));
        conn.execute(
            "UPDATE messages SET message_id = zeroblob(16), server_ts = 9223372036854775807",
            [],
        )
        .unwrap();
        assert!(matches!(r.span(), Err(StoreError::Unavailable(_))));
    }

    #[test]
    fn dead_letters_keep_their_text_and_reason() {
        let dir = TempDir::new("dead");
        let store = open(&dir);
        let mut w = store.writer().unwrap();
        let mut rec = record(5, "r1", 1, 60);
        rec.message = "nul \0 inside".into();
        w.dead_letter(&[DeadLetter {
            record: rec.clone(),
            reason: "refused".into(),
        }])
        .unwrap();
        let got = store.reader().unwrap().dead_letters(10).unwrap();
        assert_eq!(
            got,
            vec![DeadLetter {
                record: rec,
                reason: "refused".into()
            }]
        );
    }
}
