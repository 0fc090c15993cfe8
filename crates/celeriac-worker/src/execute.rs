//! The two ends of the pipeline: [`Intake`] turns a delivery into a [`Request`] and runs it
//! through the layers; [`Execute`], the innermost step, runs the task's body on the pool.
//!
//! For the worker's consume loop, which spawns one [`Intake::handle`] per delivery inside a
//! span with `task_id`, `task_name` and `queue`. A message that does not decode (or names an
//! unknown task) never becomes a request: its id, when readable, gets FAILURE and the message
//! goes to the dead-letter queue. Everything else is the layers' business (see
//! [`pipeline`](crate::pipeline)).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use celeriac_core::meta::RemoteError;
use celeriac_core::security::BodySigner;
use celeriac_core::{BoxFuture, Delivery, DynBroker, Registry, TaskContext};

use crate::dead;
use crate::pipeline::{Inner, Outcome, Request, Stack};
use crate::pool::{Executor, Finished};
use crate::ratelimit::RateLimiter;
use crate::record::Recorder;
use crate::report::{Counters, Tally};
use crate::request::{self, Decoded};
use crate::tracker::Tracker;
use crate::turns::Arrival;

/// Where deliveries enter: decoding, refusals, then the layers.
#[derive(Debug)]
pub(crate) struct Intake {
    pub(crate) registry: Arc<Registry>,
    /// Bodies larger than this are refused undecoded ([`WorkerOptions::max_message_size`]).
    ///
    /// [`WorkerOptions::max_message_size`]: crate::WorkerOptions::max_message_size
    pub(crate) max_message_size: Option<usize>,
    /// With one, only messages it verifies run ([`WorkerOptions::signer`]).
    ///
    /// [`WorkerOptions::signer`]: crate::WorkerOptions::signer
    pub(crate) signer: Option<Arc<dyn BodySigner>>,
    pub(crate) recorder: Recorder,
    pub(crate) broker: DynBroker,
    pub(crate) hostname: String,
    pub(crate) counters: Arc<Counters>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) stack: Stack,
    /// Deliveries received so far: the next one's arrival number ([`Request::seq`]).
    pub(crate) arrivals: AtomicU64,
    /// Rate limits, for the places of held-back deliveries (see [`crate::turns`]).
    pub(crate) limiter: Arc<RateLimiter>,
}

impl Intake {
    /// Numbers `delivery`, called by the consume loop in the order deliveries come; a task
    /// under a rate limit, due now, also gets its place among its name's held-back
    /// deliveries.
    pub(crate) fn arrived(&self, delivery: &Delivery) -> (u64, Option<Arrival>) {
        let seq = self.arrivals.fetch_add(1, Ordering::Relaxed);
        let arrival = delivery.message.as_ref().ok().and_then(|m| {
            let name = m.headers.task.as_str();
            let def = self.registry.get(name)?;
            let limited = self
                .limiter
                .limit_for(name, def.options.rate_limit)
                .is_some();
            (limited && m.headers.eta.is_none()).then(|| self.limiter.turns(name).arrive(seq))
        });
        (seq, arrival)
    }

    /// Runs one delivery, which arrived `seq`-th (at `arrival` among its name's held-back
    /// ones), to the end and settles it. `span` is the execution's span (the caller
    /// instruments this future with it); the task id and name are recorded on it once the
    /// message is decoded.
    pub(crate) async fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        (seq, arrival): (u64, Option<Arrival>),
        span: tracing::Span,
    ) {
        let (message, handle) = delivery.into_parts();
        let decoded: Decoded = match request::decode_checked(
            message,
            &self.registry,
            self.max_message_size,
            self.signer.as_deref(),
        ) {
            Ok(d) => d,
            Err(refusal) => {
                if let Some(id) = &refusal.task_id {
                    span.record("task_id", id.as_str());
                }
                if let Some(name) = &refusal.task_name {
                    span.record("task_name", name.as_str());
                }
                tracing::error!(
                    error = %refusal.error,
                    "cannot run the message; moving it to the dead-letter queue"
                );
                if let Some(id) = &refusal.task_id {
                    let reply_to = refusal
                        .message
                        .as_ref()
                        .and_then(|m| m.properties.reply_to.as_deref());
                    self.recorder
                        .refused(id, refusal.task_name.as_deref(), reply_to, &refusal.error)
                        .await;
                }
                let reason = refusal.error.summary();
                let moved = dead::move_delivery(
                    &*self.broker,
                    &handle,
                    refusal.message,
                    &reason,
                    &self.hostname,
                )
                .await;
                if moved {
                    self.counters.add(Tally::DeadLettered);
                }
                self.counters.add(Tally::Rejected);
                return;
            }
        };
        let req = Arc::new(Request::new(decoded, Arc::new(handle), seq, arrival));
        span.record("task_id", req.id());
        span.record("task_name", req.name());
        tracing::info!(retries = req.message.headers.retries, "task received");
        let _held = self.tracker.hold(&req);
        self.stack.run(&req).await;
    }
}

/// Runs the body on the worker's pool: the innermost step.
#[derive(Debug)]
pub(crate) struct Execute {
    pub(crate) executor: Executor,
    pub(crate) hostname: String,
}

impl Inner for Execute {
    fn run<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let ctx = TaskContext::for_message(
                req.message.clone(),
                &req.queue,
                &self.hostname,
                req.cancel.clone(),
            );
            let started = Instant::now();
            req.mark_started();
            let mut spawned = self.executor.spawn(
                &req.def.handler,
                ctx,
                req.body.args.clone(),
                req.body.kwargs.clone(),
                &req.child,
            );
            let finished = spawned.join().await;
            let runtime = started.elapsed();
            req.set_runtime(runtime);
            let runtime = runtime.as_secs_f64();
            match finished {
                Finished::Returned(Ok(value)) => {
                    tracing::info!(runtime = %crate::report::Seconds(runtime), "task succeeded");
                    Outcome::Succeeded(value)
                }
                Finished::Returned(Err(err)) => Outcome::Errored(err),
                Finished::Panicked(msg) => {
                    tracing::error!(runtime = %crate::report::Seconds(runtime), panic = %msg, "task panicked");
                    Outcome::Failed(RemoteError::new("Panic", msg))
                }
                Finished::Lost(how) if req.acks_late() => {
                    // Celery's reject_on_worker_lost: run it again elsewhere; a task that
                    // kills its process every time ends in the dead-letter queue
                    // (max_redeliveries).
                    tracing::error!(runtime = %crate::report::Seconds(runtime), lost = %how, "the task's process died; requeued");
                    Outcome::Requeued
                }
                Finished::Lost(how) => {
                    tracing::error!(runtime = %crate::report::Seconds(runtime), lost = %how, "the task's process died");
                    Outcome::Failed(
                        RemoteError::new("WorkerLostError", how).with_module("billiard.exceptions"),
                    )
                }
            }
        })
    }
}
