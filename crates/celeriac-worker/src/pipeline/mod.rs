//! The worker as a pipeline of layers: [`Layer`], [`Next`], [`Outcome`].
//!
//! For anyone who wants to see or change what happens to every task: metrics, tracing, audit
//! logs, events, admission rules. A decoded delivery becomes a [`Request`] and travels inward
//! through a stack of layers to the pool that runs its body; the body's [`Outcome`] travels
//! back out through the same layers. Each layer is one concern with its own context, tested
//! alone, and knows nothing of the others.
//!
//! # The stack
//!
//! From the outside in (the order is the worker's, `*` marks where your layers go):
//!
//! | layer | before the inner layers | after them |
//! |---|---|---|
//! | settle | keeps the delivery's lease alive | acks, rejects, requeues or dead-letters the delivery by the outcome; counts it |
//! | `*` [`Worker::delivery_layer`] | sees every decoded delivery | sees its final outcome |
//! | canvas | | sends callbacks, errbacks, the next chain step, chord parts |
//! | record | | stores SUCCESS, FAILURE, RETRY or REVOKED |
//! | redelivery limit | dead-letters a message delivered too often | |
//! | schedule | expired: revoked; future eta: parked in the broker | |
//! | rate limit | waits for a token of the task's name (per worker) | |
//! | coordination | cluster rate limit: waits for the shared budget; `max_concurrency`: takes a cluster-wide slot | frees the slot; releases a unique task's lock when it ended |
//! | slot | waits for one of `concurrency` slots | frees it |
//! | gate | expired or already ready (a duplicate or a revoke): not run; else the early ack | |
//! | retry | | turns a returned error into FAILURE, a published retry, or a reject |
//! | `*` [`Worker::layer`] | sees each task that starts | sees its outcome |
//! | track started | stores STARTED | |
//! | cold shutdown | | cancels the body at a cold shutdown |
//! | terminate | | stops the body on a terminate revoke |
//! | time limits | | soft: fires the cancellation; hard: stops the body |
//! | (execute) | runs the body on the pool | |
//!
//! Layers added with [`Worker::layer`] wrap each task that passed every check and is about to
//! run, right where Celery's `task-started` happens: measure runtimes there, open spans, count
//! starts. Layers added with [`Worker::delivery_layer`] wrap every decoded delivery, the ones
//! that never run included (expired, revoked, duplicates, dead-lettered): count receipts and
//! final outcomes there. Both kinds run in the order they were added, the first outermost.
//!
//! # A key design decision: our own small trait, not tower's `Service`
//!
//! A tower `Service` owns its request, is polled for readiness and is called through `&mut
//! self`; a task's layers instead share one request by reference (the message is never
//! copied), have no back-pressure of their own to report (the slot layer *is* the
//! back-pressure), and are shared by every delivery of the worker at once (`&self`). A
//! [`Layer`] is therefore one method, `call(&self, &Request, Next) -> Outcome`, the shape of
//! axum's `from_fn` middleware. It costs one boxed future per layer and task, a few hundred
//! nanoseconds in all, which the benchmark does not tell from noise next to one broker round
//! trip (see `docs/BENCHMARKS.md`).
//!
//! # How to add a layer
//!
//! A layer that counts how many tasks of each outcome ran, and how long they took:
//!
//! ```
//! use std::sync::Mutex;
//! use std::time::{Duration, Instant};
//! use celeriac_core::BoxFuture;
//! use celeriac_worker::{Layer, Next, Outcome, Request};
//!
//! #[derive(Debug, Default)]
//! struct Runtimes {
//!     seen: Mutex<Vec<(String, &'static str, Duration)>>,
//! }
//!
//! impl Layer for Runtimes {
//!     fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
//!         Box::pin(async move {
//!             let t0 = Instant::now();
//!             let outcome = next.run(req).await;
//!             let kind = match &outcome {
//!                 Outcome::Succeeded(_) => "succeeded",
//!                 Outcome::Failed(_) => "failed",
//!                 _ => "other",
//!             };
//!             self.seen.lock().unwrap().push((req.name().to_owned(), kind, t0.elapsed()));
//!             outcome
//!         })
//!     }
//! }
//!
//! # fn build(worker: celeriac_worker::Worker) -> celeriac_worker::Worker {
//! // Around every task that starts:
//! let worker = worker.layer(Runtimes::default());
//! # worker }
//! ```
//!
//! A layer may also answer without calling `next` (a rule that refuses some tasks returns
//! [`Outcome::Rejected`], say): the inner layers then never see the request, and the settle
//! layer settles the delivery by what was returned.
//!
//! [`Worker::layer`]: crate::Worker::layer
//! [`Worker::delivery_layer`]: crate::Worker::delivery_layer

mod outcome;

use std::fmt;
use std::sync::Arc;

use celeriac_core::BoxFuture;

pub use crate::request::Request;
pub use outcome::Outcome;

/// One step of the pipeline around a task's execution.
///
/// A layer gets the [`Request`] and the rest of the pipeline ([`Next`]); it usually does
/// something, calls `next.run(req)`, and does something with the [`Outcome`] before
/// returning it. It is shared by every delivery of the worker, so it takes `&self` and keeps
/// its state behind atomics or locks. Add one with [`Worker::layer`](crate::Worker::layer) or
/// [`Worker::delivery_layer`](crate::Worker::delivery_layer); see the [module](self) docs for
/// where each kind sits and for a worked example.
pub trait Layer: Send + Sync + fmt::Debug + 'static {
    /// Handles `req`, normally by awaiting `next.run(req)`.
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome>;
}

impl<L: Layer + ?Sized> Layer for Arc<L> {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        (**self).call(req, next)
    }
}

/// The innermost step, which the layers wrap: running the body.
pub(crate) trait Inner: Send + Sync + fmt::Debug + 'static {
    fn run<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Outcome>;
}

/// The rest of the pipeline, from the layer after the current one inward.
#[derive(Clone, Copy)]
pub struct Next<'a> {
    rest: &'a [Arc<dyn Layer>],
    inner: &'a dyn Inner,
}

impl fmt::Debug for Next<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next")
            .field("layers_left", &self.rest.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Next<'a> {
    /// Runs the rest of the pipeline on `req` and returns its outcome.
    pub fn run(self, req: &'a Request) -> BoxFuture<'a, Outcome> {
        match self.rest.split_first() {
            Some((layer, rest)) => layer.call(
                req,
                Next {
                    rest,
                    inner: self.inner,
                },
            ),
            None => self.inner.run(req),
        }
    }
}

/// The layers in order, outermost first, around the innermost step.
#[derive(Debug)]
pub(crate) struct Stack {
    layers: Vec<Arc<dyn Layer>>,
    inner: Box<dyn Inner>,
}

impl Stack {
    pub(crate) fn new(layers: Vec<Arc<dyn Layer>>, inner: Box<dyn Inner>) -> Self {
        Stack { layers, inner }
    }

    /// Runs `req` through every layer.
    pub(crate) fn run<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Outcome> {
        Next {
            rest: &self.layers,
            inner: &*self.inner,
        }
        .run(req)
    }
}

/// Running one layer alone around a scripted innermost step.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// An innermost step that answers with `f` and counts its calls.
    pub(crate) struct Scripted<F> {
        f: F,
        calls: Arc<AtomicUsize>,
    }

    impl<F> fmt::Debug for Scripted<F> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Scripted")
        }
    }

    impl<F: Fn(&Request) -> Outcome + Send + Sync + 'static> Inner for Scripted<F> {
        fn run<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Outcome> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let o = (self.f)(req);
            Box::pin(async move { o })
        }
    }

    /// `layer` alone around an innermost step answering with `f`; the count is how many
    /// times the step ran.
    pub(crate) fn around(
        layer: impl Layer,
        f: impl Fn(&Request) -> Outcome + Send + Sync + 'static,
    ) -> (Stack, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = Scripted {
            f,
            calls: calls.clone(),
        };
        (Stack::new(vec![Arc::new(layer)], Box::new(inner)), calls)
    }

    /// `layer` around a body that sleeps `d` (tokio's clock) and then succeeds with `1`.
    pub(crate) fn around_slow(layer: impl Layer, d: std::time::Duration) -> Stack {
        #[derive(Debug)]
        struct Slow(std::time::Duration);
        impl Inner for Slow {
            fn run<'a>(&'a self, _: &'a Request) -> BoxFuture<'a, Outcome> {
                Box::pin(async move {
                    tokio::time::sleep(self.0).await;
                    Outcome::Succeeded(serde_json::json!(1))
                })
            }
        }
        Stack::new(vec![Arc::new(layer)], Box::new(Slow(d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::request::tests::request;

    /// Writes its name on the way in and out.
    #[derive(Debug)]
    struct Trace(&'static str, Arc<Mutex<Vec<String>>>);

    impl Layer for Trace {
        fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
            Box::pin(async move {
                self.1.lock().unwrap().push(format!("{} in", self.0));
                let o = next.run(req).await;
                self.1.lock().unwrap().push(format!("{} out", self.0));
                o
            })
        }
    }

    /// Answers without calling the rest.
    #[derive(Debug)]
    struct Refuse;

    impl Layer for Refuse {
        fn call<'a>(&'a self, _: &'a Request, _: Next<'a>) -> BoxFuture<'a, Outcome> {
            Box::pin(async {
                Outcome::Rejected {
                    requeue: false,
                    reason: "refused".into(),
                }
            })
        }
    }

    #[derive(Debug)]
    struct Body(Arc<Mutex<Vec<String>>>);

    impl Inner for Body {
        fn run<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, Outcome> {
            Box::pin(async move {
                self.0.lock().unwrap().push(format!("body {}", req.id()));
                Outcome::Succeeded(serde_json::json!(1))
            })
        }
    }

    #[tokio::test]
    async fn layers_run_outermost_first_and_unwind_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stack = Stack::new(
            vec![
                Arc::new(Trace("a", log.clone())),
                Arc::new(Trace("b", log.clone())),
            ],
            Box::new(Body(log.clone())),
        );
        let (req, _acker) = request("id-1");
        let o = stack.run(&req).await;
        assert!(matches!(o, Outcome::Succeeded(_)), "{o:?}");
        assert_eq!(
            *log.lock().unwrap(),
            ["a in", "b in", "body id-1", "b out", "a out"]
        );
    }

    #[tokio::test]
    async fn a_layer_that_answers_itself_hides_the_rest() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stack = Stack::new(
            vec![
                Arc::new(Trace("a", log.clone())),
                Arc::new(Refuse),
                Arc::new(Trace("never", log.clone())),
            ],
            Box::new(Body(log.clone())),
        );
        let (req, _acker) = request("id-2");
        let o = stack.run(&req).await;
        assert!(matches!(o, Outcome::Rejected { .. }), "{o:?}");
        assert_eq!(*log.lock().unwrap(), ["a in", "a out"]);
    }
}
