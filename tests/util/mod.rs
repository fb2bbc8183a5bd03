//! Test support: a server per test on a free port, and small blocking clients.
#![allow(dead_code)]

pub mod broker;
pub mod pg;
pub mod serve;
pub mod stores;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use chatflow::config::Config;
use chatflow::server::Server;
use serde_json::{Value, json};
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// An in-process server on 127.0.0.1 with a free port, stopped when dropped.
pub struct TestServer {
    server: Option<Server>,
    pub addr: SocketAddr,
    /// The admin address, when the test set `admin_listen`.
    pub admin: Option<SocketAddr>,
}

impl TestServer {
    /// Two reactors and defaults, changed by `tweak`.
    pub fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            reactors: 2,
            node_id: "test-node".into(),
            store: "memory".into(),
            ..Config::default()
        };
        tweak(&mut config);
        config.validate().expect("test config is valid");
        let server = Server::start(config).expect("server starts");
        let addr = server.local_addr();
        let admin = server.admin_addr();
        TestServer {
            server: Some(server),
            addr,
            admin,
        }
    }

    pub fn ws(&self, room: &str) -> Client {
        Client::connect(self.addr, room)
    }

    /// The value of one sample of `/metrics`, e.g. `chatflow_acks_total` or
    /// `chatflow_errors_total{code="RATE_LIMITED"}`.
    pub fn metric(&self, sample: &str) -> u64 {
        let text = self.server.as_ref().expect("running").metrics();
        metric_in(&text, sample)
    }

    /// Like [`TestServer::metric`], but `None` when the sample is absent.
    pub fn try_metric(&self, sample: &str) -> Option<u64> {
        let text = self.server.as_ref().expect("running").metrics();
        try_metric_in(&text, sample)
    }

    /// Polls `metric` until `ok` holds or the wait runs out; returns the last value.
    pub fn wait_metric(&self, sample: &str, ok: impl Fn(u64) -> bool) -> u64 {
        let start = Instant::now();
        loop {
            let v = self.metric(sample);
            if ok(v) || start.elapsed() > WAIT {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, path: &str) -> HttpReply {
        http(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"),
        )
    }

    /// Starts the drain and waits for the reactors to finish.
    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            s.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            s.join();
        }
    }
}

pub fn metric_in(text: &str, sample: &str) -> u64 {
    try_metric_in(text, sample).unwrap_or_else(|| panic!("metric {sample} missing"))
}

/// The value of `sample` in a `/metrics` text, or `None` when it is absent.
pub fn try_metric_in(text: &str, sample: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Sends raw request bytes and reads the whole response (the server closes after it).
pub fn http(addr: SocketAddr, request: &str) -> HttpReply {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    HttpReply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Tries an upgrade to `path` (e.g. `/chat/7?token=...`) with an optional Origin header;
/// `Err` carries the HTTP status of a refusal.
pub fn try_ws(addr: SocketAddr, path: &str, origin: Option<&str>) -> Result<Client, u16> {
    use tungstenite::client::IntoClientRequest;
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    if let Some(o) = origin {
        request
            .headers_mut()
            .insert("Origin", o.parse().expect("header value"));
    }
    match tungstenite::client::client(request, stream) {
        Ok((ws, _)) => Ok(Client { ws }),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(resp.status().as_u16())
        }
        Err(e) => panic!("handshake failed oddly: {e}"),
    }
}

/// A blocking WebSocket client.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr, room: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        let url = format!("ws://{addr}/chat/{room}");
        let (ws, resp) = tungstenite::client::client(url, stream).expect("upgrade");
        assert_eq!(resp.status(), 101);
        Client { ws }
    }

    pub fn send(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send");
    }

    /// Queues without flushing (to send many frames in one burst).
    pub fn queue(&mut self, v: &Value) {
        self.ws.write(Message::text(v.to_string())).expect("queue");
    }

    pub fn flush(&mut self) {
        self.ws.flush().expect("flush");
    }

    /// The next text frame as JSON (pings and pongs are skipped).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("bad JSON {e}: {t}"));
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(other) => panic!("expected a text frame, got {other:?}"),
                Err(e) => panic!("expected a text frame, got error {e}"),
            }
        }
    }

    /// The next text frame of `type`, skipping others (e.g. broadcasts while waiting for acks).
    pub fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv();
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Reads until the server's close frame; returns it.
    pub fn expect_close(&mut self) -> Option<CloseFrame> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(frame)) => return frame,
                Ok(_) => {}
                Err(e) => panic!("expected a close frame, got error {e}"),
            }
        }
    }

    /// True if nothing arrives within `d`.
    pub fn silent_for(&mut self, d: Duration) -> bool {
        self.ws
            .get_mut()
            .set_read_timeout(Some(d))
            .expect("timeout");
        let r = self.ws.read();
        self.ws
            .get_mut()
            .set_read_timeout(Some(WAIT))
            .expect("timeout");
        match r {
            Err(tungstenite::Error::Io(e)) => matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            other => panic!("expected silence, got {other:?}"),
        }
    }
}

/// A valid message from `user` in `room`, changed by the caller as needed.
pub fn msg(user: u32, room: &str, text: &str) -> Value {
    json!({
        "userId": user,
        "username": format!("user{user}"),
        "message": text,
        "timestamp": "2026-11-21T22:41:01.123Z",
        "messageType": "TEXT",
        "roomId": room,
    })
}

/// Upgrades a raw TCP stream by hand, for tests that must write frames tungstenite would refuse.
pub fn raw_upgrade(addr: SocketAddr, room: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        s,
        "GET /chat/{room} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("101 response");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// A client frame (FIN set) with the given opcode, masked unless `mask` is None.
pub fn client_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xffff => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Reads one server frame from a raw stream: (opcode, payload).
pub fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("frame header");
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).expect("len16");
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).expect("len64");
        len = u64::from_be_bytes(b);
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).expect("payload");
    (h[0] & 0x0f, payload)
}

/// The close code of a close frame payload.
pub fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}
