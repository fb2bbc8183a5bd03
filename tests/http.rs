//! HTTP routes on the WebSocket port.

mod util;

use serde_json::{Value, json};
use util::{TestServer, http};

#[test]
fn health_reports_the_node_and_its_connections() {
    let s = TestServer::start(|_| {});
    let _a = s.ws("1");
    let _b = s.ws("2");
    let r = s.get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let v = r.json();
    assert_eq!(v["status"], "UP");
    assert_eq!(v["nodeId"], "test-node");
    assert_eq!(v["connections"], 2);
    assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
}

#[test]
fn ready_names_its_dependencies() {
    let s = TestServer::start(|_| {});
    let r = s.get("/ready");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["status"], "READY");
    assert_eq!(v["bus"]["kind"], "local");
    assert_eq!(v["bus"]["up"], true);
    assert_eq!(v["draining"], false);
}

#[test]
fn metrics_are_prometheus_text_with_the_core_families() {
    let s = TestServer::start(|_| {});
    let mut c = s.ws("1");
    c.send(&util::msg(1, "1", "count me"));
    c.recv();
    c.send_text("nope");
    c.recv();
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4"))
    );
    for family in [
        "chatflow_connections",
        "chatflow_frames_in_total",
        "chatflow_frames_out_total",
        "chatflow_bytes_in_total",
        "chatflow_bytes_out_total",
        "chatflow_acks_total",
        "chatflow_errors_total",
        "chatflow_fanout_deliveries_total",
        "chatflow_fanout_dropped_total",
        "chatflow_reactor_queue_depth",
        "chatflow_disconnects_total",
        "chatflow_output_queued_bytes",
    ] {
        assert!(
            r.body.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }
    assert_eq!(util::metric_in(&r.body, "chatflow_acks_total"), 1);
    assert_eq!(
        util::metric_in(&r.body, "chatflow_errors_total{code=\"INVALID_JSON\"}"),
        1
    );
    assert_eq!(
        util::metric_in(&r.body, "chatflow_messages_total{type=\"TEXT\"}"),
        1
    );
}

fn assert_json_error(r: &util::HttpReply, status: u16) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert!(!r.body.contains('\n'), "one line: {}", r.body);
    assert!(
        r.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{}",
        r.body
    );
}

#[test]
fn errors_are_one_line_json_with_the_right_status() {
    let s = TestServer::start(|_| {});
    assert_json_error(&s.get("/nope"), 404);
    assert_json_error(&s.get("/chat/7/extra"), 404);
    assert_json_error(&s.get("/api/unknown"), 404);
    assert_json_error(&s.get("/chat/bad.room"), 400);
    assert_json_error(&s.get(&format!("/chat/{}", "x".repeat(65))), 400);
    let plain = s.get("/chat/7");
    assert_json_error(&plain, 426);
    assert_eq!(plain.header("sec-websocket-version").as_deref(), Some("13"));
    let post = http(s.addr, "POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_json_error(&post, 405);
    assert!(post.header("allow").is_some_and(|a| a.contains("GET")));
    assert_json_error(&http(s.addr, "\x16\x03\x01\x02\x00 garbage\r\n\r\n"), 400);
    let no_key = "GET /chat/7 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_json_error(&http(s.addr, no_key), 400);
}

#[test]
fn query_routes_answer_json_and_bad_parameters_get_400() {
    let s = TestServer::start(|_| {});
    for path in [
        "/api/rooms/7/messages?start=2026-01-01T00:00:00Z&end=2026-01-02T00:00:00Z",
        "/api/users/5/messages",
        "/api/users/5/rooms",
    ] {
        let r = s.get(path);
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.json(), json!([]), "{path}: an empty store has nothing");
    }
    assert_eq!(s.get("/api/active-users").json()["count"], 0);
    assert_eq!(s.get("/api/analytics").json()["totalMessages"], 0);
    assert_eq!(s.get("/api/metrics").json()["roomId"], Value::Null);
    for (path, complaint) in [
        (
            "/api/rooms/7/messages?start=yesterday",
            "start must be an RFC 3339",
        ),
        (
            "/api/rooms/7/messages?end=2026-01-01",
            "end must be an RFC 3339",
        ),
        (
            "/api/rooms/7/messages?start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z",
            "start must not be after end",
        ),
        (
            "/api/rooms/7/messages?limit=0",
            "limit must be an integer between 1 and 10000",
        ),
        (
            "/api/rooms/7/messages?limit=10001",
            "limit must be an integer between 1 and 10000",
        ),
        ("/api/rooms/7/messages?limit=ten", "limit must be"),
        ("/api/rooms/7/messages?take=middle", "take must be"),
        (
            "/api/users/0/messages",
            "userId must be an integer between 1 and 100000",
        ),
        ("/api/users/x/rooms", "userId must be"),
        (
            "/api/analytics?topN=0",
            "topN must be an integer between 1 and 1000",
        ),
        ("/api/metrics?roomId=a.b", "roomId must be"),
        ("/api/metrics?userId=100001", "userId must be"),
        ("/api/active-users?start=%ZZ", "bad percent-encoding"),
    ] {
        let r = s.get(path);
        assert_json_error(&r, 400);
        let error = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains(complaint), "{path}: {error}");
    }
    // A zone offset may come percent-encoded or with a literal plus sign.
    for path in [
        "/api/active-users?start=2026-01-01T00:00:00%2B02:00",
        "/api/active-users?start=2026-01-01T00:00:00+02:00",
    ] {
        assert_eq!(s.get(path).status, 200, "{path}");
    }
}

#[test]
fn an_oversized_request_head_gets_431() {
    let s = TestServer::start(|c| c.max_request_head_bytes = 1024);
    let big = format!(
        "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2000)
    );
    assert_json_error(&http(s.addr, &big), 431);
    assert_eq!(s.get("/health").status, 200, "the server carries on");
}

#[test]
fn head_requests_get_headers_only() {
    let s = TestServer::start(|_| {});
    let r = http(s.addr, "HEAD /health HTTP/1.1\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert!(r.header("content-length").is_some_and(|l| l != "0"));
}
