//! `chatflow load` against a real server: exact accounting, retries and reconnects through a
//! proxy that cuts connections, the report files, the open-loop schedule, fan-out, idle mode.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use chatflow::load::{LoadArgs, execute};
use serde_json::Value;
use util::TestServer;

/// Runs the load tester in this process with `chatflow load` flags; returns the JSON summary.
fn load(addr: SocketAddr, flags: &[&str]) -> Value {
    let url = format!("ws://{addr}");
    let mut argv = vec!["load", "--url", &url, "--no-progress"];
    argv.extend_from_slice(flags);
    let args = LoadArgs::from_args(argv).expect("valid flags");
    execute(&args).expect("the run completes").summary().clone()
}

fn n(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

/// Every message sent is acked or failed, in all and per phase; and when the test knows how
/// many messages the run planned (a message-count run), every one of them was sent.
fn assert_exact(v: &Value, planned: Option<u64>) {
    if let Some(planned) = planned {
        assert_eq!(
            n(v, "/sent"),
            planned,
            "planned messages not all sent: {v:#}"
        );
        assert_eq!(n(v, "/unsent"), 0, "{v:#}");
    }
    assert_eq!(
        n(v, "/sent"),
        n(v, "/acked") + n(v, "/failed"),
        "sent != acked + failed: {v:#}"
    );
    for phase in ["warmup", "main"] {
        if let Some(p) = v.pointer(&format!("/phases/{phase}")) {
            assert_eq!(n(p, "/sent"), n(p, "/acked") + n(p, "/failed"), "{phase}");
        }
    }
}

/// A fresh empty folder under the system's temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chatflow-load-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn a_small_run_accounts_for_every_message_warmup_and_main_apart() {
    // Acks after commit, so the store holds every acked message when the run ends.
    let s = TestServer::start(|c| c.ack_after = chatflow::config::AckAfter::Persisted);
    let v = load(
        s.addr,
        &[
            "--messages",
            "2400",
            "--warmup-conns",
            "4",
            "--warmup-messages",
            "100",
            "--conns",
            "8",
            "--rooms",
            "4",
            "--inflight",
            "4",
            "--rtt-probe",
            "20",
        ],
    );
    assert_exact(&v, Some(2400));
    assert_eq!(n(&v, "/sent"), 2400);
    assert_eq!(n(&v, "/acked"), 2400);
    assert_eq!(n(&v, "/failed"), 0);
    assert_eq!(n(&v, "/phases/warmup/sent"), 400);
    assert_eq!(n(&v, "/phases/main/sent"), 2000);
    assert_eq!(n(&v, "/phases/probe/acked"), 20);
    assert_eq!(n(&v, "/connections"), 12);
    assert_eq!(n(&v, "/reconnections"), 0);
    let types = ["TEXT", "JOIN", "LEAVE"]
        .iter()
        .map(|t| n(&v, &format!("/message_types/{t}")))
        .sum::<u64>();
    assert_eq!(types, 2400);
    assert!(n(&v, "/message_types/TEXT") > n(&v, "/message_types/JOIN"));
    let rooms = v["per_room_msgs_per_s"].as_object().expect("per-room map");
    assert_eq!(rooms.len(), 4);
    assert!(f(&v, "/p50_ms") > 0.0 && f(&v, "/p99_ms") >= f(&v, "/p50_ms"));
    assert!(f(&v, "/littles_law/predicted_msgs_per_s") > 0.0);
    assert_eq!(n(&v, "/littles_law/concurrency"), 32);
    assert!(f(&v, "/client/load_thread_cpu_s") > 0.0);
    // The server's own account of the run (GET /api/metrics): every message stored once.
    assert_eq!(v["server_metrics"]["available"], true);
    assert_eq!(
        n(&v, "/server_metrics/body/analytics/totalMessages"),
        2400 + n(&v, "/phases/probe/acked")
    );
}

#[test]
fn the_command_prints_the_report_and_json_as_its_last_line() {
    let s = TestServer::start(|_| {});
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatflow"))
        .args([
            "load",
            "--url",
            &format!("ws://{}", s.addr),
            "--messages",
            "1000",
            "--warmup-conns",
            "0",
            "--conns",
            "4",
            "--rooms",
            "2",
            "--rtt-probe",
            "10",
            "--json",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Part 1: throughput"), "{stdout}");
    assert!(stdout.contains("Little's Law"), "{stdout}");
    assert!(
        stdout.contains("Server metrics (GET /api/metrics)") && stdout.contains("stored messages"),
        "the server's metrics are summarised: {stdout}"
    );
    let last = stdout.lines().last().expect("output");
    let v: Value = serde_json::from_str(last).expect("the last line is JSON");
    for field in [
        "sent",
        "acked",
        "failed",
        "wall_s",
        "msgs_per_s",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "connections",
        "reconnections",
    ] {
        assert!(v.get(field).is_some_and(|x| !x.is_null()), "{field}: {v:#}");
    }
    assert_eq!(n(&v, "/acked"), 1000);
    assert_exact(&v, Some(1000));
}

/// A TCP proxy in front of the server that cuts every connection once `budget` bytes have gone
/// from the server to the client.
struct CuttingProxy {
    addr: SocketAddr,
    cuts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(server: SocketAddr, budget: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let cuts = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st) = (cuts.clone(), stop.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).expect("blocking");
                        let Ok(upstream) = TcpStream::connect(server) else {
                            continue;
                        };
                        Self::pipe(client, upstream, budget, c.clone());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        CuttingProxy { addr, cuts, stop }
    }

    fn pipe(client: TcpStream, upstream: TcpStream, budget: u64, cuts: Arc<AtomicU64>) {
        let (mut c_read, mut u_write) = (
            client.try_clone().expect("clone"),
            upstream.try_clone().expect("clone"),
        );
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(k) = c_read.read(&mut buf) {
                if k == 0 || u_write.write_all(&buf[..k]).is_err() {
                    break;
                }
            }
            let _ = u_write.shutdown(Shutdown::Both);
        });
        let (mut u_read, mut c_write) = (upstream, client);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut passed = 0u64;
            loop {
                let want = (budget - passed).min(buf.len() as u64) as usize;
                match u_read.read(&mut buf[..want]) {
                    Ok(k) if k > 0 && c_write.write_all(&buf[..k]).is_ok() => {
                        passed += k as u64;
                        if passed >= budget {
                            cuts.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    _ => break,
                }
            }
            let _ = c_write.shutdown(Shutdown::Both);
            let _ = u_read.shutdown(Shutdown::Both);
        });
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn cut_connections_are_reconnected_and_their_messages_retried() {
    let s = TestServer::start(|_| {});
    let proxy = CuttingProxy::start(s.addr, 12 * 1024);
    let v = load(
        proxy.addr,
        &[
            "--messages",
            "2000",
            "--warmup-conns",
            "0",
            "--conns",
            "8",
            "--rooms",
            "4",
            "--inflight",
            "4",
            "--rtt-probe",
            "0",
            "--retry-backoff-ms",
            "5",
            "--no-server-metrics",
        ],
    );
    assert_exact(&v, Some(2000));
    assert_eq!(n(&v, "/sent"), 2000);
    assert!(proxy.cuts.load(Ordering::Relaxed) > 0);
    assert!(n(&v, "/reconnections") > 0, "{v:#}");
    assert!(n(&v, "/retries") > 0, "{v:#}");
    assert!(n(&v, "/disconnects") > 0, "{v:#}");
    // Resends keep their clientMessageId, and each cut loses at most a window: nearly every
    // message gets through.
    assert!(n(&v, "/acked") >= 1900, "{v:#}");
}

#[test]
fn retryable_errors_are_retried_with_backoff() {
    let s = TestServer::start(|c| {
        c.rate_limit_per_sec = 400;
        c.rate_limit_burst = 20;
    });
    let v = load(
        s.addr,
        &[
            "--messages",
            "600",
            "--warmup-conns",
            "0",
            "--conns",
            "2",
            "--rooms",
            "2",
            "--inflight",
            "16",
            "--rtt-probe",
            "0",
            "--retry-backoff-ms",
            "20",
            "--no-server-metrics",
        ],
    );
    assert_exact(&v, Some(600));
    assert!(n(&v, "/error_frames/RATE_LIMITED") > 0, "{v:#}");
    assert!(n(&v, "/retries") > 0, "{v:#}");
    assert_eq!(n(&v, "/reconnections"), 0);
}

#[test]
fn every_output_file_is_written_and_well_formed() {
    let s = TestServer::start(|_| {});
    let dir = temp_dir("files");
    let out = dir.to_string_lossy().into_owned();
    let v = load(
        s.addr,
        &[
            "--messages",
            "1500",
            "--warmup-conns",
            "2",
            "--warmup-messages",
            "250",
            "--conns",
            "4",
            "--rooms",
            "2",
            "--rtt-probe",
            "20",
            "--bucket-secs",
            "1",
            "--out",
            &out,
        ],
    );
    assert_exact(&v, Some(1500));

    let csv = std::fs::read_to_string(dir.join("messages.csv")).expect("messages.csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("timestamp,messageType,latencyMs,statusCode,roomId,phase")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len() as u64, n(&v, "/sent"), "one row per message");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    for row in &rows {
        let cols: Vec<&str> = row.split(',').collect();
        assert_eq!(cols.len(), 6, "{row}");
        let ts: u64 = cols[0].parse().expect("timestamp");
        assert!(ts <= now_ms && ts + 600_000 > now_ms, "{row}");
        assert!(["TEXT", "JOIN", "LEAVE"].contains(&cols[1]), "{row}");
        cols[2].parse::<f64>().expect("latency");
        assert_eq!(cols[3], "OK", "{row}");
        assert!(["1", "2"].contains(&cols[4]), "{row}");
        assert!(["warmup", "main"].contains(&cols[5]), "{row}");
    }

    let tp = std::fs::read_to_string(dir.join("throughput.csv")).expect("throughput.csv");
    let mut tl = tp.lines();
    assert_eq!(
        tl.next(),
        Some("phase,start_s,end_s,acked,failed,msgs_per_s,p50_ms,p99_ms")
    );
    let mut acked = 0;
    for row in tl {
        let cols: Vec<&str> = row.split(',').collect();
        assert_eq!(cols.len(), 8, "{row}");
        assert!(["warmup", "main"].contains(&cols[0]), "{row}");
        acked += cols[3].parse::<u64>().expect("acked");
        cols[5].parse::<f64>().expect("msg/s");
    }
    assert_eq!(acked, n(&v, "/acked"));

    for name in [
        "latency-main.hgrm",
        "latency-warmup.hgrm",
        "latency-probe.hgrm",
    ] {
        let h = std::fs::read_to_string(dir.join(name)).expect(name);
        assert!(
            h.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"),
            "{name}"
        );
        assert!(h.contains("#[Mean    ="), "{name}");
        assert!(h.contains("#[Buckets ="), "{name}");
        let data: Vec<&str> = h
            .lines()
            .skip(2)
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert!(!data.is_empty(), "{name}");
        for l in data {
            let cols: Vec<f64> = l
                .split_whitespace()
                .map(|c| c.parse().expect("number"))
                .collect();
            assert!(cols.len() == 3 || cols.len() == 4, "{name}: {l}");
        }
    }

    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("summary.json")).expect("summary.json"),
    )
    .expect("summary.json is JSON");
    assert_eq!(summary, v);
    assert!(
        std::fs::read_to_string(dir.join("report.txt"))
            .expect("report.txt")
            .contains("Part 1: throughput")
    );

    for name in ["throughput.svg", "latency.svg"] {
        let text = std::fs::read_to_string(dir.join(name)).expect(name);
        let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg", "{name}");
        let lines = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline") || n.has_tag_name("path"))
            .count();
        assert!(lines > 0, "{name} draws no series");
    }
    let listed: Vec<&str> = v["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for name in listed {
        assert!(dir.join(name).is_file(), "{name} is listed but missing");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn open_loop_holds_its_schedule() {
    let s = TestServer::start(|_| {});
    let v = load(
        s.addr,
        &[
            "--rate",
            "2000",
            "--duration",
            "3",
            "--warmup-conns",
            "0",
            "--conns",
            "4",
            "--rooms",
            "4",
            "--rtt-probe",
            "0",
            "--no-server-metrics",
        ],
    );
    assert_exact(&v, None);
    let sent = n(&v, "/sent");
    assert!(
        (5700..=6300).contains(&sent),
        "6000 +-5% expected, sent {sent}"
    );
    let achieved = f(&v, "/rate/achieved_msgs_per_s");
    assert!(
        (1900.0..=2100.0).contains(&achieved),
        "2000 msg/s +-5% expected, got {achieved}"
    );
    assert_eq!(v["mode"], "open_loop");
}

#[test]
fn fan_out_counts_a_delivery_at_every_other_member() {
    let s = TestServer::start(|_| {});
    let v = load(
        s.addr,
        &[
            "--fanout",
            "20",
            "--senders",
            "2",
            "--messages",
            "400",
            "--warmup-conns",
            "0",
            "--inflight",
            "2",
            "--rtt-probe",
            "0",
            "--no-server-metrics",
        ],
    );
    assert_exact(&v, Some(400));
    assert_eq!(n(&v, "/acked"), 400);
    assert_eq!(v["mode"], "fanout");
    // Every message reaches the 19 other members (the sender gets the ack instead).
    assert_eq!(n(&v, "/fanout/deliveries"), 400 * 19, "{v:#}");
    assert!(n(&v, "/fanout/delivery_latency/count") > 0);
    assert!(f(&v, "/fanout/deliveries_per_s") > 0.0);
}

#[test]
fn connections_can_come_from_several_local_addresses() {
    let s = TestServer::start(|_| {});
    let v = load(
        s.addr,
        &[
            "--messages",
            "400",
            "--warmup-conns",
            "0",
            "--conns",
            "4",
            "--rooms",
            "2",
            "--rtt-probe",
            "0",
            "--source-ips",
            "127.0.0.2,127.0.0.3",
            "--no-server-metrics",
        ],
    );
    assert_exact(&v, Some(400));
    assert_eq!(n(&v, "/acked"), 400);
}

#[test]
fn idle_mode_holds_its_connections_open_then_closes_them() {
    let s = TestServer::start(|_| {});
    let health = || n(&s.get("/health").json(), "/connections");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chatflow"))
        .args([
            "load",
            "--url",
            &format!("ws://{}", s.addr),
            "--conns",
            "50",
            "--idle-hold",
            "3",
            "--json",
            "--no-server-metrics",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).expect("a first line");
    assert_eq!(
        first.trim_end(),
        "IDLE_READY 50",
        "the readiness line comes first"
    );

    // While held, the server counts every one of them (it may register the last upgrade a
    // moment after the client saw its 101).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while health() < 50 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(health(), 50);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(health(), 50, "idle connections stay open during the hold");

    let mut rest = String::new();
    stdout
        .read_to_string(&mut rest)
        .expect("the rest of stdout");
    let status = child.wait().expect("exits");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "exit {status}: {stderr}");
    let v: Value = serde_json::from_str(rest.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!(v["mode"], "idle");
    assert_eq!(n(&v, "/sent"), 0);
    assert_eq!(n(&v, "/idle/open_at_start"), 50);
    assert_eq!(n(&v, "/idle/open_at_end"), 50);
    assert_eq!(n(&v, "/idle/disconnects"), 0);
    assert!(f(&v, "/phases/main/wall_s") >= 3.0, "{v:#}");
    assert!(v.pointer("/phases/probe").is_none() && v.pointer("/phases/warmup").is_none());

    // And they are closed at the end.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while health() > 0 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(health(), 0);
}

#[test]
fn a_server_that_is_not_there_is_a_clear_error() {
    // A port nobody listens on: bind, note it, close.
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let url = format!("ws://{addr}");
    let args = LoadArgs::from_args([
        "load",
        "--url",
        &url,
        "--no-progress",
        "--connect-attempts",
        "2",
        "--messages",
        "100",
        "--warmup-conns",
        "0",
        "--conns",
        "1",
        "--rooms",
        "1",
    ])
    .expect("flags");
    let err = match execute(&args) {
        Ok(_) => panic!("a run against nothing must fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("could not connect"), "{err}");
    assert!(err.contains("refused"), "{err}");
}

// ---- a misbehaving server -------------------------------------------------------------------

/// How [`FakeServer`] misbehaves. Every loop in it is bounded in time, so a test ends by
/// itself whatever the load tester does.
#[derive(Clone, Default)]
struct Misbehave {
    /// Close every connection right after the upgrade.
    close_at_once: bool,
    /// Before the ack of every Nth message, an error frame without `clientMessageId`.
    idless_error_every: u64,
    /// Send frames without stopping for this long after the upgrade.
    flood_for: Option<Duration>,
    /// Never answer the Nth message received (counted over all connections, from 1).
    drop_answer: Option<u64>,
    /// After the Nth message, answer nothing (and read nothing) for this long.
    stall: Option<(u64, Duration)>,
    /// Answer `GET /api/metrics` with a Content-Length body, then hold the connection open.
    metrics: bool,
}

/// A tiny WebSocket server (std + tungstenite) that acks every message with its
/// `clientMessageId`, except as [`Misbehave`] says.
struct FakeServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    upgrades: Arc<AtomicU64>,
}

/// No fake-server loop runs longer than this.
const FAKE_LIFETIME: Duration = Duration::from_secs(30);

impl FakeServer {
    fn start(how: Misbehave) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let upgrades = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let (st, up) = (stop.clone(), upgrades.clone());
        thread::spawn(move || {
            let end = std::time::Instant::now() + FAKE_LIFETIME;
            while !st.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (how, st, up, rx) =
                            (how.clone(), st.clone(), up.clone(), received.clone());
                        thread::spawn(move || Self::serve(s, &how, &st, &up, &rx));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        FakeServer {
            addr,
            stop,
            upgrades,
        }
    }

    fn serve(
        s: TcpStream,
        how: &Misbehave,
        stop: &AtomicBool,
        upgrades: &AtomicU64,
        received: &AtomicU64,
    ) {
        use tungstenite::Message;
        let end = std::time::Instant::now() + FAKE_LIFETIME;
        s.set_nonblocking(false).expect("blocking");
        // Wait until the request line's start is here (it may arrive in pieces).
        let mut head = [0u8; 16];
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut seen = 0;
        for _ in 0..200 {
            seen = s.peek(&mut head).unwrap_or(0);
            if seen >= 15 || seen == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = s.set_read_timeout(None);
        if head[..seen].starts_with(b"GET /api/metric") {
            if how.metrics {
                let mut s = s;
                let mut req = [0u8; 4096];
                let _ = s.read(&mut req);
                let body = br#"{"fake":true}"#;
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(body);
                // A server that ignores `Connection: close`: the body is complete, the
                // connection stays open.
                thread::sleep(Duration::from_secs(6));
            }
            return;
        }
        let Ok(mut ws) = tungstenite::accept(s) else {
            return;
        };
        upgrades.fetch_add(1, Ordering::Relaxed);
        if how.close_at_once {
            let _ = ws.close(None);
            let _ = ws.flush();
            return;
        }
        let flood_until = how.flood_for.map(|d| std::time::Instant::now() + d);
        // Pre-framed (server frames are unmasked): the flood goes out at memcpy speed.
        let payload = br#"{"type":"noise"}"#;
        let mut burst = Vec::new();
        for _ in 0..4096 {
            burst.extend_from_slice(&[0x81, payload.len() as u8]);
            burst.extend_from_slice(payload);
        }
        while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
            let flooding = flood_until.is_some_and(|t| std::time::Instant::now() < t);
            if flooding && (ws.flush().is_err() || ws.get_mut().write_all(&burst).is_err()) {
                return;
            }
            // Reads poll (non-blocking) while flooding, wait a little otherwise; writes block.
            let _ = ws.get_mut().set_nonblocking(flooding);
            let _ = ws
                .get_mut()
                .set_read_timeout(Some(Duration::from_millis(2)));
            let read = ws.read();
            let _ = ws.get_mut().set_nonblocking(false);
            let text = match read {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(_)) => {
                    let _ = ws.flush();
                    return;
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(_) => return,
            };
            let k = received.fetch_add(1, Ordering::SeqCst) + 1;
            let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            let id = v["clientMessageId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if let Some((at, pause)) = how.stall
                && at == k
            {
                thread::sleep(pause);
            }
            if how.drop_answer == Some(k) {
                continue;
            }
            if how.idless_error_every > 0 && k.is_multiple_of(how.idless_error_every) {
                let e = r#"{"type":"error","code":"VALIDATION_FAILED","message":"no id here"}"#;
                if ws.write(Message::text(e)).is_err() {
                    return;
                }
            }
            let ack = format!(r#"{{"type":"ack","status":"OK","clientMessageId":"{id}"}}"#);
            if ws.send(Message::text(ack)).is_err() {
                return;
            }
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Flags of a small closed-loop run on one connection, without probe or warmup.
const ONE_CONN: [&str; 9] = [
    "--warmup-conns",
    "0",
    "--conns",
    "1",
    "--rooms",
    "1",
    "--rtt-probe",
    "0",
    "--no-server-metrics",
];

fn load_err(addr: SocketAddr, flags: &[&str]) -> String {
    let url = format!("ws://{addr}");
    let mut argv = vec!["load", "--url", &url, "--no-progress"];
    argv.extend_from_slice(flags);
    let args = LoadArgs::from_args(argv).expect("valid flags");
    match execute(&args) {
        Ok(r) => panic!("the run must fail: {:#}", r.summary()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_server_that_closes_every_connection_at_once_is_an_error() {
    let s = FakeServer::start(Misbehave {
        close_at_once: true,
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let mut flags = ONE_CONN.to_vec();
    flags.extend(["--messages", "50", "--connect-attempts", "3"]);
    let err = load_err(s.addr, &flags);
    assert!(err.contains("could not connect"), "{err}");
    // Opened-then-lost counts as a failed attempt: no endless reconnects.
    let upgrades = s.upgrades.load(Ordering::Relaxed);
    assert!(upgrades <= 3, "{upgrades} upgrades for 3 attempts");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The command exits 1 with that message.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatflow"))
        .args([
            "load",
            "--url",
            &format!("ws://{}", s.addr),
            "--messages",
            "50",
        ])
        .args(["--connect-attempts", "2", "--no-progress"])
        .args(ONE_CONN)
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not connect"));
}

#[test]
fn a_flood_of_frames_does_not_freeze_the_load_thread() {
    // The server floods the connection for 2.5 s; its answers queue behind the flood, but the
    // load thread must keep to the schedule: a thread stuck reading would send nothing until
    // the flood ended.
    let s = FakeServer::start(Misbehave {
        flood_for: Some(Duration::from_millis(2500)),
        ..Default::default()
    });
    let mut flags = ONE_CONN.to_vec();
    flags.extend([
        "--rate",
        "100",
        "--duration",
        "1",
        "--ack-timeout-ms",
        "4000",
    ]);
    let v = load(s.addr, &flags);
    assert_exact(&v, None);
    assert!(n(&v, "/phases/main/other_frames") > 1000, "{v:#}");
    assert!(n(&v, "/sent") >= 95, "{v:#}");
    let lag = f(&v, "/rate/send_lag/max_ms");
    assert!(
        lag < 300.0,
        "sends were {lag} ms late under the flood: {v:#}"
    );
}

#[test]
fn error_frames_without_an_id_are_not_charged_to_a_message() {
    let s = FakeServer::start(Misbehave {
        idless_error_every: 5,
        ..Default::default()
    });
    let mut flags = ONE_CONN.to_vec();
    flags.extend(["--messages", "100", "--inflight", "4"]);
    let v = load(s.addr, &flags);
    assert_exact(&v, Some(100));
    assert_eq!(n(&v, "/acked"), 100, "{v:#}");
    assert_eq!(n(&v, "/failed"), 0, "{v:#}");
    assert_eq!(n(&v, "/unmatched_errors"), 20, "{v:#}");
}

#[test]
fn a_duration_run_reports_its_drain_apart_and_sleeps_through_it() {
    // The 20th answer never comes: the run waits for it (the drain) until the ack timeout.
    let s = FakeServer::start(Misbehave {
        drop_answer: Some(20),
        ..Default::default()
    });
    let mut flags = ONE_CONN.to_vec();
    flags.extend([
        "--rate",
        "100",
        "--duration",
        "1",
        "--ack-timeout-ms",
        "1500",
        "--retries",
        "0",
    ]);
    let v = load(s.addr, &flags);
    assert_exact(&v, None);
    let main = v.pointer("/phases/main").expect("main");
    let wall = f(main, "/wall_s");
    let drain = f(main, "/drain_s");
    assert!((0.95..1.1).contains(&wall), "send window {wall} s: {v:#}");
    assert!(drain > 0.3, "drain {drain} s: {v:#}");
    let acked = n(main, "/acked") as f64;
    assert!((f(main, "/msgs_per_s") - acked / wall).abs() < 1.0, "{v:#}");
    // Waiting for the late answer must not spin: the thread sleeps through the drain.
    let cpu = f(main, "/load_thread_cpu_s");
    assert!(
        cpu < 0.25 * (wall + drain),
        "{cpu} s CPU over {} s: {v:#}",
        wall + drain
    );
}

#[test]
fn open_loop_reports_messages_due_but_never_sent() {
    // The server stops answering for 1.5 s from the 50th message; with 2 in flight the
    // schedule's messages wait, and the run ends while they do.
    let s = FakeServer::start(Misbehave {
        stall: Some((50, Duration::from_millis(1500))),
        ..Default::default()
    });
    let mut flags = ONE_CONN.to_vec();
    flags.extend(["--rate", "200", "--duration", "1", "--inflight", "2"]);
    let v = load(s.addr, &flags);
    assert_exact(&v, None);
    let late = n(&v, "/rate/late_unsent");
    let sent = n(&v, "/sent");
    assert!(late >= 50, "{v:#}");
    assert_eq!(
        sent + late,
        200,
        "every scheduled message is sent or counted late: {v:#}"
    );
    let worst = f(&v, "/rate/late_unsent_max_wait_ms");
    assert!(worst > 300.0, "{v:#}");
    let achieved = f(&v, "/rate/achieved_msgs_per_s");
    assert!(
        (achieved - sent as f64).abs() < 5.0,
        "sent over the 1 s window: {v:#}"
    );
}

#[test]
fn server_metrics_are_read_to_their_length_without_waiting_for_the_close() {
    let s = FakeServer::start(Misbehave {
        metrics: true,
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let flags = [
        "--messages",
        "20",
        "--warmup-conns",
        "0",
        "--conns",
        "1",
        "--rooms",
        "1",
        "--rtt-probe",
        "0",
    ];
    let v = load(s.addr, &flags);
    assert_eq!(v["server_metrics"]["available"], true, "{v:#}");
    assert_eq!(v["server_metrics"]["body"]["fake"], true, "{v:#}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

// ---- several nodes ----------------------------------------------------------------------------

/// A `chatflow serve` child process, killed when dropped.
struct ServeProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ServeProcess {
    /// A node on a free port: one reactor, the memory store, acks after commit (so what it
    /// acked is in its store when the run ends), the local bus (each node on its own).
    fn start(node_id: &str) -> ServeProcess {
        let log = std::env::temp_dir().join(format!(
            "chatflow-load-{}-{node_id}.log",
            std::process::id()
        ));
        let (child, addr) = util::serve::spawn(
            &[
                "--listen",
                "127.0.0.1:0",
                "--reactors",
                "1",
                "--store",
                "memory",
                "--ack-after",
                "persisted",
                "--node-id",
                node_id,
            ],
            &[],
            &log,
            Duration::from_secs(20),
            &format!("node {node_id}"),
        );
        let _ = std::fs::remove_file(&log);
        ServeProcess { child, addr }
    }

    /// One sample of the node's `/metrics`.
    fn metric(&self, sample: &str) -> u64 {
        let reply = util::http(
            self.addr,
            "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        util::metric_in(&reply.body, sample)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_url_list_spreads_the_connections_over_every_node() {
    let a = ServeProcess::start("load-a");
    let b = ServeProcess::start("load-b");
    let urls = format!("ws://{},ws://{}", a.addr, b.addr);
    let args = LoadArgs::from_args([
        "load",
        "--url",
        &urls,
        "--no-progress",
        "--messages",
        "3000",
        "--warmup-conns",
        "4",
        "--warmup-messages",
        "100",
        "--conns",
        "8",
        "--rooms",
        "4",
        "--inflight",
        "4",
        "--rtt-probe",
        "20",
    ])
    .expect("flags");
    let v = execute(&args).expect("the run completes").summary().clone();
    assert_exact(&v, Some(3000));
    assert_eq!(n(&v, "/acked"), 3000, "{v:#}");
    assert_eq!(n(&v, "/failed"), 0, "{v:#}");
    assert_eq!(n(&v, "/reconnections"), 0, "{v:#}");
    assert_eq!(n(&v, "/retries"), 0, "{v:#}");
    assert_eq!(v["url"], urls.as_str());

    // The probe (1 connection) goes to the first URL; the warmup's 4 connections over 4
    // rooms and the main phase's 8 over 4 rooms are dealt evenly, so every main-phase room
    // has a member on each node.
    let upgrades = |s: &ServeProcess| s.metric("chatflow_upgrades_total");
    assert_eq!(upgrades(&a), 1 + 2 + 4, "node a");
    assert_eq!(upgrades(&b), 2 + 4, "node b");

    // Every ack came from one of the two nodes, and both acked a share of the run.
    let acks = |s: &ServeProcess| s.metric("chatflow_acks_total");
    let (acks_a, acks_b) = (acks(&a), acks(&b));
    assert!(acks_a > 20 && acks_b > 0, "acks: a {acks_a}, b {acks_b}");
    assert_eq!(acks_a + acks_b, 3000 + n(&v, "/phases/probe/acked"));

    // /api/metrics was read from the first node: its store holds what it acked.
    assert_eq!(v["server_metrics"]["available"], true, "{v:#}");
    assert_eq!(
        n(&v, "/server_metrics/body/analytics/totalMessages"),
        acks_a,
        "{v:#}"
    );
}

#[test]
fn an_empty_or_malformed_url_in_the_list_is_refused_before_connecting() {
    for (list, why) in [
        ("ws://127.0.0.1:1,", "is empty"),
        ("ws://127.0.0.1:1,,ws://127.0.0.1:2", "is empty"),
        ("ws://127.0.0.1:1,wss://127.0.0.1:2", "TLS"),
        ("ws://127.0.0.1:1,ws://127.0.0.1:port", "entry 2 of 2"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatflow"))
            .args([
                "load",
                "--url",
                list,
                "--messages",
                "100",
                "--warmup-conns",
                "0",
            ])
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{list}: {stderr}");
        assert!(stderr.contains(why), "{list}: {stderr}");
        assert!(!stderr.contains("could not connect"), "{list}: {stderr}");
    }
}
