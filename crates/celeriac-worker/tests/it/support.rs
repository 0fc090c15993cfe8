//! Shared fixtures: tasks from closures, a worker on the memory drivers, a broker wrapper that
//! can hide capabilities or poison messages, and waits that poll to a deadline.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use celeriac_core::memory::{MemoryBackend, MemoryBroker};
use celeriac_core::task::TaskResult;
use celeriac_core::{
    Args, BoxFuture, Broker, Capabilities, ConsumeOptions, Consumer, Delivery, Error, Handler,
    Headers, Message, PublishOptions, QueueStats, Registry, Result, TaskContext, TaskDef, TaskMeta,
    TaskOptions,
};
use celeriac_core::{Body, ContentType};
use celeriac_worker::{ShutdownHandle, Worker, WorkerOptions, WorkerReport};
use serde_json::{Map, Value};
use tokio::task::JoinHandle;

pub(crate) const QUEUE: &str = "celery";
/// Generous: only reached when a test is about to fail.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

pub(crate) fn blocking(
    name: &str,
    f: impl Fn(TaskContext, Args) -> TaskResult + Send + Sync + 'static,
) -> TaskDef {
    TaskDef {
        name: name.to_owned(),
        params: &[],
        options: TaskOptions::default(),
        handler: Handler::Blocking(Arc::new(f)),
    }
}

pub(crate) fn async_task<F, Fut>(name: &str, f: F) -> TaskDef
where
    F: Fn(TaskContext, Args) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TaskResult> + Send + 'static,
{
    TaskDef {
        name: name.to_owned(),
        params: &[],
        options: TaskOptions::default(),
        handler: Handler::Async(Arc::new(move |c, a| Box::pin(f(c, a)))),
    }
}

pub(crate) fn with_options(mut def: TaskDef, f: impl FnOnce(&mut TaskOptions)) -> TaskDef {
    f(&mut def.options);
    def
}

/// Counts calls.
#[derive(Debug, Clone, Default)]
pub(crate) struct Calls(Arc<AtomicUsize>);

impl Calls {
    pub(crate) fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

pub(crate) fn message(name: &str, args: Vec<Value>) -> Message {
    let id = celeriac_core::protocol::new_id();
    Message::new(
        Headers::new(name, id),
        &Body::new(args, Map::new()),
        ContentType::Json,
    )
    .unwrap()
}

/// A running worker on memory drivers.
pub(crate) struct Harness {
    pub(crate) broker: TestBroker,
    pub(crate) backend: MemoryBackend,
    pub(crate) shutdown: ShutdownHandle,
    pub(crate) pool: celeriac_worker::PoolHandle,
    join: JoinHandle<Result<WorkerReport>>,
}

pub(crate) fn options(f: impl FnOnce(&mut WorkerOptions)) -> WorkerOptions {
    let mut o = WorkerOptions::default();
    o.hostname = "w1@test".into();
    o.queues = vec![QUEUE.into()];
    o.concurrency = 2;
    o.prefetch_buffer = 1;
    f(&mut o);
    o
}

pub(crate) fn start(tasks: Vec<TaskDef>, options: WorkerOptions) -> Harness {
    start_on(TestBroker::new(), tasks, options)
}

pub(crate) fn start_on(broker: TestBroker, tasks: Vec<TaskDef>, options: WorkerOptions) -> Harness {
    start_with(broker, MemoryBackend::new(), tasks, options)
}

/// A worker on an existing broker and backend: a restart, as far as they can tell.
pub(crate) fn start_with(
    broker: TestBroker,
    backend: MemoryBackend,
    tasks: Vec<TaskDef>,
    options: WorkerOptions,
) -> Harness {
    start_built(broker, backend, tasks, options, |w| w)
}

/// [`start_with`], with the worker changed by `build` (layers added) before it runs.
pub(crate) fn start_built(
    broker: TestBroker,
    backend: MemoryBackend,
    tasks: Vec<TaskDef>,
    options: WorkerOptions,
    build: impl FnOnce(Worker) -> Worker,
) -> Harness {
    let mut registry = Registry::new();
    for t in tasks {
        registry.insert(t);
    }
    let worker = build(Worker::new(
        Arc::new(broker.clone()),
        Some(Arc::new(backend.clone())),
        Arc::new(registry),
        options,
    ));
    let shutdown = worker.shutdown_handle();
    let pool = worker.pool_handle();
    let join = tokio::spawn(worker.run());
    Harness {
        broker,
        backend,
        shutdown,
        pool,
        join,
    }
}

impl Harness {
    /// Publishes a task message; returns its id.
    pub(crate) async fn send(&self, m: Message) -> String {
        self.broker
            .publish(QUEUE, &m, PublishOptions::default())
            .await
            .unwrap();
        m.id().to_owned()
    }

    pub(crate) async fn call(&self, name: &str, args: Vec<Value>) -> String {
        self.send(message(name, args)).await
    }

    /// Waits for a ready result.
    pub(crate) async fn result(&self, id: &str) -> TaskMeta {
        use celeriac_core::ResultBackend;
        self.backend.wait(id, Some(DEADLINE)).await.unwrap()
    }

    pub(crate) async fn stored(&self, id: &str) -> Option<TaskMeta> {
        use celeriac_core::ResultBackend;
        self.backend.get(id).await.unwrap()
    }

    pub(crate) async fn stats(&self) -> QueueStats {
        self.broker.stats(QUEUE).await.unwrap()
    }

    /// Polls `check` until it holds.
    pub(crate) async fn until<F, Fut>(&self, what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        until(what, check).await;
    }

    /// Warm shutdown; waits for `run` to return.
    pub(crate) async fn stop(self) -> WorkerReport {
        self.shutdown.warm();
        self.join().await
    }

    pub(crate) async fn join(self) -> WorkerReport {
        tokio::time::timeout(DEADLINE, self.join)
            .await
            .expect("worker stops in time")
            .unwrap()
            .unwrap()
    }
}

/// Polls `check` every millisecond until it holds, failing after [`DEADLINE`].
pub(crate) async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A memory broker whose capabilities can be narrowed and whose consumer turns messages of
/// task `poison` into undecodable deliveries.
#[derive(Debug, Clone)]
pub(crate) struct TestBroker {
    pub(crate) inner: MemoryBroker,
    caps: Capabilities,
}

impl TestBroker {
    pub(crate) fn new() -> Self {
        let inner = MemoryBroker::new();
        let caps = inner.capabilities();
        TestBroker { inner, caps }
    }

    pub(crate) fn without_delay(mut self) -> Self {
        self.caps.delay = false;
        self
    }

    pub(crate) fn without_lease_extension(mut self) -> Self {
        self.caps.lease_extension = false;
        self
    }
}

impl Broker for TestBroker {
    fn driver(&self) -> &'static str {
        "test"
    }
    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    fn declare<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.declare(queue)
    }
    fn publish<'a>(
        &'a self,
        queue: &'a str,
        message: &'a Message,
        options: PublishOptions,
    ) -> BoxFuture<'a, Result<()>> {
        self.inner.publish(queue, message, options)
    }
    fn consume<'a>(
        &'a self,
        queues: &'a [String],
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>>> {
        Box::pin(async move {
            let inner = self.inner.consume(queues, options).await?;
            Ok(Box::new(Poisoning(inner)) as Box<dyn Consumer>)
        })
    }
    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<u64>> {
        self.inner.purge(queue)
    }
    fn stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats>> {
        self.inner.stats(queue)
    }
    fn queues(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        self.inner.queues()
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.inner.close()
    }
    fn broadcast(&self) -> Option<&dyn celeriac_core::broadcast::Broadcast> {
        self.inner.broadcast()
    }
}

#[derive(Debug)]
struct Poisoning(Box<dyn Consumer>);

impl Consumer for Poisoning {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Delivery>>> {
        Box::pin(async move {
            let mut d = self.0.next().await?;
            if let Some(d) = &mut d {
                if d.message.as_ref().is_ok_and(|m| m.task() == "poison") {
                    d.message = Err(Error::protocol("invalid envelope: expected a json object"));
                }
            }
            Ok(d)
        })
    }
}

/// A gate async tasks wait at until the test opens it (no lost wake-ups, unlike `Notify`).
#[derive(Debug, Clone)]
pub(crate) struct Opening(Arc<tokio::sync::Semaphore>);

impl Opening {
    pub(crate) fn new() -> Self {
        Opening(Arc::new(tokio::sync::Semaphore::new(0)))
    }
    pub(crate) async fn wait(&self) {
        let _ = self.0.acquire().await;
    }
    pub(crate) fn open(&self) {
        self.0.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }
}
