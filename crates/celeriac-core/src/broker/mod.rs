//! The broker contract: queues that hold task messages until a worker acknowledges them.
//!
//! A driver implements [`Broker`] (publishing, queue admin) and hands out a [`Consumer`] that
//! yields [`Delivery`] values. Every method returns a boxed future so that the trait is object
//! safe: the app picks a driver from a URL at run time and holds it as [`DynBroker`]. One
//! allocation per call is noise next to the I/O behind it, and it spares users a second,
//! generic copy of every API.
//!
//! # A key design decision: leases, not client-side acknowledgement bookkeeping
//!
//! A delivery is *leased* to its consumer for a visibility timeout. If it is not acked in time
//! (the worker died, hung, or lost its connection) the broker hands it out again. That makes
//! delivery at-least-once on every driver, lets a long acks-late task extend its lease, and
//! needs no cooperation from a dying process. Tasks should therefore be idempotent; a task id
//! that already has a ready result is not run again by the worker.
//!
//! Delayed messages (countdown, eta) are stored by the broker with a not-before time and are
//! never delivered early: a worker holds no delayed message in memory, so a crash loses
//! nothing and a long eta never causes duplicates.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::protocol::Message;
use crate::state::TaskState;

/// A boxed, sendable future: what object-safe driver traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A broker chosen at run time.
pub type DynBroker = Arc<dyn Broker>;

/// What a broker supports natively. Callers check; nothing panics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Stores delayed messages and releases them when due.
    pub delay: bool,
    /// Delivers higher priorities first within a queue.
    pub priority: bool,
    /// A delivery's lease can be extended while its task runs.
    pub lease_extension: bool,
    /// Broadcast to every consumer (events, remote control).
    pub fanout: bool,
    /// Several processes may publish and consume the same queues.
    pub multi_process: bool,
    /// Python Celery workers may consume its queues (Redis, RabbitMQ). They know no
    /// broker-side delayed store: a delayed task for them must travel with its `eta` header
    /// and be published at once, as Celery's client does.
    pub celery_peers: bool,
}

impl Capabilities {
    /// Every capability.
    pub fn all() -> Self {
        Capabilities {
            delay: true,
            priority: true,
            lease_extension: true,
            fanout: true,
            multi_process: true,
            celery_peers: true,
        }
    }

    /// No capability.
    pub fn none() -> Self {
        Capabilities::default()
    }
}

/// How to publish one message.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PublishOptions {
    /// 0 (lowest) to 9 (highest); `None` takes the message's own priority property (and when
    /// that is `None` too, the message has none: see [`Properties::priority`]).
    ///
    /// [`Properties::priority`]: crate::Properties::priority
    pub priority: Option<u8>,
    /// Do not deliver before this time.
    pub not_before: Option<DateTime<Utc>>,
}

impl PublishOptions {
    /// Sets the not-before time.
    #[must_use]
    pub fn not_before(mut self, t: Option<DateTime<Utc>>) -> Self {
        self.not_before = t;
        self
    }

    /// Sets the priority.
    #[must_use]
    pub fn priority(mut self, p: Option<u8>) -> Self {
        self.priority = p;
        self
    }
}

/// How to consume.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumeOptions {
    /// At most this many deliveries are held unacknowledged by the consumer at once.
    pub prefetch: usize,
    /// Lease (visibility timeout) of each delivery; `None` is the broker's default.
    pub lease: Option<Duration>,
    /// Where the worker's result backend keeps task states, for a broker that can read a
    /// task's state in the same call that fetches its message ([`Delivery::stored`]).
    pub result_probe: Option<ResultProbe>,
}

impl ConsumeOptions {
    /// Consume with a prefetch limit and the broker's default lease.
    pub fn new(prefetch: usize) -> Self {
        ConsumeOptions {
            prefetch: prefetch.max(1),
            lease: None,
            result_probe: None,
        }
    }

    /// Sets the lease.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Sets where task states are kept (a result backend's
    /// [`BackendCapabilities::probe`](crate::backend::BackendCapabilities::probe)).
    #[must_use]
    pub fn result_probe(mut self, probe: Option<ResultProbe>) -> Self {
        self.result_probe = probe;
        self
    }
}

/// Where a result backend keeps task states, in terms a broker on the same server can use.
///
/// A broker that finds its own server in `store` reads each fetched task's state with the
/// fetch itself and hands it out as [`Delivery::stored`], saving the worker the read it makes
/// before every run. Brokers that do not recognise `store` ignore it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResultProbe {
    /// The server and database, in a driver-defined form without secrets (for Redis
    /// `redis://user@host:port/db`); brokers compare it with their own.
    pub store: String,
    /// The key of a task's state is this followed by the task id.
    pub key_prefix: String,
}

impl ResultProbe {
    /// A probe of `store`, with keys `key_prefix` + task id.
    pub fn new(store: impl Into<String>, key_prefix: impl Into<String>) -> Self {
        ResultProbe {
            store: store.into(),
            key_prefix: key_prefix.into(),
        }
    }
}

/// A task's state as the broker read it together with the message (see
/// [`ConsumeOptions::result_probe`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredState {
    /// The task id the read was for, as the broker found it in the message; a worker uses
    /// the read only when this is the id of the task it decoded.
    pub task_id: String,
    /// The stored state at that moment; `None` when nothing was stored.
    pub state: Option<TaskState>,
    /// When it was read.
    pub read_at: Instant,
}

/// What to do with a delivery that is not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Drop it for good.
    Drop,
    /// Put it back at once.
    Now,
    /// Put it back, deliverable after this delay.
    After(Duration),
}

/// Message counts of a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Deliverable now.
    pub ready: u64,
    /// Waiting for their not-before time.
    pub delayed: u64,
    /// Delivered and not yet acknowledged.
    pub unacked: u64,
}

impl QueueStats {
    /// Counts of a queue.
    pub fn new(ready: u64, delayed: u64, unacked: u64) -> Self {
        QueueStats {
            ready,
            delayed,
            unacked,
        }
    }

    /// All messages the queue holds.
    pub fn total(&self) -> u64 {
        self.ready + self.delayed + self.unacked
    }
}

/// A message broker. Cheap to share (`Arc<dyn Broker>`), `Send + Sync`.
pub trait Broker: Send + Sync + fmt::Debug + 'static {
    /// The driver's name, e.g. `sqlite`.
    fn driver(&self) -> &'static str;

    /// What this broker supports natively.
    fn capabilities(&self) -> Capabilities;

    /// Creates `queue` if it does not exist.
    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Stores `message` in `queue`. Returns once the broker holds it durably (as far as the
    /// driver is durable).
    fn publish<'a>(
        &'a self,
        queue: &'a str,
        message: &'a Message,
        options: PublishOptions,
    ) -> BoxFuture<'a, Result<()>>;

    /// Stores many messages in `queue`, in one round trip where the driver can.
    fn publish_batch<'a>(
        &'a self,
        queue: &'a str,
        messages: &'a [(Message, PublishOptions)],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            for (m, o) in messages {
                self.publish(queue, m, o.clone()).await?;
            }
            Ok(())
        })
    }

    /// Starts consuming `queues` (earlier queues are not preferred over later ones).
    fn consume<'a>(
        &'a self,
        queues: &'a [String],
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>>>;

    /// Deletes every ready and delayed message of `queue`; returns how many.
    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>>;

    /// Counts the messages of `queue`.
    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>>;

    /// Names of the queues the broker knows.
    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>>;

    /// Closes the broker; consumers end and later calls fail with [`crate::ErrorKind::Closed`].
    fn close(&self) -> BoxFuture<'_, Result<()>>;

    /// The broker's broadcast channels (remote control and events), if it carries them.
    /// The default: none.
    fn broadcast(&self) -> Option<&dyn crate::broadcast::Broadcast> {
        None
    }
}

/// A stream of deliveries from one or more queues.
pub trait Consumer: Send + fmt::Debug {
    /// Waits for the next delivery; `Ok(None)` once the broker is closed.
    ///
    /// Cancel-safe: dropping the future loses no message.
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>>;
}

/// The driver side of one delivery: how to settle it.
pub trait Acker: Send + Sync + fmt::Debug {
    /// Removes the message for good.
    fn ack(&self) -> BoxFuture<'_, Result<()>>;
    /// Drops or requeues the message.
    fn reject(&self, requeue: Requeue) -> BoxFuture<'_, Result<()>>;
    /// Keeps the message leased to this consumer for `by` from now.
    fn extend_lease(&self, by: Duration) -> BoxFuture<'_, Result<()>>;
}

/// One message handed to a consumer, leased until acked, rejected or the lease runs out.
#[derive(Debug)]
pub struct Delivery {
    /// The message, or why its bytes are not a valid task message.
    pub message: Result<Message, Error>,
    /// The queue it came from.
    pub queue: String,
    /// How many times it was delivered before this one.
    pub redeliveries: u32,
    /// The task's result state read with the message, when the broker could.
    pub stored: Option<StoredState>,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery settled through `acker`.
    pub fn new(
        message: Result<Message, Error>,
        queue: impl Into<String>,
        redeliveries: u32,
        acker: Box<dyn Acker>,
    ) -> Self {
        Delivery {
            message,
            queue: queue.into(),
            redeliveries,
            stored: None,
            acker,
        }
    }

    /// Adds the task state read with the message.
    #[must_use]
    pub fn with_stored(mut self, stored: Option<StoredState>) -> Self {
        self.stored = stored;
        self
    }

    /// Whether this message was delivered before.
    pub fn redelivered(&self) -> bool {
        self.redeliveries > 0
    }

    /// Acknowledges: the message is gone for good.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Rejects: drops or requeues the message.
    pub async fn reject(self, requeue: Requeue) -> Result<()> {
        self.acker.reject(requeue).await
    }

    /// Extends the lease by `by` from now (see [`Capabilities::lease_extension`]).
    pub async fn extend_lease(&self, by: Duration) -> Result<()> {
        self.acker.extend_lease(by).await
    }

    /// Splits the delivery into its message result and an owned settle handle.
    pub fn into_parts(self) -> (Result<Message, Error>, DeliveryHandle) {
        (
            self.message,
            DeliveryHandle {
                queue: self.queue,
                redeliveries: self.redeliveries,
                stored: self.stored,
                acker: self.acker,
            },
        )
    }
}

/// How to settle a delivery whose message has been taken out (see [`Delivery::into_parts`]).
#[derive(Debug)]
pub struct DeliveryHandle {
    /// The queue it came from.
    pub queue: String,
    /// How many times it was delivered before.
    pub redeliveries: u32,
    /// The task's result state read with the message, when the broker could.
    pub stored: Option<StoredState>,
    acker: Box<dyn Acker>,
}

impl DeliveryHandle {
    /// Acknowledges.
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack().await
    }

    /// Rejects.
    pub async fn reject(&self, requeue: Requeue) -> Result<()> {
        self.acker.reject(requeue).await
    }

    /// Extends the lease by `by` from now.
    pub async fn extend_lease(&self, by: Duration) -> Result<()> {
        self.acker.extend_lease(by).await
    }
}
