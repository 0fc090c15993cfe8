//! Redis broker, result backend and beat store for celeriac, sharing one Redis with Python
//! Celery.
//!
//! This crate is for applications that run their tasks through Redis, alone or next to Python
//! Celery workers and clients: [`RedisBroker`] keeps queues exactly as kombu's Redis transport
//! does, and [`RedisBackend`] keeps results exactly as Celery's Redis result backend does, so
//! a Python client can send a task that a celeriac worker runs and read its result, and the
//! other way round. [`RedisBeatStore`] is the [`celeriac_core::BeatStore`] of periodic tasks
//! (celeriac-beat): the lease with its fencing token and the entries' state under
//! `celeriac.beat.*` keys, next to the broker's. Users normally reach it through the `celeriac`
//! facade (feature `redis`) and a URL; call [`register`] to add the schemes to a
//! [`celeriac_core::Drivers`] table, or open the types directly.
//!
//! # URLs
//!
//! - `redis://[[user]:password@]host[:port][/db]` (db 0 by default);
//! - `unix:///path/to/redis.sock?db=N`, kombu's `redis+socket:///path?virtual_host=N`;
//! - `rediss://…` (TLS, feature `tls`, which the facade's `redis` feature enables), with
//!   kombu's and Celery's parameters `ssl_cert_reqs=required|optional|none` (also
//!   `CERT_REQUIRED`, `CERT_OPTIONAL`, `CERT_NONE`; `required` by default), `ssl_ca_certs=<PEM
//!   file>` and `ssl_certfile`/`ssl_keyfile` (a client certificate). Without the feature it is
//!   refused with a clear error.
//! - kombu's Redis Sentinel list `sentinel://[:password@]host[:26379][/db];sentinel://host2…`
//!   with the master's name in [`RedisOptions::master_name`] (Celery's transport option
//!   `master_name`, read from `broker_transport_options` and
//!   `result_backend_transport_options` by [`RedisOptions::from_config`] and the drivers) and
//!   the Sentinels' own credentials in [`RedisOptions::sentinel_credentials`] (kombu's
//!   `sentinel_kwargs`). The first URL's credentials and database are the master's. Every new
//!   connection asks the Sentinels in order for the master (skipping those that do not
//!   answer) and checks its `ROLE`, so the reconnect loops below follow a failover; a watcher
//!   of the Sentinels' `+switch-master` announcements makes every long-lived connection move
//!   at once when the old master stays up. TLS through Sentinel is refused (`Unsupported`).
//!
//! Query parameter `global_keyprefix=<text>` (percent-encoded) sets kombu's and Celery's
//! `global_keyprefix`; other parameters go to the `redis` crate (e.g. `protocol=resp3`).
//! `visibility_timeout` and `result_expires` come from [`celeriac_core::Config`] (see
//! [`RedisOptions`]). Passwords never reach logs or error messages
//! ([`celeriac_core::url::redact`]).
//!
//! # Key layout (broker)
//!
//! Every key below starts with `global_keyprefix`, prepended verbatim, as kombu does.
//!
//! | key | type | content |
//! |---|---|---|
//! | `<queue>`, `<queue>\x06\x163`, `\x06\x166`, `\x06\x169` | list | kombu JSON envelopes; `LPUSH` in, `RPOP` + record (one Lua script) out |
//! | `_kombu.binding.<queue>` (+ `_kombu.binding_permanent.<queue>`) | set | `<queue>\x06\x16\x06\x16<queue>`, written by `declare` |
//! | `unacked` | hash | delivery tag → `[envelope, exchange, routing_key]` |
//! | `unacked_index` | zset | delivery tag → lease score (Unix seconds) |
//! | `unacked_mutex` | string | the sweep lock, `SET NX PX 300000` |
//! | `celeriac.delayed.<queue>` | zset | envelope → due time (Unix ms); ours, kombu has none |
//! | `celeriac.stream.<queue>` (+ `\x06\x163`, `\x06\x166`, `\x06\x169`) | stream | native layout only (`native_queues`): see below |
//! | `celeriac.redelivered.<tag>` | string | redelivery count of a delivery; ours, with a TTL |
//! | `celeriac.wake.<db>.<queue>` | channel | announces new messages to idle consumers; ours |
//! | `/<db>.celery.pidbox` | channel | control requests (kombu's fanout exchange `celery.pidbox`) |
//! | `/<db>.celeryev/<routing key>` | channel | events (`task.multi`, `worker.heartbeat`, ...) |
//! | `_kombu.binding.celery.pidbox` | set | `\x06\x16\x06\x16<node>.celery.pidbox` per listening node |
//! | `_kombu.binding.reply.celery.pidbox` | set | `<key>\x06\x16\x06\x16<key>.reply.celery.pidbox` per reply queue |
//! | `<key>.reply.celery.pidbox` | list | control replies, `LPUSH` in, `BRPOP` out |
//! | `_kombu.binding.celeryev` | set | `<binding>\x06\x16\x06\x16celeryev.<id>` per event listener |
//! | `_kombu.binding_deadlines` | zset | exchange → when its binding table may be swept (kombu 5.7) |
//!
//! # Design
//!
//! **kombu's envelope and lists.** A message is kombu's JSON envelope (body base64, a fresh
//! UUID `delivery_tag`, `delivery_info` = exchange `""` and the queue as routing key), pushed
//! with `LPUSH` to one of four lists chosen by its `priority` property with kombu's
//! `priority_steps` `[0, 3, 6, 9]`. A consumer takes from all its lists in kombu's order
//! (priority-major, queues round robin), so Python and Rust consumers can share a queue.
//! It pops messages (up to its free prefetch) and records them in `unacked` in one Lua
//! script, never in two steps as kombu's `BRPOP` does, so a consumer killed at any instant
//! loses nothing. A script cannot block, so publishers announce new messages on our channel
//! `celeriac.wake.<db>.<queue>` and an idle consumer waits on a subscription to it. Messages
//! that Python clients push unannounced wake it through the server's client-side key tracking
//! (Redis 6.0+: its fetch connection speaks RESP3 and is told when a list it found empty is
//! written), or, where the server has no tracking, by a poll once a second. Acks are settled in
//! batches: every ack waiting while one script call runs goes into the next. Result stores
//! are batched the same way on the backend side.
//!
//! **Priorities.** On Redis kombu serves *lower* values first; celeriac's priorities, like
//! AMQP's, serve *higher* ones first. A celeriac priority becomes the kombu value of its
//! bucket: 9 → 0, 7-8 → 3, 4-6 → 6, 0-3 → 9 (so 9 is alone on top and 0 at the bottom), and
//! the exact value rides along in the extra property `celeriac_priority`. A message sent
//! without a priority (`Properties::priority` `None`, the default) is written as Python writes
//! its own: kombu's default `"priority": 0`, in the bare list, with nothing of ours; so the
//! default tasks of Python and celeriac clients are served together, first and in order, and
//! an explicit priority below 9 puts a task behind them (as any priority above 0 does in
//! Python). A message from Python, without our property, reads as 9, 8, 6 or 0 by bucket,
//! except kombu's 0 (Python's default, and what it writes when given none), which reads as no
//! priority. Ten levels in four lists means FIFO, not priority, inside a bucket.
//!
//! **Unacked tracking exactly as kombu's virtual transport.** A delivery is recorded in the
//! `unacked` hash and the `unacked_index` sorted set in one `MULTI`, as kombu's Redis `QoS`
//! does, and any consumer sweeps the index: entries older than `now - visibility_timeout` go
//! back to their list (`RPUSH`, flagged `redelivered`) under `unacked_mutex`. Because the
//! format and the rule are kombu's, a Python worker restores what a dead celeriac worker held
//! and the other way round. The lease of a delivery is encoded in its index score (`now +
//! lease - visibility_timeout`, rounded up to a whole second for leases of 10 s or more, which
//! the server then keeps as an integer), so `extend_lease` only moves the score; the score this
//! consumer wrote is its lease token, and ack, reject and extend run as Lua scripts that do
//! nothing when the score changed (the message was restored and handed to someone else).
//! Every consumer of one Redis must use the same `visibility_timeout`.
//!
//! **Durable delayed delivery.** Celery's ETA tasks wait unacked in worker memory, which is
//! lost on a crash and duplicated after the visibility timeout. celeriac stores a delayed
//! message in the sorted set `celeriac.delayed.<queue>` (score: due time) and consumers run an
//! atomic Lua script that moves due messages into the right list. Nothing delayed lives in a
//! worker. Python workers never look there, so a task for Python workers must be sent with an
//! `eta` header instead (the facade's job).
//!
//! **A native layout, opted into per queue.** Queues matching the transport option (or URL
//! parameter) `native_queues` are kept in Redis Streams with one consumer group instead: an
//! `XADD` in, a plain `XREADGROUP` out (which records the delivery in the group's pending
//! list in the same step), a pipelined `XACK` + `XDEL` to settle, leases swept with
//! `XPENDING … IDLE` and `XCLAIM`; the same guarantees for about a third of the server's time
//! per message, invisible to Python. See [`RedisOptions::native_queues`] and docs/redis.md.
//!
//! **Result waiting by pub/sub.** [`ResultBackend::wait`] reads the key and returns a ready
//! result at once; otherwise it subscribes to the key's channel (Celery publishes every stored
//! meta on a channel named like its key) and then reads the key again, so a result stored in
//! between is not missed; it never polls. [`JustSentWait::wait_just_sent`], for a task sent a
//! moment ago, skips the first read. After that a notice's own document ends the wait when it
//! is ready; the key is read again only when a notice carries none. One pub/sub connection per
//! backend serves all waiters, and its task sends the (un)subscriptions queued meanwhile as
//! one command.
//!
//! [`ResultBackend::wait`]: celeriac_core::ResultBackend::wait
//! [`JustSentWait::wait_just_sent`]: celeriac_core::backend::JustSentWait::wait_just_sent
//!
//! **Broadcast channels.** Remote control and events (Celery's pidbox and `celeryev`, see
//! [`celeriac_core::broadcast`]) go exactly as kombu carries them: requests and events are
//! `PUBLISH`ed on the channels above and received with `PSUBSCRIBE`, at most once (a node not
//! subscribed at the time misses the message, as with Python); replies are pushed onto the
//! reply queue's list found through the binding table. Each inbox has a connection of its
//! own (a subscription, or a `BRPOP` loop for replies) and keeps its binding refreshed as
//! kombu 5.7 does; malformed messages are logged and skipped.
//!
//! **Reconnects.** Commands share one multiplexed connection; when it drops, operations
//! reconnect with backoff (logging a `warn` line with the URL redacted) for
//! [`RedisOptions::retry_for`], then fail with a transient error. Consumers keep their own
//! fetch connection and reconnect forever, and the pub/sub connection resubscribes and makes
//! every waiter re-read. Broadcast inboxes resubscribe (or reconnect their reply wait)
//! forever, and ping an idle subscription so that a half-open connection is replaced. A
//! `READONLY` reply counts as a lost connection (a master demoted by a Sentinel failover while
//! the connection stayed up). Unacked
//! entries stay in Redis across all of this, so acks-late work is restored by the visibility
//! timeout, never lost.
//!
//! # What differs from kombu
//!
//! - Fanout exchanges exist only as Celery's broadcast channels (the pidbox and events), not
//!   for queues an application declares.
//! - `redeliveries` is a count kept in our own keys (restores and requeues increment it and
//!   set kombu's flag, a fetch reads it only for flagged messages, the ack deletes it); kombu
//!   keeps only the flag.
//! - Fetching is pop-and-record in one script rather than `BRPOP` (kombu's window in which a
//!   killed consumer loses a message is closed); idle consumers wait on our wake-up channel,
//!   and on key tracking (or a poll once a second) for messages published by clients that do
//!   not announce them.
//! - A fetched message whose `delivery_tag` is already held (an envelope pushed twice) is
//!   recorded under a fresh tag, written into its envelope too, so the two deliveries never
//!   share an `unacked` entry; kombu would overwrite the first, and the first ack would remove
//!   both.
//! - Fixed `sep` and `priority_steps`; queues declared with `x-expires` are not supported.

mod backend;
mod batch;
mod beat;
mod broker;
mod client;
mod conn;
mod keys;
mod options;
mod scripts;
mod sentinel;

use std::sync::Arc;

use celeriac_core::{Drivers, DynBackend, DynBeatStore, DynBroker};

pub use backend::RedisBackend;
pub use beat::RedisBeatStore;
pub use broker::RedisBroker;
pub use client::RedisConnection;
pub use options::RedisOptions;
/// The `redis` crate this one is built on, for callers of [`RedisConnection`].
pub use redis;

/// The URL schemes this crate registers.
pub const SCHEMES: [&str; 5] = ["redis", "rediss", "unix", "redis+socket", "sentinel"];

/// Adds the `redis`, `rediss`, `unix`, `redis+socket` and `sentinel` schemes, for brokers, result backends
/// and beat stores, to `drivers` (beat stores also under Celery's `socket`).
///
/// ```
/// let mut drivers = celeriac_core::Drivers::new();
/// celeriac_redis::register(&mut drivers);
/// assert!(format!("{drivers:?}").contains("redis"));
/// ```
pub fn register(drivers: &mut Drivers) {
    for scheme in SCHEMES {
        drivers.add_broker(scheme, |url, config| {
            Box::pin(async move {
                Ok(Arc::new(RedisBroker::connect(&url, &config).await?) as DynBroker)
            })
        });
        drivers.add_backend(scheme, |url, config| {
            Box::pin(async move {
                Ok(Arc::new(RedisBackend::connect(&url, &config).await?) as DynBackend)
            })
        });
    }
    // `socket://` opened a beat store before the stores moved here; the broker's URL parser
    // reads it, so it keeps doing so.
    for scheme in SCHEMES.into_iter().chain(["socket"]) {
        drivers.add_beat_store(scheme, |url, config| {
            Box::pin(async move {
                Ok(Arc::new(RedisBeatStore::connect(&url, &config).await?) as DynBeatStore)
            })
        });
    }
}
