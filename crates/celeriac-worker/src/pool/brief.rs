//! Running brief blocking bodies inline on the runtime: [`Brief`].
//!
//! Handing a blocking body to another thread costs two thread wake-ups (there, and back to the
//! runtime) and two sleeps, several times what a body like `a + b` costs; profiles of a worker
//! draining such tasks spend ~30 % of its CPU in that handoff. So under [`Pool::Async`]
//! (crate::Pool) a blocking task that has proved brief runs on the runtime thread that took its
//! delivery, with no handoff.
//!
//! The proof is [`PROOF_RUNS`] consecutive runs on the blocking pool, each shorter than
//! [`BRIEF`]: such a body neither computes for long nor waits on anything slow. A body that
//! later runs inline for longer than [`TOO_LONG`] (a slow path, or only the machine pausing
//! the thread, which a wall clock cannot tell apart) goes back to the pool to prove itself
//! again; after [`STRIKES`] such runs it stays there for good, with a warning. So a body with a
//! slow path holds up a runtime thread at most that many times. Strikes are forgotten after
//! [`FORGIVEN_AFTER`] inline runs without one: on a busy machine the scheduler pauses a
//! thread for a millisecond now and then, and over a long run those pauses alone would
//! otherwise demote every brief body for good (the benchmark suite saw 17 such demotions in
//! one SQLite run); a real slow path shows up far more often than once in that many runs.
//! A body that blocks on tokio from inside (`Handle::block_on`) works on the blocking pool but panics on a runtime
//! thread; such a panic demotes it too, and that one run fails with a message saying so.
//! Workers that must never run a body on the runtime turn this off
//! ([`WorkerOptions::inline_brief`](crate::WorkerOptions)) or use [`Pool::Threads`]
//! (crate::Pool).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Finished;

/// Consecutive brief runs on the pool before a body runs inline.
pub(crate) const PROOF_RUNS: u32 = 32;
/// A run shorter than this counts as brief.
pub(crate) const BRIEF: Duration = Duration::from_micros(50);
/// An inline run longer than this sends its body back to the pool to prove itself again.
pub(crate) const TOO_LONG: Duration = Duration::from_millis(1);
/// After this many too-long inline runs a body stays on the pool for good.
pub(crate) const STRIKES: u8 = 3;
/// Inline runs without a too-long one after which earlier strikes are forgotten.
pub(crate) const FORGIVEN_AFTER: u32 = 10_000;

/// Where one run of a blocking body goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    Inline,
    Pool,
}

/// What is known of each blocking body, by handler identity.
#[derive(Debug, Default)]
pub(crate) struct Brief {
    bodies: Mutex<HashMap<usize, Record>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Record {
    /// Consecutive brief runs on the pool so far.
    proven: u32,
    /// Inline runs that took too long; at [`STRIKES`] the body stays on the pool.
    strikes: u8,
    /// Inline runs placed since the last strike.
    since_strike: u32,
}

impl Brief {
    fn with<R>(&self, body: usize, f: impl FnOnce(&mut Record) -> R) -> R {
        let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        f(bodies.entry(body).or_default())
    }

    /// Where the next run of `body` goes.
    pub(crate) fn place(&self, body: usize) -> Placement {
        self.with(body, |r| {
            if r.strikes < STRIKES && r.proven >= PROOF_RUNS {
                r.since_strike = r.since_strike.saturating_add(1);
                if r.since_strike >= FORGIVEN_AFTER {
                    r.strikes = 0;
                }
                Placement::Inline
            } else {
                Placement::Pool
            }
        })
    }

    /// Records a run on the pool that took `took`.
    pub(crate) fn ran_on_pool(&self, body: usize, took: Duration) {
        self.with(body, |r| {
            r.proven = if took < BRIEF {
                r.proven.saturating_add(1)
            } else {
                0
            };
        });
    }

    /// Records an inline run that took `took` and ended with `finished`; returns what the run
    /// reports (a panic from blocking on the runtime gets an explanation). Logs go out in the
    /// delivery's span, which names the task.
    pub(crate) fn ran_inline(&self, body: usize, took: Duration, finished: Finished) -> Finished {
        match finished {
            Finished::Panicked(msg) if blocked_on_runtime(&msg) => {
                self.with(body, |r| r.strikes = STRIKES);
                tracing::warn!(
                    "a brief blocking task blocked on the async runtime; it runs on the blocking pool from now on"
                );
                Finished::Panicked(format!(
                    "{msg} (the task ran on a runtime thread because its earlier runs were brief; \
                     it runs on the blocking pool from now on; set the worker's inline_brief = false \
                     or use the threads pool to never run tasks on the runtime)"
                ))
            }
            finished => {
                if took > TOO_LONG {
                    let strikes = self.with(body, |r| {
                        r.proven = 0;
                        r.strikes = r.strikes.saturating_add(1);
                        r.since_strike = 0;
                        r.strikes
                    });
                    let took_ms = took.as_secs_f64() * 1e3;
                    if strikes >= STRIKES {
                        tracing::warn!(
                            took_ms,
                            "a brief blocking task ran long on the async runtime again; it runs on the blocking pool from now on"
                        );
                    } else {
                        tracing::debug!(
                            took_ms,
                            strikes,
                            "a brief blocking task ran long inline; back to the blocking pool until it proves brief again"
                        );
                    }
                }
                finished
            }
        }
    }
}

/// Whether a panic message is tokio's refusal to block a runtime thread.
fn blocked_on_runtime(msg: &str) -> bool {
    msg.contains("Cannot start a runtime from within a runtime")
        || msg.contains("Cannot drop a runtime in a context where blocking is not allowed")
        || msg.contains("can call blocking only when running on the multi-threaded runtime")
}

/// Runs `run` inline, timing it.
pub(crate) fn timed<T>(run: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = run();
    (out, started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_runs_inline_after_its_proof_and_leaves_for_good_after_three_long_runs() {
        let b = Brief::default();
        for _ in 0..PROOF_RUNS - 1 {
            assert_eq!(b.place(1), Placement::Pool);
            b.ran_on_pool(1, Duration::from_micros(5));
        }
        // One slow run starts the proof over.
        b.ran_on_pool(1, Duration::from_millis(2));
        for _ in 0..PROOF_RUNS {
            assert_eq!(b.place(1), Placement::Pool);
            b.ran_on_pool(1, Duration::from_micros(5));
        }
        assert_eq!(b.place(1), Placement::Inline);
        assert_eq!(b.place(2), Placement::Pool, "bodies are told apart");
        for strike in 1..=STRIKES {
            let f = b.ran_inline(
                1,
                Duration::from_millis(3),
                Finished::Panicked("x".to_owned()),
            );
            assert!(matches!(f, Finished::Panicked(m) if m == "x"));
            assert_eq!(b.place(1), Placement::Pool, "strike {strike}");
            for _ in 0..PROOF_RUNS {
                b.ran_on_pool(1, Duration::from_micros(5));
            }
            if strike < STRIKES {
                assert_eq!(b.place(1), Placement::Inline, "proved brief again");
                // A brief inline run changes nothing.
                b.ran_inline(1, Duration::from_micros(5), Finished::Lost(String::new()));
                assert_eq!(b.place(1), Placement::Inline);
            }
        }
        assert_eq!(b.place(1), Placement::Pool, "demoted for good");
    }

    /// Strikes far apart (a thread paused now and then) never add up to a demotion; strikes
    /// close together still do.
    #[test]
    fn strikes_are_forgotten_after_many_brief_inline_runs() {
        let b = Brief::default();
        let prove = |b: &Brief| {
            for _ in 0..PROOF_RUNS {
                b.ran_on_pool(3, Duration::from_micros(5));
            }
            assert_eq!(b.place(3), Placement::Inline);
        };
        let strike = |b: &Brief| {
            b.ran_inline(3, Duration::from_millis(2), Finished::Lost(String::new()));
        };
        for _ in 0..STRIKES * 3 {
            prove(&b);
            for _ in 1..FORGIVEN_AFTER {
                assert_eq!(b.place(3), Placement::Inline);
            }
            strike(&b);
        }
        // Still inline after nine strikes spread out; the last one counts, and two more
        // close to it make three.
        prove(&b);
        strike(&b);
        prove(&b);
        strike(&b);
        for _ in 0..PROOF_RUNS {
            b.ran_on_pool(3, Duration::from_micros(5));
        }
        assert_eq!(b.place(3), Placement::Pool, "strikes close together demote");
    }

    #[test]
    fn blocking_on_the_runtime_demotes_and_explains() {
        let b = Brief::default();
        for _ in 0..PROOF_RUNS {
            b.ran_on_pool(7, Duration::from_micros(1));
        }
        assert_eq!(b.place(7), Placement::Inline);
        let msg = "Cannot start a runtime from within a runtime. This happens because ...";
        let f = b.ran_inline(
            7,
            Duration::from_micros(3),
            Finished::Panicked(msg.to_owned()),
        );
        let Finished::Panicked(m) = f else {
            panic!("still a panic")
        };
        assert!(
            m.starts_with(msg) && m.contains("inline_brief = false"),
            "{m}"
        );
        assert_eq!(b.place(7), Placement::Pool);
    }
}
