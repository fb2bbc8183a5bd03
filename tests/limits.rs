//! Limits and their policies: slow readers, stalled handshakes, idle clients, connection caps.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use util::{TestServer, msg, raw_upgrade, read_frame};

#[test]
fn a_client_that_never_reads_is_disconnected_and_output_stays_bounded() {
    let hard = 256 * 1024;
    let s = TestServer::start(|c| {
        c.reactors = 1;
        c.output_hard_limit_bytes = hard;
        c.output_soft_limit_bytes = 64 * 1024;
        c.output_soft_limit_ms = 500;
        // Small kernel buffers so the server's own queue fills quickly.
        c.socket_send_buffer_bytes = 8 * 1024;
    });
    let sleeper = raw_upgrade(s.addr, "busy");
    sleeper.set_nonblocking(false).ok();
    let mut talker = s.ws("busy");
    let text = "x".repeat(400);
    let mut peak = 0;
    let start = Instant::now();
    let mut sent = 0;
    while s.metric("chatflow_disconnects_total{reason=\"slow_consumer\"}") == 0 {
        assert!(
            start.elapsed() < util::WAIT,
            "the slow reader was never dropped"
        );
        for _ in 0..100 {
            talker.queue(&msg(1, "busy", &text));
        }
        talker.flush();
        for _ in 0..100 {
            talker.recv_type("ack");
        }
        sent += 100;
        peak = peak.max(s.metric("chatflow_output_queued_bytes"));
    }
    assert!(sent > 100, "it took traffic to fill the queue");
    assert!(
        peak <= hard as u64 + 64 * 1024,
        "queued output peaked at {peak} bytes"
    );
    // The reader that kept up is unaffected.
    talker.send(&msg(1, "busy", "still fine"));
    assert_eq!(talker.recv_type("ack")["message"], "still fine");
    // The sleeper's socket is closed by the server.
    let mut sleeper = sleeper;
    sleeper.set_read_timeout(Some(util::WAIT)).ok();
    let mut buf = vec![0u8; 1 << 20];
    let deadline = Instant::now() + util::WAIT;
    loop {
        match sleeper.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(Instant::now() < deadline, "sleeper never closed"),
        }
    }
}

#[test]
fn a_half_sent_handshake_blocks_nobody_and_times_out() {
    let s = TestServer::start(|c| {
        c.reactors = 1;
        c.handshake_timeout_ms = 500;
    });
    let mut stalled = TcpStream::connect(s.addr).expect("connect");
    stalled
        .write_all(b"GET /chat/1 HTTP/1.1\r\nHost: slow")
        .expect("half");
    // The only reactor still serves others meanwhile.
    let mut c = s.ws("1");
    c.send(&msg(1, "1", "not blocked"));
    assert_eq!(c.recv()["type"], "ack");
    assert_eq!(s.get("/health").status, 200);
    // And the stalled one is dropped after the timeout.
    stalled.set_read_timeout(Some(util::WAIT)).expect("timeout");
    let start = Instant::now();
    let mut buf = [0u8; 64];
    assert!(matches!(stalled.read(&mut buf), Ok(0) | Err(_)));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(
        s.metric("chatflow_disconnects_total{reason=\"handshake_timeout\"}"),
        1
    );
}

#[test]
fn a_silent_websocket_is_pinged_then_closed() {
    let s = TestServer::start(|c| {
        c.ping_interval_ms = 200;
        c.idle_timeout_ms = 800;
    });
    let mut raw = raw_upgrade(s.addr, "1");
    let (op, _) = read_frame(&mut raw);
    assert_eq!(op, 0x9, "a ping after the interval");
    // Never answer: the idle timeout closes with 1000.
    let (op, payload) = read_frame(&mut raw);
    assert_eq!(op, 0x8);
    assert_eq!(util::close_code(&payload), 1000);
    assert_eq!(
        s.wait_metric("chatflow_disconnects_total{reason=\"idle_timeout\"}", |v| v
            == 1),
        1
    );
}

#[test]
fn a_client_answering_pings_stays_connected() {
    let s = TestServer::start(|c| {
        c.ping_interval_ms = 100;
        c.idle_timeout_ms = 400;
    });
    let mut c = s.ws("1");
    // tungstenite answers pings while reading; keep reading past several idle timeouts.
    let until = Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    while Instant::now() < until {
        c.ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .ok();
        match c.ws.read() {
            Ok(tungstenite::Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(_)) => {}
            Err(e) => panic!("closed: {e}"),
        }
    }
    assert!(pings >= 3, "{pings} pings");
    c.ws.get_mut().set_read_timeout(Some(util::WAIT)).ok();
    c.send(&msg(1, "1", "alive"));
    assert_eq!(c.recv()["type"], "ack");
}

#[test]
fn at_the_connection_limit_new_clients_wait_until_a_slot_frees() {
    let s = TestServer::start(|c| {
        c.reactors = 1;
        c.max_connections = 4;
    });
    let mut held: Vec<_> = (0..4).map(|_| s.ws("cap")).collect();
    // A fifth completes TCP (kernel backlog) but is not served.
    let mut waiting = TcpStream::connect(s.addr).expect("connect");
    waiting
        .write_all(b"GET /health HTTP/1.1\r\n\r\n")
        .expect("send");
    waiting
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    assert!(waiting.read(&mut buf).is_err(), "served beyond the limit");
    assert!(s.metric("chatflow_accept_paused_total") >= 1);
    // Below 90% of the limit accepting resumes and the waiting client is answered.
    held.pop();
    waiting.set_read_timeout(Some(util::WAIT)).expect("timeout");
    let n = waiting.read(&mut buf).expect("served after a slot freed");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(held);
}

#[test]
fn with_one_shared_accept_queue_a_full_reactor_holds_nobody_back() {
    // Two reactors with room for 10 connections each, and exactly 20 clients: a per-reactor
    // queue leaves some waiting behind a full reactor unless the hash splits them 10/10
    // (18% of the time); a shared queue lets the reactor with room take them.
    let s = TestServer::start(|c| {
        c.reactors = 2;
        c.max_connections = 20;
        c.reuse_port = false;
    });
    let mut clients: Vec<_> = (0..20).map(|_| s.ws("shared")).collect();
    let on = |r: u32| s.metric(&format!("chatflow_reactor_connections{{reactor=\"{r}\"}}"));
    assert_eq!((on(0), on(1)), (10, 10));
    clients[0].send(&msg(1, "shared", "over one queue"));
    assert_eq!(clients[0].recv()["type"], "ack");
    for c in clients.iter_mut().skip(1) {
        assert_eq!(c.recv()["message"], "over one queue");
    }
}
