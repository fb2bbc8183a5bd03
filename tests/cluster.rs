//! Several `chatflow serve` nodes sharing rooms through RabbitMQ, storing into one PostgreSQL:
//! fan-out and order across nodes, a broker outage under load, a node killed under load behind
//! HAProxy, and the nginx configuration in front of the nodes.
//!
//! Every test runs its own nodes (child processes on free loopback ports) with its own
//! `amqp_namespace`, so the tests share the machine's broker (amqp://guest:guest@127.0.0.1:5672,
//! or `CHATFLOW_TEST_AMQP`) and run in parallel; each test deletes its exchanges and queues at
//! the end. The load balancers run from `tuning/haproxy-chatflow.cfg` and
//! `tuning/nginx-chatflow.conf` with their example addresses replaced by the test's ports.
//!
//! The broker-wide lock (`tests/util/broker.rs`): the test that stops RabbitMQ (`rabbitmqctl
//! stop_app`) holds an exclusive `flock` on `util::broker::BROKER_LOCK` while it runs; every
//! other test that uses the broker holds a shared one for its whole run. Tests in other files
//! that use the broker must take the shared lock the same way, or an outage test may pull the
//! broker from under them.
//!
//! Services needed (installed by scripts/services): RabbitMQ with `rabbitmqctl`, PostgreSQL,
//! HAProxy and nginx. A missing one fails the test with what to install; none is skipped.

mod util;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::{Message, WebSocket};
use util::broker::{
    BrokerLock, Namespace, amqp_url, rabbitmqctl, require_broker, run_bounded, show, tool, unique,
};
use util::msg;
use util::pg::TestDb;
use uuid::Uuid;

/// A generous bound for anything that should happen "soon" on a loaded two-core machine.
const SOON: Duration = Duration::from_secs(60);

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

/// While alive, RabbitMQ's application is (being) stopped; `start_app` runs when it is dropped
/// if the test did not start it again itself, so a failing test never leaves the broker down.
struct BrokerOutage {
    stopped_at: Instant,
    up: bool,
}

impl BrokerOutage {
    /// `rabbitmqctl stop_app`. Needs the exclusive [`BrokerLock`].
    fn begin(lock: &BrokerLock) -> BrokerOutage {
        assert!(
            lock.is_exclusive(),
            "stopping the broker needs the exclusive lock"
        );
        let mut outage = BrokerOutage {
            stopped_at: Instant::now(),
            up: false,
        };
        if let Err(e) = rabbitmqctl(&["stop_app"], Duration::from_secs(120)) {
            outage.end();
            panic!("{e}");
        }
        outage
    }

    /// `rabbitmqctl start_app`; returns how long the broker was down.
    fn end(&mut self) -> Duration {
        if !self.up {
            self.up = true;
            if let Err(e) = rabbitmqctl(&["start_app"], Duration::from_secs(180)) {
                panic!("RabbitMQ did not start again: {e}");
            }
        }
        self.stopped_at.elapsed()
    }
}

impl Drop for BrokerOutage {
    fn drop(&mut self) {
        if !self.up {
            self.up = true;
            match rabbitmqctl(&["start_app"], Duration::from_secs(180)) {
                Ok(_) => eprintln!("RabbitMQ started again by the outage guard"),
                Err(e) => eprintln!("the outage guard could not start RabbitMQ again: {e}"),
            }
        }
    }
}

// ----- a chatflow node -----

/// `chatflow serve` on the RabbitMQ bus as a child process; killed when dropped, its log
/// printed if the test failed.
struct Node {
    name: String,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Node {
    /// Starts node `name` in namespace `ns` storing into `store`, with `envs` set, and waits
    /// for its `listening on ADDR` line.
    fn spawn(name: &str, ns: &Namespace, store: &str, envs: &[(&str, &str)]) -> Node {
        let log = std::env::temp_dir().join(format!("chatflow-cluster-{}.log", unique(name)));
        let ns_env = ns.prefix.clone();
        let mut all_envs = vec![("CHATFLOW_AMQP_NAMESPACE", ns_env.as_str())];
        all_envs.extend_from_slice(envs);
        let url = amqp_url();
        let (child, addr) = util::serve::spawn(
            &[
                "--listen",
                "127.0.0.1:0",
                "--reactors",
                "1",
                "--node-id",
                name,
                "--store",
                store,
                "--bus",
                &url,
                "--ack-after",
                "published",
            ],
            &all_envs,
            &log,
            SOON,
            &format!("node {name}"),
        );
        Node {
            name: name.to_string(),
            child,
            addr,
            log,
        }
    }

    fn log_tail(&self, n: usize) -> String {
        util::serve::last_lines(&std::fs::read_to_string(&self.log).unwrap_or_default(), n)
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL and reap.
    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL chatflow");
        self.child.wait().expect("reap chatflow");
    }

    fn get(&self, path: &str) -> Result<(u16, String), String> {
        http_get(self.addr, path)
    }

    /// `/ready` as (status, JSON body).
    fn ready(&self) -> Result<(u16, Value), String> {
        let (status, body) = self.get("/ready")?;
        let v =
            serde_json::from_str(&body).map_err(|e| format!("/ready not JSON ({e}): {body}"))?;
        Ok((status, v))
    }

    /// Waits until `/ready` answers `status`; returns the body.
    fn wait_ready(&self, status: u16, limit: Duration) -> Value {
        let mut last = None;
        poll(limit, Duration::from_millis(100), || match self.ready() {
            Ok((s, v)) if s == status => Some(v),
            other => {
                last = Some(other);
                None
            }
        })
        .unwrap_or_else(|| {
            panic!(
                "node {}: /ready did not answer {status} within {limit:?}; last: {last:?}; log:\n{}",
                self.name,
                self.log_tail(30)
            )
        })
    }

    /// One sample of `/metrics`, if present.
    fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").ok()?;
        metric_in(&body, sample)
    }

    /// `connections` of `/health`.
    fn connections(&self) -> Option<u64> {
        let (status, body) = self.get("/health").ok()?;
        if status != 200 {
            return None;
        }
        serde_json::from_str::<Value>(&body).ok()?["connections"].as_u64()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- node {} log ({}) ----\n{}\n---- end of node {} log ----",
                self.name,
                self.addr,
                self.log_tail(60),
                self.name
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

/// Three nodes nA, nB, nC in `ns`, storing into `db`.
fn three_nodes(ns: &Namespace, db: &TestDb, envs: &[(&str, &str)]) -> Vec<Node> {
    let nodes: Vec<Node> = ["nA", "nB", "nC"]
        .iter()
        .map(|n| Node::spawn(n, ns, &db.url, envs))
        .collect();
    for node in &nodes {
        let ready = node.wait_ready(200, SOON);
        assert_eq!(ready["bus"]["kind"], "amqp", "node {}: {ready}", node.name);
    }
    nodes
}

/// One GET with every step bounded.
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

/// A free loopback port (bound and released; the caller binds it soon after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

// ----- load balancers from tuning/ -----

/// The text of a tuning/ file with its example addresses replaced, on lines that are not
/// comments; panics if one of them is no longer in the file.
fn template(file: &str, replacements: &[(&str, String)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut used = vec![0usize; replacements.len()];
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with('#') {
                return line.to_string();
            }
            let mut l = line.to_string();
            for (i, (from, to)) in replacements.iter().enumerate() {
                let n = l.matches(from).count();
                if n > 0 {
                    used[i] += n;
                    l = l.replace(from, to);
                }
            }
            l
        })
        .collect();
    for (i, (from, _)) in replacements.iter().enumerate() {
        assert!(
            used[i] > 0,
            "{file} no longer contains {from:?}, which the test replaces"
        );
    }
    out.join("\n") + "\n"
}

/// A load balancer process (HAProxy or nginx) in a temp dir of its own; killed and removed
/// when dropped, its log printed if the test failed.
struct Balancer {
    what: &'static str,
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
}

impl Balancer {
    /// HAProxy from tuning/haproxy-chatflow.cfg in front of `nodes`.
    fn haproxy(nodes: &[SocketAddr]) -> Balancer {
        let bin = tool("haproxy", "haproxy");
        let port = free_port();
        let config = template(
            "tuning/haproxy-chatflow.cfg",
            &[
                ("bind :8080", format!("bind 127.0.0.1:{port}")),
                // This machine allows 20,000 descriptors per process.
                ("maxconn 200000", "maxconn 4000".to_string()),
                ("127.0.0.1:8081", nodes[0].to_string()),
                ("127.0.0.1:8082", nodes[1].to_string()),
                ("127.0.0.1:8083", nodes[2].to_string()),
            ],
        );
        let dir = std::env::temp_dir().join(format!("chatflow-haproxy-{}", unique("lb")));
        std::fs::create_dir_all(&dir).expect("haproxy dir");
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).expect("write haproxy.cfg");
        let check = run_bounded(
            Command::new(&bin).arg("-c").arg("-f").arg(&cfg),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            check.status.success(),
            "haproxy -c refuses tuning/haproxy-chatflow.cfg: {}",
            show(&check)
        );
        let log = dir.join("haproxy.log");
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start haproxy: {e}"));
        Balancer::started("haproxy", child, dir, log, port)
    }

    /// nginx from tuning/nginx-chatflow.conf in front of `nodes`, as one process.
    fn nginx(nodes: &[SocketAddr]) -> Balancer {
        let bin = tool("nginx", "nginx");
        let port = free_port();
        let config = template(
            "tuning/nginx-chatflow.conf",
            &[
                ("listen 8080", format!("listen 127.0.0.1:{port}")),
                // This machine allows 20,000 descriptors per process.
                (
                    "worker_rlimit_nofile 200000",
                    "worker_rlimit_nofile 16384".to_string(),
                ),
                (
                    "worker_connections 100000",
                    "worker_connections 4096".to_string(),
                ),
                ("127.0.0.1:8081", nodes[0].to_string()),
                ("127.0.0.1:8082", nodes[1].to_string()),
                ("127.0.0.1:8083", nodes[2].to_string()),
            ],
        );
        let dir = std::env::temp_dir().join(format!("chatflow-nginx-{}", unique("lb")));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let cfg = dir.join("nginx.conf");
        std::fs::write(&cfg, config).expect("write nginx.conf");
        let log = dir.join("logs/error.log");
        let args = |cmd: &mut Command| {
            cmd.arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&cfg)
                .arg("-e")
                .arg(&log)
                // One process that dies with SIGKILL (a master's workers would outlive it).
                .args(["-g", "daemon off; master_process off;"]);
        };
        let mut check = Command::new(&bin);
        args(&mut check);
        check.arg("-t");
        let check =
            run_bounded(&mut check, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            check.status.success(),
            "nginx -t refuses tuning/nginx-chatflow.conf: {}",
            show(&check)
        );
        let mut cmd = Command::new(&bin);
        args(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start nginx: {e}"));
        Balancer::started("nginx", child, dir, log, port)
    }

    fn started(
        what: &'static str,
        child: Child,
        dir: PathBuf,
        log: PathBuf,
        port: u16,
    ) -> Balancer {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut lb = Balancer {
            what,
            child,
            dir,
            log,
            addr,
        };
        let up = poll(SOON, Duration::from_millis(50), || {
            if !matches!(lb.child.try_wait(), Ok(None)) {
                return Some(false);
            }
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .ok()
                .map(|_| true)
        });
        if up != Some(true) {
            panic!(
                "{what} did not open {addr} within {SOON:?} (exit {:?}); log:\n{}",
                lb.child.try_wait(),
                lb.log_tail(30)
            );
        }
        lb
    }

    fn log_tail(&self, n: usize) -> String {
        util::serve::last_lines(&std::fs::read_to_string(&self.log).unwrap_or_default(), n)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log ----\n{}\n---- end of {} log ----",
                self.what,
                self.log_tail(40),
                self.what
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ----- a WebSocket client with bounded waits -----

type Ws = WebSocket<TcpStream>;

fn connect_ws(addr: SocketAddr, room: &str) -> Result<Ws, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
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

/// The next text frame as JSON: `Ok(None)` when nothing came within `wait`, `Err` when the
/// connection is closed or broken.
fn next_frame(ws: &mut Ws, wait: Duration) -> Result<Option<Value>, String> {
    ws.get_mut()
        .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .map_err(|e| e.to_string())?;
    match ws.read() {
        Ok(Message::Text(t)) => serde_json::from_str(t.as_str())
            .map(Some)
            .map_err(|e| format!("bad JSON {e}: {t}")),
        Ok(Message::Close(c)) => Err(format!("closed by the server: {c:?}")),
        Ok(_) => Ok(None),
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(format!("read: {e}")),
    }
}

fn chat(user: u32, room: &str, cmid: &str, text: &str) -> Value {
    let mut m = msg(user, room, text);
    m["clientMessageId"] = cmid.into();
    m
}

fn uuid_of(v: &Value) -> Option<Uuid> {
    v["messageId"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
}

// ----- load: connections that send, retry, reconnect and record what was acked -----

/// Live counters shared by the load threads, read by the test while the load runs.
#[derive(Default)]
struct Live {
    acks: AtomicU64,
    refused: AtomicU64,
    breaks: AtomicU64,
    reconnects: AtomicU64,
}

struct LoadSpec {
    addr: SocketAddr,
    room: String,
    user: u32,
    /// Prefix of the clientMessageIds.
    tag: String,
    /// Messages in flight (sent, not yet answered) at most.
    window: usize,
    /// New messages per second at most.
    rate: u32,
    /// Set by the test: stop creating messages, finish (and retry) the ones started.
    stop: Arc<AtomicBool>,
    /// How long after `stop` the unanswered messages are still retried.
    drain: Duration,
    /// How long a lost connection is retried before the connection gives up.
    reconnect_for: Duration,
    live: Arc<Live>,
}

/// A connection that broke and came back.
#[derive(Debug)]
struct Reconnect {
    why: String,
    took: Duration,
    /// Messages that were in flight when it broke (re-sent on the new connection).
    resent: Vec<String>,
}

#[derive(Debug, Default)]
struct LoadReport {
    conn: String,
    /// (clientMessageId, messageId, number of reconnections before the ack).
    acked: Vec<(String, Uuid, usize)>,
    created: u64,
    attempts: u64,
    errors: HashMap<String, u64>,
    reasons: HashMap<String, String>,
    unresolved: Vec<String>,
    reconnects: Vec<Reconnect>,
    end: String,
    problems: Vec<String>,
}

/// Connects, retrying every 200 ms for up to `limit`.
fn connect_retry(addr: SocketAddr, room: &str, limit: Duration) -> Result<Ws, String> {
    let start = Instant::now();
    loop {
        match connect_ws(addr, room) {
            Ok(ws) => return Ok(ws),
            Err(e) if start.elapsed() >= limit => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Sends up to `window` messages at a time at most `rate` per second, each with a new
/// clientMessageId; re-sends (same clientMessageId) those refused with UNAVAILABLE or
/// OVERLOADED after 200 ms, and, when the connection breaks, reconnects and re-sends those in
/// flight. Ends once `stop` is set and everything started is answered (or `drain` passed), or
/// when a lost connection cannot be re-established within `reconnect_for`.
fn run_load(spec: LoadSpec) -> LoadReport {
    let mut r = LoadReport {
        conn: spec.tag.clone(),
        ..LoadReport::default()
    };
    let mut ws = match connect_retry(spec.addr, &spec.room, spec.reconnect_for) {
        Ok(ws) => ws,
        Err(e) => {
            r.end = format!("could not connect: {e}");
            return r;
        }
    };
    let started = Instant::now();
    // clientMessageId -> the attempt number of its latest send.
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
        let mut broken: Option<String> = None;
        let mut wrote = false;
        let allowed = (started.elapsed().as_secs_f64() * f64::from(spec.rate)) as u64 + 1;
        while in_flight.len() < spec.window {
            let cmid = if retries.front().is_some_and(|(due, _)| *due <= now) {
                retries.pop_front().map(|(_, c)| c).unwrap_or_default()
            } else if retries.is_empty() && stopped_at.is_none() && r.created < allowed {
                r.created += 1;
                format!("{}-{}", spec.tag, r.created)
            } else {
                break;
            };
            let body = chat(spec.user, &spec.room, &cmid, &format!("load {cmid}"));
            r.attempts += 1;
            in_flight.insert(cmid, r.attempts);
            if let Err(e) = ws.write(Message::text(body.to_string())) {
                broken = Some(format!("send: {e}"));
                break;
            }
            wrote = true;
        }
        if broken.is_none()
            && wrote
            && let Err(e) = ws.flush()
        {
            broken = Some(format!("send: {e}"));
        }
        if broken.is_none() {
            match next_frame(&mut ws, Duration::from_millis(20)) {
                Ok(None) => {}
                Ok(Some(v)) => {
                    let cmid = v["clientMessageId"].as_str().unwrap_or("").to_string();
                    match v["type"].as_str() {
                        Some("ack") => {
                            let Some(attempt) = in_flight.remove(&cmid) else {
                                r.problems.push(format!("ack for nothing in flight: {v}"));
                                continue;
                            };
                            if attempt < last_acked_attempt {
                                r.problems.push(format!(
                                    "ack out of arrival order (attempt {attempt} after \
                                     {last_acked_attempt}): {v}"
                                ));
                            }
                            last_acked_attempt = attempt;
                            match uuid_of(&v) {
                                Some(id) => r.acked.push((cmid, id, r.reconnects.len())),
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
                                retries
                                    .push_back((Instant::now() + Duration::from_millis(200), cmid));
                            } else {
                                r.problems.push(format!("unexpected error: {v}"));
                            }
                        }
                        Some("message") => {}
                        _ => r.problems.push(format!("unexpected frame: {v}")),
                    }
                }
                Err(e) => broken = Some(e),
            }
        }
        if let Some(why) = broken {
            spec.live.breaks.fetch_add(1, Ordering::Relaxed);
            let lost_at = Instant::now();
            // Re-send what was in flight first, in the order it was sent.
            let mut lost: Vec<(u64, String)> = in_flight.drain().map(|(c, a)| (a, c)).collect();
            lost.sort();
            let resent: Vec<String> = lost.iter().map(|(_, c)| c.clone()).collect();
            for (_, cmid) in lost.into_iter().rev() {
                retries.push_front((lost_at, cmid));
            }
            match connect_retry(spec.addr, &spec.room, spec.reconnect_for) {
                Ok(new) => {
                    ws = new;
                    last_acked_attempt = 0;
                    spec.live.reconnects.fetch_add(1, Ordering::Relaxed);
                    r.reconnects.push(Reconnect {
                        why,
                        took: lost_at.elapsed(),
                        resent,
                    });
                }
                Err(e) => {
                    r.end = format!(
                        "connection lost ({why}); no new one within {:?}: {e}",
                        spec.reconnect_for
                    );
                    break 'run;
                }
            }
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

/// Load connections, each in a thread of its own: (address, room) per connection.
fn start_load(
    tag: &str,
    targets: &[(SocketAddr, String)],
    window: usize,
    rate: u32,
) -> (Arc<AtomicBool>, Arc<Live>, Vec<JoinHandle<LoadReport>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Live::default());
    let handles = targets
        .iter()
        .enumerate()
        .map(|(i, (addr, room))| {
            let spec = LoadSpec {
                addr: *addr,
                room: room.clone(),
                user: 3000 + i as u32,
                tag: format!("{tag}-c{i}"),
                window,
                rate,
                stop: stop.clone(),
                drain: Duration::from_secs(90),
                reconnect_for: Duration::from_secs(30),
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

fn summary(reports: &[LoadReport]) -> String {
    let mut errors: BTreeMap<&str, u64> = BTreeMap::new();
    let mut reasons: BTreeMap<&str, &str> = BTreeMap::new();
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
    let reconnects: usize = reports.iter().map(|r| r.reconnects.len()).sum();
    let ends: Vec<String> = reports
        .iter()
        .map(|r| format!("{}: {}", r.conn, r.end))
        .collect();
    format!(
        "created {created}, sent {attempts} (retries included), acked {acks}, reconnections \
         {reconnects}, errors {errors:?} (e.g. {reasons:?}); ends: {ends:?}"
    )
}

/// Every acked messageId, after checking the reports: no protocol problem, every created
/// message acked, one messageId per clientMessageId and one clientMessageId per messageId.
fn check_reports(reports: &[LoadReport]) -> HashSet<Uuid> {
    let sum = summary(reports);
    let mut ids = HashSet::new();
    let mut by_cmid: HashMap<&str, Uuid> = HashMap::new();
    for r in reports {
        assert!(
            r.problems.is_empty(),
            "connection {} saw protocol problems: {:#?}; {sum}",
            r.conn,
            &r.problems[..r.problems.len().min(10)]
        );
        assert!(
            r.unresolved.is_empty(),
            "connection {} ended ({}) with {} messages never acked, e.g. {:?}; {sum}",
            r.conn,
            r.end,
            r.unresolved.len(),
            &r.unresolved[..r.unresolved.len().min(5)]
        );
        assert_eq!(r.end, "finished", "connection {}; {sum}", r.conn);
        for (cmid, id, _) in &r.acked {
            if let Some(old) = by_cmid.insert(cmid, *id) {
                assert_eq!(old, *id, "clientMessageId {cmid} acked with two messageIds");
            }
            ids.insert(*id);
        }
    }
    assert_eq!(
        ids.len(),
        by_cmid.len(),
        "distinct clientMessageIds must have distinct messageIds; {sum}"
    );
    let created: u64 = reports.iter().map(|r| r.created).sum();
    assert_eq!(
        by_cmid.len() as u64,
        created,
        "every created message is acked in the end; {sum}"
    );
    ids
}

// ----- PostgreSQL -----

/// (message_id, node_id) of every row, after checking no message_id is there twice.
fn stored(db: &TestDb) -> HashMap<Uuid, String> {
    let mut client = db.client();
    let rows = client
        .query("SELECT message_id, node_id FROM messages", &[])
        .expect("read messages");
    let mut map = HashMap::new();
    for row in &rows {
        let id: Uuid = row.get(0);
        let node: String = row.get(1);
        assert!(
            map.insert(id, node).is_none(),
            "message_id {id} is stored twice"
        );
    }
    map
}

/// Waits until every id of `acked` is in the table, then checks the table holds exactly those
/// (each once). Returns the rows and how long the wait took.
fn assert_stored_exactly(
    db: &TestDb,
    acked: &HashSet<Uuid>,
    context: &str,
) -> (HashMap<Uuid, String>, Duration) {
    let start = Instant::now();
    let mut last = HashMap::new();
    let ok = poll(Duration::from_secs(120), Duration::from_millis(250), || {
        last = stored(db);
        acked.iter().all(|id| last.contains_key(id)).then_some(())
    });
    let waited = start.elapsed();
    if ok.is_none() {
        let missing: Vec<&Uuid> = acked.iter().filter(|id| !last.contains_key(id)).collect();
        panic!(
            "{} of {} acked messages are not in PostgreSQL after {waited:?} (e.g. {:?}); \
             {context}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
    }
    // Anything still on its way (a late duplicate would fail the primary key check above, an
    // unacked message would show up as an extra row) has had time to land.
    std::thread::sleep(Duration::from_secs(1));
    let rows = stored(db);
    let extra: Vec<&Uuid> = rows.keys().filter(|id| !acked.contains(id)).collect();
    assert!(
        extra.is_empty(),
        "{} stored messages were never acked (e.g. {:?}); {context}",
        extra.len(),
        &extra[..extra.len().min(5)]
    );
    assert_eq!(rows.len(), acked.len(), "{context}");
    (rows, waited)
}

// ----- the tests -----

/// A member of the room in the fan-out test.
struct Member {
    idx: usize,
    user: u32,
    node: String,
    ws: Ws,
}

#[derive(Default)]
struct MemberReport {
    idx: usize,
    user: u32,
    node: String,
    /// messageId of the member's own messages, by sequence number (1-based).
    acks: Vec<Uuid>,
    /// Broadcasts received: sender's userId -> [(sequence, messageId)] in arrival order.
    got: HashMap<u32, Vec<(u64, Uuid)>>,
    /// Probe broadcasts received (messageIds), for the duplicate check.
    probes: Vec<Uuid>,
    /// Acks of this member's probes that came after the probe phase.
    probe_acks: Vec<Uuid>,
    problems: Vec<String>,
    end: String,
}

const MEMBER_MESSAGES: u64 = 300;

/// Sends `MEMBER_MESSAGES` messages (16 in flight at most) and reads everything until every
/// member has all it expects (`done` counts those), then listens 1 s more for stragglers.
fn run_member(
    mut m: Member,
    room: String,
    members: usize,
    done: Arc<AtomicUsize>,
    deadline: Instant,
) -> MemberReport {
    let mut r = MemberReport {
        idx: m.idx,
        user: m.user,
        node: m.node.clone(),
        ..MemberReport::default()
    };
    let expected = MEMBER_MESSAGES * (members as u64 - 1);
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut counted = false;
    let mut all_done_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline {
            r.end = format!(
                "deadline: sent {sent}, acked {}, received {received} of {expected}",
                r.acks.len()
            );
            break;
        }
        if !counted && r.acks.len() as u64 == MEMBER_MESSAGES && received >= expected {
            counted = true;
            done.fetch_add(1, Ordering::SeqCst);
        }
        if all_done_at.is_none() && done.load(Ordering::SeqCst) == members {
            all_done_at = Some(now);
        }
        if all_done_at.is_some_and(|at| now - at > Duration::from_secs(1)) {
            r.end = "finished".into();
            break;
        }
        let mut wrote = false;
        while sent < MEMBER_MESSAGES && sent - (r.acks.len() as u64) < 16 {
            sent += 1;
            let cmid = format!("m{}-{sent}", m.idx);
            let body = chat(m.user, &room, &cmid, &format!("fan-out {cmid}"));
            if let Err(e) = m.ws.write(Message::text(body.to_string())) {
                r.end = format!("send: {e}");
                return r;
            }
            wrote = true;
        }
        if wrote && let Err(e) = m.ws.flush() {
            r.end = format!("send: {e}");
            return r;
        }
        let v = match next_frame(&mut m.ws, Duration::from_millis(50)) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                r.end = e;
                break;
            }
        };
        let cmid = v["clientMessageId"].as_str().unwrap_or("");
        let Some(id) = uuid_of(&v) else {
            r.problems.push(format!("frame without a messageId: {v}"));
            continue;
        };
        match v["type"].as_str() {
            Some("ack") if cmid.starts_with("probe") => r.probe_acks.push(id),
            Some("ack") => {
                let want = format!("m{}-{}", m.idx, r.acks.len() + 1);
                if cmid != want {
                    r.problems
                        .push(format!("ack for {cmid} where {want} was next: {v}"));
                }
                r.acks.push(id);
            }
            Some("message") if cmid.starts_with("probe") => r.probes.push(id),
            Some("message") => {
                let sender = v["userId"].as_u64().unwrap_or(0) as u32;
                if sender == m.user {
                    r.problems
                        .push(format!("a member got its own message back: {v}"));
                    continue;
                }
                let seq = cmid
                    .rsplit_once('-')
                    .and_then(|(_, s)| s.parse::<u64>().ok())
                    .unwrap_or(0);
                r.got.entry(sender).or_default().push((seq, id));
                received += 1;
            }
            _ => r.problems.push(format!("unexpected frame: {v}")),
        }
    }
    let _ = m.ws.close(None);
    let _ = m.ws.flush();
    r
}

/// Waits until a probe sent by `from` reaches every other member; sends another every 2 s.
/// Returns how many probes it took; the acks of probes that came are added to `acks`.
fn probe(
    members: &mut [Member],
    from: usize,
    room: &str,
    limit: Duration,
    acks: &mut Vec<Uuid>,
) -> usize {
    let start = Instant::now();
    let mut sent = 0;
    let mut reached: HashSet<usize> = HashSet::new();
    let mut last_send = None::<Instant>;
    while reached.len() < members.len() - 1 {
        assert!(
            start.elapsed() < limit,
            "a probe from member {from} (node {}) reached only {reached:?} of {} members \
             within {limit:?}",
            members[from].node,
            members.len()
        );
        if last_send.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
            sent += 1;
            reached.clear();
            let m = &mut members[from];
            let cmid = format!("probe{from}-{sent}");
            let body = chat(m.user, room, &cmid, "probe");
            m.ws.send(Message::text(body.to_string()))
                .expect("send probe");
            last_send = Some(Instant::now());
        }
        let want = format!("probe{from}-{sent}");
        for (i, m) in members.iter_mut().enumerate() {
            loop {
                match next_frame(&mut m.ws, Duration::from_millis(10)) {
                    Ok(Some(v)) => {
                        if i != from && v["type"] == "message" && v["clientMessageId"] == want {
                            reached.insert(i);
                        }
                        if v["type"] == "ack" {
                            acks.push(uuid_of(&v).expect("probe ack with a messageId"));
                        } else if v["type"] != "message" {
                            panic!("member {i} (node {}): unexpected frame {v}", m.node);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => panic!("member {i} (node {}): {e}", m.node),
                }
            }
        }
    }
    sent
}

/// The value of one argument in rabbitmqctl's JSON rendering of a queue's arguments, which is
/// an object or a list of pairs depending on the version.
fn queue_arg(q: &Value, key: &str) -> Option<Value> {
    match &q["arguments"] {
        Value::Object(m) => m.get(key).cloned(),
        Value::Array(items) => items.iter().find_map(|it| match it {
            Value::Array(pair) if pair.first().and_then(Value::as_str) == Some(key) => {
                pair.last().cloned()
            }
            Value::Object(o) if o.get("key").and_then(Value::as_str) == Some(key) => {
                o.get("value").cloned()
            }
            _ => None,
        }),
        _ => None,
    }
}

#[test]
fn three_nodes_fan_out_every_message_once_in_order_and_store_it_once() {
    let _lock = BrokerLock::shared();
    require_broker();
    let ns = Namespace::new("fanout");
    let db = TestDb::new("cluster_fanout");
    let ttl_ms = 45_000u64;
    let max_length = 50_000u64;
    let nodes = three_nodes(
        &ns,
        &db,
        &[
            ("CHATFLOW_AMQP_NODE_QUEUE_TTL_MS", &ttl_ms.to_string()),
            (
                "CHATFLOW_AMQP_NODE_QUEUE_MAX_LENGTH",
                &max_length.to_string(),
            ),
        ],
    );
    let room = "fan";
    // Two members per node, each with a user of its own.
    let mut members: Vec<Member> = (0..6)
        .map(|i| {
            let node = &nodes[i % 3];
            let ws = connect_ws(node.addr, room)
                .unwrap_or_else(|e| panic!("member {i} to node {}: {e}", node.name));
            Member {
                idx: i,
                user: 2001 + i as u32,
                node: node.name.clone(),
                ws,
            }
        })
        .collect();
    // A message from each node reaches every member on every node before the measured run.
    let joined = Instant::now();
    let mut probe_acks = Vec::new();
    let probes: Vec<usize> = (0..3)
        .map(|from| {
            probe(
                &mut members,
                from,
                room,
                Duration::from_secs(30),
                &mut probe_acks,
            )
        })
        .collect();
    println!(
        "probes needed per node {probes:?} ({:?} after the last member joined)",
        joined.elapsed()
    );

    // The topology the nodes declared.
    let queues = ns.queues();
    let persist = queues
        .get(&ns.name("chat.persist"))
        .unwrap_or_else(|| panic!("no {} among {queues:#?}", ns.name("chat.persist")));
    assert_eq!(persist["durable"], true, "{persist}");
    assert_eq!(
        queue_arg(persist, "x-dead-letter-exchange"),
        Some(Value::from(ns.name("chat.dlx"))),
        "{persist}"
    );
    assert_eq!(queue_arg(persist, "x-max-length"), None, "{persist}");
    assert_eq!(queue_arg(persist, "x-message-ttl"), None, "{persist}");
    let dlq = queues
        .get(&ns.name("chat.dlq"))
        .unwrap_or_else(|| panic!("no {} among {queues:#?}", ns.name("chat.dlq")));
    assert_eq!(dlq["durable"], true, "{dlq}");
    for node in &nodes {
        let name = ns.name(&format!("chat.node.{}", node.name));
        let q = queues
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} among {queues:#?}"));
        assert_eq!(
            queue_arg(q, "x-expires"),
            Some(Value::from(ttl_ms)),
            "{name}: {q}"
        );
        assert_eq!(
            queue_arg(q, "x-message-ttl"),
            Some(Value::from(ttl_ms)),
            "{name}: {q}"
        );
        assert_eq!(
            queue_arg(q, "x-max-length"),
            Some(Value::from(max_length)),
            "{name}: {q}"
        );
        assert_eq!(
            queue_arg(q, "x-overflow"),
            Some(Value::from("drop-head")),
            "{name}: {q}"
        );
        assert_eq!(q["durable"], false, "{name}: {q}");
        assert!(q["consumers"].as_u64() >= Some(1), "{name}: {q}");
    }
    let exchanges = ns.exchanges();
    let exchange = ns.name("chat.exchange");
    let x = exchanges
        .get(&exchange)
        .unwrap_or_else(|| panic!("no {exchange} among {exchanges:#?}"));
    assert_eq!(x["type"], "topic", "{x}");
    assert_eq!(x["durable"], true, "{x}");
    assert!(
        exchanges.contains_key(&ns.name("chat.dlx")),
        "no {} among {exchanges:#?}",
        ns.name("chat.dlx")
    );
    let bindings = ns.bindings();
    let wanted = |dest: String, key: &str| (exchange.clone(), dest, key.to_string());
    let mut expected = vec![
        wanted(ns.name("chat.persist"), "room.#"),
        (ns.name("chat.dlx"), ns.name("chat.dlq"), "#".to_string()),
    ];
    for node in &nodes {
        expected.push(wanted(
            ns.name(&format!("chat.node.{}", node.name)),
            &format!("room.{room}"),
        ));
    }
    for b in &expected {
        assert!(
            bindings.contains(b),
            "binding {b:?} missing; bindings: {bindings:#?}"
        );
    }
    println!(
        "topology: queues {:?}; exchanges {:?}; {} bindings",
        queues.keys().collect::<Vec<_>>(),
        exchanges.keys().collect::<Vec<_>>(),
        bindings.len()
    );

    // The measured run: every member sends and receives at once.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let done = Arc::new(AtomicUsize::new(0));
    let count = members.len();
    let handles: Vec<JoinHandle<MemberReport>> = members
        .into_iter()
        .map(|m| {
            let done = done.clone();
            let room = room.to_string();
            std::thread::spawn(move || run_member(m, room, count, done, deadline))
        })
        .collect();
    let reports: Vec<MemberReport> = handles
        .into_iter()
        .map(|h| h.join().expect("member thread panicked"))
        .collect();
    let took = started.elapsed();

    let ends: Vec<String> = reports
        .iter()
        .map(|r| format!("member {} on {}: {}", r.idx, r.node, r.end))
        .collect();
    for r in &reports {
        assert!(
            r.problems.is_empty(),
            "member {} on {}: {:#?}",
            r.idx,
            r.node,
            &r.problems[..r.problems.len().min(10)]
        );
        assert_eq!(r.end, "finished", "{ends:#?}");
        assert_eq!(r.acks.len() as u64, MEMBER_MESSAGES, "member {}", r.idx);
    }
    let mut acked: HashSet<Uuid> = HashSet::new();
    for sender in &reports {
        acked.extend(sender.acks.iter().copied());
        let want: Vec<(u64, Uuid)> = sender
            .acks
            .iter()
            .enumerate()
            .map(|(i, id)| (i as u64 + 1, *id))
            .collect();
        for r in reports.iter().filter(|r| r.idx != sender.idx) {
            let got = r.got.get(&sender.user).cloned().unwrap_or_default();
            if got != want {
                let ids: Vec<Uuid> = got.iter().map(|g| g.1).collect();
                let distinct: HashSet<&Uuid> = ids.iter().collect();
                let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
                let out_of_order = seqs.windows(2).filter(|w| w[0] >= w[1]).count();
                let missing = (1..=MEMBER_MESSAGES)
                    .filter(|s| !seqs.contains(s))
                    .take(10)
                    .collect::<Vec<_>>();
                panic!(
                    "member {} on {} got {} broadcasts from member {} on {} (expected \
                     {MEMBER_MESSAGES}): {} distinct, {} repeated, {out_of_order} out of order, \
                     missing e.g. {missing:?}",
                    r.idx,
                    r.node,
                    got.len(),
                    sender.idx,
                    sender.node,
                    distinct.len(),
                    ids.len() - distinct.len()
                );
            }
        }
    }
    for r in &reports {
        let distinct: HashSet<&Uuid> = r.probes.iter().collect();
        assert_eq!(
            distinct.len(),
            r.probes.len(),
            "member {} got a probe twice",
            r.idx
        );
    }
    let deliveries: usize = reports
        .iter()
        .map(|r| r.got.values().map(Vec::len).sum::<usize>())
        .sum();
    println!(
        "fan-out: {count} members on 3 nodes, {} messages acked, {deliveries} broadcasts \
         delivered, each once and in order, in {took:?}",
        acked.len()
    );

    // Every acked message, probes included, is in PostgreSQL once.
    probe_acks.extend(reports.iter().flat_map(|r| r.probe_acks.iter().copied()));
    assert_eq!(
        probe_acks.len(),
        probes.iter().sum::<usize>(),
        "every probe is acked once"
    );
    let mut all = acked.clone();
    all.extend(probe_acks.iter().copied());
    let (rows, waited) = assert_stored_exactly(&db, &all, "fan-out test");
    let by_node = rows.values().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(n.clone()).or_insert(0usize) += 1;
        m
    });
    println!(
        "stored: {} rows, each once ({waited:?} after the run), by node_id {by_node:?}",
        rows.len()
    );
    for node in &nodes {
        let ready = node.wait_ready(200, SOON);
        assert_eq!(ready["bus"]["up"], true, "{ready}");
    }
}

#[test]
fn nodes_recover_by_themselves_when_rabbitmq_stops_and_starts_under_load() {
    // Stopping the broker affects every test that uses it: wait until none runs.
    let lock = BrokerLock::exclusive();
    require_broker();
    let ns = Namespace::new("outage");
    let db = TestDb::new("cluster_outage");
    let confirm_timeout = Duration::from_millis(4000);
    let mut nodes = three_nodes(
        &ns,
        &db,
        &[(
            "CHATFLOW_AMQP_CONFIRM_TIMEOUT_MS",
            &confirm_timeout.as_millis().to_string(),
        )],
    );
    // Two connections per node, on two rooms that span all three nodes.
    let targets: Vec<(SocketAddr, String)> = (0..6)
        .map(|i| (nodes[i % 3].addr, format!("out{}", i % 2)))
        .collect();
    let (stop, live, handles) = start_load("out", &targets, 8, 150);
    let acks_before = poll(SOON, Duration::from_millis(50), || {
        let n = live.acks.load(Ordering::Relaxed);
        (n >= 500).then_some(n)
    });
    assert!(
        acks_before.is_some(),
        "the load did not get 500 acks within {SOON:?} (acks {}, refused {})",
        live.acks.load(Ordering::Relaxed),
        live.refused.load(Ordering::Relaxed)
    );

    let mut outage = BrokerOutage::begin(&lock);
    let stop_took = outage.stopped_at.elapsed();
    // Every node notices and says so on /ready.
    let mut not_ready_after = Vec::new();
    for node in &nodes {
        let body = node.wait_ready(503, Duration::from_secs(30));
        assert_eq!(body["bus"]["up"], false, "node {}: {body}", node.name);
        assert!(
            body["bus"]["error"].is_string(),
            "node {}: {body}",
            node.name
        );
        not_ready_after.push(outage.stopped_at.elapsed());
    }
    for node in &nodes {
        let state = node.metric("chatflow_amqp_breaker_state");
        assert!(
            matches!(state, Some(s) if s == 1.0 || s == 2.0),
            "node {}: the bus breaker is not open while the broker is down: {state:?}",
            node.name
        );
    }
    // Nothing can be confirmed now, so nothing is acked: give acks already on their way a
    // moment, then no new one may come while the broker is down.
    std::thread::sleep(Duration::from_secs(1));
    let acks_down = live.acks.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(3));
    let acks_down_later = live.acks.load(Ordering::Relaxed);
    assert_eq!(
        acks_down, acks_down_later,
        "messages were acked while the broker was down"
    );
    let refused_down = live.refused.load(Ordering::Relaxed);
    // At least 5 s down in all.
    if let Some(left) = Duration::from_secs(5).checked_sub(outage.stopped_at.elapsed()) {
        std::thread::sleep(left);
    }
    let ready_json = nodes[0]
        .ready()
        .map(|r| r.1.to_string())
        .unwrap_or_default();
    let down_for = outage.end();
    let up_at = Instant::now();
    let acks_at_start = live.acks.load(Ordering::Relaxed);

    // The same processes recover: /ready turns 200 and acks come again.
    let mut ready_after: Vec<Option<Duration>> = vec![None; nodes.len()];
    let mut acks_resumed = None;
    let recovered = poll(Duration::from_secs(90), Duration::from_millis(50), || {
        for (i, node) in nodes.iter().enumerate() {
            if ready_after[i].is_none() && matches!(node.ready(), Ok((200, _))) {
                ready_after[i] = Some(up_at.elapsed());
            }
        }
        if acks_resumed.is_none() && live.acks.load(Ordering::Relaxed) >= acks_at_start + 100 {
            acks_resumed = Some(up_at.elapsed());
        }
        (acks_resumed.is_some() && ready_after.iter().all(Option::is_some)).then_some(())
    });
    assert!(
        recovered.is_some(),
        "no recovery within 90 s of the broker's return: /ready 200 after {ready_after:?}, \
         acks +100 after {acks_resumed:?} (acks {}, refused {})",
        live.acks.load(Ordering::Relaxed),
        live.refused.load(Ordering::Relaxed)
    );
    for node in &nodes {
        let body = node.wait_ready(200, SOON);
        assert_eq!(body["bus"]["up"], true, "node {}: {body}", node.name);
    }
    let mut reconnects = Vec::new();
    for node in &nodes {
        assert_eq!(
            node.metric("chatflow_amqp_breaker_state"),
            Some(0.0),
            "node {}: the bus breaker is still not closed",
            node.name
        );
        let n = node.metric("chatflow_amqp_reconnects_total").unwrap_or(0.0);
        assert!(n >= 1.0, "node {}: no reconnect counted", node.name);
        reconnects.push(n);
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let reports = join_load(handles);
    let sum = summary(&reports);
    let acked = check_reports(&reports);
    for r in &reports {
        assert!(
            r.reconnects.is_empty(),
            "connection {} was lost during the outage ({:?}): the server must keep \
             WebSockets open and answer UNAVAILABLE; {sum}",
            r.conn,
            r.reconnects
        );
    }
    for node in &mut nodes {
        assert!(
            node.running(),
            "node {} exited: {}",
            node.name,
            node.log_tail(30)
        );
    }
    let (rows, waited) = assert_stored_exactly(&db, &acked, &sum);
    println!(
        "broker outage: stop_app took {stop_took:?}; /ready 503 on the nodes {not_ready_after:?} \
         after the stop began (e.g. {ready_json}); broker down {down_for:?} in all; /ready 200 \
         again {ready_after:?} after start_app returned; acks resumed (+100) \
         {acks_resumed:?} after it; broker connections reopened per node {reconnects:?}; \
         {refused_down} refusals by the time the broker came back; {} messages acked, {} stored once each ({waited:?} after the load); {sum}",
        acked.len(),
        rows.len()
    );
}

#[test]
fn a_node_killed_under_load_loses_no_acked_message_and_its_clients_move_through_haproxy() {
    let _lock = BrokerLock::shared();
    require_broker();
    let ns = Namespace::new("kill");
    let db = TestDb::new("cluster_kill");
    // A short expiry, so the dead node's queue is seen to go away.
    let node_ttl = Duration::from_secs(8);
    let mut nodes = three_nodes(
        &ns,
        &db,
        &[(
            "CHATFLOW_AMQP_NODE_QUEUE_TTL_MS",
            &node_ttl.as_millis().to_string(),
        )],
    );
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let lb = Balancer::haproxy(&addrs);
    // HAProxy's own check has run and passed on every node.
    let (status, body) = poll(SOON, Duration::from_millis(200), || {
        http_get(lb.addr, "/ready").ok().filter(|r| r.0 == 200)
    })
    .unwrap_or_else(|| {
        panic!(
            "/ready through haproxy never answered 200; log:\n{}",
            lb.log_tail(20)
        )
    });
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        http_get(lb.addr, "/metrics").map(|r| r.0),
        Ok(404),
        "haproxy hides /metrics"
    );

    let targets: Vec<(SocketAddr, String)> = (0..6)
        .map(|i| (lb.addr, format!("kill{}", i % 2)))
        .collect();
    let (stop, live, handles) = start_load("kill", &targets, 8, 150);
    // leastconn spreads the six connections: two per node.
    let spread = poll(Duration::from_secs(30), Duration::from_millis(100), || {
        let counts: Vec<u64> = nodes.iter().map(|n| n.connections().unwrap_or(0)).collect();
        (counts.iter().sum::<u64>() == 6).then_some(counts)
    })
    .unwrap_or_else(|| panic!("the six connections did not all reach the nodes within 30 s"));
    assert!(
        spread.iter().all(|&c| c == 2),
        "haproxy's leastconn should put two connections on each node: {spread:?}"
    );
    let on_victim = spread[1];
    assert!(
        poll(SOON, Duration::from_millis(50), || {
            (live.acks.load(Ordering::Relaxed) >= 600).then_some(())
        })
        .is_some(),
        "the load did not get 600 acks within {SOON:?} (acks {}, refused {})",
        live.acks.load(Ordering::Relaxed),
        live.refused.load(Ordering::Relaxed)
    );

    let acks_at_kill = live.acks.load(Ordering::Relaxed);
    let killed_at = Instant::now();
    nodes[1].kill9();
    // The clients of nB notice and come back through haproxy on nA or nC.
    let moved = poll(Duration::from_secs(30), Duration::from_millis(20), || {
        (live.reconnects.load(Ordering::Relaxed) >= on_victim).then(|| killed_at.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "{} of the {on_victim} clients of the killed node reconnected within 30 s; \
             haproxy log:\n{}",
            live.reconnects.load(Ordering::Relaxed),
            lb.log_tail(20)
        )
    });
    let resumed = poll(SOON, Duration::from_millis(20), || {
        (live.acks.load(Ordering::Relaxed) >= acks_at_kill + 300).then(|| killed_at.elapsed())
    })
    .unwrap_or_else(|| panic!("the load did not go on after the kill"));
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<u64> = [&nodes[0], &nodes[2]]
        .iter()
        .map(|n| n.connections().unwrap_or(0))
        .collect();
    assert_eq!(
        after.iter().sum::<u64>(),
        6,
        "all six clients are on the two live nodes: {after:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let reports = join_load(handles);
    let sum = summary(&reports);
    let acked = check_reports(&reports);
    let moved_conns: Vec<&LoadReport> = reports
        .iter()
        .filter(|r| !r.reconnects.is_empty())
        .collect();
    assert_eq!(
        moved_conns.len() as u64,
        on_victim,
        "exactly the killed node's clients reconnect; {sum}"
    );
    for r in &moved_conns {
        assert_eq!(r.reconnects.len(), 1, "{}: {:?}", r.conn, r.reconnects);
        let after = r.acked.iter().filter(|a| a.2 == 1).count();
        assert!(
            after > 0,
            "{} sent nothing after reconnecting; {sum}",
            r.conn
        );
    }
    let (rows, waited) = assert_stored_exactly(&db, &acked, &sum);
    // Messages first sent after the move were accepted by a live node. (One that was in flight
    // at the kill may be stored as nB's: nB published it before dying, the ack was lost, and
    // the retry through another node was the same message.)
    for r in &moved_conns {
        let resent: HashSet<&String> = r.reconnects.iter().flat_map(|x| &x.resent).collect();
        for (cmid, id, _) in r
            .acked
            .iter()
            .filter(|a| a.2 == 1 && !resent.contains(&a.0))
        {
            assert_ne!(
                rows.get(id).map(String::as_str),
                Some("nB"),
                "{cmid} was acked after the move but stored as from the dead node"
            );
        }
    }
    let from_victim = rows.values().filter(|n| *n == "nB").count();
    let redelivered: Vec<f64> = [&nodes[0], &nodes[2]]
        .iter()
        .map(|n| n.metric("chatflow_amqp_redeliveries_total").unwrap_or(-1.0))
        .collect();
    // The dead node's queue goes away by itself (x-expires); the live ones stay.
    let victim_queue = ns.name("chat.node.nB");
    let gone = poll(
        node_ttl + Duration::from_secs(30),
        Duration::from_secs(1),
        || (!ns.queues().contains_key(&victim_queue)).then(|| killed_at.elapsed()),
    )
    .unwrap_or_else(|| {
        panic!(
            "{victim_queue} still exists {:?} after its node died (x-expires {node_ttl:?}): {:#?}",
            killed_at.elapsed(),
            ns.queues()
        )
    });
    let queues = ns.queues();
    for live_node in ["nA", "nC"] {
        let name = ns.name(&format!("chat.node.{live_node}"));
        assert!(queues.contains_key(&name), "{name} is gone: {queues:#?}");
    }
    let ready = http_get(lb.addr, "/ready").expect("/ready through haproxy");
    assert_eq!(ready.0, 200, "{}", ready.1);
    let reconnects: Vec<String> = moved_conns
        .iter()
        .flat_map(|r| r.reconnects.iter())
        .map(|x| format!("{:?} ({} in flight, {})", x.took, x.resent.len(), x.why))
        .collect();
    println!(
        "node kill: {on_victim} clients of nB reconnected through haproxy within {moved:?} \
         ({reconnects:?}); load went on (+300 acks) {resumed:?} after the kill; {} messages \
         acked, {} stored once each ({waited:?} after the load), {from_victim} of them by nB \
         before it died; redeliveries on nA and nC {redelivered:?}; nB's queue gone {gone:?} \
         after the kill; {sum}",
        acked.len(),
        rows.len()
    );
}

#[test]
fn nginx_config_spreads_websockets_over_the_nodes_and_proxies_health_and_history() {
    let _lock = BrokerLock::shared();
    require_broker();
    let ns = Namespace::new("nginx");
    let db = TestDb::new("cluster_nginx");
    let mut nodes = three_nodes(&ns, &db, &[]);
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let lb = Balancer::nginx(&addrs);
    let room = "viaNginx";
    // least_conn spreads six WebSockets two per node.
    let mut clients: Vec<Ws> = (0..6)
        .map(|i| {
            connect_ws(lb.addr, room).unwrap_or_else(|e| {
                panic!("client {i} through nginx: {e}; log:\n{}", lb.log_tail(20))
            })
        })
        .collect();
    let spread = poll(Duration::from_secs(20), Duration::from_millis(100), || {
        let counts: Vec<u64> = nodes.iter().map(|n| n.connections().unwrap_or(0)).collect();
        (counts.iter().sum::<u64>() == 6).then_some(counts)
    })
    .expect("the six WebSockets did not all reach the nodes");
    assert!(
        spread.iter().all(|&c| c == 2),
        "least_conn should put two WebSockets on each node: {spread:?}"
    );
    // A message through nginx reaches the five others, on all three nodes.
    let mut probe_acks = Vec::new();
    let mut members: Vec<Member> = clients
        .drain(..)
        .enumerate()
        .map(|(i, ws)| Member {
            idx: i,
            user: 4001 + i as u32,
            node: "via nginx".into(),
            ws,
        })
        .collect();
    let probes = probe(
        &mut members,
        0,
        room,
        Duration::from_secs(30),
        &mut probe_acks,
    );
    // The ack may still be on its way.
    let ack_deadline = Instant::now() + Duration::from_secs(30);
    while probe_acks.len() < probes && Instant::now() < ack_deadline {
        if let Ok(Some(v)) = next_frame(&mut members[0].ws, Duration::from_millis(100))
            && v["type"] == "ack"
        {
            probe_acks.push(uuid_of(&v).expect("messageId"));
        }
    }
    assert_eq!(probe_acks.len(), probes, "every probe is acked");
    // Health, readiness and history through nginx; /metrics is not exposed.
    let (status, body) = http_get(lb.addr, "/health").expect("/health through nginx");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(lb.addr, "/ready").expect("/ready through nginx");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        http_get(lb.addr, "/metrics").map(|r| r.0),
        Ok(404),
        "nginx hides /metrics"
    );
    let acked: HashSet<Uuid> = probe_acks.iter().copied().collect();
    assert_stored_exactly(&db, &acked, "nginx test");
    let (status, body) =
        http_get(lb.addr, &format!("/api/rooms/{room}/messages")).expect("history through nginx");
    assert_eq!(status, 200, "{body}");
    let history: Value = serde_json::from_str(&body).expect("history JSON");
    let text = history.to_string();
    for id in &acked {
        assert!(
            text.contains(&id.to_string()),
            "{id} not in the history: {body}"
        );
    }
    // A dead node: nginx (passive checks only) retries the connection on another node.
    nodes[2].kill9();
    for i in 0..6 {
        let ws = connect_ws(lb.addr, room);
        assert!(
            ws.is_ok(),
            "connection {i} through nginx after a node died: {:?}; log:\n{}",
            ws.err(),
            lb.log_tail(20)
        );
    }
    let (status, body) = http_get(lb.addr, "/ready").expect("/ready through nginx");
    assert_eq!(status, 200, "{body}");
    println!(
        "nginx: six WebSockets spread {spread:?}, {probes} probe(s) reached every member, \
         /health /ready /api proxied, /metrics hidden, new connections go on after a node died"
    );
}

/// PROTOCOL.md §1: a connection "receives every message of the room from the moment the
/// upgrade completes". On the RabbitMQ bus a node binds its queue to a room when the room
/// gets its first member there; the upgrade is answered only once that binding is made, so a
/// message another node publishes right after the `101` reaches the new member. Before the
/// node held the `101`, a room new to the joiner's node missed such a message in most trials.
#[test]
fn a_member_joining_on_a_new_node_hears_messages_sent_right_after_its_upgrade() {
    let _lock = BrokerLock::shared();
    require_broker();
    let ns = Namespace::new("join");
    let db = TestDb::new("cluster_join");
    let nodes = three_nodes(&ns, &db, &[]);
    let trials = 30;
    let mut missed = Vec::new();
    for k in 0..trials {
        let room = format!("join{k}");
        let mut sender = connect_ws(nodes[0].addr, &room).expect("sender");
        let mut joiner = connect_ws(nodes[1].addr, &room).expect("joiner");
        let cmid = format!("j{k}");
        sender
            .send(Message::text(
                chat(5000, &room, &cmid, "right after").to_string(),
            ))
            .expect("send");
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut heard = false;
        while !heard && Instant::now() < deadline {
            match next_frame(&mut joiner, Duration::from_millis(100)) {
                Ok(Some(v)) => heard = v["type"] == "message" && v["clientMessageId"] == cmid,
                Ok(None) => {}
                Err(e) => panic!("joiner {k}: {e}"),
            }
        }
        if !heard {
            missed.push(k);
        }
    }
    assert!(
        missed.is_empty(),
        "{} of {trials} members who joined a room new to their node missed a message sent by \
         another node right after their upgrade (trials {missed:?})",
        missed.len()
    );
}
