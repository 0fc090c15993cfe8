//! [`Worker`]: the consume loop that feeds deliveries to the pipeline, and its shutdown.
//!
//! The loop only fetches and spawns: each delivery gets its own tokio task (inside a span with
//! `task_id`, `task_name`, `queue`) that waits for its rate-limit token and slot, runs and
//! settles it. Prefetch (`concurrency + prefetch_buffer`) is enforced by the broker's consumer,
//! which hands out no more unsettled deliveries than that; a semaphore of `concurrency`
//! permits bounds what runs. So a rate-limited task waits without blocking anything else, and
//! it stays unacked (counting against prefetch) while it waits.

mod signal;

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{ConsumeOptions, Delivery, DynBackend, DynBroker, ErrorKind, Registry, Result};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::execute::{self, Shared};
use crate::options::WorkerOptions;
use crate::pool::{AbortOnDrop, Executor, PoolHandle};
use crate::ratelimit::RateLimiter;
use crate::record::Recorder;
use crate::report::{Counters, WorkerReport};
use crate::revoke::RunningIds;
use crate::shutdown::{Phase, ShutdownHandle};

/// A worker: consumes queues and runs the registered tasks until shut down.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use celeriac_core::memory::{MemoryBackend, MemoryBroker};
/// # use celeriac_core::Registry;
/// # use celeriac_worker::{Worker, WorkerOptions};
/// # async fn demo(registry: Registry) -> celeriac_core::Result<()> {
/// let mut options = WorkerOptions::default();
/// options.queues = vec!["celery".into()];
/// let worker = Worker::new(
///     Arc::new(MemoryBroker::new()),
///     Some(Arc::new(MemoryBackend::new())),
///     Arc::new(registry),
///     options,
/// );
/// let report = worker.run_until_signal().await?;
/// println!("{} tasks succeeded", report.succeeded);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    broker: DynBroker,
    backend: Option<DynBackend>,
    registry: Arc<Registry>,
    options: WorkerOptions,
    shutdown: ShutdownHandle,
    executor: Executor,
    pool: PoolHandle,
}

impl Worker {
    /// A worker running `registry`'s tasks from `broker`, storing results in `backend`
    /// (none: results are not stored, and duplicates are not detected).
    pub fn new(
        broker: DynBroker,
        backend: Option<DynBackend>,
        registry: Arc<Registry>,
        options: WorkerOptions,
    ) -> Self {
        let executor = Executor::from_options(&options);
        let pool = PoolHandle::new(options.concurrency, &executor);
        Worker {
            broker,
            backend,
            registry: crate::builtins::with_builtins(registry),
            options,
            shutdown: ShutdownHandle::new(),
            executor,
            pool,
        }
    }

    /// A handle to grow and shrink the pool while the worker runs (SIGTTIN/SIGTTOU under
    /// [`Worker::run_until_signal`]).
    pub fn pool_handle(&self) -> PoolHandle {
        self.pool.clone()
    }

    /// A handle to stop the worker (warm, then cold); take it before calling `run`.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// The options the worker runs with.
    pub fn options(&self) -> &WorkerOptions {
        &self.options
    }

    /// Consumes until shut down (or the broker closes), then returns what was done.
    ///
    /// Fails only when the queues cannot be declared or consumed at start.
    ///
    /// The worker runs as a task of the current runtime, whatever polls this future (often
    /// `block_on` on the main thread): a delivery then passes from the consumer to its
    /// handler on the runtime's worker threads, where a task woken by another usually runs
    /// on the same thread next, instead of crossing to the polling thread and back (two
    /// thread wake-ups per task, a quarter of a round trip on a small VM). Dropping this
    /// future stops the worker as before.
    pub async fn run(self) -> Result<WorkerReport> {
        let mut task = AbortOnDrop(tokio::spawn(self.consume()));
        match (&mut task.0).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => Err(celeriac_core::Error::closed("the worker's runtime")),
        }
    }

    async fn consume(self) -> Result<WorkerReport> {
        let Worker {
            broker,
            backend,
            registry,
            options,
            shutdown,
            executor,
            pool,
        } = self;
        for q in &options.queues {
            broker.declare(q).await?;
        }
        let consume = ConsumeOptions::new(options.prefetch())
            .lease(options.visibility_timeout)
            .result_probe(backend.as_ref().and_then(|b| b.result_probe()));
        let mut consumer = broker.consume(&options.queues, consume).await?;
        let caps = broker.capabilities();
        let concurrency = options.concurrency.max(1);
        tracing::info!(
            hostname = %options.hostname,
            queues = ?options.queues,
            concurrency,
            pool = %options.pool,
            prefetch = options.prefetch(),
            tasks = registry.len(),
            "worker started"
        );
        pool.prestart();
        let phase = shutdown.watch();
        let running = backend.is_some().then(|| Arc::new(RunningIds::default()));
        let watcher = running
            .clone()
            .zip(backend.clone())
            .map(|(ids, b)| AbortOnDrop(tokio::spawn(ids.watch(b, options.revoke_poll_interval))));
        let shared = Arc::new(Shared {
            broker: broker.clone(),
            recorder: Recorder::new(backend, options.hostname.clone()),
            executor,
            slots: pool.slots(),
            limiter: RateLimiter::default(),
            counters: Counters::default(),
            phase: phase.clone(),
            broker_delays: caps.delay,
            lease_extension: caps.lease_extension,
            running,
            registry,
            options,
        });

        let mut tasks = JoinSet::new();
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                biased;
                () = phase.reached(Phase::Warm) => break,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
                next = consumer.next() => match next {
                    Ok(Some(delivery)) => {
                        backoff = Duration::from_millis(100);
                        tasks.spawn(spawn_delivery(shared.clone(), delivery));
                    }
                    Ok(None) => {
                        tracing::info!("the broker closed; stopping");
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Closed => {
                        tracing::info!(error = %e, "the broker closed; stopping");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, retry_in = backoff.as_secs_f64(), "cannot fetch from the broker");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = phase.reached(Phase::Warm) => break,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                },
            }
        }
        drop(consumer);
        tracing::info!(
            in_flight = tasks.len(),
            "worker stopping: no new deliveries"
        );
        // Soft shutdown: running tasks get `soft_shutdown_timeout` to finish, then it turns
        // cold (a second signal makes it cold sooner).
        let mut soft = shared
            .options
            .soft_shutdown_timeout
            .filter(|_| !tasks.is_empty())
            .map(|d| {
                tracing::info!(
                    timeout = d.as_secs_f64(),
                    "soft shutdown: running tasks may finish until the timeout"
                );
                tokio::time::Instant::now() + d
            });
        loop {
            let next = match soft {
                Some(deadline) => {
                    tokio::select! {
                        biased;
                        j = tasks.join_next() => j,
                        () = phase.reached(Phase::Cold) => { soft = None; continue; }
                        () = tokio::time::sleep_until(deadline) => {
                            tracing::warn!(
                                in_flight = tasks.len(),
                                "soft shutdown timeout expired: cold shutdown (acks-late tasks are handed back)"
                            );
                            shutdown.cold();
                            soft = None;
                            continue;
                        }
                    }
                }
                None => tasks.join_next().await,
            };
            match next {
                Some(joined) => log_join(joined),
                None => break,
            }
        }
        drop(watcher);
        let report = shared.counters.report();
        tracing::info!(?report, "worker stopped");
        Ok(report)
    }

    /// Like [`Worker::run`], stopping on SIGINT/SIGTERM (Ctrl-C): the first signal starts a
    /// warm shutdown, the second a cold one.
    ///
    /// On Unix, SIGTTIN grows the pool by one and SIGTTOU shrinks it by one, as for Celery's
    /// prefork pool (see [`PoolHandle`]).
    pub async fn run_until_signal(self) -> Result<WorkerReport> {
        // Listeners are installed before the worker starts, so that no signal sent after the
        // "worker started" line takes its default action (SIGTTIN would stop the process).
        let listener = tokio::spawn(signal::listen(
            self.shutdown_handle(),
            signal::Signals::new(),
        ));
        let resizer = signal::resizer(self.pool_handle()).map(tokio::spawn);
        let report = self.run().await;
        listener.abort();
        if let Some(r) = resizer {
            r.abort();
        }
        report
    }
}

fn spawn_delivery(
    shared: Arc<Shared>,
    delivery: Delivery,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let span = tracing::info_span!(
        "task",
        task_id = tracing::field::Empty,
        task_name = tracing::field::Empty,
        queue = %delivery.queue,
    );
    // Boxed: the handler's state machine is several kilobytes (4.8 KB in a debug build), and
    // tokio moves a spawned future by value through its spawn path and again when the task's
    // output is taken; boxed, each of those moves is a pointer's. `perf` of a Redis drain:
    // `memmove` 8.8–9.3 % of the worker's samples before, 6.7–6.9 % after.
    Box::pin(execute::handle(shared, delivery, span.clone())).instrument(span)
}

fn log_join(joined: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        // A bug in the pipeline, not in a task (task panics are caught and stored). The
        // delivery, never settled, comes back when its lease runs out.
        tracing::error!(error = %e, "a delivery's handler panicked");
    }
}
