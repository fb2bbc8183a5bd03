//! Access tokens, origin allow-list and the admin address.

mod util;

use chatflow::auth::{Claims, mint, unix_now};
use util::{TestServer, http, msg, try_ws};

const SECRET: &str = "a-test-secret-of-some-length";

fn token(user: u32, rooms: &[&str], exp: u64) -> String {
    let claims = Claims {
        sub: user,
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        exp,
    };
    mint(SECRET.as_bytes(), &claims)
}

fn with_auth() -> TestServer {
    TestServer::start(|c| c.auth_secret = SECRET.into())
}

#[test]
fn a_valid_token_opens_its_room_and_binds_the_user() {
    let s = with_auth();
    let t = token(42, &["7"], unix_now() + 60);
    let mut c = try_ws(s.addr, &format!("/chat/7?token={t}"), None).expect("upgrade");
    c.send(&msg(42, "7", "me"));
    assert_eq!(c.recv()["type"], "ack");
    let mut m = msg(43, "7", "someone else");
    m["clientMessageId"] = "imp-1".into();
    c.send(&m);
    let err = c.recv();
    assert_eq!(err["code"], "UNAUTHORIZED");
    assert_eq!(err["clientMessageId"], "imp-1");
    assert_eq!(s.metric("chatflow_errors_total{code=\"UNAUTHORIZED\"}"), 1);
    c.send(&msg(42, "7", "still me"));
    assert_eq!(c.recv()["type"], "ack", "the connection stays open");
}

#[test]
fn forged_expired_wrong_room_and_missing_tokens_get_401() {
    let s = with_auth();
    let good = token(42, &["7"], unix_now() + 60);
    let forged = mint(
        b"not-the-server-secret",
        &Claims {
            sub: 42,
            rooms: vec!["7".into()],
            exp: unix_now() + 60,
        },
    );
    let expired = token(42, &["7"], unix_now() - 1);
    let tampered = format!("{}x", good);
    let forged_and_expired = mint(
        b"not-the-server-secret",
        &Claims {
            sub: 42,
            rooms: vec!["7".into()],
            exp: 1,
        },
    );
    // Each refusal names its reason; a bad signature is reported before anything the claims
    // say, so the 401 never tells a forger whether the rest of a token would pass.
    for (path, why, reason) in [
        (format!("/chat/7?token={forged}"), "forged", "signature"),
        (
            format!("/chat/7?token={forged_and_expired}"),
            "forged and expired",
            "signature",
        ),
        (format!("/chat/7?token={expired}"), "expired", "expired"),
        (
            format!("/chat/8?token={good}"),
            "wrong room",
            "does not open this room",
        ),
        (format!("/chat/7?token={tampered}"), "tampered", "signature"),
        ("/chat/7?token=garbage".to_string(), "garbage", "malformed"),
        ("/chat/7".to_string(), "missing", "required"),
    ] {
        assert_eq!(try_ws(s.addr, &path, None).err(), Some(401), "{why}");
        let raw = format!(
            "GET {path} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        let body = http(s.addr, &raw).json();
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(reason)),
            "{why}: {body}"
        );
    }
    let any = token(5, &["*"], unix_now() + 60);
    assert!(try_ws(s.addr, &format!("/chat/anything?token={any}"), None).is_ok());
}

#[test]
fn only_listed_origins_may_upgrade() {
    let s = TestServer::start(|c| c.allowed_origins = vec!["https://chat.example.com".into()]);
    assert!(try_ws(s.addr, "/chat/7", Some("https://chat.example.com")).is_ok());
    assert_eq!(
        try_ws(s.addr, "/chat/7", Some("https://evil.example.com")).err(),
        Some(403)
    );
    assert!(
        try_ws(s.addr, "/chat/7", None).is_ok(),
        "non-browser clients send no Origin"
    );
}

#[test]
fn admin_routes_move_to_the_admin_address() {
    let s = TestServer::start(|c| c.admin_listen = "127.0.0.1:0".into());
    let admin = s.admin.expect("admin address");
    assert_eq!(s.get("/metrics").status, 404, "not on the public address");
    assert_eq!(s.get("/health").status, 200);
    let get = |path: &str| http(admin, &format!("GET {path} HTTP/1.1\r\n\r\n"));
    assert_eq!(get("/metrics").status, 200);
    assert_eq!(get("/api/rooms/7/presence").status, 200);
    assert_eq!(get("/health").status, 200);
    assert_eq!(
        try_ws(admin, "/chat/7", None).err(),
        Some(404),
        "no chat on the admin address"
    );
    let mut c = s.ws("7");
    c.send(&msg(1, "7", "public still chats"));
    assert_eq!(c.recv()["type"], "ack");
}

#[test]
fn the_token_command_mints_what_the_server_accepts() {
    let dir = std::env::temp_dir().join(format!("chatflow-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("secret");
    std::fs::write(&file, format!("{SECRET}\n")).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatflow"))
        .args([
            "token",
            "--user",
            "9",
            "--rooms",
            "3,4",
            "--ttl-secs",
            "60",
            "--secret-file",
        ])
        .arg(&file)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = file.display().to_string();
    let s = TestServer::start(|c| c.auth_secret_file = path);
    let mut c = try_ws(s.addr, &format!("/chat/4?token={t}"), None).expect("upgrade");
    c.send(&msg(9, "4", "minted"));
    assert_eq!(c.recv()["type"], "ack");
    assert_eq!(
        try_ws(s.addr, &format!("/chat/5?token={t}"), None).err(),
        Some(401)
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_chatflow"))
        .args(["token", "--user", "0", "--secret-file"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_session_ends_when_its_token_expires() {
    let s = with_auth();
    let t = token(42, &["7"], unix_now() + 2);
    let mut c = try_ws(s.addr, &format!("/chat/7?token={t}"), None).expect("upgrade");
    c.send(&msg(42, "7", "before expiry"));
    assert_eq!(c.recv()["type"], "ack");
    let close = c.expect_close().expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(
        s.metric("chatflow_disconnects_total{reason=\"token_expired\"}"),
        1
    );
}

#[test]
fn room_routes_follow_the_room_token() {
    let s = with_auth();
    let t = token(42, &["7"], unix_now() + 60);
    assert_eq!(s.get("/api/rooms/7/presence").status, 401);
    assert_eq!(
        s.get(&format!("/api/rooms/8/presence?token={t}")).status,
        401
    );
    assert_eq!(
        s.get(&format!("/api/rooms/7/presence?token={t}")).status,
        200
    );
    assert_eq!(s.get("/api/rooms/7/messages").status, 401);
    assert_eq!(
        s.get(&format!("/api/rooms/7/messages?token={t}")).status,
        200
    );
}

#[test]
fn with_tokens_on_operator_queries_need_a_token_for_every_room() {
    let s = with_auth();
    let room = token(42, &["7"], unix_now() + 60);
    let every = token(1, &["*"], unix_now() + 60);
    for route in [
        "/api/analytics",
        "/api/active-users",
        "/api/metrics",
        "/api/users/42/messages",
        "/api/users/42/rooms",
    ] {
        let sep = if route.contains('?') { '&' } else { '?' };
        let bare = s.get(route);
        assert_eq!(bare.status, 401, "{route} without a token");
        let scoped = s.get(&format!("{route}{sep}token={room}"));
        assert_eq!(scoped.status, 401, "{route} with one room's token");
        assert!(
            scoped.json()["error"]
                .as_str()
                .unwrap_or_default()
                .contains("--rooms '*'"),
            "the 401 says what is needed: {}",
            scoped.body
        );
        assert_eq!(
            s.get(&format!("{route}{sep}token={every}")).status,
            200,
            "{route} with a token for every room"
        );
    }
}

#[test]
fn origins_match_as_browsers_send_them() {
    let s = TestServer::start(|c| c.allowed_origins = vec!["HTTPS://Chat.Example.com:443".into()]);
    assert!(try_ws(s.addr, "/chat/7", Some("https://chat.example.com")).is_ok());
    assert_eq!(try_ws(s.addr, "/chat/7", Some("null")).err(), Some(403));
    assert_eq!(
        try_ws(s.addr, "/chat/7", Some("https://chat.example.com:8443")).err(),
        Some(403)
    );
}

#[test]
fn with_an_admin_address_each_route_has_one_home() {
    let s = TestServer::start(|c| c.admin_listen = "127.0.0.1:0".into());
    let admin = s.admin.expect("admin address");
    let on_admin = |path: &str| http(admin, &format!("GET {path} HTTP/1.1\r\n\r\n")).status;
    // Operator routes only on the admin address.
    for path in [
        "/metrics",
        "/dashboard",
        "/api/analytics",
        "/api/users/5/rooms",
    ] {
        assert_eq!(s.get(path).status, 404, "{path} on the public address");
    }
    assert_eq!(on_admin("/dashboard"), 200);
    // The chat page and its room routes only on the public address.
    assert_eq!(s.get("/").status, 200);
    assert_eq!(on_admin("/"), 404);
    assert_eq!(
        s.get("/api/rooms/7/presence").status,
        200,
        "the chat page needs it"
    );
    assert_eq!(
        s.get("/api/rooms/7/messages").status,
        200,
        "the chat page's history is public"
    );
    assert_eq!(on_admin("/api/analytics"), 200);
}
