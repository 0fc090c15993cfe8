//! Per-task-name rate limits: [`RateLimiter`], one token bucket per task name.
//!
//! For the delivery pipeline. As in Celery the limit is per worker and per task name, and a
//! waiting delivery stays unacknowledged (it still counts against prefetch). Each delivery
//! waits in its own tokio task, so a limited name never holds up other names. Waiters of one
//! name queue on a fair (FIFO) async mutex around the bucket, so they run in arrival order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use celeriac_core::{BoxFuture, RateLimit, TokenBucket};

use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::schedule::handed_back;
use crate::shutdown::{Phase, PhaseWatch};
use crate::turns::Turns;

/// Holds each task back until its name's rate limit lets it start; a warm shutdown hands a
/// waiting delivery back.
#[derive(Debug)]
pub(crate) struct RateLimitLayer {
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) phase: PhaseWatch,
    /// Whether the result backend keeps cluster rate limits (then this layer leaves tasks
    /// with a cluster scope to the coordination layer).
    pub(crate) cluster: bool,
}

impl Layer for RateLimitLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        if self.cluster
            && req.def.options.rate_limit_scope == celeriac_core::RateLimitScope::Cluster
        {
            // The whole cluster's budget, kept by the coordination layer.
            return next.run(req);
        }
        let Some(limit) = self
            .limiter
            .limit_for(req.name(), req.def.options.rate_limit)
        else {
            req.leave_turns();
            return next.run(req);
        };
        Box::pin(async move {
            tokio::select! {
                biased;
                () = self.phase.reached(Phase::Warm) => handed_back(),
                () = self.limiter.acquire(req.name(), limit, req.seq()) => next.run(req).await,
            }
        })
    }
}

/// Token buckets by task name, and the limits set at run time (remote control's
/// `rate_limit`), which replace the tasks' own.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Limits set at run time by task name; `None` disables the task's own limit.
    set: RwLock<HashMap<String, Option<RateLimit>>>,
    /// Whether `set` has anything, read without the lock on every task.
    any_set: AtomicBool,
    /// The order in which held-back deliveries of each name start, whichever layer holds
    /// them (this worker's limit or the cluster's).
    turns: Mutex<HashMap<String, Arc<Turns>>>,
}

/// A name's bucket at its limit, and the turns of the deliveries waiting for it.
type Bucket = (RateLimit, Arc<Mutex<TokenBucket>>);

impl RateLimiter {
    /// The limit in force for task `name`, whose own limit is `own`.
    pub(crate) fn limit_for(&self, name: &str, own: Option<RateLimit>) -> Option<RateLimit> {
        if !self.any_set.load(Ordering::Acquire) {
            return own;
        }
        match self.set.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            Some(set) => *set,
            None => own,
        }
    }

    /// The queue of task `name`'s held-back deliveries.
    pub(crate) fn turns(&self, name: &str) -> Arc<Turns> {
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        match turns.get(name) {
            Some(t) => t.clone(),
            None => turns.entry(name.to_owned()).or_default().clone(),
        }
    }

    /// Sets task `name`'s limit from now on (`None`: no limit), whatever its own.
    pub(crate) fn set(&self, name: &str, limit: Option<RateLimit>) {
        self.set
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), limit);
        self.any_set.store(true, Ordering::Release);
    }

    /// Waits until task `name`, limited to `limit`, may start; waiters start in the order
    /// they arrived (`seq`, see [`Turns`]).
    pub(crate) async fn acquire(&self, name: &str, limit: RateLimit, seq: u64) {
        let bucket = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            match buckets.get(name) {
                Some((l, b)) if *l == limit => b.clone(),
                // New, or its limit changed: a fresh bucket at the new rate.
                _ => {
                    let b = Arc::new(Mutex::new(TokenBucket::new(limit)));
                    buckets.insert(name.to_owned(), (limit, b.clone()));
                    b
                }
            }
        };
        let _turn = self.turns(name).take(seq).await;
        loop {
            // tokio's clock, so that paused-time tests (and `tokio::time::advance`) drive it.
            let now = tokio::time::Instant::now().into_std();
            let taken = bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_take(now);
            match taken {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn one_name_waits_its_interval_while_another_goes_at_once() {
        let limiter = Arc::new(RateLimiter::default());
        let two_per_sec: RateLimit = "2/s".parse().unwrap();
        let t0 = Instant::now();
        let mut slow = Vec::new();
        for _ in 0..3 {
            let l = limiter.clone();
            slow.push(tokio::spawn(async move {
                l.acquire("slow", two_per_sec, 0).await;
                Instant::now() - t0
            }));
            tokio::task::yield_now().await;
        }
        limiter.acquire("other", two_per_sec, 0).await;
        assert_eq!(Instant::now() - t0, Duration::ZERO);
        let mut times = Vec::new();
        for h in slow {
            times.push(h.await.unwrap().as_millis());
        }
        assert_eq!(times, [0, 500, 1000]);
    }
}
