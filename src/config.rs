//! Server configuration: defaults, TOML file, `CHATFLOW_*` environment variables, then flags.
//!
//! Every key is documented in `chatflow.example.toml`, which a test keeps in step with this file.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The store used when none is configured: the embedded SQLite database.
pub const DEFAULT_STORE: &str = "sqlite:./chatflow-data/chatflow.db";

/// When the sender's ack is sent (see the protocol contract §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckAfter {
    /// After validation.
    Received,
    /// After the message bus accepted the message.
    Published,
    /// After the store committed the message.
    Persisted,
}

/// Everything `chatflow serve` can be told. Field docs give the unit and the default.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port for WebSocket and HTTP. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// Reactor threads; 0 means one per core. Default 0.
    pub reactors: usize,
    /// Name of this node in `/health` and metrics; empty means the host name. Default empty.
    pub node_id: String,
    /// Message bus: `local` (in-process, one node) or `amqp://USER:PASS@HOST:PORT/VHOST`
    /// (RabbitMQ, many nodes). Default `local`.
    pub bus: String,
    /// Prefix of every RabbitMQ exchange and queue name, to run separate deployments (or
    /// tests) on one broker. Default empty.
    pub amqp_namespace: String,
    /// Publisher threads, each with its own connection and confirm window. Default 2.
    pub amqp_publishers: usize,
    /// Most chat messages of one room in one AMQP message. Default 64.
    pub amqp_batch_max: usize,
    /// Most AMQP messages published and not yet confirmed, per publisher. Default 1000.
    pub amqp_confirm_window: usize,
    /// Messages waiting for the publishers before senders get OVERLOADED. Default 65536.
    pub amqp_queue_messages: usize,
    /// Longest a publish may wait for the broker's confirm before the sender gets
    /// UNAVAILABLE, milliseconds. Default 10000.
    pub amqp_confirm_timeout_ms: u64,
    /// A node's fan-out queue is deleted by the broker after this long without a consumer,
    /// and its messages expire after it, milliseconds. Default 60000.
    pub amqp_node_queue_ttl_ms: u64,
    /// Most messages a node's fan-out queue holds; the oldest are dropped. Default 100000.
    pub amqp_node_queue_max_length: u64,
    /// Unacknowledged deliveries a consumer may hold. Default 1000.
    pub amqp_prefetch: u16,
    /// When acks are sent: `received`, `published` or `persisted`. Default `published`.
    pub ack_after: AckAfter,
    /// Where messages are stored: `sqlite:PATH`, `postgres://...` or `memory`.
    /// Default `sqlite:./chatflow-data/chatflow.db`.
    pub store: String,
    /// Store writer threads (SQLite uses one). Default 2.
    pub writer_threads: usize,
    /// Most messages in one write batch. Default 10000.
    pub writer_batch_max: usize,
    /// Longest a batch waits for more messages after its first, milliseconds. Default 5.
    pub writer_batch_max_age_ms: u64,
    /// Messages waiting for the writers before senders are refused. Default 100000.
    pub writer_queue_messages: usize,
    /// Consecutive failed writes that open the store's circuit breaker. Default 3.
    pub store_breaker_failures: u32,
    /// Longest pause between retries of a failed write, milliseconds. Default 5000.
    pub store_retry_max_ms: u64,
    /// With `ack_after = persisted`: longest a sender waits for the commit before it gets
    /// `UNAVAILABLE`, milliseconds. Default 10000.
    pub persist_timeout_ms: u64,
    /// Threads answering `/api/*` queries. Default 2.
    pub query_threads: usize,
    /// Queries waiting for a thread before new ones get 503. Default 256.
    pub query_queue: usize,
    /// Longest a query may wait for a thread, and for its answer, milliseconds. Default 10000.
    pub query_timeout_ms: u64,
    /// Most PostgreSQL connections; 0 means writers + query threads + 1. Default 0.
    pub store_pool_size: u32,
    /// Most messages the memory store keeps (the oldest are dropped). Default 1000000.
    pub memory_store_max_rows: usize,
    /// Most open connections (all states) for the whole process. Default 10000.
    pub max_connections: usize,
    /// Largest WebSocket message accepted, bytes; larger closes with 1009. Default 65536.
    pub max_message_bytes: usize,
    /// Read chunk per connection, bytes. Default 4096.
    pub read_buffer_bytes: usize,
    /// Bytes queued to one client past which it is disconnected at once. Default 1048576.
    pub output_hard_limit_bytes: usize,
    /// Bytes queued to one client that may last at most `output_soft_limit_ms`. Default 262144.
    pub output_soft_limit_bytes: usize,
    /// How long a client may stay above the soft limit, milliseconds. Default 10000.
    pub output_soft_limit_ms: u64,
    /// Time to complete an HTTP request or upgrade, milliseconds. Default 10000.
    pub handshake_timeout_ms: u64,
    /// A WebSocket that sends nothing (not even a pong) for this long is closed, ms. Default 120000.
    pub idle_timeout_ms: u64,
    /// The server pings a WebSocket that has been silent this long, ms; 0 disables. Default 30000.
    pub ping_interval_ms: u64,
    /// Messages per second allowed per connection; 0 means no limit. Default 0.
    pub rate_limit_per_sec: u32,
    /// Burst allowed above the rate, messages. Default 50.
    pub rate_limit_burst: u32,
    /// Largest HTTP request head (request line and headers), bytes. Default 8192.
    pub max_request_head_bytes: usize,
    /// Batches of broadcasts waiting for one reactor before senders get OVERLOADED. Default 4096.
    pub reactor_queue_batches: usize,
    /// Most (room, user) presence entries kept for the node. Default 1000000.
    pub max_presence_entries: usize,
    /// Time allowed to drain connections on SIGTERM/SIGINT, milliseconds. Default 10000.
    pub shutdown_timeout_ms: u64,
    /// Listen backlog per reactor. Default 1024.
    pub backlog: i32,
    /// Disable Nagle's algorithm on client sockets. Default true.
    pub tcp_nodelay: bool,
    /// SO_SNDBUF for client sockets, bytes; 0 keeps the kernel's autotuning. Default 0.
    pub socket_send_buffer_bytes: usize,
    /// SO_RCVBUF for client sockets, bytes; 0 keeps the kernel's autotuning. Default 0.
    pub socket_recv_buffer_bytes: usize,
    /// TCP keepalive idle time for client sockets, seconds; 0 disables. Default 0.
    pub tcp_keepalive_secs: u64,
    /// One `SO_REUSEPORT` listener per reactor (true) or one accept queue shared by all
    /// reactors (false). Default true.
    pub reuse_port: bool,
    /// Pin reactor thread i to core i (modulo the core count). Default false.
    pub pin_reactors: bool,
    /// Separate address for `/metrics` and `/api/*`; empty serves them on `listen`. Default empty.
    pub admin_listen: String,
    /// Secret for signed access tokens; empty (and no file) disables them. Default empty.
    pub auth_secret: String,
    /// File whose first line is the token secret; wins over `auth_secret`. Default empty.
    pub auth_secret_file: String,
    /// Browser origins allowed to open WebSockets; empty allows any. Default empty.
    pub allowed_origins: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            reactors: 0,
            node_id: String::new(),
            bus: "local".into(),
            amqp_namespace: String::new(),
            amqp_publishers: 2,
            amqp_batch_max: 64,
            amqp_confirm_window: 1000,
            amqp_queue_messages: 65_536,
            amqp_confirm_timeout_ms: 10_000,
            amqp_node_queue_ttl_ms: 60_000,
            amqp_node_queue_max_length: 100_000,
            amqp_prefetch: 1000,
            ack_after: AckAfter::Published,
            store: DEFAULT_STORE.into(),
            writer_threads: 2,
            writer_batch_max: 10000,
            writer_batch_max_age_ms: 5,
            writer_queue_messages: 100_000,
            store_breaker_failures: 3,
            store_retry_max_ms: 5000,
            persist_timeout_ms: 10_000,
            query_threads: 2,
            query_queue: 256,
            query_timeout_ms: 10_000,
            store_pool_size: 0,
            memory_store_max_rows: 1_000_000,
            max_connections: 10_000,
            max_message_bytes: 64 * 1024,
            read_buffer_bytes: 4096,
            output_hard_limit_bytes: 1024 * 1024,
            output_soft_limit_bytes: 256 * 1024,
            output_soft_limit_ms: 10_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            ping_interval_ms: 30_000,
            rate_limit_per_sec: 0,
            rate_limit_burst: 50,
            max_request_head_bytes: 8192,
            reactor_queue_batches: 4096,
            max_presence_entries: 1_000_000,
            shutdown_timeout_ms: 10_000,
            backlog: 1024,
            tcp_nodelay: true,
            socket_send_buffer_bytes: 0,
            socket_recv_buffer_bytes: 0,
            tcp_keepalive_secs: 0,
            reuse_port: true,
            pin_reactors: false,
            admin_listen: String::new(),
            auth_secret: String::new(),
            auth_secret_file: String::new(),
            allowed_origins: Vec::new(),
        }
    }
}

/// A configuration that could not be loaded or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML or a value in it is malformed, or a key is unknown.
    #[error("{origin}: {message}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The values parse but break a rule.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Prefix of the environment variables that override keys: `CHATFLOW_MAX_CONNECTIONS`, ...
pub const ENV_PREFIX: &str = "CHATFLOW_";

impl Config {
    /// Loads defaults, then `file` (if any), then `CHATFLOW_*` variables from `env`, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        origin: path.display().to_string(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
        for (name, value) in env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            let value = match defaults.get(&key) {
                // Lists come as comma-separated values.
                Some(toml::Value::Array(_)) => toml::Value::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(|v| toml::Value::String(v.to_string()))
                        .collect(),
                ),
                Some(toml::Value::String(_)) => toml::Value::String(value),
                Some(_) => env_value(&value),
                // Unknown CHATFLOW_ variables may belong to other tools (e.g. the load tester).
                None => continue,
            };
            table.insert(key, value);
        }
        let origin = file.map_or("environment".to_string(), |p| {
            format!("{} (or CHATFLOW_* environment)", p.display())
        });
        let config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin,
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Every key name, as written in the file (lower case) and, upper-cased, in the environment.
    pub fn keys() -> Vec<String> {
        match toml::Table::try_from(Config::default()) {
            Ok(t) => t.keys().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Checks the rules that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(m));
        if self.bus != "local" && !self.bus.starts_with("amqp://") {
            return fail(format!(
                "bus {:?} is not one of local or amqp://USER:PASS@HOST:PORT/VHOST",
                crate::store::redact(&self.bus)
            ));
        }
        if self.bus.starts_with("amqp://") {
            if self.amqp_publishers == 0
                || self.amqp_batch_max == 0
                || self.amqp_confirm_window == 0
                || self.amqp_queue_messages == 0
                || self.amqp_prefetch == 0
            {
                return fail("amqp_publishers, amqp_batch_max, amqp_confirm_window, amqp_queue_messages and amqp_prefetch must be at least 1".into());
            }
            if !self
                .amqp_namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
            {
                return fail("amqp_namespace may hold only A-Z, a-z, 0-9, '.', '_' and '-'".into());
            }
        }
        let store_ok = self.store == "memory"
            || self
                .store
                .strip_prefix("sqlite:")
                .is_some_and(|p| !p.is_empty())
            || self.store.starts_with("postgres://")
            || self.store.starts_with("postgresql://");
        if !store_ok {
            return fail(format!(
                "store {:?} is not one of sqlite:PATH, postgres://USER@HOST:PORT/DB or memory",
                crate::store::redact(&self.store)
            ));
        }
        if self.writer_threads == 0 || self.query_threads == 0 {
            return fail("writer_threads and query_threads must be at least 1".into());
        }
        if !(1..=100_000).contains(&self.writer_batch_max) {
            return fail("writer_batch_max must be between 1 and 100000".into());
        }
        if self.writer_batch_max_age_ms > 60_000 {
            return fail("writer_batch_max_age_ms must be at most 60000".into());
        }
        if self.writer_queue_messages < self.writer_batch_max {
            return fail("writer_queue_messages must be at least writer_batch_max".into());
        }
        if self.store_breaker_failures == 0 || self.query_queue == 0 {
            return fail("store_breaker_failures and query_queue must be at least 1".into());
        }
        if self.persist_timeout_ms == 0
            || self.query_timeout_ms == 0
            || self.store_retry_max_ms == 0
        {
            return fail(
                "persist_timeout_ms, query_timeout_ms and store_retry_max_ms must be above 0"
                    .into(),
            );
        }
        if self.memory_store_max_rows == 0 {
            return fail("memory_store_max_rows must be at least 1".into());
        }
        if self.max_connections == 0 {
            return fail("max_connections must be at least 1".into());
        }
        if !(125..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            return fail("max_message_bytes must be between 125 and 67108864".into());
        }
        if !(256..=1024 * 1024).contains(&self.read_buffer_bytes) {
            return fail("read_buffer_bytes must be between 256 and 1048576".into());
        }
        if self.output_soft_limit_bytes > self.output_hard_limit_bytes {
            return fail("output_soft_limit_bytes must not exceed output_hard_limit_bytes".into());
        }
        if self.output_hard_limit_bytes < 4096 || self.output_soft_limit_bytes < 1024 {
            return fail(
                "output_hard_limit_bytes must be at least 4096 and output_soft_limit_bytes at least 1024"
                    .into(),
            );
        }
        if self.handshake_timeout_ms == 0 || self.idle_timeout_ms == 0 {
            return fail("handshake_timeout_ms and idle_timeout_ms must be above 0".into());
        }
        if self.ping_interval_ms != 0 && self.ping_interval_ms >= self.idle_timeout_ms {
            return fail("ping_interval_ms must be below idle_timeout_ms (or 0)".into());
        }
        if self.max_request_head_bytes < 512 {
            return fail("max_request_head_bytes must be at least 512".into());
        }
        if self.reactor_queue_batches == 0 {
            return fail("reactor_queue_batches must be at least 1".into());
        }
        if self.backlog <= 0 {
            return fail("backlog must be at least 1".into());
        }
        if self.reactors > 1024 {
            return fail("reactors must be at most 1024".into());
        }
        if !self.admin_listen.is_empty() {
            match self.admin_addr() {
                Some(addr) if addr == self.listen && addr.port() != 0 => {
                    return fail("admin_listen must differ from listen".into());
                }
                Some(_) => {}
                None => {
                    return fail(format!(
                        "admin_listen {:?} is not ADDRESS:PORT",
                        self.admin_listen
                    ));
                }
            }
        }
        self.auth_key()?;
        for origin in &self.allowed_origins {
            if normalize_origin(origin).is_none() {
                return fail(format!(
                    "allowed_origins entry {origin:?} must look like https://host[:port] (scheme, host, no path)"
                ));
            }
        }
        if self.tcp_keepalive_secs > 32_767 {
            return fail("tcp_keepalive_secs must be at most 32767 (the kernel's limit)".into());
        }
        if !self.node_id.is_empty() && !crate::protocol::is_valid_id(&self.node_id) {
            return fail("node_id must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'".into());
        }
        Ok(())
    }

    /// `admin_listen` parsed; `None` when empty or malformed.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listen.parse().ok()
    }

    /// The token secret from `auth_secret_file` or `auth_secret`; `None` when auth is off.
    pub fn auth_key(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let secret = if !self.auth_secret_file.is_empty() {
            let text = std::fs::read_to_string(&self.auth_secret_file).map_err(|source| {
                ConfigError::Read {
                    path: self.auth_secret_file.clone(),
                    source,
                }
            })?;
            text.lines().next().unwrap_or("").trim().to_string()
        } else {
            self.auth_secret.clone()
        };
        if secret.is_empty() {
            if !self.auth_secret_file.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{} holds no secret",
                    self.auth_secret_file
                )));
            }
            return Ok(None);
        }
        if secret.len() < 16 {
            return Err(ConfigError::Invalid(
                "the auth secret must be at least 16 characters".into(),
            ));
        }
        Ok(Some(secret.into_bytes()))
    }

    /// The reactor count after resolving 0 to the number of cores.
    pub fn reactor_count(&self) -> usize {
        if self.reactors > 0 {
            self.reactors
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The node id after resolving empty to the host name.
    pub fn resolved_node_id(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(64)
            .collect();
        if host.is_empty() {
            "chatflow".into()
        } else {
            host
        }
    }

    /// `handshake_timeout_ms` as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// `idle_timeout_ms` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// `ping_interval_ms` as a duration, `None` when pings are off.
    pub fn ping_interval(&self) -> Option<Duration> {
        (self.ping_interval_ms > 0).then(|| Duration::from_millis(self.ping_interval_ms))
    }

    /// `output_soft_limit_ms` as a duration.
    pub fn output_soft_limit_window(&self) -> Duration {
        Duration::from_millis(self.output_soft_limit_ms)
    }

    /// `shutdown_timeout_ms` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// `query_timeout_ms` as a duration.
    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }

    /// `persist_timeout_ms` as a duration.
    pub fn persist_timeout(&self) -> Duration {
        Duration::from_millis(self.persist_timeout_ms)
    }

    /// The RabbitMQ bus's settings (meaningful when `bus` is an `amqp://` URL).
    pub fn amqp_settings(&self) -> crate::amqp::AmqpSettings {
        crate::amqp::AmqpSettings {
            url: self.bus.clone(),
            namespace: self.amqp_namespace.clone(),
            node_id: self.resolved_node_id(),
            publishers: self.amqp_publishers,
            batch_max: self.amqp_batch_max,
            confirm_window: self.amqp_confirm_window,
            queue_messages: self.amqp_queue_messages,
            confirm_timeout: Duration::from_millis(self.amqp_confirm_timeout_ms),
            node_queue_ttl: Duration::from_millis(self.amqp_node_queue_ttl_ms),
            node_queue_max_length: self.amqp_node_queue_max_length,
            prefetch: self.amqp_prefetch,
        }
    }

    /// The store's backend settings.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        let auto = (self.writer_threads + self.query_threads + 1).min(u32::MAX as usize) as u32;
        crate::store::StoreOptions {
            pool_size: if self.store_pool_size == 0 {
                auto
            } else {
                self.store_pool_size
            },
            memory_max_rows: self.memory_store_max_rows,
        }
    }

    /// The writer pool's settings.
    pub fn writer_options(&self) -> crate::store::writer::WriterOptions {
        crate::store::writer::WriterOptions {
            threads: self.writer_threads,
            batch_max: self.writer_batch_max,
            batch_max_age: Duration::from_millis(self.writer_batch_max_age_ms),
            queue_capacity: self.writer_queue_messages,
            breaker_failures: self.store_breaker_failures,
            retry_max: Duration::from_millis(self.store_retry_max_ms),
        }
    }

    /// The effective configuration as TOML, for `check-config` and the start-up log.
    /// Secrets are shown as `<redacted>`: this text goes to terminals and logs.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.redacted()).unwrap_or_default()
    }

    fn redacted(&self) -> Config {
        let mut c = self.clone();
        if !c.auth_secret.is_empty() {
            c.auth_secret = "<redacted>".into();
        }
        c.store = crate::store::redact(&c.store);
        c.bus = crate::store::redact(&c.bus);
        c
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_toml())
    }
}

/// `scheme://host[:port]` in lower case without the scheme's default port, as browsers send
/// it in `Origin`; `None` for anything else (a path, no scheme, `null`).
pub fn normalize_origin(origin: &str) -> Option<String> {
    let lower = origin.trim().to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://")?;
    let default_port = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let host = rest.strip_suffix(default_port).unwrap_or(rest);
    Some(format!("{scheme}://{host}"))
}

/// Reads an environment value as the TOML type it looks like: integer, bool, else string.
fn env_value(s: &str) -> toml::Value {
    if let Ok(i) = s.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = s.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, env(&[])).expect("defaults");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn environment_overrides_file() {
        let dir = std::env::temp_dir().join(format!("chatflow-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "max_connections = 500\nlisten = \"127.0.0.1:9000\"\n",
        )
        .expect("write");
        let c = Config::load(
            Some(&path),
            env(&[
                ("CHATFLOW_MAX_CONNECTIONS", "700"),
                ("CHATFLOW_TCP_NODELAY", "false"),
                ("OTHER", "1"),
            ]),
        )
        .expect("load");
        assert_eq!(c.max_connections, 700);
        assert!(!c.tcp_nodelay);
        assert_eq!(c.listen.port(), 9000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lists_come_comma_separated_from_the_environment() {
        let c = Config::load(
            None,
            env(&[(
                "CHATFLOW_ALLOWED_ORIGINS",
                "https://a.example, http://b.example:8080",
            )]),
        )
        .expect("load");
        assert_eq!(
            c.allowed_origins,
            ["https://a.example", "http://b.example:8080"]
        );
        let err =
            Config::load(None, env(&[("CHATFLOW_ALLOWED_ORIGINS", "a.example")])).unwrap_err();
        assert!(err.to_string().contains("allowed_origins"), "{err}");
        let err = Config::load(None, env(&[("CHATFLOW_AUTH_SECRET", "short")])).unwrap_err();
        assert!(err.to_string().contains("16 characters"), "{err}");
        let err = Config::load(None, env(&[("CHATFLOW_ADMIN_LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("admin_listen"), "{err}");
        // A numeric-looking string stays a string for string keys.
        let c = Config::load(None, env(&[("CHATFLOW_NODE_ID", "42")])).expect("load");
        assert_eq!(c.node_id, "42");
    }

    #[test]
    fn secrets_never_reach_printed_config() {
        let c = Config {
            auth_secret: "a-very-secret-value-1234".into(),
            ..Config::default()
        };
        assert!(!c.to_toml().contains("a-very-secret-value-1234"));
        assert!(!format!("{c:?}").contains("a-very-secret-value-1234"));
        assert!(c.to_toml().contains("auth_secret = \"<redacted>\""));
        let c = Config {
            store: "postgres://chat:db-password-9@db:5432/chat".into(),
            bus: "amqp://chat:mq-password-7@mq:5672/%2f".into(),
            ..Config::default()
        };
        let shown = c.to_toml();
        assert!(
            !shown.contains("db-password-9") && !shown.contains("mq-password-7"),
            "{shown}"
        );
        assert!(
            shown.contains("postgres://chat:***@db:5432/chat"),
            "{shown}"
        );
    }

    #[test]
    fn origins_are_normalised_as_browsers_send_them() {
        let n = |s: &str| normalize_origin(s);
        assert_eq!(
            n("HTTPS://Chat.Example.com:443").as_deref(),
            Some("https://chat.example.com")
        );
        assert_eq!(
            n("http://a.example:8080").as_deref(),
            Some("http://a.example:8080")
        );
        assert_eq!(
            n("http://a.example:80").as_deref(),
            Some("http://a.example")
        );
        for bad in [
            "null",
            "a.example",
            "https://a.example/path",
            "https://",
            "ftp://a.example",
            "https://u@a.example",
        ] {
            assert_eq!(n(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_values_are_explained() {
        let err = Config::load(None, env(&[("CHATFLOW_MAX_CONNECTIONS", "lots")])).unwrap_err();
        assert!(err.to_string().contains("max_connections"), "{err}");
        let err = Config::load(None, env(&[("CHATFLOW_BUS", "kafka://x")])).unwrap_err();
        assert!(err.to_string().contains("bus"), "{err}");
        let err = Config::load(None, env(&[("CHATFLOW_STORE", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("sqlite:PATH"), "{err}");
        let err = Config::load(
            None,
            env(&[
                ("CHATFLOW_STORE", "postgres://u:hunter2@h/db"),
                ("CHATFLOW_WRITER_BATCH_MAX", "0"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("writer_batch_max"), "{err}");
        let err = Config::load(
            None,
            env(&[("CHATFLOW_OUTPUT_SOFT_LIMIT_BYTES", "9999999")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("output_soft_limit_bytes"), "{err}");
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("chatflow-config-u-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "max_conections = 5\n").expect("write");
        let err = Config::load(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_sample_file_documents_every_key_and_parses() {
        let sample = include_str!("../chatflow.example.toml");
        for key in Config::keys() {
            assert!(
                sample.contains(&format!("\n# {key} =")) || sample.contains(&format!("\n{key} =")),
                "chatflow.example.toml lacks {key}"
            );
        }
        let uncommented: String = sample
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| r.contains(" = "))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let table: toml::Table = uncommented.parse().expect("sample parses");
        let c: Config = table.try_into().expect("sample values are valid keys");
        assert_eq!(c, Config::default(), "the sample shows the defaults");
    }
}
