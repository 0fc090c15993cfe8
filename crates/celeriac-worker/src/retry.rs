//! What a task error means for the message: fail, retry later, or reject. Pure.
//!
//! For the delivery pipeline. [`TaskErrorKind::Retry`], or a failure the task's `autoretry`
//! classifier accepts, becomes a retry while `retries < max_retries` (`None` = forever). A
//! retry is a new message with the same id (§2.7 of the wire notes), published to the queue
//! the task came from with its priority and parked in the broker until its delay has passed.
//! Retries exhausted turn into FAILURE with the original cause, or `MaxRetriesExceededError`
//! when the task asked for a retry without one.

use std::time::Duration;

use celeriac_core::meta::RemoteError;
use celeriac_core::{
    BoxFuture, DynBroker, Message, PublishOptions, TaskError, TaskErrorKind, TaskOptions,
};
use chrono::{DateTime, Utc};

use crate::pipeline::{Layer, Next, Outcome, Request};
use crate::request::CELERY_EXC;

/// Decides what an error returned by the task means: FAILURE, a retry (published here), or
/// a reject.
#[derive(Debug)]
pub(crate) struct RetryLayer {
    pub(crate) broker: DynBroker,
    /// The broker parks delayed messages itself.
    pub(crate) broker_delays: bool,
}

impl Layer for RetryLayer {
    fn call<'a>(&'a self, req: &'a Request, next: Next<'a>) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let err = match next.run(req).await {
                Outcome::Errored(err) => err,
                other => return other,
            };
            let runtime = req.runtime().unwrap_or_default().as_secs_f64();
            let retries = req.message.headers.retries;
            match verdict(&err, &req.def.options, retries, req.name(), req.id()) {
                Verdict::Fail(remote) => {
                    tracing::error!(
                        runtime = %crate::report::Seconds(runtime),
                        error = %remote,
                        "task failed"
                    );
                    Outcome::Failed(remote)
                }
                // Boxed: a rare path with a large future.
                Verdict::Retry { delay, cause } => Box::pin(self.retry(req, delay, cause)).await,
                Verdict::Reject { requeue } => {
                    tracing::warn!(requeue, reason = err.message(), "task rejected its message");
                    Outcome::Rejected {
                        requeue,
                        reason: err.message().to_owned(),
                    }
                }
            }
        })
    }
}

impl RetryLayer {
    /// Publishes the retry; a failed publish becomes FAILURE with the cause.
    async fn retry(&self, req: &Request, delay: Duration, cause: RemoteError) -> Outcome {
        let eta = Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        let message = retry_message(&req.message, eta);
        let options = PublishOptions::default()
            .priority(req.message.properties.priority)
            .not_before(self.broker_delays.then_some(eta));
        match self.broker.publish(&req.queue, &message, options).await {
            Ok(()) => {
                tracing::warn!(
                    retries = message.headers.retries,
                    delay = delay.as_secs_f64(),
                    error = %cause,
                    "task will be retried"
                );
                Outcome::Retried { cause, eta }
            }
            Err(e) => {
                tracing::error!(error = %e, cause = %cause, "cannot publish the retry; task failed");
                Outcome::Failed(cause)
            }
        }
    }
}

/// The fate of a task that returned an error.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Store FAILURE with this exception.
    Fail(RemoteError),
    /// Run again after `delay`; store RETRY with `cause`.
    Retry { delay: Duration, cause: RemoteError },
    /// Reject the message, requeued or dropped; store nothing.
    Reject { requeue: bool },
}

/// Decides what `err`, returned by try number `retries + 1` of task `name[id]`, leads to.
pub(crate) fn verdict(
    err: &TaskError,
    options: &TaskOptions,
    retries: u32,
    name: &str,
    id: &str,
) -> Verdict {
    let wants_retry = match err.kind() {
        TaskErrorKind::Reject => {
            return Verdict::Reject {
                requeue: err.requeue(),
            };
        }
        TaskErrorKind::Retry => true,
        _ => options.autoretry.is_some_and(|f| f(err)),
    };
    if !wants_retry {
        return Verdict::Fail(err.to_remote());
    }
    if let Some(max) = options.max_retries {
        if retries >= max {
            // `TaskError::retry()` carries no cause of its own; `into_retry` keeps the
            // original exception type.
            let bare = err.kind() == TaskErrorKind::Retry && err.exc_type() == "Retry";
            return Verdict::Fail(if bare {
                RemoteError::new(
                    "MaxRetriesExceededError",
                    format!("Can't retry {name}[{id}]: max retries ({max}) exceeded"),
                )
                .with_module(CELERY_EXC)
            } else {
                err.to_remote()
            });
        }
    }
    Verdict::Retry {
        delay: options.retry_delay(retries, err.countdown()),
        cause: err.to_remote(),
    }
}

/// The message that retries `original` at `eta`: same id and body, `retries + 1`, the parent
/// set to the task itself when it had none (as Celery does), and the `eta` header set so that
/// a worker without a delayed store (a Python one, or ours on such a broker) still waits.
pub(crate) fn retry_message(original: &Message, eta: DateTime<Utc>) -> Message {
    let mut m = original.clone();
    let h = &mut m.headers;
    h.retries += 1;
    if h.parent_id.is_none() {
        h.parent_id = Some(h.id.clone());
    }
    h.eta = Some(eta);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::{Body, ContentType, Headers};

    fn opts() -> TaskOptions {
        let mut o = TaskOptions::default();
        o.max_retries = Some(2);
        o.default_retry_delay = Duration::from_secs(7);
        o
    }

    #[test]
    fn plain_failures_fail_and_rejections_reject() {
        let v = verdict(&TaskError::fail("no"), &opts(), 0, "t", "i");
        assert_eq!(v, Verdict::Fail(TaskError::fail("no").to_remote()));
        let v = verdict(&TaskError::reject("bad", true), &opts(), 0, "t", "i");
        assert_eq!(v, Verdict::Reject { requeue: true });
    }

    #[test]
    fn retries_until_max_then_fail_with_the_cause() {
        let err = TaskError::retry_after(Duration::from_secs(3));
        match verdict(&err, &opts(), 1, "t", "i") {
            Verdict::Retry { delay, .. } => assert_eq!(delay, Duration::from_secs(3)),
            v => panic!("{v:?}"),
        }
        match verdict(&TaskError::retry(), &opts(), 1, "t", "i") {
            Verdict::Retry { delay, .. } => assert_eq!(delay, Duration::from_secs(7)),
            v => panic!("{v:?}"),
        }
        let Verdict::Fail(e) = verdict(&TaskError::retry(), &opts(), 2, "t", "i") else {
            panic!()
        };
        assert_eq!(e.exc_type, "MaxRetriesExceededError");
        assert_eq!(e.exc_module, "celery.exceptions");
        assert!(e.message().contains("t[i]"), "{e}");

        let caused = TaskError::new("IOError", "down").into_retry(None);
        let Verdict::Fail(e) = verdict(&caused, &opts(), 2, "t", "i") else {
            panic!()
        };
        assert_eq!(e.summary(), "IOError: down");

        let mut forever = opts();
        forever.max_retries = None;
        assert!(matches!(
            verdict(&TaskError::retry(), &forever, 1000, "t", "i"),
            Verdict::Retry { .. }
        ));
    }

    #[test]
    fn autoretry_classifies_failures() {
        let mut o = opts();
        o.autoretry = Some(|e| e.exc_type() == "Flaky");
        assert!(matches!(
            verdict(&TaskError::new("Flaky", "x"), &o, 0, "t", "i"),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            verdict(&TaskError::new("Other", "x"), &o, 0, "t", "i"),
            Verdict::Fail(_)
        ));
        let Verdict::Fail(e) = verdict(&TaskError::new("Flaky", "x"), &o, 2, "t", "i") else {
            panic!()
        };
        assert_eq!(e.exc_type, "Flaky");
    }

    #[test]
    fn the_retry_message_keeps_the_id_and_counts() {
        let body = Body::default();
        let mut m = Message::new(Headers::new("t", "id-1"), &body, ContentType::Json).unwrap();
        m.properties.priority = Some(7);
        let eta = Utc::now();
        let r = retry_message(&m, eta);
        assert_eq!(r.id(), "id-1");
        assert_eq!(r.headers.retries, 1);
        assert_eq!(r.headers.parent_id.as_deref(), Some("id-1"));
        assert_eq!(r.headers.eta, Some(eta));
        assert_eq!(r.properties.priority, Some(7));
        assert_eq!(r.body, m.body);
        let mut with_parent = m.clone();
        with_parent.headers.parent_id = Some("p".into());
        assert_eq!(
            retry_message(&with_parent, eta)
                .headers
                .parent_id
                .as_deref(),
            Some("p")
        );
    }

    mod layer {
        use std::sync::Arc;

        use celeriac_core::memory::MemoryBroker;
        use celeriac_core::{Broker, TaskError};

        use super::super::RetryLayer;
        use crate::pipeline::Outcome;
        use crate::pipeline::testing::around;
        use crate::request::tests::request_with;

        fn layer(broker: &MemoryBroker) -> RetryLayer {
            RetryLayer {
                broker: Arc::new(broker.clone()),
                broker_delays: true,
            }
        }

        #[tokio::test]
        async fn a_returned_error_becomes_a_retry_a_failure_or_a_reject() {
            let broker = MemoryBroker::new();
            let (stack, _) = around(layer(&broker), |_| {
                Outcome::Errored(TaskError::retry_after(std::time::Duration::from_secs(60)))
            });
            let (req, _) = request_with("r", 0, |_, o| o.max_retries = Some(1));
            let Outcome::Retried { eta, .. } = stack.run(&req).await else {
                panic!("not retried")
            };
            assert!(eta > chrono::Utc::now() + chrono::Duration::seconds(50));
            let held = broker.stats("celery").await.unwrap();
            assert_eq!(held.delayed, 1, "the retry is parked in the broker");

            let (req, _) = request_with("r", 0, |m, o| {
                m.headers.retries = 1;
                o.max_retries = Some(1);
            });
            let o = stack.run(&req).await;
            let Outcome::Failed(e) = o else {
                panic!("{o:?}")
            };
            assert_eq!(e.exc_type, "MaxRetriesExceededError");

            let (stack, _) = around(layer(&broker), |_| {
                Outcome::Errored(TaskError::reject("no", false))
            });
            let (req, _) = request_with("j", 0, |_, _| {});
            let o = stack.run(&req).await;
            assert!(
                matches!(o, Outcome::Rejected { requeue: false, ref reason } if reason == "no"),
                "{o:?}"
            );
        }

        #[tokio::test]
        async fn other_outcomes_pass_through() {
            let broker = MemoryBroker::new();
            let (stack, _) = around(layer(&broker), |_| Outcome::Succeeded(1.into()));
            let (req, _) = request_with("s", 0, |_, _| {});
            assert!(matches!(stack.run(&req).await, Outcome::Succeeded(_)));
            assert_eq!(broker.stats("celery").await.unwrap().total(), 0);
        }
    }
}
