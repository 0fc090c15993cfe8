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
use celeriac_core::{Message, TaskError, TaskErrorKind, TaskOptions};
use chrono::{DateTime, Utc};

use crate::request::CELERY_EXC;

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
        m.properties.priority = 7;
        let eta = Utc::now();
        let r = retry_message(&m, eta);
        assert_eq!(r.id(), "id-1");
        assert_eq!(r.headers.retries, 1);
        assert_eq!(r.headers.parent_id.as_deref(), Some("id-1"));
        assert_eq!(r.headers.eta, Some(eta));
        assert_eq!(r.properties.priority, 7);
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
}
