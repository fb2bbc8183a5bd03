//! The notice sender: takes commit notices from the persist consumer and publishes each to
//! the node that accepted the messages, on a connection of its own.
//!
//! The persist consumer never publishes on its own connection: under a memory or disk alarm
//! RabbitMQ stops reading from connections that publish, and the consumer's acks, which are
//! what lets `chat.persist` drain and the alarm clear, would be stuck behind a blocked
//! publish. Here only this thread waits.
//!
//! Policy when full or disconnected: a notice that finds the queue full, or that this thread
//! cannot publish, is dropped and counted. Its senders then get `UNAVAILABLE` after
//! `persist_timeout_ms` (their messages are stored; a retry with the same `clientMessageId`
//! is stored once), never an ack for something uncommitted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amiquip::{AmqpProperties, Channel, Publish};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::envelope::{self, Settled};
use super::link::Backoff;
use super::{Role, Shared, Topology};

/// Notices waiting for the sender thread. Each holds the settled senders of one or more
/// deliveries, so this bounds memory at a few MB.
pub(super) const QUEUE_NOTICES: usize = 4096;
/// Longest wait in one turn, so shutdown is noticed.
const TICK: Duration = Duration::from_millis(100);

/// A commit notice on its way: the accepting node, its process's epoch, and the senders.
pub(super) struct Notice {
    pub node: String,
    pub epoch: u64,
    pub settled: Vec<Settled>,
}

pub(super) struct NoticeThread {
    shared: Arc<Shared>,
    notices: Receiver<Notice>,
    backoff: Backoff,
    properties: AmqpProperties,
}

impl NoticeThread {
    pub(super) fn new(shared: Arc<Shared>, notices: Receiver<Notice>) -> NoticeThread {
        NoticeThread {
            shared,
            notices,
            backoff: Backoff::new(),
            properties: AmqpProperties::default()
                .with_content_type(envelope::CONTENT_TYPE.into())
                .with_type_(envelope::NOTICE_TYPE.into())
                .with_app_id("chatflow".into()),
        }
    }

    pub(super) fn run(mut self) {
        let shared = self.shared.clone();
        while !shared.control.stopping() {
            let (conn, channel) = match shared.open_channel(Role::Notices) {
                Ok(c) => c,
                Err(why) => {
                    log::debug!("amqp notices: connect failed: {why}");
                    shared.set_health(Role::Notices, Some(why));
                    self.wait_backoff();
                    continue;
                }
            };
            shared.set_health(Role::Notices, None);
            self.backoff.reset();
            match self.session(&channel) {
                Ok(()) => {
                    drop(channel);
                    if let Err(e) = conn.close() {
                        log::debug!("amqp notices: close: {e}");
                    }
                    break;
                }
                Err(why) => {
                    log::warn!("amqp notices: connection lost ({why}); reconnecting");
                    shared.set_health(Role::Notices, Some(why));
                    drop(channel);
                    drop(conn);
                    self.wait_backoff();
                }
            }
        }
        log::debug!("amqp notice sender stopped");
    }

    /// Waits before reconnecting, dropping what arrives meanwhile (see the module's policy).
    fn wait_backoff(&mut self) {
        let notices = self.notices.clone();
        let shared = self.shared.clone();
        self.backoff.wait(&self.shared.control, |c| {
            while let Ok(n) = notices.try_recv() {
                shared
                    .stats
                    .notices_dropped
                    .fetch_add(n.settled.len() as u64, Ordering::Relaxed);
            }
            c.stopping()
        });
    }

    /// Publishes notices until shutdown (`Ok`) or a failure (`Err`, the notice dropped).
    fn session(&mut self, channel: &Channel) -> Result<(), String> {
        let shared = self.shared.clone();
        loop {
            let notice = match self.notices.recv_timeout(TICK) {
                Ok(n) => n,
                Err(RecvTimeoutError::Timeout) if shared.control.stopping() => return Ok(()),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let queue = Topology::new(&shared.settings.namespace, &notice.node).node_queue;
            let body = envelope::encode_notice(notice.epoch, &notice.settled);
            // The default exchange routes to the queue the key names; if that node is gone,
            // the notice is dropped by the broker, and nobody waits for it.
            let publish = Publish::with_properties(&body, queue, self.properties.clone());
            if let Err(e) = channel.basic_publish("", publish) {
                shared
                    .stats
                    .notices_dropped
                    .fetch_add(notice.settled.len() as u64, Ordering::Relaxed);
                return Err(shared.describe(&e));
            }
        }
    }
}
