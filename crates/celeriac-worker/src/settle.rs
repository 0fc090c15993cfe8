//! The outermost layer: [`SettleLayer`] settles each delivery by its outcome, and counts it.
//!
//! While the inner layers hold the delivery, its lease is extended (every third of the
//! visibility timeout, where the broker can), so a task waiting long for a rate-limit token or
//! running long under `acks_late` is not handed to another consumer. When the outcome comes
//! back the delivery is acked, rejected (dropped or requeued) or moved to the dead-letter
//! queue, unless the gate already acked it early; then a requeue publishes a copy instead.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{BoxFuture, DynBroker, PublishOptions, Requeue};

use crate::dead;
use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::report::{Counters, Tally};
use crate::request::Settle;

/// Settles deliveries and counts their outcomes.
#[derive(Debug)]
pub(crate) struct SettleLayer {
    pub(crate) broker: DynBroker,
    pub(crate) hostname: String,
    pub(crate) counters: Arc<Counters>,
    /// The lease (visibility timeout) to keep extending.
    pub(crate) lease: Duration,
    /// The broker can extend leases.
    pub(crate) lease_extension: bool,
}

impl Layer for SettleLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            req.delivery.keep_lease(self.lease, self.lease_extension);
            let outcome = next.run(req).await;
            self.settle(req, &outcome).await;
            outcome
        })
    }
}

impl SettleLayer {
    async fn settle(&self, req: &Request, outcome: &Outcome) {
        if let Outcome::DeadLettered { reason, .. } = outcome {
            req.delivery.release_lease();
            let message = Some(req.message.as_ref().clone());
            let moved = dead::move_delivery(
                &*self.broker,
                &req.delivery.handle,
                message,
                reason,
                &self.hostname,
            )
            .await;
            if moved {
                self.counters.add(Tally::DeadLettered);
            }
            return;
        }
        self.counters.add(outcome.tally());
        let requeue = match outcome {
            Outcome::Rejected { requeue, .. } => Some(*requeue),
            Outcome::Requeued => Some(true),
            _ => None,
        };
        if req.is_acked() {
            if requeue == Some(true) {
                // Acked when it started: requeue a copy instead.
                if let Err(e) = self
                    .broker
                    .publish(&req.queue, &req.message, PublishOptions::default())
                    .await
                {
                    tracing::error!(error = %e, "cannot requeue the task");
                }
            }
            return;
        }
        let how = match requeue {
            Some(true) => Settle::Reject(Requeue::Now),
            Some(false) => Settle::Reject(Requeue::Drop),
            None => Settle::Ack,
        };
        req.delivery.settle(how).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::memory::MemoryBroker;
    use celeriac_core::meta::RemoteError;
    use celeriac_core::{Broker, TaskState};

    use crate::pipeline::testing::around;
    use crate::request::tests::request;

    fn layer(broker: &MemoryBroker, counters: &Arc<Counters>) -> SettleLayer {
        SettleLayer {
            broker: Arc::new(broker.clone()),
            hostname: "w@h".into(),
            counters: counters.clone(),
            lease: Duration::from_secs(60),
            lease_extension: true,
        }
    }

    fn outcome(kind: &str) -> Outcome {
        match kind {
            "succeeded" => Outcome::Succeeded(serde_json::json!(3)),
            "failed" => Outcome::Failed(RemoteError::new("E", "x")),
            "requeue" => Outcome::Rejected {
                requeue: true,
                reason: "r".into(),
            },
            "drop" => Outcome::Rejected {
                requeue: false,
                reason: "r".into(),
            },
            "requeued" => Outcome::Requeued,
            "skipped" => Outcome::Skipped(TaskState::Success),
            "dead" => Outcome::DeadLettered {
                reason: "too often".into(),
                error: RemoteError::new("DeliveryLimitExceeded", "too often"),
            },
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn each_outcome_settles_its_delivery_once_and_is_counted() {
        let cases = [
            ("succeeded", "ack"),
            ("failed", "ack"),
            ("skipped", "ack"),
            ("requeue", "reject Now"),
            ("drop", "reject Drop"),
            ("requeued", "reject Now"),
            ("dead", "ack"),
        ];
        let broker = MemoryBroker::new();
        let counters = Arc::new(Counters::default());
        for (kind, settled_as) in cases {
            let (stack, calls) = around(layer(&broker, &counters), move |_| outcome(kind));
            let (req, settled) = request(kind);
            stack.run(&req).await;
            assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
            assert_eq!(settled.get(), [settled_as], "{kind}");
        }
        let r = counters.report();
        assert_eq!(
            (r.succeeded, r.failed, r.skipped, r.rejected, r.requeued),
            (1, 1, 1, 2, 1)
        );
        assert_eq!(r.dead_lettered, 1);
        let dead = broker.stats("celery.dead").await.unwrap();
        assert_eq!(dead.ready, 1, "the dead letter is in celery.dead");
        assert_eq!(broker.stats("celery").await.unwrap().total(), 0);
    }

    #[tokio::test]
    async fn a_requeue_after_the_early_ack_publishes_a_copy() {
        let broker = MemoryBroker::new();
        let counters = Arc::new(Counters::default());
        let (stack, _) = around(layer(&broker, &counters), |_| outcome("requeue"));
        let (req, settled) = request("early");
        req.delivery.ack_early().await;
        stack.run(&req).await;
        assert_eq!(settled.get(), ["ack"], "settled once, by the early ack");
        assert_eq!(broker.stats("celery").await.unwrap().ready, 1);

        let (stack, _) = around(layer(&broker, &counters), |_| outcome("drop"));
        let (req, settled) = request("early-drop");
        req.delivery.ack_early().await;
        stack.run(&req).await;
        assert_eq!(settled.get(), ["ack"]);
        assert_eq!(broker.stats("celery").await.unwrap().ready, 1, "no copy");
    }
}
