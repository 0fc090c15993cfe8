//! Remote control and events from the app: [`App::control`] and [`App::events`].
//!
//! The same channels Celery's tools use (the pidbox and `celeryev`), so an app inspects and
//! steers Python workers as well as ours, and reads their events. A request goes to every
//! node, or to those named with [`Control::destination`]; replies are collected for
//! [`Control::timeout`] (1 s by default, as `celery inspect`) or until every named node
//! answered, and come back as a map of node name to answer, in Celery's shapes.
//!
//! ```no_run
//! # async fn demo(app: &celeriac::App) -> celeriac::Result<()> {
//! use std::time::Duration;
//!
//! let pongs = app.control().inspect().ping().await?;
//! for node in pongs.keys() {
//!     println!("{node} is up");
//! }
//! let active = app.control().inspect().active(false).await?;
//! app.control()
//!     .destination(["w1@host"])
//!     .rate_limit("tasks.add", "10/m")
//!     .await?;
//! app.control().timeout(Duration::from_secs(3)).shutdown().await?;
//! # let _ = active; Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use celeriac_core::broadcast::control::{Request, collect};
use celeriac_core::broadcast::event::Event;
use celeriac_core::broadcast::{Broadcast, Broadcasted, Inbox, Signed};
use celeriac_core::{BoxFuture, Error, ErrorKind};
use serde_json::{Map, Value, json};

use crate::{App, Result};

/// Node name → answer.
pub type Replies = BTreeMap<String, Value>;

/// The default time replies are awaited, as `celery inspect`'s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends remote-control requests to workers; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Control<'a> {
    app: &'a App,
    timeout: Duration,
    destination: Option<Vec<String>>,
}

impl App {
    /// Remote control of the workers on this app's broker (`celery control`/`inspect`).
    pub fn control(&self) -> Control<'_> {
        Control {
            app: self,
            timeout: DEFAULT_TIMEOUT,
            destination: None,
        }
    }

    /// Starts reading the events of every worker and client on this app's broker
    /// (`celery events`): a stream of [`Event`]s, batches unpacked.
    ///
    /// ```no_run
    /// # async fn demo(app: &celeriac::App) -> celeriac::Result<()> {
    /// let mut events = app.events().await?;
    /// while let Some(e) = events.next().await {
    ///     let e = e?;
    ///     println!("{} {} {:?}", e.hostname(), e.kind(), e.uuid());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn events(&self) -> Result<EventStream> {
        let inbox = channels(self)?.event_inbox("#").await?;
        Ok(EventStream {
            inbox: Some(inbox),
            pending: std::collections::VecDeque::new(),
            reading: None,
        })
    }
}

/// The broker's broadcast channels under the app's signing policy: with serializer `auth`,
/// requests go out signed and only signed replies are read, as Celery's mailbox does.
fn channels(app: &App) -> Result<Signed<'_>> {
    let b = app.broker().broadcast().ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "the {} broker carries no remote control or events",
                app.broker().driver()
            ),
        )
    })?;
    Ok(Signed::new(b, app.signer().cloned()))
}

impl<'a> Control<'a> {
    /// Waits this long for replies (default 1 s).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Only these nodes act (and replies end as soon as all of them answered).
    #[must_use]
    pub fn destination<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        self.destination = (!nodes.is_empty()).then_some(nodes);
        self
    }

    /// Read-only commands (`celery inspect`).
    pub fn inspect(self) -> Inspect<'a> {
        Inspect(self)
    }

    fn request(&self, method: &str, arguments: Map<String, Value>) -> Request {
        let mut r = Request::new(method, arguments);
        r.destination = self.destination.clone();
        r
    }

    /// Sends `method` with `arguments` and collects the replies.
    pub async fn call(&self, method: &str, arguments: Map<String, Value>) -> Result<Replies> {
        let replies = collect(
            &channels(self.app)?,
            self.app.clock(),
            self.request(method, arguments),
            self.timeout,
            self.destination.as_ref().map(Vec::len),
        )
        .await?;
        Ok(replies.into_iter().map(|r| (r.node, r.answer)).collect())
    }

    /// Sends `method` with `arguments` and wants no reply.
    pub async fn cast(&self, method: &str, arguments: Map<String, Value>) -> Result<()> {
        let m = self
            .request(method, arguments)
            .to_message(self.app.clock().forward(), None);
        channels(self.app)?.send_control(&m).await
    }

    /// Sets a task's rate limit on the workers (`"10/m"`; empty or `"0"` disables it).
    pub async fn rate_limit(&self, task: &str, limit: &str) -> Result<Replies> {
        self.call(
            "rate_limit",
            args(json!({"task_name": task, "rate_limit": limit})),
        )
        .await
    }

    /// Sets a task's soft and hard time limits on the workers (`None`: no limit).
    pub async fn time_limit(
        &self,
        task: &str,
        soft: Option<Duration>,
        hard: Option<Duration>,
    ) -> Result<Replies> {
        let s = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        self.call(
            "time_limit",
            args(json!({"task_name": task, "soft": s(soft), "hard": s(hard)})),
        )
        .await
    }

    /// Revokes tasks on the workers; with `terminate`, running copies are stopped with
    /// `signal` (default SIGTERM).
    pub async fn revoke(
        &self,
        ids: &[String],
        terminate: bool,
        signal: Option<crate::Signal>,
    ) -> Result<Replies> {
        let signal = signal.unwrap_or_default().name();
        self.call(
            "revoke",
            args(json!({"task_id": ids, "terminate": terminate, "signal": signal})),
        )
        .await
    }

    /// Adds `n` slots to each worker's pool.
    pub async fn pool_grow(&self, n: usize) -> Result<Replies> {
        self.call("pool_grow", args(json!({ "n": n }))).await
    }

    /// Removes `n` slots from each worker's pool.
    pub async fn pool_shrink(&self, n: usize) -> Result<Replies> {
        self.call("pool_shrink", args(json!({ "n": n }))).await
    }

    /// Changes the bounds of autoscaling workers.
    pub async fn autoscale(&self, max: usize, min: usize) -> Result<Replies> {
        self.call("autoscale", args(json!({"max": max, "min": min})))
            .await
    }

    /// Makes the workers consume `queue` too.
    pub async fn add_consumer(&self, queue: &str) -> Result<Replies> {
        self.call("add_consumer", args(json!({ "queue": queue })))
            .await
    }

    /// Makes the workers stop consuming `queue`.
    pub async fn cancel_consumer(&self, queue: &str) -> Result<Replies> {
        self.call("cancel_consumer", args(json!({ "queue": queue })))
            .await
    }

    /// Turns task events on (`-E` at run time).
    pub async fn enable_events(&self) -> Result<Replies> {
        self.call("enable_events", Map::new()).await
    }

    /// Turns task events off.
    pub async fn disable_events(&self) -> Result<Replies> {
        self.call("disable_events", Map::new()).await
    }

    /// Asks the workers for a heartbeat event now (monitors send it when they start).
    pub async fn heartbeat(&self) -> Result<()> {
        self.cast("heartbeat", Map::new()).await
    }

    /// Shuts the workers down (warm: running tasks finish). No reply comes.
    pub async fn shutdown(&self) -> Result<()> {
        self.cast("shutdown", Map::new()).await
    }
}

fn args(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Read-only remote-control commands (`celery inspect`); each returns node → answer.
#[derive(Debug, Clone)]
pub struct Inspect<'a>(Control<'a>);

impl Inspect<'_> {
    /// `{"ok": "pong"}` from every node that is up.
    pub async fn ping(&self) -> Result<Replies> {
        self.0.call("ping", Map::new()).await
    }

    /// Statistics: totals by task, pool, broker, uptime, rusage.
    pub async fn stats(&self) -> Result<Replies> {
        self.0.call("stats", Map::new()).await
    }

    /// The tasks running now; with `safe`, arguments as repr strings.
    pub async fn active(&self, safe: bool) -> Result<Replies> {
        self.0.call("active", args(json!({ "safe": safe }))).await
    }

    /// The tasks received and waiting for a slot.
    pub async fn reserved(&self) -> Result<Replies> {
        self.0.call("reserved", Map::new()).await
    }

    /// The tasks held for a future eta.
    pub async fn scheduled(&self) -> Result<Replies> {
        self.0.call("scheduled", Map::new()).await
    }

    /// The revoked ids each node keeps.
    pub async fn revoked(&self) -> Result<Replies> {
        self.0.call("revoked", Map::new()).await
    }

    /// The tasks each node can run, with their rate limits.
    pub async fn registered(&self) -> Result<Replies> {
        self.0.call("registered", Map::new()).await
    }

    /// Where the given tasks stand on each node that holds them.
    pub async fn query_task(&self, ids: &[String]) -> Result<Replies> {
        self.0.call("query_task", args(json!({ "ids": ids }))).await
    }

    /// The queues each node consumes.
    pub async fn active_queues(&self) -> Result<Replies> {
        self.0.call("active_queues", Map::new()).await
    }

    /// The settings each node runs with.
    pub async fn conf(&self) -> Result<Replies> {
        self.0.call("conf", Map::new()).await
    }

    /// A report of each node's software and settings.
    pub async fn report(&self) -> Result<Replies> {
        self.0.call("report", Map::new()).await
    }

    /// Each node's Lamport clock.
    pub async fn clock(&self) -> Result<Replies> {
        self.0.call("clock", Map::new()).await
    }
}

/// Events as they arrive, batches unpacked (see [`App::events`]).
///
/// [`next`](Self::next) reads one; the type is also a `futures_core::Stream`. A message that
/// is not an event (or one bad event in a batch) is an error item; the stream goes on.
pub struct EventStream {
    inbox: Option<Box<dyn Inbox>>,
    pending: std::collections::VecDeque<Result<Event>>,
    reading: Option<Reading>,
}

type Reading = BoxFuture<'static, (Box<dyn Inbox>, Result<Option<Broadcasted>>)>;

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl EventStream {
    /// The next event; `None` once the channel closed.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event>>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Poll::Ready(Some(e));
            }
            if self.reading.is_none() {
                let Some(mut inbox) = self.inbox.take() else {
                    return Poll::Ready(None);
                };
                self.reading = Some(Box::pin(async move {
                    let r = inbox.next().await;
                    (inbox, r)
                }));
            }
            let reading = self.reading.as_mut().expect("set above");
            let (inbox, r) = match reading.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(x) => x,
            };
            self.reading = None;
            match r {
                Ok(Some(m)) => {
                    self.inbox = Some(inbox);
                    self.pending.extend(Event::from_message(&m));
                }
                Ok(None) => return Poll::Ready(None),
                Err(e) => {
                    self.inbox = Some(inbox);
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl futures_core::Stream for EventStream {
    type Item = Result<Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}
