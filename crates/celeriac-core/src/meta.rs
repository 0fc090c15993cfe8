//! What the result backend stores for a task: [`TaskMeta`], Celery's task meta document.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::state::TaskState;

/// The `exc_module` celeriac writes for errors raised by Rust tasks and by celeriac itself.
pub const RUST_EXC_MODULE: &str = "celeriac.errors";

/// A task's record in the result backend, field for field Celery's task meta document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMeta {
    /// The state.
    pub status: TaskState,
    /// The return value; an exception map for FAILURE, RETRY and REVOKED.
    #[serde(default)]
    pub result: Value,
    /// Formatted traceback or null.
    #[serde(default)]
    pub traceback: Option<String>,
    /// Result tuples of tasks sent by this task.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub children: Vec<Value>,
    /// Completion time for ready states.
    #[serde(default, with = "crate::time::opt_serde")]
    pub date_done: Option<DateTime<Utc>>,
    /// The group id, if the task is part of a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The parent task id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Task name (extended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Real positional args (extended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<Value>>,
    /// Real keyword args (extended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<Map<String, Value>>,
    /// Node name of the worker (extended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Retries so far (extended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Queue the task arrived by (extended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The task id.
    pub task_id: String,
    /// Where this record goes for a backend that delivers results as messages (Celery's
    /// `rpc://`, see [`ReplyQueue`](crate::backend::ReplyQueue)): the `reply_to` of the task's
    /// message, which the worker copies here. Not part of the stored document.
    #[serde(skip)]
    pub reply_to: Option<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    Ok(Option::<Vec<Value>>::deserialize(d)?.unwrap_or_default())
}

impl TaskMeta {
    /// A record in `status` with `result`; `date_done` is set for ready states.
    pub fn new(task_id: impl Into<String>, status: TaskState, result: Value) -> Self {
        // Celery's time format keeps microseconds; store what a text backend can return.
        let date_done = status.is_ready().then(crate::time::now_micros);
        TaskMeta {
            status,
            result,
            traceback: None,
            children: Vec::new(),
            date_done,
            group_id: None,
            parent_id: None,
            name: None,
            args: None,
            kwargs: None,
            worker: None,
            retries: None,
            queue: None,
            task_id: task_id.into(),
            reply_to: None,
        }
    }

    /// What a backend answers for an id it has no record of.
    pub fn pending(task_id: impl Into<String>) -> Self {
        Self::new(task_id, TaskState::Pending, Value::Null)
    }

    /// SUCCESS with the return value.
    pub fn success(task_id: impl Into<String>, value: Value) -> Self {
        Self::new(task_id, TaskState::Success, value)
    }

    /// STARTED, with Celery's `{pid, hostname}` result.
    pub fn started(task_id: impl Into<String>, hostname: &str) -> Self {
        Self::new(
            task_id,
            TaskState::Started,
            json!({"pid": std::process::id(), "hostname": hostname}),
        )
    }

    /// A state whose result is an exception (FAILURE, RETRY, REVOKED).
    pub fn exception(task_id: impl Into<String>, status: TaskState, error: &RemoteError) -> Self {
        let mut meta = Self::new(task_id, status, error.to_exception_map());
        meta.traceback = error.traceback.clone();
        meta
    }

    /// For exception states: the exception, rebuilt from the stored map.
    pub fn error(&self) -> Option<RemoteError> {
        if !self.status.is_exception() {
            return None;
        }
        let mut e = RemoteError::from_exception_map(&self.result);
        e.traceback = self.traceback.clone();
        Some(e)
    }
}

/// An exception as stored by Celery: type, message (the exception's args), module, traceback.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteError {
    /// The exception class name (`ValueError`, `TaskRevokedError`, a Rust error type's name).
    pub exc_type: String,
    /// The module of the exception class (`builtins`, `celery.exceptions`, `celeriac.errors`).
    pub exc_module: String,
    /// The exception's arguments; the first is usually the message.
    pub exc_args: Vec<Value>,
    /// The formatted traceback, when known.
    pub traceback: Option<String>,
}

/// Python's built-in exception names: an error named like one is stored with module
/// `builtins`, so a Python caller catches it with `except ValueError:`.
const PYTHON_BUILTIN_EXCEPTIONS: &[&str] = &[
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "BufferError",
    "ConnectionError",
    "ConnectionAbortedError",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "EOFError",
    "Exception",
    "FileExistsError",
    "FileNotFoundError",
    "FloatingPointError",
    "IndexError",
    "InterruptedError",
    "IsADirectoryError",
    "KeyError",
    "LookupError",
    "MemoryError",
    "NotADirectoryError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PermissionError",
    "ProcessLookupError",
    "RecursionError",
    "ReferenceError",
    "RuntimeError",
    "TimeoutError",
    "TypeError",
    "UnicodeDecodeError",
    "UnicodeEncodeError",
    "UnicodeError",
    "ValueError",
    "ZeroDivisionError",
];

impl RemoteError {
    /// An error of type `exc_type` with one message argument.
    ///
    /// The module is `builtins` for Python's built-in exception names (`ValueError`,
    /// `TypeError`, ...) so Python callers can catch them as such, and
    /// [`RUST_EXC_MODULE`] otherwise.
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        let exc_type = exc_type.into();
        let exc_module = if PYTHON_BUILTIN_EXCEPTIONS.contains(&exc_type.as_str()) {
            "builtins"
        } else {
            RUST_EXC_MODULE
        };
        RemoteError {
            exc_type,
            exc_module: exc_module.to_owned(),
            exc_args: vec![Value::String(message.into())],
            traceback: None,
        }
    }

    /// Sets the module.
    #[must_use]
    pub fn with_module(mut self, module: impl Into<String>) -> Self {
        self.exc_module = module.into();
        self
    }

    /// Sets the traceback.
    #[must_use]
    pub fn with_traceback(mut self, traceback: impl Into<String>) -> Self {
        self.traceback = Some(traceback.into());
        self
    }

    /// The message: the first argument when it is a string, else all arguments joined.
    pub fn message(&self) -> String {
        match self.exc_args.as_slice() {
            [Value::String(s)] => s.clone(),
            [] => String::new(),
            args => args
                .iter()
                .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// `Type: message`, as Python prints an exception.
    pub fn summary(&self) -> String {
        let msg = self.message();
        if msg.is_empty() {
            self.exc_type.clone()
        } else {
            format!("{}: {msg}", self.exc_type)
        }
    }

    /// Celery's `{"exc_type", "exc_message", "exc_module"}` map.
    pub fn to_exception_map(&self) -> Value {
        json!({"exc_type": self.exc_type, "exc_message": self.exc_args, "exc_module": self.exc_module})
    }

    /// Reads Celery's exception map; tolerates a bare string or any other value.
    pub fn from_exception_map(v: &Value) -> Self {
        match v {
            Value::Object(m) => {
                let exc_type = m
                    .get("exc_type")
                    .and_then(Value::as_str)
                    .unwrap_or("Exception")
                    .to_owned();
                let exc_module = m
                    .get("exc_module")
                    .and_then(Value::as_str)
                    .unwrap_or("builtins")
                    .to_owned();
                let exc_args = match m.get("exc_message") {
                    Some(Value::Array(a)) => a.clone(),
                    Some(Value::Null) | None => Vec::new(),
                    Some(other) => vec![other.clone()],
                };
                RemoteError {
                    exc_type,
                    exc_module,
                    exc_args,
                    traceback: None,
                }
            }
            Value::Null => RemoteError {
                exc_type: "Exception".into(),
                exc_module: "builtins".into(),
                exc_args: vec![],
                traceback: None,
            },
            other => RemoteError {
                exc_type: "Exception".into(),
                exc_module: "builtins".into(),
                exc_args: vec![other.clone()],
                traceback: None,
            },
        }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Celery's form of a saved group, `GroupResult.as_tuple()`:
/// `[[gid, null], [[[id, null], null], …]]`. Celery's Redis and cache backends store it as
/// `{"result": <tuple>}`, its database backend as it is.
pub fn group_tuple(group_id: &str, task_ids: &[String]) -> serde_json::Value {
    let members: Vec<serde_json::Value> = task_ids
        .iter()
        .map(|id| serde_json::json!([[id, null], null]))
        .collect();
    serde_json::json!([[group_id, null], members])
}

/// The member ids of a group tuple ([`group_tuple`], or one Celery wrote); `None` when the
/// value is not one. A member is `[[id, parent], null]` (a result) or `[[gid, parent], [...]]`
/// (a nested group): its id comes first either way.
pub fn group_tuple_members(tuple: &serde_json::Value) -> Option<Vec<String>> {
    tuple
        .get(1)?
        .as_array()?
        .iter()
        .map(|m| m.get(0)?.get(0)?.as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn group_tuples_are_celerys_and_read_back() {
        let ids = vec!["a".to_owned(), "b".to_owned()];
        let t = group_tuple("g", &ids);
        assert_eq!(
            t,
            json!([["g", null], [[["a", null], null], [["b", null], null]]])
        );
        assert_eq!(group_tuple_members(&t), Some(ids));
        // A nested group's id comes first too; anything else is not a group tuple.
        let nested = json!([["g", null], [[["n", null], [[["x", null], null]]]]]);
        assert_eq!(group_tuple_members(&nested), Some(vec!["n".to_owned()]));
        assert_eq!(group_tuple_members(&json!({"result": 1})), None);
        assert_eq!(
            group_tuple_members(&json!([["g", null], [[[1, null], null]]])),
            None
        );
    }

    use super::*;

    #[test]
    fn reads_celery_meta_documents() {
        let raw = r#"{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], "date_done": "2026-01-05T10:15:31.176903+00:00",
            "group_id": "bb6e", "parent_id": "db17", "name": "proj.tasks.add", "args": [2, 3], "kwargs": {}, "worker": "w1@host",
            "retries": 0, "queue": "celery", "task_id": "838f"}"#;
        let m: TaskMeta = serde_json::from_str(raw).unwrap();
        assert_eq!(m.status, TaskState::Success);
        assert_eq!(m.result, json!(5));
        assert_eq!(m.name.as_deref(), Some("proj.tasks.add"));
        assert!(m.date_done.is_some());
        let again: TaskMeta = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn writes_fields_in_celery_order_with_task_id_last() {
        let m = TaskMeta::success("abc", json!(4));
        let text = serde_json::to_string(&m).unwrap();
        crate::protocol::assert_key_order(
            &text,
            &[
                "status",
                "result",
                "traceback",
                "children",
                "date_done",
                "task_id",
            ],
        );
        assert!(!text.contains("group_id"), "{text}");
    }

    #[test]
    fn exceptions_round_trip_through_the_celery_map() {
        let e = RemoteError::new("ValueError", "bad input")
            .with_module("builtins")
            .with_traceback("Traceback ...");
        let m = TaskMeta::exception("id", TaskState::Failure, &e);
        assert_eq!(
            m.result,
            json!({"exc_type": "ValueError", "exc_message": ["bad input"], "exc_module": "builtins"})
        );
        assert_eq!(m.error().unwrap(), e);
        assert_eq!(e.summary(), "ValueError: bad input");
        let revoked = RemoteError::from_exception_map(
            &json!({"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"}),
        );
        assert_eq!(revoked.message(), "revoked");
        assert_eq!(
            RemoteError::from_exception_map(&json!({"exc_type": "E", "exc_message": ["bad", 42]}))
                .message(),
            "bad, 42"
        );
    }
}
