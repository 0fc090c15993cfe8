//! Batching of per-message script calls: acks on the broker side, result stores on the
//! backend side.
//!
//! A [`Batcher`] owns a task that takes every request waiting, runs them in one script call,
//! answers each, and takes the ones that came meanwhile. No request waits for a timer: one
//! waits at most for the call in flight, so under load requests share round trips (and the
//! server's per-call cost of a script, several times that of a plain command) and alone each
//! takes one.

use std::sync::Arc;

use celeriac_core::{Error, Result};
use redis::ScriptInvocation;
use tokio::sync::{mpsc, oneshot};

use crate::conn::Redis;

/// The call that settles one batch.
pub(crate) enum Call {
    /// A script whose reply is one integer per request, 1 for done.
    Script(ScriptInvocation<'static>),
    /// Plain commands (no script: cheaper for the server); every request counts as done when
    /// the pipeline succeeds.
    Pipeline(redis::Pipeline),
}

impl From<ScriptInvocation<'static>> for Call {
    fn from(inv: ScriptInvocation<'static>) -> Self {
        Call::Script(inv)
    }
}

/// A request waiting for the batcher, with where its answer goes.
#[derive(Debug)]
struct Pending<T> {
    item: T,
    reply: oneshot::Sender<Result<bool>>,
}

/// The sending side of a batching task; the task ends when this is dropped.
#[derive(Debug)]
pub(crate) struct Batcher<T> {
    tx: mpsc::UnboundedSender<Pending<T>>,
    what: &'static str,
}

impl<T: Send + Sync + 'static> Batcher<T> {
    /// Spawns the batching task on the current runtime.
    ///
    /// `what` names the operation in errors ("cannot <what>"); `max` bounds a batch; `build`
    /// makes the script call for a batch, whose reply must be one integer per request, 1 for
    /// done (a shorter reply reads as 0 for the rest). The call is retried while the
    /// connection is lost ([`Redis::run`]), so the script must be safe to repeat.
    pub(crate) fn start(
        redis: Arc<Redis>,
        what: &'static str,
        max: usize,
        build: impl Fn(&[T]) -> Call + Send + Sync + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(redis, what, max, build, rx));
        Batcher { tx, what }
    }

    /// Queues `item` for the next batch and waits for its answer: whether the script did it.
    pub(crate) async fn submit(&self, item: T) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        let closed = || Error::closed(self.what);
        self.tx
            .send(Pending { item, reply })
            .map_err(|_| closed())?;
        rx.await.unwrap_or_else(|_| Err(closed()))
    }
}

async fn run<T>(
    redis: Arc<Redis>,
    what: &'static str,
    max: usize,
    build: impl Fn(&[T]) -> Call,
    mut rx: mpsc::UnboundedReceiver<Pending<T>>,
) {
    let mut batch: Vec<Pending<T>> = Vec::with_capacity(max);
    let mut items: Vec<T> = Vec::with_capacity(max);
    let mut replies = Vec::with_capacity(max);
    while rx.recv_many(&mut batch, max).await > 0 {
        for p in batch.drain(..) {
            items.push(p.item);
            replies.push(p.reply);
        }
        let r: Result<Vec<i64>> = redis
            .run(what, |mut c| {
                let call = build(&items);
                let n = items.len();
                async move {
                    match call {
                        Call::Script(inv) => inv.invoke_async(&mut c).await,
                        Call::Pipeline(pipe) => {
                            pipe.query_async::<()>(&mut c).await?;
                            Ok(vec![1; n])
                        }
                    }
                }
            })
            .await;
        items.clear();
        match r {
            Ok(done) => {
                let done = done.into_iter().chain(std::iter::repeat(0));
                for (reply, d) in replies.drain(..).zip(done) {
                    let _ = reply.send(Ok(d == 1));
                }
            }
            Err(e) => {
                // The first waiter gets the error itself (with its source), the others its
                // message and kind.
                let copy = || {
                    let c = Error::new(e.kind(), e.to_string());
                    if e.is_transient() { c.transient() } else { c }
                };
                let mut waiting = replies.drain(..);
                let first = waiting.next();
                for reply in waiting {
                    let _ = reply.send(Err(copy()));
                }
                if let Some(first) = first {
                    let _ = first.send(Err(e));
                }
            }
        }
    }
}
