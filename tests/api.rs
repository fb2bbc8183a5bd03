//! End to end: messages go in over real WebSockets, history and analytics come back over HTTP.
//!
//! Every scenario runs on each store, as `memory::<scenario>`, `sqlite::<scenario>` (a SQLite
//! file of its own in the temp directory) and `postgres::<scenario>` (a PostgreSQL database of
//! its own, see `util::pg`; these fail, never skip, when PostgreSQL is missing). The servers
//! ack after the store committed (`ack_after = persisted`), so what an ack says is stored can be
//! read back at once, and every expected answer is computed from the acks themselves.

mod util;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatflow::auth::{Claims, mint, unix_now};
use chatflow::config::{AckAfter, Config};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use util::stores::{Backend, on_every_store};
use util::{Client, HttpReply, TestServer, WAIT, http, metric_in, try_metric_in, try_ws};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Backends

impl Backend {
    /// A server on this store that acks after the commit, changed further by `tweak`.
    fn start(&self, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let spec = self.spec.clone();
        TestServer::start(move |c| {
            c.store = spec;
            c.ack_after = AckAfter::Persisted;
            tweak(c);
        })
    }
}

on_every_store!(
    room_history_is_exactly_what_was_acked,
    user_history_and_rooms_match_what_was_sent,
    active_users_and_analytics_match_what_was_sent,
    metrics_document_defaults_to_the_busiest_room_and_user,
    a_retried_message_is_acked_with_one_id_and_stored_once,
    persisted_acks_arrive_in_send_order,
    queries_are_answered_while_chat_flows,
    head_requests_get_headers_only,
    operator_routes_live_on_the_admin_port,
    room_history_needs_a_token_for_its_room,
    ready_and_metrics_report_the_store,
    client_times_at_the_calendar_edges_are_stored_and_read_back,
);

/// A valid client time whose UTC instant falls outside the calendar (year 10000, or before
/// year 0) is clamped, not a panic: acked, stored, and the room's history still answers.
fn client_times_at_the_calendar_edges_are_stored_and_read_back(b: &Backend) {
    let s = b.start(|_| {});
    let mut c = s.ws("edge");
    for (i, ts) in [
        "9999-12-31T23:59:59-05:00",
        "0000-01-01T00:00:00+05:00",
        "2026-11-22T10:00:00+14:00",
    ]
    .iter()
    .enumerate()
    {
        let mut m = util::msg(7, "edge", &format!("edge {i}"));
        m["timestamp"] = json!(ts);
        c.send(&m);
        let ack = c.recv();
        assert_eq!(ack["type"], "ack", "{ts}: {ack}");
        assert_eq!(
            ack["timestamp"],
            json!(ts),
            "the ack echoes the client's text"
        );
    }
    let r = s.get("/api/rooms/edge/messages");
    assert_eq!(r.status, 200, "{r:?}");
    let list = r.json();
    assert_eq!(list.as_array().map_or(0, Vec::len), 3, "{list}");
    assert_eq!(list[2]["timestamp"], "2026-11-21T20:00:00.000000Z");
    assert_eq!(s.get("/api/metrics").status, 200);
}

// ---------------------------------------------------------------------------------------------
// Times, HTTP and comparisons

fn instant(v: &Value) -> OffsetDateTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected a time string, got {v}"));
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("not RFC 3339 ({e}): {s:?}"))
}

/// A time for a query string (UTC, so no `+` to encode).
fn q(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .expect("formats")
}

fn minute_floor(t: OffsetDateTime) -> OffsetDateTime {
    let s = t.unix_timestamp();
    OffsetDateTime::from_unix_timestamp(s - s.rem_euclid(60)).expect("in range")
}

fn minute_ceil(t: OffsetDateTime) -> OffsetDateTime {
    let f = minute_floor(t);
    if f == t {
        t
    } else {
        // At the end of time the server keeps `t`, as `time` cannot go past 9999.
        f.checked_add(time::Duration::MINUTE).unwrap_or(t)
    }
}

fn get_at(addr: SocketAddr, path: &str) -> HttpReply {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
}

fn head_at(addr: SocketAddr, path: &str) -> HttpReply {
    http(addr, &format!("HEAD {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
}

/// `GET path` on `addr`, which must answer 200 with JSON.
fn ok_at(addr: SocketAddr, path: &str) -> Value {
    let r = get_at(addr, path);
    assert_eq!(r.status, 200, "GET {path}: {r:?}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json"),
        "GET {path}"
    );
    r.json()
}

fn ok(s: &TestServer, path: &str) -> Value {
    ok_at(s.addr, path)
}

/// One message as its ack described it.
#[derive(Clone, Debug)]
struct Sent {
    ack: Value,
    user: i64,
    room: String,
    kind: String,
    at: OffsetDateTime,
}

impl Sent {
    fn of(ack: &Value) -> Sent {
        Sent {
            ack: ack.clone(),
            user: ack["userId"].as_i64().expect("numeric userId in the ack"),
            room: ack["roomId"].as_str().expect("roomId in the ack").into(),
            kind: ack["messageType"]
                .as_str()
                .expect("messageType in the ack")
                .into(),
            at: instant(&ack["serverTimestamp"]),
        }
    }

    fn id(&self) -> &str {
        self.ack["messageId"].as_str().expect("messageId")
    }
}

/// A stored message (from `/api`) equals the ack's echo, field by field; times as instants.
fn assert_record(rec: &Value, ack: &Value, what: &str) {
    for key in [
        "messageId",
        "roomId",
        "userId",
        "username",
        "message",
        "messageType",
    ] {
        assert_eq!(rec[key], ack[key], "{what}: {key} of {rec}");
    }
    assert_eq!(
        instant(&rec["timestamp"]),
        instant(&ack["timestamp"]),
        "{what}: timestamp of {rec} vs the ack {ack}"
    );
    assert_eq!(
        instant(&rec["serverTimestamp"]),
        instant(&ack["serverTimestamp"]),
        "{what}: serverTimestamp of {rec} vs the ack {ack}"
    );
    assert_eq!(rec["nodeId"], "test-node", "{what}: nodeId of {rec}");
}

/// A list answer is exactly `want`, in that order, each record equal to its ack.
fn assert_list(got: &Value, want: &[&Sent], what: &str) {
    let arr = got
        .as_array()
        .unwrap_or_else(|| panic!("{what}: expected an array, got {got}"));
    let got_ids: Vec<&str> = arr
        .iter()
        .map(|r| r["messageId"].as_str().unwrap_or("<no messageId>"))
        .collect();
    let want_ids: Vec<&str> = want.iter().map(|s| s.id()).collect();
    assert_eq!(got_ids, want_ids, "{what}");
    for (rec, s) in arr.iter().zip(want) {
        assert_record(rec, &s.ack, what);
    }
}

/// The messages of `list` with `start <= serverTimestamp < end`.
fn window<'a>(
    list: &[&'a Sent],
    start: Option<OffsetDateTime>,
    end: Option<OffsetDateTime>,
) -> Vec<&'a Sent> {
    list.iter()
        .copied()
        .filter(|s| start.is_none_or(|t| s.at >= t) && end.is_none_or(|t| s.at < t))
        .collect()
}

fn last_n<'a>(list: &[&'a Sent], n: usize) -> Vec<&'a Sent> {
    list[list.len().saturating_sub(n)..].to_vec()
}

/// `[(key, count)]`, most first, ties by key: the order of the top lists.
fn top<K: Ord + Clone>(counts: &BTreeMap<K, i64>) -> Vec<(K, i64)> {
    let mut v: Vec<(K, i64)> = counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// A sample of `/metrics` fetched over HTTP.
fn scrape(addr: SocketAddr, sample: &str) -> u64 {
    let r = get_at(addr, "/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    metric_in(&r.body, sample)
}

/// Polls a `/metrics` sample until `good` holds (bounded); returns the last value.
fn scrape_until(addr: SocketAddr, sample: &str, good: impl Fn(u64) -> bool) -> u64 {
    let start = Instant::now();
    loop {
        let v = scrape(addr, sample);
        if good(v) || start.elapsed() > WAIT {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The seed conversation

/// (user, room, messageType as sent, text). Two rooms, three users, every type; some types in
/// odd case, user 303 sends its id as a decimal string, some messages carry a clientMessageId.
const SCRIPT: [(u32, &str, &str, &str); 13] = [
    (101, "alpha", "JOIN", "hello alpha"),
    (202, "alpha", "join", "bob joins"),
    (101, "alpha", "TEXT", "first words"),
    (303, "beta", "JOIN", "cyd in beta"),
    (202, "alpha", "Text", "a reply"),
    (101, "beta", "JOIN", "ann in beta too"),
    (101, "beta", "TEXT", "cross-room \"quoted\" \\ text"),
    (303, "beta", "text", "hello ann"),
    (
        202,
        "alpha",
        "TEXT",
        "unicode \u{2713} \u{fc}n\u{ef}c\u{f6}d\u{e9} \u{1f680}",
    ),
    (101, "alpha", "TEXT", "more from ann"),
    (303, "beta", "LEAVE", "bye beta"),
    (202, "alpha", "leave", "bob leaves"),
    (101, "alpha", "TEXT", "last word in alpha"),
];

fn username(user: u32) -> String {
    match user {
        101 => "ann101".into(),
        202 => "bob202".into(),
        303 => "cyd303".into(),
        u => format!("user{u}"),
    }
}

/// What the seed sent, in send order (which is also server-time order).
struct Seeded {
    sent: Vec<Sent>,
}

impl Seeded {
    /// Step `n` of [`SCRIPT`], 1-based.
    fn step(&self, n: usize) -> &Sent {
        &self.sent[n - 1]
    }

    fn all(&self) -> Vec<&Sent> {
        self.sent.iter().collect()
    }

    fn room(&self, room: &str) -> Vec<&Sent> {
        self.sent.iter().filter(|s| s.room == room).collect()
    }

    fn user(&self, user: i64) -> Vec<&Sent> {
        self.sent.iter().filter(|s| s.user == user).collect()
    }
}

/// Opens a connection per (user, room) of [`SCRIPT`] and sends it one message at a time, each
/// after the previous one's ack (so every message has its own, later, server time). Checks
/// every ack's echo.
fn seed(s: &TestServer) -> Seeded {
    let mut conns: HashMap<(u32, &str), Client> = HashMap::new();
    for (user, room, _, _) in SCRIPT {
        conns.entry((user, room)).or_insert_with(|| s.ws(room));
    }
    let mut sent = Vec::new();
    for (i, (user, room, kind, text)) in SCRIPT.into_iter().enumerate() {
        let timestamp = format!(
            "2026-11-21T23:{:02}:{:02}.{:03}+01:00",
            10 + i,
            i * 3,
            i * 7
        );
        let mut m = json!({
            "userId": if user == 303 { json!(user.to_string()) } else { json!(user) },
            "username": username(user),
            "message": text,
            "timestamp": timestamp,
            "messageType": kind,
            "roomId": room,
        });
        if i == 4 {
            m.as_object_mut().expect("object").remove("roomId");
        }
        let key = (i % 3 == 1).then(|| format!("seed-{i}"));
        if let Some(k) = &key {
            m["clientMessageId"] = json!(k);
        }
        let c = conns.get_mut(&(user, room)).expect("connection");
        c.send(&m);
        let ack = c.recv_type("ack");
        let what = format!("ack of step {}", i + 1);
        assert_eq!(ack["status"], "OK", "{what}: {ack}");
        assert_eq!(ack["roomId"], room, "{what}");
        assert_eq!(ack["userId"], json!(user), "{what}: userId as a number");
        assert_eq!(ack["username"], username(user), "{what}");
        assert_eq!(ack["message"], text, "{what}");
        assert_eq!(ack["messageType"], kind.to_uppercase(), "{what}");
        assert_eq!(ack["timestamp"], timestamp, "{what}");
        assert_eq!(ack["clientMessageId"], json!(key), "{what}");
        let id = Uuid::parse_str(ack["messageId"].as_str().expect("messageId"))
            .unwrap_or_else(|e| panic!("{what}: messageId is not a UUID: {e}"));
        if key.is_none() {
            assert_eq!(id.get_version_num(), 7, "{what}: a fresh id is a UUIDv7");
        }
        let one = Sent::of(&ack);
        if let Some(prev) = sent.last().map(|p: &Sent| p.at) {
            assert!(
                one.at > prev,
                "{what}: sent after the previous ack, so a later server time"
            );
        }
        sent.push(one);
    }
    Seeded { sent }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

fn room_history_is_exactly_what_was_acked(b: &Backend) {
    let s = b.start(|_| {});
    let d = seed(&s);
    let alpha = d.room("alpha");
    let beta = d.room("beta");
    assert_eq!((alpha.len(), beta.len()), (8, 5));

    assert_list(&ok(&s, "/api/rooms/alpha/messages"), &alpha, "alpha");
    assert_list(&ok(&s, "/api/rooms/beta/messages"), &beta, "beta");
    assert_list(
        &ok(&s, "/api/rooms/gamma/messages"),
        &[],
        "a room nobody wrote in",
    );

    // limit and take.
    assert_list(
        &ok(&s, "/api/rooms/alpha/messages?limit=3"),
        &alpha[..3],
        "limit=3",
    );
    assert_list(
        &ok(&s, "/api/rooms/alpha/messages?limit=3&take=first"),
        &alpha[..3],
        "limit=3&take=first",
    );
    assert_list(
        &ok(&s, "/api/rooms/alpha/messages?limit=3&take=last"),
        &last_n(&alpha, 3),
        "limit=3&take=last (newest three, oldest first)",
    );
    assert_list(
        &ok(&s, "/api/rooms/alpha/messages?take=last&limit=10000"),
        &alpha,
        "take=last with room to spare",
    );
    assert_list(
        &ok(&s, "/api/rooms/alpha/messages?limit=8"),
        &alpha,
        "limit = exactly the count",
    );

    // Windows on the acks' serverTimestamps: start inclusive, end exclusive.
    let ts = |n: usize| alpha[n].ack["serverTimestamp"].as_str().expect("ts");
    assert_list(
        &ok(
            &s,
            &format!("/api/rooms/alpha/messages?start={}&end={}", ts(2), ts(5)),
        ),
        &alpha[2..5],
        "window [2, 5)",
    );
    assert_list(
        &ok(&s, &format!("/api/rooms/alpha/messages?start={}", ts(2))),
        &alpha[2..],
        "start only",
    );
    assert_list(
        &ok(&s, &format!("/api/rooms/alpha/messages?end={}", ts(5))),
        &alpha[..5],
        "end only",
    );
    assert_list(
        &ok(
            &s,
            &format!("/api/rooms/alpha/messages?start={}&end={}", ts(3), ts(3)),
        ),
        &[],
        "an empty window [t, t)",
    );
    let just_after = alpha[3].at + time::Duration::MICROSECOND;
    assert_list(
        &ok(
            &s,
            &format!(
                "/api/rooms/alpha/messages?start={}&end={}",
                ts(3),
                q(just_after)
            ),
        ),
        &alpha[3..4],
        "a one-microsecond window holds exactly its message",
    );
    let just_before = alpha[3].at - time::Duration::MICROSECOND;
    assert_list(
        &ok(
            &s,
            &format!(
                "/api/rooms/alpha/messages?start={}&end={}",
                q(just_before),
                ts(3)
            ),
        ),
        &[],
        "the microsecond before a message",
    );
    assert_list(
        &ok(
            &s,
            &format!(
                "/api/rooms/alpha/messages?start={}&end={}&limit=2&take=last",
                ts(1),
                ts(7)
            ),
        ),
        &alpha[5..7],
        "window [1, 7) with limit=2&take=last",
    );
    assert_list(
        &ok(
            &s,
            &format!(
                "/api/rooms/alpha/messages?start={}&end={}&limit=2",
                ts(1),
                ts(7)
            ),
        ),
        &alpha[1..3],
        "window [1, 7) with limit=2",
    );
    // The same window written in another zone.
    let zoned = alpha[2]
        .at
        .to_offset(time::macros::offset!(+05:30))
        .format(&Rfc3339)
        .expect("formats")
        .replace('+', "%2B");
    assert_list(
        &ok(
            &s,
            &format!("/api/rooms/alpha/messages?start={zoned}&end={}", ts(5)),
        ),
        &alpha[2..5],
        "start given with a +05:30 offset",
    );
}

fn user_history_and_rooms_match_what_was_sent(b: &Backend) {
    let s = b.start(|_| {});
    let d = seed(&s);
    let ann = d.user(101);
    assert_eq!(ann.len(), 6);
    assert_list(
        &ok(&s, "/api/users/101/messages"),
        &ann,
        "user 101, both rooms",
    );
    assert_list(&ok(&s, "/api/users/202/messages"), &d.user(202), "user 202");
    assert_list(&ok(&s, "/api/users/303/messages"), &d.user(303), "user 303");
    assert_list(&ok(&s, "/api/users/999/messages"), &[], "a silent user");
    assert_list(
        &ok(&s, "/api/users/101/messages?limit=2&take=last"),
        &last_n(&ann, 2),
        "user 101, newest two",
    );
    assert_list(
        &ok(&s, "/api/users/101/messages?limit=2"),
        &ann[..2],
        "user 101, oldest two",
    );
    let (from, to) = (d.step(4).at, d.step(10).at);
    assert_list(
        &ok(
            &s,
            &format!("/api/users/101/messages?start={}&end={}", q(from), q(to)),
        ),
        &window(&ann, Some(from), Some(to)),
        "user 101 in [step 4, step 10)",
    );
    assert_eq!(window(&ann, Some(from), Some(to)).len(), 2, "steps 6 and 7");

    // Rooms, most recent activity first, with counts and first/last activity.
    for user in [101, 202, 303, 999] {
        let got = ok(&s, &format!("/api/users/{user}/rooms"));
        let mut rooms: BTreeMap<&str, Vec<&Sent>> = BTreeMap::new();
        for m in d.user(user) {
            rooms.entry(m.room.as_str()).or_default().push(m);
        }
        let mut want: Vec<(&str, Vec<&Sent>)> = rooms.into_iter().collect();
        want.sort_by(|a, b| {
            let last = |v: &Vec<&Sent>| v.iter().map(|m| m.at).max();
            last(&b.1).cmp(&last(&a.1)).then_with(|| a.0.cmp(b.0))
        });
        let arr = got.as_array().unwrap_or_else(|| panic!("{got}"));
        assert_eq!(
            arr.iter().map(|r| r["roomId"].clone()).collect::<Vec<_>>(),
            want.iter().map(|(r, _)| json!(r)).collect::<Vec<_>>(),
            "rooms of user {user}, most recent first: {got}"
        );
        for (r, (room, msgs)) in arr.iter().zip(&want) {
            assert_eq!(r["messageCount"], msgs.len(), "user {user} in {room}: {r}");
            assert_eq!(
                instant(&r["lastActivity"]),
                msgs.iter().map(|m| m.at).max().expect("some"),
                "user {user} in {room}: lastActivity"
            );
            assert_eq!(
                instant(&r["firstActivity"]),
                msgs.iter().map(|m| m.at).min().expect("some"),
                "user {user} in {room}: firstActivity"
            );
        }
    }
    // Spelled out once, so the model above cannot drift unnoticed.
    let ann_rooms = ok(&s, "/api/users/101/rooms");
    assert_eq!(ann_rooms[0]["roomId"], "alpha");
    assert_eq!(ann_rooms[0]["messageCount"], 4);
    assert_eq!(ann_rooms[1]["roomId"], "beta");
    assert_eq!(ann_rooms[1]["messageCount"], 2);
    assert_eq!(
        instant(&ann_rooms[0]["lastActivity"]),
        d.step(13).at,
        "the last word in alpha"
    );
    assert_eq!(instant(&ann_rooms[1]["lastActivity"]), d.step(7).at);
}

/// Checks an analytics document against the messages whose server time falls in the minutes
/// that `[start, end)` touches.
fn assert_analytics(
    got: &Value,
    d: &Seeded,
    start: OffsetDateTime,
    end: OffsetDateTime,
    top_n: usize,
    what: &str,
) {
    let (from, to) = (minute_floor(start), minute_ceil(end));
    let inside = window(&d.all(), Some(from), Some(to));
    assert_eq!(instant(&got["start"]), from, "{what}: start: {got}");
    assert_eq!(instant(&got["end"]), to, "{what}: end: {got}");
    assert_eq!(got["totalMessages"], inside.len(), "{what}: {got}");
    let mut users = BTreeMap::new();
    let mut rooms = BTreeMap::new();
    let mut kinds = BTreeMap::from([("JOIN", 0), ("LEAVE", 0), ("TEXT", 0)]);
    let mut minutes: BTreeMap<OffsetDateTime, i64> = BTreeMap::new();
    for m in &inside {
        *users.entry(m.user).or_insert(0) += 1;
        *rooms.entry(m.room.clone()).or_insert(0) += 1;
        *kinds.get_mut(m.kind.as_str()).expect("a known type") += 1;
        *minutes.entry(minute_floor(m.at)).or_insert(0) += 1;
    }
    let want_users: Vec<Value> = top(&users)
        .into_iter()
        .take(top_n)
        .map(|(u, n)| json!({"userId": u, "messageCount": n}))
        .collect();
    let want_rooms: Vec<Value> = top(&rooms)
        .into_iter()
        .take(top_n)
        .map(|(r, n)| json!({"roomId": r, "messageCount": n}))
        .collect();
    assert_eq!(got["topUsers"], json!(want_users), "{what}: topUsers");
    assert_eq!(got["topRooms"], json!(want_rooms), "{what}: topRooms");
    assert_eq!(got["byType"], json!(kinds), "{what}: byType");
    let per_minute: Vec<(OffsetDateTime, i64)> = got["perMinute"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: perMinute: {got}"))
        .iter()
        .map(|p| (instant(&p["minute"]), p["count"].as_i64().expect("count")))
        .collect();
    assert_eq!(
        per_minute,
        minutes.iter().map(|(m, n)| (*m, *n)).collect::<Vec<_>>(),
        "{what}: perMinute"
    );
    assert_eq!(got["perMinuteTruncated"], false, "{what}");
    let peak = minutes
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)));
    match peak {
        None => assert_eq!(got["peakMinute"], Value::Null, "{what}: peakMinute"),
        Some((m, n)) => {
            assert_eq!(
                instant(&got["peakMinute"]["minute"]),
                *m,
                "{what}: peakMinute"
            );
            assert_eq!(got["peakMinute"]["count"], *n, "{what}: peakMinute");
        }
    }
    let seconds = (to - from).as_seconds_f64();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-300);
    let per_second = got["messagesPerSecond"]
        .as_f64()
        .expect("messagesPerSecond");
    let per_minute_rate = got["messagesPerMinute"]
        .as_f64()
        .expect("messagesPerMinute");
    let n = inside.len() as f64;
    assert!(
        close(per_second, n / seconds),
        "{what}: messagesPerSecond {per_second}"
    );
    assert!(
        close(per_minute_rate, n / (seconds / 60.0)),
        "{what}: messagesPerMinute {per_minute_rate}"
    );
}

fn active_users_and_analytics_match_what_was_sent(b: &Backend) {
    let s = b.start(|_| {});
    let d = seed(&s);
    let active = |start: Option<OffsetDateTime>, end: Option<OffsetDateTime>| {
        let mut path = "/api/active-users?".to_string();
        if let Some(t) = start {
            path += &format!("start={}&", q(t));
        }
        if let Some(t) = end {
            path += &format!("end={}", q(t));
        }
        let v = ok(&s, &path);
        let want: BTreeSet<i64> = window(&d.all(), start, end)
            .iter()
            .map(|m| m.user)
            .collect();
        assert_eq!(v["count"], want.len(), "{path}: {v}");
        if let Some(t) = start {
            assert_eq!(instant(&v["start"]), t, "{path}: start echoed");
        }
        if let Some(t) = end {
            assert_eq!(instant(&v["end"]), t, "{path}: end echoed");
        }
        want.len()
    };
    assert_eq!(active(None, None), 3);
    assert_eq!(
        active(Some(d.step(4).at), Some(d.step(6).at)),
        2,
        "303 and 202"
    );
    assert_eq!(
        active(Some(d.step(4).at), Some(d.step(5).at)),
        1,
        "303 only"
    );
    assert_eq!(active(Some(d.step(11).at), None), 3);
    assert_eq!(active(Some(d.step(12).at), None), 2, "202 and 101");
    assert_eq!(active(Some(d.step(13).at), None), 1);
    assert_eq!(
        active(Some(d.step(13).at + time::Duration::MICROSECOND), None),
        0
    );
    assert_eq!(active(Some(d.step(5).at), Some(d.step(5).at)), 0);
    assert_eq!(active(None, Some(d.step(1).at)), 0);

    // Analytics over all time, spelled out once.
    let all = ok(&s, "/api/analytics");
    assert_eq!(all["totalMessages"], 13);
    assert_eq!(all["byType"], json!({"TEXT": 7, "JOIN": 4, "LEAVE": 2}));
    assert_eq!(
        all["topUsers"],
        json!([
            {"userId": 101, "messageCount": 6},
            {"userId": 202, "messageCount": 4},
            {"userId": 303, "messageCount": 3},
        ])
    );
    assert_eq!(
        all["topRooms"],
        json!([
            {"roomId": "alpha", "messageCount": 8},
            {"roomId": "beta", "messageCount": 5},
        ])
    );
    assert_analytics(
        &all,
        &d,
        OffsetDateTime::UNIX_EPOCH,
        instant(&json!("9999-12-31T23:59:59Z")),
        10,
        "all time",
    );
    // Windows and topN.
    let (first, last) = (d.step(1).at, d.step(13).at);
    let path = format!("/api/analytics?start={}&end={}&topN=1", q(first), q(last));
    assert_analytics(&ok(&s, &path), &d, first, last, 1, &path);
    let (a, z) = (d.step(4).at, d.step(6).at);
    let path = format!("/api/analytics?start={}&end={}&topN=2", q(a), q(z));
    assert_analytics(&ok(&s, &path), &d, a, z, 2, &path);
    // A window without messages.
    let (a, z) = (
        instant(&json!("2000-01-01T00:00:00Z")),
        instant(&json!("2000-01-01T01:00:00Z")),
    );
    let path = format!("/api/analytics?start={}&end={}", q(a), q(z));
    let empty = ok(&s, &path);
    assert_eq!(empty["totalMessages"], 0, "{empty}");
    assert_eq!(empty["topUsers"], json!([]));
    assert_eq!(empty["topRooms"], json!([]));
    assert_analytics(&empty, &d, a, z, 10, &path);
}

fn metrics_document_defaults_to_the_busiest_room_and_user(b: &Backend) {
    let s = b.start(|_| {});
    assert_eq!(
        ok(&s, "/api/metrics")["roomId"],
        Value::Null,
        "an empty store has no busiest room"
    );
    let d = seed(&s);
    let (first, last) = (d.step(1).at, d.step(13).at);

    let v = ok(&s, "/api/metrics");
    assert_eq!(v["roomId"], "alpha", "the busiest room: {v}");
    assert_eq!(v["userId"], 101, "the busiest user");
    assert_eq!(instant(&v["window"]["start"]), first, "the data's span");
    assert_eq!(
        instant(&v["window"]["end"]),
        last + time::Duration::MICROSECOND,
        "just past the newest message"
    );
    assert_list(
        &v["roomMessages"],
        &d.room("alpha"),
        "metrics: roomMessages",
    );
    assert_list(&v["userMessages"], &d.user(101), "metrics: userMessages");
    assert_eq!(
        v["userRooms"],
        ok(&s, "/api/users/101/rooms"),
        "metrics: userRooms"
    );
    assert_eq!(v["activeUsers"], 3);
    assert_analytics(
        &v["analytics"],
        &d,
        first,
        last + time::Duration::MICROSECOND,
        10,
        "metrics: analytics",
    );

    // Each parameter replaces its default.
    let (a, z) = (d.step(6).at, d.step(9).at);
    let path = format!(
        "/api/metrics?roomId=beta&userId=303&startTime={}&endTime={}&topN=1",
        q(a),
        q(z)
    );
    let v = ok(&s, &path);
    assert_eq!(v["roomId"], "beta", "{path}");
    assert_eq!(v["userId"], 303, "{path}");
    assert_eq!(instant(&v["window"]["start"]), a);
    assert_eq!(instant(&v["window"]["end"]), z);
    let beta_inside = window(&d.room("beta"), Some(a), Some(z));
    assert_eq!(beta_inside.len(), 3, "steps 6, 7 and 8");
    assert_list(
        &v["roomMessages"],
        &beta_inside,
        "metrics: beta in the window",
    );
    assert_list(
        &v["userMessages"],
        &window(&d.user(303), Some(a), Some(z)),
        "metrics: 303 in the window",
    );
    assert_eq!(
        v["userRooms"],
        ok(&s, "/api/users/303/rooms"),
        "not windowed"
    );
    assert_eq!(v["activeUsers"], 2, "101 and 303 in [step 6, step 9)");
    assert_analytics(&v["analytics"], &d, a, z, 1, "metrics: analytics, topN=1");

    // Only the room given: the user still defaults to the busiest.
    let v = ok(&s, "/api/metrics?roomId=beta");
    assert_eq!(v["roomId"], "beta");
    assert_eq!(v["userId"], 101);
    assert_list(&v["roomMessages"], &d.room("beta"), "metrics?roomId=beta");
    // A room and user with no messages: empty lists, not errors.
    let v = ok(&s, "/api/metrics?roomId=gamma&userId=999");
    assert_eq!(v["roomMessages"], json!([]));
    assert_eq!(v["userMessages"], json!([]));
    assert_eq!(v["userRooms"], json!([]));
    assert_eq!(v["activeUsers"], 3);
}

fn a_retried_message_is_acked_with_one_id_and_stored_once(b: &Backend) {
    let s = b.start(|_| {});
    let mut retry = util::msg(101, "alpha", "say it once");
    retry["clientMessageId"] = json!("retry-1");
    let mut c = s.ws("alpha");
    c.send(&retry);
    let first = c.recv_type("ack");
    assert_eq!(first["status"], "OK", "{first}");
    let id = first["messageId"].as_str().expect("id").to_string();
    let version = Uuid::parse_str(&id).expect("uuid").get_version_num();
    assert!(
        version == 5 || version == 8,
        "an id derived from the key is a UUIDv5 or v8, got v{version}"
    );
    // Again on the same connection, after the first was stored.
    c.send(&retry);
    let again = c.recv_type("ack");
    assert_eq!(again["status"], "OK", "{again}");
    assert_eq!(again["messageId"], id, "the same key keeps its id");
    assert_eq!(again["clientMessageId"], "retry-1");
    // Again after a reconnect, as a client retrying after a lost ack would.
    drop(c);
    let mut c = s.ws("alpha");
    c.send(&retry);
    assert_eq!(c.recv_type("ack")["messageId"], id, "after a reconnect");
    // Twice back to back, so both may land in one write batch.
    let mut twice = util::msg(101, "alpha", "burst");
    twice["clientMessageId"] = json!("retry-2");
    c.queue(&twice);
    c.queue(&twice);
    c.flush();
    let (x, y) = (c.recv_type("ack"), c.recv_type("ack"));
    assert_eq!(x["status"], "OK");
    assert_eq!(y["status"], "OK");
    assert_eq!(x["messageId"], y["messageId"], "back to back, one id");
    assert_ne!(x["messageId"], id);
    // The same key from another user is another message.
    let mut other = s.ws("alpha");
    let mut theirs = util::msg(202, "alpha", "say it once");
    theirs["clientMessageId"] = json!("retry-1");
    other.send(&theirs);
    let third = other.recv_type("ack");
    assert_ne!(third["messageId"], id, "the key is per user");

    // Stored once each: three messages out of six frames. The first of the two retry-1
    // frames was committed before the second was sent, so its copy is the stored one; of the
    // two frames sent back to back either may have been written first.
    let history = ok(&s, "/api/rooms/alpha/messages");
    let burst = history
        .as_array()
        .and_then(|a| a.iter().find(|r| r["messageId"] == x["messageId"]))
        .map(|r| instant(&r["serverTimestamp"]));
    let burst_ack = if burst == Some(instant(&y["serverTimestamp"])) {
        &y
    } else {
        &x
    };
    let stored = [Sent::of(&first), Sent::of(burst_ack), Sent::of(&third)];
    let want: Vec<&Sent> = stored.iter().collect();
    assert_list(&history, &want, "each message once, as first stored");
    assert_list(
        &ok(&s, "/api/users/101/messages"),
        &want[..2],
        "user 101 once each",
    );
    let rooms = ok(&s, "/api/users/101/rooms");
    assert_eq!(rooms.as_array().map(Vec::len), Some(1), "{rooms}");
    assert_eq!(rooms[0]["roomId"], "alpha");
    assert_eq!(rooms[0]["messageCount"], 2, "not 5: {rooms}");
    assert_eq!(ok(&s, "/api/analytics")["totalMessages"], 3);
    assert_eq!(
        ok(&s, "/api/analytics")["topUsers"],
        json!([{"userId": 101, "messageCount": 2}, {"userId": 202, "messageCount": 1}])
    );
    assert_eq!(
        scrape_until(s.addr, "chatflow_store_rows_total", |n| n >= 3),
        3,
        "rows newly stored"
    );
    assert_eq!(
        scrape(s.addr, "chatflow_store_duplicates_total"),
        3,
        "repeats skipped"
    );
}

fn persisted_acks_arrive_in_send_order(b: &Backend) {
    const N: usize = 200;
    let s = b.start(|_| {});
    let mut c = s.ws("order");
    let kinds = ["TEXT", "TEXT", "JOIN", "TEXT", "LEAVE"];
    for i in 0..N {
        let mut m = util::msg(7 + (i % 3) as u32, "order", &format!("n{i:03}"));
        m["messageType"] = json!(kinds[i % kinds.len()]);
        if i % 2 == 0 {
            m["clientMessageId"] = json!(format!("ord-{i:03}"));
        }
        c.queue(&m);
    }
    c.flush();
    let mut acks = Vec::with_capacity(N);
    for i in 0..N {
        let ack = c.recv();
        assert_eq!(ack["type"], "ack", "frame {i}: {ack}");
        assert_eq!(ack["status"], "OK", "frame {i}: {ack}");
        assert_eq!(ack["message"], format!("n{i:03}"), "ack {i} out of order");
        let key = (i % 2 == 0).then(|| format!("ord-{i:03}"));
        assert_eq!(ack["clientMessageId"], json!(key), "ack {i}");
        acks.push(Sent::of(&ack));
    }
    assert!(
        c.silent_for(Duration::from_millis(200)),
        "exactly one ack per message"
    );
    let ids: BTreeSet<&str> = acks.iter().map(Sent::id).collect();
    assert_eq!(ids.len(), N, "every message its own id");
    for w in acks.windows(2) {
        assert!(w[0].at <= w[1].at, "server times follow the send order");
    }
    // All of them are stored, oldest first, each equal to its ack.
    let history = ok(&s, "/api/rooms/order/messages");
    let arr = history.as_array().expect("array");
    assert_eq!(arr.len(), N, "all {N} stored");
    let by_id: HashMap<&str, &Sent> = acks.iter().map(|a| (a.id(), a)).collect();
    let mut prev = None;
    for rec in arr {
        let id = rec["messageId"].as_str().expect("id");
        let sent = by_id
            .get(id)
            .unwrap_or_else(|| panic!("stored but never acked: {rec}"));
        assert_record(rec, &sent.ack, "order");
        let at = instant(&rec["serverTimestamp"]);
        assert!(prev.is_none_or(|p| p <= at), "history is oldest first");
        prev = Some(at);
    }
    assert_eq!(
        scrape_until(s.addr, "chatflow_store_rows_total", |n| n >= N as u64),
        N as u64
    );
}

/// Sets its flag when dropped, also by a panic.
struct Done(Arc<AtomicBool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn queries_are_answered_while_chat_flows(b: &Backend) {
    const CHUNKS: usize = 20;
    const PER_CHUNK: usize = 20;
    let s = b.start(|_| {});
    let addr = s.addr;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let acked = acked.clone();
        let done = Done(done.clone());
        std::thread::spawn(move || {
            let _done = done;
            let mut c = Client::connect(addr, "busy");
            for chunk in 0..CHUNKS {
                for i in 0..PER_CHUNK {
                    let n = chunk * PER_CHUNK + i;
                    c.queue(&util::msg(1 + (n % 5) as u32, "busy", &format!("b{n}")));
                }
                c.flush();
                for i in 0..PER_CHUNK {
                    let ack = c.recv();
                    let n = chunk * PER_CHUNK + i;
                    assert_eq!(ack["type"], "ack", "message {n}: {ack}");
                    assert_eq!(ack["message"], format!("b{n}"), "ack {n} in order");
                    let id = ack["messageId"].as_str().expect("id").to_string();
                    acked.lock().expect("lock").push(id);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let deadline = Instant::now() + 3 * WAIT;
    let mut answered_while_sending = 0;
    let mut slowest = Duration::ZERO;
    while !done.load(Ordering::Acquire) && Instant::now() < deadline {
        let before: Vec<String> = acked.lock().expect("lock").clone();
        let started = Instant::now();
        let got = ok(&s, "/api/rooms/busy/messages");
        let stats = ok(&s, "/api/analytics");
        let nothing = ok(
            &s,
            "/api/rooms/busy/messages?start=2000-01-01T00:00:00Z&end=2000-01-02T00:00:00Z",
        );
        slowest = slowest.max(started.elapsed());
        assert_eq!(nothing, json!([]), "a window with no messages");
        let ids: BTreeSet<&str> = got
            .as_array()
            .expect("array")
            .iter()
            .map(|r| r["messageId"].as_str().expect("id"))
            .collect();
        for id in &before {
            assert!(
                ids.contains(id.as_str()),
                "acked (so committed) before the query, yet missing from its answer: {id}"
            );
        }
        assert!(
            stats["totalMessages"].as_u64().expect("total") >= before.len() as u64,
            "analytics count what was acked before the query"
        );
        if !done.load(Ordering::Acquire) {
            answered_while_sending += 1;
        }
    }
    if let Err(panic) = sender.join() {
        std::panic::resume_unwind(panic);
    }
    assert!(
        done.load(Ordering::Acquire),
        "the sender finished within the wait"
    );
    assert!(
        answered_while_sending >= 3,
        "only {answered_while_sending} rounds of queries were answered while the client sent"
    );
    assert!(
        slowest < WAIT,
        "a round of queries took {slowest:?} while chat flowed"
    );
    let total = CHUNKS * PER_CHUNK;
    let acked = acked.lock().expect("lock").clone();
    assert_eq!(acked.len(), total);
    let got = ok(&s, "/api/rooms/busy/messages");
    let got: Vec<&str> = got
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["messageId"].as_str().expect("id"))
        .collect();
    assert_eq!(
        got.iter().copied().collect::<BTreeSet<_>>(),
        acked.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "everything acked is stored, once"
    );
    assert_eq!(got.len(), total);
}

fn head_requests_get_headers_only(b: &Backend) {
    let s = b.start(|_| {});
    let d = seed(&s);
    let window = format!(
        "/api/rooms/alpha/messages?start={}&end={}",
        q(d.step(2).at),
        q(d.step(10).at)
    );
    for path in [
        "/api/rooms/alpha/messages",
        window.as_str(),
        "/api/users/101/messages",
        "/api/users/101/rooms",
        "/api/active-users",
        "/api/analytics",
        "/api/metrics",
    ] {
        let get = get_at(s.addr, path);
        assert_eq!(get.status, 200, "GET {path}");
        assert!(get.body.len() > 2, "GET {path} has a body");
        let head = head_at(s.addr, path);
        assert_eq!(head.status, 200, "HEAD {path}: {head:?}");
        assert!(head.body.is_empty(), "HEAD {path} has no body: {head:?}");
        assert_eq!(
            head.header("content-type").as_deref(),
            Some("application/json"),
            "HEAD {path}"
        );
        assert_eq!(
            head.header("content-length"),
            Some(get.body.len().to_string()),
            "HEAD {path}: the length GET's body has"
        );
    }
    let bad = head_at(s.addr, "/api/rooms/alpha/messages?limit=0");
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.body.is_empty(), "{bad:?}");
}

fn operator_routes_live_on_the_admin_port(b: &Backend) {
    let s = b.start(|c| c.admin_listen = "127.0.0.1:0".into());
    let admin = s.admin.expect("an admin address");
    let d = seed(&s);
    for path in [
        "/api/users/101/messages",
        "/api/users/101/rooms",
        "/api/analytics",
        "/api/metrics",
        "/api/metrics?roomId=alpha&userId=101",
        "/api/active-users",
    ] {
        let public = get_at(s.addr, path);
        assert_eq!(public.status, 404, "{path} on the public port: {public:?}");
        assert!(
            public.json()["error"]
                .as_str()
                .is_some_and(|e| !e.is_empty()),
            "{path}: {public:?}"
        );
        assert_eq!(
            head_at(s.addr, path).status,
            404,
            "HEAD {path} on the public port"
        );
        let on_admin = ok_at(admin, path);
        assert!(!on_admin.is_null(), "{path} on the admin port");
    }
    assert_list(
        &ok_at(admin, "/api/users/101/messages"),
        &d.user(101),
        "user history on the admin port",
    );
    assert_eq!(ok_at(admin, "/api/analytics")["totalMessages"], 13);
    assert_eq!(ok_at(admin, "/api/active-users")["count"], 3);
    assert_eq!(ok_at(admin, "/api/metrics")["roomId"], "alpha");
    assert_eq!(ok_at(admin, "/api/users/101/rooms")[0]["messageCount"], 4);
    // A room's history stays on the public port, for the chat page.
    assert_list(
        &ok(&s, "/api/rooms/alpha/messages?take=last&limit=5"),
        &last_n(&d.room("alpha"), 5),
        "room history on the public port",
    );
    assert_eq!(get_at(s.addr, "/metrics").status, 404);
    assert_eq!(get_at(admin, "/metrics").status, 200);
}

const SECRET: &str = "api-test-secret-of-some-length";

fn token(user: u32, rooms: &[&str]) -> String {
    mint(
        SECRET.as_bytes(),
        &Claims {
            sub: user,
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
            exp: unix_now() + 300,
        },
    )
}

fn room_history_needs_a_token_for_its_room(b: &Backend) {
    let s = b.start(|c| c.auth_secret = SECRET.into());
    let t7 = token(42, &["7"]);
    let mut c = try_ws(s.addr, &format!("/chat/7?token={t7}"), None).expect("upgrade with a token");
    let mut sent = Vec::new();
    for text in ["one", "two", "three"] {
        c.send(&util::msg(42, "7", text));
        let ack = c.recv_type("ack");
        assert_eq!(ack["status"], "OK", "{ack}");
        sent.push(Sent::of(&ack));
    }
    let all: Vec<&Sent> = sent.iter().collect();
    for (path, why) in [
        ("/api/rooms/7/messages".to_string(), "no token"),
        (
            format!("/api/rooms/7/messages?token={}", token(42, &["8"])),
            "a token for another room",
        ),
        (
            format!(
                "/api/rooms/7/messages?token={}",
                mint(
                    b"not-the-secret",
                    &Claims {
                        sub: 42,
                        rooms: vec!["7".into()],
                        exp: unix_now() + 300,
                    }
                )
            ),
            "a forged token",
        ),
        (
            format!(
                "/api/rooms/7/messages?token={}",
                mint(
                    SECRET.as_bytes(),
                    &Claims {
                        sub: 42,
                        rooms: vec!["7".into()],
                        exp: unix_now() - 1,
                    }
                )
            ),
            "an expired token",
        ),
    ] {
        let r = get_at(s.addr, &path);
        assert_eq!(r.status, 401, "{why}: {r:?}");
        assert!(
            r.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{why}: {r:?}"
        );
        assert!(!r.body.contains("\"messageId\""), "{why}: no history leaks");
    }
    assert_list(
        &ok(&s, &format!("/api/rooms/7/messages?token={t7}")),
        &all,
        "with the room's token",
    );
    assert_list(
        &ok(
            &s,
            &format!("/api/rooms/7/messages?limit=2&take=last&token={t7}"),
        ),
        &all[1..],
        "token and parameters together",
    );
    assert_list(
        &ok(
            &s,
            &format!("/api/rooms/7/messages?token={}", token(5, &["*"])),
        ),
        &all,
        "a token for every room",
    );
    assert_list(
        &ok(
            &s,
            &format!("/api/rooms/8/messages?token={}", token(42, &["8"])),
        ),
        &[],
        "room 8's own token opens room 8, which is empty",
    );
}

fn ready_and_metrics_report_the_store(b: &Backend) {
    let s = b.start(|_| {});
    let ready = get_at(s.addr, "/ready");
    assert_eq!(ready.status, 200, "{ready:?}");
    let v = ready.json();
    assert_eq!(v["status"], "READY", "{v}");
    assert_eq!(v["store"]["kind"], b.kind, "{v}");
    assert_eq!(v["store"]["up"], true, "{v}");
    assert_eq!(v["store"]["error"], Value::Null, "{v}");
    assert_eq!(v["store"]["breaker"], "closed", "{v}");
    assert_eq!(v["ackAfter"], "persisted", "{v}");
    assert!(
        !v.to_string().contains("postgres://postgres@"),
        "the store URL is not shown with its credentials: {v}"
    );

    let d = seed(&s);
    // And a retry, which is not a new row.
    let mut c = s.ws("alpha");
    let mut m = util::msg(101, "alpha", "retried");
    m["clientMessageId"] = json!("again");
    c.send(&m);
    let one = c.recv_type("ack");
    c.send(&m);
    assert_eq!(c.recv_type("ack")["messageId"], one["messageId"]);
    let distinct = d.sent.len() as u64 + 1;

    let rows = scrape_until(s.addr, "chatflow_store_rows_total", |n| n >= distinct);
    assert_eq!(rows, distinct, "rows = distinct messages sent");
    let r = get_at(s.addr, "/metrics");
    assert_eq!(r.status, 200);
    let text = &r.body;
    let batches = metric_in(text, "chatflow_store_batches_total");
    assert!(batches > 0 && batches <= distinct + 1, "batches {batches}");
    assert_eq!(metric_in(text, "chatflow_store_duplicates_total"), 1);
    // Exported from the start (the first turn comes 10 s after it; merges are tested in
    // tests/store_pg.rs).
    assert!(try_metric_in(text, "chatflow_store_housekeeping_total").is_some());
    assert_eq!(
        metric_in(text, "chatflow_store_housekeeping_errors_total"),
        0
    );
    assert!(
        text.contains("# TYPE chatflow_store_write_seconds histogram"),
        "the write latency histogram"
    );
    let count = metric_in(text, "chatflow_store_write_seconds_count");
    assert_eq!(count, batches, "one write time per batch");
    assert_eq!(
        metric_in(text, "chatflow_store_write_seconds_bucket{le=\"+Inf\"}"),
        count
    );
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("chatflow_store_write_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .expect("chatflow_store_write_seconds_sum");
    assert!(sum > 0.0, "writes take some time: {sum}");
    let buckets = text
        .lines()
        .filter(|l| l.starts_with("chatflow_store_write_seconds_bucket{"))
        .count();
    assert!(buckets >= 2, "histogram buckets: {buckets}");

    let v = ok(&s, "/ready");
    assert_eq!(v["store"]["up"], true, "{v}");
    assert_eq!(v["store"]["queued"], 0, "nothing left to write: {v}");
}
