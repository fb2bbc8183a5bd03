//! Starting and stopping a node: bind one `SO_REUSEPORT` listener per reactor, spawn the
//! reactor threads, and drain them on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Poll, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::amqp::AmqpBus;
use crate::bus::{Bus, Inbox, LocalBus};
use crate::chat::Presence;
use crate::config::Config;
use crate::mailbox::Mailbox;
use crate::metrics::SharedStats;
use crate::reactor::{Reactor, Shared, StoreHandle, WAKER};
use crate::store::query::QueryPool;
use crate::store::writer::WriterPool;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The configuration could not be turned into a running server (e.g. an unreadable secret).
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// The store could not be opened or migrated.
    #[error("cannot open the store {spec}: {source}")]
    Store {
        /// The store, password redacted.
        spec: String,
        /// Why.
        source: crate::store::StoreError,
    },
    /// The message bus could not be reached or set up.
    #[error("cannot start the bus {url}: {message}")]
    Bus {
        /// The bus, password redacted.
        url: String,
        /// Why.
        message: String,
    },
    /// Setting up a poll, waker or thread failed.
    #[error("cannot start reactor {reactor}: {source}")]
    Reactor {
        /// Which reactor.
        reactor: usize,
        /// The error.
        source: io::Error,
    },
}

/// A running node.
pub struct Server {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    writers: WriterPool,
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
}

/// Asks a server to shut down gracefully; cheap to clone and send to a signal thread.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Begins the drain: stop accepting, answer what was received, close with 1001.
    pub fn shutdown(&self) {
        self.0.begin_shutdown();
    }
}

impl Server {
    /// Binds and starts `config.reactor_count()` reactors.
    pub fn start(config: Config) -> Result<Server, StartError> {
        let reactors = config.reactor_count();
        let auth_key = config.auth_key()?;
        let listeners = bind_listeners(config.listen, reactors, config.backlog, config.reuse_port)?;
        let mut admin_listener = match config.admin_addr() {
            Some(addr) => Some(bind_listeners(addr, 1, config.backlog, false)?.remove(0)),
            None => None,
        };
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        let local_addr = listeners[0]
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;

        let store_fail = |source| StartError::Store {
            spec: crate::store::redact(&config.store),
            source,
        };
        let store =
            crate::store::open(&config.store, &config.store_options()).map_err(store_fail)?;

        let mut polls = Vec::with_capacity(reactors);
        let mut inboxes = Vec::with_capacity(reactors);
        let mut mailboxes = Vec::with_capacity(reactors);
        let mut receivers = Vec::with_capacity(reactors);
        // Each reactor's mailbox holds what its writers and query threads can have for it at
        // once: a completion list per batch and an answer per queued query.
        let mailbox_capacity =
            config.writer_threads * 4 + config.query_queue + config.query_threads;
        for reactor in 0..reactors {
            let fail = |source| StartError::Reactor { reactor, source };
            let poll = Poll::new().map_err(fail)?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(fail)?);
            let (inbox, rx) = Inbox::new(config.reactor_queue_batches, waker.clone());
            let (mailbox, replies) = Mailbox::new(mailbox_capacity, waker);
            polls.push(poll);
            inboxes.push(inbox);
            mailboxes.push(mailbox);
            receivers.push((rx, replies));
        }
        let inboxes: Arc<[Inbox]> = inboxes.into();
        let mailboxes: Arc<[Mailbox]> = mailboxes.into();
        let amqp = config.bus.starts_with("amqp://");
        // With RabbitMQ, the writers are fed by the persist queue's consumer and report back
        // to it which deliveries are stored.
        let (deliveries_tx, deliveries_rx) =
            crossbeam_channel::bounded(usize::from(config.amqp_prefetch).max(1) * 4);
        let writers = WriterPool::start(
            &store,
            &config.writer_options(),
            mailboxes.clone(),
            amqp.then_some(deliveries_tx),
        )
        .map_err(store_fail)?;
        let bus: Box<dyn Bus> = if amqp {
            match AmqpBus::start(
                config.amqp_settings(),
                inboxes.clone(),
                mailboxes.clone(),
                writers.queue(),
                deliveries_rx,
            ) {
                Ok(bus) => Box::new(bus),
                Err(message) => {
                    writers.close(Duration::ZERO);
                    return Err(StartError::Bus {
                        url: crate::store::redact(&config.bus),
                        message,
                    });
                }
            }
        } else {
            Box::new(LocalBus::new(inboxes.clone()))
        };
        let queries = QueryPool::start(
            &store,
            config.query_threads,
            config.query_queue,
            config.query_timeout(),
            mailboxes.clone(),
        )
        .map_err(store_fail)?;
        log::info!(
            "store {} ({}), {} writer(s), ack after {:?}",
            crate::store::redact(&config.store),
            store.kind(),
            config.writer_threads.min(store.max_writers()),
            config.ack_after
        );
        let shared = Arc::new(Shared {
            node_id: config.resolved_node_id(),
            presence: Presence::new(config.max_presence_entries),
            stats: (0..reactors)
                .map(|_| Arc::new(SharedStats::default()))
                .collect(),
            bus,
            store: StoreHandle {
                kind: store.kind(),
                queue: writers.queue(),
                queries,
            },
            auth_key,
            inboxes,
            mailboxes,
            draining: AtomicBool::new(false),
            started: Instant::now(),
            config,
        });

        let mut threads = Vec::with_capacity(reactors);
        let parts = polls.into_iter().zip(listeners).zip(receivers).enumerate();
        for (id, ((poll, listener), (rx, replies))) in parts {
            let admin = if id == 0 { admin_listener.take() } else { None };
            let started = Reactor::new(id, poll, listener, admin, rx, replies, shared.clone())
                .and_then(|r| {
                    std::thread::Builder::new()
                        .name(format!("reactor-{id}"))
                        .spawn(move || r.run())
                });
            match started {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    // Stop the reactors already running before reporting the failure.
                    shared.begin_shutdown();
                    for t in threads {
                        let _ = t.join();
                    }
                    writers.close(Duration::ZERO);
                    return Err(StartError::Reactor {
                        reactor: id,
                        source,
                    });
                }
            }
        }
        log::info!(
            "node {} listening on {local_addr} with {reactors} reactor(s)",
            shared.node_id
        );
        if let Some(addr) = admin_addr {
            log::info!("admin routes (/metrics, /api/*) on {addr}");
        }
        Ok(Server {
            shared,
            threads,
            writers,
            local_addr,
            admin_addr,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin address actually bound, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// A handle that can start the shutdown from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// Begins a graceful shutdown.
    pub fn shutdown(&self) {
        self.shared.begin_shutdown();
    }

    /// The Prometheus text `/metrics` would return now.
    pub fn metrics(&self) -> String {
        self.shared.render_metrics()
    }

    /// Waits for every reactor to finish its drain, then for the writers to store what is
    /// queued (retrying an unreachable store for at most `shutdown_timeout_ms` more).
    pub fn join(self) {
        for t in self.threads {
            if t.join().is_err() {
                log::error!("a reactor thread panicked");
            }
        }
        let deadline = self.shared.config.shutdown_timeout();
        self.shared.bus.shutdown(deadline);
        self.writers.close(deadline);
    }
}

/// Binds `n` listeners on one address with `SO_REUSEPORT`, so the kernel spreads connections
/// over the reactors.
///
/// A probe without `SO_REUSEPORT` is bound first: it fails if anything else holds the port,
/// so a second server started by mistake gets "address in use" instead of silently sharing it;
/// it also resolves port 0 to the one port all reactors then share.
fn bind_listeners(
    addr: SocketAddr,
    n: usize,
    backlog: i32,
    reuse_port: bool,
) -> Result<Vec<TcpListener>, StartError> {
    let fail = |source| StartError::Bind { addr, source };
    let probe =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
    probe.set_reuse_address(true).map_err(fail)?;
    probe.bind(&addr.into()).map_err(fail)?;
    let bound = probe
        .local_addr()
        .map_err(fail)?
        .as_socket()
        .ok_or_else(|| fail(io::Error::other("not an IP address")))?;
    drop(probe);
    let listen = |reuse: bool| -> Result<Socket, StartError> {
        let s = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(fail)?;
        s.set_reuse_address(true).map_err(fail)?;
        s.set_reuse_port(reuse).map_err(fail)?;
        s.set_nonblocking(true).map_err(fail)?;
        s.bind(&bound.into()).map_err(fail)?;
        s.listen(backlog).map_err(fail)?;
        Ok(s)
    };
    if !reuse_port {
        // One accept queue shared by every reactor: each gets its own descriptor of the same
        // socket, so all wake for a new connection and one wins the accept.
        let shared = listen(false)?;
        return (0..n)
            .map(|_| {
                let s = shared.try_clone().map_err(fail)?;
                Ok(TcpListener::from_std(s.into()))
            })
            .collect();
    }
    (0..n)
        .map(|_| Ok(TcpListener::from_std(listen(true)?.into())))
        .collect()
}
