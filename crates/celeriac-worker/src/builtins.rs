//! Celery's built-in tasks a celeriac worker runs without registration: `celery.starmap` and
//! `celery.map` (one task over many arguments in one message, which `chunks` sends), and
//! `celery.chord_unlock` (how a Celery client joins a chord on a result backend without a
//! chord protocol of its own, such as Celery's `db+` SQL tables).
//!
//! For the worker, which adds them to its registry unless the app registered its own. The map
//! tasks call the named task's handler in this process, once per item, in order, and return
//! the list of outputs; the first error fails the whole message. A blocking task's calls run
//! on tokio's blocking threads, never on the runtime.
//!
//! `celery.chord_unlock(group_id, callback, interval=, max_retries=, result=)` checks the
//! header's results (`result`: each member's `as_tuple()`); while one is not ready it retries
//! itself after `interval` seconds (default 1, Celery's `result_chord_retry_interval`), as
//! Celery's does; once all are, it returns their ids and the canvas layer sends the callback
//! with their results, or fails it with `ChordError` when a member failed (see
//! [`crate::canvas`]).

use std::sync::Arc;

use celeriac_core::task::TaskResult;
use celeriac_core::{
    Args, DynBackend, Handler, Registry, Signature, TaskContext, TaskDef, TaskError, TaskOptions,
};
use serde_json::Value;

/// Celery's chord join task for result backends without a chord protocol.
pub(crate) const CHORD_UNLOCK: &str = "celery.chord_unlock";

/// `registry` plus the built-ins it does not define itself; `backend` is where
/// `celery.chord_unlock` reads the header's results.
pub(crate) fn with_builtins(registry: Arc<Registry>, backend: Option<DynBackend>) -> Arc<Registry> {
    let missing: Vec<&str> = ["celery.starmap", "celery.map", CHORD_UNLOCK]
        .into_iter()
        .filter(|n| registry.get(n).is_none())
        .collect();
    if missing.is_empty() {
        return registry;
    }
    let mut all = (*registry).clone();
    for name in missing {
        if name == CHORD_UNLOCK {
            let backend = backend.clone();
            // Celery's: retried until the header is ready, no result of its own.
            let mut options = TaskOptions::default();
            options.max_retries = None;
            options.ignore_result = true;
            all.insert(TaskDef {
                name: name.to_owned(),
                params: &["group_id", "callback", "interval", "max_retries", "result"],
                options,
                handler: Handler::Async(Arc::new(move |ctx, args| {
                    Box::pin(chord_unlock(backend.clone(), ctx, args))
                })),
            });
            continue;
        }
        let star = name == "celery.starmap";
        let inner = registry.clone();
        all.insert(TaskDef {
            name: name.to_owned(),
            params: &["task", "it"],
            options: TaskOptions::default(),
            handler: Handler::Async(Arc::new(move |ctx, args| {
                Box::pin(run_each(inner.clone(), ctx, args, star))
            })),
        });
    }
    Arc::new(all)
}

async fn run_each(
    registry: Arc<Registry>,
    ctx: TaskContext,
    mut args: Args,
    star: bool,
) -> TaskResult {
    let sig: Signature = args.take(0, "task")?;
    let items: Vec<Value> = args.take(1, "it")?;
    let def = registry
        .get(&sig.task)
        .cloned()
        .ok_or_else(|| TaskError::new("NotRegistered", sig.task.clone()))?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let mut call_args = sig.args.clone();
        match (star, item) {
            (true, Value::Array(a)) => call_args.extend(a),
            (true, other) => {
                return Err(TaskError::new(
                    "TypeError",
                    format!("starmap items must be argument lists, got {other}"),
                ));
            }
            (false, v) => call_args.push(v),
        }
        let call = Args::new(call_args, sig.kwargs.clone());
        let value = match &def.handler {
            Handler::Async(f) => f(ctx.clone(), call).await?,
            Handler::Blocking(f) => {
                let (f, ctx) = (f.clone(), ctx.clone());
                tokio::task::spawn_blocking(move || f(ctx, call))
                    .await
                    .map_err(|e| TaskError::new("Panic", e.to_string()))??
            }
        };
        out.push(value);
    }
    Ok(Value::Array(out))
}

/// `celery.chord_unlock`: the header members' ids once every one has a ready result; until
/// then a retry after `interval`. See the [module docs](self).
async fn chord_unlock(backend: Option<DynBackend>, ctx: TaskContext, mut args: Args) -> TaskResult {
    let group_id: String = args.take(0, "group_id")?;
    let _callback: Value = args.take(1, "callback")?;
    let interval: Option<f64> = args.take(2, "interval")?;
    let max_retries: Option<u32> = args.take(3, "max_retries")?;
    let result: Vec<Value> = args.take(4, "result")?;
    let backend = backend.ok_or_else(|| {
        TaskError::new(
            "ImproperlyConfigured",
            "celery.chord_unlock needs a result backend to read the chord's header",
        )
    })?;
    let ids = result
        .iter()
        .map(member_id)
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| {
            TaskError::new(
                "TypeError",
                format!("chord {group_id}: result must list as_tuple() results"),
            )
        })?;
    let interval = std::time::Duration::try_from_secs_f64(interval.unwrap_or(1.0))
        .unwrap_or(std::time::Duration::from_secs(1));
    let not_yet = |why: String| {
        if max_retries.is_some_and(|max| ctx.retries() >= max) {
            TaskError::new(
                "MaxRetriesExceededError",
                format!("chord {group_id}: {why} after {} retries", ctx.retries()),
            )
        } else {
            TaskError::retry_after(interval)
        }
    };
    for id in &ids {
        match backend.get(id).await {
            Ok(Some(meta)) if meta.status.is_ready() => {}
            Ok(_) => return Err(not_yet(format!("member {id} is not ready"))),
            Err(e) => return Err(not_yet(format!("cannot read member {id}: {e}"))),
        }
    }
    Ok(Value::Array(ids.into_iter().map(Value::String).collect()))
}

/// The task id in a result's `as_tuple()`: `[[id, parent], group]`, or `[id, parent]`.
fn member_id(tuple: &Value) -> Option<String> {
    match tuple {
        Value::String(id) => Some(id.clone()),
        Value::Array(a) => member_id(a.first()?),
        _ => None,
    }
}
