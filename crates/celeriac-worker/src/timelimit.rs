//! Soft and hard time limits around a running task body.
//!
//! For the delivery pipeline. The message's `timelimit` header (`[hard, soft]`, seconds) wins
//! over the task's options, as in Celery. At the soft limit the task's
//! [`Cancellation`] fires and the task decides how to stop. At the hard limit an async body
//! is aborted; a blocking body cannot be (a thread cannot be killed safely), so the worker
//! fires the cancellation, reports `TimeLimitExceeded`, frees the task's slot and leaves the
//! thread to finish on its own; under the processes pool the body's child process is killed
//! (dropping the body's future kills it), which really stops it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use celeriac_core::meta::RemoteError;
use celeriac_core::{BoxFuture, Cancellation, Handler, TaskOptions, TimeLimit};

use crate::options::Pool;
use crate::pipeline::{Layer, Next, Outcome, Request};

/// Applies the soft and hard time limits to the inner layers and the body.
#[derive(Debug)]
pub(crate) struct TimeLimitLayer {
    /// What stopping a blocking body at the hard limit means depends on the pool.
    pub(crate) pool: Pool,
    /// Limits set at run time (remote control's `time_limit`).
    pub(crate) set: Arc<TimeLimits>,
    /// The worker's own limits, for tasks whose message and options set none
    /// ([`WorkerOptions::time_limit`](crate::WorkerOptions::time_limit)).
    pub(crate) defaults: Limits,
}

/// Time limits set at run time by task name, replacing the tasks' own (a message's
/// `timelimit` header still wins, as it wins over the task's options).
#[derive(Debug, Default)]
pub(crate) struct TimeLimits {
    set: RwLock<HashMap<String, Limits>>,
    any_set: AtomicBool,
}

impl TimeLimits {
    /// Sets task `name`'s limits from now on; `None` for no limit of that kind.
    pub(crate) fn set(&self, name: &str, hard: Option<Duration>, soft: Option<Duration>) {
        self.set
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), Limits { soft, hard });
        self.any_set.store(true, Ordering::Release);
    }

    /// The limits of a task `name` whose message says `header` and whose options `options`.
    fn resolve(&self, name: &str, header: TimeLimit, options: &TaskOptions) -> Limits {
        if self.any_set.load(Ordering::Acquire) {
            if let Some(set) = self.set.read().unwrap_or_else(|e| e.into_inner()).get(name) {
                let mut o = options.clone();
                o.time_limit = set.hard;
                o.soft_time_limit = set.soft;
                return Limits::resolve(header, &o);
            }
        }
        Limits::resolve(header, options)
    }
}

impl Layer for TimeLimitLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        let mut limits =
            self.set
                .resolve(req.name(), req.message.headers.timelimit, &req.def.options);
        limits.hard = limits.hard.or(self.defaults.hard);
        limits.soft = limits.soft.or(self.defaults.soft);
        if limits == Limits::default() {
            return next.run(req);
        }
        Box::pin(async move {
            match limit(next.run(req), limits, &req.cancel).await {
                Ok(outcome) => outcome,
                Err(hard) => {
                    let how = match (&req.def.handler, self.pool) {
                        (Handler::Async(_), _) => "task aborted",
                        (Handler::Blocking(_), Pool::Processes) => "task's process killed",
                        (Handler::Blocking(_), _) => {
                            "task abandoned: a thread cannot be killed, it runs on"
                        }
                    };
                    tracing::error!(
                        hard_limit = hard.as_secs_f64(),
                        "hard time limit exceeded; {how}"
                    );
                    Outcome::Failed(exceeded(hard))
                }
            }
        })
    }
}

/// The limits that apply to one execution.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Limits {
    pub(crate) soft: Option<Duration>,
    pub(crate) hard: Option<Duration>,
}

impl Limits {
    /// The header's limits where set, else the task's options. Zero, negative and non-finite
    /// values mean no limit.
    pub(crate) fn resolve(header: TimeLimit, options: &TaskOptions) -> Self {
        let secs = |s: Option<f64>| {
            s.filter(|s| s.is_finite() && *s > 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
        };
        let opt = |d: Option<Duration>| d.filter(|d| !d.is_zero());
        Limits {
            soft: secs(header.soft).or(opt(options.soft_time_limit)),
            hard: secs(header.hard).or(opt(options.time_limit)),
        }
    }
}

/// Waits for `run` under `limits`, firing `cancel` at the soft and at the hard limit; at the
/// hard limit, drops `run` (which aborts an async body and kills a pool child) and returns
/// the limit as the error.
pub(crate) async fn limit<F: Future>(
    run: F,
    limits: Limits,
    cancel: &Cancellation,
) -> Result<F::Output, Duration> {
    let soft = async {
        match limits.soft {
            Some(d) => {
                tokio::time::sleep(d).await;
                tracing::warn!(soft_limit = d.as_secs_f64(), "soft time limit exceeded");
                cancel.cancel();
                std::future::pending::<()>().await;
            }
            None => std::future::pending().await,
        }
    };
    let hard = async {
        match limits.hard {
            Some(d) => {
                tokio::time::sleep(d).await;
                d
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        out = run => Ok(out),
        () = soft => unreachable!("the soft limit only fires the cancellation"),
        d = hard => {
            cancel.cancel();
            Err(d)
        }
    }
}

/// The FAILURE stored at the hard limit: Celery's `TimeLimitExceeded(seconds)`.
pub(crate) fn exceeded(limit: Duration) -> RemoteError {
    RemoteError {
        exc_type: "TimeLimitExceeded".to_owned(),
        exc_module: "billiard.exceptions".to_owned(),
        exc_args: vec![serde_json::json!(limit.as_secs_f64())],
        traceback: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{ChildPid, Executor, Finished, Spawned};
    use celeriac_core::{Headers, TaskContext};
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn header_limits_win_over_options() {
        let mut o = TaskOptions::default();
        o.soft_time_limit = Some(Duration::from_secs(5));
        o.time_limit = Some(Duration::from_secs(10));
        let none = TimeLimit::default();
        assert_eq!(
            Limits::resolve(none, &o),
            Limits {
                soft: Some(Duration::from_secs(5)),
                hard: Some(Duration::from_secs(10))
            }
        );
        let header = TimeLimit {
            hard: Some(30.0),
            soft: Some(0.5),
        };
        assert_eq!(
            Limits::resolve(header, &o),
            Limits {
                soft: Some(Duration::from_millis(500)),
                hard: Some(Duration::from_secs(30))
            }
        );
        let junk = TimeLimit {
            hard: Some(-1.0),
            soft: Some(f64::NAN),
        };
        assert_eq!(
            Limits::resolve(junk, &TaskOptions::default()),
            Limits::default()
        );
    }

    fn spawn(handler: Handler, cancel: &Cancellation) -> Spawned {
        let ctx = TaskContext::new(Headers::new("t", "i"), "q", "w", cancel.clone());
        Executor::new(Pool::Async, 1).spawn(
            &handler,
            ctx,
            Vec::new(),
            serde_json::Map::new(),
            &ChildPid::default(),
        )
    }

    /// Sleeps 10 s unless cancelled first; says which.
    fn cooperative() -> Handler {
        Handler::Async(Arc::new(|ctx: TaskContext, _| {
            Box::pin(async move {
                tokio::select! {
                    () = ctx.cancellation().cancelled() => Ok(json!("cancelled")),
                    () = tokio::time::sleep(Duration::from_secs(10)) => Ok(json!("slept")),
                }
            })
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn the_soft_limit_fires_the_cancellation() {
        let cancel = Cancellation::new();
        let limits = Limits {
            soft: Some(Duration::from_secs(1)),
            hard: None,
        };
        let t0 = tokio::time::Instant::now();
        let mut spawned = spawn(cooperative(), &cancel);
        match limit(spawned.join(), limits, &cancel).await {
            Ok(Finished::Returned(Ok(v))) => assert_eq!(v, json!("cancelled")),
            other => panic!("{other:?}"),
        }
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_hard_limit_aborts_an_async_body() {
        let dropped = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let d = dropped.clone();
        let stubborn = Handler::Async(Arc::new(move |_, _| {
            let flag = Flag(d.clone());
            Box::pin(async move {
                let _flag = flag;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(json!(null))
            })
        }));
        let cancel = Cancellation::new();
        let limits = Limits {
            soft: None,
            hard: Some(Duration::from_secs(2)),
        };
        let mut spawned = spawn(stubborn, &cancel);
        let run = async move { spawned.join().await };
        match limit(run, limits, &cancel).await {
            Err(d) => assert_eq!(d, Duration::from_secs(2)),
            Ok(other) => panic!("{other:?}"),
        }
        assert!(cancel.is_cancelled());
        // The abort takes effect at the task's next poll.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(dropped.load(Ordering::SeqCst), "the body was aborted");
        assert_eq!(
            exceeded(Duration::from_secs(2)).to_exception_map(),
            json!({"exc_type": "TimeLimitExceeded", "exc_message": [2.0], "exc_module": "billiard.exceptions"})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_fails_a_body_past_its_hard_limit_and_passes_others() {
        use crate::pipeline::Outcome;
        use crate::pipeline::testing::around_slow;
        use crate::request::tests::request_with;

        let set = Arc::new(TimeLimits::default());
        let layer = TimeLimitLayer {
            pool: Pool::Async,
            set: set.clone(),
            defaults: Limits::default(),
        };
        let stack = around_slow(layer, Duration::from_secs(5));
        let (req, _) = request_with("slow", 0, |_, o| {
            o.time_limit = Some(Duration::from_secs(1));
            o.soft_time_limit = Some(Duration::from_millis(500));
        });
        let t0 = tokio::time::Instant::now();
        let Outcome::Failed(e) = stack.run(&req).await else {
            panic!("not failed")
        };
        assert_eq!(e.exc_type, "TimeLimitExceeded");
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        assert!(req.cancellation().is_cancelled(), "the soft limit fired");

        let (req, _) = request_with("quick", 0, |_, o| {
            o.time_limit = Some(Duration::from_secs(10))
        });
        assert!(matches!(stack.run(&req).await, Outcome::Succeeded(_)));
        assert!(!req.cancellation().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn the_workers_limits_apply_to_tasks_that_set_none() {
        use crate::pipeline::Outcome;
        use crate::pipeline::testing::around_slow;
        use crate::request::tests::request_with;

        let layer = TimeLimitLayer {
            pool: Pool::Async,
            set: Arc::new(TimeLimits::default()),
            defaults: Limits {
                hard: Some(Duration::from_secs(2)),
                soft: None,
            },
        };
        let stack = around_slow(layer, Duration::from_secs(5));
        let (req, _) = request_with("slow", 0, |_, _| {});
        let t0 = tokio::time::Instant::now();
        assert!(matches!(stack.run(&req).await, Outcome::Failed(_)));
        assert_eq!(t0.elapsed(), Duration::from_secs(2), "the worker's limit");
        // A task's own limit wins over the worker's.
        let (req, _) = request_with("slow", 0, |_, o| {
            o.time_limit = Some(Duration::from_secs(10))
        });
        assert!(matches!(stack.run(&req).await, Outcome::Succeeded(_)));
    }
}
