//! The wire protocol over real sockets: validation, acks, errors and RFC 6455 rules.

mod util;

use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};
use util::{TestServer, client_frame, close_code, msg, raw_upgrade, read_frame};

#[test]
fn a_valid_message_is_acked_with_every_field_echoed() {
    let s = TestServer::start(|_| {});
    let mut c = s.ws("7");
    let mut m = msg(12345, "7", "hello room");
    m["clientMessageId"] = "c42-000017".into();
    m["messageType"] = "text".into();
    c.send(&m);
    let ack = c.recv();
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["status"], "OK");
    assert_eq!(ack["clientMessageId"], "c42-000017");
    assert_eq!(ack["roomId"], "7");
    assert_eq!(ack["userId"], 12345);
    assert_eq!(ack["username"], "user12345");
    assert_eq!(ack["message"], "hello room");
    assert_eq!(ack["messageType"], "TEXT", "the type is normalised");
    assert_eq!(
        ack["timestamp"], "2026-11-21T22:41:01.123Z",
        "the client's time is echoed"
    );
    let id = ack["messageId"].as_str().expect("messageId");
    assert_eq!(
        uuid::Uuid::parse_str(id).map(|u| u.get_version_num()),
        Ok(5)
    );
    let server_ts = ack["serverTimestamp"].as_str().expect("serverTimestamp");
    assert!(
        time::OffsetDateTime::parse(server_ts, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{server_ts}"
    );
}

/// (field, bad value, good value at the other side of the boundary)
fn boundary_cases() -> Vec<(&'static str, Value, Value)> {
    vec![
        ("userId", json!(0), json!(1)),
        ("userId", json!(100001), json!(100000)),
        ("userId", json!("100001"), json!("100000")),
        ("userId", json!(-1), json!("1")),
        ("userId", json!(1.5), json!(2)),
        ("username", json!("ab"), json!("abc")),
        ("username", json!("a".repeat(21)), json!("a".repeat(20))),
        ("username", json!("user_1"), json!("user1")),
        ("message", json!(""), json!("x")),
        ("message", json!("x".repeat(501)), json!("x".repeat(500))),
        ("message", json!("é".repeat(501)), json!("é".repeat(500))),
        (
            "timestamp",
            json!("2026-11-21T22:41:01"),
            json!("2026-11-21T22:41:01+02:00"),
        ),
        ("timestamp", json!("soon"), json!("2026-11-21T22:41:01Z")),
        ("messageType", json!("SHOUT"), json!("leave")),
        ("messageType", json!(1), json!("Join")),
        (
            "clientMessageId",
            json!("a".repeat(65)),
            json!("a".repeat(64)),
        ),
        ("clientMessageId", json!("a b"), json!("a_b-c")),
    ]
}

#[test]
fn every_field_rule_rejects_just_past_its_boundary_and_accepts_at_it() {
    let s = TestServer::start(|_| {});
    let mut c = s.ws("7");
    for (field, bad, good) in boundary_cases() {
        let mut m = msg(42, "7", "hi");
        m[field] = bad.clone();
        c.send(&m);
        let err = c.recv();
        assert_eq!(err["type"], "error", "{field}={bad}");
        assert_eq!(err["status"], "ERROR");
        assert_eq!(err["code"], "VALIDATION_FAILED", "{field}={bad}");
        assert_eq!(err["errors"][0]["field"], field, "{field}={bad}");
        assert!(
            err["errors"][0]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );
        assert_eq!(err["errors"].as_array().map(Vec::len), Some(1), "{err}");

        m[field] = good.clone();
        c.send(&m);
        let ack = c.recv();
        assert_eq!(ack["type"], "ack", "{field}={good}: {ack}");
    }
    assert_eq!(
        s.metric("chatflow_errors_total{code=\"VALIDATION_FAILED\"}"),
        boundary_cases().len() as u64
    );
}

#[test]
fn every_failing_field_is_listed_and_the_client_key_echoed() {
    let s = TestServer::start(|_| {});
    let mut c = s.ws("7");
    c.send(&json!({"userId": "x", "message": "", "messageType": "NOPE", "clientMessageId": "k1"}));
    let err = c.recv();
    assert_eq!(err["code"], "VALIDATION_FAILED");
    assert_eq!(err["clientMessageId"], "k1");
    let fields: Vec<&str> = err["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(
        fields,
        ["userId", "username", "message", "timestamp", "messageType"]
    );
}

#[test]
fn a_room_mismatch_has_its_own_code_and_a_missing_room_is_fine() {
    let s = TestServer::start(|_| {});
    let mut c = s.ws("7");
    let mut m = msg(1, "8", "wrong room");
    c.send(&m);
    let err = c.recv();
    assert_eq!(err["code"], "ROOM_MISMATCH");
    assert_eq!(err["errors"][0]["field"], "roomId");
    m.as_object_mut().map(|o| o.remove("roomId"));
    c.send(&m);
    assert_eq!(c.recv()["roomId"], "7", "the path's room is used");
}

#[test]
fn invalid_json_and_binary_frames_get_errors_and_the_connection_stays_open() {
    let s = TestServer::start(|_| {});
    let mut c = s.ws("7");
    for text in ["not json", "[1,2,3]", "{\"userId\":", "42"] {
        c.send_text(text);
        let err = c.recv();
        assert_eq!(err["code"], "INVALID_JSON", "{text}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.ws.send(tungstenite::Message::binary(vec![1u8, 2, 3]))
        .expect("send");
    assert_eq!(c.recv()["code"], "UNSUPPORTED_FRAME");
    c.send(&msg(1, "7", "still here"));
    assert_eq!(c.recv()["type"], "ack");
    assert_eq!(
        s.metric("chatflow_acks_total"),
        1,
        "nothing rejected was acked"
    );
}

#[test]
fn unknown_fields_are_ignored() {
    let s = TestServer::start(|_| {});
    let mut c = s.ws("7");
    let mut m = msg(1, "7", "hi");
    m["color"] = "blue".into();
    m["nested"] = json!({"a": [1, 2]});
    c.send(&m);
    let ack = c.recv();
    assert_eq!(ack["type"], "ack");
    assert!(ack.get("color").is_none());
}

#[test]
fn acks_come_in_arrival_order() {
    let s = TestServer::start(|_| {});
    let mut c = s.ws("7");
    for i in 0..500 {
        let mut m = msg(1, "7", &format!("n{i}"));
        m["clientMessageId"] = format!("seq-{i}").into();
        c.queue(&m);
    }
    c.flush();
    for i in 0..500 {
        let ack = c.recv();
        assert_eq!(ack["clientMessageId"], format!("seq-{i}"));
    }
}

#[test]
fn message_ids_are_stable_per_user_and_key_and_fresh_without_a_key() {
    let s = TestServer::start(|_| {});
    let mut a = s.ws("1");
    let mut b = s.ws("2");
    let keyed = |c: &mut util::Client, user: u32, room: &str, key: &str| {
        let mut m = msg(user, room, "retry me");
        m["clientMessageId"] = key.into();
        c.send(&m);
        c.recv()["messageId"].as_str().expect("id").to_string()
    };
    let first = keyed(&mut a, 5, "1", "k-1");
    let retry_elsewhere = keyed(&mut b, 5, "2", "k-1");
    assert_eq!(
        first, retry_elsewhere,
        "a retry keeps its id, even on another connection"
    );
    assert_ne!(
        first,
        keyed(&mut a, 6, "1", "k-1"),
        "another user's key is another message"
    );
    assert_ne!(first, keyed(&mut a, 5, "1", "k-2"));

    a.send(&msg(5, "1", "no key"));
    let x = a.recv()["messageId"].as_str().expect("id").to_string();
    a.send(&msg(5, "1", "no key"));
    let y = a.recv()["messageId"].as_str().expect("id").to_string();
    assert_ne!(x, y);
    let (x, y) = (
        uuid::Uuid::parse_str(&x).expect("uuid"),
        uuid::Uuid::parse_str(&y).expect("uuid"),
    );
    assert_eq!(x.get_version_num(), 7);
    assert!(x < y, "v7 ids are time ordered");
}

#[test]
fn ping_is_answered_with_pong_and_close_with_close() {
    let s = TestServer::start(|_| {});
    let mut raw = raw_upgrade(s.addr, "7");
    raw.write_all(&client_frame(0x9, b"are you there", Some([1, 2, 3, 4])))
        .expect("ping");
    assert_eq!(read_frame(&mut raw), (0xA, b"are you there".to_vec()));
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    raw.write_all(&client_frame(0x8, &close, Some([9, 9, 9, 9])))
        .expect("close");
    let (op, payload) = read_frame(&mut raw);
    assert_eq!(op, 0x8);
    assert_eq!(close_code(&payload), 1000);
    assert_eq!(
        s.wait_metric("chatflow_disconnects_total{reason=\"client_close\"}", |v| v
            == 1),
        1
    );
}

fn assert_closed_with(raw: &mut std::net::TcpStream, code: u16) {
    let (op, payload) = read_frame(raw);
    assert_eq!(op, 0x8, "expected a close frame");
    assert_eq!(close_code(&payload), code);
}

#[test]
fn an_unmasked_frame_closes_with_1002() {
    let s = TestServer::start(|_| {});
    let mut raw = raw_upgrade(s.addr, "7");
    raw.write_all(&client_frame(
        0x1,
        msg(1, "7", "x").to_string().as_bytes(),
        None,
    ))
    .expect("send");
    assert_closed_with(&mut raw, 1002);
    assert_eq!(
        s.wait_metric(
            "chatflow_disconnects_total{reason=\"protocol_error\"}",
            |v| v == 1
        ),
        1
    );
}

#[test]
fn a_reserved_opcode_closes_with_1002() {
    let s = TestServer::start(|_| {});
    let mut raw = raw_upgrade(s.addr, "7");
    raw.write_all(&client_frame(0x3, b"??", Some([1, 1, 1, 1])))
        .expect("send");
    assert_closed_with(&mut raw, 1002);
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let s = TestServer::start(|_| {});
    let mut raw = raw_upgrade(s.addr, "7");
    raw.write_all(&client_frame(
        0x1,
        &[b'{', 0xff, 0xfe, b'}'],
        Some([5, 6, 7, 8]),
    ))
    .expect("send");
    assert_closed_with(&mut raw, 1007);
    assert_eq!(
        s.wait_metric("chatflow_disconnects_total{reason=\"invalid_utf8\"}", |v| v
            == 1),
        1
    );
}

#[test]
fn a_message_over_the_limit_closes_with_1009_and_one_at_it_passes() {
    let s = TestServer::start(|c| c.max_message_bytes = 1024);
    let mut raw = raw_upgrade(s.addr, "7");
    // Exactly at the limit: accepted (it is not a valid message, so it gets INVALID_JSON).
    raw.write_all(&client_frame(0x1, &[b' '; 1024], Some([1, 2, 3, 4])))
        .expect("send");
    let (op, payload) = read_frame(&mut raw);
    assert_eq!(op, 0x1);
    assert!(String::from_utf8_lossy(&payload).contains("INVALID_JSON"));
    raw.write_all(&client_frame(0x1, &[b' '; 1025], Some([1, 2, 3, 4])))
        .expect("send");
    assert_closed_with(&mut raw, 1009);
    assert_eq!(
        s.wait_metric(
            "chatflow_disconnects_total{reason=\"message_too_large\"}",
            |v| v == 1
        ),
        1
    );
}

#[test]
fn fragmented_messages_are_reassembled() {
    let s = TestServer::start(|_| {});
    let mut raw = raw_upgrade(s.addr, "7");
    let text = msg(3, "7", "in two parts").to_string();
    let (a, b) = text.as_bytes().split_at(10);
    let mut first = client_frame(0x1, a, Some([1, 2, 3, 4]));
    first[0] &= 0x7f; // not final
    raw.write_all(&first).expect("send");
    raw.write_all(&client_frame(0x0, b, Some([4, 3, 2, 1])))
        .expect("send");
    let (op, payload) = read_frame(&mut raw);
    assert_eq!(op, 0x1);
    let ack: Value = serde_json::from_slice(&payload).expect("json");
    assert_eq!(ack["message"], "in two parts");
}

#[test]
fn frames_sent_with_the_upgrade_request_are_not_lost() {
    let s = TestServer::start(|_| {});
    let mut stream = std::net::TcpStream::connect(s.addr).expect("connect");
    stream.set_read_timeout(Some(util::WAIT)).expect("timeout");
    let mut bytes = b"GET /chat/7 HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec();
    bytes.extend(client_frame(
        0x1,
        msg(1, "7", "eager").to_string().as_bytes(),
        Some([1, 2, 3, 4]),
    ));
    stream.write_all(&bytes).expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        std::io::Read::read_exact(&mut stream, &mut byte).expect("head");
        head.push(byte[0]);
    }
    let (_, payload) = read_frame(&mut stream);
    let ack: Value = serde_json::from_slice(&payload).expect("json");
    assert_eq!(ack["message"], "eager");
}

#[test]
fn rate_limited_messages_are_refused_without_closing() {
    let s = TestServer::start(|c| {
        c.rate_limit_per_sec = 1;
        c.rate_limit_burst = 3;
    });
    let mut c = s.ws("7");
    for i in 0..5 {
        let mut m = msg(1, "7", "spam");
        m["clientMessageId"] = format!("r{i}").into();
        c.queue(&m);
    }
    c.flush();
    let kinds: Vec<String> = (0..5)
        .map(|_| c.recv()["type"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(kinds, ["ack", "ack", "ack", "error", "error"]);
    assert_eq!(s.metric("chatflow_errors_total{code=\"RATE_LIMITED\"}"), 2);
    std::thread::sleep(Duration::from_millis(1100));
    c.send(&msg(1, "7", "later"));
    assert_eq!(c.recv()["type"], "ack", "the bucket refills");
}
