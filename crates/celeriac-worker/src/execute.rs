//! The life of one delivery, from bytes to a settled message: [`handle`].
//!
//! For the worker's consume loop, which spawns one `handle` per delivery inside a span with
//! `task_id`, `task_name` and `queue`. The steps are small modules composed here in order:
//! `request` (decode), `schedule` (eta, expiry), `ratelimit` and the concurrency slot, the
//! duplicate check, `pool` under `timelimit`, then `retry` and `record`. A delivery that has
//! not started yet watches for a warm shutdown and is handed back (requeued) when one comes;
//! a running one watches for a cold shutdown.
//!
//! Why a backend read before every run: it is what makes a redelivered duplicate harmless and
//! revocation work without a broadcast channel; it costs one lookup per task, or none when the
//! broker read the state with the fetch (`Delivery::stored`, see `probed_state`).
//!
//! Acknowledgement: early by default (sent when the task passes its last checks and awaited
//! with the run, so a crash mid-task loses it, as in Celery), late with `acks_late` (after the
//! result is stored, so a crash runs it again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac_core::meta::RemoteError;
use celeriac_core::{
    Cancellation, Delivery, DeliveryHandle, DynBroker, Handler, PublishOptions, Registry, Requeue,
    TaskContext, TaskState,
};
use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::options::{Pool, WorkerOptions};
use crate::pool::{Executor, Finished};
use crate::ratelimit::RateLimiter;
use crate::record::Recorder;
use crate::report::{Counters, Tally};
use crate::request::{self, Request};
use crate::retry::{self, Verdict};
use crate::revoke::{self, Registration, RunningIds};
use crate::schedule::{self, Gate};
use crate::shutdown::{Phase, PhaseWatch};
use crate::timelimit::{self, Ended, Limits};
use crate::{canvas, dead};
use crate::{lease, retry::retry_message};

/// What every delivery of one worker shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) broker: DynBroker,
    pub(crate) registry: Arc<Registry>,
    pub(crate) options: WorkerOptions,
    pub(crate) recorder: Recorder,
    pub(crate) executor: Executor,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) limiter: RateLimiter,
    pub(crate) counters: Counters,
    pub(crate) phase: PhaseWatch,
    /// The broker parks delayed messages itself.
    pub(crate) broker_delays: bool,
    /// The broker can extend a delivery's lease.
    pub(crate) lease_extension: bool,
    /// Running task ids, watched for terminate revokes when there is a result backend.
    pub(crate) running: Option<Arc<RunningIds>>,
}

/// Runs one delivery to the end and settles it.
/// `span` is the execution's span (the caller instruments this future with it); the task id
/// and name are recorded on it once the message is decoded.
pub(crate) async fn handle(shared: Arc<Shared>, delivery: Delivery, span: tracing::Span) {
    let (message, handle) = delivery.into_parts();
    let handle = Arc::new(handle);
    let req = match request::decode(message, &handle.queue, &shared.registry) {
        Ok(r) => r,
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
                shared
                    .recorder
                    .refused(id, refusal.task_name.as_deref(), &refusal.error)
                    .await;
            }
            let reason = refusal.error.summary();
            dead_letter(&shared, &handle, refusal.message, &reason).await;
            shared.counters.add(Tally::Rejected);
            return;
        }
    };
    span.record("task_id", req.id());
    span.record("task_name", req.name());
    tracing::info!(retries = req.message.headers.retries, "task received");

    let max = shared.options.max_redeliveries;
    if handle.redeliveries > max {
        if let Some(state) = shared.recorder.ready_state(req.id()).await {
            tracing::info!(state = %state, "redelivered task already has a ready result; not running it again");
            canvas::on_duplicate(&shared, &req, true).await;
            settle(&handle, Settle::Ack).await;
            shared.counters.add(Tally::Skipped);
            return;
        }
        let reason = format!(
            "delivered {} times, more than max_redeliveries ({max}) allows",
            u64::from(handle.redeliveries) + 1
        );
        tracing::error!(
            redeliveries = handle.redeliveries,
            "poison message: {reason}"
        );
        let err = RemoteError::new("DeliveryLimitExceeded", reason.clone())
            .with_module("celeriac.exceptions");
        failed(&shared, &req, &err).await;
        dead_letter(
            &shared,
            &handle,
            Some(Arc::unwrap_or_clone(req.message)),
            &reason,
        )
        .await;
        return;
    }

    let keeper = lease::keep(
        handle.clone(),
        shared.options.visibility_timeout,
        shared.lease_extension,
    );
    let tally = run_request(&shared, &req, &handle, keeper).await;
    shared.counters.add(tally);
}

/// Moves a delivery's message (or a placeholder, when it did not decode) to its queue's
/// dead-letter queue, then acks it; if that fails, requeues it for later.
async fn dead_letter(
    shared: &Shared,
    handle: &DeliveryHandle,
    message: Option<celeriac_core::Message>,
    reason: &str,
) {
    let dead = dead::dead_queue(&handle.queue);
    let mut m = message.unwrap_or_else(dead::placeholder);
    dead::mark(
        &mut m,
        &handle.queue,
        reason,
        &shared.options.hostname,
        handle.redeliveries.saturating_add(1),
    );
    let moved = async {
        shared.broker.declare(&dead).await?;
        shared
            .broker
            .publish(&dead, &m, PublishOptions::default())
            .await
    };
    match moved.await {
        Ok(()) => {
            tracing::warn!(dead_queue = %dead, reason, "message moved to the dead-letter queue");
            settle(handle, Settle::Ack).await;
            shared.counters.add(Tally::DeadLettered);
        }
        Err(e) => {
            tracing::error!(error = %e, dead_queue = %dead, "cannot dead-letter the message; requeueing it in 30 s");
            settle(
                handle,
                Settle::Reject(Requeue::After(Duration::from_secs(30))),
            )
            .await;
        }
    }
}

/// How to settle a delivery.
#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Reject(Requeue),
}

async fn settle(handle: &DeliveryHandle, how: Settle) {
    let r = match how {
        Settle::Ack => handle.ack().await,
        Settle::Reject(requeue) => handle.reject(requeue).await,
    };
    if let Err(e) = r {
        tracing::error!(error = %e, action = ?how, "cannot settle the delivery");
    }
}

async fn run_request(
    shared: &Shared,
    req: &Request,
    handle: &DeliveryHandle,
    keeper: lease::LeaseKeeper,
) -> Tally {
    // 1. When: expired, deferred, or now.
    match schedule::gate(&req.message.headers, Utc::now()) {
        Gate::Run => {}
        Gate::Expired => return expire(shared, req, handle, keeper).await,
        Gate::Defer(eta) => {
            if shared.broker_delays {
                let options = PublishOptions::default()
                    .not_before(Some(eta))
                    .priority(Some(req.message.properties.priority));
                match shared
                    .broker
                    .publish(&req.queue, &req.message, options)
                    .await
                {
                    Ok(()) => {
                        tracing::info!(eta = %eta, "task has a future eta; parked in the broker");
                        drop(keeper);
                        settle(handle, Settle::Ack).await;
                        return Tally::Requeued;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot park the task in the broker; holding it");
                    }
                }
            }
            // The fallback for brokers without a delayed store: hold the delivery unacked
            // (its lease is kept alive) until the eta.
            let wait = (eta - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shared.phase.reached(Phase::Warm) => return hand_back(handle, keeper).await,
            }
        }
    }

    // 2. Wait for a rate-limit token, then a slot; a warm shutdown hands the delivery back.
    let wait_turn = async {
        if let Some(limit) = req.def.options.rate_limit {
            shared.limiter.acquire(req.name(), limit).await;
        }
        shared.slots.clone().acquire_owned().await
    };
    let permit = tokio::select! {
        biased;
        () = shared.phase.reached(Phase::Warm) => return hand_back(handle, keeper).await,
        p = wait_turn => match p {
            Ok(p) => p,
            Err(_) => return hand_back(handle, keeper).await,
        },
    };

    // 3. Last checks: expired while waiting, or already done (a duplicate, or revoked).
    if schedule::gate(&req.message.headers, Utc::now()) == Gate::Expired {
        return expire(shared, req, handle, keeper).await;
    }
    // An early ack goes out when the check does and is awaited with the run, not before it:
    // the message is acked whichever way the check goes, and a crash before the ack lands
    // only loses what an early ack loses anyway (Celery's prefork pool, too, acks while the
    // child already runs the task).
    let opts = &req.def.options;
    let acks_late = opts.acks_late;
    let keeper = if acks_late {
        Some(keeper)
    } else {
        drop(keeper);
        None
    };
    let early_ack = async {
        if !acks_late {
            settle(handle, Settle::Ack).await;
        }
    };
    let check_and_run = async {
        let ready = match probed_state(shared, req, handle) {
            Some(state) => state,
            None => shared.recorder.ready_state(req.id()).await,
        };
        if let Some(state) = ready {
            tracing::info!(state = %state, "task already has a ready result; not running it again");
            canvas::on_duplicate(shared, req, handle.redeliveries > 0).await;
            drop(keeper);
            if acks_late {
                settle(handle, Settle::Ack).await;
            }
            return if state == TaskState::Revoked {
                Tally::Revoked
            } else {
                Tally::Skipped
            };
        }
        start(shared, req, handle, keeper, permit).await
    };
    let ((), tally) = tokio::join!(early_ack, check_and_run);
    tally
}

/// The check's answer from the state the broker read with the message, when there is one
/// for this task and it is recent: read within `revoke_poll_interval`, the time in which a
/// worker also notices a revoke of a running task. `None`: read the backend.
fn probed_state(
    shared: &Shared,
    req: &Request,
    handle: &DeliveryHandle,
) -> Option<Option<TaskState>> {
    let stored = handle.stored.as_ref()?;
    let fresh = stored.read_at.elapsed() <= shared.options.revoke_poll_interval;
    (fresh && stored.task_id == req.id()).then(|| stored.state.clone().filter(TaskState::is_ready))
}

/// Runs a task that passed its checks, records the outcome and settles an acks-late
/// delivery (`keeper` holds its lease; `None` for an early ack, settled by the caller).
async fn start(
    shared: &Shared,
    req: &Request,
    handle: &DeliveryHandle,
    keeper: Option<lease::LeaseKeeper>,
    permit: OwnedSemaphorePermit,
) -> Tally {
    let opts = &req.def.options;
    let acks_late = opts.acks_late;
    // 4. Start.
    if shared.options.track_started || opts.track_started {
        shared.recorder.started(req).await;
    }
    let cancel = Cancellation::new();
    let ctx = TaskContext::for_message(
        req.message.clone(),
        &req.queue,
        &shared.options.hostname,
        cancel.clone(),
    );
    let limits = Limits::resolve(req.message.headers.timelimit, opts);
    let started = Instant::now();
    let spawned = shared.executor.spawn(
        &req.def.handler,
        ctx,
        req.body.args.clone(),
        req.body.kwargs.clone(),
    );
    let child = spawned.child_pid();
    let mut revoke = match &shared.running {
        Some(running) => running.register(req.id()),
        None => Registration::none(),
    };
    // Boxed so that dropping it below really drops the body (which aborts an async one).
    let mut run = Box::pin(timelimit::run(spawned, limits, cancel.clone()));
    let mut terminated = false;
    let ended = tokio::select! {
        biased;
        e = &mut run => Some(e),
        () = shared.phase.reached(Phase::Cold) => {
            tracing::warn!("cold shutdown: cancelling the task");
            cancel.cancel();
            tokio::time::timeout(shared.options.cold_shutdown_grace, &mut run).await.ok()
        }
        signal = revoke.requested() => {
            terminated = true;
            terminate(shared, &cancel, child.as_ref(), &signal, &mut run).await;
            None
        }
    };
    drop(revoke);
    drop(permit);
    if terminated {
        // Stopped on request: REVOKED (not FAILURE), and the delivery is done with.
        drop(run);
        drop(keeper);
        shared.recorder.revoked(req, "terminated").await;
        canvas::on_duplicate(shared, req, false).await;
        if acks_late {
            settle(handle, Settle::Ack).await;
        }
        return Tally::Revoked;
    }
    let Some(ended) = ended else {
        drop(run);
        drop(keeper);
        return if acks_late {
            tracing::warn!("task still running after the cold shutdown grace; requeued");
            settle(handle, Settle::Reject(Requeue::Now)).await;
            Tally::Requeued
        } else {
            tracing::error!("task still running after the cold shutdown grace; it is lost");
            let lost = RemoteError::new("WorkerLostError", "worker stopped by a cold shutdown")
                .with_module("billiard.exceptions");
            failed(shared, req, &lost).await;
            Tally::Failed
        };
    };
    let runtime = started.elapsed();

    // 5. Record the outcome, then settle an acks-late delivery.
    let (tally, how) = match ended {
        Ended::Finished(Finished::Returned(Ok(value))) => {
            tracing::info!(runtime = runtime.as_secs_f64(), "task succeeded");
            shared.recorder.success(req, value.clone()).await;
            canvas::on_success(shared, req, &value).await;
            (Tally::Succeeded, Settle::Ack)
        }
        Ended::Finished(Finished::Returned(Err(err))) => {
            let retries = req.message.headers.retries;
            match retry::verdict(&err, opts, retries, req.name(), req.id()) {
                Verdict::Fail(remote) => {
                    tracing::error!(runtime = runtime.as_secs_f64(), error = %remote, "task failed");
                    failed(shared, req, &remote).await;
                    (Tally::Failed, Settle::Ack)
                }
                Verdict::Retry { delay, cause } => (
                    // Boxed: a rare path with a large future.
                    Box::pin(schedule_retry(shared, req, delay, &cause)).await,
                    Settle::Ack,
                ),
                Verdict::Reject { requeue } => {
                    tracing::warn!(requeue, reason = err.message(), "task rejected its message");
                    let requeue = if requeue { Requeue::Now } else { Requeue::Drop };
                    if !acks_late && requeue == Requeue::Now {
                        // Already acked when it started: requeue a copy instead.
                        if let Err(e) = shared
                            .broker
                            .publish(&req.queue, &req.message, PublishOptions::default())
                            .await
                        {
                            tracing::error!(error = %e, "cannot requeue the rejected task");
                        }
                    }
                    (Tally::Rejected, Settle::Reject(requeue))
                }
            }
        }
        Ended::Finished(Finished::Panicked(msg)) => {
            tracing::error!(runtime = runtime.as_secs_f64(), panic = %msg, "task panicked");
            let remote = RemoteError::new("Panic", msg);
            failed(shared, req, &remote).await;
            (Tally::Failed, Settle::Ack)
        }
        Ended::Finished(Finished::Lost(how)) => {
            if acks_late {
                // Celery's reject_on_worker_lost: run it again elsewhere; a task that kills
                // its process every time ends in the dead-letter queue (max_redeliveries).
                tracing::error!(runtime = runtime.as_secs_f64(), lost = %how, "the task's process died; requeued");
                (Tally::Requeued, Settle::Reject(Requeue::Now))
            } else {
                tracing::error!(runtime = runtime.as_secs_f64(), lost = %how, "the task's process died");
                let lost =
                    RemoteError::new("WorkerLostError", how).with_module("billiard.exceptions");
                failed(shared, req, &lost).await;
                (Tally::Failed, Settle::Ack)
            }
        }
        Ended::TimedOut(limit) => {
            let how = match (&req.def.handler, shared.options.pool) {
                (Handler::Async(_), _) => "task aborted",
                (Handler::Blocking(_), Pool::Processes) => "task's process killed",
                (Handler::Blocking(_), _) => {
                    "task abandoned: a thread cannot be killed, it runs on"
                }
            };
            tracing::error!(
                hard_limit = limit.as_secs_f64(),
                "hard time limit exceeded; {how}"
            );
            failed(shared, req, &timelimit::exceeded(limit)).await;
            (Tally::Failed, Settle::Ack)
        }
    };
    drop(keeper);
    if acks_late {
        settle(handle, how).await;
    }
    tally
}

/// Publishes the retry, stores RETRY; a failed publish becomes FAILURE with the cause.
async fn schedule_retry(
    shared: &Shared,
    req: &Request,
    delay: Duration,
    cause: &RemoteError,
) -> Tally {
    let eta = Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
    let message = retry_message(&req.message, eta);
    let options = PublishOptions::default()
        .priority(Some(req.message.properties.priority))
        .not_before(shared.broker_delays.then_some(eta));
    match shared.broker.publish(&req.queue, &message, options).await {
        Ok(()) => {
            tracing::warn!(
                retries = message.headers.retries,
                delay = delay.as_secs_f64(),
                error = %cause,
                "task will be retried"
            );
            shared.recorder.retry(req, cause).await;
            Tally::Retried
        }
        Err(e) => {
            tracing::error!(error = %e, cause = %cause, "cannot publish the retry; task failed");
            failed(shared, req, cause).await;
            Tally::Failed
        }
    }
}

/// Stores FAILURE, then sends the errbacks and the chain's and chord's consequences.
async fn failed(shared: &Shared, req: &Request, err: &RemoteError) {
    shared.recorder.failure(req, err).await;
    canvas::on_failure(shared, req, err).await;
}

async fn expire(
    shared: &Shared,
    req: &Request,
    handle: &DeliveryHandle,
    keeper: lease::LeaseKeeper,
) -> Tally {
    tracing::info!("task expired; revoking it");
    drop(keeper);
    shared.recorder.revoked(req, "expired").await;
    canvas::on_duplicate(shared, req, false).await;
    settle(handle, Settle::Ack).await;
    Tally::Revoked
}

/// Stops a running task for a terminate revoke: fires its cancellation, signals its pool child
/// (processes pool), and gives it the cold-shutdown grace to end; the caller then drops it
/// (which aborts an async body and SIGKILLs a child that is still there).
async fn terminate(
    shared: &Shared,
    cancel: &Cancellation,
    child: Option<&crate::pool::ChildPid>,
    signal: &str,
    run: &mut (impl std::future::Future<Output = Ended> + Unpin),
) {
    tracing::warn!(signal, "revoked with terminate: stopping the task");
    cancel.cancel();
    if let Some(pid) = child.and_then(crate::pool::ChildPid::get) {
        revoke::send_signal(pid, signal).await;
    }
    if tokio::time::timeout(shared.options.cold_shutdown_grace, run)
        .await
        .is_err()
    {
        tracing::warn!("the terminated task did not stop within the grace; dropping it");
    }
}

async fn hand_back(handle: &DeliveryHandle, keeper: lease::LeaseKeeper) -> Tally {
    drop(keeper);
    tracing::info!("shutting down: returning the unstarted task to the queue");
    settle(handle, Settle::Reject(Requeue::Now)).await;
    Tally::Requeued
}
