//! `chatflow load`: the load tester. It drives any server speaking PROTOCOL.md with the
//! assignment-1 workload (or a configured one) and reports throughput, latency, Little's Law
//! and its own cost.
//!
//! A run is a sequence of phases, each with fresh connections: a single-connection round-trip
//! probe (for Little's Law), the warmup, and the main phase. In each phase one generator
//! thread ([`workload`]) fills a bounded queue per load thread ([`worker`]); the coordinator
//! (this file) opens the phase, shows progress and merges the counts; [`report`] and
//! [`charts`] turn them into the report and the files.

mod charts;
mod report;
mod stats;
mod sys;
mod wire;
mod worker;
mod workload;

use std::io::IsTerminal as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser as _;

use stats::PhaseStats;
use worker::{PhaseShared, PhaseSpec, RecordChunk, RunClock, Target, Worker};
use workload::{GeneratorPlan, Mix, Routes};

pub use report::Report;

/// `chatflow load`: flags of the load tester (docs/load-testing.md describes each).
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server to load: ws://HOST:PORT (rooms are at /chat/{roomId} under it), or a
    /// comma-separated list of them (nodes of one deployment): connections are dealt
    /// round-robin over the list, each room's members over different URLs; the round-trip
    /// probe and the /api/metrics fetch use the first URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// Messages in all, warmup included; the run ends when each is acked or has failed.
    #[arg(long, default_value_t = 500_000)]
    pub messages: u64,
    /// Run the main phase for this many seconds instead of to a message count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Warmup connections (0 = no warmup).
    #[arg(long, default_value_t = 32)]
    pub warmup_conns: usize,
    /// Messages per warmup connection (0 = no warmup).
    #[arg(long, default_value_t = 1000)]
    pub warmup_messages: u64,
    /// Run the warmup for this many seconds instead of --warmup-messages per connection
    /// (with --duration).
    // f32 seconds (plenty for a warmup or a hold) keep these flags from growing the
    // command-line enum that embeds this struct past clippy's variant-size limit.
    #[arg(long, requires = "duration")]
    pub warmup_duration: Option<f32>,
    /// Idle mode: open --conns connections, print `IDLE_READY <open>` on stdout once they are
    /// all upgraded, hold them this many seconds without sending, then close them.
    #[arg(long, conflicts_with_all = ["duration", "rate", "fanout", "warmup_duration"])]
    pub idle_hold: Option<f32>,
    /// Main-phase connections, spread evenly over the rooms.
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Messages in flight per connection (1 = send and wait) [default: 4; with --rate: 4096].
    #[arg(long)]
    pub inflight: Option<usize>,
    /// Rooms; message rooms are drawn uniformly from 1..=ROOMS.
    #[arg(long, default_value_t = 20)]
    pub rooms: u32,
    /// Open loop: send this many messages per second on a fixed schedule (main phase);
    /// latency counts from the scheduled time, so stalls are not hidden.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Fan-out mode: this many members in one room, --senders of them sending; reports
    /// deliveries/s and send-to-receipt latency at each member.
    #[arg(long)]
    pub fanout: Option<usize>,
    /// Fan-out mode: members that send.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Fan-out mode: the room.
    #[arg(long, default_value = "1")]
    pub fanout_room: String,
    /// Load threads (event loops); connections are split among them.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Local source addresses, round-robin: `auto` (127.0.0.x as needed past 25,000
    /// connections to a loopback server), or a list of addresses and IPv4 ranges
    /// (127.0.0.2,127.0.1.0/24).
    #[arg(long, default_value = "auto")]
    pub source_ips: String,
    /// Resends of a message after a retryable error, a broken connection or a timeout.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// First retry backoff; doubles on each retry (with jitter), capped at 5 s.
    #[arg(long, default_value_t = 25)]
    pub retry_backoff_ms: u64,
    /// An answer later than this drops the connection; its messages are resent.
    #[arg(long, default_value_t = 10_000)]
    pub ack_timeout_ms: u64,
    /// Connect plus upgrade time limit per attempt.
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    /// Consecutive failed attempts after which a connection is given up.
    #[arg(long, default_value_t = 10)]
    pub connect_attempts: u32,
    /// Connection attempts in progress at once (stay under the server's listen backlog).
    #[arg(long, default_value_t = 100)]
    pub connect_batch: usize,
    /// Messages of the single-connection round-trip probe run first for Little's Law (0 = skip).
    #[arg(long, default_value_t = 200)]
    pub rtt_probe: u64,
    /// Write the report files here (created if missing).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Throughput-over-time bucket, seconds.
    #[arg(long, default_value_t = 10)]
    pub bucket_secs: u64,
    /// Print one JSON summary object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// No live progress bar (it is also off when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Read this server process's CPU time around the main phase (same host only).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Seed of the workload's random draws (default: random; printed in the report).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Per-connection read buffer, bytes [default: 16384; 4096 past 10,000 connections].
    #[arg(long)]
    pub read_buffer: Option<usize>,
    /// Do not fetch /api/metrics at the end.
    #[arg(long)]
    pub no_server_metrics: bool,
}

/// Parses `chatflow load` flags from an argument list (the first item is the program name);
/// for tests and embedding.
impl LoadArgs {
    /// Flags as `chatflow load` would take them, e.g. `["load", "--messages", "2000"]`.
    pub fn from_args<I, T>(args: I) -> Result<LoadArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: LoadArgs,
        }
        Wrapper::try_parse_from(args).map(|w| w.args)
    }
}

/// Runs `chatflow load`: the test, the report on stdout (and `--json` as its last line), the
/// files under `--out`.
pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    let json = args.json;
    let report = execute(&args)?;
    print!("{}", report.text());
    if json {
        println!("{}", report.json());
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Runs the load test and returns its report without printing it (files are written).
pub fn execute(args: &LoadArgs) -> anyhow::Result<Report> {
    let plan = RunPlan::new(args)?;
    let clock = Arc::new(RunClock::new());
    let ui = Ui::new(args);
    let process_cpu_start = sys::process_cpu_seconds();
    let run_started = Instant::now();

    let (records_tx, csv_writer) = match &args.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the output folder {}", dir.display()))?;
            let (tx, rx) = crossbeam_channel::bounded::<RecordChunk>(RECORD_QUEUE_CHUNKS);
            let path = dir.join(report::MESSAGES_CSV);
            let h = std::thread::Builder::new()
                .name("load-csv".into())
                .spawn(move || report::write_messages_csv(&path, rx))
                .context("starting the CSV writer")?;
            (Some(tx), Some(h))
        }
        None => (None, None),
    };

    let mut phases = Vec::new();
    let mut first_seq = 0u64;
    for (i, p) in plan.phases.iter().enumerate() {
        let records = if p.spec.name == "probe" {
            None
        } else {
            records_tx.clone()
        };
        let seed = plan
            .seed
            .wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let result = run_phase(p, &clock, first_seq, seed, records, &ui, args.server_pid)
            .with_context(|| format!("{} phase", p.spec.name))?;
        first_seq += result.stats.taken + result.stats.unsent + 1;
        // No connection open when the phase was to start: the coordinator aborted it and
        // nothing was sent, which is an error however many upgrades came and went.
        // Or connections opened but were all lost and given up before anything was acked
        // (the same server, seen a moment later): nothing was measured either.
        let s = &result.stats;
        let aborted = (result.open_at_start == 0 && result.spec.conns > 0)
            || (s.acked == 0 && s.failed_by.get("NO_CONNECTION").is_some_and(|n| *n > 0));
        let why = result
            .stats
            .connect_errors
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| "no connection opened".into());
        let (opened, name) = (result.stats.connections_opened, result.name);
        phases.push(result);
        if opened == 0 {
            bail!("could not connect to {}: {why}", plan.base_url);
        }
        if aborted {
            bail!(
                "could not connect to {}: no connection of the {name} phase stayed open, \
                 nothing was acked ({opened} upgrades; most common failure: {why})",
                plan.base_url
            );
        }
    }
    drop(records_tx);
    let csv_result = csv_writer.map(|h| {
        h.join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the CSV writer panicked")))
    });
    let wall_s = run_started.elapsed().as_secs_f64();
    let process_cpu_s = sys::process_cpu_seconds() - process_cpu_start;
    ui.finish();

    let server_metrics = if args.no_server_metrics {
        None
    } else {
        Some(report::fetch_server_metrics(plan.addr, &plan.host))
    };
    let report = Report::build(report::Inputs {
        args: args.clone(),
        base_url: plan.base_url.clone(),
        seed: plan.seed,
        run_id: plan.run_id,
        window: plan.window,
        phases,
        process_cpu_s,
        run_wall_s: wall_s,
        server_metrics,
        csv: csv_result.map(|r| r.map_err(|e| format!("{e:#}"))),
    });
    if let Some(dir) = &args.out {
        report
            .write_files(dir)
            .with_context(|| format!("writing the report files to {}", dir.display()))?;
    }
    Ok(report)
}

/// Chunks of per-message rows waiting for the CSV writer (16 x 16,384 rows). Full means the
/// disk is behind: the load thread drops the chunk and counts it, it never waits.
const RECORD_QUEUE_CHUNKS: usize = 16;

/// One phase as planned.
struct PhasePlan {
    spec: Arc<PhaseSpec>,
    mix: Mix,
    /// Exact message count, or None for a duration run.
    total: Option<u64>,
}

/// The validated run: addresses, phases, seed.
struct RunPlan {
    /// The first URL's address and Host: the probe's server and where /api/metrics is read.
    addr: SocketAddr,
    host: String,
    /// Every URL's base, comma-separated (the report's `url`).
    base_url: String,
    seed: u64,
    run_id: u32,
    window: usize,
    phases: Vec<PhasePlan>,
}

impl RunPlan {
    fn new(a: &LoadArgs) -> anyhow::Result<RunPlan> {
        let urls = parse_urls(&a.url)?;
        let (addr, host) = (urls[0].0, urls[0].1.clone());
        let base_url = urls
            .iter()
            .map(|(_, _, base)| base.as_str())
            .collect::<Vec<_>>()
            .join(",");
        ensure!(a.threads >= 1, "--threads must be at least 1");
        ensure!(a.rooms >= 1, "--rooms must be at least 1");
        ensure!(a.connect_batch >= 1, "--connect-batch must be at least 1");
        ensure!(a.bucket_secs >= 1, "--bucket-secs must be at least 1");
        ensure!(a.retries <= 30, "--retries must be at most 30");
        ensure!(
            a.connect_attempts >= 1,
            "--connect-attempts must be at least 1"
        );
        if let Some(r) = a.rate {
            ensure!(
                r.is_finite() && r > 0.0,
                "--rate must be a positive number of messages per second"
            );
        }
        for (flag, v) in [
            ("--duration", a.duration),
            ("--warmup-duration", a.warmup_duration.map(f64::from)),
            ("--idle-hold", a.idle_hold.map(f64::from)),
        ] {
            if let Some(d) = v {
                ensure!(
                    d.is_finite() && d > 0.0 && d < 1e7,
                    "{flag} must be a positive number of seconds"
                );
            }
        }
        let idle = a.idle_hold.map(Duration::from_secs_f32);
        let window = match (a.inflight, a.rate) {
            (Some(k), _) => k,
            (None, Some(_)) => 4096,
            (None, None) => 4,
        };
        ensure!(window >= 1, "--inflight must be at least 1");
        // Idle runs send nothing: no probe, no warmup, and a main phase of no messages.
        let warmup_on = idle.is_none()
            && a.warmup_conns > 0
            && (a.warmup_duration.is_some() || a.warmup_messages > 0);
        let warmup_total = match (warmup_on, a.warmup_duration) {
            (true, None) => a.warmup_conns as u64 * a.warmup_messages,
            _ => 0,
        };
        let main_total = match a.duration {
            Some(_) => None,
            None if idle.is_some() => Some(0),
            None => {
                ensure!(
                    a.messages > warmup_total,
                    "--messages ({}) must exceed the warmup's {} messages \
                     (--warmup-conns x --warmup-messages; 0 turns the warmup off)",
                    a.messages,
                    warmup_total
                );
                Some(a.messages - warmup_total)
            }
        };
        let (main_conns, main_senders, main_rooms, fanout) = match a.fanout {
            Some(members) => {
                ensure!(
                    members >= 2,
                    "--fanout needs at least 2 members (a sender and a receiver)"
                );
                ensure!(
                    a.senders >= 1 && a.senders < members,
                    "--senders must be between 1 and --fanout minus 1"
                );
                ensure!(
                    crate::protocol::is_valid_id(&a.fanout_room),
                    "--fanout-room must be 1..64 of [A-Za-z0-9_-]"
                );
                (members, a.senders, vec![a.fanout_room.clone()], true)
            }
            None => {
                ensure!(a.conns >= 1, "--conns must be at least 1");
                let rooms: Vec<String> = (1..=a.rooms).map(|r| r.to_string()).collect();
                ensure!(
                    a.conns >= rooms.len(),
                    "--conns ({}) must be at least --rooms ({}): every room needs a connection",
                    a.conns,
                    rooms.len()
                );
                // Idle connections are all receivers.
                let senders = if idle.is_some() { 0 } else { a.conns };
                (a.conns, senders, rooms, false)
            }
        };
        let warm_rooms: Vec<String> = (1..=a.rooms).map(|r| r.to_string()).collect();
        if warmup_on {
            ensure!(
                a.warmup_conns >= warm_rooms.len(),
                "--warmup-conns ({}) must be at least --rooms ({}): every room needs a connection",
                a.warmup_conns,
                warm_rooms.len()
            );
        }

        // Every connection is a file; leave room for epoll, timers, stdio and the CSV.
        let most_conns = main_conns.max(a.warmup_conns);
        let nofile = sys::raise_nofile_limit().context("reading the open-file limit")?;
        let budget = nofile.saturating_sub(64 + 4 * a.threads as u64);
        ensure!(
            most_conns as u64 <= budget,
            "{most_conns} connections need more open files than this process may hold \
             ({nofile}; at most {budget} connections). Raise `ulimit -n`, or run several \
             load processes"
        );
        let source_ips = Arc::new(source_ips(&a.source_ips, addr, most_conns)?);
        let read_buf = a
            .read_buffer
            .unwrap_or(if most_conns > 10_000 { 4096 } else { 16 * 1024 })
            .clamp(512, 1 << 20);
        let seed = a.seed.unwrap_or_else(|| fastrand::u64(..));
        let run_id = fastrand::u32(..);

        // Every URL for the warmup and the main phase; the first alone for the probe.
        let targets = |rooms: &[String], all: bool| -> Vec<Target> {
            let n = if all { urls.len() } else { 1 };
            urls[..n]
                .iter()
                .map(|(addr, _, base)| Target {
                    addr: *addr,
                    room_urls: rooms.iter().map(|r| format!("{base}/chat/{r}")).collect(),
                })
                .collect()
        };
        let spec = |name: &'static str,
                    conns: usize,
                    senders: usize,
                    rooms: Vec<String>,
                    fanout: bool,
                    window: usize,
                    rate: Option<f64>,
                    duration: Option<Duration>,
                    idle_hold: Option<Duration>| {
            Arc::new(PhaseSpec {
                name,
                targets: targets(&rooms, name != "probe"),
                rooms: Arc::new(rooms),
                conns,
                senders,
                fanout,
                window,
                rate,
                duration,
                idle_hold,
                threads: a.threads.min(conns).max(1),
                retries: a.retries,
                retry_backoff: Duration::from_millis(a.retry_backoff_ms),
                ack_timeout: Duration::from_millis(a.ack_timeout_ms.max(1)),
                connect_timeout: Duration::from_millis(a.connect_timeout_ms.max(1)),
                connect_attempts: a.connect_attempts,
                connect_batch: a.connect_batch,
                // Enough for every connection to get its attempts in, paced by the batch.
                ramp_timeout: Duration::from_millis(a.connect_timeout_ms.max(1))
                    .saturating_mul(a.connect_attempts.max(1))
                    .max(Duration::from_secs(30)),
                read_buf,
                source_ips: source_ips.clone(),
                bucket_secs: a.bucket_secs,
                run_id,
            })
        };

        let mut phases = Vec::new();
        if a.rtt_probe > 0 && idle.is_none() {
            // The probe is sent to the main phase's first room, one message at a time.
            let room = main_rooms[0].clone();
            phases.push(PhasePlan {
                spec: spec("probe", 1, 1, vec![room], fanout, 1, None, None, None),
                mix: Mix::standard(1),
                total: Some(a.rtt_probe),
            });
        }
        if warmup_on {
            phases.push(PhasePlan {
                spec: spec(
                    "warmup",
                    a.warmup_conns,
                    a.warmup_conns,
                    warm_rooms.clone(),
                    false,
                    // The closed-loop default, not --rate's: --inflight applies if given.
                    a.inflight.unwrap_or(4),
                    None,
                    a.warmup_duration.map(Duration::from_secs_f32),
                    None,
                ),
                mix: Mix::standard(a.rooms),
                total: a.warmup_duration.is_none().then_some(warmup_total),
            });
        }
        let main_rooms_len = main_rooms.len() as u32;
        phases.push(PhasePlan {
            spec: spec(
                "main",
                main_conns,
                main_senders,
                main_rooms,
                fanout,
                window,
                a.rate,
                a.duration.map(Duration::from_secs_f64),
                idle,
            ),
            mix: Mix::standard(main_rooms_len),
            total: main_total,
        });
        Ok(RunPlan {
            addr,
            host,
            base_url,
            seed,
            run_id,
            window,
            phases,
        })
    }
}

/// `--url`: one URL, or several separated by commas, each as [`parse_url`] takes it. An empty
/// entry (`a,,b`, a trailing comma) is an error, not skipped.
fn parse_urls(list: &str) -> anyhow::Result<Vec<(SocketAddr, String, String)>> {
    ensure!(
        !list.trim().is_empty(),
        "--url is empty; give ws://HOST:PORT, or several separated by commas"
    );
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        ensure!(
            !entry.is_empty(),
            "--url {list}: entry {} of {} is empty; give ws://HOST:PORT URLs separated by commas",
            i + 1,
            entries.len()
        );
        let parsed = if entries.len() > 1 {
            parse_url(entry)
                .with_context(|| format!("--url entry {} of {}", i + 1, entries.len()))?
        } else {
            parse_url(entry)?
        };
        out.push(parsed);
    }
    Ok(out)
}

/// `ws://HOST:PORT[/prefix]` to (address, Host, base URL without a trailing slash).
fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String, String)> {
    let rest = if let Some(r) = url.strip_prefix("ws://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("wss://") || url.starts_with("https://") {
        bail!("--url {url}: TLS (wss://) is not supported; load the server's plain ws:// port")
    } else if url.contains("://") {
        bail!("--url {url}: expected ws://HOST:PORT")
    } else {
        url
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    ensure!(!authority.is_empty(), "--url {url}: no host");
    ensure!(
        !path.contains('?') && !path.contains('#'),
        "--url {url}: no query or fragment, please (rooms are appended as /chat/{{roomId}})"
    );
    // An explicit port, else 80 as for any ws:// URL. IPv6 literals come in brackets.
    let has_port = match authority.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => authority.contains(':'),
    };
    let with_port = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("--url {url}: cannot resolve {with_port}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("--url {url}: {with_port} has no address"))?;
    Ok((addr, with_port.clone(), format!("ws://{with_port}{path}")))
}

/// Source addresses per `--source-ips`.
fn source_ips(spec: &str, target: SocketAddr, conns: usize) -> anyhow::Result<Vec<IpAddr>> {
    /// Connections per source address in auto mode: the kernel's default ephemeral range
    /// (32768-60999) holds about 28,000 ports per (source, destination) pair.
    const PER_SOURCE: usize = 25_000;
    let spec = spec.trim();
    if spec.is_empty() || spec == "auto" {
        let loopback_v4 = matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
        if !loopback_v4 || conns <= PER_SOURCE {
            return Ok(Vec::new());
        }
        let n = conns.div_ceil(PER_SOURCE);
        return Ok((1..=n as u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + i)))
            .collect());
    }
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((net, bits)) = item.split_once('/') {
            let net: Ipv4Addr = net
                .parse()
                .with_context(|| format!("--source-ips: `{item}` is not an IPv4 range"))?;
            let bits: u32 = bits
                .parse()
                .ok()
                .filter(|b| (8..=32).contains(b))
                .with_context(|| format!("--source-ips: `{item}`: prefix must be /8 to /32"))?;
            let size = 1u64 << (32 - bits);
            let first = u32::from(net) & !((size - 1) as u32);
            // The network's own .0 address is skipped; it is usable on loopback but surprising.
            let hosts = (1..size).take(65_536).map(|i| first + i as u32);
            out.extend(hosts.map(|h| IpAddr::V4(Ipv4Addr::from(h))));
            if size == 1 {
                out.push(IpAddr::V4(net));
            }
        } else {
            out.push(
                item.parse()
                    .with_context(|| format!("--source-ips: `{item}` is not an address"))?,
            );
        }
    }
    ensure!(!out.is_empty(), "--source-ips: no addresses");
    Ok(out)
}

/// What one phase produced.
pub(crate) struct PhaseResult {
    pub name: &'static str,
    pub spec: Arc<PhaseSpec>,
    pub stats: PhaseStats,
    /// Connecting, from the first attempt until every connection was open or given up.
    pub connect_s: f64,
    /// From the start signal to the last answer; in a duration run, the send window only
    /// (start to stop), so throughput is not divided by the wait for late answers.
    pub wall_s: f64,
    /// Duration runs: from the stop to the last answer (or giving up).
    pub drain_s: Option<f64>,
    /// Run-clock ns of the start signal.
    pub start_ns: u64,
    pub generator_cpu_s: f64,
    /// CPU of this whole process (load threads, generator, coordinator) over the same span as
    /// `server_cpu_s`: from the start signal until every load thread was done.
    pub process_cpu_s: f64,
    pub server_cpu_s: Option<f64>,
    pub steal_s: Option<f64>,
    /// Busy and steal seconds per CPU line of /proc/stat over that span ("cpu" = all CPUs).
    pub cpu: Vec<sys::CpuTimes>,
    pub open_at_start: u64,
}

impl PhaseResult {
    /// From the start signal to the last answer, the drain of a duration run included.
    pub(crate) fn span_s(&self) -> f64 {
        self.wall_s + self.drain_s.unwrap_or(0.0)
    }
}

fn run_phase(
    plan: &PhasePlan,
    clock: &Arc<RunClock>,
    first_seq: u64,
    seed: u64,
    records: Option<crossbeam_channel::Sender<RecordChunk>>,
    ui: &Ui,
    server_pid: Option<u32>,
) -> anyhow::Result<PhaseResult> {
    let spec = plan.spec.clone();
    let threads = spec.threads;
    let shared = Arc::new(PhaseShared::new(clock.clone()));

    // Route each room's messages to the threads holding a sending connection in it.
    let mut by_room: Vec<Vec<usize>> = vec![Vec::new(); spec.rooms.len()];
    for g in 0..spec.senders {
        let t = g % threads;
        let r = spec.room_of(g) as usize;
        if !by_room[r].contains(&t) {
            by_room[r].push(t);
        }
    }
    let mut queues = Vec::new();
    let mut workers = Vec::new();
    for t in 0..threads {
        let (tx, rx) = crossbeam_channel::bounded(workload::QUEUE_BATCHES);
        queues.push(tx);
        workers.push(
            Worker::new(spec.clone(), shared.clone(), t, rx, records.clone())
                .context("creating a load thread's poller")?,
        );
    }
    drop(records);
    let stop = Arc::new(AtomicBool::new(false));
    let gen_plan = GeneratorPlan {
        mix: plan.mix.clone(),
        total: plan.total,
        first_seq,
        seed,
    };
    let gen_stop = stop.clone();
    let generator = std::thread::Builder::new()
        .name("load-generator".into())
        .spawn(move || {
            let cpu = sys::thread_cpu_seconds();
            workload::generate(gen_plan, Routes { by_room }, queues, gen_stop);
            sys::thread_cpu_seconds() - cpu
        })
        .context("starting the generator thread")?;
    let mut handles = Vec::new();
    for (t, w) in workers.into_iter().enumerate() {
        let guard = ExitGuard(shared.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || {
                    let guard = guard;
                    let r = w.run();
                    if r.is_err() {
                        guard.0.abort.store(true, Ordering::SeqCst);
                    }
                    r
                })
                .context("starting a load thread")?,
        );
    }

    ui.phase_connecting(spec.name, spec.conns);
    let connect_started = Instant::now();
    while shared.ready.load(Ordering::SeqCst) < threads {
        if handles.iter().any(|h| h.is_finished()) {
            break;
        }
        ui.tick_connecting(shared.progress.open.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(5));
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    let open_at_start = shared.progress.open.load(Ordering::SeqCst);
    if open_at_start == 0 {
        shared.abort.store(true, Ordering::SeqCst);
    }
    // A short lead so every thread sees the start before it comes; they poll every 5 ms.
    let start_ns = clock.now_ns() + 10_000_000;
    let before = Sample::take(server_pid);
    shared.start_ns.store(start_ns, Ordering::SeqCst);
    if spec.idle_hold.is_some() && open_at_start > 0 {
        // The readiness line scripts wait for before they measure the server.
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "IDLE_READY {open_at_start}");
        let _ = out.flush();
    }
    ui.phase_running(&spec, plan.total, open_at_start);

    let mut after = None;
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        ui.tick_running(&shared.progress);
        if after.is_none() && shared.done_sending.load(Ordering::SeqCst) >= threads {
            after = Some(Sample::take(server_pid));
        }
    }
    let after = after.unwrap_or_else(|| Sample::take(server_pid));
    stop.store(true, Ordering::SeqCst);
    let mut stats = PhaseStats::new(spec.rooms.len());
    let mut first_error = None;
    for (t, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(s)) => stats.merge(s),
            Ok(Err(e)) => {
                first_error = first_error.or(Some(
                    anyhow::Error::from(e).context(format!("load thread {t} failed")),
                ))
            }
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                first_error = first_error.or(Some(anyhow::anyhow!(
                    "load thread {t} panicked: {why}; the phase was aborted"
                )))
            }
        }
    }
    let generator_cpu_s = generator.join().unwrap_or(0.0);
    if let Some(e) = first_error {
        return Err(e);
    }
    let end_ns = if stats.finished_ns > 0 {
        stats.finished_ns
    } else {
        clock.now_ns()
    };
    let (wall_s, drain_s) = match spec.duration {
        Some(d) => {
            let stop_ns = start_ns + d.as_nanos() as u64;
            (
                d.as_secs_f64(),
                Some(end_ns.saturating_sub(stop_ns) as f64 / 1e9),
            )
        }
        None => (end_ns.saturating_sub(start_ns) as f64 / 1e9, None),
    };
    ui.phase_done(&spec, &stats, wall_s);
    Ok(PhaseResult {
        name: spec.name,
        spec,
        stats,
        connect_s,
        wall_s,
        drain_s,
        start_ns,
        generator_cpu_s,
        process_cpu_s: after.process_cpu_s - before.process_cpu_s,
        server_cpu_s: match (before.server_cpu_s, after.server_cpu_s) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        steal_s: match (before.steal_s(), after.steal_s()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        cpu: sys::cpu_deltas(&before.cpu, &after.cpu),
        open_at_start,
    })
}

/// Marks a load thread's exit however it ends. A thread that ends early (an error or a
/// panic) aborts the phase, so the others stop instead of waiting for it forever.
struct ExitGuard(Arc<PhaseShared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort.store(true, Ordering::SeqCst);
        }
        self.0.exited.fetch_add(1, Ordering::SeqCst);
    }
}

/// CPU readings at one edge of a phase's measured span.
struct Sample {
    process_cpu_s: f64,
    server_cpu_s: Option<f64>,
    cpu: Vec<sys::CpuTimes>,
}

impl Sample {
    fn take(server_pid: Option<u32>) -> Sample {
        Sample {
            process_cpu_s: sys::process_cpu_seconds(),
            server_cpu_s: server_pid.and_then(sys::proc_cpu_seconds),
            cpu: sys::cpu_times(),
        }
    }

    /// Steal over all CPUs, from the "cpu" line.
    fn steal_s(&self) -> Option<f64> {
        self.cpu.iter().find(|c| c.name == "cpu").map(|c| c.steal)
    }
}

/// The live progress bar on stderr (hidden when stderr is not a terminal) and the one-line
/// phase notes printed instead of it.
struct Ui {
    bar: Option<indicatif::ProgressBar>,
    last: std::cell::Cell<(Instant, u64)>,
    rate: std::cell::Cell<f64>,
}

impl Ui {
    fn new(args: &LoadArgs) -> Ui {
        let live = !args.no_progress && std::io::stderr().is_terminal();
        let bar = live.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stderr_with_hz(10),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>7} {spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Ui {
            bar,
            last: std::cell::Cell::new((Instant::now(), 0)),
            rate: std::cell::Cell::new(0.0),
        }
    }

    fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn phase_connecting(&self, name: &str, conns: usize) {
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_prefix(name.to_string());
            bar.set_length(conns as u64);
            bar.set_position(0);
            bar.set_message("connections open");
        }
    }

    fn tick_connecting(&self, open: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(open);
        }
    }

    fn phase_running(&self, spec: &PhaseSpec, total: Option<u64>, open: u64) {
        let name = spec.name;
        let doing = match spec.idle_hold {
            Some(hold) => format!("holding them {:.1} s", hold.as_secs_f64()),
            None => "sending".into(),
        };
        self.note(&format!("[load] {name}: {open} connections open; {doing}"));
        self.last.set((Instant::now(), 0));
        self.rate.set(0.0);
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_prefix(name.to_string());
            match total {
                Some(t) if spec.idle_hold.is_none() => bar.set_length(t),
                _ => bar.unset_length(),
            }
        }
    }

    fn tick_running(&self, p: &worker::Progress) {
        let Some(bar) = &self.bar else {
            return;
        };
        let acked = p.acked.load(Ordering::Relaxed);
        let failed = p.failed.load(Ordering::Relaxed);
        let (t0, n0) = self.last.get();
        let dt = t0.elapsed().as_secs_f64();
        if dt >= 0.5 {
            // A half-second window: steady enough to read, quick enough to show a stall.
            self.rate.set((acked + failed - n0) as f64 / dt);
            self.last.set((Instant::now(), acked + failed));
        }
        bar.set_position(acked + failed);
        bar.set_message(format!(
            "{} msg/s  {} failed  {} retries  {} open",
            report::thousands(self.rate.get() as u64),
            report::thousands(failed),
            report::thousands(p.retries.load(Ordering::Relaxed)),
            p.open.load(Ordering::Relaxed),
        ));
    }

    fn phase_done(&self, spec: &PhaseSpec, s: &PhaseStats, wall_s: f64) {
        let name = spec.name;
        if spec.idle_hold.is_some() {
            self.note(&format!(
                "[load] {name}: {} connections open after {wall_s:.2} s; closing",
                s.open_at_end
            ));
        } else {
            self.note(&format!(
                "[load] {name}: {} acked, {} failed in {wall_s:.2} s",
                s.acked, s.failed
            ));
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_thread_that_panics_aborts_the_phase_and_is_counted() {
        let shared = Arc::new(PhaseShared::new(Arc::new(RunClock::new())));
        let guard = ExitGuard(shared.clone());
        let ok = ExitGuard(shared.clone());
        drop(ok);
        assert!(
            !shared.abort.load(Ordering::SeqCst),
            "a normal exit aborts nothing"
        );
        let h = std::thread::spawn(move || {
            let _guard = guard;
            panic!("boom");
        });
        assert!(h.join().is_err());
        assert!(shared.abort.load(Ordering::SeqCst));
        assert_eq!(shared.exited.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn urls_become_an_address_a_host_and_a_base() {
        let (addr, host, base) = parse_url("ws://127.0.0.1:9000").expect("ok");
        assert_eq!(addr, "127.0.0.1:9000".parse().expect("addr"));
        assert_eq!(host, "127.0.0.1:9000");
        assert_eq!(base, "ws://127.0.0.1:9000");
        let (_, _, base) = parse_url("127.0.0.1:9000/prefix/").expect("ok");
        assert_eq!(base, "ws://127.0.0.1:9000/prefix");
        let (addr, _, _) = parse_url("ws://localhost:9001").expect("ok");
        assert_eq!(addr.port(), 9001);
        assert!(parse_url("wss://127.0.0.1:9000").is_err());
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("ws://127.0.0.1:9000/?x=1").is_err());
    }

    #[test]
    fn a_url_list_is_split_on_commas_and_every_entry_checked() {
        let urls = parse_urls("ws://127.0.0.1:9000, ws://127.0.0.1:9001/p/").expect("ok");
        assert_eq!(urls.len(), 2);
        assert_eq!(urls[0].2, "ws://127.0.0.1:9000");
        assert_eq!(urls[1].0.port(), 9001);
        assert_eq!(urls[1].2, "ws://127.0.0.1:9001/p");
        assert_eq!(parse_urls("ws://127.0.0.1:9000").expect("ok").len(), 1);
        assert!(format!("{:#}", parse_urls(" ").expect_err("blank")).contains("--url is empty"));
        for bad in [
            ",",
            "ws://127.0.0.1:9000,",
            "ws://127.0.0.1:9000,,ws://127.0.0.1:9001",
            "ws://127.0.0.1:9000, ",
        ] {
            let e = parse_urls(bad).expect_err(bad);
            assert!(format!("{e:#}").contains("is empty"), "{bad}: {e:#}");
        }
        for bad in [
            "ws://127.0.0.1:9000,wss://127.0.0.1:9001",
            "ws://127.0.0.1:9000,ftp://x",
            "ws://127.0.0.1:9000,ws://127.0.0.1:notaport",
            "ws://127.0.0.1:9000,ws:///chat",
        ] {
            let e = format!("{:#}", parse_urls(bad).expect_err(bad));
            assert!(e.contains("entry 2 of 2"), "{bad}: {e}");
        }
        let plan = |url: &str| {
            let a = LoadArgs::from_args(["load", "--url", url]).expect("parses");
            RunPlan::new(&a)
        };
        let p = plan("ws://127.0.0.1:9000,ws://127.0.0.1:9001").expect("valid");
        assert_eq!(p.base_url, "ws://127.0.0.1:9000,ws://127.0.0.1:9001");
        assert_eq!(p.addr.port(), 9000);
        // The probe goes to the first URL only; the warmup and the main phase to both.
        let ports = |i: usize| -> Vec<u16> {
            p.phases[i]
                .spec
                .targets
                .iter()
                .map(|t| t.addr.port())
                .collect()
        };
        assert_eq!(ports(0), [9000]);
        assert_eq!(ports(1), [9000, 9001]);
        assert_eq!(ports(2), [9000, 9001]);
        assert_eq!(
            p.phases[2].spec.targets[1].room_urls[0],
            "ws://127.0.0.1:9001/chat/1"
        );
        assert!(plan("ws://127.0.0.1:9000,").is_err());
    }

    #[test]
    fn connections_are_dealt_so_every_room_spans_the_targets_evenly() {
        let spec_for = |flags: &[&str], urls: usize| {
            let list: Vec<String> = (0..urls)
                .map(|i| format!("ws://127.0.0.1:{}", 9000 + i))
                .collect();
            let list = list.join(",");
            let mut v = vec!["load", "--url", list.as_str()];
            v.extend_from_slice(flags);
            let a = LoadArgs::from_args(v).expect("parses");
            let plan = RunPlan::new(&a).expect("valid");
            plan.phases.last().expect("main").spec.clone()
        };
        for (flags, urls) in [
            (&["--conns", "64", "--rooms", "20"][..], 2),
            (&["--conns", "64", "--rooms", "20"][..], 3),
            (
                &["--conns", "200", "--rooms", "200", "--warmup-conns", "0"][..],
                3,
            ),
            (&["--conns", "7", "--rooms", "7"][..], 2),
            (&["--fanout", "11", "--senders", "3"][..], 3),
        ] {
            let spec = spec_for(flags, urls);
            let mut per_target = vec![0usize; urls];
            let mut per_room: Vec<std::collections::BTreeSet<usize>> =
                vec![Default::default(); spec.rooms.len()];
            let mut members = vec![0usize; spec.rooms.len()];
            for g in 0..spec.conns {
                let t = spec.target_of(g);
                per_target[t] += 1;
                let r = spec.room_of(g) as usize;
                per_room[r].insert(t);
                members[r] += 1;
            }
            let (lo, hi) = (per_target.iter().min(), per_target.iter().max());
            assert!(
                hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
                "{flags:?}: {per_target:?}"
            );
            for (r, targets) in per_room.iter().enumerate() {
                assert_eq!(targets.len(), members[r].min(urls), "{flags:?} room {r}");
            }
        }
        // One URL: everything on it.
        let spec = spec_for(&[], 1);
        assert!((0..spec.conns).all(|g| spec.target_of(g) == 0));
    }

    #[test]
    fn source_addresses_spread_only_when_needed_or_asked() {
        let lo: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        assert!(source_ips("auto", lo, 20_000).expect("ok").is_empty());
        let auto = source_ips("auto", lo, 100_000).expect("ok");
        assert_eq!(auto.len(), 4);
        assert_eq!(auto[0], "127.0.0.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(auto[3], "127.0.0.4".parse::<IpAddr>().expect("ip"));
        let far: SocketAddr = "10.0.0.1:8080".parse().expect("addr");
        assert!(source_ips("auto", far, 100_000).expect("ok").is_empty());
        let list = source_ips("127.0.0.2, 127.0.1.0/30", lo, 1).expect("ok");
        assert_eq!(list.len(), 4);
        assert_eq!(list[3], "127.0.1.3".parse::<IpAddr>().expect("ip"));
        assert_eq!(source_ips("127.0.0.0/8", lo, 1).expect("ok").len(), 65_536);
        assert!(source_ips("nope", lo, 1).is_err());
        assert!(source_ips("127.0.0.0/4", lo, 1).is_err());
    }

    #[test]
    fn flags_are_checked_before_anything_connects() {
        let bad = |extra: &[&str]| {
            let mut v = vec!["load"];
            v.extend_from_slice(extra);
            let a = LoadArgs::from_args(v).expect("parses");
            RunPlan::new(&a).is_err()
        };
        assert!(bad(&["--messages", "1000"])); // not more than the warmup
        assert!(bad(&["--conns", "5"])); // fewer than the rooms
        assert!(bad(&["--rate", "0"]));
        assert!(bad(&["--fanout", "1"]));
        assert!(bad(&["--fanout", "10", "--senders", "10"]));
        assert!(bad(&["--inflight", "0"]));
        assert!(bad(&["--url", "wss://x:1"]));
        assert!(!bad(&[]));
        let a = LoadArgs::from_args(["load", "--duration", "2", "--rate", "100"]).expect("ok");
        let plan = RunPlan::new(&a).expect("valid");
        assert_eq!(plan.window, 4096);
        // --rate's in-flight default is the main phase's; the closed-loop warmup keeps 4.
        assert_eq!(plan.phases[1].spec.window, 4);
        assert_eq!(plan.phases[2].spec.window, 4096);
        let b = LoadArgs::from_args(["load", "--rate", "100", "--inflight", "8"]).expect("ok");
        let given = RunPlan::new(&b).expect("valid");
        assert_eq!(given.phases[1].spec.window, 8);
        let names: Vec<_> = plan.phases.iter().map(|p| p.spec.name).collect();
        assert_eq!(names, ["probe", "warmup", "main"]);
        assert_eq!(plan.phases[1].total, Some(32_000));
        assert_eq!(plan.phases[2].total, None);
        let a = LoadArgs::from_args(["load"]).expect("ok");
        let plan = RunPlan::new(&a).expect("valid");
        assert_eq!(plan.phases[2].total, Some(468_000));

        // A timed warmup needs a timed main phase.
        assert!(LoadArgs::from_args(["load", "--warmup-duration", "2"]).is_err());
        assert!(bad(&["--duration", "5", "--warmup-duration", "0"]));
        let a =
            LoadArgs::from_args(["load", "--duration", "5", "--warmup-duration", "2"]).expect("ok");
        let plan = RunPlan::new(&a).expect("valid");
        let warmup = &plan.phases[1];
        assert_eq!(warmup.spec.name, "warmup");
        assert_eq!(warmup.total, None);
        assert_eq!(warmup.spec.duration, Some(Duration::from_secs(2)));

        // Idle: one phase of receivers only, no messages; no rate, fan-out or duration.
        let a = LoadArgs::from_args(["load", "--conns", "50", "--idle-hold", "3"]).expect("ok");
        let plan = RunPlan::new(&a).expect("valid");
        let names: Vec<_> = plan.phases.iter().map(|p| p.spec.name).collect();
        assert_eq!(names, ["main"]);
        let main = &plan.phases[0];
        assert_eq!((main.spec.conns, main.spec.senders), (50, 0));
        assert_eq!(main.total, Some(0));
        assert_eq!(main.spec.idle_hold, Some(Duration::from_secs(3)));
        for extra in ["--rate", "--fanout", "--duration"] {
            assert!(LoadArgs::from_args(["load", "--idle-hold", "3", extra, "100"]).is_err());
        }
        assert!(bad(&["--idle-hold", "0"]));
    }
}
