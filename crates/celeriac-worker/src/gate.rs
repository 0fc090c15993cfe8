//! The last checks before a task runs, and the early ack: [`GateLayer`].
//!
//! After the wait for a rate-limit token and a slot, a task may have expired, and its id may
//! have a ready result: a duplicate delivery (a redelivery after its worker died, a copy sent
//! twice) or a revoke stored while it waited. Such a task is not run. The read costs one
//! lookup per task, or none when the broker read the state with the fetch
//! ([`Delivery::stored`](celeriac_core::Delivery::stored), see [`probed_state`]); it is what
//! makes a redelivered duplicate harmless and revocation hold on every worker.
//!
//! An early ack (a task that is not `acks_late`) goes out when the check does and is awaited
//! with the run, not before it: the message is acked whichever way the check goes, and a
//! crash before the ack lands only loses what an early ack loses anyway (Celery's prefork
//! pool, too, acks while the child already runs the task).

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::{BoxFuture, TaskState};
use chrono::Utc;

use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::record::Recorder;
use crate::revoke::Revoked;
use crate::schedule::{self, Gate};

/// Stops expired tasks and ids that are already done; acks the others early unless they are
/// `acks_late`.
#[derive(Debug)]
pub(crate) struct GateLayer {
    pub(crate) recorder: Recorder,
    /// Ids (and stamped headers) revoked through remote control.
    pub(crate) revoked: Arc<Revoked>,
    /// How old a state the broker read with the fetch may be and still be trusted.
    pub(crate) fresh_for: Duration,
}

impl Layer for GateLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            if schedule::gate(&req.message.headers, Utc::now()) == Gate::Expired {
                return schedule::expired();
            }
            if self.revoked.contains(req.id()) || self.revoked.stamped(req.headers()) {
                tracing::info!("task revoked; not running it");
                return Outcome::Revoked {
                    reason: "revoked".to_owned(),
                };
            }
            let early_ack = async {
                if !req.acks_late() {
                    req.delivery.ack_early().await;
                }
            };
            let check_and_run = async {
                let ready = match probed_state(req, self.fresh_for) {
                    Some(state) => state,
                    None => self.recorder.ready_state(req.id()).await,
                };
                if let Some(state) = ready {
                    tracing::info!(state = %state, "task already has a ready result; not running it again");
                    return Outcome::Skipped(state);
                }
                next.run(req).await
            };
            let ((), outcome) = tokio::join!(early_ack, check_and_run);
            outcome
        })
    }
}

/// The check's answer from the state the broker read with the message, when there is one
/// for this task and it is recent: read within `fresh_for` (the worker's
/// `revoke_poll_interval`, the time in which it also notices a revoke of a running task).
/// `None`: read the backend.
fn probed_state(req: &Request, fresh_for: Duration) -> Option<Option<TaskState>> {
    let stored = req.delivery.handle.stored.as_ref()?;
    let fresh = stored.read_at.elapsed() <= fresh_for;
    (fresh && stored.task_id == req.id()).then(|| stored.state.clone().filter(TaskState::is_ready))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use celeriac_core::ResultBackend;
    use celeriac_core::memory::MemoryBackend;
    use celeriac_core::{TaskMeta, TaskState};

    use super::*;
    use crate::pipeline::testing::around;
    use crate::request::tests::request_with;

    #[tokio::test]
    async fn a_ready_id_is_skipped_and_others_run_after_an_early_ack() {
        let backend = MemoryBackend::new();
        backend
            .store(&TaskMeta::success("done", serde_json::json!(1)))
            .await
            .unwrap();
        let revoked = Arc::new(Revoked::default());
        let layer = GateLayer {
            recorder: Recorder::new(Some(Arc::new(backend)), "w@h".into()),
            revoked: revoked.clone(),
            fresh_for: Duration::from_millis(300),
        };
        let (stack, calls) = around(layer, |req| {
            // The early ack does not wait for the run, and the run does not wait for it.
            Outcome::Succeeded(req.is_acked().into())
        });
        let (req, settled) = request_with("done", 0, |_, _| {});
        let o = stack.run(&req).await;
        assert!(matches!(o, Outcome::Skipped(TaskState::Success)), "{o:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(settled.get(), ["ack"], "acked early all the same");

        let (req, settled) = request_with("new", 0, |_, _| {});
        assert!(matches!(stack.run(&req).await, Outcome::Succeeded(_)));
        assert_eq!(settled.get(), ["ack"]);

        let (req, settled) = request_with("late", 0, |_, o| o.acks_late = true);
        assert!(matches!(stack.run(&req).await, Outcome::Succeeded(_)));
        assert!(settled.get().is_empty(), "acks_late: not acked here");
        assert!(!req.is_acked());

        // Revoked through remote control: not run.
        revoked.add("gone");
        let (req, _) = request_with("gone", 0, |_, _| {});
        let o = stack.run(&req).await;
        assert!(
            matches!(o, Outcome::Revoked { ref reason } if reason == "revoked"),
            "{o:?}"
        );
        revoked.add_stamps(&[("batch".into(), vec![serde_json::json!("b-7")])]);
        let (req, _) = request_with("stamped", 0, |m, _| {
            m.headers
                .extra
                .insert("batch".into(), serde_json::json!("b-7"));
        });
        assert!(matches!(stack.run(&req).await, Outcome::Revoked { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "only new and late ran");
    }
}
