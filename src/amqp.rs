//! The RabbitMQ bus: not in this build yet; `bus = "amqp://..."` is refused at start.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::bus::{Bus, Inbox, Publisher};
use crate::mailbox::Mailbox;
use crate::store::writer::{DeliveryOutcomes, StoreQueue};

/// What the RabbitMQ bus needs from the configuration.
#[derive(Clone, Debug)]
pub struct AmqpSettings {
    /// `amqp://USER:PASS@HOST:PORT/VHOST`.
    pub url: String,
    /// Prefix of every exchange and queue name.
    pub namespace: String,
    /// This node's id (its fan-out queue's name, and the envelope's `node`).
    pub node_id: String,
    /// Publisher threads.
    pub publishers: usize,
    /// Most chat messages of one room per AMQP message.
    pub batch_max: usize,
    /// Most unconfirmed AMQP messages per publisher.
    pub confirm_window: usize,
    /// Messages waiting for the publishers.
    pub queue_messages: usize,
    /// Longest wait for a confirm.
    pub confirm_timeout: Duration,
    /// The node queue's expiry and message TTL.
    pub node_queue_ttl: Duration,
    /// The node queue's length limit.
    pub node_queue_max_length: u64,
    /// Consumers' prefetch.
    pub prefetch: u16,
}

/// The RabbitMQ bus.
pub struct AmqpBus;

impl AmqpBus {
    /// Connects, declares the topology and starts the publisher and consumer threads.
    pub fn start(
        _settings: AmqpSettings,
        _inboxes: Arc<[Inbox]>,
        _mailboxes: Arc<[Mailbox]>,
        _store: Arc<StoreQueue>,
        _deliveries: Receiver<DeliveryOutcomes>,
    ) -> Result<AmqpBus, String> {
        Err("the amqp bus is not built yet".into())
    }
}

impl Bus for AmqpBus {
    fn publisher(&self, reactor: usize) -> Box<dyn Publisher> {
        // Never reached: `start` refuses. The in-process publisher keeps this total.
        Box::new(crate::bus::LocalPublisher::new(reactor, Arc::from(Vec::new())))
    }
    fn ready(&self) -> Result<(), String> {
        Err("not built".into())
    }
    fn name(&self) -> &'static str {
        "amqp"
    }
    fn stores_messages(&self) -> bool {
        true
    }
}
