//! The celeriac worker: consumes task queues, runs tasks, stores their results.
//!
//! For the `celeriac` facade (`App::worker`) and the CLI's `worker` command, and for anyone
//! embedding a worker in their own binary or tests. It speaks Celery's protocol v2, so it runs
//! messages sent by Python Celery clients as well as ours.
//!
//! # A tour
//!
//! - [`Worker`]: built from a broker, an optional result backend, a [`Registry`](celeriac_core::Registry) of tasks and
//!   [`WorkerOptions`]; [`Worker::run`] returns a [`WorkerReport`] after a shutdown.
//! - [`ShutdownHandle`]: warm (finish what runs, hand back the rest), soft (warm for at most
//!   [`WorkerOptions::soft_shutdown_timeout`]) then cold (cancel what runs);
//!   [`Worker::run_until_signal`] maps SIGINT/SIGTERM onto them.
//! - [`PoolHandle`]: grow and shrink the pool while the worker runs (SIGTTIN/SIGTTOU).
//! - [`revoke`]: the REVOKED record a revoke stores, and `terminate` for running tasks: the
//!   worker reads its running ids' states in one batch every
//!   [`WorkerOptions::revoke_poll_interval`] and stops those revoked with terminate.
//! - [`Pool`]: where blocking task bodies run: tokio's blocking threads, the worker's own
//!   threads, or child processes of the same binary ([`Pool::Processes`]; a binary serves as a
//!   child through [`run_child`] when [`is_pool_child`]).
//! - [`dead`]: dead-letter queues (`<queue>.dead`) for messages that cannot run or were
//!   delivered more than [`WorkerOptions::max_redeliveries`] times; list, inspect, requeue,
//!   purge.
//!
//! - Canvas: after a task's outcome is stored, the worker sends what its message carries in
//!   `embed` (callbacks, errbacks, the next chain step) and counts chord parts, firing the
//!   body once (see `canvas`); `celery.starmap` and `celery.map` are built in.
//!
//! - [`pipeline`]: the worker as a stack of [`Layer`]s around each task's execution. One
//!   delivery is decoded into a [`Request`] (`request`), then goes through small layers, each in
//!   its own module with its own context and tests: settle (`settle`, with lease extension in
//!   `lease`), canvas (`canvas`), record (`record`), the redelivery limit (`redelivery`), eta
//!   and expiry (`schedule`), the per-name rate limit (`ratelimit`), a concurrency slot
//!   (`slot`), the last checks and the early ack (`gate`), the retry decision (`retry`),
//!   STARTED, cold shutdown, terminate revokes (`revoke`) and time limits (`timelimit`),
//!   around the body run with panics caught on the pool (`execute`, `pool`). Add your own with
//!   [`Worker::layer`] and [`Worker::delivery_layer`].
//!
//! # Key design decisions
//!
//! - **At least once, with leases.** A delivery is leased for the visibility timeout and the
//!   worker extends the lease while it holds one long. Acks are early by default (as Celery's),
//!   late per task with `acks_late`. A task id that already has a ready result in the backend
//!   is not run again, which also makes revocation work: revoking stores REVOKED. There is
//!   no remote-control channel: a terminate revoke is found by polling the backend for the
//!   ids that run, a few times a second, only while something runs.
//! - **Blocking tasks leave the runtime.** A `Handler::Blocking` body never runs on a tokio
//!   worker thread, so a slow body cannot stall acks, leases or other tasks. The cost: a
//!   thread cannot be killed, so under the thread pools a blocking task past its hard time
//!   limit is reported as `TimeLimitExceeded` and abandoned, not stopped; under
//!   [`Pool::Processes`] its child process is killed (SIGKILL) and replaced. An abandoned
//!   body on tokio's blocking pool would keep a runtime that is dropped from ever finishing:
//!   `celeriac::cli::run` shuts its runtime down with a short timeout after the worker
//!   stopped; a binary of your own should do the same (`Runtime::shutdown_timeout`).
//! - **A crash is one task's problem.** Under [`Pool::Processes`] a child that aborts,
//!   segfaults or is OOM-killed fails its task with `WorkerLostError` (acks-late tasks are
//!   requeued instead); a message that keeps killing its worker is dead-lettered after
//!   `max_redeliveries`, so no message can crash workers forever.
//! - **Nothing delayed is held in memory.** A message with a future `eta` (sent by Python
//!   Celery) is re-published to the broker's delayed store and acked; retries go there too.
//!   Only a broker without a delayed store makes the worker hold such a message.
//! - **No lost messages at shutdown.** Deliveries fetched but not started are requeued; a cold
//!   shutdown requeues acks-late tasks that did not stop in time.
//! - **Libraries emit, binaries subscribe.** Every execution runs in a `task` span with
//!   `task_id`, `task_name` and `queue`; the worker never installs a subscriber.
//!
//! # Not yet
//!
//! In the canvas, `celery.chord_unlock` (chords complete through the backend's counter or
//! Celery's Redis chord keys instead).

mod autoscale;
mod builtins;
mod canvas;
mod control;
mod coord;
pub mod dead;
mod events;
mod execute;
mod gate;
mod lease;
mod options;
pub mod pipeline;
mod pool;
mod ratelimit;
mod record;
mod redelivery;
mod report;
mod request;
mod retry;
pub mod revoke;
mod schedule;
mod settle;
mod shutdown;
mod slot;
mod timelimit;
mod tracker;
mod turns;
mod worker;

pub use options::{ChildCommand, Pool, WorkerOptions};
pub use pipeline::{Layer, Next, Outcome, Request};
pub use pool::PoolHandle;
pub use pool::process::{CHILD_ENV, is_pool_child, run_child};
pub use report::WorkerReport;
pub use shutdown::ShutdownHandle;
pub use worker::Worker;
