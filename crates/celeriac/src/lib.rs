//! celeriac is a distributed task queue for Rust that speaks Celery's message protocol.
//!
//! It is for Rust services that need background jobs — retried, rate limited, scheduled,
//! spread over many processes and machines — and for teams that already run Python Celery and
//! want Rust workers or clients on the same broker.
//!
//! # A tour
//!
//! A task is a plain function marked [`task`]. An [`App`] knows the broker, the result backend
//! and the tasks. Sending a task returns an [`AsyncResult`]; a worker (another process, or the
//! same one) runs it and stores the outcome.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> celeriac::Result<()> {
//! use std::time::Duration;
//!
//! #[celeriac::task(name = "tasks.add")]
//! async fn add(x: i64, y: i64) -> i64 {
//!     x + y
//! }
//!
//! let app = celeriac::App::builder().broker_url("memory://").task::<add>().build().await?;
//!
//! // A worker in this process, for the example; usually `my-app worker` in another one.
//! let worker = app.worker(app.worker_options());
//! let stop = worker.shutdown_handle();
//! let running = tokio::spawn(worker.run());
//!
//! let result = add::delay(&app, 2, 3).await?;
//! assert_eq!(result.get_timeout(Duration::from_secs(10)).await?, 5);
//!
//! stop.warm();
//! running.await.expect("worker task").expect("worker");
//! # Ok(()) }
//! ```
//!
//! - Tasks: `#[celeriac::task]` on an `async fn` (runs on the runtime) or a plain `fn` (runs on
//!   a thread pool; under the async pool inline once its runs proved brief). Options: `name`, `queue`, `priority`, `rate_limit`,
//!   `max_retries`, `default_retry_delay`, `retry_backoff`, `retry_backoff_max`,
//!   `retry_jitter`, `autoretry_for`, `acks_late`, `soft_time_limit`, `time_limit`,
//!   `ignore_result`, `expires`, `track_started`. A first parameter of type [`TaskContext`]
//!   gives the request (id, retries, headers, cancellation).
//! - Sending: `task::delay(&app, args..)`, or `task::s(args..)` plus [`Signature`] options
//!   (countdown, eta, expires, queue, priority, task id, headers) and
//!   [`Signature::apply_async`]; [`App::send_task`] by name.
//! - Results: [`AsyncResult`] (`state`, `ready`, `get`, `traceback`, `forget`, `revoke`),
//!   also rebuilt from an id with [`AsyncResult::from_id`].
//! - Canvas ([`canvas`]): [`chain!`], [`group`] with [`GroupResult`] (progress, join,
//!   revoke, save/restore), [`chord`], [`map`], [`starmap`], [`chunks`];
//!   [`Signature::link`], [`Signature::link_error`], [`Signature::immutable`].
//! - A command line for your binary: [`cli::run`] gives it `worker`, `call`, `result`,
//!   `purge`, `status` and, with `beat`, `beat` (run, list, add, remove, pause, resume,
//!   trigger) and `worker -B`.
//!
//! # Features
//!
//! - `sqlite` (default): the embedded SQLite broker, result backend and beat store,
//!   `sqlite://path`.
//! - `redis`: the Redis broker, result backend and beat store, `redis://host:6379/0`.
//! - `amqp`: the RabbitMQ broker, `amqp://guest:guest@localhost:5672//`, and the `rpc://`
//!   result backend.
//! - `memcached`: Celery's cache result backend on memcached, `cache+memcached://host:11211/`
//!   (also several servers, `cache+memcached://h1:11211;h2:11211/`); see docs/memcached.md.
//! - `postgres`: the PostgreSQL broker, result backend and beat store,
//!   `postgres://user:password@host:5432/database` (or `postgresql://`), and transactional
//!   enqueue, `celeriac::postgres::send_in`. See docs/postgres.md.
//! - `mysql`: the MariaDB/MySQL broker, result backend and beat store,
//!   `mysql://user:password@host:3306/database` (or `mariadb://`), and transactional enqueue,
//!   `celeriac::mysql::send_in`. See docs/mysql.md.
//! - `sqla`: Celery's own SQL layouts on PostgreSQL and MariaDB/MySQL, shared with Python
//!   Celery: its database result backend, `db+postgresql://…` / `db+mysql://…`, and kombu's
//!   SQLAlchemy transport as a broker, `sqla+postgresql://…` / `sqla+mysql://…`. See
//!   docs/celery-sql.md.
//! - `worker` (default): [`App::worker`].
//! - `beat` (default): periodic tasks, [`beat`]; `beat` and `worker -B` in the CLI.
//! - `cli` (default): [`cli::run`].
//! - `msgpack`: the msgpack body codec.
//! - `otel`: OpenTelemetry trace propagation: a task sent inside a span carries the W3C
//!   `traceparent`/`tracestate` headers and the worker's task span continues that trace
//!   (`celeriac::core::otel`; an exporter is added with `cli::run_with_layer`; see the
//!   operations guide).
//! - `security`: signed messages, compatible with Celery's `auth` serializer
//!   (`serializer = "auth"`; `celeriac::security::Security`). See docs/SECURITY.md.

#[allow(unused_extern_crates)]
extern crate self as celeriac;

mod app;
#[cfg(feature = "beat")]
mod beat_dispatch;
pub mod canvas;
#[cfg(feature = "cli")]
pub mod cli;
pub mod control;
pub mod flow;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
mod result;
mod signature;

pub use app::{App, AppBuilder, PreparedSend, default_drivers};
pub use canvas::{
    Chain, Chord, ChordResult, Group, GroupResult, Progress, chain, chord, chunks, group, map,
    starmap,
};
pub use celeriac_core::canvas::{Expires, SendOptions};
pub use celeriac_core::{
    Cancellation, Config, ContentType, DynBackend, DynBroker, Error, ErrorKind, RemoteError,
    Result, TaskContext, TaskDef, TaskError, TaskErrorKind, TaskMeta, TaskOptions, TaskState,
};
pub use celeriac_macros::task;
pub use control::{Control, EventStream, Inspect};
pub use result::{AsyncResult, RevokeOptions, Signal};
pub use signature::Signature;

/// Periodic tasks: schedules, entries, the beat loop and its store (`App` implements
/// [`beat::Dispatch`]).
#[cfg(feature = "beat")]
pub use celeriac_beat as beat;
/// The core crate: protocol, contracts, in-memory drivers (for driver authors and tests).
pub use celeriac_core as core;
/// Signed messages (Celery's `auth` serializer): the [`BodySigner`](security::BodySigner)
/// contract always, `Security` with the `security` feature.
pub use celeriac_core::security;
#[cfg(feature = "worker")]
pub use celeriac_worker as worker;

/// The web server: Celery's status view, the JSON API, the dashboard, `/metrics`
/// ([`App::web`]).
#[cfg(feature = "web")]
pub mod web {
    pub use celeriac_web::*;

    impl crate::App {
        /// A web server over this app's broker, result backend and configuration; see
        /// [`celeriac_web`]. Add the beat entries with [`Web::beat`].
        pub fn web(&self) -> Web {
            let web = Web::new(
                self.broker().clone(),
                self.backend().clone(),
                self.config().clone(),
            );
            match self.signer() {
                Some(signer) => web.signer(signer.clone()),
                None => web,
            }
        }
    }
}

/// The README's examples, compiled as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The beat guide's examples, compiled as doctests.
#[cfg(all(doctest, feature = "beat"))]
#[doc = include_str!("../../../docs/beat.md")]
pub struct BeatGuideDoctests;

/// The canvas guide's examples, compiled as doctests.
#[doc = include_str!("../../../docs/canvas.md")]
#[cfg(doctest)]
pub struct CanvasGuideDoctests;

/// The operations guide's examples, compiled as doctests.
#[doc = include_str!("../../../docs/operations.md")]
#[cfg(doctest)]
pub struct OperationsGuideDoctests;

/// The web guide's examples, compiled as doctests.
#[cfg(all(doctest, feature = "web"))]
#[doc = include_str!("../../../docs/web.md")]
pub struct WebGuideDoctests;

/// The tasks guide's examples, compiled as doctests.
#[doc = include_str!("../../../docs/tasks.md")]
#[cfg(doctest)]
pub struct TasksGuideDoctests;

#[doc(hidden)]
pub mod __private {
    pub use celeriac_core::task::{Args, Handler, Task, TaskDef, TaskOptions, encode_output};
    pub use celeriac_core::{BoxFuture, RateLimit, RateLimitScope, TaskContext, TaskError};
    pub use inventory;
    pub use serde_json;

    /// A task collected by `App::builder().collect_tasks()`.
    #[derive(Debug)]
    pub struct Registration(pub fn() -> TaskDef);

    inventory::collect!(Registration);
}
