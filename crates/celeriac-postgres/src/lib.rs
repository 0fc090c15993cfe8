//! The PostgreSQL broker, result backend and beat store of celeriac: a task queue in the
//! database an application already runs.
//!
//! This crate is for teams that run PostgreSQL and want no second server for their tasks, and
//! for code that must enqueue a task in the same transaction as its business write
//! ([`publish_in`]; the facade's `celeriac::postgres::send_in`). Users normally reach it through
//! the `celeriac` facade (feature `postgres`) and a URL such as
//! `postgres://app:secret@db:5432/app`; [`register`] adds the `postgres` and `postgresql`
//! schemes to a [`celeriac_core::Drivers`] table, or open [`PgBroker`], [`PgBackend`] and
//! [`PgBeatStore`] directly. Built on sqlx 0.9: one API for PostgreSQL and MySQL, and the
//! transactions users hold in sqlx/axum applications are sqlx transactions.
//!
//! # URLs
//!
//! `postgres://user:password@host:port/database?param=value&…` (or `postgresql://`), read as
//! libpq reads it: `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`),
//! `sslrootcert`, `sslcert`, `sslkey`, `host` (a Unix socket directory), `application_name`,
//! `options`. Two parameters are celeriac's own: `schema` (default `celeriac`) and `pool_size`
//! (default from the worker's concurrency, see [`PgOptions::pool_size_for`]). Passwords never
//! reach logs or error messages.
//!
//! # Schema
//!
//! Created on first use, in one transaction under an advisory lock (concurrent starts are
//! safe), in its own schema; [`schema_sql`] prints it. Times are Unix milliseconds.
//!
//! - `messages(id bigserial, queue, priority, state, visible_at, deliveries, task_id, body,
//!   lease)`: every message; `body` is kombu's JSON envelope. `state` is 0 ready, 1 delayed,
//!   2 leased; `visible_at` is the not-before time of a delayed row and the lease expiry of a
//!   leased one; `lease` the current lease's first end (see **Fencing**; added by schema
//!   version 2, which a process of this release adds to version 1 tables when it opens them).
//!   Partial indexes `(queue, priority DESC, id) WHERE state = 0` and
//!   `(queue, visible_at) WHERE state <> 0`.
//! - `queues(name)`: declared queues.
//! - `results(task_id, status, expires_at, meta)`, `groups(group_id, task_ids, expires_at)`,
//!   `counters(key, value, expires_at)`.
//! - `broadcast(id, channel, routing_key, body, created_at)`: remote control and events.
//! - `beat_lease`, `beat_entries`: the beat store.
//! - `meta(key, value)`: the schema version.
//!
//! # Design
//!
//! **Fetching.** A consumer leases up to its free prefetch in one statement per queue: two
//! index seeks, each `FOR UPDATE SKIP LOCKED` (ready rows by priority then age; due rows, i.e.
//! delays whose time came and leases that ran out), the best of them updated to `state = 2`,
//! the lease expiry and `deliveries + 1`. Concurrent consumers skip each other's rows instead
//! of waiting. The fetch runs on a task of its own, so cancelling `next()` loses nothing;
//! rows fetched and not handed out are given back when the consumer drops. Acks of a process
//! are grouped: one `DELETE … USING unnest(ids, tokens)` for every ack queued meanwhile, and
//! publishes likewise (one `INSERT … SELECT FROM unnest(…)` and one notification per queue).
//!
//! **Fencing.** The new `deliveries` value and the lease's first end (column `lease`, written
//! by the fetch, left alone by extensions) are the lease's fencing token: ack, reject and
//! `extend_lease` touch the row only `WHERE id = $1 AND deliveries = $2 AND lease = $3`. A
//! worker whose lease ran out and whose message was handed to another cannot delete or requeue
//! the new copy; its `extend_lease` fails with "lease lost". The count alone can repeat after
//! a server crash (fetches commit asynchronously, so the crash can take a lease whose holder
//! still runs the task, and the next lease has the same count); the lease's end differs.
//! Redeliveries are `deliveries - 1`.
//!
//! **Waking.** Publishing is one statement that inserts and calls `pg_notify` on the schema's
//! queue channel. Each handle keeps one extra connection in `LISTEN` (its own one-connection
//! pool, reconnected on loss); an idle consumer sleeps until a notification, the next due time
//! of its queues (a delayed message, a lease), or a 5 s safety poll. No polling while idle
//! beyond that. After a lost listening connection every waiter is woken, since notifications
//! sent meanwhile are gone.
//!
//! **Results.** The stores of concurrent tasks go out as one `INSERT … ON CONFLICT DO UPDATE
//! … WHERE <precedence>` that notifies the result channel for each ready state written
//! (payload: the task id and, when small, the result); a waiter registers by task id, reads
//! the row once, then takes the result from its notification (with a 2 s recheck). Expired results are
//! invisible at once and deleted by a sweep at most once a minute, started by a store. The
//! chord counter is an upsert returning the new value.
//!
//! **Durability.** Publishes and result stores commit with the server's `synchronous_commit`
//! (on by default): a published task and a stored result survive a server crash. Fetches,
//! acks, rejects and lease extensions run on a second pool with `synchronous_commit = off`: a
//! server crash may lose the last moments of them, which never loses a task: a lost ack or
//! reject leaves the message leased, and it runs again when its lease ends (at-least-once).
//! Stores must not be asynchronous: a worker acks after its store returns, and that ack may
//! wait for a connection through the outage and commit after the restart, which would delete
//! the message of a task whose result the crash took.
//!
//! **Dead letters.** As on every broker: the worker moves a message delivered too often, or
//! one that does not decode, to `<queue>.dead` by publishing it there and acking the original.
//!
//! **Clocks.** Not-before times and lease expiries are judged by the clocks of the processes
//! (Unix ms), as with SQLite and Redis: keep the hosts' clocks in sync (NTP).
//!
//! # What it is not
//!
//! Not kombu's SQLAlchemy transport (`sqla+postgresql://`) nor Celery's database result
//! backend (`db+postgresql://`): Python Celery cannot read these tables.

mod backend;
mod beat;
mod broadcast;
mod broker;
mod enqueue;
mod options;
mod schema;
mod store;

use std::sync::Arc;

use celeriac_core::{Drivers, DynBackend, DynBeatStore, DynBroker};

pub use backend::PgBackend;
pub use beat::PgBeatStore;
pub use broker::PgBroker;
pub use enqueue::{publish_in, schema_of_url};
pub use options::{DEFAULT_SCHEMA, PgOptions};
/// The sqlx this crate is built with, for callers that hand it their transactions.
pub use sqlx;

/// The DDL of the tables in `schema`, as this crate runs it on first use (for a DBA who
/// creates them by hand and grants a less privileged role their use).
///
/// ```
/// let sql = celeriac_postgres::schema_sql("celeriac");
/// assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"celeriac\".messages"));
/// ```
pub fn schema_sql(schema: &str) -> String {
    schema::ddl(schema)
}

/// Adds the `postgres` and `postgresql` schemes, for brokers, result backends and beat
/// stores, to `drivers`.
///
/// ```
/// let mut drivers = celeriac_core::Drivers::new();
/// celeriac_postgres::register(&mut drivers);
/// assert!(format!("{drivers:?}").contains("postgresql"));
/// ```
pub fn register(drivers: &mut Drivers) {
    for scheme in ["postgres", "postgresql"] {
        drivers.add_broker(scheme, |url, config| {
            Box::pin(
                async move { Ok(Arc::new(PgBroker::connect(&url, &config).await?) as DynBroker) },
            )
        });
        drivers.add_backend(scheme, |url, config| {
            Box::pin(
                async move { Ok(Arc::new(PgBackend::connect(&url, &config).await?) as DynBackend) },
            )
        });
        drivers.add_beat_store(scheme, |url, config| {
            Box::pin(async move {
                Ok(Arc::new(PgBeatStore::connect(&url, &config).await?) as DynBeatStore)
            })
        });
    }
}
