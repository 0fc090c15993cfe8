//! The REVOKED record a durable revoke stores, and the terminate request it may carry.
//!
//! For the facade (`AsyncResult::revoke_with` writes it) and the worker (which reads it before
//! running a task, and while tasks run). A revoke is REVOKED with Celery's `TaskRevokedError`
//! exception map as its result; a request to terminate running copies is one more key in that
//! map, [`TERMINATE_KEY`], naming the signal:
//! `{"exc_type": "TaskRevokedError", "exc_module": "celery.exceptions",
//! "exc_message": ["revoked"], "celeriac_terminate": "SIGTERM"}`. Celery rebuilds an exception
//! from `exc_type`, `exc_module` and `exc_message` only, so Python readers see the same
//! `TaskRevokedError` as for any revoke.

use crate::TaskState;
use crate::error::Error;
use crate::meta::{RemoteError, TaskMeta};

/// The key of a REVOKED record's exception map that asks running copies to be terminated; its
/// value is the signal's name, e.g. `"SIGTERM"`.
pub const TERMINATE_KEY: &str = "celeriac_terminate";

/// Signals a terminate revoke may ask for (the processes pool sends it to the task's child).
const SIGNALS: &[&str] = &[
    "SIGTERM", "SIGKILL", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGABRT",
];

/// The canonical name of a signal given as `SIGTERM`, `TERM` or `term`; an error names the
/// accepted ones.
pub fn signal_name(s: &str) -> Result<&'static str, Error> {
    let upper = s.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    SIGNALS.iter().copied().find(|n| *n == full).ok_or_else(|| {
        Error::config(format!(
            "unknown signal {s:?} for a terminate revoke (known: {})",
            SIGNALS.join(", ")
        ))
    })
}

/// The REVOKED record a revoke stores: Celery's `TaskRevokedError("revoked")`, and with
/// `terminate` (a signal name from [`signal_name`]) the request to stop running copies.
pub fn revoked_meta(task_id: impl Into<String>, terminate: Option<&str>) -> TaskMeta {
    let error = RemoteError::new("TaskRevokedError", "revoked").with_module("celery.exceptions");
    let mut meta = TaskMeta::exception(task_id, TaskState::Revoked, &error);
    if let (Some(signal), Some(map)) = (terminate, meta.result.as_object_mut()) {
        map.insert(TERMINATE_KEY.to_owned(), signal.into());
    }
    meta
}

/// The signal a REVOKED record asks running copies to be stopped with, if it asks.
pub fn terminate_signal(meta: &TaskMeta) -> Option<&str> {
    if meta.status != TaskState::Revoked {
        return None;
    }
    meta.result.get(TERMINATE_KEY)?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_are_canonical_and_unknown_ones_refused() {
        assert_eq!(signal_name("SIGTERM").unwrap(), "SIGTERM");
        assert_eq!(signal_name("kill").unwrap(), "SIGKILL");
        assert_eq!(signal_name(" usr1 ").unwrap(), "SIGUSR1");
        let e = signal_name("SIGFOO").unwrap_err().to_string();
        assert!(
            e.contains("unknown signal \"SIGFOO\"") && e.contains("SIGTERM"),
            "{e}"
        );
        assert!(signal_name("").is_err());
        assert!(signal_name("9").is_err());
    }

    #[test]
    fn the_record_stays_a_celery_revoked_error_with_one_more_key() {
        let m = revoked_meta("id", Some("SIGTERM"));
        assert_eq!(m.status, TaskState::Revoked);
        assert_eq!(m.result["exc_type"], "TaskRevokedError");
        assert_eq!(m.result["exc_module"], "celery.exceptions");
        assert_eq!(m.result["exc_message"], serde_json::json!(["revoked"]));
        assert_eq!(terminate_signal(&m), Some("SIGTERM"));
        let e = m.error().unwrap();
        assert_eq!(
            (e.exc_type.as_str(), e.message()),
            ("TaskRevokedError", "revoked".to_owned())
        );
        let plain = revoked_meta("id", None);
        assert_eq!(terminate_signal(&plain), None);
        assert!(plain.result.get(TERMINATE_KEY).is_none());
        // Only REVOKED records ask.
        let mut other = m.clone();
        other.status = TaskState::Failure;
        assert_eq!(terminate_signal(&other), None);
    }
}
