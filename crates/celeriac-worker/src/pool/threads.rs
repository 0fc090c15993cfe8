//! The worker's own thread pool for blocking task bodies ([`Pool::Threads`](crate::Pool)).
//!
//! A key design decision: a thread is started whenever a job arrives and no thread is idle,
//! and a thread that finds more than `max_idle` threads idle ends. The worker's concurrency
//! semaphore bounds how many jobs run at once, so in steady state there are `concurrency`
//! threads; a job abandoned at its hard time limit keeps its thread busy (a thread cannot be
//! killed), and the next job simply gets a fresh one. Only a process pool could really stop
//! such a task.
//!
//! Threads are plain `std` threads, not tokio's blocking pool, so a stuck task never delays
//! the runtime's shutdown and the process can exit.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug)]
pub(crate) struct ThreadPool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    max_idle: usize,
}

struct State {
    queue: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// Threads alive.
    threads: usize,
    spawned: u64,
    closed: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("queued", &self.queue.len())
            .field("idle", &self.idle)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl ThreadPool {
    /// A pool that keeps at most `max_idle` idle threads.
    pub(crate) fn new(max_idle: usize) -> Self {
        ThreadPool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                    spawned: 0,
                    closed: false,
                }),
                wake: Condvar::new(),
                max_idle: max_idle.max(1),
            }),
        }
    }

    /// Runs `job` on an idle thread, or on a new one when none is free.
    pub(crate) fn execute(&self, job: impl FnOnce() + Send + 'static) {
        let mut st = self.shared.lock();
        st.queue.push_back(Box::new(job));
        // Each queued job needs its own idle thread; jobs not yet picked up count too.
        if st.idle >= st.queue.len() {
            drop(st);
            self.shared.wake.notify_one();
            return;
        }
        st.threads += 1;
        st.spawned += 1;
        let n = st.spawned;
        drop(st);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("celeriac-task-{n}"))
            .spawn(move || shared.work());
        if let Err(e) = spawned {
            // The job stays queued for the next free thread.
            self.shared.lock().threads -= 1;
            tracing::error!(error = %e, "cannot start a task thread");
        }
    }

    /// Threads alive (running or idle).
    #[cfg(test)]
    pub(crate) fn threads(&self) -> usize {
        self.shared.lock().threads
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A job never runs under the lock, so a poisoned lock means a bug here; the state
        // itself is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn work(&self) {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.queue.pop_front() {
                drop(st);
                job();
                st = self.lock();
                continue;
            }
            if st.closed || st.idle >= self.max_idle {
                st.threads -= 1;
                return;
            }
            st.idle += 1;
            st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            st.idle -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn wait_until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not met in time");
            std::thread::yield_now();
        }
    }

    #[test]
    fn runs_jobs_concurrently_and_reuses_idle_threads() {
        let pool = ThreadPool::new(2);
        let (tx, rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(go_rx));
        for i in 0..2 {
            let tx = tx.clone();
            let go = go_rx.clone();
            pool.execute(move || {
                tx.send(("started", i)).unwrap();
                go.lock().unwrap().recv().unwrap();
                tx.send(("done", i)).unwrap();
            });
        }
        // Both run at once: both start before either is released.
        assert_eq!(rx.recv().unwrap().0, "started");
        assert_eq!(rx.recv().unwrap().0, "started");
        go_tx.send(()).unwrap();
        go_tx.send(()).unwrap();
        assert_eq!(rx.recv().unwrap().0, "done");
        assert_eq!(rx.recv().unwrap().0, "done");
        wait_until(|| pool.shared.lock().idle == 2);
        for _ in 0..10 {
            let tx = tx.clone();
            pool.execute(move || tx.send(("quick", 0)).unwrap());
            rx.recv().unwrap();
            // The job has sent its message but its thread may not be idle yet; a job given
            // to the pool in between would rightly start a third thread.
            wait_until(|| pool.shared.lock().idle == 2);
        }
        assert_eq!(pool.threads(), 2, "idle threads are reused");
    }

    #[test]
    fn a_stuck_job_does_not_hold_up_the_next_one() {
        let pool = ThreadPool::new(1);
        let (release, stuck) = mpsc::channel::<()>();
        pool.execute(move || {
            let _ = stuck.recv();
        });
        let (tx, rx) = mpsc::channel();
        pool.execute(move || tx.send(()).unwrap());
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        release.send(()).unwrap();
        // Back to at most one idle thread once the stuck job ends.
        wait_until(|| pool.threads() == 1);
    }
}
