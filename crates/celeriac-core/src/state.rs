//! Task states, as Celery defines them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The state of a task, as stored in the result backend and shown by monitors.
///
/// `PENDING` is never stored: an id with no record is pending. Custom states (progress reports)
/// are kept as [`TaskState::Custom`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Unknown or waiting to run.
    Pending,
    /// A worker received the message (events only).
    Received,
    /// Execution began.
    Started,
    /// Finished; the result is the return value.
    Success,
    /// Failed; the result is the exception.
    Failure,
    /// Failed and scheduled to run again.
    Retry,
    /// Revoked, expired or terminated.
    Revoked,
    /// The message was rejected (events only).
    Rejected,
    /// Any other state, e.g. a progress state set by the task.
    Custom(String),
}

impl TaskState {
    /// The state's name on the wire (`"SUCCESS"`).
    pub fn as_str(&self) -> &str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Received => "RECEIVED",
            TaskState::Started => "STARTED",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Retry => "RETRY",
            TaskState::Revoked => "REVOKED",
            TaskState::Rejected => "REJECTED",
            TaskState::Custom(s) => s,
        }
    }

    /// Whether the task has finished for good: SUCCESS, FAILURE or REVOKED.
    pub fn is_ready(&self) -> bool {
        matches!(
            self,
            TaskState::Success | TaskState::Failure | TaskState::Revoked
        )
    }

    /// Whether the stored result is an exception: RETRY, FAILURE or REVOKED.
    pub fn is_exception(&self) -> bool {
        matches!(
            self,
            TaskState::Retry | TaskState::Failure | TaskState::Revoked
        )
    }

    /// Whether `get()` raises for this state: FAILURE or REVOKED.
    pub fn propagates(&self) -> bool {
        matches!(self, TaskState::Failure | TaskState::Revoked)
    }

    /// Celery's precedence: a lower number wins when two reports of one task are merged.
    ///
    /// SUCCESS, FAILURE, custom states, REVOKED, STARTED, RECEIVED, REJECTED, RETRY, PENDING.
    pub fn precedence(&self) -> u8 {
        match self {
            TaskState::Success => 0,
            TaskState::Failure => 1,
            TaskState::Custom(_) => 2,
            TaskState::Revoked => 3,
            TaskState::Started => 4,
            TaskState::Received => 5,
            TaskState::Rejected => 6,
            TaskState::Retry => 7,
            TaskState::Pending => 8,
        }
    }

    /// Whether a result store may replace a record in state `self` with one in state `new`.
    ///
    /// SUCCESS is final (a late duplicate never overwrites it), and a ready state is never
    /// replaced by a state that is not ready (a late STARTED or RETRY from a redelivered copy).
    pub fn may_be_replaced_by(&self, new: &TaskState) -> bool {
        match self {
            TaskState::Success => false,
            s if s.is_ready() => new.is_ready(),
            _ => true,
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "PENDING" => TaskState::Pending,
            "RECEIVED" => TaskState::Received,
            "STARTED" => TaskState::Started,
            "SUCCESS" => TaskState::Success,
            "FAILURE" => TaskState::Failure,
            "RETRY" => TaskState::Retry,
            "REVOKED" => TaskState::Revoked,
            "REJECTED" => TaskState::Rejected,
            other => TaskState::Custom(other.to_owned()),
        })
    }
}

impl Serialize for TaskState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TaskState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(s.parse().unwrap_or(TaskState::Pending))
    }
}

#[cfg(test)]
mod tests {
    use super::TaskState::*;
    use super::*;

    #[test]
    fn sets_match_celery() {
        let all = [
            Pending, Received, Started, Success, Failure, Retry, Revoked, Rejected,
        ];
        let ready: Vec<_> = all.iter().filter(|s| s.is_ready()).collect();
        assert_eq!(ready, [&Success, &Failure, &Revoked]);
        let exc: Vec<_> = all.iter().filter(|s| s.is_exception()).collect();
        assert_eq!(exc, [&Failure, &Retry, &Revoked]);
        let prop: Vec<_> = all.iter().filter(|s| s.propagates()).collect();
        assert_eq!(prop, [&Failure, &Revoked]);
    }

    #[test]
    fn precedence_order_matches_celery() {
        let mut states = vec![
            Pending,
            Retry,
            Rejected,
            Received,
            Started,
            Revoked,
            Custom("PROGRESS".into()),
            Failure,
            Success,
        ];
        states.reverse();
        states.sort_by_key(TaskState::precedence);
        let names: Vec<_> = states.iter().map(TaskState::as_str).collect();
        assert_eq!(
            names,
            [
                "SUCCESS", "FAILURE", "PROGRESS", "REVOKED", "STARTED", "RECEIVED", "REJECTED",
                "RETRY", "PENDING"
            ]
        );
    }

    #[test]
    fn success_is_final_and_ready_states_ignore_late_progress() {
        assert!(!Success.may_be_replaced_by(&Started));
        assert!(!Success.may_be_replaced_by(&Failure));
        assert!(!Failure.may_be_replaced_by(&Started));
        assert!(!Revoked.may_be_replaced_by(&Retry));
        assert!(Failure.may_be_replaced_by(&Success));
        assert!(Started.may_be_replaced_by(&Success));
        assert!(Retry.may_be_replaced_by(&Started));
        assert!(Pending.may_be_replaced_by(&Custom("PROGRESS".into())));
    }

    #[test]
    fn round_trips_names() {
        for s in ["PENDING", "STARTED", "SUCCESS", "PROGRESS"] {
            let st: TaskState = serde_json::from_str(&format!("\"{s}\"")).unwrap();
            assert_eq!(serde_json::to_string(&st).unwrap(), format!("\"{s}\""));
        }
    }
}
