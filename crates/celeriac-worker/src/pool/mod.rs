//! Running a task body off the consume loop, with panics caught: [`Executor`].
//!
//! For the delivery pipeline. Async handlers run in their own `tokio::spawn`ed task, so a
//! panic is seen as a `JoinError` instead of unwinding through the worker, and so a hard time
//! limit can abort them. Blocking handlers run off the runtime: under
//! [`Pool::Async`](crate::Pool) they go to tokio's blocking pool (except bodies proved brief,
//! which run inline: see [`brief`]), under
//! [`Pool::Threads`](crate::Pool) to the worker's own [`ThreadPool`], under
//! [`Pool::Processes`](crate::Pool) to a child process ([`ProcessPool`]); `catch_unwind` turns a
//! panic into a value. Dropping a [`Spawned`] aborts an async body and kills a child process; a
//! blocking body on a thread keeps its thread until it returns.

mod brief;
pub(crate) mod process;
mod threads;

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use celeriac_core::task::TaskResult;
use celeriac_core::{Args, Handler, TaskContext};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub(crate) use process::ProcessPool;
pub(crate) use threads::ThreadPool;

use crate::options::{Pool, WorkerOptions};
use brief::{Brief, Placement};

/// How a body ended, short of a time limit.
#[derive(Debug)]
pub(crate) enum Finished {
    /// The handler returned.
    Returned(TaskResult),
    /// The handler panicked with this message.
    Panicked(String),
    /// The process running it died (abort, segfault, OOM kill, SIGKILL), or none could be
    /// started; the text says how.
    Lost(String),
}

/// Where bodies run.
#[derive(Debug)]
pub(crate) enum Executor {
    /// Tokio's blocking pool; with a [`Brief`] record, bodies proved brief run inline.
    Tokio(Option<Arc<Brief>>),
    Threads(ThreadPool),
    Processes(ProcessPool),
}

impl Executor {
    /// An executor for `pool` with defaults (the processes pool runs this executable).
    #[cfg(test)]
    pub(crate) fn new(pool: Pool, concurrency: usize) -> Self {
        Self::from_options(&WorkerOptions {
            pool,
            concurrency,
            ..WorkerOptions::default()
        })
    }

    pub(crate) fn from_options(o: &WorkerOptions) -> Self {
        match o.pool {
            Pool::Async => Executor::Tokio(o.inline_brief.then(Arc::default)),
            Pool::Threads => Executor::Threads(ThreadPool::new(o.concurrency)),
            Pool::Processes => Executor::Processes(ProcessPool::new(
                o.child_command.clone(),
                o.max_tasks_per_child,
                o.max_memory_per_child,
                o.concurrency,
            )),
        }
    }

    /// Starts `handler` with its context and arguments; under the processes pool, `child`
    /// holds the pid of the child that runs it while it runs.
    pub(crate) fn spawn(
        &self,
        handler: &Handler,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        child: &ChildPid,
    ) -> Spawned {
        if let (Handler::Blocking(_), Executor::Processes(pool)) = (handler, self) {
            let pool = pool.clone();
            let slot = child.clone();
            return Spawned::Child(AbortOnDrop(tokio::spawn(async move {
                pool.run(ctx, args, kwargs, &slot).await
            })));
        }
        let args = Args::new(args, kwargs);
        match handler {
            Handler::Async(f) => Spawned::Task(AbortOnDrop(tokio::spawn(f(ctx, args)))),
            Handler::Blocking(f) => {
                // The handler's address tells bodies apart for the brief record.
                let body = Arc::as_ptr(f).cast::<()>() as usize;
                let f = f.clone();
                let run = move || match std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx, args)))
                {
                    Ok(r) => Finished::Returned(r),
                    Err(payload) => Finished::Panicked(panic_message(payload.as_ref())),
                };
                match self {
                    Executor::Tokio(Some(brief)) => match brief.place(body) {
                        Placement::Inline { measured } => {
                            let (finished, took) = brief::timed(run, measured);
                            Spawned::Done(Some(brief.ran_inline(body, took, finished)))
                        }
                        Placement::Pool => {
                            let brief = brief.clone();
                            Spawned::Blocking(AbortOnDrop(tokio::task::spawn_blocking(move || {
                                let (finished, took) = brief::timed(run, false);
                                brief.ran_on_pool(body, took.wall);
                                finished
                            })))
                        }
                    },
                    Executor::Tokio(None) | Executor::Processes(_) => {
                        Spawned::Blocking(AbortOnDrop(tokio::task::spawn_blocking(run)))
                    }
                    Executor::Threads(pool) => {
                        let (tx, rx) = oneshot::channel();
                        pool.execute(move || {
                            let _ = tx.send(run());
                        });
                        Spawned::Thread(rx)
                    }
                }
            }
        }
    }
}

/// Grows and shrinks a worker's pool while it runs: Celery's SIGTTIN (+1) and SIGTTOU (-1),
/// which [`Worker::run_until_signal`](crate::Worker::run_until_signal) maps onto it.
///
/// The size is the worker's concurrency: how many tasks run at once, and under
/// [`Pool::Processes`] how many children are kept (started at once when it grows, retired
/// when it shrinks: idle ones at once, busy ones when their task ends). It never goes below 1.
/// Cheap to clone; take it with [`Worker::pool_handle`](crate::Worker::pool_handle).
#[derive(Debug, Clone)]
pub struct PoolHandle {
    slots: Arc<tokio::sync::Semaphore>,
    size: Arc<std::sync::Mutex<usize>>,
    processes: Option<ProcessPool>,
}

impl PoolHandle {
    pub(crate) fn new(size: usize, executor: &Executor) -> Self {
        let size = size.max(1);
        PoolHandle {
            slots: Arc::new(tokio::sync::Semaphore::new(size)),
            size: Arc::new(std::sync::Mutex::new(size)),
            processes: match executor {
                Executor::Processes(p) => Some(p.clone()),
                _ => None,
            },
        }
    }

    /// The concurrency slots the worker's deliveries take.
    pub(crate) fn slots(&self) -> Arc<tokio::sync::Semaphore> {
        self.slots.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current size (concurrency).
    pub fn size(&self) -> usize {
        *self.lock()
    }

    /// Children alive under [`Pool::Processes`] (idle or busy); `None` for the other pools.
    pub fn children(&self) -> Option<usize> {
        self.processes.as_ref().map(ProcessPool::children)
    }

    /// The pids of the idle children under [`Pool::Processes`] (busy ones are found through
    /// the requests they run); empty for the other pools.
    pub(crate) fn idle_pids(&self) -> Vec<u32> {
        self.processes
            .as_ref()
            .map(ProcessPool::idle_pids)
            .unwrap_or_default()
    }

    /// Adds `n` slots (and under [`Pool::Processes`] starts `n` children); returns the new size.
    pub fn grow(&self, n: usize) -> usize {
        let mut size = self.lock();
        *size += n;
        self.slots.add_permits(n);
        if let Some(p) = &self.processes {
            p.resize(*size);
        }
        tracing::info!(size = *size, "pool grew");
        *size
    }

    /// Removes up to `n` slots, keeping at least one; returns the new size. Running tasks are
    /// not interrupted: a slot goes when its task ends. Call it within the worker's runtime.
    pub fn shrink(&self, n: usize) -> usize {
        let mut size = self.lock();
        let n = n.min(*size - 1);
        if n == 0 {
            return *size;
        }
        *size -= n;
        let taken = u32::try_from(n).unwrap_or(u32::MAX);
        match self.slots.clone().try_acquire_many_owned(taken) {
            Ok(permits) => permits.forget(),
            Err(_) => {
                // Busy slots: take them as their tasks end.
                let slots = self.slots.clone();
                tokio::spawn(async move {
                    if let Ok(permits) = slots.acquire_many_owned(taken).await {
                        permits.forget();
                    }
                });
            }
        }
        if let Some(p) = &self.processes {
            p.resize(*size);
        }
        tracing::info!(size = *size, "pool shrank");
        *size
    }

    /// Starts the processes pool's children before the first task.
    pub(crate) fn prestart(&self) {
        if let Some(p) = &self.processes {
            p.prestart();
        }
    }
}

/// A running body.
#[derive(Debug)]
pub(crate) enum Spawned {
    Task(AbortOnDrop<TaskResult>),
    Blocking(AbortOnDrop<Finished>),
    Thread(oneshot::Receiver<Finished>),
    /// A blocking body that already ran inline (see [`brief`]); taken by the first join.
    Done(Option<Finished>),
    /// A blocking body in a pool child (whose pid is in the [`ChildPid`] given to `spawn`).
    Child(AbortOnDrop<Finished>),
}

/// The pid of the pool child running a body, while it runs it (shared with the pool).
#[derive(Debug, Clone, Default)]
pub(crate) struct ChildPid(Arc<AtomicU32>);

impl ChildPid {
    /// The child's pid, when one runs the body now.
    pub(crate) fn get(&self) -> Option<u32> {
        Some(self.0.load(Ordering::SeqCst)).filter(|p| *p != 0)
    }

    pub(crate) fn set(&self, pid: Option<u32>) {
        self.0.store(pid.unwrap_or(0), Ordering::SeqCst);
    }
}

impl Spawned {
    /// Waits for the body to end. Cancel-safe: it can be awaited again after a timeout.
    pub(crate) async fn join(&mut self) -> Finished {
        match self {
            Spawned::Task(h) => match (&mut h.0).await {
                Ok(r) => Finished::Returned(r),
                Err(e) => Finished::Panicked(join_error_message(e)),
            },
            Spawned::Blocking(h) | Spawned::Child(h) => match (&mut h.0).await {
                Ok(f) => f,
                Err(e) => Finished::Panicked(join_error_message(e)),
            },
            Spawned::Done(f) => f.take().unwrap_or_else(|| {
                Finished::Panicked("the inline body's outcome was already taken".to_owned())
            }),
            Spawned::Thread(rx) => match rx.await {
                Ok(f) => f,
                Err(_) => Finished::Panicked("the task thread ended without a result".to_owned()),
            },
        }
    }
}

/// A join handle that aborts its task when dropped (spawn_blocking tasks cannot be aborted
/// once started; then this only detaches).
#[derive(Debug)]
pub(crate) struct AbortOnDrop<T>(pub(crate) JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn join_error_message(e: tokio::task::JoinError) -> String {
    if e.is_panic() {
        panic_message(e.into_panic().as_ref())
    } else {
        "the task was cancelled".to_owned()
    }
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_core::{Cancellation, Headers, TaskError};
    use serde_json::json;
    use std::sync::Arc;

    fn ctx() -> TaskContext {
        TaskContext::new(Headers::new("t", "id"), "q", "w@h", Cancellation::new())
    }

    async fn outcomes(exec: &Executor) -> Vec<String> {
        {
            let handlers = [
                Handler::Blocking(Arc::new(|_, _| Ok(json!(1)))),
                Handler::Blocking(Arc::new(|_, _| panic!("boom {}", 2))),
                Handler::Async(Arc::new(|_, _| {
                    Box::pin(async { Err(TaskError::fail("no")) })
                })),
                Handler::Async(Arc::new(|_, _| Box::pin(async { panic!("async boom") }))),
            ];
            let mut out = Vec::new();
            for h in &handlers {
                let mut s = exec.spawn(h, ctx(), Vec::new(), Map::new(), &ChildPid::default());
                out.push(match s.join().await {
                    Finished::Returned(Ok(v)) => format!("ok {v}"),
                    Finished::Returned(Err(e)) => format!("err {e}"),
                    Finished::Panicked(m) => format!("panic {m}"),
                    Finished::Lost(m) => format!("lost {m}"),
                });
            }
            out
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn panics_become_values_in_every_pool() {
        let expected = [
            "ok 1",
            "panic boom 2",
            "err TaskError: no",
            "panic async boom",
        ];
        assert_eq!(outcomes(&Executor::new(Pool::Async, 2)).await, expected);
        assert_eq!(outcomes(&Executor::new(Pool::Threads, 2)).await, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_bodies_start_off_the_runtime() {
        for pool in [Pool::Async, Pool::Threads] {
            let exec = Executor::new(pool, 1);
            let h = Handler::Blocking(Arc::new(|_, _| {
                Ok(json!(std::thread::current().name().map(str::to_owned)))
            }));
            let Finished::Returned(Ok(name)) = exec
                .spawn(&h, ctx(), Vec::new(), Map::new(), &ChildPid::default())
                .join()
                .await
            else {
                panic!("no name")
            };
            let name = name.as_str().unwrap_or_default().to_owned();
            assert!(
                !name.starts_with("tokio-runtime-worker"),
                "{pool}: ran on {name}"
            );
        }
    }

    /// The thread id a blocking body ran on, as text.
    fn thread_of(exec: &Executor, h: &Handler) -> impl std::future::Future<Output = String> {
        let mut spawned = exec.spawn(h, ctx(), Vec::new(), Map::new(), &ChildPid::default());
        async move {
            match spawned.join().await {
                Finished::Returned(Ok(v)) => v.as_str().unwrap_or_default().to_owned(),
                other => panic!("{other:?}"),
            }
        }
    }

    fn runs_on() -> Handler {
        Handler::Blocking(Arc::new(|_, _| {
            Ok(json!(format!("{:?}", std::thread::current().id())))
        }))
    }

    /// Under the async pool a brief body moves onto the runtime thread once proved brief;
    /// with `inline_brief` off it never does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_brief_blocking_body_moves_onto_the_runtime_after_its_proof() {
        // Inline means on the thread that polls the delivery: here, the test's own.
        let runtime = format!("{:?}", std::thread::current().id());
        let exec = Executor::new(Pool::Async, 4);
        let h = runs_on();
        let first = thread_of(&exec, &h).await;
        assert_ne!(first, runtime, "the first run is on the blocking pool");
        // Runs slowed by the machine restart the proof; a few hundred are plenty.
        let mut inline_after = None;
        for n in 1..500 {
            if thread_of(&exec, &h).await == runtime {
                inline_after = Some(n);
                break;
            }
        }
        let n = inline_after.expect("never ran inline");
        assert!(n >= brief::PROOF_RUNS as usize, "inline after {n} runs");

        let off = Executor::from_options(&WorkerOptions {
            inline_brief: false,
            ..WorkerOptions::default()
        });
        for _ in 0..(brief::PROOF_RUNS * 2) {
            assert_ne!(thread_of(&off, &h).await, runtime);
        }
    }

    /// A brief body that starts to block (waits 3 ms on a channel) holds up the runtime at most
    /// twice, the first long run unmeasured and the next measured (a voluntary switch): then it
    /// runs on the pool, where it cannot prove brief again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_brief_body_that_starts_to_block_leaves_the_runtime() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let runtime = format!("{:?}", std::thread::current().id());
        let exec = Executor::new(Pool::Async, 4);
        let slow = Arc::new(AtomicBool::new(false));
        let h = {
            let slow = slow.clone();
            Handler::Blocking(Arc::new(move |_, _| {
                if slow.load(Ordering::Relaxed) {
                    let (_tx, rx) = std::sync::mpsc::channel::<()>();
                    let _ = rx.recv_timeout(std::time::Duration::from_millis(3));
                }
                Ok(json!(format!("{:?}", std::thread::current().id())))
            }))
        };
        let mut proved = false;
        for _ in 0..500 {
            if thread_of(&exec, &h).await == runtime {
                proved = true;
                break;
            }
        }
        assert!(proved, "never ran inline");
        slow.store(true, Ordering::Relaxed);
        let mut inline = 0;
        for _ in 0..100 {
            if thread_of(&exec, &h).await == runtime {
                inline += 1;
            }
        }
        assert!((1..=2).contains(&inline), "{inline} slow runs inline");
    }

    /// A body that blocks on the runtime works on the pool, fails inline with an explanation,
    /// and is back on the pool (working) from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_blocks_on_the_runtime_is_sent_back_to_the_pool() {
        let exec = Executor::new(Pool::Async, 4);
        let h = Handler::Blocking(Arc::new(|_, _| {
            let v = tokio::runtime::Handle::current().block_on(async { 5 });
            Ok(json!(v))
        }));
        let mut failed = None;
        for _ in 0..500 {
            match exec
                .spawn(&h, ctx(), Vec::new(), Map::new(), &ChildPid::default())
                .join()
                .await
            {
                Finished::Returned(Ok(v)) => assert_eq!(v, json!(5)),
                Finished::Panicked(m) => {
                    failed = Some(m);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let m = failed.expect("never ran inline");
        assert!(
            m.contains("within a runtime") && m.contains("inline_brief = false"),
            "{m}"
        );
        for _ in 0..(brief::PROOF_RUNS * 2) {
            let f = exec
                .spawn(&h, ctx(), Vec::new(), Map::new(), &ChildPid::default())
                .join()
                .await;
            assert!(matches!(f, Finished::Returned(Ok(_))), "{f:?}");
        }
    }
}
