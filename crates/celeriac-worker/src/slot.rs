//! Concurrency: [`SlotLayer`] lets at most `concurrency` tasks past it at once.
//!
//! The slots are the pool's semaphore ([`PoolHandle`](crate::PoolHandle) grows and shrinks
//! it). A delivery waits for a slot without blocking anything else, still unacknowledged (it
//! counts against prefetch); a warm shutdown hands a waiting delivery back. The slot is freed
//! as soon as the task's body has ended, before its result is stored.

use std::sync::Arc;

use celeriac_core::BoxFuture;
use tokio::sync::Semaphore;

use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::schedule::handed_back;
use crate::shutdown::{Phase, PhaseWatch};

/// Takes one of the worker's slots for the inner layers.
#[derive(Debug)]
pub(crate) struct SlotLayer {
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) phase: PhaseWatch,
}

impl Layer for SlotLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let permit = tokio::select! {
                biased;
                () = self.phase.reached(Phase::Warm) => return handed_back(),
                p = self.slots.acquire() => match p {
                    Ok(p) => p,
                    Err(_) => return handed_back(),
                },
            };
            let outcome = next.run(req).await;
            drop(permit);
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pipeline::testing::around_slow;
    use crate::request::tests::request;
    use crate::shutdown::ShutdownHandle;

    #[tokio::test(start_paused = true)]
    async fn one_slot_runs_one_task_at_a_time_and_a_warm_shutdown_hands_waiters_back() {
        let shutdown = ShutdownHandle::new();
        let layer = SlotLayer {
            slots: Arc::new(Semaphore::new(1)),
            phase: shutdown.watch(),
        };
        let stack = around_slow(layer, Duration::from_secs(1));
        let (a, _) = request("a");
        let (b, _) = request("b");
        let t0 = tokio::time::Instant::now();
        let (oa, ob) = tokio::join!(stack.run(&a), stack.run(&b));
        assert!(matches!(
            (oa, ob),
            (Outcome::Succeeded(_), Outcome::Succeeded(_))
        ));
        assert_eq!(t0.elapsed(), Duration::from_secs(2), "one after the other");

        let (c, _) = request("c");
        let (d, _) = request("d");
        let running = stack.run(&c);
        let waiting = stack.run(&d);
        let (oc, od) = tokio::join!(running, async {
            tokio::task::yield_now().await;
            shutdown.warm();
            waiting.await
        });
        assert!(
            matches!(oc, Outcome::Succeeded(_)),
            "the running one finishes"
        );
        assert!(
            matches!(od, Outcome::Requeued),
            "the waiting one is handed back"
        );
    }
}
