//! RabbitMQ (AMQP 0-9-1) broker and `rpc://` result backend for celeriac, sharing one RabbitMQ
//! with Python Celery.
//!
//! This crate is for applications that run their tasks through RabbitMQ, the broker Celery
//! recommends for production, alone or next to Python Celery workers and clients.
//! [`AmqpBroker`] declares exchanges, queues and bindings exactly as Celery does and publishes
//! task messages with Celery's properties and headers; [`RpcBackend`] is Celery's `rpc://`
//! result backend. Users normally reach it through the `celeriac` facade (feature `amqp`) and
//! a URL; call [`register`] to add the schemes to a [`celeriac_core::Drivers`] table, or open
//! the types directly. Pairing the AMQP broker with another result backend (`redis://`,
//! `sqlite://`) needs nothing special: the app opens each from its own URL.
//!
//! # URLs
//!
//! - `amqp://[user[:password]@]host[:port][/vhost]`, and kombu's alias `pyamqp://`. The vhost
//!   is the path after the first `/`, percent-decoded (`amqp://h//` and `amqp://h/%2F` are
//!   vhost `/`, as is no path). Defaults: `guest:guest`, port 5672.
//! - Query parameters: `heartbeat=<s>` (default 120, Celery's), `max_priority=<n>` (declares
//!   task queues with `x-max-priority`, like `task_queue_max_priority`),
//!   `queue_type=classic|quorum` (like `task_default_queue_type`), `connection_name=<text>`
//!   (prefix of the names `rabbitmqctl list_connections` shows).
//! - `rpc://` (backend) connects like `amqp://` with the same defaults.
//! - `amqps://` (TLS, port 5671 by default; feature `tls`, which the facade's `amqp` enables):
//!   OpenSSL through native-tls, verifying the server's certificate and host name against the
//!   system's CAs. kombu's query names: `ssl_ca_certs=<pem file>` (aliases `ca_certs`,
//!   `cacert`), `ssl_cert_reqs=CERT_REQUIRED|CERT_OPTIONAL|CERT_NONE` (`CERT_NONE` skips
//!   verification, with a warning), `ssl_check_hostname=false`, `ssl_server_hostname=<name>`.
//!   Client certificates (`ssl_certfile`/`ssl_keyfile`) are refused as
//!   [`ErrorKind::Unsupported`](celeriac_core::ErrorKind), as is `amqps://` in a build without
//!   `tls`. An untrusted certificate fails at start-up with
//!   [`ErrorKind::Config`](celeriac_core::ErrorKind), never retried.
//!
//! - Several URLs separated by `;` (`amqp://u:p@h1//;amqps://u:p@h2//`), as kombu reads
//!   `broker_url`: the servers of one cluster, for failover. Each URL has its own host,
//!   credentials, vhost and `ssl_*` options; `heartbeat`, `max_priority`, `queue_type` and
//!   `connection_name` hold for the whole list and may be given on any URL (two different
//!   values are a config error). Empty parts are ignored; a `;` in a password must be written
//!   `%3B`. See "Failover between the URLs of a list" below.
//!
//! A refused login or an unknown vhost fails at start-up with
//! [`ErrorKind::Config`](celeriac_core::ErrorKind), never retried; an unreachable server is a
//! transient [`ErrorKind::Broker`](celeriac_core::ErrorKind) error. Passwords never reach logs
//! or errors ([`celeriac_core::url::redact`]).
//!
//! # Entities (as Celery declares them, celery-wire.md §8.1)
//!
//! | entity | declaration |
//! |---|---|
//! | exchange `<queue>` | `direct`, durable, not auto-delete |
//! | queue `<queue>` | durable, not exclusive, not auto-delete; arguments none, or `{"x-max-priority": n}`, or `{"x-queue-type": "quorum"}` |
//! | binding | queue `<queue>` → exchange `<queue>`, key `<queue>` |
//! | delay queue `celeriac.delay.<queue>.<ms>` | durable classic; `x-message-ttl` = ms, `x-dead-letter-exchange` = `""`, `x-dead-letter-routing-key` = `<queue>`, `x-expires` = ms + 60 s |
//! | rpc reply queue `<oid>` | not durable, auto-delete, `{"x-expires": result_expires ms}` |
//! | exchange `celery.pidbox` (remote control) | `fanout`, not durable, not auto-delete |
//! | node queue `<node>.celery.pidbox` | not durable, exclusive, auto-delete, `{"x-expires": 10000, "x-message-ttl": 300000}`; key `""` |
//! | exchange `reply.celery.pidbox` | `direct`, not durable, not auto-delete |
//! | control reply queue `<key>.reply.celery.pidbox` | as the node queue; key `<key>` |
//! | exchange `celeryev` (events) | `topic`, durable, not auto-delete |
//! | event queue `celeryev.<uuid>` | not durable, exclusive, auto-delete, `{"x-message-ttl": 5000, "x-expires": 60000}`; key = the binding (`#`) |
//!
//! Declaring an entity with other arguments than an existing one fails with
//! PRECONDITION_FAILED, so the `max_priority` and `queue_type` of a URL must match the Python
//! side's settings. Integers in arguments and headers are sent as signed 32-bit (`I`), as
//! py-amqp does.
//!
//! # Design
//!
//! **Client: our own ([`wire`]).** The crate first ran on amqprs, which cannot parse the `L`
//! field tag py-amqp writes for header integers beyond ±2^31: such a message failed the
//! connection's frame parser on every delivery and stalled its queue. We cannot ship a
//! patched copy of another project, and lapin 4 needs Rust 1.88 and brings a runtime
//! abstraction and a TLS stack by default, so the crate carries a minimal AMQP 0-9-1 client on
//! tokio alone: the methods Celery's topology and our broker use, every field type RabbitMQ
//! and py-amqp produce (`l` and `L` both signed 64-bit, as RabbitMQ reads them), publisher
//! confirms, heartbeats both ways, server-sent `basic.cancel` and `channel.close`, and TLS
//! behind the `tls` feature. A content header whose headers table cannot be decoded is
//! skipped (it is length-prefixed) and the delivery arrives as an invalid message, which the
//! worker rejects without requeue: one bad message never stalls a queue. (RabbitMQ 3.13+
//! itself refuses to route such a message, closing the publisher's connection with 541.)
//!
//! **Publishing.** Tasks go to the default exchange `""` with the queue name as routing key,
//! `delivery_mode` 2, `correlation_id` = task id, `reply_to`, `priority`, `expiration` (ms until
//! the `expires` header, as Celery sets it), content type and
//! encoding, the protocol 2 headers as `application_headers`. A publish waits for the
//! broker's publisher confirm, so it returns once RabbitMQ holds the message;
//! `publish_batch` sends the whole batch first and then waits for all its confirms. Confirms
//! are pipelined: up to 1,024 messages of the publisher's channel wait for theirs at once,
//! so concurrent callers share round trips, and the connection's writer task writes the
//! frames many callers queued in one system call. With `publish_confirms=pipelined`
//! ([`PublishConfirms`]) a single publish returns before its confirm; the driver keeps the
//! message until it is confirmed (publishing it again after a lost connection) and reports a
//! refusal on the next publish and on [`AmqpBroker::flush`]. Priorities map
//! directly (AMQP is "higher first", like celeriac); they only matter on queues declared with
//! `max_priority`.
//!
//! **Durable delayed delivery: per-delay queues with TTL and dead-lettering.** A message with a
//! not-before time is published to `celeriac.delay.<queue>.<ms>`, whose `x-message-ttl`
//! dead-letters it into `<queue>` when due; nothing waits in worker memory. Delays are rounded
//! *down* to two significant digits (so a few dozen queues per decade serve every delay, and
//! unused ones expire), and the exact due time rides in the header `celeriac-not-before`: a
//! message that surfaces early is parked again for the remainder, so it is never delivered
//! early and at most a couple of hops late. Celery 5.5's 28-level `celery_delayed_*` topic
//! exchanges were not chosen: they require a topic task exchange, work in whole seconds and
//! exist for quorum queues only, while this scheme serves classic and quorum targets alike
//! with millisecond precision. (Delay queues are classic durable queues even for quorum
//! targets.) Python workers do not know these queues; tasks for them carry an `eta` header
//! instead (the facade's job).
//!
//! **Acknowledgement, prefetch and leases.** Consumers use manual acks, held back for up to
//! 2 ms (or a quarter of the prefetch) and sent together: one `basic.ack` with `multiple` set
//! for the deliveries below the lowest one still unsettled, single acks above it (so a long
//! task never holds back the acks of later ones). A rejected or requeued delivery leaves the
//! unsettled set in the same step that queues its `basic.reject`, so no multiple ack covers it
//! ([`wire::Channel::ack_batched`]). An ack lost with the process or the connection leaves the
//! delivery to be redelivered, as any unacked one. `basic.qos` gets the consumer's prefetch,
//! which held acks count against (channel-wide "global" QoS when one consumer reads several
//! classic queues, per consumer otherwise; quorum queues always per consumer, as Celery does). `reject(Drop|Now)` is `basic.reject`; `reject(After(d))`
//! publishes a copy through the delay queues (confirmed) and then acks. RabbitMQ has no
//! delivery lease (its `consumer_timeout`, 30 min by default, closes the channel instead), so
//! a lease given in [`ConsumeOptions`](celeriac_core::ConsumeOptions) is enforced by the
//! consumer: when it runs out before the delivery is settled the delivery is requeued
//! (`basic.reject` with requeue), and [`extend_lease`](celeriac_core::Delivery::extend_lease)
//! moves it. A worker that dies or loses its connection needs no lease: RabbitMQ requeues its
//! unacked deliveries. Keep task run times below the server's `consumer_timeout`.
//!
//! **Connections and recovery.** Publishing and admin use one connection; each consumer has
//! its own. When a connection or channel is lost, or the server cancels a consumer (queue
//! deleted), the consumer reconnects with backoff (100 ms doubling to 5 s, `warn` logs with
//! the URL redacted), re-declares its queues and resumes; publishes reconnect on demand.
//! Deliveries unacked on a lost channel come back through RabbitMQ; acking one of them on the
//! dead channel fails harmlessly.
//!
//! **Failover between the URLs of a list.** Which server a connection goes to is kept once
//! per handle and shared by all its connections (publisher, consumers, broadcast sends and
//! inboxes), not once per connection as kombu keeps it: the first connection to find its
//! server gone (a connection closed by the server or the network, never by us) moves the
//! handle to the next server, so the others, and connections opened later, go straight there
//! instead of trying the dead server first. Connecting tries the current server and then the
//! others once each, without waiting between them; the backoff above comes between such
//! rounds, as kombu sleeps only after a full cycle. The order is the config's
//! `broker_failover_strategy`: `round-robin` (default) goes through the list as written,
//! starting with the first URL and moving on from the one that failed; `shuffle` draws a
//! random order, and a new one after each round, so every server is tried once per round
//! (kombu's shuffle draws each next server at random, repeats included, and starts with the
//! first URL). A refused login or vhost (a config error) ends the round at once: at start-up
//! it is returned, later the reconnect loop backs off and goes on with the next server. A
//! server that drops packets instead of refusing costs the 30 s handshake timeout before the
//! next is tried.
//!
//! **Counts.** `stats` reads the ready count by a passive `queue.declare`. `delayed` sums the
//! delay queues *this process* published to, and `unacked` counts deliveries handed out by
//! *this process*: RabbitMQ exposes neither without the management plugin, so both are exact
//! for one process and lower bounds in a cluster. `queues()` lists the queues this handle
//! declared.
//!
//! **The rpc backend** follows Celery (celery-wire.md §8.5): see [`RpcBackend`]. A worker
//! learns where to send a result from the `reply_to` of the task message it received, which
//! it copies into the record it stores ([`TaskMeta::reply_to`](celeriac_core::TaskMeta::reply_to)).
//! The app stamps its own reply queue on the messages it sends
//! ([`ReplyQueue`](celeriac_core::backend::ReplyQueue)); a message a task sends without one
//! (a chain step, a callback) gets the `reply_to` of that task's message from the worker, as
//! it gets its `parent_id` and `root_id`, so the result reaches the client that started the
//! work, as in Celery, whose client freezes every step with its reply queue. Nothing is
//! remembered per process: the broker never stamps a reply queue of its own.
//!
//! **Remote control and events** ([`Broker::broadcast`](celeriac_core::Broker::broadcast))
//! use the entities above, declared with Celery's default settings, and messages as kombu
//! sends them: JSON, `delivery_mode` 1, the headers as a field table. Sends share one
//! connection of their own (confirmed, each exchange declared before its first publish);
//! every inbox has its own connection, consumes no-ack, reconnects and re-declares when it is
//! lost, and skips (with a `warn` log) a message that is not JSON. A node's control queue is
//! exclusive: a second node with the same name gets a config error (405 RESOURCE_LOCKED).
//!
//! # What differs from Celery/kombu
//!
//! - No TLS client certificates.
//! - The broadcast settings Celery lets one change (`control_exchange`, `control_queue_ttl`,
//!   `control_queue_expires`, `control_queue_durable`, `control_queue_exclusive`,
//!   `event_exchange`, `event_queue_prefix`, `event_queue_ttl`, `event_queue_expires`, ...)
//!   are fixed at their defaults; Python nodes must keep the defaults too.
//! - `redeliveries` is 1 for a message RabbitMQ flags as redelivered (it keeps a flag, not a
//!   count), plus the `reject(After)` count we carry in a header.
//! - Messages are not rejected into a dead-letter exchange by us; a queue given one by policy
//!   receives what the worker rejects without requeue.

mod backend;
mod broadcast;
mod broker;
mod conn;
mod fields;
mod options;
pub mod wire;

use std::sync::Arc;

use celeriac_core::{Drivers, DynBackend, DynBroker};

pub use backend::RpcBackend;
pub use broker::AmqpBroker;
pub use options::{AmqpOptions, PublishConfirms, QueueType};

/// The broker URL schemes this crate registers.
pub const BROKER_SCHEMES: [&str; 3] = ["amqp", "amqps", "pyamqp"];

/// Adds the `amqp`, `amqps` and `pyamqp` broker schemes and the `rpc` result backend scheme to
/// `drivers`.
///
/// ```
/// let mut drivers = celeriac_core::Drivers::new();
/// celeriac_amqp::register(&mut drivers);
/// assert!(format!("{drivers:?}").contains("amqp"));
/// ```
pub fn register(drivers: &mut Drivers) {
    for scheme in BROKER_SCHEMES {
        drivers.add_broker(scheme, |url, config| {
            Box::pin(
                async move { Ok(Arc::new(AmqpBroker::connect(&url, &config).await?) as DynBroker) },
            )
        });
    }
    drivers.add_backend("rpc", |url, config| {
        Box::pin(
            async move { Ok(Arc::new(RpcBackend::connect(&url, &config).await?) as DynBackend) },
        )
    });
}
