//! The PostgreSQL store: batches go in by binary COPY with their rollups, `/api/*` reads them.
//!
//! One r2d2 pool per node serves both sides. A writer keeps one connection for its life (its
//! session holds the temporary `staging` table and the prepared statements) and replaces it
//! after an error; a reader checks one out per call, so a connection lost in a database
//! restart is replaced on the next call (the pool tests each connection it hands out).
//!
//! Each batch is one transaction. The usual batch is all new messages: it is COPied straight
//! into `messages` and the writer adds its counts, summed in Rust, to the four rollups. COPY
//! inserts rows in multi-row chunks where `INSERT ... ON CONFLICT` goes row by row, so this
//! is the faster path (staging runs at 0.79x its rows/s: `bench/store-bench`, see
//! `docs/storage.md`). A batch
//! that repeats an id, or hits one already stored (a redelivery: COPY fails with 23505), goes
//! through the temporary `staging` table instead: COPY into it, then one statement moves the
//! rows into `messages` with `ON CONFLICT (message_id) DO NOTHING` and counts only the rows
//! it inserted. Either way a redelivered message changes nothing, and the rollups always
//! agree with `messages`.
//!
//! `docs/storage.md` explains the schema, the indexes and what each costs.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use ::postgres::binary_copy::BinaryCopyInWriter;
use ::postgres::error::{DbError, SqlState};
use ::postgres::fallible_iterator::FallibleIterator;
use ::postgres::types::{ToSql, Type};
use ::postgres::{Config, IsolationLevel, NoTls, Row, Statement};
use r2d2::{Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

use super::{
    Analytics, DeadLetter, Record, Store, StoreError, StoreReader, StoreWriter, Take, UserRoom,
    Window, minute_ceil, minute_floor, redact, type_code, type_of_code,
};

type Manager = PostgresConnectionManager<NoTls>;
type Conn = PooledConnection<Manager>;

/// How long opening a connection, or waiting for a free one in the pool, may take. Short (2 s), so a
/// database that is down turns into `Unavailable` (and the breaker) instead of a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Session settings of a reader's connection. The timeout bounds what one HTTP query can cost
/// the database. Custom plans because every query is a time range whose width ranges from a
/// minute to the whole history: a generic plan, chosen once for all widths, would pick
/// between the BRIN and the btree indexes badly for some of them.
const READER_SESSION: &str =
    "SET statement_timeout = '10s'; SET plan_cache_mode = force_custom_plan";

/// Session settings of a writer's connection (which may have served a reader before). A
/// 10k-row batch takes well under a second; the timeout only frees a writer stuck behind a
/// lock, and the writer pool retries the batch. `staging` has the columns of `messages` but
/// none of its constraints, so a batch with a repeated id is copied in whole and deduplicated
/// by the insert.
const WRITER_SESSION: &str = "SET statement_timeout = '60s'; RESET plan_cache_mode; \
     CREATE TEMP TABLE IF NOT EXISTS staging (LIKE messages) ON COMMIT DELETE ROWS";

/// The key of the advisory lock that serialises migrations: "chatflow" in ASCII.
const MIGRATION_LOCK: i64 = 0x6368_6174_666c_6f77;
/// The key of the advisory lock one writer of the whole deployment holds while it merges
/// `user_minute_batch` rows: "cfmerge" in ASCII.
const MERGE_LOCK: i64 = 0x0063_666d_6572_6765;

/// A minute of `user_minute_batch` is merged once it has been over for this long, so the
/// batches still being written when it ended are in. (A batch that lands later only adds a
/// row, which the next merge folds in; the sums are right either way.)
const MERGE_LAG: time::Duration = time::Duration::seconds(10);
/// How far back, before [`MERGE_LAG`], a merge looks for minutes with more than one row.
const MERGE_SPAN: time::Duration = time::Duration::hours(1);
/// The most minutes one merge handles, oldest first; the rest wait for the next one. A
/// minute holds about as many array entries as it had messages, so this bounds a merge's
/// work (a few seconds at 100,000 messages a second) even after a long stop.
const MERGE_MINUTES: i64 = 5;

/// The schema version this build creates and expects.
pub const SCHEMA_VERSION: i32 = 4;

/// The schema, one entry per version, applied in order. Never edit a released entry: add one.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_V2),
    (3, SCHEMA_V3),
    (4, SCHEMA_V4),
];
const _: () = assert!(
    MIGRATIONS[MIGRATIONS.len() - 1].0 == SCHEMA_VERSION,
    "the last migration must be SCHEMA_VERSION"
);

/// Users `0..BITMAP_USERS` have a bit in `active_minute` (PROTOCOL's user ids are
/// 1..=100000; the width is a whole number of bytes). Rows with other ids, which only a
/// broker envelope written by hand could bring, are found through the rows of
/// `user_minute_batch` marked `strays`.
const BITMAP_USERS: i32 = 100_008;
/// Bytes of one bitmap.
const BITMAP_BYTES: usize = BITMAP_USERS as usize / 8;

/// Version 1. `messages` has the indexes the history queries use: room + time, user + time,
/// and BRIN on time (rows arrive roughly in time order, so a few block ranges cover a minute
/// and the index costs almost nothing to keep up). The rollups answer analytics, active users
/// and a user's rooms without touching `messages`; their rows are updated in place all the
/// time, so they leave room in each page for HOT updates.
const SCHEMA_V1: &str = "
CREATE TABLE messages (
    message_id   uuid PRIMARY KEY,
    room_id      text NOT NULL,
    user_id      int NOT NULL,
    username     text NOT NULL,
    message      text NOT NULL,
    message_type smallint NOT NULL,
    client_ts    timestamptz NOT NULL,
    server_ts    timestamptz NOT NULL,
    node_id      text NOT NULL
);
CREATE INDEX messages_room_ts ON messages (room_id, server_ts);
CREATE INDEX messages_user_ts ON messages (user_id, server_ts);
CREATE INDEX messages_ts_brin ON messages USING brin (server_ts);

CREATE TABLE room_minute (
    minute   timestamptz NOT NULL,
    room_id  text NOT NULL,
    messages bigint NOT NULL,
    PRIMARY KEY (minute, room_id)
) WITH (fillfactor = 80);
CREATE TABLE user_minute (
    minute   timestamptz NOT NULL,
    user_id  int NOT NULL,
    messages bigint NOT NULL,
    PRIMARY KEY (minute, user_id)
) WITH (fillfactor = 80);
CREATE TABLE type_minute (
    minute       timestamptz NOT NULL,
    message_type smallint NOT NULL,
    messages     bigint NOT NULL,
    PRIMARY KEY (minute, message_type)
) WITH (fillfactor = 80);
CREATE TABLE user_rooms (
    user_id  int NOT NULL,
    room_id  text NOT NULL,
    first_ts timestamptz NOT NULL,
    last_ts  timestamptz NOT NULL,
    messages bigint NOT NULL,
    PRIMARY KEY (user_id, room_id)
) WITH (fillfactor = 80);

CREATE TABLE dead_letters (
    id           bigserial PRIMARY KEY,
    message_id   uuid,
    room_id      text,
    user_id      int,
    username     text,
    message      bytea,
    message_type smallint,
    client_ts    timestamptz,
    server_ts    timestamptz,
    node_id      text,
    reason       text NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT now()
);
";

/// Version 2: active users without reading a row per user.
///
/// - `active_minute`: one bitmap per minute, bit *u* set when user *u* sent a message in
///   that minute. Counting the distinct users of a window ORs the bitmaps of its whole
///   minutes (12.5 KB each) instead of reading a `user_minute` row per user and minute.
///   Writers OR a batch's bits in, in the batch's transaction; the migration fills it from
///   `user_minute`.
/// - `user_minute_stray`: the (normally empty) rows of users outside the bitmap.
/// - The BRIN index on `server_ts` is rebuilt with 16 pages per range instead of 128, so a
///   partial minute at a window's edge reads an eighth of the blocks.
///
/// It locks `messages`, then `user_minute`, first: the order writers take them in, so a
/// writer of an older version that is mid-batch finishes before the migration goes on,
/// instead of deadlocking with it. Reads and writes wait until it commits (seconds at 10
/// million rows; see `docs/storage.md`).
const SCHEMA_V2: &str = "
LOCK TABLE messages IN ACCESS EXCLUSIVE MODE;
LOCK TABLE user_minute IN SHARE MODE;
CREATE TABLE active_minute (
    minute timestamptz PRIMARY KEY,
    users  bit(100008) NOT NULL
);
CREATE INDEX user_minute_stray ON user_minute (minute)
    WHERE user_id < 0 OR user_id >= 100008;
DROP INDEX messages_ts_brin;
CREATE INDEX messages_ts_brin ON messages USING brin (server_ts) WITH (pages_per_range = 16);
";

/// Version 2's filling of `active_minute` from existing data (version 3 then fills
/// `active_hour` from it, in SQL).
const FILL_ACTIVE_MINUTE: &str = "
INSERT INTO active_minute (minute, users)
SELECT minute, ('x' || encode(bits, 'hex'))::bit(100008)
FROM unnest($1::timestamptz[], $2::bytea[]) AS t(minute, bits)
";

/// Version 3: the same bitmaps per hour, so a day ORs 24 of them (plus the minutes of the
/// partial hours at its edges) instead of 1,440. Filled from `active_minute`.
const SCHEMA_V3: &str = "
LOCK TABLE active_minute IN SHARE MODE;
CREATE TABLE active_hour (
    hour  timestamptz PRIMARY KEY,
    users bit(100008) NOT NULL
);
INSERT INTO active_hour (hour, users)
SELECT date_trunc('hour', minute, 'UTC'), bit_or(users) FROM active_minute GROUP BY 1;
";

/// Version 4: per-user minute counts as one row per writer batch and minute, instead of one
/// row per user and minute.
///
/// `user_minute` took one upsert per user and minute of every batch: with 100,000 users,
/// nearly one per message, each at a random place in the minute's key range, about a fifth
/// of what PostgreSQL spent on a batch (`docs/storage.md`). `user_minute_batch` holds, for
/// each batch and each minute it touches, the minute's users (sorted) and their counts as two
/// arrays; a user's messages in a minute are the sum over that minute's rows. That is one row
/// and one index entry per batch and minute, whatever the batch's size. `strays` marks a row
/// holding an id outside the bitmap of `active_minute`, which active users must also read
/// (normally none; the partial index finds them without reading the others).
///
/// It locks `messages`, then `user_minute` (the writers' order, as in version 2), converts
/// what `user_minute` holds into one row per minute, and drops it.
const SCHEMA_V4: &str = "
LOCK TABLE messages IN ACCESS EXCLUSIVE MODE;
LOCK TABLE user_minute IN ACCESS EXCLUSIVE MODE;
CREATE TABLE user_minute_batch (
    minute   timestamptz NOT NULL,
    users    int4[] NOT NULL,
    messages int8[] NOT NULL,
    strays   boolean NOT NULL
);
CREATE INDEX user_minute_batch_minute ON user_minute_batch (minute);
CREATE INDEX user_minute_batch_strays ON user_minute_batch (minute) WHERE strays;
INSERT INTO user_minute_batch (minute, users, messages, strays)
SELECT minute, array_agg(user_id ORDER BY user_id), array_agg(messages ORDER BY user_id),
       bool_or(user_id < 0 OR user_id >= 100008)
FROM user_minute GROUP BY minute ORDER BY minute;
DROP TABLE user_minute;
";

/// Whether this session may merge now: one writer of the deployment at a time, the others
/// skip their turn. Released at the end of the transaction.
const TRY_MERGE_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";
/// The minutes in [$1, $2) with more than one row of `user_minute_batch`, oldest first, at
/// most $3.
const DUE_MINUTES: &str = "SELECT minute FROM user_minute_batch \
     WHERE minute >= $1 AND minute < $2 GROUP BY minute HAVING count(*) > 1 \
     ORDER BY minute LIMIT $3";
/// Takes a minute's rows out, for the writer to sum. Writers only ever insert into
/// `user_minute_batch`, so a batch committed meanwhile is not lost: its row was not in this
/// statement's snapshot and stays beside the merged one. Two merges of one minute cannot both
/// count a row: the second's DELETE waits for the first and then finds the rows gone.
/// PostgreSQL collects the deleted rows before it sends them; the writer reads them one at a
/// time and keeps only the sums.
const TAKE_MINUTE: &str =
    "DELETE FROM user_minute_batch WHERE minute = $1 RETURNING users, messages";
/// Puts a minute's merged row back.
const PUT_MINUTE: &str = "INSERT INTO user_minute_batch (minute, users, messages, strays) \
     VALUES ($1, $2, $3, $4)";

/// ORs a batch's per-minute user bitmaps (bytea, bit *u* = byte *u*/8, mask 0x80 >> *u*%8)
/// into `active_minute` and `active_hour`, in time order (the lock order every writer
/// follows: minutes, then hours).
const ADD_ACTIVE: &str = "
WITH batch AS (
    SELECT minute, ('x' || encode(bits, 'hex'))::bit(100008) AS users
    FROM unnest($1::timestamptz[], $2::bytea[]) AS t(minute, bits)
), by_minute AS (
    INSERT INTO active_minute AS a (minute, users)
    SELECT minute, users FROM batch ORDER BY minute
    ON CONFLICT (minute) DO UPDATE SET users = a.users | EXCLUDED.users
)
INSERT INTO active_hour AS h (hour, users)
SELECT date_trunc('hour', minute, 'UTC'), bit_or(users) FROM batch GROUP BY 1 ORDER BY 1
ON CONFLICT (hour) DO UPDATE SET users = h.users | EXCLUDED.users
";

const COPY_MESSAGES: &str = "COPY messages (message_id, room_id, user_id, username, message, \
     message_type, client_ts, server_ts, node_id) FROM STDIN (FORMAT binary)";
const COPY_STAGING: &str = "COPY staging (message_id, room_id, user_id, username, message, \
     message_type, client_ts, server_ts, node_id) FROM STDIN (FORMAT binary)";

/// The column types of [`COPY_MESSAGES`] and [`COPY_STAGING`], in order; binary COPY sends
/// no type information, so these must match the table exactly.
const RECORD_TYPES: [Type; 9] = [
    Type::UUID,
    Type::TEXT,
    Type::INT4,
    Type::TEXT,
    Type::TEXT,
    Type::INT2,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMPTZ,
    Type::TEXT,
];

/// Adds a COPied batch's counts to the rollups. Each array comes sorted by its table's key
/// (text in byte order, `COLLATE "C"` in SQL), so concurrent writers take row locks in the
/// same order and do not deadlock; [`INSERT_FROM_STAGING`] sorts the same way.
const ADD_ROLLUPS: &str = "
WITH by_room AS (
    INSERT INTO room_minute AS r (minute, room_id, messages)
    SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::int8[])
    ON CONFLICT (minute, room_id) DO UPDATE SET messages = r.messages + EXCLUDED.messages
), by_user AS (
    INSERT INTO user_minute_batch (minute, users, messages, strays)
    SELECT minute, array_agg(user_id ORDER BY user_id), array_agg(n ORDER BY user_id),
           bool_or(user_id < 0 OR user_id >= 100008)
    FROM unnest($4::timestamptz[], $5::int4[], $6::int8[]) AS t(minute, user_id, n)
    GROUP BY minute
), by_type AS (
    INSERT INTO type_minute AS t (minute, message_type, messages)
    SELECT * FROM unnest($7::timestamptz[], $8::int2[], $9::int8[])
    ON CONFLICT (minute, message_type) DO UPDATE SET messages = t.messages + EXCLUDED.messages
)
INSERT INTO user_rooms AS ur (user_id, room_id, first_ts, last_ts, messages)
SELECT * FROM unnest($10::int4[], $11::text[], $12::timestamptz[], $13::timestamptz[],
                     $14::int8[])
ON CONFLICT (user_id, room_id) DO UPDATE SET
    first_ts = least(ur.first_ts, EXCLUDED.first_ts),
    last_ts = greatest(ur.last_ts, EXCLUDED.last_ts),
    messages = ur.messages + EXCLUDED.messages
";

/// Moves a staged batch into `messages` and adds what was new to the rollups, in one
/// statement: every rollup is computed from the `RETURNING` rows, so a message already stored
/// is counted nowhere. `DISTINCT ON` drops an id repeated within the batch (`ON CONFLICT`
/// cannot see a row inserted by the same statement). Rows go in key order everywhere, so
/// concurrent writers take row locks in the same order and do not deadlock. Minutes are cut
/// in UTC, like `minute_floor`, whatever the session's time zone.
const INSERT_FROM_STAGING: &str = r#"
WITH batch AS (
    SELECT DISTINCT ON (message_id) *
    FROM staging
    ORDER BY message_id
), inserted AS (
    INSERT INTO messages (message_id, room_id, user_id, username, message, message_type,
                          client_ts, server_ts, node_id)
    SELECT message_id, room_id, user_id, username, message, message_type,
           client_ts, server_ts, node_id
    FROM batch
    ORDER BY message_id
    ON CONFLICT (message_id) DO NOTHING
    RETURNING room_id, user_id, message_type, server_ts,
              date_trunc('minute', server_ts, 'UTC') AS minute
), by_room AS (
    INSERT INTO room_minute AS r (minute, room_id, messages)
    SELECT minute, room_id, count(*) FROM inserted
    GROUP BY minute, room_id ORDER BY minute, room_id COLLATE "C"
    ON CONFLICT (minute, room_id) DO UPDATE SET messages = r.messages + EXCLUDED.messages
), by_user AS (
    INSERT INTO user_minute_batch (minute, users, messages, strays)
    SELECT minute, array_agg(user_id ORDER BY user_id), array_agg(n ORDER BY user_id),
           bool_or(user_id < 0 OR user_id >= 100008)
    FROM (SELECT minute, user_id, count(*) AS n FROM inserted GROUP BY minute, user_id) AS c
    GROUP BY minute
), by_type AS (
    INSERT INTO type_minute AS t (minute, message_type, messages)
    SELECT minute, message_type, count(*) FROM inserted
    GROUP BY minute, message_type ORDER BY minute, message_type
    ON CONFLICT (minute, message_type) DO UPDATE SET messages = t.messages + EXCLUDED.messages
), user_room AS (
    INSERT INTO user_rooms AS ur (user_id, room_id, first_ts, last_ts, messages)
    SELECT user_id, room_id, min(server_ts), max(server_ts), count(*) FROM inserted
    GROUP BY user_id, room_id ORDER BY user_id, room_id COLLATE "C"
    ON CONFLICT (user_id, room_id) DO UPDATE SET
        first_ts = least(ur.first_ts, EXCLUDED.first_ts),
        last_ts = greatest(ur.last_ts, EXCLUDED.last_ts),
        messages = ur.messages + EXCLUDED.messages
)
SELECT minute, user_id, count(*) FROM inserted GROUP BY minute, user_id
"#;

const INSERT_DEAD_LETTER: &str = "INSERT INTO dead_letters (message_id, room_id, user_id, \
     username, message, message_type, client_ts, server_ts, node_id, reason) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

// The history queries: the (room_id, server_ts) and (user_id, server_ts) indexes give the rows
// in time order from either end; ties on server_ts are put in message_id order by an
// incremental sort of just those rows.
const ROOM_FIRST: &str = "SELECT message_id, room_id, user_id, username, message, message_type, \
     client_ts, server_ts, node_id FROM messages \
     WHERE room_id = $1 AND server_ts >= $2 AND server_ts < $3 \
     ORDER BY server_ts, message_id LIMIT $4";
const ROOM_LAST: &str = "SELECT message_id, room_id, user_id, username, message, message_type, \
     client_ts, server_ts, node_id FROM messages \
     WHERE room_id = $1 AND server_ts >= $2 AND server_ts < $3 \
     ORDER BY server_ts DESC, message_id DESC LIMIT $4";
const USER_FIRST: &str = "SELECT message_id, room_id, user_id, username, message, message_type, \
     client_ts, server_ts, node_id FROM messages \
     WHERE user_id = $1 AND server_ts >= $2 AND server_ts < $3 \
     ORDER BY server_ts, message_id LIMIT $4";
const USER_LAST: &str = "SELECT message_id, room_id, user_id, username, message, message_type, \
     client_ts, server_ts, node_id FROM messages \
     WHERE user_id = $1 AND server_ts >= $2 AND server_ts < $3 \
     ORDER BY server_ts DESC, message_id DESC LIMIT $4";

// Room ids tie-break in byte order (`COLLATE "C"`), as on every backend, whatever the
// database's collation.
const USER_ROOMS: &str = r#"SELECT room_id, first_ts, last_ts, messages FROM user_rooms
     WHERE user_id = $1 ORDER BY last_ts DESC, room_id COLLATE "C""#;

/// Distinct users: the whole hours ($7..$8) from `active_hour` and the other whole minutes
/// ($3..$7 and $8..$4) from `active_minute`, OR'ed and counted, plus
/// the users found only outside it: in the partial minutes at the two edges ($1..$5 and
/// $6..$2, from `messages` through the BRIN index) or outside the bitmap's range. An edge
/// that is not needed is passed as an empty range, and its guard (`$1 < $5`) lets the
/// planner drop it instead of reading BRIN block ranges for nothing; the casts keep
/// PostgreSQL from inferring `text` for the guard. `CASE` keeps `get_bit` from ever seeing
/// an id outside the bitmap.
const ACTIVE_USERS: &str = "
WITH whole AS (
    SELECT bit_or(users) AS bits FROM (
        SELECT users FROM active_hour WHERE hour >= $7 AND hour < $8
        UNION ALL
        SELECT users FROM active_minute WHERE minute >= $3 AND minute < $7
        UNION ALL
        SELECT users FROM active_minute WHERE minute >= $8 AND minute < $4
    ) AS parts
), others AS (
    SELECT user_id FROM messages
     WHERE $1::timestamptz < $5::timestamptz AND server_ts >= $1 AND server_ts < $5
    UNION
    SELECT user_id FROM messages
     WHERE $6::timestamptz < $2::timestamptz AND server_ts >= $6 AND server_ts < $2
    UNION
    SELECT u.user_id FROM user_minute_batch AS b, unnest(b.users) AS u(user_id)
     WHERE b.strays AND b.minute >= $3 AND b.minute < $4
       AND (u.user_id < 0 OR u.user_id >= 100008)
)
SELECT coalesce(bit_count(bits), 0)
     + (SELECT count(*) FROM others
         WHERE CASE WHEN bits IS NULL OR user_id < 0 OR user_id >= 100008 THEN true
                    ELSE get_bit(bits, user_id) = 0 END)
FROM whole";

/// Per-minute totals (`GROUPING(minute) = 0`) and per-type totals (`= 1`) in one pass.
const TYPE_COUNTS: &str = "SELECT GROUPING(minute), minute, message_type, sum(messages)::bigint \
     FROM type_minute WHERE minute >= $1 AND minute < $2 \
     GROUP BY GROUPING SETS ((minute), (message_type)) \
     ORDER BY 1, 2, 3";
/// Pairs with a NULL side (only a row written by hand with arrays of different lengths has
/// them) are left out rather than summed to NULL.
const TOP_USERS: &str = "SELECT u.user_id, sum(u.n)::bigint AS n \
     FROM user_minute_batch AS b, unnest(b.users, b.messages) AS u(user_id, n) \
     WHERE b.minute >= $1 AND b.minute < $2 AND u.user_id IS NOT NULL AND u.n IS NOT NULL \
     GROUP BY u.user_id ORDER BY n DESC, u.user_id LIMIT $3";
const TOP_ROOMS: &str = r#"SELECT room_id, sum(messages)::bigint AS n FROM room_minute
     WHERE minute >= $1 AND minute < $2 GROUP BY room_id ORDER BY n DESC, room_id COLLATE "C"
     LIMIT $3"#;

/// The first and last minute with messages, from the primary key of `type_minute` (two index
/// probes). `messages` has no btree on `server_ts` alone (it would cost every insert one more
/// index entry); min() and max() through BRIN would read the whole index and many blocks.
const SPAN_MINUTES: &str = "SELECT min(minute), max(minute) FROM type_minute";
/// The exact oldest and newest `server_ts` inside those two minutes, through BRIN.
const SPAN_EDGES: &str = "SELECT \
     (SELECT min(server_ts) FROM messages WHERE server_ts >= $1 AND server_ts < $2), \
     (SELECT max(server_ts) FROM messages WHERE server_ts >= $3 AND server_ts < $4)";
/// Only when the rollups and `messages` disagree (rows deleted by hand): a full scan.
const SPAN_SCAN: &str = "SELECT min(server_ts), max(server_ts) FROM messages";

const DEAD_LETTERS: &str = "SELECT id, message_id, room_id, user_id, username, message, \
     message_type, client_ts, server_ts, node_id, reason FROM dead_letters ORDER BY id LIMIT $1";

/// How many times a batch is retried inside one `write` after a serialization failure or a
/// deadlock, before the writer pool hears `Unavailable`.
const CONFLICT_RETRIES: u32 = 3;

/// The PostgreSQL store: a connection pool shared by the node's writers and readers.
pub struct PgStore {
    pool: Pool<Manager>,
    /// The URL with its password replaced, for messages.
    url: String,
    pool_size: u32,
}

impl PgStore {
    /// Connects a pool of at most `pool_size` connections to `url`. Fails with `Unavailable`
    /// naming the (redacted) URL when PostgreSQL cannot be reached within a few seconds.
    pub fn open(url: &str, pool_size: u32) -> Result<PgStore, StoreError> {
        let shown = redact(url);
        if pool_size == 0 {
            return Err(StoreError::Unavailable(format!(
                "PostgreSQL pool for {shown} needs at least one connection"
            )));
        }
        let mut config: Config = url.parse().map_err(|e: ::postgres::Error| {
            StoreError::Unavailable(format!("invalid PostgreSQL URL {shown}: {}", describe(&e)))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A database host that vanishes without closing the socket would otherwise leave a
        // call waiting on TCP for hours: keepalives notice an idle peer is gone, the user
        // timeout notices unacknowledged writes. A URL that sets these wins.
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(Duration::from_secs(30));
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        if config.get_application_name().is_none() {
            config.application_name("chatflow");
        }
        // "relation staging already exists, skipping" and the like: not worth a log line.
        config.notice_callback(|notice| {
            log::debug!(
                "postgres notice: {}: {}",
                notice.severity(),
                notice.message()
            );
        });

        // One direct connection first: it fails at once with the real reason (refused,
        // authentication, no such database) where the pool would retry for its whole timeout
        // and then report only that it timed out.
        let probe = config.connect(NoTls).map_err(|e| {
            StoreError::Unavailable(format!("cannot connect to {shown}: {}", describe(&e)))
        })?;
        drop(probe);

        let pool = Pool::builder()
            .max_size(pool_size)
            .connection_timeout(CONNECT_TIMEOUT)
            // A connection the database dropped (restart, idle timeout, terminate) is found
            // here, with one round trip, instead of failing the caller's query.
            .test_on_check_out(true)
            // Open connections as they are needed: writers and readers start lazily.
            .min_idle(Some(0))
            .error_handler(Box::new(PoolErrors))
            .build_unchecked(PostgresConnectionManager::new(config, NoTls));
        Ok(PgStore {
            pool,
            url: shown,
            pool_size,
        })
    }
}

impl Store for PgStore {
    fn schema_version(&self) -> i64 {
        i64::from(SCHEMA_VERSION)
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = checkout(&self.pool, &self.url)?;
        migrate(&mut conn).map_err(|e| {
            let why = explain("migrating the schema", &e);
            log::error!("{why}");
            StoreError::Unavailable(format!("{why} ({})", self.url))
        })
    }

    fn writer(&self) -> Result<Box<dyn StoreWriter>, StoreError> {
        Ok(Box::new(PgWriter {
            pool: self.pool.clone(),
            url: self.url.clone(),
            session: None,
        }))
    }

    fn reader(&self) -> Result<Box<dyn StoreReader>, StoreError> {
        Ok(Box::new(PgReader {
            pool: self.pool.clone(),
            url: self.url.clone(),
        }))
    }

    /// Each writer holds a connection for its life: leave at least one for queries.
    fn max_writers(&self) -> usize {
        (self.pool_size.saturating_sub(1).max(1)) as usize
    }
}

/// Applies the migrations this version knows and the database lacks, in one transaction under
/// an advisory lock: a node that starts while another migrates waits, then finds nothing to do.
fn migrate(conn: &mut Conn) -> Result<(), ::postgres::Error> {
    let mut tx = conn.transaction()?;
    // The connection may have served a reader; building indexes may take longer than that.
    tx.batch_execute("SET LOCAL statement_timeout = 0")?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    int PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])?
        .try_get(0)?;
    let latest = SCHEMA_VERSION;
    if current > latest {
        // A newer ChatFlow migrated this database. Versions 2 and 3 only added, so a build
        // of version 1 or 2 keeps working beside them; version 4 dropped `user_minute`, so
        // a build of version 3 or older fails its writes on it (docs/storage.md: stop the old
        // nodes before migrating).
        log::warn!(
            "schema version {current} is newer than this build's {latest}; leaving it \
             (writes fail if a later version removed a table this build uses)"
        );
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        log::info!("applying schema version {version}");
        tx.batch_execute(sql)?;
        if version == 2 {
            fill_active_minutes(&mut tx)?;
        }
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&version],
        )?;
    }
    tx.commit()
}

/// What merging one minute of `user_minute_batch` came to.
enum MinuteMerge {
    /// Its rows were replaced by one.
    Merged,
    /// Another merge had taken them.
    Gone,
    /// A row's arrays differ in length; the caller rolls the minute back.
    Mismatched { users: usize, counts: usize },
}

/// Takes a minute's rows out, sums each user's counts and puts one row back.
fn merge_minute(
    tx: &mut ::postgres::Transaction<'_>,
    take: &Statement,
    put: &Statement,
    minute: &OffsetDateTime,
) -> Result<MinuteMerge, ::postgres::Error> {
    // Summed here rather than in SQL: unnesting and grouping millions of array entries
    // costs PostgreSQL about ten times what a hash map costs this thread. The map holds one
    // entry per user of the minute: at most a minute's messages, about 100,000 at this
    // deployment's user count.
    let mut counts: HashMap<i32, i64> = HashMap::new();
    let mut rows = tx.query_raw(take, [minute as &(dyn ToSql + Sync)])?;
    while let Some(row) = rows.next()? {
        let users: Vec<i32> = row.try_get(0)?;
        let messages: Vec<i64> = row.try_get(1)?;
        if users.len() != messages.len() {
            return Ok(MinuteMerge::Mismatched {
                users: users.len(),
                counts: messages.len(),
            });
        }
        for (user, n) in users.into_iter().zip(messages) {
            let sum = counts.entry(user).or_default();
            *sum = sum.saturating_add(n);
        }
    }
    drop(rows);
    if counts.is_empty() {
        return Ok(MinuteMerge::Gone);
    }
    let mut pairs: Vec<(i32, i64)> = counts.into_iter().collect();
    pairs.sort_unstable();
    let strays = pairs.first().is_some_and(|&(u, _)| u < 0)
        || pairs.last().is_some_and(|&(u, _)| u >= BITMAP_USERS);
    let (users, messages): (Vec<i32>, Vec<i64>) = pairs.into_iter().unzip();
    tx.execute(put, &[minute, &users, &messages, &strays])?;
    Ok(MinuteMerge::Merged)
}

/// Fills `active_minute` from `user_minute` (the data written before version 2) in one
/// ordered pass through a cursor, inserting the bitmaps of up to `FILL_MINUTES` minutes at a
/// time, so memory stays at a few MB whatever the history.
fn fill_active_minutes(tx: &mut ::postgres::Transaction<'_>) -> Result<(), ::postgres::Error> {
    const FETCH: i64 = 50_000;
    const FILL_MINUTES: usize = 64;
    let add = tx.prepare(FILL_ACTIVE_MINUTE)?;
    tx.batch_execute(
        "DECLARE fill_active NO SCROLL CURSOR FOR
         SELECT minute, user_id FROM user_minute
          WHERE user_id >= 0 AND user_id < 100008 ORDER BY minute",
    )?;
    let fetch = format!("FETCH {FETCH} FROM fill_active");
    let mut pairs: Vec<(OffsetDateTime, i32)> = Vec::new();
    let mut minutes = 0usize;
    loop {
        let rows = tx.query(fetch.as_str(), &[])?;
        let done = (rows.len() as i64) < FETCH;
        for row in &rows {
            let minute: OffsetDateTime = row.try_get(0)?;
            if pairs.last().is_some_and(|(m, _)| *m != minute) {
                minutes += 1;
                // Whole minutes only: the cursor is in minute order, so the last minute of
                // `pairs` may continue in the next fetch.
                if minutes.is_multiple_of(FILL_MINUTES) {
                    add_active(tx, &add, pairs.drain(..))?;
                }
            }
            pairs.push((minute, row.try_get(1)?));
        }
        if done {
            break;
        }
    }
    add_active(tx, &add, pairs.into_iter())?;
    tx.batch_execute("CLOSE fill_active")?;
    log::info!("filled active_minute from user_minute");
    Ok(())
}

/// `t` rounded down to an hour (UTC).
fn hour_floor(t: OffsetDateTime) -> OffsetDateTime {
    let secs = t.unix_timestamp();
    OffsetDateTime::from_unix_timestamp(secs - secs.rem_euclid(3600)).unwrap_or(t)
}

/// `t` rounded up to an hour (unchanged when already on one, or at the end of time).
fn hour_ceil(t: OffsetDateTime) -> OffsetDateTime {
    let floor = hour_floor(t);
    if floor == t {
        t
    } else {
        floor.checked_add(time::Duration::HOUR).unwrap_or(t)
    }
}

/// One bitmap per minute of the users in `pairs`, minutes in order (see [`ADD_ACTIVE`]).
fn active_bitmaps(
    pairs: impl Iterator<Item = (OffsetDateTime, i32)>,
) -> (Vec<OffsetDateTime>, Vec<Vec<u8>>) {
    let mut by_minute: BTreeMap<OffsetDateTime, Vec<u8>> = BTreeMap::new();
    for (minute, user) in pairs {
        let Ok(u) = usize::try_from(user) else {
            continue;
        };
        if user >= BITMAP_USERS {
            continue;
        }
        let bits = by_minute
            .entry(minute)
            .or_insert_with(|| vec![0u8; BITMAP_BYTES]);
        bits[u / 8] |= 0x80 >> (u % 8);
    }
    by_minute.into_iter().unzip()
}

/// ORs the users of `pairs` into `active_minute`.
fn add_active(
    tx: &mut ::postgres::Transaction<'_>,
    add: &Statement,
    pairs: impl Iterator<Item = (OffsetDateTime, i32)>,
) -> Result<(), ::postgres::Error> {
    let (minutes, bits) = active_bitmaps(pairs);
    if !minutes.is_empty() {
        tx.execute(add, &[&minutes, &bits])?;
    }
    Ok(())
}

/// Logs the pool's own errors (a failed connect, a dead connection found at checkout) with
/// their SQLSTATE or cause, where r2d2's default handler prints only "db error".
#[derive(Debug)]
struct PoolErrors;

impl r2d2::HandleError<::postgres::Error> for PoolErrors {
    fn handle_error(&self, e: ::postgres::Error) {
        log::warn!("PostgreSQL pool: {}", describe(&e));
    }
}

/// Takes a connection from the pool.
fn checkout(pool: &Pool<Manager>, url: &str) -> Result<Conn, StoreError> {
    pool.get().map_err(|e| {
        let why = format!("no PostgreSQL connection to {url}: {e}");
        log::warn!("{why}");
        StoreError::Unavailable(why)
    })
}

/// What a connection was last set up for; kept with the connection in the pool, so a reader
/// pays for its session settings once per connection, not once per call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Reader,
    Writer,
}

/// Prepared statements of one connection, kept with it in the pool.
#[derive(Default)]
struct Prepared(HashMap<&'static str, Statement>);

fn set_role(conn: &mut Conn, role: Role) -> Result<(), ::postgres::Error> {
    if PooledConnection::extensions(conn).get::<Role>() == Some(&role) {
        return Ok(());
    }
    conn.batch_execute(match role {
        Role::Reader => READER_SESSION,
        Role::Writer => WRITER_SESSION,
    })?;
    PooledConnection::extensions_mut(conn).insert(role);
    Ok(())
}

fn prepared(conn: &mut Conn, sql: &'static str) -> Result<Statement, ::postgres::Error> {
    if let Some(s) = PooledConnection::extensions(conn)
        .get::<Prepared>()
        .and_then(|p| p.0.get(sql))
    {
        return Ok(s.clone());
    }
    let statement = conn.prepare(sql)?;
    let extensions = PooledConnection::extensions_mut(conn);
    if extensions.get::<Prepared>().is_none() {
        extensions.insert(Prepared::default());
    }
    if let Some(p) = extensions.get_mut::<Prepared>() {
        p.0.insert(sql, statement.clone());
    }
    Ok(statement)
}

/// An error with its cause: `postgres::Error`'s Display alone says only "db error" or
/// "error communicating with the server".
fn describe(e: &::postgres::Error) -> String {
    match (e.as_db_error(), e.source()) {
        (Some(db), _) => describe_db(db),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

fn describe_db(db: &DbError) -> String {
    let mut text = format!(
        "{} SQLSTATE {}: {}",
        db.severity(),
        db.code().code(),
        db.message()
    );
    if let Some(detail) = db.detail() {
        text.push_str("; ");
        text.push_str(detail);
    }
    if let Some(place) = db.where_() {
        text.push_str(" (");
        text.push_str(place);
        text.push(')');
    }
    text
}

fn explain(what: &str, e: &::postgres::Error) -> String {
    format!("{what}: {}", describe(e))
}

/// What a failed write attempt means for the batch.
#[derive(Debug)]
enum Failure {
    /// The rows themselves (a value a column cannot hold, a constraint, a size limit): the
    /// same rows fail the same way, so the writer pool splits the batch to find them.
    Refused(String),
    /// Lost to a concurrent transaction (serialization failure, deadlock): try again.
    Conflict(String),
    /// The connection broke (closed, I/O error, server shut down): a fresh one may work now.
    Lost(String),
    /// Anything else about the database.
    Unavailable(String),
}

impl Failure {
    fn into_store_error(self) -> StoreError {
        match self {
            Failure::Refused(why) => StoreError::Refused(why),
            Failure::Conflict(why) | Failure::Lost(why) | Failure::Unavailable(why) => {
                StoreError::Unavailable(why)
            }
        }
    }
}

/// Sorts an error by its SQLSTATE class.
fn classify(what: &str, e: &::postgres::Error) -> Failure {
    let why = explain(what, e);
    let Some(db) = e.as_db_error() else {
        log::warn!("{why}");
        return Failure::Lost(why);
    };
    let code = db.code().code();
    match code.get(..2).unwrap_or("") {
        // data exception (22021: a NUL byte in text), integrity constraint, program limit
        "22" | "23" | "54" => {
            log::warn!("{why}");
            Failure::Refused(why)
        }
        "40" if code == "40001" || code == "40P01" => {
            log::info!("{why}");
            Failure::Conflict(why)
        }
        // connection exception; admin or crash shutdown, cannot connect now
        "08" => {
            log::warn!("{why}");
            Failure::Lost(why)
        }
        "57" if code.starts_with("57P") => {
            log::warn!("{why}");
            Failure::Lost(why)
        }
        _ => {
            log::warn!("{why}");
            Failure::Unavailable(why)
        }
    }
}

/// One writer thread's side of the store.
struct PgWriter {
    pool: Pool<Manager>,
    url: String,
    /// The connection and what was prepared on it; `None` after an error, so the next batch
    /// starts from a clean connection.
    session: Option<WriterSession>,
}

struct WriterSession {
    conn: Conn,
    /// [`ADD_ROLLUPS`], prepared.
    add_rollups: Statement,
    /// [`INSERT_FROM_STAGING`], prepared.
    insert_from_staging: Statement,
    /// [`ADD_ACTIVE`], prepared.
    add_active: Statement,
}

impl WriterSession {
    fn start(pool: &Pool<Manager>, url: &str) -> Result<WriterSession, Failure> {
        let mut conn = checkout(pool, url).map_err(|e| match e {
            StoreError::Unavailable(why) | StoreError::Refused(why) => Failure::Unavailable(why),
        })?;
        let setup = |conn: &mut Conn| -> Result<[Statement; 3], ::postgres::Error> {
            set_role(conn, Role::Writer)?;
            Ok([
                conn.prepare(ADD_ROLLUPS)?,
                conn.prepare(INSERT_FROM_STAGING)?,
                conn.prepare(ADD_ACTIVE)?,
            ])
        };
        match setup(&mut conn) {
            Ok([add_rollups, insert_from_staging, add_active]) => Ok(WriterSession {
                conn,
                add_rollups,
                insert_from_staging,
                add_active,
            }),
            // Whatever the SQLSTATE, it is not about a batch's rows.
            Err(e) => match classify("preparing a writer connection", &e) {
                lost @ Failure::Lost(_) => Err(lost),
                Failure::Refused(why) | Failure::Conflict(why) | Failure::Unavailable(why) => {
                    Err(Failure::Unavailable(why))
                }
            },
        }
    }

    /// Merges the minutes of `user_minute_batch` in [`from`, `to`) that have several rows,
    /// unless another writer of the deployment is merging (then it does nothing). Returns how
    /// many minutes it merged. Each minute is merged under a savepoint: a minute that cannot be
    /// merged (a row written by hand with arrays of different lengths or NULL entries, a
    /// statement timeout) keeps its rows as they were, with a warning, and the others go on.
    fn merge_user_minutes(
        &mut self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<usize, ::postgres::Error> {
        // Prepared once per connection: a writer asks every 10 s, and mostly nothing is due.
        let lock = prepared(&mut self.conn, TRY_MERGE_LOCK)?;
        let due = prepared(&mut self.conn, DUE_MINUTES)?;
        let take = prepared(&mut self.conn, TAKE_MINUTE)?;
        let put = prepared(&mut self.conn, PUT_MINUTE)?;
        // Read committed, whatever the server's default: a batch committed while a minute is
        // being taken out stays beside the merged row (see TAKE_MINUTE).
        let mut tx = self
            .conn
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()?;
        let mine: bool = tx.query_one(&lock, &[&MERGE_LOCK])?.try_get(0)?;
        if !mine {
            return Ok(0);
        }
        let due: Vec<OffsetDateTime> = tx
            .query(&due, &[&from, &to, &MERGE_MINUTES])?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
        let mut merged = 0;
        for minute in &due {
            let mut sp = tx.savepoint("merge_minute")?;
            match merge_minute(&mut sp, &take, &put, minute) {
                Ok(MinuteMerge::Merged) => {
                    sp.commit()?;
                    merged += 1;
                }
                Ok(MinuteMerge::Gone) => sp.commit()?,
                Ok(MinuteMerge::Mismatched { users, counts }) => {
                    sp.rollback()?;
                    log::warn!(
                        "user_minute_batch: a row of {minute} has {users} users and {counts} \
                         counts; the minute is left unmerged"
                    );
                }
                Err(e) => {
                    // A lost connection fails the rollback too, and that ends the merge.
                    sp.rollback()?;
                    log::warn!("user_minute_batch: {minute} left unmerged: {e}");
                }
            }
        }
        tx.commit()?;
        Ok(merged)
    }

    /// Stores `batch` in one transaction and returns how many rows were new: straight into
    /// `messages` when every id is new, through `staging` otherwise.
    fn write(&mut self, batch: &[Record]) -> Result<usize, ::postgres::Error> {
        // In id order, like the staging insert: two writers holding the same redelivered ids
        // then wait for each other in one order instead of deadlocking.
        let mut rows: Vec<&Record> = batch.iter().collect();
        rows.sort_unstable_by_key(|r| r.message_id);
        if rows.windows(2).any(|w| w[0].message_id == w[1].message_id) {
            return self.write_staged(batch);
        }
        match self.write_direct(&rows) {
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                log::debug!(
                    "batch of {} has stored ids; going through staging",
                    batch.len()
                );
                self.write_staged(batch)
            }
            done => done,
        }
    }

    /// COPY into `messages`, then the batch's counts into the rollups. One id already stored
    /// fails the COPY (23505) and rolls everything back.
    fn write_direct(&mut self, rows: &[&Record]) -> Result<usize, ::postgres::Error> {
        let mut tx = self.conn.transaction()?;
        let mut copy = BinaryCopyInWriter::new(tx.copy_in(COPY_MESSAGES)?, &RECORD_TYPES);
        let mut counts = BatchCounts::default();
        for r in rows {
            copy_record(&mut copy, r)?;
            counts.add(r);
        }
        copy.finish()?;
        counts.apply(&mut tx, &self.add_rollups)?;
        add_active(&mut tx, &self.add_active, counts.users.keys().copied())?;
        tx.commit()?;
        Ok(rows.len())
    }

    /// COPY into `staging`, then one statement inserts what is new and counts it.
    fn write_staged(&mut self, batch: &[Record]) -> Result<usize, ::postgres::Error> {
        let mut tx = self.conn.transaction()?;
        let mut copy = BinaryCopyInWriter::new(tx.copy_in(COPY_STAGING)?, &RECORD_TYPES);
        for r in batch {
            copy_record(&mut copy, r)?;
        }
        copy.finish()?;
        // (minute, user, rows) of what was new: the active users of the batch, and its count.
        let mut inserted = 0i64;
        let mut pairs = Vec::new();
        for row in tx.query(&self.insert_from_staging, &[])? {
            pairs.push((row.try_get(0)?, row.try_get(1)?));
            inserted += row.try_get::<_, i64>(2)?;
        }
        add_active(&mut tx, &self.add_active, pairs.into_iter())?;
        tx.commit()?;
        Ok(usize::try_from(inserted).unwrap_or(0))
    }

    fn dead_letter(&mut self, rows: &[DeadLetter]) -> Result<(), ::postgres::Error> {
        let insert = prepared(&mut self.conn, INSERT_DEAD_LETTER)?;
        let mut tx = self.conn.transaction()?;
        for row in rows {
            let r = &row.record;
            // The message is kept byte for byte; the text columns cannot hold a NUL, and a
            // dead letter that cannot be stored would be lost, so NULs there are replaced.
            let room = text_safe(&r.room_id);
            let username = text_safe(&r.username);
            let node = text_safe(&r.node_id);
            let reason = text_safe(&row.reason);
            tx.execute(
                &insert,
                &[
                    &r.message_id,
                    &room,
                    &r.user_id,
                    &username,
                    &r.message.as_bytes(),
                    &type_code(r.message_type),
                    &utc(r.client_ts),
                    &utc(r.server_ts),
                    &node,
                    &reason,
                ],
            )?;
        }
        tx.commit()
    }
}

fn text_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// `t` as PostgreSQL stores it: in UTC (see [`utc`]), truncated to the microsecond. Rounded
/// here, downwards, so the minute a rollup counts a message in is the minute of the stored
/// `server_ts`.
fn stored_time(t: OffsetDateTime) -> OffsetDateTime {
    let t = utc(t);
    t.checked_sub(time::Duration::nanoseconds(i64::from(
        t.nanosecond() % 1_000,
    )))
    .unwrap_or(t)
}

fn copy_record(copy: &mut BinaryCopyInWriter<'_>, r: &Record) -> Result<(), ::postgres::Error> {
    let room: &str = &r.room_id;
    let node: &str = &r.node_id;
    let row: [&(dyn ToSql + Sync); 9] = [
        &r.message_id,
        &room,
        &r.user_id,
        &r.username,
        &r.message,
        &type_code(r.message_type),
        &stored_time(r.client_ts),
        &stored_time(r.server_ts),
        &node,
    ];
    copy.write(&row)
}

/// A batch's rollup counts, kept sorted by each table's key (see [`ADD_ROLLUPS`]).
#[derive(Default)]
struct BatchCounts<'a> {
    rooms: BTreeMap<(OffsetDateTime, &'a str), i64>,
    users: BTreeMap<(OffsetDateTime, i32), i64>,
    types: BTreeMap<(OffsetDateTime, i16), i64>,
    user_rooms: BTreeMap<(i32, &'a str), (OffsetDateTime, OffsetDateTime, i64)>,
}

impl<'a> BatchCounts<'a> {
    fn add(&mut self, r: &'a Record) {
        let ts = stored_time(r.server_ts);
        let minute = minute_floor(ts);
        *self.rooms.entry((minute, &r.room_id)).or_default() += 1;
        *self.users.entry((minute, r.user_id)).or_default() += 1;
        *self
            .types
            .entry((minute, type_code(r.message_type)))
            .or_default() += 1;
        let room = self
            .user_rooms
            .entry((r.user_id, &r.room_id))
            .or_insert((ts, ts, 0));
        room.0 = room.0.min(ts);
        room.1 = room.1.max(ts);
        room.2 += 1;
    }

    fn apply(
        &self,
        tx: &mut ::postgres::Transaction<'_>,
        add_rollups: &Statement,
    ) -> Result<u64, ::postgres::Error> {
        let (room_minutes, rooms, room_counts): (Vec<_>, Vec<_>, Vec<_>) =
            unzip3(self.rooms.iter().map(|(&(m, room), &n)| (m, room, n)));
        let (user_minutes, users, user_counts): (Vec<_>, Vec<_>, Vec<_>) =
            unzip3(self.users.iter().map(|(&(m, user), &n)| (m, user, n)));
        let (type_minutes, types, type_counts): (Vec<_>, Vec<_>, Vec<_>) =
            unzip3(self.types.iter().map(|(&(m, t), &n)| (m, t, n)));
        let (ur_users, ur_rooms, ur_spans): (Vec<_>, Vec<_>, Vec<_>) = unzip3(
            self.user_rooms
                .iter()
                .map(|(&(user, room), &(first, last, n))| (user, room, (first, last, n))),
        );
        let (ur_first, ur_last, ur_counts): (Vec<_>, Vec<_>, Vec<_>) = unzip3(ur_spans.into_iter());
        tx.execute(
            add_rollups,
            &[
                &room_minutes,
                &rooms,
                &room_counts,
                &user_minutes,
                &users,
                &user_counts,
                &type_minutes,
                &types,
                &type_counts,
                &ur_users,
                &ur_rooms,
                &ur_first,
                &ur_last,
                &ur_counts,
            ],
        )
    }
}

fn unzip3<A, B, C>(items: impl Iterator<Item = (A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for (x, y, z) in items {
        a.push(x);
        b.push(y);
        c.push(z);
    }
    (a, b, c)
}

impl PgWriter {
    /// Runs `op` on the writer's connection, acquiring one first if needed. A failed
    /// transaction was rolled back when it went out of scope. After a refusal or a conflict
    /// the connection is fine and kept; after anything else the session is dropped (the pool
    /// discards the connection if it is broken) and the next call starts afresh.
    fn attempt<T>(
        &mut self,
        what: &str,
        op: impl FnOnce(&mut WriterSession) -> Result<T, ::postgres::Error>,
    ) -> Result<T, Failure> {
        let session = match self.session.take() {
            Some(s) if !s.conn.is_closed() => s,
            _ => WriterSession::start(&self.pool, &self.url)?,
        };
        let session = self.session.insert(session);
        match op(session) {
            Ok(v) => Ok(v),
            Err(e) => {
                let failure = classify(what, &e);
                match failure {
                    // The rollback left the connection clean; keep it and its statements.
                    Failure::Refused(_) | Failure::Conflict(_) if !session.conn.is_closed() => {}
                    _ => self.session = None,
                }
                Err(failure)
            }
        }
    }

    /// Retries `op` after a conflict (a few times, with a short growing pause) and after a
    /// lost connection (once, at once, on a fresh connection: a database restart closes
    /// every pooled connection, and the first batch after it should not fail for that).
    /// Both are safe because a batch is all or nothing and re-inserting a stored id is a
    /// no-op.
    fn with_retries<T>(
        &mut self,
        what: &str,
        mut op: impl FnMut(&mut WriterSession) -> Result<T, ::postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut conflicts = 0;
        let mut reconnected = false;
        loop {
            match self.attempt(what, &mut op) {
                Ok(v) => return Ok(v),
                Err(Failure::Conflict(_)) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    let pause = 10u64 << conflicts;
                    std::thread::sleep(Duration::from_millis(pause + fastrand::u64(0..pause)));
                }
                Err(Failure::Lost(_)) if !reconnected => reconnected = true,
                Err(f) => return Err(f.into_store_error()),
            }
        }
    }
}

impl StoreWriter for PgWriter {
    fn write(&mut self, batch: &[Record]) -> Result<usize, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        self.with_retries("writing a batch", |s| s.write(batch))
    }

    fn dead_letter(&mut self, rows: &[DeadLetter]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.with_retries("storing dead letters", |s| s.dead_letter(rows))
    }

    /// Merges the per-batch rows of `user_minute_batch` for the minutes of the last hour
    /// that ended at least [`MERGE_LAG`] before `now`, so top users read one row for each
    /// of them.
    fn maintain(&mut self, now: OffsetDateTime) -> Result<usize, StoreError> {
        let to = minute_floor(now - MERGE_LAG);
        let from = to - MERGE_SPAN;
        self.attempt("merging user_minute_batch rows", |s| {
            s.merge_user_minutes(from, to)
        })
        .map_err(Failure::into_store_error)
    }
}

/// One query thread's side of the store. It holds no connection between calls: each call
/// checks one out, which is how a connection broken by a restart gets replaced.
struct PgReader {
    pool: Pool<Manager>,
    url: String,
}

impl PgReader {
    /// Runs `op` on a reader connection; any database error is `Unavailable`, logged with
    /// its SQLSTATE.
    fn run<T>(
        &mut self,
        what: &str,
        op: impl FnOnce(&mut Conn) -> Result<T, ReadError>,
    ) -> Result<T, StoreError> {
        let mut conn = checkout(&self.pool, &self.url)?;
        let result = set_role(&mut conn, Role::Reader)
            .map_err(ReadError::Db)
            .and_then(|()| op(&mut conn));
        result.map_err(|e| {
            let why = match e {
                ReadError::Db(e) => explain(what, &e),
                ReadError::BadRow(why) => format!("{what}: {why}"),
            };
            log::warn!("{why}");
            StoreError::Unavailable(why)
        })
    }

    fn messages(
        &mut self,
        what: &str,
        (first, last): (&'static str, &'static str),
        key: &(dyn ToSql + Sync),
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError> {
        let window = in_utc(window);
        if limit == 0 || window.start >= window.end {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (start, end) = (micros_ceil(window.start), micros_ceil(window.end));
        self.run(what, |conn| {
            let sql = match take {
                Take::First => first,
                Take::Last => last,
            };
            let statement = prepared(conn, sql)?;
            let rows = conn.query(&statement, &[key, &start, &end, &limit])?;
            let mut records = rows
                .iter()
                .map(record_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            if take == Take::Last {
                records.reverse();
            }
            Ok(records)
        })
    }
}

/// Why a read failed.
enum ReadError {
    Db(::postgres::Error),
    /// A row this version cannot turn into a value (an unknown message type, a NULL).
    BadRow(String),
}

impl From<::postgres::Error> for ReadError {
    fn from(e: ::postgres::Error) -> ReadError {
        ReadError::Db(e)
    }
}

/// The latest instant a timestamp can hold here (the end of year 9999): rounding up past it
/// clamps instead of overflowing.
const LATEST: OffsetDateTime = PrimitiveDateTime::MAX.assume_utc();

/// The earliest instant PostgreSQL's `timestamptz` can hold (4714 BC).
const EARLIEST: OffsetDateTime = time::macros::datetime!(-4713-11-24 0:00 UTC);

/// `t` in UTC, within what both sides can hold. The driver converts every timestamp to UTC
/// and panics when that leaves the years ±9999, which a client's timestamp or a query's edge
/// with an offset can do (`9999-12-31T23:59:59-05:00`); PostgreSQL refuses anything before
/// 4714 BC. Such an instant is clamped to the nearest end instead.
fn utc(t: OffsetDateTime) -> OffsetDateTime {
    match t.checked_to_offset(UtcOffset::UTC) {
        Some(t) => t.max(EARLIEST),
        None if t.offset().is_negative() => LATEST,
        None => EARLIEST,
    }
}

/// `w` with both edges in UTC, so every time derived from it can be sent to PostgreSQL.
fn in_utc(w: Window) -> Window {
    Window {
        start: utc(w.start),
        end: utc(w.end),
    }
}

fn later(t: OffsetDateTime, by: time::Duration) -> OffsetDateTime {
    t.checked_add(by).unwrap_or(LATEST)
}

/// `t` rounded up to a whole microsecond, PostgreSQL's resolution: the rows inside a window
/// with a finer edge are exactly the rows inside the window with the rounded-up edge.
fn micros_ceil(t: OffsetDateTime) -> OffsetDateTime {
    let rest = t.nanosecond() % 1_000;
    if rest == 0 {
        t
    } else {
        later(t, time::Duration::nanoseconds(i64::from(1_000 - rest)))
    }
}

fn record_from_row(row: &Row) -> Result<Record, ReadError> {
    let message_id: uuid::Uuid = row.try_get(0)?;
    let code: i16 = row.try_get(5)?;
    let message_type = type_of_code(code).ok_or_else(|| {
        ReadError::BadRow(format!(
            "message {message_id} has message_type {code}, which this version does not know"
        ))
    })?;
    Ok(Record {
        message_id,
        room_id: Arc::from(row.try_get::<_, &str>(1)?),
        user_id: row.try_get(2)?,
        username: row.try_get(3)?,
        message: row.try_get(4)?,
        message_type,
        client_ts: row.try_get(6)?,
        server_ts: row.try_get(7)?,
        node_id: Arc::from(row.try_get::<_, &str>(8)?),
    })
}

/// A dead-letter row; its columns may be NULL only if something else wrote it.
fn dead_letter_from_row(row: &Row) -> Result<DeadLetter, ReadError> {
    fn some<T>(v: Option<T>, column: &str, id: i64) -> Result<T, ReadError> {
        v.ok_or_else(|| ReadError::BadRow(format!("dead letter {id} has no {column}")))
    }
    let id: i64 = row.try_get(0)?;
    let code = some(row.try_get::<_, Option<i16>>(6)?, "message_type", id)?;
    let message_type = type_of_code(code).ok_or_else(|| {
        ReadError::BadRow(format!(
            "dead letter {id} has message_type {code}, which this version does not know"
        ))
    })?;
    let message: Vec<u8> = some(row.try_get(5)?, "message", id)?;
    Ok(DeadLetter {
        record: Record {
            message_id: some(row.try_get(1)?, "message_id", id)?,
            room_id: Arc::from(some(row.try_get::<_, Option<&str>>(2)?, "room_id", id)?),
            user_id: some(row.try_get(3)?, "user_id", id)?,
            username: some(row.try_get(4)?, "username", id)?,
            // Stored from a String, so valid UTF-8 unless written by something else.
            message: String::from_utf8(message)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            message_type,
            client_ts: some(row.try_get(7)?, "client_ts", id)?,
            server_ts: some(row.try_get(8)?, "server_ts", id)?,
            node_id: Arc::from(some(row.try_get::<_, Option<&str>>(9)?, "node_id", id)?),
        },
        reason: row.try_get(10)?,
    })
}

impl StoreReader for PgReader {
    fn room_messages(
        &mut self,
        room: &str,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError> {
        self.messages(
            "reading a room's messages",
            (ROOM_FIRST, ROOM_LAST),
            &room,
            window,
            limit,
            take,
        )
    }

    fn user_messages(
        &mut self,
        user: i32,
        window: Window,
        limit: usize,
        take: Take,
    ) -> Result<Vec<Record>, StoreError> {
        self.messages(
            "reading a user's messages",
            (USER_FIRST, USER_LAST),
            &user,
            window,
            limit,
            take,
        )
    }

    fn user_rooms(&mut self, user: i32) -> Result<Vec<UserRoom>, StoreError> {
        self.run("reading a user's rooms", |conn| {
            let statement = prepared(conn, USER_ROOMS)?;
            let mut rooms = Vec::new();
            for row in conn.query(&statement, &[&user])? {
                rooms.push(UserRoom {
                    room_id: row.try_get(0)?,
                    first_activity: row.try_get(1)?,
                    last_activity: row.try_get(2)?,
                    message_count: row.try_get(3)?,
                });
            }
            Ok(rooms)
        })
    }

    fn active_users(&mut self, window: Window) -> Result<i64, StoreError> {
        let window = in_utc(window);
        if window.start >= window.end {
            return Ok(0);
        }
        let (start, end) = (micros_ceil(window.start), micros_ceil(window.end));
        // Whole minutes [whole_start, whole_end) come from the rollup; the rest from rows.
        let whole_start = minute_ceil(window.start);
        let whole_end = minute_floor(window.end);
        let (left_end, right_start) = if whole_start < whole_end {
            (whole_start, whole_end)
        } else {
            // No whole minute inside: the rows of the window, and empty rollup/right ranges.
            (end, end)
        };
        let (rollup_start, rollup_end) = if whole_start < whole_end {
            (whole_start, whole_end)
        } else {
            (whole_start, whole_start)
        };
        // Whole hours [hours_start, hours_end) inside the whole minutes; none: both at the
        // end, so the minutes before them are all the minutes.
        let (hours_start, hours_end) = {
            let (h0, h1) = (hour_ceil(rollup_start), hour_floor(rollup_end));
            if h0 < h1 {
                (h0, h1)
            } else {
                (rollup_end, rollup_end)
            }
        };
        self.run("counting active users", |conn| {
            let statement = prepared(conn, ACTIVE_USERS)?;
            let row = conn.query_one(
                &statement,
                &[
                    &start,
                    &end,
                    &rollup_start,
                    &rollup_end,
                    &left_end,
                    &right_start,
                    &hours_start,
                    &hours_end,
                ],
            )?;
            Ok(row.try_get(0)?)
        })
    }

    fn analytics(&mut self, window: Window, top_n: usize) -> Result<Analytics, StoreError> {
        let window = in_utc(window);
        if window.start >= window.end {
            return Ok(Analytics::default());
        }
        let from = minute_floor(window.start);
        let to = minute_ceil(window.end);
        let top = i64::try_from(top_n).unwrap_or(i64::MAX);
        self.run("reading analytics", |conn| {
            let counts = prepared(conn, TYPE_COUNTS)?;
            let users = prepared(conn, TOP_USERS)?;
            let rooms = prepared(conn, TOP_ROOMS)?;
            // One snapshot, so the total, the series and the top lists agree with each other.
            let mut tx = conn
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let mut out = Analytics::default();
            for row in tx.query(&counts, &[&from, &to])? {
                let grouping: i32 = row.try_get(0)?;
                let n: i64 = row.try_get(3)?;
                if grouping == 0 {
                    out.per_minute.push((row.try_get(1)?, n));
                } else {
                    let code: i16 = row.try_get(2)?;
                    let t = type_of_code(code).ok_or_else(|| {
                        ReadError::BadRow(format!(
                            "type_minute has message_type {code}, which this version does not know"
                        ))
                    })?;
                    if let Some(slot) = usize::try_from(type_code(t))
                        .ok()
                        .and_then(|i| out.by_type.get_mut(i))
                    {
                        *slot += n;
                    }
                    out.total += n;
                }
            }
            if top_n > 0 {
                for row in tx.query(&users, &[&from, &to, &top])? {
                    out.top_users.push((row.try_get(0)?, row.try_get(1)?));
                }
                for row in tx.query(&rooms, &[&from, &to, &top])? {
                    out.top_rooms.push((row.try_get(0)?, row.try_get(1)?));
                }
            }
            tx.commit()?;
            Ok(out)
        })
    }

    fn span(&mut self) -> Result<Option<(OffsetDateTime, OffsetDateTime)>, StoreError> {
        self.run("reading the data's time span", |conn| {
            let minutes = prepared(conn, SPAN_MINUTES)?;
            let row = conn.query_one(&minutes, &[])?;
            let (Some(first), Some(last)) = (
                row.try_get::<_, Option<OffsetDateTime>>(0)?,
                row.try_get::<_, Option<OffsetDateTime>>(1)?,
            ) else {
                return Ok(None);
            };
            let edges = prepared(conn, SPAN_EDGES)?;
            let minute = time::Duration::MINUTE;
            let row = conn.query_one(
                &edges,
                &[&first, &later(first, minute), &last, &later(last, minute)],
            )?;
            let oldest: Option<OffsetDateTime> = row.try_get(0)?;
            let newest: Option<OffsetDateTime> = row.try_get(1)?;
            if let (Some(oldest), Some(newest)) = (oldest, newest) {
                return Ok(Some((oldest, newest)));
            }
            log::warn!(
                "type_minute counts messages in {first}..{last} that are not in messages; \
                 scanning messages for the span"
            );
            let row = conn.query_one(SPAN_SCAN, &[])?;
            let oldest: Option<OffsetDateTime> = row.try_get(0)?;
            let newest: Option<OffsetDateTime> = row.try_get(1)?;
            Ok(oldest.zip(newest))
        })
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("reading dead letters", |conn| {
            let statement = prepared(conn, DEAD_LETTERS)?;
            conn.query(&statement, &[&limit])?
                .iter()
                .map(dead_letter_from_row)
                .collect()
        })
    }

    fn ping(&mut self) -> Result<(), StoreError> {
        self.run("pinging the database", |conn| {
            conn.simple_query("SELECT 1")?;
            Ok(())
        })
    }
}
