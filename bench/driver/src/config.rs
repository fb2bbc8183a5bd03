//! Command line: `chatflow-bench-driver <acks|fanout|idle> [--flag value]...`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

pub const USAGE: &str = "\
chatflow-bench-driver: load driver for ChatFlow-protocol WebSocket chat servers

USAGE:
  chatflow-bench-driver <MODE> [OPTIONS]      (or --mode MODE)

MODES:
  acks    every connection keeps --inflight messages outstanding (or sends at
          --rate-per-sender), measures send->ack latency, counts broadcasts
  fanout  --members connections in one room; the first --senders send, every
          member counts `message` frames and their send->delivery latency
  idle    opens --conns connections, prints `IDLE_READY <n>` on stdout when all
          are upgraded, holds them --hold seconds, then closes

COMMON OPTIONS:
  --addr HOST:PORT        server address                       [127.0.0.1:8080]
  --threads N             event-loop threads (connections split round-robin) [1]
  --source-ips A,B,...    local source IPs, used round-robin      [kernel's pick]
  --connect-batch N       handshakes in progress at once, in all threads  [100]
  --connect-timeout S     per-connection connect+upgrade timeout, seconds  [10]
  --connect-retries N     retries of a failed connection attempt             [3]
  --ramp-timeout S        give up on connections not open after S seconds and
                          run with those that are                          [60]
  --read-buf BYTES        per-connection read buffer         [8192; idle: 4096]
  --server-pid PID        read that process's CPU time at the window's edges
  --message-len N         characters in each message body (1..500)          [32]

ACKS:    --conns 200 --rooms 20 --inflight 8 --duration 10 --warmup 2
         [--rate-per-sender R   open loop: R msg/s per connection, latency
                                measured from the scheduled send time]
FANOUT:  --members 1000 --senders 10 --room 1 --inflight 1 --duration 10 --warmup 2
         [--rate-per-sender R]
         (closed loop: a message leaves the window once it is acked AND a
          receiver in the same thread has seen it, so senders cannot outrun
          what the receivers read)
IDLE:    --conns 18000 --rooms 20 --hold 10

OUTPUT: a human summary on stderr; one JSON object on the last line of stdout.
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Acks,
    Fanout,
    Idle,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Acks => "acks",
            Mode::Fanout => "fanout",
            Mode::Idle => "idle",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub addr: SocketAddr,
    pub threads: usize,
    /// Connections in all (fanout: members).
    pub conns: usize,
    /// Rooms the connections are spread over (acks, idle).
    pub rooms: usize,
    /// The single room of fanout.
    pub room: String,
    /// Connections that send: global ids 0..senders.
    pub senders: usize,
    pub inflight: u64,
    pub rate_per_sender: Option<f64>,
    /// Length of the measured window (idle: the hold time).
    pub duration: Duration,
    pub warmup: Duration,
    pub source_ips: Vec<IpAddr>,
    pub connect_batch: usize,
    pub connect_timeout: Duration,
    pub connect_retries: u32,
    pub ramp_timeout: Duration,
    pub read_buf: usize,
    pub server_pid: Option<u32>,
    pub message_len: usize,
}

impl Config {
    /// Room of connection `global` as a path segment.
    pub fn room_of(&self, global: usize) -> String {
        match self.mode {
            Mode::Fanout => self.room.clone(),
            _ => (global % self.rooms + 1).to_string(),
        }
    }

    pub fn parse(args: &[String]) -> Result<Config, String> {
        let mut mode: Option<Mode> = None;
        let mut opts: Vec<(String, String)> = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "-h" || a == "--help" {
                return Err(String::new());
            }
            if let Some(name) = a.strip_prefix("--") {
                let (name, value) = match name.split_once('=') {
                    Some((n, v)) => (n.to_string(), v.to_string()),
                    None => {
                        let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                        (name.to_string(), v.clone())
                    }
                };
                if name == "mode" {
                    mode = Some(parse_mode(&value)?);
                } else {
                    opts.push((name, value));
                }
            } else if mode.is_none() {
                mode = Some(parse_mode(a)?);
            } else {
                return Err(format!("unexpected argument `{a}`"));
            }
        }
        let mode = mode.ok_or("missing mode: acks, fanout or idle")?;

        let mut o = Opts(opts);
        let addr_s = o.take("addr").unwrap_or_else(|| "127.0.0.1:8080".into());
        let addr = addr_s
            .to_socket_addrs()
            .map_err(|e| format!("--addr {addr_s}: {e}"))?
            .next()
            .ok_or_else(|| format!("--addr {addr_s}: no address"))?;
        let threads: usize = o.num("threads", 1)?;
        let source_ips = match o.take("source-ips") {
            None => Vec::new(),
            Some(s) => s
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| {
                    p.trim()
                        .parse::<IpAddr>()
                        .map_err(|e| format!("--source-ips `{p}`: {e}"))
                })
                .collect::<Result<_, _>>()?,
        };
        let connect_batch: usize = o.num("connect-batch", 100)?;
        let connect_timeout = secs(o.num("connect-timeout", 10.0)?);
        let connect_retries: u32 = o.num("connect-retries", 3)?;
        let ramp_timeout = secs(o.num("ramp-timeout", 60.0)?);
        let server_pid: Option<u32> = o.opt_num("server-pid")?;
        let message_len: usize = o.num("message-len", 32)?;
        let rate_per_sender: Option<f64> = match o.opt_num::<f64>("rate-per-sender")? {
            Some(r) => Some(r),
            None => o.opt_num("rate")?,
        };

        let (conns, rooms, room, senders, inflight, duration, warmup, read_buf_default);
        match mode {
            Mode::Acks => {
                conns = o.num("conns", 200)?;
                rooms = o.num("rooms", 20)?;
                room = String::new();
                senders = conns;
                inflight = o.num("inflight", 8)?;
                duration = secs(o.num("duration", 10.0)?);
                warmup = secs(o.num("warmup", 2.0)?);
                read_buf_default = 8 * 1024;
            }
            Mode::Fanout => {
                conns = o.num("members", 1000)?;
                rooms = 1;
                room = o.take("room").unwrap_or_else(|| "1".into());
                senders = o.num("senders", 10)?;
                inflight = o.num("inflight", 1)?;
                duration = secs(o.num("duration", 10.0)?);
                warmup = secs(o.num("warmup", 2.0)?);
                read_buf_default = 8 * 1024;
            }
            Mode::Idle => {
                conns = o.num("conns", 1000)?;
                rooms = o.num("rooms", 20)?;
                room = String::new();
                senders = 0;
                inflight = 0;
                duration = secs(o.num("hold", 10.0)?);
                warmup = Duration::ZERO;
                // Idle sockets receive nothing; a big eagerly allocated read
                // buffer would only inflate the driver's own memory.
                read_buf_default = 4096;
            }
        }
        let read_buf: usize = o.num("read-buf", read_buf_default)?;
        o.finish()?;

        if threads == 0 || conns == 0 || rooms == 0 || connect_batch == 0 {
            return Err(
                "--threads, --conns/--members, --rooms, --connect-batch must be > 0".into(),
            );
        }
        if senders > conns {
            return Err("--senders cannot exceed --members".into());
        }
        if mode != Mode::Idle && rate_per_sender.is_none() && inflight == 0 {
            return Err("--inflight must be > 0 (or give --rate-per-sender)".into());
        }
        if rate_per_sender.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err("--rate-per-sender must be a positive number".into());
        }
        if !room.is_empty()
            && (room.len() > 64
                || !room
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err("--room must be 1..64 of [A-Za-z0-9_-]".into());
        }
        Ok(Config {
            mode,
            addr,
            threads,
            conns,
            rooms,
            room,
            senders,
            inflight,
            rate_per_sender,
            duration,
            warmup,
            source_ips,
            connect_batch,
            connect_timeout,
            connect_retries,
            ramp_timeout,
            read_buf: read_buf.max(256),
            server_pid,
            message_len,
        })
    }
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "acks" => Ok(Mode::Acks),
        "fanout" => Ok(Mode::Fanout),
        "idle" => Ok(Mode::Idle),
        _ => Err(format!("unknown mode `{s}` (acks, fanout, idle)")),
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Flags not yet consumed; whatever is left at the end is an unknown flag,
/// which we reject so a typo never silently runs the default workload.
struct Opts(Vec<(String, String)>);

impl Opts {
    fn take(&mut self, name: &str) -> Option<String> {
        let pos = self.0.iter().rposition(|(n, _)| n == name)?;
        let v = self.0.remove(pos).1;
        // A repeated flag: the last one wins, drop the others.
        self.0.retain(|(n, _)| n != name);
        Some(v)
    }

    fn opt_num<T: std::str::FromStr>(&mut self, name: &str) -> Result<Option<T>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("--{name}: `{v}` is not a valid number")),
        }
    }

    fn num<T: std::str::FromStr>(&mut self, name: &str, default: T) -> Result<T, String> {
        Ok(self.opt_num(name)?.unwrap_or(default))
    }

    fn finish(self) -> Result<(), String> {
        match self.0.first() {
            None => Ok(()),
            Some((n, _)) => Err(format!("unknown option --{n} for this mode")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_acks() {
        let c = Config::parse(&args(
            "acks --conns 10 --rooms 5 --addr=127.0.0.1:9 --threads 2",
        ))
        .expect("valid");
        assert_eq!(c.mode, Mode::Acks);
        assert_eq!((c.conns, c.rooms, c.senders, c.threads), (10, 5, 10, 2));
        assert_eq!(c.room_of(0), "1");
        assert_eq!(c.room_of(9), "5");
    }

    #[test]
    fn parses_fanout_with_mode_flag() {
        let c = Config::parse(&args(
            "--mode fanout --members 50 --senders 5 --rate-per-sender 100",
        ))
        .expect("valid");
        assert_eq!(c.mode, Mode::Fanout);
        assert_eq!(c.rate_per_sender, Some(100.0));
        assert_eq!(c.room_of(49), "1");
    }

    #[test]
    fn rejects_unknown_and_bad() {
        assert!(Config::parse(&args("acks --connz 10")).is_err());
        assert!(Config::parse(&args("idle --inflight 3")).is_err());
        assert!(Config::parse(&args("fanout --members 5 --senders 6")).is_err());
        assert!(Config::parse(&args("acks --conns x")).is_err());
        assert!(Config::parse(&args("nope")).is_err());
        let c = Config::parse(&args("idle --source-ips 127.0.0.1,127.0.0.2")).expect("valid");
        assert_eq!(c.source_ips.len(), 2);
    }
}
