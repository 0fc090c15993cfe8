//! The MariaDB/MySQL broker, result backend and beat store of celeriac.
//!
//! This crate is for teams that already run MariaDB (10.6 or later) or MySQL (8.0 or later)
//! and want no second server for their task queue, and for those who want to enqueue a task
//! in the same transaction as the business write that calls for it ([`publish_in`], and the
//! facade's `celeriac::mysql::send_in`). Users normally reach it through the `celeriac` facade
//! (cargo feature `mysql`) and a URL; call [`register`] to add the `mysql` and `mariadb`
//! schemes to a [`celeriac_core::Drivers`] table, or open [`MysqlBroker`], [`MysqlBackend`]
//! and [`MysqlBeatStore`] directly. It is built on sqlx (feature `mysql`): one API for the
//! server databases, and the `sqlx::Transaction` users of axum and sqlx already hold is what
//! transactional enqueue takes.
//!
//! # URLs
//!
//! `mysql://user:password@host:3306/database` (`mariadb://` is the same), with sqlx's MySQL
//! parameters (`ssl-mode=DISABLED|PREFERRED|REQUIRED|VERIFY_CA|VERIFY_IDENTITY`, `ssl-ca`,
//! `ssl-cert`, `ssl-key`, `socket`, `charset`, …) and three of ours: `max-connections` (the
//! pool size; default the worker's concurrency + 2), `poll-interval-ms` (default 100) and
//! `beat-namespace` (see [`MysqlOptions`]). Passwords never reach logs or error messages.
//!
//! # Design
//!
//! **Schema.** Created on first use when `celeriac_schema` is missing or older, under a named
//! lock (`GET_LOCK`) so that processes starting at once do not race, with idempotent
//! statements (`CREATE TABLE IF NOT EXISTS`). A database whose tables an administrator created
//! works for a user without the `CREATE` privilege. All tables are InnoDB, `utf8mb4_bin`:
//!
//! - `celeriac_schema(version)`;
//! - `celeriac_queues(name)`: declared queues;
//! - `celeriac_messages(id, queue, priority, state, visible_at, deliveries, body)`: every
//!   message; `id` (`AUTO_INCREMENT`) gives FIFO order within a priority, `body` is kombu's
//!   JSON envelope (readable with the `mysql` client and `JSON_EXTRACT`). `state` is 0 ready,
//!   1 delayed, 2 leased; `visible_at` (Unix ms, the server's clock) is the not-before time of
//!   a delayed row and the lease expiry of a leased one. Indexes `(queue, state, priority
//!   DESC, id)` for claiming and `(queue, state, visible_at)` for due rows;
//! - `celeriac_results(task_id, status, date_done, expires_at, meta)`: the TaskMeta JSON;
//! - `celeriac_groups(group_id, task_ids, expires_at)`, `celeriac_counters(name, value,
//!   expires_at)`: groups and chord counters;
//! - `celeriac_broadcast(id, channel, routing_key, body, created_at)`: remote control and
//!   events (see [`MysqlBroker`]'s `broadcast`, module `broadcast`);
//! - `celeriac_beat_lease(namespace, holder, token, expires_at)` and
//!   `celeriac_beat_entries(namespace, name, spec, paused, triggers, state)`;
//! - `celeriac_coord_keys(key_hash, name, holder, until_us)` and
//!   `celeriac_coord_slots(key_hash, holder_hash, name, holder, until_us)`: coordination
//!   across workers (cluster rate limits, unique-task locks, concurrency slots; the result
//!   backend's coordination capability, [`celeriac_core::coord`]), created on first use rather
//!   than with the rest, so a database made before them gets them and a user who never
//!   coordinates needs no `CREATE` privilege for them. Each step is one transaction that
//!   locks the key's row (`SELECT … FOR UPDATE`), on the server's clock.
//!
//! **The server's clock.** Every lease, delay and expiry is judged by `NOW(3)` on the
//! server, so workers on machines whose clocks disagree agree on when a lease ends.
//!
//! **Claims.** A consumer asks for as many rows as it has free prefetch slots. An idle poll is
//! one lock-free read (is a row ready, when is the next delayed or leased one due?). When
//! there is work, one transaction (read committed) makes due rows ready, takes the best ready
//! rows with `SELECT … ORDER BY priority DESC, id LIMIT n FOR UPDATE SKIP LOCKED` (rows
//! another consumer is claiming are skipped, not waited for), and marks them leased with one
//! `UPDATE … WHERE id IN (…)`: MySQL has no `UPDATE … RETURNING`, and the row locks make the
//! select-then-update atomic. A deadlock or lock wait timeout runs the transaction again.
//!
//! **Leases and the fencing token.** A claim adds one to the row's `deliveries`; the new
//! value is the lease's token. Ack, reject and `extend_lease` only touch the row while it
//! still holds that token, so a worker whose lease ran out and whose message went to another
//! consumer cannot delete or requeue the new copy. `redeliveries` is `deliveries - 1`; the
//! worker dead-letters a message redelivered too often (into `<queue>.dead`, as on every
//! broker), and an undecodable body is delivered as an error for the worker to dead-letter.
//!
//! **Waking up: short polling.** MySQL has no `LISTEN/NOTIFY`. An idle consumer polls with a
//! sleep that doubles from 1 ms to the poll interval (100 ms by default), never past the next
//! due time; a publish in the same process wakes it at once. The costs, measured on the
//! 2-core test machine, are in `docs/mysql.md`.
//!
//! **Results** are written in a transaction that locks the row and applies the state
//! precedence of [`celeriac_core::TaskState::may_be_replaced_by`]; waiting polls like a
//! consumer. Expired rows are invisible at once and deleted by a sweep (at most once a minute
//! per process, 1000 rows per table, piggybacked on a store). Chord counters are an upsert and
//! a read in one transaction.
//!
//! # What it is not
//!
//! Not push-based: an idle worker's latency is up to the poll interval, and each idle
//! consumer costs the server a small read per poll. Python Celery cannot read these tables
//! (Celery's own SQL layouts, `db+mysql://` and `sqla+mysql://`, are another crate's).

/// The database's clock in Unix milliseconds, as an SQL expression (a literal, for `concat!`).
///
/// Every lease, delay and expiry is judged by the server's clock, so workers on machines whose
/// clocks disagree still agree on when a lease runs out.
macro_rules! now_ms {
    () => {
        "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)"
    };
}

mod backend;
mod beat;
mod broadcast;
mod broker;
mod coord;
mod db;
mod options;
mod send;

use std::sync::Arc;

use celeriac_core::{Drivers, DynBackend, DynBeatStore, DynBroker};

pub use backend::MysqlBackend;
pub use beat::MysqlBeatStore;
pub use broker::MysqlBroker;
pub use options::{MAX_DEFAULT_POOL, MysqlOptions};
pub use send::publish_in;
/// The sqlx this crate is built on, for the transactions [`publish_in`] takes.
pub use sqlx;

/// The URL schemes this crate opens.
pub const SCHEMES: [&str; 2] = ["mysql", "mariadb"];

/// Adds the `mysql` and `mariadb` schemes, for brokers, result backends and beat stores, to
/// `drivers`.
///
/// ```
/// let mut drivers = celeriac_core::Drivers::new();
/// celeriac_mysql::register(&mut drivers);
/// ```
pub fn register(drivers: &mut Drivers) {
    for scheme in SCHEMES {
        drivers.add_broker(scheme, |url, config| {
            Box::pin(async move {
                Ok(Arc::new(MysqlBroker::connect(&url, &config).await?) as DynBroker)
            })
        });
        drivers.add_backend(scheme, |url, config| {
            Box::pin(async move {
                Ok(Arc::new(MysqlBackend::connect(&url, &config).await?) as DynBackend)
            })
        });
        drivers.add_beat_store(scheme, |url, config| {
            Box::pin(async move {
                Ok(Arc::new(MysqlBeatStore::connect(&url, &config).await?) as DynBeatStore)
            })
        });
    }
}
