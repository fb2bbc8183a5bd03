//! What only the PostgreSQL store does: concurrent migrations, SQLSTATE classification, the
//! staging insert's deduplication, failing fast, and recovering from a lost connection.
//!
//! Each test has a database of its own (`util::pg::TestDb`). The behaviour every backend
//! shares is in `tests/store.rs`.

mod util;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use chatflow::protocol::MessageType;
use chatflow::store::postgres::PgStore;
use chatflow::store::{DeadLetter, Record, Store, StoreError, Take, Window};
use time::OffsetDateTime;
use util::pg::TestDb;
use uuid::Uuid;

/// 2024-01-01T00:00:00Z, a whole minute.
const BASE: i64 = 1_704_067_200;

fn at(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(BASE + secs).expect("valid time")
}

fn record(id: u128, room: &str, user: i32, text: &str, secs: i64) -> Record {
    Record {
        message_id: Uuid::from_u128(id),
        room_id: Arc::from(room),
        user_id: user,
        username: format!("user{user}"),
        message: text.to_string(),
        message_type: MessageType::Text,
        client_ts: at(secs),
        server_ts: at(secs),
        node_id: Arc::from("node-a"),
    }
}

fn open(db: &TestDb) -> PgStore {
    let store = PgStore::open(&db.url, 4).expect("store opens");
    store.migrate().expect("schema migrates");
    store
}

fn everything() -> Window {
    Window {
        start: at(-3600),
        end: at(3600),
    }
}

fn count(db: &TestDb, sql: &str) -> i64 {
    db.client()
        .query_one(sql, &[])
        .expect("count query runs")
        .get(0)
}

#[test]
fn migrating_twice_and_from_two_nodes_at_once_gives_one_schema() {
    let db = TestDb::new("migrate");
    let url = Arc::new(db.url.clone());
    let start = Arc::new(Barrier::new(2));
    let nodes: Vec<_> = (0..2)
        .map(|_| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || {
                let store = PgStore::open(&url, 2).expect("store opens");
                start.wait();
                store.migrate()
            })
        })
        .collect();
    for node in nodes {
        node.join().expect("thread").expect("concurrent migrate");
    }
    let store = open(&db);
    store.migrate().expect("migrating again is a no-op");

    assert_eq!(count(&db, "SELECT count(*) FROM schema_version"), 4);
    assert_eq!(
        count(&db, "SELECT max(version)::bigint FROM schema_version"),
        store.schema_version()
    );
    let mut w = store.writer().expect("writer");
    assert_eq!(w.write(&[record(1, "r", 1, "hi", 0)]), Ok(1));
}

#[test]
fn a_nul_character_is_refused_with_its_sqlstate_and_can_be_dead_lettered() {
    let db = TestDb::new("nul");
    let store = open(&db);
    let mut w = store.writer().expect("writer");
    let bad = record(1, "r", 7, "before\0after", 5);

    let err = w
        .write(&[record(2, "r", 7, "fine", 4), bad.clone()])
        .expect_err("PostgreSQL text cannot hold NUL");
    let StoreError::Refused(why) = &err else {
        panic!("expected Refused, got {err:?}");
    };
    assert!(
        why.contains("SQLSTATE 22"),
        "no data-exception class in {why:?}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM messages"),
        0,
        "batch is all or nothing"
    );

    // The writer's connection is usable after the refusal.
    assert_eq!(w.write(&[record(2, "r", 7, "fine", 4)]), Ok(1));

    w.dead_letter(&[DeadLetter {
        record: bad.clone(),
        reason: why.clone(),
    }])
    .expect("dead letter is stored");
    let mut r = store.reader().expect("reader");
    let letters = r.dead_letters(10).expect("dead letters read");
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].record, bad,
        "the message comes back byte for byte"
    );
    assert_eq!(&letters[0].reason, why);
}

#[test]
fn a_nul_in_a_text_column_of_a_dead_letter_is_replaced_not_lost() {
    let db = TestDb::new("nul_name");
    let store = open(&db);
    let mut w = store.writer().expect("writer");
    let mut bad = record(1, "r", 7, "text", 5);
    bad.username = "a\0b".into();
    w.dead_letter(&[DeadLetter {
        record: bad,
        reason: "refused".into(),
    }])
    .expect("dead letter is stored");
    let letters = store
        .reader()
        .expect("reader")
        .dead_letters(10)
        .expect("read");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].record.username, "a\u{FFFD}b");
}

#[test]
fn a_message_id_repeated_within_and_across_batches_is_stored_and_counted_once() {
    let db = TestDb::new("dedupe");
    let store = open(&db);
    let mut w = store.writer().expect("writer");

    let a = record(1, "r1", 7, "a", 10);
    let b = record(2, "r1", 7, "b", 20);
    let c = record(3, "r2", 8, "c", 70);
    assert_eq!(w.write(&[a.clone(), a.clone(), b.clone()]), Ok(2));
    assert_eq!(w.write(&[a.clone(), c.clone(), b.clone()]), Ok(1));
    assert_eq!(w.write(std::slice::from_ref(&c)), Ok(0));

    assert_eq!(count(&db, "SELECT count(*) FROM messages"), 3);
    for rollup in ["room_minute", USER_MINUTE, "type_minute", "user_rooms"] {
        assert_eq!(
            count(
                &db,
                &format!("SELECT sum(messages)::bigint FROM {rollup} r")
            ),
            3,
            "{rollup} counts each message once"
        );
    }
    let mut r = store.reader().expect("reader");
    let rooms = r.user_rooms(7).expect("user rooms");
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0].message_count, 2);
    assert_eq!(rooms[0].first_activity, at(10));
    assert_eq!(rooms[0].last_activity, at(20));
    let stats = r.analytics(everything(), 10).expect("analytics");
    assert_eq!(stats.total, 3);
    assert_eq!(stats.top_users, vec![(7, 2), (8, 1)]);
    let history = r
        .room_messages("r1", everything(), 10, Take::First)
        .expect("history");
    assert_eq!(history, vec![a, b]);
}

/// `user_minute_batch` summed per minute and user: what one row per user and minute would
/// hold, whichever batches wrote it.
const USER_MINUTE: &str = "(SELECT minute, u.user_id, sum(u.n)::bigint AS messages \
     FROM user_minute_batch, unnest(users, messages) AS u(user_id, n) GROUP BY 1, 2)";

/// Every rollup table of `db`, as text, in key order.
fn rollups(db: &TestDb) -> Vec<String> {
    let mut client = db.client();
    [
        "room_minute",
        USER_MINUTE,
        "type_minute",
        "user_rooms",
        "active_minute",
    ]
    .iter()
    .map(|table| {
        client
            .query_one(
                &format!("SELECT string_agg(t::text, ' ' ORDER BY t::text) FROM {table} t"),
                &[],
            )
            .expect("rollup query runs")
            .get(0)
    })
    .collect()
}

#[test]
fn fresh_batches_and_batches_with_stored_ids_give_the_same_rollups() {
    // New ids only: COPY straight into messages, counts summed by the writer. A repeated id:
    // through staging, counts summed by PostgreSQL. Minutes, first and last must agree,
    // sub-microsecond and non-UTC times included.
    let mut batch = Vec::new();
    for i in 0..60u8 {
        let mut r = record(
            u128::from(i) + 1,
            ["a", "b", "Z"][usize::from(i % 3)],
            i32::from(i % 4),
            "m",
            i64::from(i) * 7,
        );
        r.server_ts += time::Duration::nanoseconds(i64::from(i) * 16_666_667);
        r.message_type =
            [MessageType::Text, MessageType::Join, MessageType::Leave][usize::from(i % 3)];
        if i % 5 == 0 {
            r.server_ts = r
                .server_ts
                .to_offset(time::UtcOffset::from_hms(5, 30, 0).expect("offset"));
        }
        batch.push(r);
    }
    let direct = TestDb::new("direct");
    let mut w = open(&direct).writer().expect("writer");
    assert_eq!(w.write(&batch), Ok(60));

    let staged = TestDb::new("staged");
    let mut w = open(&staged).writer().expect("writer");
    let mut repeated = batch.clone();
    repeated.push(batch[0].clone());
    assert_eq!(w.write(&repeated), Ok(60));

    assert_eq!(rollups(&direct), rollups(&staged));
}

/// Distinct users in `[start, end)` seconds, by the store.
fn active(store: &PgStore, start: i64, end: i64) -> i64 {
    let mut r = store.reader().expect("reader");
    r.active_users(Window {
        start: at(start),
        end: at(end),
    })
    .expect("active users")
}

/// Users 1..=100000 are counted from the per-minute bitmaps; ids outside them (possible only
/// through a hand-written broker envelope) are counted too, once, and never make `get_bit`
/// fail. Windows: whole minutes only, partial edges only, both.
#[test]
fn active_users_are_exact_for_ids_inside_and_outside_the_bitmaps() {
    let db = TestDb::new("bitmap");
    let store = open(&db);
    let mut w = store.writer().expect("writer");
    // Minute 0: users 1, 100000, -5, 200000; minute 1: users 1, 7, 200000; minute 2: user 9
    // at second 150.
    let rows = [
        (1, 1, 10),
        (2, 100_000, 20),
        (3, -5, 30),
        (4, 200_000, 40),
        (5, 1, 70),
        (6, 7, 80),
        (7, 200_000, 90),
        (8, 9, 150),
    ];
    let batch: Vec<Record> = rows
        .iter()
        .map(|&(id, user, secs)| record(id, "r", user, "m", secs))
        .collect();
    assert_eq!(w.write(&batch), Ok(8));
    // Whole minutes 0 and 1.
    assert_eq!(active(&store, 0, 120), 5);
    // Partial: seconds 15..75 (users 100000, -5, 200000, 1).
    assert_eq!(active(&store, 15, 75), 4);
    // Whole minute 1 (1, 7, 200000), partial edges 35..60 (200000) and 120..151 (9).
    assert_eq!(active(&store, 35, 151), 4);
    // Nothing there.
    assert_eq!(active(&store, 200, 400), 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM active_minute"),
        3,
        "one bitmap per minute with users in range"
    );
}

/// Housekeeping merges each closed minute's per-batch rows of `user_minute_batch` into one,
/// with the same sums: only minutes of the last hour that ended 10 s or more before `now`,
/// the stray mark kept, and a second run finds nothing to do.
#[test]
fn housekeeping_merges_the_per_batch_rows_of_closed_minutes() {
    let db = TestDb::new("merge");
    let store = open(&db);
    let mut w = store.writer().expect("writer");
    // `now` is second 3630: minutes from second 0 up to (not including) 3600 are due.
    let now = at(3630);
    let batches: [&[(i32, i64)]; 7] = [
        &[(1, 600), (2, 610), (3, 670)], // minute 10 (users 1, 2) and minute 11 (user 3)
        &[(1, 620), (200_000, 630)],     // minute 10 again, with a user outside the bitmap
        &[(4, 640)],                     // minute 10 a third time
        &[(5, 3605)],                    // minute 60: not over 10 s ago
        &[(6, 3615)],
        &[(7, -7200)], // two hours before `now`: out of reach
        &[(8, -7190)],
    ];
    let mut id = 0u128;
    for rows in batches {
        let batch: Vec<Record> = rows
            .iter()
            .map(|&(user, secs)| {
                id += 1;
                record(id, "r", user, "m", secs)
            })
            .collect();
        assert_eq!(w.write(&batch), Ok(batch.len()));
    }
    let rows_of = |minute: i64| {
        count(
            &db,
            &format!(
                "SELECT count(*) FROM user_minute_batch WHERE minute = to_timestamp({})",
                minute_of(minute)
            ),
        )
    };
    assert_eq!(
        [rows_of(600), rows_of(660), rows_of(3600), rows_of(-7200)],
        [3, 1, 2, 2]
    );
    let before = rollups(&db);
    let top_before = top_users(&store);

    assert_eq!(w.maintain(now), Ok(1), "minute 10 is merged");
    assert_eq!(
        [rows_of(600), rows_of(660), rows_of(3600), rows_of(-7200)],
        [1, 1, 2, 2]
    );
    assert_eq!(rollups(&db), before, "the same counts");
    assert_eq!(top_users(&store), top_before);
    assert_eq!(top_before[0], (1, 2));
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM user_minute_batch WHERE strays AND 200000 = ANY(users)"
        ),
        1,
        "the merged row is still marked"
    );
    assert_eq!(
        active(&store, 600, 660),
        4,
        "users 1, 2, 4 and the stray one"
    );
    assert_eq!(w.maintain(now), Ok(0), "nothing left to merge");
}

/// A turn merges at most five minutes, oldest first; a minute that cannot be merged (a row
/// written by hand with arrays of different lengths) keeps its rows as they were while the
/// others are merged; a batch that lands after its minute was merged is folded in next turn.
#[test]
fn housekeeping_merges_five_minutes_a_turn_and_leaves_a_broken_minute_as_it_was() {
    let db = TestDb::new("merge_turns");
    let store = open(&db);
    let mut w = store.writer().expect("writer");
    let now = at(3630);
    let mut id = 0u128;
    let mut write = |w: &mut Box<dyn chatflow::store::StoreWriter>, user: i32, secs: i64| {
        id += 1;
        let batch = [record(id, "r", user, "m", secs)];
        assert_eq!(w.write(&batch), Ok(1));
    };
    // Minutes 0 to 7, two batch rows each.
    for minute in 0..8 {
        write(&mut w, 1, minute * 60 + 5);
        write(&mut w, 2, minute * 60 + 10);
    }
    // A third row in minute 0, written by hand, with one count for two users.
    db.client()
        .batch_execute(&format!(
            "INSERT INTO user_minute_batch (minute, users, messages, strays) \
             VALUES (to_timestamp({}), '{{9,10}}', '{{1}}', false)",
            minute_of(0)
        ))
        .expect("hand-written row");
    let rows_of = |minute: i64| {
        count(
            &db,
            &format!(
                "SELECT count(*) FROM user_minute_batch WHERE minute = to_timestamp({})",
                minute_of(minute * 60)
            ),
        )
    };
    let all_rows = || (0..8).map(rows_of).collect::<Vec<_>>();
    let before = rollups(&db);
    let top_before = top_users(&store);
    assert_eq!(top_before[..2], [(1, 8), (2, 8)]);

    assert_eq!(w.maintain(now), Ok(4), "minutes 0 to 4; minute 0 fails");
    assert_eq!(all_rows(), [3, 1, 1, 1, 1, 2, 2, 2]);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM user_minute_batch \
             WHERE users = '{9,10}' AND messages = '{1}'"
        ),
        1,
        "the hand-written row is untouched"
    );
    assert_eq!(w.maintain(now), Ok(3), "minutes 5 to 7");
    assert_eq!(all_rows(), [3, 1, 1, 1, 1, 1, 1, 1]);
    assert_eq!(w.maintain(now), Ok(0), "only the broken minute is left");
    assert_eq!(rollups(&db), before, "the same counts");
    assert_eq!(top_users(&store), top_before);

    // A late batch for minute 3, merged already: one more row, folded in by the next turn.
    write(&mut w, 1, 3 * 60 + 30);
    assert_eq!(rows_of(3), 2);
    assert_eq!(w.maintain(now), Ok(1));
    assert_eq!(rows_of(3), 1);
    assert_eq!(top_users(&store)[..2], [(1, 9), (2, 8)]);
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT messages[1] FROM user_minute_batch \
                 WHERE minute = to_timestamp({}) AND users = '{{1,2}}'",
                minute_of(180)
            )
        ),
        2,
        "user 1 twice in minute 3"
    );
}

/// Two writers merging while a third writes batches into the minutes being merged: every
/// count ends up in exactly one row, none lost, none counted twice.
#[test]
fn merging_while_batches_land_in_the_same_minutes_loses_and_doubles_nothing() {
    let db = TestDb::new("merge_race");
    let store = open(&db);
    let now = at(3630);
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let start = Arc::new(Barrier::new(3));
    let mut mergers = Vec::new();
    for _ in 0..2 {
        let mut w = store.writer().expect("writer");
        let (writing, start) = (writing.clone(), start.clone());
        mergers.push(std::thread::spawn(move || {
            start.wait();
            let mut merged = 0;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                merged += w.maintain(now).expect("merge");
            }
            merged
        }));
    }
    let mut w = store.writer().expect("writer");
    start.wait();
    for i in 0..300u128 {
        // Five rows into one of minutes 0 to 3, users 1 to 40.
        let batch: Vec<Record> = (0..5u128)
            .map(|k| {
                let user = i32::try_from((i * 7 + k * 3) % 40 + 1).expect("small");
                let secs = i64::try_from((i % 4) * 60 + k).expect("small");
                record(i * 5 + k + 1, "r", user, "m", secs)
            })
            .collect();
        assert_eq!(w.write(&batch), Ok(5));
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let merged: usize = mergers
        .into_iter()
        .map(|t| t.join().expect("merger thread"))
        .sum();
    assert!(merged > 0, "the mergers ran while batches landed");
    while w.maintain(now).expect("merge") > 0 {}
    assert_eq!(
        count(&db, "SELECT count(*) FROM user_minute_batch"),
        4,
        "one row per minute at the end"
    );
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM (SELECT date_trunc('minute', server_ts, 'UTC') AS minute, \
                 user_id, count(*) AS n FROM messages GROUP BY 1, 2) AS m \
                 FULL JOIN {USER_MINUTE} AS u USING (minute, user_id) \
                 WHERE m.n IS DISTINCT FROM u.messages"
            )
        ),
        0,
        "per (minute, user) counts equal the messages"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM messages"), 1500);
}

/// Unix seconds of the minute holding second `secs` (after `BASE`).
fn minute_of(secs: i64) -> i64 {
    (BASE + secs).div_euclid(60) * 60
}

fn top_users(store: &PgStore) -> Vec<(i32, i64)> {
    let mut r = store.reader().expect("reader");
    r.analytics(everything_wide(), 20)
        .expect("analytics")
        .top_users
}

/// Three hours around `BASE`, wider than [`everything`].
fn everything_wide() -> Window {
    Window {
        start: at(-3 * 3600),
        end: at(3 * 3600),
    }
}

/// Upgrading a version-1 database fills the minute and hour bitmaps from `user_minute`, so
/// active users over data written before the upgrade are still right, and version 4 turns
/// `user_minute` into one `user_minute_batch` row per minute with the same counts.
#[test]
fn migrating_from_version_1_fills_the_bitmaps_from_existing_data() {
    let db = TestDb::new("v1to2");
    let store = open(&db);
    let mut w = store.writer().expect("writer");
    // 180 minutes: more than one group of minutes the fill inserts at a time. One user
    // outside the bitmap, whose minute must be marked `strays`.
    let stray = record(3001, "r", 200_000, "m", 100);
    let batch: Vec<Record> = std::iter::once(stray)
        .chain((0..3000u128).map(|i| {
            record(
                i + 1,
                "r",
                (i * 37 % 1009) as i32 + 1,
                "m",
                (i as i64) * 36 / 10,
            )
        }))
        .collect();
    assert_eq!(w.write(&batch), Ok(3001));
    drop(w);
    let windows = [(0, 10_800), (60, 480), (30, 7230), (3600, 7200)];
    let before: Vec<i64> = windows.iter().map(|&(a, b)| active(&store, a, b)).collect();
    let rollups_before = rollups(&db);
    // Back to version 1: what an older ChatFlow left (one `user_minute` row per user and
    // minute, no bitmaps).
    db.client()
        .batch_execute(&format!(
            "CREATE TABLE user_minute (
                 minute   timestamptz NOT NULL,
                 user_id  int NOT NULL,
                 messages bigint NOT NULL,
                 PRIMARY KEY (minute, user_id)
             ) WITH (fillfactor = 80);
             INSERT INTO user_minute SELECT * FROM {USER_MINUTE} AS um;
             DROP TABLE user_minute_batch;
             DROP TABLE active_hour; DROP TABLE active_minute;
             DROP INDEX messages_ts_brin;
             CREATE INDEX messages_ts_brin ON messages USING brin (server_ts);
             DELETE FROM schema_version WHERE version >= 2;"
        ))
        .expect("downgrade");
    let store = open(&db);
    assert_eq!(
        count(&db, "SELECT max(version)::bigint FROM schema_version"),
        store.schema_version()
    );
    assert_eq!(count(&db, "SELECT count(*) FROM active_minute"), 180);
    assert_eq!(count(&db, "SELECT count(*) FROM active_hour"), 3);
    let after: Vec<i64> = windows.iter().map(|&(a, b)| active(&store, a, b)).collect();
    assert_eq!(after, before);
    assert_eq!(
        before[0], 1010,
        "every user of the data, the stray one included"
    );
    assert_eq!(
        rollups(&db),
        rollups_before,
        "the same counts after the upgrade"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM user_minute_batch"), 180);
    assert_eq!(
        count(&db, "SELECT count(*) FROM user_minute_batch WHERE strays"),
        1
    );
}

/// Windows over three hours, cut anywhere (whole hours, whole minutes around them, partial
/// minutes at the edges, or none of these), against a count of the rows themselves; half
/// the rows come in a second batch, through staging, with repeats of the first.
#[test]
fn active_users_over_hours_equal_a_count_of_the_rows() {
    let db = TestDb::new("hours");
    let store = open(&db);
    let mut w = store.writer().expect("writer");
    let mut seed = 0x2545_f491_u64;
    let mut next = move |n: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (seed >> 33) % n
    };
    let rows: Vec<(i32, i64)> = (0..3000)
        .map(|_| (next(400) as i32 + 1, next(3 * 3600) as i64 - 600))
        .collect();
    let batch = |range: std::ops::Range<usize>| -> Vec<Record> {
        range
            .map(|i| record(i as u128 + 1, "r", rows[i].0, "m", rows[i].1))
            .collect()
    };
    assert_eq!(w.write(&batch(0..1500)), Ok(1500));
    // Repeats the last 100 of the first batch: the staging path.
    assert_eq!(w.write(&batch(1400..3000)), Ok(1500));
    let expected = |start: i64, end: i64| {
        let mut users: Vec<i32> = rows
            .iter()
            .filter(|(_, t)| *t >= start && *t < end)
            .map(|(u, _)| *u)
            .collect();
        users.sort_unstable();
        users.dedup();
        users.len() as i64
    };
    let windows = [
        (-600, 3 * 3600),
        (0, 3600),
        (0, 7200),
        (1, 7199),
        (59, 3661),
        (3599, 7201),
        (1800, 9000),
        (3600, 3660),
        (3630, 3650),
        (-1000, -500),
    ];
    for (start, end) in windows {
        assert_eq!(
            active(&store, start, end),
            expected(start, end),
            "window {start}..{end}"
        );
    }
    for _ in 0..30 {
        let start = next(4 * 3600) as i64 - 1200;
        let end = start + next(3 * 3600) as i64 + 1;
        assert_eq!(
            active(&store, start, end),
            expected(start, end),
            "window {start}..{end}"
        );
    }
}

#[test]
fn open_fails_fast_when_nothing_listens() {
    let started = Instant::now();
    let result = PgStore::open("postgres://chat:s3cret@127.0.0.1:1/chatflow", 4);
    let elapsed = started.elapsed();
    let Err(StoreError::Unavailable(why)) = result else {
        panic!("expected Unavailable");
    };
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(why.contains("127.0.0.1:1"), "URL not named in {why:?}");
    assert!(!why.contains("s3cret"), "password leaked in {why:?}");
}

/// Ends every session on the test database except the caller's.
fn terminate_sessions(db: &TestDb) -> i64 {
    count(
        db,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            db.name
        ),
    )
}

#[test]
fn a_reader_recovers_after_its_connection_is_terminated() {
    let db = TestDb::new("reader_restart");
    let store = open(&db);
    store
        .writer()
        .expect("writer")
        .write(&[record(1, "r", 1, "hi", 0)])
        .expect("write");
    let mut r = store.reader().expect("reader");
    r.ping().expect("ping");
    assert!(
        terminate_sessions(&db) > 0,
        "the pool's connections were open"
    );

    // One failure is allowed (the connection was lost); the next call must work.
    if r.ping().is_err() {
        r.ping().expect("second ping after a lost connection");
    }
    let history = r
        .room_messages("r", everything(), 10, Take::Last)
        .expect("history after reconnecting");
    assert_eq!(history.len(), 1);
}

#[test]
fn a_writer_recovers_after_its_connection_is_terminated() {
    let db = TestDb::new("writer_restart");
    let store = open(&db);
    let mut w = store.writer().expect("writer");
    assert_eq!(w.write(&[record(1, "r", 1, "one", 0)]), Ok(1));
    assert!(
        terminate_sessions(&db) > 0,
        "the writer's connection was open"
    );

    let second = [record(2, "r", 1, "two", 1)];
    match w.write(&second) {
        Ok(n) => assert_eq!(n, 1),
        Err(StoreError::Unavailable(_)) => assert_eq!(w.write(&second), Ok(1)),
        Err(e) => panic!("a lost connection is not a refusal: {e:?}"),
    }
    assert_eq!(count(&db, "SELECT count(*) FROM messages"), 2);
}

#[test]
fn an_unknown_message_type_in_the_database_is_an_error_not_a_panic() {
    let db = TestDb::new("bad_type");
    let store = open(&db);
    store
        .writer()
        .expect("writer")
        .write(&[record(1, "r", 1, "hi", 0)])
        .expect("write");
    db.client()
        .batch_execute("UPDATE messages SET message_type = 9")
        .expect("corrupt the row");
    let mut r = store.reader().expect("reader");
    let err = r
        .room_messages("r", everything(), 10, Take::First)
        .expect_err("type 9 is unknown");
    assert!(
        matches!(&err, StoreError::Unavailable(why) if why.contains("message_type 9")),
        "{err:?}"
    );
    r.ping().expect("the reader still works");
}

#[test]
fn times_whose_offset_takes_them_past_year_9999_do_not_panic() {
    let db = TestDb::new("offsets");
    let store = open(&db);
    let west = time::UtcOffset::from_hms(-5, 0, 0).expect("offset");
    let east = time::UtcOffset::from_hms(5, 0, 0).expect("offset");
    let past_the_end = time::macros::datetime!(9999-12-31 23:59:59).assume_offset(west);
    let before_the_start = time::macros::datetime!(-9999-01-01 00:00:00).assume_offset(east);

    let mut r = record(1, "r", 1, "from the future", 0);
    r.client_ts = past_the_end;
    let mut w = store.writer().expect("writer");
    assert_eq!(w.write(&[r]), Ok(1));

    let mut reader = store.reader().expect("reader");
    let wide = Window {
        start: before_the_start,
        end: past_the_end,
    };
    let got = reader
        .room_messages("r", wide, 10, Take::Last)
        .expect("history");
    assert_eq!(got.len(), 1);
    assert_eq!(reader.active_users(wide), Ok(1));
    assert_eq!(reader.analytics(wide, 5).expect("analytics").total, 1);
}

#[test]
fn room_ties_are_in_byte_order_whatever_the_database_collation() {
    let db = TestDb::new("collation");
    let store = open(&db);
    // A linguistic collation puts "a" before "Z"; byte order (every backend's) puts "Z" first.
    db.client()
        .batch_execute(
            r#"ALTER TABLE user_rooms ALTER COLUMN room_id TYPE text COLLATE "und-x-icu";
               ALTER TABLE room_minute ALTER COLUMN room_id TYPE text COLLATE "und-x-icu";"#,
        )
        .expect("ICU collation (PostgreSQL built with ICU)");
    let mut w = store.writer().expect("writer");
    assert_eq!(
        w.write(&[record(1, "a", 1, "x", 5), record(2, "Z", 1, "y", 5)]),
        Ok(2)
    );
    let mut r = store.reader().expect("reader");
    let rooms: Vec<String> = r
        .user_rooms(1)
        .expect("user rooms")
        .into_iter()
        .map(|room| room.room_id)
        .collect();
    assert_eq!(rooms, ["Z", "a"]);
    let top = r.analytics(everything(), 5).expect("analytics").top_rooms;
    assert_eq!(top, [("Z".to_string(), 1), ("a".to_string(), 1)]);
}
