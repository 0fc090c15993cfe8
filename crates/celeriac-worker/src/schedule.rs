//! When a delivered task may run: now, later (an `eta`), or never (it `expires`).
//!
//! For the delivery pipeline; pure, so it is tested without a clock. Expiry is checked first:
//! a task past its deadline is revoked even if it also has an eta. A future eta only arrives in
//! messages sent by Python Celery (our clients park delays in the broker); the pipeline
//! re-parks such a message in the broker's delayed store rather than holding it in memory.

use celeriac_core::{BoxFuture, DynBroker, Headers, PublishOptions};
use chrono::{DateTime, Utc};

use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::shutdown::{Phase, PhaseWatch};

/// Revokes expired tasks and parks (or holds) those with a future eta.
#[derive(Debug)]
pub(crate) struct ScheduleLayer {
    pub(crate) broker: DynBroker,
    /// The broker parks delayed messages itself.
    pub(crate) broker_delays: bool,
    pub(crate) phase: PhaseWatch,
}

impl Layer for ScheduleLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        match gate(&req.message.headers, Utc::now()) {
            Gate::Run => next.run(req),
            Gate::Expired => Box::pin(async { expired() }),
            Gate::Defer(eta) => Box::pin(self.defer(req, eta, next)),
        }
    }
}

impl ScheduleLayer {
    async fn defer<'a>(&'a self, req: &'a Request, eta: DateTime<Utc>, next: Next<'a>) -> Outcome {
        if self.broker_delays {
            let options = PublishOptions::default()
                .not_before(Some(eta))
                .priority(req.message.properties.priority);
            match self.broker.publish(&req.queue, &req.message, options).await {
                Ok(()) => {
                    tracing::info!(eta = %eta, "task has a future eta; parked in the broker");
                    return Outcome::Parked(eta);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot park the task in the broker; holding it");
                }
            }
        }
        // The fallback for brokers without a delayed store: hold the delivery unacked (its
        // lease is kept alive) until the eta.
        let wait = (eta - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => next.run(req).await,
            () = self.phase.reached(Phase::Warm) => handed_back(),
        }
    }
}

/// The outcome of a task whose `expires` has passed.
pub(crate) fn expired() -> Outcome {
    tracing::info!("task expired; revoking it");
    Outcome::Revoked {
        reason: "expired".to_owned(),
    }
}

/// The outcome of a delivery handed back to its queue at a shutdown, before it started.
pub(crate) fn handed_back() -> Outcome {
    tracing::info!("shutting down: returning the unstarted task to the queue");
    Outcome::Requeued
}

/// What to do with a task now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Run it.
    Run,
    /// Its `expires` has passed: store REVOKED (`expired`) and ack.
    Expired,
    /// Its `eta` is in the future.
    Defer(DateTime<Utc>),
}

pub(crate) fn gate(headers: &Headers, now: DateTime<Utc>) -> Gate {
    if headers.expires.is_some_and(|t| t <= now) {
        return Gate::Expired;
    }
    match headers.eta {
        Some(eta) if eta > now => Gate::Defer(eta),
        _ => Gate::Run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn expiry_wins_then_a_future_eta_defers() {
        let now = Utc::now();
        let mut h = Headers::new("t", "i");
        assert_eq!(gate(&h, now), Gate::Run);
        h.eta = Some(now - Duration::seconds(5));
        assert_eq!(gate(&h, now), Gate::Run);
        h.eta = Some(now + Duration::seconds(5));
        assert_eq!(gate(&h, now), Gate::Defer(now + Duration::seconds(5)));
        h.expires = Some(now + Duration::seconds(1));
        assert_eq!(gate(&h, now), Gate::Defer(now + Duration::seconds(5)));
        h.expires = Some(now);
        assert_eq!(gate(&h, now), Gate::Expired);
    }

    mod layer {
        use std::sync::Arc;
        use std::sync::atomic::Ordering;

        use celeriac_core::Broker;
        use celeriac_core::memory::MemoryBroker;
        use chrono::{Duration, Utc};

        use super::super::ScheduleLayer;
        use crate::pipeline::Outcome;
        use crate::pipeline::testing::around;
        use crate::request::tests::request_with;
        use crate::shutdown::ShutdownHandle;

        #[tokio::test]
        async fn expired_tasks_are_revoked_and_future_ones_parked_without_running() {
            let broker = MemoryBroker::new();
            let shutdown = ShutdownHandle::new();
            let layer = ScheduleLayer {
                broker: Arc::new(broker.clone()),
                broker_delays: true,
                phase: shutdown.watch(),
            };
            let (stack, calls) = around(layer, |_| Outcome::Succeeded(1.into()));
            let (req, _) = request_with("x", 0, |m, _| {
                m.headers.expires = Some(Utc::now() - Duration::seconds(1));
            });
            let o = stack.run(&req).await;
            assert!(
                matches!(o, Outcome::Revoked { ref reason } if reason == "expired"),
                "{o:?}"
            );
            let (req, _) = request_with("e", 0, |m, _| {
                m.headers.eta = Some(Utc::now() + Duration::seconds(60));
            });
            assert!(matches!(stack.run(&req).await, Outcome::Parked(_)));
            assert_eq!(broker.stats("celery").await.unwrap().delayed, 1);
            assert_eq!(calls.load(Ordering::SeqCst), 0);
            let (req, _) = request_with("now", 0, |_, _| {});
            assert!(matches!(stack.run(&req).await, Outcome::Succeeded(_)));
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }

        #[tokio::test(start_paused = true)]
        async fn without_a_delayed_store_the_task_is_held_until_its_eta_or_a_shutdown() {
            let shutdown = ShutdownHandle::new();
            let layer = ScheduleLayer {
                broker: Arc::new(MemoryBroker::new()),
                broker_delays: false,
                phase: shutdown.watch(),
            };
            let (stack, calls) = around(layer, |_| Outcome::Succeeded(1.into()));
            let (req, _) = request_with("e", 0, |m, _| {
                m.headers.eta = Some(Utc::now() + Duration::milliseconds(200));
            });
            assert!(matches!(stack.run(&req).await, Outcome::Succeeded(_)));
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            let (req, _) = request_with("later", 0, |m, _| {
                m.headers.eta = Some(Utc::now() + Duration::seconds(3600));
            });
            let held = stack.run(&req);
            shutdown.warm();
            assert!(matches!(held.await, Outcome::Requeued));
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }
    }
}
