//! The processes pool ([`Pool::Processes`](crate::Pool)): blocking task bodies in child
//! processes of the worker's own binary, Celery's prefork.
//!
//! For the executor (the parent side, [`ProcessPool`]) and for a binary started as a pool
//! child (the child side, [`run_child`]), which `celeriac::cli::run` calls by itself.
//!
//! # The protocol
//!
//! The parent starts a child with `CELERIAC_POOL_CHILD=1` in its environment and one end of a
//! Unix socket pair as its standard input; standard output and error are the worker's, so a
//! task's `println!` and the child's panics show up where the worker's own output goes. Both
//! sides then exchange JSON lines on the socket, never code nor pickles:
//!
//! - child → parent `{"ready":{"pid":N}}` once the registry is loaded;
//! - parent → child `{"run":{"job":J,"headers":{..},"queue":..,"hostname":..,"args":[..],"kwargs":{..}}}`;
//! - parent → child `{"cancel":{"job":J}}` at the soft time limit (the task's
//!   [`Cancellation`] fires in the child);
//! - child → parent `{"done":{"job":J,"outcome":{"ok":..}|{"err":{..}}|{"panic":".."}}}`.
//!
//! A child runs one task at a time; the worker's concurrency bounds how many are busy.
//!
//! # Key design decisions
//!
//! - **Same binary, not a fork.** A forked copy of a multi-threaded tokio process is unsafe to
//!   use, and `unsafe` is forbidden here; re-executing the binary costs a few milliseconds per
//!   child and gives a clean process whose registry is rebuilt from the same code.
//! - **The socket is the lifeline.** A child whose socket closes (the worker exited, was
//!   killed, or recycles it) exits at once, even mid-task, so no orphan keeps running work
//!   whose delivery will be handed to another worker anyway.
//! - **Killing is the hard limit.** Dropping a running job (hard time limit, cold shutdown)
//!   drops its child, which tokio kills with SIGKILL; the next job starts a fresh child.
//! - **A dead child is a lost worker, not a dead worker.** End of file on the socket while a
//!   job runs means the child died (abort, segfault, OOM kill, SIGKILL): the job ends as
//!   [`Finished::Lost`] with the exit signal, and the parent carries on.
//! - **Recycling after the task, never during.** `max_tasks_per_child` and
//!   `max_memory_per_child` (resident KiB, read from `/proc/<pid>/status`) are checked when a
//!   child hands back a result; a child over either is told to go (its socket is closed).
//! - **The child computes auto-retry.** A task's `autoretry` classifier may look at the
//!   error's source type, which cannot cross a pipe; the child applies it and sends a retry.

use std::io::{self, BufRead as _, Write as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::ExitStatusExt as _;
use std::panic::AssertUnwindSafe;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use celeriac_core::task::TaskResult;
use celeriac_core::{
    Args, Cancellation, Handler, Headers, Registry, TaskContext, TaskError, TaskErrorKind,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::{ChildPid, Finished, panic_message};
use crate::options::ChildCommand;

/// The environment variable that marks a pool child.
pub const CHILD_ENV: &str = "CELERIAC_POOL_CHILD";

/// How long a new child may take to load its registry and say it is ready.
const STARTUP: Duration = Duration::from_secs(30);

/// Whether this process was started as a [`Pool::Processes`](crate::Pool) child; if so, the
/// binary should call [`run_child`] and exit with what it returns.
pub fn is_pool_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some_and(|v| v == "1")
}

// ===== wire =====

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToChild {
    Run {
        job: u64,
        headers: Box<Headers>,
        queue: String,
        hostname: String,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    },
    Cancel {
        job: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FromChild {
    Ready { pid: u32 },
    Done { job: u64, outcome: Outcome },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Ok(Value),
    Err(WireError),
    Panic(String),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum WireKind {
    Failed,
    Retry,
    Reject,
}

/// A [`TaskError`] as it crosses the socket (its source error stays in the child).
#[derive(Debug, Serialize, Deserialize)]
struct WireError {
    kind: WireKind,
    exc_type: String,
    message: String,
    countdown: Option<f64>,
    requeue: bool,
    traceback: Option<String>,
}

impl WireError {
    /// `err` as sent by the child; a failure the task's `autoretry` accepts becomes a retry.
    fn from_task_error(err: &TaskError, autoretry: Option<fn(&TaskError) -> bool>) -> Self {
        let kind = match err.kind() {
            TaskErrorKind::Retry => WireKind::Retry,
            TaskErrorKind::Reject => WireKind::Reject,
            _ if autoretry.is_some_and(|f| f(err)) => WireKind::Retry,
            _ => WireKind::Failed,
        };
        let remote = err.to_remote();
        WireError {
            kind,
            exc_type: err.exc_type().to_owned(),
            message: err.message().to_owned(),
            countdown: err.countdown().map(|d| d.as_secs_f64()),
            requeue: err.requeue(),
            traceback: remote.traceback,
        }
    }

    fn into_task_error(self) -> TaskError {
        let e = match self.kind {
            WireKind::Reject => return TaskError::reject(self.message, self.requeue),
            WireKind::Failed => TaskError::new(self.exc_type, self.message),
            WireKind::Retry => TaskError::new(self.exc_type, self.message).into_retry(
                self.countdown
                    .and_then(|s| Duration::try_from_secs_f64(s).ok()),
            ),
        };
        match self.traceback {
            Some(tb) => e.with_traceback(tb),
            None => e,
        }
    }
}

impl Outcome {
    fn into_finished(self) -> Finished {
        match self {
            Outcome::Ok(v) => Finished::Returned(Ok(v)),
            Outcome::Err(e) => Finished::Returned(Err(e.into_task_error())),
            Outcome::Panic(m) => Finished::Panicked(m),
        }
    }
}

// ===== parent side =====

/// Child processes for blocking task bodies, started on demand and reused.
#[derive(Debug, Clone)]
pub(crate) struct ProcessPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    command: Result<ChildCommand, String>,
    idle: Mutex<Vec<ChildProc>>,
    max_tasks: Option<u32>,
    max_memory_kib: Option<u64>,
    jobs: AtomicU64,
    /// How many children the pool keeps (the worker's concurrency; grows and shrinks).
    target: AtomicUsize,
    /// Children running a job now.
    busy: AtomicUsize,
}

/// Counts a child as busy while alive.
struct Busy(Arc<Inner>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct ChildProc {
    pid: u32,
    child: tokio::process::Child,
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    tasks: u32,
}

impl ProcessPool {
    /// A pool starting children with `command` (default: this executable).
    pub(crate) fn new(
        command: Option<ChildCommand>,
        max_tasks: Option<u32>,
        max_memory_kib: Option<u64>,
        size: usize,
    ) -> Self {
        let command = match command {
            Some(c) => Ok(c),
            None => std::env::current_exe()
                .map(ChildCommand::new)
                .map_err(|e| format!("cannot find the worker's own executable: {e}")),
        };
        ProcessPool {
            inner: Arc::new(Inner {
                command,
                idle: Mutex::new(Vec::new()),
                max_tasks: max_tasks.filter(|n| *n > 0),
                max_memory_kib: max_memory_kib.filter(|n| *n > 0),
                jobs: AtomicU64::new(0),
                target: AtomicUsize::new(size.max(1)),
                busy: AtomicUsize::new(0),
            }),
        }
    }

    /// Runs the blocking task of `ctx` in a child, whose pid is in `pid` while it runs. The
    /// returned future owns the child while it runs: dropping it kills the child.
    pub(crate) async fn run(
        &self,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        pid: &ChildPid,
    ) -> Finished {
        let finished = self.inner.clone().run(ctx, args, kwargs, pid).await;
        pid.set(None);
        finished
    }

    /// Starts children in the background until the pool has its target number (Celery's
    /// prefork starts its children before the first task).
    pub(crate) fn prestart(&self) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            while inner.idle().len() + inner.busy.load(Ordering::SeqCst)
                < inner.target.load(Ordering::SeqCst)
            {
                match inner.spawn().await {
                    Ok(c) => {
                        let mut idle = inner.idle();
                        if idle.len() + inner.busy.load(Ordering::SeqCst)
                            < inner.target.load(Ordering::SeqCst)
                        {
                            idle.push(c);
                        } else {
                            // Jobs started their own children meanwhile.
                            drop(idle);
                            c.retire();
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot prestart a pool child");
                        return;
                    }
                }
            }
        });
    }

    /// Keeps `target` children from now on: retires idle children beyond it at once (busy ones
    /// as they finish their task), or starts the missing ones.
    pub(crate) fn resize(&self, target: usize) {
        let target = target.max(1);
        let before = self.inner.target.swap(target, Ordering::SeqCst);
        if target > before {
            self.prestart();
            return;
        }
        loop {
            let extra = {
                let mut idle = self.inner.idle();
                if idle.len() + self.inner.busy.load(Ordering::SeqCst) > target {
                    idle.pop()
                } else {
                    None
                }
            };
            match extra {
                Some(c) => {
                    tracing::info!(pid = c.pid, target, "pool shrank; retiring an idle child");
                    c.retire();
                }
                None => break,
            }
        }
    }

    /// The pids of the children waiting for a job.
    pub(crate) fn idle_pids(&self) -> Vec<u32> {
        self.inner.idle().iter().map(|c| c.pid).collect()
    }

    /// Children alive in the pool (idle or running a job).
    pub(crate) fn children(&self) -> usize {
        self.inner.idle().len() + self.inner.busy.load(Ordering::SeqCst)
    }
}

impl Inner {
    fn idle(&self) -> MutexGuard<'_, Vec<ChildProc>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run(
        self: Arc<Self>,
        ctx: TaskContext,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        pid: &ChildPid,
    ) -> Finished {
        // Busy from now: a child being started for this job counts, so a prestart running at
        // the same time does not add one more.
        self.busy.fetch_add(1, Ordering::SeqCst);
        let busy = Busy(self.clone());
        let mut child = match self.checkout().await {
            Ok(c) => c,
            Err(e) => return Finished::Lost(format!("cannot start a pool child: {e}")),
        };
        pid.set(Some(child.pid));
        let job = self.jobs.fetch_add(1, Ordering::Relaxed) + 1;
        let cancel = ctx.cancellation().clone();
        let run = ToChild::Run {
            job,
            headers: Box::new(ctx.headers().clone()),
            queue: ctx.queue().to_owned(),
            hostname: ctx.hostname().to_owned(),
            args,
            kwargs,
        };
        // Logs when the job is dropped before its child answered: the child is killed.
        let mut notice = KillNotice(Some(child.pid));
        if let Err(e) = child.send(&run).await {
            notice.0 = None;
            return child.lost(&e).await;
        }
        let mut cancel_sent = false;
        loop {
            tokio::select! {
                msg = child.recv() => match msg {
                    Ok(FromChild::Done { job: j, outcome }) if j == job => {
                        notice.0 = None;
                        pid.set(None);
                        let finished = outcome.into_finished();
                        drop(busy);
                        self.checkin(child);
                        return finished;
                    }
                    Ok(other) => {
                        tracing::warn!(pid = child.pid, message = ?other, "unexpected message from a pool child");
                    }
                    Err(e) => {
                        notice.0 = None;
                        return child.lost(&e).await;
                    }
                },
                () = cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    if let Err(e) = child.send(&ToChild::Cancel { job }).await {
                        notice.0 = None;
                        return child.lost(&e).await;
                    }
                }
            }
        }
    }

    /// An idle live child, or a new one.
    async fn checkout(&self) -> io::Result<ChildProc> {
        loop {
            let Some(mut c) = self.idle().pop() else {
                break;
            };
            match c.child.try_wait() {
                Ok(None) => return Ok(c),
                Ok(Some(status)) => {
                    tracing::warn!(pid = c.pid, status = %describe(Some(status)), "an idle pool child died; replacing it");
                }
                Err(e) => tracing::warn!(pid = c.pid, error = %e, "cannot check a pool child"),
            }
        }
        self.spawn().await
    }

    async fn spawn(&self) -> io::Result<ChildProc> {
        let command = self
            .command
            .as_ref()
            .map_err(|e| io::Error::other(e.clone()))?;
        let (ours, theirs) = StdUnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let mut cmd = tokio::process::Command::new(&command.program);
        cmd.args(&command.args)
            .env(CHILD_ENV, "1")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        // The command holds the child's end of the socket; our copy must go, or the child's
        // death would never read as end of file.
        drop(cmd);
        let pid = child.id().unwrap_or_default();
        let (r, w) = tokio::net::UnixStream::from_std(ours)?.into_split();
        let mut proc = ChildProc {
            pid,
            child,
            lines: BufReader::new(r).lines(),
            writer: w,
            tasks: 0,
        };
        match tokio::time::timeout(STARTUP, proc.recv()).await {
            Ok(Ok(FromChild::Ready { .. })) => {
                tracing::debug!(pid, "pool child started");
                Ok(proc)
            }
            Ok(Ok(other)) => Err(io::Error::other(format!(
                "pool child {pid} said {other:?} before it was ready"
            ))),
            Ok(Err(e)) => {
                let status = tokio::time::timeout(Duration::from_secs(1), proc.child.wait())
                    .await
                    .ok()
                    .and_then(Result::ok);
                Err(io::Error::other(format!(
                    "pool child {pid} ended before it was ready ({}; {e}): the binary must call \
                     celeriac::cli::run, or celeriac_worker::run_child when \
                     celeriac_worker::is_pool_child() is true",
                    describe(status)
                )))
            }
            Err(_) => Err(io::Error::other(format!(
                "pool child {pid} was not ready within {}s",
                STARTUP.as_secs()
            ))),
        }
    }

    /// Takes back a child that finished a job, or retires it.
    fn checkin(&self, mut c: ChildProc) {
        c.tasks += 1;
        let target = self.target.load(Ordering::SeqCst);
        if self.idle().len() + self.busy.load(Ordering::SeqCst) >= target {
            tracing::info!(pid = c.pid, target, "pool shrank; retiring the child");
            return c.retire();
        }
        if self.max_tasks.is_some_and(|max| c.tasks >= max) {
            tracing::info!(
                pid = c.pid,
                tasks = c.tasks,
                "pool child reached max_tasks_per_child; replacing it"
            );
            return c.retire();
        }
        if let Some(max) = self.max_memory_kib {
            if let Some(rss) = rss_kib(c.pid) {
                if rss > max {
                    tracing::info!(
                        pid = c.pid,
                        rss_kib = rss,
                        max_kib = max,
                        "pool child exceeded max_memory_per_child; replacing it"
                    );
                    return c.retire();
                }
            }
        }
        self.idle().push(c);
    }
}

impl ChildProc {
    async fn send(&mut self, msg: &ToChild) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line).await
    }

    /// The next message. Cancel-safe.
    async fn recv(&mut self) -> io::Result<FromChild> {
        match self.lines.next_line().await? {
            Some(line) => serde_json::from_str(&line).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad line from a pool child: {e}"),
                )
            }),
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    /// The job's child is gone or unusable: reap (or kill) it and say why.
    async fn lost(mut self, why: &io::Error) -> Finished {
        let status = match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(r) => r.ok(),
            Err(_) => {
                let _ = self.child.start_kill();
                self.child.wait().await.ok()
            }
        };
        let how = describe(status);
        tracing::error!(pid = self.pid, status = %how, error = %why, "a pool child died while running a task");
        Finished::Lost(format!(
            "Worker exited prematurely: {how} (pool child {})",
            self.pid
        ))
    }

    /// Closes the socket, so the child exits; reaps it in the background.
    fn retire(self) {
        let ChildProc {
            pid,
            mut child,
            lines,
            writer,
            ..
        } = self;
        drop(writer);
        drop(lines);
        tokio::spawn(async move {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                tracing::warn!(pid, "retired pool child did not exit; killing it");
                let _ = child.kill().await;
            }
        });
    }
}

/// Logs that a busy child is being killed (its job was dropped: hard time limit, shutdown).
struct KillNotice(Option<u32>);

impl Drop for KillNotice {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            tracing::warn!(pid, "killing the pool child running the task (SIGKILL)");
        }
    }
}

/// `signal 9 (SIGKILL)`, `exitcode 1`, as Celery words a lost worker.
fn describe(status: Option<ExitStatus>) -> String {
    let Some(status) = status else {
        return "unknown exit status".to_owned();
    };
    if let Some(sig) = status.signal() {
        let name = match sig {
            1 => "SIGHUP",
            2 => "SIGINT",
            3 => "SIGQUIT",
            4 => "SIGILL",
            6 => "SIGABRT",
            7 => "SIGBUS",
            8 => "SIGFPE",
            9 => "SIGKILL",
            11 => "SIGSEGV",
            13 => "SIGPIPE",
            15 => "SIGTERM",
            _ => "?",
        };
        format!("signal {sig} ({name})")
    } else {
        format!("exitcode {}", status.code().unwrap_or(-1))
    }
}

/// Resident memory of process `pid` in KiB (Linux `/proc`; `None` elsewhere).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ===== child side =====

/// The child's main loop: reads jobs from the socket on standard input, runs each blocking task
/// of `registry`, answers, and returns when the parent closes the socket.
///
/// `celeriac::cli::run` calls this by itself when [`is_pool_child`] is true. A binary that
/// starts its worker otherwise does the same, first thing in `main`:
///
/// ```no_run
/// # fn registry() -> celeriac_core::Registry { celeriac_core::Registry::new() }
/// fn main() -> std::process::ExitCode {
///     if celeriac_worker::is_pool_child() {
///         return celeriac_worker::run_child(&registry());
///     }
///     // ... build the app and run the worker ...
/// #   std::process::ExitCode::SUCCESS
/// }
/// ```
pub fn run_child(registry: &Registry) -> ExitCode {
    match child_loop(registry) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("celeriac pool child {}: {e}", std::process::id());
            ExitCode::FAILURE
        }
    }
}

struct Job {
    id: u64,
    headers: Headers,
    queue: String,
    hostname: String,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    cancel: Cancellation,
}

fn child_loop(registry: &Registry) -> io::Result<()> {
    let sock = StdUnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut writer = sock.try_clone()?;
    write_line(
        &mut writer,
        &FromChild::Ready {
            pid: std::process::id(),
        },
    )?;
    let current: Arc<Mutex<Option<(u64, Cancellation)>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let reader_current = current.clone();
    std::thread::Builder::new()
        .name("celeriac-pool-reader".to_owned())
        .spawn(move || read_jobs(sock, &reader_current, &tx))?;
    for job in rx {
        let id = job.id;
        let outcome = run_job(registry, job);
        *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        write_line(&mut writer, &FromChild::Done { job: id, outcome })?;
    }
    Ok(())
}

/// Reads the parent's lines; exits the process when the parent is gone.
fn read_jobs(
    sock: StdUnixStream,
    current: &Mutex<Option<(u64, Cancellation)>>,
    tx: &std::sync::mpsc::Sender<Job>,
) {
    for line in io::BufReader::new(sock).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<ToChild>(&line) {
            Ok(ToChild::Run {
                job,
                headers,
                queue,
                hostname,
                args,
                kwargs,
            }) => {
                let cancel = Cancellation::new();
                *current.lock().unwrap_or_else(|e| e.into_inner()) = Some((job, cancel.clone()));
                let job = Job {
                    id: job,
                    headers: *headers,
                    queue,
                    hostname,
                    args,
                    kwargs,
                    cancel,
                };
                if tx.send(job).is_err() {
                    break;
                }
            }
            Ok(ToChild::Cancel { job }) => {
                if let Some((j, c)) = &*current.lock().unwrap_or_else(|e| e.into_inner()) {
                    if *j == job {
                        c.cancel();
                    }
                }
            }
            Err(e) => eprintln!("celeriac pool child: ignoring a bad line: {e}"),
        }
    }
    // The parent closed the socket (it recycles this child, stopped, or died): whatever runs
    // now can no longer be reported, and its delivery goes to another worker, so stop at once.
    #[allow(clippy::exit)] // the only way to stop a task body that is still running
    std::process::exit(0);
}

fn run_job(registry: &Registry, job: Job) -> Outcome {
    let Some(def) = registry.get(&job.headers.task) else {
        return Outcome::Err(WireError::from_task_error(
            &TaskError::new("NotRegistered", job.headers.task.clone()),
            None,
        ));
    };
    let Handler::Blocking(f) = &def.handler else {
        return Outcome::Err(WireError::from_task_error(
            &TaskError::new("TypeError", "async tasks do not run in pool children"),
            None,
        ));
    };
    let ctx = TaskContext::new(job.headers, &job.queue, &job.hostname, job.cancel);
    let args = Args::new(job.args, job.kwargs);
    let result: std::thread::Result<TaskResult> =
        std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx, args)));
    match result {
        Ok(Ok(v)) => Outcome::Ok(v),
        Ok(Err(e)) => Outcome::Err(WireError::from_task_error(&e, def.options.autoretry)),
        Err(payload) => Outcome::Panic(panic_message(payload.as_ref())),
    }
}

fn write_line(w: &mut StdUnixStream, msg: &FromChild) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_cross_the_socket_with_their_kind() {
        let round = |e: TaskError, auto: Option<fn(&TaskError) -> bool>| {
            let text = serde_json::to_string(&WireError::from_task_error(&e, auto)).unwrap();
            serde_json::from_str::<WireError>(&text)
                .unwrap()
                .into_task_error()
        };
        let f = round(
            TaskError::new("ValueError", "bad").with_traceback("tb"),
            None,
        );
        assert_eq!(
            (f.kind(), f.exc_type(), f.message()),
            (TaskErrorKind::Failed, "ValueError", "bad")
        );
        assert_eq!(f.to_remote().traceback.as_deref(), Some("tb"));
        let r = round(TaskError::retry_after(Duration::from_millis(1500)), None);
        assert_eq!(
            (r.kind(), r.exc_type(), r.countdown()),
            (
                TaskErrorKind::Retry,
                "Retry",
                Some(Duration::from_millis(1500))
            )
        );
        let j = round(TaskError::reject("no", true), None);
        assert_eq!((j.kind(), j.requeue()), (TaskErrorKind::Reject, true));
        let auto = round(
            TaskError::new("Flaky", "x"),
            Some(|e: &TaskError| e.exc_type() == "Flaky"),
        );
        assert_eq!(
            (auto.kind(), auto.exc_type()),
            (TaskErrorKind::Retry, "Flaky")
        );
    }

    #[test]
    fn lines_are_tagged_json() {
        let mut h = Headers::new("tasks.add", "id-1");
        h.retries = 2;
        let run = ToChild::Run {
            job: 3,
            headers: Box::new(h),
            queue: "q".into(),
            hostname: "w@h".into(),
            args: vec![json!(1)],
            kwargs: Map::new(),
        };
        let text = serde_json::to_string(&run).unwrap();
        assert!(text.starts_with(r#"{"run":{"job":3,"headers":{"#), "{text}");
        let ToChild::Run { headers, .. } = serde_json::from_str(&text).unwrap() else {
            panic!("not a run")
        };
        assert_eq!((headers.task.as_str(), headers.retries), ("tasks.add", 2));
        let done = FromChild::Done {
            job: 3,
            outcome: Outcome::Ok(json!(5)),
        };
        assert_eq!(
            serde_json::to_string(&done).unwrap(),
            r#"{"done":{"job":3,"outcome":{"ok":5}}}"#
        );
    }

    #[test]
    fn exit_statuses_read_as_celery_words_them() {
        assert_eq!(
            describe(Some(ExitStatus::from_raw(9))),
            "signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe(Some(ExitStatus::from_raw(6))),
            "signal 6 (SIGABRT)"
        );
        assert_eq!(describe(Some(ExitStatus::from_raw(1 << 8))), "exitcode 1");
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}
