//! Coordination across workers, as a layer: cluster rate limits, concurrency caps, and the
//! release of unique-task locks (see [`celeriac_core::coord`]).
//!
//! Sits where the per-worker rate limit does: a delivery held back stays unacknowledged and
//! counts against prefetch, and a warm shutdown hands it back. The store is the result
//! backend's coordination capability; on a backend without one a worker warns at start
//! ([`check`]), keeps cluster rate limits per worker, and fails tasks with `max_concurrency`.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::coord::{Admission, Coordination, UNIQUE_HEADER};
use celeriac_core::{BoxFuture, DynBackend, RateLimitScope, Registry};

use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::ratelimit::RateLimiter;
use crate::schedule::handed_back;
use crate::shutdown::{Phase, PhaseWatch};

/// Holds each task back until the cluster lets it start, and releases what it took when it
/// ends. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct CoordinationLayer {
    pub(crate) backend: Option<DynBackend>,
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) phase: PhaseWatch,
    /// How long a concurrency slot is leased before it must be renewed; a crashed worker's
    /// slot frees itself after this ([`WorkerOptions::slot_lease`]).
    ///
    /// [`WorkerOptions::slot_lease`]: crate::WorkerOptions::slot_lease
    pub(crate) slot_lease: Duration,
}

/// Warns at start when tasks need a coordination store and `backend` has none: their cluster
/// rate limits fall back to per-worker limits (Celery's), and a task with `max_concurrency`
/// fails with the reason rather than run uncapped. Returns whether the store exists.
pub(crate) fn check(registry: &Registry, backend: Option<&DynBackend>) -> bool {
    if backend.is_some_and(|b| b.capabilities().coordination.is_some()) {
        return true;
    }
    let needs: Vec<&str> = registry
        .names()
        .into_iter()
        .filter(|name| {
            registry.get(name).is_some_and(|d| {
                let o = &d.options;
                o.rate_limit_scope == RateLimitScope::Cluster || o.max_concurrency.is_some()
            })
        })
        .collect();
    if !needs.is_empty() {
        tracing::warn!(
            tasks = %needs.join(", "),
            backend = backend.map_or("none", |b| b.driver()),
            "these tasks ask for coordination across workers, which this result backend \
             cannot keep: cluster rate limits apply per worker, and tasks with \
             max_concurrency fail (result backends that coordinate: {})",
            celeriac_core::coord::STORES
        );
    }
    false
}

/// The error of a task with `max_concurrency` on a worker without a coordination store.
fn no_store(name: &str) -> celeriac_core::RemoteError {
    celeriac_core::RemoteError::new(
        "ImproperlyConfigured",
        format!(
            "task {name} has max_concurrency, which needs a result backend that coordinates \
             workers ({}); this worker's cannot",
            celeriac_core::coord::STORES
        ),
    )
}

impl CoordinationLayer {
    fn store(&self) -> Option<&dyn Coordination> {
        self.backend.as_ref()?.capabilities().coordination
    }
}

impl Layer for CoordinationLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        let o = &req.def.options;
        let cluster_limit = match o.rate_limit_scope {
            RateLimitScope::Cluster if self.store().is_some() => {
                self.limiter.limit_for(req.name(), o.rate_limit)
            }
            _ => None,
        };
        if cluster_limit.is_none() {
            req.leave_turns();
        }
        let unique = req
            .message
            .headers
            .extra
            .get(UNIQUE_HEADER)
            .and_then(|v| v.as_str());
        if cluster_limit.is_none() && o.max_concurrency.is_none() && unique.is_none() {
            return next.run(req);
        }
        let Some(store) = self.store() else {
            // Warned at start: the rate limit layer kept the limit per worker; a unique
            // lock (taken by an app with a store) expires by itself.
            if o.max_concurrency.is_some() {
                let e = no_store(req.name());
                return Box::pin(async move { Outcome::Failed(e) });
            }
            return next.run(req);
        };
        Box::pin(async move {
            if let Some(limit) = cluster_limit {
                // This worker's deliveries of the name ask in the order they arrived; one
                // admitted to a slot ahead gives up its turn and waits for the slot, so the
                // next one asks meanwhile (slots come in the order they were handed out).
                let turns = self.limiter.turns(req.name());
                let admitted = async {
                    let delay = {
                        let _turn = turns.take(req.seq()).await;
                        loop {
                            match store.throttle(req.name(), limit).await {
                                Ok(Admission::At(delay)) => break delay,
                                Ok(Admission::Wait(wait)) => tokio::time::sleep(wait).await,
                                Err(e) => {
                                    tracing::warn!(error = %format!("{e:#}"), task = req.name(),
                                        "cannot reach the cluster rate limit; trying again in 1 s");
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                }
                            }
                        }
                    };
                    tokio::time::sleep(delay).await;
                };
                tokio::select! {
                    biased;
                    () = self.phase.reached(Phase::Warm) => return handed_back(),
                    () = admitted => {}
                }
            }
            let outcome = match o.max_concurrency {
                Some(n) => {
                    tokio::select! {
                        biased;
                        () = self.phase.reached(Phase::Warm) => return handed_back(),
                        () = take_slot(store, req, n, self.slot_lease) => {}
                    }
                    let outcome = {
                        let renew = renew_slot(store, req, n, self.slot_lease);
                        tokio::pin!(renew);
                        let run = next.run(req);
                        tokio::pin!(run);
                        tokio::select! {
                            o = &mut run => o,
                            () = &mut renew => run.await,
                        }
                    };
                    if let Err(e) = store.release(req.name(), req.id()).await {
                        tracing::warn!(error = %format!("{e:#}"), task = req.name(),
                            "cannot free a concurrency slot; its lease frees it later");
                    }
                    outcome
                }
                None => next.run(req).await,
            };
            if let Some(key) = unique {
                if ends_the_task(&outcome) {
                    if let Err(e) = store.unlock(key, req.id()).await {
                        tracing::warn!(error = %format!("{e:#}"), task = req.name(),
                            "cannot release a unique task's lock; it expires by itself");
                    }
                }
            }
            outcome
        })
    }
}

/// Waits for one of `n` slots of the task's name, polling with a growing interval.
async fn take_slot(store: &dyn Coordination, req: &Request, n: u32, lease: Duration) {
    let mut pause = Duration::from_millis(5);
    loop {
        match store.acquire(req.name(), req.id(), n, lease).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), task = req.name(),
                    "cannot take a concurrency slot; trying again");
                pause = Duration::from_secs(1);
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Renews the slot's lease while the task runs; never returns.
async fn renew_slot(store: &dyn Coordination, req: &Request, n: u32, lease: Duration) {
    loop {
        tokio::time::sleep(lease / 3).await;
        if let Err(e) = store.acquire(req.name(), req.id(), n, lease).await {
            tracing::warn!(error = %format!("{e:#}"), task = req.name(),
                "cannot renew a concurrency slot's lease");
        }
    }
}

/// Whether `outcome` ends the task (its unique lock is then released): anything but a retry
/// or a message that will be delivered again.
fn ends_the_task(outcome: &Outcome) -> bool {
    !matches!(
        outcome,
        Outcome::Retried { .. } | Outcome::Parked(_) | Outcome::Requeued
    ) && !matches!(outcome, Outcome::Rejected { requeue: true, .. })
}
