//! chatflow-bench-driver: a load driver for ChatFlow-protocol chat servers.
//!
//! The main thread only coordinates: it starts the event-loop workers, waits
//! until every connection is upgraded, gives the start signal, samples CPU
//! times at the edges of the measured window, and reports.

mod config;
mod proto;
mod sys;
mod worker;

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use config::{Config, Mode};
use worker::{Shared, Stats, Worker};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match Config::parse(&args) {
        Ok(c) => c,
        Err(e) if e.is_empty() => {
            print!("{}", config::USAGE);
            return;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{}", config::USAGE);
            std::process::exit(2);
        }
    };
    match run(cfg) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// CPU and steal readings at one instant.
struct Sample {
    at: Instant,
    client_cpu: f64,
    server_cpu: Option<f64>,
    cpus: Vec<sys::CpuTimes>,
}

impl Sample {
    fn take(cfg: &Config) -> Sample {
        Sample {
            at: Instant::now(),
            client_cpu: sys::self_cpu_seconds(),
            server_cpu: cfg.server_pid.and_then(sys::proc_cpu_seconds),
            cpus: sys::cpu_times(),
        }
    }
}

fn run(cfg: Config) -> Result<i32, String> {
    let nofile = sys::raise_nofile_limit().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;
    // Each connection is one fd; leave a little room for the epoll fds,
    // stdio and /proc reads.
    let fd_budget = nofile.saturating_sub(16 + 2 * cfg.threads as u64);
    if cfg.conns as u64 > fd_budget {
        return Err(format!(
            "{} connections need more files than the limit allows ({nofile}); use at most {fd_budget}",
            cfg.conns
        ));
    }

    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared::new());
    eprintln!(
        "[driver] mode={} addr={} conns={} threads={} (file limit {nofile})",
        cfg.mode.name(),
        cfg.addr,
        cfg.conns,
        cfg.threads
    );

    let mut handles = Vec::new();
    for t in 0..cfg.threads {
        let w = Worker::new(cfg.clone(), shared.clone(), t).map_err(|e| format!("poll: {e}"))?;
        let h = std::thread::Builder::new()
            .name(format!("loop-{t}"))
            .spawn(move || w.run())
            .map_err(|e| format!("spawning worker: {e}"))?;
        handles.push(h);
    }

    // Wait until every worker has opened (or given up on) its connections,
    // so the measured window never includes the connection ramp.
    let connect_started = Instant::now();
    let mut last_report = Instant::now();
    while shared.ready_workers.load(Ordering::SeqCst) < cfg.threads {
        if handles.iter().any(|h| h.is_finished()) {
            break; // a worker died; its error is collected below
        }
        std::thread::sleep(Duration::from_millis(5));
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            eprintln!(
                "[driver] connecting: {} open, {} failed of {}",
                shared.connected.load(Ordering::Relaxed),
                shared.connect_failed.load(Ordering::Relaxed),
                cfg.conns
            );
        }
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    let connected = shared.connected.load(Ordering::SeqCst);
    let failed = shared.connect_failed.load(Ordering::SeqCst);
    eprintln!("[driver] {connected} connections open, {failed} failed, in {connect_s:.2}s");

    // A short lead time so every worker sees the start signal before it
    // arrives; they poll with at most a 5 ms timeout while waiting.
    let start = Instant::now() + Duration::from_millis(20);
    shared.start_ns.store(shared.ns(start), Ordering::SeqCst);

    let mut window = None;
    if cfg.mode == Mode::Idle {
        println!("IDLE_READY {connected}");
        let _ = std::io::stdout().flush();
    } else if connected > 0 {
        sleep_until(start + cfg.warmup);
        let a = Sample::take(&cfg);
        sleep_until(start + cfg.warmup + cfg.duration);
        let b = Sample::take(&cfg);
        window = Some((a, b));
    }

    let mut stats = Stats::new();
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => stats.merge(s),
            Ok(Err(e)) => return Err(format!("worker failed: {e}")),
            Err(_) => return Err("worker thread panicked".into()),
        }
    }

    let report = Report {
        cfg: &cfg,
        stats: &stats,
        connected,
        connect_failed: failed,
        connect_s,
        window: window.as_ref(),
    };
    eprint!("{}", report.human());
    println!("{}", report.json());
    let _ = std::io::stdout().flush();
    Ok(if connected == 0 { 1 } else { 0 })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

struct Report<'a> {
    cfg: &'a Config,
    stats: &'a Stats,
    connected: usize,
    connect_failed: usize,
    connect_s: f64,
    window: Option<&'a (Sample, Sample)>,
}

/// p50, p90, p99, p99.9, max and mean in milliseconds; None if empty.
fn percentiles(h: &Histogram<u64>) -> Option<[f64; 6]> {
    if h.is_empty() {
        return None;
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    Some([
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.mean() / 1e6,
    ])
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "null".into(), num)
}

/// JSON string literal; our strings are error texts and codes.
fn jstr(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn jmap(m: &std::collections::BTreeMap<String, u64>) -> String {
    let items: Vec<String> = m.iter().map(|(k, v)| format!("{}:{v}", jstr(k))).collect();
    format!("{{{}}}", items.join(","))
}

impl Report<'_> {
    fn duration_s(&self) -> f64 {
        match self.window {
            Some((a, b)) => b.at.duration_since(a.at).as_secs_f64(),
            None => self.cfg.duration.as_secs_f64(),
        }
    }

    fn client_cpu_s(&self) -> Option<f64> {
        self.window.map(|(a, b)| b.client_cpu - a.client_cpu)
    }

    fn server_cpu_s(&self) -> Option<f64> {
        let (a, b) = self.window?;
        Some(b.server_cpu? - a.server_cpu?)
    }

    /// Steal and busy seconds over the window, per CPU line of /proc/stat
    /// ("cpu" is all CPUs together).
    fn cpu_deltas(&self) -> Vec<(String, f64, f64)> {
        let Some((a, b)) = self.window else {
            return Vec::new();
        };
        b.cpus
            .iter()
            .filter_map(|after| {
                let before = a.cpus.iter().find(|c| c.name == after.name)?;
                Some((
                    after.name.clone(),
                    after.busy - before.busy,
                    after.steal - before.steal,
                ))
            })
            .collect()
    }

    fn steal_total(&self) -> Option<f64> {
        self.cpu_deltas()
            .iter()
            .find(|(n, _, _)| n == "cpu")
            .map(|&(_, _, steal)| steal)
    }

    fn primary(&self) -> Option<[f64; 6]> {
        match self.cfg.mode {
            Mode::Fanout => percentiles(&self.stats.delivery_hist),
            _ => percentiles(&self.stats.ack_hist),
        }
    }

    fn json(&self) -> String {
        let s = self.stats;
        let d = self.duration_s();
        let rate = |n: u64| if d > 0.0 { n as f64 / d } else { 0.0 };
        let server_cpu = self.server_cpu_s();
        let per_cpu = |n: u64| server_cpu.filter(|&c| c > 0.0).map(|c| n as f64 / c);
        let steal = self.steal_total();
        let mut j = String::from("{");
        let mut field = |k: &str, v: String| {
            if j.len() > 1 {
                j.push(',');
            }
            let _ = write!(j, "\"{k}\":{v}");
        };
        let c = self.cfg;
        field("mode", jstr(c.mode.name()));
        field("addr", jstr(&c.addr.to_string()));
        field("conns", c.conns.to_string());
        field("connected", self.connected.to_string());
        field("connect_errors", self.connect_failed.to_string());
        field("connect_retries", s.connect_retries.to_string());
        field("connect_s", num(self.connect_s));
        field("threads", c.threads.to_string());
        match c.mode {
            Mode::Acks => {
                field("rooms", c.rooms.to_string());
            }
            Mode::Fanout => {
                field("members", c.conns.to_string());
                field("senders", c.senders.to_string());
                field("room", jstr(&c.room));
            }
            Mode::Idle => {
                field("rooms", c.rooms.to_string());
                field("hold_s", num(c.duration.as_secs_f64()));
            }
        }
        if c.mode != Mode::Idle {
            match c.rate_per_sender {
                Some(r) => field("rate_per_sender", num(r)),
                None => field("inflight", c.inflight.to_string()),
            }
            field("warmup_s", num(c.warmup.as_secs_f64()));
            field("duration_s", num(d));
            field("sent", s.sent.to_string());
            field("acks", s.acks.to_string());
            field("acks_per_s", num(rate(s.acks)));
            field("deliveries", s.deliveries.to_string());
            field("deliveries_per_s", num(rate(s.deliveries)));
            field("errors", s.errors.to_string());
            field("error_codes", jmap(&s.error_codes));
            field("disconnects", s.disconnects.to_string());
            field("other_frames", s.other_frames.to_string());
            field(
                "latency",
                jstr(if c.mode == Mode::Fanout {
                    "send_to_delivery"
                } else {
                    "send_to_ack"
                }),
            );
            let p = self.primary();
            for (i, k) in ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms"]
                .iter()
                .enumerate()
            {
                field(k, opt(p.map(|p| p[i])));
            }
            for (prefix, h) in [("ack", &s.ack_hist), ("delivery", &s.delivery_hist)] {
                let p = percentiles(h);
                for (i, k) in ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"]
                    .iter()
                    .enumerate()
                {
                    field(&format!("{prefix}_{k}"), opt(p.map(|p| p[i])));
                }
            }
            field("client_cpu_s", opt(self.client_cpu_s()));
            if let Some(pid) = c.server_pid {
                field("server_pid", pid.to_string());
            }
            field("server_cpu_s", opt(server_cpu));
            field("acks_per_server_cpu_s", opt(per_cpu(s.acks)));
            field("deliveries_per_server_cpu_s", opt(per_cpu(s.deliveries)));
            field("steal_s", opt(steal));
            let deltas = self.cpu_deltas();
            let per = |pick: fn(&(String, f64, f64)) -> f64| {
                let items: Vec<String> = deltas
                    .iter()
                    .filter(|d| d.0 != "cpu")
                    .map(|d| format!("{}:{}", jstr(&d.0), num(pick(d))))
                    .collect();
                format!("{{{}}}", items.join(","))
            };
            field("steal_per_cpu_s", per(|d| d.2));
            field("busy_per_cpu_s", per(|d| d.1));
            // BENCHMARKING.md: flag runs that lost over a tenth of a core.
            let flagged = steal.is_some_and(|st| d > 0.0 && st / d > 0.1);
            field("steal_flag", flagged.to_string());
        } else {
            field("client_cpu_s", num(sys::self_cpu_seconds()));
        }
        field("totals", {
            format!(
                "{{\"sent\":{},\"acks\":{},\"deliveries\":{},\"errors\":{}}}",
                s.sent_total, s.acks_total, s.deliveries_total, s.errors_total
            )
        });
        field("connect_error_kinds", jmap(&s.connect_errors));
        j.push('}');
        j
    }

    fn human(&self) -> String {
        let s = self.stats;
        let c = self.cfg;
        let mut out = String::new();
        let _ = writeln!(out, "---- {} summary ----", c.mode.name());
        let _ = writeln!(
            out,
            "connections: {} open of {} ({} failed, {} retries) in {:.2}s",
            self.connected, c.conns, self.connect_failed, s.connect_retries, self.connect_s
        );
        for (k, v) in &s.connect_errors {
            let _ = writeln!(out, "  connect error x{v}: {k}");
        }
        if c.mode == Mode::Idle {
            let _ = writeln!(out, "held {:.1}s", c.duration.as_secs_f64());
            return out;
        }
        let d = self.duration_s();
        let _ = writeln!(
            out,
            "window {d:.2}s: sent {}  acks {} ({:.0}/s)  deliveries {} ({:.0}/s)  errors {}  disconnects {}",
            s.sent,
            s.acks,
            s.acks as f64 / d.max(1e-9),
            s.deliveries,
            s.deliveries as f64 / d.max(1e-9),
            s.errors,
            s.disconnects
        );
        for (k, v) in &s.error_codes {
            let _ = writeln!(out, "  error {k}: {v}");
        }
        for (name, h) in [
            ("send->ack", &s.ack_hist),
            ("send->delivery", &s.delivery_hist),
        ] {
            if let Some(p) = percentiles(h) {
                let _ = writeln!(
                    out,
                    "{name:>15} ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (n={})",
                    p[0],
                    p[1],
                    p[2],
                    p[3],
                    p[4],
                    h.len()
                );
            }
        }
        if let Some(cpu) = self.client_cpu_s() {
            let _ = write!(out, "client cpu {cpu:.2}s");
        }
        if let Some(cpu) = self.server_cpu_s() {
            let _ = write!(out, "  server cpu {cpu:.2}s");
            if cpu > 0.0 {
                let _ = write!(
                    out,
                    " -> {:.0} acks, {:.0} deliveries per server CPU-second",
                    s.acks as f64 / cpu,
                    s.deliveries as f64 / cpu
                );
            }
        }
        if let Some(st) = self.steal_total() {
            let _ = write!(out, "  steal {st:.2}s");
        }
        out.push('\n');
        out
    }
}
