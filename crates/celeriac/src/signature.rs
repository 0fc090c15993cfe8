//! Signatures: a task call (name, arguments, send options) as a value.

use std::marker::PhantomData;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{App, AsyncResult, Result};
use celeriac_core::TaskOptions;
use celeriac_core::canvas::{Expires, SendOptions};

/// A task call ready to send: the task name, encoded arguments and send options.
///
/// `O` is the task's output type; [`Signature::apply_async`] returns an [`AsyncResult<O>`].
/// Typed signatures come from the code `#[celeriac::task]` generates (`add::s(2, 3)`); a
/// signature of a task known only by name is built with [`Signature::new`].
///
/// ```
/// # async fn demo(app: &celeriac::App) -> celeriac::Result<()> {
/// use std::time::Duration;
/// let result = celeriac::Signature::<i64>::new("tasks.add")
///     .arg(2)
///     .arg(3)
///     .countdown(Duration::from_secs(1))
///     .queue("math")
///     .apply_async(app)
///     .await?;
/// # let _ = result; Ok(()) }
/// ```
#[derive(Debug)]
pub struct Signature<O = Value> {
    pub(crate) task: String,
    pub(crate) args: Vec<Value>,
    pub(crate) kwargs: Map<String, Value>,
    pub(crate) encode_error: Option<String>,
    pub(crate) options: SendOptions,
    pub(crate) task_options: Option<fn() -> TaskOptions>,
    pub(crate) immutable: bool,
    /// `group`, `chain` or `chord` for a composite built by the canvas (members in `kwargs`).
    pub(crate) subtask_type: Option<String>,
    _output: PhantomData<fn() -> O>,
}

impl<O> Clone for Signature<O> {
    fn clone(&self) -> Self {
        Signature {
            task: self.task.clone(),
            args: self.args.clone(),
            kwargs: self.kwargs.clone(),
            encode_error: self.encode_error.clone(),
            options: self.options.clone(),
            task_options: self.task_options,
            immutable: self.immutable,
            subtask_type: self.subtask_type.clone(),
            _output: PhantomData,
        }
    }
}

impl<O> Signature<O> {
    /// A call of the task named `task`, with no arguments yet.
    pub fn new(task: impl Into<String>) -> Self {
        Signature {
            task: task.into(),
            args: Vec::new(),
            kwargs: Map::new(),
            encode_error: None,
            options: SendOptions::default(),
            task_options: None,
            immutable: false,
            subtask_type: None,
            _output: PhantomData,
        }
    }

    #[doc(hidden)]
    pub fn __typed(
        task: &str,
        args: Vec<std::result::Result<Value, serde_json::Error>>,
        options: fn() -> TaskOptions,
    ) -> Self {
        let mut sig = Signature::new(task);
        sig.task_options = Some(options);
        for (i, a) in args.into_iter().enumerate() {
            match a {
                Ok(v) => sig.args.push(v),
                Err(e) => {
                    sig.encode_error.get_or_insert_with(|| {
                        format!("cannot encode argument {i} of {task}: {e}")
                    });
                }
            }
        }
        sig
    }

    /// The task name.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The encoded positional arguments.
    pub fn args(&self) -> &[Value] {
        &self.args
    }

    /// The encoded keyword arguments.
    pub fn kwargs(&self) -> &Map<String, Value> {
        &self.kwargs
    }

    /// The send options.
    pub fn options(&self) -> &SendOptions {
        &self.options
    }

    /// Replaces the send options (e.g. with options kept from elsewhere, as beat's entries
    /// keep theirs).
    #[must_use]
    pub fn with_options(mut self, options: SendOptions) -> Self {
        self.options = options;
        self
    }

    /// Appends a positional argument.
    #[must_use]
    pub fn arg(mut self, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => self.args.push(v),
            Err(e) => {
                let n = self.args.len();
                self.encode_error
                    .get_or_insert_with(|| format!("cannot encode argument {n}: {e}"));
            }
        }
        self
    }

    /// Replaces the positional arguments with already encoded values.
    #[must_use]
    pub fn args_json(mut self, args: Vec<Value>) -> Self {
        self.args = args;
        self
    }

    /// Adds a keyword argument.
    #[must_use]
    pub fn kwarg(mut self, name: &str, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => {
                self.kwargs.insert(name.to_owned(), v);
            }
            Err(e) => {
                self.encode_error
                    .get_or_insert_with(|| format!("cannot encode argument {name}: {e}"));
            }
        }
        self
    }

    /// Replaces the keyword arguments with already encoded values.
    #[must_use]
    pub fn kwargs_json(mut self, kwargs: Map<String, Value>) -> Self {
        self.kwargs = kwargs;
        self
    }

    /// Runs no earlier than `delay` from the moment it is sent.
    #[must_use]
    pub fn countdown(mut self, delay: Duration) -> Self {
        self.options.countdown = Some(delay);
        self
    }

    /// Runs no earlier than `at`.
    #[must_use]
    pub fn eta(mut self, at: DateTime<Utc>) -> Self {
        self.options.eta = Some(at);
        self
    }

    /// Revoked instead of run if not started within `after` of sending.
    #[must_use]
    pub fn expires_in(mut self, after: Duration) -> Self {
        self.options.expires = Some(Expires::In(after));
        self
    }

    /// Revoked instead of run if not started by `at`.
    #[must_use]
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.options.expires = Some(Expires::At(at));
        self
    }

    /// Sends to `queue`.
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.options.queue = Some(queue.into());
        self
    }

    /// Priority 0 to 9 (higher runs first); values above 9 count as 9.
    #[must_use]
    pub fn priority(mut self, priority: u8) -> Self {
        self.options.priority = Some(priority.min(9));
        self
    }

    /// Uses `id` as the task id.
    #[must_use]
    pub fn task_id(mut self, id: impl Into<String>) -> Self {
        self.options.task_id = Some(id.into());
        self
    }

    /// Adds a message header the task can read from its context.
    #[must_use]
    pub fn header(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.options.headers.insert(name.to_owned(), value.into());
        self
    }

    /// Sets the hard time limit for this call.
    #[must_use]
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.options.time_limit = Some(limit);
        self
    }

    /// Sets the soft time limit for this call.
    #[must_use]
    pub fn soft_time_limit(mut self, limit: Duration) -> Self {
        self.options.soft_time_limit = Some(limit);
        self
    }

    /// Stores no result for this call.
    #[must_use]
    pub fn ignore_result(mut self, ignore: bool) -> Self {
        self.options.ignore_result = Some(ignore);
        self
    }

    /// Makes the signature immutable (Celery's `.si()`): as a callback, chain step or chord
    /// body it gets no result from its parent, only its own arguments.
    #[must_use]
    pub fn immutable(mut self) -> Self {
        self.immutable = true;
        self
    }

    /// Whether the signature is immutable.
    pub fn is_immutable(&self) -> bool {
        self.immutable
    }

    /// Runs `callback` when this task succeeds, with the result prepended to its arguments
    /// (unless the callback is [immutable](Signature::immutable)). Celery's `link`.
    ///
    /// ```
    /// # async fn demo(app: &celeriac::App) -> celeriac::Result<()> {
    /// use celeriac::Signature;
    /// let notify = Signature::<()>::new("tasks.notify").arg("done");
    /// Signature::<i64>::new("tasks.add").arg(2).arg(3).link(&notify).apply_async(app).await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn link<P>(mut self, callback: &Signature<P>) -> Self {
        self.options.link.push(callback.to_wire());
        self
    }

    /// Runs `errback` when this task fails, with the failed task's id prepended to its
    /// arguments (Celery's message form; unless immutable). Celery's `link_error`.
    #[must_use]
    pub fn link_error<P>(mut self, errback: &Signature<P>) -> Self {
        self.options.link_error.push(errback.to_wire());
        self
    }

    /// The signature in Celery's map form (for canvas and Python peers): every send option
    /// under its `apply_async` name ([`SendOptions::to_wire`]), callbacks under `link` and
    /// `link_error`.
    pub fn to_wire(&self) -> celeriac_core::Signature {
        let mut s = celeriac_core::Signature::new(self.task.clone(), self.args.clone());
        s.kwargs = self.kwargs.clone();
        s.immutable = self.immutable;
        s.subtask_type = self.subtask_type.clone();
        s.options = self.options.to_wire();
        s
    }

    /// The call as the message builder takes it.
    pub(crate) fn call(&self) -> celeriac_core::canvas::Call<'_> {
        celeriac_core::canvas::Call::new(&self.task, &self.args, &self.kwargs, &self.options)
    }

    /// The same call with its output type forgotten, e.g. to put tasks of different outputs
    /// in one [`group`](crate::group) or [`chain`](crate::chain()).
    pub fn untyped(self) -> Signature<Value> {
        Signature {
            task: self.task,
            args: self.args,
            kwargs: self.kwargs,
            encode_error: self.encode_error,
            options: self.options,
            task_options: self.task_options,
            immutable: self.immutable,
            subtask_type: self.subtask_type,
            _output: PhantomData,
        }
    }

    /// Whether this is a composite (a group, chain or chord turned into a signature).
    pub fn is_composite(&self) -> bool {
        self.subtask_type.is_some()
    }

    /// The options of this call's task registration, for typed signatures.
    pub(crate) fn registered_options(&self) -> Option<TaskOptions> {
        self.task_options.map(|f| f())
    }

    /// Sends the call; returns a handle on its result.
    ///
    /// A composite (from `into_signature` of a chain, group or chord) is planned into its
    /// messages; the handle is on the result it ends in (a chain's last task, a chord's body).
    pub async fn apply_async(self, app: &App) -> Result<AsyncResult<O>> {
        if self.is_composite() {
            return crate::canvas::chain([self])
                .apply_async(app)
                .await
                .map(|r| AsyncResult::sent(app, r.id().to_owned()));
        }
        let id = app.send_signature(&self).await?;
        Ok(AsyncResult::sent(app, id))
    }
}
