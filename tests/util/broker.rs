//! The machine's RabbitMQ as the tests share it: the broker-wide lock, a namespace of exchanges
//! and queues per test (deleted at the end), and `rabbitmqctl`.
//!
//! The broker is amqp://guest:guest@127.0.0.1:5672, or `CHATFLOW_TEST_AMQP`.
//!
//! The broker-wide lock: a test that stops RabbitMQ (`rabbitmqctl stop_app`) holds an
//! exclusive `flock` on [`BROKER_LOCK`] while it runs; every other test that uses the broker,
//! in any test file, holds a shared one for its whole run ([`BrokerLock::shared`], or a
//! [`Namespace::locked`]), so an outage test never pulls the broker from under it.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TestServer;

/// The lock every test that uses the shared broker holds: shared by most, exclusive by a test
/// that stops the broker.
pub const BROKER_LOCK: &str = "/tmp/chatflow-rabbitmq-outage.lock";

/// How long a test waits for the broker lock before failing.
pub const LOCK_WAIT: Duration = Duration::from_secs(20 * 60);

/// How long a `rabbitmqctl list_*` may take.
const CTL_WAIT: Duration = Duration::from_secs(60);

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// `tag-PID-N`: unique across the test processes on the machine and the calls in one.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn amqp_url() -> String {
    std::env::var("CHATFLOW_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// A connection of the test's own (not a node's), whose connect is bounded.
pub fn amqp_connect() -> amiquip::Result<amiquip::Connection> {
    let url = amqp_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    amiquip::Connection::insecure_open(&format!("{url}{sep}connection_timeout=5000"))
}

pub fn show(out: &Output) -> String {
    format!(
        "exit {}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Runs a command to its end within `limit` (killed after it), with its output.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {limit:?}"));
            }
            Err(e) => return Err(format!("wait for {what}: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// The path of an executable, searched in PATH and the sbin directories (which a non-root
/// PATH may lack), or what to install.
pub fn find_tool(name: &str, package: &str) -> Result<PathBuf, String> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "`{name}` is needed by this test and is not installed: apt-get install {package} \
                 (scripts/services installs it)"
            )
        })
}

pub fn tool(name: &str, package: &str) -> PathBuf {
    find_tool(name, package).unwrap_or_else(|e| panic!("{e}"))
}

pub fn rabbitmqctl(args: &[&str], limit: Duration) -> Result<Output, String> {
    let ctl = find_tool("rabbitmqctl", "rabbitmq-server")?;
    let out = run_bounded(Command::new(ctl).args(args), limit)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!("rabbitmqctl {}: {}", args.join(" "), show(&out)))
    }
}

/// `rabbitmqctl list_<what> <columns> --formatter json` as JSON objects.
pub fn try_rabbit_list(what: &str, columns: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec![what];
    args.extend_from_slice(columns);
    args.extend_from_slice(&["--formatter", "json", "-q"]);
    let out = rabbitmqctl(&args, CTL_WAIT)?;
    let text = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(Value::Array(rows)) => Ok(rows),
        other => Err(format!(
            "rabbitmqctl {what}: unexpected output {other:?}: {text}"
        )),
    }
}

pub fn rabbit_list(what: &str, columns: &[&str]) -> Vec<Value> {
    try_rabbit_list(what, columns).unwrap_or_else(|e| panic!("{e}"))
}

/// Fails the test with what to do when the broker is not there.
pub fn require_broker() {
    tool("rabbitmqctl", "rabbitmq-server");
    let url = amqp_url();
    if let Err(e) = amqp_connect().and_then(|c| c.close()) {
        panic!(
            "RabbitMQ is needed at {url} (run scripts/services, or set CHATFLOW_TEST_AMQP; if \
             an interrupted outage test left it stopped, run `rabbitmqctl start_app`): {e}"
        );
    }
}

// ----- the broker-wide lock -----

/// A `flock` on [`BROKER_LOCK`], released when dropped (closing the file releases it).
pub struct BrokerLock {
    file: std::fs::File,
    exclusive: bool,
}

impl BrokerLock {
    /// For a test that uses the broker: many may hold it at once.
    pub fn shared() -> BrokerLock {
        BrokerLock::take(false)
    }

    /// For a test that stops the broker: waits until no other test holds the lock.
    pub fn exclusive() -> BrokerLock {
        BrokerLock::take(true)
    }

    /// Whether this is the exclusive lock (which stopping the broker needs).
    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }

    fn take(exclusive: bool) -> BrokerLock {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(BROKER_LOCK)
            .unwrap_or_else(|e| panic!("open {BROKER_LOCK}: {e}"));
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        let start = Instant::now();
        loop {
            // SAFETY: flock(2) on a descriptor this function owns; no memory is shared.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                panic!("flock {BROKER_LOCK}: {err}");
            }
            assert!(
                start.elapsed() < LOCK_WAIT,
                "could not take the broker lock {BROKER_LOCK} ({}) within {LOCK_WAIT:?}: another \
                 test holds it",
                if exclusive { "exclusive" } else { "shared" }
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let waited = start.elapsed();
        if waited > Duration::from_secs(1) {
            eprintln!("waited {waited:?} for the broker lock");
        }
        BrokerLock { file, exclusive }
    }
}

impl Drop for BrokerLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

// ----- a namespace of exchanges and queues on the broker -----

/// A unique `amqp_namespace` (`cft.TAG-PID-N.`); every exchange and queue whose name starts
/// with it is deleted when it is dropped (declare it before the nodes, so it is dropped after
/// them).
pub struct Namespace {
    pub prefix: String,
    /// Released after the deletion (fields drop after `Drop::drop`).
    _lock: Option<BrokerLock>,
}

impl Namespace {
    /// For a test that holds a [`BrokerLock`] of its own for its whole run.
    pub fn new(tag: &str) -> Namespace {
        Namespace::holding(tag, None)
    }

    /// Holds the shared [`BrokerLock`] for as long as the namespace lives (until its exchanges
    /// and queues are deleted).
    pub fn locked(tag: &str) -> Namespace {
        Namespace::holding(tag, Some(BrokerLock::shared()))
    }

    fn holding(tag: &str, lock: Option<BrokerLock>) -> Namespace {
        Namespace {
            prefix: format!("cft.{}.", unique(tag)),
            _lock: lock,
        }
    }

    pub fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// An in-process node `id` on the RabbitMQ bus in this namespace, storing into `store`.
    pub fn node(&self, id: &str, store: &str) -> TestServer {
        self.node_with(id, store, |_| {})
    }

    /// [`Namespace::node`], with `tweak` applied to its configuration last.
    pub fn node_with(
        &self,
        id: &str,
        store: &str,
        tweak: impl FnOnce(&mut chatflow::config::Config),
    ) -> TestServer {
        let ns = self.prefix.clone();
        let (id, store) = (id.to_string(), store.to_string());
        TestServer::start(move |c| {
            c.bus = amqp_url();
            c.amqp_namespace = ns;
            c.node_id = id;
            c.store = store;
            c.reactors = 2;
            tweak(c);
        })
    }

    /// Opens a connection for the test's own publishing and inspection.
    pub fn connect(&self) -> amiquip::Connection {
        amqp_connect().expect("the test connects to RabbitMQ")
    }

    /// Messages in a queue of this namespace.
    pub fn depth(&self, queue: &str) -> u32 {
        let mut conn = self.connect();
        let ch = conn.open_channel(None).expect("channel");
        let q = ch
            .queue_declare_passive(self.name(queue))
            .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
        let n = q.declared_message_count().unwrap_or(0);
        let _ = conn.close();
        n
    }

    /// Whether a queue of this namespace exists.
    pub fn has_queue(&self, queue: &str) -> bool {
        let mut conn = self.connect();
        let ch = conn.open_channel(None).expect("channel");
        let found = ch.queue_declare_passive(self.name(queue)).is_ok();
        let _ = conn.close();
        found
    }

    /// The broker's queues of this namespace (name → row).
    pub fn queues(&self) -> BTreeMap<String, Value> {
        rabbit_list(
            "list_queues",
            &[
                "name",
                "durable",
                "auto_delete",
                "arguments",
                "messages",
                "consumers",
            ],
        )
        .into_iter()
        .filter_map(|q| {
            let name = q["name"].as_str()?.to_string();
            name.starts_with(&self.prefix).then_some((name, q))
        })
        .collect()
    }

    pub fn exchanges(&self) -> BTreeMap<String, Value> {
        rabbit_list("list_exchanges", &["name", "type", "durable", "arguments"])
            .into_iter()
            .filter_map(|x| {
                let name = x["name"].as_str()?.to_string();
                name.starts_with(&self.prefix).then_some((name, x))
            })
            .collect()
    }

    /// (source, destination, routing key) of this namespace's bindings.
    pub fn bindings(&self) -> HashSet<(String, String, String)> {
        rabbit_list(
            "list_bindings",
            &["source_name", "destination_name", "routing_key"],
        )
        .into_iter()
        .filter_map(|b| {
            let s = b["source_name"].as_str()?.to_string();
            let d = b["destination_name"].as_str()?.to_string();
            let k = b["routing_key"].as_str()?.to_string();
            s.starts_with(&self.prefix).then_some((s, d, k))
        })
        .collect()
    }

    /// (queue, routing key) of the bindings from this namespace's `chat.exchange`.
    pub fn exchange_bindings(&self) -> HashSet<(String, String)> {
        let exchange = self.name("chat.exchange");
        self.bindings()
            .into_iter()
            .filter(|(s, _, _)| *s == exchange)
            .map(|(_, d, k)| (d, k))
            .collect()
    }

    /// Deletes every queue and exchange whose name starts with the prefix.
    pub fn delete_all(&self) -> Result<(), String> {
        let queues: Vec<String> = try_rabbit_list("list_queues", &["name"])?
            .iter()
            .filter_map(|q| q["name"].as_str())
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_string)
            .collect();
        let exchanges: Vec<String> = try_rabbit_list("list_exchanges", &["name"])?
            .iter()
            .filter_map(|q| q["name"].as_str())
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_string)
            .collect();
        let mut conn = amqp_connect().map_err(|e| format!("connect to the broker: {e}"))?;
        // One channel per deletion: an error closes the channel it happened on.
        for q in &queues {
            let ch = conn.open_channel(None).map_err(|e| e.to_string())?;
            let _ = ch.queue_delete(q.as_str(), amiquip::QueueDeleteOptions::default());
            let _ = ch.close();
        }
        for x in &exchanges {
            let ch = conn.open_channel(None).map_err(|e| e.to_string())?;
            let _ = ch.exchange_delete(x.as_str(), false);
            let _ = ch.close();
        }
        let _ = conn.close();
        Ok(())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(e) = self.delete_all() {
            eprintln!("could not delete the broker namespace {}: {e}", self.prefix);
        }
    }
}
