use std::time::Duration;

use celeriac::{TaskContext, TaskError};

#[derive(Debug)]
struct Oops;

impl std::fmt::Display for Oops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("oops")
    }
}

impl std::error::Error for Oops {}

/// Async, named for Python interop, every option.
#[celeriac::task(
    name = "tasks.add",
    queue = "math",
    priority = 7,
    rate_limit = "10/m",
    max_retries = 5,
    default_retry_delay = 2,
    retry_backoff = true,
    retry_backoff_max = 60,
    retry_jitter = false,
    autoretry_for = [std::io::Error, Oops],
    acks_late = true,
    soft_time_limit = 0.5,
    time_limit = 10,
    ignore_result = false,
    expires = 3600,
    track_started = true
)]
pub async fn add(x: i64, y: i64) -> i64 {
    x + y
}

/// Blocking, with a context and a fallible result.
#[celeriac::task]
fn parse(ctx: &TaskContext, text: String) -> Result<i64, TaskError> {
    let _ = ctx.id();
    Ok(text.parse::<i64>()?)
}

/// Owned context, unit output, optional argument, unlimited retries.
#[celeriac::task(max_retries = None, retry_backoff = 1.5)]
async fn note(ctx: TaskContext, who: Option<String>) {
    let _ = (ctx.retries(), who);
}

/// A task whose error type is a plain std error.
#[celeriac::task]
fn fails() -> Result<(), Oops> {
    Err(Oops)
}

fn main() {
    use celeriac::__private::Task;
    assert_eq!(add::NAME, "tasks.add");
    assert!(parse::NAME.ends_with("::parse"));
    let o = add::options();
    assert_eq!(o.queue.as_deref(), Some("math"));
    assert_eq!(o.priority, Some(7));
    assert_eq!(o.max_retries, Some(5));
    assert_eq!(o.soft_time_limit, Some(Duration::from_millis(500)));
    assert!(o.acks_late);
    assert_eq!(note::options().max_retries, None);
    let _sig: celeriac::Signature<i64> = add::s(1, 2).countdown(Duration::from_secs(1));
    let _ = (parse::definition(), fails::definition(), note::definition());
    // Calling the function directly still runs it inline.
    assert!(fails().is_err());
}
