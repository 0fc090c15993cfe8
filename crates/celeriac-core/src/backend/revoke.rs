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

/// A signal a terminate revoke may ask for; the processes pool sends it to the task's child.
///
/// Parsed from `SIGTERM`, `TERM` or `term`; an unknown name is an error listing the known
/// ones.
///
/// ```
/// use celeriac_core::backend::revoke::Signal;
/// assert_eq!("kill".parse::<Signal>()?, Signal::Kill);
/// assert_eq!(Signal::Kill.name(), "SIGKILL");
/// assert!("SIGFOO".parse::<Signal>().is_err());
/// # Ok::<(), celeriac_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Signal {
    /// SIGTERM, the default.
    #[default]
    Term,
    /// SIGKILL.
    Kill,
    /// SIGINT.
    Int,
    /// SIGQUIT.
    Quit,
    /// SIGHUP.
    Hup,
    /// SIGUSR1.
    Usr1,
    /// SIGUSR2.
    Usr2,
    /// SIGABRT.
    Abrt,
}

impl Signal {
    /// Every signal, in the order error messages list them.
    pub const ALL: [Signal; 8] = [
        Signal::Term,
        Signal::Kill,
        Signal::Int,
        Signal::Quit,
        Signal::Hup,
        Signal::Usr1,
        Signal::Usr2,
        Signal::Abrt,
    ];

    /// The canonical name, e.g. `SIGTERM` (what the stored record and Celery's `signal` say).
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Kill => "SIGKILL",
            Signal::Int => "SIGINT",
            Signal::Quit => "SIGQUIT",
            Signal::Hup => "SIGHUP",
            Signal::Usr1 => "SIGUSR1",
            Signal::Usr2 => "SIGUSR2",
            Signal::Abrt => "SIGABRT",
        }
    }
}

impl std::str::FromStr for Signal {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let upper = s.trim().to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Signal::ALL
            .into_iter()
            .find(|sig| sig.name() == full)
            .ok_or_else(|| {
                let known: Vec<&str> = Signal::ALL.iter().map(|s| s.name()).collect();
                Error::config(format!(
                    "unknown signal {s:?} for a terminate revoke (known: {})",
                    known.join(", ")
                ))
            })
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The canonical name of a signal given as `SIGTERM`, `TERM` or `term`; an error names the
/// accepted ones.
pub fn signal_name(s: &str) -> Result<&'static str, Error> {
    s.parse::<Signal>().map(Signal::name)
}

/// The REVOKED record a revoke stores: Celery's `TaskRevokedError("revoked")`, and with
/// `terminate` the request to stop running copies with that signal.
pub fn revoked_meta(task_id: impl Into<String>, terminate: Option<Signal>) -> TaskMeta {
    let error = RemoteError::new("TaskRevokedError", "revoked").with_module("celery.exceptions");
    let mut meta = TaskMeta::exception(task_id, TaskState::Revoked, &error);
    if let (Some(signal), Some(map)) = (terminate, meta.result.as_object_mut()) {
        map.insert(TERMINATE_KEY.to_owned(), signal.name().into());
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
        let m = revoked_meta("id", Some(Signal::Term));
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
