//! Turning a delivered message into a [`Request`] the worker can run, or a [`Refusal`].
//!
//! For the delivery pipeline. The order follows Celery (§2.1 of the wire notes): the task name
//! is looked up *before* the body is decoded, so an unknown task is reported as
//! `NotRegistered` even when its body is in a format we do not read. Every refused message is
//! moved to the dead-letter queue (see `dead`), not requeued: a message that cannot be run now
//! will not become runnable by being delivered again, and requeueing it would make it a poison
//! pill; from the dead-letter queue it can be inspected, and requeued once the task exists.

use std::sync::Arc;

use celeriac_core::meta::RemoteError;
use celeriac_core::{Body, Error, Message, Registry, TaskDef};

/// The module Celery's own exceptions live in.
pub(crate) const CELERY_EXC: &str = "celery.exceptions";

/// A message ready to run: its task definition, headers and decoded arguments.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// Shared with the task's context ([`TaskContext::for_message`]), not copied for it.
    pub(crate) message: Arc<Message>,
    pub(crate) body: Body,
    pub(crate) def: Arc<TaskDef>,
    pub(crate) queue: String,
}

impl Request {
    pub(crate) fn id(&self) -> &str {
        self.message.id()
    }

    pub(crate) fn name(&self) -> &str {
        &self.def.name
    }

    /// No result is stored except failures: the header or the task option says so.
    pub(crate) fn ignore_result(&self) -> bool {
        self.message.headers.ignore_result || self.def.options.ignore_result
    }
}

/// Why a message is not run. The message is rejected without requeue.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The task id, when the headers could be read.
    pub(crate) task_id: Option<String>,
    /// The task name, when the headers could be read.
    pub(crate) task_name: Option<String>,
    /// What to store as FAILURE for the id.
    pub(crate) error: RemoteError,
    /// The message, when its envelope could be read (it goes to the dead-letter queue).
    pub(crate) message: Option<Message>,
}

/// Decodes `message` from `queue` against `registry`.
pub(crate) fn decode(
    message: Result<Message, Error>,
    queue: &str,
    registry: &Registry,
) -> Result<Request, Box<Refusal>> {
    let message = message.map_err(|e| {
        Box::new(Refusal {
            task_id: None,
            task_name: None,
            error: RemoteError::new("DecodeError", error_chain(&e)).with_module("kombu.exceptions"),
            message: None,
        })
    })?;
    let refuse = |error: RemoteError, message: Message| {
        Err(Box::new(Refusal {
            task_id: Some(message.id().to_owned()),
            task_name: Some(message.task().to_owned()),
            error,
            message: Some(message),
        }))
    };
    let Some(def) = registry.get(message.task()) else {
        let error = RemoteError::new("NotRegistered", message.task()).with_module(CELERY_EXC);
        return refuse(error, message);
    };
    let body = match message.decode_body() {
        Ok(b) => b,
        Err(e) => {
            let error =
                RemoteError::new("DecodeError", error_chain(&e)).with_module("kombu.exceptions");
            return refuse(error, message);
        }
    };
    Ok(Request {
        def: def.clone(),
        body,
        queue: queue.to_owned(),
        message: Arc::new(message),
    })
}

/// `message: cause: cause`, since a refusal is read in a log line or a stored result.
fn error_chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::{ContentType, Handler, Headers, TaskOptions};
    use serde_json::{Map, Value, json};

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.insert(TaskDef {
            name: "tasks.add".into(),
            params: &["x", "y"],
            options: TaskOptions::default(),
            handler: Handler::Blocking(Arc::new(|_, _| Ok(Value::Null))),
        });
        r
    }

    fn message(task: &str) -> Message {
        let body = Body::new(vec![json!(1), json!(2)], Map::new());
        Message::new(Headers::new(task, "id-1"), &body, ContentType::Json).unwrap()
    }

    #[test]
    fn a_registered_task_decodes() {
        let r = decode(Ok(message("tasks.add")), "celery", &registry()).unwrap();
        assert_eq!(r.name(), "tasks.add");
        assert_eq!(r.body.args, [json!(1), json!(2)]);
        assert_eq!(r.queue, "celery");
    }

    #[test]
    fn unknown_names_are_not_registered_before_the_body_is_read() {
        let mut m = message("tasks.nope");
        m.body = b"not json".to_vec();
        let refusal = decode(Ok(m), "celery", &registry()).unwrap_err();
        assert_eq!(refusal.task_id.as_deref(), Some("id-1"));
        assert_eq!(
            refusal.error.to_exception_map(),
            json!({"exc_type": "NotRegistered", "exc_message": ["tasks.nope"], "exc_module": "celery.exceptions"})
        );
    }

    #[test]
    fn bad_bodies_and_bad_bytes_are_decode_errors() {
        let mut m = message("tasks.add");
        m.content_type = "application/x-python-serialize".into();
        let refusal = decode(Ok(m), "celery", &registry()).unwrap_err();
        assert_eq!(refusal.error.exc_type, "DecodeError");
        assert!(
            refusal.error.message().contains("pickle"),
            "{:?}",
            refusal.error
        );

        let refusal =
            decode(Err(Error::protocol("invalid envelope")), "q", &registry()).unwrap_err();
        assert_eq!(refusal.task_id, None);
        assert_eq!(refusal.error.message(), "invalid envelope");
    }
}
