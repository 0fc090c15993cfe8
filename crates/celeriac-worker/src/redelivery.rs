//! Poison messages: [`RedeliveryLimitLayer`] stops a message delivered too often.
//!
//! A message whose worker keeps dying under it (its process is killed, its lease runs out
//! again and again) would otherwise crash workers forever. Past
//! [`WorkerOptions::max_redeliveries`](crate::WorkerOptions::max_redeliveries) deliveries it
//! is not run: if its id already has a ready result it is skipped as a duplicate, else its
//! task gets FAILURE `DeliveryLimitExceeded` and the message goes to the dead-letter queue.

use celeriac_core::BoxFuture;
use celeriac_core::meta::RemoteError;

use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::record::Recorder;

/// Dead-letters deliveries redelivered more than `max` times.
#[derive(Debug)]
pub(crate) struct RedeliveryLimitLayer {
    pub(crate) max: u32,
    pub(crate) recorder: Recorder,
}

impl Layer for RedeliveryLimitLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        if req.redeliveries() <= self.max {
            return next.run(req);
        }
        Box::pin(async move {
            if let Some(state) = self.recorder.ready_state(req.id()).await {
                tracing::info!(state = %state, "redelivered task already has a ready result; not running it again");
                return Outcome::Skipped(state);
            }
            let reason = format!(
                "delivered {} times, more than max_redeliveries ({}) allows",
                u64::from(req.redeliveries()) + 1,
                self.max
            );
            tracing::error!(
                redeliveries = req.redeliveries(),
                "poison message: {reason}"
            );
            let error = RemoteError::new("DeliveryLimitExceeded", reason.clone())
                .with_module("celeriac.exceptions");
            Outcome::DeadLettered { reason, error }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use celeriac_core::memory::MemoryBackend;
    use celeriac_core::{ResultBackend, TaskMeta, TaskState};

    use super::*;
    use crate::pipeline::testing::around;
    use crate::request::tests::request_with;

    #[tokio::test]
    async fn past_the_limit_a_message_is_dead_lettered_unless_already_done() {
        let backend = MemoryBackend::new();
        backend
            .store(&TaskMeta::success("done", serde_json::json!(1)))
            .await
            .unwrap();
        let layer = RedeliveryLimitLayer {
            max: 2,
            recorder: Recorder::new(Some(Arc::new(backend)), "w@h".into()),
        };
        let (stack, calls) = around(layer, |_| Outcome::Succeeded(1.into()));
        let (req, _) = request_with("fine", 2, |_, _| {});
        assert!(matches!(stack.run(&req).await, Outcome::Succeeded(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let (req, _) = request_with("poison", 3, |_, _| {});
        let o = stack.run(&req).await;
        let Outcome::DeadLettered { reason, error } = o else {
            panic!("{o:?}")
        };
        assert_eq!(
            reason,
            "delivered 4 times, more than max_redeliveries (2) allows"
        );
        assert_eq!(error.exc_type, "DeliveryLimitExceeded");

        let (req, _) = request_with("done", 3, |_, _| {});
        let o = stack.run(&req).await;
        assert!(matches!(o, Outcome::Skipped(TaskState::Success)), "{o:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
