//! ChatFlow: a real-time chat server on a thread-per-core `mio` reactor.
//!
//! Where a message goes: a [`reactor`] reads a WebSocket frame, [`protocol`] validates it,
//! [`chat`] updates presence, the reactor acks the sender and fans the frame out to the room's
//! members, locally and through the [`bus`] to other reactors. [`http`] answers the plain HTTP
//! routes on the same port, [`metrics`] counts everything, [`config`] says how it all behaves,
//! and [`server`] starts and stops the node.
#![deny(missing_docs)]

pub mod amqp;
pub mod auth;
pub mod bus;
pub mod chat;
pub mod config;
pub mod http;
pub mod load;
pub mod mailbox;
pub mod metrics;
pub mod notify;
pub mod protocol;
pub mod reactor;
pub mod server;
pub mod store;
