//! [`Worker`]: the consume loop that feeds deliveries to the pipeline, and its shutdown.
//!
//! The loop only fetches and spawns: each delivery gets its own tokio task (inside a span with
//! `task_id`, `task_name`, `queue`) that takes it through the layers (see
//! [`pipeline`](crate::pipeline)): it waits for its rate-limit token and slot, runs and is
//! settled. Prefetch (`concurrency + prefetch_buffer`) is enforced by the broker's consumer,
//! which hands out no more unsettled deliveries than that; a semaphore of `concurrency`
//! permits bounds what runs. So a rate-limited task waits without blocking anything else, and
//! it stays unacked (counting against prefetch) while it waits.

mod signal;

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::broadcast::Clock;
use celeriac_core::{
    ConsumeOptions, Consumer, Delivery, DynBackend, DynBroker, ErrorKind, Registry, Result,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::autoscale::{self, Bounds};
use crate::canvas::CanvasLayer;
use crate::control::{self, Node, QueueChange};
use crate::coord::CoordinationLayer;
use crate::events::{self, Events, StartedEventLayer, TaskEventsLayer};
use crate::execute::{Execute, Intake};
use crate::gate::GateLayer;
use crate::options::WorkerOptions;
use crate::pipeline::{Layer, Stack};
use crate::pool::{AbortOnDrop, Executor, PoolHandle};
use crate::ratelimit::{RateLimitLayer, RateLimiter};
use crate::record::{RecordLayer, Recorder, TrackStartedLayer};
use crate::redelivery::RedeliveryLimitLayer;
use crate::report::{Counters, WorkerReport};
use crate::retry::RetryLayer;
use crate::revoke::{Revoked, RunningIds, TerminateLayer};
use crate::schedule::ScheduleLayer;
use crate::settle::SettleLayer;
use crate::shutdown::{ColdShutdownLayer, Phase, PhaseWatch, ShutdownHandle};
use crate::slot::SlotLayer;
use crate::timelimit::{TimeLimitLayer, TimeLimits};
use crate::tracker::Tracker;

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
    /// Layers added around every decoded delivery, outermost first.
    delivery_layers: Vec<Arc<dyn Layer>>,
    /// Layers added around every run, outermost first.
    run_layers: Vec<Arc<dyn Layer>>,
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
        let registry = crate::builtins::with_builtins(registry, backend.clone());
        Worker {
            broker,
            backend,
            registry,
            options,
            shutdown: ShutdownHandle::new(),
            executor,
            pool,
            delivery_layers: Vec::new(),
            run_layers: Vec::new(),
        }
    }

    /// Adds `layer` around every task that starts: inside the rate limit, the concurrency
    /// slot and the checks (expired, revoked, duplicate), outside the body and its time
    /// limits. It sees the task's [`Outcome`](crate::Outcome) as it comes from the body, an
    /// [`Outcome::Errored`](crate::Outcome::Errored) before the retry decision. Layers run in
    /// the order they are added, the first outermost. See [`pipeline`](crate::pipeline).
    #[must_use]
    pub fn layer(mut self, layer: impl Layer) -> Self {
        self.run_layers.push(Arc::new(layer));
        self
    }

    /// Adds `layer` around every decoded delivery, those that never run included (expired,
    /// revoked, duplicates, dead-lettered): inside the layer that settles the delivery,
    /// outside everything else. It sees the final [`Outcome`](crate::Outcome) after it was
    /// stored and its callbacks sent, before the delivery is acked. Layers run in the order
    /// they are added, the first outermost. See [`pipeline`](crate::pipeline).
    #[must_use]
    pub fn delivery_layer(mut self, layer: impl Layer) -> Self {
        self.delivery_layers.push(Arc::new(layer));
        self
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
    /// Fails only when the options are out of bounds (a prefetch above
    /// [`MAX_PREFETCH`](celeriac_core::config::MAX_PREFETCH)) or the queues cannot be
    /// declared or consumed at start.
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
        if self.options.content_type == celeriac_core::ContentType::Auth
            && self.options.signer.is_none()
        {
            return Err(celeriac_core::Error::config(
                "serializer \"auth\" needs a signer (WorkerOptions::signer, set by \
                 App::worker_options when the security_* settings load)",
            ));
        }
        let Worker {
            broker,
            backend,
            registry,
            options,
            shutdown,
            executor,
            pool,
            delivery_layers,
            run_layers,
        } = self;
        celeriac_core::config::check_prefetch(options.concurrency, options.prefetch_buffer)?;
        let coordinated = crate::coord::check(&registry, backend.as_ref());
        for q in &options.queues {
            broker.declare(q).await?;
        }
        let consume = ConsumeOptions::new(options.prefetch())
            .lease(options.visibility_timeout)
            .result_probe(backend.as_ref().and_then(|b| b.capabilities().probe));
        let caps = broker.capabilities();
        let phase = shutdown.watch();
        let clock = Arc::new(Clock::new());
        let tracker = Arc::new(Tracker::default());
        let revoked = Arc::new(Revoked::default());
        let running = Arc::new(RunningIds::default());
        let limiter = Arc::new(RateLimiter::default());
        let time_limits = Arc::new(TimeLimits::default());
        let (events, publisher) = Events::new(
            broker.clone(),
            options.hostname.clone(),
            clock.clone(),
            options.task_events,
        );
        let publisher = publisher.map(tokio::spawn);
        let (queue_changes, mut queue_rx) = mpsc::unbounded_channel();
        let autoscale = Arc::new(std::sync::Mutex::new(options.autoscale.map(
            |(max, min)| Bounds {
                max: max.max(1),
                min: min.clamp(1, max.max(1)),
            },
        )));
        let node = Arc::new(Node {
            hostname: options.hostname.clone(),
            broker: broker.clone(),
            backend: backend.clone(),
            registry: registry.clone(),
            options: options.clone(),
            clock: clock.clone(),
            started: std::time::Instant::now(),
            tracker: tracker.clone(),
            revoked: revoked.clone(),
            running: running.clone(),
            limiter: limiter.clone(),
            time_limits: time_limits.clone(),
            pool: pool.clone(),
            shutdown: shutdown.clone(),
            events: events.clone(),
            queues: std::sync::Mutex::new(options.queues.clone()),
            queue_changes,
            autoscale: autoscale.clone(),
        });
        // Under serializer `auth`, requests are obeyed only when signed by a trusted key
        // (`control::Node::channels`), as Celery's workers do.
        let control = options.remote_control && broker.broadcast().is_some();
        if control {
            // In the background: consuming does not wait the second it takes to hear from
            // every node; revokes learned apply to what has not run yet.
            let node = node.clone();
            tokio::spawn(async move { control::mingle(&node).await });
        }
        let mut consumer = Some(broker.consume(&options.queues, consume.clone()).await?);
        let concurrency = options.concurrency.max(1);
        tracing::info!(
            hostname = %options.hostname,
            queues = ?options.queues,
            concurrency,
            pool = %options.pool,
            prefetch = options.prefetch(),
            tasks = registry.len(),
            remote_control = control,
            task_events = events.task_events(),
            "worker started"
        );
        pool.prestart();
        let control = control.then(|| AbortOnDrop(tokio::spawn(control::serve(node.clone()))));
        let (stop_beats, beats_stopped) = oneshot::channel::<()>();
        let heartbeats = tokio::spawn(events::heartbeats(
            events.clone(),
            tracker.clone(),
            options.heartbeat_interval,
            async {
                let _ = beats_stopped.await;
            },
        ));
        let autoscaler = autoscale
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
            .then(|| {
                AbortOnDrop(tokio::spawn(autoscale::run(
                    autoscale.clone(),
                    pool.clone(),
                    tracker.clone(),
                )))
            });
        let watcher = backend.clone().map(|b| {
            AbortOnDrop(tokio::spawn(
                running.clone().watch(b, options.revoke_poll_interval),
            ))
        });
        let counters = Arc::new(Counters::default());
        let intake = Arc::new(Intake {
            arrivals: Default::default(),
            limiter: limiter.clone(),
            max_message_size: options.max_message_size,
            signer: options.signer.clone(),
            recorder: Recorder::new(backend.clone(), options.hostname.clone()),
            broker: broker.clone(),
            hostname: options.hostname.clone(),
            counters: counters.clone(),
            tracker: tracker.clone(),
            stack: pipeline(Pipeline {
                broker: &broker,
                backend: backend.as_ref(),
                registry: &registry,
                options: &options,
                executor,
                pool: &pool,
                phase: &phase,
                counters: &counters,
                running,
                revoked,
                limiter,
                time_limits,
                events: &events,
                delivery_layers,
                run_layers,
                lease_extension: caps.lease_extension,
                broker_delays: caps.delay,
                coordinated,
            }),
            registry,
        });
        let mut queues = options.queues.clone();

        let mut tasks = JoinSet::new();
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                biased;
                () = phase.reached(Phase::Warm) => break,
                Some(change) = queue_rx.recv() => {
                    if let Some(q) = change_queues(&mut queues, change) {
                        if let Err(e) = broker.declare(&q).await {
                            tracing::error!(queue = %q, error = %format_args!("{e:#}"), "cannot declare the queue to consume");
                        }
                    }
                    // A new consumer of the new set; the old one's prefetched deliveries
                    // come back to the queue when it is dropped.
                    drop(consumer.take());
                    if !queues.is_empty() {
                        match broker.consume(&queues, consume.clone()).await {
                            Ok(c) => consumer = Some(c),
                            Err(e) => tracing::error!(error = %format_args!("{e:#}"), queues = ?queues, "cannot consume the queues"),
                        }
                    }
                    *node.queues.lock().unwrap_or_else(|e| e.into_inner()) = queues.clone();
                    tracing::info!(queues = ?queues, "now consuming");
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
                next = next_delivery(&mut consumer) => match next {
                    Ok(Some(delivery)) => {
                        backoff = Duration::from_millis(100);
                        tasks.spawn(spawn_delivery(intake.clone(), delivery));
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
                        tracing::error!(error = %format_args!("{e:#}"), retry_in = backoff.as_secs_f64(), "cannot fetch from the broker");
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
        let mut soft = options
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
        drop(autoscaler);
        drop(control);
        let _ = stop_beats.send(());
        let _ = heartbeats.await;
        events.close();
        if let Some(p) = publisher {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), p).await;
        }
        let report = counters.report();
        tracing::info!(%report, "worker stopped");
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
    intake: Arc<Intake>,
    delivery: Delivery,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let span = tracing::info_span!(
        "task",
        task_id = tracing::field::Empty,
        task_name = tracing::field::Empty,
        queue = %delivery.queue,
    );
    // Before the span is first entered: once started, an OpenTelemetry span keeps its parent.
    #[cfg(feature = "otel")]
    if let Ok(m) = &delivery.message
        && let Some(cx) = m.headers.trace_context()
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let _ = span.set_parent(cx);
    }
    // Boxed: the handler's state machine is several kilobytes (4.8 KB in a debug build), and
    // tokio moves a spawned future by value through its spawn path and again when the task's
    // output is taken; boxed, each of those moves is a pointer's. `perf` of a Redis drain:
    // `memmove` 8.8–9.3 % of the worker's samples before, 6.7–6.9 % after.
    let arrived = intake.arrived(&delivery);
    Box::pin(intake.handle(delivery, arrived, span.clone())).instrument(span)
}

/// What the worker's layers are made of.
struct Pipeline<'a> {
    broker: &'a DynBroker,
    backend: Option<&'a DynBackend>,
    registry: &'a Arc<Registry>,
    options: &'a WorkerOptions,
    executor: Executor,
    pool: &'a PoolHandle,
    phase: &'a PhaseWatch,
    counters: &'a Arc<Counters>,
    running: Arc<RunningIds>,
    revoked: Arc<Revoked>,
    limiter: Arc<RateLimiter>,
    time_limits: Arc<TimeLimits>,
    events: &'a Arc<Events>,
    delivery_layers: Vec<Arc<dyn Layer>>,
    run_layers: Vec<Arc<dyn Layer>>,
    lease_extension: bool,
    broker_delays: bool,
    /// Whether the result backend keeps coordination across workers.
    coordinated: bool,
}

/// The worker's layers in order, outermost first (the table in [`crate::pipeline`]).
fn pipeline(p: Pipeline<'_>) -> Stack {
    let o = p.options;
    let recorder = || Recorder::new(p.backend.cloned(), o.hostname.clone());
    let mut layers: Vec<Arc<dyn Layer>> = vec![Arc::new(SettleLayer {
        broker: p.broker.clone(),
        hostname: o.hostname.clone(),
        counters: p.counters.clone(),
        lease: o.visibility_timeout,
        lease_extension: p.lease_extension,
    })];
    layers.push(Arc::new(TaskEventsLayer(p.events.clone())));
    layers.extend(p.delivery_layers);
    layers.extend([
        Arc::new(CanvasLayer {
            broker: p.broker.clone(),
            backend: p.backend.cloned(),
            registry: p.registry.clone(),
            content_type: o.content_type,
            signer: o.signer.clone(),
            hostname: o.hostname.clone(),
            broker_delays: p.broker_delays,
        }) as Arc<dyn Layer>,
        Arc::new(RecordLayer(recorder())),
        Arc::new(RedeliveryLimitLayer {
            max: o.max_redeliveries,
            recorder: recorder(),
        }),
        Arc::new(ScheduleLayer {
            broker: p.broker.clone(),
            broker_delays: p.broker_delays,
            phase: p.phase.clone(),
        }),
        Arc::new(RateLimitLayer {
            limiter: p.limiter.clone(),
            phase: p.phase.clone(),
            cluster: p.coordinated,
        }),
        Arc::new(CoordinationLayer {
            backend: p.backend.cloned(),
            limiter: p.limiter,
            phase: p.phase.clone(),
            slot_lease: p.options.slot_lease,
        }),
        Arc::new(SlotLayer {
            slots: p.pool.slots(),
            phase: p.phase.clone(),
        }),
        Arc::new(GateLayer {
            recorder: recorder(),
            revoked: p.revoked,
            fresh_for: o.revoke_poll_interval,
        }),
        Arc::new(RetryLayer {
            broker: p.broker.clone(),
            broker_delays: p.broker_delays,
        }),
    ]);
    layers.push(Arc::new(StartedEventLayer(p.events.clone())));
    layers.extend(p.run_layers);
    layers.extend([
        Arc::new(TrackStartedLayer {
            recorder: recorder(),
            always: o.track_started,
        }) as Arc<dyn Layer>,
        Arc::new(ColdShutdownLayer {
            phase: p.phase.clone(),
            grace: o.cold_shutdown_grace,
        }),
        Arc::new(TerminateLayer {
            running: p.running,
            grace: o.cold_shutdown_grace,
        }),
        Arc::new(TimeLimitLayer {
            pool: o.pool,
            set: p.time_limits,
            defaults: crate::timelimit::Limits {
                hard: o.time_limit.filter(|d| !d.is_zero()),
                soft: o.soft_time_limit.filter(|d| !d.is_zero()),
            },
        }),
    ]);
    Stack::new(
        layers,
        Box::new(Execute {
            executor: p.executor,
            hostname: o.hostname.clone(),
        }),
    )
}

/// The next delivery of `consumer`, or never when the worker consumes no queue.
async fn next_delivery(consumer: &mut Option<Box<dyn Consumer>>) -> Result<Option<Delivery>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// Applies a remote-control queue change to `queues`; returns a queue to declare.
fn change_queues(queues: &mut Vec<String>, change: QueueChange) -> Option<String> {
    match change {
        QueueChange::Add(q) if !queues.contains(&q) => {
            queues.push(q.clone());
            Some(q)
        }
        QueueChange::Add(_) => None,
        QueueChange::Cancel(q) => {
            queues.retain(|x| *x != q);
            None
        }
    }
}

fn log_join(joined: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        // A bug in the pipeline, not in a task (task panics are caught and stored). The
        // delivery, never settled, comes back when its lease runs out.
        tracing::error!(error = %e, "a delivery's handler panicked");
    }
}
