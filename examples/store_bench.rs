//! Benchmarks of ChatFlow's persistence layer, through the real writer pool and readers.
//!
//! ```sh
//! # Writer throughput: N producers push realistic messages into the writer pool as fast as
//! # its queue takes them, on a fresh database that is dropped afterwards.
//! cargo run --release --example store_bench -- writer \
//!     --store postgres://postgres@127.0.0.1:5432/cfbench_w --fresh \
//!     --rows 400000 --threads 2 --batch-max 5000 --batch-age-ms 5
//! cargo run --release --example store_bench -- writer --store sqlite:/tmp/cfbench_w.db --fresh
//!
//! # A large database (10 million rows over 24 hours of server time), then its query latency.
//! cargo run --release --example store_bench -- fill \
//!     --store postgres://postgres@127.0.0.1:5432/cfbench_10m --fresh --vacuum-analyze --verify
//! cargo run --release --example store_bench -- queries \
//!     --store postgres://postgres@127.0.0.1:5432/cfbench_10m --iterations 200
//! ```
//!
//! Every mode prints a readable summary on stderr and one JSON line on stdout (the last line),
//! which `bench/store-bench` collects. `--fresh` only ever drops or deletes a database whose
//! name starts with `cfbench_`.
//!
//! What `writer` measures: rows/s from the first send to the moment the pool's `rows` counter
//! (rows committed) reaches `--rows`; the pool's own batch-size, write-time and commit-lag
//! histograms; the ack latency (send → the writer's completion reaching a mailbox, as with
//! `ack_after = persisted`); and where the CPU went over that window: this process (split into
//! writer threads and the rest), the PostgreSQL backends of this database, PostgreSQL's
//! background processes, everything else on the machine, and steal.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chatflow::mailbox::{Mailbox, Reply};
use chatflow::metrics::Histogram;
use chatflow::protocol::{MessageType, derived_message_id};
use chatflow::store::query::{self, ApiQuery};
use chatflow::store::writer::{Origin, Persist, WriterOptions, WriterPool};
use chatflow::store::{self, Record, Store, StoreOptions, Take, Window};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::{NoContext, Timestamp, Uuid};

#[derive(Parser)]
#[command(about = "Benchmarks of ChatFlow's store: writer pool throughput, query latency, fill")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Writer pool throughput: producers push messages as fast as the queue takes them.
    Writer(WriterArgs),
    /// Latency of the core queries against a filled store, through `query::execute`.
    Queries(QueryArgs),
    /// Fills a store with many rows spread over hours of server time, through the writer pool.
    Fill(FillArgs),
}

#[derive(Args, Clone)]
struct PoolArgs {
    /// `postgres://HOST/cfbench_NAME` or `sqlite:PATH/cfbench_NAME.db` (or `memory`).
    #[arg(long)]
    store: String,
    /// Drop and recreate the database (delete the SQLite file) first, and drop it at the end
    /// unless --keep. Only for names starting with `cfbench_`.
    #[arg(long)]
    fresh: bool,
    /// With --fresh: keep the database at the end.
    #[arg(long)]
    keep: bool,
    /// Writer threads (SQLite uses one).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Most messages in one write batch.
    #[arg(long, default_value_t = 1000)]
    batch_max: usize,
    /// Longest a batch waits for more messages after its first, milliseconds.
    #[arg(long, default_value_t = 5)]
    batch_age_ms: u64,
    /// Capacity of the writers' queue (messages).
    #[arg(long, default_value_t = 100_000)]
    queue: usize,
    /// Seed of the message generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct WriterArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Messages to store.
    #[arg(long, default_value_t = 400_000)]
    rows: u64,
    /// Producer threads.
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Total send rate, messages/s (open loop); 0 sends as fast as the queue takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How message ids are made: `v7` (time-ordered, a message without clientMessageId) or
    /// `v5` (derived from userId and clientMessageId: random order).
    #[arg(long, value_enum, default_value_t = IdKind::V7)]
    ids: IdKind,
    /// Send messages without an origin: no completions, no ack latency.
    #[arg(long)]
    no_acks: bool,
    /// Every Nth message sent is the previous one again (a client's retry): a batch holding
    /// both goes through PostgreSQL's staging path (COPY into `staging`, then INSERT ... ON
    /// CONFLICT) instead of the direct COPY. `--rows` counts what is sent, repeats included.
    #[arg(long, default_value_t = 0)]
    dup_every: u64,
    /// PostgreSQL, after the migration: drop an index of `messages` (room_ts, user_ts,
    /// ts_brin or pkey); repeatable. Shows what each index costs the writers.
    #[arg(long, value_parser = ["room_ts", "user_ts", "ts_brin", "pkey"])]
    drop_index: Vec<String>,
    /// PostgreSQL: log every statement's duration for this database
    /// (`log_min_duration_statement = 0`, reset afterwards on an existing database), for a
    /// breakdown of a batch's time.
    #[arg(long)]
    pg_log_statements: bool,
}

#[derive(Args)]
struct FillArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Messages to store.
    #[arg(long, default_value_t = 10_000_000)]
    rows: u64,
    /// Hours of server time the messages are spread over (evenly, in time order).
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
    /// First server timestamp (RFC 3339); default: `--hours` before now, on the hour.
    #[arg(long)]
    start: Option<String>,
    /// PostgreSQL: run VACUUM ANALYZE at the end and report table and index sizes.
    #[arg(long)]
    vacuum_analyze: bool,
    /// PostgreSQL: check that every rollup sums to the number of stored messages.
    #[arg(long)]
    verify: bool,
}

#[derive(Args)]
struct QueryArgs {
    /// The filled store.
    #[arg(long)]
    store: String,
    /// Timed calls of each query.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Untimed calls of each query first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Window sizes of active users, seconds (comma-separated).
    #[arg(long, default_value = "60,600,3600", value_delimiter = ',')]
    active_windows: Vec<u64>,
    /// Window of the room queries, seconds.
    #[arg(long, default_value_t = 3600)]
    room_window: u64,
    /// Window of analytics, seconds.
    #[arg(long, default_value_t = 600)]
    analytics_window: u64,
    /// Seed of the parameter draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IdKind {
    V7,
    V5,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let out = match Cli::parse().mode {
        Mode::Writer(a) => writer_mode(&a)?,
        Mode::Queries(a) => queries_mode(&a)?,
        Mode::Fill(a) => fill_mode(&a)?,
    };
    println!("{out}");
    Ok(())
}

// ---- the database under test -----------------------------------------------------------

/// Where the store lives, and how to make it fresh and remove it.
enum Target {
    Postgres { server: String, db: String },
    Sqlite { path: String },
    Memory,
}

impl Target {
    fn of(spec: &str) -> Result<Target> {
        if spec == "memory" {
            return Ok(Target::Memory);
        }
        if let Some(path) = spec.strip_prefix("sqlite:") {
            return Ok(Target::Sqlite {
                path: path.to_string(),
            });
        }
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            let no_query = spec.split('?').next().unwrap_or(spec);
            let (server, db) = no_query
                .rsplit_once('/')
                .filter(|(s, d)| !d.is_empty() && s.contains("://") && !s.ends_with('/'))
                .ok_or_else(|| anyhow!("{spec}: the URL must name a database"))?;
            return Ok(Target::Postgres {
                server: server.to_string(),
                db: db.to_string(),
            });
        }
        bail!("unknown store {spec:?}: postgres://.../cfbench_NAME, sqlite:PATH or memory")
    }

    fn check_disposable(&self) -> Result<()> {
        let name = match self {
            Target::Postgres { db, .. } => db.as_str(),
            Target::Sqlite { path } => Path::new(path)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(""),
            Target::Memory => return Ok(()),
        };
        ensure!(
            name.starts_with("cfbench_")
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.'),
            "--fresh drops the database: its name must start with cfbench_ and be plain \
             ([A-Za-z0-9_.]), got {name:?}"
        );
        Ok(())
    }

    fn admin(server: &str) -> Result<postgres::Client> {
        let url = format!("{server}/postgres");
        postgres::Client::connect(&url, postgres::NoTls)
            .with_context(|| format!("connecting to {}", store::redact(&url)))
    }

    /// Drops and creates the database (deletes the SQLite file and its WAL).
    fn recreate(&self, log_statements: bool) -> Result<()> {
        self.check_disposable()?;
        match self {
            Target::Postgres { server, db } => {
                let mut admin = Target::admin(server)?;
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))?;
                admin.batch_execute(&format!("CREATE DATABASE {db}"))?;
                if log_statements {
                    // Durations only: the rollup arrays as logged parameters would be
                    // megabytes per batch.
                    admin.batch_execute(&format!(
                        "ALTER DATABASE {db} SET log_min_duration_statement = 0; \
                         ALTER DATABASE {db} SET log_parameter_max_length = 0"
                    ))?;
                }
            }
            Target::Sqlite { path } => remove_sqlite(path)?,
            Target::Memory => {}
        }
        Ok(())
    }

    /// Turns statement-duration logging of an existing database on or off (PostgreSQL).
    fn log_statements(&self, on: bool) -> Result<()> {
        let Target::Postgres { server, db } = self else {
            bail!("--pg-log-statements is for PostgreSQL");
        };
        self.check_disposable()?;
        let mut admin = Target::admin(server)?;
        admin.batch_execute(&if on {
            format!(
                "ALTER DATABASE {db} SET log_min_duration_statement = 0; \
                 ALTER DATABASE {db} SET log_parameter_max_length = 0"
            )
        } else {
            format!(
                "ALTER DATABASE {db} RESET log_min_duration_statement; \
                 ALTER DATABASE {db} RESET log_parameter_max_length"
            )
        })?;
        Ok(())
    }

    fn remove(&self) -> Result<()> {
        self.check_disposable()?;
        match self {
            Target::Postgres { server, db } => {
                let mut admin = Target::admin(server)?;
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))?;
            }
            Target::Sqlite { path } => remove_sqlite(path)?,
            Target::Memory => {}
        }
        Ok(())
    }

    /// A plain client on the database under test.
    fn client(&self, spec: &str) -> Result<Option<postgres::Client>> {
        match self {
            Target::Postgres { .. } => Ok(Some(
                postgres::Client::connect(spec, postgres::NoTls)
                    .with_context(|| format!("connecting to {}", store::redact(spec)))?,
            )),
            _ => Ok(None),
        }
    }
}

fn remove_sqlite(path: &str) -> Result<()> {
    for p in [
        path.to_string(),
        format!("{path}-wal"),
        format!("{path}-shm"),
    ] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {p}")),
        }
    }
    Ok(())
}

fn open_store(spec: &str, threads: usize) -> Result<Arc<dyn Store>> {
    let options = StoreOptions {
        // Every writer keeps a connection; one more for the readers and the migration.
        pool_size: u32::try_from(threads + 2).unwrap_or(u32::MAX),
        ..StoreOptions::default()
    };
    store::open(spec, &options).map_err(|e| anyhow!("opening {}: {e}", store::redact(spec)))
}

// ---- realistic messages ----------------------------------------------------------------

const ROOMS: usize = 20;
const MAX_USER: i32 = 100_000;
const WORDS: &[&str] = &[
    "deploy",
    "tonight",
    "the",
    "build",
    "is",
    "green",
    "again",
    "can",
    "someone",
    "review",
    "my",
    "branch",
    "lunch",
    "at",
    "noon",
    "coffee",
    "machine",
    "broke",
    "standup",
    "moved",
    "to",
    "ten",
    "looks",
    "good",
    "to",
    "me",
    "shipping",
    "after",
    "tests",
    "pass",
    "who",
    "owns",
    "this",
    "alert",
    "pager",
    "quiet",
    "today",
    "nice",
    "work",
    "everyone",
    "retro",
    "notes",
    "are",
    "in",
    "the",
    "doc",
    "latency",
    "dropped",
    "after",
    "the",
    "patch",
    "new",
    "dashboard",
    "is",
    "live",
    "please",
    "rebase",
    "first",
    "merging",
    "now",
    "thanks",
    "for",
    "the",
    "fix",
    "back",
    "in",
    "five",
    "minutes",
    "weekend",
    "plans",
    "release",
    "candidate",
    "cut",
    "from",
    "main",
    "database",
    "migration",
    "done",
    "rollback",
    "ready",
];

/// Builds messages the way a reactor does for an accepted frame.
struct Generator {
    rng: fastrand::Rng,
    rooms: Vec<Arc<str>>,
    node: Arc<str>,
    texts: Vec<String>,
    ids: IdKind,
    /// Per producer, for `v5` ids: the client's key counter.
    key: u64,
    producer: usize,
}

impl Generator {
    fn new(seed: u64, producer: usize, ids: IdKind) -> Generator {
        Generator {
            rng: fastrand::Rng::with_seed(seed.wrapping_mul(1_000_003) + producer as u64),
            rooms: room_names(),
            node: Arc::from("node-1"),
            texts: message_texts(seed),
            ids,
            key: 0,
            producer,
        }
    }

    /// One message accepted at `server_ts`; its id is a v7 of that instant (or a v5).
    fn record(&mut self, server_ts: OffsetDateTime) -> Record {
        let user = self.rng.i32(1..=MAX_USER);
        let roll = self.rng.u8(0..100);
        let message_type = if roll < 90 {
            MessageType::Text
        } else if roll < 95 {
            MessageType::Join
        } else {
            MessageType::Leave
        };
        let message_id = match self.ids {
            IdKind::V7 => {
                let nanos = server_ts.unix_timestamp_nanos().max(0) as u128;
                Uuid::new_v7(Timestamp::from_unix(
                    NoContext,
                    (nanos / 1_000_000_000) as u64,
                    (nanos % 1_000_000_000) as u32,
                ))
            }
            IdKind::V5 => {
                self.key += 1;
                let key = format!("p{}-{}", self.producer, self.key);
                derived_message_id(user as u32, &key)
            }
        };
        let mut username = String::with_capacity(10);
        username.push_str("user");
        username.push_str(itoa::Buffer::new().format(user));
        let lag = time::Duration::microseconds(self.rng.i64(0..50_000));
        Record {
            message_id,
            room_id: self.rooms[self.rng.usize(0..ROOMS)].clone(),
            user_id: user,
            username,
            message: self.texts[self.rng.usize(0..self.texts.len())].clone(),
            message_type,
            client_ts: server_ts - lag,
            server_ts,
            node_id: self.node.clone(),
        }
    }
}

/// Rooms "1".."20", as `chatflow load` names them.
fn room_names() -> Vec<Arc<str>> {
    (1..=ROOMS).map(|r| Arc::from(r.to_string())).collect()
}

/// 512 texts of 40 to 80 characters (60 on average), made of words.
fn message_texts(seed: u64) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    (0..512)
        .map(|_| {
            let target = rng.usize(40..=80);
            let mut s = String::with_capacity(target + 12);
            while s.len() < target {
                if !s.is_empty() {
                    s.push(' ');
                }
                s.push_str(WORDS[rng.usize(0..WORDS.len())]);
            }
            s.truncate(target);
            s
        })
        .collect()
}

// ---- CPU accounting ----------------------------------------------------------------------

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// utime + stime of a /proc stat file, in ticks.
fn stat_ticks(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The machine's CPU lines: (busy, iowait, steal) ticks summed over all CPUs.
fn machine_ticks() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    (at(0) + at(1) + at(2) + at(5) + at(6), at(4), at(7))
}

/// CPU of this process's writer threads.
fn writer_ticks() -> u64 {
    let mut writers = 0;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            let p = e.path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            let t = stat_ticks(&p.join("stat").to_string_lossy()).unwrap_or(0);
            if comm.starts_with("writer-") {
                writers += t;
            }
        }
    }
    writers
}

/// PostgreSQL's background processes (WAL writer, checkpointer, background writer,
/// autovacuum): pid → ticks.
fn pg_background_ticks() -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("postgres: ")
            && [
                "walwriter",
                "checkpointer",
                "background writer",
                "autovacuum",
            ]
            .iter()
            .any(|k| cmd.contains(k))
            && let Some(t) = stat_ticks(&format!("/proc/{pid}/stat"))
        {
            out.insert(pid, t);
        }
    }
    out
}

/// The backends serving the database under test (not `client`'s own): pid → ticks.
fn pg_backend_ticks(client: &mut postgres::Client) -> HashMap<u32, u64> {
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap_or_default();
    rows.iter()
        .filter_map(|r| r.try_get::<_, i32>(0).ok())
        .filter_map(|pid| {
            let pid = u32::try_from(pid).ok()?;
            Some((pid, stat_ticks(&format!("/proc/{pid}/stat"))?))
        })
        .collect()
}

/// Growth of a set of per-process counters: processes that appeared count from zero.
fn grown(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// A snapshot of every CPU counter the report needs.
struct CpuSnapshot {
    process: u64,
    writers: u64,
    machine: (u64, u64, u64),
    backends: HashMap<u32, u64>,
    background: HashMap<u32, u64>,
}

impl CpuSnapshot {
    fn take(client: Option<&mut postgres::Client>) -> CpuSnapshot {
        CpuSnapshot {
            process: stat_ticks("/proc/self/stat").unwrap_or(0),
            writers: writer_ticks(),
            machine: machine_ticks(),
            backends: client.map(pg_backend_ticks).unwrap_or_default(),
            background: pg_background_ticks(),
        }
    }

    /// The CPU seconds spent between `self` and `later`, by consumer.
    fn report(&self, later: &CpuSnapshot) -> Value {
        let hz = clock_ticks();
        let s = |t: u64| t as f64 / hz;
        let process = later.process.saturating_sub(self.process);
        let writers = later.writers.saturating_sub(self.writers);
        let backends = grown(&self.backends, &later.backends);
        let background = grown(&self.background, &later.background);
        let busy = later.machine.0.saturating_sub(self.machine.0);
        let other = busy.saturating_sub(process + backends + background);
        json!({
            "process_cpu_s": round3(s(process)),
            "writer_threads_cpu_s": round3(s(writers)),
            // Threads that ended in the window (producers) are only in the process total.
            "other_threads_cpu_s": round3(s(process.saturating_sub(writers))),
            "pg_backends_cpu_s": round3(s(backends)),
            "pg_background_cpu_s": round3(s(background)),
            "machine_busy_s": round3(s(busy)),
            "other_work_cpu_s": round3(s(other)),
            "iowait_s": round3(s(later.machine.1.saturating_sub(self.machine.1))),
            "steal_s": round3(s(later.machine.2.saturating_sub(self.machine.2))),
        })
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- the pool's histograms -------------------------------------------------------------------

/// count, sum and cumulative buckets of a pool histogram (read from its exposition text).
fn histogram(h: &Histogram) -> (u64, f64, Vec<(f64, u64)>) {
    let mut text = String::new();
    h.render(&mut text, "h", "");
    let (mut count, mut sum, mut buckets) = (0, 0.0, Vec::new());
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("h_bucket{le=\"") {
            let (le, n) = rest.split_once("\"} ").unwrap_or(("", "0"));
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            buckets.push((le, n.parse().unwrap_or(0)));
        } else if let Some(v) = line.strip_prefix("h_sum ") {
            sum = v.parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("h_count ") {
            count = v.parse().unwrap_or(0);
        }
    }
    (count, sum, buckets)
}

/// The upper bound of the bucket holding quantile `q`.
fn bucket_quantile(buckets: &[(f64, u64)], count: u64, q: f64) -> f64 {
    let rank = (q * count as f64).ceil().max(1.0) as u64;
    buckets
        .iter()
        .find(|(_, n)| *n >= rank)
        .map_or(f64::NAN, |(le, _)| *le)
}

fn histogram_json(h: &Histogram, scale: f64) -> Value {
    let (count, sum, buckets) = histogram(h);
    let mean = if count > 0 {
        sum / count as f64 * scale
    } else {
        0.0
    };
    let q = |p: f64| {
        let v = bucket_quantile(&buckets, count, p) * scale;
        if v.is_finite() { json!(v) } else { json!(null) }
    };
    json!({ "count": count, "mean": round3(mean), "p50_bucket": q(0.5), "p99_bucket": q(0.99) })
}

// ---- writer mode -------------------------------------------------------------------------

fn writer_options(p: &PoolArgs) -> WriterOptions {
    WriterOptions {
        threads: p.threads,
        batch_max: p.batch_max,
        batch_max_age: Duration::from_millis(p.batch_age_ms),
        queue_capacity: p.queue.max(p.batch_max),
        breaker_failures: 3,
        retry_max: Duration::from_secs(5),
    }
}

/// What one producer sends.
#[derive(Clone, Copy)]
struct Plan {
    /// Messages to send.
    count: u64,
    /// The sequence number of its first message.
    seq_base: u64,
    /// Messages/s (open loop), or 0 for as fast as the queue takes them.
    rate: f64,
    /// Every Nth message repeats the previous one (0: none).
    dup_every: u64,
}

/// Sends into the pool's queue, waiting while it is full. Open loop when `plan.rate` is set:
/// message `i` is due at `start + i / rate`.
fn produce(
    queue: &chatflow::store::writer::StoreQueue,
    gen_: &mut Generator,
    plan: &Plan,
    sent_at: Option<&[AtomicU64]>,
    epoch: Instant,
) {
    let Plan {
        count,
        seq_base,
        rate: per_producer_rate,
        dup_every,
    } = *plan;
    let start = Instant::now();
    let mut previous: Option<Record> = None;
    for i in 0..count {
        if per_producer_rate > 0.0 {
            // Sleeps of at least a millisecond: the messages due meanwhile go out together,
            // as a burst of frames read by a reactor would.
            let due = start + Duration::from_secs_f64(i as f64 / per_producer_rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep((due - now).max(Duration::from_millis(1)));
            }
        }
        let record = match previous.take() {
            Some(p) if dup_every > 0 && i % dup_every == dup_every - 1 => p,
            _ => gen_.record(OffsetDateTime::now_utc()),
        };
        if dup_every > 0 {
            previous = Some(record.clone());
        }
        let mut spins = 0u32;
        while !queue.reserve() {
            spins += 1;
            if spins < 16 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let seq = seq_base + i;
        let origin = sent_at.map(|slots| {
            slots[seq as usize].store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
            Origin {
                reactor: 0,
                token: 0,
                conn: 1,
                seq,
            }
        });
        if !queue.send_reserved(Persist {
            record,
            origin,
            delivery: None,
        }) {
            log::error!("the writer pool stopped while producing");
            return;
        }
    }
}

/// Stands in for a reactor: takes the writers' completions and records each message's
/// send-to-completion latency.
struct AckSink {
    mailboxes: Arc<[Mailbox]>,
    handle: std::thread::JoinHandle<(hdrhistogram::Histogram<u64>, u64, u64)>,
    // Keeps the waker's registry alive while the writers may wake it.
    _poll: mio::Poll,
}

impl AckSink {
    fn start(sent_at: Arc<Vec<AtomicU64>>, epoch: Instant) -> Result<AckSink> {
        let poll = mio::Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0))?);
        let (mailbox, rx) = Mailbox::new(4096, waker);
        let mailboxes: Arc<[Mailbox]> = Arc::from(vec![mailbox]);
        let handle = std::thread::Builder::new()
            .name("acks".into())
            .spawn(move || {
                let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
                    .expect("histogram bounds");
                let (mut ok, mut failed) = (0u64, 0u64);
                for reply in rx.iter() {
                    let now = epoch.elapsed().as_nanos() as u64;
                    if let Reply::Settled(done) = reply {
                        for c in done {
                            if c.result.is_ok() {
                                ok += 1;
                            } else {
                                failed += 1;
                            }
                            let sent = sent_at[c.seq as usize].load(Ordering::Relaxed);
                            h.saturating_record(now.saturating_sub(sent) / 1000);
                        }
                    }
                }
                (h, ok, failed)
            })?;
        Ok(AckSink {
            mailboxes,
            handle,
            _poll: poll,
        })
    }
}

fn writer_mode(a: &WriterArgs) -> Result<Value> {
    ensure!(
        a.rows > 0 && a.producers > 0,
        "--rows and --producers must be above 0"
    );
    let p = &a.pool;
    let target = Target::of(&p.store)?;
    if p.fresh {
        target.recreate(a.pg_log_statements)?;
    } else {
        ensure!(
            a.drop_index.is_empty(),
            "--drop-index needs --fresh (it changes the schema)"
        );
        if a.pg_log_statements {
            target.log_statements(true)?;
        }
    }
    let result = run_writer(a, &target);
    if !p.fresh && a.pg_log_statements {
        target.log_statements(false)?;
    }
    if p.fresh && !p.keep {
        target.remove()?;
    }
    result
}

fn run_writer(a: &WriterArgs, target: &Target) -> Result<Value> {
    let p = &a.pool;
    let store = open_store(&p.store, p.threads)?;
    let mut client = target.client(&p.store)?;
    if let Some(c) = client.as_mut() {
        for index in &a.drop_index {
            let sql = match index.as_str() {
                "pkey" => "ALTER TABLE messages DROP CONSTRAINT messages_pkey".to_string(),
                other => format!("DROP INDEX messages_{other}"),
            };
            c.batch_execute(&sql).with_context(|| sql.clone())?;
        }
    } else {
        ensure!(a.drop_index.is_empty(), "--drop-index is for PostgreSQL");
    }

    let epoch = Instant::now();
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new(if a.no_acks {
        Vec::new()
    } else {
        (0..a.rows).map(|_| AtomicU64::new(0)).collect()
    });
    let sink = if a.no_acks {
        None
    } else {
        Some(AckSink::start(sent_at.clone(), epoch)?)
    };
    let mailboxes: Arc<[Mailbox]> = match &sink {
        Some(s) => s.mailboxes.clone(),
        None => Arc::from(Vec::new()),
    };
    let options = writer_options(p);
    let pool = WriterPool::start(&store, &options, mailboxes, None)
        .map_err(|e| anyhow!("starting the writer pool: {e}"))?;
    let effective_threads = p.threads.clamp(1, store.max_writers().max(1));
    let queue = pool.queue();

    // The producers wait at a barrier, so the window starts with the first send.
    let barrier = Arc::new(Barrier::new(a.producers + 1));
    let per = a.rows / a.producers as u64;
    let mut producers = Vec::new();
    for i in 0..a.producers {
        let count = if i + 1 == a.producers {
            a.rows - per * (a.producers as u64 - 1)
        } else {
            per
        };
        let (queue, barrier, sent_at) = (queue.clone(), barrier.clone(), sent_at.clone());
        let mut gen_ = Generator::new(p.seed, i, a.ids);
        let rate = a.rate as f64 / a.producers as f64;
        let dup_every = a.dup_every;
        let acks = !a.no_acks;
        producers.push(
            std::thread::Builder::new()
                .name(format!("producer-{i}"))
                .spawn(move || {
                    barrier.wait();
                    let slots = acks.then_some(&sent_at[..]);
                    let plan = Plan {
                        count,
                        seq_base: per * i as u64,
                        rate,
                        dup_every,
                    };
                    produce(&queue, &mut gen_, &plan, slots, epoch);
                })?,
        );
    }

    let loadavg_before = loadavg();
    let before = CpuSnapshot::take(client.as_mut());
    barrier.wait();
    let t0 = Instant::now();
    let stats = &queue.stats;
    let (mut half_at, mut half_rows) = (None, 0);
    let mut last_progress = (0, Instant::now());
    loop {
        let rows = stats.rows.load(Ordering::Relaxed);
        let settled = rows
            + stats.duplicates.load(Ordering::Relaxed)
            + stats.dead_lettered.load(Ordering::Relaxed)
            + stats.abandoned.load(Ordering::Relaxed);
        if half_at.is_none() && rows >= a.rows / 2 {
            half_at = Some(Instant::now());
            half_rows = rows;
        }
        if settled >= a.rows {
            break;
        }
        if rows != last_progress.0 {
            last_progress = (rows, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(120) {
            bail!("no commit for 120 s ({rows} of {} rows stored)", a.rows);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let t1 = Instant::now();
    let after = CpuSnapshot::take(client.as_mut());
    let loadavg_after = loadavg();
    for t in producers {
        let _ = t.join();
    }
    pool.close(Duration::from_secs(30));
    let acks = sink.map(|s| {
        drop(s.mailboxes);
        s.handle.join().expect("the ack thread panicked")
    });
    let rows = stats.rows.load(Ordering::Relaxed);
    let wall = (t1 - t0).as_secs_f64();
    let second_half = half_at.map(|h| (rows - half_rows) as f64 / (t1 - h).as_secs_f64());
    let cpu = before.report(&after);
    let sut_cpu = cpu["process_cpu_s"].as_f64().unwrap_or(0.0)
        + cpu["pg_backends_cpu_s"].as_f64().unwrap_or(0.0);

    let mut out = json!({
        "mode": "writer",
        "store": store.kind(),
        "spec": store::redact(&p.store),
        "threads": effective_threads,
        "batch_max": p.batch_max,
        "batch_age_ms": p.batch_age_ms,
        "queue": options.queue_capacity,
        "producers": a.producers,
        "rate": a.rate,
        "ids": if a.ids == IdKind::V7 { "v7" } else { "v5" },
        "dropped_indexes": a.drop_index,
        "dup_every": a.dup_every,
        "sent": a.rows,
        "rows": rows,
        "wall_s": round3(wall),
        "rows_per_s": (rows as f64 / wall).round(),
        "second_half_rows_per_s": second_half.map(f64::round),
        "rows_per_sut_cpu_s": if sut_cpu > 0.0 { json!((rows as f64 / sut_cpu).round()) } else { json!(null) },
        "batches": stats.batches.load(Ordering::Relaxed),
        "batch_size": histogram_json(&stats.batch_size, 1.0),
        "write_ms": histogram_json(&stats.write_seconds, 1000.0),
        "commit_lag_ms": histogram_json(&stats.commit_lag_seconds, 1000.0),
        "duplicates": stats.duplicates.load(Ordering::Relaxed),
        "dead_lettered": stats.dead_lettered.load(Ordering::Relaxed),
        "write_errors": stats.write_errors.load(Ordering::Relaxed),
        "cpu": cpu,
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
    });
    if let Some((h, ok, failed)) = acks {
        let ms = |us: u64| round3(us as f64 / 1000.0);
        out["ack_ms"] = json!({
            "count": ok + failed,
            "failed": failed,
            "p50": ms(h.value_at_quantile(0.5)),
            "p99": ms(h.value_at_quantile(0.99)),
            "max": ms(h.max()),
            "mean": round3(h.mean() / 1000.0),
        });
    }
    if let Some(c) = client.as_mut() {
        out["pg_sizes_mb"] = pg_sizes(c).unwrap_or(Value::Null);
    }
    eprintln!(
        "writer {} threads={} batch_max={} age={}ms: {} rows in {:.2} s = {:.0} rows/s \
         (second half {:.0}), mean batch {:.0}, mean write {:.1} ms, process CPU {:.2} s, \
         PG backends CPU {:.2} s, steal {:.2} s",
        store.kind(),
        effective_threads,
        p.batch_max,
        p.batch_age_ms,
        rows,
        wall,
        rows as f64 / wall,
        second_half.unwrap_or(f64::NAN),
        out["batch_size"]["mean"].as_f64().unwrap_or(0.0),
        out["write_ms"]["mean"].as_f64().unwrap_or(0.0),
        out["cpu"]["process_cpu_s"].as_f64().unwrap_or(0.0),
        out["cpu"]["pg_backends_cpu_s"].as_f64().unwrap_or(0.0),
        out["cpu"]["steal_s"].as_f64().unwrap_or(0.0),
    );
    drop(client);
    drop(store);
    Ok(out)
}

/// Sizes of every table and index of the database, MB.
fn pg_sizes(c: &mut postgres::Client) -> Result<Value> {
    let rows = c.query(
        "SELECT c.relname, pg_relation_size(c.oid)::float8 / 1048576 \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i') ORDER BY 1",
        &[],
    )?;
    let mut out = serde_json::Map::new();
    for r in rows {
        let name: String = r.try_get(0)?;
        let mb: f64 = r.try_get(1)?;
        out.insert(name, json!(round3(mb)));
    }
    Ok(Value::Object(out))
}

// ---- fill mode ---------------------------------------------------------------------------

fn fill_mode(a: &FillArgs) -> Result<Value> {
    ensure!(
        a.rows > 0 && a.hours > 0.0,
        "--rows and --hours must be above 0"
    );
    let p = &a.pool;
    let target = Target::of(&p.store)?;
    if p.fresh {
        target.recreate(false)?;
    }
    let start = match &a.start {
        Some(s) => OffsetDateTime::parse(s, &Rfc3339).context("--start")?,
        None => {
            let t = OffsetDateTime::now_utc() - time::Duration::seconds_f64(a.hours * 3600.0);
            let secs = t.unix_timestamp();
            OffsetDateTime::from_unix_timestamp(secs - secs.rem_euclid(3600))?
        }
    };
    let store = open_store(&p.store, p.threads)?;
    let options = writer_options(p);
    let pool = WriterPool::start(&store, &options, Arc::from(Vec::new()), None)
        .map_err(|e| anyhow!("starting the writer pool: {e}"))?;
    let queue = pool.queue();
    let mut client = target.client(&p.store)?;
    let before = CpuSnapshot::take(client.as_mut());

    // One producer keeps server_ts in order, as a node's clock does.
    let step_ns = a.hours * 3600e9 / a.rows as f64;
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let producer = {
        let (queue, done) = (queue.clone(), done.clone());
        let mut gen_ = Generator::new(p.seed, 0, IdKind::V7);
        let rows = a.rows;
        std::thread::Builder::new()
            .name("producer-0".into())
            .spawn(move || {
                let mut rng = fastrand::Rng::with_seed(7);
                for i in 0..rows {
                    let jitter = rng.f64() * step_ns;
                    let ts =
                        start + time::Duration::nanoseconds((i as f64 * step_ns + jitter) as i64);
                    let record = gen_.record(ts);
                    while !queue.reserve() {
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    if !queue.send_reserved(Persist {
                        record,
                        origin: None,
                        delivery: None,
                    }) {
                        break;
                    }
                }
                done.store(true, Ordering::Release);
            })?
    };
    let stats = &queue.stats;
    let mut next_report = a.rows / 10;
    loop {
        let rows = stats.rows.load(Ordering::Relaxed);
        let settled = rows
            + stats.duplicates.load(Ordering::Relaxed)
            + stats.dead_lettered.load(Ordering::Relaxed);
        if rows >= next_report {
            eprintln!(
                "fill: {rows} rows, {:.0} rows/s so far",
                rows as f64 / t0.elapsed().as_secs_f64()
            );
            next_report += a.rows / 10;
        }
        if settled >= a.rows {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t0.elapsed().as_secs_f64();
    let after = CpuSnapshot::take(client.as_mut());
    let _ = producer.join();
    pool.close(Duration::from_secs(30));
    let rows = stats.rows.load(Ordering::Relaxed);
    let mut out = json!({
        "mode": "fill",
        "store": store.kind(),
        "spec": store::redact(&p.store),
        "threads": p.threads.clamp(1, store.max_writers().max(1)),
        "batch_max": p.batch_max,
        "batch_age_ms": p.batch_age_ms,
        "rows": rows,
        "start": start.format(&Rfc3339)?,
        "hours": a.hours,
        "wall_s": round3(wall),
        "rows_per_s": (rows as f64 / wall).round(),
        "batch_size": histogram_json(&stats.batch_size, 1.0),
        "write_ms": histogram_json(&stats.write_seconds, 1000.0),
        "cpu": before.report(&after),
    });
    drop(store);
    if let Some(c) = client.as_mut() {
        if a.vacuum_analyze {
            let t = Instant::now();
            c.batch_execute("VACUUM ANALYZE")?;
            out["vacuum_analyze_s"] = json!(round3(t.elapsed().as_secs_f64()));
            eprintln!(
                "fill: VACUUM ANALYZE took {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        out["pg_sizes_mb"] = pg_sizes(c)?;
        if a.verify {
            let row = c.query_one(
                "SELECT (SELECT count(*) FROM messages), \
                 (SELECT sum(messages)::bigint FROM room_minute), \
                 (SELECT sum(n)::bigint FROM user_minute_batch, unnest(messages) AS n), \
                 (SELECT sum(messages)::bigint FROM type_minute), \
                 (SELECT sum(messages)::bigint FROM user_rooms), \
                 (SELECT count(*) FROM user_minute_batch), (SELECT count(*) FROM user_rooms), \
                 (SELECT count(*) FROM room_minute)",
                &[],
            )?;
            let v: Vec<i64> = (0..8)
                .map(|i| row.try_get::<_, Option<i64>>(i).map(|x| x.unwrap_or(-1)))
                .collect::<Result<_, _>>()?;
            let agree = v[1..5].iter().all(|&n| n == v[0]);
            out["verify"] = json!({
                "messages": v[0], "room_minute_sum": v[1], "user_minute_sum": v[2],
                "type_minute_sum": v[3], "user_rooms_sum": v[4],
                "user_minute_batch_rows": v[5], "user_rooms_rows": v[6], "room_minute_rows": v[7],
                "rollups_agree": agree,
            });
            ensure!(agree, "the rollups disagree with messages: {v:?}");
        }
    }
    eprintln!(
        "fill: {rows} rows in {wall:.1} s = {:.0} rows/s",
        rows as f64 / wall
    );
    Ok(out)
}

// ---- queries mode --------------------------------------------------------------------------

/// One kind of query: its name, the target (ms) it is held to, and the timings.
struct Series {
    name: String,
    target_ms: Option<f64>,
    ms: Vec<f64>,
    results: Vec<f64>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The size of an answer: list length, or the count.
fn answer_size(v: &Value) -> f64 {
    match v {
        Value::Array(a) => a.len() as f64,
        Value::Object(o) => o
            .get("count")
            .and_then(Value::as_f64)
            .or_else(|| o.get("totalMessages").and_then(Value::as_f64))
            .or_else(|| {
                o.get("rooms")
                    .and_then(Value::as_array)
                    .map(|a| a.len() as f64)
            })
            .or_else(|| {
                o.get("messages")
                    .and_then(Value::as_array)
                    .map(|a| a.len() as f64)
            })
            .unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

fn queries_mode(a: &QueryArgs) -> Result<Value> {
    let store = open_store(&a.store, 1)?;
    let target = Target::of(&a.store)?;
    let mut client = target.client(&a.store)?;
    let mut reader = store
        .reader()
        .map_err(|e| anyhow!("opening a reader: {e}"))?;
    let (oldest, newest) = reader
        .span()
        .map_err(|e| anyhow!("reading the span: {e}"))?
        .ok_or_else(|| anyhow!("the store is empty: fill it first"))?;
    // The rooms of the newest hour (the top lists over all of it would read every rollup row).
    let rooms: Vec<String> = reader
        .analytics(
            Window {
                start: newest - time::Duration::HOUR,
                end: newest + time::Duration::SECOND,
            },
            1000,
        )
        .map_err(|e| anyhow!("listing the rooms: {e}"))?
        .top_rooms
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    ensure!(!rooms.is_empty(), "no rooms in the store");
    let span_s = (newest - oldest).as_seconds_f64();
    eprintln!(
        "queries: data from {oldest} to {newest} ({:.1} h), {} rooms",
        span_s / 3600.0,
        rooms.len()
    );

    let mut rng = fastrand::Rng::with_seed(a.seed);
    // A window of `len` seconds starting at a random instant (to the millisecond) of the data.
    let window = move |rng: &mut fastrand::Rng, len: u64| -> Window {
        let room = (span_s - len as f64).max(0.0);
        let offset = rng.f64() * room;
        let start = oldest + time::Duration::milliseconds((offset * 1000.0) as i64);
        Window {
            start,
            end: start + time::Duration::seconds(len as i64),
        }
    };
    type Make = Box<dyn FnMut(&mut fastrand::Rng) -> ApiQuery>;
    let mut kinds: Vec<(Series, Make)> = Vec::new();
    let rooms_a = rooms.clone();
    let rw = a.room_window;
    kinds.push((
        series(
            &format!("room window, newest 1000 of {rw} s (take=last)"),
            Some(10.0),
        ),
        Box::new(move |rng| ApiQuery::RoomMessages {
            room: rooms_a[rng.usize(0..rooms_a.len())].clone(),
            window: window(rng, rw),
            limit: 1000,
            take: Take::Last,
        }),
    ));
    let rooms_b = rooms.clone();
    kinds.push((
        series(
            &format!("room window, oldest 1000 of {rw} s (take=first)"),
            Some(10.0),
        ),
        Box::new(move |rng| ApiQuery::RoomMessages {
            room: rooms_b[rng.usize(0..rooms_b.len())].clone(),
            window: window(rng, rw),
            limit: 1000,
            take: Take::First,
        }),
    ));
    kinds.push((
        series("user history, all time, limit 1000 (take=last)", Some(20.0)),
        Box::new(|rng| ApiQuery::UserMessages {
            user: rng.i32(1..=MAX_USER),
            window: Window {
                start: query::time_min(),
                end: query::time_max(),
            },
            limit: 1000,
            take: Take::Last,
        }),
    ));
    for &len in &a.active_windows {
        kinds.push((
            series(
                &format!("active users, {} window", human_secs(len)),
                Some(50.0),
            ),
            Box::new(move |rng| ApiQuery::ActiveUsers {
                window: window(rng, len),
            }),
        ));
    }
    kinds.push((
        series("a user's rooms", Some(5.0)),
        Box::new(|rng| ApiQuery::UserRooms {
            user: rng.i32(1..=MAX_USER),
        }),
    ));
    let aw = a.analytics_window;
    kinds.push((
        series(
            &format!("analytics, {} window, top 10", human_secs(aw)),
            None,
        ),
        Box::new(move |rng| ApiQuery::Analytics {
            window: window(rng, aw),
            top_n: 10,
        }),
    ));

    // Warmup, then the timed rounds: every round runs each kind once, in turn.
    let mut cpu_before = None;
    let mut timed_from = Instant::now();
    for round in 0..a.warmup + a.iterations {
        if round == a.warmup {
            cpu_before = Some(CpuSnapshot::take(client.as_mut()));
            timed_from = Instant::now();
        }
        for (s, make) in kinds.iter_mut() {
            let q = make(&mut rng);
            let t = Instant::now();
            let v = query::execute(reader.as_mut(), &q)
                .map_err(|e| anyhow!("{}: {e} ({q:?})", s.name))?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if round >= a.warmup {
                s.ms.push(ms);
                s.results.push(answer_size(&v));
            }
        }
    }

    let timed_s = timed_from.elapsed().as_secs_f64();
    let cpu = cpu_before.map(|b| b.report(&CpuSnapshot::take(client.as_mut())));
    let mut table = Vec::new();
    eprintln!(
        "{:<52} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8}",
        "query", "p50 ms", "p95 ms", "p99 ms", "max ms", "mean", "answer", "target"
    );
    for (mut s, _) in kinds {
        s.ms.sort_by(f64::total_cmp);
        let mean = s.ms.iter().sum::<f64>() / s.ms.len().max(1) as f64;
        let size =
            s.results.iter().filter(|v| v.is_finite()).sum::<f64>() / s.results.len().max(1) as f64;
        let (p50, p95, p99) = (
            percentile(&s.ms, 0.5),
            percentile(&s.ms, 0.95),
            percentile(&s.ms, 0.99),
        );
        let max = s.ms.last().copied().unwrap_or(f64::NAN);
        eprintln!(
            "{:<52} {p50:>7.2} {p95:>7.2} {p99:>7.2} {max:>7.2} {mean:>7.2} {size:>9.1} {:>8}",
            s.name,
            s.target_ms.map_or("-".into(), |t| format!("< {t}"))
        );
        table.push(json!({
            "query": s.name,
            "n": s.ms.len(),
            "p50_ms": round3(p50),
            "p95_ms": round3(p95),
            "p99_ms": round3(p99),
            "max_ms": round3(max),
            "mean_ms": round3(mean),
            "mean_answer_size": (size * 10.0).round() / 10.0,
            "target_ms": s.target_ms,
            "p95_meets_target": s.target_ms.map(|t| p95 < t),
            "p99_meets_target": s.target_ms.map(|t| p99 < t),
        }));
    }
    Ok(json!({
        "mode": "queries",
        "store": store.kind(),
        "spec": store::redact(&a.store),
        "span": [oldest.format(&Rfc3339)?, newest.format(&Rfc3339)?],
        "iterations": a.iterations,
        "warmup": a.warmup,
        "seed": a.seed,
        "via": "chatflow::store::query::execute on one StoreReader (JSON value built, not serialised)",
        "queries": table,
        "wall_s": round3(timed_s),
        "cpu": cpu,
    }))
}

fn series(name: &str, target_ms: Option<f64>) -> Series {
    Series {
        name: name.to_string(),
        target_ms,
        ms: Vec::new(),
        results: Vec::new(),
    }
}

fn human_secs(s: u64) -> String {
    match s {
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}
