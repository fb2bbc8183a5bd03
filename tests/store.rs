//! The store contract: memory, SQLite and PostgreSQL give the same answers to the same writes.
//!
//! Each check is written once against the `Store` traits and run on every backend by
//! `contract!`, as `memory::<check>`, `sqlite::<check>` and `postgres::<check>`. A test gets
//! its own SQLite file or its own PostgreSQL database, so they run in parallel; PostgreSQL
//! tests fail (never skip) when the server is missing. Every record has a fixed timestamp
//! (`BASE`, a whole minute, plus microseconds), so every expected answer is exact.

mod util;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chatflow::protocol::MessageType;
use chatflow::store::{
    self, Analytics, DeadLetter, Record, Store, StoreError, StoreOptions, StoreReader, Take,
    UserRoom, Window, minute_ceil, minute_floor,
};
use time::macros::datetime;
use time::{Duration, OffsetDateTime, UtcOffset};
use util::stores::{Backend, on_every_store};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Backends

impl Backend {
    /// A store on this backend, migrated (`open` migrates). Memory gives a new, empty store
    /// each time; SQLite and PostgreSQL reopen the same data.
    fn open(&self) -> Arc<dyn Store> {
        match store::open(&self.spec, &StoreOptions::default()) {
            Ok(s) => s,
            Err(e) => panic!("cannot open {}: {e}", self.spec),
        }
    }

    /// Whether a second `open` sees what the first stored.
    fn persistent(&self) -> bool {
        self.kind != "memory"
    }
}

on_every_store!(
    empty_store_answers_empty,
    room_window_edges,
    user_window_edges,
    room_order_and_ties,
    user_order_and_ties,
    room_limit_first_and_last,
    user_limit_first_and_last,
    every_field_round_trips,
    writes_are_idempotent,
    sub_microsecond_times_are_floored,
    widest_window_sees_everything,
    user_rooms_most_recent_first,
    active_users_exact_at_edges,
    active_users_match_raw_rows,
    analytics_rounding_ties_and_top_n,
    analytics_match_raw_rows,
    span_covers_stored_messages,
    dead_letters_round_trip,
    ping_and_kind,
    migrate_twice_is_harmless,
    reader_sees_committed_writes,
    concurrent_writers_store_each_message_once,
);

#[test]
fn open_of_an_unknown_spec_is_a_clear_error() {
    for spec in [
        "mysql://localhost/chat",
        "sqlite",
        "Memory",
        "",
        "file:/tmp/x.db",
    ] {
        match store::open(spec, &StoreOptions::default()) {
            Ok(s) => panic!("{spec:?} opened a {} store", s.kind()),
            Err(StoreError::Unavailable(m)) => {
                assert!(m.contains(&format!("{spec:?}")), "{m:?} names {spec:?}");
                for form in ["sqlite:", "postgres://", "memory"] {
                    assert!(m.contains(form), "{m:?} lists the accepted form {form}");
                }
            }
            Err(e) => panic!("{spec:?}: expected Unavailable, got {e:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Records and time

/// A whole minute; every timestamp is `BASE` plus microseconds.
const BASE: OffsetDateTime = datetime!(2026-11-21 22:40:00 UTC);
const SEC: i64 = 1_000_000;
const MIN: i64 = 60 * SEC;

/// `BASE` plus `micros` microseconds.
fn at(micros: i64) -> OffsetDateTime {
    BASE + Duration::microseconds(micros)
}

/// Microseconds since `BASE`.
fn micros_of(t: OffsetDateTime) -> i64 {
    i64::try_from((t - BASE).whole_microseconds()).expect("fits")
}

fn window(start: i64, end: i64) -> Window {
    Window {
        start: at(start),
        end: at(end),
    }
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

/// A TEXT message with id `n`; the client's clock is 7 ms behind the server's.
fn rec(n: u128, room: &str, user: i32, server_ts: OffsetDateTime) -> Record {
    Record {
        message_id: id(n),
        room_id: room.into(),
        user_id: user,
        username: format!("user{user}"),
        message: format!("message {n:x}"),
        message_type: MessageType::Text,
        client_ts: server_ts - Duration::milliseconds(7),
        server_ts,
        node_id: "node-a".into(),
    }
}

/// `r` as a JOIN.
fn join(mut r: Record) -> Record {
    r.message_type = MessageType::Join;
    r
}

fn ids(records: &[Record]) -> Vec<Uuid> {
    records.iter().map(|r| r.message_id).collect()
}

fn uuids(ns: &[u128]) -> Vec<Uuid> {
    ns.iter().map(|&n| id(n)).collect()
}

/// Writes `batch` with a writer of its own; returns how many rows were new.
fn write(store: &dyn Store, batch: &[Record]) -> usize {
    let mut w = store
        .writer()
        .unwrap_or_else(|e| panic!("{} writer: {e}", store.kind()));
    w.write(batch)
        .unwrap_or_else(|e| panic!("{} write of {} rows: {e}", store.kind(), batch.len()))
}

fn reader(store: &dyn Store) -> Box<dyn StoreReader> {
    store
        .reader()
        .unwrap_or_else(|e| panic!("{} reader: {e}", store.kind()))
}

/// Panics with the call and the error.
fn ok<T>(what: &str, r: Result<T, StoreError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A deterministic generator (SplitMix64), so the "random" data is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn below_i64(&mut self, n: i64) -> i64 {
        i64::try_from(self.below(u64::try_from(n).expect("positive"))).expect("fits")
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = usize::try_from(self.below(i as u64 + 1)).expect("fits");
            v.swap(i, j);
        }
    }
}

/// `n` messages over the ten minutes from `BASE`: 20 rooms ("1".."20"), users skewed to a
/// busy few among 3000, 80% TEXT and 10% each JOIN and LEAVE, some exactly on a minute and
/// some a microsecond before one. Ids are random, so time order and id order differ.
fn random_records(seed: u64, n: usize) -> Vec<Record> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let n128 = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            let micros = match i % 50 {
                0 => MIN * rng.below_i64(10),
                1 => MIN * (1 + rng.below_i64(10)) - 1,
                _ => rng.below_i64(10 * MIN),
            };
            let user = if rng.below(2) == 0 {
                1 + rng.below(25)
            } else {
                1 + rng.below(3000)
            };
            let room = (1 + rng.below(20)).to_string();
            let mut r = rec(n128, &room, i32::try_from(user).expect("fits"), at(micros));
            r.message_type = match rng.below(10) {
                0 => MessageType::Join,
                1 => MessageType::Leave,
                _ => MessageType::Text,
            };
            r
        })
        .collect()
}

/// Writes `records` shuffled, in batches of several sizes, then writes some of them again
/// (twice within one batch, too): the repeats must add nothing.
fn write_in_batches(store: &dyn Store, records: &[Record], seed: u64) {
    let mut rng = Rng(seed);
    let mut shuffled = records.to_vec();
    rng.shuffle(&mut shuffled);
    let mut rest = &shuffled[..];
    let mut written = 0;
    for size in [1, 13, 250, 999] {
        let (batch, tail) = rest.split_at(size.min(rest.len()));
        written += write(store, batch);
        rest = tail;
    }
    written += write(store, rest);
    assert_eq!(written, records.len(), "every distinct message is new once");

    let mut again: Vec<Record> = shuffled.iter().step_by(37).cloned().collect();
    again.extend(shuffled.iter().step_by(41).cloned());
    assert_eq!(
        write(store, &again),
        0,
        "messages written before are not new"
    );
}

/// What `analytics` must answer for `records` (distinct ids): the whole minutes `window`
/// touches, top lists by count, ties by id ascending.
fn expected_analytics(records: &[Record], w: Window, top_n: usize) -> Analytics {
    let (from, to) = (minute_floor(w.start), minute_ceil(w.end));
    let mut per_minute = BTreeMap::<i64, i64>::new();
    let mut users = HashMap::<i32, i64>::new();
    let mut rooms = HashMap::<String, i64>::new();
    let mut by_type = [0i64; 3];
    let mut total = 0;
    for r in records
        .iter()
        .filter(|r| from <= r.server_ts && r.server_ts < to)
    {
        total += 1;
        *per_minute
            .entry(minute_floor(r.server_ts).unix_timestamp())
            .or_default() += 1;
        *users.entry(r.user_id).or_default() += 1;
        *rooms.entry(r.room_id.to_string()).or_default() += 1;
        by_type[usize::try_from(store::type_code(r.message_type)).expect("code")] += 1;
    }
    Analytics {
        total,
        per_minute: per_minute
            .into_iter()
            .map(|(s, c)| (OffsetDateTime::from_unix_timestamp(s).expect("minute"), c))
            .collect(),
        top_users: top(users, top_n),
        top_rooms: top(rooms, top_n),
        by_type,
    }
}

fn top<K: Ord>(counts: HashMap<K, i64>, n: usize) -> Vec<(K, i64)> {
    let mut v: Vec<(K, i64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

fn assert_analytics(got: &Analytics, want: &Analytics, what: &str) {
    assert_eq!(got.total, want.total, "total, {what}");
    assert_eq!(got.by_type, want.by_type, "by_type, {what}");
    assert_eq!(got.per_minute, want.per_minute, "per_minute, {what}");
    assert_eq!(got.top_users, want.top_users, "top_users, {what}");
    assert_eq!(got.top_rooms, want.top_rooms, "top_rooms, {what}");
}

/// Distinct users of `records` with a message in `w`.
fn expected_active(records: &[Record], w: Window) -> i64 {
    let users: BTreeSet<i32> = records
        .iter()
        .filter(|r| w.contains(r.server_ts))
        .map(|r| r.user_id)
        .collect();
    i64::try_from(users.len()).expect("fits")
}

// ---------------------------------------------------------------------------------------------
// Room and user lists, one check for both

/// Which list a check reads: room 7's messages, or user 42's in all rooms.
#[derive(Clone, Copy, Debug)]
enum List {
    Room,
    User,
}

impl List {
    /// A message that belongs on the list.
    fn ours(self, n: u128, ts: OffsetDateTime) -> Record {
        match self {
            List::Room => rec(n, "7", 100 + (n % 3) as i32, ts),
            List::User => rec(n, ["1", "2", "70"][(n % 3) as usize], 42, ts),
        }
    }

    /// A message that must not be on it: another room ("70" starts with "7") from one of
    /// our room's users, or another user (420 starts with 42) in one of our user's rooms.
    fn theirs(self, n: u128, ts: OffsetDateTime) -> Record {
        match self {
            List::Room => rec(n, ["8", "70"][(n % 2) as usize], 100, ts),
            List::User => rec(n, "1", [43, 420][(n % 2) as usize], ts),
        }
    }

    fn read(self, r: &mut dyn StoreReader, w: Window, limit: usize, take: Take) -> Vec<Record> {
        match self {
            List::Room => ok("room_messages", r.room_messages("7", w, limit, take)),
            List::User => ok("user_messages", r.user_messages(42, w, limit, take)),
        }
    }

    /// The same list for a room or user with no messages.
    fn read_unknown(self, r: &mut dyn StoreReader, w: Window) -> Vec<Record> {
        match self {
            List::Room => ok("room_messages", r.room_messages("6", w, 1000, Take::First)),
            List::User => ok("user_messages", r.user_messages(41, w, 1000, Take::First)),
        }
    }
}

fn room_window_edges(b: &Backend) {
    window_edges(b, List::Room);
}

fn user_window_edges(b: &Backend) {
    window_edges(b, List::User);
}

/// `start` is in, `end` is out, to the microsecond.
fn window_edges(b: &Backend, list: List) {
    let store = b.open();
    let store = &*store;
    let start = 10 * SEC + 123_456;
    let end = 70 * SEC + 654_321;
    let records = vec![
        list.ours(1, at(start - 1)),
        list.ours(2, at(start)),
        list.ours(3, at(start + 1)),
        list.ours(4, at(end - 1)),
        list.ours(5, at(end)),
        list.ours(6, at(end + MIN)),
        list.theirs(7, at(start)),
        list.theirs(8, at(start + 1)),
        list.theirs(9, at(end - 1)),
        list.theirs(10, at(end - 2)),
    ];
    assert_eq!(write(store, &records), records.len());
    let mut r = reader(store);
    let r = &mut *r;

    let w = window(start, end);
    for take in [Take::First, Take::Last] {
        let got = list.read(r, w, 1000, take);
        assert_eq!(
            ids(&got),
            uuids(&[2, 3, 4]),
            "{list:?} {take:?}: at start in, at end out, others excluded"
        );
        assert_eq!(
            got,
            records[1..4].to_vec(),
            "{list:?}: the records come back whole, to the microsecond"
        );
    }
    let one = |r: &mut dyn StoreReader, s, e| ids(&list.read(r, window(s, e), 1000, Take::First));
    assert_eq!(
        one(r, start, start + 1),
        uuids(&[2]),
        "a 1 µs window at start"
    );
    assert_eq!(
        one(r, end - 1, end),
        uuids(&[4]),
        "a 1 µs window before end"
    );
    assert_eq!(one(r, start - 1, start), uuids(&[1]), "the µs before start");
    assert_eq!(one(r, end, end + 1), uuids(&[5]), "the µs at end");
    assert_eq!(
        one(r, start - 10 * MIN, start - 1),
        uuids(&[]),
        "a window ending at a message excludes it"
    );
    let ns = |r: &mut dyn StoreReader, s: i64, s_ns: i64, e: i64, e_ns: i64| {
        let w = Window {
            start: at(s) + Duration::nanoseconds(s_ns),
            end: at(e) + Duration::nanoseconds(e_ns),
        };
        ids(&list.read(r, w, 1000, Take::First))
    };
    assert_eq!(
        ns(r, start, 1, end, 0),
        uuids(&[3, 4]),
        "a start 1 ns after a message excludes it"
    );
    assert_eq!(
        ns(r, start, -1, end, 0),
        uuids(&[2, 3, 4]),
        "a start 1 ns before a message includes it, not the one 1 µs before"
    );
    assert_eq!(
        ns(r, start, 0, end - 1, 1),
        uuids(&[2, 3, 4]),
        "an end 1 ns after a message includes it"
    );
    assert_eq!(
        ns(r, start, 0, end - 1, -1),
        uuids(&[2, 3]),
        "an end 1 ns before a message excludes it"
    );
    assert_eq!(
        ns(r, start, 1, start, 999),
        uuids(&[]),
        "a window inside one microsecond, after a message"
    );
    assert_eq!(one(r, start, start), uuids(&[]), "an empty window");
    assert_eq!(one(r, end, start), uuids(&[]), "an inverted window");
    assert_eq!(
        one(r, 60 * MIN, 120 * MIN),
        uuids(&[]),
        "a window after every message"
    );
    assert_eq!(
        one(r, -MIN, 10 * MIN),
        uuids(&[1, 2, 3, 4, 5, 6]),
        "a window around everything"
    );
    assert_eq!(
        list.read_unknown(r, window(-MIN, 10 * MIN)),
        vec![],
        "{list:?} with no messages"
    );
}

fn room_order_and_ties(b: &Backend) {
    order_and_ties(b, List::Room);
}

fn user_order_and_ties(b: &Backend) {
    order_and_ties(b, List::User);
}

/// Oldest first; equal `server_ts` ordered by `message_id` as a UUID (byte order), whatever
/// order the messages were written in.
fn order_and_ties(b: &Backend, list: List) {
    let store = b.open();
    let store = &*store;
    // Byte order of these ids: LOW_BYTE < NEXT_BYTE < MID < HIGH. Read little-endian,
    // NEXT_BYTE would come first; read as a signed number, HIGH would.
    const LOW_BYTE: u128 = 0xff;
    const NEXT_BYTE: u128 = 0x100;
    const MID: u128 = 1 << 64;
    const HIGH: u128 = (1 << 127) | 3;
    let t0 = at(SEC);
    let t1 = at(5 * SEC + 1);
    let t2 = at(5 * SEC + 2);
    let t3 = at(61 * SEC);
    let records = vec![
        list.ours(HIGH, t1),
        list.ours(MID, t1),
        list.ours(NEXT_BYTE, t1),
        list.ours(LOW_BYTE, t1),
        list.ours(5, t2),
        list.ours(1 << 100, t3),
        list.ours(2, t3),
        list.ours((1 << 127) | 6, t0),
        list.theirs(1, t1),
        list.theirs(4, t2),
    ];
    let mut reversed = records.clone();
    reversed.reverse();
    assert_eq!(write(store, &reversed[..4]), 4);
    assert_eq!(write(store, &reversed[4..]), records.len() - 4);

    let want = uuids(&[
        (1 << 127) | 6,
        LOW_BYTE,
        NEXT_BYTE,
        MID,
        HIGH,
        5,
        2,
        1 << 100,
    ]);
    let mut r = reader(store);
    for take in [Take::First, Take::Last] {
        let got = list.read(&mut *r, window(0, 10 * MIN), 1000, take);
        assert_eq!(ids(&got), want, "{list:?} {take:?}: by server_ts, then id");
    }
    let got = list.read(&mut *r, window(5 * SEC + 1, 5 * SEC + 2), 1000, Take::First);
    assert_eq!(
        ids(&got),
        uuids(&[LOW_BYTE, NEXT_BYTE, MID, HIGH]),
        "{list:?}: one timestamp, ordered by id"
    );
}

fn room_limit_first_and_last(b: &Backend) {
    limit_first_and_last(b, List::Room);
}

fn user_limit_first_and_last(b: &Backend) {
    limit_first_and_last(b, List::User);
}

/// `limit` keeps the oldest (`First`) or newest (`Last`) messages, both listed oldest first,
/// and cuts through a tie on `server_ts` by id.
fn limit_first_and_last(b: &Backend, list: List) {
    let store = b.open();
    let store = &*store;
    // In list order: (seconds, id); 35/40 and 65/70 share a timestamp.
    let order: [(i64, u128); 10] = [
        (1, 10),
        (2, 20),
        (3, 30),
        (4, 35),
        (4, 40),
        (5, 50),
        (6, 60),
        (7, 65),
        (7, 70),
        (8, 80),
    ];
    let mut records: Vec<Record> = order
        .iter()
        .map(|&(s, n)| list.ours(n, at(s * SEC + 250)))
        .collect();
    for (s, n) in [(0, 11), (4, 41), (7, 66), (9, 81)] {
        records.push(list.theirs(n, at(s * SEC + 250)));
    }
    let mut rng = Rng(7);
    rng.shuffle(&mut records);
    assert_eq!(write(store, &records[..7]), 7);
    assert_eq!(write(store, &records[7..]), records.len() - 7);

    let all: Vec<u128> = order.iter().map(|&(_, n)| n).collect();
    let mut r = reader(store);
    let r = &mut *r;
    let w = window(0, MIN);
    let mut read = |limit, take| ids(&list.read(r, w, limit, take));
    assert_eq!(
        read(4, Take::First),
        uuids(&all[..4]),
        "oldest 4: 35 before 40"
    );
    assert_eq!(read(5, Take::First), uuids(&all[..5]), "oldest 5");
    assert_eq!(read(1, Take::First), uuids(&all[..1]), "oldest 1");
    assert_eq!(read(1, Take::Last), uuids(&all[9..]), "newest 1");
    assert_eq!(
        read(2, Take::Last),
        uuids(&all[8..]),
        "newest 2: 70 after 65"
    );
    assert_eq!(
        read(3, Take::Last),
        uuids(&all[7..]),
        "newest 3, oldest first"
    );
    assert_eq!(read(6, Take::Last), uuids(&all[4..]), "newest 6: 40 not 35");
    for take in [Take::First, Take::Last] {
        assert_eq!(read(10, take), uuids(&all), "limit = count, {take:?}");
        assert_eq!(read(11, take), uuids(&all), "limit > count, {take:?}");
        assert_eq!(
            read(10_000, take),
            uuids(&all),
            "the largest limit, {take:?}"
        );
        assert_eq!(read(usize::MAX, take), uuids(&all), "no limit, {take:?}");
        assert_eq!(read(0, take), uuids(&[]), "limit 0, {take:?}");
    }
    // Inside a narrower window [2 s, 7 s): 20 30 35 40 50 60.
    let w = window(2 * SEC, 7 * SEC);
    let inner = &all[1..7];
    let got = ids(&list.read(r, w, 2, Take::First));
    assert_eq!(got, uuids(&inner[..2]), "oldest 2 of the window");
    let got = ids(&list.read(r, w, 2, Take::Last));
    assert_eq!(got, uuids(&inner[4..]), "newest 2 of the window");
    let got = ids(&list.read(r, w, 3, Take::Last));
    assert_eq!(got, uuids(&inner[3..]), "newest 3 of the window");
}

// ---------------------------------------------------------------------------------------------
// Checks

fn empty_store_answers_empty(b: &Backend) {
    let store = b.open();
    let mut r = reader(&*store);
    let w = window(-60 * MIN, 60 * MIN);
    for take in [Take::First, Take::Last] {
        assert_eq!(ok("room", r.room_messages("7", w, 100, take)), vec![]);
        assert_eq!(ok("user", r.user_messages(7, w, 100, take)), vec![]);
    }
    assert_eq!(ok("user_rooms", r.user_rooms(7)), vec![]);
    assert_eq!(ok("active_users", r.active_users(w)), 0);
    assert_eq!(ok("analytics", r.analytics(w, 10)), Analytics::default());
    assert_eq!(ok("span", r.span()), None);
    assert_eq!(ok("dead_letters", r.dead_letters(10)), vec![]);
}

/// A message with every field unusual: 500 characters of 1- to 4-byte UTF-8, JOIN and LEAVE,
/// a client clock in another zone and far off, the longest room id, the id range's ends.
fn every_field_round_trips(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let long: String = "aé中😀".chars().cycle().take(500).collect();
    assert_eq!(long.chars().count(), 500);
    assert_eq!(long.len(), 1250);
    let room64 = "R-_9".repeat(16);
    let offset = |h, m| UtcOffset::from_hms(h, m, 0).expect("offset");

    let mut a = rec(
        0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        &room64,
        100_000,
        at(3 * SEC + 123_457),
    );
    a.username = "Zoë 用户 🚀".into();
    a.message = long;
    a.client_ts = at(3 * SEC + 120_001).to_offset(offset(5, 30));
    a.node_id = "node-ü-7".into();

    let mut j = rec(u128::MAX, "r1", 1, at(4 * SEC + 999_999));
    j.message_type = MessageType::Join;
    j.message = "joined".into();
    j.client_ts = at(4 * SEC + 1).to_offset(offset(-8, 0));

    let mut l = rec(1, "r1", 2, at(5 * SEC + 1));
    l.message_type = MessageType::Leave;
    l.message = "x".into();
    // The client's clock is a year and three hours behind, in UTC+14.
    l.client_ts =
        (at(5 * SEC + 1) - Duration::days(365) - Duration::hours(3)).to_offset(offset(14, 0));

    let mut q = rec(2, "r1", 3, at(6 * SEC));
    q.message = "line 1\nline 2\t\"quoted\" \\ 'single' %_ \u{7f}?".into();
    q.client_ts = datetime!(1999-12-31 23:59:59.999999 -03:30);

    // Any RFC 3339 time is a valid client timestamp: the ends of the four-digit years.
    let mut first = rec(3, "r2", 4, at(7 * SEC));
    first.client_ts = datetime!(0001-01-01 00:00:00 UTC);
    let mut last = rec(4, "r2", 5, at(8 * SEC));
    last.client_ts = datetime!(9999-12-31 23:59:59.999999 +14:00);

    let records = vec![
        a.clone(),
        j.clone(),
        l.clone(),
        q.clone(),
        first.clone(),
        last.clone(),
    ];
    assert_eq!(write(store, &records), 6);

    let mut r = reader(store);
    let w = window(0, MIN);
    let got = ok("room", r.room_messages(&room64, w, 10, Take::First));
    assert_eq!(got, vec![a.clone()], "the 500-character message");
    let got = &got[0];
    assert_eq!(got.message.chars().count(), 500);
    assert_eq!(
        got.client_ts.unix_timestamp_nanos(),
        a.client_ts.unix_timestamp_nanos(),
        "client_ts in UTC+5:30 is the same instant"
    );
    assert_eq!(
        got.server_ts.unix_timestamp_nanos(),
        a.server_ts.unix_timestamp_nanos()
    );
    let got = ok("room", r.room_messages("r1", w, 10, Take::Last));
    assert_eq!(
        got,
        vec![j.clone(), l.clone(), q.clone()],
        "JOIN, LEAVE, odd text"
    );
    for (want, got) in [&j, &l, &q].into_iter().zip(&got) {
        assert_eq!(got.message_type, want.message_type);
        assert_eq!(
            got.client_ts.unix_timestamp_nanos(),
            want.client_ts.unix_timestamp_nanos(),
            "client_ts of {}",
            want.message_id
        );
    }
    let got = ok("room", r.room_messages("r2", w, 10, Take::First));
    assert_eq!(
        got,
        vec![first, last],
        "client times at the ends of the years"
    );
    for m in &records {
        let got = ok("user", r.user_messages(m.user_id, w, 10, Take::First));
        assert_eq!(got, vec![m.clone()], "user {}'s message", m.user_id);
    }
}

/// A message stored twice is one row, counted once, and the first copy wins.
fn writes_are_idempotent(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let a = rec(1, "7", 5, at(10 * SEC));
    let c = rec(2, "7", 5, at(11 * SEC));
    assert_eq!(write(store, &[]), 0, "an empty batch");
    assert_eq!(
        write(store, &[a.clone(), a.clone()]),
        1,
        "twice in one batch"
    );
    assert_eq!(
        write(store, std::slice::from_ref(&a)),
        0,
        "again in a second batch"
    );
    assert_eq!(
        write(store, &[a.clone(), c.clone(), c.clone()]),
        1,
        "only the new one counts"
    );
    // A redelivery of the same id with other content (another minute, room, user and type)
    // must change nothing, not even the rollups.
    let mut changed = a.clone();
    changed.message = "changed".into();
    changed.room_id = "8".into();
    changed.user_id = 6;
    changed.message_type = MessageType::Join;
    changed.server_ts = at(3 * MIN + 5 * SEC);
    assert_eq!(
        write(store, &[changed]),
        0,
        "the same id with other content"
    );
    let mut other_writer = store.writer().expect("writer");
    assert_eq!(
        ok("write", other_writer.write(&[c.clone(), a.clone()])),
        0,
        "through another writer"
    );
    drop(other_writer);

    let mut r = reader(store);
    let all = window(-MIN, 10 * MIN);
    assert_eq!(
        ok("room", r.room_messages("7", all, 100, Take::First)),
        vec![a.clone(), c.clone()],
        "one row each, the first copy kept"
    );
    assert_eq!(
        ok("room", r.room_messages("8", all, 100, Take::First)),
        vec![]
    );
    assert_eq!(
        ok("user", r.user_messages(5, all, 100, Take::First)),
        vec![a.clone(), c.clone()]
    );
    assert_eq!(
        ok("user", r.user_messages(6, all, 100, Take::First)),
        vec![]
    );
    let an = ok("analytics", r.analytics(all, 10));
    assert_analytics(
        &an,
        &Analytics {
            total: 2,
            per_minute: vec![(BASE, 2)],
            top_users: vec![(5, 2)],
            top_rooms: vec![("7".into(), 2)],
            by_type: [2, 0, 0],
        },
        "duplicates counted once",
    );
    assert_eq!(ok("active_users", r.active_users(all)), 1);
    assert_eq!(
        ok("active_users", r.active_users(window(3 * MIN, 4 * MIN))),
        0
    );
    assert_eq!(
        ok("user_rooms", r.user_rooms(5)),
        vec![UserRoom {
            room_id: "7".into(),
            first_activity: at(10 * SEC),
            last_activity: at(11 * SEC),
            message_count: 2,
        }]
    );
    assert_eq!(ok("user_rooms", r.user_rooms(6)), vec![]);
    assert_eq!(ok("span", r.span()), Some((at(10 * SEC), at(11 * SEC))));
}

/// Most recent activity first, ties by room id (byte order); first and last activity and the
/// count per room, however the messages were batched.
fn user_rooms_most_recent_first(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let s = |secs: i64| at(secs * SEC + 4321);
    // Later messages first: first_activity is the oldest message, not the first written.
    let batch1 = vec![
        rec(1, "b", 7, s(100)),
        rec(2, "c", 7, s(100)),
        rec(3, "a", 7, s(50)),
        rec(10, "z", 8, s(200)),
        join(rec(13, "q", 8, s(1))),
        rec(11, "b", 8, s(300)),
    ];
    let mut leave = rec(4, "c", 7, s(30));
    leave.message_type = MessageType::Leave;
    let batch2 = vec![
        leave,
        rec(5, "9", 7, s(20)),
        rec(6, "10", 7, s(20)),
        rec(7, "B", 7, s(20)),
        rec(8, "b", 7, s(10)),
        rec(9, "b", 7, s(40)),
    ];
    assert_eq!(write(store, &batch1), 6);
    assert_eq!(write(store, &batch2), 6);

    let room = |id: &str, first, last, count| UserRoom {
        room_id: id.into(),
        first_activity: s(first),
        last_activity: s(last),
        message_count: count,
    };
    let mut r = reader(store);
    assert_eq!(
        ok("user_rooms", r.user_rooms(7)),
        vec![
            room("b", 10, 100, 3),
            room("c", 30, 100, 2),
            room("a", 50, 50, 1),
            room("10", 20, 20, 1),
            room("9", 20, 20, 1),
            room("B", 20, 20, 1),
        ],
        "user 7"
    );
    assert_eq!(
        ok("user_rooms", r.user_rooms(8)),
        vec![
            room("b", 300, 300, 1),
            room("z", 200, 200, 1),
            room("q", 1, 1, 1)
        ],
        "user 8, a JOIN is a message too"
    );
    assert_eq!(ok("user_rooms", r.user_rooms(9)), vec![], "user 9");

    // A newer message moves its room to the front.
    assert_eq!(write(store, &[rec(12, "a", 7, s(400))]), 1);
    let got = ok("user_rooms", r.user_rooms(7));
    assert_eq!(got[0], room("a", 50, 400, 2), "room a after a new message");
    assert_eq!(got.len(), 6);
}

/// Distinct users, exact at windows that cut minutes anywhere.
fn active_users_exact_at_edges(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let records = vec![
        rec(1, "1", 1, at(10 * SEC)),
        rec(2, "1", 2, at(50 * SEC)),
        rec(3, "2", 3, at(MIN)),
        rec(4, "2", 4, at(2 * MIN - 1)),
        rec(5, "3", 1, at(MIN + 30 * SEC)),
        rec(6, "1", 1, at(2 * MIN + 30 * SEC)),
        join(rec(7, "4", 5, at(5 * MIN + 1))),
    ];
    assert_eq!(write(store, &records), 7);
    let mut r = reader(store);
    let cases: [(i64, i64, i64, &str); 19] = [
        (0, 3 * MIN, 4, "all, aligned, user 1 in three minutes once"),
        (-10 * MIN, 10 * MIN, 5, "all"),
        (0, MIN, 2, "minute 0"),
        (MIN, 2 * MIN, 3, "minute 1"),
        (2 * MIN, 3 * MIN, 1, "minute 2"),
        (10 * SEC, 50 * SEC, 1, "start in, end out"),
        (10 * SEC + 1, 50 * SEC + 1, 1, "start out, end in"),
        (10 * SEC, 50 * SEC + 1, 2, "both in"),
        (10 * SEC + 1, 50 * SEC, 0, "both out, inside one minute"),
        (50 * SEC, MIN, 1, "to the minute, exclusive"),
        (50 * SEC, MIN + 1, 2, "a microsecond past the minute"),
        (MIN + 1, 2 * MIN - 1, 1, "inside minute 1, edges out"),
        (MIN + 1, 2 * MIN, 2, "the last microsecond of minute 1"),
        (30 * SEC, 2 * MIN + 31 * SEC, 4, "three partial minutes"),
        (5 * MIN, 6 * MIN, 1, "a user whose only message is a JOIN"),
        (3 * MIN, 5 * MIN, 0, "no messages"),
        (MIN, MIN, 0, "empty, on a minute"),
        (10 * SEC, 10 * SEC, 0, "empty, at a message"),
        (2 * MIN, MIN, 0, "inverted"),
    ];
    for (start, end, want, what) in cases {
        let w = window(start, end);
        assert_eq!(
            ok("active_users", r.active_users(w)),
            want,
            "{what}: [{start} µs, {end} µs)"
        );
        if start < end {
            assert_eq!(want, expected_active(&records, w), "the test's own count");
        }
    }
}

/// Active users on a few thousand pseudo-random messages, for windows cut at random
/// microseconds, at messages and at minutes.
fn active_users_match_raw_rows(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let records = random_records(0xAC71, 3000);
    write_in_batches(store, &records, 1);
    let mut rng = Rng(0x5EED);
    let mut windows = vec![
        window(-60 * MIN, 60 * MIN),
        window(0, 10 * MIN),
        window(3 * MIN, 4 * MIN),
        window(3 * MIN + 10 * SEC, 3 * MIN + 20 * SEC),
        window(0, MIN - 1),
        window(MIN - 1, 2 * MIN),
    ];
    for i in 0..60 {
        let mut start = rng.below_i64(11 * MIN) - 30 * SEC;
        let len = match i % 4 {
            0 => rng.below_i64(SEC),
            1 => rng.below_i64(MIN),
            2 => rng.below_i64(5 * MIN),
            _ => MIN * (1 + rng.below_i64(3)),
        };
        if i % 3 == 0 {
            let idx = usize::try_from(rng.below(records.len() as u64)).expect("fits");
            start = micros_of(records[idx].server_ts);
        }
        let mut end = start + len;
        if i % 5 == 0 {
            let idx = usize::try_from(rng.below(records.len() as u64)).expect("fits");
            end = micros_of(records[idx].server_ts).max(start);
        }
        if i % 7 == 0 {
            start -= start.rem_euclid(MIN);
        }
        windows.push(window(start, end));
    }
    let mut r = reader(store);
    for w in windows {
        let want = expected_active(&records, w);
        assert_eq!(
            ok("active_users", r.active_users(w)),
            want,
            "[{} µs, {} µs)",
            micros_of(w.start),
            micros_of(w.end)
        );
    }
}

/// Analytics rounds the window out to whole minutes, orders ties by id and limits the top
/// lists to `top_n`.
fn analytics_rounding_ties_and_top_n(b: &Backend) {
    let store = b.open();
    let store = &*store;
    // Users 9:6, 3:4, 5:4, 12:4, 1:1; rooms "10":5, "a":5, "b":5, "9":3, "B":1.
    let users: Vec<i32> = [(9, 6), (3, 4), (5, 4), (12, 4), (1, 1)]
        .into_iter()
        .flat_map(|(u, n)| std::iter::repeat_n(u, n))
        .collect();
    let rooms: Vec<&str> = [("b", 5), ("a", 5), ("10", 5), ("9", 3), ("B", 1)]
        .into_iter()
        .flat_map(|(room, n)| std::iter::repeat_n(room, n))
        .collect();
    // Message i at i * 10 s: minutes 0, 1 and 2 get 6 each, minute 3 one.
    let records: Vec<Record> = (0..19)
        .map(|i| {
            let mut r = rec(
                1000 + i as u128,
                rooms[(i * 7) % 19],
                users[i],
                at(i as i64 * 10 * SEC + 1234),
            );
            r.message_type = match i % 7 {
                3 => MessageType::Join,
                5 => MessageType::Leave,
                _ => MessageType::Text,
            };
            r
        })
        .collect();
    assert_eq!(write(store, &records[..10]), 10);
    assert_eq!(write(store, &records[10..]), 9);

    let mut r = reader(store);
    let all = window(0, 4 * MIN);
    let got = ok("analytics", r.analytics(all, 3));
    let want = Analytics {
        total: 19,
        per_minute: vec![(at(0), 6), (at(MIN), 6), (at(2 * MIN), 6), (at(3 * MIN), 1)],
        top_users: vec![(9, 6), (3, 4), (5, 4)],
        top_rooms: vec![("10".into(), 5), ("a".into(), 5), ("b".into(), 5)],
        by_type: [14, 3, 2],
    };
    assert_analytics(&got, &want, "top 3");
    assert_analytics(
        &expected_analytics(&records, all, 3),
        &want,
        "the test's own",
    );

    let got = ok("analytics", r.analytics(all, 1));
    assert_eq!(got.top_users, vec![(9, 6)], "top 1 user");
    assert_eq!(got.top_rooms, vec![("10".into(), 5)], "top 1 room");
    assert_eq!(got.total, 19, "top_n does not limit the total");
    let got = ok("analytics", r.analytics(all, 0));
    assert_eq!(
        (got.top_users, got.top_rooms),
        (vec![], vec![]),
        "top 0 is empty"
    );
    assert_eq!(got.per_minute.len(), 4, "top_n does not limit per_minute");
    let got = ok("analytics", r.analytics(all, usize::MAX));
    assert_eq!(got.top_users.len(), 5, "no top_n limit");
    let got = ok("analytics", r.analytics(all, 100));
    assert_eq!(got.top_users.len(), 5, "top 100 lists every user");
    assert_eq!(
        got.top_rooms,
        vec![
            ("10".into(), 5),
            ("a".into(), 5),
            ("b".into(), 5),
            ("9".into(), 3),
            ("B".into(), 1)
        ],
        "every room"
    );

    let cases: [(i64, i64, i64, &str); 10] = [
        (10 * SEC, 11 * SEC, 6, "one second counts its whole minute"),
        (MIN, 2 * MIN, 6, "an aligned minute"),
        (MIN - 1, MIN + 1, 12, "two microseconds over a minute edge"),
        (30 * SEC, 2 * MIN, 12, "end on a minute stays"),
        (MIN, 2 * MIN + 1, 12, "end a microsecond past a minute"),
        (
            -10 * MIN,
            0,
            0,
            "before the data, ending at its first minute",
        ),
        (3 * MIN, 3 * MIN, 0, "empty, on a minute"),
        (2 * MIN, MIN, 0, "inverted"),
        (4 * MIN, 60 * MIN, 0, "after the data"),
        (-10 * MIN, 60 * MIN, 19, "around everything"),
    ];
    for (start, end, total, what) in cases {
        let w = window(start, end);
        let got = ok("analytics", r.analytics(w, 10));
        assert_eq!(got.total, total, "{what}");
        assert_analytics(&got, &expected_analytics(&records, w, 10), what);
    }
}

/// Rollups equal counts over the raw rows, for a few thousand pseudo-random messages written
/// shuffled, in several batches, with repeats.
fn analytics_match_raw_rows(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let records = random_records(0xA7A1, 3000);
    write_in_batches(store, &records, 2);
    let whole = expected_analytics(&records, window(0, 10 * MIN), 10_000);
    assert_eq!(whole.total, 3000);
    assert_eq!(whole.per_minute.len(), 10);
    assert!(
        whole
            .top_users
            .windows(2)
            .any(|p| p[0].1 == p[1].1 && p[0].1 > 10),
        "the data has ties among busy users"
    );

    let mut r = reader(store);
    let cases: [(i64, i64, usize, &str); 9] = [
        (0, 10 * MIN, 10_000, "the ten minutes, every user and room"),
        (-60 * MIN, 60 * MIN, 5, "around everything, top 5"),
        (90 * SEC + 500_000, 6 * MIN + 1, 7, "unaligned"),
        (
            3 * MIN + 10 * SEC,
            3 * MIN + 20 * SEC,
            10,
            "inside one minute",
        ),
        (2 * MIN, 5 * MIN, 3, "aligned"),
        (-5 * MIN, MIN + 1, 4, "from before the data"),
        (9 * MIN + 59 * SEC, 20 * MIN, 10_000, "the last minute"),
        (20 * MIN, 30 * MIN, 10, "after the data"),
        (6 * MIN, 6 * MIN, 10, "empty, on a minute"),
    ];
    for (start, end, top_n, what) in cases {
        let w = window(start, end);
        let got = ok("analytics", r.analytics(w, top_n));
        assert_analytics(&got, &expected_analytics(&records, w, top_n), what);
    }
}

/// `span` is `None` until a message is stored, then the oldest and newest `server_ts`.
fn span_covers_stored_messages(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let mut r = reader(store);
    assert_eq!(ok("span", r.span()), None, "empty");
    let dead = DeadLetter {
        record: rec(99, "7", 1, at(-10 * MIN)),
        reason: "refused".into(),
    };
    ok(
        "dead_letter",
        store.writer().expect("writer").dead_letter(&[dead]),
    );
    assert_eq!(ok("span", r.span()), None, "dead letters are not messages");

    assert_eq!(write(store, &[rec(1, "7", 1, at(5 * SEC + 17))]), 1);
    assert_eq!(
        ok("span", r.span()),
        Some((at(5 * SEC + 17), at(5 * SEC + 17))),
        "one message"
    );
    let batch = vec![
        rec(2, "8", 2, at(3 * MIN + 1)),
        rec(3, "9", 3, at(-MIN - 999_999)),
        rec(4, "7", 4, at(MIN)),
    ];
    assert_eq!(write(store, &batch), 3);
    assert_eq!(
        ok("span", r.span()),
        Some((at(-MIN - 999_999), at(3 * MIN + 1))),
        "oldest and newest, to the microsecond"
    );
}

/// Dead letters keep the whole record and the reason, oldest first, at most `limit`, and are
/// not messages.
fn dead_letters_round_trip(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let mut r = reader(store);
    assert_eq!(ok("dead_letters", r.dead_letters(10)), vec![]);

    let mut rich = rec(1, "7", 100_000, at(SEC + 1));
    rich.message = "ü😀中".repeat(125);
    rich.username = "Zoë".into();
    rich.message_type = MessageType::Leave;
    rich.client_ts = at(SEC).to_offset(UtcOffset::from_hms(-3, -30, 0).expect("offset"));
    let d1 = DeadLetter {
        record: rich,
        reason: "value too long for type character varying(500) — «ü»".into(),
    };
    let d2 = DeadLetter {
        record: rec(2, "8", 5, at(2 * SEC)),
        reason: "refused: 'quoted' \"twice\"\nsecond line".into(),
    };
    let d3 = DeadLetter {
        record: rec(3, "7", 6, at(3 * SEC)),
        reason: "r3".into(),
    };
    let mut w = store.writer().expect("writer");
    ok("dead_letter", w.dead_letter(&[d1.clone(), d2.clone()]));
    ok("dead_letter", w.dead_letter(std::slice::from_ref(&d3)));
    drop(w);

    let all = vec![d1.clone(), d2.clone(), d3.clone()];
    assert_eq!(ok("dead_letters", r.dead_letters(100)), all, "all three");
    assert_eq!(ok("dead_letters", r.dead_letters(3)), all, "limit = count");
    assert_eq!(
        ok("dead_letters", r.dead_letters(2)),
        all[..2].to_vec(),
        "oldest 2"
    );
    assert_eq!(ok("dead_letters", r.dead_letters(0)), vec![], "limit 0");
    let got = ok("dead_letters", r.dead_letters(1));
    assert_eq!(
        got[0].record.client_ts.unix_timestamp_nanos(),
        d1.record.client_ts.unix_timestamp_nanos()
    );

    let w = window(-MIN, MIN);
    assert_eq!(
        ok("room", r.room_messages("7", w, 10, Take::First)),
        vec![],
        "dead letters are not messages"
    );
    assert_eq!(ok("active_users", r.active_users(w)), 0);
    assert_eq!(ok("analytics", r.analytics(w, 10)).total, 0);

    // The message itself can still be stored later (after a fix, say).
    assert_eq!(write(store, std::slice::from_ref(&d3.record)), 1);
    assert_eq!(
        ok("room", r.room_messages("7", w, 10, Take::First)),
        vec![d3.record.clone()]
    );
    assert_eq!(
        ok("dead_letters", r.dead_letters(100)).len(),
        3,
        "and the dead letter stays"
    );
}

/// Stored times are whole microseconds, rounded down (as `minute_floor` rounds), on every
/// backend: a message 1 ns before a minute stays in that minute.
fn sub_microsecond_times_are_floored(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let ns = Duration::nanoseconds;
    let mut a = rec(1, "7", 1, at(MIN - 1) + ns(999));
    a.client_ts = datetime!(2026-11-21 22:40:00.123456999 +02:00);
    let mut c = rec(2, "7", 2, at(MIN + 5) + ns(1));
    // Before 2000-01-01 (PostgreSQL's epoch) too.
    c.client_ts = datetime!(1999-12-31 23:59:59.9999995 UTC);
    assert_eq!(write(store, &[a.clone(), c.clone()]), 2);

    let mut r = reader(store);
    let got = ok(
        "room",
        r.room_messages("7", window(0, 2 * MIN), 10, Take::First),
    );
    assert_eq!(ids(&got), uuids(&[1, 2]));
    assert_eq!(got[0].server_ts, at(MIN - 1), "server_ts floored");
    assert_eq!(
        got[0].client_ts,
        datetime!(2026-11-21 20:40:00.123456 UTC),
        "client_ts floored"
    );
    assert_eq!(got[1].server_ts, at(MIN + 5), "server_ts floored");
    assert_eq!(
        got[1].client_ts,
        datetime!(1999-12-31 23:59:59.999999 UTC),
        "client_ts before 2000 floored, not rounded up"
    );
    let an = ok("analytics", r.analytics(window(0, 2 * MIN), 10));
    assert_eq!(
        an.per_minute,
        vec![(at(0), 1), (at(MIN), 1)],
        "the message 1 ns before a minute is counted in the minute before"
    );
    assert_eq!(ok("active_users", r.active_users(window(0, MIN))), 1);
    assert_eq!(ok("span", r.span()), Some((at(MIN - 1), at(MIN + 5))));
}

/// The widest window the HTTP API asks for (an absent `start` is the Unix epoch, an absent
/// `end` 9999-12-31T23:59:59Z) covers every message on every query.
fn widest_window_sees_everything(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let records = vec![
        rec(1, "7", 1, at(0)),
        rec(2, "7", 2, at(3 * MIN + 1)),
        rec(3, "8", 1, datetime!(1970-01-01 00:00:00 UTC)),
        rec(4, "7", 3, datetime!(9999-12-31 23:58:59.999999 UTC)),
    ];
    assert_eq!(write(store, &records), 4);
    let w = Window {
        start: OffsetDateTime::UNIX_EPOCH,
        end: datetime!(9999-12-31 23:59:59 UTC),
    };
    let mut r = reader(store);
    for take in [Take::First, Take::Last] {
        let got = ok("room", r.room_messages("7", w, 10_000, take));
        assert_eq!(ids(&got), uuids(&[1, 2, 4]), "room 7, {take:?}");
        let got = ok("user", r.user_messages(1, w, 10_000, take));
        assert_eq!(ids(&got), uuids(&[3, 1]), "user 1, {take:?}");
    }
    assert_eq!(ok("active_users", r.active_users(w)), 3);
    let got = ok("analytics", r.analytics(w, 10));
    assert_analytics(&got, &expected_analytics(&records, w, 10), "widest window");
    assert_eq!(got.total, 4);
    assert_eq!(
        ok("span", r.span()),
        Some((records[2].server_ts, records[3].server_ts))
    );
    assert_eq!(
        ok("user_rooms", r.user_rooms(3)),
        vec![UserRoom {
            room_id: "7".into(),
            first_activity: records[3].server_ts,
            last_activity: records[3].server_ts,
            message_count: 1,
        }]
    );
}

fn ping_and_kind(b: &Backend) {
    let store = b.open();
    assert_eq!(store.kind(), b.kind);
    assert!(store.max_writers() >= 1);
    let mut r = reader(&*store);
    ok("ping", r.ping());
    ok("ping", r.ping());
    let mut r2 = reader(&*store);
    ok("ping", r2.ping());
}

/// `migrate` again, and (for the durable stores) reopening, keeps the data and the schema's
/// rules: a stored id is still refused, rollups still count.
fn migrate_twice_is_harmless(b: &Backend) {
    let store = b.open();
    ok("migrate", store.migrate());
    ok("migrate", store.migrate());
    let a = rec(1, "7", 5, at(10 * SEC));
    assert_eq!(write(&*store, std::slice::from_ref(&a)), 1);
    let dead = DeadLetter {
        record: rec(9, "7", 9, at(SEC)),
        reason: "kept across migrations".into(),
    };
    let mut w = store.writer().expect("writer");
    ok("dead_letter", w.dead_letter(&[]));
    ok("dead_letter", w.dead_letter(std::slice::from_ref(&dead)));
    drop(w);
    ok("migrate", store.migrate());
    assert_eq!(
        write(&*store, std::slice::from_ref(&a)),
        0,
        "after migrate, still once"
    );
    let w = window(0, MIN);
    let mut r = reader(&*store);
    assert_eq!(
        ok("room", r.room_messages("7", w, 10, Take::First)),
        vec![a.clone()]
    );
    drop(r);
    if !b.persistent() {
        return;
    }
    drop(store);

    let store = b.open();
    let c = rec(2, "7", 6, at(20 * SEC));
    assert_eq!(
        write(&*store, &[a.clone(), c.clone()]),
        1,
        "after reopening, still once"
    );
    let mut r = reader(&*store);
    assert_eq!(
        ok("room", r.room_messages("7", w, 10, Take::First)),
        vec![a, c]
    );
    let an = ok("analytics", r.analytics(w, 10));
    assert_eq!((an.total, an.per_minute), (2, vec![(BASE, 2)]));
    assert_eq!(ok("active_users", r.active_users(w)), 2);
    assert_eq!(ok("dead_letters", r.dead_letters(10)), vec![dead]);
}

/// A reader taken before a write sees it once committed (no stale snapshot).
fn reader_sees_committed_writes(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let mut r = reader(store);
    let w = window(0, MIN);
    assert_eq!(ok("room", r.room_messages("7", w, 10, Take::First)), vec![]);
    assert_eq!(ok("span", r.span()), None);
    assert_eq!(ok("analytics", r.analytics(w, 10)).total, 0);

    let mut writer = store.writer().expect("writer");
    let a = rec(1, "7", 5, at(10 * SEC));
    assert_eq!(ok("write", writer.write(std::slice::from_ref(&a))), 1);
    assert_eq!(
        ok("room", r.room_messages("7", w, 10, Take::First)),
        vec![a.clone()]
    );
    assert_eq!(ok("analytics", r.analytics(w, 10)).total, 1);

    let c = rec(2, "7", 6, at(20 * SEC));
    assert_eq!(ok("write", writer.write(std::slice::from_ref(&c))), 1);
    assert_eq!(
        ok("room", r.room_messages("7", w, 10, Take::Last)),
        vec![a, c]
    );
    assert_eq!(ok("active_users", r.active_users(w)), 2);
    assert_eq!(ok("user_rooms", r.user_rooms(6)).len(), 1);
    assert_eq!(ok("span", r.span()), Some((at(10 * SEC), at(20 * SEC))));
}

/// Writer threads (as many as the store wants, up to four) write at once into the same
/// rooms, users and minutes, all of them also writing one shared batch, while a reader polls:
/// no errors, every message stored once, rollups exact.
fn concurrent_writers_store_each_message_once(b: &Backend) {
    let store = b.open();
    let store = &*store;
    let threads = store.max_writers().clamp(1, 4);
    let per_thread = 600;
    let batch = 50;
    let own = |t: usize| -> Vec<Record> {
        let mut rng = Rng(t as u64 + 100);
        let mut v: Vec<Record> = (0..per_thread)
            .map(|i| {
                let n = ((t as u128 + 1) << 32) | i as u128;
                let room = (1 + rng.below(5)).to_string();
                let user = i32::try_from(1 + rng.below(10)).expect("fits");
                rec(n, &room, user, at(rng.below_i64(2 * MIN)))
            })
            .collect();
        rng.shuffle(&mut v);
        v
    };
    let shared: Vec<Record> = (0..100u32)
        .map(|i| {
            rec(
                (9 << 64) | u128::from(i),
                &(1 + i % 5).to_string(),
                1 + (i % 10) as i32,
                at(i64::from(i) * SEC),
            )
        })
        .collect();
    let mut everything: Vec<Record> = (0..threads).flat_map(&own).collect();
    everything.extend(shared.iter().cloned());

    let done = AtomicBool::new(false);
    let new_rows = AtomicUsize::new(0);
    let all = window(0, 10 * MIN);
    std::thread::scope(|s| {
        let poller = s.spawn(|| {
            let mut r = reader(store);
            let mut last = 0;
            let mut polls = 0;
            loop {
                // Read once more after the writers finish, so there is always a poll.
                let finished = done.load(Ordering::Acquire);
                let a = ok("analytics while writing", r.analytics(all, 3));
                let total = a.total;
                let series: i64 = a.per_minute.iter().map(|m| m.1).sum();
                assert_eq!(
                    (series, a.by_type.iter().sum::<i64>()),
                    (total, total),
                    "one snapshot while writing: per_minute and by_type sum to the total"
                );
                assert!(total >= last, "the total went back from {last} to {total}");
                last = total;
                polls += 1;
                if finished {
                    return (polls, last);
                }
            }
        });
        let writers: Vec<_> = (0..threads)
            .map(|t| {
                let (own, shared, new_rows) = (own(t), &shared, &new_rows);
                s.spawn(move || {
                    let mut w = store.writer().unwrap_or_else(|e| panic!("writer {t}: {e}"));
                    for chunk in own.chunks(batch) {
                        let n = ok(&format!("writer {t}"), w.write(chunk));
                        new_rows.fetch_add(n, Ordering::Relaxed);
                    }
                    let n = ok(&format!("writer {t}, shared batch"), w.write(shared));
                    new_rows.fetch_add(n, Ordering::Relaxed);
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer thread");
        }
        done.store(true, Ordering::Release);
        let (polls, last) = poller.join().expect("reader thread");
        assert!(polls > 0);
        assert_eq!(
            usize::try_from(last).expect("fits"),
            everything.len(),
            "the reader's last poll sees every message"
        );
    });
    assert_eq!(
        new_rows.load(Ordering::Relaxed),
        everything.len(),
        "new rows reported"
    );

    let mut r = reader(store);
    let got = ok("analytics", r.analytics(all, 100));
    assert_analytics(
        &got,
        &expected_analytics(&everything, all, 100),
        "after concurrent writes",
    );
    assert_eq!(
        ok("active_users", r.active_users(all)),
        expected_active(&everything, all)
    );
    let room1 = ok("room", r.room_messages("1", all, 10_000, Take::First));
    let want = everything.iter().filter(|r| &*r.room_id == "1").count();
    assert_eq!(room1.len(), want, "room 1 rows");
    let user3: i64 = ok("user_rooms", r.user_rooms(3))
        .iter()
        .map(|u| u.message_count)
        .sum();
    let want = everything.iter().filter(|r| r.user_id == 3).count();
    assert_eq!(user3, i64::try_from(want).expect("fits"), "user 3's count");
}
