//! Coordination across workers, as a layer: cluster rate limits, concurrency caps, and the
//! release of unique-task locks (see [`celeriac_core::coord`]).
//!
//! Sits where the per-worker rate limit does: a delivery held back stays unacknowledged and
//! counts against prefetch, and a warm shutdown hands it back. The store is the result
//! backend's coordination capability; a worker whose tasks ask for it on a backend without
//! one does not start ([`check`]).

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::coord::Coordination;
use celeriac_core::{BoxFuture, DynBackend, RateLimitScope, Registry};

use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::ratelimit::RateLimiter;
use crate::schedule::handed_back;
use crate::shutdown::{Phase, PhaseWatch};

pub use celeriac_core::coord::UNIQUE_HEADER;

/// How long a concurrency slot is leased before it must be renewed; a crashed worker's slot
/// frees itself after this.
const SLOT_LEASE: Duration = Duration::from_secs(30);

/// Holds each task back until the cluster lets it start, and releases what it took when it
/// ends. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct CoordinationLayer {
    pub(crate) backend: DynBackend,
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) phase: PhaseWatch,
}

/// Refuses a registry whose tasks need a coordination store when `backend` has none.
pub(crate) fn check(
    registry: &Registry,
    backend: Option<&DynBackend>,
) -> celeriac_core::Result<()> {
    let needs: Vec<&str> = registry
        .names()
        .into_iter()
        .filter(|name| {
            registry.get(name).is_some_and(|d| {
                let o = &d.options;
                o.rate_limit_scope == RateLimitScope::Cluster
                    || o.max_concurrency.is_some()
                    || o.unique_for.is_some()
            })
        })
        .collect();
    if needs.is_empty() || backend.is_some_and(|b| b.capabilities().coordination.is_some()) {
        return Ok(());
    }
    Err(celeriac_core::Error::new(
        celeriac_core::ErrorKind::Config,
        format!(
            "tasks {} need coordination across workers (a cluster rate limit, max_concurrency \
             or unique_for), which the {} result backend cannot keep; use a result backend \
             that can (redis://, sqlite://, memory)",
            needs.join(", "),
            backend.map_or("missing", |b| b.driver())
        ),
    ))
}

impl Layer for CoordinationLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        let o = &req.def.options;
        let cluster_limit = match o.rate_limit_scope {
            RateLimitScope::Cluster => self.limiter.limit_for(req.name(), o.rate_limit),
            RateLimitScope::Worker => None,
        };
        let unique = req
            .message
            .headers
            .extra
            .get(UNIQUE_HEADER)
            .and_then(|v| v.as_str());
        if cluster_limit.is_none() && o.max_concurrency.is_none() && unique.is_none() {
            return next.run(req);
        }
        let Some(store) = self.backend.capabilities().coordination else {
            // `check` refused such a worker at start; a message of another app's task that
            // carries the header is run without the lock's release.
            return next.run(req);
        };
        Box::pin(async move {
            if let Some(limit) = cluster_limit {
                let admitted = async {
                    loop {
                        match store.throttle(req.name(), limit).await {
                            Ok(wait) if wait.is_zero() => return,
                            Ok(wait) => tokio::time::sleep(wait).await,
                            Err(e) => {
                                tracing::warn!(error = %format!("{e:#}"), task = req.name(),
                                    "cannot reach the cluster rate limit; trying again in 1 s");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
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
                        () = take_slot(store, req, n) => {}
                    }
                    let outcome = {
                        let renew = renew_slot(store, req, n);
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
async fn take_slot(store: &dyn Coordination, req: &Request, n: u32) {
    let mut pause = Duration::from_millis(5);
    loop {
        match store.acquire(req.name(), req.id(), n, SLOT_LEASE).await {
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
async fn renew_slot(store: &dyn Coordination, req: &Request, n: u32) {
    loop {
        tokio::time::sleep(SLOT_LEASE / 3).await;
        if let Err(e) = store.acquire(req.name(), req.id(), n, SLOT_LEASE).await {
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
