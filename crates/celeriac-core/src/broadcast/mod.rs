//! Broadcast channels: Celery's pidbox (remote control) and `celeryev` (events).
//!
//! For brokers that carry them (a [`Broadcast`] handed out by
//! [`Broker::broadcast`](crate::Broker::broadcast)), the worker (which answers control
//! requests and sends events) and the app (which sends requests, collects replies and reads
//! events). Celery's tools (`celery inspect`, `celery control`, `celery events`, Flower) use
//! the same channels, so they see our workers and we see theirs.
//!
//! # A tour
//!
//! - [`Broadcast`]: what a driver implements, in transport terms only: broadcast a control
//!   request, receive those meant for a node, send and receive replies on a reply queue,
//!   publish and receive events. Each message is a [`Broadcasted`]: a routing key, JSON
//!   headers and a JSON body, or a signed one: Celery sends events as JSON whatever its task
//!   serializer, and control requests and replies in its task serializer, so signed under
//!   `auth`. A driver carries a signed body as it is and does not check it.
//! - [`control`]: the request and reply documents (§10 of the wire notes) and who a request
//!   is for.
//! - [`event`]: the event documents (§11), typed for readers.
//! - [`Clock`]: the Lamport clock every message carries (§12).
//! - [`envelope`]: kombu's JSON envelope for such messages, for transports that store whole
//!   messages as JSON (Redis, SQLite).
//! - [`Signed`]: the channels as an app or worker uses them, which signs and checks control
//!   requests and replies under serializer `auth`, as Celery's mailbox does.
//!
//! # A key design decision: the semantics live here and in the worker, not in the drivers
//!
//! A driver moves JSON documents between processes the way kombu's transport does (exchange
//! names, routing keys, bindings), and knows nothing of what a `rate_limit` request or a
//! `task-succeeded` event means. Dispatch, replies, batching and the clock are written once,
//! above the driver, so every broker behaves the same and a new one only needs the four
//! channels.

pub mod control;
pub mod envelope;
pub mod event;
pub mod rows;
mod signed;

pub use signed::Signed;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};

use crate::broker::BoxFuture;
use crate::error::Result;
use crate::security::SIGNED_CONTENT_TYPE;

/// The exchange control requests are broadcast on (fanout).
pub const CONTROL_EXCHANGE: &str = "celery.pidbox";
/// The exchange replies to control requests are sent on (direct, by reply routing key).
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";
/// The exchange events are published on (topic; routing key = event type with `-` → `.`).
pub const EVENT_EXCHANGE: &str = "celeryev";

/// One message on a broadcast channel: its routing key, headers and body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Broadcasted {
    /// The routing key: empty for control requests, the reply queue's key for replies, the
    /// event type (`task.succeeded`, `worker.heartbeat`, `task.multi` for a batch) for events.
    pub routing_key: String,
    /// The message headers (`clock`, `expires`, `ticket`, `hostname`, ...).
    pub headers: Map<String, Value>,
    /// The body: a JSON document, or, when [`signed`](Self::signed), the signed text of one
    /// as a JSON string.
    pub body: Value,
    /// Whether the body is signed (Celery's `auth` serializer, content type
    /// `application/data`): see [`Signed`].
    pub signed: bool,
}

impl Broadcasted {
    /// A message with `routing_key`, `headers` and `body`.
    pub fn new(routing_key: impl Into<String>, headers: Map<String, Value>, body: Value) -> Self {
        Broadcasted {
            routing_key: routing_key.into(),
            headers,
            body,
            signed: false,
        }
    }
}

impl Broadcasted {
    /// The body as it goes on the wire: its content type and bytes (JSON, or the signed
    /// text as it is).
    pub fn wire_body(&self) -> (&'static str, Vec<u8>) {
        match (&self.body, self.signed) {
            (Value::String(text), true) => (SIGNED_CONTENT_TYPE, text.clone().into_bytes()),
            // Writing a JSON value into a Vec cannot fail.
            _ => (
                "application/json",
                serde_json::to_vec(&self.body).unwrap_or_else(|_| b"null".to_vec()),
            ),
        }
    }

    /// Reads a body off the wire: `(body, signed)`. JSON is parsed; a signed body
    /// (`application/data`) is kept as text for [`Signed`] to check. A missing content type
    /// means JSON; others are refused, and the error says why (for the driver's log).
    pub fn read_body(
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        bytes: &[u8],
    ) -> Result<(Value, bool)> {
        if let Some(enc) = content_encoding {
            if !(enc.eq_ignore_ascii_case("utf-8") || enc.eq_ignore_ascii_case("utf8")) {
                return Err(crate::Error::protocol(format!(
                    "its content encoding is {enc} (broadcast bodies are utf-8 text)"
                )));
            }
        }
        match content_type.unwrap_or("application/json") {
            "application/json" => serde_json::from_slice(bytes)
                .map(|body| (body, false))
                .map_err(|e| crate::Error::protocol("its body is not JSON").with_source(e)),
            SIGNED_CONTENT_TYPE => String::from_utf8(bytes.to_vec())
                .map(|text| (Value::String(text), true))
                .map_err(|_| crate::Error::protocol("its signed body is not text")),
            other => Err(crate::Error::protocol(format!(
                "its content type is {other} (only application/json and signed \
                 {SIGNED_CONTENT_TYPE} are accepted)"
            ))),
        }
    }
}

/// A broker's broadcast channels. See the [module docs](self).
///
/// Delivery is at most once, as in Celery: a node that is not listening when a message goes
/// out never sees it, and nothing is acknowledged.
pub trait Broadcast: Send + Sync + fmt::Debug {
    /// Starts receiving the control requests broadcast to every node, as node `node` (AMQP:
    /// its exclusive `<node>.celery.pidbox` queue; Redis: pub/sub, with the binding that tells
    /// Celery's tools the node exists).
    fn control_inbox<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>>;

    /// Broadcasts a control request to every listening node.
    fn send_control<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>>;

    /// Opens a reply queue of this process: its routing key, and the replies sent to it.
    fn reply_inbox(&self) -> BoxFuture<'_, Result<(String, Box<dyn Inbox>)>>;

    /// Sends a reply to the reply queue bound under `message.routing_key`.
    fn send_reply<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>>;

    /// Publishes an event message (one event, or a batch under `task.multi`).
    fn send_event<'a>(&'a self, message: &'a Broadcasted) -> BoxFuture<'a, Result<()>>;

    /// Publishes an event message whose body is JSON text the sender wrote itself (a worker's
    /// batch of task events), sparing the tree a [`Broadcasted`] would need. The default
    /// parses the text and calls [`send_event`](Self::send_event); drivers that put bytes on
    /// the wire take the text as it is.
    fn send_event_json<'a>(
        &'a self,
        routing_key: &'a str,
        headers: &'a Map<String, Value>,
        body: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let body = serde_json::from_str(body)
                .map_err(|e| crate::Error::protocol("an event body is not JSON").with_source(e))?;
            self.send_event(&Broadcasted::new(routing_key, headers.clone(), body))
                .await
        })
    }

    /// Starts receiving the events whose routing key matches `binding`, a topic pattern
    /// (`#` every event, `worker.#` worker events, `task.*`).
    fn event_inbox<'a>(&'a self, binding: &'a str) -> BoxFuture<'a, Result<Box<dyn Inbox>>>;
}

/// Messages arriving on one broadcast channel.
pub trait Inbox: Send + fmt::Debug {
    /// Waits for the next message; `Ok(None)` once the channel is closed. Messages that are
    /// not valid JSON are logged and skipped by the driver. Cancel-safe.
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Broadcasted>>>;
}

/// Whether `queue` is one of kombu's own queues for remote control and events (a node's
/// `<node>.celery.pidbox`, a client's `<id>.reply.celery.pidbox`, a monitor's
/// `celeryev.<id>`), which carry no tasks and which listings of task queues leave out, as
/// Flower does.
pub fn is_internal_queue(queue: &str) -> bool {
    queue.ends_with(&format!(".{CONTROL_EXCHANGE}"))
        || queue.ends_with(&format!(".{REPLY_EXCHANGE}"))
        || queue.starts_with(&format!("{EVENT_EXCHANGE}."))
}

/// Whether topic pattern `pattern` (AMQP's: words separated by `.`, `*` one word, `#` any
/// number of words) matches `routing_key`.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((w, rest)) => k
                .split_first()
                .is_some_and(|(kw, krest)| (*w == "*" || w == kw) && go(rest, krest)),
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = routing_key.split('.').collect();
    go(&p, &k)
}

/// A Lamport clock, one per process (Celery's `app.clock`): every pidbox message, reply and
/// event carries its value, and receivers move theirs past it, which orders messages across
/// nodes by cause.
#[derive(Debug, Default)]
pub struct Clock(AtomicU64);

impl Clock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ticks for a message about to be sent; returns the value to put in it.
    pub fn forward(&self) -> u64 {
        self.0.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Moves past a received value: `max(own, other) + 1`; returns the new value.
    pub fn adjust(&self, other: u64) -> u64 {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let next = cur.max(other) + 1;
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return next,
                Err(now) => cur = now,
            }
        }
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kombus_own_queues_are_told_from_task_queues() {
        for q in [
            "w1@host.celery.pidbox",
            "0b7e.reply.celery.pidbox",
            "celeryev.6a1f",
        ] {
            assert!(is_internal_queue(q), "{q}");
        }
        for q in ["celery", "pidbox", "celeryev", "emails.dead", "reply"] {
            assert!(!is_internal_queue(q), "{q}");
        }
    }

    use super::*;

    #[test]
    fn topics_match_as_amqp_does() {
        assert!(topic_matches("#", "task.succeeded"));
        assert!(topic_matches("#", "task.multi"));
        assert!(topic_matches("worker.#", "worker.heartbeat"));
        assert!(!topic_matches("worker.#", "task.started"));
        assert!(topic_matches("task.*", "task.multi"));
        assert!(!topic_matches("task.*", "task"));
        assert!(topic_matches("task.#", "task"));
        assert!(topic_matches("*.heartbeat", "worker.heartbeat"));
        assert!(!topic_matches("task.succeeded", "task.failed"));
    }

    #[test]
    fn the_clock_moves_forward_and_past_what_it_hears() {
        let c = Clock::new();
        assert_eq!(c.forward(), 1);
        assert_eq!(c.adjust(10), 11);
        assert_eq!(c.adjust(3), 12);
        assert_eq!(c.forward(), 13);
        assert_eq!(c.value(), 13);
    }
}
