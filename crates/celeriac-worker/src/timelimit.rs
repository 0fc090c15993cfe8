//! Soft and hard time limits around a running task body.
//!
//! For the delivery pipeline. The message's `timelimit` header (`[hard, soft]`, seconds) wins
//! over the task's options, as in Celery. At the soft limit the task's
//! [`Cancellation`] fires and the task decides how to stop. At the hard limit an async body
//! is aborted; a blocking body cannot be (a thread cannot be killed safely), so the worker
//! fires the cancellation, reports `TimeLimitExceeded`, frees the task's slot and leaves the
//! thread to finish on its own; under the processes pool the body's child process is killed
//! (dropping the [`Spawned`] kills it), which really stops it.

use std::time::Duration;

use celeriac_core::meta::RemoteError;
use celeriac_core::{Cancellation, TaskOptions, TimeLimit};

use crate::pool::{Finished, Spawned};

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

/// How a time-limited body ended.
#[derive(Debug)]
pub(crate) enum Ended {
    Finished(Finished),
    /// Stopped (async, processes pool) or abandoned (blocking on a thread) at the hard limit.
    TimedOut(Duration),
}

/// Waits for `spawned` under `limits`, firing `cancel` at the soft and at the hard limit.
///
/// Dropping the returned future drops `spawned`, which aborts an async body.
pub(crate) async fn run(mut spawned: Spawned, limits: Limits, cancel: Cancellation) -> Ended {
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
        f = spawned.join() => Ended::Finished(f),
        () = soft => unreachable!("the soft limit only fires the cancellation"),
        d = hard => {
            cancel.cancel();
            Ended::TimedOut(d)
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
    use crate::options::Pool;
    use crate::pool::Executor;
    use celeriac_core::{Handler, Headers, TaskContext};
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
        Executor::new(Pool::Async, 1).spawn(&handler, ctx, Vec::new(), serde_json::Map::new())
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
        match run(spawn(cooperative(), &cancel), limits, cancel.clone()).await {
            Ended::Finished(Finished::Returned(Ok(v))) => assert_eq!(v, json!("cancelled")),
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
        match run(spawn(stubborn, &cancel), limits, cancel.clone()).await {
            Ended::TimedOut(d) => assert_eq!(d, Duration::from_secs(2)),
            other @ Ended::Finished(_) => panic!("{other:?}"),
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
}
