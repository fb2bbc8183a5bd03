//! Durability of the real binary: what was acked survives a kill -9 (PostgreSQL and SQLite), a
//! PostgreSQL restart under load, the breaker while the database is down, a message the store
//! refuses, and a graceful shutdown.
//!
//! Every test runs `chatflow serve` as a child process on its own port with its own database
//! (a `TestDb` on the machine's PostgreSQL, a SQLite file in a temp dir of its own, or a
//! private PostgreSQL cluster for the tests that stop the database), so the tests run in
//! parallel. Tests that need PostgreSQL fail when it is missing; none is skipped.

mod util;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::{Message, WebSocket};
use util::msg;
use util::pg::TestDb;
use uuid::Uuid;

/// A generous bound for anything that should happen "soon" on a loaded two-core machine.
const SOON: Duration = Duration::from_secs(60);

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` every `every` until it returns `Some`, or `None` after `limit`.
fn poll<T>(limit: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(every);
    }
}

// ----- a temp dir -----

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("chatflow-persist-{}", unique(tag)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ----- the server process -----

/// `chatflow serve` as a child process; killed when dropped, its log printed if the test failed.
struct Chatflow {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Chatflow {
    /// Starts `chatflow serve --store STORE --ack-after ACK` on a free port with `envs` set,
    /// and waits for its `listening on ADDR` line.
    fn spawn(name: &str, store: &str, ack_after: &str, envs: &[(&str, &str)]) -> Chatflow {
        let log = std::env::temp_dir().join(format!("chatflow-persist-{}.log", unique(name)));
        let (child, addr) = util::serve::spawn(
            &[
                "--listen",
                "127.0.0.1:0",
                "--reactors",
                "2",
                "--node-id",
                name,
                "--store",
                store,
                "--ack-after",
                ack_after,
            ],
            envs,
            &log,
            SOON,
            &format!("chatflow ({store})"),
        );
        Chatflow { child, addr, log }
    }

    /// The last lines of the server's log, for failure messages.
    fn log_tail(&self, n: usize) -> String {
        util::serve::last_lines(&std::fs::read_to_string(&self.log).unwrap_or_default(), n)
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.child.id());
    }

    /// SIGKILL and reap.
    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL chatflow");
        self.child.wait().expect("reap chatflow");
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "chatflow did not exit within {limit:?}; log:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn get(&self, path: &str) -> Result<(u16, String), String> {
        http_get(self.addr, path)
    }

    /// A sample of `/metrics` (e.g. `chatflow_store_breaker_state`).
    fn metric(&self, sample: &str) -> f64 {
        let (status, body) = self
            .get("/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert_eq!(status, 200, "GET /metrics: {body}");
        metric_in(&body, sample).unwrap_or_else(|| panic!("metric {sample} missing:\n{body}"))
    }
}

impl Drop for Chatflow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- chatflow log ({}) ----\n{}\n---- end of chatflow log ----",
                self.addr,
                self.log_tail(80)
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn metric_in(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// One GET with every step bounded; `Err` for a connection that fails or an answer without a
/// status line.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let t = Some(Duration::from_secs(10));
    s.set_read_timeout(t).map_err(|e| e.to_string())?;
    s.set_write_timeout(t).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))?;
    Ok((status, body.to_string()))
}

// ----- a blocking WebSocket client with bounded waits -----

type Ws = WebSocket<TcpStream>;

fn connect_ws(addr: SocketAddr, room: &str) -> Result<Ws, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (ws, resp) = tungstenite::client::client(format!("ws://{addr}/chat/{room}"), stream)
        .map_err(|e| format!("upgrade: {e}"))?;
    if resp.status() != 101 {
        return Err(format!("upgrade answered {}", resp.status()));
    }
    Ok(ws)
}

fn set_read_timeout(ws: &mut Ws, d: Duration) {
    ws.get_mut().set_read_timeout(Some(d)).expect("timeout");
}

/// The next text frame as JSON within `limit` (pings, pongs and broadcasts skipped).
fn next_reply(ws: &mut Ws, limit: Duration) -> Result<Value, String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("nothing within {limit:?}"));
        }
        set_read_timeout(ws, left.max(Duration::from_millis(1)));
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value =
                    serde_json::from_str(t.as_str()).map_err(|e| format!("bad JSON {e}: {t}"))?;
                if v["type"] != "message" {
                    return Ok(v);
                }
            }
            Ok(Message::Close(c)) => return Err(format!("closed by the server: {c:?}")),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

fn chat(user: u32, room: &str, cmid: &str, text: &str) -> Value {
    let mut m = msg(user, room, text);
    m["clientMessageId"] = cmid.into();
    m
}

fn message_id(ack: &Value) -> Uuid {
    ack["messageId"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("ack without a valid messageId: {ack}"))
}

// ----- load: connections that send continuously and record what was acked -----

/// Live counters shared by the load threads, read by the test while the load runs.
#[derive(Default)]
struct Live {
    acks: AtomicU64,
    refused: AtomicU64,
}

struct LoadSpec {
    addr: SocketAddr,
    room: String,
    user: u32,
    /// Prefix of the clientMessageIds.
    tag: String,
    /// Messages in flight (sent, not yet answered) at most.
    window: usize,
    /// Set by the test: stop creating messages, finish (and retry) the ones started.
    stop: Arc<AtomicBool>,
    /// How long after `stop` the unanswered messages are still retried.
    drain: Duration,
    live: Arc<Live>,
}

/// What one connection saw.
#[derive(Debug, Default)]
struct LoadReport {
    conn: String,
    user: u32,
    room: String,
    /// (clientMessageId, messageId) in the order the acks came.
    acked: Vec<(String, Uuid)>,
    /// Messages created (each with a new clientMessageId).
    created: u64,
    /// Frames sent, retries included.
    attempts: u64,
    /// Error frames by code.
    errors: HashMap<String, u64>,
    /// Sample reasons of the errors, one per code.
    reasons: HashMap<String, String>,
    /// Created messages neither acked nor refused for good when the connection ended.
    unresolved: Vec<String>,
    /// Why the connection's loop ended.
    end: String,
    /// Protocol violations seen.
    problems: Vec<String>,
}

/// Sends `window` messages at a time, each with a clientMessageId, and re-sends (same
/// clientMessageId) those refused with UNAVAILABLE or OVERLOADED after a short pause. Ends
/// when the connection breaks, or once `stop` is set and everything started is answered (or
/// `drain` has passed).
fn run_load(spec: LoadSpec) -> LoadReport {
    let mut r = LoadReport {
        conn: spec.tag.clone(),
        user: spec.user,
        room: spec.room.clone(),
        ..LoadReport::default()
    };
    let mut ws = match connect_ws(spec.addr, &spec.room) {
        Ok(ws) => ws,
        Err(e) => {
            r.end = format!("could not connect: {e}");
            return r;
        }
    };
    set_read_timeout(&mut ws, Duration::from_millis(100));
    // clientMessageId -> the attempt number of its latest send on this connection.
    let mut in_flight: HashMap<String, u64> = HashMap::new();
    let mut retries: VecDeque<(Instant, String)> = VecDeque::new();
    let mut last_acked_attempt = 0u64;
    let mut stopped_at: Option<Instant> = None;
    'run: loop {
        let now = Instant::now();
        if stopped_at.is_none() && spec.stop.load(Ordering::Relaxed) {
            stopped_at = Some(now);
        }
        if let Some(at) = stopped_at {
            if in_flight.is_empty() && retries.is_empty() {
                r.end = "finished".into();
                break;
            }
            if now - at > spec.drain {
                r.end = format!("still unanswered {:?} after stop", spec.drain);
                break;
            }
        }
        let mut wrote = false;
        while in_flight.len() < spec.window {
            let cmid = if retries.front().is_some_and(|(due, _)| *due <= now) {
                retries.pop_front().map(|(_, c)| c).unwrap_or_default()
            } else if retries.is_empty() && stopped_at.is_none() {
                // New messages only while nothing waits for a retry: the backlog stays bounded.
                r.created += 1;
                format!("{}-{}", spec.tag, r.created)
            } else {
                break;
            };
            let body = chat(spec.user, &spec.room, &cmid, &format!("durable {cmid}"));
            r.attempts += 1;
            in_flight.insert(cmid, r.attempts);
            if let Err(e) = ws.write(Message::text(body.to_string())) {
                r.end = format!("send failed: {e}");
                break 'run;
            }
            wrote = true;
        }
        if wrote && let Err(e) = ws.flush() {
            r.end = format!("send failed: {e}");
            break;
        }
        let frame = match ws.read() {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(c)) => {
                r.end = format!("closed by the server: {c:?}");
                break;
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
            Err(e) => {
                r.end = format!("read failed: {e}");
                break;
            }
        };
        let v: Value = match serde_json::from_str(frame.as_str()) {
            Ok(v) => v,
            Err(e) => {
                r.problems.push(format!("bad JSON ({e}): {frame}"));
                continue;
            }
        };
        let cmid = v["clientMessageId"].as_str().unwrap_or("").to_string();
        match v["type"].as_str() {
            Some("ack") => {
                let Some(attempt) = in_flight.remove(&cmid) else {
                    r.problems.push(format!("ack for nothing in flight: {v}"));
                    continue;
                };
                if attempt < last_acked_attempt {
                    r.problems
                        .push(format!("ack out of arrival order (attempt {attempt} after {last_acked_attempt}): {v}"));
                }
                last_acked_attempt = attempt;
                match v["messageId"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                {
                    Some(id) => r.acked.push((cmid, id)),
                    None => r.problems.push(format!("ack without a messageId: {v}")),
                }
                spec.live.acks.fetch_add(1, Ordering::Relaxed);
            }
            Some("error") => {
                let code = v["code"].as_str().unwrap_or("?").to_string();
                *r.errors.entry(code.clone()).or_default() += 1;
                r.reasons
                    .entry(code.clone())
                    .or_insert_with(|| v["message"].as_str().unwrap_or("").to_string());
                if in_flight.remove(&cmid).is_none() {
                    r.problems.push(format!("error for nothing in flight: {v}"));
                } else if code == "UNAVAILABLE" || code == "OVERLOADED" {
                    spec.live.refused.fetch_add(1, Ordering::Relaxed);
                    retries.push_back((Instant::now() + Duration::from_millis(200), cmid));
                } else {
                    r.problems.push(format!("unexpected error: {v}"));
                }
            }
            Some("message") => {} // a room peer's message
            _ => r.problems.push(format!("unexpected frame: {v}")),
        }
    }
    r.unresolved = in_flight
        .into_keys()
        .chain(retries.into_iter().map(|(_, c)| c))
        .collect();
    let _ = ws.close(None);
    let _ = ws.flush();
    r
}

/// `conns` connections spread over `rooms` rooms, each in a thread of its own.
fn start_load(
    addr: SocketAddr,
    tag: &str,
    conns: usize,
    rooms: usize,
    window: usize,
    drain: Duration,
) -> (Arc<AtomicBool>, Arc<Live>, Vec<JoinHandle<LoadReport>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Live::default());
    let handles = (0..conns)
        .map(|i| {
            let spec = LoadSpec {
                addr,
                room: format!("{tag}{}", i % rooms + 1),
                user: 1000 + i as u32,
                tag: format!("{tag}-c{i}"),
                window,
                stop: stop.clone(),
                drain,
                live: live.clone(),
            };
            std::thread::Builder::new()
                .name(format!("load-{i}"))
                .spawn(move || run_load(spec))
                .expect("spawn load thread")
        })
        .collect();
    (stop, live, handles)
}

fn join_load(handles: Vec<JoinHandle<LoadReport>>) -> Vec<LoadReport> {
    handles
        .into_iter()
        .map(|h| h.join().expect("load thread panicked"))
        .collect()
}

/// Every acked messageId (distinct), after checking the reports for protocol violations and
/// for a clientMessageId acked under two ids.
fn acked_ids(reports: &[LoadReport]) -> HashSet<Uuid> {
    let mut ids = HashSet::new();
    let mut by_cmid: HashMap<&str, Uuid> = HashMap::new();
    for r in reports {
        assert!(
            r.problems.is_empty(),
            "connection {} saw protocol problems: {:#?}",
            r.conn,
            &r.problems[..r.problems.len().min(10)]
        );
        for (cmid, id) in &r.acked {
            if let Some(old) = by_cmid.insert(cmid, *id) {
                assert_eq!(old, *id, "clientMessageId {cmid} acked with two messageIds");
            }
            ids.insert(*id);
        }
    }
    let acks: usize = reports.iter().map(|r| r.acked.len()).sum();
    assert_eq!(
        ids.len(),
        by_cmid.len(),
        "distinct clientMessageIds must have distinct messageIds ({acks} acks)"
    );
    ids
}

fn summary(reports: &[LoadReport]) -> String {
    let mut errors: HashMap<&str, u64> = HashMap::new();
    let mut reasons: HashMap<&str, &str> = HashMap::new();
    for r in reports {
        for (code, n) in &r.errors {
            *errors.entry(code).or_default() += n;
        }
        for (code, why) in &r.reasons {
            reasons.entry(code).or_insert(why);
        }
    }
    let created: u64 = reports.iter().map(|r| r.created).sum();
    let attempts: u64 = reports.iter().map(|r| r.attempts).sum();
    let acks: usize = reports.iter().map(|r| r.acked.len()).sum();
    let ends: Vec<String> = reports
        .iter()
        .map(|r| format!("{}: {}", r.conn, r.end))
        .collect();
    format!(
        "created {created}, sent {attempts} (retries included), acked {acks}, errors {errors:?} \
         (e.g. {reasons:?}); ends: {ends:?}"
    )
}

/// Asserts every id of `acked` is among `stored`; lists a few missing ones otherwise.
fn assert_all_stored(acked: &HashSet<Uuid>, stored: &HashSet<Uuid>, context: &str) {
    let missing: Vec<&Uuid> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acked messages are not in the store (e.g. {:?}); {context}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

// ----- a PostgreSQL database per test on the machine's server -----

// ----- reading the stores back -----

/// The ids in PostgreSQL's `messages`, after checking none is there twice.
fn pg_message_ids(client: &mut postgres::Client) -> HashSet<Uuid> {
    let rows = client
        .query("SELECT message_id FROM messages", &[])
        .expect("read messages");
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let set: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(set.len(), ids.len(), "a message_id is stored twice");
    set
}

/// The ids in a SQLite file's `messages` (16-byte blobs), after checking none is there twice.
fn sqlite_message_ids(path: &Path) -> HashSet<Uuid> {
    let conn =
        rusqlite::Connection::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok", "the database file is damaged");
    let mut stmt = conn
        .prepare("SELECT message_id FROM messages")
        .expect("prepare");
    let ids: Vec<Uuid> = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .expect("query")
        .map(|b| {
            let b = b.expect("row");
            Uuid::from_slice(&b).unwrap_or_else(|_| panic!("message_id of {} bytes", b.len()))
        })
        .collect();
    let set: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(set.len(), ids.len(), "a message_id is stored twice");
    set
}

// ----- a private PostgreSQL cluster, for the tests that stop the database -----

/// A PostgreSQL cluster of this test's own, in a temp dir, run as user `postgres` (initdb
/// refuses root) with trust authentication on 127.0.0.1 and a unix socket inside the dir.
/// Stopped and deleted when dropped, whatever happened.
struct PgCluster {
    root: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
}

/// The newest `/usr/lib/postgresql/*/bin` with an initdb.
fn pg_bin_dir() -> PathBuf {
    let base = Path::new("/usr/lib/postgresql");
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(base)
        .unwrap_or_else(|e| {
            panic!("PostgreSQL server binaries are needed under {base:?} (initdb, pg_ctl): {e}")
        })
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("no initdb under {base:?}/*/bin: PostgreSQL is needed"))
}

/// The uid and gid of user `postgres`.
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == "postgres").then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .and_then(|(u, g)| Some((u?, g?)))
        .expect("a user named postgres is needed to run a private PostgreSQL cluster")
}

/// A port below the ephemeral range (so no outgoing connection of a parallel test takes it
/// while the cluster is down) that nothing listens on now.
fn free_port() -> u16 {
    let seed = std::process::id() as u64 * 7919
        + SEQ.fetch_add(1, Ordering::Relaxed) as u64 * 104_729
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    for i in 0..2000u64 {
        let port = 20_000 + ((seed + i * 613) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

impl PgCluster {
    /// initdb, configure and start. Panics (with initdb's or the server's output) on failure.
    fn new(tag: &str) -> PgCluster {
        let bin = pg_bin_dir();
        let (uid, gid) = postgres_user();
        let root = std::env::temp_dir().join(format!("chatflow-pgc-{}", unique(tag)));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sock")).expect("cluster dir");
        for p in [root.clone(), root.join("sock")] {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown cluster dir");
        }
        let mut cluster = PgCluster {
            data: root.join("data"),
            root,
            bin,
            port: 0,
        };
        let out = cluster.as_postgres(
            "initdb",
            &[
                "-D",
                &cluster.data.display().to_string(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", show(&out));
        // fsync off: a test kills PostgreSQL's processes, never the machine, and the kernel
        // keeps what was written. Commits are still written to the WAL before they return
        // (synchronous_commit stays on), so an immediate stop loses nothing committed.
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\nmax_connections = 40\nshared_buffers = 16MB\n\
             logging_collector = off\n",
            cluster.root.join("sock").display()
        );
        append(&cluster.data.join("postgresql.conf"), &conf);
        for attempt in 0.. {
            cluster.port = free_port();
            append(
                &cluster.data.join("postgresql.conf"),
                &format!("port = {}\n", cluster.port),
            );
            match cluster.try_start() {
                Ok(()) => break,
                Err(e) if attempt < 4 && e.contains("in use") => continue,
                Err(e) => panic!("private PostgreSQL did not start: {e}"),
            }
        }
        cluster
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) -> Output {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {tool} as postgres: {e}"))
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data.display().to_string();
        let mut all = vec!["-D", &data];
        all.extend_from_slice(args);
        self.as_postgres("pg_ctl", &all)
    }

    fn log(&self) -> PathBuf {
        self.root.join("server.log")
    }

    fn try_start(&self) -> Result<(), String> {
        let log = self.log().display().to_string();
        let out = self.pg_ctl(&["start", "-w", "-t", "60", "-l", &log]);
        if out.status.success() {
            Ok(())
        } else {
            let text = std::fs::read_to_string(self.log()).unwrap_or_default();
            Err(format!(
                "{}; log:\n{}",
                show(&out),
                util::serve::last_lines(&text, 20)
            ))
        }
    }

    fn start(&self) {
        if let Err(e) = self.try_start() {
            panic!("private PostgreSQL did not start again: {e}");
        }
    }

    /// `pg_ctl stop -m immediate`: every backend is killed at once, like a crash.
    fn stop(&self) {
        let out = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "60"]);
        assert!(out.status.success(), "pg_ctl stop failed: {}", show(&out));
    }

    /// `pg_ctl restart -m immediate`: crash and start again (with crash recovery).
    fn restart(&self) {
        let log = self.log().display().to_string();
        let out = self.pg_ctl(&["restart", "-m", "immediate", "-w", "-t", "60", "-l", &log]);
        assert!(
            out.status.success(),
            "pg_ctl restart failed: {}",
            show(&out)
        );
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn client(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.url(db), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to the private cluster's {db}: {e:?}"))
    }

    fn create_db(&self, name: &str) -> String {
        self.client("postgres")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name}: {e:?}"));
        self.url(name)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(self.log()).unwrap_or_default();
            eprintln!(
                "---- private PostgreSQL log (port {}) ----\n{}\n---- end ----",
                self.port,
                util::serve::last_lines(&text, 30)
            );
        }
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        // If pg_ctl could not stop it, the postmaster's pid is still in its pid file.
        if let Ok(pidfile) = std::fs::read_to_string(self.data.join("postmaster.pid"))
            && let Some(pid) = pidfile
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("append");
}

fn show(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

// ----- the tests -----

/// Loads the server until at least `min_acks` acks and `min_time` have passed, then kills it
/// with SIGKILL and returns what each connection saw.
fn load_then_kill(server: &mut Chatflow, tag: &str, min_acks: u64) -> Vec<LoadReport> {
    let started = Instant::now();
    let (stop, live, handles) = start_load(server.addr, tag, 8, 4, 32, Duration::ZERO);
    let enough = poll(SOON, Duration::from_millis(20), || {
        (started.elapsed() >= Duration::from_millis(1500)
            && live.acks.load(Ordering::Relaxed) >= min_acks)
            .then_some(())
    });
    let at_kill = live.acks.load(Ordering::Relaxed);
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    let reports = join_load(handles);
    assert!(
        enough.is_some(),
        "only {at_kill} acks in {SOON:?}: {}",
        summary(&reports)
    );
    println!(
        "{tag}: SIGKILL after {:?} with {at_kill} acks; {}",
        started.elapsed(),
        summary(&reports)
    );
    reports
}

#[test]
fn kill_9_loses_no_acked_message_on_postgres() {
    let db = TestDb::new("kill9");
    let mut server = Chatflow::spawn("kill9pg", &db.url, "persisted", &[]);
    let reports = load_then_kill(&mut server, "pgk", 500);
    let acked = acked_ids(&reports);
    let stored = pg_message_ids(&mut db.client());
    assert_all_stored(&acked, &stored, &summary(&reports));
    println!(
        "kill -9 on PostgreSQL: {} acked, all stored; {} stored in all ({} stored but not acked before the kill)",
        acked.len(),
        stored.len(),
        stored.len() - acked.len()
    );
    assert!(acked.len() >= 500, "too few acks to mean anything");
}

#[test]
fn kill_9_loses_no_acked_message_on_sqlite() {
    let dir = TempDir::new("kill9");
    let file = dir.path().join("x.db");
    let store = format!("sqlite:{}", file.display());
    let mut server = Chatflow::spawn("kill9lite", &store, "persisted", &[]);
    let reports = load_then_kill(&mut server, "sqk", 500);
    let acked = acked_ids(&reports);
    let stored = sqlite_message_ids(&file);
    assert_all_stored(&acked, &stored, &summary(&reports));
    println!(
        "kill -9 on SQLite: {} acked, all stored; {} stored in all",
        acked.len(),
        stored.len()
    );
    assert!(acked.len() >= 500, "too few acks to mean anything");
}

/// Waits until `/ready` answers `want`; returns the last body, or panics after `limit`.
fn wait_ready(server: &Chatflow, want: u16, limit: Duration, context: &str) -> String {
    let mut last = String::new();
    poll(limit, Duration::from_millis(100), || {
        match server.get("/ready") {
            Ok((status, body)) if status == want => Some(body),
            Ok((status, body)) => {
                last = format!("{status} {body}");
                None
            }
            Err(e) => {
                last = e;
                None
            }
        }
    })
    .unwrap_or_else(|| {
        panic!("/ready did not answer {want} within {limit:?} ({context}); last: {last}")
    })
}

/// Waits until `live.acks` has grown by `n` past `from`; returns how long it took.
fn wait_acks(live: &Live, from: u64, n: u64, context: &str) -> Duration {
    let start = Instant::now();
    poll(SOON, Duration::from_millis(20), || {
        (live.acks.load(Ordering::Relaxed) >= from + n).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "acks did not resume within {SOON:?} ({context}): {} acks, {} refusals",
            live.acks.load(Ordering::Relaxed),
            live.refused.load(Ordering::Relaxed)
        )
    });
    start.elapsed()
}

#[test]
fn postgres_restarts_under_load_and_the_server_recovers_by_itself() {
    let cluster = PgCluster::new("restart");
    let url = cluster.create_db("chat");
    let mut server = Chatflow::spawn(
        "pgrestart",
        &url,
        "persisted",
        &[
            ("CHATFLOW_STORE_RETRY_MAX_MS", "500"),
            // Far longer than the quick restart; shorter than the long outage, which opens
            // the breaker only after about 10 s (three failed writes, each waiting 5 s for a
            // connection), so messages in flight then time out and are retried.
            ("CHATFLOW_PERSIST_TIMEOUT_MS", "8000"),
        ],
    );
    let test_start = Instant::now();
    let (stop, live, handles) = start_load(server.addr, "rst", 8, 4, 16, SOON);
    wait_acks(&live, 0, 300, "before any restart");
    assert_eq!(server.get("/ready").map(|r| r.0), Ok(200));

    // 1. A crash and immediate restart: connections break, the writers reconnect.
    let before = live.acks.load(Ordering::Relaxed);
    let t = Instant::now();
    cluster.restart();
    let quick_outage = t.elapsed();
    let quick_resume = wait_acks(
        &live,
        live.acks.load(Ordering::Relaxed),
        200,
        "after restart",
    );
    println!(
        "restart -m immediate: PostgreSQL back after {quick_outage:?}, 200 more acks {quick_resume:?} later ({} acks before)",
        before
    );

    // 2. A longer outage: down until /ready says so, then up again.
    let t = Instant::now();
    cluster.stop();
    let acks_at_stop = live.acks.load(Ordering::Relaxed);
    let body = wait_ready(&server, 503, SOON, "database stopped");
    let to_503 = t.elapsed();
    let ready: Value = serde_json::from_str(&body).expect("/ready JSON");
    assert_eq!(ready["store"]["up"], false, "{body}");
    // Down until messages in flight time out and the breaker opens too: the load retries
    // what was refused with the same clientMessageId, some of which the writer still holds
    // and will commit (the retry must then be stored once).
    poll(SOON, Duration::from_millis(50), || {
        (live.refused.load(Ordering::Relaxed) > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("no message was refused within {SOON:?} of the database stopping"));
    let to_refusal = t.elapsed();
    poll(SOON, Duration::from_millis(100), || {
        (server.metric("chatflow_store_breaker_state") >= 1.0).then_some(())
    })
    .unwrap_or_else(|| panic!("the breaker did not open within {SOON:?}"));
    let to_breaker = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let acks_during = live.acks.load(Ordering::Relaxed) - acks_at_stop;
    let refused_during = live.refused.load(Ordering::Relaxed);
    cluster.start();
    let outage = t.elapsed();
    let t = Instant::now();
    wait_ready(&server, 200, SOON, "database started again");
    let to_200 = t.elapsed();
    let resume = wait_acks(
        &live,
        live.acks.load(Ordering::Relaxed),
        300,
        "after the outage",
    );
    println!(
        "outage: /ready 503 after {to_503:?}, first UNAVAILABLE after {to_refusal:?}, breaker open after \
         {to_breaker:?}, database down {outage:?}, \
         /ready 200 {to_200:?} after start, 300 more acks within {resume:?}; {acks_during} acks during the \
         outage, {refused_during} refusals by then"
    );
    assert!(server.running(), "chatflow exited: {}", server.log_tail(30));

    stop.store(true, Ordering::Relaxed);
    let reports = join_load(handles);
    let acked = acked_ids(&reports);
    let sum = summary(&reports);
    for r in &reports {
        assert!(
            r.unresolved.is_empty(),
            "connection {} left {} messages unanswered (e.g. {:?}); {sum}",
            r.conn,
            r.unresolved.len(),
            &r.unresolved[..r.unresolved.len().min(5)]
        );
    }
    let created: u64 = reports.iter().map(|r| r.created).sum();
    assert_eq!(
        acked.len() as u64,
        created,
        "every message is acked in the end; {sum}"
    );

    // A retry of an acked message is acked with the same id and not stored again.
    let first = &reports[0];
    let mut ws = connect_ws(server.addr, &first.room).expect("connect");
    for (cmid, id) in first.acked.iter().take(5) {
        let m = chat(first.user, &first.room, cmid, "retry of an acked message");
        ws.send(Message::text(m.to_string())).expect("send");
        let ack = next_reply(&mut ws, SOON).expect("ack of the retry");
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["clientMessageId"], cmid.as_str(), "{ack}");
        assert_eq!(message_id(&ack), *id, "a retry keeps its messageId");
    }

    let mut db = cluster.client("chat");
    let stored = pg_message_ids(&mut db);
    assert_all_stored(&acked, &stored, &sum);
    assert_eq!(
        stored.len(),
        acked.len(),
        "the table holds exactly the acked messages, each once; {sum}"
    );
    assert!(server.running(), "chatflow exited: {}", server.log_tail(30));
    let opened = server.metric("chatflow_store_breaker_opened_total");
    let duplicates = server.metric("chatflow_store_duplicates_total");
    println!(
        "restart test: {} messages acked and stored once each, breaker opened {opened} times, \
         {duplicates} duplicate writes skipped, {:?} in all; {sum}",
        acked.len(),
        test_start.elapsed()
    );
}

/// How the messages of the breaker test were answered.
#[derive(Default)]
struct Outcomes {
    acked: Vec<Uuid>,
    /// UNAVAILABLE because the commit did not come within persist_timeout: (cmid, wait).
    timed_out: Vec<(String, Duration)>,
    /// UNAVAILABLE at once, refused by the open breaker: (cmid, wait, reason).
    refused: Vec<(String, Duration, String)>,
}

impl Outcomes {
    fn file(&mut self, cmid: String, reply: &Value, took: Duration) {
        let reason = reply["message"].as_str().unwrap_or("").to_string();
        if reply["type"] == "ack" {
            self.acked.push(message_id(reply));
        } else if reason.contains("did not confirm") {
            self.timed_out.push((cmid, took));
        } else {
            self.refused.push((cmid, took, reason));
        }
    }
}

#[test]
fn while_postgres_is_down_persisted_messages_get_unavailable_then_acks_resume() {
    let cluster = PgCluster::new("breaker");
    let url = cluster.create_db("chat");
    let server = Chatflow::spawn(
        "pgbreaker",
        &url,
        "persisted",
        &[
            ("CHATFLOW_STORE_RETRY_MAX_MS", "500"),
            ("CHATFLOW_PERSIST_TIMEOUT_MS", "2000"),
        ],
    );
    let persist_timeout = Duration::from_millis(2000);
    // The reactor checks timeouts every 250 ms; the rest is slack for a loaded machine.
    let answer_within = persist_timeout + Duration::from_secs(3);
    let mut ws = connect_ws(server.addr, "down").expect("connect");
    // Each message's text names its clientMessageId, so the table can be checked for the
    // messages that were answered UNAVAILABLE.
    let send = |ws: &mut Ws, cmid: &str| -> (Value, Duration) {
        let t = Instant::now();
        let text = format!("hello {cmid}");
        ws.send(Message::text(chat(7, "down", cmid, &text).to_string()))
            .expect("send");
        let reply = next_reply(ws, SOON).unwrap_or_else(|e| panic!("reply to {cmid}: {e}"));
        assert_eq!(reply["clientMessageId"], cmid, "{reply}");
        if reply["type"] == "error" {
            assert_eq!(reply["code"], "UNAVAILABLE", "{reply}");
        } else {
            assert_eq!(reply["type"], "ack", "{reply}");
        }
        (reply, t.elapsed())
    };
    let mut seen = Outcomes::default();
    let (ack, took) = send(&mut ws, "up-1");
    assert_eq!(ack["type"], "ack", "{ack}");
    seen.file("up-1".into(), &ack, took);
    assert_eq!(server.get("/ready").map(|r| r.0), Ok(200));

    let down_at = Instant::now();
    cluster.stop();
    // Until the breaker opens, messages wait for a commit that does not come and time out;
    // then they are refused at once.
    let mut n = 0;
    let breaker_open = loop {
        n += 1;
        let cmid = format!("down-{n}");
        let (reply, took) = send(&mut ws, &cmid);
        assert_eq!(
            reply["type"], "error",
            "acked while the database is down: {reply}"
        );
        assert!(
            took <= answer_within,
            "UNAVAILABLE came after {took:?}, persist_timeout is {persist_timeout:?}: {reply}"
        );
        seen.file(cmid, &reply, took);
        let breaker = server.metric("chatflow_store_breaker_state");
        if breaker >= 1.0
            && reply["message"]
                .as_str()
                .is_some_and(|m| !m.contains("did not confirm"))
        {
            break down_at.elapsed();
        }
        assert!(
            down_at.elapsed() < Duration::from_secs(120),
            "no refusal by an open breaker within 120 s of the database going down; {n} messages sent"
        );
    };
    let (status, body) = server.get("/ready").expect("/ready");
    assert_eq!(status, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).expect("/ready JSON");
    assert_eq!(ready["store"]["up"], false, "{body}");
    assert_eq!(ready["store"]["kind"], "postgres", "{body}");
    assert!(ready["store"]["error"].is_string(), "{body}");
    let state = server.metric("chatflow_store_breaker_state");
    assert!(state == 1.0 || state == 2.0, "breaker state {state}");
    let errors = server.metric("chatflow_store_write_errors_total");
    assert!(errors > 0.0, "no write errors counted");
    // Refused while open: answered at once, not after the persist timeout.
    let (_, fast, why) = seen.refused.last().expect("a refusal");
    assert!(*fast < persist_timeout, "a refusal took {fast:?}: {why}");
    println!(
        "database down: breaker open after {breaker_open:?}; {} messages timed out (waits {:?}..{:?}), then refused at once: {:?}; {errors} write errors; /ready: {body}",
        seen.timed_out.len(),
        seen.timed_out.iter().map(|t| t.1).min(),
        seen.timed_out.iter().map(|t| t.1).max(),
        seen.refused[0].2
    );

    let up_at = Instant::now();
    cluster.start();
    // The same connection, no restart of chatflow: messages are acked again.
    let mut k = 0;
    let recovered_after = loop {
        k += 1;
        let cmid = format!("back-{k}");
        let (reply, took) = send(&mut ws, &cmid);
        seen.file(cmid, &reply, took);
        if reply["type"] == "ack" {
            break up_at.elapsed();
        }
        assert!(
            up_at.elapsed() < SOON,
            "no ack within {SOON:?} of the database's return: {reply}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for i in 0..20 {
        let cmid = format!("after-{i}");
        let (reply, took) = send(&mut ws, &cmid);
        assert_eq!(reply["type"], "ack", "{reply}");
        seen.file(cmid, &reply, took);
    }
    let body = wait_ready(&server, 200, SOON, "database back");
    assert_eq!(server.metric("chatflow_store_breaker_state"), 0.0);
    println!(
        "database back: acks again {recovered_after:?} after start ({} tries); /ready: {body}",
        k
    );

    let mut db = cluster.client("chat");
    let stored = pg_message_ids(&mut db);
    let Outcomes {
        acked,
        timed_out,
        refused,
    } = seen;
    let acked: HashSet<Uuid> = acked.into_iter().collect();
    assert_all_stored(&acked, &stored, "breaker test");
    // UNAVAILABLE from an open breaker means nothing was stored. One that timed out may
    // still be stored: the writer kept it and committed it once the database was back.
    let texts: HashSet<String> = db
        .query("SELECT message FROM messages", &[])
        .expect("read messages")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let refused_stored: Vec<&String> = refused
        .iter()
        .map(|(cmid, _, _)| cmid)
        .filter(|cmid| texts.contains(&format!("hello {cmid}")))
        .collect();
    assert!(
        refused_stored.is_empty(),
        "messages refused by the open breaker were stored: {refused_stored:?}"
    );
    let timed_out_stored = timed_out
        .iter()
        .filter(|(cmid, _)| texts.contains(&format!("hello {cmid}")))
        .count();
    println!(
        "stored: {} rows = {} acked + {timed_out_stored} of the {} that timed out with UNAVAILABLE; none of the {} refused by the breaker",
        stored.len(),
        acked.len(),
        timed_out.len(),
        refused.len()
    );
    assert_eq!(stored.len(), acked.len() + timed_out_stored);
}

#[test]
fn a_message_postgres_refuses_is_dead_lettered_and_the_rest_of_its_batch_is_stored() {
    let db = TestDb::new("poison");
    let server = Chatflow::spawn(
        "poison",
        &db.url,
        "persisted",
        &[
            // One writer, and a batch that waits long enough to take the whole burst.
            ("CHATFLOW_WRITER_THREADS", "1"),
            ("CHATFLOW_WRITER_BATCH_MAX_AGE_MS", "300"),
        ],
    );
    let poison_text = "before \u{0} after";
    let mut ws = connect_ws(server.addr, "poison").expect("connect");
    for i in 0..9 {
        let text = if i == 4 {
            poison_text.to_string()
        } else {
            format!("fine {i}")
        };
        let m = chat(42, "poison", &format!("p{i}"), &text);
        ws.write(Message::text(m.to_string())).expect("queue");
    }
    ws.flush().expect("flush");
    let mut acked = HashSet::new();
    for i in 0..9 {
        let reply = next_reply(&mut ws, SOON).unwrap_or_else(|e| panic!("reply {i}: {e}"));
        // Acks and errors come in the order the messages were sent.
        assert_eq!(reply["clientMessageId"], format!("p{i}"), "{reply}");
        if i == 4 {
            assert_eq!(reply["type"], "error", "{reply}");
            assert_eq!(reply["code"], "UNAVAILABLE", "{reply}");
            let why = reply["message"].as_str().unwrap_or("");
            assert!(
                why.contains("refused"),
                "the reason names the refusal: {reply}"
            );
            println!("poison message answered: {reply}");
        } else {
            assert_eq!(reply["type"], "ack", "{reply}");
            assert_eq!(reply["message"], format!("fine {i}"));
            acked.insert(message_id(&reply));
        }
    }
    assert_eq!(
        server.metric("chatflow_store_batches_total"),
        1.0,
        "the burst was meant to be one batch"
    );
    assert_eq!(server.metric("chatflow_store_dead_letters_total"), 1.0);
    // The writer goes on.
    ws.send(Message::text(
        chat(42, "poison", "p9", "after the poison").to_string(),
    ))
    .expect("send");
    let reply = next_reply(&mut ws, SOON).expect("reply");
    assert_eq!(reply["type"], "ack", "{reply}");
    acked.insert(message_id(&reply));

    let mut client = db.client();
    let stored = pg_message_ids(&mut client);
    assert_eq!(stored, acked, "exactly the acked messages are stored");
    let rows = client
        .query(
            "SELECT message_id, room_id, user_id, username, message, reason FROM dead_letters",
            &[],
        )
        .expect("read dead_letters");
    assert_eq!(rows.len(), 1, "one dead letter");
    let row = &rows[0];
    let id: Uuid = row.get(0);
    assert!(!stored.contains(&id), "the dead letter is not in messages");
    assert_eq!(row.get::<_, String>(1), "poison");
    assert_eq!(row.get::<_, i32>(2), 42);
    assert_eq!(row.get::<_, String>(3), "user42");
    assert_eq!(
        row.get::<_, Vec<u8>>(4),
        poison_text.as_bytes(),
        "the text is kept byte for byte, NUL included"
    );
    let reason: String = row.get(5);
    assert!(
        reason.contains("22021") || reason.to_lowercase().contains("0x00"),
        "the reason says what PostgreSQL refused: {reason}"
    );
    println!("dead letter {id}: reason {reason:?}");
}

#[test]
fn graceful_shutdown_stores_every_message_acked_on_receipt() {
    let dir = TempDir::new("graceful");
    let file = dir.path().join("x.db");
    let store = format!("sqlite:{}", file.display());
    let mut server = Chatflow::spawn(
        "graceful",
        &store,
        "received",
        &[("CHATFLOW_SHUTDOWN_TIMEOUT_MS", "20000")],
    );
    let mut acked = HashSet::new();
    let mut clients = Vec::new();
    for c in 0..4u32 {
        let room = format!("g{}", c % 2);
        let mut ws = connect_ws(server.addr, &room).expect("connect");
        for n in 0..500 {
            let m = chat(100 + c, &room, &format!("g{c}-{n}"), "before shutdown");
            ws.write(Message::text(m.to_string())).expect("queue");
        }
        ws.flush().expect("flush");
        clients.push((c, ws));
    }
    for (c, ws) in &mut clients {
        for n in 0..500 {
            let ack = next_reply(ws, SOON).unwrap_or_else(|e| panic!("ack {c}/{n}: {e}"));
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["clientMessageId"], format!("g{c}-{n}"), "{ack}");
            acked.insert(message_id(&ack));
        }
    }
    let t = Instant::now();
    server.signal(libc::SIGTERM);
    for (c, ws) in &mut clients {
        let deadline = Instant::now() + SOON;
        loop {
            set_read_timeout(ws, Duration::from_secs(5));
            match ws.read() {
                Ok(Message::Close(frame)) => {
                    let code = frame.map(|f| u16::from(f.code));
                    assert_eq!(code, Some(1001), "client {c}: close code");
                    // Send the close reply tungstenite queued, so the server need not wait.
                    let _ = ws.flush();
                    break;
                }
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    break;
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) && Instant::now() < deadline => {}
                Err(e) => panic!("client {c}: no close frame: {e}"),
            }
        }
    }
    let status = server.wait_exit(SOON);
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        server.log_tail(40)
    );
    let took = t.elapsed();
    let stored = sqlite_message_ids(&file);
    assert_all_stored(&acked, &stored, "graceful shutdown");
    assert_eq!(stored.len(), acked.len());
    println!(
        "graceful shutdown: {} acked on receipt, all stored; exit 0 {took:?} after SIGTERM",
        acked.len()
    );
}
