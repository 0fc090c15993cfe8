//! [`Outcome`]: how one delivery ended, as the layers see it on the way out.

use celeriac_core::meta::RemoteError;
use celeriac_core::{TaskError, TaskState};
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::report::Tally;

/// How a delivery ended, handed from the inner layers to the outer ones.
///
/// The record layer stores what it says (SUCCESS, FAILURE, RETRY, REVOKED), the canvas layer
/// sends what follows it, and the settle layer acks, rejects, requeues or dead-letters the
/// delivery by it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// The task returned this value: SUCCESS.
    Succeeded(Value),
    /// The task returned an error that the retry layer has not classified yet. Only layers
    /// added with [`Worker::layer`](crate::Worker::layer) see it; the retry layer turns it
    /// into [`Outcome::Failed`], [`Outcome::Retried`] or [`Outcome::Rejected`].
    Errored(TaskError),
    /// The task failed for good (its error, a panic, a time limit, a lost process): FAILURE
    /// with this exception.
    Failed(RemoteError),
    /// A retry of the task was published, to run at `eta`: RETRY with `cause`.
    Retried {
        /// The error that caused the retry.
        cause: RemoteError,
        /// When the retry may run.
        eta: DateTime<Utc>,
    },
    /// The task rejected its message (Celery's `Reject`): requeued, or dropped. Nothing is
    /// stored.
    Rejected {
        /// Whether the message goes back to its queue.
        requeue: bool,
        /// Why.
        reason: String,
    },
    /// The task was not run, or was stopped, by a revoke: it had expired (`expired`) or was
    /// terminated (`terminated`). REVOKED with `TaskRevokedError(reason)`.
    Revoked {
        /// Celery's reason: `expired`, `terminated`, `revoked`.
        reason: String,
    },
    /// The task was not run: its id already has a ready result, in this state (a duplicate
    /// delivery, or a revoke stored before it ran).
    Skipped(TaskState),
    /// The task was not run yet: its message was parked in the broker's delayed store until
    /// this time.
    Parked(DateTime<Utc>),
    /// The task was not run, or did not finish, and goes back to its queue as it is: a
    /// shutdown handed it back, or its process died under `acks_late`.
    Requeued,
    /// The message was moved to its queue's dead-letter queue for `reason`; `error` is
    /// stored as FAILURE.
    DeadLettered {
        /// Why, as written in the dead letter's headers.
        reason: String,
        /// The FAILURE stored for the task.
        error: RemoteError,
    },
}

impl Outcome {
    /// The state this outcome stores, if any.
    pub fn state(&self) -> Option<TaskState> {
        Some(match self {
            Outcome::Succeeded(_) => TaskState::Success,
            Outcome::Errored(_) | Outcome::Failed(_) | Outcome::DeadLettered { .. } => {
                TaskState::Failure
            }
            Outcome::Retried { .. } => TaskState::Retry,
            Outcome::Revoked { .. } => TaskState::Revoked,
            Outcome::Rejected { .. }
            | Outcome::Skipped(_)
            | Outcome::Parked(_)
            | Outcome::Requeued => return None,
        })
    }

    /// How the worker's report counts it.
    pub(crate) fn tally(&self) -> Tally {
        match self {
            Outcome::Succeeded(_) => Tally::Succeeded,
            Outcome::Errored(_) | Outcome::Failed(_) => Tally::Failed,
            Outcome::Retried { .. } => Tally::Retried,
            Outcome::Rejected { .. } => Tally::Rejected,
            Outcome::Revoked { .. } | Outcome::Skipped(TaskState::Revoked) => Tally::Revoked,
            Outcome::Skipped(_) => Tally::Skipped,
            Outcome::Parked(_) | Outcome::Requeued => Tally::Requeued,
            Outcome::DeadLettered { .. } => Tally::DeadLettered,
        }
    }
}
