//! What a worker did: [`WorkerReport`], counted as deliveries are settled.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts of settled deliveries, returned by [`Worker::run`](crate::Worker::run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Tasks that returned a value (SUCCESS).
    pub succeeded: u64,
    /// Tasks that failed for good (FAILURE), panics and time limits included.
    pub failed: u64,
    /// Tasks scheduled to run again (RETRY).
    pub retried: u64,
    /// Messages rejected: undecodable, unknown task, or the task asked for it.
    pub rejected: u64,
    /// Tasks not run because they were revoked or had expired.
    pub revoked: u64,
    /// Deliveries not run because their task id already had a ready result (a duplicate).
    pub skipped: u64,
    /// Deliveries handed back to the broker at shutdown, or re-parked for a future eta.
    pub requeued: u64,
    /// Messages moved to a dead-letter queue (`<queue>.dead`): refused ones (also counted in
    /// `rejected`) and those delivered more than `max_redeliveries` times.
    pub dead_lettered: u64,
}

/// `12 succeeded, 1 failed, 0 retried, ...`: for logs and people.
impl std::fmt::Display for WorkerReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} succeeded, {} failed, {} retried, {} rejected, {} revoked, {} skipped, \
             {} requeued, {} dead-lettered",
            self.succeeded,
            self.failed,
            self.retried,
            self.rejected,
            self.revoked,
            self.skipped,
            self.requeued,
            self.dead_lettered
        )
    }
}

/// Seconds as a log field reads best: `0.000012s`, `1.503s`, `75.2s` (never `1.2e-5`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seconds(pub(crate) f64);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        if s < 0.001 {
            write!(f, "{s:.6}s")
        } else if s < 10.0 {
            write!(f, "{s:.3}s")
        } else {
            write!(f, "{s:.1}s")
        }
    }
}

/// Thread-safe counters behind a [`WorkerReport`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    succeeded: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    rejected: AtomicU64,
    revoked: AtomicU64,
    skipped: AtomicU64,
    requeued: AtomicU64,
    dead_lettered: AtomicU64,
}

/// One settled delivery, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tally {
    Succeeded,
    Failed,
    Retried,
    Rejected,
    Revoked,
    Skipped,
    Requeued,
    DeadLettered,
}

impl Counters {
    pub(crate) fn add(&self, t: Tally) {
        let c = match t {
            Tally::Succeeded => &self.succeeded,
            Tally::Failed => &self.failed,
            Tally::Retried => &self.retried,
            Tally::Rejected => &self.rejected,
            Tally::Revoked => &self.revoked,
            Tally::Skipped => &self.skipped,
            Tally::Requeued => &self.requeued,
            Tally::DeadLettered => &self.dead_lettered,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn report(&self) -> WorkerReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerReport {
            succeeded: get(&self.succeeded),
            failed: get(&self.failed),
            retried: get(&self.retried),
            rejected: get(&self.rejected),
            revoked: get(&self.revoked),
            skipped: get(&self.skipped),
            requeued: get(&self.requeued),
            dead_lettered: get(&self.dead_lettered),
        }
    }
}
