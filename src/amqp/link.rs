//! Connections and topology: opening a connection, declaring the exchanges and queues (the
//! same way at start and after every reconnect), and the backoff between attempts.

use std::time::{Duration, Instant};

use std::net::ToSocketAddrs;

use amiquip::{
    AmqpValue, Auth, Channel, Connection, ConnectionOptions, ConnectionTuning, Consumer,
    ConsumerMessage, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
    QueueDeleteOptions,
};

use super::{AmqpSettings, Control, Topology};

/// Where and how to connect, from an `amqp://USER:PASS@HOST:PORT/VHOST?heartbeat=S&connection_timeout=MS&channel_max=N`
/// URL (the RabbitMQ URI format: user, password and vhost percent-encoded; user and password
/// default to `guest`, the port to 5672, the vhost to `/`).
///
/// The bus opens its TCP connections itself rather than through amiquip, to set `TCP_NODELAY`:
/// amiquip leaves Nagle's algorithm on, so a small frame written while the previous one is
/// unacknowledged waits for the broker's delayed ACK, about 40 ms per publish at low rates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Broker {
    host: String,
    port: u16,
    username: String,
    password: String,
    vhost: String,
    /// Seconds; 15 unless the URL says otherwise (amiquip's 60 would leave a silent broker
    /// unnoticed for two minutes).
    heartbeat: u16,
    /// For the TCP connect and for the AMQP handshake; 5 s unless the URL says otherwise
    /// (none at all would let a black-holed address hold a thread for minutes).
    connect_timeout: Duration,
    /// 0: the broker's limit.
    channel_max: u16,
}

impl Broker {
    /// Parses `url`; the error says what is wrong with it (without the password).
    pub(super) fn parse(url: &str) -> Result<Broker, String> {
        let rest = url
            .strip_prefix("amqp://")
            .ok_or_else(|| "the URL must start with amqp:// (TLS is not built in)".to_string())?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => ("guest".to_string(), "guest".to_string()),
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, "guest"));
                (decode(user)?, decode(pass)?)
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| "an IPv6 host needs its closing ']'".to_string())?;
            (h.to_string(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (hostport.to_string(), ""),
            }
        };
        let port = match port {
            "" => 5672,
            p => p
                .parse()
                .map_err(|_| format!("port {p:?} is not a number from 1 to 65535"))?,
        };
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            host
        };
        if path.contains('/') {
            return Err("the vhost must be one path segment (write '/' inside it as %2f)".into());
        }
        let vhost = match decode(path)? {
            v if v.is_empty() => "/".to_string(),
            v => v,
        };
        let mut broker = Broker {
            host,
            port,
            username,
            password,
            vhost,
            heartbeat: 15,
            connect_timeout: Duration::from_secs(5),
            channel_max: 0,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = || format!("{key}={value:?} is not a valid number");
            match key {
                "heartbeat" => broker.heartbeat = value.parse().map_err(|_| bad())?,
                "connection_timeout" => {
                    broker.connect_timeout =
                        Duration::from_millis(value.parse().map_err(|_| bad())?);
                    if broker.connect_timeout.is_zero() {
                        return Err("connection_timeout must be above 0".into());
                    }
                }
                "channel_max" => broker.channel_max = value.parse().map_err(|_| bad())?,
                other => {
                    return Err(format!(
                        "unsupported URL parameter {other:?} (heartbeat, connection_timeout and channel_max are)"
                    ));
                }
            }
        }
        Ok(broker)
    }

    /// Opens a connection with `TCP_NODELAY`. `information` is shown with the connection in
    /// RabbitMQ's management UI, so an operator can tell which node and thread it is.
    pub(super) fn open(&self, information: &str) -> Result<Connection, String> {
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}:{}: {e}", self.host, self.port))?;
        let mut why = format!("{}:{} resolves to no address", self.host, self.port);
        for addr in addrs {
            let tcp = match std::net::TcpStream::connect_timeout(&addr, self.connect_timeout) {
                Ok(tcp) => tcp,
                Err(e) => {
                    why = format!("cannot connect to {addr}: {e}");
                    continue;
                }
            };
            tcp.set_nodelay(true)
                .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
            let stream = mio06::net::TcpStream::from_stream(tcp)
                .map_err(|e| format!("cannot use the socket: {e}"))?;
            let options = ConnectionOptions::<Auth>::default()
                .auth(Auth::Plain {
                    username: self.username.clone(),
                    password: self.password.clone(),
                })
                .virtual_host(self.vhost.clone())
                .heartbeat(self.heartbeat)
                .channel_max(self.channel_max)
                .connection_timeout(Some(self.connect_timeout))
                .information(Some(information.to_string()));
            return Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
                .map_err(|e| format!("{addr}: {e}"));
        }
        Err(why)
    }
}

/// Percent-decodes a URL part.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a '%' in the URL is not followed by two hex digits".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a percent-encoded part of the URL is not UTF-8".into())
}

/// `message` without the URL's password, should one be quoted.
pub(super) fn scrub(message: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => message.replace(&format!(":{p}@"), ":***@"),
        None => message.to_string(),
    }
}

/// Declares what every thread relies on: the topic exchange, the persist queue bound to every
/// room, and the dead-letter exchange and queue behind it. Idempotent, so each thread runs it
/// after each (re)connect and none depends on another having done it.
pub(super) fn declare_core(channel: &Channel, t: &Topology) -> amiquip::Result<()> {
    let durable = || ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel.exchange_declare(ExchangeType::Topic, t.exchange.as_str(), durable())?;
    channel.exchange_declare(ExchangeType::Fanout, t.dlx.as_str(), durable())?;
    channel.queue_declare(
        t.dlq.as_str(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
    )?;
    channel.queue_bind(t.dlq.as_str(), t.dlx.as_str(), "#", FieldTable::new())?;
    // No TTL and no length limit: what is here has been confirmed to a sender and must be
    // stored; the broker's disk is the bound, and its alarms stop the publishers.
    let mut args = FieldTable::new();
    args.insert(
        "x-dead-letter-exchange".into(),
        AmqpValue::LongString(t.dlx.clone()),
    );
    channel.queue_declare(
        t.persist.as_str(),
        QueueDeclareOptions {
            durable: true,
            arguments: args,
            ..QueueDeclareOptions::default()
        },
    )?;
    channel.queue_bind(
        t.persist.as_str(),
        t.exchange.as_str(),
        "room.#",
        FieldTable::new(),
    )?;
    Ok(())
}

/// Declares this node's fan-out queue.
///
/// Not durable: it holds only copies for this node's live connections, so its messages need
/// not be written to disk (persistent messages routed to a transient queue are not), and
/// after a broker restart it is declared again. Not auto-delete either: a consumer that
/// reconnects finds the messages that arrived meanwhile. `x-expires` removes it once no
/// consumer has used it for `node_queue_ttl` (the node is gone); `x-message-ttl` and
/// `x-max-length` with `drop-head` bound what a stalled node can pile up, dropping the oldest.
/// No dead-letter exchange: expired and dropped copies would flood the DLQ, and the persist
/// queue keeps the copy that counts.
pub(super) fn declare_node_queue(
    channel: &Channel,
    t: &Topology,
    s: &AmqpSettings,
) -> amiquip::Result<()> {
    declare_core(channel, t)?;
    let ttl_ms = i64::try_from(s.node_queue_ttl.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    let max_len = i64::try_from(s.node_queue_max_length).unwrap_or(i64::MAX);
    let mut args = FieldTable::new();
    args.insert("x-expires".into(), AmqpValue::LongLongInt(ttl_ms));
    args.insert("x-message-ttl".into(), AmqpValue::LongLongInt(ttl_ms));
    args.insert("x-max-length".into(), AmqpValue::LongLongInt(max_len));
    args.insert(
        "x-overflow".into(),
        AmqpValue::LongString("drop-head".into()),
    );
    channel.queue_declare(
        t.node_queue.as_str(),
        QueueDeclareOptions {
            arguments: args,
            ..QueueDeclareOptions::default()
        },
    )?;
    Ok(())
}

/// At start: checks the broker is reachable and the topology can be declared, and deletes
/// this node's queue left by an earlier run (see [`super::AmqpBus::start`]).
pub(super) fn prepare(broker: &Broker, node_id: &str, t: &Topology) -> Result<(), String> {
    let mut conn = broker
        .open(&format!("chatflow node {node_id}: start"))
        .map_err(|e| format!("cannot connect: {e}"))?;
    let channel = conn
        .open_channel(None)
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    declare_core(&channel, t).map_err(|e| format!("cannot declare the topology: {e}"))?;
    let deleted = channel.queue_delete(
        t.node_queue.as_str(),
        QueueDeleteOptions {
            if_unused: true,
            if_empty: false,
        },
    );
    match deleted {
        Ok(n) if n > 0 => log::info!(
            "amqp: deleted {} with {n} stale message(s) from an earlier run",
            t.node_queue
        ),
        Ok(_) => {}
        // In use: another process consumes this node's queue, so two nodes share a node id
        // and would split this node's messages between them.
        Err(amiquip::Error::ServerClosedChannel { code: 406, .. }) => log::warn!(
            "amqp: {} has a consumer already: is another node running with the same node id?",
            t.node_queue
        ),
        Err(e) => log::debug!("amqp: could not delete {}: {e}", t.node_queue),
    }
    // The channel may be closed by a refused delete; closing the connection is what matters.
    drop(channel);
    conn.close().map_err(|e| format!("cannot close: {e}"))
}

/// Cancels `consumer` and waits (at most 2 s) until its receiver has the broker's
/// confirmation.
///
/// amiquip answers the `cancel` call before it tells the consumer's own channel; a consumer
/// dropped in between makes amiquip's I/O thread fail, and with it the whole connection (the
/// queue could then not be deleted at shutdown, nor the persist consumer's last acks sent).
/// Deliveries that arrive meanwhile are left unacknowledged: the broker requeues them when the
/// channel closes.
pub(super) fn cancel(consumer: &Consumer<'_>) {
    if consumer.cancel().is_err() {
        return;
    }
    let until = Instant::now() + Duration::from_secs(2);
    while let Ok(ConsumerMessage::Delivery(_)) = consumer.receiver().recv_deadline(until) {}
}

/// Exponential backoff between reconnects: 100 ms doubling to 5 s, with jitter so nodes that
/// lost the broker together do not return together.
pub(super) struct Backoff {
    next: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }

    pub(super) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// Sleeps the next pause, waking early when `stop` says so; then doubles the pause.
    pub(super) fn wait(&mut self, control: &Control, stop: impl Fn(&Control) -> bool) {
        let quarter = self.next / 4;
        let pause = self.next - quarter + quarter.mul_f64(fastrand::f64() * 2.0);
        let until = Instant::now() + pause;
        while Instant::now() < until && !stop(control) {
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
        self.next = (self.next * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_like_rabbitmqs_uri_spec() {
        let b = Broker::parse("amqp://guest:guest@127.0.0.1:5672").expect("parses");
        assert_eq!(
            b,
            Broker {
                host: "127.0.0.1".into(),
                port: 5672,
                username: "guest".into(),
                password: "guest".into(),
                vhost: "/".into(),
                heartbeat: 15,
                connect_timeout: Duration::from_secs(5),
                channel_max: 0,
            }
        );
        let b = Broker::parse(
            "amqp://u%40x:p%3Aw@rabbit/prod%2fchat?heartbeat=30&connection_timeout=250",
        )
        .expect("parses");
        assert_eq!((b.username.as_str(), b.password.as_str()), ("u@x", "p:w"));
        assert_eq!((b.host.as_str(), b.port), ("rabbit", 5672));
        assert_eq!(b.vhost, "prod/chat");
        assert_eq!(b.heartbeat, 30);
        assert_eq!(b.connect_timeout, Duration::from_millis(250));
        let b = Broker::parse("amqp://[::1]:5673/").expect("parses");
        assert_eq!(
            (b.host.as_str(), b.port, b.vhost.as_str()),
            ("::1", 5673, "/")
        );
        let b = Broker::parse("amqp://").expect("parses");
        assert_eq!(
            (b.host.as_str(), b.username.as_str()),
            ("localhost", "guest")
        );
        for bad in [
            "amqps://h",
            "amqp://h:99999",
            "amqp://h/a/b",
            "amqp://h?heartbeat=x",
            "amqp://h?frame_max=1",
            "amqp://u:%zz@h",
            "amqp://h?connection_timeout=0",
        ] {
            assert!(Broker::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connecting_to_nothing_fails_fast_with_the_address() {
        let b = Broker::parse("amqp://127.0.0.1:1?connection_timeout=500").expect("parses");
        let started = std::time::Instant::now();
        let Err(err) = b.open("test") else {
            panic!("something listens on port 1");
        };
        assert!(err.contains("127.0.0.1:1"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn passwords_are_scrubbed_from_errors() {
        let url = "amqp://user:s3cret@host:5672/";
        assert_eq!(
            scrub(
                "failed to connect to amqp://user:s3cret@host:5672/: refused",
                url
            ),
            "failed to connect to amqp://user:***@host:5672/: refused"
        );
        assert_eq!(scrub("x", "amqp://host"), "x");
    }

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let mut b = Backoff::new();
        let c = Control::default();
        c.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..10 {
            b.wait(&c, Control::stopping);
        }
        assert_eq!(b.next, BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next, BACKOFF_MIN);
    }
}
