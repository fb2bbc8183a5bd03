//! End-to-end check: starts the built `tokio-chat` binary on a free port and
//! talks to it with blocking tungstenite clients.

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

type Client = WebSocket<TcpStream>;

/// Kills the server if the test fails half way.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokio-chat"))
        .args(["--listen", "127.0.0.1:0", "--threads", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tokio-chat");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    (Server(child), addr)
}

fn connect(addr: &str, path: &str) -> Result<Client, tungstenite::Error> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tungstenite::client(format!("ws://{addr}{path}"), tcp)
        .map(|(ws, _)| ws)
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
        })
}

fn send(ws: &mut Client, v: &Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

fn recv(ws: &mut Client) -> Value {
    loop {
        match ws.read().expect("a frame within 5 s") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Asserts that nothing arrives within a short while.
fn assert_silent(ws: &mut Client) {
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    match ws.read() {
        Err(tungstenite::Error::Io(e))
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
}

fn valid(client_message_id: &str) -> Value {
    json!({
        "userId": "12345",
        "username": "user12345",
        "message": "hello room ✓",
        "timestamp": "2026-11-21T22:41:01.123+01:00",
        "messageType": "text",
        "roomId": "7",
        "clientMessageId": client_message_id,
        "unknownField": true,
    })
}

#[test]
fn smoke() {
    let (mut server, addr) = start_server();
    let mut alice = connect(&addr, "/chat/7").unwrap();
    let mut bob = connect(&addr, "/chat/7").unwrap();
    let mut carol = connect(&addr, "/chat/8").unwrap();

    // A valid message: ack to the sender, broadcast to the other member only.
    send(&mut alice, &valid("c42-000017"));
    let ack = recv(&mut alice);
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["status"], "OK");
    assert_eq!(ack["clientMessageId"], "c42-000017");
    assert_eq!(ack["roomId"], "7");
    assert_eq!(ack["userId"], 12345);
    assert_eq!(ack["username"], "user12345");
    assert_eq!(ack["message"], "hello room ✓");
    assert_eq!(ack["messageType"], "TEXT");
    assert_eq!(ack["timestamp"], "2026-11-21T22:41:01.123+01:00");
    let server_ts = ack["serverTimestamp"].as_str().unwrap();
    assert!(
        server_ts.ends_with('Z') && server_ts.len() == 27,
        "{server_ts}"
    );
    let id = ack["messageId"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "5", "clientMessageId gives a UUIDv5: {id}");

    let msg = recv(&mut bob);
    assert_eq!(msg["type"], "message");
    assert!(msg.get("status").is_none(), "{msg}");
    assert_eq!(msg["messageId"], id.as_str());
    assert_eq!(msg["message"], "hello room ✓");
    assert_silent(&mut alice);
    assert_silent(&mut carol);

    // A retry keeps its id; no clientMessageId gives a fresh UUIDv7.
    send(&mut alice, &valid("c42-000017"));
    assert_eq!(recv(&mut alice)["messageId"], id.as_str());
    assert_eq!(recv(&mut bob)["messageId"], id.as_str());
    let mut no_cid = valid("x");
    no_cid.as_object_mut().unwrap().remove("clientMessageId");
    send(&mut bob, &no_cid);
    let ack = recv(&mut bob);
    assert_eq!(ack["clientMessageId"], Value::Null);
    assert_eq!(&ack["messageId"].as_str().unwrap()[14..15], "7");
    assert_eq!(recv(&mut alice)["type"], "message");

    // An invalid message: an error listing every bad field, nothing broadcast.
    send(
        &mut alice,
        &json!({"userId": 0, "username": "ab!", "message": "", "timestamp": "2026-11-21T22:41:01",
                "messageType": "SHOUT", "clientMessageId": "c42-000018"}),
    );
    let err = recv(&mut alice);
    assert_eq!(err["type"], "error");
    assert_eq!(err["status"], "ERROR");
    assert_eq!(err["code"], "VALIDATION_FAILED");
    assert_eq!(err["clientMessageId"], "c42-000018");
    let fields: Vec<&str> = err["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["userId", "username", "message", "timestamp", "messageType"]
    );
    assert_silent(&mut bob);

    // The other error codes; the connection stays open throughout.
    let mut wrong_room = valid("c1");
    wrong_room["roomId"] = json!("8");
    send(&mut alice, &wrong_room);
    assert_eq!(recv(&mut alice)["code"], "ROOM_MISMATCH");
    alice.send(Message::text("{not json")).unwrap();
    assert_eq!(recv(&mut alice)["code"], "INVALID_JSON");
    alice.send(Message::text("[1,2]")).unwrap();
    assert_eq!(recv(&mut alice)["code"], "INVALID_JSON");
    alice.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(recv(&mut alice)["code"], "UNSUPPORTED_FRAME");
    assert_silent(&mut bob);

    // Ping is answered with pong.
    alice.send(Message::Ping(b"hi".to_vec().into())).unwrap();
    assert!(matches!(alice.read().unwrap(), Message::Pong(p) if p.as_ref() == b"hi"));

    // Still usable after all the errors.
    send(&mut alice, &valid("c42-000019"));
    assert_eq!(recv(&mut alice)["type"], "ack");
    assert_eq!(recv(&mut bob)["clientMessageId"], "c42-000019");

    // Bad paths are rejected during the handshake.
    for (path, status) in [("/chat/a.b", 400), ("/chat/", 400), ("/nope", 404)] {
        match connect(&addr, path) {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), status, "{path}"),
            other => panic!("{path}: expected HTTP {status}, got {other:?}"),
        }
    }

    // A client close is answered with close.
    bob.close(None).unwrap();
    loop {
        match bob.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close: {e}"),
        }
    }

    // A message over the 64 KiB limit closes the connection with 1009.
    carol.send(Message::text("x".repeat(70 * 1024))).unwrap();
    match carol.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }

    // SIGTERM stops the server cleanly.
    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = server.0.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}
