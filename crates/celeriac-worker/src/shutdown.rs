//! Stopping a worker: [`ShutdownHandle`] with a warm and a cold phase.
//!
//! For whoever owns the worker (the CLI's signal handler, a test, an embedding app). A handle
//! is a `watch` channel sender; every part of the worker that waits (the consume loop, a
//! delivery waiting for a rate-limit token or a slot, a running task) watches the phase, so a
//! shutdown needs no registry of what is in flight. Phases only move forward.

use std::sync::Arc;
use std::time::Duration;

use celeriac_core::BoxFuture;
use celeriac_core::meta::RemoteError;
use tokio::sync::watch;

use crate::pipeline::{Layer, Next, Outcome, Request};

/// At a cold shutdown, fires a running task's cancellation and gives it `grace` to end;
/// after that it is dropped (an async body aborted, a pool child killed) and its delivery is
/// requeued (`acks_late`) or its task fails with `WorkerLostError` (acked already).
#[derive(Debug)]
pub(crate) struct ColdShutdownLayer {
    pub(crate) phase: PhaseWatch,
    pub(crate) grace: Duration,
}

impl Layer for ColdShutdownLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let mut run = next.run(req);
            tokio::select! {
                biased;
                outcome = &mut run => outcome,
                () = self.phase.reached(Phase::Cold) => {
                    tracing::warn!("cold shutdown: cancelling the task");
                    req.cancel.cancel();
                    if let Ok(outcome) = tokio::time::timeout(self.grace, &mut run).await {
                        return outcome;
                    }
                    drop(run);
                    if req.acks_late() {
                        tracing::warn!("task still running after the cold shutdown grace; requeued");
                        Outcome::Requeued
                    } else {
                        tracing::error!("task still running after the cold shutdown grace; it is lost");
                        Outcome::Failed(
                            RemoteError::new("WorkerLostError", "worker stopped by a cold shutdown")
                                .with_module("billiard.exceptions"),
                        )
                    }
                }
            }
        })
    }
}

/// How far a shutdown has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Running,
    /// Stop fetching, finish running tasks, hand back the rest.
    Warm,
    /// Also cancel running tasks and hand back acks-late ones after a grace period.
    Cold,
}

/// Asks a running [`Worker`](crate::Worker) to stop. Cheap to clone; usable before `run`.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<Phase>>,
}

impl ShutdownHandle {
    pub(crate) fn new() -> Self {
        ShutdownHandle {
            tx: Arc::new(watch::channel(Phase::Running).0),
        }
    }

    /// Warm shutdown: stop fetching, let running tasks finish, requeue every delivery that was
    /// fetched but not started. Nothing is lost, and nothing is acked that did not finish.
    pub fn warm(&self) {
        self.advance(Phase::Warm);
    }

    /// Cold shutdown: as warm, and also fire every running task's cancellation; after a brief
    /// grace, acks-late tasks still running are requeued and the worker returns.
    pub fn cold(&self) {
        self.advance(Phase::Cold);
    }

    /// Whether a shutdown was asked for.
    pub fn is_shutting_down(&self) -> bool {
        *self.tx.borrow() > Phase::Running
    }

    fn advance(&self, to: Phase) {
        self.tx.send_if_modified(|p| {
            let moved = *p < to;
            *p = (*p).max(to);
            moved
        });
    }

    pub(crate) fn watch(&self) -> PhaseWatch {
        PhaseWatch {
            rx: self.tx.subscribe(),
        }
    }
}

/// The receiving side: waits for a phase.
#[derive(Debug, Clone)]
pub(crate) struct PhaseWatch {
    rx: watch::Receiver<Phase>,
}

impl PhaseWatch {
    /// Resolves once the shutdown has reached `phase` (at once if it already has).
    pub(crate) async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        // The sender lives as long as the worker holds its handle; if it is gone nothing can
        // advance the phase any more, so wait forever.
        if rx.wait_for(|p| *p >= phase).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    #[cfg(test)]
    pub(crate) fn current(&self) -> Phase {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward_and_wake_waiters() {
        let h = ShutdownHandle::new();
        let w = h.watch();
        assert_eq!(w.current(), Phase::Running);
        let waiter = tokio::spawn({
            let w = w.clone();
            async move { w.reached(Phase::Warm).await }
        });
        h.clone().warm();
        waiter.await.unwrap();
        h.cold();
        h.warm();
        assert_eq!(w.current(), Phase::Cold);
        assert!(h.is_shutting_down());
        w.reached(Phase::Warm).await;
    }
}
