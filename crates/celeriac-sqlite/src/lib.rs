//! The embedded default broker, result backend and beat store of celeriac: one SQLite file, no
//! server.
//!
//! This crate is for applications that want a durable task queue without running Redis,
//! RabbitMQ or Postgres: a producer, a few worker processes and a beat on one machine, all
//! sharing `celeriac.db`. Users normally reach it through the `celeriac` facade and the URL
//! `sqlite://celeriac.db`; call [`register`] to add the `sqlite` scheme to a
//! [`celeriac_core::Drivers`] table, or open [`SqliteBroker`], [`SqliteBackend`] and
//! [`SqliteBeatStore`] directly.
//!
//! [`SqliteBeatStore`] is the [`celeriac_core::BeatStore`] of periodic tasks (celeriac-beat)
//! in the broker's file: tables `celeriac_beat_lease` and `celeriac_beat_entries`, the lease
//! with its fencing token checked in the transaction of every leader's write.
//!
//! [`SqliteBroker`] also carries the broadcast channels
//! ([`Broker::broadcast`](celeriac_core::Broker::broadcast)): remote control and events
//! between the processes sharing the file, so a command-line process can inspect a worker,
//! or follow its events, without any server (see **Broadcast** below).
//!
//! # URLs
//!
//! - `sqlite://relative/path.db`: relative to the working directory;
//! - `sqlite:///absolute/path.db`;
//! - `sqlite://:memory:`: a private in-memory database for one process (a broker and a backend
//!   opened this way do not see each other's tables, which they never need to).
//!
//! The file is created if missing; its directory must exist. The lease (`visibility_timeout`)
//! and `result_expires` come from [`celeriac_core::Config`] (see [`SqliteOptions`]).
//!
//! # Design
//!
//! **A connection thread per file and process.** SQLite calls block, so the one connection
//! lives on a dedicated OS thread named `celeriac-sqlite`, fed by a channel of commands, each
//! answered on a oneshot channel; async code never blocks on the database. A broker, a backend
//! and a beat store of one process that open the same file share that thread (a process-wide
//! map keyed by the canonical path), so they never contend for SQLite's write lock with each
//! other.
//!
//! **Group commit.** The thread takes every command queued at that moment (up to 1024) and runs
//! them in one transaction: `BEGIN IMMEDIATE` when any of them writes, a plain `BEGIN` for a
//! batch of reads. N concurrent publishers, acks and fetches thus cost one commit, and a caller
//! waits one round trip to the thread, so throughput grows with the number of concurrent
//! callers. Statements are prepared once and cached, with SQLite's query planner stability
//! guarantee on so a new parameter value never forces a re-prepare. A failing statement fails
//! only its own command (a batch publish is all-or-nothing through a savepoint); a failing
//! `BEGIN`/`COMMIT` fails the whole batch, and so does a statement after which SQLite rolled
//! the transaction back (see **A full disk**).
//!
//! **Durability.** The file is in WAL mode with `synchronous = NORMAL`: a commit is not fsynced,
//! the WAL is at checkpoints, which run every 10,000 WAL pages (about 40 MB; SQLite's default
//! is 1,000). The database never corrupts, and a crash of a process loses nothing, but a power
//! loss or OS crash may lose the commits since the last checkpoint (a published message or an
//! ack: an ack lost means one more delivery, which at-least-once allows). This buys roughly
//! two orders of magnitude of throughput over `FULL`. Writers from other processes wait up to
//! `busy_timeout` (default 5 s) for the write lock, then fail with a transient error. They
//! retry every 20 µs at first, backing off to 2 ms steps, and not on SQLite's own 1, 2, 5,
//! 10 ms steps: another process holds the lock for about one commit.
//!
//! **A full disk.** A write that finds no room fails with a transient error naming the cause
//! (`cannot store result in sqlite: database or disk is full …`). SQLite may then roll back
//! the whole batch it was in (it did in every test): every command of that batch, reads
//! included, fails with the same error, and none runs outside a transaction. The thread then checkpoints the WAL and
//! truncates it to zero bytes, at once and then every second until that succeeds (it cannot
//! while another connection reads an older snapshot, nor while the database file has no
//! room for the WAL's pages). Automatic checkpoints never shrink the WAL, so without this it
//! kept the space it had taken and grew on into the space an operator freed. A checkpoint
//! only copies committed transactions into the database file, so nothing committed is lost.
//! The worker stores a task's final state again until it is stored, and only then settles
//! its delivery: an acks-late task is acknowledged after its result is stored, an early-acked
//! one holds its slot until then, so no acknowledged task ends without its result. An ack
//! that failed with the disk brings its message back after its lease, as a duplicate the
//! worker skips once the result is stored (figures in `docs/RELIABILITY.md`).
//!
//! **Schema.** Tables are created on first open and versioned with `PRAGMA user_version`:
//!
//! - `celeriac_queues(name)`: declared queues.
//! - `celeriac_messages(id, queue, priority, state, visible_at, deliveries, body)`: every
//!   message; `id` gives FIFO order, `body` is kombu's JSON envelope, so rows can be read with
//!   `sqlite3` and any JSON tool. `state` is 0 ready, 1 delayed, 2 leased; `visible_at` (Unix
//!   ms) is the not-before time of a delayed row and the lease expiry of a leased one. Two
//!   partial indexes make fetching cheap however long the queue: `(queue, priority DESC, id)
//!   WHERE state = 0` and `(queue, visible_at) WHERE state <> 0`.
//! - `celeriac_results(task_id, status, date_done, expires_at, meta)`: the TaskMeta JSON,
//!   plus columns to query by.
//! - `celeriac_groups(group_id, task_ids, expires_at)` and
//!   `celeriac_counters(key, value, expires_at)`: groups and chord counters.
//! - `celeriac_broadcast(id, channel, routing_key, body, created_at)` (version 2): remote
//!   control requests, replies and events, one row each for a minute; `channel` is `control`,
//!   `reply` or `event`, `body` kombu's JSON envelope, `id` an `AUTOINCREMENT` key that is
//!   never handed out twice.
//! - `celeriac_coord_keys(key, holder, until)` and `celeriac_coord_slots(key, holder, until)`
//!   (version 3): coordination across workers, in the write transaction (cluster rate limits
//!   as a GCRA time per key, unique-task locks, leased concurrency slots; see
//!   [`celeriac_core::coord`]).
//! - `celeriac_beat_lease` and `celeriac_beat_entries`: beat's, created when a
//!   [`SqliteBeatStore`] opens the file, outside the versioned schema (see its docs).
//!
//! Version 1 had every table above but `celeriac_broadcast` and the coordination tables;
//! version 2 added `celeriac_broadcast`. A file of an older version is
//! upgraded when it is opened: the tables it lacks are created, in one transaction, and
//! nothing else changes, so processes of the previous release keep working on it.
//!
//! **Leases.** A fetch runs two statements per queue, both index seeks: one promotes due rows
//! (delayed ones whose time came, leased ones whose lease ran out) to ready, the other leases
//! up to the consumer's free prefetch in one `UPDATE … RETURNING`: `state = 2`,
//! `visible_at = now + lease`, `deliveries + 1`. Rows fetched beyond the one asked for wait in
//! the consumer; a dropped consumer gives them back as never delivered. The new `deliveries`
//! value is the lease's identity: ack, reject and `extend_lease` only touch the row if it still
//! holds that value, so a consumer whose lease expired cannot settle a copy now leased to
//! another. Redeliveries are `deliveries - 1`. Delayed messages stay rows with a future
//! `visible_at` and are never held in memory nor delivered early. A row whose text does not
//! decode is delivered with `message: Err(..)` for the worker to reject.
//!
//! **Bad rows.** A row written by another tool may hold bytes that are not an envelope: not
//! JSON, text that is not UTF-8, a BLOB. A fetch reads every body as bytes, so such a row
//! fails no fetch: it is leased with its batch and handed over alone, as a delivery whose
//! `message` is the error (naming the row, its storage class and size); the rows fetched with
//! it are delivered as usual. The worker then dead-letters it, as it does an undecodable
//! message on any broker (a `celeriac.undecodable` placeholder in `<queue>.dead`, the error
//! as the reason), and acks it, which deletes the row: it is handled once. The driver does
//! not set such rows aside itself: that would take a state or a table that older processes
//! sharing the file do not know (they would promote the row back to ready), it would hide
//! them from the dead-letter tools, and the worker already records who, when, why and from
//! which queue. The price is the row's bytes, which are not kept: the placeholder has an
//! empty body, since bytes that are not text cannot be put in an envelope. A BLOB whose
//! bytes are a valid envelope is not bad: it runs.
//!
//! **Waiting.** An idle consumer waits for an in-process notice (fired after a commit that made
//! messages ready), for the next due time of its queues, or for another process's publish.
//! The connection thread detects other processes' writes by reading `PRAGMA data_version`
//! while someone waits: at once when inotify (Linux) reports a write to the database's `-wal`
//! file, and otherwise by polling every millisecond right after a change, backing off to every
//! 20 ms. A changed file wakes the idle consumers only when the file's `messages` wake
//! sequence (table `celeriac_wake`, raised in the same transaction by every commit that makes
//! messages deliverable: publishes, requeues, prefetched rows given back) grew: the other
//! processes' acks, fetches and results, far more frequent, wake nobody in vain. A writer of
//! an older release raises no sequence; its messages are found by the consumers' recheck, at
//! most a second later. Result waiters wake on every change. Expired results are invisible at
//! once and deleted by a sweep at most once a minute, piggybacked on a store.
//!
//! **Broadcast.** Sending a control request, a reply or an event is one `INSERT` into
//! `celeriac_broadcast`, group-committed like a publish. An inbox is a cursor over that table:
//! it starts after the newest row when it opens (so, as with pub/sub, it sees what is sent
//! after, not before), and reads the rows of its channel past its cursor (control inboxes
//! every request, reply inboxes their routing key, event inboxes the routing keys matching
//! their topic binding), at most 256 per read. An idle inbox waits on the same machinery as
//! an idle consumer: its own process's commits wake it directly, another process's through
//! `data_version` and inotify, and only when the broadcast sequence grew, with a 1 s fallback
//! poll. A reply crosses processes in about a millisecond. Rows live one minute: sends delete
//! older ones (at most once a second); an inbox more than a minute behind misses the swept
//! rows and logs a warning, and rows that are not valid envelopes are logged and skipped.
//!
//! # What it is not
//!
//! Not a network broker: processes must share a local file system (not NFS, where SQLite
//! locking is unreliable), and so its broadcast channels reach only the processes of one
//! machine. Celery's own tools cannot read the file (`celery inspect` and `celery events`
//! need a broker kombu speaks, such as Redis or RabbitMQ); celeriac's clients of the channels
//! ([`celeriac_core::broadcast`]) can.

mod backend;
mod beat;
mod broadcast;
mod broker;
mod conn;
mod options;
mod schema;
mod wake;

use std::sync::Arc;

use celeriac_core::{Drivers, DynBackend, DynBeatStore, DynBroker};

pub use backend::SqliteBackend;
pub use beat::SqliteBeatStore;
pub use broker::SqliteBroker;
pub use options::SqliteOptions;

/// Adds the `sqlite` scheme, for brokers, result backends and beat stores, to `drivers`.
///
/// ```
/// # async fn demo() -> celeriac_core::Result<()> {
/// let mut drivers = celeriac_core::Drivers::new();
/// celeriac_sqlite::register(&mut drivers);
/// let config = celeriac_core::Config::default();
/// let broker = drivers.open_broker("sqlite://:memory:", &config).await?;
/// assert_eq!(broker.driver(), "sqlite");
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
/// #     .block_on(demo()).unwrap();
/// ```
pub fn register(drivers: &mut Drivers) {
    drivers.add_broker("sqlite", |url, config| {
        Box::pin(
            async move { Ok(Arc::new(SqliteBroker::connect(&url, &config).await?) as DynBroker) },
        )
    });
    drivers.add_backend("sqlite", |url, config| {
        Box::pin(
            async move { Ok(Arc::new(SqliteBackend::connect(&url, &config).await?) as DynBackend) },
        )
    });
    drivers.add_beat_store("sqlite", |url, config| {
        Box::pin(async move {
            Ok(Arc::new(SqliteBeatStore::connect(&url, &config).await?) as DynBeatStore)
        })
    });
}
