//! Celery's built-in tasks a celeriac worker runs without registration: `celery.starmap` and
//! `celery.map` (one task over many arguments in one message, which `chunks` sends).
//!
//! For the worker, which adds them to its registry unless the app registered its own. Both
//! call the named task's handler in this process, once per item, in order, and return the list
//! of outputs; the first error fails the whole message. A blocking task's calls run on tokio's
//! blocking threads, never on the runtime.

use std::sync::Arc;

use celeriac_core::task::TaskResult;
use celeriac_core::{
    Args, Handler, Registry, Signature, TaskContext, TaskDef, TaskError, TaskOptions,
};
use serde_json::Value;

/// `registry` plus the built-ins it does not define itself.
pub(crate) fn with_builtins(registry: Arc<Registry>) -> Arc<Registry> {
    let missing: Vec<&str> = ["celery.starmap", "celery.map"]
        .into_iter()
        .filter(|n| registry.get(n).is_none())
        .collect();
    if missing.is_empty() {
        return registry;
    }
    let mut all = (*registry).clone();
    for name in missing {
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
