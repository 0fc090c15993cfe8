//! [`App`]: the broker, the result backend, the registered tasks and the configuration.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::signature::Signature;
use crate::{AsyncResult, Error, Result};
use celeriac_core::canvas::{Call, SendOptions, Sender, build_call};
use celeriac_core::security::BodySigner;
use celeriac_core::{
    Config, ContentType, Drivers, DynBackend, DynBroker, ErrorKind, PublishOptions, Registry, Task,
    TaskDef, TaskOptions,
};

/// A celeriac application: where tasks are sent, where results are kept, and which tasks this
/// process can run. Cheap to clone; `Send + Sync`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> celeriac::Result<()> {
/// #[celeriac::task(name = "tasks.add")]
/// fn add(x: i64, y: i64) -> i64 {
///     x + y
/// }
///
/// let app = celeriac::App::builder()
///     .broker_url("memory://")
///     .task::<add>()
///     .build()
///     .await?;
/// let result = add::delay(&app, 2, 3).await?;
/// # let _ = result;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    broker: DynBroker,
    backend: DynBackend,
    registry: Arc<Registry>,
    content_type: ContentType,
    /// Signs every message this app sends (serializer `auth`).
    signer: Option<Arc<dyn BodySigner>>,
    origin: String,
    /// The backend's reply queue (rpc://), put on every message this app sends.
    reply_to: Option<String>,
    declared: Mutex<HashSet<String>>,
    /// The Lamport clock of remote-control requests and events this app sends.
    clock: celeriac_core::broadcast::Clock,
    /// The driver table the app was built with, for what it opens later (the beat store).
    #[cfg_attr(not(all(feature = "beat", feature = "cli")), allow(dead_code))]
    drivers: Drivers,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("broker", &self.inner.broker.driver())
            .field("backend", &self.inner.backend.driver())
            .field("tasks", &self.inner.registry.names())
            .finish_non_exhaustive()
    }
}

impl App {
    /// Starts building an app.
    pub fn builder() -> AppBuilder {
        AppBuilder::default()
    }

    /// The configuration in effect.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The driver table the app was built with (the CLI opens the beat store through it).
    #[cfg_attr(not(all(feature = "beat", feature = "cli")), allow(dead_code))]
    pub(crate) fn drivers(&self) -> &Drivers {
        &self.inner.drivers
    }

    /// The app's Lamport clock (remote control and events carry it).
    pub fn clock(&self) -> &celeriac_core::broadcast::Clock {
        &self.inner.clock
    }

    /// The broker.
    pub fn broker(&self) -> &DynBroker {
        &self.inner.broker
    }

    /// The result backend.
    pub fn backend(&self) -> &DynBackend {
        &self.inner.backend
    }

    /// The tasks this process can run.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// A handle on the result of task `id`.
    pub fn result<T>(&self, id: impl Into<String>) -> AsyncResult<T> {
        AsyncResult::from_id(self, id)
    }

    /// Sends a task known only by its name, with JSON arguments.
    ///
    /// Options come from the task's registration in this app when it has one.
    pub async fn send_task(
        &self,
        name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Result<AsyncResult> {
        Signature::<Value>::new(name)
            .args_json(args)
            .kwargs_json(kwargs)
            .apply_async(self)
            .await
    }

    /// The queue a task goes to when the caller names none: the task's own queue, then the
    /// routes, then the default queue.
    pub fn queue_for(&self, task: &str, task_options: &TaskOptions) -> String {
        task_options
            .queue
            .clone()
            .or_else(|| self.inner.config.route(task).map(str::to_owned))
            .unwrap_or_else(|| self.inner.config.default_queue.clone())
    }

    /// Builds the message `sig` would be published as by
    /// [`Signature::apply_async`](crate::Signature::apply_async), without publishing it: the
    /// queue (the task's, the routes', or the default), the message (options, ids, eta,
    /// signature under serializer `auth`) and the publish options (priority, and the
    /// not-before time when the broker holds delays).
    ///
    /// For drivers that write the message themselves, in a transaction of the caller's
    /// (`celeriac::postgres::send_in`). Composite signatures (chains, groups, chords) are
    /// refused: they are several messages. So are unique tasks (`unique_for`): their lock
    /// lives in the coordination store, outside the caller's transaction, and a rolled-back
    /// send would leave it pointing at a task that never existed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> celeriac::Result<()> {
    /// let app = celeriac::App::builder().broker_url("memory://").build().await?;
    /// let sig = celeriac::Signature::<i64>::new("tasks.add").arg(1).arg(2);
    /// let prepared = app.prepare_send(&sig)?;
    /// assert_eq!(prepared.queue, "celery");
    /// assert_eq!(prepared.message.task(), "tasks.add");
    /// assert_eq!(app.broker().stats("celery").await?.ready, 0); // nothing was sent
    /// # Ok(()) }
    /// ```
    pub fn prepare_send<O>(&self, sig: &Signature<O>) -> Result<PreparedSend> {
        if sig.is_composite() {
            return Err(Error::protocol(format!(
                "a composite signature ({}) is several messages and cannot be prepared as one",
                sig.task
            )));
        }
        if let Some(e) = &sig.encode_error {
            return Err(Error::protocol(e.clone()));
        }
        let task_options = self.options_for(&sig.task, sig.registered_options());
        if task_options.unique_for.is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "task {} is unique (unique_for): send it with apply_async, not inside a \
                     transaction (its lock is not part of the transaction, and a rollback \
                     would leave it held)",
                    sig.task
                ),
            ));
        }
        let sender = self.sender();
        let (queue, message, options) = self.prepare(sig.call(), &task_options, None, &sender)?;
        Ok(PreparedSend {
            queue,
            message,
            options,
        })
    }

    /// Builds and publishes the message for `sig`; returns the task id.
    pub(crate) async fn send_signature<O>(&self, sig: &Signature<O>) -> Result<String> {
        if let Some(e) = &sig.encode_error {
            return Err(Error::protocol(e.clone()));
        }
        let task_options = self.options_for(&sig.task, sig.registered_options());
        self.send_call(sig.call(), &task_options, None).await
    }

    /// The options task `name` is sent with: its registration's in this app (with the
    /// configuration's `[task_annotations]` applied at build), else `own` (a typed task's
    /// from its definition) or the defaults, with the annotations applied.
    pub(crate) fn options_for(&self, name: &str, own: Option<TaskOptions>) -> TaskOptions {
        if let Some(d) = self.inner.registry.get(name) {
            return d.options.clone();
        }
        let mut o = own.unwrap_or_default();
        self.inner.config.annotate_options(name, &mut o);
        o
    }

    /// The queue, message and publish options of a call: built by the one builder
    /// ([`celeriac_core::canvas::build_call`]), routed, carrying this app's reply queue, and
    /// held by the broker until due unless Python workers serve the queue.
    fn prepare(
        &self,
        call: Call<'_>,
        task_options: &TaskOptions,
        chain: Option<Vec<celeriac_core::Signature>>,
        sender: &Sender<'_>,
    ) -> Result<(String, celeriac_core::Message, PublishOptions)> {
        let mut chain = chain;
        if let (Some(reply_to), Some(steps)) = (&self.inner.reply_to, chain.as_mut()) {
            for step in steps {
                stamp_reply_to(step, reply_to);
            }
        }
        let out = build_call(call, task_options, chain, sender)?;
        let queue = out
            .queue
            .clone()
            .unwrap_or_else(|| self.queue_for(call.task, task_options));
        let mut message = out.message;
        message.check_size(self.inner.config.max_message_size)?;
        if message.properties.reply_to.is_none() {
            message.properties.reply_to = self.inner.reply_to.clone();
        }
        let held_by_broker = self.delays_in_broker(&queue);
        let publish = PublishOptions::default()
            .priority(out.priority)
            .not_before(out.eta.filter(|_| held_by_broker));
        Ok((queue, message, publish))
    }

    /// Whether a delayed task for `queue` is parked in the broker's delayed store at once.
    ///
    /// Not when Python workers may serve the queue (a broker Python shares, and the queue not
    /// declared celeriac-only): they know no broker-side delayed store and would never see
    /// the message, so it goes out at once with its `eta` header, as Celery sends it. A
    /// celeriac worker that receives it parks it in the broker itself. Queues in Redis's
    /// native layout (the transport option `native_queues`) count as celeriac-only.
    fn delays_in_broker(&self, queue: &str) -> bool {
        let c = &self.inner.config;
        if c.celery_worker_queues.iter().any(|q| q == queue) {
            return false;
        }
        // Redis's native layout (`native_queues`) is invisible to Python altogether.
        if c.celeriac_only_queues
            .iter()
            .chain(&c.broker_transport_options.native_queues)
            .any(|g| celeriac_core::config::glob_match(g, queue))
        {
            return true;
        }
        !self.inner.broker.capabilities().celery_peers
    }

    /// Builds (see [`celeriac_core::canvas::build_message`]) and publishes the message for a
    /// signature map, with `chain` as the rest of its chain; returns the task id.
    ///
    /// `task_options` defaults to the task's registration in this app.
    pub(crate) async fn send_wire(
        &self,
        sig: &celeriac_core::Signature,
        task_options: Option<TaskOptions>,
        chain: Option<Vec<celeriac_core::Signature>>,
    ) -> Result<String> {
        if let Some(kind) = sig.subtask_type.as_deref() {
            return Err(Error::protocol(format!(
                "a {kind} signature ({}) cannot be sent as one message",
                sig.task
            )));
        }
        let options = SendOptions::from_wire(&sig.options)?;
        let task_options = self.options_for(&sig.task, task_options);
        let call = Call::new(&sig.task, &sig.args, &sig.kwargs, &options);
        self.send_call(call, &task_options, chain).await
    }

    /// Builds and publishes the message for `call`; returns the task id.
    async fn send_call(
        &self,
        call: Call<'_>,
        task_options: &TaskOptions,
        chain: Option<Vec<celeriac_core::Signature>>,
    ) -> Result<String> {
        let sender = self.sender();
        let (queue, mut message, publish) = self.prepare(call, task_options, chain, &sender)?;
        let id = message.id().to_owned();
        let unique = match task_options.unique_for {
            Some(ttl) => match self.take_unique(call, task_options, &id, ttl).await? {
                Ok(key) => Some(key),
                Err(pending) if task_options.unique_raise => {
                    return Err(Error::new(
                        ErrorKind::Duplicate,
                        format!(
                            "task {} is unique and an equal call is pending: {pending}",
                            call.task
                        ),
                    ));
                }
                // A call like this one is pending or running: its id stands for this one.
                Err(pending) => return Ok(pending),
            },
            None => None,
        };
        if let Some(key) = &unique {
            let header = celeriac_core::coord::UNIQUE_HEADER.to_owned();
            message.headers.extra.insert(header, key.clone().into());
        }
        let published = async {
            self.declare(&queue).await?;
            self.inner.broker.publish(&queue, &message, publish).await
        };
        if let Err(e) = published.await {
            if let (Some(key), Some(store)) =
                (&unique, self.inner.backend.capabilities().coordination)
            {
                let _ = store.unlock(key, &id).await;
            }
            return Err(e);
        }
        tracing::debug!(task_id = %id, task_name = %call.task, queue = %queue, "task sent");
        if self.inner.config.task_send_sent_event {
            self.send_sent_event(&message, &queue).await;
        }
        Ok(id)
    }

    /// Takes the unique lock of `call` for task id `id`: `Ok(key)` when taken, `Err(id)` of
    /// the pending call that holds it.
    async fn take_unique(
        &self,
        call: Call<'_>,
        task_options: &TaskOptions,
        id: &str,
        ttl: std::time::Duration,
    ) -> Result<std::result::Result<String, String>> {
        let Some(store) = self.inner.backend.capabilities().coordination else {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "task {} is unique (unique_for), which needs a result backend that \
                     coordinates workers ({}); the {} backend cannot",
                    call.task,
                    celeriac_core::coord::STORES,
                    self.inner.backend.driver()
                ),
            ));
        };
        let key_of = task_options
            .unique_key
            .unwrap_or(celeriac_core::coord::unique_key);
        let key = key_of(call.task, call.args, call.kwargs);
        let holder = store.lock(&key, id, ttl).await?;
        Ok(if holder == id { Ok(key) } else { Err(holder) })
    }

    /// Celery's `task-sent` event for a message just published to `queue` (a failure to
    /// publish it is logged: the task was sent either way).
    async fn send_sent_event(&self, message: &celeriac_core::Message, queue: &str) {
        use celeriac_core::broadcast::Broadcasted;
        use celeriac_core::broadcast::event::{Event, EventKind};
        let Some(channels) = self.inner.broker.broadcast() else {
            return;
        };
        let h = &message.headers;
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map_or(Value::Null, |t| celeriac_core::time::format(t).into())
        };
        let e = Event::new(
            EventKind::TaskSent,
            &self.inner.origin,
            self.clock().forward(),
        )
        .with("uuid", h.id.clone())
        .with("root_id", h.root_id.clone())
        .with("parent_id", h.parent_id.clone())
        .with("name", h.task.clone())
        .with("args", h.argsrepr.clone())
        .with("kwargs", h.kwargsrepr.clone())
        .with("retries", h.retries)
        .with("eta", time(h.eta))
        .with("expires", time(h.expires))
        .with("queue", queue)
        .with("exchange", "")
        .with("routing_key", queue);
        let mut headers = Map::new();
        headers.insert("hostname".into(), self.inner.origin.clone().into());
        let m = Broadcasted::new(EventKind::TaskSent.routing_key(), headers, e.to_value());
        if let Err(err) = channels.send_event(&m).await {
            tracing::warn!(error = %err, "cannot publish the task-sent event");
        }
    }

    /// Sends many calls at once: one [`Broker::publish_batch`](celeriac_core::Broker) per
    /// queue instead of a round trip per task. Returns the task ids in the order of `sigs`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> celeriac::Result<()> {
    /// let app = celeriac::App::builder().broker_url("memory://").build().await?;
    /// let sigs: Vec<_> = (0..3)
    ///     .map(|i| celeriac::Signature::<i64>::new("tasks.add").arg(i).arg(1))
    ///     .collect();
    /// let ids = app.send_many(&sigs).await?;
    /// assert_eq!(ids.len(), 3);
    /// assert_eq!(app.broker().stats("celery").await?.ready, 3);
    /// # Ok(()) }
    /// ```
    pub async fn send_many<O>(&self, sigs: &[Signature<O>]) -> Result<Vec<String>> {
        let sender = self.sender();
        let mut ids = Vec::with_capacity(sigs.len());
        let mut by_queue: Vec<(String, Vec<(celeriac_core::Message, PublishOptions)>)> = Vec::new();
        for sig in sigs {
            if let Some(e) = &sig.encode_error {
                return Err(Error::protocol(e.clone()));
            }
            let task_options = self.options_for(&sig.task, sig.registered_options());
            if task_options.unique_for.is_some() {
                // Each takes its lock before it is published: sent on its own.
                ids.push(self.send_call(sig.call(), &task_options, None).await?);
                continue;
            }
            let (queue, message, publish) =
                self.prepare(sig.call(), &task_options, None, &sender)?;
            ids.push(message.id().to_owned());
            match by_queue.iter_mut().find(|(q, _)| *q == queue) {
                Some((_, batch)) => batch.push((message, publish)),
                None => by_queue.push((queue, vec![(message, publish)])),
            }
        }
        for (queue, batch) in &by_queue {
            self.declare(queue).await?;
            self.inner.broker.publish_batch(queue, batch).await?;
        }
        Ok(ids)
    }

    async fn declare(&self, queue: &str) -> Result<()> {
        if self
            .inner
            .declared
            .lock()
            .expect("declared lock")
            .contains(queue)
        {
            return Ok(());
        }
        self.inner.broker.declare(queue).await?;
        self.inner
            .declared
            .lock()
            .expect("declared lock")
            .insert(queue.to_owned());
        Ok(())
    }

    /// How this app builds messages: its serializer, origin and signer.
    fn sender(&self) -> Sender<'_> {
        Sender::new(self.inner.content_type, Some(&self.inner.origin))
            .signed_by(self.inner.signer.as_deref())
    }

    /// What signs this app's messages and verifies its workers' (serializer `auth`), if
    /// anything does.
    pub fn signer(&self) -> Option<&Arc<dyn BodySigner>> {
        self.inner.signer.as_ref()
    }

    /// A worker for this app, configured from [`App::config`]; adjust it with the returned
    /// options before calling `run`. Under serializer `auth` the worker gets the app's signer:
    /// it runs only messages signed by a trusted certificate and signs what it sends.
    #[cfg(feature = "worker")]
    pub fn worker_options(&self) -> celeriac_worker::WorkerOptions {
        let mut o = celeriac_worker::WorkerOptions::from_config(&self.inner.config);
        o.content_type = self.inner.content_type;
        if let Some(signer) = &self.inner.signer {
            o.content_type = ContentType::Auth;
            o.signer = Some(signer.clone());
        }
        o
    }

    /// A worker running this app's tasks with `options`.
    #[cfg(feature = "worker")]
    pub fn worker(&self, options: celeriac_worker::WorkerOptions) -> celeriac_worker::Worker {
        celeriac_worker::Worker::new(
            self.inner.broker.clone(),
            Some(self.inner.backend.clone()),
            self.inner.registry.clone(),
            options,
        )
    }

    /// Closes the broker and the result backend.
    pub async fn close(&self) -> Result<()> {
        self.inner.broker.close().await?;
        self.inner.backend.close().await
    }
}

/// Builds an [`App`].
#[derive(Debug, Default)]
pub struct AppBuilder {
    config: Option<Config>,
    load_config: bool,
    broker_url: Option<String>,
    backend_url: Option<String>,
    broker: Option<DynBroker>,
    backend: Option<DynBackend>,
    tasks: Vec<TaskDef>,
    collect: bool,
    routes: Vec<(String, String)>,
    drivers: Option<Drivers>,
    retry_on_startup: bool,
    signer: Option<Arc<dyn BodySigner>>,
}

impl AppBuilder {
    /// Uses `config` instead of the defaults.
    #[must_use]
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Reads `celeriac.toml` (or `$CELERIAC_CONFIG`) and the `CELERIAC_*` environment at build.
    #[must_use]
    pub fn load_config(mut self) -> Self {
        self.load_config = true;
        self
    }

    /// Sets the broker URL (overrides the configuration).
    #[must_use]
    pub fn broker_url(mut self, url: impl Into<String>) -> Self {
        self.broker_url = Some(url.into());
        self
    }

    /// Sets the result backend URL (overrides the configuration).
    #[must_use]
    pub fn result_backend(mut self, url: impl Into<String>) -> Self {
        self.backend_url = Some(url.into());
        self
    }

    /// Uses an already open broker.
    #[must_use]
    pub fn broker(mut self, broker: DynBroker) -> Self {
        self.broker = Some(broker);
        self
    }

    /// Uses an already open result backend.
    #[must_use]
    pub fn backend(mut self, backend: DynBackend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Registers task `T` (generated by `#[celeriac::task]`).
    #[must_use]
    pub fn task<T: Task>(mut self) -> Self {
        self.tasks.push(T::definition());
        self
    }

    /// Registers a task definition written by hand.
    #[must_use]
    pub fn register(mut self, def: TaskDef) -> Self {
        self.tasks.push(def);
        self
    }

    /// Registers every `#[celeriac::task]` linked into this binary.
    ///
    /// Tasks defined in a library crate are linked only if the binary uses something from that
    /// crate's object file; when in doubt, register them with [`AppBuilder::task`].
    #[must_use]
    pub fn collect_tasks(mut self) -> Self {
        self.collect = true;
        self
    }

    /// Routes tasks whose name matches `pattern` (`*` globs) to `queue`.
    #[must_use]
    pub fn route(mut self, pattern: impl Into<String>, queue: impl Into<String>) -> Self {
        self.routes.push((pattern.into(), queue.into()));
        self
    }

    /// Keeps trying to open the broker and the result backend while they cannot be reached,
    /// as a worker does when it starts (when the configuration's
    /// [`broker_connection_retry_on_startup`](Config::broker_connection_retry_on_startup) is
    /// true, its default): after 2 s, 4 s, 6 s, ... at most 30 s apart, up to
    /// [`broker_connection_max_retries`](Config::broker_connection_max_retries) times, one
    /// `warn` line with the cause per failed attempt. Errors no retry can fix (a bad URL, an
    /// unknown scheme) fail at once. Off by default: a client fails at once.
    #[must_use]
    pub fn retry_on_startup(mut self, retry: bool) -> Self {
        self.retry_on_startup = retry;
        self
    }

    /// Signs every message the app sends with `signer`, and has its workers run only messages
    /// `signer` verifies: Celery's `auth` serializer set up in code rather than by
    /// `serializer = "auth"` and the `security_*` settings (which [`AppBuilder::build`] loads
    /// by itself). See docs/SECURITY.md.
    ///
    /// ```no_run
    /// # #[cfg(feature = "security")]
    /// # async fn f() -> celeriac::Result<()> {
    /// use std::sync::Arc;
    /// use celeriac::security::{Security, SecuritySettings};
    /// let mut s = SecuritySettings::default();
    /// s.key = "/etc/celery/app.key".into();
    /// s.certificate = "/etc/celery/app.pem".into();
    /// s.cert_store = "/etc/celery/certs".into();
    /// s.digest = "sha256".into();
    /// let app = celeriac::App::builder()
    ///     .signer(Arc::new(Security::load(&s)?))
    ///     .build()
    ///     .await?;
    /// # let _ = app; Ok(()) }
    /// ```
    #[must_use]
    pub fn signer(mut self, signer: Arc<dyn BodySigner>) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Uses `drivers` instead of the built-in set (to add a third-party driver).
    #[must_use]
    pub fn drivers(mut self, drivers: Drivers) -> Self {
        self.drivers = Some(drivers);
        self
    }

    /// The tasks registered so far (collected ones included), without opening anything: what
    /// a pool child runs.
    pub(crate) fn task_registry(&self) -> Registry {
        let mut registry = Registry::new();
        if self.collect {
            for reg in inventory::iter::<crate::__private::Registration> {
                registry.insert((reg.0)());
            }
        }
        for def in &self.tasks {
            registry.insert(def.clone());
        }
        registry
    }

    /// Opens the broker and backend and builds the app.
    pub async fn build(self) -> Result<App> {
        let mut registry = self.task_registry();
        let mut config = match (self.config, self.load_config) {
            (Some(c), _) => c,
            (None, true) => Config::load()?,
            (None, false) => Config::default(),
        };
        if let Some(u) = self.broker_url {
            config.broker_url = Some(u);
        }
        if let Some(u) = self.backend_url {
            config.result_backend = Some(u);
        }
        for (pattern, queue) in self.routes {
            config.routes.insert(pattern, queue);
        }
        config.validate()?;
        config.annotate(&mut registry);
        let auth = config.serializer == ContentType::Auth;
        let signer = match self.signer {
            Some(s) => Some(s),
            None if auth => Some(load_security(&config)?),
            None => None,
        };
        // Under `auth` the signed body is JSON, as Celery's.
        let content_type = if auth || signer.is_some() {
            ContentType::Json
        } else {
            config.serializer
        };
        let drivers = self.drivers.unwrap_or_else(default_drivers);
        let retries = (self.retry_on_startup && config.broker_connection_retry_on_startup)
            .then_some(config.broker_connection_max_retries);
        let broker = match self.broker {
            Some(b) => b,
            None => {
                let url = config.broker_url();
                let open = || drivers.open_broker(url, &config);
                opening("broker", url, retries, open).await?
            }
        };
        let backend = match self.backend {
            Some(b) => b,
            None => {
                let url = config.result_backend_url();
                let open = || drivers.open_backend(url, &config);
                opening("result backend", url, retries, open).await?
            }
        };
        let origin = format!("gen{}@{}", std::process::id(), celeriac_core::hostname());
        let reply_to = backend
            .capabilities()
            .reply_queue
            .map(|q| q.reply_to().to_owned());
        Ok(App {
            inner: Arc::new(Inner {
                config,
                broker,
                backend,
                registry: Arc::new(registry),
                content_type,
                signer,
                origin,
                reply_to,
                declared: Mutex::new(HashSet::new()),
                clock: celeriac_core::broadcast::Clock::new(),
                drivers,
            }),
        })
    }
}

/// The signer `serializer = "auth"` asks for, loaded from the `security_*` settings.
#[cfg(feature = "security")]
fn load_security(config: &Config) -> Result<Arc<dyn BodySigner>> {
    let security = celeriac_core::security::Security::from_config(config)?;
    tracing::info!(signer = %security.signer(), trusted = security.trusted().len(), "messages are signed (serializer auth)");
    Ok(Arc::new(security))
}

#[cfg(not(feature = "security"))]
fn load_security(_: &Config) -> Result<Arc<dyn BodySigner>> {
    Err(Error::config(
        "serializer \"auth\" needs celeriac's `security` feature (signed messages)",
    ))
}

/// Runs `open` until it succeeds; while it fails with an error a retry may fix (a broker or
/// backend that cannot be reached), tries again up to `retries` times (`Some(0)`: forever;
/// `None`: no retry), 2 s after the first failure and 2 s more after each next, at most 30 s.
async fn opening<T, F, Fut>(what: &str, url: &str, retries: Option<u32>, open: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    const STEP: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(30);
    let mut attempt: u32 = 0;
    loop {
        let e = match open().await {
            Ok(opened) => {
                if attempt > 0 {
                    tracing::info!(url = %celeriac_core::url::redact(url), "connected to the {what}");
                }
                return Ok(opened);
            }
            Err(e) => e,
        };
        let Some(max) = retries else {
            return Err(e);
        };
        let transient = !matches!(
            e.kind(),
            ErrorKind::Config | ErrorKind::Unsupported | ErrorKind::Protocol
        );
        attempt += 1;
        if !transient || (max > 0 && attempt > max) {
            return Err(e);
        }
        let wait = (STEP * attempt).min(MAX);
        let of = if max > 0 {
            max.to_string()
        } else {
            "∞".to_owned()
        };
        tracing::warn!(
            url = %celeriac_core::url::redact(url),
            "cannot reach the {what}: {e:#}; trying again in {:.2} s ({attempt}/{of})",
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
    }
}

/// A task message built by [`App::prepare_send`] and not yet published.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PreparedSend {
    /// The queue it goes to.
    pub queue: String,
    /// The message.
    pub message: celeriac_core::Message,
    /// How to publish it.
    pub options: PublishOptions,
}

/// The drivers compiled in (brokers, result backends and beat stores): `memory://` always,
/// `sqlite://` with the `sqlite` feature, `redis://` with the `redis` feature,
/// `cache+memcached://` (result backend only) with the `memcached` feature, Celery's
/// `db+…` backends and `sqla+…` brokers with the `sqla` feature.
pub fn default_drivers() -> Drivers {
    #[allow(unused_mut)]
    let mut d = Drivers::new();
    #[cfg(feature = "sqlite")]
    celeriac_sqlite::register(&mut d);
    #[cfg(feature = "redis")]
    celeriac_redis::register(&mut d);
    #[cfg(feature = "amqp")]
    celeriac_amqp::register(&mut d);
    #[cfg(feature = "memcached")]
    celeriac_memcached::register(&mut d);
    #[cfg(feature = "mysql")]
    celeriac_mysql::register(&mut d);
    #[cfg(feature = "sqla")]
    celeriac_sqla::register(&mut d);
    #[cfg(feature = "postgres")]
    celeriac_postgres::register(&mut d);
    d
}

/// Puts this app's reply queue on a chain step that has none, and on the steps nested in it, as
/// Celery's freeze does: whichever worker sends the step later, an `rpc://` result comes back
/// to this client.
fn stamp_reply_to(sig: &mut celeriac_core::Signature, reply_to: &str) {
    sig.options
        .entry("reply_to")
        .or_insert_with(|| reply_to.into());
    for key in ["tasks", "body"] {
        if let Some(nested) = sig.kwargs.get_mut(key) {
            stamp_nested(nested, reply_to);
        }
    }
}

/// [`stamp_reply_to`] on a signature map (or a list of them) inside a composite's kwargs.
fn stamp_nested(v: &mut serde_json::Value, reply_to: &str) {
    match v {
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| stamp_nested(i, reply_to)),
        serde_json::Value::Object(map) if map.contains_key("task") => {
            if let Some(serde_json::Value::Object(options)) = map.get_mut("options") {
                options.entry("reply_to").or_insert_with(|| reply_to.into());
            } else {
                let mut options = serde_json::Map::new();
                options.insert("reply_to".into(), reply_to.into());
                map.insert("options".into(), options.into());
            }
            if let Some(serde_json::Value::Object(kwargs)) = map.get_mut("kwargs") {
                for key in ["tasks", "body"] {
                    if let Some(nested) = kwargs.get_mut(key) {
                        stamp_nested(nested, reply_to);
                    }
                }
            }
        }
        _ => {}
    }
}
