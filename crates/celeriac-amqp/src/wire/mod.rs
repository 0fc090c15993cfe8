//! A minimal AMQP 0-9-1 client on tokio, written for this crate: what the broker and the rpc
//! backend need, and no more.
//!
//! It exists because no maintained Rust client reads every field type Python's py-amqp writes
//! (py-amqp sends header integers beyond ±2^31 with the `L` tag, which amqprs cannot parse,
//! so such a message failed the whole connection on every delivery and stalled its queue),
//! and we ship only code we wrote. Two rules follow from that history:
//!
//! - the [`codec`] reads every field type RabbitMQ and py-amqp produce, and
//! - a content header whose headers table cannot be decoded never kills the connection: the
//!   table is length-prefixed, so it is skipped and the delivery arrives flagged
//!   [`Delivery::malformed`] (the broker hands it up as an invalid message, which the worker
//!   rejects without requeue).
//!
//! **Shape.** [`Connection::open`] performs the handshake (PLAIN login, tune, vhost) on a TCP
//! or TLS stream, then one reader task owns the read half and routes frames to channels: the
//! reply to the one synchronous method a channel has in flight, deliveries to consumers (by
//! consumer tag, registered before `basic.consume` is sent), publisher confirms to the
//! waiting publishes. Writers share the write half under a lock, so a publish's method, header
//! and body frames go out together. Heartbeats: the client sends one every half interval and
//! declares the connection dead after two intervals without any frame from the server.
//! A `connection.close` or `channel.close` from the server is answered and surfaces, with its
//! reply code and text, as the error of every pending and later call
//! ([`WireError::ConnectionClosed`], [`WireError::ChannelClosed`]).
//!
//! **Files.** [`codec`] encodes and decodes frames, methods and field tables; `conn` holds the
//! connection (the handshake, the reader task that routes frames, heartbeats), `channel` the
//! [`Channel`] methods, and `shared` the state the reader and the channels share.

mod channel;
pub mod codec;
mod conn;
mod shared;

use std::fmt;

pub use channel::{Channel, Delivery, QueueDeclare};
pub use codec::{CloseReason, FieldTable, FieldValue, Properties};
pub use conn::{Connection, ConnectionParams, Tls};

/// An error of the AMQP client.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum WireError {
    /// The socket failed or the server went silent (missed heartbeats); transient.
    Io(String),
    /// The server sent something this client cannot read, or a value cannot be encoded.
    Protocol(String),
    /// The server closed the connection (`connection.close`).
    ConnectionClosed(CloseReason),
    /// The server closed the channel (`channel.close`), e.g. 404 NOT_FOUND on a passive
    /// declare or 406 PRECONDITION_FAILED on a conflicting one.
    ChannelClosed(CloseReason),
    /// The TLS handshake failed (certificate not trusted, wrong host name, ...).
    Tls(String),
    /// The connection or channel was closed by this client.
    ClosedByClient,
}

impl WireError {
    /// The reply code of a server-side close, if this is one.
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            WireError::ConnectionClosed(r) | WireError::ChannelClosed(r) => Some(r.code),
            _ => None,
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "connection failed: {e}"),
            WireError::Protocol(e) => write!(f, "protocol error: {e}"),
            WireError::ConnectionClosed(r) => write!(f, "server closed the connection: {r}"),
            WireError::ChannelClosed(r) => write!(f, "server closed the channel: {r}"),
            WireError::Tls(e) => write!(f, "tls handshake failed: {e}"),
            WireError::ClosedByClient => f.write_str("closed by the client"),
        }
    }
}

impl std::error::Error for WireError {}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e.to_string())
    }
}
